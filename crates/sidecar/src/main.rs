//! `keygate`: manage API keys in a store and push them into running Envoys.
//! A thin door onto the service layer (`keygate-control`): `cli` parses,
//! the service validates and changes the store, `output` prints, `daemon`
//! keeps Envoys in step. See `keygate --help`.

mod cli;
mod daemon;
mod endpoint;
mod limits_cli;
mod logs;
mod output;
mod serve;

use clap::Parser;
use cli::{
    AllowIpCommand, Cli, Command, KeyCommand, ScopeCommand, SessionCommand, StoreCommand,
    TokenCommand,
};
use keygate_control::service::NewKey;
use keygate_control::store::file::FileStore;
use keygate_control::store::pg::PgStore;
use keygate_control::store::sqlite::SqliteStore;
use keygate_control::store::Store as _;
use keygate_control::store::StoredKey;
use keygate_control::Service;
use keygate_core::credential::Status;
use output::Out;
use serde_json::json;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(
        "no store given: pass --store PATH (or a postgres:// URL) or set KEYGATE_STORE; \
         create a store with `keygate --store PATH store init`"
    )]
    NoStore,
    #[error(transparent)]
    Control(#[from] keygate_control::Error),
    #[error(transparent)]
    Sync(#[from] daemon::Error),
    #[error(transparent)]
    Db(#[from] keygate_control::DbError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl CliError {
    fn code(&self) -> &'static str {
        match self {
            CliError::NoStore => "store_missing",
            CliError::Control(e) => e.code(),
            CliError::Sync(daemon::Error::Store(e)) => e.code(),
            CliError::Sync(_) => "sync",
            CliError::Db(keygate_control::DbError::BadInput { .. }) => "bad_input",
            CliError::Db(_) => "database",
            CliError::Usage(_) => "usage",
            CliError::Output(_) => "io",
        }
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(store: Option<&str>) -> Result<Service, CliError> {
    Ok(Service::open(store.ok_or(CliError::NoStore)?)?)
}

/// The deployment's key style from the command line (or its variables).
fn key_style(cli: &Cli) -> Result<keygate_control::service::KeyStyle, CliError> {
    Ok(keygate_control::service::KeyStyle::new(
        cli.key_format,
        &cli.key_prefix,
        "--key-prefix",
    )?)
}

/// A change the CLI made, for the audit trail: (action, key id, tenant).
type Change = (&'static str, String, String);

fn key_command<W: Write>(
    svc: &Service,
    out: &mut Out<W>,
    cmd: KeyCommand,
) -> Result<Option<Change>, CliError> {
    let t = now();
    let changed =
        |action, k: &StoredKey| Some((action, k.record.key_id.clone(), k.record.tenant.clone()));
    let change = match cmd {
        KeyCommand::Create(a) => {
            let metadata = a
                .metadata
                .as_deref()
                .map(|m| keygate_control::service::parse_metadata("--metadata", m))
                .transpose()?;
            let new = NewKey {
                key_id: a.id,
                name: a.name.unwrap_or_default(),
                tenant: a.tenant,
                environment: a.environment,
                kind: a.kind,
                scopes: a.scopes,
                allowed_ips: a.allow_ips,
                rate_limit: a.rate,
                expires_at: a
                    .expires
                    .map(|e| e.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
                with_secret: a.with_secret,
                key_value: a.key_value,
                secret_value: a.secret_value,
                owner: a.owner,
                metadata,
                key_format: a.format,
            };
            let c = svc.create_key_limited(new, a.key_limits.parse()?, t)?;
            out.created(&c)?;
            Some(("key.create", c.key_id, c.tenant))
        }
        KeyCommand::List { tenant } => {
            let keys = svc.list_keys(tenant.as_deref())?;
            out.keys(&keys, &credits_of(svc, &keys, t))?;
            None
        }
        KeyCommand::Show { key_id } => {
            let k = svc.show_key(&key_id)?;
            let credits = credits_of(svc, std::slice::from_ref(&k), t);
            out.key_with(&k, credits.get(&key_id))?;
            None
        }
        KeyCommand::RotateSecret { key_id, grace } => {
            let grace = grace.map_or(0, |d| d.as_secs());
            let secret = svc.rotate_secret(&key_id, grace, t)?;
            out.rotated(&key_id, &secret, (grace > 0).then_some(t + grace))?;
            svc.show_key(&key_id)
                .ok()
                .and_then(|k| changed("key.rotate_secret", &k))
        }
        KeyCommand::Roll {
            key_id,
            grace,
            format,
        } => {
            let grace = grace.map_or(0, |d| d.as_secs());
            let r = svc.roll_key(None, &key_id, grace, format, t)?;
            out.rolled(&r)?;
            Some(("key.roll", r.key_id, r.tenant))
        }
        KeyCommand::Owner {
            key_id,
            owner,
            clear: _,
        } => {
            let k = svc.set_owner(&key_id, owner.as_deref(), t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::Metadata {
            key_id,
            metadata,
            clear: _,
        } => {
            let m = metadata
                .as_deref()
                .map(|m| keygate_control::service::parse_metadata("metadata", m))
                .transpose()?;
            let k = svc.set_metadata(&key_id, m, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::Revoke { key_id } => {
            let k = svc.revoke_key(&key_id)?;
            out.done(
                json!({"key_id": key_id, "revoked": true}),
                &format!("Revoked {key_id}."),
            )?;
            changed("key.delete", &k)
        }
        KeyCommand::Activate { key_id } => {
            let k = svc.set_status(&key_id, Status::Active, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::Deactivate { key_id } => {
            let k = svc.set_status(&key_id, Status::Inactive, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::AllowIp(AllowIpCommand::Add { key_id, cidr }) => {
            let k = svc.allow_ip(&key_id, &cidr, true, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::AllowIp(AllowIpCommand::Remove { key_id, cidr }) => {
            let k = svc.allow_ip(&key_id, &cidr, false, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::Scope(ScopeCommand::Set { key_id, scopes }) => {
            let k = svc.set_scopes(&key_id, &scopes, t)?;
            out.key(&k)?;
            changed("key.update", &k)
        }
        KeyCommand::Limits(a) => {
            let k = limits_cli::key_limits(svc, out, a, t)?;
            changed("key.update", &k)
        }
        KeyCommand::Credits(a) => {
            let k = limits_cli::key_credits(svc, a, t)?;
            let credits = credits_of(svc, std::slice::from_ref(&k), t);
            out.key_with(&k, credits.get(&k.record.key_id))?;
            changed("key.credits", &k)
        }
    };
    Ok(change)
}

/// Records a CLI change in the audit trail (actor "cli"), when there is a
/// management database: a SQLite or PostgreSQL store, or KEYGATE_DB. The
/// change is made either way; a record that cannot be written is reported.
fn cli_audit(store: Option<&str>, (action, key_id, tenant): Change) {
    let db = std::env::var("KEYGATE_DB").ok();
    let Ok(db) = management_db(store, db.as_deref()) else {
        return;
    };
    let entry = keygate_control::mgmt::AuditEntry {
        actor_token_id: None,
        actor_ip: None,
        tenant: Some(&tenant),
        action,
        object: Some(&key_id),
        detail: Some(json!({"via": "cli"})),
    };
    if let Err(e) = db
        .open()
        .and_then(|mut c| keygate_control::mgmt::record(&mut c, &entry))
    {
        let _ = writeln!(
            io::stderr(),
            "keygate: warning: the audit record was not written: {e}"
        );
    }
}

fn sync_secret(args: &cli::SyncArgs) -> Result<Vec<u8>, CliError> {
    read_sync_secret(args.secret_file.as_deref())
}

pub(crate) fn read_sync_secret(file: Option<&std::path::Path>) -> Result<Vec<u8>, CliError> {
    let secret = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            CliError::Usage(format!("--secret-file: cannot read {}: {e}", path.display()))
        })?,
        None => std::env::var(keygate_core::config::SYNC_SECRET_ENV).map_err(|_| {
            CliError::Usage(
                "no sync secret: pass --secret-file or set KEYGATE_SYNC_SECRET (the value Envoy was started with)"
                    .into(),
            )
        })?,
    };
    let secret = secret.trim().as_bytes().to_vec();
    if secret.len() < keygate_core::sync::MIN_SECRET_LEN {
        return Err(CliError::Usage(format!(
            "the sync secret must be at least {} characters",
            keygate_core::sync::MIN_SECRET_LEN
        )));
    }
    Ok(secret)
}

fn logs_command<W: Write>(out: &mut Out<W>, a: cli::LogsArgs) -> Result<(), CliError> {
    let filter = logs::Filter {
        key: a.key_id,
        tenant: a.tenant,
        since: a.since.map(logs::since),
        status: a.status,
    };
    let records = if a.file.as_os_str() == "-" {
        logs::read(io::stdin().lock(), &filter)
    } else {
        let f = std::fs::File::open(&a.file).map_err(|e| {
            CliError::Usage(format!(
                "--file: cannot read {}: {e} (Envoy's access log; `make run` writes .keygate/access.log)",
                a.file.display()
            ))
        })?;
        logs::read(io::BufReader::new(f), &filter)
    };
    if out.json {
        for r in &records {
            let line = serde_json::to_string(r).map_err(io::Error::other)?;
            writeln!(out.w, "{line}")?;
        }
    } else {
        logs::print_table(&mut out.w, &records)?;
    }
    Ok(())
}

fn run<W: Write>(cli: Cli, out: &mut Out<W>) -> Result<(), CliError> {
    let store = cli.store.as_deref();
    let style = key_style(&cli)?;
    match cli.command {
        Command::Key(cmd) => {
            let mut svc = open(store)?;
            svc.set_key_style(style);
            if let Some(change) = key_command(&svc, out, cmd)? {
                cli_audit(store, change);
            }
            Ok(())
        }
        Command::Sync(args) => {
            let secret = sync_secret(&args)?;
            let svc = open(store)?;
            let opts = daemon::Options {
                endpoints: args.endpoints,
                secret,
                reconcile: args.reconcile,
                once: args.once,
                takeover: args.takeover,
                token_lifetime: args.token_lifetime,
                status_file: args.status_file,
                forward_metadata: args.forward_metadata,
            };
            Ok(daemon::run(svc.store(), opts)?)
        }
        Command::Logs(a) => logs_command(out, a),
        Command::Store(StoreCommand::Init { if_missing }) => {
            let svc = open(store)?;
            let snap = match svc.init_store() {
                Err(keygate_control::Error::StoreExists { path, store_id }) if if_missing => {
                    out.done(
                        json!({"store": path, "store_id": store_id, "created": false}),
                        &format!("Store {path} already exists (id {store_id}); left as it is."),
                    )?;
                    return Ok(());
                }
                other => other?,
            };
            let id = snap.store_id.map(|i| i.to_string()).unwrap_or_default();
            let where_ = svc.store().describe();
            out.done(
                json!({"store": where_, "store_id": id, "keys": snap.keys.len()}),
                &format!(
                    "Store {where_} is ready (id {id}, {} keys).",
                    snap.keys.len()
                ),
            )?;
            Ok(())
        }
        Command::Store(StoreCommand::Import { file }) => {
            let spec = store.ok_or(CliError::NoStore)?;
            let path = keygate_control::store::sqlite_path(spec).ok_or_else(|| {
                CliError::Usage(
                    "--store: import needs a SQLite store (a *.db path or sqlite:PATH)".into(),
                )
            })?;
            let from = FileStore::new(&file).load()?;
            let target = SqliteStore::new(path);
            match target.init() {
                Ok(_) | Err(keygate_control::Error::StoreExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let snap = target.import(&from)?;
            let id = snap.store_id.map(|i| i.to_string()).unwrap_or_default();
            out.done(
                json!({"store": path, "store_id": id, "keys": snap.keys.len(), "from": file}),
                &format!(
                    "Imported {} key(s) from {} into {path} (store id {id}).",
                    snap.keys.len(),
                    file.display()
                ),
            )?;
            Ok(())
        }
        Command::Store(StoreCommand::Migrate) => {
            let spec = store.ok_or(CliError::NoStore)?;
            if let Some(path) = keygate_control::store::sqlite_path(spec) {
                // Opening applies the pending migrations.
                keygate_control::Db::sqlite(path).open()?;
                let schema = keygate_control::db::SCHEMA_VERSION;
                out.done(
                    json!({"store": path, "schema_version": schema}),
                    &format!("Database {path} is at schema version {schema}."),
                )?;
                return Ok(());
            }
            if !(spec.starts_with("postgres://") || spec.starts_with("postgresql://")) {
                return Err(CliError::Usage(
                    "the file store needs no migration (create one with `keygate store init`)"
                        .into(),
                ));
            }
            let (schema, id, _) = PgStore::new(spec)?.migrate()?;
            out.done(
                json!({"store_id": id.to_string(), "schema_version": schema}),
                &format!("Store schema is at version {schema} (store id {id})."),
            )?;
            Ok(())
        }
        Command::Token(cmd) => token_command(store, out, cmd),
        Command::Portal(cli::PortalCommand::Link {
            tenant,
            expires,
            base_url,
            db,
        }) => {
            let mut conn = management_db(store, db.as_deref())?.open()?;
            let secs = expires.as_secs();
            if !(60..=86_400).contains(&secs) {
                return Err(CliError::Usage("--expires: between 1m and 24h".into()));
            }
            let t = now();
            let tok = keygate_control::mgmt::create_portal_token(
                &mut conn,
                keygate_control::mgmt::Purpose::PortalLink,
                &tenant,
                t + secs,
                t,
            )?;
            let url = format!(
                "{}{}",
                base_url.trim_end_matches('/'),
                keygate_server::portal::link_path(&tok.token)
            );
            let expires_at = humantime::format_rfc3339_seconds(
                UNIX_EPOCH + expires + std::time::Duration::from_secs(t),
            )
            .to_string();
            out.done(
                json!({"url": url, "expires_at": expires_at, "tenant": tenant}),
                &format!(
                    "Portal link for tenant {tenant} (works once, until {expires_at}):\n{url}"
                ),
            )?;
            cli_audit(store, ("portal.link_create", tok.token_id, tenant));
            Ok(())
        }
        Command::Serve(args) => serve::run(store.ok_or(CliError::NoStore)?, args, style),
        Command::Plan(cmd) => {
            if let Some((action, plan)) = limits_cli::plan_command(&open(store)?, out, cmd, now())?
            {
                // Plans belong to no tenant: the audit names the plan.
                cli_audit(store, (action, plan, String::new()));
            }
            Ok(())
        }
        Command::Tenant(cmd) => {
            if let Some(tenant) = limits_cli::tenant_command(&open(store)?, out, cmd)? {
                cli_audit(store, ("tenant.limits", tenant.clone(), tenant));
            }
            Ok(())
        }
        Command::Session(SessionCommand::Revoke { key_id, session }) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let svc = open(store)?;
            svc.revoke_session(&key_id, &session, now_ms)?;
            out.done(
                json!({"key_id": key_id, "session_id": session, "revoked": true}),
                &format!("Revoked session '{session}' of {key_id}: its tokens are refused."),
            )?;
            if let Ok(k) = svc.show_key(&key_id) {
                cli_audit(store, ("session.revoke", key_id, k.record.tenant));
            }
            Ok(())
        }
    }
}

/// The management database: `--db`, else the store when it is SQLite or
/// PostgreSQL (a JSON store has nowhere to keep tokens and logs).
pub(crate) fn management_db(
    store: Option<&str>,
    db: Option<&str>,
) -> Result<keygate_control::Db, CliError> {
    let spec =
        match (db, store) {
            (Some(d), _) => d,
            (None, Some(s)) if s.starts_with("postgres://") || s.starts_with("postgresql://") => s,
            (None, Some(s)) if keygate_control::store::sqlite_path(s).is_some() => s,
            _ => return Err(CliError::Usage(
                "no management database: pass --db PATH.db (or set KEYGATE_DB), or use a SQLite \
                 store (--store PATH.db)"
                    .into(),
            )),
        };
    Ok(match keygate_control::store::sqlite_path(spec) {
        Some(p) if !spec.starts_with("postgres") => keygate_control::Db::sqlite(p),
        _ => keygate_control::Db::parse(spec),
    })
}

fn token_command<W: Write>(
    store: Option<&str>,
    out: &mut Out<W>,
    cmd: TokenCommand,
) -> Result<(), CliError> {
    use keygate_control::mgmt::{self, Role};
    match cmd {
        TokenCommand::Create {
            operator,
            tenant,
            expires,
            db,
        } => {
            let mut conn = management_db(store, db.as_deref())?.open()?;
            let role = if operator {
                Role::Operator
            } else {
                Role::Tenant
            };
            let t = now();
            let tok = mgmt::create_token(
                &mut conn,
                role,
                tenant.as_deref(),
                expires.map(|d| t + d.as_secs()),
                t,
            )?;
            let who = tok
                .tenant
                .as_deref()
                .map_or("operator".to_owned(), |t| format!("tenant {t}"));
            out.done(
                serde_json::to_value(&tok).map_err(io::Error::other)?,
                &format!(
                    "Token {} ({who}); shown once, only its hash is kept:\n{}",
                    tok.token_id, tok.token
                ),
            )?;
        }
        TokenCommand::List { tenant, db } => {
            let mut conn = management_db(store, db.as_deref())?.open()?;
            let list = mgmt::list_tokens(&mut conn, tenant.as_deref())?;
            let when = |t: Option<u64>| t.map_or_else(|| "-".to_owned(), output::rfc3339);
            let header = format!(
                "{:<24}  {:<8}  {:<12}  {:<7}  {:<20}  {:<20}  LAST USED",
                "TOKEN ID", "ROLE", "TENANT", "STATUS", "CREATED", "EXPIRES"
            );
            let text = std::iter::once(header)
                .chain(list.iter().map(|t| {
                    let expired = t.expires_at.is_some_and(|e| e <= now());
                    format!(
                        "{:<24}  {:<8}  {:<12}  {:<7}  {:<20}  {:<20}  {}",
                        t.token_id,
                        match t.role {
                            Role::Operator => "operator",
                            Role::Tenant => "tenant",
                        },
                        t.tenant.as_deref().unwrap_or("-"),
                        match (t.revoked_at, expired) {
                            (Some(_), _) => "revoked",
                            (None, true) => "expired",
                            (None, false) => "active",
                        },
                        output::rfc3339(t.created_at),
                        t.expires_at
                            .map_or_else(|| "never".to_owned(), output::rfc3339),
                        when(t.last_used_at),
                    )
                }))
                .collect::<Vec<_>>()
                .join("\n");
            out.done(
                serde_json::to_value(&list).map_err(io::Error::other)?,
                &text,
            )?;
        }
        TokenCommand::Revoke { token_id, db } => {
            let mut conn = management_db(store, db.as_deref())?.open()?;
            if !mgmt::revoke_token(&mut conn, &token_id, None, now())? {
                return Err(CliError::Usage(format!(
                    "no active token with id '{token_id}' (see `keygate token list`)"
                )));
            }
            out.done(
                json!({"token_id": token_id, "revoked": true}),
                &format!("Revoked token {token_id}."),
            )?;
        }
    }
    Ok(())
}

/// Errors on stderr: a sentence, or with `--json` one JSON object.
fn report(json: bool, code: &str, message: &str) {
    let text = if json {
        json!({"error": code, "message": message}).to_string()
    } else {
        format!("keygate: {message}")
    };
    // Nothing better to do if stderr is gone too.
    let _ = writeln!(io::stderr(), "{text}");
}

/// What a shell reports for a program killed by SIGPIPE.
const BROKEN_PIPE_EXIT: u8 = 128 + 13;

fn main() -> ExitCode {
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            report(true, "usage", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let mut out = Out {
        json: cli.json,
        w: io::stdout().lock(),
    };
    let result = run(cli, &mut out).and_then(|()| Ok(out.w.flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `keygate … | head -1`: stop quietly, like other Unix tools.
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::from(BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            report(json, e.code(), &e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// The usage credits of `keys` with what they used, counted from the
/// store's request log; a log that cannot be read is a warning (the keys
/// still show, with the balance only).
fn credits_of(
    svc: &Service,
    keys: &[keygate_control::store::StoredKey],
    now: u64,
) -> std::collections::BTreeMap<String, keygate_control::store::CreditsStatus> {
    let (status, error) = svc.credits_status(keys, now);
    if let Some(e) = error {
        eprintln!("keygate: warning: usage credits used not counted: {e}");
    }
    status
}
