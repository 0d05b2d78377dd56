//! The per-request context of the sync role: the sidecar reads the state
//! Envoy holds and pushes signed credential batches. Runs on a loopback-only
//! listener; every push is authenticated, sequenced and validated in full
//! (`keygate_core::sync::plan`) before the first write.

use crate::host::{self, HostError, HostResult, Written};
use crate::shared_store::SharedCounters;
use keygate_core::config::SyncSecret;
use keygate_core::entry;
use keygate_core::hash::Digest;
use keygate_core::shared_data::{
    credential_key, is_current_layout, key_id_merge, key_id_slot, layout_value, revocations_key,
    update, Step, CONFIG_IDS_KEY, LAYOUT_KEY, STATE_KEY,
};
use keygate_core::sync::{
    check_config_ids, check_layout, decode_state, encode_state, plan, reported_state, stage,
    stage_limit, visible_record, LimitRecord, ListenerError, Plan, SyncError, SyncState,
    BINARY_VERSION_TEXT, FORMAT_HEADER, MAX_PUSH_BYTES, PUSH_PATH, SIGNATURE_HEADER, STATE_PATH,
};
use keygate_core::token::merge_revocations;
use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::borrow::Cow;
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
        // The binary push format this filter reads, so a sidecar knows it
        // may send it (an older filter sends no such header: JSON only).
        let headers = [
            ("content-type", "application/json"),
            (FORMAT_HEADER, BINARY_VERSION_TEXT),
        ];
        if let Err(e) = host::send_reply(status, &headers, &body.render()) {
            error!("cannot send the {status} reply: {e}");
        }
    }

    fn refuse(&self, e: ListenerError) {
        self.reply(e.status(), &Body::Error(e));
    }

    /// The sidecar learns of a host failure as a 500 and pushes again.
    fn fail(&self, e: HostError) -> Action {
        error!("{e}");
        self.refuse(SyncError::Host(e.to_string()).into());
        Action::Pause
    }

    /// Applies the whole push body and answers it.
    fn finish(&mut self, body: &[u8]) {
        self.receiving = false;
        match self.apply(body) {
            Ok(state) => self.reply(200, &Body::State(state)),
            Err(e) => {
                warn!("refused push ({}): {}", e.status(), e.message());
                self.refuse(e.into());
            }
        }
    }

    fn held_state() -> HostResult<(SyncState, Option<u32>)> {
        let (bytes, cas) = host::shared_get(STATE_KEY)?;
        Ok((decode_state(bytes.as_deref()), cas))
    }

    /// Claims the batch (CAS on the state), stages its writes, then, on the
    /// last batch, commits the push with one more state write: readers see
    /// the whole push switch at once, or nothing of it.
    fn apply(&self, body: &[u8]) -> Result<SyncState, SyncError> {
        let host_error = |e: HostError| SyncError::Host(e.to_string());
        let (state, cas) = Self::held_state().map_err(host_error)?;
        let plan = plan(&self.secret.0, body, self.signature.as_deref(), &state)?;
        let (config_ids, _) = host::shared_get(CONFIG_IDS_KEY).map_err(host_error)?;
        check_config_ids(&plan, config_ids.as_deref())?;
        let (layout, _) = host::shared_get(LAYOUT_KEY).map_err(host_error)?;
        check_layout(&plan, layout.as_deref())?;
        write_state(&plan.claim, cas)?;
        let carried = carried_counters(&state, &plan).map_err(host_error)?;
        let staged = plan
            .upserts
            .iter()
            .map(|(hash, record)| (hash, Some(record)))
            .chain(plan.deletes.iter().map(|hash| (hash, None)));
        // Stamps are never reused, so stamp 1 is the first push this Envoy
        // has seen since it started (shared data starts empty with it):
        // no other push staged an entry and no gate worker counts in one
        // (the gate only updates served entries, and none is served before
        // a commit). Its entries are then written without reading them
        // first: one shared-data call per credential instead of two (at 1M
        // keys each is a walk down Envoy's tree of every entry).
        let first_push = plan.stamp == 1 && state.stamp == 0;
        for (hash, record) in staged {
            let carry = carried.iter().find(|(h, _)| h == hash);
            let record: Option<Cow<[u8]>> = match (record, carry) {
                (Some(r), Some((_, tat))) => {
                    Some(entry::with_tat(r, *tat).map_or(Cow::Borrowed(r.as_slice()), Cow::Owned))
                }
                (r, _) => r.map(|r| Cow::Borrowed(r.as_slice())),
            };
            let record = record.as_deref();
            if first_push {
                let value = stage(None, &state, &plan, hash, record);
                host::shared_set(&credential_key(hash), &value, None).map_err(host_error)?;
            } else {
                stage_entry(&state, &plan, hash, record)?;
            }
        }
        // Tokens name their key by id: the id → entry-name prefix index, in
        // buckets (`shared_data::key_id_slot`), each rewritten once per
        // batch. Written before the commit, which is harmless: the gate
        // checks the credential it leads to, and a staged one is not served
        // yet.
        let mut buckets: std::collections::BTreeMap<String, Vec<_>> = Default::default();
        for (key_id, hash) in &plan.key_ids {
            let (bucket, tag) = key_id_slot(key_id);
            buckets.entry(bucket).or_default().push((tag, hash));
        }
        for (bucket, items) in &buckets {
            let mut cell = SharedCounters::default();
            let written = update(&mut cell, bucket, |old| {
                Step::Write(key_id_merge(old, items), ())
            });
            if let Some(e) = cell.error {
                return Err(host_error(e));
            }
            written.map_err(|_| {
                SyncError::Conflict("the key-id index kept changing during the push".into())
            })?;
        }
        // Plan and tenant limits are staged like the credentials: served
        // from the commit below, together with the keys that name them.
        // (An entry an older layout wrote is not read: a tenant's counters
        // then start from its seed.)
        for r in &plan.limit_records {
            stage_limit_entry(&state, &plan, r)?;
        }
        apply_revocations(&plan.revoked_sessions).map_err(host_error)?;
        if let Some(commit) = &plan.commit {
            // Only if the claim still stands: a push that superseded this
            // one meanwhile keeps its own state.
            let (now, cas) = Self::held_state().map_err(host_error)?;
            if now != plan.claim {
                return Err(SyncError::Conflict(
                    "another push changed the state concurrently".into(),
                ));
            }
            write_state(commit, cas)?;
            // After the commit: until it is written, the set is still
            // reported as needing a full push (a crash in between costs one
            // more full push, never an incremental one onto the old layout).
            if plan.full && !is_current_layout(layout.as_deref()) {
                host::shared_set(LAYOUT_KEY, &layout_value(), None).map_err(host_error)?;
            }
        }
        info!(
            "staged {} upserts, {} deletes, {} session revocations; generation {} version {}{}",
            plan.upserts.len(),
            plan.deletes.len(),
            plan.revoked_sessions.len(),
            plan.generation,
            plan.result().version,
            if plan.commit.is_some() {
                " committed"
            } else {
                ""
            }
        );
        Ok(plan.result())
    }
}

/// The rate-limit state each rolled key's old entry holds, for its new
/// entry: a roll keeps the key's spent budget.
fn carried_counters(held: &SyncState, plan: &Plan) -> HostResult<Vec<(Digest, u64)>> {
    let mut out = Vec::new();
    for (new, old) in &plan.rolled {
        let (bytes, _) = host::shared_get(&credential_key(old))?;
        let tat = bytes
            .as_deref()
            .and_then(|b| visible_record(b, held))
            .and_then(entry::tat)
            .flatten();
        if let Some(tat) = tat {
            out.push((*new, tat));
        }
    }
    Ok(out)
}

/// Writes the sync state if nobody moved it since `cas` was read.
fn write_state(state: &SyncState, cas: Option<u32>) -> Result<(), SyncError> {
    match host::shared_set(STATE_KEY, &encode_state(state), cas) {
        Ok(Written::Yes) => Ok(()),
        Ok(Written::CasMismatch) => Err(SyncError::Conflict(
            "another push changed the state concurrently".into(),
        )),
        Err(e) => Err(SyncError::Host(e.to_string())),
    }
}

/// Stages a credential entry's new value (None: a delete) beside the one
/// served, keeping the rate-limit state it held (an update must not hand a
/// key a fresh budget), with CAS: gate workers update that state concurrently.
fn stage_entry(
    held: &SyncState,
    plan: &Plan,
    hash: &Digest,
    record: Option<&[u8]>,
) -> Result<(), SyncError> {
    let mut cell = SharedCounters::default();
    let written = update(&mut cell, &credential_key(hash), |old| {
        Step::Write(stage(old, held, plan, hash, record), ())
    });
    if let Some(e) = cell.error {
        return Err(SyncError::Host(e.to_string()));
    }
    written
        .map_err(|_| SyncError::Conflict("a credential entry kept changing during the push".into()))
}

/// Stages a plan's or tenant's limits into its entry, with CAS: gate
/// workers update a tenant's counters concurrently.
fn stage_limit_entry(held: &SyncState, plan: &Plan, record: &LimitRecord) -> Result<(), SyncError> {
    let mut cell = SharedCounters::default();
    let written = update(&mut cell, &record.key(), |old| {
        Step::Write(
            stage_limit(old, held, plan.stamp, plan.generation, record),
            (),
        )
    });
    if let Some(e) = cell.error {
        return Err(SyncError::Host(e.to_string()));
    }
    written
        .map_err(|_| SyncError::Conflict(format!("{} kept changing during the push", record.key())))
}

/// Merges session revocations into each key's `rs:` entry, with CAS: gate
/// workers read these entries on every token use.
fn apply_revocations(revoked: &[keygate_core::sync::RevokedSession]) -> HostResult<()> {
    if revoked.is_empty() {
        return Ok(());
    }
    // Envoy's clock, the one tokens are issued by.
    let now_ms = host::now_ns()? / 1_000_000;
    let mut by_key: std::collections::BTreeMap<&str, Vec<(&str, u64)>> = Default::default();
    for r in revoked {
        by_key
            .entry(&r.key_id)
            .or_default()
            .push((&r.session_id, r.revoked_at_ms));
    }
    for (key_id, sessions) in by_key {
        let mut cell = SharedCounters::default();
        // Endless contention leaves this key's revocations for the next
        // push (as before); a host error fails the push.
        let _ = update(&mut cell, &revocations_key(key_id), |bytes| {
            Step::Write(merge_revocations(bytes, &sessions, now_ms), ())
        });
        if let Some(e) = cell.error {
            return Err(e);
        }
    }
    Ok(())
}

/// Small JSON bodies of the sync API.
mod serde_json_body {
    use keygate_core::sync::{ListenerError, SyncState};

    pub enum Body {
        State(SyncState),
        Error(ListenerError),
    }

    impl Body {
        pub fn render(&self) -> Vec<u8> {
            match self {
                Body::State(s) => serde_json::to_vec(s).unwrap_or_default(),
                Body::Error(e) => e.body(),
            }
        }
    }
}

use serde_json_body::Body;

impl Context for SyncContext {}

impl HttpContext for SyncContext {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let (method, path) = match (
            host::request_header(":method"),
            host::request_header(":path"),
        ) {
            (Ok(m), Ok(p)) => (m.unwrap_or_default(), p.unwrap_or_default()),
            (Err(e), _) | (_, Err(e)) => return self.fail(e),
        };
        match (method.as_slice(), path.as_slice()) {
            (b"GET", p) if p == STATE_PATH.as_bytes() => {
                match Self::held_state().and_then(|(state, _)| {
                    let (layout, _) = host::shared_get(LAYOUT_KEY)?;
                    Ok(reported_state(state, layout.as_deref()))
                }) {
                    Ok(state) => self.reply(200, &Body::State(state)),
                    Err(e) => return self.fail(e),
                }
            }
            (b"POST", p) if p == PUSH_PATH.as_bytes() => {
                let (length, signature) = match (
                    host::request_header("content-length"),
                    host::request_header(SIGNATURE_HEADER),
                ) {
                    (Ok(l), Ok(s)) => (l, s),
                    (Err(e), _) | (_, Err(e)) => return self.fail(e),
                };
                let too_long = length
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_PUSH_BYTES);
                if too_long {
                    self.refuse(SyncError::TooLarge.into());
                } else if end_of_stream {
                    self.refuse(ListenerError::NoBody);
                } else {
                    // Pausing here would stop the body reaching this filter
                    // too (StopAllIteration); the buffer filter after keygate
                    // holds the request back from the router instead.
                    self.receiving = true;
                    self.signature = signature;
                    return Action::Continue;
                }
            }
            _ => self.refuse(ListenerError::NotFound),
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.receiving {
            return Action::Pause;
        }
        if body_size > MAX_PUSH_BYTES {
            self.receiving = false;
            self.refuse(SyncError::TooLarge.into());
            return Action::Pause;
        }
        if !end_of_stream {
            // Let Envoy buffer until the whole body is here (or trailers
            // end it).
            return Action::Pause;
        }
        let body = match host::request_body(body_size) {
            Ok(body) => body.unwrap_or_default(),
            Err(e) => {
                self.receiving = false;
                return self.fail(e);
            }
        };
        self.finish(&body);
        Action::Pause
    }

    /// Trailers end the body too: answer with what arrived, as the native
    /// build does (the SDK's default would pass the push on to the router).
    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        if !self.receiving {
            return Action::Pause;
        }
        // One byte over the limit tells a body that is too large.
        let body = match host::request_body(MAX_PUSH_BYTES + 1) {
            Ok(body) => body.unwrap_or_default(),
            Err(e) => {
                self.receiving = false;
                return self.fail(e);
            }
        };
        if body.len() > MAX_PUSH_BYTES {
            self.receiving = false;
            self.refuse(SyncError::TooLarge.into());
        } else {
            self.finish(&body);
        }
        Action::Pause
    }
}
