//! The VM driver against real QEMU: boot a kernel and a busybox initrd to a marker on
//! the serial console, reattach from a fresh driver (as after an agent restart), stop.
//!
//! Needs `qemu-system-x86_64`, `/bin/busybox` (busybox-static) and a kernel: the one
//! `scripts/test.sh` fetches (Debian's cloud kernel), or `$VERGE_TEST_KERNEL`.

use std::path::Path;
use std::time::Duration;

use verge_api::{Bytes, Cpu, Form, Instance, InstanceSpec, VmSpec};
use verge_runtime::{Runtime, Workload};
use verge_vm::{VmRuntime, images};

async fn wait_for_log(path: &Path, want: &str, limit: Duration) -> String {
    let t = tokio::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(want) {
            return log;
        }
        assert!(
            t.elapsed() < limit,
            "no {want:?} on the console after {limit:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn boots_to_the_marker_survives_a_new_driver_and_stops() {
    let dir = tempfile::tempdir().expect("tmp");
    let initrd = dir.path().join("initrd.cpio");
    images::busybox_initrd(&initrd, &images::marker_init("VERGE-VM-UP")).expect("initrd");
    let spec = InstanceSpec {
        form: Form::Vm,
        vm: Some(VmSpec {
            kernel: Some(images::test_kernel().expect("kernel").display().to_string()),
            initrd: Some(initrd.display().to_string()),
            cmdline: Some("console=ttyS0 quiet panic=-1".into()),
            disk: None,
        }),
        ..Default::default()
    };
    let mut spec = spec;
    spec.resources.cpu = Cpu(1000);
    spec.resources.memory = Bytes(128 << 20);
    let w = Workload {
        instance: Instance::new("vm-1", spec),
        dir: dir.path().join("vm-1"),
        cgroup: None,
        run_id: None,
    };
    let driver = VmRuntime::detect();
    let running = driver.start(&w).await.expect("start");
    wait_for_log(&w.log_path(), "VERGE-VM-UP", Duration::from_secs(60)).await;

    // A new driver (the agent restarted) finds the same VM through pid and QMP.
    let again = VmRuntime::detect()
        .adopt(&w, &running.record)
        .await
        .expect("reattached");
    assert_eq!(again.record.pid, running.record.pid);
    // And the VM keeps running: its console keeps ticking.
    let ticks = || {
        std::fs::read_to_string(w.log_path())
            .unwrap_or_default()
            .matches("tick")
            .count()
    };
    let before = ticks();
    let t = tokio::time::Instant::now();
    while ticks() <= before {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the VM stopped ticking"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    VmRuntime::detect()
        .stop(&running.record, Duration::from_secs(1))
        .await
        .expect("stop");
    assert!(
        !verge_runtime::process::is_alive(&running.record),
        "QEMU gone"
    );
}
