//! Instances of nodes that went quiet: unknown, then lost, then replaced, and which
//! copy stays when the node comes back.
//!
//! A node the hub stops hearing from may be down, or only cut off: its workloads keep
//! running from the agent's cache either way. So the hub waits. Each instance's
//! `spec.disconnect` says for how long after its node turned NotReady (`lostAfter`),
//! whether a lost instance is placed elsewhere (`replace`) and, when the node returns,
//! which copy stays (`reconcile`). While a majority of the silent node's site peers
//! (nodes with the same `site` label that still talk to the hub) report that they
//! reach it, it is cut off, not down, and its instances are not lost at all.
//!
//! A replaced instance stays one object: it is unbound from the lost node and placed
//! again, and `status.original` remembers the copy left behind. The returning node's
//! session settles it before the node hears anything ([`settle_return`]): either the
//! instance is bound back to it (the copy there never stopped, so it is not
//! restarted; the replacement gets a removal) or the original is dropped (the node
//! gets the removal it missed). Either way, one copy runs once the node is back.
//!
//! [`plan`] and [`decide`] are pure; [`run`] and [`settle_return`] do the I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use verge_api::clock::{now_rfc3339, now_secs, parse_rfc3339};
use verge_api::{
    Instance, InstancePhase, InstanceSpec, Node, NodePhase, OriginalCopy, PeerVerdict, Reconcile,
};

use crate::cache::ControllerCache;
use crate::sites::site_of;
use crate::state::HubState;

/// How often the controller looks at the silent nodes' instances.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the site's peers say of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerVote {
    /// Peers that reach it.
    pub reachable: usize,
    /// Peers that reported on it.
    pub voters: usize,
}

impl PeerVote {
    /// A majority of its peers reach it: the node is up, only its link to the hub is
    /// down.
    pub fn cut_off(&self) -> bool {
        self.voters > 0 && self.reachable * 2 > self.voters
    }
}

/// What the Ready nodes report of their peers, by the peer's name. A node that is not
/// Ready does not vote (what it says is as old as its last word), nor does one of
/// another site (it has no business probing the peer).
pub fn peer_votes<'a>(
    nodes: impl IntoIterator<Item = &'a Node> + Clone,
) -> BTreeMap<String, PeerVote> {
    let sites: BTreeMap<&str, &str> = nodes
        .clone()
        .into_iter()
        .filter_map(|n| Some((n.name(), site_of(n)?)))
        .collect();
    let mut votes: BTreeMap<String, PeerVote> = BTreeMap::new();
    for n in nodes {
        let Some(site) = site_of(n) else { continue };
        if n.status.phase != NodePhase::Ready {
            continue;
        }
        for (peer, verdict) in &n.status.peers {
            if sites.get(peer.as_str()) != Some(&site) {
                continue;
            }
            let v = votes.entry(peer.clone()).or_default();
            v.voters += 1;
            if *verdict == PeerVerdict::Reachable {
                v.reachable += 1;
            }
        }
    }
    votes
}

/// What to do with one instance of a silent node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nobody knows its state: say so (phase `Unknown`).
    Unknown,
    /// Lost, and placed elsewhere: unbind it and remember the copy left behind.
    Replace,
    /// Lost, and not replaced (phase `Lost`).
    Lose,
}

/// One step for one instance, with the message its status shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The instance.
    pub name: String,
    /// Its uid (a step is not applied to a re-created instance).
    pub uid: String,
    /// The revision the plan saw: a step is not applied to an instance that changed
    /// since (its node may have reported it while the plan was made).
    pub revision: u64,
    /// The silent node it is bound to.
    pub node: String,
    /// What to do.
    pub step: Step,
    /// Why, for its status.
    pub message: String,
}

/// Seconds since `node` turned NotReady (from when it was last heard, if the hub has
/// no transition time for it).
fn silent_for(now: u64, node: &Node) -> u64 {
    let since = node
        .status
        .last_transition
        .as_deref()
        .or(node.status.last_heartbeat.as_deref())
        .and_then(parse_rfc3339)
        .unwrap_or(now);
    now.saturating_sub(since)
}

/// The steps due now for the instances bound to nodes that are not Ready.
pub fn plan<'a>(
    now: u64,
    nodes: &BTreeMap<&str, &Node>,
    votes: &BTreeMap<String, PeerVote>,
    instances: impl IntoIterator<Item = &'a Instance>,
) -> Vec<Planned> {
    let mut out = Vec::new();
    for i in instances {
        let Some(node_name) = i.status.node.as_deref() else {
            continue;
        };
        let Some(node) = nodes.get(node_name) else {
            continue;
        };
        if node.status.phase == NodePhase::Ready
            || matches!(
                i.status.phase,
                InstancePhase::Succeeded
                    | InstancePhase::Failed
                    | InstancePhase::Terminating
                    | InstancePhase::Lost
            )
        {
            continue;
        }
        let policy = &i.spec.disconnect;
        let silent = silent_for(now, node);
        let vote = votes.get(node_name).copied().unwrap_or_default();
        let (step, message) = if vote.cut_off() {
            (
                Step::Unknown,
                format!(
                    "node '{node_name}' is cut off from the hub, but {} of its {} site peers reach it: it is not lost",
                    vote.reachable, vote.voters
                ),
            )
        } else if silent < policy.lost_after_seconds {
            (
                Step::Unknown,
                format!(
                    "node '{node_name}' is NotReady: the instance may still run there; it counts as lost {}s after the node went quiet (disconnect.lostAfterSeconds)",
                    policy.lost_after_seconds
                ),
            )
        } else if policy.replace {
            (
                Step::Replace,
                format!(
                    "lost with node '{node_name}' (NotReady for {silent}s); placing a replacement, and if the node returns, disconnect.reconcile: {} decides which copy stays",
                    policy.reconcile
                ),
            )
        } else {
            (
                Step::Lose,
                format!(
                    "lost with node '{node_name}' (NotReady for {silent}s); not replaced (disconnect.replace: false), it comes back with its node"
                ),
            )
        };
        if step == Step::Unknown
            && i.status.phase == InstancePhase::Unknown
            && i.status.message == message
        {
            continue;
        }
        out.push(Planned {
            name: i.name().to_string(),
            uid: i.metadata.uid.clone(),
            revision: i.metadata.revision,
            node: node_name.to_string(),
            step,
            message,
        });
    }
    out
}

/// Which copy of a replaced instance stays when its original node returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The copy on the returning node: the instance is bound back to it.
    Original,
    /// The replacement: the returning node stops its copy.
    Replacement,
}

/// Decide for `i`, whose original copy is on the node that returned. `scores` are the
/// scheduler's scores of the original's node and the replacement's, when the policy
/// needs them and both could be scored.
pub fn decide(i: &Instance, scores: Option<(f64, f64)>) -> Keep {
    // A replacement that is not placed, or not running yet, is no copy at all: the
    // original never stopped.
    let replacement_runs = i.status.node.is_some() && i.status.phase == InstancePhase::Running;
    if !replacement_runs {
        return Keep::Original;
    }
    match i.spec.disconnect.reconcile {
        Reconcile::KeepOriginal => Keep::Original,
        Reconcile::KeepReplacement => Keep::Replacement,
        Reconcile::BestScore => match scores {
            Some((original, replacement)) if replacement > original => Keep::Replacement,
            _ => Keep::Original,
        },
        Reconcile::LongestRunning => {
            let started = |s: Option<&str>| s.and_then(parse_rfc3339);
            let original = i
                .status
                .original
                .as_ref()
                .and_then(|o| started(o.started_at.as_deref()));
            match (original, started(i.status.started_at.as_deref())) {
                (Some(o), Some(r)) if r < o => Keep::Replacement,
                (None, Some(_)) => Keep::Replacement,
                _ => Keep::Original,
            }
        }
    }
}

/// The disconnect controller: runs with the controllers, on the replica that leads.
pub async fn run(st: Arc<HubState>, cache: Arc<ControllerCache>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The nodes of regions with hubs of their own are theirs to watch.
        let managed = crate::region::managed_elsewhere(&st, cache.regions().iter().map(|r| &**r));
        let unmanaged = |mut nodes: Vec<Arc<Node>>| {
            nodes.retain(|n| !crate::region::node_managed(n, &managed));
            nodes
        };
        if unmanaged(cache.nodes())
            .iter()
            .all(|n| n.status.phase == NodePhase::Ready)
        {
            continue;
        }
        if !cache.catch_up(st.objects.store().as_ref()).await {
            continue;
        }
        // The instances first, then the nodes: the nodes are then at least as new. A
        // returning node is written Ready before it reports its instances (its first
        // heartbeat comes first), so a report the plan sees is never judged by the
        // node's silence before it (which would write it Unknown for good).
        let instances = cache.instances();
        let nodes = unmanaged(cache.nodes());
        // Only nodes that are not Ready have instances to plan over (`plan` passes
        // the others by), and only the votes of their sites count: a pass over
        // every node's name and peers each second took a tenth of a hub with
        // 100,000 nodes while its fleet reconnected.
        let silent: BTreeMap<&str, &Node> = nodes
            .iter()
            .filter(|n| n.status.phase != NodePhase::Ready)
            .map(|n| (n.name(), &**n))
            .collect();
        let sites: std::collections::BTreeSet<&str> =
            silent.values().filter_map(|n| site_of(n)).collect();
        let votes = if sites.is_empty() {
            BTreeMap::new()
        } else {
            peer_votes(
                nodes
                    .iter()
                    .map(|n| &**n)
                    .filter(|n| site_of(n).is_some_and(|s| sites.contains(s))),
            )
        };
        let steps = plan(now_secs(), &silent, &votes, instances.iter().map(|i| &**i));
        let mut replaced = false;
        for p in steps {
            replaced |= p.step == Step::Replace;
            apply(&st, &p).await;
        }
        if replaced {
            st.schedule_kick.notify_one();
        }
    }
}

/// Write one step, if the instance is still where the plan saw it.
async fn apply(st: &HubState, p: &Planned) {
    let r = st
        .objects
        .update_status::<InstanceSpec>(&p.name, |obj, s| {
            if obj.metadata.uid != p.uid
                || obj.metadata.revision != p.revision
                || s.node.as_deref() != Some(p.node.as_str())
            {
                return Ok(false);
            }
            s.message = p.message.clone();
            match p.step {
                Step::Unknown => s.phase = InstancePhase::Unknown,
                Step::Lose => s.phase = InstancePhase::Lost,
                Step::Replace => {
                    // A second loss keeps the first original: that is the copy the
                    // first node may bring back; a copy on the replacement's node is
                    // removed when that node returns (it is bound elsewhere then).
                    if s.original.is_none() {
                        s.original = Some(OriginalCopy {
                            node: p.node.clone(),
                            lost_at: now_rfc3339(),
                            started_at: s.started_at.clone(),
                        });
                    }
                    s.node = None;
                    s.phase = InstancePhase::Pending;
                    s.pid = None;
                    s.started_at = None;
                    s.usage = None;
                    s.placement = String::new();
                }
            }
            Ok(true)
        })
        .await;
    match r {
        Ok(_) if p.step != Step::Unknown => {
            tracing::warn!(instance = %p.name, node = %p.node, "{}", p.message);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(instance = %p.name, error = %e.message, "disconnect step not applied")
        }
    }
}

/// Settle the instances replaced while `node` was away, before its session sends it
/// anything: each is bound back to it or its copy there is dropped ([`decide`]).
/// Returns the store revision of the last write, which the session's sync must have
/// seen before it starts (so that a copy kept is never sent a removal).
pub async fn settle_return(st: &HubState, node: &str) -> Option<u64> {
    let names = st.fanout.originals_on(node);
    if names.is_empty() {
        return None;
    }
    let mut last = None;
    let mut scorer: Option<Scorer> = None;
    for name in names {
        let Ok(i) = st.objects.get::<InstanceSpec>(&name).await else {
            continue;
        };
        if i.status.original.as_ref().map(|o| o.node.as_str()) != Some(node) {
            continue;
        }
        let scores = if i.spec.disconnect.reconcile == Reconcile::BestScore {
            if scorer.is_none() {
                scorer = Scorer::read(st).await;
            }
            scorer.as_ref().and_then(|s| s.scores(&i, node))
        } else {
            None
        };
        let keep = decide(&i, scores);
        let uid = i.metadata.uid.clone();
        let r = st
            .objects
            .update_status::<InstanceSpec>(&name, |obj, s| {
                if obj.metadata.uid != uid
                    || s.original.as_ref().map(|o| o.node.as_str()) != Some(node)
                {
                    return Ok(false);
                }
                let original = s.original.take();
                if keep == Keep::Original {
                    let from = s.node.take();
                    s.node = Some(node.to_string());
                    s.phase = InstancePhase::Unknown;
                    s.started_at = original.and_then(|o| o.started_at);
                    s.pid = None;
                    s.usage = None;
                    s.placement = String::new();
                    s.message = match from {
                        Some(from) => format!(
                            "node '{node}' returned: kept its copy (disconnect.reconcile: {}); the replacement on '{from}' is stopped",
                            obj.spec.disconnect.reconcile
                        ),
                        None => format!("node '{node}' returned before a replacement ran: kept its copy"),
                    };
                }
                Ok(true)
            })
            .await;
        match r {
            Ok(obj) => {
                tracing::info!(instance = %name, node, kept = ?keep, "a replaced instance's node returned");
                last = Some(obj.metadata.revision);
            }
            Err(e) => {
                tracing::warn!(instance = %name, node, error = %e.message, "could not settle a returning node's copy");
            }
        }
    }
    if last.is_some() {
        // The ledgers follow: the replacement's reservation goes, the original's
        // comes back.
        st.schedule_kick.notify_one();
    }
    last
}

/// Scores the scheduler gives an instance's two copies' nodes, on a view read from
/// the store.
struct Scorer {
    view: crate::placement::View,
    ledgers: BTreeMap<String, crate::inventory::Versioned<crate::inventory::Ledger>>,
}

impl Scorer {
    async fn read(st: &HubState) -> Option<Self> {
        let w = crate::cache::World::read(st, Vec::new()).await.ok()?;
        let view = crate::placement::view(&w.nodes, &w.regions, &w.ledgers);
        Some(Self {
            view,
            ledgers: w.ledgers,
        })
    }

    /// `(original, replacement)` for `i`, whose original copy is on `node`.
    fn scores(&self, i: &Instance, node: &str) -> Option<(f64, f64)> {
        let mut c = self.view.cluster.clone();
        let idx = |name: &str| self.view.names.iter().position(|n| n == name);
        let (orig, repl) = (idx(node)? as u32, idx(i.status.node.as_deref()?)? as u32);
        // The returning node is about to be Ready; and the instance's own
        // reservation on the replacement's node must not count against it there.
        c.set_ok(orig, true);
        let req = crate::placement::request(&mut c, i);
        if let Some(a) = self
            .ledgers
            .get(i.status.node.as_deref()?)
            .and_then(|l| l.value.allocations.get(i.name()))
        {
            let res = a.amount.to_res(&mut c);
            c.release(repl, &res, req.group);
        }
        let s = |n| verge_sched::score(&c, &req, n).ok();
        Some((s(orig)?, s(repl)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{DisconnectPolicy, InstanceStatus};

    fn node(name: &str, phase: NodePhase, silent: u64, peers: &[(&str, PeerVerdict)]) -> Node {
        let mut n = Node::new(name, Default::default());
        n.status.phase = phase;
        n.status.last_transition = Some(verge_api::clock::rfc3339(now_secs() - silent));
        n.status.peers = peers.iter().map(|(p, v)| (p.to_string(), *v)).collect();
        n.metadata
            .labels
            .insert(crate::sites::SITE_LABEL.into(), "paris".into());
        n
    }

    fn instance(name: &str, node: &str, policy: DisconnectPolicy) -> Instance {
        let mut i = Instance::new(name, Default::default());
        i.metadata.uid = format!("uid-{name}");
        i.spec.disconnect = policy;
        i.status = InstanceStatus {
            phase: InstancePhase::Running,
            node: Some(node.into()),
            started_at: Some("2026-12-01T00:00:00Z".into()),
            ..Default::default()
        };
        i
    }

    fn steps(nodes: &[Node], instances: &[Instance]) -> Vec<(String, Step)> {
        let by_name = nodes.iter().map(|n| (n.name(), n)).collect();
        let votes = peer_votes(nodes);
        plan(now_secs(), &by_name, &votes, instances)
            .into_iter()
            .map(|p| (p.name, p.step))
            .collect()
    }

    fn lost_after(s: u64) -> DisconnectPolicy {
        DisconnectPolicy {
            lost_after_seconds: s,
            ..Default::default()
        }
    }

    #[test]
    fn a_silent_node_s_instances_are_unknown_then_replaced_or_lost() {
        let nodes = [
            node("a", NodePhase::NotReady, 30, &[]),
            node("b", NodePhase::Ready, 0, &[]),
        ];
        let keep = DisconnectPolicy {
            replace: false,
            ..lost_after(10)
        };
        let instances = [
            instance("soon", "a", lost_after(60)),
            instance("due", "a", lost_after(10)),
            instance("kept", "a", keep),
            instance("elsewhere", "b", lost_after(0)),
        ];
        assert_eq!(
            steps(&nodes, &instances),
            vec![
                ("soon".into(), Step::Unknown),
                ("due".into(), Step::Replace),
                ("kept".into(), Step::Lose),
            ]
        );
    }

    #[test]
    fn a_node_its_peers_still_reach_is_cut_off_not_down() {
        use PeerVerdict::*;
        let i = [instance("w", "a", lost_after(0))];
        // Two of three Ready peers reach it: not lost.
        let up = [
            node("a", NodePhase::NotReady, 600, &[]),
            node("b", NodePhase::Ready, 0, &[("a", Reachable)]),
            node("c", NodePhase::Ready, 0, &[("a", Reachable)]),
            node("d", NodePhase::Ready, 0, &[("a", Unreachable)]),
        ];
        assert_eq!(steps(&up, &i), vec![("w".into(), Step::Unknown)]);
        // A peer that is itself silent does not vote; the rest say it is down.
        let down = [
            node("a", NodePhase::NotReady, 600, &[]),
            node("b", NodePhase::NotReady, 600, &[("a", Reachable)]),
            node("c", NodePhase::Ready, 0, &[("a", Unreachable)]),
        ];
        assert_eq!(steps(&down, &i), vec![("w".into(), Step::Replace)]);
        // No peers at all: only the clock decides.
        let alone = [node("a", NodePhase::NotReady, 600, &[])];
        assert_eq!(steps(&alone, &i), vec![("w".into(), Step::Replace)]);
        // Nodes of another site have no vote.
        let mut stranger = node("x", NodePhase::Ready, 0, &[("a", Reachable)]);
        stranger
            .metadata
            .labels
            .insert(crate::sites::SITE_LABEL.into(), "lyon".into());
        let elsewhere = [node("a", NodePhase::NotReady, 600, &[]), stranger];
        assert_eq!(steps(&elsewhere, &i), vec![("w".into(), Step::Replace)]);
    }

    #[test]
    fn an_unknown_instance_already_saying_so_is_not_written_again() {
        let nodes = [node("a", NodePhase::NotReady, 5, &[])];
        let mut i = instance("w", "a", lost_after(60));
        let by_name = nodes.iter().map(|n| (n.name(), n)).collect();
        let first = plan(now_secs(), &by_name, &BTreeMap::new(), [&i]);
        i.status.phase = InstancePhase::Unknown;
        i.status.message = first[0].message.clone();
        assert!(plan(now_secs(), &by_name, &BTreeMap::new(), [&i]).is_empty());
    }

    fn replaced(
        reconcile: Reconcile,
        original_started: &str,
        replacement_started: &str,
    ) -> Instance {
        let mut i = instance(
            "w",
            "b",
            DisconnectPolicy {
                reconcile,
                ..Default::default()
            },
        );
        i.status.started_at = Some(replacement_started.into());
        i.status.original = Some(OriginalCopy {
            node: "a".into(),
            lost_at: String::new(),
            started_at: Some(original_started.into()),
        });
        i
    }

    #[test]
    fn the_reconcile_rule_picks_the_copy_that_stays() {
        let (early, late) = ("2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z");
        assert_eq!(
            decide(&replaced(Reconcile::KeepOriginal, early, late), None),
            Keep::Original
        );
        assert_eq!(
            decide(&replaced(Reconcile::KeepReplacement, early, late), None),
            Keep::Replacement
        );
        assert_eq!(
            decide(&replaced(Reconcile::LongestRunning, early, late), None),
            Keep::Original
        );
        assert_eq!(
            decide(&replaced(Reconcile::LongestRunning, late, early), None),
            Keep::Replacement
        );
        let best = replaced(Reconcile::BestScore, early, late);
        assert_eq!(decide(&best, Some((0.4, 0.6))), Keep::Replacement);
        assert_eq!(decide(&best, Some((0.6, 0.4))), Keep::Original);
        assert_eq!(
            decide(&best, Some((0.5, 0.5))),
            Keep::Original,
            "a tie keeps what runs"
        );
        assert_eq!(decide(&best, None), Keep::Original);
        // A replacement that is not running is no copy: the original stays, whatever
        // the rule.
        let mut pending = replaced(Reconcile::KeepReplacement, early, late);
        pending.status.phase = InstancePhase::Scheduled;
        assert_eq!(decide(&pending, None), Keep::Original);
        pending.status.node = None;
        pending.status.phase = InstancePhase::Pending;
        assert_eq!(decide(&pending, None), Keep::Original);
    }
}
