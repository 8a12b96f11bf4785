//! QUIC transport (quinn): the edge's first choice. One bidirectional QUIC stream
//! carries the same framed channel as TLS over TCP does, so everything above the
//! transport is shared. When UDP is blocked the edge falls back to TLS over TCP on its
//! own (see `verge_edge::session`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backlog::SocketWatch;
use crate::pki::HUB_SERVER_NAME;
use crate::tls::TlsError;

/// A duplex byte stream the channel runs over (a QUIC stream pair or a TLS stream).
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// The dialing side's keep-alive, well under common NAT UDP timeouts (30 s and up).
/// Only a connection that heard nothing for this long pings: the channel's own
/// heartbeats (every 10 s in a large fleet, 4 s by default) and their
/// acknowledgements keep it quiet, and a keep-alive at the heartbeat's own period
/// would race it and double the datagrams. The accepting side (the hub) sends none:
/// the dialer keeps the path open, and a hub pinging a hundred thousand edges would
/// pay for it twice (its ping and the edge's acknowledgement).
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A QUIC connection with no traffic for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bidirectional streams an edge may have open to the hub at once: the channel and
/// its data streams (logs, exec, port-forward connections, relays).
const EDGE_STREAMS: u32 = 64;

/// Streams an edge may open at first: the channel, its metrics stream and a few more.
/// The hub raises it as they are used ([`StreamRoom`]). quinn keeps two map entries
/// for every stream the peer may open, from the start: at 64 that was 3.3 KiB of
/// every connected edge's memory at the hub, and at 8 it is 0.4.
const EDGE_STREAMS_AT_FIRST: u32 = 8;

/// Streams an edge may still open before the hub raises its limit.
const STREAM_HEADROOM: u32 = 3;

/// The room an edge has to open streams on its QUIC connection to the hub: a few at
/// first ([`EDGE_STREAMS_AT_FIRST`]), doubled whenever those open come within
/// [`STREAM_HEADROOM`] of it, up to [`EDGE_STREAMS`]. An edge that finds no room
/// waits for it (quinn's `open_bi`); raised ahead of use, it does not.
#[derive(Clone)]
pub struct StreamRoom(Arc<RoomState>);

struct RoomState {
    conn: quinn::Connection,
    /// Open now: the channel and the data streams being served.
    open: std::sync::atomic::AtomicU32,
    /// What the edge may have open at once.
    limit: std::sync::atomic::AtomicU32,
}

impl StreamRoom {
    /// The room on `conn`, an accepted connection whose channel stream is open.
    pub fn new(conn: quinn::Connection) -> Self {
        Self(Arc::new(RoomState {
            conn,
            open: 1.into(),
            limit: EDGE_STREAMS_AT_FIRST.into(),
        }))
    }

    /// A data stream was accepted: it counts as open until the guard is dropped.
    pub fn opened(&self) -> OpenStream {
        use std::sync::atomic::Ordering::Relaxed;
        let open = self.0.open.fetch_add(1, Relaxed) + 1;
        let limit = self.0.limit.load(Relaxed);
        if open + STREAM_HEADROOM >= limit && limit < EDGE_STREAMS {
            let raised = (limit * 2).min(EDGE_STREAMS);
            if self
                .0
                .limit
                .compare_exchange(limit, raised, Relaxed, Relaxed)
                .is_ok()
            {
                self.0.conn.set_max_concurrent_bi_streams(raised.into());
            }
        }
        OpenStream(self.clone())
    }

    /// Streams the edge may have open at once now.
    pub fn limit(&self) -> u32 {
        self.0.limit.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A data stream counted open in its [`StreamRoom`].
pub struct OpenStream(StreamRoom);

impl Drop for OpenStream {
    fn drop(&mut self) {
        (self.0)
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The transport of one side: `peer_streams` bidirectional streams the peer may open
/// (the hub never opens any; the edge opens the channel and its data streams), and no
/// unidirectional ones. quinn keeps state for every stream the peer may open from
/// the start, so these limits are memory per connection: at a hundred thousand edges,
/// quinn's defaults (100 of each) cost the hub about 6 KiB per edge ([`StreamRoom`]
/// raises the hub's as an edge uses them). `keep_alive`:
/// whether this side pings an idle connection (the dialer does).
fn transport(peer_streams: u32, keep_alive: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keep_alive.then_some(KEEP_ALIVE));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    // No segmentation offload: with it each connection keeps a send buffer as large
    // as its biggest batch of datagrams (the handshake's certificate flight, about
    // 6 KiB), for good; a hub holds a fleet of mostly idle connections, and a
    // datagram per system call costs little for the bulk transfers it makes.
    t.enable_segmentation_offload(false);
    t
}

fn cfg_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// A QUIC server endpoint on `addr` (UDP) using the hub's TLS configuration.
///
/// `reset_secret` must stay the same across restarts of the hub (it is derived from
/// the CA key): the stateless-reset tokens it hands out are derived from it, so a hub
/// that restarted can still tell its edges' old connections that they are gone, and
/// they reconnect at once instead of waiting for silence to time out.
///
/// Also returns a watch on the endpoint's socket ([`crate::backlog`]): how far its
/// reading is behind (`None` where the kernel does not say).
pub fn server(
    addr: SocketAddr,
    tls: Arc<ServerConfig>,
    reset_secret: &[u8],
) -> Result<(quinn::Endpoint, Option<SocketWatch>), TlsError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(cfg_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut hub_side = transport(EDGE_STREAMS_AT_FIRST, false);
    // No path MTU discovery from the hub: each connection keeps a send buffer the
    // size of its largest datagram, which grows to twice the initial 1,200 bytes once
    // a larger MTU is found (1.2 KiB more per edge, for good). What the hub sends is
    // mostly acknowledgements and small frames; a download from it (an artifact)
    // takes about a fifth more datagrams. The edges still probe for theirs.
    hub_side.mtu_discovery_config(None);
    config.transport_config(Arc::new(hub_side));
    let io = |source| TlsError::Connect {
        addr: addr.to_string(),
        source,
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection ids are signed with a key too: the same one after a restart, or the
    // restarted hub would drop the old connections' packets as invalid instead of
    // answering them with a reset.
    let cid_key = {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"verge quic connection ids\0");
        ctx.update(reset_secret);
        ctx.finish()
            .as_ref()
            .iter()
            .take(8)
            .fold(0u64, |k, b| (k << 8) | u64::from(*b))
    };
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // A restarted hub resets every old connection it hears from, and a fleet's are all
    // heard within one heartbeat. quinn spaces resets by a minimum interval (20 ms by
    // default) measured from the time it read the socket, which it takes once per
    // read of a batch of datagrams: with any interval at all, at most one old
    // connection per batch is told, and the rest keep probing their dead connection
    // until their idle timeout. After a restart at 100,000 simulated edges those
    // probes took most of the simulator's thread for 25 s, and the new hub's
    // handshakes waited on it. No interval, then: every reset is one datagram smaller
    // than the one that caused it (no amplification, no loop between two endpoints),
    // and only connection ids this hub signed are answered (the generator validates
    // them), so garbage floods still get nothing.
    endpoint_config.min_reset_interval(std::time::Duration::ZERO);
    let socket = std::net::UdpSocket::bind(addr).map_err(io)?;
    enlarge_buffers(&socket, SERVER_SOCKET_BUFFER);
    let watch = SocketWatch::of(&socket)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot watch the QUIC socket's backlog"))
        .ok();
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io)?;
    Ok((endpoint, watch))
}

/// The socket buffers a hub's UDP socket asks for. A fleet's datagrams come in bursts
/// (a restarted hub meets every edge at once) and one that finds the receive buffer
/// full is dropped without a word, which an edge cannot tell from UDP being filtered.
pub const SERVER_SOCKET_BUFFER: usize = 8 << 20;

/// Ask for `bytes` of receive and send buffer on `socket`: beyond the system's cap
/// where the process may (`SO_RCVBUFFORCE`, as root), up to the cap otherwise, with a
/// warning that says how to raise it.
pub fn enlarge_buffers(socket: &impl std::os::fd::AsFd, bytes: usize) {
    use rustix::net::sockopt;
    let forced = sockopt::set_socket_recv_buffer_size_force(socket, bytes).is_ok()
        && sockopt::set_socket_send_buffer_size_force(socket, bytes).is_ok();
    if !forced {
        let _ = sockopt::set_socket_recv_buffer_size(socket, bytes);
        let _ = sockopt::set_socket_send_buffer_size(socket, bytes);
    }
    // Linux reports twice what it grants (the kernel's bookkeeping is included).
    let got = sockopt::socket_recv_buffer_size(socket).unwrap_or(0) / 2;
    if got < bytes {
        tracing::warn!(
            wanted = bytes,
            granted = got,
            "UDP receive buffer smaller than asked; datagrams of a large fleet may be dropped (raise net.core.rmem_max, or run as root)"
        );
    }
}

/// A client endpoint (one per process is enough; it multiplexes connections).
///
/// Datagrams are capped at an Ethernet-sized payload: the channel never needs jumbo
/// datagrams, and the endpoint's receive buffer scales with this cap, which keeps the
/// edge agent small.
pub fn client() -> Result<quinn::Endpoint, TlsError> {
    client_on(std::net::Ipv4Addr::UNSPECIFIED.into(), None)
}

/// A client endpoint whose datagrams leave from `ip` (the fleet simulator gives each
/// simulated site a loopback address of its own), with socket buffers of `buffer`
/// bytes if given (an endpoint that many connections share needs more).
pub fn client_on(ip: std::net::IpAddr, buffer: Option<usize>) -> Result<quinn::Endpoint, TlsError> {
    let any = SocketAddr::new(ip, 0);
    let io = |source| TlsError::Connect {
        addr: any.to_string(),
        source,
    };
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(1472).map_err(cfg_err)?;
    let socket = std::net::UdpSocket::bind(any).map_err(io)?;
    if let Some(bytes) = buffer {
        enlarge_buffers(&socket, bytes);
    }
    let same_socket = socket.try_clone().map_err(io)?;
    let runtime = quinn::TokioRuntime;
    let wrapped = quinn::Runtime::wrap_udp_socket(&runtime, socket).map_err(io)?;
    // quinn's socket state turned receive offload on: off again, to match what the
    // endpoint is told below.
    nix::sys::socket::setsockopt(
        &same_socket,
        nix::sys::socket::sockopt::UdpGroSegment,
        &false,
    )
    .map_err(|e| io(e.into()))?;
    quinn::Endpoint::new_with_abstract_socket(
        config,
        None,
        Arc::new(OneDatagramPerSlot(wrapped)),
        Arc::new(runtime),
    )
    .map_err(io)
}

/// A UDP socket without receive offload (GRO). quinn sizes an endpoint's receive
/// buffer for the most one batch of reads can bring: 32 slots of as many datagrams
/// as the kernel may coalesce into one (64 of 1,472 bytes), 3 MiB, whose pages fill
/// as bursts come in (datagrams from the hub to the connections sharing a socket are
/// one flow to the kernel, and coalesce): up to 3 MiB of an edge agent's memory, and
/// of each of the simulator's sockets (one per 50 edges: 1.5 KiB per simulated edge
/// measured at 10,000). Without offload a slot holds one datagram, the buffer is
/// 46 KiB, and a download takes a read per datagram (32 to a system call).
#[derive(Debug)]
struct OneDatagramPerSlot(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for OneDatagramPerSlot {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// Connect to the hub at `addr` over QUIC and open the channel stream.
///
/// A hub that has not answered at all within `answer_within` fails with
/// [`std::io::ErrorKind::TimedOut`] (UDP may be filtered on the path: the caller can try
/// TCP); one that answered gets as long as the caller waits to finish the handshake (a
/// busy hub is slow, not unreachable). A hub that turned the connection away fails
/// with [`std::io::ErrorKind::ConnectionRefused`].
pub async fn dial(
    endpoint: &quinn::Endpoint,
    addr: &str,
    tls: Arc<ClientConfig>,
    answer_within: std::time::Duration,
) -> Result<(quinn::Connection, Box<dyn Duplex>), TlsError> {
    let fail = |kind: std::io::ErrorKind, e: &dyn std::fmt::Display| TlsError::Connect {
        addr: addr.to_string(),
        source: std::io::Error::new(kind, e.to_string()),
    };
    let connect_err = |e: &quinn::ConnectionError| {
        let refused = matches!(e, quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED);
        let kind = if refused {
            std::io::ErrorKind::ConnectionRefused
        } else {
            std::io::ErrorKind::Other
        };
        fail(kind, e)
    };
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| fail(std::io::ErrorKind::Other, &e))?
        .next()
        .ok_or_else(|| TlsError::BadAddress(addr.to_string()))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(cfg_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport(0, true)));
    let mut connecting = endpoint
        .connect_with(config, sock, HUB_SERVER_NAME)
        .map_err(|e| fail(std::io::ErrorKind::Other, &e))?;
    // The hub's first flight (its handshake data) shows that UDP gets through.
    match tokio::time::timeout(answer_within, connecting.handshake_data()).await {
        Err(_) => {
            return Err(fail(
                std::io::ErrorKind::TimedOut,
                &format_args!("no answer over UDP within {answer_within:?}"),
            ));
        }
        Ok(Err(e)) => return Err(connect_err(&e)),
        Ok(Ok(_)) => {}
    }
    let conn = connecting.await.map_err(|e| connect_err(&e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| connect_err(&e))?;
    Ok((conn, Box::new(tokio::io::join(recv, send))))
}

/// The ALPN protocol and the peer's certificates of an accepted connection.
pub fn peer(
    conn: &quinn::Connection,
) -> (
    Option<Vec<u8>>,
    Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let certs = conn
        .peer_identity()
        .and_then(|c| {
            c.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|c| *c);
    (alpn, certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertAuthority;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// An edge that opens more streams than it may at first gets room for them as
    /// it goes, without waiting: with the first limit alone, the ninth would wait
    /// until one of the others closed.
    #[tokio::test]
    async fn an_edge_gets_room_for_more_streams_as_it_opens_them() {
        let ca = CertAuthority::generate("hub").expect("ca");
        let tickets = Arc::new(crate::tickets::DerivedTickets::new(b"k"));
        let tls = crate::testing::hub_tls(&ca, b"t", tickets);
        let (endpoint, _) =
            server("127.0.0.1:0".parse().expect("addr"), tls, b"secret").expect("server");
        let addr = endpoint.local_addr().expect("bound");
        let (accepted, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let conn = endpoint
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let channel = conn.accept_bi().await.expect("channel stream");
            let room = StreamRoom::new(conn.clone());
            let _channel = channel;
            let mut held = Vec::new();
            while let Ok(stream) = conn.accept_bi().await {
                // Held open (and counted open), as a port-forward's connections are.
                held.push((stream, room.opened()));
                let _ = accepted.send(room.limit());
            }
        });

        let (key, cert) = crate::testing::node_identity(&ca, "edge-1");
        let tls = crate::tls::client_config(ca.cert_pem(), Some((&cert, &key)), &[b"t"])
            .expect("client config");
        let client = client().expect("client endpoint");
        let (conn, mut channel) = dial(&client, &addr.to_string(), tls, Duration::from_secs(5))
            .await
            .expect("dial");
        channel.write_all(b"c").await.expect("channel byte");
        let mut streams = Vec::new();
        for i in 0..EDGE_STREAMS - 1 {
            let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi())
                .await
                .unwrap_or_else(|_| panic!("stream {} of the edge waited for room", i + 2))
                .expect("open");
            send.write_all(b"s").await.expect("stream byte");
            streams.push((send, recv));
            let limit = tokio::time::timeout(Duration::from_secs(5), seen.recv())
                .await
                .expect("the hub saw the stream")
                .expect("hub alive");
            assert!(
                limit >= (i + 2 + 1).min(EDGE_STREAMS),
                "{} streams open with a limit of {limit}",
                i + 2
            );
        }
    }
}
