//! What this machine has, read from the kernel (`/proc`, `statvfs`).

use std::path::Path;

use verge_api::{Bytes, Cpu, NodeStatus, ResourceList};

/// Capacity overrides, and what the kernel cannot tell us (accelerators, uplink).
#[derive(Debug, Clone, Default)]
pub struct CapacityConfig {
    /// Report this CPU instead of the machine's.
    pub cpu: Option<Cpu>,
    /// Report this memory instead of the machine's.
    pub memory: Option<Bytes>,
    /// GPUs by model.
    pub gpus: std::collections::BTreeMap<String, u32>,
    /// ASICs by name.
    pub asics: std::collections::BTreeMap<String, u32>,
    /// Uplink bandwidth, Mbit/s.
    pub bandwidth_mbps: u64,
    /// Public addresses this node can hand out.
    pub addresses: u64,
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// fsblkcnt_t and c_ulong are u64 here but not on every platform.
#[allow(clippy::unnecessary_cast)]
fn disk_total(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks() as u64 * s.fragment_size() as u64)
        .unwrap_or(0)
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn disk_used(path: &Path) -> (u64, u64) {
    // As above: the casts are for other platforms.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statvfs::statvfs(path).map_or((0, 0), |s| {
        let f = s.fragment_size() as u64;
        let total = s.blocks() as u64 * f;
        (total - s.blocks_free() as u64 * f, total)
    })
}

/// Non-idle CPU seconds of every CPU, from the first line of `/proc/stat` (user,
/// nice, system, irq, softirq, steal; idle and iowait are idle).
fn cpu_busy_seconds(stat: &str) -> Option<f64> {
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|i| f.get(*i).copied().unwrap_or(0))
        .sum::<u64>();
    // USER_HZ is 100 on every Linux this runs on.
    Some(busy as f64 / 100.0)
}

/// Bytes received and sent on every interface but loopback, from `/proc/net/dev`.
fn net_bytes(dev: &str) -> (u64, u64) {
    dev.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|w| w.parse().unwrap_or(0))
                .collect();
            Some((f.first().copied()?, f.get(8).copied()?))
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// One round of the node's metrics, read from the kernel.
pub fn node_metrics(data_dir: &Path) -> Vec<(u16, f64)> {
    use verge_api::metrics as m;
    let mut out = Vec::with_capacity(9);
    if let Some(cpu) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| cpu_busy_seconds(&s))
    {
        out.push((m::NODE_CPU_SECONDS, cpu));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|kib| kib * 1024)
        };
        if let (Some(total), Some(avail)) = (field("MemTotal:"), field("MemAvailable:")) {
            out.push((m::NODE_MEMORY_TOTAL, total as f64));
            out.push((m::NODE_MEMORY_USED, total.saturating_sub(avail) as f64));
        }
    }
    let (used, total) = disk_used(data_dir);
    out.push((m::NODE_DISK_USED, used as f64));
    out.push((m::NODE_DISK_TOTAL, total as f64));
    if let Ok(dev) = std::fs::read_to_string("/proc/net/dev") {
        let (rx, tx) = net_bytes(&dev);
        out.push((m::NODE_NET_RX, rx as f64));
        out.push((m::NODE_NET_TX, tx as f64));
    }
    if let Some(l) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
    {
        out.push((m::NODE_LOAD1, l));
    }
    out
}

/// The node's facts as reported in heartbeats.
pub fn node_status(data_dir: &Path, cfg: &CapacityConfig, agent_version: &str) -> NodeStatus {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let capacity = ResourceList {
        cpu: cfg.cpu.unwrap_or(Cpu(cpus * 1000)),
        memory: cfg.memory.unwrap_or(Bytes(meminfo_total().unwrap_or(0))),
        disk: Bytes(disk_total(data_dir)),
        gpus: cfg.gpus.clone(),
        asics: cfg.asics.clone(),
        bandwidth_mbps: cfg.bandwidth_mbps,
        addresses: cfg.addresses,
    };
    // Keep back room for the OS and the agent itself: 100m CPU, and 5% of memory
    // (at most 512Mi) and of disk. Only the rest is offered to instances.
    let allocatable = ResourceList {
        cpu: Cpu(capacity.cpu.0.saturating_sub(100)),
        memory: Bytes(capacity.memory.0 - (capacity.memory.0 / 20).min(512 << 20)),
        disk: Bytes(capacity.disk.0 - capacity.disk.0 / 20),
        ..capacity.clone()
    };
    NodeStatus {
        architecture: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
        kernel_version: read_trim("/proc/sys/kernel/osrelease"),
        hostname: read_trim("/proc/sys/kernel/hostname"),
        capacity,
        allocatable,
        agent_version: agent_version.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_parse() {
        let stat = "cpu  100 20 30 4000 50 6 7 8 0 0\ncpu0 1 2 3\n";
        // user+nice+system+irq+softirq+steal = 100+20+30+6+7+8 jiffies.
        assert_eq!(cpu_busy_seconds(stat), Some(1.71));
        let dev = "Inter-|   Receive\n face |bytes    packets\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  eth1: 1 1 0 0 0 0 0 0 2 2 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(dev), (1001, 2002));
        let round = node_metrics(Path::new("/"));
        let ids: Vec<u16> = round.iter().map(|v| v.0).collect();
        for id in [
            verge_api::metrics::NODE_MEMORY_TOTAL,
            verge_api::metrics::NODE_DISK_TOTAL,
        ] {
            assert!(ids.contains(&id), "{ids:?}");
        }
    }
}
