//! The centre's side of a region hub's uplink: enrolment, the slice sent down from
//! the region's revision, the statuses taken up, and the region's writes judged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use verge_api::clock::now_rfc3339;
use verge_api::region::RegionHub;
use verge_api::uplink::{
    CentreToRegion, Mirrored, RegionToCentre, RegionWrite, StatusReport, UPLINK_VERSION,
};
use verge_api::{
    ApiError, ErrorCode, Instance, InstanceSpec, InstanceStatus, Kind, NodeSpec, NodeStatus,
    Object, RegionSpec, object_key,
};
use verge_store::{Compare, EventKind, Op, StoreError, Txn, WatchOptions};
use verge_tunnel::frame::{decode, read_frame, write_msg};

use super::{Conflict, Slice, enrolment_key, instance_region, node_in};
use crate::objects::{Objects, decode_value, store_err};
use crate::state::HubState;

/// The region uplinks connected to this hub, and the streams asked of them.
#[derive(Default)]
pub struct Uplinks {
    inner: std::sync::Mutex<UplinksInner>,
}

#[derive(Default)]
struct UplinksInner {
    /// Region → (session id, its outgoing queue).
    sessions: BTreeMap<String, (u64, mpsc::Sender<CentreToRegion>)>,
    /// Stream id → (region, who waits for the connection).
    pending: BTreeMap<
        u64,
        (
            String,
            tokio::sync::oneshot::Sender<Box<dyn verge_tunnel::quic::Duplex>>,
        ),
    >,
    next_id: u64,
}

/// How long a region has to answer [`CentreToRegion::OpenStream`].
const STREAM_WITHIN: Duration = Duration::from_secs(10);

impl Uplinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, UplinksInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, region: &str, tx: mpsc::Sender<CentreToRegion>) -> u64 {
        let mut i = self.lock();
        i.next_id += 1;
        let id = i.next_id;
        i.sessions.insert(region.to_string(), (id, tx));
        id
    }

    fn unregister(&self, region: &str, id: u64) {
        let mut i = self.lock();
        if i.sessions.get(region).is_some_and(|(s, _)| *s == id) {
            i.sessions.remove(region);
        }
    }

    /// Whether `region`'s uplink is connected here.
    pub fn connected(&self, region: &str) -> bool {
        self.lock().sessions.contains_key(region)
    }

    /// A new connection from `region`'s hub, for one forwarded HTTP connection.
    pub async fn open(
        &self,
        region: &str,
    ) -> Result<Box<dyn verge_tunnel::quic::Duplex>, ApiError> {
        let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, why);
        let (rx, id, tx) = {
            let mut i = self.lock();
            let Some((_, tx)) = i.sessions.get(region).cloned() else {
                return Err(unavailable(format!(
                    "region '{region}''s hub is not connected to this hub now; ask the region hub itself"
                )));
            };
            i.next_id += 1;
            let id = i.next_id;
            let (otx, orx) = tokio::sync::oneshot::channel();
            i.pending.insert(id, (region.to_string(), otx));
            (orx, id, tx)
        };
        let _ = tx.send(CentreToRegion::OpenStream { id }).await;
        let r = tokio::time::timeout(STREAM_WITHIN, rx).await;
        self.lock().pending.remove(&id);
        match r {
            Ok(Ok(s)) => Ok(s),
            _ => Err(unavailable(format!(
                "region '{region}''s hub did not open a stream within {}s",
                STREAM_WITHIN.as_secs()
            ))),
        }
    }

    /// Hand a stream the region opened to whoever asked for it.
    fn deliver(&self, region: &str, id: u64, stream: Box<dyn verge_tunnel::quic::Duplex>) {
        let waiter = {
            let mut i = self.lock();
            match i.pending.get(&id) {
                Some((r, _)) if r == region => i.pending.remove(&id).map(|(_, w)| w),
                _ => None,
            }
        };
        match waiter {
            Some(w) => {
                let _ = w.send(stream);
            }
            None => tracing::warn!(
                region,
                id,
                "a stream nobody asked for (late, or another region's)"
            ),
        }
    }
}

/// Send `req` (logs, exec, port-forward for an instance on `region`'s edges) to the
/// region's hub through its uplink, authenticated as a hub of this cluster.
pub async fn forward(
    st: &HubState,
    region: &str,
    mut req: axum::extract::Request,
) -> Result<axum::response::Response, ApiError> {
    let io = st.uplinks.open(region).await?;
    let token = crate::replicas::peer_token(st);
    req.headers_mut().insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "peer token is not a header value"))?,
    );
    crate::replicas::forward_over(st, io, &format!("region '{region}''s hub"), req).await
}

/// A stream that says when it is dropped.
struct Tracked<S> {
    inner: S,
    _done: tokio::sync::oneshot::Sender<()>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a region has to say hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// How often the store reports progress on the slice's watch (the region's bookmark).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct EnrolmentRecord {
    id: String,
}

/// Enrol a region hub: spend its token, record its enrolment, mark the Region as
/// having a hub, and hand it the CA.
pub async fn enrol(st: &HubState, token: &str, region: &str) -> Result<CentreToRegion, ApiError> {
    let token = crate::tokens::parse_for(st, token)?;
    st.objects.get::<RegionSpec>(region).await.map_err(|_| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("region '{region}' does not exist at the centre; create it (kind: Region) before enrolling its hub"),
        )
    })?;
    let store = st.objects.store();
    let (compare, op, record) = crate::tokens::check_join_token(store.as_ref(), &token).await?;
    if record.region.as_deref() != Some(region) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "join token refused: it is not a token for region '{region}' (make one with `verge token create --region {region}`)"
            ),
        ));
    }
    let id = crate::identity::new_enrolment_id();
    let mut ops: Vec<Op> = op.into_iter().collect();
    ops.push(Op::put(
        enrolment_key(region),
        serde_json::to_vec(&EnrolmentRecord { id: id.clone() }).unwrap_or_default(),
    ));
    let r = store
        .txn(Txn {
            compares: vec![compare],
            ops,
        })
        .await
        .map_err(store_err)?;
    if !r.succeeded {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "join token was used concurrently and is spent; ask for a new one",
        ));
    }
    set_hub(st, region, |h| {
        *h = Some(RegionHub {
            enrolment: id.clone(),
            connected: false,
            since: Some(now_rfc3339()),
        })
    })
    .await?;
    tracing::info!(region, "region hub enrolled");
    Ok(CentreToRegion::Enrolled {
        ca_pem: st.ca.cert_pem().to_string(),
        ca_key_pem: st.ca.key_pem().to_string(),
        enrolment: id,
    })
}

async fn set_hub(
    st: &HubState,
    region: &str,
    f: impl Fn(&mut Option<RegionHub>),
) -> Result<(), ApiError> {
    st.objects
        .update_status::<RegionSpec>(region, |_, s| {
            f(&mut s.hub);
            Ok(true)
        })
        .await
        .map(|_| ())
}

/// Whether `enrolment` is the region's current one.
async fn admitted(st: &HubState, region: &str, enrolment: Option<&str>) -> Result<(), String> {
    let kv = st
        .objects
        .store()
        .get(&enrolment_key(region))
        .await
        .map_err(|e| format!("store unavailable: {e}"))?
        .ok_or_else(|| format!("region '{region}' has no hub enrolled here"))?;
    let rec: EnrolmentRecord =
        serde_json::from_slice(&kv.value).map_err(|_| "enrolment record unreadable".to_string())?;
    if Some(rec.id.as_str()) != enrolment {
        return Err(format!(
            "this certificate belongs to an earlier enrolment of region '{region}'; enrol the region hub again"
        ));
    }
    Ok(())
}

/// Serve one region's uplink until it ends. `identity`: the region and enrolment in
/// its client certificate.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    st: Arc<HubState>,
    stream: S,
    identity: Option<(String, Option<String>)>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let refuse = |code: &str, message: String| CentreToRegion::Error {
        code: code.into(),
        message,
    };
    let Some((region, enrolment)) = identity else {
        let _ = write_msg(
            &mut writer,
            &refuse(
                "unauthorized",
                "the uplink needs a region hub's certificate".into(),
            ),
        )
        .await;
        return;
    };
    if let Err(why) = admitted(&st, &region, enrolment.as_deref()).await {
        let _ = write_msg(&mut writer, &refuse("revoked", why)).await;
        return;
    }
    let hello = tokio::time::timeout(HELLO_WITHIN, read_frame(&mut reader)).await;
    let (since, epoch) = match hello
        .ok()
        .and_then(|r| r.ok().flatten())
        .map(|f| decode(&f))
    {
        Some(Ok(RegionToCentre::Hello {
            protocol_version,
            since_revision,
            epoch,
        })) if protocol_version == UPLINK_VERSION => (since_revision, epoch),
        // A connection the region opened for a forwarded request: it lives as long as
        // the request does (the caller closes a QUIC connection once this returns).
        Some(Ok(RegionToCentre::Stream { id })) => {
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let stream = Tracked {
                inner: reader.unsplit(writer),
                _done: done,
            };
            st.uplinks.deliver(&region, id, Box::new(stream));
            let _ = finished.await;
            return;
        }
        _ => {
            let _ = write_msg(
                &mut writer,
                &refuse(
                    "protocol",
                    format!("expected hello with uplink protocol {UPLINK_VERSION} first"),
                ),
            )
            .await;
            return;
        }
    };
    let store = st.objects.store().clone();
    let since = match crate::history::can_resume(store.as_ref(), epoch.as_deref(), since).await {
        Ok(true) => since,
        Ok(false) => 0,
        Err(e) => {
            let _ = write_msg(&mut writer, &refuse("unavailable", e.to_string())).await;
            return;
        }
    };
    let welcome = CentreToRegion::Welcome {
        epoch: st.epoch().map(str::to_string),
        heartbeat_interval_ms: st.config.heartbeat_interval.as_millis() as u64,
    };
    if write_msg(&mut writer, &welcome).await.is_err() {
        return;
    }
    let _ = set_hub(&st, &region, |h| {
        if let Some(h) = h {
            h.connected = true;
            h.since = Some(now_rfc3339());
        }
    })
    .await;
    tracing::info!(region = %region, since, "region hub connected");
    let (tx, mut rx) = mpsc::channel::<CentreToRegion>(256);
    let session = st.uplinks.register(&region, tx.clone());
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_msg(&mut writer, &msg).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let down = tokio::spawn(sync_down(st.clone(), region.clone(), since, tx.clone()));
    let idle = st.config.heartbeat_interval * 3 + Duration::from_secs(5);
    let reason = loop {
        let frame = match tokio::time::timeout(idle, read_frame(&mut reader)).await {
            Err(_) => break format!("nothing received for {}s", idle.as_secs()),
            Ok(Ok(None)) => break "region closed the uplink".to_string(),
            Ok(Err(e)) => break format!("read failed: {e}"),
            Ok(Ok(Some(f))) => f,
        };
        let reply = match decode::<RegionToCentre>(&frame) {
            Ok(RegionToCentre::Heartbeat) => Some(CentreToRegion::HeartbeatAck),
            Ok(RegionToCentre::Statuses { through, items }) => {
                take_statuses(&st, &region, items).await;
                Some(CentreToRegion::StatusesApplied { through })
            }
            Ok(RegionToCentre::Write { id, write }) => {
                Some(match judge(&st, &region, &write).await {
                    Ok(()) => CentreToRegion::WriteResult {
                        id,
                        applied: true,
                        message: String::new(),
                    },
                    Err(message) => CentreToRegion::WriteResult {
                        id,
                        applied: false,
                        message,
                    },
                })
            }
            Ok(other) => {
                tracing::warn!(region = %region, ?other, "unexpected uplink message");
                None
            }
            Err(e) => break format!("malformed frame: {e}"),
        };
        if let Some(r) = reply
            && tx.send(r).await.is_err()
        {
            break "uplink writer ended".to_string();
        }
    };
    tracing::info!(region = %region, %reason, "region hub disconnected");
    st.uplinks.unregister(&region, session);
    down.abort();
    drop(tx);
    let _ = writer_task.await;
    let _ = set_hub(&st, &region, |h| {
        if let Some(h) = h {
            h.connected = false;
            h.since = Some(now_rfc3339());
        }
    })
    .await;
}

fn mirrored(key: &str, value: &[u8], revision: u64) -> Option<Mirrored> {
    Some(Mirrored {
        key: key.to_string(),
        value: serde_json::from_slice(value).ok()?,
        revision,
    })
}

/// Send the slice: from `since` as changes, or whole, then as it changes.
async fn sync_down(
    st: Arc<HubState>,
    region: String,
    since: u64,
    tx: mpsc::Sender<CentreToRegion>,
) -> Result<(), StoreError> {
    let store = st.objects.store().clone();
    let mut slice = Slice::new(&region);
    let nodes = store
        .range(&verge_api::kind_prefix(NodeSpec::PLURAL))
        .await?;
    for kv in &nodes.kvs {
        slice.note_node(&kv.key, Some(&kv.value));
    }
    let options = WatchOptions {
        progress: Some(PROGRESS_EVERY),
    };
    let mut watch = match (since > 0).then(|| store.watch_with("/", since + 1, options)) {
        Some(w) => match w.await {
            Ok(w) => Some(w),
            Err(StoreError::Compacted { .. }) => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let mut at = since;
    if watch.is_none() {
        // The whole slice, then what changed after it.
        let revision = store.revision().await?;
        let mut objects = Vec::new();
        for prefix in Slice::prefixes() {
            for kv in store.range(&prefix).await?.kvs {
                if slice.contains(&kv.key, &kv.value)
                    && let Some(m) = mirrored(&kv.key, &kv.value, kv.mod_revision)
                {
                    objects.push(m);
                }
            }
        }
        tracing::info!(region = %region, revision, count = objects.len(), "sending the region its whole slice");
        let parts = crate::channel::in_parts(objects, |m| m.value.to_string().len() + m.key.len());
        let n = parts.len();
        for (i, objects) in parts.into_iter().enumerate() {
            let last = i + 1 == n;
            if tx
                .send(CentreToRegion::SnapshotPart {
                    revision,
                    objects,
                    last,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        if n == 0 {
            let _ = tx
                .send(CentreToRegion::SnapshotPart {
                    revision,
                    objects: Vec::new(),
                    last: true,
                })
                .await;
        }
        at = revision;
        watch = Some(store.watch_with("/", revision + 1, options).await?);
    }
    let Some(mut watch) = watch else {
        return Ok(());
    };
    while let Some(batch) = watch.recv().await {
        let batch = batch?;
        if batch.events.is_empty() {
            if batch.revision > at {
                at = batch.revision;
                if tx
                    .send(CentreToRegion::Bookmark { revision: at })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            continue;
        }
        // Nodes first: whether an enrolment or an instance belongs depends on them.
        let before = slice.nodes.clone();
        for ev in &batch.events {
            let value = (ev.kind == EventKind::Put).then_some(ev.kv.value.as_slice());
            slice.note_node(&ev.kv.key, value);
        }
        let mut puts: BTreeMap<String, Mirrored> = BTreeMap::new();
        let mut deletes: Vec<String> = Vec::new();
        for ev in &batch.events {
            let key = &ev.kv.key;
            let was = ev
                .prev_kv
                .as_ref()
                .is_some_and(|p| slice.contains(key, &p.value));
            let now = ev.kind == EventKind::Put && slice.contains(key, &ev.kv.value);
            // The region wrote that status itself: sending the object back would
            // only echo it.
            if now
                && was
                && ev
                    .prev_kv
                    .as_ref()
                    .is_some_and(|p| status_only(&p.value, &ev.kv.value))
            {
                continue;
            }
            if now {
                if let Some(m) = mirrored(key, &ev.kv.value, ev.kv.mod_revision) {
                    puts.insert(key.clone(), m);
                }
            } else if was {
                deletes.push(key.clone());
            }
        }
        // A node that joined brings its enrolment and the instances bound to it.
        for joined in slice.nodes.difference(&before) {
            let ekey = format!("{}{joined}", crate::identity::ENROLMENT_PREFIX);
            if let Some(kv) = store.get(&ekey).await?
                && let Some(m) = mirrored(&kv.key, &kv.value, kv.mod_revision)
            {
                puts.insert(ekey, m);
            }
            for kv in store
                .range(&verge_api::kind_prefix(InstanceSpec::PLURAL))
                .await?
                .kvs
            {
                let bound = decode_value::<InstanceSpec>(&kv.value, 0)
                    .is_some_and(|i| i.status.node.as_deref() == Some(joined));
                if bound && let Some(m) = mirrored(&kv.key, &kv.value, kv.mod_revision) {
                    puts.insert(kv.key.clone(), m);
                }
            }
        }
        for left in before.difference(&slice.nodes) {
            deletes.push(format!("{}{left}", crate::identity::ENROLMENT_PREFIX));
        }
        at = batch.revision;
        let msg = if puts.is_empty() && deletes.is_empty() {
            CentreToRegion::Bookmark { revision: at }
        } else {
            CentreToRegion::Changes {
                revision: at,
                puts: puts.into_values().collect(),
                deletes,
            }
        };
        if tx.send(msg).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Whether two stored objects differ in their status (and bookkeeping) only.
fn status_only(before: &[u8], after: &[u8]) -> bool {
    let strip = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("status");
                }
                v
            })
    };
    matches!((strip(before), strip(after)), (Some(a), Some(b)) if a == b)
}

/// Whether an instance as the centre holds it belongs to `region`'s slice.
async fn instance_in(st: &HubState, region: &str, i: &Instance, node: Option<&str>) -> bool {
    if instance_region(i) == Some(region) {
        return true;
    }
    match node.or(i.status.node.as_deref()) {
        Some(n) => st
            .objects
            .get::<NodeSpec>(n)
            .await
            .is_ok_and(|n| node_in(&n, region)),
        None => false,
    }
}

/// Take the statuses the region is the authority for.
async fn take_statuses(st: &HubState, region: &str, items: Vec<StatusReport>) {
    for r in items {
        let taken = match r.kind.as_str() {
            "instances" => {
                let Ok(status) = serde_json::from_value::<InstanceStatus>(r.status) else {
                    continue;
                };
                let Ok(current) = st.objects.get::<InstanceSpec>(&r.name).await else {
                    continue;
                };
                if current.metadata.uid != r.uid
                    || !instance_in(st, region, &current, status.node.as_deref()).await
                {
                    tracing::warn!(region, instance = %r.name, "status refused: not the region's");
                    continue;
                }
                st.objects
                    .update_status::<InstanceSpec>(&r.name, |obj, s| {
                        if obj.metadata.uid != r.uid {
                            return Ok(false);
                        }
                        *s = status.clone();
                        Ok(true)
                    })
                    .await
                    .map(|_| ())
            }
            "nodes" => {
                let Ok(status) = serde_json::from_value::<NodeStatus>(r.status) else {
                    continue;
                };
                st.objects
                    .update_status::<NodeSpec>(&r.name, |obj, s| {
                        if obj.metadata.uid != r.uid || !node_in(obj, region) {
                            return Ok(false);
                        }
                        *s = status.clone();
                        Ok(true)
                    })
                    .await
                    .map(|_| ())
            }
            _ => continue,
        };
        if let Err(e) = taken
            && e.code != ErrorCode::NotFound
        {
            tracing::warn!(region, kind = %r.kind, name = %r.name, error = %e.message, "status from the region not taken");
        }
    }
}

/// Take a write made at the region, or say why the centre's copy wins. A write based
/// on generation G is taken while the centre's copy is still at G; the same write
/// arriving twice is taken once.
async fn judge(st: &HubState, region: &str, w: &RegionWrite) -> Result<(), String> {
    let r = judge_instance(st, region, w).await;
    if let Err(message) = &r {
        let c = Conflict {
            at: now_rfc3339(),
            region: region.to_string(),
            kind: w.kind.clone(),
            name: w.name.clone(),
            write: describe(w),
            message: message.clone(),
        };
        tracing::warn!(region, kind = %w.kind, name = %w.name, "{message}");
        let _ = st
            .objects
            .store()
            .txn(Txn {
                compares: Vec::new(),
                ops: vec![c.op()],
            })
            .await;
    }
    r
}

/// What a region write was, in words.
pub fn describe(w: &RegionWrite) -> String {
    match (&w.object, w.base_generation) {
        (None, g) => format!("delete of generation {g}"),
        (Some(_), 0) => "create".to_string(),
        (Some(_), g) => format!("change of generation {g}"),
    }
}

async fn judge_instance(st: &HubState, region: &str, w: &RegionWrite) -> Result<(), String> {
    if w.kind != InstanceSpec::PLURAL {
        return Err(format!("a region writes instances only, not {}", w.kind));
    }
    let key = object_key(InstanceSpec::PLURAL, &w.name);
    let store = st.objects.store();
    let current = store
        .get(&key)
        .await
        .map_err(|e| store_err(e).message)?
        .and_then(|kv| decode_value::<InstanceSpec>(&kv.value, kv.mod_revision));
    let wanted: Option<Instance> = match &w.object {
        Some(v) => {
            let i: Instance = serde_json::from_value(v.clone())
                .map_err(|e| format!("the region's instance '{}' is unreadable: {e}", w.name))?;
            i.validate().map_err(|e| {
                format!(
                    "the region's instance '{}' is invalid: {}",
                    w.name,
                    ApiError::invalid(e).message
                )
            })?;
            if instance_region(&i) != Some(region) {
                return Err(format!(
                    "instance '{}' is not placed in region '{region}' (spec.placement.region)",
                    w.name
                ));
            }
            Some(i)
        }
        None => None,
    };
    if let Some(c) = &current
        && !instance_in(st, region, c, None).await
    {
        return Err(format!(
            "instance '{}' at the centre is not region '{region}''s to change",
            w.name
        ));
    }
    let lost = |c: &Instance| {
        format!(
            "the centre's instance '{}' changed meanwhile (uid {}, generation {}; the region's write was on generation {}): the centre's write wins, and the region now has the centre's",
            w.name, c.metadata.uid, c.metadata.generation, w.base_generation
        )
    };
    let (compare, op) = match (&current, wanted) {
        // A delete of what is gone, or of another object: nothing to do, or a loss.
        (None, None) => return Ok(()),
        (Some(c), None) => {
            if c.metadata.uid != w.uid || c.metadata.generation != w.base_generation {
                return Err(lost(c));
            }
            (c.metadata.revision, Op::Delete { key: key.clone() })
        }
        (None, Some(mut i)) => {
            if w.base_generation != 0 {
                return Err(format!(
                    "the centre deleted instance '{}' meanwhile: the centre's delete wins over the region's change",
                    w.name
                ));
            }
            i.metadata.uid = w.uid.clone();
            i.status = Default::default();
            (0, Op::put(key.clone(), Objects::encode(&i)))
        }
        (Some(c), Some(i)) => {
            let already = c.metadata.uid == w.uid
                && c.metadata.generation == i.metadata.generation
                && c.spec == i.spec;
            if already {
                return Ok(());
            }
            if c.metadata.uid != w.uid || c.metadata.generation != w.base_generation {
                return Err(lost(c));
            }
            let mut next: Object<InstanceSpec> = c.clone();
            next.spec = i.spec;
            next.metadata.labels = i.metadata.labels;
            next.metadata.annotations = i.metadata.annotations;
            // The region's count, so both tiers agree on it.
            next.metadata.generation = i.metadata.generation.max(c.metadata.generation + 1);
            next.metadata.update_time = Some(now_rfc3339());
            (
                c.metadata.revision,
                Op::put(key.clone(), Objects::encode(&next)),
            )
        }
    };
    let r = store
        .txn(Txn {
            compares: vec![Compare {
                key,
                mod_revision: compare,
            }],
            ops: vec![op],
        })
        .await
        .map_err(|e| store_err(e).message)?;
    if !r.succeeded {
        return Err(format!(
            "the centre's instance '{}' changed while the region's write was applied: the centre's write wins",
            w.name
        ));
    }
    Ok(())
}
