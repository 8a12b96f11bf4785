//! Verge's VM driver: `form: vm` instances run as QEMU virtual machines.
//!
//! The VM's data plane lives outside the agent: QEMU is started with `-daemonize`, so it
//! is not the agent's child, keeps running when the agent stops, restarts or is
//! upgraded, and is reattached afterwards through its pid (checked against the kernel's
//! start time) and its QMP control socket. Everything about one VM lives in its
//! instance directory: `qmp.sock` (control), `qemu.pid`, and `output.log`, which is
//! the serial console.
//!
//! - vCPUs: the instance's CPU request rounded up to whole CPUs; memory: its memory
//!   request. KVM when `/dev/kvm` is usable, TCG (software emulation) otherwise.
//! - Stop: ACPI power-down over QMP, then `quit` after the grace period, then SIGKILL.
//! - [`qmp`] is a minimal QMP client; [`cpio`] and [`images`] build the small
//!   initramfs the tests and benchmarks boot.

pub mod cpio;
pub mod images;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use verge_api::clock::now_rfc3339;
use verge_api::{InstanceSpec, VmSpec};
use verge_runtime::process::{is_alive, proc_stat, wait_gone, watch_by_polling};
use verge_runtime::{RunRecord, Running, Runtime, RuntimeError, Workload};

const DRIVER: &str = "vm";
/// QEMU's own memory beside the guest's RAM (device models, TCG translation cache).
pub const QEMU_OVERHEAD: u64 = 96 << 20;

/// Runs `form: vm` instances with QEMU.
#[derive(Debug, Clone)]
pub struct VmRuntime {
    /// The QEMU system emulator to run.
    pub qemu: PathBuf,
    /// Use KVM (else TCG).
    pub kvm: bool,
}

impl VmRuntime {
    /// `qemu-system-x86_64` from `PATH`, with KVM where it is usable: `/dev/kvm` opens
    /// and the CPU advertises hardware virtualisation (`vmx` or `svm`). Some nested
    /// setups (a Firecracker guest, for one) offer `/dev/kvm` without it, and guests
    /// then hang early in boot; TCG is slower but works everywhere.
    pub fn detect() -> Self {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let hw = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        });
        let kvm = dev && hw;
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kvm,
        }
    }
}

/// Whole vCPUs for a CPU request in millicores (at least one).
pub fn vcpus(millis: u64) -> u64 {
    millis.div_ceil(1000).max(1)
}

fn control_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

/// `qcow2` or `raw`, by the image's magic number (QEMU is told, never left to guess:
/// a guessed raw image could turn itself into another format by writing a header).
pub fn disk_format(path: &Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if qcow2 { "qcow2" } else { "raw" }
}

/// The disk a VM writes to: the image itself when it is writable; for a read-only
/// image (every artifact from the node's cache is one) a copy-on-write qcow2 overlay
/// in the instance directory, made once and kept across restarts of the VM.
async fn writable_disk(image: &str, dir: &Path) -> Result<String, String> {
    let readonly = std::fs::metadata(image)
        .map_err(|e| format!("disk image {image}: {e}"))?
        .permissions()
        .readonly();
    if !readonly {
        return Ok(image.to_string());
    }
    let overlay = dir.join("disk.qcow2");
    if !overlay.exists() {
        // Not std's Command: the agent's one runtime thread must not wait on it.
        let out = tokio::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                disk_format(Path::new(image)),
                "-b",
                image,
            ])
            .arg(&overlay)
            .output()
            .await
            .map_err(|e| format!("qemu-img (apt-get install qemu-utils): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img create overlay on {image}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(overlay.display().to_string())
}

/// The QEMU command line for a VM (pure but for reading a disk image's magic, so it
/// can be checked without QEMU).
pub fn qemu_args(spec: &InstanceSpec, vm: &VmSpec, dir: &Path, kvm: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-machine", "q35", "-cpu", "max", "-no-reboot"]);
    if kvm {
        push(&["-accel", "kvm"]);
    }
    // A bounded translation cache keeps QEMU inside its memory limit under TCG.
    push(&["-accel", "tcg,tb-size=64"]);
    let smp = vcpus(spec.resources.cpu.0).to_string();
    let mem = format!("{}M", (spec.resources.memory.0 >> 20).max(16));
    push(&["-smp", &smp, "-m", &mem]);
    if let Some(k) = &vm.kernel {
        push(&["-kernel", k]);
        push(&["-append", vm.cmdline.as_deref().unwrap_or("console=ttyS0")]);
    }
    if let Some(i) = &vm.initrd {
        push(&["-initrd", i]);
    }
    if let Some(d) = &vm.disk {
        let format = disk_format(Path::new(d));
        push(&["-drive", &format!("file={d},if=virtio,format={format}")]);
    }
    // Local disks: the volume files themselves, never mounted on the node meanwhile.
    for v in &spec.volumes {
        let img = verge_runtime::volumes::image(dir, &v.name);
        push(&[
            "-drive",
            &format!("file={},if=virtio,format=raw", img.display()),
        ]);
    }
    let log = dir.join("output.log");
    push(&[
        "-chardev",
        &format!("file,id=console,path={},append=on", log.display()),
        "-serial",
        "chardev:console",
    ]);
    let qmp = control_socket(dir);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    push(&[
        "-pidfile",
        &dir.join("qemu.pid").display().to_string(),
        "-daemonize",
    ]);
    a
}

#[async_trait]
impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn memory_overhead(&self, _spec: &InstanceSpec) -> u64 {
        QEMU_OVERHEAD
    }

    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        let Some(vm) = &w.spec().vm else {
            return Err(RuntimeError::Unsupported(w.spec().form.to_string()));
        };
        // QEMU appends the console to the log itself.
        drop(w.prepare()?);
        let dir_err = |e| w.dir_error(e);
        let _ = std::fs::remove_file(control_socket(&w.dir));
        let _ = std::fs::remove_file(w.dir.join("qemu.pid"));
        verge_runtime::volumes::prepare(w, None)?;
        let mut vm = vm.clone();
        if let Some(d) = &vm.disk {
            let disk = writable_disk(d, &w.dir)
                .await
                .map_err(|why| RuntimeError::Start {
                    what: "the VM's disk".into(),
                    source: std::io::Error::other(why),
                })?;
            vm.disk = Some(disk);
        }
        let args = qemu_args(w.spec(), &vm, &w.dir, self.kvm);
        let start_err = |source| RuntimeError::Start {
            what: self.qemu.display().to_string(),
            source,
        };
        // With -daemonize QEMU returns once the VM is set up (or failed to be), and the
        // VM process is no child of ours: it outlives the agent.
        let mut argv = vec![self.qemu.display().to_string()];
        argv.extend(args);
        argv.extend(["-name".to_string(), format!("verge-{}", w.name())]);
        // The daemonized QEMU is forked from this process, so it stays in the cgroup.
        let argv = w.confined(&argv);
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(start_err)?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(start_err(std::io::Error::other(why)));
        }
        let pid_text = std::fs::read_to_string(w.dir.join("qemu.pid")).map_err(dir_err)?;
        let pid: u32 = pid_text
            .trim()
            .parse()
            .map_err(|_| start_err(std::io::Error::other(format!("bad pidfile {pid_text:?}"))))?;
        let start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let record = RunRecord {
            driver: DRIVER.into(),
            instance: w.name().to_string(),
            pid,
            start_ticks,
            started_at: now_rfc3339(),
            run_id: String::new(),
        };
        tracing::info!(instance = w.name(), pid, kvm = self.kvm, "VM started");
        Ok(Running {
            exited: watch_by_polling(record.clone()),
            record,
        })
    }

    async fn adopt(&self, w: &Workload, record: &RunRecord) -> Option<Running> {
        if record.driver != DRIVER || !is_alive(record) {
            return None;
        }
        // Reattach: the control socket must answer, and the VM must be one we know.
        match qmp::Qmp::connect(&control_socket(&w.dir)).await {
            Ok(mut q) => match q.execute("query-status").await {
                Ok(status) => {
                    tracing::info!(instance = w.name(), pid = record.pid, status = %status, "reattached to VM")
                }
                Err(e) => {
                    tracing::warn!(instance = w.name(), error = %e, "VM did not answer query-status")
                }
            },
            Err(e) => {
                tracing::warn!(instance = w.name(), error = %e, "VM's control socket does not answer; watching its process only")
            }
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
        // The socket path is not in the record; find it from the pid's command line.
        let socket = qmp_socket_of(record.pid);
        let wait_gone = |d: Duration| wait_gone(record, d);
        if let Some(sock) = &socket
            && let Ok(mut q) = qmp::Qmp::connect(sock).await
        {
            // Ask the guest to power off (ACPI); a guest without ACPI support ignores
            // it, so after the grace period QEMU is told to quit.
            let _ = q.execute("system_powerdown").await;
            if wait_gone(grace).await {
                return Ok(());
            }
            let _ = q.execute("quit").await;
            if wait_gone(Duration::from_secs(5)).await {
                return Ok(());
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(record.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if wait_gone(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(RuntimeError::Stop(format!(
                "QEMU pid {} still alive after SIGKILL",
                record.pid
            )))
        }
    }
}

/// The QMP socket a QEMU process was started with (from `/proc/PID/cmdline`).
fn qmp_socket_of(pid: u32) -> Option<PathBuf> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args.iter().position(|a| a == "-qmp")?;
    let spec = args.get(i + 1)?.strip_prefix("unix:")?;
    Some(PathBuf::from(spec.split(',').next()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{Bytes, Cpu};

    #[test]
    fn command_line_follows_the_instance() {
        let mut spec = InstanceSpec::default();
        spec.resources.cpu = Cpu(1500);
        spec.resources.memory = Bytes(256 << 20);
        let vm = VmSpec {
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            ..Default::default()
        };
        let args = qemu_args(&spec, &vm, Path::new("/d"), false).join(" ");
        assert!(args.contains("-smp 2 -m 256M"), "{args}");
        assert!(
            args.contains("-kernel /k -append console=ttyS0 -initrd /i"),
            "{args}"
        );
        assert!(args.contains("path=/d/output.log,append=on"), "{args}");
        assert!(
            args.contains("-qmp unix:/d/qmp.sock,server=on,wait=off"),
            "{args}"
        );
        assert!(!args.contains("kvm"), "{args}");
        assert!(
            qemu_args(&spec, &vm, Path::new("/d"), true)
                .join(" ")
                .contains("-accel kvm -accel tcg,tb-size=64")
        );
        assert_eq!(vcpus(0), 1);
        assert_eq!(vcpus(1000), 1);
        assert_eq!(vcpus(1001), 2);
    }
}
