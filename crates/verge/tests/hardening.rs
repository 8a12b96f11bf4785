//! Regression tests for the hardening issue: the hub and the agent tried as an attacker
//! and a fault injector would try them. Each test is named after what broke.

// Tests outside async code wait with std's sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_api::channel::{
    ALPN_CHANNEL, ALPN_ENROLL, EdgeToHub, HubToEdge, PROTOCOL_VERSION, StreamHello,
};
use verge_testkit::frontdoor::{open_silent, oversized_frame, rss_kib, split_closed};
use verge_tunnel::frame::{read_msg, write_msg};

fn hub_addr(hub: &Hub) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], hub.port))
}

/// A TLS client config trusting `hub`'s CA, presenting `identity`'s node certificate
/// (an edge data dir) when given.
fn tls(hub: &Hub, identity: Option<&Path>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    verge_tunnel::install_crypto_provider();
    let ca = std::fs::read_to_string(hub.dir.join("hub").join("ca.crt")).expect("ca");
    let id = identity.map(|dir| {
        (
            std::fs::read_to_string(dir.join("identity/node.crt")).expect("crt"),
            std::fs::read_to_string(dir.join("identity/node.key")).expect("key"),
        )
    });
    verge_tunnel::tls::client_config(
        &ca,
        id.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        &[alpn],
    )
    .expect("tls config")
}

fn admin_token(hub: &Hub) -> String {
    verge_hub::ClientConfig::load(&hub.admin_conf())
        .expect("admin.conf")
        .token
}

#[test]
fn an_unauthenticated_peer_cannot_make_the_hub_buffer_a_16_mib_frame() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let token = hub.token(1);
    let fingerprint = verge_tunnel::pki::JoinToken::parse(&token)
        .expect("token")
        .ca_fingerprint;
    let rt = runtime();
    let before = rss_kib(hub.proc.pid());
    let replies = rt.block_on(async {
        let cfg =
            verge_tunnel::tls::pinned_client_config(&fingerprint, &[ALPN_ENROLL]).expect("pinned");
        let mut conns = Vec::new();
        for _ in 0..100 {
            let mut s = verge_tunnel::tls::dial(&format!("127.0.0.1:{}", hub.port), cfg.clone())
                .await
                .expect("dial");
            // A length prefix just under 16 MiB, then some of the body.
            let _ = s.write_all(&oversized_frame()).await;
            conns.push(s);
        }
        let mut replies = Vec::new();
        for mut s in conns {
            let r = tokio::time::timeout(Duration::from_secs(5), read_msg::<HubToEdge, _>(&mut s))
                .await;
            replies.push(format!("{r:?}"));
        }
        replies
    });
    let after = rss_kib(hub.proc.pid());
    for r in &replies {
        assert!(
            r.contains("before a peer is known"),
            "the hub must refuse the frame at once, saying why: {r}"
        );
    }
    assert!(
        after < before + 64 * 1024,
        "hub RSS grew from {before} KiB to {after} KiB"
    );
}

/// 1,140 silent connections from 19 source addresses, against a hub limited to 1,024
/// descriptors: the strangers' pool turns most away at once, and the operator and an
/// edge still get in.
#[test]
fn silent_connections_under_a_1024_descriptor_limit_do_not_lock_out_the_api_or_edges() {
    let dir = test_dir();
    let port = free_port();
    let hub = Hub::start_under(
        &["prlimit", "--nofile=1024:1024", "--"],
        dir.path(),
        port,
        &[],
    );
    let rt = runtime();
    let (held, refused) = rt.block_on(async {
        let conns = open_silent(hub_addr(&hub), 1140, 19).await;
        let (refused, held) = split_closed(conns, Duration::from_millis(20)).await;
        (held, refused)
    });
    // Before the limits the hub closed none of them (it ran out of descriptors and
    // left them in the listen queue); now most are turned away or evicted at once.
    assert!(
        refused >= 500,
        "most strangers must be turned away at once: {refused} refused, {} held",
        held.len()
    );
    // While the rest are held: the API answers and an edge enrols.
    let out = hub.cli(&["get", "nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = Edge::start(&hub, "crowded", Some(&hub.token(1)));
    hub.wait_phase("node", "crowded", "Ready", Duration::from_secs(30));
    drop(edge);
    drop(held);
    let metrics = hub.cli(&["get", "nodes"]);
    assert!(metrics.status.success());
}

#[test]
fn a_slow_request_head_and_idle_connections_are_closed() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let rt = runtime();
    let addr = format!("127.0.0.1:{}", hub.port);
    let cfg = tls(&hub, None, b"http/1.1");
    rt.block_on(async {
        // One header line every 2 s: the whole head must arrive within 10 s.
        let slow = {
            let cfg = cfg.clone();
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut s = verge_tunnel::tls::dial(&addr, cfg).await.expect("dial");
                let began = Instant::now();
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n").await;
                for i in 0..15 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if s.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let mut b = [0u8; 256];
                    if let Ok(r) =
                        tokio::time::timeout(Duration::from_millis(10), s.read(&mut b)).await
                    {
                        // The hub answered (408) or closed: either ends it.
                        let _ = r;
                        break;
                    }
                }
                began.elapsed()
            })
        };
        // A connection that completes its handshake and says nothing.
        let idle = {
            let cfg = cfg.clone();
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut s = verge_tunnel::tls::dial(&addr, cfg).await.expect("dial");
                let began = Instant::now();
                let mut b = [0u8; 256];
                let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
                (began.elapsed(), r.is_ok())
            })
        };
        // A keep-alive connection idle after one request.
        let kept = {
            let cfg = cfg.clone();
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut s = verge_tunnel::tls::dial(&addr, cfg).await.expect("dial");
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
                    .await
                    .expect("request");
                let mut b = [0u8; 1024];
                let n = s.read(&mut b).await.expect("response");
                assert!(String::from_utf8_lossy(&b[..n]).contains("200"));
                let began = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => continue,
                        }
                    }
                })
                .await;
                (began.elapsed(), r.is_ok())
            })
        };
        let slow = slow.await.expect("slow");
        assert!(
            slow < Duration::from_secs(16),
            "a dripping head was held for {slow:?}"
        );
        let (idle, closed) = idle.await.expect("idle");
        assert!(closed, "an idle connection was never closed");
        assert!(
            idle < Duration::from_secs(16),
            "an idle connection was held for {idle:?}"
        );
        let (kept, closed) = kept.await.expect("kept");
        assert!(closed, "an idle keep-alive connection was never closed");
        assert!(
            kept < Duration::from_secs(16),
            "an idle keep-alive connection was held for {kept:?}"
        );
    });
}

#[test]
fn watches_that_never_read_are_capped_per_principal_and_ended() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let token = admin_token(&hub);
    let rt = runtime();
    let cfg = tls(&hub, None, b"http/1.1");
    let addr = format!("127.0.0.1:{}", hub.port);
    // History for the watches to replay: 40 writes of ~200 KB.
    let blob = "x".repeat(200_000);
    for i in 0..40 {
        let m = format!(
            "kind: Instance\nmetadata:\n  name: big-{i}\n  annotations: {{blob: {blob}}}\nspec:\n  form: process\n  process: {{command: [sleep, '1']}}\n  resources: {{memory: 100Ti}}\n"
        );
        let out = hub.apply(&m);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let before = rss_kib(hub.proc.pid());
    let statuses = rt.block_on(async {
        let mut held = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..33 {
            let mut s = verge_tunnel::tls::dial(&addr, cfg.clone()).await.expect("dial");
            s.write_all(
                format!("GET /v1/instances?watch=true&revision=1 HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
            )
            .await
            .expect("request");
            let mut b = [0u8; 12];
            s.read_exact(&mut b).await.expect("status line");
            statuses.push(String::from_utf8_lossy(&b).to_string());
            held.push(s);
        }
        // The refusal says when to try again, for machines: Retry-After and the
        // body's retryAfterMs.
        let mut rest = vec![0u8; 2048];
        let refused = held.last_mut().expect("33 watches");
        let mut n = 0;
        while !String::from_utf8_lossy(&rest[..n]).contains('}') {
            n += tokio::time::timeout(Duration::from_secs(5), refused.read(&mut rest[n..]))
                .await
                .expect("the refusal")
                .expect("read");
        }
        let head = String::from_utf8_lossy(&rest[..n]).to_lowercase();
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(head.contains("\"retryafterms\":1000"), "{head}");
        // Never read another byte; the hub must give up on them.
        tokio::time::sleep(Duration::from_secs(25)).await;
        drop(held);
        statuses
    });
    let after = rss_kib(hub.proc.pid());
    assert!(
        statuses[..32].iter().all(|s| s.contains("200")),
        "{statuses:?}"
    );
    assert!(
        statuses[32].contains("503"),
        "the 33rd watch of one principal must be refused: {}",
        statuses[32]
    );
    assert!(
        after < before + 256 * 1024,
        "hub RSS grew from {before} KiB to {after} KiB with 32 stalled watches"
    );
    let dropped = hub.metric("verge_hub_watches_dropped_total");
    assert!(dropped >= 1, "stalled watches are ended: {dropped} dropped");
}

/// Copy an edge's identity aside (what a thief or a decommissioned disk keeps).
fn copy_identity(edge_dir: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("identity")).expect("dir");
    for f in ["node.crt", "node.key", "ca.crt"] {
        std::fs::copy(
            edge_dir.join("identity").join(f),
            to.join("identity").join(f),
        )
        .expect("copy");
    }
}

/// A raw channel session with the identity in `dir` that has said hello (speaking
/// `protocol`).
async fn raw_session(
    hub: &Hub,
    dir: &Path,
    agent: &str,
    protocol: u32,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = tls(hub, Some(dir), ALPN_CHANNEL);
    let mut s = verge_tunnel::tls::dial(&format!("127.0.0.1:{}", hub.port), cfg)
        .await
        .expect("dial");
    let _ = write_msg(&mut s, &hello(protocol, agent)).await;
    s
}

/// What the hub says to a channel session opened with the identity in `dir`.
fn channel_answer(rt: &tokio::runtime::Runtime, hub: &Hub, dir: &Path) -> String {
    rt.block_on(async {
        let mut s = raw_session(hub, dir, "test", PROTOCOL_VERSION).await;
        let r =
            tokio::time::timeout(Duration::from_secs(5), read_msg::<HubToEdge, _>(&mut s)).await;
        format!("{r:?}")
    })
}

/// What a QUIC connection with the identity in `dir` hears: the channel's answer,
/// and what a data stream opened beside it (before the channel's hello) was sent.
fn quic_answers(rt: &tokio::runtime::Runtime, hub: &Hub, dir: &Path) -> (String, Vec<u8>) {
    rt.block_on(async {
        let endpoint = verge_tunnel::quic::client().expect("endpoint");
        let (conn, mut channel) = verge_tunnel::quic::dial(
            &endpoint,
            &format!("127.0.0.1:{}", hub.port),
            tls(hub, Some(dir), ALPN_CHANNEL),
            Duration::from_secs(5),
        )
        .await
        .expect("dial");
        let (mut send, mut recv) = conn.open_bi().await.expect("data stream");
        write_msg(&mut send, &StreamHello::Metrics { ack_every: 1 })
            .await
            .expect("stream hello");
        write_msg(&mut channel, &hello(PROTOCOL_VERSION, "test"))
            .await
            .expect("hello");
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            read_msg::<HubToEdge, _>(&mut channel),
        )
        .await;
        let mut sent = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            AsyncReadExt::read_to_end(&mut recv, &mut sent),
        )
        .await;
        (format!("{answer:?}"), sent)
    })
}

fn rest_status(rt: &tokio::runtime::Runtime, hub: &Hub, dir: &Path) -> u16 {
    rt.block_on(async {
        api_client(hub, Some(dir))
            .get(format!("{}/v1/instances", hub.url))
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    })
}

#[test]
fn a_deleted_or_re_enrolled_nodes_old_certificates_are_refused_everywhere() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let rt = runtime();
    let first = dir.path().join("first");
    let mut edge = Edge::start_in(&hub.url, "edge-c", Some(&hub.token(1)), &first);
    hub.wait_phase("node", "edge-c", "Ready", Duration::from_secs(20));
    let stolen = dir.path().join("stolen");
    copy_identity(&first, &stolen);
    assert_eq!(
        rest_status(&rt, &hub, &stolen),
        200,
        "a valid certificate works"
    );

    // Deleted: the live session ends at once and the agent stops.
    hub.ok(&["delete", "node", "edge-c"]);
    let until = Instant::now() + Duration::from_secs(15);
    while edge.proc.exited().is_none() {
        assert!(
            Instant::now() < until,
            "the deleted node's agent did not exit:\n{}\nhub:\n{}",
            edge.proc.log_text(),
            hub.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        edge.proc.log_text().contains("deleted"),
        "{}",
        edge.proc.log_text()
    );
    assert_eq!(rest_status(&rt, &hub, &stolen), 401);
    assert!(channel_answer(&rt, &hub, &stolen).contains("nodeDeleted"));

    // Enrolled again under the same name: the old certificate stays refused.
    let second = dir.path().join("second");
    let _edge2 = Edge::start_in(&hub.url, "edge-c", Some(&hub.token(1)), &second);
    hub.wait_phase("node", "edge-c", "Ready", Duration::from_secs(20));
    assert_eq!(rest_status(&rt, &hub, &second), 200);
    assert_eq!(rest_status(&rt, &hub, &stolen), 401);
    let answer = channel_answer(&rt, &hub, &stolen);
    assert!(answer.contains("revoked"), "{answer}");
    // Over QUIC, a data stream rides on its channel's check: the channel is refused,
    // and the stream beside it is never served.
    let (answer, sent) = quic_answers(&rt, &hub, &stolen);
    assert!(answer.contains("revoked"), "{answer}");
    assert!(
        sent.is_empty(),
        "a data stream of a revoked certificate was answered: {:?}",
        String::from_utf8_lossy(&sent)
    );

    // Re-enrolled with a node-bound token: the certificate before it is refused too.
    let before_rebind = dir.path().join("before-rebind");
    copy_identity(&second, &before_rebind);
    let bound = hub
        .ok(&["token", "create", "--node", "edge-c"])
        .trim()
        .to_string();
    drop(_edge2);
    let third = dir.path().join("third");
    let _edge3 = Edge::start_in(&hub.url, "edge-c", Some(&bound), &third);
    wait_for("the re-enrolled edge", Duration::from_secs(20), || {
        (third.join("identity/node.crt").exists() && rest_status(&rt, &hub, &third) == 200)
            .then_some(())
    });
    assert_eq!(rest_status(&rt, &hub, &before_rebind), 401);
    assert!(channel_answer(&rt, &hub, &before_rebind).contains("revoked"));
}

#[test]
fn a_second_session_with_a_nodes_identity_does_not_strand_its_streams() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let rt = runtime();
    let edge = Edge::start(&hub, "edge-b", Some(&hub.token(1)));
    hub.wait_phase("node", "edge-b", "Ready", Duration::from_secs(20));
    let marker = unique("second-session");
    let out = hub.apply(&sleeper("talker", &marker));
    assert!(out.status.success());
    hub.wait_phase("instance", "talker", "Running", Duration::from_secs(20));
    // A 2-second session with the same certificate.
    let copy = dir.path().join("copy");
    copy_identity(&edge.dir, &copy);
    rt.block_on(async {
        let _session = raw_session(&hub, &copy, "impostor", PROTOCOL_VERSION).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    // The real edge's streams work again (it was closed and reconnected).
    wait_for(
        "logs through the real edge",
        Duration::from_secs(20),
        || {
            let out = hub.cli(&["logs", "talker"]);
            (out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&marker))
                .then_some(())
        },
    );
    assert!(
        hub.proc.log_text().contains("replaced its older one"),
        "the takeover is logged"
    );
    hub.cleanup(&["talker"], &[&marker]);
}

#[test]
fn an_edge_ahead_of_a_hub_restored_from_a_backup_resyncs() {
    let dir = test_dir();
    let port = free_port();
    let mut hub = Hub::start_on(dir.path(), port);
    let edge_dir = dir.path().join("edge-r");
    let _edge = Edge::start_in(&hub.url, "edge-r", Some(&hub.token(1)), &edge_dir);
    hub.wait_phase("node", "edge-r", "Ready", Duration::from_secs(20));
    let (ma, mb, md) = (unique("keep"), unique("lost"), unique("after"));
    assert!(hub.apply(&sleeper("keep", &ma)).status.success());
    hub.wait_phase("instance", "keep", "Running", Duration::from_secs(20));
    // Back up the store with the hub stopped.
    hub.proc.term();
    let data = dir.path().join("hub");
    let backup = dir.path().join("backup");
    std::fs::create_dir_all(&backup).expect("backup dir");
    for f in ["store.db", "store.db-wal", "store.db-shm"] {
        let _ = std::fs::copy(data.join(f), backup.join(f));
    }
    // Life goes on: more history, which the edge applies.
    hub = Hub::start_on(dir.path(), port);
    hub.wait_phase("node", "edge-r", "Ready", Duration::from_secs(20));
    assert!(hub.apply(&sleeper("lost", &mb)).status.success());
    hub.wait_phase("instance", "lost", "Running", Duration::from_secs(20));
    for i in 0..10 {
        let m = format!(
            "kind: Instance\nmetadata: {{name: churn-{i}}}\nspec: {{form: process, process: {{command: [sleep, '1']}}, resources: {{memory: 100Ti}}}}\n"
        );
        assert!(hub.apply(&m).status.success());
        hub.ok(&["delete", "instance", &format!("churn-{i}")]);
    }
    hub.proc.term();
    // Restore the backup: the hub is now behind the edge.
    for f in ["store.db", "store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
        let _ = std::fs::copy(backup.join(f), data.join(f));
    }
    hub = Hub::start_on(dir.path(), port);
    hub.wait_phase("node", "edge-r", "Ready", Duration::from_secs(30));
    assert!(hub.apply(&sleeper("after", &md)).status.success());
    hub.wait_phase("instance", "after", "Running", Duration::from_secs(30));
    // What the restored hub does not know of is gone from the node.
    wait_for(
        "the unknown instance to stop",
        Duration::from_secs(20),
        || pids_with(&mb).is_empty().then_some(()),
    );
    assert!(
        !pids_with(&ma).is_empty(),
        "what the hub knows keeps running"
    );
    hub.cleanup(&["keep", "after"], &[&ma, &md]);
}

#[test]
fn a_healthy_node_stays_ready_across_five_grace_periods() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let _edge = Edge::start(&hub, "steady", Some(&hub.token(1)));
    hub.wait_phase("node", "steady", "Ready", Duration::from_secs(20));
    // Grace is 3 s, heartbeats every 500 ms, facts once a minute: watch 15 s.
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let n = hub.get_json("node", "steady").expect("node");
        assert_eq!(n["status"]["phase"], "Ready", "{}", n["status"]);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        !hub.proc.log_text().contains("node is NotReady"),
        "{}",
        hub.proc.log_text()
    );
}

#[test]
fn a_desired_state_larger_than_one_frame_syncs_in_parts() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let edge_dir = dir.path().join("edge-big");
    let mut edge = Edge::start_in(&hub.url, "edge-big", Some(&hub.token(1)), &edge_dir);
    hub.wait_phase("node", "edge-big", "Ready", Duration::from_secs(20));
    // 24 instances of ~840 KB each: 20 MB of desired state, more than a 16 MiB frame.
    let value = "v".repeat(120_000);
    let names: Vec<String> = (0..24).map(|i| format!("heavy-{i}")).collect();
    for n in &names {
        let env: String = (0..7).map(|k| format!("      E{k}: {value}\n")).collect();
        let m = format!(
            "kind: Instance\nmetadata: {{name: {n}}}\nspec:\n  form: process\n  process:\n    command: [sleep, '3600']\n    env:\n{env}  resources: {{cpu: 10m, memory: 4Mi}}\n  terminationGracePeriodSeconds: 1\n"
        );
        let out = hub.apply(&m);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in &names {
        hub.wait_phase("instance", n, "Running", Duration::from_secs(60));
    }
    // Lose the cache: the next session needs the whole state as a snapshot.
    edge.proc.kill();
    std::fs::remove_file(edge_dir.join("state/desired.json")).expect("cache");
    let _edge = Edge::start_in(&hub.url, "edge-big", None, &edge_dir);
    wait_for(
        "the snapshot to arrive whole",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(edge_dir.join("state/desired.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (v["instances"].as_object()?.len() == names.len()).then_some(())
        },
    );
    hub.wait_phase("node", "edge-big", "Ready", Duration::from_secs(10));
    // An older agent (protocol 2) takes a snapshot in one message, which cannot carry
    // this: it stays connected, and the node says why it is not Ready.
    drop(_edge);
    let rt = runtime();
    rt.block_on(async {
        let mut s = raw_session(&hub, &edge_dir, "0.0.9", 2).await;
        for _ in 0..8 {
            let _ = write_msg(&mut s, &EdgeToHub::Heartbeat { status: None }).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let node = hub.get_json("node", "edge-big").expect("node");
    assert_eq!(node["status"]["phase"], "NotReady", "{}", node["status"]);
    let msg = node["status"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("upgrade its agent"), "{msg}");
    // An object that cannot fit is refused at the door, naming the limit.
    let huge_env: String = (0..10).map(|k| format!("      E{k}: {value}\n")).collect();
    let m = format!(
        "kind: Instance\nmetadata: {{name: too-big}}\nspec:\n  form: process\n  process:\n    command: [sleep, '1']\n    env:\n{huge_env}"
    );
    let out = hub.apply(&m);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 1 MiB"), "{err}");
    for n in &names {
        let _ = hub.cli(&["delete", "instance", n]);
    }
}

#[test]
fn workloads_see_only_their_own_environment_and_not_the_agents_identity() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let _edge = Edge::start(&hub, "edge-w", Some(&hub.token(1)));
    hub.wait_phase("node", "edge-w", "Ready", Duration::from_secs(20));
    let marker = unique("curious");
    let script = format!(
        "echo {marker}; id -u; env; cat ../../../identity/node.key && echo LEAKED-KEY; ls ../../.. && echo LISTED; while :; do sleep 1; done"
    );
    let m = format!(
        "kind: Instance\nmetadata: {{name: curious}}\nspec:\n  form: process\n  process:\n    command: [/bin/sh, -c, '{script}']\n    env: {{MINE: mine}}\n  terminationGracePeriodSeconds: 1\n"
    );
    assert!(hub.apply(&m).status.success());
    hub.wait_phase("instance", "curious", "Running", Duration::from_secs(20));
    let log = wait_for("its output", Duration::from_secs(10), || {
        let out = hub.cli(&["logs", "curious"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("MINE=mine").then_some(text)
    });
    assert!(
        log.contains("\n65534\n"),
        "runs as nobody by default:\n{log}"
    );
    for leak in [
        "RUST_LOG",
        "VERGE_JOIN_TOKEN",
        "LEAKED-KEY",
        "LISTED",
        "BEGIN",
    ] {
        assert!(!log.contains(leak), "the workload saw {leak}:\n{log}");
    }
    // Files the agent keeps are its own.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("edge-w/identity")), 0o700);
    assert_eq!(
        mode(&dir.path().join("edge-w/instances/curious/output.log")),
        0o640
    );
    hub.cleanup(&["curious"], &[&marker]);
}

#[test]
fn the_hubs_secrets_on_disk_are_private_and_tokens_need_not_be_on_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let data = dir.path().join("hub");
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in [
        "store.db",
        "store.db-wal",
        "ca.key",
        "admin.conf",
        "join-token",
    ] {
        if data.join(f).exists() {
            assert_eq!(mode(&data.join(f)), 0o600, "{f}");
        }
    }
    // An edge takes its token from a file.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, hub.token(1)).expect("token");
    let edge_dir = dir.path().join("from-file");
    let _edge = Edge::start_with(
        &hub.url,
        "from-file",
        None,
        &edge_dir,
        &["--join-token-file", token_file.to_str().expect("utf8")],
    );
    hub.wait_phase("node", "from-file", "Ready", Duration::from_secs(20));
}

#[test]
fn smaller_holes_are_closed() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    // A lifetime that would wrap around is refused, naming the field.
    let out = hub.cli(&["token", "create", "--ttl", "18446744073709551615s"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("ttlSeconds"), "{err}");
    // Label values may not contain '/', as the message says.
    let out = hub.apply(
        "kind: Instance\nmetadata: {name: slashed, labels: {app: a/b}}\nspec: {form: process, process: {command: [sleep, '1']}}\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("label values"));
    // A NUL in a command is refused by the hub (sent as JSON, past the CLI's checks).
    let status = put_instance(
        &hub,
        "nul",
        serde_json::json!({"apiVersion": "verge.io/v1", "kind": "Instance", "metadata": {"name": "nul"},
            "spec": {"form": "process", "process": {"command": ["sleep", "1\u{0}"]}}}),
    );
    assert_eq!(status.0, 400, "{}", status.1);
    assert!(status.1.contains("spec.process.command[1]"), "{}", status.1);
    // An agent with a damaged identity says so and never claims to be ready.
    let edge_dir = dir.path().join("damaged");
    std::fs::create_dir_all(edge_dir.join("identity")).expect("dir");
    for f in ["node.crt", "node.key", "ca.crt"] {
        std::fs::write(edge_dir.join("identity").join(f), "garbage").expect("write");
    }
    let out = std::process::Command::new(BIN)
        .args(["edge", "--hub", &hub.url, "--name", "damaged", "--data-dir"])
        .arg(&edge_dir)
        .output()
        .expect("edge");
    assert!(!out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("edge ready"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn put_instance(hub: &Hub, name: &str, body: serde_json::Value) -> (u16, String) {
    let token = admin_token(hub);
    runtime().block_on(async {
        let r = api_client(hub, None)
            .put(format!("{}/v1/instances/{name}", hub.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    })
}

fn edge_run(hub: &Hub, name: &str, dir: &Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["edge", "--hub", &hub.url, "--name", name, "--data-dir"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("edge")
}

#[test]
fn an_instance_deleted_while_the_cache_was_lost_is_reaped_from_its_run_record() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let edge_dir = dir.path().join("edge-o");
    let mut edge = Edge::start_in(&hub.url, "edge-o", Some(&hub.token(1)), &edge_dir);
    hub.wait_phase("node", "edge-o", "Ready", Duration::from_secs(20));
    let (mk, mg) = (unique("kept"), unique("gone"));
    assert!(hub.apply(&sleeper("kept", &mk)).status.success());
    assert!(hub.apply(&sleeper("gone", &mg)).status.success());
    hub.wait_phase("instance", "kept", "Running", Duration::from_secs(20));
    hub.wait_phase("instance", "gone", "Running", Duration::from_secs(20));
    let kept_pid = pids_with(&mk);
    edge.proc.kill();
    hub.ok(&["delete", "instance", "gone"]);
    // The cache is damaged: the agent refuses to guess, and says what to do.
    let cache = edge_dir.join("state/desired.json");
    std::fs::write(&cache, b"{ not json").expect("corrupt");
    let out = edge_run(&hub, "edge-o", &edge_dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("move it aside"));
    std::fs::rename(&cache, edge_dir.join("state/desired.json.bad")).expect("aside");
    let _edge = Edge::start_in(&hub.url, "edge-o", None, &edge_dir);
    wait_for(
        "the deleted instance to be reaped",
        Duration::from_secs(30),
        || (pids_with(&mg).is_empty() && !edge_dir.join("instances/gone").exists()).then_some(()),
    );
    assert_eq!(
        pids_with(&mk),
        kept_pid,
        "the wanted one was adopted, not restarted"
    );
    hub.cleanup(&["kept"], &[&mk]);
}

/// Workloads (leaders of their own process groups) whose command line carries
/// `marker`: not the short-lived children a shell forks (which carry it too until they
/// exec).
fn workloads_with(marker: &str) -> Vec<u32> {
    pids_with(marker)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                    == Some(*pid)
            })
        })
        .collect()
}

#[test]
fn an_agent_killed_mid_deployment_runs_each_instance_once_and_leaves_nothing_after_delete() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let edge_dir = dir.path().join("edge-k");
    let mut edge = Edge::start_in(&hub.url, "edge-k", Some(&hub.token(1)), &edge_dir);
    hub.wait_phase("node", "edge-k", "Ready", Duration::from_secs(20));
    let mut all = Vec::new();
    for (round, delay_ms) in [150u64, 400, 800].into_iter().enumerate() {
        let batch: Vec<(String, String)> = (0..12)
            .map(|i| {
                (
                    format!("mid-{round}-{i}"),
                    unique(&format!("mid{round}x{i}")),
                )
            })
            .collect();
        let manifests: String = batch
            .iter()
            .map(|(n, m)| format!("---\n{}", sleeper(n, m).replace("cpu: 100m", "cpu: 10m")))
            .collect();
        assert!(hub.apply(&manifests).status.success());
        std::thread::sleep(Duration::from_millis(delay_ms));
        edge.proc.kill();
        edge = Edge::start_in(&hub.url, "edge-k", None, &edge_dir);
        all.extend(batch);
        for (n, _) in &all {
            hub.wait_phase("instance", n, "Running", Duration::from_secs(60));
        }
        for (n, m) in &all {
            let pids = workloads_with(m);
            assert_eq!(pids.len(), 1, "{n} runs {} times: {pids:?}", pids.len());
        }
    }
    for (n, _) in &all {
        hub.ok(&["delete", "instance", n]);
    }
    for (n, m) in &all {
        wait_for(&format!("{n} to stop"), Duration::from_secs(30), || {
            pids_with(m).is_empty().then_some(())
        });
    }
}

#[test]
fn a_running_workloads_log_is_rotated_by_size_and_followers_keep_reading() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let edge_dir = dir.path().join("edge-l");
    let _edge = Edge::start_with(
        &hub.url,
        "edge-l",
        Some(&hub.token(1)),
        &edge_dir,
        &["--log-max-size", "256Ki", "--log-keep", "2"],
    );
    hub.wait_phase("node", "edge-l", "Ready", Duration::from_secs(20));
    let m = "kind: Instance\nmetadata: {name: chatty}\nspec:\n  form: process\n  process:\n    command: [/bin/sh, -c, 'pad=$(head -c 2000 /dev/zero | tr \"\\0\" x); i=0; while :; do i=$((i+1)); echo \"line $i $pad\"; sleep 0.01; done']\n  terminationGracePeriodSeconds: 1\n";
    assert!(hub.apply(m).status.success());
    hub.wait_phase("instance", "chatty", "Running", Duration::from_secs(20));
    // Follow it across rotations.
    let mut follow = std::process::Command::new(BIN)
        .arg("--config")
        .arg(hub.admin_conf())
        .args(["logs", "-f", "chatty"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("follow");
    let last_seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let last_seen = last_seen.clone();
        let out = follow.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()) {
                    last_seen.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(10));
    let log = edge_dir.join("instances/chatty/output.log");
    let size = std::fs::metadata(&log).expect("log").len();
    assert!(
        size < 1 << 20,
        "the log is rotated while it runs: {size} bytes"
    );
    assert!(log.with_extension("log.1").exists() && log.with_extension("log.2").exists());
    assert!(
        !log.with_extension("log.3").exists(),
        "only 2 old logs are kept"
    );
    // The follower is still on the current file: close behind the last line written.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let newest: u64 = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .max()
        .unwrap_or(0);
    let seen = last_seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        newest > 0 && seen + 300 >= newest,
        "the follower fell behind a rotation: saw {seen}, the log is at {newest}"
    );
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = hub.cli(&["delete", "instance", "chatty"]);
}

/// The test kit's front-door load test at a size that fits CI: only invariants (the
/// API answers throughout, memory stays bounded, every descriptor comes back, every
/// slow or oversized connection is closed by the hub), never timings.
#[test]
fn the_front_door_holds_under_a_ci_sized_load() {
    use verge_testkit::frontdoor::{Attack, Target, run};
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let rt = runtime();
    let ca = std::fs::read_to_string(dir.path().join("hub/ca.crt")).expect("ca");
    let client = api_client(&hub, None);
    let token = admin_token(&hub);
    let url = format!("{}/v1/nodes", hub.url);
    let phases = rt.block_on(async {
        let target = Target {
            addr: hub_addr(&hub),
            ca_fingerprint: verge_tunnel::pki::pem_fingerprint(&ca).expect("fingerprint"),
            pid: hub.proc.pid(),
            probe: || async {
                client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        };
        run(
            &target,
            &Attack {
                silent_tcp: 300,
                slow_tls: 40,
                oversized_tls: 40,
                oversized_quic: 40,
                sources: 8,
            },
        )
        .await
    });
    for p in &phases {
        assert_eq!(
            p.api_answered, p.api_probes,
            "the API answered during {p:?}"
        );
        assert!(
            p.fds[2] <= p.fds[0] + 4,
            "descriptors came back after {p:?}"
        );
        assert!(
            p.rss_kib[1] < p.rss_kib[0] + 64 * 1024,
            "memory stayed bounded in {p:?}"
        );
        if p.name != "silentTcp" {
            assert_eq!(
                p.closed_by_hub, p.opened,
                "the hub closed every one in {p:?}"
            );
        }
        assert!(p.opened > 0, "{p:?}");
    }
}

#[test]
fn an_agent_that_exits_leaves_no_empty_cgroups_behind() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let name = unique("cg").replace('_', "-");
    let mut edge = Edge::start(&hub, &name, Some(&hub.token(1)));
    hub.wait_phase("node", &name, "Ready", Duration::from_secs(20));
    let marker = unique("cgwork");
    assert!(hub.apply(&sleeper("cgwork", &marker)).status.success());
    hub.wait_phase("instance", "cgwork", "Running", Duration::from_secs(20));
    hub.cleanup(&["cgwork"], &[&marker]);
    // Where the agent made its groups (it says so at start).
    let log = edge.proc.log_text();
    let groups: Vec<String> = log
        .split('"')
        .filter(|s| s.starts_with("/sys/fs/cgroup") && s.ends_with(&format!("verge-{name}")))
        .map(str::to_string)
        .collect();
    if groups.is_empty() {
        eprintln!("no writable cgroup hierarchy here; nothing to check:\n{log}");
        return;
    }
    assert!(groups.iter().all(|g| Path::new(g).is_dir()), "{groups:?}");
    // The deleted instance's group goes once all of its processes have (the shell's
    // `sleep` child among them), without waiting for the agent to exit.
    wait_for(
        "the deleted instance's cgroups to be removed",
        Duration::from_secs(10),
        || {
            groups
                .iter()
                .all(|g| !Path::new(g).join("cgwork").exists())
                .then_some(())
        },
    );
    edge.proc.term();
    for g in &groups {
        assert!(!Path::new(g).exists(), "{g} stayed after the agent exited");
    }
}

/// A hub restarted after a SIGKILL answers its edges' old QUIC connections with a
/// stateless reset (its reset and connection-id keys survive restarts), so they
/// reconnect on their next packet instead of waiting out the silence limit.
#[test]
fn edges_notice_a_restarted_hub_at_once_not_after_a_silence() {
    let dir = test_dir();
    let port = free_port();
    let mut hub = Hub::start_with(
        dir.path(),
        port,
        &["--heartbeat", "4s", "--node-grace", "30s"],
    );
    let edge = Edge::start(&hub, "quick", Some(&hub.token(1)));
    hub.wait_phase("node", "quick", "Ready", Duration::from_secs(20));
    wait_for("the edge on QUIC", Duration::from_secs(10), || {
        edge.proc
            .log_text()
            .contains("transport=\"quic\"")
            .then_some(())
    });
    hub.proc.kill();
    hub = Hub::start_with(
        dir.path(),
        port,
        &["--heartbeat", "4s", "--node-grace", "30s"],
    );
    let lost = wait_for("the edge to notice", Duration::from_secs(20), || {
        edge.proc
            .log_text()
            .lines()
            .find(|l| l.contains("hub connection lost"))
            .map(str::to_string)
    });
    assert!(
        !lost.contains("hub silent"),
        "the edge waited for silence instead of being reset: {lost}"
    );
    // And it took the reset for what it says: the hub restarted, its fleet is
    // coming back (a fleet of one waits next to nothing for its turn).
    assert!(lost.contains("the hub restarted"), "{lost}");
    hub.wait_phase("node", "quick", "Ready", Duration::from_secs(20));
}

#[test]
fn an_agent_speaking_an_older_protocol_still_syncs_reports_and_stays_ready() {
    let dir = test_dir();
    let hub = Hub::start(dir.path());
    let edge_dir = dir.path().join("edge-old");
    let mut edge = Edge::start_in(&hub.url, "edge-old", Some(&hub.token(1)), &edge_dir);
    hub.wait_phase("node", "edge-old", "Ready", Duration::from_secs(20));
    let m = "kind: Instance\nmetadata: {name: old-agent-work}\nspec:\n  form: process\n  process:\n    command: [sleep, '3600']\n  resources: {cpu: 10m, memory: 4Mi}\n  terminationGracePeriodSeconds: 1\n";
    assert!(hub.apply(m).status.success());
    hub.wait_phase(
        "instance",
        "old-agent-work",
        "Running",
        Duration::from_secs(20),
    );
    edge.proc.kill();
    // The same node, now speaking protocol 2 (one-message snapshots, no epochs).
    let rt = runtime();
    rt.block_on(async {
        let mut s = raw_session(&hub, &edge_dir, "0.0.9", 2).await;
        let instances = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match read_msg::<HubToEdge, _>(&mut s).await {
                    Ok(Some(HubToEdge::Snapshot { instances, .. })) => break instances,
                    Ok(Some(HubToEdge::SnapshotPart { .. })) => {
                        panic!("a protocol-2 agent was sent snapshot parts")
                    }
                    Ok(Some(_)) => continue,
                    other => panic!("session ended before a snapshot: {other:?}"),
                }
            }
        })
        .await
        .expect("a snapshot");
        let mine = instances
            .iter()
            .find(|i| i.metadata.name == "old-agent-work")
            .expect("the node's instance in its snapshot");
        let uid = mine.metadata.uid.clone();
        let status = verge_api::InstanceStatus {
            phase: verge_api::InstancePhase::Failed,
            exit_code: Some(9),
            ..Default::default()
        };
        write_msg(
            &mut s,
            &EdgeToHub::InstanceStatus {
                name: "old-agent-work".into(),
                uid,
                status,
            },
        )
        .await
        .expect("status");
        // Heartbeats at the hub's interval (500 ms) for 10 s, over three of its
        // 3 s grace periods: the node stays Ready the whole time.
        for _ in 0..20 {
            write_msg(&mut s, &EdgeToHub::Heartbeat { status: None })
                .await
                .expect("heartbeat");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let node = hub.get_json("node", "edge-old").expect("node");
            assert_eq!(node["status"]["phase"], "Ready", "{}", node["status"]);
        }
    });
    let i = hub
        .get_json("instance", "old-agent-work")
        .expect("instance");
    assert_eq!(i["status"]["phase"], "Failed", "{}", i["status"]);
    assert_eq!(i["status"]["exitCode"], 9, "{}", i["status"]);
}
