//! Verge's container driver: `form: container` instances run as OCI containers.
//!
//! - Images come from an OCI registry ([`image`]): every blob verified against its
//!   digest, kept content-addressed on the node, layers unpacked safely ([`unpack`]),
//!   and used from the cache afterwards, so a node cut off from the registry and the
//!   hub can still restart what it ran.
//! - Each container gets an overlay of the image (a fresh writable layer per start) as
//!   the root of an OCI bundle, and runs with `runc`: its own pid, mount, ipc, uts and
//!   network namespaces, the instance's CPU and memory as `linux.resources`, inside the
//!   cgroup the node's Resource Manager made for the instance.
//! - Containers are not the agent's children (`runc run --detach` under a [`shim`]):
//!   they keep running across agent restarts and are found again by pid; the shim
//!   records each container's exit code, even one that ends while the agent is down.
//!   Output goes to the instance's `output.log`. `verge exec` runs `runc exec` in the
//!   container.

pub mod image;
pub mod shim;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use verge_api::clock::now_rfc3339;
use verge_api::{ContainerSpec, InstanceSpec};
use verge_runtime::process::{is_alive, proc_stat, wait_gone, watch_by_polling};
use verge_runtime::{ExecSpec, RunRecord, Running, Runtime, RuntimeError, Workload};

use crate::image::{Image, ImageStore};

const DRIVER: &str = "container";
/// The shim's memory, in the instance's cgroup beside the container's.
pub const SHIM_OVERHEAD: u64 = 4 << 20;
/// Longest `runc run` may take to start a container.
const RUNC_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `form: container` instances with runc.
pub struct ContainerRuntime {
    images: ImageStore,
    runc: Runc,
    published: Published,
}

/// The host listeners that publish each container's declared ports, by instance.
type Published = std::sync::Arc<
    std::sync::Mutex<std::collections::HashMap<String, Vec<tokio::task::AbortHandle>>>,
>;

fn unpublish(published: &Published, instance: &str) {
    let handles = published
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(instance);
    for h in handles.into_iter().flatten() {
        h.abort();
    }
}

/// Connect to `127.0.0.1:port` inside the network namespace of process `pid`. The
/// socket keeps that namespace after the thread that made it leaves; the thread is a
/// fresh one that ends right after, so no other work ever runs in a switched namespace.
async fn connect_inside(pid: u32, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("verge-netns".into())
        .spawn(move || {
            let r = (|| -> std::io::Result<std::net::TcpStream> {
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let s = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(5),
                )?;
                s.set_nonblocking(true)?;
                Ok(s)
            })();
            let _ = tx.send(r);
        })?;
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("netns thread ended"))??;
    tokio::net::TcpStream::from_std(s)
}

impl ContainerRuntime {
    /// Publish `w`'s declared ports (`spec.ports`) on the node's loopback, each
    /// connection joined to the same port inside the container (whose network
    /// namespace has only a loopback of its own). Port-forward and links to a
    /// container then work as for a process.
    fn publish(&self, w: &Workload, pid: u32) {
        unpublish(&self.published, w.name());
        let mut handles = Vec::new();
        for p in &w.spec().ports {
            let (port, name) = (p.port, w.name().to_string());
            let task = tokio::spawn(async move {
                let l = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(instance = %name, port, error = %e, "cannot publish the container's port");
                        return;
                    }
                };
                while let Ok((mut outside, _)) = l.accept().await {
                    let name = name.clone();
                    tokio::spawn(async move {
                        match connect_inside(pid, port).await {
                            Ok(mut inside) => {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut outside, &mut inside).await;
                            }
                            Err(e) => {
                                tracing::info!(instance = %name, port, error = %e, "connection into the container failed")
                            }
                        }
                    });
                }
            });
            handles.push(task.abort_handle());
        }
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.name().to_string(), handles);
    }
}

/// How the driver calls runc.
#[derive(Clone)]
struct Runc {
    /// runc's state directory (ours alone).
    state: PathBuf,
    runc: PathBuf,
    /// The `verge` executable, run as `verge container-shim` ([`shim`]).
    shim: PathBuf,
}

impl ContainerRuntime {
    /// Images cached under `data/artifacts`, runc state under `data/runc`; registries
    /// in `plain_http` are spoken to without TLS; `shim` is the `verge` executable
    /// (which has the `container-shim` command).
    pub fn new(data: &Path, plain_http: Vec<String>, shim: PathBuf) -> Self {
        Self {
            images: ImageStore::new(data.join("artifacts"), plain_http),
            runc: Runc {
                state: data.join("runc"),
                runc: PathBuf::from("runc"),
                shim,
            },
            published: Default::default(),
        }
    }
}

/// Learn when a container ends (it is not our child: by polling), then remove its
/// runc state and unmount its root, so a container that exits on its own leaves
/// nothing behind.
fn watch_container(
    runc: Runc,
    published: Published,
    record: RunRecord,
    w: &Workload,
) -> tokio::sync::watch::Receiver<Option<verge_runtime::Exit>> {
    let (id, bundle) = (container_id(w), w.dir.join("bundle"));
    let exit_file = exit_file(&w.dir);
    // An out-of-memory kill is counted in runc's group, which cleaning removes: look
    // before cleaning.
    let cgroup = w.cgroup.clone();
    let oom_before = cgroup.as_ref().map_or(0, |c| c.usage().oom_kills);
    let instance = record.instance.clone();
    let mut polled = watch_by_polling(record);
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let exit = loop {
            if let Some(e) = *polled.borrow_and_update() {
                break e;
            }
            if polled.changed().await.is_err() {
                break verge_runtime::Exit::Unknown;
            }
        };
        let oom = cgroup
            .as_ref()
            .is_some_and(|c| c.usage().oom_kills > oom_before);
        unpublish(&published, &instance);
        runc.clean(&id, &bundle).await;
        // The shim writes the status right after reaping the container, which is what
        // made it gone: give it a moment.
        let mut recorded = None;
        for _ in 0..50 {
            recorded = shim::read_exit(&exit_file);
            if recorded.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let exit = if oom {
            verge_runtime::Exit::OutOfMemory
        } else {
            recorded.unwrap_or(exit)
        };
        let _ = tx.send(Some(exit));
    });
    rx
}

impl Runc {
    fn runc(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.runc);
        c.arg("--root").arg(&self.state);
        c
    }

    /// `runc` once, its failure as text.
    async fn runc_ok(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = self
            .runc()
            .args(args)
            .output()
            .await
            .map_err(|e| format!("runc: {e}"))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The container id and bundle of the container whose init is `pid`.
    async fn find(&self, pid: u32) -> Option<(String, PathBuf)> {
        let list = self.runc_ok(&["list", "--format", "json"]).await.ok()?;
        let list: serde_json::Value = serde_json::from_slice(&list).ok()?;
        list.as_array()?.iter().find_map(|c| {
            (c["pid"].as_u64() == Some(pid as u64)).then(|| {
                (
                    c["id"].as_str().unwrap_or("").to_string(),
                    PathBuf::from(c["bundle"].as_str().unwrap_or("")),
                )
            })
        })
    }

    /// Remove a container's runc state and unmount its root (best effort).
    async fn clean(&self, id: &str, bundle: &Path) {
        let _ = self.runc_ok(&["delete", "--force", id]).await;
        let _ = nix::mount::umount(&bundle.join("rootfs"));
    }
}

/// Where a container's shim records its exit status.
fn exit_file(dir: &Path) -> PathBuf {
    dir.join("container.exit")
}

/// The container id of an instance.
fn container_id(w: &Workload) -> String {
    format!("verge-{}", w.name())
}

/// What the container runs: the spec's command, or the image's entrypoint + cmd.
pub fn process_args(spec: &ContainerSpec, image: &Image) -> Vec<String> {
    if !spec.command.is_empty() {
        return spec.command.clone();
    }
    image
        .entrypoint
        .iter()
        .chain(image.cmd.iter())
        .cloned()
        .collect()
}

/// The OCI runtime config for a container (pure). With `instance_cgroup` (the path of
/// the instance's cgroup in its hierarchy) the container's group is made inside it, and
/// memory is limited there, so an out-of-memory kill is counted and explained; without,
/// runc's own group carries the limit.
pub fn runtime_config(
    spec: &InstanceSpec,
    container: &ContainerSpec,
    image: &Image,
    hostname: &str,
    instance_cgroup: Option<&str>,
    volumes: &[(String, std::path::PathBuf)],
) -> serde_json::Value {
    let mut env: Vec<String> = image.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for (k, v) in &container.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={v}"));
    }
    let cwd = if image.working_dir.is_empty() {
        "/".to_string()
    } else {
        image.working_dir.clone()
    };
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    let quota = (spec.resources.cpu.0 * 100).max(1000);
    let mut resources = serde_json::json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "cpu": {"quota": quota, "period": 100000}
    });
    if instance_cgroup.is_none() {
        resources["memory"] = serde_json::json!({"limit": spec.resources.memory.0});
    }
    let cgroups_path = match instance_cgroup {
        Some(p) => format!("{p}/container"),
        None => format!("/verge/{hostname}"),
    };
    let mut mounts = serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
    ]);
    if let Some(m) = mounts.as_array_mut() {
        // Local disks, each bound from where the agent mounted it.
        m.extend(volumes.iter().map(|(path, dir)| {
            serde_json::json!({"destination": path, "type": "bind", "source": dir, "options": ["rbind", "rw", "nosuid", "nodev"]})
        }));
    }
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": process_args(container, image),
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

#[async_trait]
impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn memory_overhead(&self, _spec: &InstanceSpec) -> u64 {
        SHIM_OVERHEAD
    }

    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        let Some(container) = &w.spec().container else {
            return Err(RuntimeError::Unsupported(w.spec().form.to_string()));
        };
        let start_err = |what: &str, e: String| RuntimeError::Start {
            what: what.to_string(),
            source: std::io::Error::other(e),
        };
        let image = self
            .images
            .ensure(&container.image)
            .await
            .map_err(|e| start_err(&container.image, e.to_string()))?;
        let dir_err = |e| w.dir_error(e);
        let id = container_id(w);
        let bundle = w.dir.join("bundle");
        // Whatever a previous run left: its runc state, its mount, its writable layer.
        self.runc.clean(&id, &bundle).await;
        for d in ["upper", "work"] {
            let _ = std::fs::remove_dir_all(w.dir.join(d));
        }
        let rootfs = bundle.join("rootfs");
        for d in [w.dir.join("upper"), w.dir.join("work"), rootfs.clone()] {
            std::fs::create_dir_all(&d).map_err(dir_err)?;
        }
        std::fs::create_dir_all(&self.runc.state).map_err(dir_err)?;
        let log = w.prepare()?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.rootfs.display(),
            w.dir.join("upper").display(),
            w.dir.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| start_err("the container's root (overlay mount)", e.to_string()))?;
        let cgroup_path = w.cgroup.as_ref().map(|c| c.hierarchy_path());
        verge_runtime::volumes::prepare(w, None)?;
        let config = runtime_config(
            w.spec(),
            container,
            &image,
            w.name(),
            cgroup_path.as_deref(),
            &verge_runtime::volumes::container_mounts(w),
        );
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .map_err(dir_err)?;
        let pid_file = w.dir.join("container.pid");
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(exit_file(&w.dir));
        let mut argv = vec![
            self.runc.shim.display().to_string(),
            "container-shim".into(),
            "--exit-file".into(),
            exit_file(&w.dir).display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            "--".into(),
            self.runc.runc.display().to_string(),
            "--root".into(),
            self.runc.state.display().to_string(),
            "run".into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            id.clone(),
        ];
        // The shim, and runc after it, start inside the instance's cgroup, so the
        // container does too.
        argv = w.confined(&argv);
        let mut shim = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| start_err("the container shim", format!("{}: {e}", argv[0])))?;
        let report = match shim.stdout.take() {
            Some(out) => {
                use tokio::io::AsyncBufReadExt;
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(out);
                let _ = tokio::time::timeout(RUNC_START_TIMEOUT, reader.read_line(&mut line)).await;
                line
            }
            None => String::new(),
        };
        // Reap the shim whenever it ends while this agent runs (after a restart, init
        // does).
        tokio::spawn(async move {
            let _ = shim.wait().await;
        });
        let Some(pid) = report
            .trim()
            .strip_prefix(shim::STARTED)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            let tail = std::fs::read_to_string(w.log_path()).unwrap_or_default();
            let last = tail.lines().last().unwrap_or("").to_string();
            self.runc.clean(&id, &bundle).await;
            let why = report
                .trim()
                .strip_prefix(shim::FAILED)
                .unwrap_or(report.trim());
            return Err(start_err("runc run", format!("{why}: {last}")));
        };
        let record = RunRecord {
            driver: DRIVER.into(),
            instance: w.name().to_string(),
            pid,
            start_ticks: proc_stat(pid).map(|(_, t)| t).unwrap_or(0),
            started_at: now_rfc3339(),
            run_id: String::new(),
        };
        tracing::info!(instance = w.name(), pid, image = %image.digest, "container started");
        self.publish(w, pid);
        Ok(Running {
            exited: watch_container(self.runc.clone(), self.published.clone(), record.clone(), w),
            record,
        })
    }

    async fn adopt(&self, w: &Workload, record: &RunRecord) -> Option<Running> {
        if record.driver != DRIVER {
            return None;
        }
        if !is_alive(record) {
            // It ended while no agent watched; its shim knows how. Reported as this
            // run's end (restart policy applies), not started again blindly.
            let exit = shim::read_exit(&exit_file(&w.dir))?;
            self.runc
                .clean(&container_id(w), &w.dir.join("bundle"))
                .await;
            tracing::info!(instance = w.name(), %exit, "container ended while the agent was away");
            let (_, exited) = tokio::sync::watch::channel(Some(exit));
            return Some(Running {
                record: record.clone(),
                exited,
            });
        }
        self.publish(w, record.pid);
        Some(Running {
            record: record.clone(),
            exited: watch_container(self.runc.clone(), self.published.clone(), record.clone(), w),
        })
    }

    async fn stop(&self, record: &RunRecord, grace: Duration) -> Result<(), RuntimeError> {
        unpublish(&self.published, &record.instance);
        let Some((id, bundle)) = self.runc.find(record.pid).await else {
            return Ok(());
        };
        let gone = |d: Duration| wait_gone(record, d);
        if is_alive(record) {
            let _ = self.runc.runc_ok(&["kill", &id, "TERM"]).await;
            if !gone(grace).await {
                let _ = self.runc.runc_ok(&["kill", &id, "KILL"]).await;
                gone(Duration::from_secs(5)).await;
            }
        }
        self.runc.clean(&id, &bundle).await;
        if is_alive(record) {
            return Err(RuntimeError::Stop(format!(
                "container {id} (pid {}) still alive after SIGKILL",
                record.pid
            )));
        }
        Ok(())
    }

    fn exec_spec(&self, w: &Workload, command: &[String]) -> Result<ExecSpec, RuntimeError> {
        let mut argv = vec![
            self.runc.runc.display().to_string(),
            "--root".into(),
            self.runc.state.display().to_string(),
            "exec".into(),
            container_id(w),
        ];
        argv.extend(command.iter().cloned());
        Ok(ExecSpec {
            argv,
            env: Default::default(),
            cwd: w.dir.clone(),
            // runc runs the command inside the container, as the container's user.
            user: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{Bytes, Cpu};

    #[test]
    fn the_bundle_config_follows_spec_and_image() {
        let mut spec = InstanceSpec::default();
        spec.resources.cpu = Cpu(500);
        spec.resources.memory = Bytes(64 << 20);
        let image = Image {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            ..Default::default()
        };
        let mut c = ContainerSpec {
            image: "r/x:1".into(),
            ..Default::default()
        };
        c.env.insert("A".into(), "2".into());
        let cfg = runtime_config(&spec, &c, &image, "web", None, &[]);
        assert_eq!(
            cfg["process"]["args"],
            serde_json::json!(["/bin/sh", "-c", "echo hi"])
        );
        assert_eq!(
            cfg["process"]["env"],
            serde_json::json!(["PATH=/bin", "A=2"])
        );
        assert_eq!(cfg["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(cfg["linux"]["resources"]["cpu"]["quota"], 50_000);
        let inside = runtime_config(&spec, &c, &image, "web", Some("/a/verge-n/web"), &[]);
        assert!(
            inside["linux"]["resources"]["memory"].is_null(),
            "the instance cgroup limits"
        );
        assert_eq!(inside["linux"]["cgroupsPath"], "/a/verge-n/web/container");
        assert!(
            cfg["linux"]["namespaces"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x["type"] == "network")),
            "its own network namespace"
        );
        c.command = vec!["/bin/true".into()];
        assert_eq!(process_args(&c, &image), vec!["/bin/true".to_string()]);
    }
}
