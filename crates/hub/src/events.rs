//! Events: node readiness changes, instance placements, starts, restarts, OOM kills,
//! failures and losses, scheduling failures, and operators' writes.
//!
//! What happens to objects is read off the store's changes by the controllers' cache
//! ([`crate::cache`]), which only the leading replica runs: each change is recorded
//! once, whoever wrote it (an edge's status, the scheduler, the node lifecycle, the
//! disconnect controller). Operators' writes are recorded by the application layer
//! on the replica that took them. [`node_events`] and [`instance_events`] say which
//! change is which event; they are pure.
//!
//! Events are kept in the store under [`EVENT_PREFIX`], each with a lease that ends
//! after the retention (one lease per minute of events), so that they expire on every
//! backend the way Kubernetes' do in etcd, and a watch sees them as they come. They
//! are written by one task in batches from a bounded queue: a burst beyond
//! [`QUEUE`] or [`MAX_PER_SECOND`] is dropped and counted
//! (`verge_hub_events_dropped_total`), never waited for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use verge_api::event::{Event, EventType};
use verge_api::{Instance, InstancePhase, Node, NodePhase};
use verge_store::{LeaseId, Op, Store, StoreError, Txn};

/// Where events are kept.
pub const EVENT_PREFIX: &str = "/verge/events/";
/// Events waiting to be written, at most.
pub const QUEUE: usize = 8192;
/// Events written per second, at most.
pub const MAX_PER_SECOND: usize = 2000;
/// Events written in one transaction, at most.
const BATCH: usize = 256;
/// How long one lease takes new events before another is granted.
const LEASE_SPAN: Duration = Duration::from_secs(60);

/// The hub's event log.
pub struct EventLog {
    tx: mpsc::Sender<Event>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    dropped: prometheus_client::metrics::counter::Counter,
    seq: std::sync::atomic::AtomicU64,
}

impl EventLog {
    /// A log whose drops count in `dropped`.
    pub fn new(dropped: prometheus_client::metrics::counter::Counter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            dropped,
            seq: Default::default(),
        }
    }

    /// Record an event (dropped and counted if the queue is full).
    pub fn record(&self, ev: Event) {
        if self.tx.try_send(ev).is_err() {
            self.dropped.inc();
        }
    }

    /// Record each of `evs`.
    pub fn record_all(&self, evs: Vec<Event>) {
        for ev in evs {
            self.record(ev);
        }
    }

    /// Write what is recorded, for as long as the hub runs, keeping each event for
    /// `retention`.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, retention: Duration) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut lease: Option<(LeaseId, Instant)> = None;
        let mut second = (Instant::now(), 0usize);
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            if second.0.elapsed() >= Duration::from_secs(1) {
                second = (Instant::now(), 0);
            }
            let room = MAX_PER_SECOND.saturating_sub(second.1);
            if batch.len() > room {
                self.dropped.inc_by((batch.len() - room) as u64);
                batch.truncate(room);
            }
            second.1 += batch.len();
            if let Err(e) = self
                .write(store.as_ref(), &mut lease, retention, &mut batch)
                .await
            {
                self.dropped.inc_by(batch.len() as u64);
                tracing::warn!(error = %e, lost = batch.len(), "events not written");
                lease = None;
            }
            batch.clear();
            if room == 0 {
                // Over the rate: wait out the second rather than spin on drops.
                tokio::time::sleep(Duration::from_secs(1).saturating_sub(second.0.elapsed())).await;
            }
        }
    }

    async fn write(
        &self,
        store: &dyn Store,
        lease: &mut Option<(LeaseId, Instant)>,
        retention: Duration,
        batch: &mut [Event],
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let id = match lease {
            Some((id, at)) if at.elapsed() < LEASE_SPAN => *id,
            _ => {
                let l = store.lease_grant(retention).await?;
                *lease = Some((l.id, Instant::now()));
                l.id
            }
        };
        let now_ms = verge_api::clock::now_ms();
        let mut ops = Vec::with_capacity(batch.len());
        for ev in batch.iter_mut() {
            let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Time first so that keys sort by time; a random part keeps replicas'
            // keys apart.
            let r: u32 = rand::random();
            ev.name = format!("{now_ms:013}-{seq:06}-{r:08x}");
            ops.push(Op::Put {
                key: format!("{EVENT_PREFIX}{}", ev.name),
                value: serde_json::to_vec(ev).unwrap_or_default(),
                lease: Some(id),
            });
        }
        store
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await?;
        Ok(())
    }
}

/// Whether `ev` is about `for_` (`KIND/NAME`; kinds by plural or singular).
pub fn about(ev: &Event, for_: &str) -> bool {
    let Some((kind, name)) = for_.split_once('/') else {
        return false;
    };
    let kind = verge_api::manifest::resolve_kind(kind).unwrap_or(kind);
    ev.regarding.kind == kind && ev.regarding.name == name
}

/// The last `limit` events (oldest first), of `for_` only when given.
pub async fn list(
    store: &dyn Store,
    for_: Option<&str>,
    limit: usize,
) -> Result<(Vec<Event>, u64), StoreError> {
    let mut out = std::collections::VecDeque::with_capacity(limit.min(1024));
    let mut after: Option<String> = None;
    let mut revision = 0;
    loop {
        let page = store
            .range_page(EVENT_PREFIX, after.as_deref(), 1000)
            .await?;
        revision = revision.max(page.revision);
        for kv in &page.kvs {
            let Ok(ev) = serde_json::from_slice::<Event>(&kv.value) else {
                continue;
            };
            if for_.is_some_and(|f| !about(&ev, f)) {
                continue;
            }
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(ev);
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more || after.is_none() {
            break;
        }
    }
    Ok((out.into(), revision))
}

fn node_of(i: &Instance) -> Option<&str> {
    i.status.node.as_deref()
}

/// The events a node's change from `old` to `new` makes.
pub fn node_events(old: Option<&Node>, new: &Node) -> Vec<Event> {
    let name = new.name();
    let was = old.map(|o| o.status.phase);
    if was == Some(new.status.phase) || (was.is_none() && new.status.phase == NodePhase::NotReady) {
        return Vec::new();
    }
    let ev = match new.status.phase {
        NodePhase::Ready => Event::new(
            EventType::Normal,
            "NodeReady",
            "nodes",
            name,
            "the node is Ready: its heartbeats arrive",
        ),
        NodePhase::NotReady => Event::new(
            EventType::Warning,
            "NodeNotReady",
            "nodes",
            name,
            if new.status.message.is_empty() {
                "the node is NotReady".to_string()
            } else {
                new.status.message.clone()
            },
        ),
    };
    vec![ev.on(Some(name))]
}

/// The events an instance's change from `old` to `new` makes (none for its creation:
/// the operator's write is recorded where it is taken).
pub fn instance_events(old: Option<&Instance>, new: &Instance) -> Vec<Event> {
    let Some(old) = old else {
        return Vec::new();
    };
    let name = new.name();
    let (o, n) = (&old.status, &new.status);
    let node = node_of(new);
    let mut out = Vec::new();
    let ev = |t, reason: &str, msg: String| Event::new(t, reason, "instances", name, msg).on(node);
    if o.node.is_none() && n.node.is_some() {
        out.push(ev(
            EventType::Normal,
            "Scheduled",
            format!("placed on node {}", n.node.as_deref().unwrap_or_default()),
        ));
    }
    if n.node.is_none()
        && n.phase == InstancePhase::Pending
        && !n.message.is_empty()
        && n.message != o.message
    {
        out.push(ev(
            EventType::Warning,
            "FailedScheduling",
            n.message.clone(),
        ));
    }
    if n.restarts > o.restarts {
        let oom = n.message.contains("out of memory");
        out.push(ev(
            EventType::Warning,
            if oom { "OOMKilled" } else { "Restarted" },
            format!("restart {}: {}", n.restarts, n.message),
        ));
    } else if n.phase != o.phase {
        match n.phase {
            InstancePhase::Running => out.push(ev(
                EventType::Normal,
                "Started",
                format!("running on node {}", node.unwrap_or("-")),
            )),
            InstancePhase::Failed => {
                let oom = n.message.contains("out of memory");
                out.push(ev(
                    EventType::Warning,
                    if oom { "OOMKilled" } else { "Failed" },
                    n.message.clone(),
                ));
            }
            InstancePhase::Succeeded => {
                out.push(ev(EventType::Normal, "Completed", n.message.clone()))
            }
            InstancePhase::Lost => out.push(ev(EventType::Warning, "Lost", n.message.clone())),
            InstancePhase::Unknown => out.push(ev(
                EventType::Warning,
                "NodeUnreachable",
                format!(
                    "node {} is not reporting; the instance's state is unknown",
                    node.unwrap_or("-")
                ),
            )),
            _ => {}
        }
    }
    if o.original.is_none() && n.original.is_some() {
        out.push(ev(
            EventType::Warning,
            "Replaced",
            format!(
                "replaced on node {} while its node was cut off",
                node.unwrap_or("-")
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::InstanceSpec;

    fn inst(f: impl FnOnce(&mut verge_api::InstanceStatus)) -> Instance {
        let mut i = Instance::new("web", InstanceSpec::default());
        f(&mut i.status);
        i
    }

    fn reasons(evs: &[Event]) -> Vec<&str> {
        evs.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn instance_transitions_make_the_right_events() {
        let pending = inst(|_| {});
        assert!(
            instance_events(None, &pending).is_empty(),
            "creation is the operator's"
        );
        let unplaced = inst(|s| s.message = "no node has 8 CPUs free".into());
        let e = instance_events(Some(&pending), &unplaced);
        assert_eq!(reasons(&e), ["FailedScheduling"]);
        assert_eq!(e[0].event_type, EventType::Warning);
        // The same message again is not a new event.
        assert!(instance_events(Some(&unplaced), &unplaced).is_empty());
        let placed = inst(|s| {
            s.node = Some("n1".into());
            s.phase = InstancePhase::Scheduled;
        });
        let e = instance_events(Some(&pending), &placed);
        assert_eq!(reasons(&e), ["Scheduled"]);
        assert_eq!(e[0].node.as_deref(), Some("n1"));
        let running = inst(|s| {
            s.node = Some("n1".into());
            s.phase = InstancePhase::Running;
        });
        assert_eq!(
            reasons(&instance_events(Some(&placed), &running)),
            ["Started"]
        );
        // A usage update is no event.
        let busy = inst(|s| {
            s.node = Some("n1".into());
            s.phase = InstancePhase::Running;
            s.usage = Some(Default::default());
        });
        assert!(instance_events(Some(&running), &busy).is_empty());
        let oom = inst(|s| {
            s.node = Some("n1".into());
            s.phase = InstancePhase::Starting;
            s.restarts = 1;
            s.message =
                "killed: out of memory (the instance's limit is 16Mi); restarting in 1s".into();
        });
        assert_eq!(
            reasons(&instance_events(Some(&running), &oom)),
            ["OOMKilled"]
        );
        let crashed = inst(|s| {
            s.node = Some("n1".into());
            s.phase = InstancePhase::Starting;
            s.restarts = 2;
            s.message = "exit 1".into();
        });
        assert_eq!(
            reasons(&instance_events(Some(&oom), &crashed)),
            ["Restarted"]
        );
        let failed = inst(|s| {
            s.node = Some("n1".into());
            s.restarts = 2;
            s.phase = InstancePhase::Failed;
            s.message = "exit 3".into();
        });
        assert_eq!(
            reasons(&instance_events(Some(&crashed), &failed)),
            ["Failed"]
        );
    }

    #[test]
    fn node_readiness_changes_are_events_and_heartbeats_are_not() {
        let mut ready = Node::new("n1", Default::default());
        ready.status.phase = NodePhase::Ready;
        let mut down = ready.clone();
        down.status.phase = NodePhase::NotReady;
        down.status.message = "no heartbeat for 41s".into();
        assert_eq!(reasons(&node_events(None, &ready)), ["NodeReady"]);
        assert!(
            node_events(None, &down).is_empty(),
            "a new node starts NotReady"
        );
        assert!(node_events(Some(&ready), &ready).is_empty());
        let e = node_events(Some(&ready), &down);
        assert_eq!(reasons(&e), ["NodeNotReady"]);
        assert_eq!(e[0].message, "no heartbeat for 41s");
        assert!(about(&e[0], "node/n1") && about(&e[0], "nodes/n1") && !about(&e[0], "nodes/n2"));
    }
}
