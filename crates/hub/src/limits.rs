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
    used: Mutex<(usize, HashMap<K, usize>)>,
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
}

impl Refusal {
    /// A metric label for the refusal.
    pub fn reason(&self) -> String {
        match self {
            Refusal::Full { pool, .. } => format!("{pool}_full"),
            Refusal::PerAddress { pool, .. } => format!("{pool}_per_address"),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { pool, max } => write!(f, "{pool} connections at their limit ({max})"),
            Refusal::PerAddress { pool, max } => {
                write!(f, "{pool} connections from this address at their limit ({max})")
            }
        }
    }
}

/// A held slot; dropping it gives the slot back.
pub struct Permit<K: Key = IpAddr> {
    inner: Arc<Inner<K>>,
    addr: K,
}

impl<K: Key> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut used = self.inner.used.lock().unwrap_or_else(|e| e.into_inner());
        used.0 = used.0.saturating_sub(1);
        if let Some(n) = used.1.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                used.1.remove(&self.addr);
            }
        }
    }
}

impl<K: Key> Pool<K> {
    /// A pool of `max_total` slots, at most `max_per_addr` of them per key.
    pub fn new(name: &'static str, max_total: usize, max_per_addr: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                max_total: max_total.max(1),
                max_per_addr: max_per_addr.max(1),
                used: Mutex::new((0, HashMap::new())),
            }),
        }
    }

    /// Take a slot for `addr`.
    pub fn acquire(&self, addr: K) -> Result<Permit<K>, Refusal> {
        let i = &self.inner;
        let mut used = i.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 >= i.max_total {
            return Err(Refusal::Full {
                pool: i.name,
                max: i.max_total,
            });
        }
        let per = used.1.entry(addr.clone()).or_default();
        if *per >= i.max_per_addr {
            return Err(Refusal::PerAddress {
                pool: i.name,
                max: i.max_per_addr,
            });
        }
        *per += 1;
        used.0 += 1;
        Ok(Permit {
            inner: i.clone(),
            addr,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.inner.used.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The pool's total.
    pub fn max_total(&self) -> usize {
        self.inner.max_total
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
            unauthenticated: Pool::new("unauthenticated", (budget / 4).min(4096), 64),
            http: Pool::new("http", budget / 2, 256),
        }
    }
}

/// The process's open-file limit, after raising the soft limit to the hard one.
pub fn descriptor_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if setrlimit(Resource::Nofile, lim.clone()).is_err() {
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
}
