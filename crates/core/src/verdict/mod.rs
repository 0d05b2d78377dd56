//! The verdict on a request, by concern: [`decide`] (authenticate →
//! authorize → rate-limit), [`login`] (the API-key-for-token exchange) and
//! [`reply`] (header edits upstream, rate-limit headers). The common names
//! are re-exported here.

pub mod decide;
pub mod login;
pub mod reply;

pub use self::decide::{decide, Decision, Headers, Host, Outcome, TokenSession};
pub use self::login::{is_login, login, Login};
pub use self::reply::{identity_spellings, policy_header, rate_limit_headers, UpstreamHeaders};
