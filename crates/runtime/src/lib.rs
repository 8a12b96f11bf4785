//! Verge runtimes: how an edge node actually runs an instance.
//!
//! [`Runtime`] is the seam between the edge agent's reconciler (which decides *what*
//! should run and applies restart policy) and a driver (which knows *how* to start,
//! observe and stop one form of compute). Drivers here:
//!
//! - [`process::ProcessRuntime`]: plain processes, in their own process group, output
//!   appended to a log file, stopped with SIGTERM then SIGKILL. A process outlives the
//!   agent and is re-adopted after an agent restart from its [`RunRecord`].
//! - [`fake::FakeRuntime`]: pretends to run workloads; stands in for real drivers in
//!   tests and in the fleet simulator.
//!
//! A runtime never talks to the hub and never decides about restarts.

pub mod cgroup;
pub mod fake;
pub mod process;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use verge_api::{Instance, InstanceSpec};

/// Where an agent whose data directory is `data_dir` keeps its clusters' endpoints
/// (a JSON list of `verge_api::cluster::Endpoint`), for the workloads that balance
/// over them (`verge lb`).
pub fn endpoints_file(data_dir: &Path) -> PathBuf {
    data_dir.join("site").join("endpoints.json")
}

/// Everything a driver needs to run one instance.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The instance (spec and metadata).
    pub instance: Instance,
    /// A directory owned by this instance on the node (working dir, logs).
    pub dir: PathBuf,
    /// The cgroup the workload must start in (set by the node's Resource Manager).
    pub cgroup: Option<cgroup::InstanceCgroup>,
    /// The start being made ([`RunRecord::run_id`]); drivers that can mark their
    /// workload with it do.
    pub run_id: Option<String>,
}

impl Workload {
    /// The instance name.
    pub fn name(&self) -> &str {
        self.instance.name()
    }
    /// The instance spec.
    pub fn spec(&self) -> &InstanceSpec {
        &self.instance.spec
    }
    /// Where the workload's combined stdout and stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("output.log")
    }
    /// The workload's own working directory (the instance directory holds the
    /// agent's records of it, which the workload must not touch).
    pub fn work_dir(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// The file the agent keeps its clusters' endpoints in, which the workload is
    /// told of (`VERGE_ENDPOINTS`): [`endpoints_file`] of the data directory its own
    /// directory is in (`DATA/instances/NAME`).
    pub fn endpoints_file(&self) -> Option<PathBuf> {
        self.dir.parent()?.parent().map(endpoints_file)
    }
    /// An error about this workload's directory.
    pub fn dir_error(&self, source: std::io::Error) -> RuntimeError {
        RuntimeError::Dir {
            path: self.dir.clone(),
            source,
        }
    }

    /// Before a start: make the instance directory; returns the log opened for
    /// appending (what every driver writes output to; the agent rotates it).
    pub fn prepare(&self) -> Result<std::fs::File, RuntimeError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::create_dir_all(&self.dir).map_err(|e| self.dir_error(e))?;
        // Others may pass through (to a workload's own work directory), not list.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| self.dir_error(e))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(self.log_path())
            .map_err(|e| self.dir_error(e))
    }

    /// `argv` as the workload must run it: inside its cgroup when it has one.
    pub fn confined(&self, argv: &[String]) -> Vec<String> {
        match &self.cgroup {
            Some(cg) => cg.wrap(argv),
            None => argv.to_vec(),
        }
    }
}

/// What a driver persists about a started workload so that a restarted agent can
/// find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// Driver that started it (`process`, `fake`).
    pub driver: String,
    /// The instance it runs (empty in records written before this field existed).
    #[serde(default)]
    pub instance: String,
    /// Process id on the node (0 if none).
    pub pid: u32,
    /// Kernel start time of the process in clock ticks since boot, so that a recycled
    /// pid is never mistaken for our process.
    pub start_ticks: u64,
    /// RFC 3339 time it started.
    pub started_at: String,
    /// The start this record is for. Written (with pid 0) before the workload is
    /// started, and passed to it, so that an agent killed between starting it and
    /// recording its pid finds it again instead of starting it twice.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_id: String,
}

impl RunRecord {
    /// The record of a start about to happen (no pid yet).
    pub fn intent(driver: &str, instance: &str, run_id: &str) -> Self {
        Self {
            driver: driver.to_string(),
            instance: instance.to_string(),
            pid: 0,
            start_ticks: 0,
            started_at: verge_api::clock::now_rfc3339(),
            run_id: run_id.to_string(),
        }
    }
}

/// How a workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended while no agent was watching; the code is unknown.
    Unknown,
    /// Killed by the kernel because its cgroup ran out of memory (as its driver saw
    /// before cleaning up).
    OutOfMemory,
}

impl Exit {
    /// Whether this counts as success for restart policy.
    pub fn success(&self) -> bool {
        matches!(self, Exit::Code(0))
    }
    /// The code to report (`128 + signal` for signals, as shells do).
    pub fn code(&self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(*c),
            Exit::Signal(s) => Some(128 + s),
            Exit::OutOfMemory => Some(128 + 9),
            Exit::Unknown => None,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::OutOfMemory => write!(f, "killed by signal 9"),
            Exit::Unknown => write!(
                f,
                "exited (exit code unknown: the workload is not the agent's child)"
            ),
        }
    }
}

/// A started workload: its record and a way to learn when it ends.
#[derive(Debug, Clone)]
pub struct Running {
    /// What to persist.
    pub record: RunRecord,
    /// Becomes `Some` when the workload ends.
    pub exited: watch::Receiver<Option<Exit>>,
}

impl Running {
    /// Wait until the workload ends.
    pub async fn wait(&mut self) -> Exit {
        loop {
            if let Some(exit) = *self.exited.borrow_and_update() {
                return exit;
            }
            if self.exited.changed().await.is_err() {
                // The observer is gone; the workload's fate is unknown.
                return self.exited.borrow().unwrap_or(Exit::Unknown);
            }
        }
    }
}

/// Driver failures.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The workload could not be started.
    #[error("could not start {what}: {source}")]
    Start {
        /// What was being started (the program).
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// This driver does not run that form.
    #[error("this node has no driver for form '{0}'")]
    Unsupported(String),
    /// The driver cannot run commands inside its workloads.
    #[error("the {0} driver cannot run commands inside an instance (exec)")]
    NoExec(String),
    /// Stopping failed.
    #[error("could not stop workload: {0}")]
    Stop(String),
    /// Filesystem trouble in the instance directory.
    #[error("instance directory {path}: {source}")]
    Dir {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One form of compute on a node.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The driver's name, as written in the run records it makes.
    fn name(&self) -> &'static str;
    /// Start the workload.
    async fn start(&self, workload: &Workload) -> Result<Running, RuntimeError>;
    /// Find a workload started earlier (possibly by a previous agent process) from its
    /// record. `None` if it is no longer running.
    async fn adopt(&self, workload: &Workload, record: &RunRecord) -> Option<Running>;
    /// Stop it: ask politely, wait up to `grace`, then force.
    async fn stop(&self, record: &RunRecord, grace: Duration) -> Result<(), RuntimeError>;
    /// Memory the driver itself uses per workload on top of the instance's request
    /// (QEMU's own process for a VM), which the node accounts and limits too.
    fn memory_overhead(&self, spec: &InstanceSpec) -> u64 {
        let _ = spec;
        0
    }
    /// The name of the driver that runs `spec` (as its run records say).
    fn driver_for(&self, spec: &InstanceSpec) -> &'static str {
        let _ = spec;
        self.name()
    }
    /// Whether the workload's output goes to its log file (which the agent then
    /// rotates by size). A driver that writes none spares the agent the checks.
    fn writes_log(&self, spec: &InstanceSpec) -> bool {
        let _ = spec;
        true
    }
    /// Metrics of `instance` that only the driver knows (`(catalogue id, value)`,
    /// `verge_api::metrics`): a driver whose workloads have no cgroup of their own
    /// (functions, in the agent's process) measures them itself.
    fn metrics(&self, instance: &str) -> Vec<(u16, f64)> {
        let _ = instance;
        Vec::new()
    }
    /// How to run `command` inside the workload's environment (`verge exec`). The
    /// agent runs it; the driver says where and how.
    fn exec_spec(&self, workload: &Workload, command: &[String]) -> Result<ExecSpec, RuntimeError> {
        let _ = (workload, command);
        Err(RuntimeError::NoExec(workload.spec().form.to_string()))
    }
}

/// Every driver of a node: routes an instance to the driver of its form, and a run
/// record to the driver that wrote it.
#[derive(Default)]
pub struct Drivers {
    drivers: Vec<(verge_api::Form, std::sync::Arc<dyn Runtime>)>,
}

impl Drivers {
    /// Add the driver for `form`.
    pub fn with(mut self, form: verge_api::Form, driver: std::sync::Arc<dyn Runtime>) -> Self {
        self.drivers.push((form, driver));
        self
    }

    fn for_form(&self, form: verge_api::Form) -> Result<&dyn Runtime, RuntimeError> {
        self.drivers
            .iter()
            .find(|(f, _)| *f == form)
            .map(|(_, d)| d.as_ref())
            .ok_or_else(|| RuntimeError::Unsupported(form.to_string()))
    }
}

#[async_trait]
impl Runtime for Drivers {
    fn name(&self) -> &'static str {
        "drivers"
    }
    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        self.for_form(w.spec().form)?.start(w).await
    }
    async fn adopt(&self, w: &Workload, record: &RunRecord) -> Option<Running> {
        self.for_form(w.spec().form).ok()?.adopt(w, record).await
    }
    async fn stop(&self, record: &RunRecord, grace: Duration) -> Result<(), RuntimeError> {
        match self.drivers.iter().find(|(_, d)| d.name() == record.driver) {
            Some((_, d)) => d.stop(record, grace).await,
            None => Err(RuntimeError::Unsupported(record.driver.clone())),
        }
    }
    fn exec_spec(&self, w: &Workload, command: &[String]) -> Result<ExecSpec, RuntimeError> {
        self.for_form(w.spec().form)?.exec_spec(w, command)
    }
    fn memory_overhead(&self, spec: &InstanceSpec) -> u64 {
        self.for_form(spec.form)
            .map_or(0, |d| d.memory_overhead(spec))
    }
    fn driver_for(&self, spec: &InstanceSpec) -> &'static str {
        self.for_form(spec.form).map_or("", |d| d.name())
    }
    fn writes_log(&self, spec: &InstanceSpec) -> bool {
        self.for_form(spec.form).is_ok_and(|d| d.writes_log(spec))
    }
    fn metrics(&self, instance: &str) -> Vec<(u16, f64)> {
        self.drivers
            .iter()
            .flat_map(|(_, d)| d.metrics(instance))
            .collect()
    }
}

/// A command to run inside a workload's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The environment. For a workload that runs as a user of its own
    /// ([`ExecSpec::user`]) it is the whole environment: nothing of the agent's.
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `(uid, gid)` to run as; `None` runs as the agent (drivers whose workloads are
    /// confined otherwise, such as containers under runc).
    pub user: Option<(u32, u32)>,
}

impl ExecSpec {
    /// The command line that runs `argv` as [`ExecSpec::user`]: through `setpriv`,
    /// which drops to the user (and no supplementary groups) only after whatever must
    /// run as root before it, such as entering the instance's cgroup.
    pub fn argv_as_user(&self) -> Vec<String> {
        match self.user {
            Some((uid, gid)) if uid != 0 || gid != 0 => {
                let mut v = vec![
                    "setpriv".to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--".into(),
                ];
                v.extend(self.argv.iter().cloned());
                v
            }
            _ => self.argv.clone(),
        }
    }
}
