//! The scheduler's view of the world: nodes with their sellable capacity and what is
//! reserved on them, kept as flat arrays so that scanning 100,000 nodes is a few
//! hundred microseconds.

use std::collections::HashMap;

/// An amount of every schedulable resource. Devices (GPU models, ASICs) are counted by
/// interned device id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Res {
    /// CPU millicores.
    pub cpu: u64,
    /// Memory bytes.
    pub mem: u64,
    /// Local disk bytes.
    pub disk: u64,
    /// Network bandwidth, Mbit/s.
    pub bw: u64,
    /// Public addresses.
    pub addrs: u64,
    /// Devices: (device id, count), sorted by id.
    pub devices: Vec<(u16, u32)>,
}

impl Res {
    /// CPU and memory only.
    pub fn cpu_mem(cpu: u64, mem: u64) -> Self {
        Self {
            cpu,
            mem,
            ..Default::default()
        }
    }

    fn device(&self, id: u16) -> u32 {
        self.devices
            .iter()
            .find(|(d, _)| *d == id)
            .map_or(0, |(_, n)| *n)
    }
}

/// Every scope, in `Scope as usize` order.
pub const SCOPES: [Scope; 4] = [Scope::Node, Scope::Site, Scope::Region, Scope::Isp];

/// Kinds of place an instance can be spread over or kept apart in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// One node.
    Node,
    /// One edge site (nodes sharing a `site` label, else a `city`).
    Site,
    /// One region.
    Region,
    /// One ISP.
    Isp,
}

/// A taint: the node repels instances that do not tolerate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// `true`: never place intolerant instances; `false`: only avoid them (score).
    pub hard: bool,
}

/// Static facts about one node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// Name.
    pub name: String,
    /// Region name.
    pub region: String,
    /// Site name.
    pub site: String,
    /// ISP name.
    pub isp: String,
    /// Tier: `onsite`, `near`, `cloud`.
    pub tier: String,
    /// `x86_64`, `aarch64`.
    pub arch: String,
    /// Labels for selectors.
    pub labels: Vec<(String, String)>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Sellable capacity (after system and platform reservations).
    pub sellable: Res,
    /// Ready and schedulable.
    pub schedulable: bool,
}

/// Interns strings to small ids.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    /// The id of `s`, adding it if new.
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(s.to_string(), id);
        self.names.push(s.to_string());
        id
    }
    /// The id of `s`, if known.
    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
    /// The name of an id.
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }
    /// How many names.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Location of a region (for proximity and overflow to the next nearest region).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GeoPoint {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

impl GeoPoint {
    /// Great-circle distance in km.
    pub fn km(&self, o: &GeoPoint) -> f64 {
        let (la1, la2) = (self.lat.to_radians(), o.lat.to_radians());
        let dlat = la2 - la1;
        let dlon = (o.lon - self.lon).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
        6371.0 * 2.0 * a.sqrt().asin()
    }
}

/// Per-node fields read by every scan.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hot {
    pub free_mem: u64,
    pub free_cpu: u32,
    pub inv_cpu: f32,
    pub inv_mem: f32,
    pub region: u16,
    pub isp: u16,
    pub arch: u8,
    pub tier: u8,
    /// Bit 0: schedulable; bit 1: has taints.
    pub flags: u8,
    /// Index into `Cluster::taint_sets` (0: no taints).
    pub taint_set: u16,
}

pub(crate) const OK: u8 = 1;
pub(crate) const TAINTED: u8 = 2;

/// Every node, as flat arrays indexed by node index, plus per-node reservations.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Static node facts.
    pub nodes: Vec<NodeSpec>,
    /// Interned region, site, ISP, tier, arch, device names.
    pub regions: Interner,
    /// Sites.
    pub sites: Interner,
    /// ISPs.
    pub isps: Interner,
    /// Tiers.
    pub tiers: Interner,
    /// Architectures.
    pub archs: Interner,
    /// Device models.
    pub devices: Interner,
    /// Region locations by region id (if known).
    pub region_geo: HashMap<u32, GeoPoint>,
    /// Node indices per region id.
    pub region_nodes: Vec<Vec<u32>>,
    /// The fields every placement reads for every node, packed together (32 bytes a
    /// node) so that a full scan streams through memory once.
    pub(crate) hot: Vec<Hot>,
    pub(crate) site_of: Vec<u32>,
    pub(crate) free_disk: Vec<u64>,
    pub(crate) free_bw: Vec<u64>,
    pub(crate) free_addrs: Vec<u64>,
    pub(crate) free_dev: Vec<Vec<(u16, u32)>>,
    /// Instances per group, per scope, per domain id: for spread, anti-affinity and
    /// max-per-node. Sparse: a group touches few domains.
    pub(crate) group_counts: HashMap<u32, [HashMap<u32, u32>; 4]>,
    /// Group names (e.g. the `app` label of instances).
    pub groups: Interner,
    /// Distinct sets of taints; nodes refer to them by index (0 is the empty set), so a
    /// request decides toleration once per set, not once per node.
    pub taint_sets: Vec<Vec<Taint>>,
    /// The best nodes of the last full scan ([`crate::memo`]): told of every node the
    /// methods below change. Nodes' facts are changed through them, never through
    /// the public fields, once placements have begun.
    pub(crate) memo: crate::memo::MemoSlot,
}

impl Cluster {
    /// Build from node facts.
    pub fn new(nodes: Vec<NodeSpec>) -> Self {
        let mut c = Cluster::default();
        for n in nodes {
            c.add_node(n);
        }
        c
    }

    /// Add one node.
    pub fn add_node(&mut self, n: NodeSpec) -> u32 {
        self.memo.forget();
        let idx = self.nodes.len() as u32;
        let r = self.regions.intern(&n.region);
        if self.region_nodes.len() <= r as usize {
            self.region_nodes.resize(r as usize + 1, Vec::new());
        }
        self.region_nodes[r as usize].push(idx);
        let site = if n.site.is_empty() {
            &n.region
        } else {
            &n.site
        };
        self.site_of.push(self.sites.intern(site));
        let isp = self.isps.intern(&n.isp);
        let tier = self.tiers.intern(&n.tier);
        let arch = self.archs.intern(&n.arch);
        if self.taint_sets.is_empty() {
            self.taint_sets.push(Vec::new());
        }
        let taint_set = match self.taint_sets.iter().position(|t| *t == n.taints) {
            Some(k) => k,
            None => {
                self.taint_sets.push(n.taints.clone());
                self.taint_sets.len() - 1
            }
        };
        self.hot.push(Hot {
            taint_set: taint_set.min(u16::MAX as usize) as u16,
            free_mem: n.sellable.mem,
            free_cpu: n.sellable.cpu.min(u32::MAX as u64) as u32,
            inv_cpu: 1.0 / n.sellable.cpu.max(1) as f32,
            inv_mem: 1.0 / n.sellable.mem.max(1) as f32,
            region: r as u16,
            isp: isp as u16,
            arch: arch as u8,
            tier: tier as u8,
            flags: if n.schedulable { OK } else { 0 }
                | if n.taints.is_empty() { 0 } else { TAINTED },
        });
        self.free_disk.push(n.sellable.disk);
        self.free_bw.push(n.sellable.bw);
        self.free_addrs.push(n.sellable.addrs);
        self.free_dev.push(n.sellable.devices.clone());
        self.nodes.push(n);
        idx
    }

    /// Intern a device model name (for requests and node capacity).
    pub fn device_id(&mut self, model: &str) -> u16 {
        self.devices.intern(model) as u16
    }

    /// Node index by name.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .map(|i| i as u32)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The domain id of node `i` in `scope`.
    pub fn domain(&self, i: u32, scope: Scope) -> u32 {
        match scope {
            Scope::Node => i,
            Scope::Site => self.site_of[i as usize],
            Scope::Region => self.hot[i as usize].region as u32,
            Scope::Isp => self.hot[i as usize].isp as u32,
        }
    }

    /// Whether node `i` takes new work.
    pub fn ok(&self, i: u32) -> bool {
        self.hot[i as usize].flags & OK != 0
    }

    /// Mark node `i` as taking new work or not.
    pub fn set_ok(&mut self, i: u32, ok: bool) {
        self.memo.touch(i);
        let h = &mut self.hot[i as usize];
        h.flags = if ok { h.flags | OK } else { h.flags & !OK };
    }

    /// Remove node `i`'s taints.
    pub fn clear_taints(&mut self, i: u32) {
        self.memo.touch(i);
        self.hot[i as usize].flags &= !TAINTED;
        self.hot[i as usize].taint_set = 0;
        self.nodes[i as usize].taints.clear();
    }

    /// Free CPU (millicores) of node `i`.
    pub fn free_cpu(&self, i: u32) -> u64 {
        self.hot[i as usize].free_cpu as u64
    }

    /// Free memory (bytes) of node `i`.
    pub fn free_mem(&self, i: u32) -> u64 {
        self.hot[i as usize].free_mem
    }

    /// Region id of node `i`.
    pub fn region_of(&self, i: u32) -> u32 {
        self.hot[i as usize].region as u32
    }

    /// Site id of node `i`.
    pub fn site_of(&self, i: u32) -> u32 {
        self.site_of[i as usize]
    }

    /// Free resources on node `i`.
    pub fn free(&self, i: u32) -> Res {
        let i = i as usize;
        Res {
            cpu: self.hot[i].free_cpu as u64,
            mem: self.hot[i].free_mem,
            disk: self.free_disk[i],
            bw: self.free_bw[i],
            addrs: self.free_addrs[i],
            devices: self.free_dev[i].clone(),
        }
    }

    /// Whether `r` fits in node `i`'s free resources.
    pub fn fits(&self, i: u32, r: &Res) -> bool {
        let i = i as usize;
        self.hot[i].free_cpu as u64 >= r.cpu
            && self.hot[i].free_mem >= r.mem
            && self.free_disk[i] >= r.disk
            && self.free_bw[i] >= r.bw
            && self.free_addrs[i] >= r.addrs
            && r.devices
                .iter()
                .all(|(d, n)| self.free_dev[i].iter().any(|(fd, fnn)| fd == d && fnn >= n))
    }

    /// Reserve `r` on node `i` for an instance of `group` (caller checked it fits).
    pub fn reserve(&mut self, i: u32, r: &Res, group: Option<u32>) {
        self.memo.touch(i);
        let u = i as usize;
        let h = &mut self.hot[u];
        h.free_cpu = (h.free_cpu as u64).saturating_sub(r.cpu) as u32;
        h.free_mem = h.free_mem.saturating_sub(r.mem);
        self.free_disk[u] = self.free_disk[u].saturating_sub(r.disk);
        self.free_bw[u] = self.free_bw[u].saturating_sub(r.bw);
        self.free_addrs[u] = self.free_addrs[u].saturating_sub(r.addrs);
        for (d, n) in &r.devices {
            if let Some(slot) = self.free_dev[u].iter_mut().find(|(fd, _)| fd == d) {
                slot.1 = slot.1.saturating_sub(*n);
            }
        }
        if let Some(g) = group {
            let domains = SCOPES.map(|s| self.domain(i, s));
            let per = self.group_counts.entry(g).or_default();
            for (k, d) in domains.into_iter().enumerate() {
                *per[k].entry(d).or_default() += 1;
            }
        }
    }

    /// Give back what [`Cluster::reserve`] took.
    pub fn release(&mut self, i: u32, r: &Res, group: Option<u32>) {
        self.memo.touch(i);
        let u = i as usize;
        let cap = &self.nodes[u].sellable;
        let h = &mut self.hot[u];
        h.free_cpu = (h.free_cpu as u64 + r.cpu).min(cap.cpu) as u32;
        h.free_mem = (h.free_mem + r.mem).min(cap.mem);
        self.free_disk[u] = (self.free_disk[u] + r.disk).min(cap.disk);
        self.free_bw[u] = (self.free_bw[u] + r.bw).min(cap.bw);
        self.free_addrs[u] = (self.free_addrs[u] + r.addrs).min(cap.addrs);
        for (d, n) in &r.devices {
            let max = cap.device(*d);
            if let Some(slot) = self.free_dev[u].iter_mut().find(|(fd, _)| fd == d) {
                slot.1 = (slot.1 + n).min(max);
            }
        }
        if let Some(g) = group {
            let domains = SCOPES.map(|s| self.domain(i, s));
            if let Some(per) = self.group_counts.get_mut(&g) {
                for (k, d) in domains.into_iter().enumerate() {
                    if let Some(c) = per[k].get_mut(&d) {
                        *c -= 1;
                        if *c == 0 {
                            per[k].remove(&d);
                        }
                    }
                }
            }
        }
    }

    /// Instances of `group` in the domain of node `i` at `scope`.
    pub fn group_count(&self, group: u32, scope: Scope, i: u32) -> u32 {
        self.group_counts
            .get(&group)
            .and_then(|per| per[scope as usize].get(&self.domain(i, scope)))
            .copied()
            .unwrap_or(0)
    }

    /// Non-zero instance counts of `group` per domain at `scope`.
    pub fn group_domains(&self, group: u32, scope: Scope) -> Option<&HashMap<u32, u32>> {
        self.group_counts
            .get(&group)
            .map(|per| &per[scope as usize])
    }

    /// Number of domains at `scope`.
    pub fn domains(&self, scope: Scope) -> usize {
        match scope {
            Scope::Node => self.nodes.len(),
            Scope::Site => self.sites.len(),
            Scope::Region => self.regions.len(),
            Scope::Isp => self.isps.len(),
        }
    }

    /// The fewest instances of `group` in any domain at `scope` (for spread skew).
    pub fn group_min(&self, group: u32, scope: Scope) -> u32 {
        match self.group_domains(group, scope) {
            Some(m) if m.len() >= self.domains(scope) => m.values().copied().min().unwrap_or(0),
            _ => 0,
        }
    }

    /// CPU and memory used on node `i`, as fractions of sellable capacity.
    pub fn utilisation(&self, i: u32) -> (f64, f64) {
        let u = i as usize;
        let cap = &self.nodes[u].sellable;
        (
            1.0 - self.hot[u].free_cpu as f64 / cap.cpu.max(1) as f64,
            1.0 - self.hot[u].free_mem as f64 / cap.mem.max(1) as f64,
        )
    }

    /// Whether node `i` has nothing reserved.
    pub fn is_empty_node(&self, i: u32) -> bool {
        let u = i as usize;
        self.hot[u].free_cpu as u64 >= self.nodes[u].sellable.cpu
            && self.hot[u].free_mem >= self.nodes[u].sellable.mem
    }
}
