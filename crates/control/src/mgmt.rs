//! What the management API keeps beside the keys, in the management
//! database ([`crate::db`]): API tokens (operator or tenant, stored as
//! SHA-256 hashes) and the portal's link and session tokens (same table,
//! their own [`Purpose`], never accepted as API tokens), tenants (display
//! names) and the audit trail of every change. Works on SQLite and
//! PostgreSQL alike.

use crate::db::{now_ms, pg_placeholders, Conn, DbError, Param};
use keygate_core::hash::{sha256, to_hex};
use serde::Serialize;

/// How a token starts: recognisable in a leaked file or a secret scanner.
pub const TOKEN_PREFIX: &str = "kgt_";
/// Audit records per page at most.
pub const MAX_AUDIT_LIMIT: u32 = 500;

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl Val {
    fn int(&self) -> Option<i64> {
        match self {
            Val::Int(v) => Some(*v),
            _ => None,
        }
    }
    fn text(&self) -> Option<String> {
        match self {
            Val::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// Rows of `sql` (written with `?`), each column as a [`Val`].
fn rows(conn: &mut Conn, sql: &str, p: &[Param]) -> Result<Vec<Vec<Val>>, DbError> {
    match conn {
        Conn::Sqlite(c) => {
            let mut stmt = c.prepare_cached(sql)?;
            let n = stmt.column_count();
            let mut out = Vec::new();
            let mut q = stmt.query(rusqlite::params_from_iter(p.iter().map(Param::as_sqlite)))?;
            while let Some(r) = q.next()? {
                let mut row = Vec::with_capacity(n);
                for i in 0..n {
                    row.push(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Integer(v) => Val::Int(v),
                        rusqlite::types::ValueRef::Text(t) => {
                            Val::Text(String::from_utf8_lossy(t).into_owned())
                        }
                        _ => Val::Null,
                    });
                }
                out.push(row);
            }
            Ok(out)
        }
        Conn::Postgres(c) => {
            let params: Vec<_> = p.iter().map(Param::as_pg).collect();
            let rs = c.query(&pg_placeholders(sql), &params)?;
            Ok(rs
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            if let Ok(v) = r.try_get::<_, Option<i64>>(i) {
                                v.map_or(Val::Null, Val::Int)
                            } else if let Ok(v) = r.try_get::<_, Option<String>>(i) {
                                v.map_or(Val::Null, Val::Text)
                            } else {
                                Val::Null
                            }
                        })
                        .collect()
                })
                .collect())
        }
    }
}

fn exec(conn: &mut Conn, sql: &str, p: &[Param]) -> Result<u64, DbError> {
    match conn {
        Conn::Sqlite(c) => Ok(c.execute(
            sql,
            rusqlite::params_from_iter(p.iter().map(Param::as_sqlite)),
        )? as u64),
        Conn::Postgres(c) => {
            let params: Vec<_> = p.iter().map(Param::as_pg).collect();
            Ok(c.execute(&pg_placeholders(sql), &params)?)
        }
    }
}

fn text(v: &str) -> Param {
    Param::Text(v.to_owned())
}

fn opt_int(v: Option<u64>) -> Param {
    // `Param` has no NULL; -1 stands for "none" in the columns below, which
    // the queries turn back into NULL with NULLIF.
    Param::Int(v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)))
}

fn random_hex(n: usize) -> Result<String, DbError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| DbError::Migration(format!("no randomness: {e}")))?;
    Ok(hex::encode(b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Operator,
    Tenant,
}

/// What a token is for. Each is accepted only where it belongs: a portal
/// cookie is no API bearer token, a link opens the portal once and nothing
/// else, and only API tokens are listed and revoked through `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Api,
    PortalLink,
    PortalSession,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Api => "api",
            Purpose::PortalLink => "portal_link",
            Purpose::PortalSession => "portal_session",
        }
    }
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    /// The tenant of a tenant token.
    pub tenant: Option<String>,
}

impl Principal {
    /// May this principal see and change `tenant`'s objects?
    pub fn may_access(&self, tenant: &str) -> bool {
        match self.role {
            Role::Operator => true,
            Role::Tenant => self.tenant.as_deref() == Some(tenant),
        }
    }
}

/// A new token: `token` is shown once and never stored.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub token_id: String,
    pub token: String,
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A token as listed: never the token or its hash.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub token_id: String,
    pub role: Role,
    pub tenant: Option<String>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub last_used_at: Option<u64>,
}

/// Makes an API token of 256 random bits; only its SHA-256 is stored.
pub fn create_token(
    conn: &mut Conn,
    role: Role,
    tenant: Option<&str>,
    expires_at: Option<u64>,
    now: u64,
) -> Result<NewToken, DbError> {
    create(conn, Purpose::Api, role, tenant, expires_at, now)
}

/// A portal link or session token for one tenant (never an API token).
pub fn create_portal_token(
    conn: &mut Conn,
    purpose: Purpose,
    tenant: &str,
    expires_at: u64,
    now: u64,
) -> Result<NewToken, DbError> {
    if purpose == Purpose::Api {
        return Err(DbError::bad_input("purpose", "not a portal token"));
    }
    create(
        conn,
        purpose,
        Role::Tenant,
        Some(tenant),
        Some(expires_at),
        now,
    )
}

fn create(
    conn: &mut Conn,
    purpose: Purpose,
    role: Role,
    tenant: Option<&str>,
    expires_at: Option<u64>,
    now: u64,
) -> Result<NewToken, DbError> {
    let tenant = match (role, tenant) {
        (Role::Operator, None) => None,
        (Role::Tenant, Some(t)) => {
            keygate_core::credential::check_name("tenant", t)
                .map_err(|e| DbError::bad_input("tenant", e.to_string()))?;
            Some(t.to_owned())
        }
        (Role::Operator, Some(_)) => {
            return Err(DbError::bad_input(
                "tenant",
                "an operator token has no tenant",
            ))
        }
        (Role::Tenant, None) => {
            return Err(DbError::bad_input(
                "tenant",
                "a tenant token needs a tenant",
            ))
        }
    };
    if expires_at.is_some_and(|e| e <= now) {
        return Err(DbError::bad_input("expires_at", "is in the past"));
    }
    let token = format!("{TOKEN_PREFIX}{}", random_hex(32)?);
    let token_id = format!("tok_{}", random_hex(8)?);
    exec(
        conn,
        // CAST: PostgreSQL would otherwise type the NULLIF argument int4.
        "INSERT INTO api_tokens (token_id, token_hash, role, tenant, created_at, expires_at, purpose) \
         VALUES (?, ?, ?, NULLIF(?, ''), ?, NULLIF(CAST(? AS bigint), -1), ?)",
        &[
            text(&token_id),
            text(&hash_token(&token)),
            text(match role {
                Role::Operator => "operator",
                Role::Tenant => "tenant",
            }),
            text(tenant.as_deref().unwrap_or("")),
            opt_int(Some(now)),
            opt_int(expires_at),
            text(purpose.as_str()),
        ],
    )?;
    Ok(NewToken {
        token_id,
        token,
        role,
        tenant,
        expires_at,
    })
}

pub fn hash_token(token: &str) -> String {
    to_hex(&sha256(token.as_bytes()))
}

/// The principal of a presented API token, if it is known, unrevoked and
/// unexpired. Looked up by hash, so timing says nothing about the token.
/// Portal links and sessions are not API tokens.
pub fn authenticate(conn: &mut Conn, token: &str, now: u64) -> Result<Option<Principal>, DbError> {
    authenticate_as(conn, Purpose::Api, token, now)
}

/// [`authenticate`] for a token made for `purpose` only.
pub fn authenticate_as(
    conn: &mut Conn,
    purpose: Purpose,
    token: &str,
    now: u64,
) -> Result<Option<Principal>, DbError> {
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 200 {
        return Ok(None);
    }
    let found = rows(
        conn,
        "SELECT token_id, role, tenant, expires_at, revoked_at, last_used_at FROM api_tokens \
         WHERE token_hash = ? AND purpose = ?",
        &[text(&hash_token(token)), text(purpose.as_str())],
    )?;
    let Some(r) = found.into_iter().next() else {
        return Ok(None);
    };
    let get = |i: usize| r.get(i).cloned().unwrap_or(Val::Null);
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    if get(4).int().is_some() || get(3).int().is_some_and(|e| e <= now_i) {
        return Ok(None);
    }
    let token_id = get(0).text().unwrap_or_default();
    // last_used_at at minute precision: one write a minute per token, not one per request.
    if get(5).int().is_none_or(|t| t + 60 <= now_i) {
        exec(
            conn,
            "UPDATE api_tokens SET last_used_at = ? WHERE token_id = ?",
            &[Param::Int(now_i), text(&token_id)],
        )?;
    }
    Ok(Some(Principal {
        token_id,
        role: if get(1).text().as_deref() == Some("operator") {
            Role::Operator
        } else {
            Role::Tenant
        },
        tenant: get(2).text(),
    }))
}

fn token_info(r: &[Val]) -> TokenInfo {
    let get = |i: usize| r.get(i).cloned().unwrap_or(Val::Null);
    let u = |v: Val| v.int().map(|v| u64::try_from(v).unwrap_or(0));
    TokenInfo {
        token_id: get(0).text().unwrap_or_default(),
        role: if get(1).text().as_deref() == Some("operator") {
            Role::Operator
        } else {
            Role::Tenant
        },
        tenant: get(2).text(),
        created_at: u(get(3)).unwrap_or(0),
        expires_at: u(get(4)),
        revoked_at: u(get(5)),
        last_used_at: u(get(6)),
    }
}

const TOKEN_COLS: &str =
    "SELECT token_id, role, tenant, created_at, expires_at, revoked_at, last_used_at FROM api_tokens";

/// API tokens of one tenant, or every API token (`None`), oldest first.
pub fn list_tokens(conn: &mut Conn, tenant: Option<&str>) -> Result<Vec<TokenInfo>, DbError> {
    let rs = match tenant {
        Some(t) => rows(
            conn,
            &format!(
                "{TOKEN_COLS} WHERE purpose = 'api' AND tenant = ? ORDER BY created_at, token_id"
            ),
            &[text(t)],
        )?,
        None => rows(
            conn,
            &format!("{TOKEN_COLS} WHERE purpose = 'api' ORDER BY created_at, token_id"),
            &[],
        )?,
    };
    Ok(rs.iter().map(|r| token_info(r)).collect())
}

/// Revokes an API token; with `tenant`, only one of that tenant's. False
/// if no such (unrevoked) token.
pub fn revoke_token(
    conn: &mut Conn,
    token_id: &str,
    tenant: Option<&str>,
    now: u64,
) -> Result<bool, DbError> {
    revoke_as(conn, Purpose::Api, token_id, tenant, now)
}

/// [`revoke_token`] for a token made for `purpose` only.
pub fn revoke_as(
    conn: &mut Conn,
    purpose: Purpose,
    token_id: &str,
    tenant: Option<&str>,
    now: u64,
) -> Result<bool, DbError> {
    let n = exec(
        conn,
        "UPDATE api_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL \
         AND purpose = ? AND (? = '' OR tenant = ?)",
        &[
            opt_int(Some(now)),
            text(token_id),
            text(purpose.as_str()),
            text(tenant.unwrap_or("")),
            text(tenant.unwrap_or("")),
        ],
    )?;
    Ok(n > 0)
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Tenant {
    pub tenant: String,
    pub display_name: Option<String>,
    pub created_at: u64,
}

/// Creates the tenant or changes its display name; true if created.
pub fn put_tenant(
    conn: &mut Conn,
    tenant: &str,
    display_name: Option<&str>,
    now: u64,
) -> Result<(Tenant, bool), DbError> {
    keygate_core::credential::check_name("tenant", tenant)
        .map_err(|e| DbError::bad_input("tenant", e.to_string()))?;
    let existed = get_tenant(conn, tenant)?.is_some();
    if existed {
        exec(
            conn,
            "UPDATE tenants SET display_name = NULLIF(?, '') WHERE id = ?",
            &[text(display_name.unwrap_or("")), text(tenant)],
        )?;
    } else {
        // A concurrent creator wins; this one then updates the name.
        exec(
            conn,
            "INSERT INTO tenants (id, display_name, created_at) VALUES (?, NULLIF(?, ''), ?) \
             ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name",
            &[
                text(tenant),
                text(display_name.unwrap_or("")),
                opt_int(Some(now)),
            ],
        )?;
    }
    let t = get_tenant(conn, tenant)?
        .ok_or_else(|| DbError::Migration("the tenant vanished after writing it".into()))?;
    Ok((t, !existed))
}

fn tenant_of(r: &[Val]) -> Tenant {
    let get = |i: usize| r.get(i).cloned().unwrap_or(Val::Null);
    Tenant {
        tenant: get(0).text().unwrap_or_default(),
        display_name: get(1).text(),
        created_at: get(2).int().map_or(0, |v| u64::try_from(v).unwrap_or(0)),
    }
}

pub fn get_tenant(conn: &mut Conn, tenant: &str) -> Result<Option<Tenant>, DbError> {
    Ok(rows(
        conn,
        "SELECT id, display_name, created_at FROM tenants WHERE id = ?",
        &[text(tenant)],
    )?
    .first()
    .map(|r| tenant_of(r)))
}

pub fn list_tenants(conn: &mut Conn) -> Result<Vec<Tenant>, DbError> {
    Ok(rows(
        conn,
        "SELECT id, display_name, created_at FROM tenants ORDER BY id",
        &[],
    )?
    .iter()
    .map(|r| tenant_of(r))
    .collect())
}

/// A change, as recorded: who (a token id, never a token), from where, what.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    pub id: i64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub actor_token_id: Option<String>,
    pub actor_ip: Option<String>,
    pub tenant: Option<String>,
    pub action: String,
    pub object: Option<String>,
    pub detail: Option<serde_json::Value>,
}

pub struct AuditEntry<'a> {
    pub actor_token_id: Option<&'a str>,
    pub actor_ip: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub action: &'a str,
    pub object: Option<&'a str>,
    /// Never a key, secret or token.
    pub detail: Option<serde_json::Value>,
}

pub fn record(conn: &mut Conn, e: &AuditEntry<'_>) -> Result<(), DbError> {
    let pg = matches!(conn, Conn::Postgres(_));
    exec(conn, &audit_insert_sql(pg), &audit_params(e))?;
    Ok(())
}

/// The statement [`record`] runs (with `?` placeholders), for a store that
/// writes the record in its own transaction.
pub(crate) fn audit_insert_sql(postgres: bool) -> String {
    let cast = if postgres {
        "CAST(NULLIF(?, '') AS jsonb)"
    } else {
        "NULLIF(?, '')"
    };
    format!(
        "INSERT INTO audit (time_ms, actor_token_id, actor_ip, tenant, action, object, detail) \
         VALUES (?, NULLIF(?, ''), NULLIF(?, ''), NULLIF(?, ''), ?, NULLIF(?, ''), {cast})"
    )
}

/// The parameters of [`audit_insert_sql`], stamped now.
pub(crate) fn audit_params(e: &AuditEntry<'_>) -> [Param; 7] {
    [
        Param::Int(now_ms()),
        text(e.actor_token_id.unwrap_or("")),
        text(e.actor_ip.unwrap_or("")),
        text(e.tenant.unwrap_or("")),
        text(e.action),
        text(e.object.unwrap_or("")),
        text(&e.detail.as_ref().map(|d| d.to_string()).unwrap_or_default()),
    ]
}

/// An audit record owned, so it can travel with a change into the store
/// (see [`crate::service::Service::audited`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audit {
    pub actor_token_id: Option<String>,
    pub actor_ip: Option<String>,
    pub tenant: Option<String>,
    pub action: String,
    /// `None`: the service names the object it creates (a new key's id).
    pub object: Option<String>,
    /// Never a key, secret or token.
    pub detail: Option<serde_json::Value>,
}

impl Audit {
    pub fn entry(&self) -> AuditEntry<'_> {
        AuditEntry {
            actor_token_id: self.actor_token_id.as_deref(),
            actor_ip: self.actor_ip.as_deref(),
            tenant: self.tenant.as_deref(),
            action: &self.action,
            object: self.object.as_deref(),
            detail: self.detail.clone(),
        }
    }
}

/// Runs `f` in one transaction on `conn`: a change to tokens or tenants
/// and its audit record commit together or not at all.
pub fn atomically<T, E: From<DbError>>(
    conn: &mut Conn,
    f: impl FnOnce(&mut Conn) -> Result<T, E>,
) -> Result<T, E> {
    let begin = match conn {
        // IMMEDIATE: take the write lock now (waiting for it), not on the
        // first write, where SQLite could refuse to upgrade without waiting.
        Conn::Sqlite(_) => "BEGIN IMMEDIATE",
        Conn::Postgres(_) => "BEGIN",
    };
    batch(conn, begin).map_err(E::from)?;
    match f(conn) {
        Ok(v) => {
            if let Err(e) = batch(conn, "COMMIT") {
                let _ = batch(conn, "ROLLBACK");
                return Err(e.into());
            }
            Ok(v)
        }
        Err(e) => {
            // The connection is reused: never leave a transaction open.
            let _ = batch(conn, "ROLLBACK");
            Err(e)
        }
    }
}

fn batch(conn: &mut Conn, sql: &str) -> Result<(), DbError> {
    match conn {
        Conn::Sqlite(c) => c.execute_batch(sql)?,
        Conn::Postgres(c) => c.batch_execute(sql)?,
    }
    Ok(())
}

/// Audit records newest first; `before` is the last id of the previous page.
pub fn list_audit(
    conn: &mut Conn,
    tenant: Option<&str>,
    limit: u32,
    before: Option<i64>,
) -> Result<Vec<AuditRecord>, DbError> {
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(DbError::bad_input(
            "limit",
            format!("must be between 1 and {MAX_AUDIT_LIMIT}"),
        ));
    }
    let detail = match conn {
        Conn::Sqlite(_) => "detail",
        Conn::Postgres(_) => "detail::text",
    };
    let rs = rows(
        conn,
        &format!(
            "SELECT id, time_ms, actor_token_id, actor_ip, tenant, action, object, {detail} \
             FROM audit WHERE (? = '' OR tenant = ?) AND id < ? ORDER BY id DESC LIMIT ?"
        ),
        &[
            text(tenant.unwrap_or("")),
            text(tenant.unwrap_or("")),
            Param::Int(before.unwrap_or(i64::MAX)),
            Param::Int(i64::from(limit)),
        ],
    )?;
    Ok(rs
        .iter()
        .map(|r| {
            let get = |i: usize| r.get(i).cloned().unwrap_or(Val::Null);
            let ms = get(1).int().unwrap_or(0);
            let at = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            AuditRecord {
                id: get(0).int().unwrap_or(0),
                time: humantime::format_rfc3339_millis(at).to_string(),
                actor_token_id: get(2).text(),
                actor_ip: get(3).text(),
                tenant: get(4).text(),
                action: get(5).text().unwrap_or_default(),
                object: get(6).text(),
                detail: get(7).text().and_then(|d| serde_json::from_str(&d).ok()),
            }
        })
        .collect())
}

/// Each key's newest request time (Unix seconds), kept by log ingestion.
pub fn last_used(conn: &mut Conn, tenant: &str) -> Result<Vec<(String, u64)>, DbError> {
    Ok(rows(
        conn,
        "SELECT key_id, last_used_at FROM keys WHERE tenant = ? AND last_used_at IS NOT NULL",
        &[text(tenant)],
    )?
    .iter()
    .filter_map(|r| {
        let id = r.first()?.text()?;
        let at = r.get(1)?.int()?;
        Some((id, u64::try_from(at).unwrap_or(0)))
    })
    .collect())
}

/// Sessions recorded for a key (revoked ones carry `revoked_at_ms`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub key_id: String,
    pub session_id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub last_seen_at: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

/// Expired sessions are left out: their tokens no longer work anyway (a
/// revocation is kept, and listed, for the longest token lifetime). A
/// session logged in again after its revocation (a newer token) is listed
/// live: the revocation, still kept to refuse the older tokens, predates it.
///
/// A key's rows go with it when it is deleted, and a key created with an
/// id that has rows (the ingester read a deleted key's requests late) starts
/// without them (`store::sqlite`, `store::pg`): the rows of a key id are the
/// live key's own.
pub fn list_sessions(conn: &mut Conn, key_id: &str) -> Result<Vec<SessionInfo>, DbError> {
    Ok(rows(
        conn,
        "SELECT key_id, session_id, created_at, expires_at, last_seen_at, \
         CASE WHEN revoked_at >= coalesce(issued_ms, created_at * 1000) THEN revoked_at END \
         FROM sessions WHERE key_id = ? AND expires_at > ? ORDER BY created_at, session_id",
        &[
            text(key_id),
            Param::Int(crate::db::now_ms().div_euclid(1000)),
        ],
    )?
    .iter()
    .map(|r| {
        let get = |i: usize| r.get(i).cloned().unwrap_or(Val::Null);
        let u = |v: Val| v.int().map(|v| u64::try_from(v).unwrap_or(0));
        SessionInfo {
            key_id: get(0).text().unwrap_or_default(),
            session_id: get(1).text().unwrap_or_default(),
            created_at: u(get(2)).unwrap_or(0),
            expires_at: u(get(3)).unwrap_or(0),
            last_seen_at: u(get(4)),
            revoked_at_ms: u(get(5)),
        }
    })
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;

    fn conn() -> (tempfile::TempDir, Conn) {
        let dir = tempfile::tempdir().unwrap();
        let c = Db::sqlite(dir.path().join("m.db")).open().unwrap();
        (dir, c)
    }

    #[test]
    fn a_token_authenticates_until_revoked_and_only_its_hash_is_stored() {
        let (_d, mut c) = conn();
        let t = create_token(&mut c, Role::Tenant, Some("acme"), None, 100).unwrap();
        assert!(t.token.starts_with(TOKEN_PREFIX) && t.token.len() == 4 + 64);
        let p = authenticate(&mut c, &t.token, 200).unwrap().unwrap();
        assert_eq!(p.tenant.as_deref(), Some("acme"));
        assert!(p.may_access("acme") && !p.may_access("other"));
        let Conn::Sqlite(raw) = &c else { panic!() };
        let stored: String = raw
            .query_row("SELECT token_hash FROM api_tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, t.token);
        assert!(!revoke_token(&mut c, &t.token_id, Some("other"), 300).unwrap());
        assert!(revoke_token(&mut c, &t.token_id, Some("acme"), 300).unwrap());
        assert!(authenticate(&mut c, &t.token, 400).unwrap().is_none());
    }

    #[test]
    fn an_expired_or_unknown_token_is_refused() {
        let (_d, mut c) = conn();
        let t = create_token(&mut c, Role::Operator, None, Some(150), 100).unwrap();
        assert!(authenticate(&mut c, &t.token, 149).unwrap().is_some());
        assert!(authenticate(&mut c, &t.token, 150).unwrap().is_none());
        assert!(authenticate(&mut c, "kgt_nope", 100).unwrap().is_none());
        assert!(create_token(&mut c, Role::Tenant, None, None, 1).is_err());
    }

    #[test]
    fn audit_pages_newest_first_per_tenant() {
        let (_d, mut c) = conn();
        for (i, t) in ["a", "b", "a"].iter().enumerate() {
            record(
                &mut c,
                &AuditEntry {
                    actor_token_id: Some("tok_1"),
                    actor_ip: Some("127.0.0.1"),
                    tenant: Some(t),
                    action: "key.create",
                    object: Some(&format!("k{i}")),
                    detail: Some(serde_json::json!({"n": i})),
                },
            )
            .unwrap();
        }
        let a = list_audit(&mut c, Some("a"), 1, None).unwrap();
        assert_eq!(a[0].object.as_deref(), Some("k2"));
        let next = list_audit(&mut c, Some("a"), 10, Some(a[0].id)).unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].detail, Some(serde_json::json!({"n": 0})));
        assert_eq!(list_audit(&mut c, None, 10, None).unwrap().len(), 3);
    }

    #[test]
    fn put_tenant_creates_then_renames() {
        let (_d, mut c) = conn();
        let (t, created) = put_tenant(&mut c, "acme", Some("Acme"), 5).unwrap();
        assert!(created && t.display_name.as_deref() == Some("Acme"));
        let (t, created) = put_tenant(&mut c, "acme", Some("ACME Inc"), 6).unwrap();
        assert!(!created && t.display_name.as_deref() == Some("ACME Inc"));
        assert_eq!(list_tenants(&mut c).unwrap().len(), 1);
        assert!(put_tenant(&mut c, "bad tenant", None, 1).is_err());
    }
}
