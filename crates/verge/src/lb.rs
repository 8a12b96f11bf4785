//! `verge lb`: the site-local L4 (TCP) load balancer, a platform service built into
//! Verge. A cluster template runs it as a process whose command is `verge` (the agent
//! runs its own binary: nothing to install on the node), e.g. in front of an
//! application's instances at that site:
//!
//! ```yaml
//! - name: lb
//!   template:
//!     form: process
//!     process: {command: [verge, lb]}   # LB_LISTEN, LB_APP, LB_PORT from parameters
//! ```
//!
//! Its backends are the Running instances of the application (`--app`, optionally
//! one `--component`) in the clusters of its node, at the port named `--port`: the
//! hub tells every node its clusters' endpoints and the agent keeps them in the file
//! `VERGE_ENDPOINTS` names, which this reads again whenever it changes. Fixed
//! `--backend`s may be added. Each backend is checked by a TCP connect every
//! `--check-every`; `--fall` failures in a row take it out, `--rise` successes bring
//! it back, and a connection it refuses counts as a failure at once (and the client's
//! connection goes to the next healthy one), so a killed backend stops getting new
//! connections at once and is out within `fall` checks. It keeps working with the
//! last endpoints it had while the node is cut off from the hub.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};
use verge_api::cluster::Endpoint;
use verge_edge::health::Streak;

use crate::parse_duration;

/// `verge lb`'s flags; each may come from the environment (a cluster template's
/// parameters reach its services as environment variables).
#[derive(clap::Args, Debug, Clone)]
pub struct LbArgs {
    /// Where to listen, HOST:PORT.
    #[arg(long, env = "LB_LISTEN")]
    listen: SocketAddr,
    /// The application (or cluster template) whose instances to balance over.
    #[arg(long, env = "LB_APP")]
    app: Option<String>,
    /// Only this component of it.
    #[arg(long, env = "LB_COMPONENT")]
    component: Option<String>,
    /// Their port to send to: its name or its number (default: their only port).
    #[arg(long, env = "LB_PORT")]
    port: Option<String>,
    /// Fixed backends, HOST:PORT (repeat, or comma-separated).
    #[arg(long = "backend", env = "LB_BACKENDS", value_delimiter = ',')]
    backends: Vec<SocketAddr>,
    /// The endpoints file the agent keeps (set for every workload).
    #[arg(long, env = "VERGE_ENDPOINTS")]
    endpoints: Option<PathBuf>,
    /// How often each backend is checked.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    check_every: Duration,
    /// How long a check or a connection to a backend may take.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Failed checks in a row that take a backend out.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fall: u32,
    /// Passed checks in a row that bring it back.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    rise: u32,
    /// Client connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
}

/// The backends and their health (each a [`Streak`] of checks): pure, so the rules
/// are tested without sockets.
#[derive(Debug, Default)]
pub struct Pool {
    backends: BTreeMap<SocketAddr, Streak>,
    next: usize,
    fall: u32,
    rise: u32,
}

/// A backend that went in or out.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// It passes its checks: it gets connections.
    Up(SocketAddr),
    /// It failed them: it gets none.
    Down(SocketAddr),
}

impl Pool {
    /// A pool that takes a backend out after `fall` failures and back after `rise`.
    pub fn new(fall: u32, rise: u32) -> Self {
        Self {
            fall: fall.max(1),
            rise: rise.max(1),
            ..Self::default()
        }
    }

    /// Make the backends exactly `want`: new ones wait for their first check, those
    /// kept keep their health.
    pub fn set(&mut self, want: impl IntoIterator<Item = SocketAddr>) {
        let want: std::collections::BTreeSet<SocketAddr> = want.into_iter().collect();
        self.backends.retain(|a, _| want.contains(a));
        for a in want {
            self.backends.entry(a).or_default();
        }
    }

    /// Every backend, to check.
    pub fn all(&self) -> Vec<SocketAddr> {
        self.backends.keys().copied().collect()
    }

    /// Take a check's result.
    pub fn observe(&mut self, addr: SocketAddr, ok: bool) -> Option<Change> {
        let (fall, rise) = (self.fall, self.rise);
        match self.backends.get_mut(&addr)?.observe(ok, fall, rise)? {
            true => Some(Change::Up(addr)),
            false => Some(Change::Down(addr)),
        }
    }

    /// Mark a backend down now (it refused a client's connection).
    pub fn refused(&mut self, addr: SocketAddr) -> Option<Change> {
        self.backends
            .get_mut(&addr)?
            .down_now()
            .then_some(Change::Down(addr))
    }

    /// The healthy backends in the order a new connection tries them (round robin).
    pub fn pick(&mut self) -> Vec<SocketAddr> {
        let healthy: Vec<SocketAddr> = self
            .backends
            .iter()
            .filter(|(_, h)| h.healthy == Some(true))
            .map(|(a, _)| *a)
            .collect();
        if healthy.is_empty() {
            return healthy;
        }
        let start = self.next % healthy.len();
        self.next = self.next.wrapping_add(1);
        healthy[start..]
            .iter()
            .chain(&healthy[..start])
            .copied()
            .collect()
    }
}

/// The addresses of `app`'s instances (of `component`, if given) at `port` (a name or
/// a number; none: their only port) among `endpoints`.
pub fn backends_of(
    endpoints: &[Endpoint],
    app: &str,
    component: Option<&str>,
    port: Option<&str>,
) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter(|e| e.application == app && component.is_none_or(|c| e.component == c))
        .filter_map(|e| {
            let p = match port {
                None => match e.ports.as_slice() {
                    [only] => only.port,
                    _ => return None,
                },
                Some(p) => {
                    e.ports
                        .iter()
                        .find(|s| s.name == p || s.port.to_string() == p)?
                        .port
                }
            };
            let ip: std::net::IpAddr = e.host.parse().ok()?;
            Some(SocketAddr::new(ip, p))
        })
        .collect()
}

fn lock(p: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn announce(change: Option<Change>) {
    match change {
        Some(Change::Up(a)) => println!("backend {a} up"),
        Some(Change::Down(a)) => println!("backend {a} down"),
        None => {}
    }
}

/// Run the load balancer until the process is stopped.
pub async fn run(args: LbArgs) -> Result<()> {
    if args.app.is_none() && args.backends.is_empty() {
        bail!(
            "verge lb has nothing to balance over: give --app NAME (LB_APP), the application whose instances at this site get the traffic, or --backend HOST:PORT"
        );
    }
    if args.app.is_some() && args.endpoints.is_none() {
        bail!(
            "--app needs the node's endpoints file (--endpoints, or VERGE_ENDPOINTS, which the agent sets for every workload); outside an instance give --backend HOST:PORT"
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there", args.listen))?;
    println!(
        "verge lb listening on {}, for {}",
        args.listen,
        args.app.as_deref().unwrap_or("fixed backends")
    );
    let pool = Arc::new(Mutex::new(Pool::new(args.fall, args.rise)));
    lock(&pool).set(args.backends.iter().copied());
    tokio::spawn(discover(args.clone(), pool.clone()));
    tokio::spawn(check(args.clone(), pool.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(args.max_connections.max(1)));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                eprintln!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (pool, timeout) = (pool.clone(), args.connect_timeout);
        tokio::spawn(async move {
            let _permit = permit;
            serve(client, &pool, timeout).await;
        });
    }
}

/// Send one client's connection to the first healthy backend that takes it.
async fn serve(mut client: TcpStream, pool: &Mutex<Pool>, timeout: Duration) {
    let order = lock(pool).pick();
    for addr in order {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut backend)) => {
                let _ = client.set_nodelay(true);
                let _ = backend.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                return;
            }
            _ => announce(lock(pool).refused(addr)),
        }
    }
}

/// Keep the backends: the fixed ones and the application's, read again from the
/// endpoints file whenever it changes (a file that does not parse keeps the last).
async fn discover(args: LbArgs, pool: Arc<Mutex<Pool>>) {
    let (Some(app), Some(file)) = (args.app.as_deref(), args.endpoints.as_ref()) else {
        return;
    };
    let mut seen: Option<SystemTime> = None;
    loop {
        let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != seen {
            match std::fs::read(file)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<Vec<Endpoint>>(&b).map_err(|e| e.to_string())
                }) {
                Ok(endpoints) => {
                    seen = modified;
                    let mut want = backends_of(
                        &endpoints,
                        app,
                        args.component.as_deref(),
                        args.port.as_deref(),
                    );
                    want.extend(&args.backends);
                    // In the pool's order (sorted, once each), to say only a change.
                    want.sort();
                    want.dedup();
                    let mut p = lock(&pool);
                    if p.all() != want {
                        println!("backends: {want:?}");
                    }
                    p.set(want);
                }
                Err(e) => eprintln!("{}: {e}; keeping the backends it had", file.display()),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Check every backend every `check_every`, all at once.
async fn check(args: LbArgs, pool: Arc<Mutex<Pool>>) {
    let mut every = tokio::time::interval(args.check_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let targets = lock(&pool).all();
        let checks = targets.into_iter().map(|addr| async move {
            let ok = matches!(
                tokio::time::timeout(args.connect_timeout, TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (addr, ok)
        });
        for (addr, ok) in futures_util::future::join_all(checks).await {
            announce(lock(&pool).observe(addr, ok));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_backend_goes_out_after_fall_failures_and_back_after_rise() {
        let mut p = Pool::new(2, 2);
        p.set([a(1), a(2)]);
        assert!(p.pick().is_empty(), "nothing before its first check");
        assert_eq!(
            p.observe(a(1), true),
            Some(Change::Up(a(1))),
            "the first check decides"
        );
        assert_eq!(p.observe(a(2), true), Some(Change::Up(a(2))));
        assert_eq!(p.observe(a(1), false), None, "one failure is not enough");
        assert_eq!(p.observe(a(1), true), None);
        assert_eq!(p.observe(a(1), false), None, "the streak started again");
        assert_eq!(p.observe(a(1), false), Some(Change::Down(a(1))));
        assert_eq!(p.pick(), vec![a(2)]);
        assert_eq!(p.observe(a(1), true), None);
        assert_eq!(p.observe(a(1), true), Some(Change::Up(a(1))));
        assert_eq!(p.pick().len(), 2);
    }

    #[test]
    fn a_refused_connection_takes_a_backend_out_at_once_and_picks_go_round() {
        let mut p = Pool::new(3, 1);
        p.set([a(1), a(2), a(3)]);
        for port in 1..=3 {
            p.observe(a(port), true);
        }
        let firsts: Vec<SocketAddr> = (0..3).map(|_| p.pick()[0]).collect();
        assert_eq!(firsts, [a(1), a(2), a(3)], "round robin");
        assert_eq!(p.refused(a(2)), Some(Change::Down(a(2))));
        assert_eq!(p.refused(a(2)), None, "already down");
        assert!(p.pick().iter().all(|b| *b != a(2)));
        // Kept backends keep their health; gone ones go; new ones wait.
        p.set([a(1), a(2), a(4)]);
        assert_eq!(p.all(), [a(1), a(2), a(4)]);
        assert_eq!(p.pick(), [a(1)]);
    }

    #[test]
    fn backends_are_the_apps_instances_at_the_named_port() {
        let e = |inst: &str, app: &str, comp: &str, host: &str, ports: &[(&str, u16)]| Endpoint {
            instance: inst.into(),
            application: app.into(),
            component: comp.into(),
            node: "n".into(),
            host: host.into(),
            ports: ports
                .iter()
                .map(|(n, p)| verge_api::instance::PortSpec {
                    name: (*n).into(),
                    port: *p,
                })
                .collect(),
        };
        let all = [
            e(
                "w-0",
                "web",
                "front",
                "10.0.0.1",
                &[("http", 80), ("admin", 81)],
            ),
            e("w-1", "web", "front", "10.0.0.2", &[("http", 80)]),
            e("w-2", "web", "back", "10.0.0.3", &[("http", 8080)]),
            e("s-0", "shop", "front", "10.0.0.4", &[("http", 80)]),
            e("w-3", "web", "front", "not an ip", &[("http", 80)]),
        ];
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            backends_of(&all, "web", Some("front"), Some("http")),
            [addr("10.0.0.1:80"), addr("10.0.0.2:80")]
        );
        assert_eq!(
            backends_of(&all, "web", None, Some("8080")),
            [addr("10.0.0.3:8080")]
        );
        // No port named: only those with a single port.
        assert_eq!(
            backends_of(&all, "web", None, None),
            [addr("10.0.0.2:80"), addr("10.0.0.3:8080")]
        );
    }
}
