//! One watch of the instances for the whole hub, fanned out to the edge sessions.
//!
//! Every edge session needs the changes to the instances bound to its node. With a
//! store watch per session, every write is read and decoded once per connected edge,
//! so the hub's work and memory grow with edges × writes. Here one watch decodes each
//! write once, keeps the instances by node, and hands each session only its node's
//! changes.
//!
//! It also answers resumes from memory: an edge that returns at revision R gets the
//! instances whose spec (uid, generation or node) changed after R and the names
//! removed from it after R, without reading the store, and only those: a status
//! update is not a change the edge needs. At start it replays the history the store
//! still keeps, so that edges reconnecting to a restarted hub resume with deltas too;
//! an edge older than that history (the *horizon*) gets a snapshot.
//!
//! A session that cannot keep up (its queue of updates is full) is cut off: its edge
//! reconnects and resumes from the revision it has, which costs a delta, not a stall
//! of everyone else.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use verge_api::channel::InstanceChange;
use verge_api::{Instance, InstanceSpec, Kind, kind_prefix};
use verge_store::{EventKind, Store, StoreError, WatchBatch, WatchOptions};

use crate::objects::decode_value;

/// Removals remembered for resumes (all nodes together); older ones move the horizon.
const REMOVALS_KEPT: usize = 200_000;
/// Updates queued for one session before it counts as stuck and is cut off.
const SESSION_QUEUE: usize = 256;
/// How often the store says how far it got when no instance changes: the revision
/// sessions bookmark, and how soon a hub that just started knows it has caught up.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Changes for one node at one revision.
#[derive(Debug)]
pub struct Update {
    /// The revision the node is at once these are applied.
    pub revision: u64,
    /// The changes (never empty).
    pub changes: Vec<InstanceChange>,
}

/// Where a session starts.
#[derive(Debug)]
pub enum Start {
    /// The node's whole desired state at `revision`.
    Snapshot {
        /// Revision of the state.
        revision: u64,
        /// Every instance bound to the node.
        instances: Vec<Instance>,
    },
    /// What changed for the node since the revision it gave; `changes` may be empty.
    Resume {
        /// The revision the node is at once these are applied.
        revision: u64,
        /// Removals first, then upserts.
        changes: Vec<InstanceChange>,
    },
}

/// A session's subscription: where it starts, then its node's updates. Dropping it
/// unsubscribes.
pub struct Subscription {
    /// Where the session starts.
    pub start: Start,
    /// Later updates, in revision order. Ends when the session fell behind. Boxed:
    /// tokio's channel allocates room for 32 when it is made, and a hub holds one per
    /// connected edge (1 KiB of updates, 256 bytes of boxes).
    pub updates: mpsc::Receiver<Box<Update>>,
    fanout: Arc<Fanout>,
    node: String,
    id: u64,
}

impl Subscription {
    /// Take where the session starts (once; the subscription keeps its updates).
    pub fn take_start(&mut self) -> Start {
        std::mem::replace(
            &mut self.start,
            Start::Resume {
                revision: 0,
                changes: Vec::new(),
            },
        )
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.fanout.lock();
        if let Some(slice) = inner.nodes.get_mut(&self.node)
            && slice
                .subscriber
                .as_ref()
                .is_some_and(|(id, _)| *id == self.id)
        {
            slice.subscriber = None;
        }
    }
}

struct Entry {
    instance: Arc<Instance>,
    /// Revision of its last change that the edge must hear about (0: none since the
    /// horizon).
    changed: u64,
}

impl Entry {
    fn ident(&self) -> (&str, u64) {
        (
            &self.instance.metadata.uid,
            self.instance.metadata.generation,
        )
    }
}

#[derive(Default)]
struct NodeSlice {
    instances: BTreeMap<String, Entry>,
    /// `(revision, instance)` of removals from this node, oldest first.
    removed: VecDeque<(u64, String)>,
    subscriber: Option<(u64, mpsc::Sender<Box<Update>>)>,
}

#[derive(Default)]
struct Inner {
    /// Every instance change up to here is in the cache.
    revision: u64,
    /// Resumes from before this revision get a snapshot.
    horizon: u64,
    nodes: HashMap<String, NodeSlice>,
    /// The node each bound instance is on.
    bound: HashMap<String, String>,
    /// `(revision, node)` of every removal remembered, oldest first.
    removals: VecDeque<(u64, String)>,
    /// Instances replaced while a node was cut off, by the node their original copy
    /// is on ([`verge_api::OriginalCopy`]): what a returning node's session settles.
    originals: HashMap<String, std::collections::BTreeSet<String>>,
    /// The same, by instance.
    original_of: HashMap<String, String>,
    next_id: u64,
}

impl Inner {
    /// Note where `name`'s original copy is, if it has one.
    fn note_original(&mut self, name: &str, now: Option<&Instance>) {
        let now = now.and_then(|i| i.status.original.as_ref().map(|o| o.node.clone()));
        if self.original_of.get(name) == now.as_ref() {
            return;
        }
        let was = match &now {
            Some(n) => self.original_of.insert(name.to_string(), n.clone()),
            None => self.original_of.remove(name),
        };
        if let Some(was) = was
            && let Some(names) = self.originals.get_mut(&was)
        {
            names.remove(name);
            if names.is_empty() {
                self.originals.remove(&was);
            }
        }
        if let Some(now) = now {
            self.originals
                .entry(now)
                .or_default()
                .insert(name.to_string());
        }
    }
}

/// The hub's one watch of the instances ([module docs](self)).
#[derive(Default)]
pub struct Fanout {
    inner: Mutex<Inner>,
    loaded: watch::Sender<bool>,
}

fn node_of(i: &Instance) -> Option<&str> {
    i.status.node.as_deref()
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision the cache has caught up with.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// The instances whose original copy is on `node` (replaced while it was cut off).
    pub fn originals_on(&self, node: &str) -> Vec<String> {
        self.lock()
            .originals
            .get(node)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Wait (up to `within`) until the cache has caught up with `revision`; whether
    /// it did.
    pub async fn caught_up(&self, revision: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.revision() < revision {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Subscribe `node`'s session, which has applied everything up to `since` (0: it
    /// has nothing). Waits until the cache is loaded.
    pub async fn subscribe(self: &Arc<Self>, node: &str, since: u64) -> Subscription {
        let mut loaded = self.loaded.subscribe();
        let _ = loaded.wait_for(|l| *l).await;
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let (revision, horizon) = (inner.revision, inner.horizon);
        let slice = inner.nodes.entry(node.to_string()).or_default();
        let start = if since == 0 || since < horizon {
            Start::Snapshot {
                revision,
                instances: slice
                    .instances
                    .values()
                    .map(|e| (*e.instance).clone())
                    .collect(),
            }
        } else {
            let mut changes: Vec<InstanceChange> = slice
                .removed
                .iter()
                .filter(|(r, name)| *r > since && !slice.instances.contains_key(name))
                .map(|(_, name)| InstanceChange::Remove { name: name.clone() })
                .collect();
            changes.sort_by(|a, b| change_name(a).cmp(change_name(b)));
            changes.dedup_by(|a, b| change_name(a) == change_name(b));
            changes.extend(
                slice
                    .instances
                    .values()
                    .filter(|e| e.changed > since)
                    .map(|e| InstanceChange::Upsert {
                        instance: Box::new((*e.instance).clone()),
                    }),
            );
            Start::Resume {
                revision: revision.max(since),
                changes,
            }
        };
        slice.subscriber = Some((id, tx));
        Subscription {
            start,
            updates: rx,
            fanout: self.clone(),
            node: node.to_string(),
            id,
        }
    }

    /// Keep the cache: load it, then follow the store. Runs for the hub's lifetime;
    /// when the watch fails (the store was compacted past it, or it went away) the
    /// cache is loaded again and every session is cut off to resume.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            if let Err(e) = self.load_and_follow(store.as_ref()).await {
                tracing::warn!(error = %e, "the instance watch failed; loading it again");
            }
            self.loaded.send_replace(false);
            // Sessions of the old cache resume against the new one.
            *self.lock() = Inner::default();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn load_and_follow(&self, store: &dyn Store) -> Result<(), StoreError> {
        let prefix = kind_prefix(InstanceSpec::PLURAL);
        let listed = store.range(&prefix).await?;
        let options = WatchOptions {
            progress: Some(PROGRESS_EVERY),
        };
        // Replay the history still kept (for resumes), then follow.
        let (mut watch, oldest) = match store.watch_with(&prefix, 1, options).await {
            Ok(w) => (w, 1),
            Err(StoreError::Compacted {
                compact_revision, ..
            }) => {
                let from = compact_revision.max(1);
                (store.watch_with(&prefix, from, options).await?, from)
            }
            Err(e) => return Err(e),
        };
        {
            let mut inner = self.lock();
            *inner = Inner {
                revision: listed.revision,
                horizon: oldest.saturating_sub(1),
                ..Inner::default()
            };
            for kv in &listed.kvs {
                let Some(i) = decode_value::<InstanceSpec>(&kv.value, kv.mod_revision) else {
                    continue;
                };
                inner.note_original(i.name(), Some(&i));
                let Some(node) = node_of(&i).map(str::to_string) else {
                    continue;
                };
                let name = i.name().to_string();
                inner.bound.insert(name.clone(), node.clone());
                inner.nodes.entry(node).or_default().instances.insert(
                    name,
                    Entry {
                        instance: Arc::new(i),
                        changed: 0,
                    },
                );
            }
        }
        let listed_at = listed.revision;
        // Loaded once the replay reaches the list's revision: a change after it, or
        // the store's word (a progress notification) that nothing came in between.
        while let Some(batch) = watch.recv().await {
            let batch = batch?;
            if batch.revision <= listed_at {
                self.replay(&prefix, &batch);
            } else {
                self.apply(&prefix, batch);
            }
            if !*self.loaded.borrow() && self.revision() >= listed_at {
                self.loaded.send_replace(true);
            }
        }
        Err(StoreError::Backend("the instance watch ended".into()))
    }

    /// A batch from before the list: note what it means for resumes (which changes
    /// the edges must hear about again, which removals) without touching the state,
    /// which the list already holds.
    fn replay(&self, prefix: &str, batch: &WatchBatch) {
        let mut inner = self.lock();
        for ev in &batch.events {
            let name = ev.kv.key.trim_start_matches(prefix);
            let prev = ev
                .prev_kv
                .as_ref()
                .and_then(|p| decode_value::<InstanceSpec>(&p.value, p.mod_revision));
            let new = match ev.kind {
                EventKind::Put => decode_value::<InstanceSpec>(&ev.kv.value, ev.kv.mod_revision),
                EventKind::Delete => None,
            };
            let (was, now) = (
                prev.as_ref().and_then(node_of),
                new.as_ref().and_then(node_of),
            );
            if let Some(was) = was
                && now != Some(was)
            {
                remember_removal(&mut inner, was, name, batch.revision);
            }
            if let (Some(now), Some(new)) = (now, &new) {
                let same = prev.as_ref().is_some_and(|p| {
                    node_of(p) == Some(now)
                        && p.metadata.uid == new.metadata.uid
                        && p.metadata.generation == new.metadata.generation
                });
                if !same
                    && let Some(e) = inner
                        .nodes
                        .get_mut(now)
                        .and_then(|s| s.instances.get_mut(name))
                    && e.instance.metadata.uid == new.metadata.uid
                {
                    e.changed = e.changed.max(batch.revision);
                }
            }
        }
        inner.revision = inner.revision.max(batch.revision);
    }

    /// A live batch: update the cache and hand each node's session its changes.
    fn apply(&self, prefix: &str, batch: WatchBatch) {
        let mut inner = self.lock();
        let revision = batch.revision;
        let mut out: BTreeMap<String, Vec<InstanceChange>> = BTreeMap::new();
        for ev in batch.events {
            let name = ev.kv.key.trim_start_matches(prefix).to_string();
            let new = match ev.kind {
                EventKind::Put => decode_value::<InstanceSpec>(&ev.kv.value, ev.kv.mod_revision),
                EventKind::Delete => None,
            };
            inner.note_original(&name, new.as_ref());
            let was = inner.bound.get(&name).cloned();
            let now = new.as_ref().and_then(node_of).map(str::to_string);
            if let Some(was) = &was
                && now.as_ref() != Some(was)
            {
                if let Some(s) = inner.nodes.get_mut(was) {
                    s.instances.remove(&name);
                }
                inner.bound.remove(&name);
                remember_removal(&mut inner, was, &name, revision);
                out.entry(was.clone())
                    .or_default()
                    .push(InstanceChange::Remove { name: name.clone() });
            }
            let (Some(now), Some(new)) = (now, new) else {
                continue;
            };
            inner.bound.insert(name.clone(), now.clone());
            let slice = inner.nodes.entry(now.clone()).or_default();
            let new = Arc::new(new);
            match slice.instances.get_mut(&name) {
                Some(e) if e.ident() == (new.metadata.uid.as_str(), new.metadata.generation) => {
                    // Status only: the edge has it already.
                    e.instance = new;
                }
                _ => {
                    slice.instances.insert(
                        name,
                        Entry {
                            instance: new.clone(),
                            changed: revision,
                        },
                    );
                    out.entry(now).or_default().push(InstanceChange::Upsert {
                        instance: Box::new((*new).clone()),
                    });
                }
            }
        }
        inner.revision = inner.revision.max(revision);
        for (node, changes) in out {
            let Some(slice) = inner.nodes.get_mut(&node) else {
                continue;
            };
            let Some((_, tx)) = &slice.subscriber else {
                continue;
            };
            if tx.try_send(Box::new(Update { revision, changes })).is_err() {
                // Full (stuck) or gone: either way the session ends, and the edge
                // resumes from its revision.
                tracing::warn!(node = %node, "edge session fell behind its updates; it resumes after reconnecting");
                slice.subscriber = None;
            }
        }
    }
}

fn change_name(c: &InstanceChange) -> &str {
    match c {
        InstanceChange::Upsert { instance } => instance.name(),
        InstanceChange::Remove { name } => name,
    }
}

fn remember_removal(inner: &mut Inner, node: &str, name: &str, revision: u64) {
    inner
        .nodes
        .entry(node.to_string())
        .or_default()
        .removed
        .push_back((revision, name.to_string()));
    inner.removals.push_back((revision, node.to_string()));
    while inner.removals.len() > REMOVALS_KEPT {
        let Some((r, n)) = inner.removals.pop_front() else {
            break;
        };
        if let Some(s) = inner.nodes.get_mut(&n) {
            s.removed.pop_front();
        }
        inner.horizon = inner.horizon.max(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_store::MemoryStore;
    use verge_store::{Op, Txn};

    fn instance(name: &str, uid: &str, generation: u64, node: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "kind": "Instance",
            "metadata": {"name": name, "uid": uid, "generation": generation},
            "spec": {"form": "process", "process": {"command": ["/bin/true"]}},
            "status": {"message": "x"},
        });
        if let Some(n) = node {
            v["status"]["node"] = n.into();
        }
        serde_json::to_vec(&v).expect("json")
    }

    async fn put(store: &dyn Store, ops: Vec<Op>) -> u64 {
        store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await
            .expect("txn")
            .revision
    }

    /// Put instance `name` bound to `node`, as one transaction; its revision.
    async fn put_instance(
        store: &dyn Store,
        name: &str,
        uid: &str,
        generation: u64,
        node: &str,
    ) -> u64 {
        put(
            store,
            vec![Op::put(
                key(name),
                instance(name, uid, generation, Some(node)),
            )],
        )
        .await
    }

    fn key(name: &str) -> String {
        verge_api::object_key(InstanceSpec::PLURAL, name)
    }

    fn names(changes: &[InstanceChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                InstanceChange::Upsert { instance } => format!("+{}", instance.name()),
                InstanceChange::Remove { name } => format!("-{name}"),
            })
            .collect()
    }

    async fn started(store: Arc<dyn Store>) -> Arc<Fanout> {
        let f = Arc::new(Fanout::default());
        tokio::spawn(f.clone().run(store));
        f
    }

    #[tokio::test]
    async fn a_resume_gets_only_what_changed_for_its_node_also_from_a_restarted_hub() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        put(
            store.as_ref(),
            vec![
                Op::put(key("a"), instance("a", "ua", 1, Some("n1"))),
                Op::put(key("b"), instance("b", "ub", 1, Some("n1"))),
                Op::put(key("c"), instance("c", "uc", 1, Some("n2"))),
            ],
        )
        .await;
        let hub = started(store.clone()).await;
        let Start::Snapshot {
            revision,
            instances,
        } = hub.subscribe("n1", 0).await.take_start()
        else {
            panic!("first contact gets a snapshot");
        };
        assert_eq!(instances.len(), 2);
        let since = revision;
        // After the edge's revision: a status update of a (not a change the edge
        // needs), b moved away, a new d, and another node's change.
        put_instance(store.as_ref(), "a", "ua", 1, "n1").await;
        put_instance(store.as_ref(), "b", "ub", 1, "n2").await;
        put_instance(store.as_ref(), "d", "ud", 1, "n1").await;
        let last = put_instance(store.as_ref(), "c", "uc", 2, "n2").await;
        // The live cache, and a hub started afterwards on the same store (it replays
        // the history): the same delta.
        let restarted = started(store.clone()).await;
        for f in [&hub, &restarted] {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while f.revision() < last {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cache caught up"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            match f.subscribe("n1", since).await.take_start() {
                Start::Resume { revision, changes } => {
                    assert_eq!(names(&changes), ["-b", "+d"]);
                    assert!(revision >= last);
                }
                Start::Snapshot { .. } => panic!("a resume within the history kept"),
            }
        }
    }

    #[tokio::test]
    async fn a_session_hears_its_nodes_changes_and_not_status_echoes() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let f = started(store.clone()).await;
        let mut sub = f.subscribe("n1", 0).await;
        put_instance(store.as_ref(), "a", "ua", 1, "n1").await;
        put_instance(store.as_ref(), "a", "ua", 1, "n1").await;
        put_instance(store.as_ref(), "z", "uz", 1, "n9").await;
        put(store.as_ref(), vec![Op::delete(key("a"))]).await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let u = tokio::time::timeout(Duration::from_secs(5), sub.updates.recv())
                .await
                .expect("an update")
                .expect("open");
            seen.extend(names(&u.changes));
        }
        assert_eq!(seen, ["+a", "-a"]);
    }
}
