//! The sync role per stream: the sidecar's loopback listener protocol, as in
//! the wasm build (`src/sync_context.rs`): read the held state, or push a
//! signed batch that is validated in full (`keygate_core::sync::plan`) before
//! it is applied — here to the process-wide tables: batches are staged, and
//! the last one switches the committed set with one atomic swap.

use crate::abi;
use crate::config::FilterConfig;
use crate::envoy::{log, Stream};
use crate::state::{tables, Snapshot, Staged, TooBig};
use keygate_core::shared_data::{revocations_key, CONFIG_IDS_KEY};
use keygate_core::sync::{
    check_config_ids, decode_record, plan, stage_limit, ListenerError, RevokedSession, SyncError,
    SyncState, BINARY_VERSION_TEXT, FORMAT_HEADER, MAX_PUSH_BYTES, PUSH_PATH, SIGNATURE_HEADER,
    STATE_PATH,
};
use keygate_core::token::merge_revocations;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Staged bytes above which a commit logs what the tables now hold.
const LOG_SIZES_AFTER: usize = 16 << 20;

pub struct SyncFilter {
    config: Arc<FilterConfig>,
    receiving: bool,
    signature: Option<Vec<u8>>,
}

enum Body {
    State(SyncState),
    Error(ListenerError),
}

fn render(body: &Body) -> Vec<u8> {
    match body {
        Body::State(s) => serde_json::to_vec(s).unwrap_or_default(),
        Body::Error(e) => e.body(),
    }
}

fn refuse(stream: Stream, e: ListenerError) {
    reply(stream, e.status(), &Body::Error(e));
}

fn reply(stream: Stream, status: u16, body: &Body) {
    stream.send_response(
        status,
        // The binary push format this module reads (see the wasm build).
        &[
            ("content-type", "application/json"),
            (FORMAT_HEADER, BINARY_VERSION_TEXT),
        ],
        &render(body),
        "keygate_sync",
    );
}

/// Applies a batch: plan against the held state, stage its writes, and on
/// the last batch build the committed tables from everything staged (a
/// full set replaces the old one) and store them with the new state at
/// once. A refused batch changes nothing; a push that never commits is
/// never served.
fn apply(secret: &[u8], body: &[u8], signature: Option<&[u8]>) -> Result<SyncState, SyncError> {
    let t = tables();
    let (state, upserts, deletes, revoked, committed, seeds) =
        t.update(|current: &Snapshot, staged: &mut Staged| {
            let plan = plan(secret, body, signature, &current.state)?;
            check_config_ids(&plan, t.read(CONFIG_IDS_KEY).as_deref())?;
            for (hash, bytes) in &plan.upserts {
                // `plan` validated each record; one that does not decode would
                // be a core bug: refuse the push rather than half-apply.
                decode_record(bytes, hash)
                    .map(|_| ())
                    .or_else(|| keygate_core::entry::alias_target(bytes, hash).map(|_| ()))
                    .ok_or_else(|| SyncError::Invalid("unreadable credential record".into()))?;
            }
            if current.state.pending.map(|p| p.stamp) != Some(plan.stamp)
                || staged.stamp != plan.stamp
            {
                // A new push: whatever an abandoned one staged goes.
                *staged = Staged {
                    stamp: plan.stamp,
                    ..Staged::default()
                };
            }
            for (hash, bytes) in &plan.upserts {
                staged.upsert(hash, bytes);
            }
            for hash in &plan.deletes {
                staged.delete(hash);
            }
            // Tokens name their key by id: the id → hash-prefix index (a stale
            // entry is harmless, the gate checks the credential it leads to).
            for (key_id, hash) in &plan.key_ids {
                staged.key_id(key_id, hash);
            }
            let committed = plan.commit.map(|_| staged.bytes());
            // Quota usage a full push carries (counted from the request log):
            // the counters a key starts from if this process holds none.
            // (`key_ids` pairs with the credential upserts, which come first;
            // roll aliases follow them and carry no counters.)
            let seeds: Vec<(String, Vec<u8>)> = plan
                .key_ids
                .iter()
                .zip(&plan.upserts)
                .filter_map(|((key_id, _), (_, bytes))| {
                    let seed = keygate_core::entry::counters(bytes)?;
                    (!seed.0.is_empty()).then(|| (key_id.clone(), seed.encode()))
                })
                .collect();
            let next = match plan.commit {
                Some(commit) => {
                    let next = staged.commit(current, commit, plan.full);
                    // Committed or refused, the push's staged writes go; a
                    // refused one leaves the tables and the state as they
                    // were (never a partly applied push).
                    *staged = Staged::default();
                    next.map_err(|TooBig| {
                        SyncError::Host(
                            "push refused: the credential tables would exceed 4 GiB in one shard"
                                .into(),
                        )
                    })?
                }
                None => Snapshot {
                    state: plan.result(),
                    ..current.clone()
                },
            };
            // Plan and tenant limits are staged in their entries under the
            // push's stamp: served once the snapshot returned here carries
            // its commit, in the same swap as the keys (a tenant's counters
            // go on; the slot's lock orders this write with the gate's).
            // After every step that can refuse the batch: a refused batch
            // stores no state, so its stamp is given again to the next push,
            // which must find nothing of it.
            for r in &plan.limit_records {
                t.modify(&r.key(), |held| {
                    stage_limit(held, &current.state, plan.stamp, plan.generation, r)
                });
            }
            let out = (
                next.state,
                plan.upserts.len(),
                plan.deletes.len(),
                plan.revoked_sessions,
                committed,
                seeds,
            );
            Ok((Some(next), out))
        })?;
    if committed.is_some_and(|bytes| bytes > LOG_SIZES_AFTER) {
        let snapshot = t.snapshot();
        let (keys, key_bytes) = snapshot.credentials.size();
        let (ids, id_bytes) = snapshot.key_ids.size();
        log(
            abi::LOG_INFO,
            &format!(
                "keygate sync: tables hold {keys} credentials in {key_bytes} bytes, {ids} key ids in {id_bytes} bytes"
            ),
        );
    }
    // Rate counters of pushed keys are created at their first request (under
    // the tables' `new_slots` lock, so never twice): unused keys cost no
    // counter memory.
    apply_revocations(&revoked);
    for (key_id, seed) in &seeds {
        t.modify(
            &keygate_core::shared_data::counter_key(key_id),
            |current| match current.filter(|c| !c.is_empty()) {
                Some(held) => held.to_vec(),
                None => seed.clone(),
            },
        );
    }
    log(
        abi::LOG_INFO,
        &format!(
            "keygate sync: applied {upserts} upserts, {deletes} deletes; generation {} version {}",
            state.generation, state.version
        ),
    );
    Ok(state)
}

/// Merges session revocations into each key's revocation counter, which the
/// gate reads on every token use.
fn apply_revocations(revoked: &[RevokedSession]) {
    // The clock tokens are issued by (the gate's, this process's).
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut by_key: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    for r in revoked {
        by_key
            .entry(&r.key_id)
            .or_default()
            .push((&r.session_id, r.revoked_at_ms));
    }
    for (key_id, sessions) in by_key {
        tables().modify(&revocations_key(key_id), |current| {
            merge_revocations(current, &sessions, now_ms)
        });
    }
}

impl SyncFilter {
    pub fn new(config: Arc<FilterConfig>) -> SyncFilter {
        SyncFilter {
            config,
            receiving: false,
            signature: None,
        }
    }

    pub fn on_request_headers(&mut self, stream: Stream, end_of_stream: bool) -> u32 {
        let method = stream.request_header(":method").unwrap_or_default();
        let path = stream.request_header(":path").unwrap_or_default();
        match (method.as_slice(), path.as_slice()) {
            (b"GET", p) if p == STATE_PATH.as_bytes() => {
                reply(stream, 200, &Body::State(tables().snapshot().state));
            }
            (b"POST", p) if p == PUSH_PATH.as_bytes() => {
                let too_long = stream
                    .request_header("content-length")
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_PUSH_BYTES);
                if too_long {
                    refuse(stream, SyncError::TooLarge.into());
                } else if end_of_stream {
                    refuse(stream, ListenerError::NoBody);
                } else {
                    // Held here until the whole body is in and answered.
                    self.receiving = true;
                    self.signature = stream.request_header(SIGNATURE_HEADER);
                }
            }
            _ => refuse(stream, ListenerError::NotFound),
        }
        abi::HEADERS_STOP_ITERATION
    }

    pub fn on_request_body(&mut self, stream: Stream, end_of_stream: bool) -> u32 {
        if !self.receiving {
            return abi::BODY_STOP_ITERATION_NO_BUFFER;
        }
        if stream.request_body_size() > MAX_PUSH_BYTES {
            self.receiving = false;
            refuse(stream, SyncError::TooLarge.into());
            return abi::BODY_STOP_ITERATION_NO_BUFFER;
        }
        if !end_of_stream {
            return abi::BODY_STOP_ITERATION_AND_BUFFER;
        }
        self.finish(stream);
        abi::BODY_STOP_ITERATION_NO_BUFFER
    }

    /// Trailers end the body too: answer with what arrived.
    pub fn on_request_trailers(&mut self, stream: Stream) -> u32 {
        if self.receiving {
            self.finish(stream);
        }
        abi::TRAILERS_STOP_ITERATION
    }

    fn finish(&mut self, stream: Stream) {
        self.receiving = false;
        let Some(secret) = self
            .config
            .policy()
            .and_then(|p| p.sync_secret.as_ref().map(|s| s.0.clone()))
        else {
            refuse(stream, ListenerError::NotConfigured);
            return;
        };
        let body = stream.request_body();
        match apply(&secret, &body, self.signature.as_deref()) {
            Ok(state) => reply(stream, 200, &Body::State(state)),
            Err(e) => {
                log(
                    abi::LOG_WARN,
                    &format!(
                        "keygate sync: refused push ({}): {}",
                        e.status(),
                        e.message()
                    ),
                );
                refuse(stream, e.into());
            }
        }
    }
}
