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
