//! keygate: an API-key gate for Envoy, as a proxy-wasm filter.
//!
//! This crate is host glue only: it reads request facts from Envoy (every
//! call through [`host`], which returns errors instead of trapping), asks
//! `keygate_core::decide` for a verdict and applies it. Everything decided
//! lives in `keygate-core`, unit-tested natively.

// A panic traps the VM of an Envoy worker: none in non-test code.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod host;
mod http_context;
mod metrics;
mod root_context;
mod shared_store;
mod sync_context;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    // After set_log_level, which installs the SDK's own hook.
    host::install_panic_hook();
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root_context::KeygateRoot::default())
    });
}}
