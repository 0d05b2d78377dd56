//! Safe wrappers over the raw ABI: one handle per stream, one per filter
//! configuration. Every call is made on the thread Envoy called us on, with
//! the pointer Envoy gave us for that hook, and copies what it keeps: Envoy's
//! buffers are only valid until the hook returns.

use crate::abi::{self, EnvoyBuffer, EnvoyHttpHeader, ModuleBuffer, ModuleHttpHeader};

/// Logs through Envoy's `dynamic_modules` logger.
pub fn log(level: abi::LogLevel, message: &str) {
    // SAFETY: the buffer points into `message`, alive for the call.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Reads an Envoy buffer into an owned vector (null: none).
///
/// # Safety
/// `buf` must be a buffer Envoy just returned, still valid.
unsafe fn copy_out(buf: EnvoyBuffer) -> Option<Vec<u8>> {
    if buf.ptr.is_null() {
        return None;
    }
    Some(std::slice::from_raw_parts(buf.ptr.cast::<u8>(), buf.length).to_vec())
}

/// Room for the header views of one map, made in the hook's frame and
/// filled in place (never moved: it is half a KiB): on the stack for a
/// usual request, on the heap past [`INLINE_VIEWS`] headers.
pub struct ViewBuf {
    inline: [EnvoyHttpHeader; INLINE_VIEWS],
    heap: Vec<EnvoyHttpHeader>,
}

pub const INLINE_VIEWS: usize = 16;

const NO_HEADER: EnvoyHttpHeader = EnvoyHttpHeader {
    key_ptr: std::ptr::null(),
    key_length: 0,
    value_ptr: std::ptr::null(),
    value_length: 0,
};

impl ViewBuf {
    pub fn new() -> ViewBuf {
        ViewBuf {
            inline: [NO_HEADER; INLINE_VIEWS],
            heap: Vec::new(),
        }
    }
}

/// The filter configuration as Envoy knows it, only usable while Envoy is
/// creating it (`on_http_filter_config_new`, main thread).
pub struct ConfigHandle(pub abi::FilterConfigEnvoyPtr);

impl ConfigHandle {
    /// Defines a counter; its id is valid for every stream of this config.
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: Envoy's config pointer for this hook; `name` outlives the call.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null(),
                0,
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(id)
    }
}

/// One HTTP stream as Envoy knows it. Only valid during the hook that got it.
#[derive(Clone, Copy)]
pub struct Stream(pub abi::FilterEnvoyPtr);

impl Stream {
    /// A request header by lowercase name; repeated values joined with ','
    /// (Envoy's inline headers arrive joined already).
    pub fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        let mut count = 0usize;
        let first = self.header_at(abi::REQUEST_HEADER, name, 0, &mut count)?;
        if count <= 1 {
            return Some(first);
        }
        let mut joined = first;
        for i in 1..count {
            if let Some(v) = self.header_at(abi::REQUEST_HEADER, name, i, &mut 0) {
                joined.push(b',');
                joined.extend_from_slice(&v);
            }
        }
        Some(joined)
    }

    fn header_at(
        &self,
        kind: abi::HeaderType,
        name: &str,
        index: usize,
        count: &mut usize,
    ) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: stream pointer of the current hook; out-params are ours.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                index,
                count,
            )
        };
        if !ok {
            return None;
        }
        // SAFETY: Envoy just filled `out`; copied before any header change.
        unsafe { copy_out(out) }
    }

    /// Every request header in one host call, as views into Envoy's map.
    ///
    /// # Safety
    /// The views are valid until the current hook returns or a request
    /// header is changed, whichever comes first; the caller reads them only
    /// before either.
    pub unsafe fn request_header_views<'b>(&self, buf: &'b mut ViewBuf) -> &'b [EnvoyHttpHeader] {
        self.header_views(abi::REQUEST_HEADER, buf)
    }

    /// [`Stream::request_header_views`] for the response headers.
    ///
    /// # Safety
    /// As there, for response headers.
    pub unsafe fn response_header_views<'b>(&self, buf: &'b mut ViewBuf) -> &'b [EnvoyHttpHeader] {
        self.header_views(abi::RESPONSE_HEADER, buf)
    }

    unsafe fn header_views<'b>(
        &self,
        kind: abi::HeaderType,
        buf: &'b mut ViewBuf,
    ) -> &'b [EnvoyHttpHeader] {
        let n = abi::envoy_dynamic_module_callback_http_get_headers_size(self.0, kind);
        let out: &mut [EnvoyHttpHeader] = if n <= INLINE_VIEWS {
            &mut buf.inline
        } else {
            buf.heap.resize(n, NO_HEADER);
            &mut buf.heap
        };
        // `out` has room for the `n` headers Envoy just counted.
        if n == 0
            || !abi::envoy_dynamic_module_callback_http_get_headers(self.0, kind, out.as_mut_ptr())
        {
            return &[];
        }
        out.get(..n).unwrap_or_default()
    }

    /// Adds a request header known to be absent: cheaper than `set`, which
    /// first looks for copies to replace. False for an empty value.
    pub fn add_request_header(&self, name: &str, value: &str) -> bool {
        self.add_header(abi::REQUEST_HEADER, name, value)
    }

    /// [`Stream::add_request_header`] for the response.
    pub fn add_response_header(&self, name: &str, value: &str) -> bool {
        self.add_header(abi::RESPONSE_HEADER, name, value)
    }

    fn add_header(&self, kind: abi::HeaderType, name: &str, value: &str) -> bool {
        // SAFETY: stream pointer of the current hook; buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        }
    }

    /// Sets a header, or removes it with `None`.
    pub fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.set_header(abi::REQUEST_HEADER, name, value);
    }

    pub fn set_response_header(&self, name: &str, value: Option<&str>) {
        self.set_header(abi::RESPONSE_HEADER, name, value);
    }

    /// Envoy's ABI takes an empty value as "remove" (and refuses to add
    /// one), so a header can never be set empty here: the wasm build sends
    /// `x-keygate-scopes:` empty for a key without scopes, this one omits it.
    fn set_header(&self, kind: abi::HeaderType, name: &str, value: Option<&str>) {
        let value = value.map_or_else(ModuleBuffer::null, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: stream pointer of the current hook; buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// Answers the request locally; the upstream never sees it.
    pub fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8], details: &str) {
        let headers: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: every pointer refers to data alive for the call; Envoy copies.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details.as_bytes()),
            );
        }
    }

    /// `source.address` (`ip:port`), as the connection manager computed it:
    /// a view of the stream's remote address, valid during the current hook
    /// only (Envoy may replace the address between hooks; the borrow of
    /// `self` keeps it to the hook).
    pub fn source_address(&self) -> Option<&str> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: stream pointer of the current hook; `out` is ours.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                abi::ATTRIBUTE_SOURCE_ADDRESS,
                &mut out,
            )
        };
        if !ok {
            return None;
        }
        if out.ptr.is_null() {
            return None;
        }
        // SAFETY: Envoy just filled `out` with the address's own string
        // (`asStringView` of the stream's remote address), alive while the
        // stream is; read only during the hook that asked.
        let bytes = unsafe { std::slice::from_raw_parts(out.ptr.cast::<u8>(), out.length) };
        std::str::from_utf8(bytes).ok()
    }

    /// Filter state for the access log (`%FILTER_STATE(<key>:PLAIN)%`).
    pub fn set_filter_state(&self, key: &str, value: &str) {
        // SAFETY: stream pointer of the current hook; buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.0,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            );
        }
    }

    pub fn increment_counter(&self, id: usize) {
        // SAFETY: stream pointer of the current hook; no labels.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.0,
                id,
                std::ptr::null(),
                0,
                1,
            );
        }
    }

    /// Bytes of the request body Envoy holds for this filter: the buffered
    /// part (what earlier hooks asked Envoy to keep) plus the chunk that just
    /// arrived, unless Envoy already appended it to the buffer.
    pub fn request_body_size(&self) -> usize {
        // SAFETY: stream pointer of the current hook.
        unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_size(
                self.0,
                abi::BUFFERED_REQUEST_BODY,
            ) + abi::envoy_dynamic_module_callback_http_get_body_size(
                self.0,
                abi::RECEIVED_REQUEST_BODY,
            )
        }
    }

    /// The whole request body at its end: the buffer, which Envoy completes
    /// with the last chunk when it buffered earlier ones, else the one chunk.
    pub fn request_body(&self) -> Vec<u8> {
        let buffered = self.body_chunks(abi::BUFFERED_REQUEST_BODY);
        if !buffered.is_empty() {
            return buffered;
        }
        self.body_chunks(abi::RECEIVED_REQUEST_BODY)
    }

    fn body_chunks(&self, kind: abi::BodyType) -> Vec<u8> {
        // SAFETY: stream pointer of the current hook.
        let n =
            unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, kind) };
        if n == 0 {
            return Vec::new();
        }
        let mut chunks = vec![
            EnvoyBuffer {
                ptr: std::ptr::null(),
                length: 0,
            };
            n
        ];
        // SAFETY: `chunks` has room for the `n` slices Envoy reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                self.0,
                kind,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        let mut body = Vec::new();
        for c in chunks {
            // SAFETY: slices Envoy just reported, valid during this hook.
            if let Some(bytes) = unsafe { copy_out(c) } {
                body.extend_from_slice(&bytes);
            }
        }
        body
    }
}
