//! keygate-core: everything keygate decides, with no proxy-wasm types.
//!
//! The Envoy filter gathers request facts from the host and applies the
//! [`verdict::Decision`] computed here; the sidecar shares the credential and
//! sync wire formats. Every module is unit-tested natively.
//!
//! Imports point one way (`make lint` checks it with scripts/check_cycles.py):
//! shared pieces (`error`, `names`, `hash`, `shared_data`) → parsing and
//! model (`path`, `extract`, `ip_rules`, `rate_limit`, `credential`, `entry`,
//! `scope`, `token`, `sync`) → policy (`config`) → decision (`verdict`, `denial`,
//! `access_log`).

// A panic in the filter kills the Envoy worker's VM: none in non-test code.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod access_log;
pub mod config;
pub mod credential;
pub mod denial;
pub mod entry;
pub mod error;
pub mod extract;
pub mod hash;
pub mod ip_rules;
pub mod key_format;
pub mod limits;
pub mod names;
pub mod path;
pub mod rate_limit;
pub mod scope;
pub mod shared_data;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod token;
pub mod verdict;

pub use config::Policy;
pub use credential::{Credential, CredentialRecord};
pub use denial::Denial;
pub use error::ConfigError;
pub use verdict::{decide, Decision, Host, Outcome};

/// Version of the keygate build, logged by the filter at VM start.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
