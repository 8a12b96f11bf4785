//! Verge's test kit: a fault-injecting TCP proxy that makes a loopback link behave like
//! the public internet an edge site sits behind, since `tc netem` is not available.
//!
//! Put a [`FaultProxy`] between an edge and the hub and change its [`Faults`] at any
//! time: added latency and jitter, loss (a lost TCP segment shows up as a
//! retransmission delay, so that is how it is modelled), a bandwidth cap, a black hole
//! (bytes are held, nothing moves, no error: what a dead path looks like), and resets
//! (every open connection is cut). Partitions on a schedule are faults set from a
//! timer ([`FaultProxy::schedule`]). Byte counters measure what crossed the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
}

struct Shared {
    faults: watch::Sender<Faults>,
    reset: Notify,
    up: AtomicU64,
    down: AtomicU64,
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
    /// Listen on `127.0.0.1:0` and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            faults,
            reset: Notify::new(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if s.faults.borrow().refuse {
                    drop(client);
                    continue;
                }
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
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
        tokio::time::sleep_until(due).await;
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
