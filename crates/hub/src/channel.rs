//! The hub's side of the edge channel.
//!
//! Two kinds of connection arrive on the hub's TLS port, told apart by ALPN:
//! - `verge-enroll/1`: an edge without an identity presents a join token and a CSR,
//!   and gets back a certificate ([`crate::app::enrolment`] does the enrolment: one
//!   transaction creates the Node and spends the token).
//! - `verge-channel/1`: an enrolled edge (mutual TLS; the node name comes from its
//!   certificate) says `Hello` with the last revision it applied; the hub sends the
//!   instances bound to that node as incremental changes from there (or a snapshot if
//!   that history was compacted), and receives heartbeats and instance statuses.
//!
//! Everything an edge sends is checked against its identity, by the rules of the
//! application layer ([`crate::app`]): a node can only report on itself and on
//! instances bound to it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use verge_api::channel::{
    ENDPOINTS_SINCE, EdgeToHub, FLEET_SINCE, HubToEdge, InstanceChange, MIN_PROTOCOL_VERSION,
    PART_BYTES, PEERS_SINCE, PROTOCOL_VERSION, QUIET_HEARTBEATS_SINCE, SNAPSHOT_PARTS_SINCE,
};
use verge_api::clock::now_rfc3339;
use verge_api::{ApiError, ErrorCode, Instance, InstanceSpec, NodePhase, NodeSpec, NodeStatus};
use verge_tunnel::frame::{
    FrameError, MAX_FRAME, MAX_UNAUTHENTICATED_FRAME, decode, read_frame, read_frame_limited,
    read_msg_limited, write_msg,
};

use crate::identity::PeerIdentity;
use crate::objects::store_err;
use crate::state::{FromHub, HubState, QueueClosed, ToEdge};

/// How long a peer has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a bookmark is sent when only other nodes' changes happened. It need only
/// be well inside the history the hub keeps (at least 5 minutes, see
/// [`crate::controllers::compaction`]) for a reconnecting edge to resume with a delta;
/// each costs a datagram both ways per edge, which at 30 s was a sixth of an idle
/// fleet's traffic.
const BOOKMARK_EVERY: Duration = Duration::from_secs(120);

fn label(result: &str) -> Vec<(String, String)> {
    vec![("result".to_string(), result.to_string())]
}

/// Serve an enrolment connection.
pub async fn serve_enroll<S: AsyncRead + AsyncWrite + Unpin>(st: Arc<HubState>, mut stream: S) {
    let first = tokio::time::timeout(
        FIRST_MESSAGE_TIMEOUT,
        read_frame_limited(&mut stream, MAX_UNAUTHENTICATED_FRAME),
    )
    .await;
    // A region hub enrols at the same door, with a message of its own.
    if let Ok(Ok(Some(body))) = &first
        && let Ok(verge_api::uplink::RegionToCentre::Enroll {
            protocol_version,
            token,
            region,
        }) = decode(body)
    {
        let reply = if protocol_version != verge_api::uplink::UPLINK_VERSION {
            verge_api::uplink::CentreToRegion::Error {
                code: "protocol".into(),
                message: format!(
                    "region hub speaks uplink protocol {protocol_version}; this centre speaks {}",
                    verge_api::uplink::UPLINK_VERSION
                ),
            }
        } else {
            match crate::region::centre::enrol(&st, &token, &region).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(region = %region, error = %e.message, "region enrolment refused");
                    verge_api::uplink::CentreToRegion::Error {
                        code: code_name(e.code).into(),
                        message: e.message,
                    }
                }
            }
        };
        let _ = write_msg(&mut stream, &reply).await;
        let _ = stream.shutdown().await;
        return;
    }
    let first = first.map(|r| r.and_then(|b| b.map(|b| decode::<EdgeToHub>(&b)).transpose()));
    let reply = match first {
        // A region hub's nodes enrol at its centre: the request goes there.
        Ok(Ok(Some(request @ EdgeToHub::Enroll { .. }))) if st.config.region.is_some() => {
            crate::region::relay_enrolment(&st, &request).await
        }
        Ok(Ok(Some(EdgeToHub::Enroll {
            protocol_version,
            token,
            node_name,
            csr_pem,
            labels,
        }))) => {
            let request = crate::app::enrolment::Request {
                protocol_version,
                token,
                node_name: node_name.clone(),
                csr_pem,
                labels,
            };
            match crate::app::enrolment::enrol(&st, &request).await {
                Ok(e) => {
                    tracing::info!(node = %node_name, "edge enrolled");
                    st.metrics.enrolments.get_or_create(&label("ok")).inc();
                    HubToEdge::Enrolled {
                        cert_pem: e.cert_pem,
                        ca_pem: e.ca_pem,
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %node_name, error = %e.message, "enrolment refused");
                    st.metrics.enrolments.get_or_create(&label("refused")).inc();
                    HubToEdge::from_api(code_name(e.code), e)
                }
            }
        }
        Ok(Ok(_)) => HubToEdge::error("protocol", "expected an enroll message first"),
        Ok(Err(FrameError::TooLarge { len, max })) => {
            st.metrics.channel_rejected.inc();
            HubToEdge::error(
                "protocol",
                format!(
                    "an enrolment request of {len} bytes exceeds the {max} bytes allowed before a peer is known"
                ),
            )
        }
        _ => return,
    };
    let _ = write_msg(&mut stream, &reply).await;
    let _ = stream.shutdown().await;
}

/// The wire name of an error code.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Invalid => "invalid",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::NotFound => "notFound",
        ErrorCode::Conflict => "conflict",
        ErrorCode::Gone => "gone",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
    }
}

pub(crate) fn check_version(v: u32) -> Result<(), ApiError> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!(
                "edge speaks channel protocol {v}; this hub speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; upgrade the {}",
                if v < MIN_PROTOCOL_VERSION {
                    "edge"
                } else {
                    "hub"
                }
            ),
        ));
    }
    Ok(())
}

/// Serve an identified edge channel. `identity` comes from the client certificate;
/// `admitted`, if any, is told once the session is admitted (the data streams of a
/// QUIC connection wait for it, see `accept_data_streams`).
// The steps a session takes once (admission, resumption, settling a return: one
// step, `admit_session`) and each message's handling are boxed: an unboxed future is
// as large as its largest step for the session's whole life, and a hub holds one
// per edge (boxing them took it from 5.0 KiB to 1.7, and the admission as one step
// to 1.1).
pub async fn serve_channel<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    st: Arc<HubState>,
    stream: S,
    identity: Option<PeerIdentity>,
    transport: &'static str,
    admitted: Option<tokio::sync::watch::Sender<bool>>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let refuse = |code: &str, message: String| HubToEdge::error(code, message);
    let Some(Admitted {
        node,
        conn,
        resume,
        settled,
        protocol_version,
        tx,
        mut rx,
    }) = Box::pin(admit_session(
        &st,
        &mut reader,
        &mut writer,
        identity,
        transport,
        admitted,
    ))
    .await
    else {
        return;
    };
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            // An edge that takes nothing for this long is gone or hostile: what is
            // queued for it must not pile up.
            match tokio::time::timeout(WRITE_DEADLINE, write_msg(&mut writer, &msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "edge write failed");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        "edge took nothing for {}s; closing its channel",
                        WRITE_DEADLINE.as_secs()
                    );
                    break;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut closed = conn.closed_watch();
    let peers_task = (protocol_version >= PEERS_SINCE).then(|| {
        let endpoints_too = protocol_version >= ENDPOINTS_SINCE;
        tokio::spawn(tell_site(
            st.clone(),
            node.clone(),
            tx.clone(),
            endpoints_too,
        ))
    });
    let sync_task = tokio::spawn(sync_loop(
        st.clone(),
        node.clone(),
        resume,
        settled,
        protocol_version,
        tx.clone(),
    ));
    let idle_limit = st.config.heartbeat_interval * 3 + Duration::from_secs(5);
    let reason = loop {
        let read = tokio::select! {
            r = tokio::time::timeout(idle_limit, read_frame(&mut reader)) => r,
            // A newer session for this node, a delete or a re-enrolment ends this one.
            why = crate::state::closed_reason(&mut closed) => {
                let (code, message) = conn.refusal().unwrap_or(("replaced", why.clone()));
                let _ = tx.send(refuse(code, message)).await;
                break why;
            }
        };
        let frame = match read {
            Err(_) => break format!("nothing received for {}s", idle_limit.as_secs()),
            Ok(Ok(None)) => break "edge closed the connection".to_string(),
            Ok(Err(FrameError::TooLarge { len, max })) => {
                st.metrics.channel_rejected.inc();
                let _ = tx
                    .send(refuse(
                        "protocol",
                        format!("frame of {len} bytes exceeds {max}"),
                    ))
                    .await;
                break format!("oversized frame ({len} bytes)");
            }
            Ok(Err(e)) => break format!("read failed: {e}"),
            Ok(Ok(Some(f))) => f,
        };
        let msg = match decode::<EdgeToHub>(&frame) {
            Ok(m) => m,
            Err(e) => {
                st.metrics.channel_rejected.inc();
                let _ = tx
                    .send(refuse("protocol", format!("malformed frame: {e}")))
                    .await;
                break format!("malformed frame: {e}");
            }
        };
        if let Err(e) = Box::pin(handle_edge_message(
            &st,
            &node,
            &conn,
            msg,
            protocol_version,
            transport,
        ))
        .await
        {
            if e.code == ErrorCode::Forbidden {
                st.metrics.channel_rejected.inc();
                tracing::warn!(node = %node, error = %e.message, "edge message refused");
            } else {
                tracing::warn!(node = %node, error = %e.message, "edge message failed");
            }
            let _ = tx.send(HubToEdge::from_api(code_name(e.code), e)).await;
        }
    };
    tracing::info!(node = %node, %reason, "edge disconnected");
    conn.close(&format!(
        "the channel to node '{node}' was lost ({reason}); the edge reconnects on its own, run the command again then"
    ));
    st.edges.unregister(&node, conn.id);
    Box::pin(crate::replicas::release_session(&st, &node, conn.id)).await;
    sync_task.abort();
    if let Some(t) = peers_task {
        t.abort();
    }
    drop(tx);
    drop(conn);
    // The refusal, if any, is the last frame the edge gets.
    let _ = tokio::time::timeout(WRITE_DEADLINE, writer_task).await;
}

/// A session the hub admitted, and what its loop needs.
struct Admitted {
    node: String,
    conn: Arc<crate::state::EdgeConn>,
    /// The revision its sync resumes from (0: a snapshot).
    resume: u64,
    /// The revision its return was settled at, if anything was settled.
    settled: Option<u64>,
    protocol_version: u32,
    tx: ToEdge,
    rx: FromHub,
}

/// A session's first steps: the edge's identity and hello, admission, where its sync
/// resumes, settling its return, the welcome and its registration. `None`: refused
/// (the edge was told why) or gone. A step of its own, boxed by the caller: a session
/// lasts long, these steps do not, and a future keeps room for its largest step for
/// all of its life.
async fn admit_session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    st: &Arc<HubState>,
    reader: &mut tokio::io::ReadHalf<S>,
    writer: &mut tokio::io::WriteHalf<S>,
    identity: Option<PeerIdentity>,
    transport: &'static str,
    admitted: Option<tokio::sync::watch::Sender<bool>>,
) -> Option<Admitted> {
    let refuse = |code: &str, message: String| HubToEdge::error(code, message);
    let Some(identity) = identity else {
        let _ = write_msg(
            &mut *writer,
            &refuse(
                "unauthorized",
                "the channel needs a node certificate; enrol first with --join-token".into(),
            ),
        )
        .await;
        return None;
    };
    let node = identity.node.clone();
    if let Err(r) = Box::pin(crate::identity::admit(st, &identity, "channel")).await {
        let _ = write_msg(&mut *writer, &refuse(r.code, r.error.message)).await;
        return None;
    }
    let hello = tokio::time::timeout(
        FIRST_MESSAGE_TIMEOUT,
        read_msg_limited::<EdgeToHub, _>(&mut *reader, MAX_UNAUTHENTICATED_FRAME),
    )
    .await;
    let (since, agent_version, protocol_version, edge_epoch) = match hello {
        Ok(Ok(Some(EdgeToHub::Hello {
            protocol_version,
            agent_version,
            since_revision,
            epoch,
        }))) => (since_revision, agent_version, protocol_version, epoch),
        _ => {
            let _ = write_msg(
                &mut *writer,
                &refuse("protocol", "expected hello first".into()),
            )
            .await;
            return None;
        }
    };
    if let Err(e) = check_version(protocol_version) {
        let _ = write_msg(&mut *writer, &refuse("protocol", e.message)).await;
        return None;
    }
    if let Err(retry) = st.admit() {
        st.metrics
            .connections_refused
            .get_or_create(&vec![("reason".into(), "admit_rate".into())])
            .inc();
        let msg = format!(
            "hub is admitting {} edges per second; retry in {}ms",
            st.config.admit_rate,
            retry.as_millis()
        );
        let busy = HubToEdge::from_api(
            "busy",
            ApiError::new(ErrorCode::Unavailable, msg).retry_after(retry),
        );
        let _ = write_msg(&mut *writer, &busy).await;
        return None;
    }
    // A revision from another history (a store restored from a backup, or another
    // store) cannot be resumed from: the edge gets a snapshot.
    let resume = match Box::pin(crate::history::can_resume(
        st.objects.store().as_ref(),
        edge_epoch.as_deref(),
        since,
    ))
    .await
    {
        Ok(true) => since,
        Ok(false) => {
            if since != 0 {
                tracing::warn!(node = %node, since, epoch = ?edge_epoch, "the edge's revision is not from this store's history (restored from a backup?); sending a snapshot");
            }
            0
        }
        Err(e) => {
            let _ = write_msg(&mut *writer, &refuse("unavailable", store_err(e).message)).await;
            return None;
        }
    };
    // Instances replaced while this node was away are settled before it hears
    // anything, so that a copy it keeps is never sent a removal, nor a status it
    // reports refused.
    let settled = Box::pin(crate::disconnect::settle_return(st, &node)).await;
    let (tx, rx) = ToEdge::channel(1024);
    let spread = st.reconnect_spread_ms();
    let welcome = HubToEdge::Welcome {
        protocol_version: PROTOCOL_VERSION,
        node: node.clone(),
        heartbeat_interval_ms: st.config.heartbeat_interval.as_millis() as u64,
        epoch: st.epoch().map(str::to_string),
        reconnect_spread_ms: spread,
    };
    if write_msg(&mut *writer, &welcome).await.is_err() {
        return None;
    }
    let conn = st.edges.register(
        &node,
        identity.enrolment.clone(),
        tx.clone(),
        protocol_version,
        transport,
        &st.metrics,
    );
    if let Some(spread) = spread {
        conn.spread_update(spread);
    }
    if let Some(admitted) = &admitted {
        admitted.send_replace(true);
    }
    Box::pin(crate::replicas::claim_session(st, &node, conn.id)).await;
    tracing::info!(node = %node, since, agent_version = %agent_version, "edge connected");
    Some(Admitted {
        node,
        conn,
        resume,
        settled,
        protocol_version,
        tx,
        rx,
    })
}

/// How often a connected node's status is written to the store when nothing in it
/// changed (its `lastHeartbeat` is at most this old while it is connected).
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);

/// A stable hash of a node's facts, to tell whether they changed.
fn facts_hash(s: &NodeStatus) -> u64 {
    serde_json::to_vec(s).map_or(0, |b| verge_api::hash::fnv1a(&b))
}

/// How long a frame to an edge may take to be written.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

async fn handle_edge_message(
    st: &HubState,
    node: &str,
    conn: &crate::state::EdgeConn,
    msg: EdgeToHub,
    protocol_version: u32,
    transport: &str,
) -> Result<(), ApiError> {
    match msg {
        EdgeToHub::Heartbeat { status } => {
            // Liveness is answered at once and kept in memory (the node lifecycle reads
            // it from the registry). The store is written only when the phase or the
            // facts change, or what it holds is getting old: an idle fleet of a
            // hundred thousand edges costs a few hundred writes a second, not ten
            // thousand (Kubernetes moved heartbeats off node objects for this).
            let interval = st.config.heartbeat_interval;
            if let Some(gap) = conn.heartbeat() {
                st.metrics
                    .heartbeat_lag
                    .observe(gap.saturating_sub(interval).as_secs_f64());
            }
            // Over QUIC an edge of protocol 7 hears the hub in QUIC's acknowledgement
            // of its heartbeat: an answer would cost two more datagrams (itself and
            // the edge's acknowledgement of it), a third of a fleet's traffic.
            if protocol_version < QUIET_HEARTBEATS_SINCE || transport != "quic" {
                let _ = conn.tx.send(HubToEdge::HeartbeatAck).await;
            }
            // A fleet that grew since this edge was told how to spread its
            // reconnection tells it again (a few times over a fleet's growth).
            if protocol_version >= FLEET_SINCE
                && let Some(reconnect_spread_ms) = st
                    .reconnect_spread_ms()
                    .and_then(|now| conn.spread_update(now))
            {
                let _ = conn
                    .tx
                    .send(HubToEdge::Fleet {
                        reconnect_spread_ms,
                    })
                    .await;
            }
            // Alive, but a node that cannot be sent its desired state is not Ready.
            let unsyncable = st.edges.sync_failure(node);
            let phase = match unsyncable {
                Some(_) => NodePhase::NotReady,
                None => NodePhase::Ready,
            };
            let facts = status.as_deref().map(facts_hash);
            if !conn.status_due(phase, facts, STATUS_REFRESH) {
                return Ok(());
            }
            let mut changed = false;
            st.objects
                .update_status::<NodeSpec>(node, |_, s| {
                    let was_ready = s.phase == NodePhase::Ready;
                    let facts = status.as_deref().cloned().unwrap_or_else(|| s.clone());
                    let next = NodeStatus {
                        phase,
                        last_heartbeat: Some(now_rfc3339()),
                        last_transition: if s.phase == phase {
                            s.last_transition.clone()
                        } else {
                            Some(now_rfc3339())
                        },
                        protocol_version,
                        transport: transport.into(),
                        message: unsyncable.clone().unwrap_or_default(),
                        ..facts
                    };
                    // The store holds this already, and recently enough: nothing to
                    // write (a fleet reconnecting to a restarted hub rewrites nothing).
                    let fresh = s
                        .last_heartbeat
                        .as_deref()
                        .and_then(verge_api::clock::parse_rfc3339)
                        .is_some_and(|t| {
                            verge_api::clock::now_secs().saturating_sub(t)
                                < STATUS_REFRESH.as_secs()
                        });
                    let same = NodeStatus {
                        last_heartbeat: None,
                        ..next.clone()
                    } == NodeStatus {
                        last_heartbeat: None,
                        ..s.clone()
                    };
                    if same && fresh {
                        return Ok(false);
                    }
                    changed = !was_ready
                        || next.capacity != s.capacity
                        || next.allocatable != s.allocatable;
                    *s = next;
                    if !was_ready && phase == NodePhase::Ready {
                        tracing::info!(node, "node is Ready");
                    }
                    Ok(true)
                })
                .await
                .inspect_err(|e| {
                    if e.code == ErrorCode::NotFound {
                        // Deleted while connected: end the session at once.
                        conn.refuse(
                            crate::identity::NODE_DELETED,
                            &format!("node '{node}' was deleted from the hub; its edge stops its workloads"),
                        );
                    }
                })?;
            conn.status_written(phase, facts);
            if changed {
                st.schedule_kick.notify_one();
            }
            Ok(())
        }
        EdgeToHub::InstanceStatus { name, uid, status } => {
            let p = crate::app::Principal::Node(node.to_string());
            crate::app::update_status::<InstanceSpec>(st, &p, &name, Some(&uid), status)
                .await
                .map(|_| ())
                .or_else(|e| {
                    // Deleted meanwhile: the edge learns it from its sync.
                    if e.code == ErrorCode::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
        }
        EdgeToHub::Renew { csr_pem } => {
            // The subject comes from the connection's identity, never from the request.
            let cert_pem =
                crate::app::enrolment::sign(st, &csr_pem, node, conn.enrolment.as_deref())?;
            tracing::info!(node, "renewed node certificate");
            let _ = conn.tx.send(HubToEdge::Renewed { cert_pem }).await;
            Ok(())
        }
        EdgeToHub::InstanceRemoved { name, .. } => {
            tracing::debug!(node, instance = %name, "edge stopped instance");
            Ok(())
        }
        EdgeToHub::Response { id, body } => {
            conn.complete(id, body);
            Ok(())
        }
        EdgeToHub::Error { code, message } => {
            tracing::warn!(node, %code, %message, "edge reported an error");
            Ok(())
        }
        EdgeToHub::Enroll { .. } | EdgeToHub::Hello { .. } => Err(ApiError::new(
            ErrorCode::Invalid,
            "enroll/hello are only valid as the first message",
        )),
    }
}

/// How often at most a session looks again at its node's site peers and clusters'
/// endpoints: a joining fleet, or a rollout across many clusters, changes the index
/// many times a second, and every change wakes every session.
const SITE_EVERY: Duration = Duration::from_secs(3);

/// Tell the node its site's peers and key and (from protocol 6) its clusters'
/// endpoints ([`crate::sites`]) now and whenever they change.
pub(crate) async fn tell_site(st: Arc<HubState>, node: String, tx: ToEdge, endpoints_too: bool) {
    let mut told: Option<(String, Vec<verge_api::channel::SitePeer>)> = None;
    let mut told_endpoints: Vec<Arc<Vec<verge_api::cluster::Endpoint>>> = Vec::new();
    let mut changes = st.sites.changes();
    loop {
        changes.borrow_and_update();
        let now = st.sites.peers_of(&node).unwrap_or_default();
        if told.as_ref() != Some(&now) {
            let key = if now.0.is_empty() {
                String::new()
            } else {
                crate::sites::site_key(st.ca.key_pem(), &now.0)
            };
            let msg = HubToEdge::Peers {
                key,
                peers: now.1.clone(),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            told = Some(now);
        }
        if endpoints_too {
            let now = st.sites.endpoints_of(&node);
            let same = now.len() == told_endpoints.len()
                && now
                    .iter()
                    .zip(&told_endpoints)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            // Nothing to say to a node that was told nothing and has none.
            let nothing = told_endpoints.is_empty() && now.iter().all(|e| e.is_empty());
            if !same && !nothing {
                let mut endpoints: Vec<_> = now.iter().flat_map(|e| e.iter().cloned()).collect();
                endpoints.sort();
                endpoints.dedup();
                if tx.send(HubToEdge::Endpoints { endpoints }).await.is_err() {
                    return;
                }
            }
            if !same {
                told_endpoints = now;
            }
        }
        // Asleep until the index changes: an idle fleet's sessions cost nothing here.
        tokio::time::sleep(SITE_EVERY).await;
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Send `changes` to the edge in parts that each fit a frame; all but the last keep
/// the edge at `before`, so a session cut between parts resumes right.
async fn send_changes(
    tx: &ToEdge,
    before: u64,
    revision: u64,
    changes: Vec<InstanceChange>,
) -> Result<(), QueueClosed> {
    let parts = in_parts(changes, |c| match c {
        InstanceChange::Upsert { instance } => encoded_len(instance),
        InstanceChange::Remove { name } => name.len() + 32,
    });
    let n = parts.len();
    for (i, changes) in parts.into_iter().enumerate() {
        let revision = if i + 1 == n { revision } else { before };
        tx.send(HubToEdge::Changes { revision, changes }).await?;
    }
    Ok(())
}

/// Send an update the edge does not have yet, and move `last_sent` on.
async fn forward(
    tx: &ToEdge,
    last_sent: &mut u64,
    update: crate::fanout::Update,
) -> Result<(), QueueClosed> {
    if update.revision > *last_sent {
        send_changes(tx, *last_sent, update.revision, update.changes).await?;
        *last_sent = update.revision;
    }
    Ok(())
}

/// Send the node its desired state: from `since` as changes, or as a snapshot, then
/// its changes as they come, from the hub's one instance watch ([`crate::fanout`]).
pub(crate) async fn sync_loop(
    st: Arc<HubState>,
    node: String,
    since: u64,
    settled: Option<u64>,
    protocol_version: u32,
    tx: ToEdge,
) {
    let sync_kind = |kind: &str| {
        st.metrics
            .syncs
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    };
    // Resuming from a cache that has not seen the settlement could tell the node to
    // stop a copy it keeps: the sync waits for it.
    if let Some(revision) = settled {
        while !Box::pin(st.fanout.caught_up(revision, Duration::from_secs(10))).await {
            tracing::warn!(node = %node, revision, "the instance cache lags the store; the node's sync waits for it");
        }
    }
    let mut sub = Box::pin(st.fanout.subscribe(&node, since)).await;
    let mut last_sent = match sub.take_start() {
        crate::fanout::Start::Resume { revision, changes } => {
            sync_kind("resume");
            let sent = if changes.is_empty() {
                if revision > since {
                    tx.send(HubToEdge::Bookmark { revision }).await
                } else {
                    Ok(())
                }
            } else {
                Box::pin(send_changes(&tx, since, revision, changes)).await
            };
            if sent.is_err() {
                return;
            }
            revision
        }
        crate::fanout::Start::Snapshot {
            revision,
            instances,
        } => {
            // First sync, or the edge was away longer than the history kept.
            sync_kind("snapshot");
            // An old edge takes the snapshot in one message, which must fit a frame.
            let size: usize = instances.iter().map(encoded_len).sum();
            if protocol_version < SNAPSHOT_PARTS_SINCE && size + 1024 > MAX_FRAME {
                let why = format!(
                    "cannot sync: the node's desired state is {size} bytes, more than one message of channel protocol {protocol_version} can carry ({MAX_FRAME}); upgrade its agent (protocol {SNAPSHOT_PARTS_SINCE} sends it in parts) or move instances off it"
                );
                tracing::error!(node = %node, "{why}");
                st.edges.set_sync_failure(&node, Some(why));
                return;
            }
            st.edges.set_sync_failure(&node, None);
            if Box::pin(send_snapshot(&tx, protocol_version, revision, instances))
                .await
                .is_err()
            {
                return;
            }
            revision
        }
    };
    let mut tick = tokio::time::interval(BOOKMARK_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            update = sub.updates.recv() => {
                let Some(update) = update else {
                    // Cut off: this session fell behind, or the hub's watch restarted.
                    let _ = tx.send(HubToEdge::error("gone", "the hub's sync of this node restarted; reconnect and resume")).await;
                    return;
                };
                if Box::pin(forward(&tx, &mut last_sent, *update)).await.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {
                // Only other nodes' changes happened: say how far the edge is. Every
                // update up to `seen` is queued by the time `seen` can be read, so the
                // queue is drained first: a bookmark never skips a change.
                let seen = st.fanout.revision();
                while let Ok(update) = sub.updates.try_recv() {
                    if Box::pin(forward(&tx, &mut last_sent, *update)).await.is_err() {
                        return;
                    }
                }
                if seen > last_sent {
                    if tx.send(HubToEdge::Bookmark { revision: seen }).await.is_err() {
                        return;
                    }
                    last_sent = seen;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

fn encoded_len(i: &Instance) -> usize {
    serde_json::to_vec(i).map_or(0, |v| v.len())
}

/// Split `items` into runs whose encoded size stays under [`PART_BYTES`] (a single
/// item larger than that makes a run of its own; validation keeps objects far below).
pub(crate) fn in_parts<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item) + 8;
        if !current.is_empty() && bytes + n > PART_BYTES {
            parts.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += n;
        current.push(item);
    }
    if !current.is_empty() || parts.is_empty() {
        parts.push(current);
    }
    parts
}

/// Send a node its whole desired state: in parts to edges that take them, else in one
/// message (an old edge whose state outgrows a frame cannot sync, and says so).
async fn send_snapshot(
    tx: &ToEdge,
    protocol_version: u32,
    revision: u64,
    instances: Vec<Instance>,
) -> Result<(), QueueClosed> {
    if protocol_version < SNAPSHOT_PARTS_SINCE {
        return tx
            .send(HubToEdge::Snapshot {
                revision,
                instances,
            })
            .await;
    }
    let parts = in_parts(instances, encoded_len);
    let n = parts.len();
    for (i, instances) in parts.into_iter().enumerate() {
        tx.send(HubToEdge::SnapshotPart {
            revision,
            instances,
            last: i + 1 == n,
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_part_size_and_keep_every_item_in_order() {
        let items: Vec<usize> = (0..100).collect();
        let parts = in_parts(items.clone(), |_| PART_BYTES / 10);
        assert!(parts.len() >= 10, "{}", parts.len());
        assert!(parts.iter().all(|p| p.len() <= 10));
        assert_eq!(parts.concat(), items);
        assert_eq!(
            in_parts(Vec::<usize>::new(), |_| 1),
            vec![Vec::<usize>::new()]
        );
    }
}
