//! The SQLite store's tables for plans, tenant limits and keys' own limits
//! (migration 0004): read into and written from a [`Snapshot`], beside the
//! key rows `sqlite.rs` handles.

use super::{PlanDef, QuotaUsage, Snapshot, TenantLimits};
use keygate_core::limits::{Credits, Limit};
use rusqlite::{params, Connection};
use std::collections::HashMap;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A stored limit list; `corrupt` names what failed to parse.
fn limits(json: &str, corrupt: &dyn Fn(String) -> super::Error) -> super::Result<Vec<Limit>> {
    serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))
}

fn json(limits: &[Limit]) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| "[]".into())
}

/// Fills `snap`'s plans and tenant limits, and its keys' own limits and plan.
pub(super) fn read(
    c: &Connection,
    snap: &mut Snapshot,
    sql: &dyn Fn(rusqlite::Error) -> super::Error,
    corrupt: &dyn Fn(String) -> super::Error,
) -> super::Result<()> {
    let mut stmt = c
        .prepare_cached("SELECT name, limits, created_at, updated_at FROM plans ORDER BY name")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(sql)?;
    for row in rows {
        let (name, l, created, updated) = row.map_err(sql)?;
        snap.plans.push(PlanDef {
            limits: limits(&l, &|e| corrupt(format!("plan '{name}': {e}")))?,
            name,
            created_at: to_u64(created),
            updated_at: to_u64(updated),
        });
    }
    let mut stmt = c
        .prepare_cached("SELECT tenant, plan, limits FROM tenant_limits ORDER BY tenant")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(sql)?;
    for row in rows {
        let (tenant, plan, l) = row.map_err(sql)?;
        snap.tenant_limits.push(TenantLimits {
            limits: limits(&l, &|e| corrupt(format!("tenant '{tenant}': {e}")))?,
            tenant,
            plan,
        });
    }
    let mut stmt = c
        .prepare_cached("SELECT key_id, limits, plan, credits FROM key_limits")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .map_err(sql)?;
    type Extra = (Vec<Limit>, Option<String>, Option<Credits>);
    let mut by_key: HashMap<String, Extra> = HashMap::new();
    for row in rows {
        let (key_id, l, plan, credits) = row.map_err(sql)?;
        let parsed = limits(&l, &|e| corrupt(format!("key '{key_id}': {e}")))?;
        let credits = credits
            .map(|c| serde_json::from_str(&c))
            .transpose()
            .map_err(|e| corrupt(format!("key '{key_id}': credits: {e}")))?;
        by_key.insert(key_id, (parsed, plan, credits));
    }
    for k in &mut snap.keys {
        if let Some((l, plan, credits)) = by_key.remove(&k.record.key_id) {
            k.record.limits = l;
            k.record.plan = plan;
            k.record.credits = credits;
        }
    }
    Ok(())
}

/// The usage counts of a SQLite store's log tables (`super::UsageCounts`).
pub(super) fn read_quota_used(
    c: &Connection,
    snap: &Snapshot,
    sql: &dyn Fn(rusqlite::Error) -> super::Error,
) -> super::Result<QuotaUsage> {
    let one = |query: &str, p: &[&dyn rusqlite::ToSql]| -> super::Result<u64> {
        let mut stmt = c.prepare_cached(query).map_err(sql)?;
        let n: i64 = stmt.query_row(p, |r| r.get(0)).map_err(sql)?;
        Ok(to_u64(n))
    };
    super::count_quota_usage(snap, &mut |q| {
        match q {
            super::UsageCount::Key { tenant, key_id, since_ms } => one(
                "SELECT COALESCE(SUM(allowed), 0) FROM usage_hourly \
                 WHERE tenant = ?1 AND key_id = ?2 AND hour_ms >= ?3",
                &[&tenant, &key_id, &since_ms],
            ),
            super::UsageCount::Tenant { tenant, since_ms } => one(
                "SELECT COALESCE(SUM(allowed), 0) FROM usage_hourly WHERE tenant = ?1 AND hour_ms >= ?2",
                &[&tenant, &since_ms],
            ),
            super::UsageCount::Records { key_id, since_ms } => one(
                "SELECT count(*) FROM request_logs \
                 WHERE key_id = ?1 AND time_ms >= ?2 AND decision = 'allowed'",
                &[&key_id, &since_ms],
            ),
        }
    })
}

/// Writes what differs between `old` and `new`. Plans go first when they
/// appear and last when they go: rows refer to them.
pub(super) fn write(
    tx: &Connection,
    old: &Snapshot,
    new: &Snapshot,
    sql: &dyn Fn(rusqlite::Error) -> super::Error,
) -> super::Result<()> {
    for p in &new.plans {
        if old.plan(&p.name) == Some(p) {
            continue;
        }
        tx.execute(
            "INSERT INTO plans (name, limits, created_at, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET limits = excluded.limits, \
             updated_at = excluded.updated_at",
            params![
                p.name,
                json(&p.limits),
                to_i64(p.created_at),
                to_i64(p.updated_at)
            ],
        )
        .map_err(sql)?;
    }
    for t in &old.tenant_limits {
        if new.tenant_limits_of(&t.tenant).is_none() {
            tx.execute("DELETE FROM tenant_limits WHERE tenant = ?1", [&t.tenant])
                .map_err(sql)?;
        }
    }
    for t in &new.tenant_limits {
        if old.tenant_limits_of(&t.tenant) == Some(t) {
            continue;
        }
        tx.execute(
            "INSERT INTO tenant_limits (tenant, plan, limits) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant) DO UPDATE SET plan = excluded.plan, limits = excluded.limits",
            params![t.tenant, t.plan, json(&t.limits)],
        )
        .map_err(sql)?;
    }
    type Extra<'a> = (&'a Vec<Limit>, &'a Option<String>, &'a Option<Credits>);
    let before: HashMap<&str, Extra> = old
        .keys
        .iter()
        .map(|k| {
            let r = &k.record;
            (r.key_id.as_str(), (&r.limits, &r.plan, &r.credits))
        })
        .collect();
    let mut after = std::collections::HashSet::new();
    for k in &new.keys {
        let r = &k.record;
        after.insert(r.key_id.as_str());
        let has = !r.limits.is_empty() || r.plan.is_some() || r.credits.is_some();
        let had = before
            .get(r.key_id.as_str())
            .is_some_and(|(l, p, c)| !l.is_empty() || p.is_some() || c.is_some());
        if before.get(r.key_id.as_str()) == Some(&(&r.limits, &r.plan, &r.credits)) {
            continue;
        }
        if has {
            let credits = r.credits.and_then(|c| serde_json::to_string(&c).ok());
            tx.execute(
                "INSERT INTO key_limits (key_id, limits, plan, credits) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (key_id) DO UPDATE SET limits = excluded.limits, plan = excluded.plan, \
                 credits = excluded.credits",
                params![r.key_id, json(&r.limits), r.plan, credits],
            )
            .map_err(sql)?;
        } else if had {
            tx.execute("DELETE FROM key_limits WHERE key_id = ?1", [&r.key_id])
                .map_err(sql)?;
        }
    }
    for id in before.keys().filter(|id| !after.contains(*id)) {
        tx.execute("DELETE FROM key_limits WHERE key_id = ?1", [id])
            .map_err(sql)?;
    }
    for p in &old.plans {
        if new.plan(&p.name).is_none() {
            tx.execute("DELETE FROM plans WHERE name = ?1", [&p.name])
                .map_err(sql)?;
        }
    }
    Ok(())
}
