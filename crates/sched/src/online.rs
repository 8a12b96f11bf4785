//! Online scheduling: place one instance (or a gang of them) now.
//!
//! Domains run global → region → node. A request that names regions (or a user
//! location) is tried region by region, nearest first; only with `overflow` does it
//! spill past the regions it named, to the next nearest one. Inside a domain every node
//! is evaluated (or, for a request like the last one that scanned them all, only the
//! nodes changed since: [`crate::memo`], same answer): hard filters first (readiness, resources, architecture, devices,
//! taints, selectors, anti-affinity, spread, max per node), then a score (bin-packing or
//! spreading, tier, ISP, proximity, soft taints, offline recommendations). The best
//! score wins; ties go to the lower node index, so the result is deterministic.

use std::fmt;

use crate::model::{Cluster, GeoPoint, OK, Res, Scope, TAINTED};
use crate::offline::Recommendations;

/// Packing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Prefer fuller nodes (fewer, fuller nodes; less fragmentation).
    #[default]
    BinPack,
    /// Prefer emptier nodes (headroom, blast radius).
    Spread,
}

/// One instance's requirements, in cluster ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Resources.
    pub res: Res,
    /// Required architecture id.
    pub arch: Option<u32>,
    /// Node labels that must match.
    pub selector: Vec<(String, String)>,
    /// Tolerated taints: key, and value (None: any value).
    pub tolerations: Vec<(String, Option<String>)>,
    /// Acceptable regions, in order of preference (empty: any).
    pub regions: Vec<u32>,
    /// Where the users are (proximity score and region order).
    pub near: Option<GeoPoint>,
    /// May spill beyond `regions` to the next nearest region when they are full.
    pub overflow: bool,
    /// Preferred tier id.
    pub tier: Option<u32>,
    /// Preferred ISP id.
    pub isp: Option<u32>,
    /// The instance's group (e.g. its `app`), for the constraints below.
    pub group: Option<u32>,
    /// No two instances of the group in one domain of these scopes.
    pub anti_affinity: Vec<Scope>,
    /// Spread the group over domains of a scope with at most this skew.
    pub spread: Vec<(Scope, u32)>,
    /// At most this many instances of the group per node.
    pub max_per_node: Option<u32>,
    /// Bin-pack or spread.
    pub policy: Policy,
}

/// Why a node was ruled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(usize)]
pub enum Reason {
    /// Not Ready, or cordoned.
    NotReady = 0,
    /// Outside the regions tried.
    WrongRegion,
    /// Architecture differs.
    WrongArch,
    /// A selector label is missing or differs.
    SelectorMismatch,
    /// Has a taint the instance does not tolerate.
    Taint,
    /// Not enough CPU.
    InsufficientCpu,
    /// Not enough memory.
    InsufficientMemory,
    /// Not enough disk.
    InsufficientDisk,
    /// Not enough bandwidth.
    InsufficientBandwidth,
    /// No public address left.
    NoAddress,
    /// Lacks the device model, or enough of it.
    MissingDevice,
    /// Another instance of the group is in this domain.
    AntiAffinity,
    /// Placing here would exceed the spread skew.
    SpreadSkew,
    /// The node already has the maximum of this group.
    MaxPerNode,
}

const REASONS: usize = 14;

impl Reason {
    fn all() -> [Reason; REASONS] {
        use Reason::*;
        [
            NotReady,
            WrongRegion,
            WrongArch,
            SelectorMismatch,
            Taint,
            InsufficientCpu,
            InsufficientMemory,
            InsufficientDisk,
            InsufficientBandwidth,
            NoAddress,
            MissingDevice,
            AntiAffinity,
            SpreadSkew,
            MaxPerNode,
        ]
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::NotReady => "not ready or cordoned",
            Reason::WrongRegion => "in another region",
            Reason::WrongArch => "wrong architecture",
            Reason::SelectorMismatch => "node selector mismatch",
            Reason::Taint => "untolerated taint",
            Reason::InsufficientCpu => "insufficient cpu",
            Reason::InsufficientMemory => "insufficient memory",
            Reason::InsufficientDisk => "insufficient disk",
            Reason::InsufficientBandwidth => "insufficient bandwidth",
            Reason::NoAddress => "no free address",
            Reason::MissingDevice => "missing device",
            Reason::AntiAffinity => "anti-affinity",
            Reason::SpreadSkew => "spread constraint",
            Reason::MaxPerNode => "max per node reached",
        })
    }
}

/// Why an instance fits nowhere: each node counted once, under the first reason that
/// ruled it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Nodes in the cluster.
    pub total: usize,
    /// Count per reason.
    pub counts: [u32; REASONS],
}

impl Unschedulable {
    /// How many nodes were ruled out for `r`.
    pub fn count(&self, r: Reason) -> u32 {
        self.counts[r as usize]
    }
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return write!(
                f,
                "0/0 nodes fit: no nodes are registered; enrol an edge with `verge edge --join-token ...`"
            );
        }
        write!(f, "0/{} nodes fit: ", self.total)?;
        let mut by: Vec<(Reason, u32)> = Reason::all()
            .into_iter()
            .map(|r| (r, self.counts[r as usize]))
            .filter(|(_, n)| *n > 0)
            .collect();
        by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, (r, n)) in by.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{n} {r}")?;
        }
        Ok(())
    }
}

/// Where an instance goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Node index.
    pub node: u32,
    /// Region id of the node.
    pub region: u32,
    /// When the instance spilled over: the first region it preferred.
    pub overflow_from: Option<u32>,
    /// The winning score.
    pub score: f64,
    /// Nodes evaluated.
    pub evaluated: usize,
}

/// The regions to try, in order; `None` means one global pass over every node.
fn domain_order(c: &Cluster, req: &Request) -> Vec<Option<u32>> {
    let anchor = req.near.or_else(|| {
        req.regions
            .first()
            .and_then(|r| c.region_geo.get(r).copied())
    });
    let mut by_distance: Vec<u32> = (0..c.regions.len() as u32).collect();
    if let Some(a) = anchor {
        by_distance.sort_by(|x, y| {
            let dx = c.region_geo.get(x).map_or(f64::MAX, |g| g.km(&a));
            let dy = c.region_geo.get(y).map_or(f64::MAX, |g| g.km(&a));
            dx.total_cmp(&dy).then(x.cmp(y))
        });
    }
    if req.regions.is_empty() {
        if req.near.is_some() {
            // Nearest region first; only spill further if allowed.
            return if req.overflow {
                by_distance.into_iter().map(Some).collect()
            } else {
                by_distance.into_iter().take(1).map(Some).collect()
            };
        }
        return vec![None];
    }
    let mut order: Vec<Option<u32>> = req.regions.iter().map(|r| Some(*r)).collect();
    if req.overflow {
        order.extend(
            by_distance
                .into_iter()
                .filter(|r| !req.regions.contains(r))
                .map(Some),
        );
    }
    order
}

/// Group constraints of a request, resolved against the cluster once per request into
/// what a scan needs: the few nodes and domains that are ruled out, and the counts
/// used for soft spreading. A group with no instances yet costs nothing per node.
struct GroupRules {
    /// Nodes ruled out, sorted, with the reason.
    blocked_nodes: Vec<(u32, Reason)>,
    /// Per scope above node: a dense "ruled out" table by domain id.
    blocked_domains: Vec<(Scope, Vec<bool>, Reason)>,
    /// Scopes to spread over softly, with instance counts by domain id.
    penalty: Vec<(Scope, std::collections::HashMap<u32, u32>)>,
}

impl GroupRules {
    fn new(c: &Cluster, req: &Request) -> Option<Self> {
        let g = req.group?;
        let mut blocked_nodes: Vec<(u32, Reason)> = Vec::new();
        let mut blocked_domains: Vec<(Scope, Vec<bool>, Reason)> = Vec::new();
        let mut block = |scope: Scope, limit: u32, reason: Reason| {
            let Some(m) = c.group_domains(g, scope) else {
                return;
            };
            let hits: Vec<u32> = m
                .iter()
                .filter(|(_, n)| **n >= limit)
                .map(|(d, _)| *d)
                .collect();
            if hits.is_empty() {
                return;
            }
            if scope == Scope::Node {
                blocked_nodes.extend(hits.into_iter().map(|d| (d, reason)));
            } else {
                let mut table = vec![false; c.domains(scope)];
                for d in hits {
                    if let Some(slot) = table.get_mut(d as usize) {
                        *slot = true;
                    }
                }
                blocked_domains.push((scope, table, reason));
            }
        };
        if let Some(max) = req.max_per_node {
            block(Scope::Node, max.max(1), Reason::MaxPerNode);
        }
        for s in &req.anti_affinity {
            block(*s, 1, Reason::AntiAffinity);
        }
        for (s, skew) in &req.spread {
            // Placing here must keep count + 1 - min <= skew.
            block(*s, c.group_min(g, *s) + skew.max(&1), Reason::SpreadSkew);
        }
        blocked_nodes.sort_unstable_by_key(|(n, _)| *n);
        blocked_nodes.dedup_by_key(|(n, _)| *n);
        let penalty: Vec<_> = req
            .spread
            .iter()
            .filter_map(|(s, _)| {
                c.group_domains(g, *s)
                    .filter(|m| !m.is_empty())
                    .map(|m| (*s, m.clone()))
            })
            .collect();
        if blocked_nodes.is_empty() && blocked_domains.is_empty() && penalty.is_empty() {
            return None;
        }
        Some(Self {
            blocked_nodes,
            blocked_domains,
            penalty,
        })
    }

    #[inline(always)]
    fn check(&self, c: &Cluster, i: u32) -> Result<(), Reason> {
        if !self.blocked_nodes.is_empty()
            && let Ok(k) = self.blocked_nodes.binary_search_by_key(&i, |(n, _)| *n)
        {
            return Err(self.blocked_nodes[k].1);
        }
        for (scope, table, reason) in &self.blocked_domains {
            if table
                .get(c.domain(i, *scope) as usize)
                .copied()
                .unwrap_or(false)
            {
                return Err(*reason);
            }
        }
        Ok(())
    }

    fn spread_penalty(&self, c: &Cluster, i: u32) -> f32 {
        self.penalty
            .iter()
            .map(|(s, m)| 0.05 * m.get(&c.domain(i, *s)).copied().unwrap_or(0) as f32)
            .sum()
    }
}

const TAINT_HARD: u8 = 1;
const TAINT_SOFT: u8 = 2;

struct Ctx<'a> {
    c: &'a Cluster,
    req: &'a Request,
    rec: Option<&'a [bool]>,
    region_bonus: Vec<f32>,
    rules: Option<GroupRules>,
    taint_verdicts: Vec<u8>,
    extra: bool,
    arch: u8,
    tier: u8,
    isp: u16,
    counts: [u32; REASONS],
    evaluated: usize,
}

impl Ctx<'_> {
    #[inline(always)]
    fn check(&self, i: u32) -> Result<(), Reason> {
        let c = self.c;
        let r = &self.req.res;
        let u = i as usize;
        let h = &c.hot[u];
        if h.flags & OK == 0 {
            return Err(Reason::NotReady);
        }
        if (h.free_cpu as u64) < r.cpu {
            return Err(Reason::InsufficientCpu);
        }
        if h.free_mem < r.mem {
            return Err(Reason::InsufficientMemory);
        }
        if self.arch != u8::MAX && h.arch != self.arch {
            return Err(Reason::WrongArch);
        }
        if self.extra {
            if r.disk > c.free_disk[u] {
                return Err(Reason::InsufficientDisk);
            }
            if r.bw > c.free_bw[u] {
                return Err(Reason::InsufficientBandwidth);
            }
            if r.addrs > c.free_addrs[u] {
                return Err(Reason::NoAddress);
            }
            if !r
                .devices
                .iter()
                .all(|(d, n)| c.free_dev[u].iter().any(|(fd, fnn)| fd == d && fnn >= n))
            {
                return Err(Reason::MissingDevice);
            }
        }
        if h.flags & TAINTED != 0 && self.taint_verdicts[h.taint_set as usize] == TAINT_HARD {
            return Err(Reason::Taint);
        }
        if !self.req.selector.is_empty()
            && !self
                .req
                .selector
                .iter()
                .all(|(k, v)| c.nodes[u].labels.iter().any(|(nk, nv)| nk == k && nv == v))
        {
            return Err(Reason::SelectorMismatch);
        }
        if let Some(rules) = &self.rules {
            rules.check(c, i)?;
        }
        Ok(())
    }

    /// Whether the score is the fill term alone (no preferences, bonuses or penalties),
    /// which lets the scan skip the rest.
    fn plain(&self) -> bool {
        self.tier == u8::MAX
            && self.isp == u16::MAX
            && self.region_bonus.is_empty()
            && self.rec.is_none()
            && self.rules.as_ref().is_none_or(|r| r.penalty.is_empty())
            && !self.taint_verdicts.contains(&TAINT_SOFT)
    }

    #[inline(always)]
    fn score<const PLAIN: bool>(&self, i: u32) -> f32 {
        let c = self.c;
        let u = i as usize;
        let h = &c.hot[u];
        let r = &self.req.res;
        // Signed conversions: x86 converts i64 to float in one instruction, u64 not.
        let left = (h.free_cpu as i64 - r.cpu as i64) as f32 * h.inv_cpu
            + (h.free_mem as i64 - r.mem as i64) as f32 * h.inv_mem;
        let mut s = match self.req.policy {
            Policy::BinPack => 1.0 - 0.5 * left,
            Policy::Spread => 0.5 * left,
        };
        if PLAIN {
            return s;
        }
        if h.tier == self.tier {
            s += 0.5;
        }
        if h.isp == self.isp {
            s += 0.3;
        }
        if !self.region_bonus.is_empty() {
            s += self.region_bonus[h.region as usize];
        }
        if h.flags & TAINTED != 0 && self.taint_verdicts[h.taint_set as usize] == TAINT_SOFT {
            s -= 0.5;
        }
        if let Some(rec) = self.rec
            && rec.get(u).copied().unwrap_or(false)
        {
            s += 0.2;
        }
        if let Some(rules) = &self.rules {
            s -= rules.spread_penalty(c, i);
        }
        s
    }

    /// The best node from the memo of the last full scan, and how many changed nodes
    /// it judged again; `None` when a full scan must say.
    fn best_remembered(&mut self, rec_id: Option<u64>) -> Option<((u32, f32), usize)> {
        let mut slot = self.c.memo.lock();
        let plain = self.plain();
        let judge = |i: u32| {
            self.check(i).ok()?;
            Some(if plain {
                self.score::<true>(i)
            } else {
                self.score::<false>(i)
            })
        };
        slot.as_mut()?.best(self.req, rec_id, judge)
    }

    /// A scan of every node that keeps its best ones in the cluster's memo.
    fn scan_keeping_best(&mut self, rec_id: Option<u64>) -> Option<(u32, f32)> {
        let (best, memo) = if self.plain() {
            self.scan_top::<true>(rec_id)
        } else {
            self.scan_top::<false>(rec_id)
        };
        *self.c.memo.lock() = Some(memo);
        best
    }

    fn scan_top<const PLAIN: bool>(
        &mut self,
        rec_id: Option<u64>,
    ) -> (Option<(u32, f32)>, crate::memo::Memo) {
        let mut top = crate::memo::Top::new();
        let mut counts = [0u32; REASONS];
        let n = self.c.len() as u32;
        for i in 0..n {
            match self.check(i) {
                Err(r) => counts[r as usize] += 1,
                Ok(()) => top.offer(i, self.score::<PLAIN>(i)),
            }
        }
        self.evaluated += n as usize;
        for (total, k) in self.counts.iter_mut().zip(counts) {
            *total += k;
        }
        top.finish(self.req, rec_id)
    }

    fn scan(&mut self, nodes: impl Iterator<Item = u32>) -> Option<(u32, f32)> {
        if self.plain() {
            self.scan_with::<true>(nodes)
        } else {
            self.scan_with::<false>(nodes)
        }
    }

    fn scan_with<const PLAIN: bool>(
        &mut self,
        nodes: impl Iterator<Item = u32>,
    ) -> Option<(u32, f32)> {
        // Locals, not fields: keeps the hot loop's state in registers.
        let mut best_i = u32::MAX;
        let mut best_s = f32::NEG_INFINITY;
        let mut counts = [0u32; REASONS];
        let mut seen = 0usize;
        for i in nodes {
            seen += 1;
            match self.check(i) {
                Err(r) => counts[r as usize] += 1,
                Ok(()) => {
                    let s = self.score::<PLAIN>(i);
                    if s > best_s {
                        best_s = s;
                        best_i = i;
                    }
                }
            }
        }
        self.evaluated += seen;
        for (total, n) in self.counts.iter_mut().zip(counts) {
            *total += n;
        }
        (best_i != u32::MAX).then_some((best_i, best_s))
    }
}

fn tolerates(tolerations: &[(String, Option<String>)], key: &str, value: &str) -> bool {
    tolerations
        .iter()
        .any(|(k, v)| k == key && v.as_deref().is_none_or(|v| v == value))
}

/// What a scan needs, worked out once per request.
fn context<'a>(c: &'a Cluster, req: &'a Request, rec: Option<&'a Recommendations>) -> Ctx<'a> {
    let region_bonus = match req.near {
        // Up to +0.3 for the nearest regions, falling off over 5,000 km.
        Some(p) => (0..c.regions.len() as u32)
            .map(|r| {
                c.region_geo
                    .get(&r)
                    .map_or(0.0, |g| (0.3 * (1.0 - (g.km(&p) / 5000.0).min(1.0))) as f32)
            })
            .collect(),
        None => Vec::new(),
    };
    let r = &req.res;
    Ctx {
        c,
        req,
        rec: rec.and_then(|r| r.preferred(&req.res)),
        region_bonus,
        rules: GroupRules::new(c, req),
        taint_verdicts: c
            .taint_sets
            .iter()
            .map(|set| {
                let untolerated = |hard: bool| {
                    set.iter()
                        .any(|t| t.hard == hard && !tolerates(&req.tolerations, &t.key, &t.value))
                };
                if untolerated(true) {
                    TAINT_HARD
                } else if untolerated(false) {
                    TAINT_SOFT
                } else {
                    0
                }
            })
            .collect(),
        extra: r.disk > 0 || r.bw > 0 || r.addrs > 0 || !r.devices.is_empty(),
        // Ids that fit in the packed fields; anything else can match no node.
        arch: req
            .arch
            .map_or(u8::MAX, |a| a.min(u8::MAX as u32 - 1) as u8),
        tier: req
            .tier
            .map_or(u8::MAX, |t| t.min(u8::MAX as u32 - 1) as u8),
        isp: req
            .isp
            .map_or(u16::MAX, |t| t.min(u16::MAX as u32 - 1) as u16),
        counts: [0; REASONS],
        evaluated: 0,
    }
}

/// How the scheduler rates `node` for `req` now (the score a placement there would
/// get), or why the node is ruled out. Group rules count what the cluster holds, so
/// a caller comparing two nodes for an instance placed on one of them releases it
/// there first.
pub fn score(c: &Cluster, req: &Request, node: u32) -> Result<f64, Reason> {
    let ctx = context(c, req, None);
    ctx.check(node)?;
    Ok(if ctx.plain() {
        ctx.score::<true>(node)
    } else {
        ctx.score::<false>(node)
    } as f64)
}

/// Place one instance on `c` (without reserving). `rec` are the offline scheduler's
/// recommendations, if any. A request like the last one that scanned every node is
/// answered from what that scan kept ([`crate::memo`]), with the same answer.
pub fn place(
    c: &Cluster,
    req: &Request,
    rec: Option<&Recommendations>,
) -> Result<Placement, Unschedulable> {
    place_with(c, req, rec, true)
}

/// [`place`], evaluating every node of each domain tried, whatever was kept: the
/// baseline the memo is measured and tested against.
pub fn place_scanning(
    c: &Cluster,
    req: &Request,
    rec: Option<&Recommendations>,
) -> Result<Placement, Unschedulable> {
    place_with(c, req, rec, false)
}

fn place_with(
    c: &Cluster,
    req: &Request,
    rec: Option<&Recommendations>,
    use_memo: bool,
) -> Result<Placement, Unschedulable> {
    let mut ctx = context(c, req, rec);
    // One global scan whose verdicts read only each node: the last scan's best
    // nodes answer (crate::memo).
    let memo = use_memo && req.regions.is_empty() && req.near.is_none() && ctx.rules.is_none();
    let rec_id = rec.map(Recommendations::id);
    if memo && let Some(((node, score), judged)) = ctx.best_remembered(rec_id) {
        return Ok(Placement {
            node,
            region: c.region_of(node),
            overflow_from: None,
            score: score as f64,
            evaluated: judged,
        });
    }
    let order = domain_order(c, req);
    let first_region = order.first().copied().flatten();
    let mut tried = 0usize;
    for domain in &order {
        let found = match domain {
            None if memo => {
                tried = c.len();
                ctx.scan_keeping_best(rec_id)
            }
            None => {
                tried = c.len();
                ctx.scan(0..c.len() as u32)
            }
            Some(r) => {
                let nodes = c
                    .region_nodes
                    .get(*r as usize)
                    .map_or(&[][..], Vec::as_slice);
                tried += nodes.len();
                ctx.scan(nodes.iter().copied())
            }
        };
        if let Some((node, score)) = found {
            let region = c.region_of(node);
            return Ok(Placement {
                node,
                region,
                overflow_from: first_region
                    .filter(|f| *f != region && !req.regions.contains(&region)),
                score: score as f64,
                evaluated: ctx.evaluated,
            });
        }
    }
    let mut counts = ctx.counts;
    counts[Reason::WrongRegion as usize] += (c.len() - tried.min(c.len())) as u32;
    Err(Unschedulable {
        total: c.len(),
        counts,
    })
}

/// Place and reserve every request, or none: on failure, everything reserved so far is
/// released and the error names the first request that did not fit.
pub fn place_gang(
    c: &mut Cluster,
    reqs: &[Request],
    rec: Option<&Recommendations>,
) -> Result<Vec<Placement>, (usize, Unschedulable)> {
    let mut done: Vec<Placement> = Vec::with_capacity(reqs.len());
    for (k, r) in reqs.iter().enumerate() {
        match place(c, r, rec) {
            Ok(p) => {
                c.reserve(p.node, &r.res, r.group);
                done.push(p);
            }
            Err(e) => {
                for (p, r) in done.iter().zip(reqs) {
                    c.release(p.node, &r.res, r.group);
                }
                return Err((k, e));
            }
        }
    }
    Ok(done)
}
