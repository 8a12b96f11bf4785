//! Behaviour of the online and offline schedulers.

use proptest::prelude::*;
use verge_sched::trace::{Strategy, run_trace, synthetic_cluster};
use verge_sched::{
    Alloc, Budget, Cluster, GeoPoint, NodeSpec, Policy, Reason, Request, Res, Scope, Taint,
    defrag_plan, place, place_gang, place_scanning,
};

const GI: u64 = 1 << 30;

fn node(name: &str, region: &str, cpu: u64, mem_gi: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        region: region.into(),
        site: format!("{region}-site"),
        isp: "isp-a".into(),
        tier: "near".into(),
        arch: "x86_64".into(),
        sellable: Res::cpu_mem(cpu, mem_gi * GI),
        schedulable: true,
        ..Default::default()
    }
}

fn req(cpu: u64, mem_gi: u64) -> Request {
    Request {
        res: Res::cpu_mem(cpu, mem_gi * GI),
        ..Default::default()
    }
}

#[test]
fn explains_exactly_why_nothing_fits() {
    let mut nodes = vec![
        node("a", "eu", 4000, 8),
        node("b", "eu", 4000, 8),
        node("c", "eu", 4000, 64),
    ];
    nodes[2].arch = "aarch64".into();
    let mut c = Cluster::new(nodes);
    let mut r = req(1000, 32);
    r.arch = c.archs.get("x86_64");
    let err = place(&c, &r, None).expect_err("nothing fits");
    assert_eq!(
        err.to_string(),
        "0/3 nodes fit: 2 insufficient memory, 1 wrong architecture"
    );
    c.set_ok(0, false);
    let err = place(&c, &r, None).expect_err("nothing fits");
    assert_eq!(err.count(Reason::NotReady), 1);
}

#[test]
fn filters_devices_taints_and_selectors() {
    let mut a = node("a", "eu", 8000, 32);
    let mut b = node("b", "eu", 8000, 32);
    let mut c0 = Cluster::default();
    let gpu = c0.device_id("nvidia-t4");
    b.sellable.devices = vec![(gpu, 2)];
    b.taints = vec![Taint {
        key: "dedicated".into(),
        value: "gpu".into(),
        hard: true,
    }];
    a.labels = vec![("disk".into(), "ssd".into())];
    c0.add_node(a);
    c0.add_node(b);
    let mut r = req(1000, 1);
    r.res.devices = vec![(gpu, 1)];
    // The only GPU node is tainted.
    let err = place(&c0, &r, None).expect_err("taint");
    assert_eq!(
        err.to_string(),
        "0/2 nodes fit: 1 untolerated taint, 1 missing device"
    );
    r.tolerations = vec![("dedicated".into(), None)];
    assert_eq!(place(&c0, &r, None).expect("fits").node, 1);
    let mut sel = req(1000, 1);
    sel.selector = vec![("disk".into(), "ssd".into())];
    assert_eq!(place(&c0, &sel, None).expect("fits").node, 0);
}

#[test]
fn binpack_fills_and_spread_balances() {
    let mut c = Cluster::new(vec![node("a", "eu", 8000, 32), node("b", "eu", 8000, 32)]);
    c.reserve(1, &Res::cpu_mem(4000, 16 * GI), None);
    let r = req(1000, 1);
    assert_eq!(
        place(&c, &r, None).expect("fits").node,
        1,
        "bin-packing prefers the fuller node"
    );
    let mut s = r.clone();
    s.policy = Policy::Spread;
    assert_eq!(
        place(&c, &s, None).expect("fits").node,
        0,
        "spreading prefers the emptier node"
    );
}

#[test]
fn full_region_overflows_to_the_nearest_only_when_allowed() {
    let mut c = Cluster::new(vec![
        node("paris", "eu-west", 1000, 4),
        node("frankfurt", "eu-central", 8000, 32),
        node("mumbai", "ap-south", 8000, 32),
    ]);
    let geo = [
        ("eu-west", 48.8, 2.3),
        ("eu-central", 50.1, 8.7),
        ("ap-south", 19.0, 72.8),
    ];
    for (name, lat, lon) in geo {
        let id = c.regions.get(name).expect("region");
        c.region_geo.insert(id, GeoPoint { lat, lon });
    }
    let mut r = req(2000, 2);
    r.regions = vec![c.regions.get("eu-west").expect("region")];
    let err = place(&c, &r, None).expect_err("region full, no overflow");
    assert_eq!(
        err.to_string(),
        "0/3 nodes fit: 2 in another region, 1 insufficient cpu"
    );
    r.overflow = true;
    let p = place(&c, &r, None).expect("overflow");
    assert_eq!(
        c.nodes[p.node as usize].name, "frankfurt",
        "the nearest region, not the emptiest"
    );
    assert_eq!(p.overflow_from, c.regions.get("eu-west"));
    // Users near Mumbai, no region named: the nearest region wins.
    let mut near = req(1000, 1);
    near.near = Some(GeoPoint {
        lat: 19.1,
        lon: 72.9,
    });
    assert_eq!(
        c.nodes[place(&c, &near, None).expect("fits").node as usize].name,
        "mumbai"
    );
}

#[test]
fn anti_affinity_spread_and_max_per_node() {
    let nodes: Vec<NodeSpec> = (0..4)
        .map(|i| {
            let mut n = node(&format!("n{i}"), if i < 2 { "eu" } else { "us" }, 8000, 32);
            n.site = format!("site-{i}");
            n.isp = if i % 2 == 0 { "isp-a" } else { "isp-b" }.into();
            n
        })
        .collect();
    let mut c = Cluster::new(nodes);
    let app = c.groups.intern("web");
    let mut r = req(100, 1);
    r.group = Some(app);
    r.anti_affinity = vec![Scope::Node];
    let placed = place_gang(&mut c, &vec![r.clone(); 4], None).expect("one per node");
    let mut used: Vec<u32> = placed.iter().map(|p| p.node).collect();
    used.sort();
    assert_eq!(used, vec![0, 1, 2, 3]);
    let err = place(&c, &r, None).expect_err("a fifth has nowhere to go");
    assert_eq!(err.count(Reason::AntiAffinity), 4);

    // Spread over regions with skew 1: alternate regions.
    let mut c = Cluster::new(
        (0..4)
            .map(|i| node(&format!("m{i}"), if i < 2 { "eu" } else { "us" }, 8000, 32))
            .collect(),
    );
    let g = c.groups.intern("api");
    let mut s = req(100, 1);
    s.group = Some(g);
    s.spread = vec![(Scope::Region, 1)];
    s.max_per_node = Some(1);
    let placed = place_gang(&mut c, &vec![s.clone(); 4], None).expect("spread");
    let eu = placed
        .iter()
        .filter(|p| c.regions.name(p.region) == "eu")
        .count();
    assert_eq!(eu, 2, "two per region");
    assert_eq!(
        place(&c, &s, None)
            .expect_err("max per node")
            .count(Reason::MaxPerNode),
        4
    );
}

#[test]
fn gangs_are_all_or_nothing() {
    let mut c = Cluster::new(vec![node("a", "eu", 2000, 8), node("b", "eu", 2000, 8)]);
    let before = (0..2).map(|i| c.free(i)).collect::<Vec<_>>();
    let gang = vec![req(1500, 1), req(1500, 1), req(1500, 1)];
    let (k, why) = place_gang(&mut c, &gang, None).expect_err("third does not fit");
    assert_eq!(k, 2);
    assert!(why.to_string().contains("insufficient cpu"));
    let after = (0..2).map(|i| c.free(i)).collect::<Vec<_>>();
    assert_eq!(before, after, "a failed gang leaves nothing reserved");
    assert!(place_gang(&mut c, &gang[..2], None).is_ok());
}

#[test]
fn defrag_empties_nodes_within_budget() {
    let mut c = Cluster::new(
        (0..4)
            .map(|i| node(&format!("n{i}"), "eu", 8000, 32))
            .collect(),
    );
    let mut allocs = Vec::new();
    // Two half-full nodes and two nodes with one small instance each.
    for (k, (n, cpu)) in [(0, 4000), (1, 4000), (2, 1000), (3, 1000)]
        .into_iter()
        .enumerate()
    {
        let r = req(cpu, 4);
        c.reserve(n, &r.res, None);
        allocs.push(Alloc {
            id: format!("i{k}"),
            node: n,
            req: r,
            movable: true,
        });
    }
    let plan = defrag_plan(
        &c,
        &allocs,
        Budget {
            max_moves: 1,
            max_moves_per_group: 10,
        },
    );
    assert_eq!(plan.moves.len(), 1, "budget respected");
    assert_eq!(plan.nodes_freed.len(), 1);
    let plan = defrag_plan(
        &c,
        &allocs,
        Budget {
            max_moves: 10,
            max_moves_per_group: 10,
        },
    );
    assert!(plan.nodes_freed.len() >= 2, "{:?}", plan.moves);
    assert!(plan.after.total.empty_nodes > plan.before.total.empty_nodes);
    // Unmovable instances pin their node.
    for a in &mut allocs {
        a.movable = false;
    }
    assert!(
        defrag_plan(
            &c,
            &allocs,
            Budget {
                max_moves: 10,
                max_moves_per_group: 10
            }
        )
        .moves
        .is_empty()
    );
}

/// The target, checked on a deterministic trace: the offline plan cuts
/// fragmentation by at least 20% against online scheduling alone.
#[test]
fn offline_defrag_cuts_fragmentation_by_a_fifth() {
    let online = run_trace(Strategy::Online, 300, 6000, 7);
    let both = run_trace(Strategy::OnlineOffline, 300, 6000, 7);
    let first = run_trace(Strategy::FirstFit, 300, 6000, 7);
    assert!(both.migrations > 0);
    assert!(
        both.fragmentation <= online.fragmentation * 0.8,
        "online {online:?} vs online+offline {both:?}"
    );
    assert!(
        online.fragmentation < first.fragmentation,
        "online {online:?} vs first-fit {first:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// A burst of a few shapes, with releases and cordons between: every answer the
    /// memo of the last scan gives is the one a full scan of the same cluster gives,
    /// ties included.
    #[test]
    fn the_memo_answers_what_a_full_scan_would(
        seed in any::<u64>(),
        steps in proptest::collection::vec((0u8..3, 0u8..10, any::<u16>()), 1..400),
    ) {
        let mut c = synthetic_cluster(300, seed);
        let shapes = [req(250, 1), req(2000, 4), Request { policy: Policy::Spread, ..req(1000, 2) }];
        // Offline recommendations for two of the shapes: part of the score when given.
        let recs = verge_sched::recommend(&c, &verge_sched::shapes(shapes[..2].iter().map(|r| &r.res)));
        let mut placed: Vec<(u32, Request)> = Vec::new();
        for (shape, action, pick) in steps {
            let r = &shapes[shape as usize];
            match action {
                // Now and then an instance leaves, or a node is cordoned or back.
                0 if !placed.is_empty() => {
                    let (n, r) = placed.swap_remove(pick as usize % placed.len());
                    c.release(n, &r.res, r.group);
                }
                1 => {
                    let n = u32::from(pick) % c.len() as u32;
                    c.set_ok(n, !c.ok(n));
                }
                _ => {
                    let rec = (pick % 2 == 0).then_some(&recs);
                    let fresh = place_scanning(&c, r, rec);
                    let memo = place(&c, r, rec);
                    prop_assert_eq!(
                        memo.as_ref().map(|p| (p.node, p.score)).map_err(Clone::clone),
                        fresh.as_ref().map(|p| (p.node, p.score)).map_err(Clone::clone)
                    );
                    if let Ok(p) = memo {
                        c.reserve(p.node, &r.res, r.group);
                        placed.push((p.node, r.clone()));
                    }
                }
            }
        }
    }

    /// Whatever the requests and constraints, reservations never exceed a node's
    /// sellable capacity, and every placement passes the filters.
    #[test]
    fn never_over_commits(
        seed in any::<u64>(),
        reqs in proptest::collection::vec((1u64..6000, 1u64..24, any::<bool>(), 0u32..3), 1..200),
    ) {
        let mut c = synthetic_cluster(40, seed);
        let group = c.groups.intern("g");
        let mut placed = Vec::new();
        for (cpu, mem, spread, maxn) in reqs {
            let mut r = req(cpu, mem);
            if spread { r.policy = Policy::Spread; }
            if maxn > 0 { r.group = Some(group); r.max_per_node = Some(maxn); }
            if let Ok(p) = place(&c, &r, None) {
                prop_assert!(c.fits(p.node, &r.res));
                c.reserve(p.node, &r.res, r.group);
                placed.push((p.node, r));
            }
        }
        for i in 0..c.len() as u32 {
            let cap = &c.nodes[i as usize].sellable;
            let used_cpu: u64 = placed.iter().filter(|(n, _)| *n == i).map(|(_, r)| r.res.cpu).sum();
            let used_mem: u64 = placed.iter().filter(|(n, _)| *n == i).map(|(_, r)| r.res.mem).sum();
            prop_assert!(used_cpu <= cap.cpu && used_mem <= cap.mem);
            prop_assert_eq!(c.free_cpu(i), cap.cpu - used_cpu);
        }
    }
}
