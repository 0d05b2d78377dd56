//! Decision counters, defined once per VM and shared by its HTTP contexts.
//! Named `keygate.requests_total.<outcome>`; Envoy shows wasm metrics with a
//! `wasmcustom.` prefix, and `envoy/envoy.yaml` extracts the outcome as a
//! Prometheus label.
//!
//! Counted in the VM and added to Envoy's counters on the root context's
//! tick ([`FLUSH_PERIOD`]), not per request: a metric call is a host call on
//! the request path. Envoy's figures lag by up to one period.

use crate::host;
use keygate_core::access_log::outcomes;
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

/// How often counts reach Envoy.
pub const FLUSH_PERIOD: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Metrics {
    /// Envoy metric id and the count not yet added to it.
    by_outcome: HashMap<String, (u32, Cell<u64>)>,
}

impl Metrics {
    /// Defines every counter up front; an error fails `on_configure`
    /// instead of surfacing on a request.
    pub fn define() -> Result<Metrics, String> {
        let mut by_outcome = HashMap::new();
        for outcome in outcomes() {
            let name = format!("keygate.requests_total.{outcome}");
            let id = host::define_counter(&name).map_err(|e| format!("{name}: {e}"))?;
            by_outcome.insert(outcome, (id, Cell::new(0)));
        }
        Ok(Metrics { by_outcome })
    }

    pub fn count(&self, outcome: &str) {
        if let Some((_, pending)) = self.by_outcome.get(outcome) {
            pending.set(pending.get() + 1);
        }
    }

    /// Adds the pending counts to Envoy's counters. A failed increment keeps
    /// its count for the next flush.
    pub fn flush(&self) {
        for (id, pending) in self.by_outcome.values() {
            let n = pending.get();
            if n > 0 && host::increment_counter(*id, n).is_ok() {
                pending.set(0);
            }
        }
    }
}
