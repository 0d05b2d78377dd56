//! keygate as an Envoy dynamic module (`envoy.filters.http.dynamic_modules`):
//! the same `keygate-core` decides, with native speed instead of a wasm VM.
//! Built against the exact ABI of the Envoy we pin (see [`abi`]); load it
//! only into that Envoy version.
//!
//! This file holds the exported event hooks. Each one catches panics (a
//! panic must never unwind into Envoy: the hook then fails closed) and hands
//! over to the gate or sync role.

// The exported hooks take Envoy's raw pointers and stay safe `extern "C"`
// functions: Envoy is their only caller and passes back exactly the
// pointers we returned (see `filter`), which is all they dereference.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Panics are caught at every hook so none unwinds into Envoy; with
// panic=abort (the workspace's release profile, right for wasm) one would
// abort Envoy instead. `make native` builds with unwinding.
#[cfg(panic = "abort")]
compile_error!("keygate-native must be built with panic=unwind: use `make native`");

mod abi;
// mmap/mremap: Linux, where Envoy's dynamic modules run.
#[cfg(target_os = "linux")]
mod allocator;
mod config;
mod envoy;
mod gate;
#[cfg(test)]
mod host_stub;
mod profile;
mod state;
mod sync;

use abi::{FilterConfigEnvoyPtr, FilterConfigModulePtr, FilterEnvoyPtr, FilterModulePtr};
use config::FilterConfig;
use envoy::{ConfigHandle, Stream};
use keygate_core::config::Role;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Large blocks from the kernel, returned at once (see [`allocator`]).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

/// The per-stream object Envoy holds for us.
enum Filter {
    Gate(gate::Gate),
    Sync(sync::SyncFilter),
}

/// Runs a hook body; a panic is logged and turned into `fallback`.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        envoy::log(abi::LOG_ERROR, "keygate: internal error in a filter hook");
        fallback
    })
}

/// A panic in a request hook: refuse the request rather than let it through.
fn fail_closed(stream: Stream) {
    let denial = keygate_core::Denial::new(
        keygate_core::denial::Reason::Unavailable,
        "keygate internal error",
    );
    let _ = catch_unwind(AssertUnwindSafe(|| {
        stream.send_response(
            denial.status(),
            &[("content-type", "application/json")],
            &denial.body(),
            "keygate_internal_error",
        );
    }));
}

/// # Safety
/// `ptr` must be a pointer returned by `envoy_dynamic_module_on_http_filter_new`
/// and not yet destroyed; Envoy calls each stream's hooks on one thread.
unsafe fn filter<'a>(ptr: FilterModulePtr) -> Option<&'a mut Filter> {
    ptr.cast_mut().cast::<Filter>().as_mut()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    let commit = option_env!("KEYGATE_GIT_HASH").unwrap_or("unknown");
    envoy::log(
        abi::LOG_INFO,
        &format!(
            "keygate {} ({commit}) native module loaded",
            keygate_core::VERSION
        ),
    );
    abi::ABI_VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: FilterConfigEnvoyPtr,
    _name: abi::EnvoyBuffer,
    config: abi::EnvoyBuffer,
) -> FilterConfigModulePtr {
    guard(std::ptr::null(), || {
        let json = if config.ptr.is_null() {
            &[][..]
        } else {
            // SAFETY: Envoy's config bytes, valid during this hook.
            unsafe { std::slice::from_raw_parts(config.ptr.cast::<u8>(), config.length) }
        };
        match FilterConfig::new(&ConfigHandle(config_envoy), json) {
            Some(c) => Arc::into_raw(Arc::new(c)).cast(),
            None => std::ptr::null(),
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: FilterConfigModulePtr,
) {
    guard((), || {
        if !config.is_null() {
            // SAFETY: made by Arc::into_raw in config_new; Envoy destroys it once.
            drop(unsafe { Arc::from_raw(config.cast::<FilterConfig>()) });
        }
    });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: FilterConfigModulePtr,
    _filter_envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    guard(std::ptr::null(), || {
        if config.is_null() {
            return std::ptr::null();
        }
        let config = config.cast::<FilterConfig>();
        // SAFETY: a live config from config_new; the stream keeps its own
        // reference so the config outlives it whatever Envoy's order.
        let config = unsafe {
            Arc::increment_strong_count(config);
            Arc::from_raw(config)
        };
        let filter = match config.role {
            Role::Gate => Filter::Gate(gate::Gate::new(config)),
            Role::Sync => Filter::Sync(sync::SyncFilter::new(config)),
        };
        Box::into_raw(Box::new(filter)).cast_const().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_ptr: FilterModulePtr) {
    guard((), || {
        if !filter_ptr.is_null() {
            // SAFETY: made by Box::into_raw in filter_new; destroyed once.
            drop(unsafe { Box::from_raw(filter_ptr.cast_mut().cast::<Filter>()) });
        }
    });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy_ptr: FilterEnvoyPtr,
    filter_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let stream = Stream(envoy_ptr);
    let status = guard(None, || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let status = match unsafe { filter(filter_ptr) }? {
            Filter::Gate(g) => g.on_request_headers(stream, end_of_stream),
            Filter::Sync(s) => s.on_request_headers(stream, end_of_stream),
        };
        Some(status)
    });
    status.unwrap_or_else(|| {
        fail_closed(stream);
        abi::HEADERS_STOP_ITERATION
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy_ptr: FilterEnvoyPtr,
    filter_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let stream = Stream(envoy_ptr);
    let status = guard(None, || {
        // SAFETY: as above.
        let status = match unsafe { filter(filter_ptr) }? {
            Filter::Gate(g) => g.on_request_body(stream, end_of_stream),
            Filter::Sync(s) => s.on_request_body(stream, end_of_stream),
        };
        Some(status)
    });
    status.unwrap_or_else(|| {
        fail_closed(stream);
        abi::BODY_STOP_ITERATION_NO_BUFFER
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy_ptr: FilterEnvoyPtr,
    filter_ptr: FilterModulePtr,
) -> u32 {
    let stream = Stream(envoy_ptr);
    let status = guard(None, || {
        // SAFETY: as above.
        let status = match unsafe { filter(filter_ptr) }? {
            Filter::Gate(g) => g.on_request_trailers(stream),
            Filter::Sync(s) => s.on_request_trailers(stream),
        };
        Some(status)
    });
    status.unwrap_or_else(|| {
        fail_closed(stream);
        abi::TRAILERS_STOP_ITERATION
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy_ptr: FilterEnvoyPtr,
    filter_ptr: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    guard(abi::HEADERS_CONTINUE, || {
        // SAFETY: as above.
        match unsafe { filter(filter_ptr) } {
            Some(Filter::Gate(g)) => g.on_response_headers(Stream(envoy_ptr)),
            _ => abi::HEADERS_CONTINUE,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy_ptr: FilterEnvoyPtr,
    _filter_ptr: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    abi::BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy_ptr: FilterEnvoyPtr,
    _filter_ptr: FilterModulePtr,
) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _envoy_ptr: FilterEnvoyPtr,
    _filter_ptr: FilterModulePtr,
    _response_code: u32,
    _details: abi::EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    abi::LOCAL_REPLY_CONTINUE
}

/// Hooks keygate does not use. Envoy refuses a module missing any of them,
/// so they exist and do nothing: keygate starts no callouts, streams or
/// schedulers, and has no per-route config, so Envoy never calls them with
/// arguments that matter (their parameters are left out for that reason:
/// extra arguments are harmless in the C calling convention).
macro_rules! unused_hooks {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $name() {}
        )*
    };
}

unused_hooks!(
    envoy_dynamic_module_on_http_filter_stream_complete,
    envoy_dynamic_module_on_http_filter_http_callout_done,
    envoy_dynamic_module_on_http_filter_http_stream_headers,
    envoy_dynamic_module_on_http_filter_http_stream_data,
    envoy_dynamic_module_on_http_filter_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_http_stream_complete,
    envoy_dynamic_module_on_http_filter_http_stream_reset,
    envoy_dynamic_module_on_http_filter_scheduled,
    envoy_dynamic_module_on_http_filter_config_scheduled,
    envoy_dynamic_module_on_http_filter_config_http_callout_done,
    envoy_dynamic_module_on_http_filter_config_http_stream_headers,
    envoy_dynamic_module_on_http_filter_config_http_stream_data,
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_config_http_stream_complete,
    envoy_dynamic_module_on_http_filter_config_http_stream_reset,
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark,
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark,
    envoy_dynamic_module_on_http_filter_per_route_config_destroy,
);

/// No per-route configuration: refusing one (null) makes Envoy reject a
/// route that tries to give keygate per-route settings, instead of ignoring them.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: abi::EnvoyBuffer,
    _config: abi::EnvoyBuffer,
) -> *const std::ffi::c_void {
    std::ptr::null()
}
