//! A region hub's uplink to its centre ([module docs](super)): the slice comes down
//! into this hub's store, statuses and this region's writes go up.
//!
//! Local bookkeeping, in this hub's store:
//! - `/verge/region/mirror/KEY`: for each key copied from the centre, the centre's
//!   uid, generation and revision of it. A local object whose generation is past its
//!   mirror's (or that has none) carries a write made here that the centre has not
//!   taken yet.
//! - `/verge/region/tombstones/KIND/NAME`: an object deleted here, until the centre
//!   took the delete (or refused it).
//! - `/verge/region/sync`: the centre revision and epoch this hub has the slice at.
//! - `/verge/region/statuses`: the local revision up to which the centre has taken
//!   this region's statuses.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use verge_api::clock::now_rfc3339;
use verge_api::uplink::{
    ALPN_REGION, CentreToRegion, Mirrored, RegionToCentre, RegionWrite, StatusReport,
    UPLINK_VERSION,
};
use verge_api::{Instance, InstanceSpec, Kind, NodeSpec, Object, kind_prefix};
use verge_store::{EventKind, Op, Store, StoreError, StoreExt, Txn, WatchOptions};
use verge_tunnel::frame::{decode, read_frame, write_msg};

use super::{Conflict, RegionLink, instance_region};
use crate::objects::{Objects, decode_value};
use crate::state::HubState;

const MIRROR_PREFIX: &str = "/verge/region/mirror/";
const TOMBSTONE_PREFIX: &str = "/verge/region/tombstones/";
const SYNC_KEY: &str = "/verge/region/sync";
const STATUSES_KEY: &str = "/verge/region/statuses";
/// Statuses sent in one message at most.
const STATUS_BATCH: usize = 500;

/// What this hub holds of a centre key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorRecord {
    /// The object's uid at the centre ("" for keys that are not objects).
    #[serde(default)]
    pub uid: String,
    /// Its generation at the centre (what a write made here is based on).
    #[serde(default)]
    pub generation: u64,
    /// The generation the copy here was given when it was taken from the centre: a
    /// local generation past it is a write made here. It is past the centre's own when
    /// the centre's copy replaced a different spec here of the same or a later
    /// generation (the nodes must see a new generation to act on it).
    #[serde(default)]
    pub local_generation: u64,
    /// The centre's modification revision.
    pub revision: u64,
}

/// An object deleted here, for the centre to delete too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tombstone {
    /// Its uid.
    pub uid: String,
    /// The generation deleted.
    pub generation: u64,
}

/// The store operation that leaves a tombstone for `kind`/`name` (a delete made at a
/// region hub, which its uplink takes to the centre).
pub fn tombstone(kind: &str, name: &str, uid: &str, generation: u64) -> Op {
    Op::put(
        format!("{TOMBSTONE_PREFIX}{kind}/{name}"),
        serde_json::to_vec(&Tombstone {
            uid: uid.to_string(),
            generation,
        })
        .unwrap_or_default(),
    )
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncPoint {
    revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
}

async fn read_json<T: serde::de::DeserializeOwned + Default>(
    store: &dyn Store,
    key: &str,
) -> Result<T, StoreError> {
    Ok(store
        .get(key)
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or_default())
}

/// Whether a local object carries a write the centre has not taken.
fn pending(local_uid: &str, local_generation: u64, mirror: Option<&MirrorRecord>) -> bool {
    match mirror {
        None => true,
        Some(m) => m.uid != local_uid || local_generation > m.generation.max(m.local_generation),
    }
}

/// The uplink's state shared between its tasks.
struct Shared {
    /// Local revisions written by the sync from the centre: their statuses are the
    /// centre's already, and are not sent back up.
    echoes: Mutex<HashSet<u64>>,
}

/// Run the uplink for the hub's lifetime: dial the centre's endpoints in turn, with a
/// growing pause after each round that failed.
pub async fn run(st: Arc<HubState>, link: RegionLink) {
    let client = match st.ca.issue_region_client(
        &link.region,
        &link.enrolment,
        time::Duration::days(365),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the region's client certificate; no uplink");
            return;
        }
    };
    let dialer = Arc::new(Dialer {
        quic: verge_tunnel::quic::client().ok(),
        paths: link.upstreams.iter().map(|_| Default::default()).collect(),
        upstreams: link.upstreams.clone(),
        client,
        ca_pem: st.ca.cert_pem().to_string(),
    });
    let shared = Arc::new(Shared {
        echoes: Mutex::default(),
    });
    let mut backoff = Duration::from_millis(250);
    let mut current = 0usize;
    loop {
        let addr = dialer.addr(current).to_string();
        let began = tokio::time::Instant::now();
        let why = match dialer.dial(current).await {
            Ok(Ok((stream, _, transport))) => {
                st.metrics.uplink_connected.set(1);
                tracing::info!(centre = %addr, transport, "uplink to the centre is up");
                let at = Upstream {
                    dialer: dialer.clone(),
                    index: current,
                };
                let r = session(&st, &link, &shared, &at, stream).await;
                st.metrics.uplink_connected.set(0);
                match r {
                    Ok(why) | Err(why) => why,
                }
            }
            Ok(Err(failed)) => failed.why,
            Err(e) => e.to_string(),
        };
        tracing::warn!(centre = %addr, %why, "uplink to the centre is down; the region keeps working on its own");
        if began.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
        }
        current = (current + 1) % link.upstreams.len();
        if current == 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// One uplink session; returns why it ended.
/// How this region hub dials its centre.
struct Dialer {
    quic: Option<quinn::Endpoint>,
    paths: Vec<Mutex<verge_tunnel::dial::HubPath>>,
    upstreams: Vec<String>,
    client: verge_tunnel::pki::Issued,
    ca_pem: String,
}

impl Dialer {
    fn addr(&self, i: usize) -> &str {
        self.upstreams[i]
            .trim_start_matches("https://")
            .trim_end_matches('/')
    }

    async fn dial(
        &self,
        i: usize,
    ) -> Result<
        Result<verge_tunnel::dial::Connected, verge_tunnel::dial::DialFailure>,
        verge_tunnel::tls::TlsError,
    > {
        verge_tunnel::dial::channel(&verge_tunnel::dial::Target {
            addr: self.addr(i),
            ca_pem: &self.ca_pem,
            identity: Some((&self.client.cert_pem, &self.client.key_pem)),
            alpn: ALPN_REGION,
            quic: self.quic.as_ref(),
            path: &self.paths[i],
            tcp_source: None,
        })
        .await
    }
}

/// The centre endpoint a session is on.
#[derive(Clone)]
struct Upstream {
    dialer: Arc<Dialer>,
    index: usize,
}

/// Open a connection to the centre for its stream `id` and serve this hub's REST API
/// on it (logs, exec and port-forward the centre was asked for, for this region's
/// edges). The centre authenticates as a hub of the cluster (the peer token).
async fn serve_stream(st: Arc<HubState>, at: Upstream, id: u64) {
    // A busy centre may turn a connection away (it sheds new ones while it lags):
    // try again within the time the centre waits for the stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut pause = Duration::from_millis(100);
    let (stream, conn) = loop {
        let why = match at.dialer.dial(at.index).await {
            Ok(Ok((s, conn, _))) => break (s, conn),
            Ok(Err(failed)) => failed.why,
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            return tracing::warn!(id, %why, "could not open a stream to the centre");
        }
        tracing::info!(id, %why, "opening a stream to the centre; trying again");
        tokio::time::sleep(pause).await;
        pause *= 2;
    };
    // A QUIC connection lives until the centre closes it (when the request is done),
    // whatever this task hands its stream to.
    if let Some(conn) = conn {
        tokio::spawn(async move { conn.closed().await });
    }
    let mut stream = stream;
    if write_msg(&mut stream, &RegionToCentre::Stream { id })
        .await
        .is_err()
    {
        return;
    }
    let app = crate::http::router(st).layer(axum::Extension(crate::http::PeerNode(None)));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(app),
        )
        .with_upgrades()
        .await;
}

async fn session(
    st: &Arc<HubState>,
    link: &RegionLink,
    shared: &Arc<Shared>,
    upstream: &Upstream,
    stream: Box<dyn verge_tunnel::quic::Duplex>,
) -> Result<String, String> {
    let store = st.objects.store().clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let at: SyncPoint = read_json(store.as_ref(), SYNC_KEY)
        .await
        .map_err(|e| e.to_string())?;
    write_msg(
        &mut writer,
        &RegionToCentre::Hello {
            protocol_version: UPLINK_VERSION,
            since_revision: at.revision,
            epoch: at.epoch.clone(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut reader))
        .await
        .map_err(|_| "no welcome from the centre".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("the centre closed the uplink")?;
    let (epoch, interval) = match decode::<CentreToRegion>(&first).map_err(|e| e.to_string())? {
        CentreToRegion::Welcome {
            epoch,
            heartbeat_interval_ms,
        } => (
            epoch,
            Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000)),
        ),
        CentreToRegion::Error { code, message } => {
            return Err(format!("the centre refused the uplink ({code}): {message}"));
        }
        other => return Err(format!("unexpected first message: {other:?}")),
    };
    let (tx, mut rx) = mpsc::channel::<RegionToCentre>(256);
    let writer_task = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut writer, &m).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let up = tokio::spawn(push_up(
        st.clone(),
        link.region.clone(),
        shared.clone(),
        tx.clone(),
    ));
    let mut heartbeat = tokio::time::interval(interval);
    let mut snapshot: Option<(u64, Vec<Mirrored>)> = None;
    let silence = interval * 3 + Duration::from_secs(2);
    let mut last_heard = tokio::time::Instant::now();
    let result = loop {
        let frame = tokio::select! {
            f = read_frame(&mut reader) => f,
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > silence {
                    break Ok(format!("the centre was silent for {}s", silence.as_secs()));
                }
                if tx.send(RegionToCentre::Heartbeat).await.is_err() {
                    break Ok("uplink writer ended".into());
                }
                continue;
            }
        };
        last_heard = tokio::time::Instant::now();
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok("the centre closed the uplink".into()),
            Err(e) => break Ok(e.to_string()),
        };
        let msg = match decode::<CentreToRegion>(&frame) {
            Ok(m) => m,
            Err(e) => break Ok(format!("malformed frame from the centre: {e}")),
        };
        let r = match msg {
            CentreToRegion::SnapshotPart {
                revision,
                objects,
                last,
            } => {
                let s = snapshot.get_or_insert_with(|| (revision, Vec::new()));
                if s.0 != revision {
                    *s = (revision, Vec::new());
                }
                s.1.extend(objects);
                if last && let Some((revision, objects)) = snapshot.take() {
                    apply_snapshot(st, link, shared, revision, &epoch, objects).await
                } else {
                    Ok(())
                }
            }
            CentreToRegion::Changes {
                revision,
                puts,
                deletes,
            } => apply_changes(st, link, shared, revision, &epoch, puts, deletes).await,
            CentreToRegion::Bookmark { revision } => {
                save_sync(store.as_ref(), revision, &epoch).await
            }
            CentreToRegion::HeartbeatAck => Ok(()),
            CentreToRegion::StatusesApplied { through } => store
                .put(STATUSES_KEY, through.to_string().into_bytes(), None)
                .await
                .map(|_| ()),
            CentreToRegion::WriteResult {
                id: _,
                applied,
                message,
            } => {
                if !applied {
                    tracing::warn!(region = %link.region, "{message}");
                }
                Ok(())
            }
            CentreToRegion::OpenStream { id } => {
                tokio::spawn(serve_stream(st.clone(), upstream.clone(), id));
                Ok(())
            }
            CentreToRegion::Error { code, message } => {
                break Err(format!("the centre ended the uplink ({code}): {message}"));
            }
            CentreToRegion::Welcome { .. } | CentreToRegion::Enrolled { .. } => {
                break Ok("unexpected message from the centre".into());
            }
        };
        if let Err(e) = r {
            break Ok(format!("applying the centre's changes failed: {e}"));
        }
    };
    up.abort();
    drop(tx);
    let _ = writer_task.await;
    result
}

async fn save_sync(
    store: &dyn Store,
    revision: u64,
    epoch: &Option<String>,
) -> Result<(), StoreError> {
    let v = serde_json::to_vec(&SyncPoint {
        revision,
        epoch: epoch.clone(),
    })
    .unwrap_or_default();
    store.put(SYNC_KEY, v, None).await.map(|_| ())
}

async fn apply_snapshot(
    st: &HubState,
    link: &RegionLink,
    shared: &Shared,
    revision: u64,
    epoch: &Option<String>,
    objects: Vec<Mirrored>,
) -> Result<(), StoreError> {
    let store = st.objects.store();
    let keep: BTreeSet<&str> = objects.iter().map(|m| m.key.as_str()).collect();
    let gone: Vec<String> = store
        .range(MIRROR_PREFIX)
        .await?
        .kvs
        .iter()
        .map(|kv| kv.key.trim_start_matches(MIRROR_PREFIX).to_string())
        .filter(|k| !keep.contains(k.as_str()))
        .collect();
    tracing::info!(region = %link.region, revision, count = objects.len(), dropped = gone.len(), "the whole slice from the centre");
    for key in gone {
        delete_one(st, link, &key).await?;
    }
    for m in objects {
        put_one(st, link, shared, m).await?;
    }
    save_sync(store.as_ref(), revision, epoch).await
}

async fn apply_changes(
    st: &HubState,
    link: &RegionLink,
    shared: &Shared,
    revision: u64,
    epoch: &Option<String>,
    puts: Vec<Mirrored>,
    deletes: Vec<String>,
) -> Result<(), StoreError> {
    for key in deletes {
        delete_one(st, link, &key).await?;
    }
    for m in puts {
        put_one(st, link, shared, m).await?;
    }
    save_sync(st.objects.store().as_ref(), revision, epoch).await
}

/// The local copy of a centre object, and its mirror record.
async fn local(
    store: &dyn Store,
    key: &str,
) -> Result<(Option<verge_store::KeyValue>, Option<MirrorRecord>), StoreError> {
    let kv = store.get(key).await?;
    let mirror = store
        .get(&format!("{MIRROR_PREFIX}{key}"))
        .await?
        .and_then(|m| serde_json::from_slice(&m.value).ok());
    Ok((kv, mirror))
}

/// The uid and generation of a stored object.
fn ident(value: &[u8]) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    Some((
        v["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["metadata"]["generation"].as_u64().unwrap_or(0),
    ))
}

fn record_conflict(link: &RegionLink, key: &str, message: String) -> Op {
    let (kind, name) = key
        .trim_start_matches("/registry/")
        .split_once('/')
        .unwrap_or(("", key));
    tracing::warn!(region = %link.region, key, "{message}");
    Conflict {
        at: now_rfc3339(),
        region: link.region.clone(),
        kind: kind.to_string(),
        name: name.to_string(),
        write: "change made here".into(),
        message,
    }
    .op()
}

/// Take one key from the centre: its spec over ours, our status kept (this region is
/// the authority for it).
async fn put_one(
    st: &HubState,
    link: &RegionLink,
    shared: &Shared,
    m: Mirrored,
) -> Result<(), StoreError> {
    let store = st.objects.store();
    let (kv, mirror) = local(store.as_ref(), &m.key).await?;
    let mut value = m.value.clone();
    let mut ops = Vec::new();
    let centre = ident(&serde_json::to_vec(&m.value).unwrap_or_default()).unwrap_or_default();
    if let Some(kv) = &kv
        && let Ok(mine) = serde_json::from_slice::<serde_json::Value>(&kv.value)
        && mine["metadata"]["uid"] == m.value["metadata"]["uid"]
        && !mine["status"].is_null()
        && (m.key.starts_with(&kind_prefix(InstanceSpec::PLURAL))
            || m.key.starts_with(&kind_prefix(NodeSpec::PLURAL)))
    {
        value["status"] = mine["status"].clone();
    }
    // A change made here that the centre's copy does not carry lost to it.
    let same_spec = kv
        .as_ref()
        .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
        .is_some_and(|mine| mine["spec"] == m.value["spec"]);
    if let Some(kv) = &kv
        && let Some((uid, generation)) = ident(&kv.value)
        && !uid.is_empty()
        && pending(&uid, generation, mirror.as_ref())
        && (uid != centre.0 || generation != centre.1 || !same_spec)
    {
        ops.push(record_conflict(
            link,
            &m.key,
            format!(
                "the centre's copy (uid {}, generation {}) replaced a change made here (generation {generation}): the centre's write wins",
                centre.0, centre.1
            ),
        ));
    }
    // The nodes act on a new generation only: a spec of the centre's that replaces a
    // different one here of the same or a later generation gets the next one here.
    let mut local_generation = centre.1;
    if let Some(kv) = &kv
        && let Some((uid, generation)) = ident(&kv.value)
        && uid == centre.0
        && generation >= centre.1
        && centre.1 > 0
    {
        local_generation = if same_spec {
            generation
        } else {
            generation + 1
        };
        value["metadata"]["generation"] = local_generation.into();
    }
    ops.push(Op::put(
        m.key.clone(),
        serde_json::to_vec(&value).unwrap_or_default(),
    ));
    ops.push(Op::put(
        format!("{MIRROR_PREFIX}{}", m.key),
        serde_json::to_vec(&MirrorRecord {
            uid: centre.0,
            generation: centre.1,
            local_generation,
            revision: m.revision,
        })
        .unwrap_or_default(),
    ));
    ops.push(Op::Delete {
        key: tombstone_key(&m.key),
    });
    let r = store
        .txn(Txn {
            compares: Vec::new(),
            ops,
        })
        .await?;
    shared.echo(r.revision);
    Ok(())
}

fn tombstone_key(key: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{}", key.trim_start_matches("/registry/"))
}

/// The centre deleted a key (or it left the slice).
async fn delete_one(st: &HubState, link: &RegionLink, key: &str) -> Result<(), StoreError> {
    let store = st.objects.store();
    let (kv, mirror) = local(store.as_ref(), key).await?;
    let mut ops = vec![
        Op::Delete {
            key: key.to_string(),
        },
        Op::Delete {
            key: format!("{MIRROR_PREFIX}{key}"),
        },
        Op::Delete {
            key: tombstone_key(key),
        },
    ];
    if let Some(kv) = &kv
        && let Some((uid, generation)) = ident(&kv.value)
        && !uid.is_empty()
        && pending(&uid, generation, mirror.as_ref())
        && mirror.is_some()
    {
        ops.push(record_conflict(
            link,
            key,
            format!("the centre deleted it while it was changed here (generation {generation}): the centre's delete wins"),
        ));
    }
    store
        .txn(Txn {
            compares: Vec::new(),
            ops,
        })
        .await
        .map(|_| ())
}

impl Shared {
    fn echo(&self, revision: u64) {
        let mut e = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() > 100_000 {
            e.clear();
        }
        e.insert(revision);
    }

    fn is_echo(&self, revision: u64) -> bool {
        self.echoes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&revision)
    }
}

/// Send up what this region is the authority for (statuses) and the writes made here,
/// from what the centre took last, then as they happen.
async fn push_up(
    st: Arc<HubState>,
    region: String,
    shared: Arc<Shared>,
    tx: mpsc::Sender<RegionToCentre>,
) -> Result<(), StoreError> {
    let store = st.objects.store().clone();
    let acked: u64 = store
        .get(STATUSES_KEY)
        .await?
        .and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok())
        .unwrap_or(0);
    let mut writes = Writes::default();
    // What changed since the centre last took our statuses, and every pending write.
    let revision = store.revision().await?;
    let mut items = Vec::new();
    for prefix in [
        kind_prefix(InstanceSpec::PLURAL),
        kind_prefix(NodeSpec::PLURAL),
    ] {
        for kv in store.range(&prefix).await?.kvs {
            if kv.mod_revision > acked
                && let Some(r) = report(&kv.key, &kv.value)
            {
                items.push(r);
            }
        }
    }
    send_statuses(&tx, revision, items).await;
    writes.scan(&st, &region, &tx).await?;
    let prefix = "/";
    let mut watch = match store
        .watch_with(
            prefix,
            revision + 1,
            WatchOptions {
                progress: Some(Duration::from_secs(1)),
            },
        )
        .await
    {
        Ok(w) => w,
        Err(e) => return Err(e),
    };
    while let Some(batch) = watch.recv().await {
        let batch = batch?;
        let mut items = Vec::new();
        let mut local_write = false;
        for ev in &batch.events {
            let key = &ev.kv.key;
            let object = key.starts_with(&kind_prefix(InstanceSpec::PLURAL))
                || key.starts_with(&kind_prefix(NodeSpec::PLURAL));
            if key.starts_with(TOMBSTONE_PREFIX) && ev.kind == EventKind::Put {
                local_write = true;
            }
            if !object || ev.kind != EventKind::Put {
                continue;
            }
            if shared.is_echo(ev.kv.mod_revision) {
                continue;
            }
            local_write = true;
            if let Some(r) = report(key, &ev.kv.value) {
                items.push(r);
            }
        }
        if !items.is_empty() {
            send_statuses(&tx, batch.revision, items).await;
        }
        if local_write {
            writes.scan(&st, &region, &tx).await?;
        }
    }
    Ok(())
}

fn report(key: &str, value: &[u8]) -> Option<StatusReport> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let (kind, name) = key.trim_start_matches("/registry/").split_once('/')?;
    Some(StatusReport {
        kind: kind.to_string(),
        name: name.to_string(),
        uid: v["metadata"]["uid"].as_str()?.to_string(),
        status: v.get("status").cloned().unwrap_or_default(),
    })
}

async fn send_statuses(tx: &mpsc::Sender<RegionToCentre>, through: u64, items: Vec<StatusReport>) {
    let mut chunks = items.chunks(STATUS_BATCH).peekable();
    if chunks.peek().is_none() {
        return;
    }
    for chunk in chunks {
        let _ = tx
            .send(RegionToCentre::Statuses {
                through,
                items: chunk.to_vec(),
            })
            .await;
    }
}

/// The writes made here that the centre has not taken, each sent once a session.
#[derive(Default)]
struct Writes {
    /// `(kind/name, uid, generation)` sent in this session.
    sent: HashSet<(String, String, u64)>,
    next_id: u64,
}

impl Writes {
    async fn scan(
        &mut self,
        st: &HubState,
        region: &str,
        tx: &mpsc::Sender<RegionToCentre>,
    ) -> Result<(), StoreError> {
        let store = st.objects.store();
        let mirrors: BTreeMap<String, MirrorRecord> = store
            .range(MIRROR_PREFIX)
            .await?
            .kvs
            .iter()
            .filter_map(|kv| {
                Some((
                    kv.key.trim_start_matches(MIRROR_PREFIX).to_string(),
                    serde_json::from_slice(&kv.value).ok()?,
                ))
            })
            .collect();
        let mut out = Vec::new();
        for kv in store.range(&kind_prefix(InstanceSpec::PLURAL)).await?.kvs {
            let Some(i) = decode_value::<InstanceSpec>(&kv.value, kv.mod_revision) else {
                continue;
            };
            if instance_region(&i) != Some(region) {
                continue;
            }
            let mirror = mirrors.get(&kv.key);
            if !pending(&i.metadata.uid, i.metadata.generation, mirror) {
                continue;
            }
            let base = mirror
                .filter(|m| m.uid == i.metadata.uid)
                .map_or(0, |m| m.generation);
            out.push(write_of(&i, base));
        }
        for kv in store
            .range(&format!("{TOMBSTONE_PREFIX}instances/"))
            .await?
            .kvs
        {
            let Ok(t) = serde_json::from_slice::<Tombstone>(&kv.value) else {
                continue;
            };
            let name = kv
                .key
                .trim_start_matches(&format!("{TOMBSTONE_PREFIX}instances/"))
                .to_string();
            out.push(RegionWrite {
                kind: InstanceSpec::PLURAL.into(),
                name,
                uid: t.uid,
                base_generation: t.generation,
                object: None,
            });
        }
        for w in out {
            let generation = match &w.object {
                Some(v) => v["metadata"]["generation"].as_u64().unwrap_or(0),
                None => w.base_generation,
            };
            let id = (format!("{}/{}", w.kind, w.name), w.uid.clone(), generation);
            if !self.sent.insert(id) {
                continue;
            }
            self.next_id += 1;
            tracing::info!(kind = %w.kind, name = %w.name, base = w.base_generation, "sending a write made here to the centre");
            let _ = tx
                .send(RegionToCentre::Write {
                    id: self.next_id,
                    write: w,
                })
                .await;
        }
        Ok(())
    }
}

fn write_of(i: &Instance, base_generation: u64) -> RegionWrite {
    let mut o: Object<InstanceSpec> = i.clone();
    o.status = Default::default();
    RegionWrite {
        kind: InstanceSpec::PLURAL.into(),
        name: i.name().to_string(),
        uid: i.metadata.uid.clone(),
        base_generation,
        object: serde_json::from_slice(&Objects::encode(&o)).ok(),
    }
}
