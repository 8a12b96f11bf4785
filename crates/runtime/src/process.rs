//! The process driver: plain processes on the node.
//!
//! Each process runs in its own process group (so a Ctrl-C or SIGTERM aimed at the
//! agent does not reach it, and stopping it reaches its children too), with stdin
//! closed and stdout and stderr appended to `output.log` in the instance directory.
//! Processes are not tied to the agent's lifetime: a restarted agent re-adopts them by
//! pid, checking the kernel start time so that a recycled pid is never mistaken for
//! ours.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use verge_api::clock::now_rfc3339;

use crate::{ExecSpec, Exit, RunRecord, Running, Runtime, RuntimeError, Workload};

/// How large a workload's log may grow before it is rotated, and how many rotated
/// files are kept (`output.log.1` is the newest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Rotate once the log is larger than this.
    pub max_bytes: u64,
    /// Rotated files kept; older ones are deleted.
    pub keep: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            keep: 3,
        }
    }
}
const DRIVER: &str = "process";

/// Runs `form: process` instances.
#[derive(Debug, Default, Clone)]
pub struct ProcessRuntime;

/// State and start time (clock ticks since boot) of a pid, from `/proc/PID/stat`.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let fields = stat_fields(pid)?;
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The fields of `/proc/PID/stat` after the command name (state, ppid, pgrp, ...).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The variable that marks a process with the start ([`RunRecord::run_id`]) it
/// belongs to.
pub const RUN_ID_ENV: &str = "VERGE_RUN_ID";

/// `record` with its pid filled in, when it is the record of a start whose pid was
/// never written (the agent died in between): the process group leader whose
/// environment carries the start's marker.
pub fn locate(record: &RunRecord) -> RunRecord {
    if record.pid != 0 || record.run_id.is_empty() {
        return record.clone();
    }
    let want = format!("{RUN_ID_ENV}={}", record.run_id);
    let found = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            if !env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                return None;
            }
            // The leader of its own group: the workload itself, not one of its children.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let pgrp: u32 = stat[stat.rfind(')')? + 2..]
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()?;
            (pgrp == pid).then_some(pid)
        });
    let mut r = record.clone();
    if let Some(pid) = found {
        r.pid = pid;
        r.start_ticks = proc_stat(pid).map_or(0, |(_, t)| t);
    }
    r
}

/// [`locate`], looked for again a few times when not found at first: a process in
/// the middle of `execve` (setpriv becoming the workload, right after a start) cannot
/// have its environment read for that moment, and missing it here would make the
/// agent start the instance a second time, or leave it running after a stop.
pub async fn locate_settled(record: &RunRecord) -> RunRecord {
    let mut found = locate(record);
    for _ in 0..5 {
        if found.pid != 0 || record.run_id.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        found = locate(record);
    }
    found
}

/// Whether the process in `record` is still the one we started and has not exited.
pub fn is_alive(record: &RunRecord) -> bool {
    record.pid != 0
        && matches!(proc_stat(record.pid), Some((state, start)) if start == record.start_ticks && state != 'Z' && state != 'X')
}

/// Rotate `path` if it is over `limits.max_bytes`, while its workload may be writing
/// to it: the rotated files shift (`.1` to `.2`, ...; the oldest beyond `keep` goes),
/// the log is copied to `.1` and then emptied in place. Workloads write with
/// `O_APPEND` (the drivers open logs so), so their next write lands at the start of
/// the emptied file; only what they write between the copy and the truncation is
/// lost. Returns whether it rotated.
pub fn rotate_log(path: &Path, limits: LogLimits) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= limits.max_bytes {
        return Ok(false);
    }
    let rotated = |n: usize| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    let _ = std::fs::remove_file(rotated(limits.keep.max(1)));
    for n in (1..limits.keep.max(1)).rev() {
        let _ = std::fs::rename(rotated(n), rotated(n + 1));
    }
    if limits.keep == 0 {
        let _ = std::fs::remove_file(rotated(1));
    } else {
        std::fs::copy(path, rotated(1))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// Wait up to `within` for the workload of `record` to be gone; whether it is.
pub async fn wait_gone(record: &RunRecord, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if !is_alive(record) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !is_alive(record)
}

/// Whether a live (not zombie) process is in process group `pgid`. A group id is
/// never handed out again while a process of the group lives, so this cannot mistake
/// another group for the workload's.
pub fn group_alive(pgid: u32) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .any(|pid| {
            let Some(fields) = stat_fields(pid) else {
                return false;
            };
            let state = fields.first().and_then(|s| s.chars().next());
            let pgrp = fields.get(2).and_then(|g| g.parse::<u32>().ok());
            pgrp == Some(pgid) && !matches!(state, Some('Z' | 'X'))
        })
}

/// Wait up to `within` for the process in `record` and every other process of its
/// group to end; whether they did.
pub async fn wait_group_gone(record: &RunRecord, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if !is_alive(record) && !group_alive(record.pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Learn when a process that is not our child (adopted, or daemonized) ends, by
/// polling `/proc`; its exit code is unknown.
pub fn watch_by_polling(record: RunRecord) -> watch::Receiver<Option<Exit>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        while is_alive(&record) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tx.closed() => return,
            }
        }
        let _ = tx.send(Some(Exit::Unknown));
    });
    rx
}

/// The `PATH` a workload starts with (it inherits nothing of the agent's environment).
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `(uid, gid)` for `spec.process.user`: `root`, a user of the node, or `UID[:GID]`;
/// none means [`verge_api::DEFAULT_PROCESS_USER`].
pub fn resolve_user(user: Option<&str>) -> Result<(u32, u32), RuntimeError> {
    if !nix::unistd::geteuid().is_root() {
        // An agent that is not root cannot switch users: its workloads run as it.
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        return match user {
            None => Ok(me),
            Some(u) => match resolve_named(u)? {
                ids if ids.0 == me.0 => Ok(me),
                _ => Err(RuntimeError::Start {
                    what: format!("as user '{u}'"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the agent does not run as root, so its workloads run as the agent's user",
                    ),
                }),
            },
        };
    }
    resolve_named(user.unwrap_or(verge_api::DEFAULT_PROCESS_USER))
}

fn resolve_named(name: &str) -> Result<(u32, u32), RuntimeError> {
    let unknown = |why: &str| RuntimeError::Start {
        what: format!("as user '{name}'"),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, why.to_string()),
    };
    if let Some((u, g)) = name.split_once(':') {
        return match (u.parse(), g.parse()) {
            (Ok(u), Ok(g)) => Ok((u, g)),
            _ => Err(unknown("not UID:GID")),
        };
    }
    if let Ok(uid) = name.parse::<u32>() {
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or(uid, |u| u.gid.as_raw());
        return Ok((uid, gid));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        // The image may lack a passwd entry for nobody: the conventional ids.
        _ if name == "nobody" => Ok((65534, 65534)),
        _ => Err(unknown(
            "no such user on this node; name one that exists, root, or UID:GID",
        )),
    }
}

/// The variable that tells a workload where its node's clusters' endpoints are
/// ([`crate::endpoints_file`]).
pub const ENDPOINTS_ENV: &str = "VERGE_ENDPOINTS";

/// A command named this runs the agent's own binary: the platform services built
/// into Verge (`verge lb`) need nothing installed on the node.
pub const SELF_COMMAND: &str = "verge";

/// Where, as whom and with what environment a command of this workload runs: the
/// instance's process and `verge exec` share it. The environment is only the spec's
/// (plus `PATH`, `HOME`, `VERGE_INSTANCE` and `VERGE_ENDPOINTS`): a workload never
/// sees the agent's (its join token among it). A command named [`SELF_COMMAND`]
/// runs the agent's own executable.
fn environment(
    w: &Workload,
    spec: &verge_api::ProcessSpec,
    argv: &[String],
) -> Result<ExecSpec, RuntimeError> {
    let cwd = spec
        .working_dir
        .as_deref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| w.work_dir());
    let mut env = std::collections::BTreeMap::from([
        ("PATH".to_string(), WORKLOAD_PATH.to_string()),
        ("HOME".to_string(), cwd.display().to_string()),
    ]);
    env.extend(spec.env.clone());
    env.insert("VERGE_INSTANCE".into(), w.name().to_string());
    if let Some(f) = w.endpoints_file() {
        env.insert(ENDPOINTS_ENV.into(), f.display().to_string());
    }
    for v in &w.spec().volumes {
        let dir = crate::volumes::mount_point(&w.dir, &v.name);
        env.insert(v.env_name(), dir.display().to_string());
    }
    if let Some(id) = &w.run_id {
        env.insert(RUN_ID_ENV.into(), id.clone());
    }
    let mut argv = argv.to_vec();
    if argv.first().is_some_and(|p| p == SELF_COMMAND)
        && let Ok(exe) = std::env::current_exe()
    {
        argv[0] = exe.display().to_string();
    }
    Ok(ExecSpec {
        argv,
        env,
        cwd,
        user: Some(resolve_user(spec.user.as_deref())?),
    })
}

/// The first directory on the way to `dir` that user `uid` may not pass through
/// (judged by its mode bits for others, or for its owner), with its mode.
pub fn unreachable_ancestor(dir: &Path, uid: u32) -> Option<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors().skip(1).find_map(|d| {
        let m = std::fs::metadata(d).ok()?;
        let mode = m.mode() & 0o7777;
        let ok = if m.uid() == uid {
            mode & 0o100 != 0
        } else {
            mode & 0o001 != 0
        };
        (!ok).then(|| (d.to_path_buf(), mode))
    })
}

/// Find `program` the way exec would (on [`WORKLOAD_PATH`] unless it has a '/'), so
/// that a missing program is a start error naming it, not the exit code of the
/// helper (`setpriv`) that runs it as its user.
pub fn find_program(program: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        WORKLOAD_PATH
            .split(':')
            .any(|d| executable(&Path::new(d).join(program)))
    };
    if found {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no such program (looked on {WORKLOAD_PATH})"),
        ))
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }
    fn exec_spec(&self, w: &Workload, command: &[String]) -> Result<ExecSpec, RuntimeError> {
        match &w.spec().process {
            Some(spec) => environment(w, spec, command),
            None => Err(RuntimeError::Unsupported(w.spec().form.to_string())),
        }
    }

    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        let Some(spec) = &w.spec().process else {
            return Err(RuntimeError::Unsupported(w.spec().form.to_string()));
        };
        let log = w.prepare()?;
        let log2 = log.try_clone().map_err(|e| w.dir_error(e))?;
        let run = environment(w, spec, &spec.command)?;
        let program = &run.argv[0];
        find_program(program).map_err(|source| RuntimeError::Start {
            what: program.clone(),
            source,
        })?;
        if let Some((uid, _)) = run.user
            && uid != 0
        {
            find_program("setpriv").map_err(|_| RuntimeError::Start {
                what: program.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "running it as its own user needs setpriv (util-linux) on the node; install it, or set spec.process.user: root",
                ),
            })?;
            unreachable_ancestor(&w.dir, uid).map_or(Ok(()), |(d, mode)| {
                Err(RuntimeError::Start {
                    what: program.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "its user (uid {uid}) cannot reach its work directory: {} is mode {mode:o}; let others pass through it (chmod o+x) or run the agent with a data directory under one they can, or set spec.process.user: root",
                            d.display()
                        ),
                    ),
                })
            })?;
        }
        crate::volumes::prepare(w, run.user)?;
        if spec.working_dir.is_none() {
            // The workload's own directory, writable by its user and nobody else.
            use std::os::unix::fs::PermissionsExt;
            let work = w.work_dir();
            std::fs::create_dir_all(&work).map_err(|e| w.dir_error(e))?;
            if let Some((uid, gid)) = run.user {
                std::os::unix::fs::chown(&work, Some(uid), Some(gid))
                    .map_err(|e| w.dir_error(e))?;
            }
            std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| w.dir_error(e))?;
        }
        // Enter the cgroup as root, then become the workload's user.
        let argv = w.confined(&run.argv_as_user());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(&run.env)
            .current_dir(&run.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| RuntimeError::Start {
            what: program.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let record = RunRecord {
            driver: DRIVER.into(),
            instance: w.name().to_string(),
            pid,
            start_ticks,
            started_at: now_rfc3339(),
            run_id: w.run_id.clone().unwrap_or_default(),
        };
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let exit = match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    _ => Exit::Unknown,
                },
                Err(_) => Exit::Unknown,
            };
            let _ = tx.send(Some(exit));
        });
        Ok(Running { record, exited: rx })
    }

    async fn adopt(&self, _w: &Workload, record: &RunRecord) -> Option<Running> {
        let record = &locate_settled(record).await;
        if record.driver != DRIVER || !is_alive(record) {
            return None;
        }
        Some(Running {
            record: record.clone(),
            exited: watch_by_polling(record.clone()),
        })
    }

    async fn stop(&self, record: &RunRecord, grace: Duration) -> Result<(), RuntimeError> {
        let record = &locate_settled(record).await;
        if !is_alive(record) {
            return Ok(());
        }
        let pgid = Pid::from_raw(record.pid as i32);
        // ESRCH: it exited between the check and the signal, which is what we want.
        let _ = killpg(pgid, Signal::SIGTERM);
        // Stopped means the whole group is gone, not only its leader: a child still
        // exiting would keep the instance's cgroup (and its resources) in use.
        if wait_group_gone(record, grace).await {
            return Ok(());
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        if wait_group_gone(record, Duration::from_secs(2)).await {
            return Ok(());
        }
        Err(RuntimeError::Stop(format!(
            "process group {} still alive after SIGKILL",
            record.pid
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{Instance, InstanceSpec, ProcessSpec};

    fn workload(dir: &Path, cmd: &[&str]) -> Workload {
        // Workloads run as nobody: let them pass through the test's directory.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
        let spec = InstanceSpec {
            process: Some(ProcessSpec {
                command: cmd.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Workload {
            instance: Instance::new("t", spec),
            dir: dir.join("t"),
            cgroup: None,
            run_id: None,
        }
    }

    #[tokio::test]
    async fn runs_logs_and_reports_exit_code() {
        let dir = tempfile::tempdir().expect("tmp");
        let w = workload(
            dir.path(),
            &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
        );
        let mut r = ProcessRuntime.start(&w).await.expect("start");
        assert_eq!(r.wait().await, Exit::Code(3));
        let log = std::fs::read_to_string(w.log_path()).expect("log");
        assert!(log.contains("out") && log.contains("err"), "{log}");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_adopt_finds_live_process() {
        let dir = tempfile::tempdir().expect("tmp");
        // Ignores SIGTERM, so only SIGKILL ends it.
        let w = workload(
            dir.path(),
            &["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
        );
        let r = ProcessRuntime.start(&w).await.expect("start");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let adopted = ProcessRuntime.adopt(&w, &r.record).await;
        assert!(adopted.is_some(), "a live process is adoptable");
        ProcessRuntime
            .stop(&r.record, Duration::from_millis(300))
            .await
            .expect("stop");
        assert!(!is_alive(&r.record));
        assert!(ProcessRuntime.adopt(&w, &r.record).await.is_none());
    }

    /// A child that outlives its group's leader (here it ignores SIGTERM while the
    /// leader exits at once) is still the workload: stop returns only when the whole
    /// group is gone, so the instance's cgroup is empty when it is removed.
    #[tokio::test]
    async fn stop_ends_the_whole_process_group_not_only_its_leader() {
        let dir = tempfile::tempdir().expect("tmp");
        let w = workload(
            dir.path(),
            &["/bin/sh", "-c", "(trap '' TERM; sleep 30) & exec sleep 30"],
        );
        let r = ProcessRuntime.start(&w).await.expect("start");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(group_alive(r.record.pid));
        ProcessRuntime
            .stop(&r.record, Duration::from_millis(300))
            .await
            .expect("stop");
        assert!(!is_alive(&r.record));
        assert!(
            !group_alive(r.record.pid),
            "a child of the workload outlived its stop"
        );
    }

    /// The agent dies after starting a workload and before writing its pid: the
    /// record written before the start still finds it (by its run id), so a restarted
    /// agent adopts it instead of starting it twice, and can stop it.
    #[tokio::test]
    async fn a_start_whose_pid_was_never_recorded_is_found_by_its_run_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = workload(dir.path(), &["/bin/sh", "-c", "sleep 30 & wait"]);
        let run_id = format!("test-{}", std::process::id());
        w.run_id = Some(run_id.clone());
        let r = ProcessRuntime.start(&w).await.expect("start");
        let intent = RunRecord::intent(DRIVER, "t", &run_id);
        let adopted = ProcessRuntime.adopt(&w, &intent).await.expect("found");
        assert_eq!(
            adopted.record.pid, r.record.pid,
            "the leader, not its child"
        );
        ProcessRuntime
            .stop(&intent, Duration::from_millis(500))
            .await
            .expect("stop");
        assert!(!is_alive(&r.record));
        assert!(ProcessRuntime.adopt(&w, &intent).await.is_none());
    }

    #[test]
    fn a_log_is_rotated_in_place_and_only_so_many_old_ones_are_kept() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("output.log");
        let limits = LogLimits {
            max_bytes: 100,
            keep: 2,
        };
        // A writer holding the log open with O_APPEND, as a workload does.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open");
        for round in 0..4u8 {
            w.write_all(&[b'a' + round; 150]).expect("write");
            assert!(rotate_log(&log, limits).expect("rotate"));
        }
        w.write_all(b"after").expect("write");
        assert_eq!(
            std::fs::read(&log).expect("log"),
            b"after",
            "the writer goes on at the start"
        );
        assert_eq!(
            std::fs::read(dir.path().join("output.log.1")).expect(".1"),
            vec![b'd'; 150]
        );
        assert_eq!(
            std::fs::read(dir.path().join("output.log.2")).expect(".2"),
            vec![b'c'; 150]
        );
        assert!(!dir.path().join("output.log.3").exists());
        assert!(
            !rotate_log(&log, limits).expect("small"),
            "a small log stays"
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_start_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let w = workload(dir.path(), &["/no/such/program"]);
        let err = ProcessRuntime.start(&w).await.expect_err("fails");
        assert!(err.to_string().contains("/no/such/program"), "{err}");
    }
}
