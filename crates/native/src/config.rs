//! The filter configuration: validated once on Envoy's main thread, then
//! used by every worker at once. The core's compiled [`Policy`] holds `Rc`s
//! (it is built per wasm VM), so the shared object keeps the validated JSON
//! and each worker compiles its own `Policy` on first use.

use crate::abi;
use crate::envoy::{log, ConfigHandle};
use crate::state::tables;
use keygate_core::access_log::outcomes;
use keygate_core::config::{check_store_ids, merge_config_ids, Role};
use keygate_core::denial::Reason;
use keygate_core::shared_data::{counter_key, CONFIG_IDS_KEY};
use keygate_core::token::VerifiedTokens;
use keygate_core::{Decision, Outcome, Policy};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What one worker keeps per filter configuration.
#[derive(Clone)]
pub struct Worker {
    pub policy: Rc<Policy>,
    pub verified_tokens: Rc<RefCell<VerifiedTokens>>,
}

/// One `filter_config` as Envoy loaded it. Read-only once built.
pub struct FilterConfig {
    id: u64,
    json: Vec<u8>,
    pub role: Role,
    /// Counter ids by metric outcome (gate role only).
    counters: HashMap<String, usize>,
    /// The same ids for decisions, by [`decision_slot`]: no name is built
    /// or hashed per request.
    decision_counters: Vec<Option<usize>>,
}

/// Secrets come from Envoy's own environment (the wasm build reads the same
/// names through `vm_config.environment_variables`).
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn compile(json: &[u8]) -> Result<Policy, keygate_core::ConfigError> {
    let json: &[u8] = if json.is_empty() { b"{}" } else { json };
    Policy::from_json_with_env(json, &env)
}

impl FilterConfig {
    /// Validates the plugin JSON exactly as the wasm build does; an error is
    /// logged naming the field and Envoy refuses the configuration.
    pub fn new(handle: &ConfigHandle, json: &[u8]) -> Option<FilterConfig> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let policy = match compile(json) {
            Ok(p) => p,
            Err(e) => {
                log(
                    abi::LOG_ERROR,
                    &format!("keygate: invalid plugin configuration: {e}"),
                );
                return None;
            }
        };
        let mut counters = HashMap::new();
        if policy.role == Role::Gate {
            for outcome in outcomes() {
                let name = format!("keygate.requests_total.{outcome}");
                let Some(id) = handle.define_counter(&name) else {
                    log(
                        abi::LOG_ERROR,
                        &format!("keygate: cannot define metric {name}"),
                    );
                    return None;
                };
                counters.insert(outcome, id);
            }
        }
        if policy.role == Role::Gate {
            // Key ids are unique across plugin config and store: refuse a
            // config reusing one the store holds for another key, and record
            // ours so the sync role refuses store keys reusing them.
            let held =
                |key_id: &str| Ok::<_, ()>(crate::state::lookup_key_id(key_id).map(|c| c.key_hash));
            if let Ok(Err(e)) = check_store_ids(&policy, held) {
                log(
                    abi::LOG_ERROR,
                    &format!("keygate: invalid plugin configuration: {e}"),
                );
                return None;
            }
            tables().modify(CONFIG_IDS_KEY, |current| merge_config_ids(current, &policy));
        }
        let decision_counters = (0..DECISION_SLOTS)
            .map(|slot| counters.get(&decision_outcome(slot)).copied())
            .collect();
        let keys: Vec<String> = policy
            .credentials
            .values()
            .map(|c| counter_key(&c.key_id))
            .collect();
        tables().ensure_counters(keys.iter().map(String::as_str));
        // Counts and role only: the policy holds credential hashes.
        log(
            abi::LOG_INFO,
            &format!(
                "keygate {} (native) configured: role {:?}, {} credentials from config, {} route rules",
                keygate_core::VERSION,
                policy.role,
                policy.credentials.len(),
                policy.routes.len()
            ),
        );
        Some(FilterConfig {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            json: json.to_vec(),
            role: policy.role,
            counters,
            decision_counters,
        })
    }

    /// This worker's compiled policy; compiled on first use. The JSON was
    /// validated when the config was created, so compiling cannot fail short
    /// of a changed environment, which then fails closed (`None`).
    pub fn policy(&self) -> Option<Rc<Policy>> {
        self.worker().map(|w| w.policy)
    }

    /// [`FilterConfig::policy`] with this worker's tokens already verified
    /// under it (as the wasm build keeps them per VM): one cache per
    /// compiled policy, so a changed set of signing keys starts empty.
    pub fn worker(&self) -> Option<Worker> {
        // A few configs per worker at most (gate, sync, reloads): a short list.
        const MAX_CONFIGS_PER_WORKER: usize = 16;
        thread_local! {
            static POLICIES: RefCell<Vec<(u64, Worker)>> = const { RefCell::new(Vec::new()) };
        }
        POLICIES.with(|cell| {
            let mut list = cell.try_borrow_mut().ok()?;
            if let Some((_, w)) = list.iter().find(|(id, _)| *id == self.id) {
                return Some(w.clone());
            }
            let worker = Worker {
                policy: Rc::new(compile(&self.json).ok()?),
                verified_tokens: Rc::default(),
            };
            if list.len() >= MAX_CONFIGS_PER_WORKER {
                list.remove(0);
            }
            list.push((self.id, worker.clone()));
            Some(worker)
        })
    }

    pub fn counter(&self, outcome: &str) -> Option<usize> {
        self.counters.get(outcome).copied()
    }

    /// The counter of a decision's outcome (`AccessRecord::outcome`).
    pub fn decision_counter(&self, decision: &Decision) -> Option<usize> {
        self.decision_counters
            .get(decision_slot(&decision.outcome))
            .copied()
            .flatten()
    }
}

/// Allowed, public, then one per refusal reason.
const DECISION_SLOTS: usize = 2 + Reason::ALL.len();

pub(crate) fn decision_slot(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Allowed { .. } => 0,
        Outcome::Public => 1,
        Outcome::Denied { denial, .. } => {
            2 + Reason::ALL
                .iter()
                .position(|r| *r == denial.reason)
                .unwrap_or(Reason::ALL.len())
        }
    }
}

/// The metric outcome name of a slot, as `AccessRecord::outcome` spells it.
pub(crate) fn decision_outcome(slot: usize) -> String {
    match slot {
        0 => "allowed".to_owned(),
        1 => "public".to_owned(),
        n => Reason::ALL
            .get(n - 2)
            .map_or_else(String::new, |r| format!("denied_{}", r.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: u64) -> FilterConfig {
        FilterConfig {
            id,
            json: b"{}".to_vec(),
            role: Role::Gate,
            counters: HashMap::new(),
            decision_counters: Vec::new(),
        }
    }

    #[test]
    fn verified_tokens_are_kept_per_config_on_a_worker() {
        let (a, b) = (config(1_000_001), config(1_000_002));
        let (a1, a2, b1) = (
            a.worker().unwrap(),
            a.worker().unwrap(),
            b.worker().unwrap(),
        );
        assert!(Rc::ptr_eq(&a1.policy, &a2.policy));
        assert!(Rc::ptr_eq(&a1.verified_tokens, &a2.verified_tokens));
        assert!(!Rc::ptr_eq(&a1.verified_tokens, &b1.verified_tokens));
    }
}
