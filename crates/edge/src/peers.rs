//! Probing the other nodes of this node's site, so that the hub can tell a node that
//! is down from one that is only cut off from it (in the spirit of SuperEdge's
//! edge-health: the peers vote).
//!
//! The hub sends the site's peers and key over the channel ([`HubToEdge::Peers`]);
//! every [`PeerProbes::every`] this node sends each peer a signed probe
//! ([`verge_tunnel::probe`]) and answers theirs. A peer that answered within five
//! rounds is `reachable`; one that has not for five rounds is `unreachable`; the
//! verdicts ride on the node's facts to the hub. Probing goes on while the hub is
//! unreachable (the verdicts are sent when it returns), and answers are given
//! whatever this node's own link does, which is the point.
//!
//! [`HubToEdge::Peers`]: verge_api::channel::HubToEdge::Peers

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use verge_api::PeerVerdict;
use verge_api::channel::SitePeer;
use verge_tunnel::probe::{MAX_PROBE, Probe, ProbeKind};

/// Rounds without an answer before a peer is unreachable (and with one, reachable).
/// (Five, not fewer: a loaded node that misses a round or two must not make its peers
/// count it down; the hub waits far longer than this before anything is replaced.)
const ROUNDS: u32 = 5;

struct Peer {
    addr: SocketAddr,
    /// When this node began probing it.
    since: Instant,
    /// The nonce of the last probe sent to it.
    nonce: u64,
    /// When it last answered a probe of ours.
    answered: Option<Instant>,
}

#[derive(Default)]
struct State {
    key: Vec<u8>,
    peers: BTreeMap<String, Peer>,
}

/// This node's prober and answerer ([module docs](self)).
pub struct PeerProbes {
    name: String,
    socket: UdpSocket,
    advertise: String,
    every: Duration,
    state: Mutex<State>,
}

impl PeerProbes {
    /// Bind the probe socket. `advertise` is the address peers are told to probe
    /// (default: the bound address, which must then be a specific one).
    pub async fn bind(
        name: &str,
        listen: SocketAddr,
        advertise: Option<String>,
        every: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let socket = UdpSocket::bind(listen).await?;
        let bound = socket.local_addr()?;
        let advertise = match advertise {
            Some(a) => a,
            None if bound.ip().is_unspecified() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "--peer-listen {listen} is every address; give --peer-advertise HOST:PORT, the address this node's site peers reach it at"
                    ),
                ));
            }
            None => bound.to_string(),
        };
        Ok(Arc::new(Self {
            name: name.to_string(),
            socket,
            advertise,
            every,
            state: Mutex::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where peers reach this node.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// How often each peer is probed.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// The site's peers and key, as the hub last said. Peers already known keep what
    /// was learnt of them.
    pub fn set_peers(&self, key_hex: &str, peers: &[SitePeer]) {
        let key = verge_tunnel::pki::unhex(key_hex).unwrap_or_default();
        let mut s = self.lock();
        if s.key != key {
            // Answers signed with the old key no longer count.
            for p in s.peers.values_mut() {
                p.answered = None;
            }
            s.key = key;
        }
        let now = Instant::now();
        let mut next = BTreeMap::new();
        for p in peers {
            if p.name == self.name {
                continue;
            }
            let Ok(addr) = p.address.parse::<SocketAddr>() else {
                tracing::warn!(peer = %p.name, address = %p.address, "peer address is not IP:PORT; not probing it");
                continue;
            };
            let entry = match s.peers.remove(&p.name) {
                Some(old) if old.addr == addr => old,
                _ => Peer {
                    addr,
                    since: now,
                    nonce: 0,
                    answered: None,
                },
            };
            next.insert(p.name.clone(), entry);
        }
        s.peers = next;
    }

    /// What this node sees of its peers now. A peer probed for less than five rounds
    /// that has not answered yet has no verdict.
    pub fn verdicts(&self) -> BTreeMap<String, PeerVerdict> {
        let window = self.every * ROUNDS;
        let s = self.lock();
        s.peers
            .iter()
            .filter_map(|(name, p)| {
                let v = match p.answered {
                    Some(t) if t.elapsed() <= window => PeerVerdict::Reachable,
                    _ if p.since.elapsed() < window => return None,
                    _ => PeerVerdict::Unreachable,
                };
                Some((name.clone(), v))
            })
            .collect()
    }

    /// Probe and answer until dropped.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; MAX_PROBE + 1];
        loop {
            tokio::select! {
                _ = tick.tick() => self.probe_all().await,
                r = self.socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    self.received(&buf[..n], from).await;
                }
            }
        }
    }

    async fn probe_all(&self) {
        let sends: Vec<(SocketAddr, Vec<u8>)> = {
            let mut s = self.lock();
            if s.key.is_empty() {
                return;
            }
            let key = s.key.clone();
            s.peers
                .iter_mut()
                .map(|(name, p)| {
                    p.nonce = rand::random();
                    let d = Probe::signed(ProbeKind::Probe, &self.name, name, p.nonce, &key);
                    (p.addr, d)
                })
                .collect()
        };
        for (addr, d) in sends {
            // A peer that is down may answer with an ICMP error: that is its verdict
            // arriving, not ours to report.
            let _ = self.socket.send_to(&d, addr).await;
        }
    }

    async fn received(&self, datagram: &[u8], from: SocketAddr) {
        let key = self.lock().key.clone();
        if key.is_empty() {
            return;
        }
        let Ok(p) = Probe::open(datagram, &key) else {
            tracing::debug!(%from, "dropped a datagram on the probe socket");
            return;
        };
        if p.to != self.name {
            return;
        }
        match p.kind {
            ProbeKind::Probe => {
                let answer = Probe::signed(ProbeKind::Ack, &self.name, &p.from, p.nonce, &key);
                let _ = self.socket.send_to(&answer, from).await;
            }
            ProbeKind::Ack => {
                let mut s = self.lock();
                if let Some(peer) = s.peers.get_mut(&p.from)
                    && peer.nonce == p.nonce
                {
                    peer.answered = Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node(name: &str) -> Arc<PeerProbes> {
        let p = PeerProbes::bind(
            name,
            "127.0.0.1:0".parse().expect("addr"),
            None,
            Duration::from_millis(50),
        )
        .await
        .expect("bind");
        tokio::spawn(p.clone().run());
        p
    }

    fn peer(p: &PeerProbes, name: &str) -> SitePeer {
        SitePeer {
            name: name.into(),
            address: p.advertise().into(),
        }
    }

    /// Wait (up to 10 s: a loaded machine delays rounds) until `f` holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn peers_that_answer_are_reachable_and_one_that_stops_is_not() {
        let (a, b) = (node("a").await, node("b").await);
        a.set_peers("0a0b", &[peer(&b, "b")]);
        b.set_peers("0a0b", &[peer(&a, "a")]);
        eventually("both reach each other", || {
            a.verdicts().get("b") == Some(&PeerVerdict::Reachable)
                && b.verdicts().get("a") == Some(&PeerVerdict::Reachable)
        })
        .await;
        // b stops answering (no key: it drops everything).
        b.set_peers("", &[]);
        eventually("a no longer reaches b", || {
            a.verdicts().get("b") == Some(&PeerVerdict::Unreachable)
        })
        .await;
    }

    #[tokio::test]
    async fn a_peer_with_another_key_is_not_believed() {
        let (a, b) = (node("a").await, node("b").await);
        a.set_peers("0a0b", &[peer(&b, "b")]);
        b.set_peers("0c0d", &[peer(&a, "a")]);
        eventually("neither believes the other", || {
            a.verdicts().get("b") == Some(&PeerVerdict::Unreachable)
                && b.verdicts().get("a") == Some(&PeerVerdict::Unreachable)
        })
        .await;
        // Never reachable on the way there.
        assert!(a.lock().peers["b"].answered.is_none());
    }

    #[tokio::test]
    async fn a_new_peer_has_no_verdict_until_it_had_its_chance() {
        let a = node("a").await;
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        a.set_peers(
            "0a0b",
            &[SitePeer {
                name: "z".into(),
                address: silent.local_addr().expect("addr").to_string(),
            }],
        );
        assert_eq!(a.verdicts().get("z"), None);
        eventually("z is unreachable", || {
            a.verdicts().get("z") == Some(&PeerVerdict::Unreachable)
        })
        .await;
    }
}
