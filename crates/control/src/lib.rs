//! The management plane of keygate: one service layer ([`service::Service`])
//! owns every change to keys and sessions (validation, per-tenant limits,
//! store identity, change notification) over the file or PostgreSQL key
//! store; the database ([`db`]) holds the SQLite/PostgreSQL schema with its
//! migrations and the request logs ingested from Envoy's access log. The CLI,
//! the REST API and the portal are thin doors onto it and never touch a store
//! directly.

pub mod db;
pub mod error;
pub mod ingest;
pub mod logs;
pub mod mgmt;
pub mod pg_tls;
pub mod service;
pub mod store;
pub mod usage;

pub use db::{Conn, Db, DbError};
pub use error::Error;
pub use ingest::{IngestStats, Ingester, Lag, PollReport};
pub use logs::{query_logs, LogPage, LogQuery, LogRecord, Pruner, StatusFilter};
pub use service::Service;
pub use usage::{query_usage, Bucket, UsagePoint, UsageQuery};
