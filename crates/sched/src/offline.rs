//! Offline scheduling: measure fragmentation, plan bounded defragmentation, and
//! recommend nodes per instance shape for the online scheduler.
//!
//! **Fragmentation** (documented in `docs/SCHEDULING.md`): the workload mix is the set
//! of instance shapes (CPU, memory) currently placed, weighted by how many instances
//! have each. On a node with free CPU `fc` and free memory `fm`, a shape `s` fits
//! `k_s = min(fc / s.cpu, fm / s.mem)` times (rounded down). The CPU the mix can use
//! there is `sum_s w_s * k_s * s.cpu` (weights sum to 1), at most `fc`; the rest is
//! *stranded*. Fragmentation of a node, site, region or cluster is stranded CPU divided
//! by free CPU. Whole empty nodes are counted as usable capacity, so freeing a node
//! lowers fragmentation.

use std::collections::{BTreeMap, HashMap};

use crate::model::{Cluster, Res};
use crate::online::{Policy, Request, place};

/// An instance shape and its share of the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// CPU millicores.
    pub cpu: u64,
    /// Memory bytes.
    pub mem: u64,
    /// Share of instances with this shape (weights sum to 1).
    pub weight: f64,
}

/// The mix of shapes in a set of resource requests.
pub fn shapes<'a>(reqs: impl IntoIterator<Item = &'a Res>) -> Vec<Shape> {
    let mut counts: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut total = 0u64;
    for r in reqs {
        if r.cpu == 0 || r.mem == 0 {
            continue;
        }
        *counts.entry((r.cpu, r.mem)).or_default() += 1;
        total += 1;
    }
    counts
        .into_iter()
        .map(|((cpu, mem), n)| Shape {
            cpu,
            mem,
            weight: n as f64 / total.max(1) as f64,
        })
        .collect()
}

/// Free and stranded CPU of node `i` under `mix`.
pub fn node_stranded(c: &Cluster, i: u32, mix: &[Shape]) -> (u64, u64) {
    let (fc, fm) = (c.free_cpu(i), c.free_mem(i));
    if !c.ok(i) || mix.is_empty() {
        return (fc, 0);
    }
    let usable: f64 = mix
        .iter()
        .map(|s| {
            let k = (fc / s.cpu).min(fm / s.mem);
            s.weight * (k * s.cpu) as f64
        })
        .sum();
    let usable = (usable.round() as u64).min(fc);
    (fc, fc - usable)
}

/// Fragmentation of one group of nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frag {
    /// Free CPU (millicores).
    pub free_cpu: u64,
    /// Stranded CPU (millicores).
    pub stranded_cpu: u64,
    /// Nodes with nothing placed.
    pub empty_nodes: u64,
    /// Nodes.
    pub nodes: u64,
    /// Sellable CPU.
    pub capacity_cpu: u64,
    /// Sellable memory.
    pub capacity_mem: u64,
    /// Free memory.
    pub free_mem: u64,
}

impl Frag {
    /// Stranded / free CPU (0 when nothing is free).
    pub fn ratio(&self) -> f64 {
        if self.free_cpu == 0 {
            0.0
        } else {
            self.stranded_cpu as f64 / self.free_cpu as f64
        }
    }
    fn add(&mut self, c: &Cluster, i: u32, mix: &[Shape]) {
        let (free, stranded) = node_stranded(c, i, mix);
        let u = i as usize;
        self.free_cpu += free;
        self.stranded_cpu += stranded;
        self.nodes += 1;
        self.capacity_cpu += c.nodes[u].sellable.cpu;
        self.capacity_mem += c.nodes[u].sellable.mem;
        self.free_mem += c.free_mem(i);
        if c.is_empty_node(i) {
            self.empty_nodes += 1;
        }
    }
}

/// Fragmentation of the cluster, and by region and by site.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FragReport {
    /// Whole cluster.
    pub total: Frag,
    /// By region name.
    pub by_region: BTreeMap<String, Frag>,
    /// By site name.
    pub by_site: BTreeMap<String, Frag>,
    /// By node name.
    pub by_node: BTreeMap<String, Frag>,
}

/// Measure fragmentation under `mix`.
pub fn fragmentation(c: &Cluster, mix: &[Shape]) -> FragReport {
    let mut r = FragReport::default();
    for i in 0..c.len() as u32 {
        r.total.add(c, i, mix);
        r.by_region
            .entry(c.regions.name(c.region_of(i)).to_string())
            .or_default()
            .add(c, i, mix);
        r.by_site
            .entry(c.sites.name(c.site_of[i as usize]).to_string())
            .or_default()
            .add(c, i, mix);
        r.by_node
            .entry(c.nodes[i as usize].name.clone())
            .or_default()
            .add(c, i, mix);
    }
    r
}

/// One placed instance, as the offline scheduler sees it.
#[derive(Debug, Clone)]
pub struct Alloc {
    /// Caller's id for the instance.
    pub id: String,
    /// Node index it is on.
    pub node: u32,
    /// Its requirements (resources and constraints).
    pub req: Request,
    /// Whether it may be moved at all.
    pub movable: bool,
}

/// Limits on disruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// At most this many migrations in the plan.
    pub max_moves: usize,
    /// At most this many migrations of one group (application).
    pub max_moves_per_group: usize,
}

/// One migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Instance id.
    pub id: String,
    /// From node index.
    pub from: u32,
    /// To node index.
    pub to: u32,
}

/// A defragmentation plan and its effect.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Migrations, in order.
    pub moves: Vec<Move>,
    /// Before.
    pub before: FragReport,
    /// After the plan.
    pub after: FragReport,
    /// Nodes emptied by the plan.
    pub nodes_freed: Vec<u32>,
}

/// Plan migrations that empty lightly used nodes (or, failing that, lower
/// fragmentation), within `budget`. Pure: `c` is not changed; apply the moves to make it so.
pub fn defrag_plan(c: &Cluster, allocs: &[Alloc], budget: Budget) -> Plan {
    let mix = shapes(allocs.iter().map(|a| &a.req.res));
    let before = fragmentation(c, &mix);
    let mut sim = c.clone();
    let mut by_node: HashMap<u32, Vec<usize>> = HashMap::new();
    for (k, a) in allocs.iter().enumerate() {
        by_node.entry(a.node).or_default().push(k);
    }
    // Drain candidates: the least used nodes first; a node with an unmovable
    // instance cannot be emptied.
    let mut candidates: Vec<u32> = by_node
        .iter()
        .filter(|(_, ks)| ks.iter().all(|k| allocs[*k].movable))
        .map(|(n, _)| *n)
        .collect();
    candidates.sort_by(|a, b| {
        let ua = sim.utilisation(*a);
        let ub = sim.utilisation(*b);
        (ua.0 + ua.1).total_cmp(&(ub.0 + ub.1)).then(a.cmp(b))
    });
    let mut moves = Vec::new();
    let mut per_group: HashMap<Option<u32>, usize> = HashMap::new();
    let mut freed = Vec::new();
    let mut drained: Vec<bool> = vec![false; sim.len()];
    for node in candidates {
        let ks = &by_node[&node];
        if moves.len() + ks.len() > budget.max_moves {
            continue;
        }
        // Take the node out, then try to fit each of its instances elsewhere, biggest first.
        let saved_ok = sim.ok(node);
        sim.set_ok(node, false);
        let mut order = ks.clone();
        order.sort_by(|a, b| allocs[*b].req.res.cpu.cmp(&allocs[*a].req.res.cpu));
        let mut tentative: Vec<(usize, u32)> = Vec::new();
        let mut group_use = per_group.clone();
        let mut ok = true;
        for k in order {
            let a = &allocs[k];
            let used = group_use.entry(a.req.group).or_default();
            if *used >= budget.max_moves_per_group {
                ok = false;
                break;
            }
            sim.release(node, &a.req.res, a.req.group);
            let mut req = a.req.clone();
            req.policy = Policy::BinPack;
            match place(&sim, &req, None) {
                Ok(p) if !drained[p.node as usize] => {
                    sim.reserve(p.node, &a.req.res, a.req.group);
                    tentative.push((k, p.node));
                    *used += 1;
                }
                _ => {
                    sim.reserve(node, &a.req.res, a.req.group);
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            for (k, to) in &tentative {
                moves.push(Move {
                    id: allocs[*k].id.clone(),
                    from: node,
                    to: *to,
                });
            }
            per_group = group_use;
            drained[node as usize] = true;
            freed.push(node);
        } else {
            // Undo this node's tentative moves.
            for (k, to) in tentative.into_iter().rev() {
                let a = &allocs[k];
                sim.release(to, &a.req.res, a.req.group);
                sim.reserve(node, &a.req.res, a.req.group);
            }
        }
        sim.set_ok(node, saved_ok);
    }
    let after = fragmentation(&sim, &mix);
    Plan {
        moves,
        before,
        after,
        nodes_freed: freed,
    }
}

/// Preferred nodes per instance shape: where the shape leaves the least stranded capacity.
#[derive(Debug, Clone, Default)]
pub struct Recommendations {
    by_shape: HashMap<(u64, u64), Vec<bool>>,
    /// Which computation these are (0: none). They never change once made, so a
    /// memo of a scan that read them holds for as long as the id is the same.
    id: u64,
}

impl Recommendations {
    /// Which computation these are: equal ids, equal recommendations.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The preferred-node bitmap for a request's shape, if any.
    pub fn preferred(&self, r: &Res) -> Option<&[bool]> {
        self.by_shape.get(&(r.cpu, r.mem)).map(Vec::as_slice)
    }

    /// How many shapes have recommendations.
    pub fn len(&self) -> usize {
        self.by_shape.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_shape.is_empty()
    }
}

/// For each shape in `mix`, mark the nodes (up to a tenth of the cluster, at least 8)
/// where placing it leaves free CPU and memory in the proportions of the mix, so that
/// what remains stays usable.
pub fn recommend(c: &Cluster, mix: &[Shape]) -> Recommendations {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut out = Recommendations {
        id: MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        ..Recommendations::default()
    };
    let keep = (c.len() / 10).max(8);
    for s in mix {
        let mut scored: Vec<(f64, u32)> = (0..c.len() as u32)
            .filter(|&i| c.ok(i) && c.free_cpu(i) >= s.cpu && c.free_mem(i) >= s.mem)
            .map(|i| {
                let fc = c.free_cpu(i) - s.cpu;
                let fm = c.free_mem(i) - s.mem;
                let stranded: f64 = mix
                    .iter()
                    .map(|t| {
                        let k = (fc / t.cpu).min(fm / t.mem);
                        t.weight * (fc - (k * t.cpu).min(fc)) as f64
                    })
                    .sum();
                (stranded, i)
            })
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut bitmap = vec![false; c.len()];
        for (_, i) in scored.into_iter().take(keep) {
            bitmap[i as usize] = true;
        }
        out.by_shape.insert((s.cpu, s.mem), bitmap);
    }
    out
}
