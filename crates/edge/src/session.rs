//! One connection to the hub: hello with the last applied revision, then desired-state
//! changes down and heartbeats and statuses up, until the connection fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use verge_api::channel::{
    ALPN_CHANNEL, ALPN_STREAM, EdgeToHub, HubToEdge, METRICS_SINCE, PROTOCOL_VERSION,
    QUIET_HEARTBEATS_SINCE, RequestBody, ResponseBody,
};
use verge_tunnel::frame::{read_msg, write_msg};

use crate::agent::Agent;
use crate::files::Identity;
use crate::streams::Opener;
use crate::{AGENT_VERSION, EdgeError, Metrics};

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The connection failed or went quiet; reconnect.
    Lost(String),
    /// The hub refused this node for good (its certificate was revoked, or the
    /// protocol is not one the hub speaks); do not retry.
    Refused(String),
    /// The node was deleted at the hub: nothing it runs is wanted any more.
    Deleted(String),
    /// The hub is admitting other edges first; retry after this long.
    Busy(Duration),
    /// The hub's whole fleet is coming back at once: the hub reset this connection
    /// after a restart ([`Crowd::Begins`]), or turned it away before its handshake
    /// (it takes a fleet back at a pace: [`Crowd::Continues`]). Retry within the
    /// fleet's reconnect spread.
    Crowded(String, Crowd),
}

/// Where an edge stands in its fleet's reconnection ([`SessionEnd::Crowded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowd {
    /// The hub restarted: every edge it had is coming back from now on.
    Begins,
    /// The hub turned this attempt away: it is busy with the edges coming back.
    Continues,
}

/// Node facts are resent at least this often even when unchanged.
const FACTS_EVERY: Duration = Duration::from_secs(60);

/// Everything a session needs.
pub struct SessionCtx<'a> {
    /// The agent.
    pub agent: &'a Arc<Agent>,
    /// The node identity.
    pub identity: &'a Identity,
    /// Hub address `host:port`.
    pub addr: &'a str,
    /// Where the identity is kept (a renewed certificate goes there).
    pub state: &'a dyn crate::state::StateStore,
    /// The node's facts, as heartbeats report them.
    pub facts: &'a crate::seams::Facts,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// The QUIC client endpoint.
    pub quic: Option<&'a quinn::Endpoint>,
    /// What this agent has learnt of QUIC to this hub endpoint.
    pub hub_path: &'a std::sync::Mutex<verge_tunnel::dial::HubPath>,
    /// The local address TCP connections leave from ([`crate::Seams::tcp_source`]).
    pub tcp_source: Option<std::net::IpAddr>,
    /// This node's site-peer prober, if it probes ([`crate::peers`]).
    pub peers: Option<&'a crate::peers::PeerProbes>,
    /// The node's metrics, shipped on their own stream while connected.
    pub telemetry: &'a Arc<crate::telemetry::Telemetry>,
    /// The hub's last word on how long its fleet takes to reconnect, in ms
    /// (`HubToEdge::Welcome`, `HubToEdge::Fleet`); kept across sessions.
    pub reconnect_spread: &'a std::sync::atomic::AtomicU64,
}

/// Connect over [`verge_tunnel::dial::channel`] with this session's identity.
async fn connect(
    ctx: &SessionCtx<'_>,
) -> Result<Result<verge_tunnel::dial::Connected, verge_tunnel::dial::DialFailure>, EdgeError> {
    let identity = Some((&*ctx.identity.cert_pem, &*ctx.identity.key_pem));
    Ok(verge_tunnel::dial::channel(&verge_tunnel::dial::Target {
        addr: ctx.addr,
        ca_pem: &ctx.identity.ca_pem,
        identity,
        alpn: ALPN_CHANNEL,
        quic: ctx.quic,
        path: ctx.hub_path,
        tcp_source: ctx.tcp_source,
    })
    .await?)
}

/// The most an edge spreads its reconnection over, whatever a hub says.
pub const MOST_SPREAD: Duration = Duration::from_secs(600);

fn note_spread(ctx: &SessionCtx<'_>, ms: u64) {
    let ms = ms.min(MOST_SPREAD.as_millis() as u64);
    ctx.reconnect_spread
        .store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Run one session. Returns when the connection ends.
pub async fn run_session(ctx: &SessionCtx<'_>) -> Result<SessionEnd, EdgeError> {
    // Boxed: the handshake's future is over once connected, and unboxed it would
    // size this one (which lasts as long as the session) to itself.
    let (stream, quic_conn, transport) = match Box::pin(connect(ctx)).await? {
        Ok(x) => x,
        Err(failed) if failed.turned_away => {
            return Ok(SessionEnd::Crowded(failed.why, Crowd::Continues));
        }
        Err(failed) => return Ok(SessionEnd::Lost(failed.why)),
    };
    // Data streams go the same way as the channel: more streams of the QUIC
    // connection, or more TLS connections to the same endpoint.
    let connection = quic_conn.clone();
    let opener = match quic_conn {
        Some(conn) => Opener::Quic(conn),
        None => Opener::Tls {
            addr: ctx.addr.to_string(),
            source: ctx.tcp_source,
            config: verge_tunnel::tls::client_config(
                &ctx.identity.ca_pem,
                Some((&*ctx.identity.cert_pem, &*ctx.identity.key_pem)),
                &[ALPN_STREAM],
            )?,
        },
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let since = ctx.agent.revision();
    let hello = EdgeToHub::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.into(),
        since_revision: since,
        epoch: ctx.agent.epoch(),
    };
    if let Err(e) = write_msg(&mut writer, &hello).await {
        return Ok(SessionEnd::Lost(e.to_string()));
    }
    let (interval, epoch, hub_protocol) = match tokio::time::timeout(
        Duration::from_secs(10),
        read_msg::<HubToEdge, _>(&mut reader),
    )
    .await
    {
        Ok(Ok(Some(HubToEdge::Welcome {
            heartbeat_interval_ms,
            epoch,
            protocol_version,
            reconnect_spread_ms,
            ..
        }))) => {
            if let Some(ms) = reconnect_spread_ms {
                note_spread(ctx, ms);
            }
            (
                Duration::from_millis(heartbeat_interval_ms.clamp(100, 300_000)),
                epoch,
                protocol_version,
            )
        }
        Ok(Ok(Some(HubToEdge::Error { code, message, .. })))
            if refusal(&code, &message).is_some() =>
        {
            return Ok(refusal(&code, &message).unwrap_or(SessionEnd::Refused(message)));
        }
        Ok(Ok(Some(HubToEdge::Error {
            code,
            message,
            retry_after_ms,
        }))) if code == "busy" => {
            // Hubs before the hint said it only in the text.
            let ms = retry_after_ms
                .or_else(|| {
                    message
                        .split_whitespace()
                        .find_map(|w| w.strip_suffix("ms").and_then(|n| n.parse::<u64>().ok()))
                })
                .unwrap_or(1000);
            return Ok(SessionEnd::Busy(Duration::from_millis(ms)));
        }
        Ok(Ok(other)) => {
            return Ok(SessionEnd::Lost(format!(
                "unexpected first message: {other:?}"
            )));
        }
        Ok(Err(e)) => return Ok(SessionEnd::Lost(e.to_string())),
        Err(_) => return Ok(SessionEnd::Lost("no welcome from hub".into())),
    };
    tracing::info!(addr = ctx.addr, since, transport, "connected to hub");
    ctx.metrics.connected.set(1);
    ctx.agent.links.opener().set(Some(opener.clone()));
    // Metrics go on their own stream for as long as the session lasts (hubs before
    // protocol 5 take none: the buffer keeps them for a newer hub).
    let shipper = (hub_protocol >= METRICS_SINCE)
        .then(|| tokio::spawn(ctx.telemetry.clone().ship(opener.clone())));
    // Over QUIC a hub of protocol 7 or later does not answer heartbeats: QUIC
    // acknowledges each of them, and that is what the edge listens for.
    let reset_watch = connection.clone();
    let quiet = connection.filter(|_| hub_protocol >= QUIET_HEARTBEATS_SINCE);
    let end = session_loop(
        ctx,
        &mut reader,
        &mut writer,
        interval,
        &opener,
        epoch,
        quiet.map(Hearing::new),
    )
    .await;
    if let Some(s) = shipper {
        s.abort();
    }
    ctx.agent.links.opener().set(None);
    ctx.metrics.connected.set(0);
    let _ = writer.shutdown().await;
    // A stateless reset says the hub lost this connection's state: it restarted,
    // and every edge it had is coming back at the same moment.
    let reset = reset_watch
        .and_then(|c| c.close_reason())
        .is_some_and(|r| matches!(r, quinn::ConnectionError::Reset));
    match end {
        Ok(SessionEnd::Lost(why)) if reset => Ok(SessionEnd::Crowded(
            format!("the hub restarted (its QUIC endpoint reset the connection: {why})"),
            Crowd::Begins,
        )),
        other => other,
    }
}

/// How an error code from the hub ends the session for good, if it does.
fn refusal(code: &str, message: &str) -> Option<SessionEnd> {
    match code {
        "nodeDeleted" => Some(SessionEnd::Deleted(message.to_string())),
        "unauthorized" | "protocol" | "revoked" => Some(SessionEnd::Refused(message.to_string())),
        _ => None,
    }
}

/// What an edge hears of a hub that does not answer its heartbeats: the datagrams
/// that reach it on the session's QUIC connection (the acknowledgements of its
/// heartbeats among them), counted between looks.
struct Hearing {
    connection: quinn::Connection,
    datagrams: u64,
    looked: tokio::time::Instant,
}

impl Hearing {
    fn new(connection: quinn::Connection) -> Self {
        let datagrams = connection.stats().udp_rx.datagrams;
        Self {
            connection,
            datagrams,
            looked: tokio::time::Instant::now(),
        }
    }

    /// Look again: when datagrams came since the last look, the hub was heard after
    /// it (`last_heard` moves up to then; when exactly is not known).
    fn look(&mut self, last_heard: &mut tokio::time::Instant) {
        let now = self.connection.stats().udp_rx.datagrams;
        if now != self.datagrams {
            self.datagrams = now;
            *last_heard = (*last_heard).max(self.looked);
        }
        self.looked = tokio::time::Instant::now();
    }
}

async fn session_loop<R, W>(
    ctx: &SessionCtx<'_>,
    reader: &mut R,
    writer: &mut W,
    interval: Duration,
    opener: &Opener,
    epoch: Option<String>,
    mut hearing: Option<Hearing>,
) -> Result<SessionEnd, EdgeError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let agent = ctx.agent;
    let mut heartbeat = tokio::time::interval(interval);
    // A hub that stays silent for two heartbeats (plus a second of slack for a slow
    // link) is gone, even if TCP has not noticed: a black-holed path looks exactly like
    // that. Checked when the limit since the hub was last heard runs out (not on a
    // tick: a fleet of agents in one process would wake a hundred thousand times a
    // second for nothing), so with the default 4 s interval a dead endpoint is
    // noticed within 10 s. A quiet hub is looked for at every heartbeat: heard since
    // the previous one means heard after it.
    let silence_limit = interval * 2 + Duration::from_secs(1);
    let mut last_heard = tokio::time::Instant::now();
    let silence = tokio::time::sleep(silence_limit);
    tokio::pin!(silence);
    let mut facts_sent: Option<(verge_api::NodeStatus, tokio::time::Instant)> = None;
    // Certificate renewal: a new key and CSR once two thirds of the lifetime are gone.
    let mut renew_at = ctx.identity.validity().map(|(_, _, r)| r);
    let mut renewal_key: Option<String> = None;
    // Every status goes again in a new session, after its first heartbeat: the hub
    // marks the node Ready on that, so a status never arrives at a hub that still
    // counts the node silent (whose disconnect controller would then overwrite it).
    let mut first_heartbeat = true;
    let lost = |e: verge_tunnel::frame::FrameError| Ok(SessionEnd::Lost(e.to_string()));
    // The read below loses every race against the ticks while a large snapshot
    // trickles in: it must not lose the bytes it read when it does.
    let mut frames = verge_tunnel::frame::FrameReader::new(reader);
    let mut snapshot_parts: Option<(u64, Vec<verge_api::Instance>)> = None;
    loop {
        tokio::select! {
            msg = frames.next_msg::<HubToEdge>() => {
                last_heard = tokio::time::Instant::now();
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Lost("hub closed the connection".into())),
                    Err(e) => return lost(e),
                };
                match msg {
                    HubToEdge::Snapshot { revision, instances } => {
                        tracing::info!(revision, count = instances.len(), "snapshot from hub");
                        agent.replace_from(epoch.clone(), revision, instances)?;
                    }
                    HubToEdge::SnapshotPart { revision, instances, last } => {
                        // Nothing is applied until the last part: a session cut halfway
                        // leaves the cache as it was.
                        let parts = snapshot_parts.get_or_insert_with(|| (revision, Vec::new()));
                        if parts.0 != revision {
                            *parts = (revision, Vec::new());
                        }
                        parts.1.extend(instances);
                        if last
                            && let Some((revision, instances)) = snapshot_parts.take()
                        {
                            tracing::info!(revision, count = instances.len(), "snapshot from hub");
                            agent.replace_from(epoch.clone(), revision, instances)?;
                        }
                    }
                    // Changes or a bookmark mean the hub resumed from our revision:
                    // it holds in this epoch of its history.
                    HubToEdge::Changes { revision, changes } => {
                        tracing::debug!(revision, count = changes.len(), "changes from hub");
                        agent.confirm_epoch(epoch.as_deref())?;
                        agent.apply(revision, changes)?;
                    }
                    HubToEdge::Bookmark { revision } => {
                        agent.confirm_epoch(epoch.as_deref())?;
                        agent.bookmark(revision)?;
                    }
                    HubToEdge::HeartbeatAck => {}
                    HubToEdge::Peers { key, peers } => {
                        if let Some(p) = ctx.peers {
                            tracing::info!(count = peers.len(), "site peers to probe");
                            p.set_peers(&key, &peers);
                        }
                    }
                    HubToEdge::Endpoints { endpoints } => {
                        tracing::debug!(count = endpoints.len(), "clusters' endpoints");
                        if let Err(e) = ctx.state.save_endpoints(&ctx.identity.node, &endpoints) {
                            tracing::warn!(error = %e, "the clusters' endpoints were not kept");
                        }
                    }
                    HubToEdge::Renewed { cert_pem } => {
                        if let Some(key_pem) = renewal_key.take() {
                            let renewed = Identity { cert_pem: cert_pem.into(), key_pem: key_pem.into(), ..ctx.identity.clone() };
                            ctx.state.save_identity(&renewed)?;
                            renew_at = renewed.validity().map(|(_, _, r)| r);
                            tracing::info!(valid_until = ?renewed.validity().map(|v| v.1), "node certificate renewed; the next connection uses it");
                        }
                    }
                    HubToEdge::OpenStream { id, purpose } => {
                        tokio::spawn(crate::streams::serve(opener.clone(), agent.clone(), id, purpose));
                    }
                    // Only protocol 1 edges follow logs on the control stream.
                    HubToEdge::Cancel { .. } => {}
                    HubToEdge::Request { id, body } => {
                        let body = answer(agent, body);
                        if let Err(e) = write_msg(writer, &EdgeToHub::Response { id, body }).await {
                            return lost(e);
                        }
                    }
                    HubToEdge::Error { code, message, .. } => {
                        tracing::warn!(%code, %message, "hub reported an error");
                        if let Some(end) = refusal(&code, &message) {
                            return Ok(end);
                        }
                        if code == "gone" || code == "replaced" {
                            return Ok(SessionEnd::Lost(message));
                        }
                    }
                    HubToEdge::Fleet { reconnect_spread_ms } => note_spread(ctx, reconnect_spread_ms),
                    HubToEdge::Welcome { .. } | HubToEdge::Enrolled { .. } => {
                        return Ok(SessionEnd::Lost("unexpected message from hub".into()));
                    }
                }
            }
            () = &mut silence => {
                if let Some(h) = hearing.as_mut() {
                    h.look(&mut last_heard);
                }
                if last_heard.elapsed() >= silence_limit {
                    return Ok(SessionEnd::Lost(format!("hub silent for {:.1}s", last_heard.elapsed().as_secs_f64())));
                }
                silence.as_mut().reset(last_heard + silence_limit);
            }
            _ = heartbeat.tick() => {
                if let Some(h) = hearing.as_mut() {
                    h.look(&mut last_heard);
                }
                // Awake anyway: move the deadline here rather than wake for it.
                silence.as_mut().reset(last_heard + silence_limit);
                if renewal_key.is_none()
                    && renew_at.is_some_and(|r| verge_api::clock::now_secs() as i64 >= r)
                {
                    let (key_pem, csr_pem) = verge_tunnel::pki::new_node_key_and_csr(&ctx.identity.node)?;
                    if let Err(e) = write_msg(writer, &EdgeToHub::Renew { csr_pem }).await {
                        return lost(e);
                    }
                    renewal_key = Some(key_pem);
                }
                // The facts are looked at in a block of their own: held across the
                // write below, they would take their room in this future (which
                // lasts the session) for good. A write that fails ends the session,
                // and what it kept with it.
                let status = {
                    let mut now = (ctx.facts)();
                    if let Some(p) = ctx.peers {
                        now.info.insert(verge_api::node::PEER_ADDRESS.into(), p.advertise().to_string());
                        now.peers = p.verdicts();
                    }
                    let send_facts = match &facts_sent {
                        Some((prev, at)) => *prev != now || at.elapsed() >= FACTS_EVERY,
                        None => true,
                    };
                    send_facts.then(|| {
                        let status = Box::new(now.clone());
                        facts_sent = Some((now, tokio::time::Instant::now()));
                        status
                    })
                };
                // A metrics round waiting goes with the heartbeat, in the same
                // datagram: the shipper is woken first, so that on the agent's one
                // thread it writes its round before QUIC's driver (woken by the
                // heartbeat's write, behind it) sends.
                ctx.telemetry.beat();
                if let Err(e) = write_msg(writer, &EdgeToHub::Heartbeat { status }).await {
                    return lost(e);
                }
                if std::mem::take(&mut first_heartbeat) {
                    agent.mark_all_dirty();
                }
            }
            _ = agent.outbox.notified(), if !first_heartbeat => {
                for (name, uid, status) in agent.take_dirty() {
                    if let Err(e) = write_msg(writer, &EdgeToHub::InstanceStatus { name, uid, status }).await {
                        // Unsent: mark dirty again so the next session sends it.
                        agent.mark_all_dirty();
                        return lost(e);
                    }
                }
                for (name, uid) in agent.take_removed() {
                    if let Err(e) = write_msg(writer, &EdgeToHub::InstanceRemoved { name, uid }).await {
                        return lost(e);
                    }
                }
            }
        }
    }
}

fn answer(agent: &Agent, req: RequestBody) -> ResponseBody {
    match req {
        RequestBody::Logs {
            instance,
            tail_bytes,
        }
        | RequestBody::LogsFollow {
            instance,
            tail_bytes,
        } => match agent.log_path(&instance) {
            None => ResponseBody::Error {
                message: format!("no instance '{instance}' on this node"),
            },
            Some(path) => match crate::files::tail(&path, tail_bytes.min(8 << 20)) {
                Ok(data) => ResponseBody::Logs { data },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ResponseBody::Logs {
                    data: String::new(),
                },
                Err(e) => ResponseBody::Error {
                    message: format!("reading {}: {e}", path.display()),
                },
            },
        },
    }
}
