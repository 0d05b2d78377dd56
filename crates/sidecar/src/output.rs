//! What the CLI prints: human tables and sentences, or JSON with `--json`.
//! Every function returns the write error so a closed pipe (`| head`) ends
//! the program quietly instead of panicking.

use keygate_control::service::Created;
use keygate_control::store::{CreditsStatus, StoredKey};
use keygate_core::credential::{Kind, Status};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

pub struct Out<W: Write> {
    pub json: bool,
    pub w: W,
}

pub fn rfc3339(secs: u64) -> String {
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

/// A key's usage credits: `used`/`remaining` from the request log when
/// `credits` has them (`key show`, `key list`), else the balance only.
fn credits_view(k: &StoredKey, credits: Option<&CreditsStatus>) -> Option<Value> {
    let c = credits.copied().or_else(|| {
        k.record
            .credits
            .map(|c| CreditsStatus::new(c, None, crate::now()))
    })?;
    Some(json!({
        "balance": c.balance,
        "used": c.used,
        "remaining": c.remaining,
        "monthly": c.monthly,
        "granted_at": rfc3339(c.granted_at),
        "refills_at": c.refills_at.map(rfc3339),
    }))
}

/// The CREDITS column: `remaining/balance`, or the balance alone when
/// what was used is unknown, or "-".
fn credits_cell(k: &StoredKey, credits: Option<&CreditsStatus>) -> String {
    match credits.copied().or_else(|| {
        k.record
            .credits
            .map(|c| CreditsStatus::new(c, None, crate::now()))
    }) {
        Some(CreditsStatus {
            remaining: Some(left),
            balance,
            ..
        }) => format!("{left}/{balance}"),
        Some(c) => c.balance.to_string(),
        None => "-".to_owned(),
    }
}

/// A key as the CLI shows it: no key hash, no secret hash.
pub fn public_view(k: &StoredKey, credits: Option<&CreditsStatus>) -> Value {
    let r = &k.record;
    json!({
        "key_id": r.key_id,
        "name": k.name,
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
        "expired": r.expires_at.is_some_and(|t| t <= crate::now()),
        "owner": r.owner,
        "metadata": k.metadata,
        "previous_key_until": r.previous_key_expires_at.filter(|t| *t > crate::now()).map(rfc3339),
        "limits": r.limits.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "plan": r.plan,
        "credits": credits_view(k, credits),
        "created_at": rfc3339(k.created_at),
        "updated_at": rfc3339(k.updated_at),
    })
}

impl<W: Write> Out<W> {
    fn value(&mut self, v: &Value) -> io::Result<()> {
        let text = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
        writeln!(self.w, "{text}")
    }

    /// JSON `v` with `--json`, else the human form.
    pub fn either(
        &mut self,
        v: &Value,
        human: impl FnOnce(&mut W) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.json {
            self.value(v)
        } else {
            human(&mut self.w)
        }
    }

    pub fn key(&mut self, k: &StoredKey) -> io::Result<()> {
        self.key_with(k, None)
    }

    /// A key with its credit status counted from the request log.
    pub fn key_with(&mut self, k: &StoredKey, credits: Option<&CreditsStatus>) -> io::Result<()> {
        let v = public_view(k, credits);
        self.either(&v, |w| {
            if let Some(map) = v.as_object() {
                for (name, value) in map {
                    let shown = match value {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    writeln!(w, "{name:<22} {shown}")?;
                }
            }
            Ok(())
        })
    }

    /// Keys with their credit status by key id (see [`Out::key_with`]).
    pub fn keys(
        &mut self,
        keys: &[StoredKey],
        credits: &BTreeMap<String, CreditsStatus>,
    ) -> io::Result<()> {
        let v = Value::Array(
            keys.iter()
                .map(|k| public_view(k, credits.get(&k.record.key_id)))
                .collect(),
        );
        self.either(&v, |w| {
            writeln!(
                w,
                "{:<24} {:<12} {:<6} {:<8} {:<9} {:<18} {:<10} {:<20} {:<21} {:<13} ALLOWED IPS",
                "KEY ID",
                "TENANT",
                "ENV",
                "KIND",
                "STATUS",
                "SCOPES",
                "RATE",
                "OWNER",
                "EXPIRES",
                "CREDITS"
            )?;
            for k in keys {
                let r = &k.record;
                let scopes = if r.kind == Kind::Default {
                    "(all)".to_owned()
                } else {
                    r.scopes.join(",")
                };
                // The key's own rules, else its plan, else the tenant's
                // plan or the gateway's default.
                let own = r
                    .rate_limit
                    .map(|l| format!("{}/{}s", l.requests, l.window_secs))
                    .into_iter()
                    .chain(r.limits.iter().map(ToString::to_string))
                    .collect::<Vec<_>>();
                let rate = match (&own[..], &r.plan) {
                    ([], Some(plan)) => format!("plan:{plan}"),
                    ([], None) => "default".to_owned(),
                    (own, _) => own.join(","),
                };
                let ips = if r.allowed_ips.is_empty() {
                    "any".to_owned()
                } else {
                    r.allowed_ips.join(",")
                };
                let expires = match r.expires_at {
                    None => "never".to_owned(),
                    Some(t) if t <= crate::now() => format!("expired {}", rfc3339(t)),
                    Some(t) => rfc3339(t),
                };
                writeln!(
                    w,
                    "{:<24} {:<12} {:<6} {:<8} {:<9} {:<18} {:<10} {:<20} {:<21} {:<13} {ips}",
                    r.key_id,
                    r.tenant,
                    r.environment,
                    kind_str(r.kind),
                    status_str(r.status),
                    scopes,
                    rate,
                    r.owner.as_deref().unwrap_or("-"),
                    expires,
                    credits_cell(k, credits.get(&r.key_id))
                )?;
            }
            Ok(())
        })
    }

    pub fn created(&mut self, c: &Created) -> io::Result<()> {
        let v = serde_json::to_value(c).map_err(io::Error::other)?;
        self.either(&v, |w| {
            let scopes = if c.kind == Kind::Default {
                "all".to_owned()
            } else {
                c.scopes.join(", ")
            };
            writeln!(
                w,
                "Created key {} (tenant {}, env {}, {} key, scopes: {})",
                c.key_id,
                c.tenant,
                c.environment,
                kind_str(c.kind),
                scopes
            )?;
            writeln!(w, "  API key:  {}", c.api_key)?;
            if let (Some(secret), Some(basic)) = (&c.secret, &c.authorization_basic) {
                writeln!(w, "  Secret:   {secret}")?;
                writeln!(w, "  Header:   Authorization: {basic}")?;
            }
            writeln!(
                w,
                "Store it now: keygate keeps only its hash and cannot show it again."
            )
        })
    }

    pub fn rotated(&mut self, key_id: &str, secret: &str, until: Option<u64>) -> io::Result<()> {
        let v = json!({"key_id": key_id, "secret": secret,
            "previous_secret_until": until.map(rfc3339)});
        self.either(&v, |w| {
            writeln!(w, "New secret for {key_id}: {secret}")?;
            match until {
                Some(t) => writeln!(w, "The previous secret keeps working until {}.", rfc3339(t))?,
                None => writeln!(w, "The previous secret is refused from the next push on.")?,
            }
            writeln!(w, "Store it now: keygate keeps only its hash.")
        })
    }

    pub fn rolled(&mut self, r: &keygate_control::service::Rolled) -> io::Result<()> {
        let v = json!({"key_id": r.key_id, "tenant": r.tenant, "api_key": r.api_key,
            "previous_key_until": r.previous_key_expires_at.map(rfc3339)});
        self.either(&v, |w| {
            writeln!(w, "Rolled key {} (tenant {})", r.key_id, r.tenant)?;
            writeln!(w, "  API key:  {}", r.api_key)?;
            match r.previous_key_expires_at {
                Some(t) => writeln!(w, "The previous value keeps working until {}.", rfc3339(t))?,
                None => writeln!(w, "The previous value is refused from the next push on.")?,
            }
            writeln!(
                w,
                "Store it now: keygate keeps only its hash and cannot show it again."
            )
        })
    }

    /// A one-line confirmation, or `v` as JSON.
    pub fn done(&mut self, v: Value, sentence: &str) -> io::Result<()> {
        self.either(&v, |w| writeln!(w, "{sentence}"))
    }
}
