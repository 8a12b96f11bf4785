//! The agent's core: the desired-state cache, one supervisor per instance, and the
//! statuses waiting to go up to the hub.
//!
//! The reconciler compares the cached desired state with the supervisors it runs and
//! starts, restarts (new spec generation or new uid) or stops them. It never needs the
//! hub: at start-up it works from the cache alone, which is what keeps workloads
//! running, or restarts them, when the node reboots while offline.
//!
//! Statuses are kept as "latest per instance" plus a dirty set, not as a queue: an
//! edge that is offline for a day sends one status per instance when it returns.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use verge_api::channel::InstanceChange;
use verge_api::instance::RestartPolicy;
use verge_api::{Instance, InstancePhase, InstanceStatus};
use verge_runtime::{ExecSpec, Running, Runtime, Workload};

use crate::EdgeError;
use crate::files::{self, Desired};
use crate::state::StateStore;

/// Longest wait between restarts of a crashing workload.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

struct Supervisor {
    uid: String,
    generation: u64,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// How often a running instance's usage is sampled from its cgroup.
const USAGE_EVERY: Duration = Duration::from_secs(10);
/// How often the artifact cache is collected when nothing kicks it.
const GC_EVERY: Duration = Duration::from_secs(300);
/// How often a running workload's log size is checked against its limit.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Turns cgroup counters into the usage an instance reports: CPU averaged over the
/// interval. Reports only when the rounded value changes (to 1 MiB, 10m CPU), so an
/// idle instance costs the channel little.
#[derive(Default)]
struct UsageSampler {
    last: Option<(tokio::time::Instant, u64)>,
    reported: Option<verge_api::ResourceUsage>,
}

impl UsageSampler {
    fn sample(
        &mut self,
        cg: &verge_runtime::cgroup::InstanceCgroup,
    ) -> Option<verge_api::ResourceUsage> {
        let u = cg.usage();
        let now = tokio::time::Instant::now();
        let (then, usec) = self.last.replace((now, u.cpu_usec))?;
        let wall = now.duration_since(then).as_micros().max(1) as u64;
        let cpu = u.cpu_usec.saturating_sub(usec) * 1000 / wall;
        let usage = verge_api::ResourceUsage {
            cpu: verge_api::Cpu(cpu / 10 * 10),
            memory: verge_api::Bytes(u.memory_bytes >> 20 << 20),
        };
        (self.reported.as_ref() != Some(&usage)).then(|| {
            self.reported = Some(usage.clone());
            usage
        })
    }
}

/// An instance's share of the node, given back when its supervisor ends.
struct Admission<'a> {
    agent: &'a Agent,
    name: &'a str,
}

impl Admission<'_> {
    fn admitted(&self) -> bool {
        self.agent.resources.is_admitted(self.name)
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.agent.resources.release(self.name);
    }
}

/// The agent's shared state.
pub struct Agent {
    /// Where the instances' working directories (and logs) are.
    dir: PathBuf,
    runtime: Arc<dyn Runtime>,
    state: Arc<dyn StateStore>,
    desired: Mutex<Desired>,
    supervisors: tokio::sync::Mutex<HashMap<String, Supervisor>>,
    statuses: Mutex<HashMap<String, (String, InstanceStatus)>>,
    dirty: Mutex<BTreeSet<String>>,
    removed: Mutex<Vec<(String, String)>>,
    /// When workloads' logs are rotated.
    log_limits: verge_runtime::process::LogLimits,
    /// Rotations so far, by instance: a follower that sees it change reads the log
    /// from the start again.
    log_rotations: Mutex<HashMap<String, u64>>,
    /// Wakes the cache collector (an instance went away).
    gc_kick: Notify,
    /// Instances whose supervisors are stopping them (the reaper leaves them be).
    removing: Mutex<std::collections::HashSet<String>>,
    /// Signalled when a status is waiting to be sent.
    pub outbox: Notify,
    reconcile_kick: Notify,
    /// Listeners for the instances' links to other instances.
    pub links: crate::links::Links,
    /// The node's account of resources, and the cgroups that enforce it.
    pub resources: crate::resources::ResourceManager,
    /// The node's artifact cache (components, VM images), filled before starts.
    pub artifacts: crate::artifacts::Artifacts,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Load the cache from `state` and prepare (nothing runs until
    /// [`Agent::reconciler`]). Instances work in directories under `dir`.
    pub fn new(
        dir: PathBuf,
        state: Arc<dyn StateStore>,
        runtime: Arc<dyn Runtime>,
        resources: crate::resources::ResourceManager,
        plain_http_registries: Vec<String>,
        log_limits: verge_runtime::process::LogLimits,
    ) -> Result<Arc<Self>, EdgeError> {
        let desired = state.load_desired()?;
        let links = crate::links::Links::default();
        let artifacts =
            crate::artifacts::Artifacts::new(&dir, plain_http_registries, links.opener().clone());
        Ok(Arc::new(Self {
            dir,
            runtime,
            state,
            desired: Mutex::new(desired),
            supervisors: tokio::sync::Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            removed: Mutex::new(Vec::new()),
            removing: Mutex::new(Default::default()),
            gc_kick: Notify::new(),
            log_limits,
            log_rotations: Mutex::new(HashMap::new()),
            outbox: Notify::new(),
            reconcile_kick: Notify::new(),
            links,
            resources,
            artifacts,
        }))
    }

    /// The revision of the cached desired state.
    pub fn revision(&self) -> u64 {
        lock(&self.desired).revision
    }

    /// Names of the cached instances.
    pub fn instance_names(&self) -> Vec<String> {
        lock(&self.desired).instances.keys().cloned().collect()
    }

    /// This round's metrics of every instance the node knows: whether it runs and
    /// its restarts, from its cgroup (processes, containers, VMs) its CPU time,
    /// memory and OOM kills, and what its driver measures itself (a function's Wasm
    /// stores: memory and requests).
    pub fn instance_metrics(&self) -> Vec<verge_api::metrics::Group> {
        use verge_api::metrics as m;
        let mut groups: std::collections::BTreeMap<String, Vec<(u16, f64)>> = lock(&self.statuses)
            .iter()
            .map(|(name, (_, s))| {
                let up = f64::from(u8::from(s.phase == InstancePhase::Running));
                let values = vec![
                    (m::INSTANCE_UP, up),
                    (m::INSTANCE_RESTARTS, f64::from(s.restarts)),
                ];
                (name.clone(), values)
            })
            .collect();
        for (name, values) in groups.iter_mut() {
            values.extend(self.runtime.metrics(name));
        }
        for (name, u) in self.resources.usages() {
            let values = groups.entry(name).or_default();
            values.push((m::INSTANCE_CPU_SECONDS, u.cpu_usec as f64 / 1e6));
            values.push((m::INSTANCE_MEMORY, u.memory_bytes as f64));
            values.push((m::INSTANCE_OOM_KILLS, u.oom_kills as f64));
        }
        groups
            .into_iter()
            .map(|(instance, values)| m::Group { instance, values })
            .collect()
    }

    /// Counts of instances by phase, for metrics.
    pub fn phase_counts(&self) -> HashMap<String, i64> {
        let mut m = HashMap::new();
        for (_, s) in lock(&self.statuses).values() {
            *m.entry(s.phase.to_string()).or_default() += 1;
        }
        m
    }

    fn persist_and_kick(&self, d: &Desired) -> Result<(), EdgeError> {
        self.state.save_desired(d)?;
        self.reconcile_kick.notify_one();
        Ok(())
    }

    /// The epoch of the hub's history in which the cached revision was confirmed.
    pub fn epoch(&self) -> Option<String> {
        lock(&self.desired).epoch.clone()
    }

    /// The hub resumed this node's sync in `epoch`: its revision holds there.
    pub fn confirm_epoch(&self, epoch: Option<&str>) -> Result<(), EdgeError> {
        let mut d = lock(&self.desired);
        if epoch.is_some() && d.epoch.as_deref() != epoch {
            d.epoch = epoch.map(str::to_string);
            self.state.save_desired(&d)?;
        }
        Ok(())
    }

    /// Replace the whole desired state (snapshot from the hub, in `epoch`; `None`
    /// keeps the one recorded).
    pub fn replace_from(
        &self,
        epoch: Option<String>,
        revision: u64,
        instances: Vec<Instance>,
    ) -> Result<(), EdgeError> {
        let mut d = lock(&self.desired);
        if epoch.is_some() {
            d.epoch = epoch;
        }
        d.revision = revision;
        d.instances = instances
            .into_iter()
            .map(|i| (i.name().to_string(), i))
            .collect();
        self.persist_and_kick(&d)
    }

    /// Replace the whole desired state, keeping the recorded history.
    pub fn replace(&self, revision: u64, instances: Vec<Instance>) -> Result<(), EdgeError> {
        self.replace_from(None, revision, instances)
    }

    /// Apply incremental changes.
    pub fn apply(&self, revision: u64, changes: Vec<InstanceChange>) -> Result<(), EdgeError> {
        let mut d = lock(&self.desired);
        for c in changes {
            match c {
                InstanceChange::Upsert { instance } => {
                    d.instances.insert(instance.name().to_string(), *instance);
                }
                InstanceChange::Remove { name } => {
                    d.instances.remove(&name);
                }
            }
        }
        d.revision = d.revision.max(revision);
        self.persist_and_kick(&d)
    }

    /// Nothing changed for this node up to `revision`.
    pub fn bookmark(&self, revision: u64) -> Result<(), EdgeError> {
        let mut d = lock(&self.desired);
        if revision > d.revision {
            d.revision = revision;
            self.state.save_desired(&d)?;
        }
        Ok(())
    }

    /// Mark every status as needing to be sent (after a reconnect).
    pub fn mark_all_dirty(&self) {
        let names: Vec<String> = lock(&self.statuses).keys().cloned().collect();
        lock(&self.dirty).extend(names);
        self.outbox.notify_one();
    }

    /// Take the statuses waiting to be sent: `(name, uid, status)`.
    pub fn take_dirty(&self) -> Vec<(String, String, InstanceStatus)> {
        let names = std::mem::take(&mut *lock(&self.dirty));
        let statuses = lock(&self.statuses);
        names
            .into_iter()
            .filter_map(|n| {
                statuses
                    .get(&n)
                    .map(|(uid, s)| (n.clone(), uid.clone(), s.clone()))
            })
            .collect()
    }

    /// Take the notices of removed instances: `(name, uid)`.
    pub fn take_removed(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *lock(&self.removed))
    }

    fn set_status(&self, name: &str, uid: &str, f: impl FnOnce(&mut InstanceStatus)) {
        let mut statuses = lock(&self.statuses);
        let entry = statuses
            .entry(name.to_string())
            .or_insert_with(|| (uid.to_string(), InstanceStatus::default()));
        if entry.0 != uid {
            *entry = (uid.to_string(), InstanceStatus::default());
        }
        f(&mut entry.1);
        drop(statuses);
        lock(&self.dirty).insert(name.to_string());
        self.outbox.notify_one();
    }

    /// The log file of an instance on this node.
    pub fn log_path(&self, name: &str) -> Option<PathBuf> {
        lock(&self.desired)
            .instances
            .contains_key(name)
            .then(|| files::instance_dir(&self.dir, name).join("output.log"))
    }

    /// How many times an instance's log was rotated while this agent ran.
    pub fn log_rotations(&self, name: &str) -> u64 {
        lock(&self.log_rotations).get(name).copied().unwrap_or(0)
    }

    /// Rotate an instance's log if it outgrew its limit.
    fn rotate_log(&self, name: &str, path: &std::path::Path) {
        match verge_runtime::process::rotate_log(path, self.log_limits) {
            Ok(true) => {
                *lock(&self.log_rotations)
                    .entry(name.to_string())
                    .or_default() += 1
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(instance = %name, error = %e, "could not rotate the log"),
        }
    }

    /// An instance bound to this node.
    pub fn instance(&self, name: &str) -> Option<Instance> {
        lock(&self.desired).instances.get(name).cloned()
    }

    /// How to run `command` inside instance `name` (for exec), or why not.
    pub fn exec_spec(&self, name: &str, command: &[String]) -> Result<ExecSpec, String> {
        let instance = self
            .instance(name)
            .ok_or_else(|| format!("no instance '{name}' on this node"))?;
        let workload = Workload {
            instance,
            dir: files::instance_dir(&self.dir, name),
            cgroup: None,
            run_id: None,
        };
        self.runtime
            .exec_spec(&workload, command)
            .map_err(|e| e.to_string())
    }

    /// Run the reconciler until the process ends.
    pub async fn reconciler(self: Arc<Self>) {
        loop {
            self.reconcile().await;
            self.reconcile_kick.notified().await;
        }
    }

    /// Bring supervisors in line with the desired state once.
    pub async fn reconcile(self: &Arc<Self>) {
        let desired = lock(&self.desired).instances.clone();
        self.links.reconcile(
            desired
                .iter()
                .flat_map(|(name, i)| i.spec.links.iter().map(|l| (name.clone(), l.clone())))
                .collect(),
        );
        let mut sups = self.supervisors.lock().await;
        // Stop what is no longer wanted.
        let gone: Vec<String> = sups
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(sup) = sups.remove(&name) {
                let _ = sup.stop.send(true);
                let agent = self.clone();
                lock(&self.removing).insert(name.clone());
                tokio::spawn(async move {
                    let _ = sup.task.await;
                    agent.forget(&name);
                    lock(&agent.removing).remove(&name);
                    agent.gc_kick.notify_one();
                    lock(&agent.statuses).remove(&name);
                    lock(&agent.removed).push((name.clone(), sup.uid));
                    agent.outbox.notify_one();
                    tracing::info!(instance = %name, "instance removed");
                });
            }
        }
        // Workloads this agent started (it has their run records) that nobody wants:
        // deleted at the hub while the desired-state cache was lost, or started by an
        // agent that died before it could record them. Only once the desired state
        // is the hub's (synced at least once): before that, an empty cache must not
        // stop what the node still runs.
        if lock(&self.desired).revision > 0 {
            for (name, record) in self.state.run_records() {
                if desired.contains_key(&name)
                    || sups.contains_key(&name)
                    || !lock(&self.removing).insert(name.clone())
                {
                    continue;
                }
                let agent = self.clone();
                tokio::spawn(async move { agent.reap(&name, record).await });
            }
        }
        // Start what is new or changed.
        for (name, inst) in desired {
            let same = sups.get(&name).is_some_and(|s| {
                s.uid == inst.metadata.uid && s.generation == inst.metadata.generation
            });
            if same {
                continue;
            }
            let previous = sups.remove(&name).map(|s| {
                let _ = s.stop.send(true);
                s.task
            });
            let (stop_tx, stop_rx) = watch::channel(false);
            let uid = inst.metadata.uid.clone();
            let generation = inst.metadata.generation;
            let task = tokio::spawn(self.clone().supervise(inst, stop_rx, previous));
            sups.insert(
                name,
                Supervisor {
                    uid,
                    generation,
                    stop: stop_tx,
                    task,
                },
            );
        }
    }

    /// Keep the node's artifact cache under `budget` bytes: after instances go away and
    /// every few minutes, remove what no instance in the desired state needs (so a
    /// node cut off from the hub can still restart everything it runs), oldest first.
    pub async fn collector(self: Arc<Self>, budget: u64) {
        loop {
            tokio::select! {
                _ = self.gc_kick.notified() => {}
                _ = tokio::time::sleep(GC_EVERY) => {}
            }
            // Let a burst of removals finish first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let specs: Vec<verge_api::InstanceSpec> = lock(&self.desired)
                .instances
                .values()
                .map(|i| i.spec.clone())
                .collect();
            let agent = self.clone();
            let done =
                tokio::task::spawn_blocking(move || agent.artifacts.collect(&specs, budget)).await;
            if let Ok(c) = done
                && !c.removed.is_empty()
            {
                tracing::info!(
                    removed = c.removed.len(),
                    before = c.used_before,
                    now = c.used,
                    budget,
                    "artifact cache collected"
                );
            }
        }
    }

    /// Stop a workload nobody wants any more, from its run record alone, and remove
    /// its directory.
    async fn reap(&self, name: &str, record: Option<verge_runtime::RunRecord>) {
        if let Some(record) = record {
            tracing::warn!(instance = %name, pid = record.pid, "stopping a workload that is no longer wanted (not in the desired state)");
            if let Err(e) = self.runtime.stop(&record, Duration::from_secs(5)).await {
                tracing::warn!(instance = %name, error = %e, "could not stop an unwanted workload");
                lock(&self.removing).remove(name);
                return;
            }
        }
        // Not if a supervisor took the name meanwhile (it was wanted again).
        if !self.supervisors.lock().await.contains_key(name) {
            self.forget(name);
        }
        lock(&self.removing).remove(name);
    }

    /// Forget an instance that is gone from the node: its records and its directory.
    fn forget(&self, name: &str) {
        self.state.forget_instance(name);
        let dir = files::instance_dir(&self.dir, name);
        // Its volumes unmounted first: removing through a mount would not free them.
        verge_runtime::volumes::release(&dir);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Let go of every workload without stopping it, as an agent process that exits
    /// does: the supervisors end, the workloads run on for the next agent to adopt.
    pub async fn abandon(&self) {
        for (_, s) in self.supervisors.lock().await.drain() {
            s.task.abort();
            // Awaited, so that what the supervisor held (its admission, and with it
            // its cgroup when the workload has ended) is given back before the agent
            // tidies its cgroups.
            let _ = s.task.await;
        }
    }

    /// Stop every workload (used by `verge dev`, where Ctrl-C should leave nothing behind).
    pub async fn stop_all(&self) {
        let mut sups = self.supervisors.lock().await;
        for (_, s) in sups.drain() {
            let _ = s.stop.send(true);
            let _ = s.task.await;
        }
    }

    async fn supervise(
        self: Arc<Self>,
        inst: Instance,
        mut stop: watch::Receiver<bool>,
        previous: Option<JoinHandle<()>>,
    ) {
        if let Some(p) = previous {
            let _ = p.await;
        }
        let name = inst.name().to_string();
        let uid = inst.metadata.uid.clone();
        let generation = inst.metadata.generation;
        let policy = inst.spec.restart_policy;
        let grace = Duration::from_secs(inst.spec.termination_grace_period_seconds as u64);
        let dir = files::instance_dir(&self.dir, &name);
        let overhead = self.runtime.memory_overhead(&inst.spec);
        let mut workload = Workload {
            instance: inst,
            dir: dir.clone(),
            cgroup: None,
            run_id: None,
        };
        // Released (and the cgroup removed) however this supervisor ends.
        let admission = Admission {
            agent: &self,
            name: &name,
        };
        let mut restarts = lock(&self.statuses)
            .get(&name)
            .filter(|(u, _)| *u == uid)
            .map_or(0, |(_, s)| s.restarts);
        let mut backoff = Duration::from_secs(1);
        // A workload started before the agent restarted is adopted, not started twice.
        let mut running: Option<Running> = match self.state.load_record(&name) {
            Some(rec) => {
                let adopted = self.runtime.adopt(&workload, &rec).await;
                if let Some(a) = &adopted {
                    tracing::info!(instance = %name, pid = a.record.pid, "re-adopted running workload");
                    // A start whose pid was never written is now found: record it.
                    if a.record != rec
                        && let Err(e) = self.state.save_record(&name, &a.record)
                    {
                        tracing::warn!(instance = %name, error = %e, "could not save run record");
                    }
                    // It runs already: account for it as it is.
                    workload.cgroup = self
                        .resources
                        .admit(&workload.instance, overhead, true)
                        .unwrap_or_else(|e| {
                            tracing::warn!(instance = %name, error = %e, "could not account a re-adopted workload");
                            None
                        });
                } else {
                    self.state.clear_record(&name);
                }
                adopted
            }
            None => None,
        };
        loop {
            if *stop.borrow() {
                return;
            }
            let mut run = match running.take() {
                Some(r) => r,
                None => {
                    if !admission.admitted() {
                        match self.resources.admit(&workload.instance, overhead, false) {
                            Ok(cg) => workload.cgroup = cg,
                            Err(why) => {
                                tracing::warn!(instance = %name, reason = %why, "instance refused by the node");
                                self.set_status(&name, &uid, |s| {
                                    s.phase = InstancePhase::Failed;
                                    s.message = why.clone();
                                    s.pid = None;
                                    s.observed_generation = generation;
                                });
                                let _ = stop.wait_for(|s| *s).await;
                                return;
                            }
                        }
                    }
                    self.set_status(&name, &uid, |s| {
                        s.phase = InstancePhase::Starting;
                        s.observed_generation = generation;
                    });
                    if self.runtime.writes_log(&workload.instance.spec) {
                        self.rotate_log(&name, &workload.log_path());
                    }
                    let started = match self.artifacts.localize(&workload.instance.spec).await {
                        Ok(spec) => {
                            workload.instance.spec = spec;
                            // Record the start before making it: an agent killed in
                            // between finds the workload by this run id, instead of
                            // neither adopting nor finding it (and starting it twice).
                            let run_id = new_run_id();
                            let intent = verge_runtime::RunRecord::intent(
                                self.runtime.driver_for(&workload.instance.spec),
                                &name,
                                &run_id,
                            );
                            workload.run_id = Some(run_id);
                            match self.state.save_record(&name, &intent) {
                                Ok(()) => self
                                    .runtime
                                    .start(&workload)
                                    .await
                                    .map_err(|e| e.to_string()),
                                Err(e) => Err(format!("recording the start: {e}")),
                            }
                        }
                        Err(why) => Err(why),
                    };
                    match started {
                        Ok(r) => {
                            if let Err(e) = self.state.save_record(&name, &r.record) {
                                tracing::warn!(instance = %name, error = %e, "could not save run record");
                            }
                            r
                        }
                        Err(msg) => {
                            self.state.clear_record(&name);
                            tracing::warn!(instance = %name, error = %msg, "start failed");
                            let retry = policy != RestartPolicy::Never;
                            self.set_status(&name, &uid, |s| {
                                s.phase = if retry {
                                    InstancePhase::Starting
                                } else {
                                    InstancePhase::Failed
                                };
                                s.message = if retry {
                                    format!("{msg}; retrying in {}s", backoff.as_secs())
                                } else {
                                    msg.clone()
                                };
                                s.pid = None;
                            });
                            if !retry || wait_or_stop(&mut stop, backoff).await {
                                let _ = stop.wait_for(|s| *s).await;
                                return;
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
            };
            let pid = run.record.pid;
            let started_at = run.record.started_at.clone();
            let check = workload.instance.spec.health_check.clone();
            self.set_status(&name, &uid, |s| {
                s.phase = InstancePhase::Running;
                s.pid = Some(pid);
                s.started_at = Some(started_at.clone());
                s.message = String::new();
                s.restarts = restarts;
                s.observed_generation = generation;
                // Not healthy until its check first passes.
                s.healthy = check.as_ref().map(|_| false);
            });
            let mut streak = crate::health::Streak::default();
            // The next check: one period, then the probe (never, without a check).
            let next_check = |c: Option<verge_api::instance::HealthCheck>| async move {
                let Some(c) = c else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(Duration::from_secs(u64::from(c.period_seconds.max(1)))).await;
                let result = crate::health::probe(&c).await;
                (c, result)
            };
            let mut checking = Box::pin(next_check(check.clone()));
            let began = tokio::time::Instant::now();
            let oom_before = workload.cgroup.as_ref().map_or(0, |c| c.usage().oom_kills);
            let mut sampler = UsageSampler::default();
            let mut sample_tick = tokio::time::interval(USAGE_EVERY);
            let mut log_tick = tokio::time::interval(LOG_CHECK_EVERY);
            let writes_log = self.runtime.writes_log(&workload.instance.spec);
            // Without a cgroup there is nothing to sample.
            let samples = workload.cgroup.is_some();
            let exit = loop {
                tokio::select! {
                    exit = run.wait() => break Some(exit),
                    _ = stop.wait_for(|s| *s) => break None,
                    _ = log_tick.tick(), if writes_log => self.rotate_log(&name, &workload.log_path()),
                    (c, result) = &mut checking => {
                        checking.set(next_check(check.clone()));
                        if let Some(healthy) = streak.observe(result.is_ok(), c.failure_threshold, c.success_threshold) {
                            tracing::info!(instance = %name, healthy, "health check verdict changed");
                            let why = result.err().map(|e| format!("health check failing: {e}")).unwrap_or_default();
                            self.set_status(&name, &uid, |s| {
                                s.healthy = Some(healthy);
                                s.message = why.clone();
                            });
                        }
                    }
                    _ = sample_tick.tick(), if samples => {
                        if let Some(usage) = workload.cgroup.as_ref().and_then(|c| sampler.sample(c)) {
                            self.set_status(&name, &uid, |s| s.usage = Some(usage.clone()));
                        }
                    }
                }
            };
            let Some(exit) = exit else {
                if let Err(e) = self.runtime.stop(&run.record, grace).await {
                    tracing::warn!(instance = %name, error = %e, "stop failed");
                }
                self.state.clear_record(&name);
                tracing::info!(instance = %name, "workload stopped");
                return;
            };
            self.state.clear_record(&name);
            let oom = exit == verge_runtime::Exit::OutOfMemory
                || workload
                    .cgroup
                    .as_ref()
                    .is_some_and(|c| c.usage().oom_kills > oom_before);
            let why = match (&workload.cgroup, oom) {
                (Some(c), true) => format!(
                    "{exit}: out of memory (the instance's limit is {})",
                    verge_api::Bytes(c.limits.memory_bytes)
                ),
                _ => exit.to_string(),
            };
            let restart = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !exit.success(),
                RestartPolicy::Never => false,
            };
            tracing::info!(instance = %name, %exit, restart, "workload exited");
            if !restart {
                self.set_status(&name, &uid, |s| {
                    s.phase = if exit.success() {
                        InstancePhase::Succeeded
                    } else {
                        InstancePhase::Failed
                    };
                    s.exit_code = exit.code();
                    s.pid = None;
                    s.usage = None;
                    s.healthy = None;
                    s.message = why.clone();
                });
                let _ = stop.wait_for(|s| *s).await;
                return;
            }
            if began.elapsed() >= HEALTHY_RUN {
                backoff = Duration::from_secs(1);
            }
            restarts += 1;
            self.set_status(&name, &uid, |s| {
                s.phase = InstancePhase::Starting;
                s.exit_code = exit.code();
                s.pid = None;
                s.restarts = restarts;
                s.usage = None;
                s.healthy = None;
                s.message = format!("{why}; restarting in {}s", backoff.as_secs());
            });
            if wait_or_stop(&mut stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Sleep for `d` unless asked to stop first; returns whether a stop was requested.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

fn new_run_id() -> String {
    let b: [u8; 12] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}
