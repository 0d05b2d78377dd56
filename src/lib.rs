//! keygate: an API-key gate for Envoy, as a proxy-wasm filter.
//!
//! This crate is host glue only: it reads request facts from Envoy, asks
//! `keygate_core::decide` for a verdict and applies it. Everything decided
//! lives in `keygate-core`, unit-tested natively.

mod http_context;
mod metrics;
mod root_context;
mod shared_store;
mod sync_context;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root_context::KeygateRoot::default())
    });
}}
