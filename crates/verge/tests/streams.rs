//! Operations through the channel, end to end with real processes: `verge exec` (with
//! and without a terminal, window resizing), `verge port-forward`, `verge logs` over a
//! data stream, and edge-to-edge relay with its policy.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn instance(name: &str, marker: &str, extra: &str) -> String {
    format!(
        "kind: Instance\nmetadata:\n  name: {name}\n  labels: {{app: shop}}\nspec:\n  form: process\n  process:\n    command: [\"/bin/sh\", \"-c\", \"echo started {marker}; while :; do sleep 1; done\"]\n    env: {{GREETING: hello}}\n  resources: {{cpu: 100m, memory: 16Mi}}\n  terminationGracePeriodSeconds: 2\n{extra}"
    )
}

fn one_edge(name: &str) -> (TestDir, Hub, Edge) {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let edge = Edge::start(&hub, name, Some(&hub.token(1)));
    (d, hub, edge)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_runs_a_command_in_the_instance_and_returns_its_exit_code() {
    let (_d, hub, _edge) = one_edge("exec-1");
    let m = unique("exec");
    assert!(hub.apply(&instance("shell", &m, "")).status.success());
    hub.wait_phase("instances", "shell", "Running", T);

    let out = hub.cli(&[
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        "echo $GREETING from $(pwd); echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("hello from /") && stdout.trim_end().ends_with("/shell/work"),
        "runs in the instance's environment and directory: {stdout}"
    );
    assert_eq!(text(&out.stderr).trim(), "oops", "stderr kept apart");

    let out = cli_with(
        &hub.admin_conf(),
        &["exec", "-i", "shell", "--", "tr", "a-z", "A-Z"],
        Some("shout\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "SHOUT\n",
        "stdin reaches the command, EOF ends it"
    );

    let out = hub.cli(&["exec", "shell", "--", "/no/such/program"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("could not start \"/no/such/program\""),
        "{}",
        text(&out.stderr)
    );
    let out = hub.cli(&["exec", "nothing-here", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing-here"),
        "{}",
        text(&out.stderr)
    );
    hub.cleanup(&["shell"], &[&m]);
}

/// A pseudo-terminal for the CLI, as an operator's terminal would be.
fn pty(cols: u16, rows: u16) -> (std::fs::File, std::fs::File) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use std::os::unix::ffi::OsStrExt;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))
        .expect("open slave");
    set_size(&master, cols, rows);
    (std::fs::File::from(master), slave)
}

fn set_size(fd: impl std::os::fd::AsFd, cols: u16, rows: u16) {
    rustix::termios::tcsetwinsize(
        fd,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .expect("set window size");
}

#[test]
fn exec_it_gives_an_interactive_terminal_that_follows_window_resizes() {
    let (_d, hub, _edge) = one_edge("tty-1");
    let m = unique("tty");
    assert!(hub.apply(&instance("term", &m, "")).status.success());
    hub.wait_phase("instances", "term", "Running", T);

    let (master, slave) = pty(100, 30);
    let mut cli = Command::new("setsid")
        .arg("--ctty")
        .arg(BIN)
        .arg("--config")
        .arg(hub.admin_conf())
        .args(["exec", "-it", "term", "--", "sh"])
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave)
        .spawn()
        .expect("spawn verge exec");
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    {
        let seen = seen.clone();
        let mut r = master.try_clone().expect("dup master");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    return;
                }
                seen.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
    }
    let mut w = master.try_clone().expect("dup master");
    let mut type_until = |input: &str, want: &str| {
        wait_for(&format!("{want:?} after typing {input:?}"), T, || {
            w.write_all(input.as_bytes()).expect("type");
            std::thread::sleep(Duration::from_millis(300));
            text(&seen.lock().expect("lock"))
                .contains(want)
                .then_some(())
        })
    };
    type_until("stty size\n", "30 100");
    type_until("tty\n", "/dev/pts/");
    // The operator resizes the window: the CLI gets SIGWINCH and tells the remote
    // terminal, whose size the shell then reports.
    set_size(&master, 120, 50);
    type_until("stty size\n", "50 120");
    w.write_all(b"exit 7\n").expect("type");
    let status = wait_for("exec to end", T, || cli.try_wait().expect("wait"));
    assert_eq!(
        status.code(),
        Some(7),
        "{}",
        text(&seen.lock().expect("lock"))
    );
    hub.cleanup(&["term"], &[&m]);
}

/// Start `verge port-forward` and return it with the local address it listens on.
fn port_forward(hub: &Hub, instance: &str, port: u16) -> (Proc, String) {
    let log = hub.dir.join(format!("pf-{}.log", unique("x")));
    let child = Command::new(BIN)
        .arg("--config")
        .arg(hub.admin_conf())
        .args(["port-forward", instance, &format!("0:{port}")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn port-forward");
    let mut proc = Proc { child, log };
    let mut line = String::new();
    let mut out = std::io::BufReader::new(proc.child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut out, &mut line).expect("ready line");
    let addr = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_string();
    (proc, addr)
}

#[test]
fn port_forward_reaches_a_port_on_the_instance_node_through_the_channel() {
    let (_d, hub, _edge) = one_edge("pf-1");
    let m = unique("pf");
    assert!(hub.apply(&instance("web", &m, "")).status.success());
    hub.wait_phase("instances", "web", "Running", T);
    let port = echo_server();
    let (mut pf, addr) = port_forward(&hub, "web", port);

    assert_eq!(
        round_trip(&addr, b"ping"),
        b"ping",
        "bytes and half-close travel"
    );
    // More than any window or buffer on the way: flow control, not buffering.
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    assert!(
        round_trip(&addr, &big) == big,
        "8 MiB arrive intact and in order"
    );
    // Several connections at once, each its own stream.
    let many: Vec<_> = (0..8)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let msg = format!("connection {i}").into_bytes();
                assert_eq!(round_trip(&addr, &msg), msg);
            })
        })
        .collect();
    for t in many {
        t.join().expect("parallel connection");
    }

    // Nothing listens there: the connection is closed and the CLI says why.
    let closed = free_port();
    let (mut pf2, addr2) = port_forward(&hub, "web", closed);
    assert!(round_trip(&addr2, b"x").is_empty());
    let said = wait_for("the port-forward to end that connection", T, || {
        Some(pf2.log_text()).filter(|l| l.contains("ended"))
    });
    assert!(said.contains("Connection refused"), "{said}");
    pf.kill();
    pf2.kill();
    hub.cleanup(&["web"], &[&m]);
}

#[test]
fn logs_travel_on_their_own_stream() {
    let (_d, hub, _edge) = one_edge("logs-1");
    let m = unique("logs");
    assert!(hub.apply(&instance("talker", &m, "")).status.success());
    hub.wait_phase("instances", "talker", "Running", T);
    wait_for("the log line", T, || {
        hub.ok(&["logs", "talker"]).contains(&m).then_some(())
    });
    let out = hub.cli(&["logs", "nobody"]);
    assert!(!out.status.success());
    hub.cleanup(&["talker"], &[&m]);
}

#[test]
fn an_instance_reaches_a_declared_port_on_another_edge_only_where_policy_allows() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let token = hub.token(2);
    let _a = Edge::start_with(
        &hub.url,
        "site-a",
        Some(&token),
        &d.path().join("site-a"),
        &["--label", "site=a"],
    );
    let _b = Edge::start_with(
        &hub.url,
        "site-b",
        Some(&token),
        &d.path().join("site-b"),
        &["--label", "site=b"],
    );
    let port = echo_server();
    let (allowed, refused) = (free_port(), free_port());
    let m = unique("relay");
    let pin = |site: &str| format!("  placement: {{nodeSelector: {{site: {site}}}}}\n");
    let svc = instance(
        "svc",
        &m,
        &format!("{}  ports: [{{name: echo, port: {port}}}]\n", pin("b")),
    );
    let client = instance(
        "client",
        &m,
        &format!(
            "{}  links: [{{instance: svc, port: {port}, localPort: {allowed}}}]\n",
            pin("a")
        ),
    );
    let intruder = instance(
        "intruder",
        &m,
        &format!(
            "{}  links: [{{instance: svc, port: {port}, localPort: {refused}}}]\n",
            pin("a")
        ),
    )
    .replace("app: shop", "app: other");
    for manifest in [&svc, &client, &intruder] {
        let out = hub.apply(manifest);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for (name, node) in [
        ("svc", "site-b"),
        ("client", "site-a"),
        ("intruder", "site-a"),
    ] {
        let i = hub.wait_phase("instances", name, "Running", T);
        assert_eq!(i["status"]["node"], node);
    }

    // Same application: site-a's instance reaches site-b's port through the hub.
    let addr = format!("127.0.0.1:{allowed}");
    wait_for("the link to relay", T, || {
        TcpStream::connect(&addr).ok()?;
        (round_trip(&addr, b"across sites") == b"across sites").then_some(())
    });
    // Another application: refused, logged, and the connection closed.
    let addr = format!("127.0.0.1:{refused}");
    wait_for("the refused link to listen", T, || {
        TcpStream::connect(&addr).ok()
    });
    assert!(round_trip(&addr, b"let me in").is_empty());
    wait_for("the refusal in the hub log", T, || {
        let log = hub.proc.log_text();
        (log.contains("relay refused") && log.contains("not of the same application")).then_some(())
    });
    hub.cleanup(&["svc", "client", "intruder"], &[&m]);
}

#[test]
fn an_edge_speaking_protocol_1_keeps_working_against_this_hub() {
    use verge_api::channel::{ALPN_CHANNEL, EdgeToHub, HubToEdge, RequestBody, ResponseBody};
    use verge_tunnel::frame::{read_msg, write_msg};
    // Enrol with the real agent (for an identity), then stop it and speak protocol 1
    // with that identity, as an agent of the previous release would.
    let (d, hub, mut edge) = one_edge("old-1");
    hub.wait_phase("nodes", "old-1", "Ready", T);
    edge.proc.kill();
    let id = verge_edge::files::Identity::load(&d.path().join("old-1"), "old-1")
        .expect("load")
        .expect("identity");
    let m = unique("old");
    assert!(hub.apply(&instance("legacy", &m, "")).status.success());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    verge_tunnel::install_crypto_provider();
    let addr = format!("127.0.0.1:{}", hub.port);
    let old_edge = rt.spawn(async move {
        let cfg = verge_tunnel::tls::client_config(
            &id.ca_pem,
            Some((&*id.cert_pem, &*id.key_pem)),
            &[ALPN_CHANNEL],
        )
        .expect("config");
        let s = verge_tunnel::tls::dial(&addr, cfg).await.expect("dial");
        let (mut r, mut w) = tokio::io::split(s);
        write_msg(&mut w, &hello(1, "0.0.9")).await.expect("hello");
        let mut beat = tokio::time::interval(Duration::from_millis(400));
        loop {
            tokio::select! {
                msg = read_msg::<HubToEdge, _>(&mut r) => match msg.expect("read").expect("open") {
                    HubToEdge::OpenStream { .. } => panic!("a protocol 1 edge was asked for a data stream"),
                    HubToEdge::Request { id, body: RequestBody::Logs { instance, .. } } => {
                        let body = ResponseBody::Logs { data: format!("old agent log of {instance}\n") };
                        write_msg(&mut w, &EdgeToHub::Response { id, body }).await.expect("answer");
                    }
                    _ => {}
                },
                _ = beat.tick() => {
                    write_msg(&mut w, &EdgeToHub::Heartbeat { status: None }).await.expect("beat");
                }
            }
        }
    });
    wait_for("the old agent's heartbeat", T, || {
        hub.get_json("nodes", "old-1")
            .filter(|n| n["status"]["protocolVersion"] == 1 && n["status"]["phase"] == "Ready")
    });
    wait_for("the instance to be bound", T, || {
        hub.get_json("instances", "legacy")
            .filter(|i| i["status"]["node"] == "old-1")
    });
    // Logs still work (on the control stream, as protocol 1 had them).
    assert_eq!(hub.ok(&["logs", "legacy"]), "old agent log of legacy\n");
    // What needs protocol 2 says so, and what to do.
    let out = hub.cli(&["exec", "legacy", "--", "true"]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("speaks channel protocol 1") && said.contains("upgrade the agent"),
        "{said}"
    );
    old_edge.abort();
    let _ = hub.cli(&["delete", "instance", "legacy"]);
}
