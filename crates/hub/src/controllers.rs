//! Control loops: node lifecycle, placement, and history compaction.
//!
//! Each loop reads the store, plans with pure functions (`verge_sched`), and writes
//! its decisions back with compare-and-swap, so that a loop racing an operator's
//! `apply` or another hub never overwrites a newer change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use verge_api::clock::{now_secs, parse_rfc3339};
use verge_api::{Instance, InstancePhase, InstanceSpec, NodePhase, NodeSpec};

use crate::cache::{ControllerCache, World, waits_for_node};
use crate::inventory::{self, Binding};
use crate::offline;
use crate::placement::{self, View};
use crate::state::HubState;

/// How often (at most) the node lifecycle reads every node from the store (new nodes,
/// nodes deleted, phases written elsewhere); between reads it checks liveness in memory.
const RELIST_NODES_EVERY: Duration = Duration::from_secs(15);

/// Mark nodes NotReady when their heartbeats stop.
///
/// Liveness is in memory, not in the store: a node is alive while this hub heard from
/// it within the grace period (its session here, or the one that just ended), or while
/// another replica holds its session (a session record lives with that replica's
/// lease, and the replica ends a silent session). The heartbeat written to the store
/// (at most every [`crate::channel::STATUS_REFRESH`]) only counts for nodes that no
/// replica has heard from since this leader began, and for those, silence counts from
/// when this hub last saw more edges connected than ever before (a restarted hub takes
/// its fleet back at the pace it can: an edge still waiting its turn is not down).
/// When most of a large fleet is silent at once, none is marked ([`fleet_disrupted`]).
pub async fn node_lifecycle(st: Arc<HubState>) {
    let grace = st.config.node_grace;
    let started = now_secs();
    let period = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    // The nodes as last listed, and when: liveness is checked against memory every
    // tick, the store is read only every RELIST_NODES_EVERY (and after a change here).
    let mut listed: Option<(std::time::Instant, Vec<verge_api::Node>)> = None;
    // A node that turned Ready after a read is watched from the next one: within half
    // a grace period.
    let relist = RELIST_NODES_EVERY.min(grace / 2);
    let mut last_disruption_warning: Option<std::time::Instant> = None;
    let (mut most_connected, mut fleet_grew) = (0usize, started);
    loop {
        tick.tick().await;
        if listed.as_ref().is_none_or(|(at, _)| at.elapsed() >= relist) {
            let Ok((mut nodes, _)) = st.objects.list::<NodeSpec>().await else {
                continue;
            };
            // A region with a hub of its own watches its nodes (and says how they
            // are): the centre does not hear their heartbeats.
            let Ok((regions, _)) = st.objects.list::<verge_api::RegionSpec>().await else {
                continue;
            };
            let managed = crate::region::managed_elsewhere(st.as_ref(), &regions);
            nodes.retain(|n| !crate::region::node_managed(n, &managed));
            listed = Some((std::time::Instant::now(), nodes));
        }
        let Some((_, nodes)) = listed.as_mut() else {
            continue;
        };
        let Some(elsewhere) = crate::replicas::sessions_elsewhere(&st).await else {
            continue;
        };
        st.set_fleet_size(nodes.len());
        // The most edges connected so far, and when that last grew.
        let connected = st.edges.len();
        if connected > most_connected {
            most_connected = connected;
            fleet_grew = now_secs();
        }
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        // Ready nodes judged here, and those of them silent past the grace.
        let mut judged = 0usize;
        let mut silent_ones: Vec<(usize, u64)> = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            *counts.entry(n.status.phase.to_string()).or_default() += 1;
            if n.status.phase != NodePhase::Ready || elsewhere.contains(n.name()) {
                continue;
            }
            judged += 1;
            let silent = match st.edges.last_heard(n.name()) {
                Some(heard) => heard.elapsed().as_secs(),
                None => {
                    // After a hub restart, give every edge a full grace period to
                    // reconnect, counted from when the fleet last grew: while edges
                    // keep coming back, the ones not back yet wait their turn (a
                    // fleet of 100,000 takes minutes).
                    let last = n
                        .status
                        .last_heartbeat
                        .as_deref()
                        .and_then(parse_rfc3339)
                        .unwrap_or(0)
                        .max(started)
                        .max(fleet_grew);
                    now_secs().saturating_sub(last)
                }
            };
            if silent > grace.as_secs() {
                silent_ones.push((k, silent));
            }
        }
        if fleet_disrupted(silent_ones.len(), judged) {
            if last_disruption_warning.is_none_or(|w| w.elapsed() >= Duration::from_secs(30)) {
                tracing::warn!(
                    silent = silent_ones.len(),
                    ready = judged,
                    "most nodes are silent at once: this hub is more likely the one cut off (or still taking its fleet back after a restart) than they all down; none is marked NotReady until most are heard again"
                );
                last_disruption_warning = Some(std::time::Instant::now());
            }
            silent_ones.clear();
        }
        for (k, silent) in silent_ones {
            let n = &mut nodes[k];
            let r = st
                .objects
                .update_status::<NodeSpec>(n.name(), |_, s| {
                    if s.phase != NodePhase::Ready || s.last_heartbeat != n.status.last_heartbeat {
                        return Ok(false);
                    }
                    s.phase = NodePhase::NotReady;
                    s.last_transition = Some(verge_api::clock::now_rfc3339());
                    s.message = format!(
                        "no heartbeat for {silent}s (grace {}s): the edge is down or cut off from the hub",
                        grace.as_secs()
                    );
                    Ok(true)
                })
                .await;
            let Ok(now) = r else { continue };
            // What the store holds now (another writer may have been first).
            n.status = now.status;
            if n.status.phase == NodePhase::NotReady {
                st.edges.forget_departed(n.name());
                // A session still open here writes the node's status again with its
                // next heartbeat.
                if let Ok(c) = st.edges.conn(n.name()) {
                    c.status_unknown();
                }
                tracing::warn!(node = %n.name(), silent, "node is NotReady");
            }
        }
        for phase in ["Ready", "NotReady"] {
            st.metrics
                .nodes
                .get_or_create(&vec![("phase".into(), phase.into())])
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

/// Fleets smaller than this are judged node by node, whatever share is silent (one
/// edge of three down is not the hub's fault). Kubernetes' default for its
/// large-cluster threshold.
const LARGE_FLEET: usize = 50;

/// Whether `silent` of the `ready` nodes a hub judges being silent past the grace at
/// once says more about the hub than about them: more than 55% of a large fleet
/// (Kubernetes' node lifecycle stops marking in such a full disruption). A hub that
/// restarted and takes 100,000 edges back slower than the grace marked 99,894 of
/// them NotReady, and its reaction to that (every instance of theirs re-planned) took
/// the CPU the reconnection needed. A real partition of a minority is still marked.
fn fleet_disrupted(silent: usize, ready: usize) -> bool {
    ready >= LARGE_FLEET && silent * 100 > ready * 55
}

/// How often the scheduler makes a pass when nothing woke it and nothing waits: the
/// inventory's bookkeeping (allocations running, released) catches up then.
const IDLE_PASS_EVERY: Duration = Duration::from_secs(60);

/// Place pending instances. Runs when kicked (a write that may make work), every few
/// seconds while instances wait for a node, and once a minute otherwise: a pass reads
/// every node and instance, which a fleet of a hundred thousand must not pay for
/// every few seconds to learn that nothing waits.
pub async fn scheduler(st: Arc<HubState>, cache: Arc<ControllerCache>) {
    let mut waiting = true;
    let mut last_pass = std::time::Instant::now();
    let mut pass_took = Duration::ZERO;
    loop {
        let kicked = tokio::select! {
            _ = st.schedule_kick.notified() => {
                // Let a burst of changes settle into one pass, for as long as the last
                // pass took: a pass reads the whole fleet (100,000 nodes: a few hundred
                // milliseconds), and a stream of applies kicking it every 20 ms spent
                // the hub's CPU on passes of a few instances each.
                tokio::time::sleep(pass_took.clamp(SETTLE_MIN, SETTLE_MAX)).await;
                true
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => false,
        };
        if !kicked && !waiting && last_pass.elapsed() < IDLE_PASS_EVERY {
            continue;
        }
        last_pass = std::time::Instant::now();
        // A kick with nothing waiting is answered from the instances alone; the
        // inventory is reconciled on the other passes.
        match schedule_pass(&st, Some(&cache), !kicked || waiting).await {
            Ok(left) => waiting = left > 0,
            Err(e) => tracing::warn!(error = %e, "scheduling pass failed"),
        }
        pass_took = last_pass.elapsed();
        st.metrics.schedule_pass.observe(pass_took.as_secs_f64());
    }
}

/// How long a kicked scheduler lets changes gather at least (a small fleet's pass
/// costs less than this), and at most (a pass that waited for a hub behind on its
/// work took longer than planning did).
const SETTLE_MIN: Duration = Duration::from_millis(20);
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// How long offline recommendations are reused before being recomputed.
const RECOMMENDATIONS_TTL: Duration = Duration::from_secs(30);

async fn set_message(st: &HubState, inst: &Instance, message: &str) {
    if inst.status.message == message {
        return;
    }
    let revision = inst.metadata.revision;
    let _ = st
        .objects
        .update_status::<InstanceSpec>(inst.name(), |obj, s| {
            if obj.metadata.revision != revision || s.node.is_some() {
                return Ok(false);
            }
            s.phase = InstancePhase::Pending;
            s.message = message.to_string();
            Ok(true)
        })
        .await;
}

/// One pass: reconcile the inventory, then bind every pending instance (and every
/// complete gang) that fits, and explain the ones that do not. Placements are planned
/// on an in-memory view and committed with CAS against the ledgers; on any conflict
/// the pass stops and the next one replans from fresh data. Returns how many instances
/// still wait for a node.
///
/// `cache`: the controllers' cache to plan from ([`crate::cache`]); without one (or
/// when it lags the store) the pass reads the store.
///
/// `full`: also reconcile the inventory when no instance waits. A pass without it that
/// finds nothing to place reads nothing more (with the cache, nothing at all): a
/// joining fleet kicks the scheduler with every new node, and reading every node and
/// ledger each time cost a hub with 30,000 edges most of its CPU.
pub async fn schedule_pass(
    st: &HubState,
    cache: Option<&ControllerCache>,
    full: bool,
) -> Result<usize, verge_api::ApiError> {
    let store = st.objects.store().clone();
    // From the cache once it has seen every write up to now; from the store when
    // there is no cache or it lags.
    let cache = match cache {
        Some(c) if c.catch_up(store.as_ref()).await => Some(c),
        _ => None,
    };
    let world = match cache {
        Some(c) => {
            if !full && !c.any_waiting() {
                record_phases(st, &c.instances());
                return Ok(0);
            }
            c.world()
        }
        None => {
            let (instances, _) = st.objects.list::<InstanceSpec>().await?;
            if !full && !instances.iter().any(waits_for_node) {
                record_phases(st, &instances);
                return Ok(0);
            }
            World::read(st, instances).await?
        }
    };
    let World {
        instances,
        nodes,
        regions,
        mut ledgers,
    } = world;
    record_phases(st, &instances);
    if inventory::reconcile(&st.objects, &nodes, &instances, &ledgers).await? > 0 {
        ledgers = inventory::ledgers(store.as_ref()).await?;
    }
    let mine = |i: &Instance| match st.config.scheduler_shard {
        // Gang members shard by gang, so a gang is always planned by one scheduler.
        Some((index, count)) => {
            let key = i
                .spec
                .placement
                .gang
                .as_ref()
                .map_or(i.name(), |g| g.name.as_str());
            verge_api::hash::fnv1a(key.as_bytes()) % count.max(1) as u64 == index as u64
        }
        None => true,
    };
    // Regions with hubs of their own place their instances on their nodes.
    let managed = crate::region::managed_elsewhere(st, regions.iter().map(|r| &**r));
    let ours =
        |i: &Instance| !crate::region::instance_region(i).is_some_and(|r| managed.contains(r));
    let mut pending: Vec<&Instance> = instances
        .iter()
        .map(|i| &**i)
        .filter(|i| waits_for_node(i) && mine(i) && ours(i))
        .collect();
    if pending.is_empty() {
        return Ok(0);
    }
    let mut left = 0usize;
    // Oldest first, so that a stream of new instances cannot starve an old one.
    pending.sort_by(|a, b| {
        a.metadata
            .creation_time
            .cmp(&b.metadata.creation_time)
            .then(a.name().cmp(b.name()))
    });
    let schedulable: Vec<&verge_api::Node> = nodes
        .iter()
        .map(|n| &**n)
        .filter(|n| !crate::region::node_managed(n, &managed))
        .collect();
    let View { mut cluster, names } = placement::view(&schedulable, &regions, &ledgers);
    let recs = recommendations(st, &cluster, &ledgers);
    let mut gangs: BTreeMap<String, (u32, Vec<&Instance>)> = BTreeMap::new();
    let mut singles = Vec::new();
    for i in pending {
        match &i.spec.placement.gang {
            Some(g) => gangs
                .entry(g.name.clone())
                .or_insert((g.size, Vec::new()))
                .1
                .push(i),
            None => singles.push(vec![i]),
        }
    }
    let mut units: Vec<(Option<String>, Vec<&Instance>)> =
        singles.into_iter().map(|v| (None, v)).collect();
    for (name, (size, mut members)) in gangs {
        if (members.len() as u32) < size {
            let msg = format!(
                "waiting for gang '{name}': {}/{size} members exist",
                members.len()
            );
            for m in &members {
                set_message(st, m, &msg).await;
            }
            left += members.len();
            continue;
        }
        members.sort_by(|a, b| a.name().cmp(b.name()));
        members.truncate(size as usize);
        units.push((Some(name), members));
    }
    let mut batch: Vec<Binding> = Vec::new();
    let mut since_yield = std::time::Instant::now();
    for (gang, members) in units {
        // Planning is CPU work between awaits: hand the worker back now and then, or
        // the sessions queued behind it (heartbeats among them) wait out a whole
        // burst (30,000 placements took 17 s, and edges gave up on a silent hub).
        if since_yield.elapsed() >= YIELD_EVERY {
            tokio::task::yield_now().await;
            since_yield = std::time::Instant::now();
        }
        let reqs: Vec<_> = members
            .iter()
            .map(|i| placement::request(&mut cluster, i))
            .collect();
        match verge_sched::place_gang(&mut cluster, &reqs, recs.as_ref()) {
            Ok(placed) => {
                let bindings: Vec<Binding> = members
                    .iter()
                    .zip(&placed)
                    .map(|(i, p)| Binding {
                        instance: (*i).clone(),
                        node: names[p.node as usize].clone(),
                        note: match p.overflow_from {
                            Some(from) => format!(
                                "overflow: preferred region {} is full; placed in {}",
                                cluster.regions.name(from),
                                cluster.regions.name(p.region)
                            ),
                            None => String::new(),
                        },
                        from: None,
                    })
                    .collect();
                // Independent placements are committed together (one transaction, one
                // fsync for the batch); a gang always within one batch.
                batch.extend(bindings);
                if batch.len() >= PLACEMENT_BATCH
                    && !commit_batch(st, &mut ledgers, &mut batch).await
                {
                    return Ok(left.max(1));
                }
            }
            Err((k, why)) => {
                let msg = match &gang {
                    Some(g) => format!(
                        "gang '{g}' cannot be placed together (member {}): {why}",
                        members[k].name()
                    ),
                    None => why.to_string(),
                };
                left += members.len();
                for m in &members {
                    set_message(st, m, &msg).await;
                }
            }
        }
    }
    if !commit_batch(st, &mut ledgers, &mut batch).await {
        return Ok(left.max(1));
    }
    Ok(left)
}

/// How long a pass plans before it lets other tasks run.
const YIELD_EVERY: Duration = Duration::from_millis(10);

/// Placements committed in one transaction: enough to pay one fsync for many, few
/// enough to stay inside etcd's default of 128 operations per transaction (each
/// placement is an instance, a ledger and an audit event).
const PLACEMENT_BATCH: usize = 32;

/// The longest a batch of placements waits for a hub that is behind.
const PLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// Commit the planned `batch` (emptying it). On success the ledgers move on to the
/// versions committed, which later commits of this pass compare against (no re-read
/// per placement); `false` when a race was lost, and the scheduler is kicked to
/// replan from what the store now holds.
async fn commit_batch(
    st: &HubState,
    ledgers: &mut BTreeMap<String, inventory::Versioned<inventory::Ledger>>,
    batch: &mut Vec<Binding>,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    // Each placement is work for the packet path (the change to the edge, its
    // statuses back): while the hub is behind on it, placements wait (a burst of
    // 100,000 placed at full speed starved the socket until the fleet timed out),
    // though never for good.
    if !st.limits.load.caught_up(PLACEMENT_WAIT).await {
        tracing::warn!(
            "the hub stayed behind on its work for {}s; placing {} instances anyway",
            PLACEMENT_WAIT.as_secs(),
            batch.len()
        );
    }
    let bindings = std::mem::take(batch);
    match inventory::commit(&st.objects, ledgers, &bindings, "scheduler").await {
        Ok(_) => {
            for b in &bindings {
                st.metrics.placements.inc();
                tracing::info!(instance = %b.instance.name(), node = %b.node, note = %b.note, "scheduled");
            }
            true
        }
        Err(e) => {
            tracing::debug!(?e, "placement lost a race; replanning");
            st.schedule_kick.notify_one();
            false
        }
    }
}

/// The instance count by phase, as a metric.
fn record_phases(st: &HubState, instances: &[impl std::borrow::Borrow<Instance>]) {
    // Every phase, so that one no instance is in any more reads 0.
    let mut phases: BTreeMap<String, i64> = [
        InstancePhase::Pending,
        InstancePhase::Scheduled,
        InstancePhase::Starting,
        InstancePhase::Running,
        InstancePhase::Succeeded,
        InstancePhase::Failed,
        InstancePhase::Terminating,
        InstancePhase::Unknown,
        InstancePhase::Lost,
    ]
    .iter()
    .map(|p| (p.to_string(), 0))
    .collect();
    for inst in instances {
        let inst = inst.borrow();
        *phases.entry(inst.status.phase.to_string()).or_default() += 1;
    }
    for (phase, n) in phases {
        st.metrics
            .instances
            .get_or_create(&vec![("phase".into(), phase)])
            .set(n);
    }
}

/// The offline scheduler's recommendations for the current view, recomputed at most
/// every [`RECOMMENDATIONS_TTL`] (or when the fleet changes size).
fn recommendations(
    st: &HubState,
    c: &verge_sched::Cluster,
    ledgers: &BTreeMap<String, inventory::Versioned<inventory::Ledger>>,
) -> Option<verge_sched::Recommendations> {
    let mut cache = st.recommendations.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, n, r)) = cache.as_ref()
        && at.elapsed() < RECOMMENDATIONS_TTL
        && *n == c.len()
    {
        return Some(r.clone());
    }
    let shapes = offline::shapes_of(ledgers);
    let r = verge_sched::recommend(c, &shapes);
    *cache = Some((std::time::Instant::now(), c.len(), r.clone()));
    Some(r)
}

/// Keep the store bounded: compact all but the last `history_revisions` of history, and
/// keep only the newest audit events.
///
/// History is kept by time as well as by count: compaction goes no further than the
/// revision of the previous pass, so at least one period (5 minutes) of history stays,
/// however fast a large fleet writes. Edges get a bookmark every 2 minutes, so any edge
/// connected within that period resumes with a delta after a hub restart, and a hub
/// that just started compacts nothing.
pub async fn compaction(st: Arc<HubState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(300));
    let mut previous: Option<u64> = None;
    loop {
        tick.tick().await;
        let store = st.objects.store();
        let Ok(rev) = store.revision().await else {
            continue;
        };
        let keep = st.config.history_revisions;
        if let Some(upto) = previous.map(|p| p.min(rev.saturating_sub(keep)))
            && upto > 0
            && let Err(e) = store.compact(upto).await
        {
            tracing::warn!(error = %e, "compaction failed");
        }
        previous = Some(rev);
        if let Err(e) = inventory::prune_audit(store.as_ref(), inventory::AUDIT_KEEP).await {
            tracing::warn!(error = %e.message, "pruning the audit trail failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{Bytes, Cpu, Object, ProcessSpec};

    #[test]
    fn most_of_a_large_fleet_silent_at_once_is_the_hub_s_problem() {
        // A hub that restarted, or is cut off: none marked.
        assert!(fleet_disrupted(100_000, 100_000));
        assert!(fleet_disrupted(56, 100));
        // A partition of a minority, or a few edges down: marked.
        assert!(!fleet_disrupted(55, 100));
        assert!(!fleet_disrupted(10_000, 100_000));
        // A small fleet is judged node by node: its only edge down is down.
        assert!(!fleet_disrupted(1, 1));
        assert!(!fleet_disrupted(49, 49));
        assert!(fleet_disrupted(50, 50));
    }

    #[tokio::test]
    async fn placements_wait_while_the_hub_is_behind_and_go_once_it_catches_up() {
        verge_tunnel::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tmp");
        let store: Arc<dyn verge_store::Store> = Arc::new(verge_store::MemoryStore::new());
        let ca = verge_tunnel::pki::CertAuthority::generate("t").expect("ca");
        let config = crate::HubConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path());
        let st = HubState::new(crate::objects::Objects::new(store), ca, config);
        st.objects
            .create(Object::<NodeSpec>::new("n1", NodeSpec::default()))
            .await
            .expect("node");
        st.objects
            .update_status::<NodeSpec>("n1", |_, s| {
                s.phase = NodePhase::Ready;
                s.allocatable.cpu = Cpu(4000);
                s.allocatable.memory = Bytes(4 << 30);
                Ok(true)
            })
            .await
            .expect("ready");
        let spec = InstanceSpec {
            process: Some(ProcessSpec {
                command: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        st.objects
            .create(Instance::new("i1", spec))
            .await
            .expect("instance");
        let bound = || async {
            st.objects
                .get::<InstanceSpec>("i1")
                .await
                .expect("get")
                .status
                .node
        };

        st.limits.load.set(crate::limits::SHED_LAG * 3);
        let pass = tokio::spawn({
            let st = st.clone();
            async move { schedule_pass(&st, None, true).await }
        });
        // Several of the gauge's checks: the pass holds its placement all along.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!pass.is_finished(), "the pass waits for the hub");
        assert_eq!(
            bound().await,
            None,
            "nothing placed while the hub is behind"
        );

        st.limits.load.set(Duration::ZERO);
        let left = tokio::time::timeout(Duration::from_secs(5), pass)
            .await
            .expect("the pass goes on once the hub caught up")
            .expect("joined")
            .expect("pass");
        assert_eq!(left, 0);
        assert_eq!(bound().await.as_deref(), Some("n1"));
    }
}
