//! Verge's test kit: a fault-injecting TCP and UDP proxy that makes a loopback link
//! behave like the public internet an edge site sits behind, since `tc netem` is not
//! available.
//!
//! UDP (QUIC) is carried when the proxy is started with [`FaultProxy::start_with_udp`]:
//! datagrams then see the same latency, jitter and black holes, loss drops them (UDP
//! has no retransmission), and [`Faults::udp_blocked`] drops all of them, as a firewall
//! that filters UDP does.
//!
//! Put a [`FaultProxy`] between an edge and the hub and change its [`Faults`] at any
//! time: added latency and jitter, loss (a lost TCP segment shows up as a
//! retransmission delay, so that is how it is modelled), a bandwidth cap, a black hole
//! (bytes are held, nothing moves, no error: what a dead path looks like), and resets
//! (every open connection is cut). Partitions on a schedule are faults set from a
//! timer ([`FaultProxy::schedule`]). Byte counters measure what crossed the link.
//!
//! [`frontdoor`] is a load test for the hub's front door: silent and slow
//! connections and oversized frames from strangers, on TLS and on QUIC. [`etcd`]
//! starts real etcd servers (one member or a cluster) for the HA tests.
//! [`webdriver`] drives a headless Chromium for the web console's tests and benchmark.

pub mod etcd;
pub mod frontdoor;
pub mod webdriver;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, watch};

/// What the link does to traffic. The default is a clean link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Added one-way delay.
    pub latency: Duration,
    /// Extra random delay, uniform in `0..jitter`.
    pub jitter: Duration,
    /// Probability that a chunk is "lost" and arrives one retransmission timeout later.
    pub loss: f64,
    /// Retransmission timeout used for lost chunks (default 200 ms).
    pub rto: Option<Duration>,
    /// Bytes per second, each direction (None: unlimited).
    pub bandwidth: Option<u64>,
    /// Nothing gets through (held until the black hole ends).
    pub blackhole: bool,
    /// New connections are refused (closed at once).
    pub refuse: bool,
    /// Every UDP datagram is dropped (TCP unaffected).
    pub udp_blocked: bool,
}

struct Shared {
    faults: watch::Sender<Faults>,
    reset: Notify,
    up: AtomicU64,
    down: AtomicU64,
    /// Datagrams forwarded (client → upstream, upstream → client).
    datagrams_up: AtomicU64,
    datagrams_down: AtomicU64,
    connections: AtomicU64,
}

/// A running proxy. Dropping it stops accepting; open connections end with their peers.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.reset.notify_waiters();
    }
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and forward TCP to `upstream` (UDP sent to the proxy's
    /// port meets silence, as behind a firewall that drops it).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(listener, None, upstream)
    }

    /// Like [`FaultProxy::start`], and also forward UDP on the same port number to the
    /// same port of `upstream` (the hub serves QUIC there).
    pub async fn start_with_udp(upstream: SocketAddr) -> std::io::Result<Self> {
        let mut last_err = None;
        for _ in 0..20 {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            match UdpSocket::bind(listener.local_addr()?).await {
                Ok(udp) => return Self::serve(listener, Some(udp), upstream),
                // That port number is taken for UDP: try another.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("no port free for TCP and UDP")))
    }

    fn serve(
        listener: TcpListener,
        udp: Option<UdpSocket>,
        upstream: SocketAddr,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            faults,
            reset: Notify::new(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            datagrams_up: AtomicU64::new(0),
            datagrams_down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        if let Some(udp) = udp {
            // It carries every client's datagrams: as big as a hub's socket.
            verge_tunnel::quic::enlarge_buffers(&udp, verge_tunnel::quic::SERVER_SOCKET_BUFFER);
            tokio::spawn(udp_relay(Arc::new(udp), upstream, shared.clone()));
        }
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else {
                    return;
                };
                if s.faults.borrow().refuse {
                    drop(client);
                    continue;
                }
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(server) = connect_from(peer.ip(), upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    relay(client, server, s).await;
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://` URL of the proxy (for `verge edge --hub`).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Replace the faults (applies to open connections too).
    pub fn set(&self, f: Faults) {
        self.shared.faults.send_replace(f);
    }

    /// The current faults.
    pub fn faults(&self) -> Faults {
        self.shared.faults.borrow().clone()
    }

    /// Turn the black hole on or off, keeping the other faults.
    pub fn blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.blackhole = on);
    }

    /// Cut every open connection (both sides closed at once).
    pub fn reset_all(&self) {
        self.shared.reset.notify_waiters();
    }

    /// Bytes forwarded `(client → upstream, upstream → client)`.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.shared.up.load(Ordering::Relaxed),
            self.shared.down.load(Ordering::Relaxed),
        )
    }

    /// UDP datagrams forwarded `(client → upstream, upstream → client)`.
    pub fn datagrams(&self) -> (u64, u64) {
        (
            self.shared.datagrams_up.load(Ordering::Relaxed),
            self.shared.datagrams_down.load(Ordering::Relaxed),
        )
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Apply `plan` (offset from now, faults) in the background: a partition on a
    /// schedule is `[(0s, black hole), (60s, clean)]`.
    pub fn schedule(&self, plan: Vec<(Duration, Faults)>) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (at, f) in plan {
                tokio::time::sleep_until(start + at).await;
                shared.faults.send_replace(f);
            }
        })
    }
}

/// What happens to one datagram under `f`: dropped (`None`) or delivered after a delay.
fn datagram_fate(f: &Faults, len: usize) -> Option<Duration> {
    if f.udp_blocked || f.blackhole || (f.loss > 0.0 && rand::random::<f64>() < f.loss) {
        return None;
    }
    let mut delay = f.latency;
    if !f.jitter.is_zero() {
        delay += f.jitter.mul_f64(rand::random::<f64>());
    }
    if let Some(bps) = f.bandwidth.filter(|b| *b > 0) {
        delay += Duration::from_secs_f64(len as f64 / bps as f64);
    }
    Some(delay)
}

/// Send `data` to `to` from `sock` after the fate `faults` decide, counting it.
fn send_datagram(
    sock: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: Vec<u8>,
    s: &Arc<Shared>,
    upstream: bool,
) {
    let Some(delay) = datagram_fate(&s.faults.borrow(), data.len()) else {
        return;
    };
    let (bytes, datagrams) = if upstream {
        (&s.up, &s.datagrams_up)
    } else {
        (&s.down, &s.datagrams_down)
    };
    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    datagrams.fetch_add(1, Ordering::Relaxed);
    // Undelayed, a datagram goes at once when the socket takes it (a fleet's worth of
    // datagrams a second must not cost a task each).
    if delay.is_zero() {
        let sent = match to {
            Some(to) => sock.try_send_to(&data, to),
            None => sock.try_send(&data),
        };
        if !matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            return;
        }
    }
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let _ = match to {
            Some(to) => sock.send_to(&data, to).await,
            None => sock.send(&data).await,
        };
    });
}

/// Forward datagrams between clients and `upstream`, one upstream socket per client
/// address (as a NAT does), each datagram subject to the faults.
/// A TCP connection to `upstream` from `ip` where this host has that address (the
/// upstream then sees the client's own address), from any address otherwise.
async fn connect_from(ip: std::net::IpAddr, upstream: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match ip {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if socket.bind(SocketAddr::new(ip, 0)).is_ok() {
        return socket.connect(upstream).await;
    }
    TcpStream::connect(upstream).await
}

async fn udp_relay(sock: Arc<UdpSocket>, upstream: SocketAddr, s: Arc<Shared>) {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let flow = match flows.get(&client) {
            Some(f) => f.clone(),
            None => {
                // From the client's own address where it can, so the upstream tells
                // clients apart as it would without the proxy.
                let f = match UdpSocket::bind((client.ip(), 0)).await {
                    Ok(f) => f,
                    Err(_) => match UdpSocket::bind("127.0.0.1:0").await {
                        Ok(f) => f,
                        Err(_) => continue,
                    },
                };
                verge_tunnel::quic::enlarge_buffers(&f, 1 << 20);
                if f.connect(upstream).await.is_err() {
                    continue;
                }
                let f = Arc::new(f);
                let (back, down, shared) = (sock.clone(), f.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = down.recv(&mut buf).await {
                        send_datagram(
                            back.clone(),
                            Some(client),
                            buf[..n].to_vec(),
                            &shared,
                            false,
                        );
                    }
                });
                flows.insert(client, f.clone());
                f
            }
        };
        send_datagram(flow, None, buf[..n].to_vec(), &s, true);
    }
}

async fn relay(client: TcpStream, server: TcpStream, s: Arc<Shared>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, s.clone(), true));
    let down = tokio::spawn(pump(sr, cw, s.clone(), false));
    let reset = s.reset.notified();
    tokio::pin!(reset);
    let (ua, da) = (up.abort_handle(), down.abort_handle());
    tokio::select! {
        _ = &mut reset => {}
        _ = async { let _ = up.await; let _ = down.await; } => {}
    }
    ua.abort();
    da.abort();
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: Arc<Shared>,
    upstream: bool,
) {
    let mut faults = s.faults.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    // Deliveries stay in order: a chunk never overtakes the one before it.
    let mut next_free = tokio::time::Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Hold while black-holed (the peer sees silence, not an error).
        while faults.borrow_and_update().blackhole {
            if faults.changed().await.is_err() {
                return;
            }
        }
        let f = faults.borrow().clone();
        let mut delay = f.latency;
        if !f.jitter.is_zero() {
            delay += f.jitter.mul_f64(rand::random::<f64>());
        }
        if f.loss > 0.0 && rand::random::<f64>() < f.loss {
            delay += f.rto.unwrap_or(Duration::from_millis(200));
        }
        let mut due = (tokio::time::Instant::now() + delay).max(next_free);
        if let Some(bps) = f.bandwidth.filter(|b| *b > 0) {
            due += Duration::from_secs_f64(n as f64 / bps as f64);
        }
        next_free = due;
        // A clean link must not cost a timer tick (about 1 ms) per chunk.
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let counter = if upstream { &s.up } else { &s.down };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_delays_and_drops_udp() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let tcp_echo = echo_server().await;
        // The proxy forwards UDP to the same port number as TCP: put the UDP echo there.
        drop(echo);
        let Ok(echo) = UdpSocket::bind(tcp_echo).await else {
            return; // that port is taken for UDP on this machine; nothing to test
        };
        tokio::spawn(async move {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let p = FaultProxy::start_with_udp(tcp_echo).await.expect("proxy");
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        c.connect(p.addr()).await.expect("connect");
        let ask = |msg: &'static [u8]| {
            let c = &c;
            async move {
                c.send(msg).await.expect("send");
                let mut b = [0u8; 16];
                tokio::time::timeout(Duration::from_millis(300), c.recv(&mut b))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|n| b[..n].to_vec())
            }
        };
        assert_eq!(ask(b"hi").await.as_deref(), Some(&b"hi"[..]));
        p.set(Faults {
            udp_blocked: true,
            ..Default::default()
        });
        assert_eq!(ask(b"blocked").await, None, "UDP blocked");
        p.set(Faults {
            loss: 1.0,
            ..Default::default()
        });
        assert_eq!(ask(b"lost").await, None, "all lost");
        p.set(Faults::default());
        assert_eq!(ask(b"back").await.as_deref(), Some(&b"back"[..]));
        assert_eq!(
            p.datagrams(),
            (2, 2),
            "forwarded datagrams counted, dropped ones not"
        );
    }

    #[tokio::test]
    async fn forwards_delays_holds_and_resets() {
        let p = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"ping");
        assert_eq!(p.bytes(), (4, 4));

        p.set(Faults {
            latency: Duration::from_millis(100),
            ..Default::default()
        });
        let t = tokio::time::Instant::now();
        c.write_all(b"slow").await.expect("write");
        c.read_exact(&mut b).await.expect("read");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "two one-way delays"
        );

        p.blackhole(true);
        c.write_all(b"held").await.expect("write");
        let r = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut b)).await;
        assert!(r.is_err(), "nothing gets through a black hole");
        p.set(Faults::default());
        c.read_exact(&mut b)
            .await
            .expect("delivered after the hole closes");
        assert_eq!(&b, b"held");

        p.reset_all();
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .expect("closed");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
}
