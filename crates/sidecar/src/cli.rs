//! The command line: what `keygate --help` shows. Parsing only; `main`
//! dispatches to the service layer and `output` renders the results.

use clap::{Args, Parser, Subcommand};
use keygate_core::credential::Kind;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

#[derive(Parser)]
#[command(
    name = "keygate",
    version = env!("KEYGATE_LONG_VERSION"),
    about = "API keys for the keygate Envoy filter: manage them, push them live"
)]
pub struct Cli {
    /// Store: a SQLite file (`*.db` or sqlite:PATH) or a JSON file made by
    /// `keygate store init`, or
    /// postgres://user@host:port/db for a shared store feeding a fleet.
    /// Required, here or in KEYGATE_STORE.
    #[arg(long, global = true, env = "KEYGATE_STORE", value_name = "PATH|URL")]
    pub store: Option<String>,
    /// Machine-readable JSON output (errors too, as JSON on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Format of generated key values: identifiable (<prefix>_<env>_<random><checksum>,
    /// found by secret scanners, refused by checksum at the gate) or hex64.
    #[arg(long, global = true, env = "KEYGATE_KEY_FORMAT", default_value = "identifiable",
          value_parser = parse_key_format)]
    pub key_format: keygate_control::service::KeyFormat,
    /// Prefix of identifiable keys (a-z, 0-9, starting with a letter, at most
    /// 10); the gates' `key_prefixes` must list it.
    #[arg(long, global = true, env = "KEYGATE_KEY_PREFIX", default_value = "kg")]
    pub key_prefix: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create, inspect and change keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Push the store into Envoy sync endpoints and keep them in step.
    Sync(SyncArgs),
    /// The store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Requests made with credentials, from Envoy's JSON access log.
    Logs(LogsArgs),
    /// Token sessions (tokens issued by POST /auth/login).
    #[command(subcommand)]
    Session(SessionCommand),
    /// Management API tokens (shown once, stored hashed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The developer portal (pages at /portal of `keygate serve`).
    #[command(subcommand)]
    Portal(PortalCommand),
    /// The management server: REST API, /healthz, /metrics, with the sync
    /// daemon, the access-log ingester and the retention pruner in one process.
    Serve(ServeArgs),
    /// Plans: named limit sets for keys and tenants.
    #[command(subcommand)]
    Plan(crate::limits_cli::PlanCommand),
    /// Tenant-wide settings: plan and shared limits.
    #[command(subcommand)]
    Tenant(crate::limits_cli::TenantCommand),
}

#[derive(Subcommand)]
pub enum PortalCommand {
    /// Mint a one-time sign-in link for one tenant (only its hash is kept).
    Link {
        #[arg(long)]
        tenant: String,
        /// How long the link may wait to be opened (it works once).
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        expires: Duration,
        /// Where `keygate serve` is reached, for the printed URL.
        #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
        base_url: String,
        /// Management database (default: the store, if SQLite or PostgreSQL).
        #[arg(long, env = "KEYGATE_DB", value_name = "PATH|URL")]
        db: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token: --operator (every tenant) or --tenant T (one tenant).
    Create {
        #[arg(long, conflicts_with = "tenant", required_unless_present = "tenant")]
        operator: bool,
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime, e.g. 30d, 12h; default: until revoked.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Management database (default: the store, if SQLite or PostgreSQL).
        #[arg(long, env = "KEYGATE_DB", value_name = "PATH|URL")]
        db: Option<String>,
    },
    /// List tokens (never the tokens themselves).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, env = "KEYGATE_DB", value_name = "PATH|URL")]
        db: Option<String>,
    },
    /// Revoke a token by its id: refused (401) at once.
    Revoke {
        token_id: String,
        #[arg(long, env = "KEYGATE_DB", value_name = "PATH|URL")]
        db: Option<String>,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address of the API (loopback unless you put TLS in front).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Management database: tokens, tenants, audit, request logs
    /// (default: the store, if SQLite or PostgreSQL).
    #[arg(long, env = "KEYGATE_DB", value_name = "PATH|URL")]
    pub db: Option<String>,
    /// Envoy sync listener, repeatable: runs the sync daemon in this process,
    /// so an API change is pushed at once.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
    /// File holding the shared sync secret (else KEYGATE_SYNC_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub reconcile: Duration,
    #[arg(long)]
    pub takeover: bool,
    /// Envoy's JSON access log to ingest into the request-log tables.
    #[arg(long, env = "KEYGATE_ACCESS_LOG")]
    pub access_log: Option<PathBuf>,
    /// How long request logs are kept.
    #[arg(long, value_parser = parse_duration, default_value = "30d")]
    pub retention: Duration,
    /// Failed authentications allowed per client address, e.g. 10/min;
    /// more answer 429 until the window ends.
    #[arg(long, value_parser = keygate_control::service::parse_rate, default_value = "10/min")]
    pub auth_failures: keygate_core::rate_limit::RateLimit,
    /// Metadata fields pushed into Envoy with each key, comma separated
    /// (the fields the gates' `headers.metadata` forward upstream); other
    /// metadata stays in the store.
    #[arg(
        long,
        env = "KEYGATE_FORWARD_METADATA",
        value_delimiter = ',',
        value_name = "FIELD,..."
    )]
    pub forward_metadata: Vec<String>,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Create an empty store with a new identity (refuses an existing one).
    Init {
        /// Succeed without change when the store already exists (for
        /// container start-up, where there is no shell to test for it).
        #[arg(long)]
        if_missing: bool,
    },
    /// PostgreSQL or SQLite: apply schema upgrades (idempotent).
    Migrate,
    /// Copy a JSON store's keys (and identity) into a new, empty SQLite store.
    Import {
        /// The JSON store file to read (left unchanged).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Refuse every token issued so far for this key and session (401).
    Revoke {
        #[arg(long = "key", value_name = "KEY_ID")]
        key_id: String,
        /// The session_id given at login; "" for logins without one.
        #[arg(long)]
        session: String,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key; the key (and secret) are shown once, only hashes are stored.
    Create(Box<CreateArgs>),
    /// List keys (never secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show one key.
    Show { key_id: String },
    /// Replace a key's secret; with --grace the old one works until then.
    RotateSecret {
        key_id: String,
        /// e.g. 10m, 1h; default 0 (old secret refused at once).
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Issue a new value for the key (same id, name, scopes, owner, metadata,
    /// rate-limit state, logs and usage); the old value works for --grace.
    Roll {
        key_id: String,
        /// e.g. 10m, 1h; default 0 (old value refused at once); at most 30d.
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
        /// Format of the new value (default: --key-format).
        #[arg(long = "format", value_parser = parse_key_format)]
        format: Option<keygate_control::service::KeyFormat>,
    },
    /// Set the key's owner (a user of its tenant), or --clear it.
    Owner {
        key_id: String,
        #[arg(required_unless_present = "clear")]
        owner: Option<String>,
        #[arg(long, conflicts_with = "owner")]
        clear: bool,
    },
    /// Replace the key's metadata (a JSON object, at most 4 KiB), or --clear it.
    Metadata {
        key_id: String,
        #[arg(required_unless_present = "clear", value_name = "JSON")]
        metadata: Option<String>,
        #[arg(long, conflicts_with = "metadata")]
        clear: bool,
    },
    /// Remove a key: refused (401) as soon as the sidecar pushes.
    Revoke { key_id: String },
    /// Allow a deactivated key again.
    Activate { key_id: String },
    /// Refuse a key with 403 without deleting it.
    Deactivate { key_id: String },
    /// Change a key's IP allowlist.
    #[command(subcommand)]
    AllowIp(AllowIpCommand),
    /// Change a key's scopes.
    #[command(subcommand)]
    Scope(ScopeCommand),
    /// Sets a key's own limits (--limit, repeatable) or plan.
    Limits(crate::limits_cli::KeyLimitsArgs),
    /// Tops up a key's usage credits (--set N [--monthly]) or removes them.
    Credits(crate::limits_cli::KeyCreditsArgs),
}

#[derive(Subcommand)]
pub enum AllowIpCommand {
    Add { key_id: String, cidr: String },
    Remove { key_id: String, cidr: String },
}

#[derive(Subcommand)]
pub enum ScopeCommand {
    /// Replace the key's scopes.
    Set {
        key_id: String,
        #[arg(required = true)]
        scopes: Vec<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub tenant: String,
    /// Environment label carried by the key (access log, upstream header):
    /// any name of letters, digits, '-', '_', '.', ':' (e.g. live, test, staging).
    #[arg(long = "env", default_value = "live", value_name = "NAME")]
    pub environment: String,
    /// default: every scope (one per tenant); scoped: only --scope (five per tenant).
    #[arg(long, value_parser = parse_kind, default_value = "scoped")]
    pub kind: Kind,
    /// Repeatable: --scope read --scope write. Scoped keys only.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Repeatable CIDR or address; none means any address.
    #[arg(long = "allow-ip")]
    pub allow_ips: Vec<String>,
    /// e.g. 100/60s, 100/min, 5000/1h; default: the filter's default.
    #[arg(long, value_parser = keygate_control::service::parse_rate)]
    pub rate: Option<keygate_core::rate_limit::RateLimit>,
    /// RFC 3339, e.g. 2027-01-01T00:00:00Z.
    #[arg(long, value_parser = parse_time)]
    pub expires: Option<SystemTime>,
    /// Also generate a secret (for Authorization: Basic key:secret).
    #[arg(long)]
    pub with_secret: bool,
    /// A label for people, shown in listings and logs.
    #[arg(long)]
    pub name: Option<String>,
    /// Key id; default <tenant>-<random>.
    #[arg(long)]
    pub id: Option<String>,
    /// Use this key value instead of a random one (at least 16 characters;
    /// for demo stores and migrating existing keys; it ends up in shell history).
    #[arg(long, value_name = "KEY")]
    pub key_value: Option<String>,
    /// Use this secret instead of a random one (implies a secret).
    #[arg(long, value_name = "SECRET")]
    pub secret_value: Option<String>,
    /// The user of the tenant the key is for (sent upstream as x-keygate-owner).
    #[arg(long)]
    pub owner: Option<String>,
    /// A JSON object (at most 4 KiB), e.g. '{"plan_tier":"gold"}'.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// Format of this key's value (default: --key-format).
    #[arg(long = "format", value_parser = parse_key_format)]
    pub format: Option<keygate_control::service::KeyFormat>,
    #[command(flatten)]
    pub key_limits: crate::limits_cli::KeyLimitArgs,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Envoy's JSON access log (also KEYGATE_ACCESS_LOG); - for stdin.
    #[arg(long, env = "KEYGATE_ACCESS_LOG", default_value = "-")]
    pub file: PathBuf,
    #[arg(long = "key", value_name = "KEY_ID")]
    pub key_id: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    /// How far back, e.g. 30s, 10m, 2h, 1d.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// e.g. 4xx, 429.
    #[arg(long, value_parser = crate::logs::parse_status_filter)]
    pub status: Option<String>,
}

#[derive(Args)]
pub struct SyncArgs {
    /// Envoy sync listener, repeatable (e.g. http://127.0.0.1:10001).
    #[arg(long = "endpoint", required = true)]
    pub endpoints: Vec<String>,
    /// File holding the shared sync secret (else KEYGATE_SYNC_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// How often each Envoy's held version is checked (restart detection).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub reconcile: Duration,
    /// Sync once and exit (non-zero if an endpoint could not be synced).
    #[arg(long)]
    pub once: bool,
    /// Replace credentials an Envoy holds from another store (refused otherwise).
    #[arg(long)]
    pub takeover: bool,
    /// The longest token lifetime (`tokens.lifetime_secs`) of the filters
    /// synced: session revocations older than this are not pushed. The
    /// default is the longest lifetime a filter accepts.
    #[arg(long, value_parser = parse_duration, default_value = "7d")]
    pub token_lifetime: Duration,
    /// Keep a JSON health report of every endpoint here (rewritten atomically
    /// when an endpoint's state changes).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Metadata fields pushed into Envoy with each key, comma separated
    /// (the fields the gates' `headers.metadata` forward upstream); other
    /// metadata stays in the store.
    #[arg(
        long,
        env = "KEYGATE_FORWARD_METADATA",
        value_delimiter = ',',
        value_name = "FIELD,..."
    )]
    pub forward_metadata: Vec<String>,
}

fn parse_key_format(s: &str) -> Result<keygate_control::service::KeyFormat, String> {
    s.parse()
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    match s {
        "default" => Ok(Kind::Default),
        "scoped" => Ok(Kind::Scoped),
        _ => Err("expected 'default' or 'scoped'".into()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| {
        format!("'{s}' is not a duration; use a number and a unit, e.g. 30s, 10m, 2h, 1d")
    })
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("'{s}' is not a time; use RFC 3339, e.g. 2027-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_durations_say_which_forms_work() {
        let e = parse_duration("yesterday").unwrap_err();
        assert!(e.contains("10m") && !e.contains("expected number"), "{e}");
    }
}
