//! Verge hub: the control plane.
//!
//! One TLS port serves the REST API (`http`, [`http`]) and the edge channel
//! ([`channel`]), told apart by ALPN. State lives in a [`verge_store::Store`]
//! (SQLite by default). Controllers ([`controllers`]) mark silent nodes NotReady,
//! place pending instances, and compact history.
//!
//! Start reading at [`run`]; a request's path is `http` handler → [`objects`] → store,
//! and from there a watch carries the change to the edge in [`channel`].

pub mod app;
pub mod artifacts;
pub mod cache;
pub mod channel;
pub mod clusters;
pub mod config;
pub mod console;
pub mod controllers;
pub mod disconnect;
pub mod events;
pub mod fanout;
pub mod handshakes;
pub mod history;
pub mod http;
pub mod identity;
pub mod inventory;
pub mod limits;
pub mod objects;
pub mod offline;
pub mod orchestrator;
pub mod placement;
pub mod region;
pub mod replicas;
pub mod rollout;
pub mod sites;
pub mod state;
pub mod streams;
pub mod telemetry;
pub mod timed_store;
pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use verge_api::channel::{ALPN_CHANNEL, ALPN_ENROLL, ALPN_STREAM};
use verge_store::{SqliteStore, Store};

pub use config::{ClientConfig, HubConfig, SetupError};
use identity::PeerIdentity;
use objects::Objects;
use state::HubState;

/// Reasons a hub cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Preparing the data directory failed.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] verge_store::StoreError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] verge_tunnel::tls::TlsError),
    /// An API-level failure during setup.
    #[error("{0}")]
    Api(#[from] verge_api::ApiError),
    /// Listening failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What a started hub tells its caller.
#[derive(Debug, Clone)]
pub struct HubInfo {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its URL.
    pub url: String,
    /// The admin config it wrote.
    pub admin_conf: PathBuf,
    /// The file holding a join token for edges.
    pub join_token_file: PathBuf,
}

pub(crate) fn url_for(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("https://{host}:{}", addr.port())
}

fn new_admin_token() -> String {
    let b: [u8; 24] = rand::random();
    format!("adm_{}", verge_tunnel::pki::hex(&b))
}

/// Run a hub on `listener` until `shutdown` resolves, on the embedded SQLite store in
/// its data directory. `ready` is called once the hub is serving, with where it wrote
/// its admin config.
pub async fn run(
    config: HubConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&HubInfo),
) -> Result<(), HubError> {
    config::prepare_private_dir(&config.data_dir)?;
    let store = SqliteStore::open(config.data_dir.join("store.db"))?;
    run_with_store(config, Arc::new(store), listener, shutdown, ready).await
}

/// [`run`] on a store opened by the caller: etcd for hub replicas (with
/// [`HubConfig::shared_store`] set), or any other backend of the store contract.
pub async fn run_with_store(
    mut config: HubConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&HubInfo),
) -> Result<(), HubError> {
    verge_tunnel::install_crypto_provider();
    let addr = listener.local_addr()?;
    config.listen = addr;
    let dir = config.data_dir.clone();
    config::prepare_private_dir(&dir)?;
    if config.replica_id.is_empty() {
        config.replica_id = replicas::replica_id(&dir)?;
    }
    let ca = config::shared_ca(store.as_ref(), &dir).await?;
    let server = config::server_cert(&ca, &config)?;

    // Admin credentials: reuse the token from an existing admin.conf, else mint one.
    // Every replica registers its own; each is good at all of them.
    let admin_conf = dir.join("admin.conf");
    let token = match ClientConfig::load(&admin_conf) {
        Ok(c) => c.token,
        Err(_) => new_admin_token(),
    };
    tokens::set_admin_token(store.as_ref(), &token).await?;
    let url = url_for(addr);
    ClientConfig {
        server: url.clone(),
        ca_cert: ca.cert_pem().to_string(),
        token,
    }
    .save(&admin_conf)?;
    let join_token_file = dir.join("join-token");
    if !join_token_file.exists() {
        let t = tokens::create_join_token(
            store.as_ref(),
            &ca.fingerprint(),
            &tokens::TokenRequest {
                uses: Some(0),
                ttl_seconds: Some(24 * 3600),
                description: "created at first start".into(),
                ..Default::default()
            },
        )
        .await?;
        config::write_private(&join_token_file, format!("{}\n", t.token).as_bytes())?;
    }

    let epoch = if config.shared_store && !config.new_epoch {
        history::join(store.as_ref()).await?
    } else {
        history::begin(store.as_ref()).await?
    };
    let st = HubState::new(Objects::new(store), ca, config);
    st.set_epoch(epoch);
    let tls = verge_tunnel::tls::server_config(
        st.ca.cert_pem(),
        &server,
        &[
            ALPN_CHANNEL,
            ALPN_STREAM,
            ALPN_ENROLL,
            verge_api::uplink::ALPN_REGION,
            b"http/1.1",
        ],
        st.tickets.clone(),
    )?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(st.fanout.clone().run(st.objects.store().clone()));
    tasks.spawn(st.sites.clone().run(st.objects.store().clone()));
    tasks.spawn(st.limits.load.clone().run());
    tasks.spawn(replicas::keep_lease(st.clone()));
    tasks.spawn(replicas::campaign(st.clone()));
    tasks.spawn(replicas::follow_sessions(st.clone()));
    tasks.spawn(artifacts::replicate(st.clone()));
    tasks.spawn(telemetry::sweeper(st.clone()));
    tasks.spawn(
        st.events
            .clone()
            .run(st.objects.store().clone(), st.config.event_retention),
    );
    if let Some(link) = st.config.region.clone() {
        tasks.spawn(region::uplink::run(st.clone(), link));
    }
    tasks.spawn(replicas::lead_controllers(st.clone(), |st| async move {
        let mut c = tokio::task::JoinSet::new();
        c.spawn(controllers::node_lifecycle(st.clone()));
        // The scheduler plans from the controllers' cache, which also wakes it when
        // a write on any replica makes work (writes reach the leader through the
        // cache's watch, not a timer).
        let cache = Arc::new(cache::ControllerCache::default());
        c.spawn(cache.clone().run(st.clone()));
        c.spawn(disconnect::run(st.clone(), cache.clone()));
        c.spawn(clusters::run(st.clone(), cache.clone()));
        c.spawn(orchestrator::run(st.clone(), cache.clone()));
        c.spawn(controllers::scheduler(st.clone(), cache));
        c.spawn(controllers::compaction(st));
        // Aborting this task drops the set, which aborts every controller in it.
        while c.join_next().await.is_some() {}
    }));
    let app = http::router(st.clone());
    // QUIC on the same port number, over UDP. Edges try it first and fall back to TCP.
    let reset_secret = {
        use sha2::Digest;
        sha2::Sha256::new()
            .chain_update(b"verge quic stateless reset\0")
            .chain_update(st.ca.key_pem().as_bytes())
            .finalize()
    };
    match verge_tunnel::quic::server(addr, tls.clone(), &reset_secret) {
        Ok((endpoint, watch)) => {
            if let Some(watch) = watch {
                tasks.spawn(st.limits.load.clone().watch_packets(watch));
            }
            tasks.spawn(serve_quic(st.clone(), endpoint));
        }
        Err(e) => {
            tracing::warn!(error = %e, "QUIC unavailable (UDP bind failed); edges will use TLS over TCP")
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    ready(&HubInfo {
        addr,
        url: url.clone(),
        admin_conf,
        join_token_file,
    });
    tracing::info!(
        %url,
        connections = st.limits.connections.max_total(),
        unauthenticated = st.limits.unauthenticated.max_total(),
        "hub serving"
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Every connection holds a slot of the descriptor budget; until its peer is
        // known, also one of the strangers' pool. Over a limit it is closed at once,
        // which gives its descriptor straight back.
        let Some((slot, stranger)) = admit_connection(&st, peer.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let st = st.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let handshake = tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
                _ = stranger.evicted() => return,
            };
            let (_, conn) = tls.get_ref();
            let alpn = conn.alpn_protocol().map(|p| p.to_vec());
            let cert = conn.peer_certificates().and_then(|c| c.first()).cloned();
            let identity = cert.as_ref().and_then(|c| PeerIdentity::from_cert(c));
            match alpn.as_deref() {
                // Each branch's future is boxed: a connection's task then holds only
                // what its own kind of session needs, not the largest of them all
                // (a fleet's worth of channel sessions would each carry room for an
                // enrolment or a REST connection).
                Some(p) if p == ALPN_CHANNEL => {
                    drop(stranger);
                    Box::pin(channel::serve_channel(st, tls, identity, "tls", None)).await
                }
                Some(p) if p == ALPN_STREAM => {
                    drop(stranger);
                    Box::pin(streams::serve_data_stream(
                        st,
                        tls,
                        identity,
                        streams::Certificate::Check,
                    ))
                    .await
                }
                Some(p) if p == verge_api::uplink::ALPN_REGION => {
                    drop(stranger);
                    let region = cert
                        .as_ref()
                        .and_then(|c| verge_tunnel::pki::region_identity_from_cert(c));
                    Box::pin(region::centre::serve(st, tls, region)).await
                }
                // An enrolling peer has no credentials until it is done: it stays in
                // the strangers' pool.
                Some(p) if p == ALPN_ENROLL => tokio::select! {
                    _ = Box::pin(channel::serve_enroll(st, tls)) => {}
                    _ = stranger.evicted() => {}
                },
                _ => {
                    drop(stranger);
                    let _http = match st.limits.http.acquire(peer.ip()) {
                        Ok(p) => p,
                        Err(r) => return refused(&st, &r),
                    };
                    let svc = app.layer(axum::Extension(http::PeerNode(identity)));
                    // A whole request head must arrive within the deadline, and an
                    // idle keep-alive connection is closed after it (hyper starts the
                    // same timer whenever the connection waits for a request).
                    // Upgrades carry exec and port-forward sessions.
                    let _ = Box::pin(
                        hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(REQUEST_HEAD_DEADLINE)
                            .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc))
                            .with_upgrades(),
                    )
                    .await;
                }
            }
        });
    }
    tasks.shutdown().await;
    tracing::info!("hub stopped");
    Ok(())
}

/// How long a TLS or QUIC handshake may take.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a REST request's whole head may take to arrive, and how long an idle
/// keep-alive connection is kept.
pub const REQUEST_HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// Count and log a connection turned away.
fn refused(st: &HubState, why: &limits::Refusal) {
    st.metrics
        .connections_refused
        .get_or_create(&vec![("reason".to_string(), why.reason())])
        .inc();
    tracing::debug!(reason = %why, "connection refused");
}

/// Slots for a new TCP connection from `ip`: one of the descriptor budget and one of
/// the strangers' pool; `None` (counted) when either is spent.
fn admit_connection(
    st: &HubState,
    ip: std::net::IpAddr,
) -> Option<(limits::Permit, limits::Permit)> {
    let slot = st
        .limits
        .connections
        .acquire(ip)
        .map_err(|r| refused(st, &r))
        .ok()?;
    let stranger = st
        .limits
        .unauthenticated
        .acquire(ip)
        .map_err(|r| refused(st, &r))
        .ok()?;
    Some((slot, stranger))
}

/// Accept QUIC connections: each carries one channel (or enrolment) on its first
/// bidirectional stream; further streams the edge opens are data streams.
///
/// Connections wait in [`handshakes`]' queue for their handshake to begin:
/// handshakes are paced, since each costs a key exchange (a full one a signature
/// too) and quinn does the first flight's work while it holds the endpoint, so a
/// storm of them (a fleet reconnecting) starves the socket: 100,000 simulated edges
/// lost two million datagrams there, heartbeats among them, and reconnected again.
async fn serve_quic(st: Arc<HubState>, endpoint: quinn::Endpoint) {
    let pace = st.handshakes.rate();
    let (queue, mut drain) = handshakes::queue::<(quinn::Incoming, limits::Permit)>(
        handshakes::capacity_for(pace),
        handshakes::in_flight_for(pace),
        handshakes::MAX_WAIT,
        st.metrics.quic_handshakes_waiting.clone(),
        st.metrics.quic_handshakes_in_flight.clone(),
    );
    // Refused before its handshake, counted with its reason.
    let refuse = |st: &HubState, incoming: quinn::Incoming, why: &limits::Refusal| {
        refused(st, why);
        incoming.refuse();
    };
    let turn_away = move |st: &HubState, incoming: quinn::Incoming| {
        let per_second = st.handshakes.rate() as u64;
        refuse(st, incoming, &limits::Refusal::HandshakeRate { per_second });
    };
    let begin = {
        let st = st.clone();
        tokio::spawn(async move {
            let behind = || st.limits.load.shedding();
            while let Some(next) = drain.next(&st.handshakes, behind).await {
                match next {
                    handshakes::Next::Begin((incoming, stranger), in_flight) => {
                        // The strangers' pool took its slot back while it waited.
                        if futures_util::FutureExt::now_or_never(stranger.evicted()).is_some() {
                            turn_away(&st, incoming);
                            continue;
                        }
                        tokio::spawn(serve_quic_connection(
                            st.clone(),
                            Box::new(incoming),
                            stranger,
                            in_flight,
                        ));
                    }
                    handshakes::Next::TooLate((incoming, _)) => turn_away(&st, incoming),
                    handshakes::Next::Behind((incoming, _), why) => refuse(&st, incoming, &why),
                }
            }
        })
    };
    while let Some(incoming) = endpoint.accept().await {
        // A hub far behind on its work refuses new edges before their handshake
        // (they back off and come again) and keeps the sessions it has.
        if let Some(r) = st.limits.load.shedding() {
            refuse(&st, incoming, &r);
            continue;
        }
        // QUIC connections share one socket, so only the strangers' pool applies:
        // its share per address also bounds what one address holds in the queue.
        let stranger = match st
            .limits
            .unauthenticated
            .acquire(incoming.remote_address().ip())
        {
            Ok(p) => p,
            Err(r) => {
                refuse(&st, incoming, &r);
                continue;
            }
        };
        if let Err((incoming, _)) = queue.offer((incoming, stranger)) {
            turn_away(&st, incoming);
        }
    }
    begin.abort();
}

/// One QUIC connection, from its handshake to its end.
///
/// Each step is boxed: the task lives as long as the edge's session, and a future is
/// as large as its largest step for all of its life (a hub holds one per edge). The
/// connection attempt is boxed too: an async fn keeps room for its arguments for all
/// of its life, and quinn's is 384 bytes.
async fn serve_quic_connection(
    st: Arc<HubState>,
    incoming: Box<quinn::Incoming>,
    stranger: limits::Permit,
    in_flight: handshakes::InFlight,
) {
    // In flight until it finishes, or for half a second: a handshake whose edge
    // gave up holds on until its deadline, and a few such would block the queue.
    let opened = {
        let mut opening = Box::pin(open_quic(*incoming, &stranger));
        let first = tokio::time::timeout(handshakes::IN_FLIGHT_AT_MOST, &mut opening).await;
        drop(in_flight);
        match first {
            Ok(opened) => opened,
            Err(_) => opening.await,
        }
    };
    let Some(OpenedQuic {
        conn,
        alpn,
        identity,
        region,
        stream,
    }) = opened
    else {
        return;
    };
    match alpn.as_deref() {
        Some(p) if p == ALPN_CHANNEL => {
            drop(stranger);
            let (admitted, admission) = tokio::sync::watch::channel(false);
            let data_streams = tokio::spawn(accept_data_streams(
                st.clone(),
                conn.clone(),
                identity.clone(),
                admission,
            ));
            Box::pin(channel::serve_channel(
                st,
                stream,
                identity,
                "quic",
                Some(admitted),
            ))
            .await;
            data_streams.abort();
        }
        Some(p) if p == verge_api::uplink::ALPN_REGION => {
            drop(stranger);
            Box::pin(region::centre::serve(st, stream, region)).await;
        }
        Some(p) if p == ALPN_ENROLL => {
            tokio::select! {
                _ = Box::pin(channel::serve_enroll(st, stream)) => {}
                _ = stranger.evicted() => {}
            }
            // Answered: what is left is the linger below, which holds no
            // stranger's slot (a joining site would run out of them).
            drop(stranger);
        }
        _ => {}
    }
    // Closing at once would throw away what is still unsent (a refusal's reason
    // among it): give the peer a moment to read it and hang up.
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), conn.closed())).await;
    conn.close(0u32.into(), b"done");
}

/// A QUIC connection after its handshake, with its first stream.
struct OpenedQuic {
    conn: quinn::Connection,
    /// What it is for (the channel, enrolment, a region's uplink).
    alpn: Option<Vec<u8>>,
    /// The edge its certificate names, if any.
    identity: Option<PeerIdentity>,
    /// The region (and its parent) its certificate names, if any.
    region: Option<(String, Option<String>)>,
    stream: tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
}

/// A QUIC connection's handshake and its first stream. `None`: it failed, took too
/// long, or the stranger's slot was taken back.
async fn open_quic(incoming: quinn::Incoming, stranger: &limits::Permit) -> Option<OpenedQuic> {
    let conn = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_DEADLINE, incoming) => r.ok()?.ok()?,
        _ = stranger.evicted() => return None,
    };
    let (alpn, certs) = verge_tunnel::quic::peer(&conn);
    let cert = certs.as_ref().and_then(|c| c.first());
    let identity = cert.and_then(|c| PeerIdentity::from_cert(c));
    let region = cert.and_then(|c| verge_tunnel::pki::region_identity_from_cert(c));
    let (send, recv) = tokio::time::timeout(HANDSHAKE_DEADLINE, conn.accept_bi())
        .await
        .ok()?
        .ok()?;
    Some(OpenedQuic {
        conn,
        alpn,
        identity,
        region,
        stream: tokio::io::join(recv, send),
    })
}

/// Serve the data streams an edge opens on its QUIC channel connection, once its
/// channel has admitted it (`admission` turns true).
///
/// The streams ride on the channel's check of the certificate instead of reading the
/// node and its enrolment again each (after a hub restart, every returning edge's
/// metrics stream did, as many reads as its session): a session ends when its node is
/// deleted or enrolled again, and the connection with it. Streams that come before
/// the admission wait for it in quinn's queue; if the session is refused, they are
/// never served. The edge gets room for more streams as it opens them
/// ([`verge_tunnel::quic::StreamRoom`]).
async fn accept_data_streams(
    st: Arc<HubState>,
    conn: quinn::Connection,
    identity: Option<PeerIdentity>,
    mut admission: tokio::sync::watch::Receiver<bool>,
) {
    if admission.wait_for(|admitted| *admitted).await.is_err() {
        return;
    }
    let room = verge_tunnel::quic::StreamRoom::new(conn.clone());
    while let Ok((send, recv)) = conn.accept_bi().await {
        let open = room.opened();
        let serving = streams::serve_data_stream(
            st.clone(),
            tokio::io::join(recv, send),
            identity.clone(),
            streams::Certificate::AdmittedWithChannel,
        );
        tokio::spawn(async move {
            serving.await;
            drop(open);
        });
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns (an async fn's future) without calling it.
    fn size4<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// [`size4`] for a function of five arguments.
    fn size5<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// [`size4`] for a function of six arguments.
    fn size6<A, B, C, D, E, F, R>(_: fn(A, B, C, D, E, F) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A hub holds these futures once per connected edge for as long as it stays: a
    /// large step awaited unboxed in one of them would cost every edge its size (at
    /// 100,000 edges, 5 KiB is half a gigabyte). They were 5 KiB each before their
    /// steps were boxed; then 1,280 (the connection's, which kept room for quinn's
    /// connection attempt), 1,768 (the channel's, with its admission inline), 1,032
    /// (the sync's) and 792 bytes (the data stream's).
    #[test]
    fn the_futures_a_hub_holds_per_edge_stay_small() {
        type Quic = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;
        let held = [
            ("serve_quic_connection", size4(super::serve_quic_connection)),
            (
                "serve_channel",
                size5(super::channel::serve_channel::<Quic>),
            ),
            ("sync_loop", size6(super::channel::sync_loop)),
            ("tell_site", size4(super::channel::tell_site)),
            ("accept_data_streams", size4(super::accept_data_streams)),
            (
                "serve_data_stream",
                size4(super::streams::serve_data_stream::<Quic>),
            ),
            (
                "telemetry::serve_stream",
                size5(super::telemetry::serve_stream::<Quic>),
            ),
        ];
        for (name, bytes) in held {
            assert!(
                bytes <= 1152,
                "{name}'s future is {bytes} bytes; box its one-time steps"
            );
        }
    }
}
