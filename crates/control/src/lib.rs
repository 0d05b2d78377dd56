//! The management plane of keygate: one service layer ([`service::Service`])
//! owns every change to keys and sessions (validation, per-tenant limits,
//! store identity, change notification); the CLI and later the REST API and
//! the portal are thin doors onto it and never touch a store directly.

pub mod error;
pub mod service;
pub mod store;

pub use error::Error;
pub use service::Service;
