//! The platform services built into Verge and deployed by cluster templates, each
//! with real traffic or data: the site-local load balancer (`verge lb`) in front of
//! an application's instances, local disks with a size quota, and a managed
//! middleware server (Debian's `redis-server` on a local disk, spoken to with
//! `redis-cli`).

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// `examples/platform/FILE` with each of `ports` replaced by a free port (the
/// examples name fixed ones; tests run side by side).
fn example_on_free_ports(file: &str, ports: &[&str]) -> (String, Vec<u16>) {
    let path = format!(
        "{}/../../examples/platform/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut text = std::fs::read_to_string(path).expect("example");
    let mut free = Vec::new();
    for p in ports {
        let f = free_port();
        text = text.replace(p, &f.to_string());
        free.push(f);
    }
    (text, free)
}

/// The instances carrying `label=value`, by name.
fn instances_with(hub: &Hub, label: &str, value: &str) -> Vec<serde_json::Value> {
    hub.list_json("instances")
        .into_iter()
        .filter(|i| i["metadata"]["labels"][label] == value)
        .collect()
}

/// The name of the one Running instance of component `component`, once there is one.
fn running(hub: &Hub, component: &str) -> serde_json::Value {
    wait_for(&format!("{component} Running"), T, || {
        instances_with(hub, "verge.io/component", component)
            .into_iter()
            .find(|i| i["status"]["phase"] == "Running")
    })
}

/// What one connection to `port` gets before the other side closes (None: refused or
/// nothing within 3 s).
fn answer(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.trim().to_string()).filter(|o| !o.is_empty())
}

#[test]
fn the_load_balancer_spreads_over_the_apps_instances_and_drops_a_killed_one() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let (manifest, ports) = example_on_free_ports("lb.yaml", &["18080", "18081", "18082"]);
    let lb_port = ports[0];
    let _edge = Edge::start_with(
        &hub.url,
        "berlin-1",
        Some(&hub.token(1)),
        &d.path().join("berlin-1"),
        &["--label", "city=berlin"],
    );
    hub.wait_phase("nodes", "berlin-1", "Ready", T);
    let out = hub.apply(&manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lb = running(&hub, "lb");
    let a = running(&hub, "a");
    running(&hub, "b");

    // Both backends get connections (the lb learns them from the cluster's
    // endpoints, which reach its node over the channel).
    let seen = wait_for("the lb to send to both backends", T, || {
        let got: Vec<String> = (0..10).filter_map(|_| answer(lb_port)).collect();
        (got.iter().any(|g| g == "a") && got.iter().any(|g| g == "b")).then_some(got)
    });
    assert!(seen.iter().all(|g| g == "a" || g == "b"), "{seen:?}");

    // Kill backend a: from then on every new connection is served (by b, until the
    // agent has restarted a a second later), and a leaves the pool: by the lb's own
    // checks or a refused connection ("down"), or by the endpoints once the agent
    // reports a not serving (a "backends:" line without it), whichever comes first.
    let lb_name = lb["metadata"]["name"].as_str().expect("name").to_string();
    let lb_log = || hub.ok(&["logs", &lb_name]);
    let lines_before_kill = lb_log().lines().count();
    let a_pid = a["status"]["pid"].as_u64().expect("pid") as u32;
    kill_pid(a_pid);
    let killed = Instant::now();
    // (A connection the kernel queued for it in the instant before it died dies with
    // it: count from when it is gone.)
    wait_for("backend a to be gone", T, || {
        (!pid_alive(u64::from(a_pid))).then_some(())
    });
    for n in 0..20 {
        let got = answer(lb_port);
        // The killed process is gone (above), so an "a" is its restarted successor:
        // what must never happen is a connection sent to the dead one and dropped.
        assert!(
            matches!(got.as_deref(), Some("a" | "b")),
            "connection {n} after the kill failed ({got:?}); the lb's log:\n{}",
            lb_log()
        );
    }
    let a_addr = format!("127.0.0.1:{}", ports[1]);
    let down = format!("backend {a_addr} down");
    wait_for("the lb to take the killed backend out", T, || {
        lb_log()
            .lines()
            .skip(lines_before_kill)
            .any(|l| {
                let listed = l
                    .strip_prefix("backends: [")
                    .and_then(|r| r.strip_suffix(']'));
                l == down || listed.is_some_and(|r| r.split(", ").all(|b| b != a_addr))
            })
            .then_some(())
    });
    eprintln!(
        "killed backend out of the pool after {:?}",
        killed.elapsed()
    );

    // The agent restarts a; the lb's checks bring it back.
    let back = format!("backend 127.0.0.1:{} up", ports[1]);
    wait_for("the restarted backend back in the pool", T, || {
        (lb_log().matches(&back).count() >= 2).then_some(())
    });
    wait_for("connections to reach a again", T, || {
        (0..6)
            .filter_map(|_| answer(lb_port))
            .any(|g| g == "a")
            .then_some(())
    });
}

/// `redis-cli -p PORT ARGS...`'s output, trimmed.
fn redis(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_template_runs_redis_per_cluster_and_its_data_outlives_restarts() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let (manifest, ports) = example_on_free_ports("redis.yaml", &["16379"]);
    let port = ports[0];
    let start_edge = || {
        Edge::start_with(
            &hub.url,
            "oslo-1",
            Some(&hub.token(1)),
            &d.path().join("oslo-1"),
            &["--label", "city=oslo"],
        )
    };
    let mut edge = start_edge();
    hub.wait_phase("nodes", "oslo-1", "Ready", T);
    let out = hub.apply(&manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = running(&hub, "redis");
    wait_for("redis to answer", T, || {
        (redis(port, &["ping"]) == "PONG").then_some(())
    });
    assert_eq!(redis(port, &["set", "greeting", "hej"]), "OK");
    assert_eq!(redis(port, &["incrby", "visits", "41"]), "41");

    // The server killed: the agent starts it again, with its data.
    kill_pid(server["status"]["pid"].as_u64().expect("pid") as u32);
    wait_for("redis back after a kill", T, || {
        (redis(port, &["get", "greeting"]) == "hej").then_some(())
    });
    assert_eq!(redis(port, &["incr", "visits"]), "42");

    // The agent killed and started again: it adopts or restarts the server, and the
    // data is there.
    edge.proc.kill();
    drop(edge);
    let _edge = start_edge();
    hub.wait_phase("nodes", "oslo-1", "Ready", T);
    wait_for("redis after the agent's restart", T, || {
        (redis(port, &["get", "visits"]) == "42").then_some(())
    });
    // Exactly the template's service runs in the cluster, and the cluster says so.
    let cluster = wait_for("the cluster to list its service", T, || {
        hub.get_json("clusters", "oslo")
            .filter(|c| c["status"]["services"]["redis"] == "Running")
    });
    assert_eq!(
        cluster["status"]["services"].as_object().map(|s| s.len()),
        Some(1)
    );
    assert_eq!(instances_with(&hub, "verge.io/cluster", "oslo").len(), 1);
}

/// Whether anything under `dir` is mounted.
fn mounted_under(dir: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    table
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&d)))
}

#[test]
fn a_local_disk_keeps_its_data_through_restarts_and_refuses_writes_past_its_size() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let dir = d.path().join("disk-1");
    let start_edge = || Edge::start_in(&hub.url, "disk-1", Some(&hub.token(1)), &dir);
    let mut edge = start_edge();
    hub.wait_phase("nodes", "disk-1", "Ready", T);
    let manifest = std::fs::read_to_string(format!(
        "{}/../../examples/platform/local-disk.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("example");
    // A volume the instance's disk request does not cover is refused, naming it.
    let bad = hub.apply(&manifest.replace("disk: 16Mi", "disk: 8Mi"));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("spec.resources.disk") && err.contains("16Mi"),
        "{err}"
    );

    let out = hub.apply(&manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs_show = |what: &str| {
        // (While the agent restarts its logs may not be reachable: try again.)
        wait_for(&format!("disk-demo's log to show {what:?}"), T, || {
            let out = hub.cli(&["logs", "disk-demo"]);
            String::from_utf8_lossy(&out.stdout)
                .contains(what)
                .then_some(())
        })
    };
    let pid = hub.running_pid("disk-demo") as u32;
    logs_show("starts: 1");
    // The quota holds: 64 MiB do not fit in 16.
    logs_show("No space left on device");
    // Killed: restarted by the agent, on the same disk.
    kill_pid(pid);
    logs_show("starts: 2");
    // The agent killed, then the workload while it is away: the next agent starts it
    // again, on the same disk.
    let pid = hub.running_pid("disk-demo") as u32;
    edge.proc.kill();
    drop(edge);
    kill_pid(pid);
    let _edge = start_edge();
    logs_show("starts: 3");
    // Deleted: its disk goes with it, unmounted first.
    assert!(
        mounted_under(&dir.join("instances")),
        "the volume is a mount"
    );
    hub.ok(&["delete", "instance", "disk-demo"]);
    wait_for("the volume unmounted and removed", T, || {
        (!mounted_under(&dir.join("instances")) && !dir.join("instances/disk-demo").exists())
            .then_some(())
    });
}
