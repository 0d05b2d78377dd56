//! The one test double of the host: credentials, peer address and shared
//! data in memory, with Envoy's compare-and-swap semantics. Used by the unit
//! tests and (through the `testing` feature) by crates/core/tests.

use crate::credential::{Credential, CredentialRecord, Kind, Status};
use crate::hash::Digest;
use crate::hash::{sha256, to_hex};
use crate::shared_data::CounterCell;
use crate::sync::{encode_limit_slots, Slot, SyncState};
use crate::token::VerifiedTokens;
use crate::verdict::Host;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Default)]
pub struct MemoryHost {
    /// The dynamic credential source (what the sidecar pushes).
    pub dynamic: HashMap<Digest, Rc<Credential>>,
    pub peer: Option<String>,
    /// Set once the decision asked for the peer address.
    pub peer_asked: bool,
    /// Shared data by key. A test may insert entries directly.
    pub counters: HashMap<String, Vec<u8>>,
    /// CAS token of each entry (0 for one inserted directly).
    pub versions: HashMap<String, u32>,
    pub next_cas: u32,
    /// Simulates another worker writing between a load and the next
    /// `interfere` stores.
    pub interfere: u32,
    /// Lent to the decision as the VM's verified-token cache.
    pub verified: VerifiedTokens,
    /// Credential lookups by hash the decision made (each a shared-data
    /// read in Envoy).
    pub lookups: u32,
    /// The sync state plan and tenant entries are served under.
    pub state: SyncState,
    /// The state held now, if a push committed since `state` was read.
    pub fresh_state: Option<SyncState>,
    /// States fresh reads return first, one each (pushes committing while
    /// the decision reads again), before `fresh_state`.
    pub later_states: Vec<SyncState>,
}

impl CounterCell for MemoryHost {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.counters.get(key) {
            Some(v) => (
                Some(v.clone()),
                Some(self.versions.get(key).copied().unwrap_or(0)),
            ),
            None => (None, None),
        }
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if self.interfere > 0 {
            self.interfere -= 1;
            self.next_cas += 1;
            self.counters.entry(key.into()).or_default();
            self.versions.insert(key.into(), self.next_cas);
        }
        if let (Some(cas), Some(_)) = (cas, self.counters.get(key)) {
            if cas != self.versions.get(key).copied().unwrap_or(0) {
                return false;
            }
        }
        self.next_cas += 1;
        self.counters.insert(key.into(), value.to_vec());
        self.versions.insert(key.into(), self.next_cas);
        true
    }
}

impl Host for MemoryHost {
    fn lookup(&mut self, h: &Digest) -> Option<Rc<Credential>> {
        self.lookups += 1;
        self.dynamic.get(h).cloned()
    }
    fn lookup_key_id(&mut self, key_id: &str) -> Option<Rc<Credential>> {
        self.dynamic.values().find(|c| c.key_id == key_id).cloned()
    }
    fn peer_address(&mut self) -> Option<String> {
        self.peer_asked = true;
        self.peer.clone()
    }
    fn counters(&mut self) -> &mut dyn CounterCell {
        self
    }
    fn sync_state(&mut self, fresh: bool) -> SyncState {
        if fresh && !self.later_states.is_empty() {
            return self.later_states.remove(0);
        }
        match self.fresh_state {
            Some(now) if fresh => now,
            _ => self.state,
        }
    }
    fn verified_tokens(&mut self) -> Option<&mut VerifiedTokens> {
        Some(&mut self.verified)
    }
}

/// A plan or tenant entry holding `value` committed under the default
/// state (what a push of it leaves once it commits).
pub fn committed_limit(value: Vec<u8>) -> Vec<u8> {
    encode_limit_slots(&[Slot {
        stamp: 0,
        generation: 0,
        record: Some(value),
    }])
}

/// Unix time of the verdict tests, in nanoseconds.
pub const NOW: u64 = 1_700_000_000_000_000_000;

#[cfg(test)]
pub use verdict_fixtures::*;

/// A scoped, active `live` credential record of `key` (id `id-<key>`, the
/// `read` scope, no limits): the one record the core's tests and the
/// integration tests start from.
pub fn record(key: &str, tenant: &str) -> CredentialRecord {
    CredentialRecord {
        key_id: format!("id-{key}"),
        key_hash: to_hex(&sha256(key.as_bytes())),
        secret_hash: None,
        previous_secret_hash: None,
        previous_secret_expires_at: None,
        kind: Kind::Scoped,
        tenant: tenant.into(),
        environment: "live".into(),
        scopes: vec!["read".into()],
        allowed_ips: vec![],
        rate_limit: None,
        status: Status::Active,
        expires_at: None,
        owner: None,
        previous_key_hash: None,
        previous_key_expires_at: None,
        metadata: Default::default(),
        limits: vec![],
        plan: None,
        tenant_limits: false,
        quota_used: vec![],
        credits: None,
    }
}

/// A policy with public, read, write and admin routes, requests and their
/// refusals, as the verdict tests use them.
#[cfg(test)]
mod verdict_fixtures {
    use super::{MemoryHost, NOW};
    use crate::config::Policy;
    use crate::credential::CredentialRecord;
    use crate::denial::Reason;
    use crate::verdict::{decide, Decision, Outcome};

    pub fn rec(key_id: &str, key: &str) -> CredentialRecord {
        CredentialRecord {
            key_id: key_id.into(),
            ..crate::credential::tests::record(key, "acme")
        }
    }

    pub fn policy(creds: Vec<CredentialRecord>, extra: &str) -> Policy {
        let creds = serde_json::to_string(&creds).unwrap();
        let json = format!(
            r#"{{"credentials":{creds},"routes":[
                {{"path_prefix":"/health","public":true}},
                {{"methods":["GET"],"path_prefix":"/v1","scope":"read"}},
                {{"methods":["POST"],"path_prefix":"/v1","scope":"write"}},
                {{"path_prefix":"/admin","scope":"admin"}}]{extra}}}"#
        );
        Policy::from_json(json.as_bytes()).unwrap()
    }

    pub fn req(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut h = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
        ];
        h.extend(
            extra
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        h
    }

    pub fn run(p: &Policy, h: &[(String, Vec<u8>)], host: &mut MemoryHost) -> Decision {
        decide(p, &h, host, NOW)
    }

    pub fn denied(d: &Decision) -> Option<(Reason, &str)> {
        match &d.outcome {
            Outcome::Denied { denial, .. } => Some((denial.reason, denial.message.as_str())),
            _ => None,
        }
    }
}
