//! `keygate plan …`, `keygate tenant limits …` and `keygate key limits …`:
//! several limits per key, plans and tenant limits (`keygate_core::limits`
//! defines the syntax: `100/min`, `10000/day`, …). Parsing here, the
//! changes in the service layer.

use crate::output::{rfc3339, Out};
use crate::CliError;
use clap::{Args, Subcommand};
use keygate_control::service::{KeyLimits, KeyPatch, TenantLimitsChange};
use keygate_control::store::{PlanDef, TenantLimits};
use keygate_control::Service;
use keygate_core::limits::{parse_limits, Limit};
use serde_json::{json, Value};
use std::io::Write;

/// Limits as the user wrote them (`--limit`, repeatable), each checked.
#[derive(Args, Clone, Debug, Default)]
pub struct LimitArgs {
    /// A limit COUNT/PERIOD, PERIOD one of s, min, hour (rolling windows),
    /// day, month (calendar quotas, UTC); repeat for several, e.g.
    /// --limit 100/min --limit 10000/day --limit 200000/month.
    #[arg(long = "limit", value_name = "COUNT/PERIOD")]
    pub limits: Vec<String>,
}

impl LimitArgs {
    fn parse(&self) -> Result<Vec<Limit>, CliError> {
        parse_limits("--limit", &self.limits)
            .map_err(|e| CliError::Usage(format!("{}: {}", e.field, e.message)))
    }
}

/// `key create`'s limit options.
#[derive(Args, Clone, Debug, Default)]
pub struct KeyLimitArgs {
    #[command(flatten)]
    pub limits: LimitArgs,
    /// The plan whose limits apply when the key has none of its own
    /// (default: its tenant's plan, if any).
    #[arg(long, value_name = "NAME")]
    pub plan: Option<String>,
}

impl KeyLimitArgs {
    pub fn parse(&self) -> Result<KeyLimits, CliError> {
        Ok(KeyLimits {
            limits: self.limits.parse()?,
            plan: self.plan.clone(),
        })
    }
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Creates a plan: a named limit set keys and tenants can be put on.
    Create {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Lists the plans with how many keys and tenants are on each.
    List,
    Show {
        name: String,
    },
    /// Replaces a plan's limits: every key on it follows with one sync change.
    Set {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Deletes a plan no key or tenant is on.
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Shows or changes a tenant's plan and its shared limits (counted for
    /// all of its keys together, on top of each key's own).
    Limits {
        tenant: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Removes the tenant's shared limits.
        #[arg(long, conflicts_with = "limits")]
        clear: bool,
        /// Puts the tenant's keys that name no plan on this plan.
        #[arg(long, value_name = "NAME", conflicts_with = "no_plan")]
        plan: Option<String>,
        /// Takes the tenant off its plan.
        #[arg(long)]
        no_plan: bool,
    },
}

/// `keygate key limits KEY_ID …`.
#[derive(Args)]
pub struct KeyLimitsArgs {
    pub key_id: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Removes the key's own limits (its plan's, or the default, apply).
    #[arg(long, conflicts_with = "limits")]
    pub clear: bool,
    #[arg(long, value_name = "NAME", conflicts_with = "no_plan")]
    pub plan: Option<String>,
    /// Takes the key off its plan (its tenant's plan then applies).
    #[arg(long)]
    pub no_plan: bool,
}

/// `keygate key credits KEY_ID …`: a top-up of usage credits.
#[derive(Args)]
pub struct KeyCreditsArgs {
    pub key_id: String,
    /// Grants this many uses from now (a top-up replaces what was left).
    #[arg(long, value_name = "N", required_unless_present = "remove")]
    pub set: Option<u64>,
    /// Grants the same number again on the 1st of every month (00:00 UTC).
    #[arg(long, requires = "set")]
    pub monthly: bool,
    /// Removes the key's credits.
    #[arg(long, conflicts_with = "set")]
    pub remove: bool,
}

/// `keygate key credits`.
/// Sets or clears a key's credits; the caller shows the key with what it
/// used, as `key show` does.
pub fn key_credits(
    svc: &Service,
    a: KeyCreditsArgs,
    now: u64,
) -> Result<keygate_control::store::StoredKey, CliError> {
    let patch = KeyPatch {
        credits: Some(a.set.map(|n| (n, a.monthly))),
        ..KeyPatch::default()
    };
    let tenant = svc.show_key(&a.key_id)?.record.tenant;
    Ok(svc.patch_key(&tenant, &a.key_id, &patch, now)?)
}

fn strings(limits: &[Limit]) -> Vec<String> {
    limits.iter().map(Limit::to_string).collect()
}

fn plan_view(p: &PlanDef, users: Option<(usize, usize)>) -> Value {
    let mut v = json!({
        "name": p.name,
        "limits": strings(&p.limits),
        "created_at": rfc3339(p.created_at),
        "updated_at": rfc3339(p.updated_at),
    });
    if let (Some((keys, tenants)), Some(map)) = (users, v.as_object_mut()) {
        map.insert("keys".into(), keys.into());
        map.insert("tenants".into(), tenants.into());
    }
    v
}

fn tenant_view(t: &TenantLimits) -> Value {
    json!({"tenant": t.tenant, "plan": t.plan, "limits": strings(&t.limits)})
}

fn show<W: Write>(out: &mut Out<W>, v: &Value) -> Result<(), CliError> {
    Ok(out.either(v, |w| {
        if let Some(map) = v.as_object() {
            for (name, value) in map {
                let shown = match value {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    Value::Array(a) if a.is_empty() => "-".into(),
                    Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(", "),
                    other => other.to_string(),
                };
                writeln!(w, "{name:<12} {shown}")?;
            }
        }
        Ok(())
    })?)
}

/// Runs a plan command; returns the audit change (action, plan name).
pub fn plan_command<W: Write>(
    svc: &Service,
    out: &mut Out<W>,
    cmd: PlanCommand,
    now: u64,
) -> Result<Option<(&'static str, String)>, CliError> {
    Ok(match cmd {
        PlanCommand::Create { name, limits } => {
            let p = svc.create_plan(&name, limits.parse()?, now)?;
            show(out, &plan_view(&p, None))?;
            Some(("plan.create", name))
        }
        PlanCommand::List => {
            let rows = svc
                .plans_with_users()?
                .iter()
                .map(|(p, users)| plan_view(p, Some(*users)))
                .collect();
            let v = Value::Array(rows);
            out.either(&v, |w| {
                writeln!(w, "{:<16} {:<6} {:<8} LIMITS", "PLAN", "KEYS", "TENANTS")?;
                for row in v.as_array().into_iter().flatten() {
                    writeln!(
                        w,
                        "{:<16} {:<6} {:<8} {}",
                        row["name"].as_str().unwrap_or_default(),
                        row["keys"].as_u64().unwrap_or_default(),
                        row["tenants"].as_u64().unwrap_or_default(),
                        row["limits"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )?;
                }
                Ok(())
            })?;
            None
        }
        PlanCommand::Show { name } => {
            let p = svc.show_plan(&name)?;
            show(out, &plan_view(&p, Some(svc.plan_users(&name)?)))?;
            None
        }
        PlanCommand::Set { name, limits } => {
            let p = svc.set_plan_limits(&name, limits.parse()?, now)?;
            show(out, &plan_view(&p, None))?;
            Some(("plan.update", name))
        }
        PlanCommand::Delete { name } => {
            svc.delete_plan(&name)?;
            out.done(
                json!({"plan": name, "deleted": true}),
                &format!("Deleted plan {name}."),
            )?;
            Some(("plan.delete", name))
        }
    })
}

/// Runs a tenant command; returns the tenant changed, if any.
pub fn tenant_command<W: Write>(
    svc: &Service,
    out: &mut Out<W>,
    cmd: TenantCommand,
) -> Result<Option<String>, CliError> {
    let TenantCommand::Limits {
        tenant,
        limits,
        clear,
        plan,
        no_plan,
    } = cmd;
    let change = TenantLimitsChange {
        plan: if no_plan { Some(None) } else { plan.map(Some) },
        limits: if clear {
            Some(vec![])
        } else if limits.limits.is_empty() {
            None
        } else {
            Some(limits.parse()?)
        },
    };
    if change.plan.is_none() && change.limits.is_none() {
        show(out, &tenant_view(&svc.tenant_limits(&tenant)?))?;
        return Ok(None);
    }
    let t = svc.set_tenant_limits(&tenant, &change)?;
    show(out, &tenant_view(&t))?;
    Ok(Some(tenant))
}

/// `keygate key limits`: the key's own limits and plan.
pub fn key_limits<W: Write>(
    svc: &Service,
    out: &mut Out<W>,
    a: KeyLimitsArgs,
    now: u64,
) -> Result<keygate_control::store::StoredKey, CliError> {
    let patch = KeyPatch {
        limits: if a.clear {
            Some(vec![])
        } else if a.limits.limits.is_empty() {
            None
        } else {
            Some(a.limits.parse()?)
        },
        plan: if a.no_plan {
            Some(None)
        } else {
            a.plan.map(Some)
        },
        ..KeyPatch::default()
    };
    let tenant = svc.show_key(&a.key_id)?.record.tenant;
    let k = svc.patch_key(&tenant, &a.key_id, &patch, now)?;
    out.key(&k)?;
    Ok(k)
}
