//! An in-memory backend with the same semantics as the SQLite one: for fast tests and
//! for the fleet simulator, where durability is not the point. Everything is lost
//! when the value is dropped.
//!
//! The state (current keys and the history of change batches, each event carrying
//! its previous value) sits behind one mutex; live batches are also published on a
//! broadcast channel. A watch replays history from its start revision, then follows
//! the live feed, skipping revisions it has already sent, and goes back to history
//! when it falls behind the feed, exactly as the SQLite backend does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use crate::lease::LeaseBook;
use crate::{
    Event, EventKind, KeyValue, Lease, LeaseId, Op, Store, StoreError, Txn, TxnResult, WatchBatch,
    WatchOptions, WatchStream, check_key, prefix_end,
};

/// Batches a watch queues for a reader that has not taken them yet (as SQLite's).
const WATCH_QUEUE: usize = 8;
/// Batches replayed from history per lock taken.
const REPLAY_PAGE: usize = 256;

#[derive(Default)]
struct State {
    revision: u64,
    compact_revision: u64,
    current: BTreeMap<String, KeyValue>,
    /// Every batch from `compact_revision` on, in revision order.
    history: VecDeque<WatchBatch>,
    leases: LeaseBook,
}

/// The in-memory store. Cloning shares the same data.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<Arc<WatchBatch>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        let store = Self {
            state: Arc::new(Mutex::new(State::default())),
            live: broadcast::channel(4096).0,
        };
        // Leases expire on a thread of their own, which ends with the store.
        let state = Arc::downgrade(&store.state);
        let live = store.live.clone();
        let _ = std::thread::Builder::new()
            .name("verge-store-leases".into())
            .spawn(move || expire_leases(state, live));
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply `txn` and publish what it changed (under the lock, so the live feed is in
    /// revision order).
    fn commit(&self, state: &mut State, txn: &Txn) -> Result<TxnResult, StoreError> {
        commit(state, txn, &self.live)
    }
}

fn commit(
    state: &mut State,
    txn: &Txn,
    live: &broadcast::Sender<Arc<WatchBatch>>,
) -> Result<TxnResult, StoreError> {
    let attachments = state.leases.check(txn)?;
    let (result, batch) = apply(state, txn)?;
    if result.succeeded {
        state.leases.apply(attachments);
    }
    if let Some(b) = batch {
        let _ = live.send(Arc::new(b));
    }
    Ok(result)
}

fn revoke(
    state: &mut State,
    id: LeaseId,
    live: &broadcast::Sender<Arc<WatchBatch>>,
) -> Result<(), StoreError> {
    let deletes = state.leases.remove(id);
    commit(state, &deletes, live).map(|_| ())
}

fn expire_leases(state: Weak<Mutex<State>>, live: broadcast::Sender<Arc<WatchBatch>>) {
    loop {
        // Its own thread, never a tokio worker.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(crate::lease::EXPIRY_CHECK);
        let Some(state) = state.upgrade() else { return };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        for id in s.leases.expired() {
            let _ = revoke(&mut s, id, &live);
        }
    }
}

fn apply(state: &mut State, txn: &Txn) -> Result<(TxnResult, Option<WatchBatch>), StoreError> {
    for op in &txn.ops {
        check_key(op.key())?;
    }
    let current_rev = state.revision;
    let unchanged = |prev: Option<Vec<Option<KeyValue>>>| TxnResult {
        succeeded: prev.is_some(),
        revision: current_rev,
        prev: prev.unwrap_or_default(),
    };
    for c in &txn.compares {
        let actual = state.current.get(&c.key).map_or(0, |kv| kv.mod_revision);
        if actual != c.mod_revision {
            return Ok((unchanged(None), None));
        }
    }
    let rev = current_rev + 1;
    let mut prev = Vec::with_capacity(txn.ops.len());
    let mut events = Vec::new();
    for op in &txn.ops {
        match op {
            Op::Put { key, value, .. } => {
                let old = state.current.get(key).cloned();
                let (create_revision, version) = old
                    .as_ref()
                    .map_or((rev, 1), |kv| (kv.create_revision, kv.version + 1));
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision,
                    mod_revision: rev,
                    version,
                };
                state.current.insert(key.clone(), kv.clone());
                events.push(Event {
                    kind: EventKind::Put,
                    kv,
                    prev_kv: old.clone(),
                });
                prev.push(old);
            }
            Op::Delete { key } => {
                let old = state.current.remove(key);
                if let Some(kv) = &old {
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: key.clone(),
                            value: Vec::new(),
                            create_revision: kv.create_revision,
                            mod_revision: rev,
                            version: 0,
                        },
                        prev_kv: Some(kv.clone()),
                    });
                }
                prev.push(old);
            }
        }
    }
    if events.is_empty() {
        // Nothing changed (deleting absent keys): no new revision.
        return Ok((unchanged(Some(prev)), None));
    }
    state.revision = rev;
    let batch = WatchBatch {
        revision: rev,
        events,
    };
    state.history.push_back(batch.clone());
    Ok((
        TxnResult {
            succeeded: true,
            revision: rev,
            prev,
        },
        Some(batch),
    ))
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().current.get(key).cloned())
    }

    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::RangePage, StoreError> {
        use std::ops::Bound;
        let s = self.lock();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let kvs = s
            .current
            .range((start, Bound::Excluded(prefix_end(prefix))))
            .take(limit.saturating_add(1))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(crate::page_of(kvs, s.revision, limit))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let mut s = self.lock();
        self.commit(&mut s, &txn)
    }

    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<Lease, StoreError> {
        let id = self.lock().leases.grant(ttl);
        Ok(Lease { id, ttl })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.lock().leases.keep_alive(id)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut s = self.lock();
        revoke(&mut s, id, &self.live)
    }

    async fn watch_with(
        &self,
        prefix: &str,
        from_revision: u64,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history so that nothing committed in between is
        // missed; revisions seen twice are skipped.
        let mut live = self.live.subscribe();
        let mut next = {
            let s = self.lock();
            crate::watch_start(from_revision, s.revision, s.compact_revision)?
        };
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            loop {
                // Replay history from `next` until caught up.
                loop {
                    let page: Result<Vec<WatchBatch>, StoreError> = {
                        let s = this.lock();
                        if next > s.revision {
                            break;
                        }
                        if next < s.compact_revision {
                            Err(StoreError::Compacted {
                                requested: next,
                                compact_revision: s.compact_revision,
                            })
                        } else {
                            Ok(s.history
                                .iter()
                                .skip_while(|b| b.revision < next)
                                .take(REPLAY_PAGE)
                                .cloned()
                                .collect())
                        }
                    };
                    let page = match page {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    let Some(last) = page.last().map(|b| b.revision) else {
                        break;
                    };
                    for b in page.iter().filter_map(|b| crate::filter_batch(b, &prefix)) {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    next = last + 1;
                }
                // Follow live commits; behind the feed, back to history.
                if let crate::LiveEnd::Done =
                    crate::follow_live(&mut live, &mut next, &prefix, &tx, options.progress).await
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut s = self.lock();
        let revision = revision.min(s.revision + 1);
        if revision <= s.compact_revision {
            return Ok(());
        }
        while s.history.front().is_some_and(|b| b.revision < revision) {
            s.history.pop_front();
        }
        s.compact_revision = revision;
        Ok(())
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().revision)
    }

    async fn compact_revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().compact_revision)
    }
}
