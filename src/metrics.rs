//! Decision counters, defined once per VM and shared by its HTTP contexts.
//! Named `keygate.requests_total.<outcome>`; Envoy shows wasm metrics with a
//! `wasmcustom.` prefix, and `envoy/envoy.yaml` extracts the outcome as a
//! Prometheus label.

use crate::host;
use keygate_core::access_log::outcomes;
use std::collections::HashMap;

#[derive(Default)]
pub struct Metrics {
    by_outcome: HashMap<String, u32>,
}

impl Metrics {
    /// Defines every counter up front; an error fails `on_configure`
    /// instead of surfacing on a request.
    pub fn define() -> Result<Metrics, String> {
        let mut by_outcome = HashMap::new();
        for outcome in outcomes() {
            let name = format!("keygate.requests_total.{outcome}");
            let id = host::define_counter(&name).map_err(|e| format!("{name}: {e}"))?;
            by_outcome.insert(outcome, id);
        }
        Ok(Metrics { by_outcome })
    }

    /// A lost increment only skews a counter: not worth refusing a request.
    pub fn count(&self, outcome: &str) {
        if let Some(id) = self.by_outcome.get(outcome) {
            let _ = host::increment_counter(*id);
        }
    }
}
