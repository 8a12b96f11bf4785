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

/// A log file larger than this is rotated to `output.log.1` when the workload (re)starts.
pub const LOG_ROTATE_BYTES: u64 = 10 << 20;
const DRIVER: &str = "process";

/// Runs `form: process` instances.
#[derive(Debug, Default, Clone)]
pub struct ProcessRuntime;

/// State and start time (clock ticks since boot) of a pid, from `/proc/PID/stat`.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process in `record` is still the one we started and has not exited.
pub fn is_alive(record: &RunRecord) -> bool {
    record.pid != 0
        && matches!(proc_stat(record.pid), Some((state, start)) if start == record.start_ticks && state != 'Z' && state != 'X')
}

/// Move a log over [`LOG_ROTATE_BYTES`] aside to `output.log.1` (at a (re)start).
pub fn rotate_log(path: &Path) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.len() > LOG_ROTATE_BYTES
    {
        std::fs::rename(path, path.with_extension("log.1"))?;
    }
    Ok(())
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

/// Where, as whom and with what environment a command of this workload runs: the
/// instance's process and `verge exec` share it. The environment is only the spec's
/// (plus `PATH`, `HOME` and `VERGE_INSTANCE`): a workload never sees the agent's
/// (its join token among it).
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
    Ok(ExecSpec {
        argv: argv.to_vec(),
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

/// Find `program` the way exec would (on `PATH` unless it has a '/'), so that a
/// missing program is a start error naming it, not an exit code of a helper.
fn find_program(program: &str) -> std::io::Result<()> {
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
        let program = &spec.command[0];
        let run = environment(w, spec, &spec.command)?;
        find_program(program).map_err(|source| RuntimeError::Start {
            what: program.clone(),
            source,
        })?;
        if let Some((uid, _)) = run.user
            && uid != 0
        {
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
        if record.driver != DRIVER || !is_alive(record) {
            return None;
        }
        Some(Running {
            record: record.clone(),
            exited: watch_by_polling(record.clone()),
        })
    }

    async fn stop(&self, record: &RunRecord, grace: Duration) -> Result<(), RuntimeError> {
        if !is_alive(record) {
            return Ok(());
        }
        let pgid = Pid::from_raw(record.pid as i32);
        // ESRCH: it exited between the check and the signal, which is what we want.
        let _ = killpg(pgid, Signal::SIGTERM);
        if wait_gone(record, grace).await {
            return Ok(());
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        if wait_gone(record, Duration::from_secs(2)).await {
            return Ok(());
        }
        Err(RuntimeError::Stop(format!(
            "pid {} still alive after SIGKILL",
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

    #[tokio::test]
    async fn missing_program_is_a_clear_start_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let w = workload(dir.path(), &["/no/such/program"]);
        let err = ProcessRuntime.start(&w).await.expect_err("fails");
        assert!(err.to_string().contains("/no/such/program"), "{err}");
    }
}
