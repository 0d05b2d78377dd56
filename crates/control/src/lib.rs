//! The management plane of keygate: the service layer over the SQLite and
//! PostgreSQL stores, their migrations, and the request logs ingested from
//! Envoy's access log.

pub mod db;
pub mod ingest;
pub mod logs;
pub mod usage;

pub use db::{Conn, Db, DbError};
pub use ingest::{IngestStats, Ingester, Lag, PollReport};
pub use logs::{query_logs, LogPage, LogQuery, LogRecord, Pruner, StatusFilter};
pub use usage::{query_usage, Bucket, UsagePoint, UsageQuery};
