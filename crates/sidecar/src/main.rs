//! `keygate`: manage API keys in a store and push them into running Envoys.
//! A thin door onto the service layer (`keygate-control`): `cli` parses,
//! the service validates and changes the store, `output` prints, `daemon`
//! keeps Envoys in step. See `keygate --help`.

mod cli;
mod daemon;
mod endpoint;
mod logs;
mod output;

use clap::Parser;
use cli::{AllowIpCommand, Cli, Command, KeyCommand, ScopeCommand, SessionCommand, StoreCommand};
use keygate_control::service::NewKey;
use keygate_control::store::pg::PgStore;
use keygate_control::Service;
use keygate_core::credential::Status;
use output::Out;
use serde_json::json;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(
        "no store given: pass --store PATH (or a postgres:// URL) or set KEYGATE_STORE; \
         create a store with `keygate --store PATH store init`"
    )]
    NoStore,
    #[error(transparent)]
    Control(#[from] keygate_control::Error),
    #[error(transparent)]
    Sync(#[from] daemon::Error),
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
            CliError::Usage(_) => "usage",
            CliError::Output(_) => "io",
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(store: Option<&str>) -> Result<Service, CliError> {
    Ok(Service::open(store.ok_or(CliError::NoStore)?)?)
}

fn key_command<W: Write>(svc: &Service, out: &mut Out<W>, cmd: KeyCommand) -> Result<(), CliError> {
    let t = now();
    match cmd {
        KeyCommand::Create(a) => {
            let new = NewKey {
                key_id: a.id,
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
            };
            out.created(&svc.create_key(new, t)?)?;
        }
        KeyCommand::List { tenant } => out.keys(&svc.list_keys(tenant.as_deref())?)?,
        KeyCommand::Show { key_id } => out.key(&svc.show_key(&key_id)?)?,
        KeyCommand::RotateSecret { key_id, grace } => {
            let grace = grace.map_or(0, |d| d.as_secs());
            let secret = svc.rotate_secret(&key_id, grace, t)?;
            out.rotated(&key_id, &secret, (grace > 0).then_some(t + grace))?;
        }
        KeyCommand::Revoke { key_id } => {
            svc.revoke_key(&key_id)?;
            out.done(
                json!({"key_id": key_id, "revoked": true}),
                &format!("Revoked {key_id}."),
            )?;
        }
        KeyCommand::Activate { key_id } => {
            out.key(&svc.set_status(&key_id, Status::Active, t)?)?
        }
        KeyCommand::Deactivate { key_id } => {
            out.key(&svc.set_status(&key_id, Status::Inactive, t)?)?
        }
        KeyCommand::AllowIp(AllowIpCommand::Add { key_id, cidr }) => {
            out.key(&svc.allow_ip(&key_id, &cidr, true, t)?)?
        }
        KeyCommand::AllowIp(AllowIpCommand::Remove { key_id, cidr }) => {
            out.key(&svc.allow_ip(&key_id, &cidr, false, t)?)?
        }
        KeyCommand::Scope(ScopeCommand::Set { key_id, scopes }) => {
            out.key(&svc.set_scopes(&key_id, &scopes, t)?)?
        }
    }
    Ok(())
}

fn sync_secret(args: &cli::SyncArgs) -> Result<Vec<u8>, CliError> {
    let secret = match &args.secret_file {
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
    match cli.command {
        Command::Key(cmd) => key_command(&open(store)?, out, cmd),
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
        Command::Store(StoreCommand::Migrate) => {
            let spec = store.ok_or(CliError::NoStore)?;
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
        Command::Session(SessionCommand::Revoke { key_id, session }) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            open(store)?.revoke_session(&key_id, &session, now_ms)?;
            out.done(
                json!({"key_id": key_id, "session_id": session, "revoked": true}),
                &format!("Revoked session '{session}' of {key_id}: its tokens are refused."),
            )?;
            Ok(())
        }
    }
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
