//! The channel over a weak network: real hub and edge processes with the test kit's
//! fault-injecting proxy between them.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use verge_testkit::{FaultProxy, Faults};

const T: Duration = Duration::from_secs(30);

fn proxy(rt: &tokio::runtime::Runtime, hub: &Hub) -> FaultProxy {
    let upstream = format!("127.0.0.1:{}", hub.port).parse().expect("addr");
    rt.block_on(FaultProxy::start(upstream)).expect("proxy")
}

/// A hub, a fault proxy in front of it, and one edge that reaches the hub through it
/// (over TLS: the proxy carries no UDP).
fn behind_proxy(edge: &str) -> (tokio::runtime::Runtime, TestDir, Hub, FaultProxy, Edge) {
    behind(edge, false)
}

/// Like [`behind_proxy`], with the proxy carrying UDP too: the edge comes up over QUIC.
fn behind_udp_proxy(edge: &str) -> (tokio::runtime::Runtime, TestDir, Hub, FaultProxy, Edge) {
    behind(edge, true)
}

fn behind(edge: &str, udp: bool) -> (tokio::runtime::Runtime, TestDir, Hub, FaultProxy, Edge) {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let p = if udp {
        let upstream = format!("127.0.0.1:{}", hub.port).parse().expect("addr");
        rt.block_on(FaultProxy::start_with_udp(upstream))
            .expect("proxy")
    } else {
        proxy(&rt, &hub)
    };
    let e = Edge::start_with(
        &p.url(),
        edge,
        Some(&hub.token(1)),
        &d.path().join(edge),
        &[],
    );
    let node = hub.wait_phase("nodes", edge, "Ready", T);
    if udp {
        assert_eq!(node["status"]["transport"], "quic", "{node}");
    }
    (rt, d, hub, p, e)
}

#[test]
fn sync_converges_over_200ms_rtt_with_5_percent_loss() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let p = proxy(&rt, &hub);
    p.set(Faults {
        latency: Duration::from_millis(100),
        jitter: Duration::from_millis(20),
        loss: 0.05,
        ..Default::default()
    });
    let token = hub.token(1);
    let _edge = Edge::start_with(
        &p.url(),
        "far-1",
        Some(&token),
        &d.path().join("far-1"),
        &[],
    );
    hub.wait_phase("nodes", "far-1", "Ready", T);
    let markers: Vec<String> = (0..6).map(|i| unique(&format!("lossy{i}"))).collect();
    for (i, m) in markers.iter().enumerate() {
        assert!(hub.apply(&sleeper(&format!("w{i}"), m)).status.success());
    }
    for (i, m) in markers.iter().enumerate() {
        hub.wait_phase(
            "instances",
            &format!("w{i}"),
            "Running",
            Duration::from_secs(60),
        );
        assert_eq!(pids_with(m).len(), 1, "w{i} runs exactly once");
    }
    for i in 0..3 {
        hub.ok(&["delete", "instance", &format!("w{i}")]);
    }
    for m in &markers[..3] {
        wait_for(
            "deleted over the lossy link",
            Duration::from_secs(60),
            || pids_with(m).is_empty().then_some(()),
        );
    }
    for m in &markers[3..] {
        assert_eq!(pids_with(m).len(), 1);
    }
    let (up, down) = p.bytes();
    assert!(up > 0 && down > 0);
    for i in 3..6 {
        hub.ok(&["delete", "instance", &format!("w{i}")]);
    }
    for m in &markers[3..] {
        wait_for("cleanup", T, || pids_with(m).is_empty().then_some(()));
    }
}

#[test]
fn black_holing_one_endpoint_moves_the_edge_to_the_other_and_nothing_runs_twice() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let (p1, p2) = (proxy(&rt, &hub), proxy(&rt, &hub));
    let token = hub.token(1);
    let _edge = Edge::start_with(
        &p1.url(),
        "dual-1",
        Some(&token),
        &d.path().join("dual-1"),
        &["--hub", &p2.url()],
    );
    hub.wait_phase("nodes", "dual-1", "Ready", T);
    let (ma, mb) = (unique("fo-a"), unique("fo-b"));
    assert!(hub.apply(&sleeper("a", &ma)).status.success());
    let pid_a = hub.running_pid("a");
    assert_eq!(p2.connections(), 0, "the second endpoint is a standby");

    // Data centre 1 goes dark: no error, just silence.
    p1.blackhole(true);
    wait_for("failover to the second endpoint", T, || {
        (p2.connections() > 0).then_some(())
    });
    // Work issued after the switch arrives; work from before is not applied twice.
    assert!(hub.apply(&sleeper("b", &mb)).status.success());
    hub.running_pid("b");
    assert_eq!(pids_with(&mb).len(), 1);
    assert_eq!(pids_with(&ma), vec![pid_a as u32], "a kept running, once");
    hub.wait_phase("nodes", "dual-1", "Ready", T);
    hub.cleanup(&["a", "b"], &[&ma, &mb]);
}

#[test]
fn a_60s_partition_heals_with_every_operation_applied_exactly_once() {
    let (rt, _d, hub, p, _edge) = behind_proxy("cut-1");
    let (keep, change, gone) = (unique("keep"), unique("change"), unique("gone"));
    assert!(hub.apply(&sleeper("keep", &keep)).status.success());
    assert!(hub.apply(&sleeper("change", &change)).status.success());
    assert!(hub.apply(&sleeper("gone", &gone)).status.success());
    let pid_keep = hub.running_pid("keep");
    let pid_change = hub.running_pid("change");
    hub.running_pid("gone");

    // The schedule runs on the test's runtime.
    let _in_runtime = rt.enter();
    let _plan = p.schedule(vec![
        (
            Duration::ZERO,
            Faults {
                blackhole: true,
                ..Default::default()
            },
        ),
        (Duration::from_secs(60), Faults::default()),
    ]);
    std::thread::sleep(Duration::from_secs(1));
    // Operations issued while the edge is cut off.
    let (new1, new2) = (unique("new1"), unique("new2"));
    assert!(hub.apply(&sleeper("new-1", &new1)).status.success());
    assert!(hub.apply(&sleeper("new-2", &new2)).status.success());
    hub.ok(&["delete", "instance", "gone"]);
    let changed = sleeper("change", &change)
        .replace("  resources:", "  restartPolicy: OnFailure\n  resources:");
    assert!(hub.apply(&changed).status.success());
    // The edge is autonomous meanwhile: what it ran keeps running, unchanged.
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(pids_with(&keep), vec![pid_keep as u32]);
    assert_eq!(
        pids_with(&gone).len(),
        1,
        "the delete has not reached the edge yet"
    );
    assert!(pids_with(&new1).is_empty());

    // After the partition heals, everything converges, each change applied once.
    let heal = Duration::from_secs(90);
    wait_for("new-1 runs", heal, || {
        (pids_with(&new1).len() == 1).then_some(())
    });
    wait_for("new-2 runs", heal, || {
        (pids_with(&new2).len() == 1).then_some(())
    });
    wait_for("gone is stopped", heal, || {
        pids_with(&gone).is_empty().then_some(())
    });
    let v = wait_for("change restarted with the new spec", heal, || {
        hub.get_json("instances", "change")
            .filter(|v| v["status"]["observedGeneration"] == 2 && v["status"]["phase"] == "Running")
    });
    assert_ne!(v["status"]["pid"].as_u64(), Some(pid_change));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pids_with(&change).len(), 1, "restarted once, not twice");
    assert_eq!(
        pids_with(&keep),
        vec![pid_keep as u32],
        "untouched work was never restarted"
    );
    assert_eq!(pids_with(&new1).len(), 1);
    assert_eq!(pids_with(&new2).len(), 1);
    hub.cleanup(
        &["keep", "change", "new-1", "new-2"],
        &[&keep, &change, &new1, &new2],
    );
}

#[test]
fn cut_connections_are_re_established() {
    let (_rt, _d, hub, p, _edge) = behind_proxy("reset-1");
    let before = p.connections();
    p.reset_all();
    wait_for("reconnect", T, || (p.connections() > before).then_some(()));
    let m = unique("after-reset");
    assert!(hub.apply(&sleeper("after", &m)).status.success());
    hub.running_pid("after");
    hub.ok(&["delete", "instance", "after"]);
    wait_for("cleanup", T, || pids_with(&m).is_empty().then_some(()));
}

#[test]
fn node_certificates_are_renewed_before_they_expire() {
    let d = test_dir();
    let hub = Hub::start_with(d.path(), free_port(), &["--node-cert-ttl", "12s"]);
    let dir = d.path().join("renew-1");
    let mut edge = Edge::start_with(&hub.url, "renew-1", Some(&hub.token(1)), &dir, &[]);
    hub.wait_phase("nodes", "renew-1", "Ready", T);
    let cert = || std::fs::read_to_string(dir.join("identity/node.crt")).expect("cert");
    let first = cert();
    let enrolled = std::time::Instant::now();
    // Renewal is due at two thirds of the certificate's lifetime, counted from its
    // not-before (which the hub sets a little in the past, for clocks that lag): in
    // whole seconds, about 6 to 8 s after enrolment.
    let (not_before, not_after) =
        verge_tunnel::pki::cert_validity(&first).expect("the first certificate's validity");
    let due = not_before + (not_after - not_before) * 2 / 3;
    let renewed = wait_for("a renewed certificate", T, || {
        (cert() != first).then(verge_api::clock::now_secs)
    }) as i64;
    assert!(
        renewed >= due && renewed < not_after,
        "renewed at {renewed}, due at {due}, the first certificate ends at {not_after}"
    );
    // Past the first certificate's expiry, a fresh connection works with the new one.
    std::thread::sleep(Duration::from_secs(13).saturating_sub(enrolled.elapsed()));
    edge.proc.kill();
    let _edge = Edge::start_in(&hub.url, "renew-1", None, &dir);
    let before = hub.get_json("nodes", "renew-1").expect("node");
    hub.wait_phase("nodes", "renew-1", "Ready", T);
    let after = hub.get_json("nodes", "renew-1").expect("node");
    assert_eq!(
        before["metadata"]["uid"], after["metadata"]["uid"],
        "the same node, not a new one"
    );
}

#[test]
fn a_node_whose_certificate_expired_offline_rejoins_with_a_node_bound_token() {
    let d = test_dir();
    let port = free_port();
    let hub = Hub::start_with(d.path(), port, &["--node-cert-ttl", "3s"]);
    let dir = d.path().join("late-1");
    let mut edge = Edge::start_with(&hub.url, "late-1", Some(&hub.token(1)), &dir, &[]);
    hub.wait_phase("nodes", "late-1", "Ready", T);
    let uid = hub.get_json("nodes", "late-1").expect("node")["metadata"]["uid"].clone();
    let m = unique("late");
    assert!(hub.apply(&sleeper("late-work", &m)).status.success());
    let pid = hub.running_pid("late-work");
    // Offline past expiry.
    edge.proc.kill();
    std::thread::sleep(Duration::from_secs(4));
    let stuck = Edge::start_in(&hub.url, "late-1", None, &dir);
    let log = wait_for("guidance in the log", T, || {
        let l = stuck.proc.log_text();
        l.contains("verge token create --node late-1").then_some(l)
    });
    assert!(log.contains("workloads keep running"), "{log}");
    assert_eq!(pids_with(&m), vec![pid as u32], "the workload kept running");
    drop(stuck);
    // A token bound to another node does not let it in.
    let other = hub
        .ok(&["token", "create", "--node", "someone-else"])
        .trim()
        .to_string();
    let (status, log) = Edge::start_failing(&hub.url, "late-1", &other, &dir);
    assert!(!status.success());
    assert!(log.contains("bound to node 'someone-else'"), "{log}");
    // The documented way back: a re-enrolment token bound to this node. The hub
    // comes back with its usual certificate lifetime first: a 3 s certificate would
    // expire again if the rejoining edge's first connection were a few seconds late
    // (a loaded machine), and then it could not get in at all.
    drop(hub);
    let hub = Hub::start_on(d.path(), port);
    let token = hub
        .ok(&["token", "create", "--node", "late-1"])
        .trim()
        .to_string();
    let _edge = Edge::start_in(&hub.url, "late-1", Some(&token), &dir);
    hub.wait_phase("nodes", "late-1", "Ready", T);
    assert_eq!(
        hub.get_json("nodes", "late-1").expect("node")["metadata"]["uid"],
        uid
    );
    assert_eq!(pids_with(&m), vec![pid as u32], "re-adopted, not restarted");
    hub.ok(&["delete", "instance", "late-work"]);
    wait_for("cleanup", T, || pids_with(&m).is_empty().then_some(()));
}

#[test]
fn with_udp_blocked_the_edge_comes_up_over_tcp_on_its_own() {
    // The proxy carries TCP only: QUIC to its port meets silence, as behind a firewall
    // that drops UDP.
    let (_rt, _d, hub, _p, _edge) = behind_proxy("tcp-only");
    let node = hub.get_json("nodes", "tcp-only").expect("node");
    assert_eq!(node["status"]["transport"], "tls", "{node}");
    let m = unique("tcp");
    assert!(hub.apply(&sleeper("over-tcp", &m)).status.success());
    hub.running_pid("over-tcp");
    hub.cleanup(&["over-tcp"], &[&m]);
}

/// Read from `r` into `seen` in the background.
fn collect(mut r: impl std::io::Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                return;
            }
            s.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

#[test]
fn exec_and_port_forward_across_a_switch_from_quic_to_tcp() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let (_rt, _d, hub, p, _edge) = behind_udp_proxy("switcher");
    let m = unique("switch");
    assert!(hub.apply(&sleeper("switchy", &m)).status.success());
    hub.running_pid("switchy");

    // An interactive exec and a forwarded connection, both open over QUIC.
    let mut exec = Command::new(BIN)
        .arg("--config")
        .arg(hub.admin_conf())
        .args(["exec", "-i", "switchy", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    let out = collect(exec.stdout.take().expect("stdout"));
    let err = collect(exec.stderr.take().expect("stderr"));
    let mut stdin = exec.stdin.take().expect("stdin");
    stdin.write_all(b"over quic\n").expect("type");
    wait_for("the echo over QUIC", T, || {
        out.lock()
            .expect("lock")
            .contains("over quic")
            .then_some(())
    });
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_port = echo.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut pf = Command::new(BIN)
        .arg("--config")
        .arg(hub.admin_conf())
        .args(["port-forward", "switchy", &format!("0:{echo_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("port-forward");
    let pf_err = collect(pf.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(pf.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("ready line");
    let addr = line.split_whitespace().nth(1).expect("address").to_string();
    let ping = |s: &mut std::net::TcpStream, msg: &[u8]| -> Option<Vec<u8>> {
        s.write_all(msg).ok()?;
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).ok()?;
        Some(b)
    };
    let mut held = std::net::TcpStream::connect(&addr).expect("connect");
    held.set_read_timeout(Some(T)).expect("timeout");
    assert_eq!(ping(&mut held, b"before").as_deref(), Some(&b"before"[..]));

    // A firewall starts dropping UDP: the edge notices the silence, falls back to TCP.
    p.set(Faults {
        udp_blocked: true,
        ..Default::default()
    });
    wait_for("the edge to come back over TCP", T, || {
        hub.get_json("nodes", "switcher")
            .filter(|n| n["status"]["transport"] == "tls" && n["status"]["phase"] == "Ready")
    });

    // The exec session that lived on the old connection ends with a clear message.
    let status = wait_for("exec to end", T, || exec.try_wait().expect("wait"));
    assert!(!status.success());
    let said = err.lock().expect("lock").clone();
    assert!(
        said.contains("exec ended") && (said.contains("reconnected") || said.contains("lost")),
        "{said}"
    );
    // So does the forwarded connection that was open; the port-forward itself goes on.
    let mut b = [0u8; 1];
    assert!(
        matches!(held.read(&mut b), Ok(0) | Err(_)),
        "held connection closed"
    );
    wait_for("the port-forward to say why", T, || {
        pf_err.lock().expect("lock").contains("ended").then_some(())
    });
    // New connections and new exec sessions work over TCP.
    let mut fresh = std::net::TcpStream::connect(&addr).expect("connect");
    fresh.set_read_timeout(Some(T)).expect("timeout");
    assert_eq!(ping(&mut fresh, b"after").as_deref(), Some(&b"after"[..]));
    let out = hub.cli(&["exec", "switchy", "--", "echo", "over tcp"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over tcp\n");
    let _ = pf.kill();
    let _ = pf.wait();
    hub.cleanup(&["switchy"], &[&m]);
}

/// Over QUIC the hub does not answer heartbeats (protocol 7): QUIC's acknowledgement
/// of each is what the edge hears. An idle session then costs about one datagram
/// each way per heartbeat (answered, it cost two up and one down), stays up across
/// many heartbeats, and a hub that goes silent is still noticed.
#[test]
fn an_idle_quic_session_costs_a_datagram_each_way_per_heartbeat() {
    let (_rt, _d, hub, p, edge) = behind_udp_proxy("quiet");
    // Past the first heartbeat's facts and the first metrics round.
    std::thread::sleep(Duration::from_secs(2));
    let sessions = |log: &str| log.matches("connected to hub").count();
    assert_eq!(sessions(&edge.proc.log_text()), 1);
    let (up0, down0) = p.datagrams();
    // Twenty heartbeats (the test hub's interval is 500 ms), with a metrics round
    // (every 10 s) among them.
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let (up, down) = p.datagrams();
    let beats = (window.as_millis() / 500) as u64;
    let (up, down) = (up - up0, down - down0);
    assert!(
        up >= beats && up <= beats * 3 / 2,
        "{up} datagrams up for {beats} heartbeats"
    );
    assert!(
        down >= beats / 2 && down <= beats * 3 / 2,
        "{down} datagrams down for {beats} heartbeats"
    );
    assert_eq!(sessions(&edge.proc.log_text()), 1, "the session stayed up");
    hub.wait_phase("nodes", "quiet", "Ready", T);

    // Silence is still noticed: two heartbeats and a second.
    p.blackhole(true);
    wait_for(
        "the edge to notice the silence",
        Duration::from_secs(15),
        || edge.proc.log_text().contains("hub silent").then_some(()),
    );
}
