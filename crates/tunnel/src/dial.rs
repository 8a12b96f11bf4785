//! Dialing a hub's channel: QUIC first, TLS over TCP when QUIC meets silence or a
//! failure that TCP may not share, remembering per endpoint what was learnt (a path
//! that filters UDP stays on TCP for a while). Edges dial their hub with it, and a
//! region hub its centre.

use std::sync::Arc;
use std::time::Duration;

use crate::quic::Duplex;
use crate::tls::TlsError;

/// A connection made: the duplex stream of the channel, the QUIC connection it rides
/// on (None over TCP: data streams then need TLS connections of their own), and the
/// transport's name (`quic` or `tls`).
pub type Connected = (Box<dyn Duplex>, Option<quinn::Connection>, &'static str);

/// Why a dial came to nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialFailure {
    /// What happened, for the log.
    pub why: String,
    /// The hub answered and turned the connection away before its handshake, or was
    /// too busy to finish it: it is taking a fleet back at the pace it can, so come
    /// back later, not at once.
    pub turned_away: bool,
}

impl DialFailure {
    fn new(why: impl Into<String>) -> Self {
        Self {
            why: why.into(),
            turned_away: false,
        }
    }
}

impl std::fmt::Display for DialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// What to dial, and with what.
pub struct Target<'a> {
    /// `HOST:PORT`.
    pub addr: &'a str,
    /// The CA the hub's certificate must chain to.
    pub ca_pem: &'a str,
    /// Our certificate and key (PEM), if we present one.
    pub identity: Option<(&'a str, &'a str)>,
    /// The ALPN protocol of the session.
    pub alpn: &'a [u8],
    /// The QUIC client endpoint (None: TLS over TCP only).
    pub quic: Option<&'a quinn::Endpoint>,
    /// What is kept for this endpoint ([`HubPath`]).
    pub path: &'a std::sync::Mutex<HubPath>,
    /// The local address TCP connections leave from.
    pub tcp_source: Option<std::net::IpAddr>,
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// How long a hub may stay silent to a first QUIC attempt before the dialer tries TCP.
/// UDP that is filtered is silent, so this is a timeout, not an error; a hub busy with
/// a joining fleet can be silent for a second or two as well (1.5 s sent half of a
/// 10,000-edge fleet joining at 500 a second to TCP), so a filtered site pays a few
/// seconds at its first connect rather than a busy hub a descriptor per edge.
const QUIC_ATTEMPT: Duration = Duration::from_secs(5);

/// How long a QUIC handshake may take once the hub has answered.
const QUIC_HANDSHAKE: Duration = Duration::from_secs(10);

/// How long a hub that spoke QUIC to this agent before may stay silent: such a hub is
/// more likely down or busy with a reconnecting fleet (its socket's queue deep) than
/// behind a new filter, and TCP would cost it a descriptor per edge.
const QUIC_PATIENT_ANSWER: Duration = Duration::from_secs(5);

/// Silent QUIC attempts in a row after which even a hub that spoke QUIC before is
/// tried over TCP (the path may have changed): about 16 s with the backoffs between.
const QUIC_PATIENCE: u32 = 2;

/// After QUIC fails on an endpoint where TCP works, how long to use TLS over TCP
/// there before trying QUIC again.
const QUIC_RETRY: Duration = Duration::from_secs(300);

/// What a dialer keeps for one hub endpoint: what it has learnt of QUIC there, and
/// the TLS configuration it dials with (parsed once per identity, and holding the
/// session ticket that lets the next handshake resume).
#[derive(Debug, Default)]
pub struct HubPath {
    /// A QUIC handshake with this endpoint completed since the agent started.
    worked: bool,
    /// QUIC attempts in a row that met silence.
    silent_in_a_row: u32,
    /// TLS over TCP until then: QUIC failed where TCP worked (UDP filtered).
    tcp_until: Option<tokio::time::Instant>,
    /// The client configuration, and a digest of what it was made from.
    tls: Option<(u64, Arc<rustls::ClientConfig>)>,
}

fn lock_path(p: &std::sync::Mutex<HubPath>) -> std::sync::MutexGuard<'_, HubPath> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The TLS configuration for `t`: the one kept on its path while the identity, CA
/// and protocol stay the same (a renewed certificate makes a new one).
fn tls_config(t: &Target<'_>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (t.ca_pem, t.identity, t.alpn).hash(&mut h);
    let made_from = h.finish();
    if let Some((from, cfg)) = &lock_path(t.path).tls
        && *from == made_from
    {
        return Ok(cfg.clone());
    }
    let cfg = crate::tls::resuming_client_config(t.ca_pem, t.identity, &[t.alpn])?;
    lock_path(t.path).tls = Some((made_from, cfg.clone()));
    Ok(cfg)
}

/// Connect: QUIC first (unless it was found filtered here), TLS over TCP when QUIC
/// meets silence or a failure that TCP may not share.
pub async fn channel(t: &Target<'_>) -> Result<Result<Connected, DialFailure>, TlsError> {
    let (try_quic, patient) = {
        let p = lock_path(t.path);
        (
            p.tcp_until.is_none_or(|t| tokio::time::Instant::now() >= t),
            p.worked && p.silent_in_a_row < QUIC_PATIENCE,
        )
    };
    let mut quic_failed = false;
    if let (Some(endpoint), true) = (t.quic, try_quic) {
        let cfg = tls_config(t)?;
        let answer_within = if patient {
            QUIC_PATIENT_ANSWER
        } else {
            QUIC_ATTEMPT
        };
        match tokio::time::timeout(
            answer_within + QUIC_HANDSHAKE,
            crate::quic::dial(endpoint, t.addr, cfg, answer_within),
        )
        .await
        {
            Ok(Ok((conn, stream))) => {
                let mut p = lock_path(t.path);
                p.worked = true;
                p.silent_in_a_row = 0;
                return Ok(Ok((stream, Some(conn), "quic")));
            }
            // The hub answered over UDP but is too busy to finish: UDP works, so TCP
            // would only add load; back off.
            Err(_) => {
                return Ok(Err(DialFailure {
                    why: "QUIC handshake with a busy hub timed out".into(),
                    turned_away: true,
                }));
            }
            Ok(Err(TlsError::Connect { source, .. }))
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Ok(Err(DialFailure {
                    why: format!("the hub turned the connection away ({source})"),
                    turned_away: true,
                }));
            }
            Ok(Err(TlsError::Connect { source, .. }))
                if source.kind() == std::io::ErrorKind::TimedOut =>
            {
                lock_path(t.path).silent_in_a_row += 1;
                if patient {
                    return Ok(Err(DialFailure::new(format!(
                        "no QUIC answer from a hub that spoke QUIC before ({source}): down or busy"
                    ))));
                }
                tracing::info!(
                    addr = t.addr,
                    "no QUIC answer (UDP blocked?); using TLS over TCP"
                )
            }
            Ok(Err(e)) => {
                tracing::info!(addr = t.addr, error = %source_text(&e), "QUIC failed; using TLS over TCP")
            }
        }
        quic_failed = true;
    }
    let cfg = tls_config(t)?;
    Ok(
        match tokio::time::timeout(
            Duration::from_secs(10),
            crate::tls::dial_from(t.addr, cfg, t.tcp_source),
        )
        .await
        {
            Ok(Ok(s)) => {
                // QUIC failed where TCP works: UDP is filtered on this path, so stay
                // on TCP here for a while. (When both fail, the hub is down, not UDP:
                // a fleet must not fall back to TCP because its hub restarted.)
                if quic_failed {
                    lock_path(t.path).tcp_until = Some(tokio::time::Instant::now() + QUIC_RETRY);
                }
                Ok((Box::new(s) as Box<dyn Duplex>, None, "tls"))
            }
            Ok(Err(e)) => Err(DialFailure::new(format!("{e}: {}", source_text(&e)))),
            Err(_) => Err(DialFailure::new("connect timed out")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertAuthority;
    use crate::tickets::DerivedTickets;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A hub on `addr` over QUIC that echoes one byte on each connection's first
    /// stream and reports the certificate it was shown.
    async fn hub(
        addr: std::net::SocketAddr,
        ca: &CertAuthority,
        tickets: Arc<DerivedTickets>,
        turn_away: usize,
    ) -> (
        quinn::Endpoint,
        tokio::sync::mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    ) {
        let tls = crate::testing::hub_tls(ca, b"t", tickets);
        // The hub before may still be letting go of the port.
        let mut tries = 0;
        let endpoint = loop {
            match crate::quic::server(addr, tls.clone(), ca.key_pem().as_bytes()) {
                Ok((e, _)) => break e,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "port still taken");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("endpoint: {e}"),
            }
        };
        let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            let mut turned = 0;
            while let Some(incoming) = accepting.accept().await {
                // As a hub pacing its handshakes does: before the handshake.
                if turned < turn_away {
                    turned += 1;
                    incoming.refuse();
                    continue;
                }
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let (_, certs) = crate::quic::peer(&conn);
                    let _ = seen.send(certs.and_then(|c| c.first().map(|c| c.to_vec())));
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let mut b = [0u8; 1];
                    if recv.read_exact(&mut b).await.is_ok() {
                        let _ = send.write_all(&b).await;
                        let _ = send.finish();
                    }
                    conn.closed().await;
                });
            }
        });
        (endpoint, rx)
    }

    /// An edge of a hub's CA, with what it dials the hub at a free port with.
    struct Edge {
        ca: CertAuthority,
        node_key: String,
        node_cert: String,
        port: std::net::SocketAddr,
        addr: String,
        client: quinn::Endpoint,
        path: std::sync::Mutex<HubPath>,
    }

    impl Edge {
        fn new() -> Self {
            crate::install_crypto_provider();
            let ca = CertAuthority::generate("hub").expect("ca");
            let (node_key, node_cert) = crate::testing::node_identity(&ca, "edge-1");
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("free port");
            Self {
                ca,
                node_key,
                node_cert,
                addr: port.to_string(),
                port,
                client: crate::quic::client().expect("client endpoint"),
                path: std::sync::Mutex::new(HubPath::default()),
            }
        }

        fn target(&self) -> Target<'_> {
            Target {
                addr: &self.addr,
                ca_pem: self.ca.cert_pem(),
                identity: Some((&self.node_cert, &self.node_key)),
                alpn: b"t",
                quic: Some(&self.client),
                path: &self.path,
                tcp_source: None,
            }
        }
    }

    async fn round_trip(target: &Target<'_>) {
        let (mut stream, conn, transport) =
            channel(target).await.expect("config").expect("connected");
        assert_eq!(transport, "quic");
        stream.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.expect("echo");
        // The ticket came before the echo; now hang up.
        if let Some(c) = conn {
            c.close(0u32.into(), b"done");
        }
    }

    /// A hub that restarted tells every edge of the hub before that its connection
    /// is gone as soon as it hears from it, even when the whole fleet's datagrams
    /// come at once: an edge not told keeps probing its dead connection until its
    /// idle timeout (30 s). quinn answered at most one stateless reset per read of
    /// the socket (its minimum interval between resets, measured from the time of
    /// the read), and after a restart at 100,000 simulated edges the dead
    /// connections' probes took most of the simulator's thread for 25 s.
    #[tokio::test]
    async fn a_restarted_hub_resets_every_old_connection_it_hears_from_at_once() {
        const EDGES: usize = 200;
        let edge = Edge::new();
        let (ca, port) = (&edge.ca, edge.port);
        let target = edge.target();
        let tickets = Arc::new(DerivedTickets::new(ca.key_pem().as_bytes()));
        // The hub before runs on a runtime of its own, so that it can die without a
        // word: a runtime shut down drops its tasks unpolled, and the endpoint's
        // driver with them, so nothing is sent (no connection close).
        let before = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (old_ca, old_tickets) = (ca.clone(), tickets.clone());
        let (old, _seen) = before
            .spawn(async move { hub(port, &old_ca, old_tickets, 0).await })
            .await
            .expect("the hub before");
        let mut edges = Vec::new();
        for _ in 0..EDGES {
            let (mut stream, conn, _) = channel(&target).await.expect("config").expect("up");
            stream.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).await.expect("echo");
            edges.push((stream, conn.expect("over QUIC")));
        }
        drop(old);
        before.shutdown_background();
        let (_new, _) = hub(port, ca, tickets, 0).await;
        // Every edge sends at once, as a fleet's heartbeats come after a restart.
        for (stream, _) in &mut edges {
            stream.write_all(b"y").await.expect("write");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut told = 0;
        for (_, conn) in &edges {
            if let Ok(quinn::ConnectionError::Reset) =
                tokio::time::timeout_at(deadline, conn.closed()).await
            {
                told += 1;
            }
        }
        assert_eq!(told, EDGES, "edges told of the restart within 2 s");
    }

    /// An edge that reconnects to its hub after the hub restarted resumes its TLS
    /// session: no certificate is signed or verified again, and the restarted hub
    /// still knows who it is.
    #[tokio::test]
    async fn a_restarted_hub_resumes_the_sessions_of_the_one_before() {
        let edge = Edge::new();
        let (ca, port) = (&edge.ca, edge.port);
        let target = edge.target();

        let first = Arc::new(DerivedTickets::new(ca.key_pem().as_bytes()));
        let (endpoint, mut seen) = hub(port, ca, first.clone(), 0).await;
        round_trip(&target).await;
        assert!(seen.recv().await.expect("seen").is_some());
        assert_eq!(
            (first.issued(), first.accepted()),
            (crate::tickets::TICKETS_PER_HANDSHAKE as u64, 0),
            "a full handshake"
        );
        endpoint.close(0u32.into(), b"killed");
        endpoint.wait_idle().await;
        drop(endpoint);

        // The same CA, a new process: it accepts the old hub's ticket, even after
        // turning the first attempt away (which spent the ticket it offered).
        let restarted = Arc::new(DerivedTickets::new(ca.key_pem().as_bytes()));
        let (endpoint, mut seen) = hub(port, ca, restarted.clone(), 1).await;
        let turned = channel(&target).await.expect("config");
        assert!(
            matches!(&turned, Err(f) if f.turned_away),
            "{:?}",
            turned.err()
        );
        round_trip(&target).await;
        let cert = seen.recv().await.expect("seen").expect("a certificate");
        assert_eq!(
            crate::pki::node_name_from_cert(&cert).as_deref(),
            Some("edge-1"),
            "a resumed session still names its edge"
        );
        assert_eq!(restarted.accepted(), 1, "resumed");
        endpoint.close(0u32.into(), b"killed");
        endpoint.wait_idle().await;
        drop(endpoint);

        // Another CA's hub (keys it cannot derive): a full handshake, which fails
        // here since the edge does not trust that hub's certificate.
        let other = CertAuthority::generate("other").expect("ca");
        let stranger = Arc::new(DerivedTickets::new(other.key_pem().as_bytes()));
        let (_endpoint, _) = hub(port, &other, stranger.clone(), 0).await;
        let refused = channel(&target).await.expect("config");
        assert!(refused.is_err(), "a hub of another CA is not trusted");
        assert_eq!(stranger.accepted(), 0);
    }
}
