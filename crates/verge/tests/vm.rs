//! `form: vm` end to end with real QEMU: a VM boots a kernel and a busybox initrd to a
//! marker on its serial console (the instance's log), keeps running when the agent is
//! killed, is reattached by the restarted agent, and is stopped on delete.

#![cfg(feature = "vm")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_vm_boots_to_its_marker_outlives_the_agent_and_is_reattached() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let mut edge = Edge::start(&hub, "vm-node", Some(&hub.token(1)));
    let kernel = verge_vm::images::test_kernel().expect("test kernel");
    let initrd = d.path().join("initrd.cpio");
    verge_vm::images::busybox_initrd(&initrd, &verge_vm::images::marker_init("VERGE-VM-UP"))
        .expect("initrd");
    // The example, with this machine's kernel and the initrd built above.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/runtimes/vm-busybox.yaml"
    );
    let manifest = std::fs::read_to_string(example)
        .expect("example")
        .replace(
            "/var/lib/verge/images/vmlinuz",
            &kernel.display().to_string(),
        )
        .replace(
            "/var/lib/verge/images/busybox-initrd.cpio",
            &initrd.display().to_string(),
        );
    let out = hub.apply(&manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = hub.wait_phase("instances", "tiny-vm", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid");
    wait_for("the marker on the console", T, || {
        hub.ok(&["logs", "tiny-vm"])
            .contains("VERGE-VM-UP")
            .then_some(())
    });

    // The agent dies; the VM does not.
    edge.proc.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(pid_alive(pid), "QEMU outlives the agent");
    let edge = Edge::start_in(&hub.url, "vm-node", None, &edge.dir);
    wait_for("the agent to reattach", T, || {
        edge.proc
            .log_text()
            .contains("reattached to VM")
            .then_some(())
    });
    let ticks = || hub.ok(&["logs", "tiny-vm"]).matches("tick").count();
    let before = ticks();
    wait_for("the console to keep ticking", T, || {
        (ticks() > before).then_some(())
    });
    let vm = hub.get_json("instances", "tiny-vm").expect("instance");
    assert_eq!(vm["status"]["pid"].as_u64(), Some(pid), "the same VM: {vm}");
    assert_eq!(vm["status"]["restarts"].as_u64().unwrap_or(0), 0, "{vm}");

    hub.ok(&["delete", "instance", "tiny-vm"]);
    wait_for("QEMU to stop", T, || (!pid_alive(pid)).then_some(()));
}

#[test]
fn a_vm_boots_a_disk_image_from_the_hubs_artifact_store_and_restarts_without_the_hub() {
    let d = test_dir();
    let mut hub = Hub::start(d.path());
    let node = unique("disk-node");
    let mut edge = Edge::start(&hub, &node, Some(&hub.token(1)));
    let image = d.path().join("disk.img");
    verge_vm::images::boot_sector_disk(&image, "VERGE-DISK-UP").expect("disk");
    let digest = hub
        .ok(&["artifact", "push", image.to_str().expect("utf8")])
        .trim()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(hub.ok(&["artifact", "list"]).contains(&digest));

    // A digest the hub does not have: the instance says so and what to do.
    let missing = format!("sha256:{}", "1".repeat(64));
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/runtimes/vm-disk.yaml"
    ))
    .expect("example");
    let zero = format!("sha256:{}", "0".repeat(64));
    let out = hub.apply(
        &manifest
            .replace(&zero, &missing)
            .replace("name: disk-vm", "name: nowhere-vm"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the missing artifact explained", T, || {
        let i = hub.get_json("instances", "nowhere-vm")?;
        let msg = i["status"]["message"].as_str().unwrap_or("").to_string();
        (msg.contains(&missing) && msg.contains("verge artifact push")).then_some(())
    });
    hub.ok(&["delete", "instance", "nowhere-vm"]);

    let out = hub.apply(&manifest.replace(&zero, &digest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = hub.wait_phase("instances", "disk-vm", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid");
    wait_for("the disk's boot marker", T, || {
        hub.ok(&["logs", "disk-vm"])
            .contains("VERGE-DISK-UP")
            .then_some(())
    });
    // The node's copy is verified and read-only; the VM writes to its own overlay.
    let instance_dir = edge.dir.join("instances").join("disk-vm");
    assert!(instance_dir.join("disk.qcow2").exists());
    let cached = edge
        .dir
        .join("artifacts/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    assert_eq!(
        std::fs::read(&cached).expect("cached copy"),
        std::fs::read(&image).expect("image")
    );

    // Cut off: the hub is gone, the agent restarts, the VM dies. The agent boots it
    // again from its cache.
    hub.proc.kill();
    edge.proc.kill();
    kill_pid(pid as u32);
    wait_for("QEMU to die", T, || (!pid_alive(pid)).then_some(()));
    let edge = Edge::start_in(&hub.url, &node, None, &edge.dir);
    let log = instance_dir.join("output.log");
    wait_for("the VM booted again without the hub", T, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("VERGE-DISK-UP").count() >= 2).then_some(())
    });
    assert!(
        !edge.proc.log_text().contains("fetched from the hub"),
        "the restart used the node's copy"
    );
    // The hub comes back (same data), and deleting the instance stops the VM.
    let hub = Hub::start_on(d.path(), hub.port);
    let old = pid;
    let pid = wait_for("the VM's new pid", T, || {
        hub.get_json("instances", "disk-vm")?["status"]["pid"]
            .as_u64()
            .filter(|p| *p != old)
    });
    hub.ok(&["delete", "instance", "disk-vm"]);
    wait_for("QEMU to stop", T, || (!pid_alive(pid)).then_some(()));
    drop(edge);
}

/// The guest's `/init` for the local-disk test: load virtio-blk, count its boots in
/// the first 16 bytes of its disk, say the disk's size, try to write past its end.
const DISK_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  $B insmod /files/$m.ko
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do $B sleep 0.1; n=$((n+1)); done
c=$($B dd if=/dev/vda bs=16 count=1 2>/dev/null | $B tr -dc 0-9)
c=$((${c:-0}+1))
$B printf "%16d" $c | $B dd of=/dev/vda bs=16 count=1 conv=notrunc,fsync 2>/dev/null
$B echo "VM-STARTS $c"
$B echo "VM-DISK-SECTORS $($B cat /sys/block/vda/size)"
$B dd if=/dev/zero of=/dev/vda bs=1M seek=16 count=1 2>&1 | $B grep -i space
while true; do $B sleep 1; done
"#;

#[test]
fn a_vms_local_disk_is_a_virtio_disk_of_its_size_whose_data_outlives_a_restart() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "vm-disk-node", Some(&hub.token(1)));
    let kernel = verge_vm::images::test_kernel().expect("test kernel");
    let modules = verge_vm::images::virtio_blk_modules().expect("virtio-blk modules");
    let initrd = d.path().join("disk-initrd.cpio");
    verge_vm::images::busybox_initrd_with(&initrd, DISK_INIT, &modules).expect("initrd");
    let manifest = format!(
        "kind: Instance\nmetadata: {{name: disk-vm}}\nspec:\n  form: vm\n  vm:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet panic=-1\n  volumes: [{{name: data, size: 16Mi}}]\n  resources: {{cpu: '1', memory: 128Mi, disk: 16Mi}}\n  terminationGracePeriodSeconds: 1\n",
        kernel.display(),
        initrd.display()
    );
    let out = hub.apply(&manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = |what: &str| {
        wait_for(&format!("the console to show {what:?}"), T, || {
            hub.ok(&["logs", "disk-vm"]).contains(what).then_some(())
        })
    };
    let pid = hub.running_pid("disk-vm");
    console("VM-STARTS 1");
    // 16 MiB in 512-byte sectors, and not a byte more.
    console("VM-DISK-SECTORS 32768");
    console("No space left on device");
    // QEMU killed: the agent starts the VM again, on the same disk.
    kill_pid(pid as u32);
    console("VM-STARTS 2");
    // Deleted: QEMU stops (it runs outside the agent and would outlive the test).
    let pid = hub.running_pid("disk-vm");
    hub.ok(&["delete", "instance", "disk-vm"]);
    wait_for("QEMU to stop", T, || (!pid_alive(pid)).then_some(()));
}
