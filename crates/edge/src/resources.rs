//! The node's Resource Manager: one account of what the node offers instances
//! (allocatable CPU and memory, after what is kept back for the OS and the agent) and
//! what every instance on it has been admitted with, whatever its form, and cgroups
//! that hold each instance to it.
//!
//! The node refuses to over-commit even when the hub asks it to (a stale scheduler
//! view, a bug, an operator binding by hand): an instance that does not fit what is
//! left is not started, and its status says why. A workload found running after an
//! agent restart is accounted as it is, since it already runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use verge_api::{Bytes, Cpu, Instance};
use verge_runtime::cgroup::{Cgroups, InstanceCgroup, Limits};

/// What one instance was admitted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Admitted {
    /// CPU, millicores.
    pub cpu_millis: u64,
    /// Memory, bytes (the driver's overhead included).
    pub memory_bytes: u64,
}

/// The Resource Manager.
pub struct ResourceManager {
    allocatable: Admitted,
    admitted: Mutex<BTreeMap<String, (Admitted, Option<InstanceCgroup>)>>,
    cgroups: Option<Cgroups>,
}

impl ResourceManager {
    /// A manager for a node offering `cpu` and `memory` to instances, enforcing with
    /// `cgroups` when the node has them (accounting alone otherwise).
    pub fn new(cpu: Cpu, memory: Bytes, cgroups: Option<Cgroups>) -> Self {
        match &cgroups {
            Some(c) => tracing::info!(cgroups = ?c, "resource limits enforced with cgroups"),
            None => tracing::warn!(
                "no writable cgroup hierarchy: instances are accounted but their limits are not enforced"
            ),
        }
        Self {
            allocatable: Admitted {
                cpu_millis: cpu.0,
                memory_bytes: memory.0,
            },
            admitted: Mutex::new(BTreeMap::new()),
            cgroups,
        }
    }

    /// Remove the node's cgroups that hold no process (the agent exiting).
    pub fn remove_empty_groups(&self) {
        if let Some(c) = &self.cgroups {
            c.remove_empty();
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, (Admitted, Option<InstanceCgroup>)>> {
        self.admitted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Account for `inst` (with `overhead` bytes of its driver's own memory) and make
    /// its cgroup. Unless `running` (found running after an agent restart), refuses
    /// what does not fit, saying what is short.
    pub fn admit(
        &self,
        inst: &Instance,
        overhead: u64,
        running: bool,
    ) -> Result<Option<InstanceCgroup>, String> {
        let want = Admitted {
            cpu_millis: inst.spec.resources.cpu.0,
            memory_bytes: inst.spec.resources.memory.0 + overhead,
        };
        let name = inst.name();
        {
            let mut admitted = self.lock();
            let others = admitted.iter().filter(|(n, _)| n.as_str() != name).fold(
                Admitted::default(),
                |a, (_, (b, _))| Admitted {
                    cpu_millis: a.cpu_millis + b.cpu_millis,
                    memory_bytes: a.memory_bytes + b.memory_bytes,
                },
            );
            if !running {
                let short = |what: &str,
                             have: String,
                             asked: String,
                             free: String,
                             total: String| {
                    format!(
                        "this node refuses to over-commit {what}: {have} already admitted + {asked} asked > {total} allocatable ({free} free)"
                    )
                };
                if others.memory_bytes + want.memory_bytes > self.allocatable.memory_bytes {
                    return Err(short(
                        "memory",
                        Bytes(others.memory_bytes).to_string(),
                        Bytes(want.memory_bytes).to_string(),
                        Bytes(
                            self.allocatable
                                .memory_bytes
                                .saturating_sub(others.memory_bytes),
                        )
                        .to_string(),
                        Bytes(self.allocatable.memory_bytes).to_string(),
                    ));
                }
                if others.cpu_millis + want.cpu_millis > self.allocatable.cpu_millis {
                    return Err(short(
                        "cpu",
                        Cpu(others.cpu_millis).to_string(),
                        Cpu(want.cpu_millis).to_string(),
                        Cpu(self
                            .allocatable
                            .cpu_millis
                            .saturating_sub(others.cpu_millis))
                        .to_string(),
                        Cpu(self.allocatable.cpu_millis).to_string(),
                    ));
                }
            }
            // Held while the cgroup is made, so two admissions cannot both pass.
            admitted.insert(name.to_string(), (want, None));
        }
        let limits = Limits {
            memory_bytes: want.memory_bytes,
            cpu_millis: want.cpu_millis,
        };
        let cgroup = match self.cgroups.as_ref().map(|c| c.create(name, limits)) {
            None => None,
            Some(Ok(cg)) => Some(cg),
            Some(Err(e)) => {
                self.lock().remove(name);
                return Err(format!("could not make the instance's cgroup: {e}"));
            }
        };
        self.lock().insert(name.to_string(), (want, cgroup.clone()));
        Ok(cgroup)
    }

    /// Whether `name` is admitted.
    pub fn is_admitted(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Forget `name` and remove its cgroup (which works once its processes are gone;
    /// a workload left running when the agent exits keeps its group).
    pub fn release(&self, name: &str) {
        if let Some((_, Some(cg))) = self.lock().remove(name) {
            cg.remove();
        }
    }

    /// What each instance with a cgroup uses now, read from the kernel.
    pub fn usages(&self) -> Vec<(String, verge_runtime::cgroup::Usage)> {
        let groups: Vec<(String, InstanceCgroup)> = self
            .lock()
            .iter()
            .filter_map(|(n, (_, cg))| Some((n.clone(), cg.clone()?)))
            .collect();
        // Read outside the lock: the files are the kernel's, and admissions wait.
        groups.into_iter().map(|(n, cg)| (n, cg.usage())).collect()
    }

    /// Everything admitted now, summed.
    pub fn admitted_total(&self) -> Admitted {
        self.lock()
            .values()
            .fold(Admitted::default(), |a, (b, _)| Admitted {
                cpu_millis: a.cpu_millis + b.cpu_millis,
                memory_bytes: a.memory_bytes + b.memory_bytes,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::InstanceSpec;

    fn inst(name: &str, cpu: u64, mem: u64) -> Instance {
        let mut spec = InstanceSpec::default();
        spec.resources.cpu = Cpu(cpu);
        spec.resources.memory = Bytes(mem);
        Instance::new(name, spec)
    }

    #[test]
    fn refuses_to_over_commit_but_accounts_what_already_runs() {
        let rm = ResourceManager::new(Cpu(2000), Bytes(1 << 30), None);
        rm.admit(&inst("a", 1000, 768 << 20), 0, false)
            .expect("fits");
        let e = rm
            .admit(&inst("b", 500, 512 << 20), 0, false)
            .expect_err("memory");
        assert!(
            e.contains("over-commit memory") && e.contains("256Mi free"),
            "{e}"
        );
        let e = rm
            .admit(&inst("c", 1500, 1 << 20), 0, false)
            .expect_err("cpu");
        assert!(e.contains("over-commit cpu"), "{e}");
        // Re-admitting the same instance replaces its own share.
        rm.admit(&inst("a", 1000, 1 << 30), 0, false)
            .expect("same instance, bigger");
        // Found running after a restart: accounted even though it does not fit.
        rm.admit(&inst("d", 100, 1 << 20), 0, true)
            .expect("running");
        assert_eq!(rm.admitted_total().cpu_millis, 1100);
        rm.release("a");
        rm.admit(&inst("b", 500, 512 << 20), 64 << 20, false)
            .expect("fits now");
        assert_eq!(rm.admitted_total().memory_bytes, (1 << 20) + (576 << 20));
    }
}
