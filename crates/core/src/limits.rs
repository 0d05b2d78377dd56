//! Several limits per key, plans and tenant limits.
//!
//! A limit is written `COUNT/PERIOD`: `10/s`, `100/min`, `5000/hour` are
//! rolling windows (GCRA, as [`crate::rate_limit`]: a burst of COUNT, then one
//! request every PERIOD/COUNT); `10000/day` and `200000/month` are calendar
//! quotas in UTC: COUNT requests from 00:00 UTC of the day (of the 1st of the
//! month) until the next one, however they are spread.
//!
//! Which limits a request meets:
//! - the key's own: its `rate_limit` (the single window of old) and its
//!   `limits`; if it has none, those of its plan (a plan is a named limit
//!   set in shared data, `pl:<name>`, read on each request: changing a plan
//!   is one sync change for every key on it); if none either, the plugin's
//!   default `rate_limit`;
//! - and, if its tenant has limits, the tenant's (`tl:<tenant>`), shared by
//!   every key of the tenant.
//!
//! Usage credits ([`Credits`]) count on top of whichever limits apply, and
//! day/month quotas and credits start from the usage the management plane
//! counted in its request log when Envoy holds no counter (a full push after
//! a restart: [`QuotaUsed`]).
//!
//! Exactness: a key's counters (one `u64` per limit it has used, tagged by
//! period) form one value updated by one compare-and-swap, so every limit of
//! a key admits a request or none does. The tenant's counters live in the
//! tenant entry, served by sync from the commit of the push that first has a
//! key refer to it, if not before (Envoy creates a
//! missing shared-data key whatever CAS token the write carries, see
//! [`crate::entry`]) and updated by CAS after the key's. A request the
//! tenant refuses is given back to the key ([`release_rules`]); if that
//! update loses to endless contention it stays counted: limits over-count,
//! never over-admit.

use crate::error::ConfigError;
use crate::rate_limit::{
    check as gcra, Policies, RateLimit, RateStatus, NANOS_PER_SEC, TAG_DEFAULT, TAG_TENANT,
};
use crate::shared_data::{update, CounterCell, Step};
use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};

/// Most limits in one set: one per period.
pub const MAX_LIMITS: usize = 5;
const SECS_PER_DAY: u64 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
}

impl Period {
    fn of_tag(tag: u8) -> Option<Period> {
        Some(match tag {
            1 => Period::Second,
            2 => Period::Minute,
            3 => Period::Hour,
            4 => Period::Day,
            5 => Period::Month,
            _ => return None,
        })
    }

    fn unit(self) -> &'static str {
        match self {
            Period::Second => "s",
            Period::Minute => "min",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    fn parse(unit: &str) -> Option<Period> {
        Some(match unit {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            "h" | "hour" => Period::Hour,
            "d" | "day" => Period::Day,
            "mo" | "month" => Period::Month,
            _ => return None,
        })
    }

    fn window_secs(self) -> Option<u32> {
        match self {
            Period::Second => Some(1),
            Period::Minute => Some(60),
            Period::Hour => Some(3_600),
            Period::Day | Period::Month => None,
        }
    }
}

/// One limit: `count` requests per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub count: u32,
    pub period: Period,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, self.period.unit())
    }
}

impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Limit, String> {
        let shape = || {
            format!(
                "'{s}' is not a limit; write COUNT/PERIOD with PERIOD one of s, min, hour, day, month (e.g. 100/min)"
            )
        };
        let (count, unit) = s.trim().split_once('/').ok_or_else(shape)?;
        let period = Period::parse(unit.trim()).ok_or_else(shape)?;
        let count: u32 = count.trim().parse().map_err(|_| shape())?;
        if count == 0 {
            return Err(format!("'{s}': the count must be at least 1"));
        }
        Ok(Limit { count, period })
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Limit, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Refuses a set that is too long, names a period twice, or lets a longer
/// period allow fewer requests than a shorter one (the shorter could never
/// be reached: a contradiction, most likely a typo). `field` names the list.
pub fn check_limits(field: &str, limits: &[Limit]) -> Result<(), ConfigError> {
    if limits.len() > MAX_LIMITS {
        return Err(ConfigError::new(
            field,
            format!("at most {MAX_LIMITS} limits, one per period"),
        ));
    }
    for (i, l) in limits.iter().enumerate() {
        if l.count == 0 {
            return Err(ConfigError::new(
                &format!("{field}[{i}]"),
                "the count must be at least 1",
            ));
        }
        for other in limits.iter().take(i) {
            if other.period == l.period {
                return Err(ConfigError::new(
                    &format!("{field}[{i}]"),
                    format!("{l} and {other} limit the same period; keep one"),
                ));
            }
            let (short, long) = if other.period < l.period {
                (other, l)
            } else {
                (l, other)
            };
            if long.count < short.count {
                return Err(ConfigError::new(
                    &format!("{field}[{i}]"),
                    format!("{long} allows fewer requests than {short}, which then can never be reached"),
                ));
            }
        }
    }
    Ok(())
}

/// Parses `--limit`/API strings, naming the entry at fault.
pub fn parse_limits(field: &str, items: &[String]) -> Result<Vec<Limit>, ConfigError> {
    let limits = items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<Limit>()
                .map_err(|e| ConfigError::new(&format!("{field}[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_limits(field, &limits)?;
    Ok(limits)
}

/// A limit as the decision applies it: its counter tag and its rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// [`TAG_DEFAULT`] for the single window, the period (1–5) for a key's
    /// limit, plus [`TAG_TENANT`] for a tenant's.
    pub tag: u8,
    pub kind: RuleKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// A rolling window (GCRA); the state is the theoretical arrival time.
    Window(RateLimit),
    /// A calendar quota (UTC); the state is the period's index (high 24
    /// bits) and the requests used in it (low 40 bits).
    Quota { count: u32, period: Period },
    /// Usage credits ([`Credits`]); the state is the grant (serial, and
    /// month with a monthly refill, high 32 bits) and the credits used
    /// under it (low 32 bits).
    Credits(Credits),
}

/// Tag of a key's usage credits among its counters.
pub const TAG_CREDITS: u8 = 6;

/// Usage credits: `balance` uses from the last top-up (each one gives a new
/// `serial`, so Envoy starts the count again); with `monthly`, the balance
/// comes back on the 1st of every month, 00:00 UTC.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credits {
    pub balance: u64,
    #[serde(default)]
    pub serial: u32,
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub monthly: bool,
    /// Unix seconds of the top-up: the log counts uses from then on.
    #[serde(default)]
    pub granted_at: u64,
}

impl Credits {
    pub fn rule(self) -> Rule {
        Rule {
            tag: TAG_CREDITS,
            kind: RuleKind::Credits(self),
        }
    }

    /// The grant a count belongs to now: the serial and, with a monthly
    /// refill, the month; and when the balance comes back (ns), if ever.
    fn grant(self, now_ns: u64) -> (u64, Option<u64>) {
        if self.monthly {
            let (month, _, end) = calendar(Period::Month, now_ns);
            (
                (u64::from(self.serial) << 16) | (month & 0xffff),
                Some(end.saturating_mul(NANOS_PER_SEC)),
            )
        } else {
            (u64::from(self.serial) << 16, None)
        }
    }
}

impl Rule {
    pub fn of_limit(l: &Limit, tenant: bool) -> Rule {
        let tag = l.period as u8 | if tenant { TAG_TENANT } else { 0 };
        let kind = match l.period.window_secs() {
            Some(window_secs) => RuleKind::Window(RateLimit {
                requests: l.count,
                window_secs,
            }),
            None => RuleKind::Quota {
                count: l.count,
                period: l.period,
            },
        };
        Rule { tag, kind }
    }

    pub fn of_rate_limit(l: RateLimit) -> Rule {
        Rule {
            tag: TAG_DEFAULT,
            kind: RuleKind::Window(l),
        }
    }
}

/// The rules of a set of limits.
pub fn rules(limits: &[Limit], tenant: bool) -> Vec<Rule> {
    limits.iter().map(|l| Rule::of_limit(l, tenant)).collect()
}

// ---- calendar (proleptic Gregorian, UTC; Howard Hinnant's algorithms) ----

fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32)
}

fn days_from_civil(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar period containing `now_ns`: its index (days or months since
/// 1970) and its start and end in Unix seconds.
fn calendar(period: Period, now_ns: u64) -> (u64, u64, u64) {
    let days = now_ns / NANOS_PER_SEC / SECS_PER_DAY;
    match period {
        Period::Month => {
            let (year, month) = civil_from_days(days as i64);
            let index = (year - 1970) * 12 + i64::from(month) - 1;
            let start = days_from_civil(year, month);
            let (ny, nm) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            let end = days_from_civil(ny, nm);
            (
                index.max(0) as u64,
                start.max(0) as u64 * SECS_PER_DAY,
                end.max(0) as u64 * SECS_PER_DAY,
            )
        }
        _ => (days, days * SECS_PER_DAY, (days + 1) * SECS_PER_DAY),
    }
}

const USED_BITS: u32 = 40;
const USED_MASK: u64 = (1 << USED_BITS) - 1;

/// One rule's step: the status and the state to store if admitted.
fn step(rule: &Rule, state: Option<u64>, now_ns: u64) -> (RateStatus, u64) {
    match rule.kind {
        RuleKind::Credits(c) => {
            let (grant, refill_ns) = c.grant(now_ns);
            let used = state
                .filter(|s| s >> 32 == grant)
                .map_or(0, |s| s & 0xffff_ffff);
            let allowed = used < c.balance;
            let used_after = used + u64::from(allowed);
            let status = RateStatus {
                allowed,
                limit: RateLimit {
                    requests: u32::try_from(c.balance).unwrap_or(u32::MAX),
                    // The time to the refill, or none: credits are no window.
                    window_secs: refill_ns.map_or(0, |r| {
                        u32::try_from(r.saturating_sub(now_ns) / NANOS_PER_SEC).unwrap_or(u32::MAX)
                    }),
                },
                remaining: u32::try_from(c.balance.saturating_sub(used_after)).unwrap_or(u32::MAX),
                reset_at_ns: refill_ns.unwrap_or(0),
                retry_after_ns: match (allowed, refill_ns) {
                    (true, _) => 0,
                    (false, Some(r)) => r.saturating_sub(now_ns),
                    // No refill: only a top-up helps; "a day" keeps clients polite.
                    (false, None) => SECS_PER_DAY * NANOS_PER_SEC,
                },
                tag: rule.tag,
                policies: Policies::default(),
            };
            (status, (grant << 32) | (used_after & 0xffff_ffff))
        }
        RuleKind::Window(limit) => {
            let (mut status, new) = gcra(limit, state, now_ns);
            status.tag = rule.tag;
            status.policies = Policies::default();
            (status, new.unwrap_or(state.unwrap_or(0)))
        }
        RuleKind::Quota { count, period } => {
            let (index, start, end) = calendar(period, now_ns);
            let used = state
                .filter(|s| s >> USED_BITS == index)
                .map_or(0, |s| s & USED_MASK);
            let limit = RateLimit {
                requests: count,
                window_secs: u32::try_from(end - start).unwrap_or(u32::MAX),
            };
            let end_ns = end.saturating_mul(NANOS_PER_SEC);
            let allowed = used < u64::from(count);
            let used_after = used + u64::from(allowed);
            let status = RateStatus {
                allowed,
                limit,
                remaining: u32::try_from(u64::from(count).saturating_sub(used_after)).unwrap_or(0),
                reset_at_ns: end_ns,
                retry_after_ns: if allowed {
                    0
                } else {
                    end_ns.saturating_sub(now_ns)
                },
                tag: rule.tag,
                policies: Policies::default(),
            };
            (status, (index << USED_BITS) | (used_after & USED_MASK))
        }
    }
}

/// A set of counters: (tag, state) pairs, one per limit used so far.
///
/// Bytes: 9 per counter (tag, u64 LE); exactly 8 bytes is the state of
/// the single window of old (tag 0), as config credentials' `r:` entries
/// and entries written before several limits existed hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub CounterList);

/// A key has a few counters (its windows, quotas, credits): held inline, so
/// reading and updating them allocates nothing per request.
pub type CounterList = SmallVec<[(u8, u64); 4]>;

impl Counters {
    pub fn decode(bytes: Option<&[u8]>) -> Counters {
        let Some(bytes) = bytes else {
            return Counters::default();
        };
        if let Ok(tat) = <[u8; 8]>::try_from(bytes) {
            let tat = u64::from_le_bytes(tat);
            return Counters(if tat == 0 {
                smallvec![]
            } else {
                smallvec![(0, tat)]
            });
        }
        if bytes.len() % 9 != 0 {
            return Counters::default();
        }
        Counters(
            bytes
                .chunks_exact(9)
                .filter_map(|c| {
                    let (tag, v) = c.split_first()?;
                    Some((*tag, u64::from_le_bytes(v.try_into().ok()?)))
                })
                .collect(),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        match self.0.as_slice() {
            [] => vec![],
            [(0, tat)] => tat.to_le_bytes().to_vec(),
            many => many
                .iter()
                .flat_map(|(tag, v)| std::iter::once(*tag).chain(v.to_le_bytes()))
                .collect(),
        }
    }

    pub fn get(&self, tag: u8) -> Option<u64> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }

    fn set(&mut self, tag: u8, value: u64) {
        match self.0.iter_mut().find(|(t, _)| *t == tag) {
            Some(slot) => slot.1 = value,
            None => self.0.push((tag, value)),
        }
    }
}

/// Checks every rule against `counters`: admitted only if all admit. The
/// status reports the tightest limit (fewest remaining) when admitted, the
/// one to wait longest for when refused, and lists every rule's policy.
pub fn check_all(
    rules: &[Rule],
    counters: &Counters,
    now_ns: u64,
) -> (RateStatus, Option<Counters>) {
    let mut next = counters.clone();
    let mut policies = Policies::default();
    let mut report: Option<RateStatus> = None;
    let mut refused: Option<RateStatus> = None;
    for rule in rules {
        let (status, state) = step(rule, counters.get(rule.tag), now_ns);
        policies.push(rule.tag, status.limit);
        if status.allowed {
            next.set(rule.tag, state);
            // Credits are reported only when nothing else limits the key:
            // they are no window, and have no reset time of their own.
            let eligible = rule.tag != TAG_CREDITS || report.is_none();
            if eligible && report.is_none_or(|r| status.remaining < r.remaining) {
                report = Some(status);
            }
        } else if refused.is_none_or(|r| status.retry_after_ns > r.retry_after_ns) {
            refused = Some(status);
        }
    }
    let admitted = refused.is_none();
    let status = refused.or(report).map(|s| RateStatus { policies, ..s });
    match status {
        Some(s) => (s, admitted.then_some(next)),
        // No rules: nothing limits, nothing changes.
        None => (unlimited(now_ns), None),
    }
}

fn unlimited(now_ns: u64) -> RateStatus {
    RateStatus {
        allowed: true,
        limit: RateLimit {
            requests: u32::MAX,
            window_secs: 1,
        },
        remaining: u32::MAX,
        reset_at_ns: now_ns,
        retry_after_ns: 0,
        tag: TAG_DEFAULT,
        policies: Policies::default(),
    }
}

/// Refused after endless contention: never over-admit.
fn contended(last: Option<RateStatus>, now_ns: u64) -> RateStatus {
    RateStatus {
        allowed: false,
        remaining: 0,
        retry_after_ns: NANOS_PER_SEC,
        ..last.unwrap_or(RateStatus {
            allowed: false,
            ..unlimited(now_ns)
        })
    }
}

/// Takes one request from every rule's budget in the counter set stored
/// under `key`, with CAS retry (as [`crate::rate_limit::acquire`]).
pub fn acquire_rules(
    cell: &mut dyn CounterCell,
    key: &str,
    rules: &[Rule],
    now_ns: u64,
) -> RateStatus {
    let attempt = update(cell, key, |bytes| {
        match check_all(rules, &Counters::decode(bytes), now_ns) {
            (status, Some(next)) => Step::Write(next.encode(), status),
            (status, None) => Step::Done(status),
        }
    });
    attempt.unwrap_or_else(|last| contended(last, now_ns))
}

/// Gives back the request [`acquire_rules`] took from every rule (the
/// tenant refused it after the key admitted it), with CAS retry. A window
/// regains one interval, a quota one request of the same period; other
/// requests in between do not matter (both are sums). If contention outlasts
/// the retries the request stays counted: over-count, never over-admit.
pub fn release_rules(cell: &mut dyn CounterCell, key: &str, rules: &[Rule], now_ns: u64) {
    let _ = update(cell, key, |bytes| {
        let mut counters = Counters::decode(bytes);
        for rule in rules {
            let Some(state) = counters.get(rule.tag) else {
                continue;
            };
            let given_back = match rule.kind {
                RuleKind::Credits(_) => state.saturating_sub(u64::from(state & 0xffff_ffff > 0)),
                RuleKind::Window(limit) => state.saturating_sub(limit.interval_ns()).max(1),
                RuleKind::Quota { period, .. } => {
                    let (index, _, _) = calendar(period, now_ns);
                    if state >> USED_BITS == index && state & USED_MASK > 0 {
                        state - 1
                    } else {
                        state
                    }
                }
            };
            counters.set(rule.tag, given_back);
        }
        Step::Write(counters.encode(), ())
    });
}

// ---- quota usage reconciled from the request-log store ----

/// Requests a key (or tenant) used in a calendar quota period, as the
/// management plane counted them from the request log: pushed with a full
/// set (after an Envoy restart) so that a day or month quota does not start
/// again from zero. Counters Envoy already holds win over it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaUsed {
    /// `day` or `month`.
    pub period: QuotaPeriod,
    /// Unix seconds of the period's start (00:00 UTC of the day, of the 1st).
    pub since: u64,
    pub used: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
    /// The key's usage credits: uses since `since` (the top-up, or the
    /// month's start with a monthly refill).
    Credits,
}

impl QuotaPeriod {
    fn period(self) -> Period {
        match self {
            QuotaPeriod::Day => Period::Day,
            QuotaPeriod::Month | QuotaPeriod::Credits => Period::Month,
        }
    }

    /// The start of the period containing `now_secs` (what `since` is).
    pub fn start(self, now_secs: u64) -> u64 {
        calendar(self.period(), now_secs.saturating_mul(NANOS_PER_SEC)).1
    }

    /// The start of the next period (when a quota or a monthly refill
    /// comes back).
    pub fn end(self, now_secs: u64) -> u64 {
        calendar(self.period(), now_secs.saturating_mul(NANOS_PER_SEC)).2
    }
}

/// The counters a set of usages seeds (tag, state), for a key (`tenant`
/// false) or a tenant. A usage of a period other than `since`'s current one
/// simply reads as stale later, as any old counter does.
pub fn seed_counters(used: &[QuotaUsed], tenant: bool) -> Counters {
    seed_counters_with(used, tenant, None)
}

/// [`seed_counters`] for a key with `credits`, whose used credits seed too.
pub fn seed_counters_with(used: &[QuotaUsed], tenant: bool, credits: Option<Credits>) -> Counters {
    Counters(
        used.iter()
            .filter(|u| u.used > 0)
            .filter_map(|u| {
                if u.period == QuotaPeriod::Credits {
                    let c = credits?;
                    let (grant, _) = c.grant(u.since.saturating_mul(NANOS_PER_SEC));
                    return Some((TAG_CREDITS, (grant << 32) | u.used.min(0xffff_ffff)));
                }
                let period = u.period.period();
                let (index, _, _) = calendar(period, u.since.saturating_mul(NANOS_PER_SEC));
                let tag = period as u8 | if tenant { TAG_TENANT } else { 0 };
                Some((tag, (index << USED_BITS) | u.used.min(USED_MASK)))
            })
            .collect(),
    )
}

// ---- shared entries: plans and tenants ----

/// Shared-data key of a plan's limits (written by sync).
pub fn plan_key(plan: &str) -> String {
    format!("pl:{plan}")
}

/// Shared-data key of a tenant's limits and counters (written by sync,
/// counted by the gate).
pub fn tenant_key(tenant: &str) -> String {
    format!("tl:{tenant}")
}

fn encode_limits(out: &mut Vec<u8>, limits: &[Limit]) {
    out.push(limits.len().min(MAX_LIMITS) as u8);
    for l in limits.iter().take(MAX_LIMITS) {
        out.push(l.period as u8);
        out.extend_from_slice(&l.count.to_le_bytes());
    }
}

fn decode_limits(bytes: &[u8]) -> Option<(Vec<Limit>, &[u8])> {
    let (&n, mut rest) = bytes.split_first()?;
    let mut limits = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let (&p, r) = rest.split_first()?;
        let count = u32::from_le_bytes(r.get(..4)?.try_into().ok()?);
        rest = r.get(4..)?;
        limits.push(Limit {
            count,
            period: Period::of_tag(p)?,
        });
    }
    check_limits("", &limits).ok()?;
    Some((limits, rest))
}

/// A plan entry: its limits (a count byte, then period byte and u32 LE each).
pub fn encode_plan(limits: &[Limit]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 5 * limits.len());
    encode_limits(&mut out, limits);
    out
}

/// A plan entry's limits; None for a missing or corrupt one.
pub fn decode_plan(bytes: Option<&[u8]>) -> Option<Vec<Limit>> {
    match decode_limits(bytes?)? {
        (limits, []) => Some(limits),
        _ => None,
    }
}

/// A tenant entry: its limits as a plan's, then its counters ([`Counters`]).
pub fn encode_tenant(limits: &[Limit], counters: &Counters) -> Vec<u8> {
    let mut out = encode_plan(limits);
    if !counters.0.is_empty() {
        // Always the 9-byte form here: the limits come first.
        out.extend(
            counters
                .0
                .iter()
                .flat_map(|(tag, v)| std::iter::once(*tag).chain(v.to_le_bytes())),
        );
    }
    out
}

/// A tenant entry's limits and counters; None for a missing or corrupt one.
pub fn decode_tenant(bytes: Option<&[u8]>) -> Option<(Vec<Limit>, Counters)> {
    let (limits, rest) = decode_limits(bytes?)?;
    if rest.len() % 9 != 0 {
        return None;
    }
    let counters = if rest.is_empty() {
        Counters::default()
    } else {
        Counters::decode(Some(rest))
    };
    Some((limits, counters))
}

/// The tenant entry after sync sets new limits: counters of periods it
/// still limits go on; a missing or corrupt entry starts fresh.
pub fn retarget_tenant(current: Option<&[u8]>, limits: &[Limit]) -> Vec<u8> {
    retarget_tenant_seeded(current, limits, &Counters::default())
}

/// [`retarget_tenant`], starting from `seed` when Envoy holds no entry yet
/// (after a restart): usage counted from the request log.
pub fn retarget_tenant_seeded(
    current: Option<&[u8]>,
    limits: &[Limit],
    seed: &Counters,
) -> Vec<u8> {
    let held = decode_tenant(current).map_or_else(|| seed.clone(), |(_, c)| c);
    let kept = Counters(
        held.0
            .into_iter()
            .filter(|(tag, _)| limits.iter().any(|l| l.period as u8 | TAG_TENANT == *tag))
            .collect(),
    );
    encode_tenant(limits, &kept)
}

/// Why a tenant's limits could not be applied: the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantEntryMissing;

/// Takes one request from the tenant's shared budget (`tl:<tenant>`). A
/// tenant without limits admits (None); a missing entry is an error (sync
/// serves it no later than any key that says its tenant is limited).
pub fn acquire_tenant(
    cell: &mut dyn CounterCell,
    tenant: &str,
    now_ns: u64,
) -> Result<Option<RateStatus>, TenantEntryMissing> {
    let key = tenant_key(tenant);
    let attempt = update(cell, &key, |bytes| {
        let Some((limits, counters)) = decode_tenant(bytes) else {
            return Step::Done(Err(TenantEntryMissing));
        };
        if limits.is_empty() {
            return Step::Done(Ok(None));
        }
        match check_all(&rules(&limits, true), &counters, now_ns) {
            (status, Some(next)) => Step::Write(encode_tenant(&limits, &next), Ok(Some(status))),
            (status, None) => Step::Done(Ok(Some(status))),
        }
    });
    match attempt {
        Ok(r) => r,
        Err(last) => Ok(Some(contended(last.and_then(|r| r.ok().flatten()), now_ns))),
    }
}

/// The tenant's limits as `RateLimit-Policy` lists them, read without
/// counting (the key refused the request first); none if it has none or its
/// entry cannot be read (the refusal stands either way).
pub fn tenant_policies(cell: &mut dyn CounterCell, tenant: &str, now_ns: u64) -> Policies {
    let mut out = Policies::default();
    if let Some((limits, _)) = decode_tenant(cell.load(&tenant_key(tenant)).0.as_deref()) {
        for rule in rules(&limits, true) {
            out.push(rule.tag, step(&rule, None, now_ns).0.limit);
        }
    }
    out
}

/// The status a response reports for a key's and its tenant's checks: a
/// refusal if either refused, else the one with fewer requests remaining;
/// the policies of both.
pub fn combine(key: Option<RateStatus>, tenant: Option<RateStatus>) -> Option<RateStatus> {
    match (key, tenant) {
        (Some(k), Some(t)) => {
            let mut policies = k.policies;
            policies.extend(&t.policies);
            let pick = match (k.allowed, t.allowed) {
                (false, _) => k,
                (true, false) => t,
                (true, true) if t.remaining < k.remaining => t,
                _ => k,
            };
            Some(RateStatus { policies, ..pick })
        }
        (k, t) => k.or(t),
    }
}

/// The message of a 429 for the limit `status` reports.
pub fn refusal_message(status: &RateStatus) -> String {
    let wait = match status.retry_after_secs() {
        1 => "1 second".to_owned(),
        n => format!("{n} seconds"),
    };
    if status.tag == TAG_CREDITS {
        return if status.reset_at_ns > 0 {
            format!("This API key has used all of its {} credits. They are refilled on the 1st at 00:00 UTC, in {wait}.", status.limit.requests)
        } else {
            "This API key has no usage credits left. Ask for a top-up.".to_owned()
        };
    }
    let whose = if status.tag & TAG_TENANT != 0 {
        "Tenant "
    } else {
        ""
    };
    match Period::of_tag(status.tag & !TAG_TENANT) {
        Some(Period::Day) => format!(
            "{whose}daily quota of {} requests exhausted. It resets at 00:00 UTC, in {wait}.",
            status.limit.requests
        ),
        Some(Period::Month) => format!(
            "{whose}monthly quota of {} requests exhausted. It resets on the 1st at 00:00 UTC, in {wait}.",
            status.limit.requests
        ),
        _ if whose.is_empty() => format!("Rate limit exceeded. Try again in {wait}."),
        _ => format!("Tenant rate limit exceeded. Try again in {wait}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryHost;

    const S: u64 = NANOS_PER_SEC;
    /// 2023-11-14T22:13:20Z.
    const T0: u64 = 1_700_000_000 * S;

    fn l(s: &str) -> Limit {
        s.parse().unwrap()
    }

    #[test]
    fn limits_parse_in_short_and_long_units_and_print_canonically() {
        assert_eq!(l("100/min").to_string(), "100/min");
        assert_eq!(l(" 10 / second ").to_string(), "10/s");
        assert_eq!(l("5/h").period, Period::Hour);
        assert_eq!(l("7/d").to_string(), "7/day");
        assert_eq!(l("9/mo").to_string(), "9/month");
        for bad in ["100", "x/min", "100/week", "0/min", "-1/s", "100/", "/min"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&vec![l("100/min")]).unwrap();
        assert_eq!(json, r#"["100/min"]"#);
        assert!(serde_json::from_str::<Vec<Limit>>(r#"["1/fortnight"]"#).is_err());
    }

    #[test]
    fn duplicate_or_contradictory_limits_are_refused_naming_the_entry() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse_limits(
            "limits",
            &strings(&["100/min", "10000/day", "200000/month"])
        )
        .is_ok());
        let e = parse_limits("limits", &strings(&["100/min", "200/min"])).unwrap_err();
        assert_eq!(e.field, "limits[1]");
        assert!(e.message.contains("same period"), "{e}");
        let e = parse_limits("limits", &strings(&["1000/min", "100/hour"])).unwrap_err();
        assert_eq!(e.field, "limits[1]");
        assert!(e.message.contains("fewer requests"), "{e}");
        let e = parse_limits("limits", &strings(&["10/s", "oops"])).unwrap_err();
        assert_eq!(e.field, "limits[1]");
        let six = strings(&["1/s", "2/min", "3/hour", "4/day", "5/month", "6/month"]);
        assert_eq!(parse_limits("limits", &six).unwrap_err().field, "limits");
    }

    #[test]
    fn every_limit_must_admit_and_the_tightest_is_reported() {
        let mut cell = MemoryHost::default();
        let rules = rules(&[l("3/s"), l("5/min"), l("100/day")], false);
        let statuses: Vec<_> = (0..3)
            .map(|_| acquire_rules(&mut cell, "r:k", &rules, T0))
            .collect();
        assert!(statuses.iter().all(|s| s.allowed));
        assert_eq!(statuses[2].remaining, 0);
        assert_eq!(statuses[2].tag, 1, "the per-second window is tightest");
        assert_eq!(statuses[2].policies.len(), 3);
        // Two seconds later the second window has room; the minute has 2 left.
        let s = acquire_rules(&mut cell, "r:k", &rules, T0 + 2 * S);
        assert!(s.allowed);
        assert_eq!((s.tag, s.remaining), (2, 1));
        let s = acquire_rules(&mut cell, "r:k", &rules, T0 + 3 * S);
        assert_eq!((s.tag, s.remaining), (2, 0));
        let refused = acquire_rules(&mut cell, "r:k", &rules, T0 + 4 * S);
        assert!(!refused.allowed);
        assert_eq!(refused.tag, 2);
        // The refused request used nothing: the day quota counts 5.
        let c = Counters::decode(cell.load("r:k").0.as_deref());
        assert_eq!(c.get(4).map(|v| v & USED_MASK), Some(5));
    }

    #[test]
    fn a_day_quota_resets_at_utc_midnight_and_a_month_quota_on_the_first() {
        let day = rules(&[l("2/day")], false);
        let mut cell = MemoryHost::default();
        assert!(acquire_rules(&mut cell, "r:k", &day, T0).allowed);
        assert!(acquire_rules(&mut cell, "r:k", &day, T0).allowed);
        let refused = acquire_rules(&mut cell, "r:k", &day, T0);
        assert!(!refused.allowed);
        // 22:13:20 → midnight is 1 h 46 min 40 s away.
        assert_eq!(refused.retry_after_secs(), 6_400);
        assert!(refusal_message(&refused).contains("daily quota of 2"));
        assert!(acquire_rules(&mut cell, "r:k", &day, T0 + 6_400 * S).allowed);

        let month = rules(&[l("1/month")], false);
        let mut cell = MemoryHost::default();
        assert!(acquire_rules(&mut cell, "r:k", &month, T0).allowed);
        let refused = acquire_rules(&mut cell, "r:k", &month, T0 + 86_400 * S);
        assert!(!refused.allowed);
        // November 2023 has 30 days; 1 December 2023 is 1_701_388_800.
        assert_eq!(refused.limit.window_secs, 30 * 86_400);
        assert_eq!(refused.reset_epoch_secs(), 1_701_388_800);
        assert!(acquire_rules(&mut cell, "r:k", &month, 1_701_388_800 * S).allowed);
    }

    #[test]
    fn calendar_matches_known_dates() {
        // 2024-02-29 (leap day) and 2000-03-01.
        assert_eq!(civil_from_days(19_782), (2024, 2));
        assert_eq!(days_from_civil(2024, 3), 19_783);
        assert_eq!(days_from_civil(2000, 3), 11_017);
        let (_, start, end) = calendar(Period::Month, 1_709_164_800 * S);
        assert_eq!((start, end), (1_706_745_600, 1_709_251_200));
    }

    #[test]
    fn counters_of_one_legacy_window_keep_the_old_eight_bytes() {
        let c = Counters(smallvec![(0, 42)]);
        assert_eq!(c.encode(), 42u64.to_le_bytes().to_vec());
        assert_eq!(Counters::decode(Some(&c.encode())), c);
        let many = Counters(smallvec![(0, 1), (2, 3)]);
        assert_eq!(many.encode().len(), 18);
        assert_eq!(Counters::decode(Some(&many.encode())), many);
        assert_eq!(Counters::decode(Some(b"xyz")), Counters::default());
        assert_eq!(Counters::decode(Some(&[])), Counters::default());
    }

    #[test]
    fn a_tenant_budget_is_shared_and_a_missing_entry_refuses() {
        let mut cell = MemoryHost::default();
        assert_eq!(
            acquire_tenant(&mut cell, "acme", T0),
            Err(TenantEntryMissing)
        );
        cell.store(
            &tenant_key("acme"),
            &retarget_tenant(None, &[l("2/min")]),
            None,
        );
        let a = acquire_tenant(&mut cell, "acme", T0).unwrap().unwrap();
        assert!(a.allowed);
        assert_eq!((a.tag, a.remaining), (0x12, 1));
        assert!(
            acquire_tenant(&mut cell, "acme", T0)
                .unwrap()
                .unwrap()
                .allowed
        );
        assert!(
            !acquire_tenant(&mut cell, "acme", T0)
                .unwrap()
                .unwrap()
                .allowed
        );
        // New limits keep the counter of a period still limited: the minute
        // used up stays used up (GCRA state is the time the budget is back).
        let bytes = cell.load(&tenant_key("acme")).0;
        let next = retarget_tenant(bytes.as_deref(), &[l("3/min"), l("10/day")]);
        cell.store(&tenant_key("acme"), &next, None);
        let s = acquire_tenant(&mut cell, "acme", T0).unwrap().unwrap();
        assert!(!s.allowed);
        assert_eq!((s.tag, s.policies.len()), (0x12, 2));
        let s = acquire_tenant(&mut cell, "acme", T0 + 60 * S)
            .unwrap()
            .unwrap();
        assert!(s.allowed);
        // No limits: admits without a status.
        cell.store(&tenant_key("acme"), &retarget_tenant(None, &[]), None);
        assert_eq!(acquire_tenant(&mut cell, "acme", T0), Ok(None));
    }

    #[test]
    fn combine_reports_a_refusal_or_the_fewest_remaining_with_every_policy() {
        let (k, _) = check_all(&rules(&[l("10/min")], false), &Counters::default(), T0);
        let (t, _) = check_all(&rules(&[l("5/min")], true), &Counters::default(), T0);
        let c = combine(Some(k), Some(t)).unwrap();
        assert_eq!((c.tag, c.remaining, c.policies.len()), (0x12, 4, 2));
        let refused = RateStatus {
            allowed: false,
            ..t
        };
        assert!(!combine(Some(k), Some(refused)).unwrap().allowed);
        assert_eq!(combine(Some(k), None), Some(k));
    }

    #[test]
    fn a_seeded_quota_counts_what_the_log_store_saw_in_the_current_period_only() {
        let day = QuotaPeriod::Day.start(T0 / S);
        let seed = seed_counters(
            &[QuotaUsed {
                period: QuotaPeriod::Day,
                since: day,
                used: 4,
            }],
            false,
        );
        let rules = rules(&[l("5/day")], false);
        let (s, next) = check_all(&rules, &seed, T0);
        assert!(s.allowed);
        assert_eq!(s.remaining, 0);
        assert!(!check_all(&rules, &next.unwrap(), T0).0.allowed);
        // Yesterday's usage does not count today.
        let old = seed_counters(
            &[QuotaUsed {
                period: QuotaPeriod::Day,
                since: day - 86_400,
                used: 5,
            }],
            false,
        );
        assert_eq!(check_all(&rules, &old, T0).0.remaining, 4);
        assert_eq!(QuotaPeriod::Month.start(1_700_000_000), 1_698_796_800);
    }

    #[test]
    fn a_tenant_entry_starts_from_its_seed_only_when_envoy_holds_none() {
        let day = QuotaPeriod::Day.start(T0 / S);
        let seed = seed_counters(
            &[QuotaUsed {
                period: QuotaPeriod::Day,
                since: day,
                used: 9,
            }],
            true,
        );
        let limits = [l("10/day")];
        let mut cell = MemoryHost::default();
        cell.store(
            &tenant_key("t"),
            &retarget_tenant_seeded(None, &limits, &seed),
            None,
        );
        let s = acquire_tenant(&mut cell, "t", T0).unwrap().unwrap();
        assert_eq!((s.allowed, s.remaining), (true, 0));
        let held = cell.load(&tenant_key("t")).0;
        let again = retarget_tenant_seeded(held.as_deref(), &limits, &Counters::default());
        cell.store(&tenant_key("t"), &again, None);
        assert!(
            !acquire_tenant(&mut cell, "t", T0).unwrap().unwrap().allowed,
            "held counters win"
        );
    }

    #[test]
    fn a_released_request_gives_every_budget_back() {
        let mut cell = MemoryHost::default();
        let rules = rules(&[l("2/min"), l("2/day")], false);
        assert!(acquire_rules(&mut cell, "r:k", &rules, T0).allowed);
        assert!(acquire_rules(&mut cell, "r:k", &rules, T0).allowed);
        assert!(!acquire_rules(&mut cell, "r:k", &rules, T0).allowed);
        release_rules(&mut cell, "r:k", &rules, T0);
        let s = acquire_rules(&mut cell, "r:k", &rules, T0);
        assert!(s.allowed, "the released request is available again");
        assert!(!acquire_rules(&mut cell, "r:k", &rules, T0).allowed);
    }

    #[test]
    fn credits_run_out_a_top_up_starts_again_and_a_monthly_refill_comes_back() {
        let mut cell = MemoryHost::default();
        let c = Credits {
            balance: 2,
            serial: 1,
            monthly: false,
            granted_at: 0,
        };
        let rules = vec![Rule::of_limit(&l("100/min"), false), c.rule()];
        let s = acquire_rules(&mut cell, "r:k", &rules, T0);
        assert_eq!(
            (s.allowed, s.tag),
            (true, 2),
            "the window is reported, not the credits"
        );
        assert!(acquire_rules(&mut cell, "r:k", &rules, T0).allowed);
        let refused = acquire_rules(&mut cell, "r:k", &rules, T0);
        assert_eq!((refused.allowed, refused.tag), (false, TAG_CREDITS));
        assert!(refusal_message(&refused).contains("no usage credits left"));
        // A top-up is a new grant: counted from zero.
        let topped = vec![Credits {
            balance: 1,
            serial: 2,
            ..c
        }
        .rule()];
        assert!(acquire_rules(&mut cell, "r:k", &topped, T0).allowed);
        assert!(!acquire_rules(&mut cell, "r:k", &topped, T0).allowed);
        // Monthly: used up in November, back on 1 December 00:00 UTC.
        let monthly = vec![Credits {
            balance: 1,
            serial: 3,
            monthly: true,
            granted_at: 0,
        }
        .rule()];
        assert!(acquire_rules(&mut cell, "r:k", &monthly, T0).allowed);
        let refused = acquire_rules(&mut cell, "r:k", &monthly, T0);
        assert_eq!(refused.reset_epoch_secs(), 1_701_388_800);
        assert!(refusal_message(&refused).contains("refilled on the 1st"));
        assert!(acquire_rules(&mut cell, "r:k", &monthly, 1_701_388_800 * S).allowed);
    }

    #[test]
    fn plan_entries_round_trip_and_corrupt_ones_read_as_missing() {
        let limits = vec![l("100/min"), l("10000/day")];
        assert_eq!(decode_plan(Some(&encode_plan(&limits))), Some(limits));
        assert_eq!(decode_plan(None), None);
        assert_eq!(decode_plan(Some(&[1, 9, 0, 0, 0, 1])), None);
        assert_eq!(decode_plan(Some(&[2, 2, 5, 0, 0, 0])), None);
    }
}
