//! `form: container` end to end with the real things: Debian's `docker-registry` on
//! loopback as the OCI registry (the test pushes a small image it builds from
//! busybox-static), `runc`, and a real hub and edge. Create, Running, logs, exec (its
//! own network namespace), an agent restart that leaves the container running and
//! re-adopted, a restart from the node's cache with the registry gone, memory limits,
//! delete.

#![cfg(feature = "container")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_container_from_a_registry_runs_survives_the_agent_and_restarts_offline() {
    let d = test_dir();
    let mut registry = Registry::start(d.path());
    let image = format!("{}/verge/busybox:1", registry.addr);
    push_busybox(&image, &registry.addr);

    let hub = Hub::start(d.path());
    let edge_args = ["--plain-http-registry", registry.addr.as_str()];
    // A node name of its own: cgroups are named after the node, and outlive a test.
    let node = unique("ctr");
    let dir = d.path().join(&node);
    let edge = Edge::start_with(&hub.url, &node, Some(&hub.token(1)), &dir, &edge_args);
    let m = unique("ctr");
    let web = container(
        "web",
        &image,
        "64Mi",
        &format!("echo {m} up in $(hostname); while :; do sleep 1; done"),
        "",
    );
    let out = hub.apply(&web);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = hub.wait_phase("instances", "web", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid");
    wait_for("the container's output", T, || {
        hub.ok(&["logs", "web"])
            .contains(&format!("{m} up in web"))
            .then_some(())
    });
    // The example, pointed at this registry.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/runtimes/container-busybox.yaml"
    );
    let example = std::fs::read_to_string(example)
        .expect("example")
        .replace("127.0.0.1:5000", &registry.addr);
    assert!(hub.apply(&example).status.success());
    hub.wait_phase("instances", "busybox-web", "Running", T);
    wait_for("the example's output", T, || {
        hub.ok(&["logs", "busybox-web"])
            .contains("container up in busybox-web")
            .then_some(())
    });
    // Its own network namespace: only a loopback interface in there.
    let links = hub.ok(&["exec", "web", "--", "/bin/busybox", "ip", "-o", "link"]);
    assert!(links.contains("lo:") && !links.contains("eth0"), "{links}");

    // A declared port is published on the node's loopback and reaches the container.
    let port = free_port();
    let server = container(
        "server",
        &image,
        "32Mi",
        &format!(
            "mkdir -p /www && echo served-from-inside > /www/index.html && exec httpd -f -p {port} -h /www"
        ),
        &format!("  ports: [{{port: {port}}}]\n"),
    );
    assert!(hub.apply(&server).status.success());
    hub.wait_phase("instances", "server", "Running", T);
    let page = wait_for("the published port", T, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut page = String::new();
        s.read_to_string(&mut page).ok()?;
        page.contains("served-from-inside").then_some(page)
    });
    assert!(page.starts_with("HTTP/1."), "{page}");

    // A local disk mounted where the container asks: its data outlives a restart of
    // the container, and it holds its size and no more.
    let store = container(
        "store",
        &image,
        "32Mi",
        "echo x >> /data/starts; echo \"starts: $(wc -l < /data/starts)\"; dd if=/dev/zero of=/data/fill bs=1M count=32 2>&1 | grep -i space; rm -f /data/fill; while :; do sleep 1; done",
        "  volumes: [{name: data, size: 16Mi, path: /data}]\n",
    )
    .replace("resources: {cpu: 200m, memory: 32Mi}", "resources: {cpu: 200m, memory: 32Mi, disk: 16Mi}");
    let out = hub.apply(&store);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_pid = hub.wait_phase("instances", "store", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid");
    let store_log = |what: &str| {
        wait_for(&format!("the store's log to show {what:?}"), T, || {
            hub.ok(&["logs", "store"]).contains(what).then_some(())
        })
    };
    store_log("starts: 1");
    store_log("No space left on device");
    kill_pid(store_pid as u32);
    store_log("starts: 2");

    // Exit codes are known: a container is no child of the agent, but of its shim.
    let three = container(
        "three",
        &image,
        "16Mi",
        "exit 3",
        "  restartPolicy: Never\n",
    );
    assert!(hub.apply(&three).status.success());
    let failed = hub.wait_phase("instances", "three", "Failed", T);
    assert_eq!(failed["status"]["exitCode"].as_i64(), Some(3), "{failed}");
    // One that ends while the agent is down.
    let late = container(
        "late",
        &image,
        "16Mi",
        "sleep 2; exit 7",
        "  restartPolicy: Never\n",
    );
    assert!(hub.apply(&late).status.success());
    let late_pid = hub.wait_phase("instances", "late", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid");

    // The agent dies and comes back: the container ran on and is adopted.
    let mut edge = edge;
    edge.proc.kill();
    assert!(pid_alive(pid), "the container outlives the agent");
    wait_for("'late' to end while the agent is down", T, || {
        (!pid_alive(late_pid)).then_some(())
    });
    let edge = Edge::start_with(&hub.url, &node, None, &dir, &edge_args);
    let late = hub.wait_phase("instances", "late", "Failed", T);
    assert_eq!(late["status"]["exitCode"].as_i64(), Some(7), "{late}");
    wait_for("re-adoption", T, || {
        edge.proc
            .log_text()
            .contains("re-adopted running workload")
            .then_some(())
    });
    let again = hub.wait_phase("instances", "web", "Running", T);
    assert_eq!(again["status"]["pid"].as_u64(), Some(pid), "{again}");

    // The registry goes away: a new container of the same image starts from the cache.
    registry.proc.kill();
    let cached = container("cached", &image, "64Mi", "echo from cache; sleep 600", "");
    assert!(hub.apply(&cached).status.success());
    hub.wait_phase("instances", "cached", "Running", T);
    wait_for("output from the cached image", T, || {
        hub.ok(&["logs", "cached"])
            .contains("from cache")
            .then_some(())
    });

    // Limits hold: 32 MiB allowed, 100 MB wanted.
    let hog = container(
        "hog",
        &image,
        "32Mi",
        "x=$(head -c 100000000 /dev/zero | tr \"\\\\0\" a); sleep 60",
        "  restartPolicy: Never\n",
    );
    assert!(hub.apply(&hog).status.success());
    let failed = hub.wait_phase("instances", "hog", "Failed", T);
    assert!(
        failed["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("out of memory")),
        "{failed}\n{}",
        hub.ok(&["logs", "hog"])
    );

    for n in [
        "web",
        "cached",
        "hog",
        "busybox-web",
        "server",
        "three",
        "store",
        "late",
    ] {
        hub.ok(&["delete", "instance", n]);
    }
    wait_for("the container to stop", T, || {
        (!pid_alive(pid)).then_some(())
    });
    // Nothing is left mounted or registered with runc.
    let root = d.path().display().to_string();
    wait_for("the containers' roots to be unmounted", T, || {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        (!mounts.contains(&root)).then_some(())
    });
    drop(edge);
}
