//! Per-key rate limiting with GCRA (generic cell rate algorithm).
//!
//! Why GCRA: one 8-byte timestamp per key (the theoretical arrival time,
//! TAT), no window boundary at which a client can spend two windows' worth in
//! a moment (as a fixed window allows), and exact, truthful headers: a key
//! with limit L per window W may burst L requests, then regains one request
//! every W/L. `Remaining` is what it may send right now, `Reset` is when the
//! full budget is back, `Retry-After` is when the next request will pass.
//!
//! The state lives in Envoy shared data so that every worker thread counts
//! against the same budget; updates go through [`acquire`], a compare-and-swap
//! loop over the [`CounterCell`] the host provides.

use crate::error::ConfigError;
use crate::shared_data::{update, CounterCell, Step};
use serde::{Deserialize, Serialize};

pub(crate) const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Longest window a limit may use.
pub const MAX_WINDOW_SECS: u32 = 86_400;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub window_secs: u32,
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.requests == 0 {
            return Err(ConfigError::new("requests", "must be at least 1"));
        }
        if self.window_secs == 0 || self.window_secs > MAX_WINDOW_SECS {
            return Err(ConfigError::new(
                "window_secs",
                format!("must be 1 to {MAX_WINDOW_SECS}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn window_ns(&self) -> u64 {
        u64::from(self.window_secs) * NANOS_PER_SEC
    }

    pub(crate) fn interval_ns(&self) -> u64 {
        (self.window_ns() / u64::from(self.requests.max(1))).max(1)
    }
}

/// The outcome of one rate-limit check, with what the headers report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStatus {
    pub allowed: bool,
    pub limit: RateLimit,
    pub remaining: u32,
    /// Unix nanoseconds at which the full budget is available again.
    pub reset_at_ns: u64,
    /// Nanoseconds until the next request would be admitted (0 when allowed).
    pub retry_after_ns: u64,
    /// Which limit this status reports ([`policy_name`]): the tightest of
    /// the request's limits (`crate::limits`).
    pub tag: u8,
    /// Every limit the request was checked against, for `RateLimit-Policy`.
    pub policies: Policies,
}

/// Most limits one request is checked against: a key's own or plan limits
/// (the legacy window and five periods) and its tenant's five periods.
pub const MAX_POLICIES: usize = 12;

/// The limits a request was checked against: (tag, quota, window seconds)
/// each. Fixed size, so a [`RateStatus`] stays `Copy` and allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Policies {
    items: [(u8, u32, u32); MAX_POLICIES],
    len: u8,
}

impl Policies {
    pub fn one(tag: u8, limit: RateLimit) -> Policies {
        let mut p = Policies::default();
        p.push(tag, limit);
        p
    }

    /// Adds a limit; one past [`MAX_POLICIES`] is left out of the header.
    pub fn push(&mut self, tag: u8, limit: RateLimit) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = (tag, limit.requests, limit.window_secs);
            self.len += 1;
        }
    }

    pub fn extend(&mut self, other: &Policies) {
        for (tag, limit) in other.iter() {
            self.push(tag, limit);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, RateLimit)> + '_ {
        self.items
            .iter()
            .take(usize::from(self.len))
            .map(|&(tag, requests, window_secs)| {
                (
                    tag,
                    RateLimit {
                        requests,
                        window_secs,
                    },
                )
            })
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Tag of the single window limit (`rate_limit`, or the plugin's default).
pub const TAG_DEFAULT: u8 = 0;
/// Added to a period's tag for the tenant's limit of that period.
pub const TAG_TENANT: u8 = 0x10;

/// The name a limit has in the IETF `RateLimit-Policy` and `RateLimit` headers.
pub fn policy_name(tag: u8) -> &'static str {
    match tag {
        1 => "second",
        2 => "minute",
        3 => "hour",
        4 => "day",
        5 => "month",
        0x11 => "tenant-second",
        0x12 => "tenant-minute",
        0x13 => "tenant-hour",
        0x14 => "tenant-day",
        0x15 => "tenant-month",
        6 => "credits",
        _ => "default",
    }
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(NANOS_PER_SEC)
}

impl RateStatus {
    /// Whole seconds to wait before retrying; at least 1 when refused.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after_ns).max(u64::from(!self.allowed))
    }

    pub fn reset_epoch_secs(&self) -> u64 {
        ceil_secs(self.reset_at_ns)
    }

    pub fn reset_in_secs(&self, now_ns: u64) -> u64 {
        ceil_secs(self.reset_at_ns.saturating_sub(now_ns))
    }
}

/// How far behind another worker's update a retried admission's clock may
/// be without lowering the remaining count it reports.
const CLOCK_SKEW_TOLERANCE_NS: u64 = 50_000_000;

/// Pure GCRA step: given the stored TAT (if any) and now, the status and the
/// TAT to store (None when refused: nothing changes).
pub fn check(limit: RateLimit, stored_tat: Option<u64>, now_ns: u64) -> (RateStatus, Option<u64>) {
    let window = limit.window_ns();
    let interval = limit.interval_ns();
    let tat = stored_tat.unwrap_or(0).max(now_ns);
    let new_tat = tat.saturating_add(interval);
    let used = new_tat - now_ns;
    if used > window {
        let status = RateStatus {
            allowed: false,
            limit,
            remaining: 0,
            reset_at_ns: tat,
            retry_after_ns: used - window,
            tag: TAG_DEFAULT,
            policies: Policies::one(TAG_DEFAULT, limit),
        };
        return (status, None);
    }
    // A worker that read the clock before losing a CAS race to another one
    // retries with a `now` slightly older than the state it builds on; the
    // tolerance keeps that from costing a whole request in the count it
    // reports, so concurrent admissions report distinct counts.
    let skew = (interval / 2).min(CLOCK_SKEW_TOLERANCE_NS);
    let remaining = ((window - used + skew) / interval).min(u64::from(limit.requests)) as u32;
    let status = RateStatus {
        allowed: true,
        limit,
        remaining,
        reset_at_ns: new_tat,
        retry_after_ns: 0,
        tag: TAG_DEFAULT,
        policies: Policies::one(TAG_DEFAULT, limit),
    };
    (status, Some(new_tat))
}

pub fn encode_tat(tat: u64) -> [u8; 8] {
    tat.to_le_bytes()
}

/// Absent, empty (a reset marker) or malformed state counts as a fresh key.
pub fn decode_tat(bytes: Option<&[u8]>) -> Option<u64> {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
}

/// Takes one request from `key`'s budget across every worker: CAS retry until
/// our update lands on the state we read. If contention outlasts
/// [`crate::shared_data::MAX_CAS_ATTEMPTS`], the request is refused (never over-admit).
pub fn acquire(cell: &mut dyn CounterCell, key: &str, limit: RateLimit, now_ns: u64) -> RateStatus {
    let attempt = update(cell, key, |bytes| {
        match check(limit, decode_tat(bytes), now_ns) {
            (status, Some(new_tat)) => Step::Write(encode_tat(new_tat).to_vec(), status),
            (status, None) => Step::Done(status),
        }
    });
    let last = match attempt {
        Ok(status) => return status,
        Err(last) => last,
    };
    let interval = limit.interval_ns();
    RateStatus {
        allowed: false,
        remaining: 0,
        retry_after_ns: interval,
        ..last.unwrap_or(RateStatus {
            allowed: false,
            limit,
            remaining: 0,
            reset_at_ns: now_ns,
            retry_after_ns: 0,
            tag: TAG_DEFAULT,
            policies: Policies::one(TAG_DEFAULT, limit),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryHost as Cell;

    const S: u64 = NANOS_PER_SEC;
    const T0: u64 = 1_700_000_000 * S;

    fn limit(requests: u32, window_secs: u32) -> RateLimit {
        RateLimit {
            requests,
            window_secs,
        }
    }

    #[test]
    fn burst_of_limit_is_admitted_then_refused() {
        let mut cell = Cell::default();
        let l = limit(5, 60);
        let remaining: Vec<u32> = (0..5)
            .map(|_| acquire(&mut cell, "k", l, T0))
            .map(|s| s.remaining)
            .collect();
        assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
        let refused = acquire(&mut cell, "k", l, T0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_secs(), 12);
        assert_eq!(refused.reset_in_secs(T0), 60);
    }

    #[test]
    fn an_admission_with_a_slightly_older_clock_reports_the_next_count() {
        // Worker B admits at T0; worker A read the clock 1 ms earlier and
        // lands its retried update on B's state: it must report 3, not 2.
        let l = RateLimit {
            requests: 5,
            window_secs: 60,
        };
        let (first, tat) = check(l, None, T0);
        assert_eq!(first.remaining, 4);
        let (second, _) = check(l, tat, T0 - 1_000_000);
        assert!(second.allowed);
        assert_eq!(second.remaining, 3);
    }

    #[test]
    fn budget_refills_one_request_per_interval() {
        let mut cell = Cell::default();
        let l = limit(5, 60);
        for _ in 0..5 {
            assert!(acquire(&mut cell, "k", l, T0).allowed);
        }
        assert!(!acquire(&mut cell, "k", l, T0 + 11 * S).allowed);
        let s = acquire(&mut cell, "k", l, T0 + 12 * S);
        assert!(s.allowed);
        assert_eq!(s.remaining, 0);
        // After a full window of silence the whole budget is back.
        assert_eq!(acquire(&mut cell, "k", l, T0 + 200 * S).remaining, 4);
    }

    #[test]
    fn no_boundary_burst_unlike_a_fixed_window() {
        let mut cell = Cell::default();
        let l = limit(100, 60);
        let admitted = (0..300)
            .map(|i| T0 + 59 * S + i * S / 100) // straddles a minute boundary
            .filter(|&t| acquire(&mut cell, "k", l, t).allowed)
            .count();
        // The burst of 100, then one more per 0.6 s over the 2.99 s that follow.
        assert_eq!(admitted, 100 + 4);
    }

    #[test]
    fn retry_after_is_the_true_wait() {
        let l = limit(100, 60);
        let (s, _) = check(l, Some(T0 + 60 * S), T0);
        assert!(!s.allowed);
        assert_eq!(s.retry_after_ns, 600_000_000);
        assert_eq!(s.retry_after_secs(), 1);
        let (s, _) = check(limit(1, 60), Some(T0 + 45 * S), T0);
        assert_eq!(s.retry_after_secs(), 45);
    }

    #[test]
    fn keys_have_separate_budgets() {
        let mut cell = Cell::default();
        let l = limit(1, 60);
        assert!(acquire(&mut cell, "a", l, T0).allowed);
        assert!(!acquire(&mut cell, "a", l, T0).allowed);
        assert!(acquire(&mut cell, "b", l, T0).allowed);
    }

    #[test]
    fn cas_conflict_retries_and_never_double_counts() {
        let mut cell = Cell {
            interfere: 3,
            ..Default::default()
        };
        let l = limit(2, 60);
        cell.store("k", &encode_tat(0), None);
        assert!(acquire(&mut cell, "k", l, T0).allowed);
        assert!(acquire(&mut cell, "k", l, T0).allowed);
        assert!(!acquire(&mut cell, "k", l, T0).allowed);
    }

    #[test]
    fn endless_contention_refuses_rather_than_over_admits() {
        let mut cell = Cell {
            interfere: u32::MAX,
            ..Default::default()
        };
        cell.store("k", &encode_tat(0), None);
        let s = acquire(&mut cell, "k", limit(10, 60), T0);
        assert!(!s.allowed);
        assert!(s.retry_after_secs() >= 1);
    }

    #[test]
    fn malformed_state_counts_as_fresh() {
        assert_eq!(decode_tat(Some(b"xyz")), None);
        assert_eq!(decode_tat(Some(&[])), None);
        assert_eq!(decode_tat(Some(&encode_tat(7))), Some(7));
    }

    #[test]
    fn validation_rejects_zero_and_huge_windows() {
        assert_eq!(limit(0, 60).validate().unwrap_err().field, "requests");
        assert_eq!(limit(1, 0).validate().unwrap_err().field, "window_secs");
        assert_eq!(
            limit(1, MAX_WINDOW_SECS + 1).validate().unwrap_err().field,
            "window_secs"
        );
        assert!(limit(1, 1).validate().is_ok());
    }
}
