//! The bridge between the store's objects and the pure scheduler: build a
//! [`verge_sched::Cluster`] from nodes, regions and ledgers, and turn an instance's
//! placement rules into a [`verge_sched::Request`].

use std::collections::BTreeMap;

use verge_api::instance::{PlacementPolicy, TopologyScope};
use verge_api::node::TaintEffect;
use verge_api::{Instance, Node, NodePhase, Region};
use verge_sched::{Cluster, GeoPoint, Policy, Request, Scope, Taint};

use crate::inventory::{Amount, Ledger, Versioned, group_of, region_site};

/// The scheduler's view, and node names by index.
pub struct View {
    /// The cluster with every ledger allocation reserved.
    pub cluster: Cluster,
    /// Node name by index.
    pub names: Vec<String>,
}

/// Build the view. Nodes without a ledger yet are not schedulable (the inventory
/// reconciler creates ledgers first, so capacity is always accounted for).
pub fn view(
    nodes: &[impl std::borrow::Borrow<Node>],
    regions: &[impl std::borrow::Borrow<Region>],
    ledgers: &BTreeMap<String, Versioned<Ledger>>,
) -> View {
    let mut c = Cluster::default();
    for r in regions {
        let r = r.borrow();
        let id = c.regions.intern(r.name());
        c.region_geo.insert(
            id,
            GeoPoint {
                lat: r.spec.latitude,
                lon: r.spec.longitude,
            },
        );
    }
    let mut sorted: Vec<&Node> = nodes.iter().map(|n| n.borrow()).collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    let mut names = Vec::with_capacity(sorted.len());
    for n in sorted {
        let (region, site) = region_site(n);
        let ledger = ledgers.get(n.name());
        let sellable = ledger
            .map_or_else(|| Amount::sellable(n), |l| l.value.capacity.clone())
            .to_res(&mut c);
        let l = &n.metadata.labels;
        let idx = c.add_node(verge_sched::NodeSpec {
            name: n.name().to_string(),
            region,
            site,
            isp: l.get("isp").cloned().unwrap_or_default(),
            tier: l.get("tier").cloned().unwrap_or_default(),
            arch: n.status.architecture.clone(),
            labels: l.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            taints: n
                .spec
                .taints
                .iter()
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    hard: t.effect == TaintEffect::NoSchedule,
                })
                .collect(),
            sellable,
            schedulable: n.status.phase == NodePhase::Ready
                && !n.spec.unschedulable
                && ledger.is_some(),
        });
        if let Some(l) = ledger {
            for a in l.value.allocations.values() {
                let res = a.amount.to_res(&mut c);
                let group = a.group.as_deref().map(|g| c.groups.intern(g));
                c.reserve(idx, &res, group);
            }
        }
        names.push(n.name().to_string());
    }
    View { cluster: c, names }
}

fn scope(s: TopologyScope) -> Scope {
    match s {
        TopologyScope::Node => Scope::Node,
        TopologyScope::Site => Scope::Site,
        TopologyScope::Region => Scope::Region,
        TopologyScope::Isp => Scope::Isp,
    }
}

/// An instance's request in the view's ids. Names the view has never seen (a region or
/// architecture no node has) get fresh ids that match no node, so the explanation
/// counts those nodes as "in another region" or "wrong architecture".
pub fn request(c: &mut Cluster, i: &Instance) -> Request {
    let p = &i.spec.placement;
    let regions: Vec<u32> = p
        .region
        .iter()
        .chain(p.regions.iter())
        .map(|r| c.regions.intern(r))
        .collect();
    Request {
        res: Amount::of_instance(i).to_res(c),
        arch: p.architecture.as_deref().map(|a| c.archs.intern(a)),
        selector: p
            .node_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        tolerations: p
            .tolerations
            .iter()
            .map(|t| (t.key.clone(), t.value.clone()))
            .collect(),
        regions,
        near: p.near.map(|g| GeoPoint {
            lat: g.latitude,
            lon: g.longitude,
        }),
        overflow: p.overflow,
        tier: p.preferred_tier.as_deref().and_then(|t| c.tiers.get(t)),
        isp: p.preferred_isp.as_deref().and_then(|t| c.isps.get(t)),
        group: group_of(i).map(|g| c.groups.intern(&g)),
        anti_affinity: p.anti_affinity.iter().map(|s| scope(*s)).collect(),
        spread: p
            .spread
            .iter()
            .map(|s| (scope(s.scope), s.max_skew))
            .collect(),
        max_per_node: p.max_per_node,
        policy: match p.policy {
            PlacementPolicy::BinPack => Policy::BinPack,
            PlacementPolicy::Spread => Policy::Spread,
        },
    }
}
