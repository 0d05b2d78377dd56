//! Where credentials live: [`file::FileStore`] (one JSON file, the embedded
//! default) or [`pg::PgStore`] (PostgreSQL, shared by a fleet), behind one
//! object-safe [`Store`] trait. Only the service layer changes a store.

pub mod file;
pub mod pg;
pub mod sqlite;
mod sqlite_limits;

use crate::db::Db;
use crate::error::{Error, Result};
use crate::mgmt::AuditEntry;
use keygate_core::limits::{check_limits, Credits, Limit, Period, QuotaPeriod, QuotaUsed};
use keygate_core::sync::{LimitKind, LimitRecord, RevokedSession, StoreId};
use keygate_core::CredentialRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::mpsc::Sender;

/// A credential as stored: the wire record plus bookkeeping. Hashes only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// A label for people (API `name`); stores made before it load with "".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub record: CredentialRecord,
    /// The key's metadata object (at most 4 KiB); only fields a sync
    /// forwards reach Envoy (`record.metadata`, filled at push time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The whole store. `version` grows by one with every change.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Made at `store init`; pushed to Envoy so it knows where its set came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<StoreId>,
    pub version: u64,
    pub keys: Vec<StoredKey>,
    /// Token sessions revoked within the longest token lifetime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_sessions: Vec<RevokedSession>,
    /// Named limit sets keys and tenants refer to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<PlanDef>,
    /// Tenants with a plan or limits of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenant_limits: Vec<TenantLimits>,
    /// Where day and month quota usage is counted (stores that keep the
    /// request log: SQLite). Read when a full set is pushed, not stored.
    #[serde(skip)]
    pub usage_source: UsageSource,
}

/// Day and month quota usage counted from the request log, for the keys
/// and tenants with such quotas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub keys: BTreeMap<String, Vec<QuotaUsed>>,
    pub tenants: BTreeMap<String, Vec<QuotaUsed>>,
}

type UsageFn = dyn Fn(&Snapshot) -> Result<QuotaUsage> + Send + Sync;

/// How a snapshot reads its quota usage on demand (none: no request log).
#[derive(Clone, Default)]
pub struct UsageSource(pub Option<std::sync::Arc<UsageFn>>);

impl UsageSource {
    /// The credits each of `keys` with credits has used, counted from the
    /// request log as a full push counts them (allowed requests since the
    /// top-up, or since the month's start when refilled monthly); `None`
    /// for a store without a request log. Only credit counts are made:
    /// the keys are counted with their limits and plans left out.
    pub fn credits_used(&self, keys: &[StoredKey]) -> Result<Option<BTreeMap<String, u64>>> {
        let Some(read) = &self.0 else {
            return Ok(None);
        };
        let keys: Vec<StoredKey> = keys
            .iter()
            .filter(|k| k.record.credits.is_some())
            .map(|k| {
                let mut k = k.clone();
                k.record.limits.clear();
                k.record.plan = None;
                k
            })
            .collect();
        if keys.is_empty() {
            return Ok(Some(BTreeMap::new()));
        }
        let usage = read(&Snapshot {
            keys,
            ..Snapshot::default()
        })?;
        Ok(Some(
            usage
                .keys
                .into_iter()
                .filter_map(|(id, used)| {
                    used.iter()
                        .find(|u| u.period == QuotaPeriod::Credits)
                        .map(|u| (id, u.used))
                })
                .collect(),
        ))
    }
}

/// A key's usage credits as the API, the CLI and the portal show them.
/// `used` and `remaining` come from the request log, so they lag Envoy by
/// the ingest delay; both are `None` where no log is kept or readable.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditsStatus {
    pub balance: u64,
    pub used: Option<u64>,
    pub remaining: Option<u64>,
    pub monthly: bool,
    /// Unix seconds of the top-up.
    pub granted_at: u64,
    /// Unix seconds of the next monthly refill, if refilled.
    pub refills_at: Option<u64>,
}

impl CreditsStatus {
    pub fn new(c: Credits, used: Option<u64>, now_secs: u64) -> CreditsStatus {
        CreditsStatus {
            balance: c.balance,
            used,
            remaining: used.map(|u| c.balance.saturating_sub(u)),
            monthly: c.monthly,
            granted_at: c.granted_at,
            refills_at: c.monthly.then(|| QuotaPeriod::Month.end(now_secs)),
        }
    }
}

/// Where the limits a key meets come from (README "Several limits").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EffectiveLimits {
    /// The key's own `limits` (and single `rate_limit`).
    Own,
    /// Those of a plan: the key's, or (`via_tenant`) its tenant's.
    Plan {
        name: String,
        limits: Vec<Limit>,
        via_tenant: bool,
    },
    /// The plugin's default `rate_limit` (Envoy's config, not the store's).
    Default,
}

impl std::fmt::Debug for UsageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "UsageSource(log)"
        } else {
            "UsageSource(none)"
        })
    }
}

/// Snapshots compare by content; where usage comes from is no part of it.
impl PartialEq for UsageSource {
    fn eq(&self, _: &UsageSource) -> bool {
        true
    }
}

impl Eq for UsageSource {}

/// A plan: a named limit set. Changing it changes every key on it with one
/// pushed record (the filter reads the plan's entry on each request).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlanDef {
    pub name: String,
    pub limits: Vec<Limit>,
    pub created_at: u64,
    pub updated_at: u64,
}

/// A tenant's limit settings: the plan of its keys that name none, and
/// limits shared by all of its keys (on top of each key's own).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
}

/// From this many keys [`Snapshot::validate`] uses a second thread; below
/// it, starting one costs more than it saves.
const PARALLEL_VALIDATION_FROM: usize = 20_000;

impl Snapshot {
    pub fn find(&self, key_id: &str) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.record.key_id == key_id)
    }

    pub fn find_mut(&mut self, key_id: &str) -> Result<&mut StoredKey> {
        self.keys
            .iter_mut()
            .find(|k| k.record.key_id == key_id)
            .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))
    }

    /// Checks every invariant a stored snapshot must hold.
    pub fn validate(&self) -> Result<()> {
        // Each record's own checks (and the per-tenant counts) need nothing
        // from the uniqueness sets and the other way round, so a large
        // store runs them on two threads: at a million keys each side is
        // ~0.5 s of a load. The error is the one a single pass reports:
        // the first record in store order that fails any check, its own
        // checks before uniqueness; then rolled values, then tenants.
        // A thread the OS refuses (pid or nproc limits) means one pass on
        // this thread, not a panic.
        let (own, unique) = if self.keys.len() >= PARALLEL_VALIDATION_FROM {
            std::thread::scope(|s| {
                match std::thread::Builder::new().spawn_scoped(s, || self.check_records()) {
                    Ok(own) => {
                        let unique = self.unique_hashes();
                        let own = own.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                        (own, unique)
                    }
                    Err(_) => (self.check_records(), self.unique_hashes()),
                }
            })
        } else {
            (self.check_records(), self.unique_hashes())
        };
        let (first_invalid, tenants) = own;
        let mut hashes = match (first_invalid, unique) {
            (Some((i, e)), Err((j, _))) if i <= j => return Err(e),
            (_, Err((_, e))) => return Err(e),
            (Some((_, e)), Ok(_)) => return Err(e),
            (None, Ok(hashes)) => hashes,
        };
        // A rolled key's old value still names it in Envoy: no other key
        // may have that value.
        for k in &self.keys {
            if let Some(old) = &k.record.previous_key_hash {
                if !hashes.insert(old) {
                    return Err(Error::Invalid(format!(
                        "key '{}' keeps a rolled-away value that another key uses",
                        k.record.key_id
                    )));
                }
            }
        }
        tenants.map_err(Error::Invalid)?;
        self.validate_limits()
    }

    /// The first record (index, error) that is not a valid credential, and
    /// the per-tenant credential counts' verdict.
    fn check_records(&self) -> (Option<(usize, Error)>, std::result::Result<(), String>) {
        let invalid = self.keys.iter().enumerate().find_map(|(i, k)| {
            let r = &k.record;
            keygate_core::Credential::try_from(r)
                .err()
                .map(|e| (i, Error::Invalid(format!("key '{}': {e}", r.key_id))))
        });
        let tenants = match invalid {
            Some(_) => Ok(()),
            None => {
                keygate_core::credential::check_tenant_limits(self.keys.iter().map(|k| &k.record))
            }
        };
        (invalid, tenants)
    }

    /// Every key hash, or the first record (index, error) whose id or hash
    /// another record before it has.
    fn unique_hashes(&self) -> std::result::Result<hashbrown::HashSet<&String>, (usize, Error)> {
        // Sized up front and with hashbrown's default (foldhash) hasher: at a
        // million keys std's SipHash and the rehashing as the sets grew were
        // a third of a JSON store's load time.
        let mut ids = hashbrown::HashSet::with_capacity(self.keys.len());
        let rolled = self
            .keys
            .iter()
            .filter(|k| k.record.previous_key_hash.is_some())
            .count();
        let mut hashes = hashbrown::HashSet::with_capacity(self.keys.len() + rolled);
        for (i, k) in self.keys.iter().enumerate() {
            let r = &k.record;
            if !ids.insert(&r.key_id) {
                return Err((
                    i,
                    Error::Invalid(format!("key id '{}' appears twice", r.key_id)),
                ));
            }
            if !hashes.insert(&r.key_hash) {
                return Err((
                    i,
                    Error::Invalid(format!("key '{}' reuses another key's hash", r.key_id)),
                ));
            }
        }
        Ok(hashes)
    }

    /// Plans are valid and unique, every plan named exists, tenant limits valid.
    fn validate_limits(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for p in &self.plans {
            keygate_core::credential::check_name("plan", &p.name)
                .and_then(|()| check_limits("limits", &p.limits))
                .map_err(|e| Error::Invalid(format!("plan '{}': {e}", p.name)))?;
            if !names.insert(p.name.as_str()) {
                return Err(Error::Invalid(format!("plan '{}' appears twice", p.name)));
            }
        }
        fn missing<'a>(
            names: &std::collections::HashSet<&str>,
            plan: &'a Option<String>,
        ) -> Option<&'a String> {
            plan.as_ref().filter(|p| !names.contains(p.as_str()))
        }
        for k in &self.keys {
            if let Some(p) = missing(&names, &k.record.plan) {
                return Err(Error::Invalid(format!(
                    "key '{}' is on plan '{p}', which does not exist",
                    k.record.key_id
                )));
            }
        }
        let mut tenants = std::collections::HashSet::new();
        for t in &self.tenant_limits {
            keygate_core::credential::check_name("tenant", &t.tenant)
                .and_then(|()| check_limits("limits", &t.limits))
                .map_err(|e| Error::Invalid(format!("tenant '{}': {e}", t.tenant)))?;
            if let Some(p) = missing(&names, &t.plan) {
                return Err(Error::Invalid(format!(
                    "tenant '{}' is on plan '{p}', which does not exist",
                    t.tenant
                )));
            }
            if !tenants.insert(t.tenant.as_str()) {
                return Err(Error::Invalid(format!(
                    "tenant '{}' appears twice",
                    t.tenant
                )));
            }
        }
        Ok(())
    }

    pub fn plan(&self, name: &str) -> Option<&PlanDef> {
        self.plans.iter().find(|p| p.name == name)
    }

    pub fn tenant_limits_of(&self, tenant: &str) -> Option<&TenantLimits> {
        self.tenant_limits.iter().find(|t| t.tenant == tenant)
    }

    /// A key's record as pushed to Envoy: its plan, or else its tenant's,
    /// and whether its tenant has shared limits.
    pub fn wire_record(&self, k: &StoredKey) -> CredentialRecord {
        let (plan, tenant_limits) = self.wire_limits(&k.record);
        let mut r = k.record.clone();
        r.plan = plan.cloned();
        r.tenant_limits = tenant_limits;
        r
    }

    /// The plan and tenant-limit flag a record is pushed with (see
    /// [`Snapshot::wire_record`]), without copying the record.
    pub fn wire_limits<'a>(&'a self, r: &'a CredentialRecord) -> (Option<&'a String>, bool) {
        let tenant = self.tenant_limits_of(&r.tenant);
        let plan = r
            .plan
            .as_ref()
            .or_else(|| tenant.and_then(|t| t.plan.as_ref()));
        (plan, tenant.is_some_and(|t| !t.limits.is_empty()))
    }

    /// Which limits a key meets: its own, else its plan's (the key's, else
    /// its tenant's), else the plugin's default. The tenant's shared
    /// limits apply on top of any of these.
    pub fn effective_limits(&self, k: &StoredKey) -> EffectiveLimits {
        let r = &k.record;
        if !r.limits.is_empty() || r.rate_limit.is_some() {
            return EffectiveLimits::Own;
        }
        let (name, via_tenant) = match &r.plan {
            Some(p) => (Some(p.clone()), false),
            None => (
                self.tenant_limits_of(&r.tenant)
                    .and_then(|t| t.plan.clone()),
                true,
            ),
        };
        match name.and_then(|n| self.plan(&n)) {
            Some(p) => EffectiveLimits::Plan {
                name: p.name.clone(),
                limits: p.limits.clone(),
                via_tenant,
            },
            None => EffectiveLimits::Default,
        }
    }

    /// The day/month quota periods of the limits a key meets (its own, else
    /// its plan's, else its tenant's plan's), and of its tenant's.
    pub fn quota_periods(&self, k: &StoredKey) -> (Vec<QuotaPeriod>, Vec<QuotaPeriod>) {
        let r = &k.record;
        let own: &[Limit] = if !r.limits.is_empty() {
            &r.limits
        } else {
            self.wire_limits(r)
                .0
                .and_then(|p| self.plan(p))
                .map_or(&[], |p| p.limits.as_slice())
        };
        let tenant = self
            .tenant_limits_of(&r.tenant)
            .map_or(&[][..], |t| t.limits.as_slice());
        (quota_periods(own), quota_periods(tenant))
    }

    /// The quota usage counted from the request log now (empty for a
    /// store without one).
    pub fn quota_usage(&self) -> Result<QuotaUsage> {
        match &self.usage_source.0 {
            Some(read) => read(self),
            None => Ok(QuotaUsage::default()),
        }
    }

    /// Every plan and tenant limit set, as pushed (keyed for diffing).
    pub fn limit_records(&self) -> std::collections::BTreeMap<(LimitKind, String), LimitRecord> {
        let plans = self.plans.iter().map(|p| LimitRecord {
            kind: LimitKind::Plan,
            name: p.name.clone(),
            limits: p.limits.clone(),
            quota_used: vec![],
        });
        let tenants = self.tenant_limits.iter().map(|t| LimitRecord {
            kind: LimitKind::Tenant,
            name: t.tenant.clone(),
            limits: t.limits.clone(),
            quota_used: vec![],
        });
        plans
            .chain(tenants)
            .map(|r| ((r.kind, r.name.clone()), r))
            .collect()
    }
}

/// Which keys a partial read returns.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyFilter<'a> {
    All,
    Tenant(&'a str),
    Id(&'a str),
}

impl KeyFilter<'_> {
    /// The WHERE clause (with one `?` placeholder unless `All`) and its value.
    pub(crate) fn clause(&self) -> (&'static str, Option<&str>) {
        match self {
            KeyFilter::All => ("", None),
            KeyFilter::Tenant(t) => ("WHERE tenant = ?", Some(t)),
            KeyFilter::Id(k) => ("WHERE key_id = ?", Some(k)),
        }
    }
}

/// A change applied by [`Store::update`]; its error aborts the update.
pub type Change<'a> = &'a mut dyn FnMut(&mut Snapshot) -> Result<()>;

pub trait Store: Send {
    /// Where the store is, for messages (never a password).
    fn describe(&self) -> String;
    /// Creates an empty store with a new identity; refuses an existing one
    /// (an existing store without identity gets one and keeps its keys).
    fn init(&self) -> Result<Snapshot>;
    /// A consistent read of the whole store; refuses a store that does not exist.
    fn load(&self) -> Result<Snapshot>;
    /// Applies `change` atomically: under a lock, on the latest snapshot; the
    /// result is validated and stored with the version bumped, or nothing
    /// changes if `change` or validation fails. Returns the stored snapshot.
    fn update(&self, change: Change<'_>) -> Result<Snapshot>;
    /// The keys of one tenant, by key id; stores with an index on the
    /// tenant read only those (the API's list and get paths), the others
    /// filter a full read.
    fn tenant_keys(&self, tenant: &str) -> Result<Vec<StoredKey>> {
        Ok(self
            .load()?
            .keys
            .into_iter()
            .filter(|k| k.record.tenant == tenant)
            .collect())
    }
    /// One key by id, read alone where the store can.
    fn key(&self, key_id: &str) -> Result<Option<StoredKey>> {
        Ok(self.load()?.find(key_id).cloned())
    }
    /// [`Store::update`] that also writes `audit` to the audit trail of the
    /// store's own database in the same transaction: both commit or
    /// neither. Only stores that live in a management database
    /// ([`Store::database`]) can; the others refuse and change nothing.
    fn update_audited(&self, change: Change<'_>, audit: &AuditEntry<'_>) -> Result<Snapshot> {
        let _ = (change, audit);
        Err(Error::Internal(format!(
            "the store at {} keeps no audit trail",
            self.describe()
        )))
    }
    /// The management database ([`crate::db`]) this store lives in, if any.
    fn database(&self) -> Option<Db> {
        None
    }
    /// Where this store's request-log usage is counted (none: no log).
    fn usage_source(&self) -> UsageSource {
        UsageSource::default()
    }
    /// A cheap token that changes whenever the store may have changed.
    fn change_token(&self) -> Result<String>;
    /// Sends on `wake` (soon) after the store may have changed, until the
    /// returned guard is dropped. Spurious wakes are allowed; callers compare
    /// [`Store::change_token`].
    fn watch(&self, wake: Sender<()>) -> Result<Box<dyn Send>>;
}

/// `postgres://…` selects PostgreSQL, `sqlite:PATH` or a path ending in
/// `.db`, `.sqlite` or `.sqlite3` the SQLite store, anything else is a JSON
/// file path.
pub fn open(spec: &str) -> Result<Box<dyn Store>> {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        Ok(Box::new(pg::PgStore::new(spec)?))
    } else if let Some(path) = sqlite_path(spec) {
        Ok(Box::new(sqlite::SqliteStore::new(path)))
    } else {
        Ok(Box::new(file::FileStore::new(spec)))
    }
}

/// The SQLite file a store spec names, if it names one.
pub fn sqlite_path(spec: &str) -> Option<&str> {
    if let Some(p) = spec.strip_prefix("sqlite:") {
        return Some(p.strip_prefix("//").unwrap_or(p));
    }
    [".db", ".sqlite", ".sqlite3"]
        .iter()
        .any(|ext| spec.ends_with(ext))
        .then_some(spec)
}

/// One count the quota usage needs from a store's log tables.
pub(crate) enum UsageCount<'a> {
    /// Allowed requests of a key since (hourly usage).
    Key {
        tenant: &'a str,
        key_id: &'a str,
        since_ms: i64,
    },
    /// Allowed requests of all of a tenant's keys since (hourly usage).
    Tenant { tenant: &'a str, since_ms: i64 },
    /// Allowed request records of a key since (exact: for credits, whose
    /// top-up may fall inside an hour).
    Records { key_id: &'a str, since_ms: i64 },
}

fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The quota and credit usage of `snap`'s keys and tenants that have
/// quotas or credits, one count each (keys without cost nothing).
pub(crate) fn count_quota_usage(
    snap: &Snapshot,
    count: &mut dyn FnMut(UsageCount<'_>) -> Result<u64>,
) -> Result<QuotaUsage> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = QuotaUsage::default();
    let mut tenants = BTreeMap::new();
    for k in &snap.keys {
        let r = &k.record;
        let (own, tenant) = snap.quota_periods(k);
        let mut used = Vec::new();
        for period in own {
            let since = period.start(now);
            let n = count(UsageCount::Key {
                tenant: &r.tenant,
                key_id: &r.key_id,
                since_ms: secs_ms(since),
            })?;
            used.push(QuotaUsed {
                period,
                since,
                used: n,
            });
        }
        if let Some(c) = r.credits {
            // Since the top-up, or (refilled monthly) the later of the
            // top-up and the month's start.
            let since = if c.monthly {
                c.granted_at.max(QuotaPeriod::Month.start(now))
            } else {
                c.granted_at
            };
            let n = count(UsageCount::Records {
                key_id: &r.key_id,
                since_ms: secs_ms(since),
            })?;
            used.push(QuotaUsed {
                period: QuotaPeriod::Credits,
                since,
                used: n,
            });
        }
        if !used.is_empty() {
            out.keys.insert(r.key_id.clone(), used);
        }
        if !tenant.is_empty() {
            tenants.insert(r.tenant.clone(), tenant);
        }
    }
    for (tenant, periods) in tenants {
        let mut used = Vec::new();
        for period in periods {
            let since = period.start(now);
            let n = count(UsageCount::Tenant {
                tenant: &tenant,
                since_ms: secs_ms(since),
            })?;
            used.push(QuotaUsed {
                period,
                since,
                used: n,
            });
        }
        out.tenants.insert(tenant, used);
    }
    Ok(out)
}

fn quota_periods(limits: &[Limit]) -> Vec<QuotaPeriod> {
    limits
        .iter()
        .filter_map(|l| match l.period {
            Period::Day => Some(QuotaPeriod::Day),
            Period::Month => Some(QuotaPeriod::Month),
            _ => None,
        })
        .collect()
}

/// A fresh random store identity.
pub fn new_store_id() -> Result<StoreId> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(StoreId(u64::from_be_bytes(b)))
}
