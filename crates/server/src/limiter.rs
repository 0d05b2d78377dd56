//! Slows token guessing: after `max` failed authentications from one
//! address within a window, that address gets 429 until the window ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; when full, expired windows are dropped, and
/// if all are live the oldest goes (an attacker cycling addresses gains
/// little: each address still gets only `max` tries per window).
const MAX_TRACKED: usize = 10_000;

pub struct FailLimiter {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailLimiter {
    pub fn new(max: u32, window: Duration) -> FailLimiter {
        FailLimiter {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds to wait if `ip` is over its limit now.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let seen = self.seen.lock().ok()?;
        let (start, n) = seen.get(&ip)?;
        let left = self.window.checked_sub(start.elapsed())?;
        (*n >= self.max).then(|| left.as_secs().max(1))
    }

    pub fn failed(&self, ip: IpAddr) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let now = Instant::now();
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            seen.retain(|_, (s, _)| now.duration_since(*s) < self.window);
            if seen.len() >= MAX_TRACKED {
                if let Some(oldest) = seen.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) {
                    seen.remove(&oldest);
                }
            }
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_max_failures_and_others_are_not() {
        let l = FailLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            l.failed(a);
        }
        assert!(l.blocked(a).is_none());
        l.failed(a);
        assert!(l.blocked(a).is_some_and(|s| s <= 60));
        assert!(l.blocked(b).is_none());
    }

    #[test]
    fn the_block_ends_with_the_window() {
        let l = FailLimiter::new(1, Duration::from_millis(30));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        l.failed(a);
        assert!(l.blocked(a).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(l.blocked(a).is_none());
    }
}
