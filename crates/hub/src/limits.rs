//! Bounds on what peers may hold: connections in all, connections per source
//! address, and the file descriptors the hub keeps back for itself.
//!
//! Anyone on the internet can reach the hub's port. Each connection costs a task, its
//! buffers and (over TCP) a file descriptor; without bounds a few thousand idle or
//! slow connections exhaust the process and the API and edges can no longer get in.
//! Three pools, each a total and a per-address cap:
//! - `unauthenticated`: from accept until the peer is known (TLS handshake, enrolment);
//! - `http`: REST connections (each request authenticates itself);
//! - every TCP connection counts against the descriptor budget, which is the process's
//!   open-file limit less a reserve for the store, logs and artifacts.
//!
//! Edges with a node certificate only need the budget, so a flood of strangers (capped
//! at a fraction of it) cannot lock them out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Descriptors kept back for everything that is not a peer's connection: the store
/// (database, WAL, shm), log files, artifact uploads, the QUIC socket, listeners.
pub const FD_RESERVE: usize = 128;

/// Concurrent watches one principal (the operator, or one node) may hold.
pub const WATCHES_PER_PRINCIPAL: usize = 32;

/// One pool of slots, shared out by a key: a source address for connections, a
/// principal for watches.
pub struct Pool<K: Key = IpAddr> {
    inner: Arc<Inner<K>>,
}

impl<K: Key> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// What a pool's slots are shared out by.
pub trait Key: std::hash::Hash + Eq + Clone + Send + 'static {}
impl<K: std::hash::Hash + Eq + Clone + Send + 'static> Key for K {}

struct Inner<K> {
    name: &'static str,
    max_total: usize,
    max_per_addr: usize,
    /// When full, make room by ending the oldest holder instead of refusing.
    evict_oldest: bool,
    used: Mutex<Used<K>>,
}

struct Used<K> {
    total: usize,
    per: HashMap<K, usize>,
    /// Holders, oldest first (only kept when evicting).
    queue: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
    next_id: u64,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The pool is full.
    Full {
        /// The pool.
        pool: &'static str,
        /// Its total.
        max: usize,
    },
    /// This address holds its share already.
    PerAddress {
        /// The pool.
        pool: &'static str,
        /// The share.
        max: usize,
    },
    /// New QUIC handshakes are coming faster than `--handshake-rate`.
    HandshakeRate {
        /// The rate, a second.
        per_second: u64,
    },
    /// The hub is behind on the work it has ([`LoadGauge`]).
    Overloaded {
        /// How far behind, in milliseconds.
        lag_ms: u64,
    },
    /// The hub's QUIC socket is read too slowly: datagrams wait or are dropped
    /// ([`LoadGauge::watch_packets`]).
    PacketsBehind {
        /// Bytes the kernel held unread for it at the last look.
        queued: u64,
        /// Datagrams it dropped lately.
        dropped: u64,
    },
}

impl Refusal {
    /// A metric label for the refusal.
    pub fn reason(&self) -> String {
        match self {
            Refusal::Full { pool, .. } => format!("{pool}_full"),
            Refusal::PerAddress { pool, .. } => format!("{pool}_per_address"),
            Refusal::HandshakeRate { .. } => "handshake_rate".into(),
            Refusal::Overloaded { .. } => "overloaded".into(),
            Refusal::PacketsBehind { .. } => "packets_behind".into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { pool, max } => write!(f, "{pool} connections at their limit ({max})"),
            Refusal::PerAddress { pool, max } => {
                write!(
                    f,
                    "{pool} connections from this address at their limit ({max})"
                )
            }
            Refusal::HandshakeRate { per_second } => {
                write!(f, "new QUIC handshakes over {per_second} a second")
            }
            Refusal::Overloaded { lag_ms } => {
                write!(f, "the hub is {lag_ms} ms behind on its work")
            }
            Refusal::PacketsBehind { queued, dropped } => write!(
                f,
                "the hub is behind on its edges' packets ({} KiB unread, {dropped} dropped lately)",
                queued / 1024
            ),
        }
    }
}

/// A held slot; dropping it gives the slot back.
pub struct Permit<K: Key = IpAddr> {
    inner: Arc<Inner<K>>,
    addr: K,
    id: u64,
    evicted: Arc<tokio::sync::Notify>,
}

impl<K: Key> Permit<K> {
    /// Resolves when the pool ends this holder to make room for a newer one (only in
    /// pools that evict).
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl<K: Key> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut used = self.inner.used.lock().unwrap_or_else(|e| e.into_inner());
        used.total = used.total.saturating_sub(1);
        if let Some(n) = used.per.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                used.per.remove(&self.addr);
            }
        }
        if let Some(i) = used.queue.iter().position(|(id, _)| *id == self.id) {
            used.queue.remove(i);
        }
    }
}

impl<K: Key> Pool<K> {
    /// A pool of `max_total` slots, at most `max_per_addr` of them per key.
    pub fn new(name: &'static str, max_total: usize, max_per_addr: usize) -> Self {
        Self::make(name, max_total, max_per_addr, false)
    }

    /// A pool that, when full, ends its oldest holder to make room (each address is
    /// still capped). For connections that have not authenticated yet: a real peer
    /// finishes its handshake in milliseconds, so a flood of silent ones cannot keep
    /// it out by filling the pool first.
    pub fn evicting(name: &'static str, max_total: usize, max_per_addr: usize) -> Self {
        Self::make(name, max_total, max_per_addr, true)
    }

    fn make(name: &'static str, max_total: usize, max_per_addr: usize, evict_oldest: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                max_total: max_total.max(1),
                max_per_addr: max_per_addr.max(1),
                evict_oldest,
                used: Mutex::new(Used {
                    total: 0,
                    per: HashMap::new(),
                    queue: Default::default(),
                    next_id: 0,
                }),
            }),
        }
    }

    /// Take a slot for `addr`.
    pub fn acquire(&self, addr: K) -> Result<Permit<K>, Refusal> {
        let i = &self.inner;
        let mut used = i.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.per.get(&addr).copied().unwrap_or(0) >= i.max_per_addr {
            return Err(Refusal::PerAddress {
                pool: i.name,
                max: i.max_per_addr,
            });
        }
        if used.total >= i.max_total {
            match used.queue.pop_front().filter(|_| i.evict_oldest) {
                // The oldest ends (and gives its slot back) as soon as it is told.
                Some((_, oldest)) => oldest.notify_one(),
                None => {
                    return Err(Refusal::Full {
                        pool: i.name,
                        max: i.max_total,
                    });
                }
            }
        }
        *used.per.entry(addr.clone()).or_default() += 1;
        used.total += 1;
        used.next_id += 1;
        let id = used.next_id;
        let evicted = Arc::new(tokio::sync::Notify::new());
        if i.evict_oldest {
            used.queue.push_back((id, evicted.clone()));
        }
        Ok(Permit {
            inner: i.clone(),
            addr,
            id,
            evicted,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.inner
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total
    }

    /// The pool's total.
    pub fn max_total(&self) -> usize {
        self.inner.max_total
    }
}

/// A rate: `rate` a second, with a burst of as many.
pub struct TokenBucket {
    rate: f64,
    /// Tokens left, and when they were last topped up (tokio's clock, which tests
    /// can pause).
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl TokenBucket {
    /// A full bucket of `rate` a second (at least one).
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(1.0);
        Self {
            rate,
            state: Mutex::new((rate, tokio::time::Instant::now())),
        }
    }

    /// The rate, a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Take a token, or say how long until there is one (at least 50 ms).
    pub fn take(&self) -> Result<(), std::time::Duration> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(self.rate);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - b.0) / self.rate)
                .max(std::time::Duration::from_millis(50)))
        }
    }
}

/// How far behind the hub runs, measured all the time two ways: the lateness of a
/// short timer (the runtime's queue), and the backlog of its QUIC socket (the one
/// reader of every edge's packets, which the runtime's timers do not see: quinn's
/// endpoint reads for 50 µs a turn, and a queue long with other work makes its turns
/// rare while each timer is still served on time).
///
/// A hub whose CPU is spent falls behind on everything at once; what it can put off
/// cheaply waits while it is behind: new edge connections (a QUIC refusal costs no
/// cryptography), writes through the API, and new placements. The sessions it has
/// keep the CPU. Without this a fleet joining or reconnecting faster than the hub can
/// finish handshakes starves the sessions already up: they time out, their edges
/// reconnect, and the reconnections cost more (30,000 simulated edges fell back to
/// 8,500 so); and a burst of placements starved the socket until 100,000 did.
#[derive(Clone)]
pub struct LoadGauge {
    lag_us: Arc<std::sync::atomic::AtomicU64>,
    /// Shed above this lag (microseconds; 0: never).
    over_us: Arc<std::sync::atomic::AtomicU64>,
    packets: Arc<Packets>,
}

/// The QUIC socket's backlog as last read, and until when it counts as behind.
#[derive(Default)]
struct Packets {
    queued: std::sync::atomic::AtomicU64,
    /// Datagrams the kernel dropped since the socket opened.
    drops: std::sync::atomic::AtomicU64,
    /// Dropped within the last [`PACKETS_HOLD`] (for the refusal's message).
    dropped_lately: std::sync::atomic::AtomicU64,
    /// Behind until this many microseconds after `epoch` (0: not behind).
    behind_until_us: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl Packets {
    fn now_us(&self) -> u64 {
        self.epoch
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_micros() as u64
    }
}

/// How often the QUIC socket's backlog is read (a look at `/proc/net/udp`, which
/// lists every UDP socket of the network namespace).
const PACKETS_PROBE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long one look that found the socket behind keeps the hub shedding: long
/// enough that a burst held off sees the queue drain, short enough that the work put
/// off resumes within a second or two of it.
const PACKETS_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a look at the socket finds it behind: more than a quarter of its buffer
/// unread, or datagrams dropped since the last look.
pub fn packets_behind(
    was: verge_tunnel::backlog::Backlog,
    now: verge_tunnel::backlog::Backlog,
    buffer: u64,
) -> bool {
    now.drops > was.drops || now.queued > buffer / 4
}

impl Default for LoadGauge {
    fn default() -> Self {
        Self::shedding_over(SHED_LAG)
    }
}

/// How often the gauge measures.
const LOAD_PROBE: std::time::Duration = std::time::Duration::from_millis(50);

/// Scheduler lag above which new edge connections are refused. Far below anything a
/// session notices (an edge waits two heartbeats for its hub), far above the jitter of
/// a hub that keeps up (a few milliseconds).
pub const SHED_LAG: std::time::Duration = std::time::Duration::from_millis(200);

impl LoadGauge {
    /// A gauge that sheds while the lag is over `lag` (zero: never sheds).
    pub fn shedding_over(lag: std::time::Duration) -> Self {
        Self {
            lag_us: Arc::default(),
            over_us: Arc::new((lag.as_micros() as u64).into()),
            packets: Arc::default(),
        }
    }

    /// Shed above `lag` from now on (zero: never).
    pub fn set_threshold(&self, lag: std::time::Duration) {
        self.over_us
            .store(lag.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Measure until the task is dropped: each probe's lateness is the lag.
    pub async fn run(self) {
        use std::sync::atomic::Ordering;
        loop {
            let asked = tokio::time::Instant::now();
            tokio::time::sleep(LOAD_PROBE).await;
            let late = asked.elapsed().saturating_sub(LOAD_PROBE);
            // A moving average: one stall (the machine busy elsewhere for a moment)
            // is not overload; a run of late probes is.
            let was = self.lag_us.load(Ordering::Relaxed);
            let next = (was * 3 + late.as_micros() as u64) / 4;
            self.lag_us.store(next, Ordering::Relaxed);
        }
    }

    /// Read the QUIC socket's backlog until the task is dropped; while it is behind
    /// ([`packets_behind`]), and for [`PACKETS_HOLD`] after, the hub sheds.
    pub async fn watch_packets(self, socket: verge_tunnel::backlog::SocketWatch) {
        use std::sync::atomic::Ordering;
        let p = &self.packets;
        let mut was = socket.read().unwrap_or_default();
        let mut ticker = tokio::time::interval(PACKETS_PROBE);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // A blocking read, but of a small file the kernel writes out at once.
            let Some(now) = socket.read() else { continue };
            if packets_behind(was, now, socket.buffer()) {
                p.behind_until_us.store(
                    p.now_us() + PACKETS_HOLD.as_micros() as u64,
                    Ordering::Relaxed,
                );
                let dropped = now.drops.saturating_sub(was.drops);
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        queued = now.queued,
                        "the hub's QUIC socket dropped datagrams: it sheds new work until it catches up"
                    );
                }
                p.dropped_lately.store(dropped, Ordering::Relaxed);
            }
            p.queued.store(now.queued, Ordering::Relaxed);
            p.drops.store(now.drops, Ordering::Relaxed);
            was = now;
        }
    }

    /// The QUIC socket's backlog at the last look: bytes unread and datagrams dropped
    /// since it opened (zeros when it is not watched).
    pub fn packets(&self) -> verge_tunnel::backlog::Backlog {
        use std::sync::atomic::Ordering;
        verge_tunnel::backlog::Backlog {
            queued: self.packets.queued.load(Ordering::Relaxed),
            drops: self.packets.drops.load(Ordering::Relaxed),
        }
    }

    /// Wait until the hub is not shedding (checked every 100 ms), at most `limit`;
    /// whether it caught up within it.
    pub async fn caught_up(&self, limit: std::time::Duration) -> bool {
        let start = tokio::time::Instant::now();
        while self.shedding().is_some() {
            if start.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        true
    }

    /// The lag measured lately.
    pub fn lag(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.lag_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether new work should wait now, and why: the runtime's lag over the
    /// threshold (`overloaded`), or the QUIC socket behind (`packets_behind`). Never
    /// with a threshold of zero.
    pub fn shedding(&self) -> Option<Refusal> {
        use std::sync::atomic::Ordering;
        let lag = self.lag();
        let over = self.over_us.load(Ordering::Relaxed);
        if over == 0 {
            return None;
        }
        if lag.as_micros() as u64 > over {
            return Some(Refusal::Overloaded {
                lag_ms: lag.as_millis() as u64,
            });
        }
        let p = &self.packets;
        (p.now_us() < p.behind_until_us.load(Ordering::Relaxed)).then(|| Refusal::PacketsBehind {
            queued: p.queued.load(Ordering::Relaxed),
            dropped: p.dropped_lately.load(Ordering::Relaxed),
        })
    }

    #[cfg(test)]
    pub(crate) fn set(&self, lag: std::time::Duration) {
        self.lag_us
            .store(lag.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The hub's connection pools.
#[derive(Clone)]
pub struct Limits {
    /// Every TCP connection: the descriptor budget.
    pub connections: Pool,
    /// Connections whose peer is not known yet.
    pub unauthenticated: Pool,
    /// REST connections.
    pub http: Pool,
    /// How far behind the hub runs (new edge connections wait while it is too far).
    pub load: LoadGauge,
}

impl Limits {
    /// Pools sized from the process's open-file limit (raised to its hard limit first).
    pub fn from_descriptor_limit() -> Self {
        Self::for_budget(descriptor_limit().saturating_sub(FD_RESERVE).max(64))
    }

    /// Pools for `budget` connections: strangers get a quarter of it (64 per address),
    /// REST half (256 per address); edges with certificates can use all of it.
    pub fn for_budget(budget: usize) -> Self {
        Self {
            connections: Pool::new("all", budget, budget),
            unauthenticated: Pool::evicting("unauthenticated", (budget / 4).min(4096), 64),
            http: Pool::new("http", budget / 2, 256),
            load: LoadGauge::default(),
        }
    }
}

/// The process's open-file limit, after raising the soft limit to the hard one.
pub fn descriptor_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if setrlimit(Resource::Nofile, lim).is_err() {
            lim = getrlimit(Resource::Nofile);
        }
    }
    lim.current.map_or(1 << 20, |n| n.min(1 << 20) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_caps_its_total_and_each_address_and_gives_slots_back() {
        let pool = Pool::new("test", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p1 = pool.acquire(a).expect("first");
        let _p2 = pool.acquire(a).expect("second");
        assert_eq!(
            pool.acquire(a).err(),
            Some(Refusal::PerAddress {
                pool: "test",
                max: 2
            })
        );
        let _p3 = pool.acquire(b).expect("other address");
        assert_eq!(
            pool.acquire(b).err(),
            Some(Refusal::Full {
                pool: "test",
                max: 3
            })
        );
        drop(p1);
        assert_eq!(pool.in_use(), 2);
        pool.acquire(a).expect("slot given back");
    }

    #[test]
    fn a_token_bucket_allows_its_rate_and_says_when_to_come_back() {
        let b = TokenBucket::new(10.0);
        for _ in 0..10 {
            assert!(b.take().is_ok(), "a full bucket allows a burst of its rate");
        }
        let wait = b.take().expect_err("empty");
        assert!(
            wait >= std::time::Duration::from_millis(50)
                && wait <= std::time::Duration::from_millis(110),
            "{wait:?}"
        );
        assert_eq!(TokenBucket::new(0.0).rate(), 1.0, "at least one a second");
    }

    #[tokio::test]
    async fn the_gauge_sheds_only_while_the_hub_lags() {
        let gauge = LoadGauge::default();
        assert_eq!(gauge.shedding(), None);
        gauge.set(SHED_LAG * 2);
        let r = gauge.shedding().expect("sheds while far behind");
        assert_eq!(r.reason(), "overloaded");
        assert!(r.to_string().contains("400 ms behind"), "{r}");
        // A runtime that keeps up brings the lag back down, and the refusals end.
        let probe = tokio::spawn(gauge.clone().run());
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while gauge.lag() > std::time::Duration::from_millis(10) {
                tokio::time::sleep(LOAD_PROBE).await;
            }
        })
        .await
        .expect("the lag decays once the hub keeps up");
        // One stall is not overload: block the runtime's only worker for 300 ms
        // (blocking it is the point here).
        #[allow(clippy::disallowed_methods)]
        let stall = || std::thread::sleep(std::time::Duration::from_millis(300));
        let probes = || tokio::time::sleep(LOAD_PROBE + LOAD_PROBE / 2);
        stall();
        probes().await;
        assert_eq!(gauge.shedding(), None, "{:?}", gauge.lag());
        // A runtime kept busy all the time is.
        for _ in 0..16 {
            stall();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(gauge.shedding().is_some(), "{:?}", gauge.lag());
        probe.abort();
    }

    #[test]
    fn a_socket_is_behind_when_it_dropped_or_holds_a_quarter_of_its_buffer() {
        use verge_tunnel::backlog::Backlog;
        let at = |queued, drops| Backlog { queued, drops };
        assert!(!packets_behind(at(0, 5), at(1000, 5), 8000));
        assert!(!packets_behind(at(0, 5), at(2000, 5), 8000));
        assert!(packets_behind(at(0, 5), at(2001, 5), 8000));
        assert!(packets_behind(at(0, 5), at(0, 6), 8000));
    }

    #[tokio::test]
    async fn the_gauge_sheds_while_its_socket_is_left_unread_and_a_second_after() {
        let secs = std::time::Duration::from_secs;
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        rustix::net::sockopt::set_socket_recv_buffer_size(&rx, 4096).expect("buffer");
        let watch = verge_tunnel::backlog::SocketWatch::of(&rx).expect("watch");
        let gauge = LoadGauge::default();
        let task = tokio::spawn(gauge.clone().watch_packets(watch));
        tokio::time::sleep(PACKETS_PROBE * 2).await;
        assert_eq!(gauge.shedding(), None, "a socket read in time");
        // More than its buffer holds, never read: the kernel queues, then drops.
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..100 {
            tx.send_to(&[1; 200], rx.local_addr().expect("addr"))
                .expect("send");
        }
        let refusal = tokio::time::timeout(secs(5), async {
            loop {
                if let Some(r) = gauge.shedding() {
                    break r;
                }
                tokio::time::sleep(PACKETS_PROBE / 5).await;
            }
        })
        .await
        .expect("the gauge sees the socket behind");
        assert_eq!(refusal.reason(), "packets_behind");
        assert!(refusal.to_string().contains("dropped lately"), "{refusal}");
        assert!(gauge.packets().drops > 0, "{:?}", gauge.packets());
        // Read at last: the hub catches up a moment after the last bad look.
        rx.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0; 256];
        while rx.recv(&mut buf).is_ok() {}
        let start = tokio::time::Instant::now();
        assert!(gauge.caught_up(secs(5)).await, "{:?}", gauge.shedding());
        assert!(start.elapsed() >= PACKETS_HOLD / 2, "{:?}", start.elapsed());
        // A threshold of zero never sheds, whatever the socket says.
        gauge.set_threshold(std::time::Duration::ZERO);
        for _ in 0..100 {
            tx.send_to(&[1; 200], rx.local_addr().expect("addr"))
                .expect("send");
        }
        tokio::time::sleep(PACKETS_PROBE * 3).await;
        assert_eq!(gauge.shedding(), None);
        task.abort();
    }

    #[tokio::test]
    async fn an_evicting_pool_ends_its_oldest_holder_to_make_room() {
        let pool = Pool::evicting("test", 2, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let oldest = pool.acquire(a).expect("first");
        let _second = pool.acquire(b).expect("second");
        let _third = pool.acquire(b).expect("room is made");
        tokio::time::timeout(std::time::Duration::from_secs(1), oldest.evicted())
            .await
            .expect("the oldest is told to go");
        drop(oldest);
        assert_eq!(pool.in_use(), 2);
        // The per-address cap still refuses outright.
        assert!(matches!(pool.acquire(b), Err(Refusal::PerAddress { .. })));
    }
}
