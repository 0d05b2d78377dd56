//! `/api/v1/plans` and `/api/v1/tenants/{tenant}/limits`, and the limit
//! fields of keys (`limits`, `plan`). Limits are strings such as `100/min`,
//! `10000/day` (`keygate_core::limits`). Plans and limits decide what a
//! tenant may consume, so only operators change them; a tenant token may
//! read its own tenant's limits.

use crate::api::{audit_record, audited_as, blocking, rfc3339};
use crate::error::ApiError;
use crate::extract::{Auth, Json, Path};
use crate::{now, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keygate_control::service::{KeyLimits, KeyPatch, Service, TenantLimitsChange};
use keygate_control::store::{PlanDef, TenantLimits};
use keygate_control::Conn;
use keygate_core::limits::{parse_limits, Limit};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::sync::Arc;

type St = State<Arc<AppState>>;

/// Runs a change with its audit record (`tenant` None for plans, which
/// belong to no tenant), as [`crate::api::audited`] does.
#[allow(clippy::too_many_arguments)]
fn audited<T>(
    svc: &Service,
    db: &mut Conn,
    who: &Auth,
    tenant: Option<&str>,
    action: &str,
    object: &str,
    detail: Value,
    change: impl FnOnce(&Service) -> Result<T, keygate_control::Error>,
) -> Result<T, keygate_control::Error> {
    let mut record = audit_record(
        who,
        tenant.unwrap_or_default(),
        action,
        Some(object),
        detail,
    );
    record.tenant = tenant.map(str::to_owned);
    audited_as(svc, db, record, change, |_| object.to_owned())
}

fn parse(field: &str, items: &[String]) -> Result<Vec<Limit>, ApiError> {
    parse_limits(field, items).map_err(|e| ApiError::invalid(e.field, e.message))
}

/// Refuses a tenant token that sets `field`, a limit: 403 naming the field.
pub(crate) fn operator_for(who: &Auth, field: &str) -> Result<(), ApiError> {
    who.operator().map_err(|_| {
        ApiError::forbidden(&format!(
            "{field}: only an operator token sets limits and plans"
        ))
    })
}

/// A new key's limits and plan; only an operator may give any.
pub(crate) fn key_limits(
    who: &Auth,
    limits: &[String],
    plan: Option<String>,
) -> Result<KeyLimits, ApiError> {
    if !limits.is_empty() {
        operator_for(who, "limits")?;
    }
    if plan.is_some() {
        operator_for(who, "plan")?;
    }
    Ok(KeyLimits {
        limits: parse("limits", limits)?,
        plan,
    })
}

/// A key change's limits and plan; only an operator may change them.
pub(crate) fn patch_limits(
    who: &Auth,
    limits: Option<Vec<String>>,
    plan: Option<Option<String>>,
    patch: &mut KeyPatch,
    changed: &mut Vec<&'static str>,
) -> Result<(), ApiError> {
    if let Some(l) = limits {
        operator_for(who, "limits")?;
        patch.limits = Some(parse("limits", &l)?);
        changed.push("limits");
    }
    if let Some(p) = plan {
        operator_for(who, "plan")?;
        patch.plan = Some(p);
        changed.push("plan");
    }
    Ok(())
}

/// A top-up as the API takes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreditsIn {
    balance: u64,
    #[serde(default)]
    monthly: bool,
}

/// A key change's usage credits; only an operator may top up.
pub(crate) fn patch_credits(
    who: &Auth,
    credits: Option<Option<CreditsIn>>,
    patch: &mut KeyPatch,
    changed: &mut Vec<&'static str>,
) -> Result<(), ApiError> {
    if let Some(c) = credits {
        operator_for(who, "credits")?;
        patch.credits = Some(c.map(|c| (c.balance, c.monthly)));
        changed.push("credits");
    }
    Ok(())
}

fn strings(limits: &[Limit]) -> Vec<String> {
    limits.iter().map(Limit::to_string).collect()
}

fn plan_view(p: &PlanDef, users: (usize, usize)) -> Value {
    json!({
        "name": p.name,
        "limits": strings(&p.limits),
        "keys": users.0,
        "tenants": users.1,
        "created_at": rfc3339(p.created_at),
        "updated_at": rfc3339(p.updated_at),
    })
}

fn tenant_view(t: &TenantLimits) -> Value {
    json!({"tenant": t.tenant, "plan": t.plan, "limits": strings(&t.limits)})
}

pub(crate) async fn list_plans(State(st): St, who: Auth) -> Result<Response, ApiError> {
    who.operator()?;
    let out = blocking(&st, |svc, _| {
        Ok(svc
            .plans_with_users()?
            .iter()
            .map(|(p, users)| plan_view(p, *users))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(axum::Json(json!({"plans": out})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPlan {
    name: String,
    limits: Vec<String>,
}

pub(crate) async fn create_plan(
    State(st): St,
    who: Auth,
    Json(body): Json<NewPlan>,
) -> Result<Response, ApiError> {
    who.operator()?;
    let limits = parse("limits", &body.limits)?;
    let out = blocking(&st, move |svc, db| {
        let detail = json!({"limits": strings(&limits)});
        let p = audited(
            svc,
            db,
            &who,
            None,
            "plan.create",
            &body.name,
            detail,
            |svc| svc.create_plan(&body.name, limits, now()),
        )?;
        Ok(plan_view(&p, (0, 0)))
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

pub(crate) async fn get_plan(
    State(st): St,
    who: Auth,
    Path(plan): Path<String>,
) -> Result<Response, ApiError> {
    who.operator()?;
    let out = blocking(&st, move |svc, _| {
        let p = svc.show_plan(&plan)?;
        Ok(plan_view(&p, svc.plan_users(&plan)?))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanLimits {
    limits: Vec<String>,
}

pub(crate) async fn put_plan(
    State(st): St,
    who: Auth,
    Path(plan): Path<String>,
    Json(body): Json<PlanLimits>,
) -> Result<Response, ApiError> {
    who.operator()?;
    let limits = parse("limits", &body.limits)?;
    let out = blocking(&st, move |svc, db| {
        let detail = json!({"limits": strings(&limits)});
        let p = audited(svc, db, &who, None, "plan.update", &plan, detail, |svc| {
            svc.set_plan_limits(&plan, limits, now())
        })?;
        Ok(plan_view(&p, svc.plan_users(&plan)?))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

pub(crate) async fn delete_plan(
    State(st): St,
    who: Auth,
    Path(plan): Path<String>,
) -> Result<Response, ApiError> {
    who.operator()?;
    blocking(&st, move |svc, db| {
        audited(
            svc,
            db,
            &who,
            None,
            "plan.delete",
            &plan,
            Value::Null,
            |svc| svc.delete_plan(&plan),
        )?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn get_tenant_limits(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let out = blocking(&st, move |svc, _| {
        Ok(tenant_view(&svc.tenant_limits(&tenant)?))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

/// `Some(value)` when the field is present, even as `null`.
fn present<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<V>>, D::Error> {
    Option::<V>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutTenantLimits {
    /// `null` takes the tenant off its plan; absent leaves it.
    #[serde(default, deserialize_with = "present")]
    plan: Option<Option<String>>,
    /// `[]` removes the shared limits; absent leaves them.
    limits: Option<Vec<String>>,
}

pub(crate) async fn put_tenant_limits(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    Json(body): Json<PutTenantLimits>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    who.operator()?;
    let change = TenantLimitsChange {
        plan: body.plan,
        limits: body.limits.map(|l| parse("limits", &l)).transpose()?,
    };
    let out = blocking(&st, move |svc, db| {
        let detail = json!({
            "plan": change.plan,
            "limits": change.limits.as_deref().map(strings),
        });
        let t = audited(
            svc,
            db,
            &who,
            Some(&tenant),
            "tenant.limits",
            &tenant,
            detail,
            |svc| svc.set_tenant_limits(&tenant, &change),
        )?;
        Ok(tenant_view(&t))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}
