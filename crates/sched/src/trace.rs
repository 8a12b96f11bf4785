//! Synthetic clusters and workload traces for benchmarks and tests, plus the classic
//! first-fit and best-fit placements they are compared against. Deterministic: the same
//! seed gives the same cluster and trace.

use crate::model::{Cluster, GeoPoint, NodeSpec, Res, Taint};
use crate::offline::{Alloc, Budget, defrag_plan, fragmentation, recommend, shapes};
use crate::online::{Request, place};

/// SplitMix64: small, fast, good enough for synthetic data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const GIB: u64 = 1 << 30;

/// A synthetic fleet: `n` nodes in 20 regions of sites of ~10 nodes, 16 cores and
/// 64 GiB each (a tenth `aarch64`, one in 20 with two GPUs, one in 50 tainted for
/// dedicated use), three tiers, four ISPs per region.
pub fn synthetic_cluster(n: usize, seed: u64) -> Cluster {
    let mut rng = Rng::new(seed);
    let mut c = Cluster::default();
    let gpu = c.device_id("nvidia-t4");
    let regions = 20usize;
    for r in 0..regions {
        let id = c.regions.intern(&format!("region-{r:02}"));
        // Spread regions over the globe.
        c.region_geo.insert(
            id,
            GeoPoint {
                lat: -50.0 + 100.0 * (r as f64 / regions as f64),
                lon: -170.0 + 340.0 * ((r * 7 % regions) as f64 / regions as f64),
            },
        );
    }
    for i in 0..n {
        let r = i % regions;
        let site = i / 10;
        let mut sellable = Res::cpu_mem(16_000, 64 * GIB);
        sellable.disk = 500 * GIB;
        sellable.bw = 10_000;
        sellable.addrs = 4;
        if rng.below(20) == 0 {
            sellable.devices = vec![(gpu, 2)];
        }
        let taints = if rng.below(50) == 0 {
            vec![Taint {
                key: "dedicated".into(),
                value: "gpu".into(),
                hard: true,
            }]
        } else {
            Vec::new()
        };
        c.add_node(NodeSpec {
            name: format!("n{i:06}"),
            region: format!("region-{r:02}"),
            site: format!("site-{site:05}"),
            isp: format!("isp-{}", rng.below(4)),
            tier: ["onsite", "near", "cloud"][i % 3].to_string(),
            arch: if rng.below(10) == 0 {
                "aarch64"
            } else {
                "x86_64"
            }
            .to_string(),
            labels: vec![],
            taints,
            sellable,
            schedulable: true,
        });
    }
    c
}

/// Shapes of the synthetic workload: mostly small, some CPU-heavy, some memory-heavy,
/// which is what fragments real fleets.
pub const SHAPES: &[(u64, u64)] = &[
    (250, GIB / 2),
    (500, GIB),
    (1_000, 2 * GIB),
    (2_000, 4 * GIB),
    (4_000, 8 * GIB),
    (6_000, 4 * GIB),
    (2_000, 20 * GIB),
];

/// A random request of one of [`SHAPES`]; `regional` makes it name a region (with overflow).
pub fn random_request(c: &mut Cluster, rng: &mut Rng, regional: bool) -> Request {
    let (cpu, mem) = SHAPES[rng.below(SHAPES.len() as u64) as usize];
    let mut req = Request {
        res: Res::cpu_mem(cpu, mem),
        group: Some(c.groups.intern(&format!("app-{}", rng.below(500)))),
        max_per_node: Some(4),
        ..Default::default()
    };
    if regional {
        req.regions = vec![rng.below(c.regions.len() as u64) as u32];
        req.overflow = true;
    }
    if rng.below(10) == 0 {
        req.tier = Some(rng.below(3) as u32);
    }
    req
}

/// How placements are chosen in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Lowest-index node that fits.
    FirstFit,
    /// Node left with the least free CPU+memory (normalised) after placing.
    BestFit,
    /// Verge's online scheduler.
    Online,
    /// Verge's online scheduler with offline recommendations and periodic
    /// defragmentation plans applied.
    OnlineOffline,
}

/// Classic first fit: the lowest-index node that fits.
pub fn first_fit(c: &Cluster, r: &Res) -> Option<u32> {
    (0..c.len() as u32).find(|&i| c.ok(i) && c.fits(i, r))
}

/// Classic best fit: the node left with the least free CPU+memory (normalised), scanning every node.
pub fn best_fit(c: &Cluster, r: &Res) -> Option<u32> {
    let mut best: Option<(f64, u32)> = None;
    for i in 0..c.len() as u32 {
        if !c.ok(i) || !c.fits(i, r) {
            continue;
        }
        let cap = &c.nodes[i as usize].sellable;
        let left = (c.free_cpu(i) - r.cpu) as f64 / cap.cpu as f64
            + (c.free_mem(i) - r.mem) as f64 / cap.mem as f64;
        if best.is_none_or(|(b, _)| left < b) {
            best = Some((left, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Outcome of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceResult {
    /// The strategy.
    pub strategy: Strategy,
    /// Stranded / free CPU at the end.
    pub fragmentation: f64,
    /// Instances that could not be placed.
    pub refused: usize,
    /// Empty nodes at the end.
    pub empty_nodes: u64,
    /// Migrations performed (OnlineOffline only).
    pub migrations: usize,
}

/// Run a churn trace: `steps` events on a fresh `nodes`-node cluster. Each event is an
/// arrival or the departure of a random running instance; arrivals are more likely
/// (70%) while less than 85% of the CPU is reserved and less likely (40%) above, so
/// the fleet hovers around 85% full, where fragmentation matters. Every 200 steps the
/// OnlineOffline strategy applies a defragmentation plan limited to 2% of the running
/// instances.
pub fn run_trace(strategy: Strategy, nodes: usize, steps: usize, seed: u64) -> TraceResult {
    let mut c = synthetic_cluster(nodes, seed);
    // The trace is about packing: no taints or special hardware in the way.
    for n in 0..c.len() as u32 {
        c.set_ok(n, true);
        c.clear_taints(n);
    }
    let mut rng = Rng::new(seed ^ 0xA5A5);
    let mut running: Vec<Alloc> = Vec::new();
    let mut refused = 0;
    let mut migrations = 0;
    let mut next_id = 0u64;
    let mut rec = None;
    for step in 0..steps {
        let used: u64 = running.iter().map(|a| a.req.res.cpu).sum();
        let capacity = nodes as u64 * 16_000;
        let arrive_pct = if used * 100 < capacity * 85 { 7 } else { 4 };
        if running.is_empty() || rng.below(10) < arrive_pct {
            let mut req = random_request(&mut c, &mut rng, false);
            req.max_per_node = None;
            let node = match strategy {
                Strategy::FirstFit => first_fit(&c, &req.res),
                Strategy::BestFit => best_fit(&c, &req.res),
                Strategy::Online => place(&c, &req, None).ok().map(|p| p.node),
                Strategy::OnlineOffline => place(&c, &req, rec.as_ref()).ok().map(|p| p.node),
            };
            match node {
                Some(n) => {
                    c.reserve(n, &req.res, req.group);
                    next_id += 1;
                    running.push(Alloc {
                        id: next_id.to_string(),
                        node: n,
                        req,
                        movable: true,
                    });
                }
                None => refused += 1,
            }
        } else {
            let k = rng.below(running.len() as u64) as usize;
            let a = running.swap_remove(k);
            c.release(a.node, &a.req.res, a.req.group);
        }
        if strategy == Strategy::OnlineOffline && step % 200 == 199 {
            let budget = Budget {
                max_moves: (running.len() / 50).max(1),
                max_moves_per_group: 8,
            };
            let plan = defrag_plan(&c, &running, budget);
            for m in &plan.moves {
                if let Some(a) = running.iter_mut().find(|a| a.id == m.id) {
                    c.release(a.node, &a.req.res, a.req.group);
                    c.reserve(m.to, &a.req.res, a.req.group);
                    a.node = m.to;
                    migrations += 1;
                }
            }
            rec = Some(recommend(&c, &shapes(running.iter().map(|a| &a.req.res))));
        }
    }
    let mix = shapes(running.iter().map(|a| &a.req.res));
    let report = fragmentation(&c, &mix);
    TraceResult {
        strategy,
        fragmentation: report.total.ratio(),
        refused,
        empty_nodes: report.total.empty_nodes,
        migrations,
    }
}
