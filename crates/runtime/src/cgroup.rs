//! Control groups: how the node's Resource Manager enforces what each instance may use.
//!
//! Every instance gets a cgroup with a memory limit (its memory request, plus the
//! driver's own overhead) and a CPU quota (its CPU request), under a `verge-<node>` group
//! below the agent's own cgroup. Both hierarchies are supported: cgroup v2 (one unified
//! tree) and cgroup v1 (separate `memory`, `cpu` and `cpuacct` trees, as on hosts that
//! still mount them). A workload enters its cgroup before its program starts: drivers
//! start it through [`InstanceCgroup::wrap`], a tiny shell step that writes its own pid
//! into the group and then `exec`s the program, so no byte is ever allocated outside
//! the limit and no unsafe code runs between fork and exec.

use std::path::{Path, PathBuf};

/// CPU quota period (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

/// The node's cgroup hierarchy, as far as the agent manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// Unified hierarchy: one directory per group.
    V2 {
        /// The `verge` group all instance groups go under.
        base: PathBuf,
    },
    /// Legacy hierarchy: one tree per controller.
    V1 {
        /// `verge` group in the memory tree.
        memory: PathBuf,
        /// `verge` group in the cpu tree (cpuacct is often the same tree).
        cpu: PathBuf,
        /// `verge` group in the cpuacct tree.
        cpuacct: PathBuf,
    },
}

/// What an instance's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU in millicores (1000 = one CPU's worth of time per period).
    pub cpu_millis: u64,
}

/// What an instance has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Memory in use now (bytes).
    pub memory_bytes: u64,
    /// CPU time used since the group was made (microseconds).
    pub cpu_usec: u64,
    /// Times the kernel killed a process of the group for memory.
    pub oom_kills: u64,
}

fn own_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn join(root: &Path, own: &str, group: &str) -> PathBuf {
    root.join(own.trim_start_matches('/')).join(group)
}

/// The `cpu.max` value (v2) for `millis`.
pub fn cpu_max(millis: u64) -> String {
    format!("{} {PERIOD_US}", (millis * PERIOD_US / 1000).max(1000))
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Remove the (empty) groups below `dir`, deepest first. A group still holding
/// processes stays.
fn remove_children(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_children(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// OOM kills in a v1 memory group and every group below it: v1 counts a kill only in
/// the group of the process killed, which for a container is runc's group inside the
/// instance's.
fn oom_kills_v1(dir: &Path) -> u64 {
    let own = keyed(&dir.join("memory.oom_control"), "oom_kill ").unwrap_or(0);
    let below: u64 = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| oom_kills_v1(&e.path()))
                .sum()
        })
        .unwrap_or(0);
    own + below
}

/// `key value` lines (`memory.events`, `cpu.stat`, `memory.oom_control`).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

impl Cgroups {
    /// The agent's hierarchy under `/sys/fs/cgroup`, if it can make groups there:
    /// instance groups go in `group` (e.g. `verge-<node>`) below the agent's own.
    pub fn detect(group: &str) -> Option<Self> {
        Self::detect_at(Path::new("/sys/fs/cgroup"), group)
    }

    /// Like [`Cgroups::detect`] with another mount point.
    pub fn detect_at(root: &Path, group: &str) -> Option<Self> {
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let found = if root.join("cgroup.controllers").exists() {
            Self::V2 {
                base: join(root, &own_path(&proc_cgroup, "")?, group),
            }
        } else if root.join("memory").is_dir() && root.join("cpu").is_dir() {
            let cpu = join(&root.join("cpu"), &own_path(&proc_cgroup, "cpu")?, group);
            let cpuacct = match own_path(&proc_cgroup, "cpuacct") {
                Some(p) => join(&root.join("cpuacct"), &p, group),
                None => cpu.clone(),
            };
            Self::V1 {
                memory: join(
                    &root.join("memory"),
                    &own_path(&proc_cgroup, "memory")?,
                    group,
                ),
                cpu,
                cpuacct,
            }
        } else {
            return None;
        };
        found.prepare().ok().map(|()| found)
    }

    fn bases(&self) -> Vec<&Path> {
        match self {
            Self::V2 { base } => vec![base],
            Self::V1 {
                memory,
                cpu,
                cpuacct,
            } => {
                let mut v = vec![memory.as_path(), cpu.as_path()];
                if cpuacct != cpu {
                    v.push(cpuacct);
                }
                v
            }
        }
    }

    fn prepare(&self) -> std::io::Result<()> {
        for b in self.bases() {
            std::fs::create_dir_all(b)?;
        }
        if let Self::V2 { base } = self {
            // Instance groups below need the controllers handed down to them.
            write(&base.join("cgroup.subtree_control"), "+memory +cpu")?;
        }
        Ok(())
    }

    /// Remove every group of this node that holds no process, and the node's own
    /// group if it is then empty (the kernel refuses to remove one with processes).
    pub fn remove_empty(&self) {
        for b in self.bases() {
            remove_children(b);
            let _ = std::fs::remove_dir(b);
        }
    }

    /// Make (or reuse) the group of instance `name` with `limits`.
    pub fn create(&self, name: &str, limits: Limits) -> std::io::Result<InstanceCgroup> {
        let dirs: Vec<PathBuf> = self.bases().iter().map(|b| b.join(name)).collect();
        for d in &dirs {
            // Groups a previous run left below (a container's): a child with a larger
            // quota than the new limit would make the kernel refuse the limit.
            remove_children(d);
            std::fs::create_dir_all(d)?;
        }
        match self {
            Self::V2 { .. } => {
                write(
                    &dirs[0].join("memory.max"),
                    &limits.memory_bytes.to_string(),
                )?;
                // No swap to escape into: the limit is the limit.
                let _ = write(&dirs[0].join("memory.swap.max"), "0");
                write(&dirs[0].join("cpu.max"), &cpu_max(limits.cpu_millis))?;
            }
            Self::V1 { .. } => {
                let (mem, cpu) = (&dirs[0], &dirs[1]);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let _ = write(
                    &mem.join("memory.memsw.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                );
                write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let quota = (limits.cpu_millis * PERIOD_US / 1000).max(1000);
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(InstanceCgroup {
            v2: matches!(self, Self::V2 { .. }),
            dirs,
            limits,
        })
    }
}

/// One instance's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroup {
    v2: bool,
    /// The group's directory in each tree (v1: memory, cpu, then cpuacct if separate).
    dirs: Vec<PathBuf>,
    /// What it allows.
    pub limits: Limits,
}

impl InstanceCgroup {
    /// `argv` started inside this group: `sh -c` writes its pid into every tree's
    /// `cgroup.procs`, then `exec`s the program (same pid, now limited).
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut script = String::new();
        for d in &self.dirs {
            script.push_str(&format!(
                "echo $$ > '{}' || exit 125; ",
                d.join("cgroup.procs").display()
            ));
        }
        script.push_str("exec \"$@\"");
        let mut out = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            script,
            "verge-cgroup".into(),
        ];
        out.extend(argv.iter().cloned());
        out
    }

    /// The group's path below its hierarchy's mount point (for v1, the memory tree's),
    /// as an OCI runtime's `cgroupsPath` names it.
    pub fn hierarchy_path(&self) -> String {
        let d = &self.dirs[0];
        let mount = if self.v2 {
            Path::new("/sys/fs/cgroup")
        } else {
            Path::new("/sys/fs/cgroup/memory")
        };
        format!("/{}", d.strip_prefix(mount).unwrap_or(d).display())
    }

    /// What the group has used.
    pub fn usage(&self) -> Usage {
        let d = &self.dirs;
        if self.v2 {
            Usage {
                memory_bytes: read_u64(&d[0].join("memory.current")).unwrap_or(0),
                cpu_usec: keyed(&d[0].join("cpu.stat"), "usage_usec").unwrap_or(0),
                oom_kills: keyed(&d[0].join("memory.events"), "oom_kill").unwrap_or(0),
            }
        } else {
            let acct = d.get(2).unwrap_or(&d[1]);
            Usage {
                memory_bytes: read_u64(&d[0].join("memory.usage_in_bytes")).unwrap_or(0),
                cpu_usec: read_u64(&acct.join("cpuacct.usage")).unwrap_or(0) / 1000,
                oom_kills: oom_kills_v1(&d[0]),
            }
        }
    }

    /// Remove the group and any below it (their processes must have ended).
    pub fn remove(&self) {
        for d in &self.dirs {
            remove_children(d);
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_groups_and_formats_limits() {
        let v1 = "4:memory:/a/b\n1:cpu,cpuacct:/\n0::/x\n";
        assert_eq!(own_path(v1, "memory").as_deref(), Some("/a/b"));
        assert_eq!(own_path(v1, "cpuacct").as_deref(), Some("/"));
        assert_eq!(own_path(v1, "").as_deref(), Some("/x"));
        assert_eq!(
            join(Path::new("/sys/fs/cgroup/memory"), "/a/b", "verge-n1"),
            Path::new("/sys/fs/cgroup/memory/a/b/verge-n1")
        );
        assert_eq!(cpu_max(500), "50000 100000");
        assert_eq!(cpu_max(2000), "200000 100000");
        assert_eq!(cpu_max(1), "1000 100000", "a floor the kernel accepts");
        let g = InstanceCgroup {
            v2: true,
            dirs: vec![PathBuf::from("/cg/verge/web")],
            limits: Limits {
                memory_bytes: 1,
                cpu_millis: 1,
            },
        };
        let w = g.wrap(&["sleep".into(), "1".into()]);
        assert_eq!(w[0], "/bin/sh");
        assert!(
            w[2].contains("echo $$ > '/cg/verge/web/cgroup.procs'"),
            "{w:?}"
        );
        assert_eq!(&w[3..], ["verge-cgroup", "sleep", "1"]);
    }
}
