//! `keygate`: manage API keys in the local store and push them into running
//! Envoys. See `keygate --help`.

mod daemon;
mod http;
mod keys;
mod logs;
mod store;
mod store_pg;

use clap::{Args, Parser, Subcommand};
use keygate_core::credential::{Kind, Status};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{FileStore, Snapshot, Store, StoredKey};
use store_pg::PgStore;

#[derive(Parser)]
#[command(
    name = "keygate",
    version = env!("KEYGATE_LONG_VERSION"),
    about = "API keys for the keygate Envoy filter: manage them, push them live"
)]
struct Cli {
    /// Store: a JSON file, or postgres://user@host:port/db for a shared
    /// store feeding a fleet (also KEYGATE_STORE).
    #[arg(
        long,
        global = true,
        env = "KEYGATE_STORE",
        default_value = "keygate-store.json"
    )]
    store: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Create or upgrade the PostgreSQL schema (idempotent).
    Migrate,
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Refuse every token issued so far for this key and session (401).
    Revoke {
        #[arg(long = "key")]
        key_id: String,
        /// The session_id given at login; "" for logins without one.
        #[arg(long)]
        session: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key; the key (and secret) are shown once, only hashes are stored.
    Create(CreateArgs),
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
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
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
}

#[derive(Subcommand)]
enum AllowIpCommand {
    Add { key_id: String, cidr: String },
    Remove { key_id: String, cidr: String },
}

#[derive(Subcommand)]
enum ScopeCommand {
    /// Replace the key's scopes.
    Set {
        key_id: String,
        #[arg(required = true)]
        scopes: Vec<String>,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long = "env", default_value = "live")]
    environment: String,
    #[arg(long, value_parser = parse_kind, default_value = "scoped")]
    kind: Kind,
    /// Repeatable: --scope read --scope write.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Repeatable CIDR or address; none means any address.
    #[arg(long = "allow-ip")]
    allow_ips: Vec<String>,
    /// e.g. 100/60s, 100/min, 5000/1h; default: the filter's default.
    #[arg(long, value_parser = keys::parse_rate)]
    rate: Option<keygate_core::rate_limit::RateLimit>,
    /// RFC 3339, e.g. 2027-01-01T00:00:00Z.
    #[arg(long, value_parser = humantime::parse_rfc3339)]
    expires: Option<SystemTime>,
    /// Also generate a secret (for Authorization: Basic key:secret).
    #[arg(long)]
    with_secret: bool,
    /// Key id; default <tenant>-<random>.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Args)]
struct LogsArgs {
    /// Envoy's JSON access log (also KEYGATE_ACCESS_LOG); - for stdin.
    #[arg(long, env = "KEYGATE_ACCESS_LOG", default_value = "-")]
    file: PathBuf,
    #[arg(long = "key")]
    key_id: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// e.g. 10m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// e.g. 4xx, 429.
    #[arg(long, value_parser = logs::parse_status_filter)]
    status: Option<String>,
}

#[derive(Args)]
struct SyncArgs {
    /// Envoy sync listener, repeatable (e.g. http://127.0.0.1:10001).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    /// File holding the shared sync secret (else KEYGATE_SYNC_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// How often Envoy's held version is checked (restart detection).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    reconcile: Duration,
    /// How often the store is checked for changes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    poll: Duration,
    /// Sync once and exit (non-zero if an endpoint could not be synced).
    #[arg(long)]
    once: bool,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    match s {
        "default" => Ok(Kind::Default),
        "scoped" => Ok(Kind::Scoped),
        _ => Err("expected 'default' or 'scoped'".into()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Default => "default",
        Kind::Scoped => "scoped",
    }
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Active => "active",
        Status::Inactive => "inactive",
    }
}

/// A key as the CLI shows it: no key hash, no secret hash.
fn public_view(k: &StoredKey) -> serde_json::Value {
    let r = &k.record;
    serde_json::json!({
        "key_id": r.key_id,
        "tenant": r.tenant,
        "environment": r.environment,
        "kind": kind_str(r.kind),
        "status": status_str(r.status),
        "scopes": r.scopes,
        "allowed_ips": r.allowed_ips,
        "rate_limit": r.rate_limit.map(|l| format!("{}/{}s", l.requests, l.window_secs)),
        "has_secret": r.secret_hash.is_some(),
        "previous_secret_until": r.previous_secret_expires_at.map(rfc3339),
        "expires_at": r.expires_at.map(rfc3339),
        "created_at": rfc3339(k.created_at),
        "updated_at": rfc3339(k.updated_at),
    })
}

fn print_table(keys: &[&StoredKey]) {
    println!(
        "{:<24} {:<12} {:<6} {:<8} {:<9} {:<18} {:<10} ALLOWED IPS",
        "KEY ID", "TENANT", "ENV", "KIND", "STATUS", "SCOPES", "RATE"
    );
    for k in keys {
        let r = &k.record;
        let scopes = if r.kind == Kind::Default {
            "(all)".to_owned()
        } else {
            r.scopes.join(",")
        };
        let rate = r.rate_limit.map_or("default".to_owned(), |l| {
            format!("{}/{}s", l.requests, l.window_secs)
        });
        let ips = if r.allowed_ips.is_empty() {
            "any".to_owned()
        } else {
            r.allowed_ips.join(",")
        };
        println!(
            "{:<24} {:<12} {:<6} {:<8} {:<9} {:<18} {:<10} {ips}",
            r.key_id,
            r.tenant,
            r.environment,
            kind_str(r.kind),
            status_str(r.status),
            scopes,
            rate
        );
    }
}

fn print_value(json: bool, value: &serde_json::Value, human: impl FnOnce()) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        human();
    }
}

fn show_one(json: bool, snap: &Snapshot, key_id: &str) -> Result<(), String> {
    let k = snap
        .find(key_id)
        .ok_or_else(|| format!("no key with id '{key_id}'"))?;
    let v = public_view(k);
    print_value(json, &v, || {
        if let Some(map) = v.as_object() {
            for (name, value) in map {
                let shown = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{name:<22} {shown}");
            }
        }
    });
    Ok(())
}

fn key_command(store: &AnyStore, json: bool, cmd: KeyCommand) -> Result<(), String> {
    let t = now();
    match cmd {
        KeyCommand::Create(a) => {
            let new = keys::NewKey {
                key_id: a.id,
                tenant: a.tenant,
                environment: a.environment,
                kind: a.kind,
                scopes: a.scopes,
                allowed_ips: a.allow_ips,
                rate_limit: a.rate,
                expires_at: a.expires.map(epoch),
                with_secret: a.with_secret,
            };
            let created = store.update(|s| keys::create(s, new, t))?;
            let v = serde_json::to_value(&created).map_err(|e| e.to_string())?;
            print_value(json, &v, || {
                let scopes = if created.kind == Kind::Default {
                    "all".to_owned()
                } else {
                    created.scopes.join(", ")
                };
                println!(
                    "Created key {} (tenant {}, env {}, {} scopes: {})",
                    created.key_id,
                    created.tenant,
                    created.environment,
                    kind_str(created.kind),
                    scopes
                );
                println!("  API key:  {}", created.api_key);
                if let (Some(secret), Some(basic)) = (&created.secret, &created.authorization_basic)
                {
                    println!("  Secret:   {secret}");
                    println!("  Header:   Authorization: {basic}");
                }
                println!("Store it now: keygate keeps only its hash and cannot show it again.");
            });
        }
        KeyCommand::List { tenant } => {
            let snap = store.load()?;
            let keys: Vec<&StoredKey> = snap
                .keys
                .iter()
                .filter(|k| tenant.as_ref().is_none_or(|t| &k.record.tenant == t))
                .collect();
            let v = serde_json::Value::Array(keys.iter().map(|k| public_view(k)).collect());
            print_value(json, &v, || print_table(&keys));
        }
        KeyCommand::Show { key_id } => show_one(json, &store.load()?, &key_id)?,
        KeyCommand::RotateSecret { key_id, grace } => {
            let grace = grace.map_or(0, |d| d.as_secs());
            let secret = store.update(|s| keys::rotate_secret(s, &key_id, grace, t))?;
            let v = serde_json::json!({"key_id": key_id, "secret": secret,
                "previous_secret_until": (grace > 0).then(|| rfc3339(t + grace))});
            print_value(json, &v, || {
                println!("New secret for {key_id}: {secret}");
                if grace > 0 {
                    println!(
                        "The previous secret keeps working until {}.",
                        rfc3339(t + grace)
                    );
                } else {
                    println!("The previous secret is refused from the next push on.");
                }
                println!("Store it now: keygate keeps only its hash.");
            });
        }
        KeyCommand::Revoke { key_id } => {
            store.update(|s| keys::revoke(s, &key_id))?;
            print_value(
                json,
                &serde_json::json!({"key_id": key_id, "revoked": true}),
                || println!("Revoked {key_id}."),
            );
        }
        KeyCommand::Activate { key_id } => {
            store.update(|s| keys::set_status(s, &key_id, Status::Active, t))?;
            show_one(json, &store.load()?, &key_id)?;
        }
        KeyCommand::Deactivate { key_id } => {
            store.update(|s| keys::set_status(s, &key_id, Status::Inactive, t))?;
            show_one(json, &store.load()?, &key_id)?;
        }
        KeyCommand::AllowIp(AllowIpCommand::Add { key_id, cidr }) => {
            store.update(|s| keys::allow_ip(s, &key_id, &cidr, true, t))?;
            show_one(json, &store.load()?, &key_id)?;
        }
        KeyCommand::AllowIp(AllowIpCommand::Remove { key_id, cidr }) => {
            store.update(|s| keys::allow_ip(s, &key_id, &cidr, false, t))?;
            show_one(json, &store.load()?, &key_id)?;
        }
        KeyCommand::Scope(ScopeCommand::Set { key_id, scopes }) => {
            store.update(|s| keys::set_scopes(s, &key_id, scopes, t))?;
            show_one(json, &store.load()?, &key_id)?;
        }
    }
    Ok(())
}

fn sync_command(store: &AnyStore, args: SyncArgs) -> Result<(), String> {
    let secret = match &args.secret_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => std::env::var(keygate_core::config::SYNC_SECRET_ENV).map_err(|_| {
            "no sync secret: pass --secret-file or set KEYGATE_SYNC_SECRET".to_owned()
        })?,
    };
    let secret = secret.trim().as_bytes().to_vec();
    if secret.len() < keygate_core::sync::MIN_SECRET_LEN {
        return Err(format!(
            "the sync secret must be at least {} characters",
            keygate_core::sync::MIN_SECRET_LEN
        ));
    }
    let opts = daemon::Options {
        endpoints: args.endpoints,
        secret,
        poll: args.poll,
        reconcile: args.reconcile,
        once: args.once,
    };
    daemon::run(store, opts)
}

fn logs_command(json: bool, a: LogsArgs) -> Result<(), String> {
    let filter = logs::Filter {
        key: a.key_id,
        tenant: a.tenant,
        since: a.since.map(logs::since),
        status: a.status,
    };
    let records = if a.file.as_os_str() == "-" {
        logs::read(std::io::stdin().lock(), &filter)
    } else {
        let f = std::fs::File::open(&a.file)
            .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?;
        logs::read(std::io::BufReader::new(f), &filter)
    };
    if json {
        for r in &records {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
    } else {
        logs::print_table(&records);
    }
    Ok(())
}

/// The embedded file store or the shared PostgreSQL one, behind one `Store`.
enum AnyStore {
    File(FileStore),
    Pg(Box<PgStore>),
}

impl AnyStore {
    fn open(spec: &str) -> AnyStore {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            AnyStore::Pg(Box::new(PgStore::new(spec)))
        } else {
            AnyStore::File(FileStore::new(spec))
        }
    }
}

impl Store for AnyStore {
    fn load(&self) -> Result<Snapshot, String> {
        match self {
            AnyStore::File(s) => s.load(),
            AnyStore::Pg(s) => s.load(),
        }
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<T, String>,
    ) -> Result<T, String> {
        match self {
            AnyStore::File(s) => s.update(change),
            AnyStore::Pg(s) => s.update(change),
        }
    }

    fn change_token(&self) -> Option<String> {
        match self {
            AnyStore::File(s) => s.change_token(),
            AnyStore::Pg(s) => s.change_token(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let store = AnyStore::open(&cli.store);
    let result = match cli.command {
        Command::Key(cmd) => key_command(&store, cli.json, cmd),
        Command::Sync(args) => sync_command(&store, args),
        Command::Logs(a) => logs_command(cli.json, a),
        Command::Store(StoreCommand::Migrate) => match &store {
            AnyStore::Pg(pg) => pg
                .migrate()
                .map(|v| println!("Store schema is at version {v}.")),
            AnyStore::File(_) => Err("the file store needs no migration".into()),
        },
        Command::Session(SessionCommand::Revoke { key_id, session }) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            store.update(|s| keys::revoke_session(s, &key_id, &session, now_ms)).map(|_| {
                let v = serde_json::json!({"key_id": key_id, "session_id": session, "revoked": true});
                print_value(cli.json, &v, || println!("Revoked session '{session}' of {key_id}: its tokens are refused."));
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::FAILURE
        }
    }
}
