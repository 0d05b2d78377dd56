//! Plans, tenant limits and keys' own limits (`keygate_core::limits`): the
//! service operations the CLI and the API share. Every change is one store
//! update, validated before anything is written; a plan's change reaches
//! Envoy as one pushed record, whatever the number of keys on it.

use super::{check_name, Service};
use crate::error::{Error, Result};
use crate::store::{PlanDef, Snapshot, TenantLimits};
use keygate_core::limits::{check_limits, parse_limits, Limit};

/// A key's own limits and plan, as `key create` takes them.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct KeyLimits {
    pub limits: Vec<Limit>,
    pub plan: Option<String>,
}

fn bad(e: keygate_core::ConfigError) -> Error {
    Error::bad(&e.field, e.message)
}

impl KeyLimits {
    /// From `--limit`/API strings, naming the entry at fault (`field[i]`).
    pub fn parse(field: &str, limits: &[String], plan: Option<String>) -> Result<KeyLimits> {
        let limits = parse_limits(field, limits).map_err(bad)?;
        Ok(KeyLimits { limits, plan })
    }

    pub fn check(&self) -> Result<()> {
        check_limits("limits", &self.limits).map_err(bad)?;
        if let Some(p) = &self.plan {
            check_name("plan", p)?;
        }
        Ok(())
    }
}

/// A change to a tenant's limit settings; `None` leaves a field as it is.
#[derive(Default, Clone, Debug)]
pub struct TenantLimitsChange {
    /// `Some(None)` takes the tenant off its plan.
    pub plan: Option<Option<String>>,
    /// `Some(vec![])` removes the tenant's shared limits.
    pub limits: Option<Vec<Limit>>,
}

/// Refuses a plan name the snapshot does not have, naming `field`.
pub(super) fn check_plan_exists(snap: &Snapshot, field: &str, plan: Option<&str>) -> Result<()> {
    match plan {
        Some(p) if snap.plan(p).is_none() => Err(Error::bad(
            field,
            format!("no plan named '{p}' (see `keygate plan list`, GET /api/v1/plans)"),
        )),
        _ => Ok(()),
    }
}

fn check_plan_limits(limits: &[Limit]) -> Result<()> {
    if limits.is_empty() {
        return Err(Error::bad("limits", "a plan needs at least one limit"));
    }
    check_limits("limits", limits).map_err(bad)
}

impl Service {
    pub fn list_plans(&self) -> Result<Vec<PlanDef>> {
        Ok(self.snapshot()?.plans)
    }

    /// Every plan with how many keys and tenants are on it, from one read
    /// of the store.
    pub fn plans_with_users(&self) -> Result<Vec<(PlanDef, (usize, usize))>> {
        let snap = self.snapshot()?;
        Ok(snap
            .plans
            .iter()
            .map(|p| (p.clone(), users(&snap, &p.name)))
            .collect())
    }

    pub fn show_plan(&self, name: &str) -> Result<PlanDef> {
        self.snapshot()?
            .plan(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchPlan(name.to_owned()))
    }

    /// How many keys and tenants use `plan` (directly).
    pub fn plan_users(&self, name: &str) -> Result<(usize, usize)> {
        let snap = self.snapshot()?;
        Ok(users(&snap, name))
    }

    pub fn create_plan(&self, name: &str, limits: Vec<Limit>, now: u64) -> Result<PlanDef> {
        check_name("name", name)?;
        check_plan_limits(&limits)?;
        let plan = PlanDef {
            name: name.to_owned(),
            limits,
            created_at: now,
            updated_at: now,
        };
        self.update(|snap| {
            if snap.plan(name).is_some() {
                return Err(Error::bad(
                    "name",
                    format!("a plan named '{name}' exists; change its limits instead"),
                ));
            }
            snap.plans.push(plan.clone());
            Ok(plan.clone())
        })
    }

    /// Replaces a plan's limits: every key on it follows with one push.
    pub fn set_plan_limits(&self, name: &str, limits: Vec<Limit>, now: u64) -> Result<PlanDef> {
        check_plan_limits(&limits)?;
        self.update(|snap| {
            let p = snap
                .plans
                .iter_mut()
                .find(|p| p.name == name)
                .ok_or_else(|| Error::NoSuchPlan(name.to_owned()))?;
            p.limits = limits.clone();
            p.updated_at = now;
            Ok(p.clone())
        })
    }

    /// Removes a plan no key or tenant uses.
    pub fn delete_plan(&self, name: &str) -> Result<PlanDef> {
        self.update(|snap| {
            let at = snap
                .plans
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| Error::NoSuchPlan(name.to_owned()))?;
            let (keys, tenants) = users(snap, name);
            if keys + tenants > 0 {
                return Err(Error::bad(
                    "plan",
                    format!(
                        "plan '{name}' is used by {keys} key(s) and {tenants} tenant(s); move them to another plan first"
                    ),
                ));
            }
            Ok(snap.plans.remove(at))
        })
    }

    /// A tenant's limit settings (empty if it has none).
    pub fn tenant_limits(&self, tenant: &str) -> Result<TenantLimits> {
        check_name("tenant", tenant)?;
        Ok(self
            .snapshot()?
            .tenant_limits_of(tenant)
            .cloned()
            .unwrap_or_else(|| TenantLimits {
                tenant: tenant.to_owned(),
                ..TenantLimits::default()
            }))
    }

    /// Changes a tenant's plan and shared limits. Its keys' pushed records
    /// follow (they carry the tenant's plan and whether it has limits).
    pub fn set_tenant_limits(
        &self,
        tenant: &str,
        change: &TenantLimitsChange,
    ) -> Result<TenantLimits> {
        check_name("tenant", tenant)?;
        if let Some(l) = &change.limits {
            check_limits("limits", l).map_err(bad)?;
        }
        if let Some(Some(p)) = &change.plan {
            check_name("plan", p)?;
        }
        self.update(|snap| {
            if let Some(Some(p)) = &change.plan {
                check_plan_exists(snap, "plan", Some(p))?;
            }
            let mut t = snap
                .tenant_limits_of(tenant)
                .cloned()
                .unwrap_or(TenantLimits {
                    tenant: tenant.to_owned(),
                    ..TenantLimits::default()
                });
            if let Some(p) = &change.plan {
                t.plan = p.clone();
            }
            if let Some(l) = &change.limits {
                t.limits = l.clone();
            }
            snap.tenant_limits.retain(|x| x.tenant != tenant);
            if t.plan.is_some() || !t.limits.is_empty() {
                snap.tenant_limits.push(t.clone());
                snap.tenant_limits.sort_by(|a, b| a.tenant.cmp(&b.tenant));
            }
            Ok(t.clone())
        })
    }
}

fn users(snap: &Snapshot, name: &str) -> (usize, usize) {
    let keys = snap
        .keys
        .iter()
        .filter(|k| k.record.plan.as_deref() == Some(name))
        .count();
    let tenants = snap
        .tenant_limits
        .iter()
        .filter(|t| t.plan.as_deref() == Some(name))
        .count();
    (keys, tenants)
}
