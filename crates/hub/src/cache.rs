//! The controllers' view of the store: instances, nodes, regions and ledgers, decoded
//! once as they change and kept in memory, fed by one watch.
//!
//! A scheduling pass used to list and decode every instance, node and ledger: at
//! 30,000 edges with an operator applying a few instances a second, half of the hub's
//! CPU went to decoding the same objects again on every pass. Here every write is
//! decoded once, the instances that wait for a node are known at all times (a kick
//! with nothing to place costs nothing), and a pass takes shared references to what
//! is cached instead of a fresh copy of the store.
//!
//! What a pass reads may be a moment behind the store. That is safe: placements are
//! committed with compare-and-swap on the instance's and the ledgers' revisions, so a
//! plan made on stale data fails and is made again. To keep that rare, a pass first
//! waits until the cache has seen the store's current revision (every write that could
//! have kicked it).
//!
//! The cache runs with the controllers, on the replica that leads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use verge_api::{Instance, InstancePhase, InstanceSpec, Kind, Node, NodeSpec, Region, RegionSpec};
use verge_store::{EventKind, Store, StoreError, WatchBatch, WatchOptions};

use crate::inventory::{LEDGER_PREFIX, Ledger, Versioned, decode_ledger};
use crate::objects::decode_value;
use crate::state::HubState;

/// How often the store says how far it got when nothing changes (so a pass waiting to
/// catch up with the store's revision is not left waiting for the next write).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How long a pass waits for the cache to reach the store's revision before it reads
/// the store itself.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(2);

/// Whether an instance waits for a node: unbound, and not finished.
pub fn waits_for_node(i: &Instance) -> bool {
    i.status.node.is_none()
        && !matches!(
            i.status.phase,
            InstancePhase::Succeeded | InstancePhase::Failed
        )
}

/// Whether an instance write may need the scheduler: it is new, its spec changed while
/// it waits for a node, or it lost its node. (The scheduler's own notes on a pending
/// instance do not count, or every pass would wake the next.)
pub fn needs_placement(new: &Instance, prev: Option<&Instance>) -> bool {
    let Some(prev) = prev else {
        return true;
    };
    // Only what is unbound needs placing: a new spec of an instance that stays on its
    // node is the edge's to apply.
    new.status.node.is_none()
        && (prev.metadata.generation != new.metadata.generation || prev.status.node.is_some())
}

/// Whether a node write changes what can be placed on it.
pub fn node_changed(new: &Node, prev: Option<&Node>) -> bool {
    let Some(prev) = prev else {
        return true;
    };
    prev.status.phase != new.status.phase
        || prev.status.allocatable != new.status.allocatable
        || prev.metadata.generation != new.metadata.generation
}

/// What a scheduling pass plans from.
pub struct World {
    /// Every instance.
    pub instances: Vec<Arc<Instance>>,
    /// Every node.
    pub nodes: Vec<Arc<Node>>,
    /// Every region.
    pub regions: Vec<Arc<Region>>,
    /// Every ledger, by node name, with the revision a commit compares.
    pub ledgers: BTreeMap<String, Versioned<Ledger>>,
}

impl World {
    /// Everything read from the store itself (no cache).
    pub async fn read(
        st: &HubState,
        instances: Vec<Instance>,
    ) -> Result<Self, verge_api::ApiError> {
        let (nodes, _) = st.objects.list::<NodeSpec>().await?;
        let (regions, _) = st.objects.list::<RegionSpec>().await?;
        let ledgers = crate::inventory::ledgers(st.objects.store().as_ref()).await?;
        Ok(Self {
            instances: instances.into_iter().map(Arc::new).collect(),
            nodes: nodes.into_iter().map(Arc::new).collect(),
            regions: regions.into_iter().map(Arc::new).collect(),
            ledgers,
        })
    }
}

#[derive(Default)]
struct Inner {
    instances: BTreeMap<String, Arc<Instance>>,
    nodes: BTreeMap<String, Arc<Node>>,
    regions: BTreeMap<String, Arc<Region>>,
    ledgers: BTreeMap<String, Versioned<Ledger>>,
    /// Names of the instances that wait for a node.
    waiting: BTreeSet<String>,
}

/// The controllers' cache ([module docs](self)).
pub struct ControllerCache {
    inner: Mutex<Inner>,
    /// The revision the cache has caught up with (0: not loaded).
    revision: watch::Sender<u64>,
}

impl Default for ControllerCache {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            revision: watch::Sender::new(0),
        }
    }
}

impl ControllerCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision the cache has caught up with (0 until it is loaded).
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Whether any instance waits for a node.
    pub fn any_waiting(&self) -> bool {
        !self.lock().waiting.is_empty()
    }

    /// Every node (shared with the cache).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock().nodes.values().cloned().collect()
    }

    /// Every region (shared with the cache).
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.lock().regions.values().cloned().collect()
    }

    /// Every instance (shared with the cache).
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.lock().instances.values().cloned().collect()
    }

    /// What a pass plans from: shared objects, and a copy of the ledgers (a pass
    /// moves them on as it commits).
    pub fn world(&self) -> World {
        let inner = self.lock();
        World {
            instances: inner.instances.values().cloned().collect(),
            nodes: inner.nodes.values().cloned().collect(),
            regions: inner.regions.values().cloned().collect(),
            ledgers: inner.ledgers.clone(),
        }
    }

    /// Wait until the cache has seen every write up to the store's current revision;
    /// whether it has (false: the store could not be read, or the cache is behind
    /// after [`CATCH_UP_WITHIN`], and the caller should read the store).
    pub async fn catch_up(&self, store: &dyn Store) -> bool {
        let Ok(target) = store.revision().await else {
            return false;
        };
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(CATCH_UP_WITHIN, rx.wait_for(|r| *r >= target && *r > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Run `pass` every `every` (a pass that overruns delays the next) once the cache
    /// is loaded, for as long as the task runs: the periodic controllers' loop.
    pub async fn every<F, Fut>(&self, every: Duration, mut pass: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.revision() != 0 {
                pass().await;
            }
        }
    }

    /// Keep the cache for as long as the task runs: load it, then follow the store,
    /// and kick the scheduler whenever a change may make work for it. When the watch
    /// fails (compacted past, or the store went away) it is loaded again.
    pub async fn run(self: Arc<Self>, st: Arc<HubState>) {
        loop {
            if let Err(e) = self.load_and_follow(&st).await {
                tracing::warn!(error = %e, "the controllers' watch failed; loading it again");
            }
            self.revision.send_replace(0);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn load_and_follow(&self, st: &HubState) -> Result<(), StoreError> {
        let store = st.objects.store();
        // Each kind is listed at its own revision; the watch starts after the oldest,
        // and replaying a change the list already holds changes nothing (a change
        // applies only over an older revision of its key).
        let mut lists = Vec::new();
        let mut from = u64::MAX;
        for prefix in prefixes() {
            let listed = store.range(prefix).await?;
            from = from.min(listed.revision);
            lists.push(listed);
        }
        let options = WatchOptions {
            progress: Some(PROGRESS_EVERY),
        };
        let mut watch = store.watch_with("/", from + 1, options).await?;
        {
            let mut inner = self.lock();
            *inner = Inner::default();
            for kv in lists.iter().flat_map(|l| &l.kvs) {
                // Loading records nothing: what it finds happened before.
                put(
                    &mut inner,
                    &kv.key,
                    &kv.value,
                    kv.mod_revision,
                    &mut Vec::new(),
                );
            }
        }
        self.revision.send_replace(from.max(1));
        // A fresh cache: whatever waits is worth a look.
        st.schedule_kick.notify_one();
        while let Some(batch) = watch.recv().await {
            let batch = batch?;
            let (work, events) = self.apply_observed(&batch);
            if work {
                st.schedule_kick.notify_one();
            }
            // Only the leader runs this cache: each change is recorded once.
            st.events.record_all(events);
            self.revision
                .send_replace(batch.revision.max(self.revision()));
        }
        Err(StoreError::Backend("the controllers' watch ended".into()))
    }

    /// Apply a batch of changes; whether it may make work for the scheduler.
    pub fn apply(&self, batch: &WatchBatch) -> bool {
        self.apply_observed(batch).0
    }

    /// Apply a batch of changes: whether it may make work for the scheduler, and the
    /// events its changes to nodes and instances make ([`crate::events`]).
    pub fn apply_observed(&self, batch: &WatchBatch) -> (bool, Vec<verge_api::event::Event>) {
        let mut inner = self.lock();
        let mut work = false;
        let mut events = Vec::new();
        for ev in &batch.events {
            let key = ev.kv.key.as_str();
            let revision = ev.revision();
            work |= match ev.kind {
                EventKind::Put => put(&mut inner, key, &ev.kv.value, revision, &mut events),
                EventKind::Delete => delete(&mut inner, key, revision),
            };
        }
        (work, events)
    }
}

/// The key prefixes the cache holds: instances, nodes, regions, ledgers.
fn prefixes() -> &'static [String; 4] {
    static PREFIXES: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
        [
            verge_api::kind_prefix(InstanceSpec::PLURAL),
            verge_api::kind_prefix(NodeSpec::PLURAL),
            verge_api::kind_prefix(RegionSpec::PLURAL),
            LEDGER_PREFIX.to_string(),
        ]
    });
    &PREFIXES
}

/// Whether `held` (the cached object's revision) is older than a change at `revision`.
fn newer(held: Option<u64>, revision: u64) -> bool {
    held.is_none_or(|h| h < revision)
}

/// Put `key` at `revision` (a change the cache holds already, or an older one, is
/// ignored); whether it may make work for the scheduler.
fn put(
    inner: &mut Inner,
    key: &str,
    value: &[u8],
    revision: u64,
    events: &mut Vec<verge_api::event::Event>,
) -> bool {
    let [instances, nodes, regions, _] = prefixes();
    if let Some(name) = key.strip_prefix(instances.as_str()) {
        let held = inner.instances.get(name);
        if !newer(held.map(|i| i.metadata.revision), revision) {
            return false;
        }
        let Some(new) = decode_value::<InstanceSpec>(value, revision) else {
            return false;
        };
        let work = needs_placement(&new, held.map(|i| &**i));
        events.extend(crate::events::instance_events(held.map(|i| &**i), &new));
        if waits_for_node(&new) {
            inner.waiting.insert(name.to_string());
        } else {
            inner.waiting.remove(name);
        }
        inner.instances.insert(name.to_string(), Arc::new(new));
        work
    } else if let Some(name) = key.strip_prefix(nodes.as_str()) {
        let held = inner.nodes.get(name);
        if !newer(held.map(|n| n.metadata.revision), revision) {
            return false;
        }
        let Some(new) = decode_value::<NodeSpec>(value, revision) else {
            return false;
        };
        let work = node_changed(&new, held.map(|n| &**n));
        events.extend(crate::events::node_events(held.map(|n| &**n), &new));
        inner.nodes.insert(name.to_string(), Arc::new(new));
        work
    } else if let Some(name) = key.strip_prefix(regions.as_str()) {
        if !newer(
            inner.regions.get(name).map(|r| r.metadata.revision),
            revision,
        ) {
            return false;
        }
        if let Some(new) = decode_value::<RegionSpec>(value, revision) {
            inner.regions.insert(name.to_string(), Arc::new(new));
        }
        false
    } else if key.starts_with(LEDGER_PREFIX) {
        let kv = verge_store::KeyValue {
            key: key.to_string(),
            value: value.to_vec(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
        };
        if let Some(l) = decode_ledger(&kv)
            && newer(
                inner.ledgers.get(&l.value.node).map(|h| h.revision),
                revision,
            )
        {
            inner.ledgers.insert(l.value.node.clone(), l);
        }
        false
    } else {
        false
    }
}

/// Delete `key` at `revision` (unless the cache holds a later write of it); whether it
/// may make work for the scheduler.
fn delete(inner: &mut Inner, key: &str, revision: u64) -> bool {
    let [instances, nodes, regions, _] = prefixes();
    if let Some(name) = key.strip_prefix(instances.as_str()) {
        if inner
            .instances
            .get(name)
            .is_some_and(|i| i.metadata.revision < revision)
        {
            inner.instances.remove(name);
            inner.waiting.remove(name);
            return true;
        }
        false
    } else if let Some(name) = key.strip_prefix(nodes.as_str()) {
        if inner
            .nodes
            .get(name)
            .is_some_and(|n| n.metadata.revision < revision)
        {
            inner.nodes.remove(name);
            return true;
        }
        false
    } else if let Some(name) = key.strip_prefix(regions.as_str()) {
        if inner
            .regions
            .get(name)
            .is_some_and(|r| r.metadata.revision < revision)
        {
            inner.regions.remove(name);
        }
        false
    } else if let Some(node) = key.strip_prefix(LEDGER_PREFIX) {
        if inner
            .ledgers
            .get(node)
            .is_some_and(|l| l.revision < revision)
        {
            inner.ledgers.remove(node);
        }
        false
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_store::{Event, KeyValue};

    fn instance(generation: u64, node: Option<&str>, message: &str) -> Instance {
        let mut v = serde_json::json!({
            "kind": "Instance",
            "metadata": {"name": "a", "generation": generation},
            "spec": {"form": "process", "process": {"command": ["/bin/true"]}},
            "status": {"message": message},
        });
        if let Some(n) = node {
            v["status"]["node"] = n.into();
        }
        serde_json::from_value(v).expect("an instance")
    }

    #[test]
    fn only_writes_that_make_work_wake_the_scheduler() {
        let pending = instance(1, None, "");
        assert!(needs_placement(&pending, None), "a new instance");
        assert!(
            !needs_placement(&instance(1, None, "0/3 nodes fit"), Some(&pending)),
            "the scheduler's own note"
        );
        assert!(
            needs_placement(&instance(2, None, ""), Some(&pending)),
            "a new spec"
        );
        let bound = instance(1, Some("n1"), "");
        assert!(!needs_placement(
            &instance(1, Some("n1"), "running"),
            Some(&bound)
        ));
        assert!(
            !needs_placement(&instance(2, Some("n1"), ""), Some(&bound)),
            "a new spec on its node"
        );
        assert!(needs_placement(&pending, Some(&bound)), "lost its node");
    }

    fn event(kind: EventKind, key: &str, value: Vec<u8>, revision: u64) -> WatchBatch {
        WatchBatch {
            revision,
            events: vec![Event {
                kind,
                kv: KeyValue {
                    key: key.into(),
                    value,
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                },
                prev_kv: None,
            }],
        }
    }

    fn put_instance(i: &Instance, revision: u64) -> WatchBatch {
        let key = format!("{}a", verge_api::kind_prefix(InstanceSpec::PLURAL));
        event(
            EventKind::Put,
            &key,
            serde_json::to_vec(i).expect("json"),
            revision,
        )
    }

    /// The cache follows writes in order, knows what waits at all times, and ignores
    /// what it holds already: the list a load starts from may be newer than the
    /// changes replayed after it.
    #[test]
    fn the_cache_follows_writes_knows_what_waits_and_ignores_replays() {
        let cache = ControllerCache::default();
        assert!(!cache.any_waiting());
        let new = cache.apply(&put_instance(&instance(1, None, ""), 10));
        assert!(new, "a new instance is work");
        assert!(cache.any_waiting());
        // Bound at 12: nothing waits, and the binding is no work.
        let bound = cache.apply(&put_instance(&instance(1, Some("n1"), ""), 12));
        assert!(!bound);
        assert!(!cache.any_waiting());
        // A change from before what the cache holds (a replay) changes nothing.
        let replay = cache.apply(&put_instance(&instance(1, None, ""), 11));
        assert!(!replay);
        assert!(!cache.any_waiting());
        assert_eq!(
            cache.instances()[0].status.node.as_deref(),
            Some("n1"),
            "the newer write stays"
        );
        // Unbound again (its node went away): waits, and is work.
        assert!(cache.apply(&put_instance(&instance(1, None, ""), 13)));
        assert!(cache.any_waiting());
        // Deleted: gone, and no longer waits.
        let key = format!("{}a", verge_api::kind_prefix(InstanceSpec::PLURAL));
        assert!(cache.apply(&event(EventKind::Delete, &key, Vec::new(), 14)));
        assert!(!cache.any_waiting());
        assert!(cache.instances().is_empty());
        // A ledger, then an older write of it: the newer one stays.
        let ledger = |rev| {
            let l = Ledger {
                node: "n1".into(),
                ..Default::default()
            };
            event(
                EventKind::Put,
                &crate::inventory::ledger_key("n1"),
                serde_json::to_vec(&l).expect("json"),
                rev,
            )
        };
        cache.apply(&ledger(20));
        cache.apply(&ledger(15));
        assert_eq!(cache.world().ledgers["n1"].revision, 20);
    }
}
