//! Every call keygate makes to Envoy, as small wrappers that return
//! `Result` and name the call that failed.
//!
//! Why: the SDK's high-level `Context`/`HttpContext` methods
//! (`get_current_time`, `get_property`, `set_property`,
//! `set_http_request_header`, `send_http_response`,
//! `get_plugin_configuration`, `get_http_request_body`, …) `unwrap()` the
//! host's answer, so an error status from Envoy aborts the whole VM. The
//! functions in `proxy_wasm::hostcalls` return it instead; the request path
//! turns each error into a 500 (fail closed), never a trap. (Those still
//! panic on a status they do not expect at all; the panic hook installed at
//! start logs that before the trap.)

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::fmt;
use std::time::UNIX_EPOCH;

/// A host call that answered with an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    pub call: &'static str,
    pub status: Status,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {:?}", self.call, self.status)
    }
}

pub type HostResult<T> = Result<T, HostError>;

fn named<T>(call: &'static str, r: Result<T, Status>) -> HostResult<T> {
    r.map_err(|status| HostError { call, status })
}

/// Unix time in nanoseconds.
pub fn now_ns() -> HostResult<u64> {
    let t = named("get_current_time", hostcalls::get_current_time())?;
    // Before 1970 or past 2554: the host's clock is broken, not ours to fix.
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .ok_or(HostError {
            call: "get_current_time",
            status: Status::BadArgument,
        })
}

/// The plugin's `configuration` bytes (None when Envoy has none).
pub fn plugin_configuration() -> HostResult<Option<Vec<u8>>> {
    named(
        "get_buffer(plugin_configuration)",
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX),
    )
}

/// A request property such as `["source", "address"]`.
pub fn property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    named("get_property", hostcalls::get_property(path.to_vec()))
}

/// Filter state for the access log (`%FILTER_STATE(wasm.<name>:…)%`).
pub fn set_property(name: &str, value: &[u8]) -> HostResult<()> {
    named(
        "set_property",
        hostcalls::set_property(vec![name], Some(value)),
    )
}

/// A request header's raw bytes (the String variants of the SDK panic on
/// non-UTF-8 values).
pub fn request_header(name: &str) -> HostResult<Option<Vec<u8>>> {
    named(
        "get_request_header",
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name),
    )
}

/// All request headers, in Envoy's order, in one call: cheaper for Envoy
/// than the 4–5 single reads a decision makes (bench/RESULTS.md "p5-wasm").
pub fn request_headers() -> HostResult<Vec<(String, Vec<u8>)>> {
    named(
        "get_request_headers",
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders),
    )
}

/// Replaces all request headers with `pairs`, in that order: Envoy removes
/// every header and adds these (one call instead of one per edit).
pub fn set_request_headers(pairs: Vec<(&str, &[u8])>) -> HostResult<()> {
    named(
        "set_request_headers",
        hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs),
    )
}

/// Sets (Some) or removes (None) a request header.
pub fn set_request_header(name: &str, value: Option<&str>) -> HostResult<()> {
    named(
        "set_request_header",
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value),
    )
}

/// Sets a response header: any copies the upstream sent are replaced.
pub fn set_response_header(name: &str, value: &str) -> HostResult<()> {
    named(
        "set_response_header",
        hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)),
    )
}

/// The first `size` bytes of the buffered request body.
pub fn request_body(size: usize) -> HostResult<Option<Vec<u8>>> {
    named(
        "get_buffer(request_body)",
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size),
    )
}

/// A local reply: Envoy answers the client and the request goes no further.
pub fn send_reply(status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
    named(
        "send_local_response",
        hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)),
    )
}

/// A shared-data entry and its CAS token; (None, None) when absent.
pub fn shared_get(key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
    named("get_shared_data", hostcalls::get_shared_data(key))
}

/// What a shared-data write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Yes,
    /// Someone else wrote since the CAS token was read.
    CasMismatch,
}

/// Writes a shared-data entry if `cas` still matches (None: unconditionally).
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> HostResult<Written> {
    match hostcalls::set_shared_data(key, Some(value), cas) {
        Ok(()) => Ok(Written::Yes),
        Err(Status::CasMismatch) => Ok(Written::CasMismatch),
        Err(status) => Err(HostError {
            call: "set_shared_data",
            status,
        }),
    }
}

pub fn define_counter(name: &str) -> HostResult<u32> {
    named(
        "define_metric",
        hostcalls::define_metric(MetricType::Counter, name),
    )
}

pub fn increment_counter(id: u32, by: u64) -> HostResult<()> {
    let by = i64::try_from(by).unwrap_or(i64::MAX);
    named("increment_metric", hostcalls::increment_metric(id, by))
}

/// Calls the root context's `on_tick` every `period`.
pub fn set_tick_period(period: std::time::Duration) -> HostResult<()> {
    named("set_tick_period", hostcalls::set_tick_period(period))
}

/// Logs a panic's message at error level before the VM traps. Replaces the
/// SDK's hook, which itself unwraps the log call. Install after
/// `proxy_wasm::set_log_level`, which installs the SDK's.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Error, &format!("keygate panicked: {info}"));
    }));
}
