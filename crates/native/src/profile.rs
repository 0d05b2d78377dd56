//! Per-step timing of the gate's request path, for `bench/native_profile.py`.
//! Only with the `profile` feature: a normal build compiles every call here
//! to nothing. Each worker sums the nanoseconds of each step and logs the
//! means every [`REPORT_EVERY`] requests.

/// The steps of one request, in the order the gate runs them.
#[derive(Clone, Copy)]
pub enum Step {
    /// Compiled policy of this worker and the clock.
    Policy,
    /// The request header views (one host call).
    Headers,
    /// `source.address` (one host call, when the key has IP rules).
    PeerAddress,
    /// Rate-limit counter read-modify-write (process-wide table).
    RateCounter,
    /// The rest of the core decision (route, extract, hash, lookup, scope).
    Decide,
    /// Access-log filter state (one host call per field).
    FilterState,
    /// The decision metric (one host call).
    Metric,
    /// Working out the request header edits.
    EditPlan,
    /// Applying them (one host call each).
    EditCalls,
    /// Which rate-limit headers the response already has (one host call).
    ResponsePlan,
    /// Rendering and adding them (one host call each).
    ResponseHeaders,
}

#[cfg(feature = "profile")]
mod imp {
    use super::Step;
    use crate::abi;
    use crate::envoy::log;
    use std::cell::RefCell;
    use std::time::Instant;

    pub const REPORT_EVERY: u64 = 100_000;
    const N: usize = 11;
    /// A step this long was preempted (the machine is shared): dropped, so
    /// one descheduling does not stand for a thousand requests.
    const PREEMPTED_NS: u64 = 50_000;
    const NAMES: [&str; N] = [
        "policy+clock",
        "get_headers",
        "source_address",
        "rate_counter",
        "decide (rest)",
        "filter_state x N",
        "increment_counter",
        "edit plan",
        "header edits",
        "response header views",
        "response header render+calls",
    ];

    #[derive(Default)]
    struct Sums {
        ns: [u64; N],
        calls: [u64; N],
        dropped: u64,
        requests: u64,
    }

    thread_local! {
        static SUMS: RefCell<Sums> = RefCell::new(Sums::default());
    }

    fn add(step: Step, ns: u64) {
        SUMS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if ns >= PREEMPTED_NS {
                    s.dropped += 1;
                    return;
                }
                s.ns[step as usize] += ns;
                s.calls[step as usize] += 1;
            }
        });
    }

    /// Laps of one hook: each lap is charged to the step it names.
    pub struct Timer(Instant);

    impl Timer {
        pub fn start() -> Timer {
            Timer(Instant::now())
        }
        pub fn lap(&mut self, step: Step) {
            let now = Instant::now();
            add(step, u64::try_from((now - self.0).as_nanos()).unwrap_or(0));
            self.0 = now;
        }
        /// Starts the next lap here, charging the time since to nothing
        /// (it was timed with [`within`]).
        pub fn reset(&mut self) {
            self.0 = Instant::now();
        }
    }

    /// Time of `f`, charged to `step` (a part of a larger lap: the caller's
    /// lap still includes it, see `report`).
    pub fn within<T>(step: Step, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        add(step, u64::try_from(t.elapsed().as_nanos()).unwrap_or(0));
        out
    }

    /// One request done; every REPORT_EVERY, log mean ns per request.
    pub fn request_done() {
        SUMS.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else {
                return;
            };
            s.requests += 1;
            if s.requests < REPORT_EVERY {
                return;
            }
            let mut line = format!(
                "keygate-profile: {} requests ({} preempted steps dropped);",
                s.requests, s.dropped
            );
            for (i, name) in NAMES.iter().enumerate() {
                line.push_str(&format!(
                    " {name}={:.0}ns/{:.2}",
                    s.ns[i] as f64 / s.requests as f64,
                    s.calls[i] as f64 / s.requests as f64
                ));
            }
            log(abi::LOG_WARN, &line);
            *s = Sums::default();
        });
    }
}

#[cfg(not(feature = "profile"))]
mod imp {
    use super::Step;

    pub struct Timer;

    impl Timer {
        #[inline(always)]
        pub fn start() -> Timer {
            Timer
        }
        #[inline(always)]
        pub fn lap(&mut self, _step: Step) {}
        #[inline(always)]
        pub fn reset(&mut self) {}
    }

    #[inline(always)]
    pub fn within<T>(_step: Step, f: impl FnOnce() -> T) -> T {
        f()
    }

    #[inline(always)]
    pub fn request_done() {}
}

pub use imp::{request_done, within, Timer};
