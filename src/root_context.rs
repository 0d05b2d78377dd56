//! The root context: one per worker VM. Owns the compiled policy and hands
//! it to every HTTP context.

use crate::host;
use crate::http_context::GateContext;
use crate::metrics::{Metrics, FLUSH_PERIOD};
use crate::shared_store::{claim_config_key_ids, ensure_counter, CredentialCache};
use crate::sync_context::SyncContext;
use keygate_core::config::{Role, SyncSecret};
use keygate_core::shared_data::counter_key;
use keygate_core::Policy;
use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
pub struct KeygateRoot {
    policy: Option<Rc<Policy>>,
    sync_secret: Option<Rc<SyncSecret>>,
    cache: Rc<RefCell<CredentialCache>>,
    metrics: Rc<Metrics>,
}

impl Context for KeygateRoot {}

impl RootContext for KeygateRoot {
    fn on_vm_start(&mut self, _: usize) -> bool {
        // The commit makes field reports answerable; set by `make wasm`.
        let commit = option_env!("KEYGATE_GIT_HASH").unwrap_or("unknown");
        info!("version {} ({commit}) starting", keygate_core::VERSION);
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = match host::plugin_configuration() {
            Ok(Some(bytes)) if !bytes.is_empty() => bytes,
            Ok(_) => b"{}".to_vec(),
            Err(e) => {
                error!("cannot read the plugin configuration: {e}");
                return false;
            }
        };
        // WASI environment, as passed by vm_config.environment_variables.
        match Policy::from_json_with_env(&bytes, &|name| std::env::var(name).ok()) {
            Ok(policy) => {
                for cred in policy.credentials.values() {
                    if let Err(e) = ensure_counter(&counter_key(&cred.key_id)) {
                        error!("cannot create rate counters in shared data: {e}");
                        return false;
                    }
                }
                // Counts and role only: the policy holds credential hashes.
                info!(
                    "configured: role {:?}, {} credentials from config, {} route rules",
                    policy.role,
                    policy.credentials.len(),
                    policy.routes.len()
                );
                if policy.role == Role::Gate {
                    if let Err(e) = claim_config_key_ids(&policy, &mut self.cache.borrow_mut()) {
                        error!("invalid plugin configuration: {e}");
                        return false;
                    }
                    match Metrics::define() {
                        Ok(m) => self.metrics = Rc::new(m),
                        Err(e) => {
                            error!("cannot define metrics: {e}");
                            return false;
                        }
                    }
                    if let Err(e) = host::set_tick_period(FLUSH_PERIOD) {
                        error!("cannot schedule the metric flush: {e}");
                        return false;
                    }
                }
                self.sync_secret = policy.sync_secret.clone().map(Rc::new);
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(e) => {
                error!("invalid plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.metrics.flush();
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would panic inside the SDK; a gate without a policy
        // fails closed instead.
        match (self.policy.as_ref().map(|p| p.role), &self.sync_secret) {
            (Some(Role::Sync), Some(secret)) => Some(Box::new(SyncContext::new(secret.clone()))),
            _ => Some(Box::new(GateContext::new(
                self.policy.clone(),
                self.cache.clone(),
                self.metrics.clone(),
            ))),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
