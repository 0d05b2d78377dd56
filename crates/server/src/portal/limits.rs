//! The portal's read-only view of limits: the signed-in tenant's plan, its
//! shared tenant limits, the limits each of its keys meets and what is left
//! of their usage credits. Tenants read them here; operators set them
//! (CLI `keygate plan …`/`tenant limits`, API `/plans`, `…/limits`).

use super::pages::{blocking, time_text};
use super::{render, PortalError, Session};
use crate::AppState;
use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use keygate_control::store::{CreditsStatus, EffectiveLimits, Snapshot, StoredKey};
use keygate_core::limits::Limit;
use std::sync::Arc;

/// `100/min, 10000/day`, or "none".
pub(super) fn limits_text(limits: &[Limit]) -> String {
    if limits.is_empty() {
        return "none".into();
    }
    limits
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The limits a key meets and where they come from, in words.
pub(super) fn effective_text(snap: &Snapshot, k: &StoredKey) -> String {
    let r = &k.record;
    match snap.effective_limits(k) {
        EffectiveLimits::Own => {
            let mut all: Vec<String> = r.limits.iter().map(ToString::to_string).collect();
            if let Some(l) = r.rate_limit {
                all.push(format!("{}/{}s", l.requests, l.window_secs));
            }
            format!("{} (the key's own)", all.join(", "))
        }
        EffectiveLimits::Plan {
            name,
            limits,
            via_tenant,
        } => format!(
            "{} (plan {name}{})",
            limits_text(&limits),
            if via_tenant { ", your tenant's" } else { "" }
        ),
        EffectiveLimits::Default => "the gateway's default rate limit, if it sets one".into(),
    }
}

/// A key's credits in words: what is left of the balance (from the request
/// log, a second or two behind), or the balance alone where no log is kept.
pub(super) fn credits_text(c: Option<&CreditsStatus>) -> String {
    let Some(c) = c else {
        return "-".into();
    };
    let mut s = match c.remaining {
        Some(left) => format!(
            "{left} of {} left ({} used since {})",
            c.balance,
            c.used.unwrap_or(0),
            time_text(c.granted_at)
        ),
        None => format!("{} from {}", c.balance, time_text(c.granted_at)),
    };
    if let Some(t) = c.refills_at {
        s.push_str(&format!(", refilled monthly (next {})", time_text(t)));
    }
    s
}

pub struct KeyLimitsRow {
    pub key_id: String,
    pub label: String,
    pub effective: String,
    pub credits: String,
}

#[derive(Template)]
#[template(path = "limits.html")]
struct LimitsPage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    /// The tenant's plan and its limits, if it has one.
    plan: Option<(String, String)>,
    /// The limits shared by all of the tenant's keys ("none").
    shared: String,
    keys: Vec<KeyLimitsRow>,
}

pub async fn limits(State(st): St, s: Session) -> Result<Response, PortalError> {
    let tenant = s.tenant.clone();
    let (plan, shared, keys) = blocking(&st, move |svc, _| {
        let snap = svc.snapshot()?;
        let own = snap.tenant_limits_of(&tenant);
        let plan = own.and_then(|t| t.plan.as_deref()).map(|p| {
            let limits = snap
                .plan(p)
                .map_or_else(|| "none".into(), |p| limits_text(&p.limits));
            (p.to_owned(), limits)
        });
        let shared = own.map_or_else(|| "none".into(), |t| limits_text(&t.limits));
        let mut keys: Vec<StoredKey> = snap
            .keys
            .iter()
            .filter(|k| k.record.tenant == tenant)
            .cloned()
            .collect();
        keys.sort_by(|a, b| a.record.key_id.cmp(&b.record.key_id));
        let credits = crate::api::credits_of(svc, &keys);
        let rows = keys
            .iter()
            .map(|k| KeyLimitsRow {
                key_id: k.record.key_id.clone(),
                label: if k.name.is_empty() {
                    k.record.key_id.clone()
                } else {
                    k.name.clone()
                },
                effective: effective_text(&snap, k),
                credits: credits_text(credits.get(&k.record.key_id)),
            })
            .collect();
        Ok((plan, shared, rows))
    })
    .await?;
    Ok(render(
        StatusCode::OK,
        &LimitsPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "limits",
            plan,
            shared,
            keys,
        },
    ))
}

type St = State<Arc<AppState>>;
