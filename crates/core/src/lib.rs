//! keygate-core: everything keygate decides, with no proxy-wasm types.
//!
//! The Envoy filter gathers request facts from the host and applies the
//! [`verdict::Decision`] computed here; the sidecar shares the credential and
//! sync wire formats. Every module is unit-tested natively.

pub mod access_log;
pub mod config;
pub mod credential;
pub mod denial;
pub mod extract;
pub mod hash;
pub mod ip_rules;
pub mod path;
pub mod rate_limit;
pub mod scope;
pub mod sync;
pub mod token;
pub mod verdict;

pub use config::{ConfigError, Policy};
pub use credential::{Credential, CredentialRecord};
pub use denial::Denial;
pub use verdict::{decide, Decision, Host, Outcome};

/// Version of the keygate build, logged by the filter at VM start.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
