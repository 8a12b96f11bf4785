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
