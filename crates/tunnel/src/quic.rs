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

use crate::pki::HUB_SERVER_NAME;
use crate::tls::TlsError;

/// A duplex byte stream the channel runs over (a QUIC stream pair or a TLS stream).
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Keep-alives well under common NAT UDP timeouts (30 s and up).
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A QUIC connection with no traffic for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bidirectional streams an edge may have open to the hub at once: the channel and
/// its data streams (logs, exec, port-forward connections, relays).
const EDGE_STREAMS: u32 = 64;

/// The transport of one side: `peer_streams` bidirectional streams the peer may open
/// (the hub never opens any; the edge opens the channel and its data streams), and no
/// unidirectional ones. quinn keeps state for every stream the peer may open from
/// the start, so these limits are memory per connection: at a hundred thousand edges,
/// quinn's defaults (100 of each) cost the hub about 6 KiB per edge.
fn transport(peer_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
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
pub fn server(
    addr: SocketAddr,
    tls: Arc<ServerConfig>,
    reset_secret: &[u8],
) -> Result<quinn::Endpoint, TlsError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(cfg_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(EDGE_STREAMS));
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
    let socket = std::net::UdpSocket::bind(addr).map_err(io)?;
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io)
}

/// A client endpoint (one per process is enough; it multiplexes connections).
///
/// Datagrams are capped at an Ethernet-sized payload: the channel never needs jumbo
/// datagrams, and the endpoint's receive buffer scales with this cap, which keeps the
/// edge agent small.
pub fn client() -> Result<quinn::Endpoint, TlsError> {
    let any: SocketAddr = ([0, 0, 0, 0], 0).into();
    let io = |source| TlsError::Connect {
        addr: any.to_string(),
        source,
    };
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(1472).map_err(cfg_err)?;
    let socket = std::net::UdpSocket::bind(any).map_err(io)?;
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime)).map_err(io)
}

/// Connect to the hub at `addr` over QUIC and open the channel stream.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    addr: &str,
    tls: Arc<ClientConfig>,
) -> Result<(quinn::Connection, Box<dyn Duplex>), TlsError> {
    let connect_err = |e: &dyn std::fmt::Display| TlsError::Connect {
        addr: addr.to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| connect_err(&e))?
        .next()
        .ok_or_else(|| TlsError::BadAddress(addr.to_string()))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(cfg_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(0));
    let conn = endpoint
        .connect_with(config, sock, HUB_SERVER_NAME)
        .map_err(|e| connect_err(&e))?
        .await
        .map_err(|e| connect_err(&e))?;
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
