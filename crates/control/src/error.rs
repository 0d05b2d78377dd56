//! Every way a management operation can fail, with messages that say what
//! to do next. Messages never contain a key, a secret or a database password.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no store at {path}: create it with `keygate --store {path} store init` \
         (or set KEYGATE_STORE / --store to an existing store)"
    )]
    StoreMissing { path: PathBuf },

    #[error("a store already exists at {path} (id {store_id}); nothing changed")]
    StoreExists { path: String, store_id: String },

    #[error(
        "the store at {path} has no identity (made by an older keygate): \
         run `keygate --store {path} store init` once to give it one"
    )]
    NoIdentity { path: String },

    #[error("store {path} is corrupt ({detail}); refusing to use it")]
    Corrupt { path: String, detail: String },

    #[error("the store is invalid ({0}); refusing to use it")]
    Invalid(String),

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("PostgreSQL at {host}:{port}: {detail}")]
    Postgres {
        host: String,
        port: u16,
        detail: String,
    },

    #[error(
        "the PostgreSQL store is not initialised: run `keygate store init` \
         (creates the schema and the store identity)"
    )]
    PgNotInitialised,

    #[error(
        "the PostgreSQL store's schema is older than this keygate: run `keygate store migrate`"
    )]
    PgNeedsMigration,

    #[error(
        "the database schema ({found}) is newer than this keygate ({supported}): upgrade keygate"
    )]
    SchemaTooNew { found: i32, supported: i32 },

    #[error("no key with id '{0}' (see `keygate key list`)")]
    NoSuchKey(String),

    #[error("a key with id '{0}' already exists: choose another --id")]
    KeyExists(String),

    #[error("no plan named '{0}' (see `keygate plan list`)")]
    NoSuchPlan(String),

    /// Bad input, naming the option or field at fault.
    #[error("{field}: {message}")]
    BadInput { field: String, message: String },

    #[error(
        "refused: tenant '{tenant}' already has {limit} {kind} key(s), the most allowed; \
         revoke one first (`keygate key revoke <key-id>`, see `keygate key list --tenant {tenant}`)"
    )]
    TenantLimit {
        tenant: String,
        kind: &'static str,
        limit: usize,
    },

    #[error("no randomness from the operating system: {0}")]
    Random(String),

    /// A refusal in words for the user (e.g. a secret to rotate that the
    /// key does not have).
    #[error("{0}")]
    Other(String),

    /// A failure inside keygate or its store (a poisoned lock, a record
    /// that does not serialise, a store without the feature asked for):
    /// nothing the caller did wrong. The API answers 500 with a generic
    /// message and logs this text.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn bad(field: &str, message: impl Into<String>) -> Error {
        Error::BadInput {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// A short stable name for the error, for `--json` output.
    pub fn code(&self) -> &'static str {
        match self {
            Error::StoreMissing { .. } => "store_missing",
            Error::StoreExists { .. } => "store_exists",
            Error::NoIdentity { .. } => "store_without_identity",
            Error::Corrupt { .. } => "store_corrupt",
            Error::Invalid(_) => "store_invalid",
            Error::Io { .. } => "io",
            Error::Postgres { .. } => "postgres",
            Error::PgNotInitialised => "store_not_initialised",
            Error::PgNeedsMigration => "store_needs_migration",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::NoSuchKey(_) => "no_such_key",
            Error::KeyExists(_) => "key_exists",
            Error::NoSuchPlan(_) => "no_such_plan",
            Error::BadInput { .. } => "bad_input",
            Error::TenantLimit { .. } => "tenant_limit",
            Error::Random(_) => "random",
            Error::Other(_) => "error",
            Error::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
