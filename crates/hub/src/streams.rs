//! Data streams: exec, port-forward, logs and edge-to-edge relay.
//!
//! The control stream of a channel carries sync, heartbeats and statuses only. Anything
//! that moves many bytes gets its own stream, so it has its own flow control and can
//! never delay a heartbeat: over QUIC a new bidirectional stream of the edge's
//! connection, over TLS/TCP a new connection (ALPN `verge-stream/1`) with the node's
//! certificate. The edge opens data streams (it is reachable only through its own
//! outbound connections): either because the hub asked ([`StreamHello::Accept`]) or to
//! relay an instance's connection to another instance ([`StreamHello::Relay`]), which
//! the hub allows only where [`relay_policy`] does.
//!
//! The hub relays chunk by chunk ([`splice`]); when either side or the edge's channel
//! goes away, the other side gets an `Error` chunk that says what happened.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, watch};
use verge_api::channel::{StreamHello, StreamPurpose};
use verge_api::{ApiError, ErrorCode, Instance, InstanceSpec};
use verge_tunnel::chunk::{Chunk, read_chunk, write_chunk};
use verge_tunnel::frame::{MAX_UNAUTHENTICATED_FRAME, read_msg_limited};
use verge_tunnel::quic::Duplex;

use crate::state::{HubState, closed_reason};

/// How long an edge has to say what a new data stream is for.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn count(st: &HubState, purpose: &str, result: &str) {
    st.metrics
        .streams
        .get_or_create(&vec![
            ("purpose".to_string(), purpose.to_string()),
            ("result".to_string(), result.to_string()),
        ])
        .inc();
}

/// The metrics name of a purpose.
pub fn purpose_name(p: &StreamPurpose) -> &'static str {
    match p {
        StreamPurpose::Logs { .. } => "logs",
        StreamPurpose::Exec { .. } => "exec",
        StreamPurpose::PortForward { .. } => "portForward",
    }
}

/// Whether a data stream's certificate is still to be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificate {
    /// Check it: the stream came on a connection of its own.
    Check,
    /// Checked already: the stream came on a QUIC connection whose channel session
    /// admitted this certificate, and which ends with that session.
    AdmittedWithChannel,
}

/// Serve a data stream an edge opened. `identity` comes from its certificate.
// What each kind of stream does is boxed, and so is reading its hello: unboxed, every
// stream's task would be as large as the largest step (5 KiB), and an edge's metrics
// stream lives as long as its session.
pub async fn serve_data_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    st: Arc<HubState>,
    mut stream: S,
    identity: Option<crate::identity::PeerIdentity>,
    certificate: Certificate,
) {
    let Some(identity) = identity else {
        let _ = write_chunk(
            &mut stream,
            &Chunk::Error("a data stream needs a node certificate".into()),
        )
        .await;
        return;
    };
    if certificate == Certificate::Check
        && let Err(r) = Box::pin(crate::identity::admit(&st, &identity, "data stream")).await
    {
        let _ = write_chunk(&mut stream, &Chunk::Error(r.error.message)).await;
        return;
    }
    let node = identity.node;
    let hello = match Box::pin(tokio::time::timeout(
        HELLO_TIMEOUT,
        read_msg_limited::<StreamHello, _>(&mut stream, MAX_UNAUTHENTICATED_FRAME),
    ))
    .await
    {
        Ok(Ok(Some(h))) => h,
        Ok(Err(e)) => {
            st.metrics.channel_rejected.inc();
            tracing::warn!(node, error = %e, "data stream refused: bad hello");
            let _ = write_chunk(&mut stream, &Chunk::Error(format!("bad stream hello: {e}"))).await;
            return;
        }
        _ => return,
    };
    match hello {
        StreamHello::Accept { id } => {
            let delivered = st
                .edges
                .conn(&node)
                .is_ok_and(|c| c.accept_stream(id, Box::new(stream)));
            if !delivered {
                tracing::debug!(node, id, "data stream nobody waits for (timed out?)");
            }
        }
        StreamHello::Relay { from, to, port } => {
            Box::pin(relay(st, node, Box::new(stream), from, to, port)).await;
        }
        StreamHello::Artifact { digest } => {
            let sent = Box::pin(crate::artifacts::serve_stream(&st, &node, stream, &digest)).await;
            count(&st, "artifact", if sent { "ok" } else { "failed" });
        }
        StreamHello::Metrics { ack_every } => {
            count(&st, "metrics", "ok");
            Box::pin(crate::telemetry::serve_stream(
                &st.tsdb,
                &st.metrics,
                &node,
                stream,
                ack_every,
            ))
            .await;
        }
    }
}

/// Whether instance `from` (on `node`) may reach port `port` of `to`; `Err` says why not.
///
/// Allowed only when all hold: `from` is bound to the node that asks, `from` declares
/// the link in `spec.links`, `to` declares the port in `spec.ports`, and both belong
/// to the same application (equal, non-empty `app` labels).
pub fn relay_policy(
    node: &str,
    from: &Instance,
    to: &Instance,
    port: u16,
) -> Result<String, String> {
    if crate::app::may_access(&crate::app::Principal::Node(node.to_string()), from).is_err() {
        return Err(format!(
            "instance '{}' is not on node '{node}'",
            from.name()
        ));
    }
    if !from
        .spec
        .links
        .iter()
        .any(|l| l.instance == to.name() && l.port == port)
    {
        return Err(format!(
            "instance '{}' declares no link to port {port} of '{}' (spec.links)",
            from.name(),
            to.name()
        ));
    }
    if !to.spec.ports.iter().any(|p| p.port == port) {
        return Err(format!(
            "port {port} is not declared by instance '{}' (spec.ports)",
            to.name()
        ));
    }
    let app = |i: &Instance| i.metadata.labels.get("app").cloned().unwrap_or_default();
    let (a, b) = (app(from), app(to));
    if a.is_empty() || a != b {
        return Err(format!(
            "instances '{}' (app={a:?}) and '{}' (app={b:?}) are not of the same application; relay is allowed only within one application (same 'app' label)",
            from.name(),
            to.name()
        ));
    }
    to.status
        .node
        .clone()
        .ok_or_else(|| format!("instance '{}' is not scheduled to a node yet", to.name()))
}

async fn relay(
    st: Arc<HubState>,
    node: String,
    mut stream: Box<dyn Duplex>,
    from: String,
    to: String,
    port: u16,
) {
    let checked = async {
        let from_i = st
            .objects
            .get::<InstanceSpec>(&from)
            .await
            .map_err(|e| e.message)?;
        let to_i = st
            .objects
            .get::<InstanceSpec>(&to)
            .await
            .map_err(|e| e.message)?;
        relay_policy(&node, &from_i, &to_i, port)
    }
    .await;
    let target = match checked {
        Ok(t) => t,
        Err(why) => {
            count(&st, "relay", "refused");
            tracing::warn!(node, from, to, port, reason = %why, "relay refused");
            let _ = write_chunk(&mut stream, &Chunk::Error(format!("relay refused: {why}"))).await;
            return;
        }
    };
    let source_closed = match st.edges.conn(&node) {
        Ok(c) => c.closed_watch(),
        Err(_) => return,
    };
    // The target's edge is here, or held by another hub replica: then that replica
    // opens the port-forward and the relay goes through both.
    let far = if st.edges.conn(&target).is_err()
        && let Some(holder) = crate::replicas::session_elsewhere(&st, &target).await
    {
        crate::replicas::port_forward_at(&st, &holder.url, &to, port)
            .await
            .map(|io| (io, Vec::new()))
    } else {
        st.edges
            .open_stream(
                &target,
                StreamPurpose::PortForward {
                    instance: to.clone(),
                    port,
                },
            )
            .await
            .map(|far| (far.io, vec![far.closed]))
    };
    match far {
        Ok((io, mut closed)) => {
            count(&st, "relay", "ok");
            tracing::info!(node, from, to, port, target, "relaying");
            closed.push(source_closed);
            splice(
                stream,
                io,
                &format!("node '{node}'"),
                &format!("node '{target}'"),
                closed,
            )
            .await;
        }
        Err(e) => {
            count(&st, "relay", "failed");
            let _ = write_chunk(&mut stream, &Chunk::Error(e.message)).await;
        }
    }
}

/// Ask `node` for a stream for `purpose` (counted in the metrics).
pub async fn open(
    st: &HubState,
    node: &str,
    purpose: StreamPurpose,
) -> Result<crate::state::EdgeStream, ApiError> {
    let name = purpose_name(&purpose);
    let r = st.edges.open_stream(node, purpose).await;
    count(st, name, if r.is_ok() { "ok" } else { "failed" });
    r
}

/// A client stream for an exec or port-forward: the HTTP connection after upgrade.
pub async fn serve_client<C: AsyncRead + AsyncWrite + Unpin + Send>(
    client: C,
    edge: crate::state::EdgeStream,
    node: &str,
) {
    splice(
        client,
        edge.io,
        "the client",
        &format!("node '{node}'"),
        vec![edge.closed],
    )
    .await;
}

enum End {
    /// This direction sent `Eof`; the other may go on.
    HalfClosed,
    /// `Exit` or `Error` passed through: the stream is over.
    Done,
    /// A side went away without ending the stream properly.
    Broken(String),
}

async fn direction<R, W>(from: &mut R, to: &Mutex<W>, from_name: &str, to_name: &str) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let chunk = match read_chunk(from).await {
            Ok(Some(Chunk::Ping)) => continue,
            Ok(Some(c)) => c,
            Ok(None) => return End::Broken(format!("{from_name} closed the stream")),
            Err(e) => return End::Broken(format!("{from_name}: {e}")),
        };
        if write_chunk(&mut *to.lock().await, &chunk).await.is_err() {
            // The other direction reads from that side and will say how it ended
            // (usually an `Error` chunk explaining why it stopped reading).
            tracing::debug!("{to_name} stopped reading");
            return End::HalfClosed;
        }
        match chunk {
            Chunk::Eof => return End::HalfClosed,
            Chunk::Exit(_) | Chunk::Error(_) => return End::Done,
            _ => {}
        }
    }
}

/// Relay chunks between `a` and `b` until the stream is over. If it breaks (a side
/// goes away, or one of `closed` fires), both sides get an `Error` chunk saying why.
pub async fn splice<A, B>(
    a: A,
    b: B,
    a_name: &str,
    b_name: &str,
    mut closed: Vec<watch::Receiver<Option<String>>>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, aw) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let (aw, bw) = (Mutex::new(aw), Mutex::new(bw));
    let a_to_b = direction(&mut ar, &bw, a_name, b_name);
    let b_to_a = direction(&mut br, &aw, b_name, a_name);
    let channel_lost = async {
        let waits = closed.iter_mut().map(|rx| Box::pin(closed_reason(rx)));
        match waits.len() {
            0 => std::future::pending().await,
            _ => futures_util::future::select_all(waits).await.0,
        }
    };
    // The direction futures are dropped at the end of this block, so no write lock is
    // held when the error is sent below.
    let broken = {
        tokio::pin!(a_to_b, b_to_a, channel_lost);
        let (mut a_done, mut b_done) = (false, false);
        loop {
            if a_done && b_done {
                break None;
            }
            let end = tokio::select! {
                e = &mut a_to_b, if !a_done => { a_done = true; e }
                e = &mut b_to_a, if !b_done => { b_done = true; e }
                reason = &mut channel_lost => End::Broken(reason),
            };
            match end {
                End::HalfClosed => {}
                End::Done => break None,
                End::Broken(why) => break Some(why),
            }
        }
    };
    let (mut aw, mut bw) = (aw.into_inner(), bw.into_inner());
    if let Some(why) = broken {
        tracing::debug!(%why, "data stream broken");
        let error = Chunk::Error(why);
        // A side that stopped reading must not hold this task forever.
        let t = Duration::from_secs(2);
        let _ = tokio::time::timeout(t, write_chunk(&mut aw, &error)).await;
        let _ = tokio::time::timeout(t, write_chunk(&mut bw, &error)).await;
    }
    let _ = aw.shutdown().await;
    let _ = bw.shutdown().await;
}

/// The error for a request that is not an upgrade to a data stream.
pub fn needs_upgrade(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Invalid,
        format!(
            "{what} needs an HTTP/1.1 upgrade to '{}' (Connection: Upgrade); use `verge {what}`",
            String::from_utf8_lossy(verge_api::channel::ALPN_STREAM)
        ),
    )
}
