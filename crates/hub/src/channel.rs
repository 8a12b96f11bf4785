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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use verge_api::channel::{
    EdgeToHub, HubToEdge, InstanceChange, MIN_PROTOCOL_VERSION, PART_BYTES, PROTOCOL_VERSION,
    SNAPSHOT_PARTS_SINCE,
};
use verge_api::clock::now_rfc3339;
use verge_api::{
    ApiError, ErrorCode, Instance, InstanceSpec, Kind, NodePhase, NodeSpec, NodeStatus, kind_prefix,
};
use verge_store::{EventKind, StoreError};
use verge_tunnel::frame::{
    FrameError, MAX_FRAME, MAX_UNAUTHENTICATED_FRAME, decode, read_frame, read_msg_limited,
    write_msg,
};

use crate::identity::PeerIdentity;
use crate::objects::{decode_value, store_err};
use crate::state::HubState;

/// How long a peer has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a bookmark is sent when only other nodes' changes happened.
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

fn label(result: &str) -> Vec<(String, String)> {
    vec![("result".to_string(), result.to_string())]
}

/// Serve an enrolment connection.
pub async fn serve_enroll<S: AsyncRead + AsyncWrite + Unpin>(st: Arc<HubState>, mut stream: S) {
    let reply = match tokio::time::timeout(
        FIRST_MESSAGE_TIMEOUT,
        read_msg_limited::<EdgeToHub, _>(&mut stream, MAX_UNAUTHENTICATED_FRAME),
    )
    .await
    {
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

/// Serve an identified edge channel. `node` is the name from the client certificate.
pub async fn serve_channel<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    st: Arc<HubState>,
    stream: S,
    identity: Option<PeerIdentity>,
    transport: &'static str,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let refuse = |code: &str, message: String| HubToEdge::error(code, message);
    let Some(identity) = identity else {
        let _ = write_msg(
            &mut writer,
            &refuse(
                "unauthorized",
                "the channel needs a node certificate; enrol first with --join-token".into(),
            ),
        )
        .await;
        return;
    };
    let node = identity.node.clone();
    if let Err(r) = crate::identity::admit(&st, &identity, "channel").await {
        let _ = write_msg(&mut writer, &refuse(r.code, r.error.message)).await;
        return;
    }
    let hello = tokio::time::timeout(
        FIRST_MESSAGE_TIMEOUT,
        read_msg_limited::<EdgeToHub, _>(&mut reader, MAX_UNAUTHENTICATED_FRAME),
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
                &mut writer,
                &refuse("protocol", "expected hello first".into()),
            )
            .await;
            return;
        }
    };
    if let Err(e) = check_version(protocol_version) {
        let _ = write_msg(&mut writer, &refuse("protocol", e.message)).await;
        return;
    }
    if let Err(retry) = st.admit() {
        let msg = format!(
            "hub is admitting {} edges per second; retry in {}ms",
            st.config.admit_rate,
            retry.as_millis()
        );
        let busy = HubToEdge::from_api(
            "busy",
            ApiError::new(ErrorCode::Unavailable, msg).retry_after(retry),
        );
        let _ = write_msg(&mut writer, &busy).await;
        return;
    }
    // A revision from another history (a store restored from a backup, or another
    // store) cannot be resumed from: the edge gets a snapshot.
    let resume = match crate::history::can_resume(
        st.objects.store().as_ref(),
        edge_epoch.as_deref(),
        since,
    )
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
            let _ = write_msg(&mut writer, &refuse("unavailable", store_err(e).message)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<HubToEdge>(1024);
    let welcome = HubToEdge::Welcome {
        protocol_version: PROTOCOL_VERSION,
        node: node.clone(),
        heartbeat_interval_ms: st.config.heartbeat_interval.as_millis() as u64,
        epoch: st.epoch().map(str::to_string),
    };
    if write_msg(&mut writer, &welcome).await.is_err() {
        return;
    }
    let conn = st.edges.register(
        &node,
        identity.enrolment.clone(),
        tx.clone(),
        protocol_version,
        transport,
        &st.metrics,
    );
    crate::replicas::claim_session(&st, &node, conn.id).await;
    tracing::info!(node = %node, since, agent_version = %agent_version, "edge connected");
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
    let sync_task = tokio::spawn(sync_loop(
        st.clone(),
        node.clone(),
        resume,
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
        if let Err(e) =
            handle_edge_message(&st, &node, &conn, msg, protocol_version, transport).await
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
    crate::replicas::release_session(&st, &node, conn.id).await;
    sync_task.abort();
    drop(tx);
    drop(conn);
    // The refusal, if any, is the last frame the edge gets.
    let _ = tokio::time::timeout(WRITE_DEADLINE, writer_task).await;
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
            // Liveness is answered at once; the store is written only when the facts
            // change, the node was not Ready, or the persisted heartbeat is getting old
            // (well inside the node grace period), so an idle fleet costs few writes.
            let _ = conn.tx.send(HubToEdge::HeartbeatAck).await;
            let persist_every = (st.config.node_grace / 3).min(Duration::from_secs(30));
            let due = conn.heartbeat_persisted_before(persist_every);
            let (mut changed, mut written) = (false, false);
            // Alive, but a node that cannot be sent its desired state is not Ready.
            let unsyncable = st.edges.sync_failure(node);
            let phase = match unsyncable {
                Some(_) => NodePhase::NotReady,
                None => NodePhase::Ready,
            };
            st.objects
                .update_status::<NodeSpec>(node, |_, s| {
                    if status.is_none() && !due && s.phase == phase {
                        return Ok(false);
                    }
                    written = true;
                    let was_ready = s.phase == NodePhase::Ready;
                    let facts = status.as_deref().cloned().unwrap_or_else(|| s.clone());
                    let next = NodeStatus {
                        phase,
                        last_heartbeat: Some(now_rfc3339()),
                        protocol_version,
                        transport: transport.into(),
                        message: unsyncable.clone().unwrap_or_default(),
                        ..facts
                    };
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
            // Only a heartbeat that reached the store restarts the clock: marking the
            // skipped ones too left the stored heartbeat to the once-a-minute facts,
            // older than the grace period, and every node went NotReady each minute.
            if written {
                conn.mark_heartbeat_persisted();
            }
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

fn bound_to(obj: &Option<Instance>, node: &str) -> bool {
    obj.as_ref()
        .is_some_and(|i| i.status.node.as_deref() == Some(node))
}

/// Watch options of a session's sync: progress notifications as often as bookmarks
/// go out, so that an edge whose instances do not change still moves its revision on
/// (and can resume after the history of busier prefixes is compacted).
fn bookmarks() -> verge_store::WatchOptions {
    verge_store::WatchOptions {
        progress: Some(BOOKMARK_EVERY),
    }
}

/// Send the node its desired state: from `since` as changes, or as a snapshot.
async fn sync_loop(
    st: Arc<HubState>,
    node: String,
    since: u64,
    protocol_version: u32,
    tx: mpsc::Sender<HubToEdge>,
) {
    let prefix = kind_prefix(InstanceSpec::PLURAL);
    // What the edge has been sent: name -> (uid, generation). Status-only changes of an
    // instance the edge already has are not sent back to it.
    let mut sent: HashMap<String, (String, u64)> = HashMap::new();
    let store = st.objects.store().clone();
    let watch = if since == 0 {
        Err(StoreError::Compacted {
            requested: 0,
            compact_revision: 0,
        })
    } else {
        store.watch_with(&prefix, since + 1, bookmarks()).await
    };
    let mut last_sent = since;
    let sync_kind = |kind: &str| {
        st.metrics
            .syncs
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    };
    let mut watch = match watch {
        Ok(w) => {
            sync_kind("resume");
            w
        }
        Err(StoreError::Compacted { .. }) => {
            // First sync, or the edge was away longer than the history we keep.
            sync_kind("snapshot");
            let (items, revision) = match st.objects.list::<InstanceSpec>().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e.message, "snapshot failed");
                    return;
                }
            };
            let instances: Vec<Instance> = items
                .into_iter()
                .filter(|i| i.status.node.as_deref() == Some(node.as_str()))
                .collect();
            for i in &instances {
                sent.insert(
                    i.name().to_string(),
                    (i.metadata.uid.clone(), i.metadata.generation),
                );
            }
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
            if send_snapshot(&tx, protocol_version, revision, instances)
                .await
                .is_err()
            {
                return;
            }
            last_sent = revision;
            match store.watch_with(&prefix, revision + 1, bookmarks()).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "watch failed after snapshot");
                    return;
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "watch failed");
            return;
        }
    };
    let mut seen = last_sent;
    let mut tick = tokio::time::interval(BOOKMARK_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            batch = watch.recv() => {
                let Some(batch) = batch else { return };
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        // Fell behind compaction while connected: make the edge resync.
                        tracing::warn!(node = %node, error = %e, "watch ended; closing channel so the edge resyncs");
                        let _ = tx.send(HubToEdge::error("gone", e.to_string())).await;
                        return;
                    }
                };
                if batch.is_progress() {
                    // Nothing under the prefix up to here: the next bookmark says so.
                    seen = seen.max(batch.revision);
                    continue;
                }
                let mut changes = Vec::new();
                for ev in &batch.events {
                    let new: Option<Instance> = match ev.kind {
                        EventKind::Put => decode_value(&ev.kv.value, ev.kv.mod_revision),
                        EventKind::Delete => None,
                    };
                    let prev: Option<Instance> = ev.prev_kv.as_ref().and_then(|p| decode_value(&p.value, p.mod_revision));
                    let name = ev.kv.key.trim_start_matches(&prefix).to_string();
                    if bound_to(&new, &node) {
                        let Some(inst) = new else { continue };
                        let ident = (inst.metadata.uid.clone(), inst.metadata.generation);
                        if sent.get(&name) == Some(&ident) {
                            continue;
                        }
                        sent.insert(name, ident);
                        changes.push(InstanceChange::Upsert { instance: Box::new(inst) });
                    } else if bound_to(&prev, &node) || sent.contains_key(&name) {
                        sent.remove(&name);
                        changes.push(InstanceChange::Remove { name });
                    }
                }
                seen = batch.revision;
                if !changes.is_empty() {
                    // In parts that each fit a frame; all but the last keep the edge at
                    // the revision it had, so a session cut between parts resumes right.
                    let parts = in_parts(changes, |c| match c {
                        InstanceChange::Upsert { instance } => encoded_len(instance),
                        InstanceChange::Remove { name } => name.len() + 32,
                    });
                    let n = parts.len();
                    for (i, changes) in parts.into_iter().enumerate() {
                        let revision = if i + 1 == n { batch.revision } else { last_sent };
                        if tx.send(HubToEdge::Changes { revision, changes }).await.is_err() {
                            return;
                        }
                    }
                    last_sent = batch.revision;
                }
            }
            _ = tick.tick() => {
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
fn in_parts<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
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
    tx: &mpsc::Sender<HubToEdge>,
    protocol_version: u32,
    revision: u64,
    instances: Vec<Instance>,
) -> Result<(), mpsc::error::SendError<HubToEdge>> {
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
