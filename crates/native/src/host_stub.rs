//! Unit tests link the module without Envoy: these stand in for the Envoy
//! callbacks the module imports. Nothing here runs in tests of pure state;
//! it only satisfies the linker.

use crate::abi::{
    EnvoyBuffer, EnvoyHttpHeader, FilterConfigEnvoyPtr, FilterEnvoyPtr, ModuleBuffer,
    ModuleHttpHeader,
};

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log(_: u32, _: ModuleBuffer) {}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_header(
    _: FilterEnvoyPtr,
    _: u32,
    _: ModuleBuffer,
    _: *mut EnvoyBuffer,
    _: usize,
    _: *mut usize,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
    _: FilterEnvoyPtr,
    _: u32,
) -> usize {
    0
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers(
    _: FilterEnvoyPtr,
    _: u32,
    _: *mut EnvoyHttpHeader,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_add_header(
    _: FilterEnvoyPtr,
    _: u32,
    _: ModuleBuffer,
    _: ModuleBuffer,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    _: FilterEnvoyPtr,
    _: u32,
    _: ModuleBuffer,
    _: ModuleBuffer,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    _: FilterEnvoyPtr,
    _: u32,
    _: *const ModuleHttpHeader,
    _: usize,
    _: ModuleBuffer,
    _: ModuleBuffer,
) {
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks_size(
    _: FilterEnvoyPtr,
    _: u32,
) -> usize {
    0
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks(
    _: FilterEnvoyPtr,
    _: u32,
    _: *mut EnvoyBuffer,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_body_size(_: FilterEnvoyPtr, _: u32) -> usize {
    0
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
    _: FilterEnvoyPtr,
    _: u32,
    _: *mut EnvoyBuffer,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
    _: FilterEnvoyPtr,
    _: ModuleBuffer,
    _: ModuleBuffer,
) -> bool {
    false
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    _: FilterConfigEnvoyPtr,
    _: ModuleBuffer,
    _: *const ModuleBuffer,
    _: usize,
    _: *mut usize,
) -> u32 {
    1
}
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
    _: FilterEnvoyPtr,
    _: usize,
    _: *const ModuleBuffer,
    _: usize,
    _: u64,
) -> u32 {
    1
}
