//! The per-request context of the sync role: the sidecar reads the state
//! Envoy holds and pushes signed credential batches. Runs on a loopback-only
//! listener; every push is authenticated, sequenced and validated in full
//! (`keygate_core::sync::plan`) before the first write.

use crate::shared_store::ensure_counter;
use keygate_core::config::SyncSecret;
use keygate_core::rate_limit::MAX_CAS_ATTEMPTS;
use keygate_core::sync::{
    credential_key, decode_state, encode_state, plan, SyncError, SyncState, MAX_PUSH_BYTES,
    PUSH_PATH, SIGNATURE_HEADER, STATE_KEY, STATE_PATH,
};
use keygate_core::token::{merge_revocations, revocations_key};
use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct SyncContext {
    secret: Rc<SyncSecret>,
    receiving: bool,
    /// Read while the headers are available: once they are continued, Envoy
    /// refuses header reads and the SDK would panic.
    signature: Option<Vec<u8>>,
}

impl SyncContext {
    pub fn new(secret: Rc<SyncSecret>) -> SyncContext {
        SyncContext {
            secret,
            receiving: false,
            signature: None,
        }
    }

    fn reply(&self, status: u16, body: &serde_json_body::Body) {
        self.send_http_response(
            u32::from(status),
            vec![("content-type", "application/json")],
            Some(&body.render()),
        );
    }

    fn held_state() -> (SyncState, Option<u32>) {
        match hostcalls::get_shared_data(STATE_KEY) {
            Ok((bytes, cas)) => (decode_state(bytes.as_deref()), cas),
            Err(_) => (SyncState::default(), None),
        }
    }

    fn apply(&self, body: &[u8]) -> Result<SyncState, SyncError> {
        let (state, cas) = Self::held_state();
        let plan = plan(&self.secret.0, body, self.signature.as_deref(), &state)?;
        for key in &plan.counters {
            ensure_counter(key);
        }
        for (hash, entry) in &plan.upserts {
            let _ = hostcalls::set_shared_data(&credential_key(hash), Some(entry), None);
        }
        for hash in &plan.deletes {
            let _ = hostcalls::set_shared_data(&credential_key(hash), Some(&[]), None);
        }
        apply_revocations(&plan.revoked_sessions);
        // The state is written last and only if nobody else moved it meanwhile.
        hostcalls::set_shared_data(STATE_KEY, Some(&encode_state(&plan.state)), cas).map_err(
            |_| SyncError::Conflict("another push changed the state concurrently".into()),
        )?;
        info!(
            "keygate sync: applied {} upserts, {} deletes; generation {} version {}",
            plan.upserts.len(),
            plan.deletes.len(),
            plan.state.generation,
            plan.state.version
        );
        Ok(plan.state)
    }
}

/// Merges session revocations into each key's `rs:` entry, with CAS: gate
/// workers read these entries on every token use.
fn apply_revocations(revoked: &[keygate_core::sync::RevokedSession]) {
    let mut by_key: std::collections::BTreeMap<&str, Vec<(&str, u64)>> = Default::default();
    for r in revoked {
        by_key
            .entry(&r.key_id)
            .or_default()
            .push((&r.session_id, r.revoked_at_ms));
    }
    for (key_id, sessions) in by_key {
        let key = revocations_key(key_id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (bytes, cas) = hostcalls::get_shared_data(&key).unwrap_or((None, None));
            let merged = merge_revocations(bytes.as_deref(), &sessions);
            if hostcalls::set_shared_data(&key, Some(&merged), cas).is_ok() {
                break;
            }
        }
    }
}

/// Small JSON bodies of the sync API.
mod serde_json_body {
    use keygate_core::sync::SyncState;

    pub enum Body {
        State(SyncState),
        Error(String),
    }

    impl Body {
        pub fn render(&self) -> Vec<u8> {
            let value = match self {
                Body::State(s) => serde_json::to_value(s).unwrap_or_default(),
                Body::Error(m) => serde_json::json!({ "error": m }),
            };
            serde_json::to_vec(&value).unwrap_or_default()
        }
    }
}

use serde_json_body::Body;

impl Context for SyncContext {}

impl HttpContext for SyncContext {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let method = self
            .get_http_request_header_bytes(":method")
            .unwrap_or_default();
        let path = self
            .get_http_request_header_bytes(":path")
            .unwrap_or_default();
        match (method.as_slice(), path.as_slice()) {
            (b"GET", p) if p == STATE_PATH.as_bytes() => {
                self.reply(200, &Body::State(Self::held_state().0));
            }
            (b"POST", p) if p == PUSH_PATH.as_bytes() => {
                let too_long = self
                    .get_http_request_header_bytes("content-length")
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_PUSH_BYTES);
                if too_long {
                    self.reply(413, &Body::Error(SyncError::TooLarge.message()));
                } else if end_of_stream {
                    self.reply(400, &Body::Error("push without a body".into()));
                } else {
                    // Pausing here would stop the body reaching this filter
                    // too (StopAllIteration); the buffer filter after keygate
                    // holds the request back from the router instead.
                    self.receiving = true;
                    self.signature = self.get_http_request_header_bytes(SIGNATURE_HEADER);
                    return Action::Continue;
                }
            }
            _ => self.reply(404, &Body::Error("not found".into())),
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.receiving {
            return Action::Pause;
        }
        if body_size > MAX_PUSH_BYTES {
            self.receiving = false;
            self.reply(413, &Body::Error(SyncError::TooLarge.message()));
            return Action::Pause;
        }
        if !end_of_stream {
            // Let Envoy buffer until the whole body is here.
            return Action::Pause;
        }
        self.receiving = false;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match self.apply(&body) {
            Ok(state) => self.reply(200, &Body::State(state)),
            Err(e) => {
                warn!(
                    "keygate sync: refused push ({}): {}",
                    e.status(),
                    e.message()
                );
                self.reply(e.status(), &Body::Error(e.message()));
            }
        }
        Action::Pause
    }
}
