//! A load test for the hub's front door: what strangers on the internet can throw at
//! it without credentials. Phases, each measured on the hub process (resident memory
//! and open descriptors, from `/proc`) before, while the connections are held, and
//! after they are gone, with the operator's API probed while the attack runs:
//!
//! - `silentTcp`: TCP connections that never start a TLS handshake, from several
//!   loopback source addresses;
//! - `slowTls`: TLS connections that send a request head one line every 2 s;
//! - `oversizedTls`: enrolment connections announcing a 16 MiB frame;
//! - `oversizedQuic`: the same over QUIC.
//!
//! `verge bench frontdoor` runs it at full size; a CI-sized run is part of the test
//! suite and checks only invariants (the API answers, memory stays bounded, every
//! descriptor comes back), never timings.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How big an attack to make.
#[derive(Debug, Clone)]
pub struct Attack {
    /// Silent TCP connections.
    pub silent_tcp: usize,
    /// Slow TLS request heads.
    pub slow_tls: usize,
    /// Enrolment frames announcing 16 MiB, over TLS.
    pub oversized_tls: usize,
    /// The same over QUIC.
    pub oversized_quic: usize,
    /// Loopback source addresses to spread connections over (127.0.0.2 and up).
    pub sources: u8,
}

/// One phase's measurements.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Phase {
    /// The phase.
    pub name: &'static str,
    /// Connections the attacker tried to open.
    pub attempted: usize,
    /// Connections the attacker opened (the rest were refused: per-address caps).
    pub opened: usize,
    /// Of those, how many the hub closed (or refused) at once or before the attacker
    /// let go.
    pub closed_by_hub: usize,
    /// Hub resident memory (KiB) before, while held, after.
    pub rss_kib: [u64; 3],
    /// Hub open descriptors before, while held, after.
    pub fds: [u64; 3],
    /// Operator API probes made while the attack was held, and how many answered.
    pub api_probes: usize,
    /// How many of them answered.
    pub api_answered: usize,
    /// The slowest answer, ms.
    pub api_slowest_ms: u64,
}

impl Phase {
    /// The hub's memory per connection open while held, KiB (an upper bound: the
    /// allocator may reuse what an earlier phase freed).
    pub fn kib_per_connection(&self) -> f64 {
        self.rss_kib[1].saturating_sub(self.rss_kib[0]) as f64 / self.opened.max(1) as f64
    }
}

/// What the hub is, for the attacker.
pub struct Target<P> {
    /// Its address (TLS and QUIC on the same port).
    pub addr: SocketAddr,
    /// Its CA's SHA-256 fingerprint (in every join token), to complete handshakes.
    pub ca_fingerprint: String,
    /// Its process id, to read its memory and descriptors.
    pub pid: u32,
    /// One operator request; true if it was answered correctly.
    pub probe: P,
}

fn proc_value(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_value(pid, "VmRSS:")
}

/// The open-file limit `pid` runs with (its soft limit, from `/proc/PID/limits`).
pub fn open_file_limit(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Open descriptors of `pid`.
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

async fn probe_api<P, F>(probe: &P, probes: usize) -> (usize, u64)
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let mut answered = 0;
    let mut slowest = 0;
    for _ in 0..probes {
        let t = Instant::now();
        if tokio::time::timeout(Duration::from_secs(5), probe())
            .await
            .unwrap_or(false)
        {
            answered += 1;
        }
        slowest = slowest.max(t.elapsed().as_millis() as u64);
    }
    (answered, slowest)
}

/// Wait (up to `within`) for the hub's descriptors to come back to `baseline`.
async fn settle(pid: u32, baseline: u64, within: Duration) -> u64 {
    let until = Instant::now() + within;
    loop {
        let now = open_fds(pid);
        if now <= baseline + 2 || Instant::now() > until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run every phase of `attack` against `target`.
pub async fn run<P, F>(target: &Target<P>, attack: &Attack) -> Vec<Phase>
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    vec![
        silent_tcp(target, attack).await,
        slow_tls(target, attack).await,
        oversized_tls(target, attack).await,
        oversized_quic(target, attack).await,
    ]
}

struct Measure {
    rss: u64,
    fds: u64,
}

fn measure(pid: u32) -> Measure {
    Measure {
        rss: rss_kib(pid),
        fds: open_fds(pid),
    }
}

async fn finish<P, F>(
    target: &Target<P>,
    name: (&'static str, usize),
    measures: [Measure; 2],
    opened: usize,
    closed_by_hub: usize,
    held: impl FnOnce(),
) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let probes = probe_api(&target.probe, PROBES).await;
    held();
    conclude(target, name, measures, probes, opened, closed_by_hub).await
}

/// API probes made while an attack is held.
const PROBES: usize = 5;

/// The phase's numbers, once what was held is gone and the descriptors came back.
async fn conclude<P>(
    target: &Target<P>,
    (name, attempted): (&'static str, usize),
    [before, during]: [Measure; 2],
    (answered, slowest): (usize, u64),
    opened: usize,
    closed_by_hub: usize,
) -> Phase {
    let fds_after = settle(target.pid, before.fds, Duration::from_secs(15)).await;
    Phase {
        name,
        attempted,
        opened,
        closed_by_hub,
        rss_kib: [before.rss, during.rss, rss_kib(target.pid)],
        fds: [before.fds, during.fds, fds_after],
        api_probes: PROBES,
        api_answered: answered,
        api_slowest_ms: slowest,
    }
}

/// A TCP connection to `to` from source address `from` (any of 127.0.0.0/8 on
/// loopback), so that one test can be many peers.
pub async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Whether the peer has closed `s` (a read returns 0 or fails within `within`).
pub async fn closed(s: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> bool {
    let mut b = [0u8; 256];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn silent_tcp<P, F>(target: &Target<P>, attack: &Attack) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let before = measure(target.pid);
    let conns = open_silent(target.addr, attack.silent_tcp, attack.sources).await;
    // While they are all open (the hub drops silent ones after its handshake deadline).
    let during = measure(target.pid);
    let opened = conns.len();
    let (closed_by_hub, held) = split_closed(conns, Duration::from_millis(1)).await;
    finish(
        target,
        ("silentTcp", attack.silent_tcp),
        [before, during],
        opened,
        closed_by_hub,
        move || drop(held),
    )
    .await
}

/// Open `n` TCP connections to `to` that say nothing, spread over `sources` loopback
/// source addresses (127.0.0.2 and up). Those that fail to connect are left out.
pub async fn open_silent(to: SocketAddr, n: usize, sources: u8) -> Vec<tokio::net::TcpStream> {
    let sources = sources.max(1) as usize;
    let mut conns = Vec::new();
    for i in 0..n {
        let host = 2 + (i % sources) as u8;
        if let Ok(s) = tcp_from(IpAddr::from([127, 0, 0, host]), to).await {
            conns.push(s);
        }
    }
    conns
}

/// How many of `conns` the peer has closed (each given `within` to show it), and the
/// ones still open.
pub async fn split_closed(
    conns: Vec<tokio::net::TcpStream>,
    within: Duration,
) -> (usize, Vec<tokio::net::TcpStream>) {
    let mut closed_count = 0;
    let mut open = Vec::new();
    for mut s in conns {
        if closed(&mut s, within).await {
            closed_count += 1;
        } else {
            open.push(s);
        }
    }
    (closed_count, open)
}

async fn slow_tls<P, F>(target: &Target<P>, attack: &Attack) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let before = measure(target.pid);
    let Ok(cfg) = verge_tunnel::tls::pinned_client_config(&target.ca_fingerprint, &[b"http/1.1"])
    else {
        let during = measure(target.pid);
        return finish(
            target,
            ("slowTls", attack.slow_tls),
            [before, during],
            0,
            0,
            || {},
        )
        .await;
    };
    let addr = target.addr.to_string();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..attack.slow_tls {
        let (cfg, addr) = (cfg.clone(), addr.clone());
        tasks.spawn(async move {
            let Ok(mut s) = verge_tunnel::tls::dial(&addr, cfg).await else {
                return None;
            };
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n").await;
            // Drip for up to 20 s; the hub must hang up before.
            for i in 0..10 {
                if closed(&mut s, Duration::from_secs(2)).await {
                    return Some(true);
                }
                if s.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return Some(true);
                }
            }
            Some(false)
        });
    }
    // Measure while they drip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = measure(target.pid);
    let probes = probe_api(&target.probe, PROBES).await;
    let (mut opened, mut closed_by_hub) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(c)) = r {
            opened += 1;
            closed_by_hub += usize::from(c);
        }
    }
    conclude(
        target,
        ("slowTls", attack.slow_tls),
        [before, during],
        probes,
        opened,
        closed_by_hub,
    )
    .await
}

/// A length prefix just under 16 MiB and 32 KiB of the body: what a stranger sends to
/// make the hub buffer a frame.
pub fn oversized_frame() -> Vec<u8> {
    let mut v = ((16u32 << 20) - 1).to_be_bytes().to_vec();
    v.extend(std::iter::repeat_n(b'{', 32 << 10));
    v
}

/// A stream to the hub that the attacker keeps (a QUIC stream with its connection).
type Held = (
    Option<quinn::Connection>,
    Box<dyn verge_tunnel::quic::Duplex>,
);

/// Send each connection an oversized frame, then see which the hub answers and closes
/// within 2 s; the rest are held until the phase ends.
async fn oversized<P, F>(
    target: &Target<P>,
    name: (&'static str, usize),
    before: Measure,
    conns: Vec<Held>,
) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let opened = conns.len();
    let mut conns = conns;
    for (_, s) in &mut conns {
        let _ = s.write_all(&oversized_frame()).await;
    }
    let during = measure(target.pid);
    let mut closed_by_hub = 0;
    let mut held = Vec::new();
    for (conn, mut s) in conns {
        // The hub answers with an error frame and closes.
        let mut b = Vec::new();
        if tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut b))
            .await
            .is_ok()
        {
            closed_by_hub += 1;
        } else {
            held.push((conn, s));
        }
    }
    finish(
        target,
        name,
        [before, during],
        opened,
        closed_by_hub,
        move || drop(held),
    )
    .await
}

fn enrol_config(target_fingerprint: &str) -> Option<std::sync::Arc<rustls::ClientConfig>> {
    verge_tunnel::tls::pinned_client_config(target_fingerprint, &[verge_api::channel::ALPN_ENROLL])
        .ok()
}

async fn oversized_tls<P, F>(target: &Target<P>, attack: &Attack) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let before = measure(target.pid);
    let mut conns: Vec<Held> = Vec::new();
    if let Some(cfg) = enrol_config(&target.ca_fingerprint) {
        let addr = target.addr.to_string();
        for _ in 0..attack.oversized_tls {
            if let Ok(s) = verge_tunnel::tls::dial(&addr, cfg.clone()).await {
                conns.push((None, Box::new(s)));
            }
        }
    }
    oversized(
        target,
        ("oversizedTls", attack.oversized_tls),
        before,
        conns,
    )
    .await
}

async fn oversized_quic<P, F>(target: &Target<P>, attack: &Attack) -> Phase
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let before = measure(target.pid);
    let mut conns: Vec<Held> = Vec::new();
    if let (Ok(endpoint), Some(cfg)) = (
        verge_tunnel::quic::client(),
        enrol_config(&target.ca_fingerprint),
    ) {
        let addr = target.addr.to_string();
        for _ in 0..attack.oversized_quic {
            if let Ok(Ok((conn, s))) = tokio::time::timeout(
                Duration::from_secs(5),
                verge_tunnel::quic::dial(&endpoint, &addr, cfg.clone(), Duration::from_secs(5)),
            )
            .await
            {
                conns.push((Some(conn), s));
            }
        }
    }
    oversized(
        target,
        ("oversizedQuic", attack.oversized_quic),
        before,
        conns,
    )
    .await
}
