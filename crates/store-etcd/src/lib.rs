//! Verge's store contract ([`verge_store::Store`]) on etcd, for hubs in HA: several
//! `verge hub` processes on one etcd cluster (`--store etcd://HOST:PORT,HOST:PORT`).
//!
//! etcd already has what the contract asks (one global revision, compare-and-swap on
//! modification revisions, watches from a revision with previous values, compaction,
//! leases, progress notifications), so this is a translation, with four details:
//!
//! - **Namespace.** Every key lives under a prefix (`/verge` unless told otherwise),
//!   so Verge can share an etcd with other users; ranges and watches never see keys
//!   outside it.
//! - **Revisions** are etcd's own, shared with whatever else writes to that etcd: a
//!   store here starts at revision 1 or more, never 0.
//! - **Watch batches**: an etcd watch response may carry several revisions; they are
//!   split into one [`WatchBatch`] per revision. A watch that asked for progress asks
//!   etcd for a progress notification when it has been quiet that long.
//! - **Compaction point**: etcd does not report it outside a failed watch, so
//!   [`EtcdStore::compact`] records it in a key of its own beside the namespace.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    TxnOp, TxnOpResponse,
};
use tokio::sync::mpsc;
use verge_store::{
    Event, EventKind, KeyValue, Lease, LeaseId, Op, RangePage, RangeResult, Store, StoreError, Txn,
    TxnResult, WatchBatch, WatchOptions, WatchStream,
};

/// Batches a watch queues for a reader that has not taken them yet (as the embedded
/// backends').
const WATCH_QUEUE: usize = 8;
/// The namespace when none is given.
pub const DEFAULT_NAMESPACE: &str = "/verge";

/// How to reach an etcd cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://HOST:PORT`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix for everything Verge writes.
    pub namespace: String,
    /// PEM CA that signed the members' certificates (TLS).
    pub ca_pem: Option<String>,
    /// PEM client certificate and key (mutual TLS).
    pub client_cert_pem: Option<(String, String)>,
    /// User and password (etcd's authentication).
    pub user: Option<(String, String)>,
}

/// Why an etcd address was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The address does not parse.
    #[error(
        "store address {url:?}: {why}; write it as etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE] (etcds:// for TLS)"
    )]
    BadUrl {
        /// The address given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

impl EtcdConfig {
    /// Parse `etcd://HOST:PORT,HOST:PORT/NAMESPACE` (`etcds://` for TLS; the namespace
    /// defaults to [`DEFAULT_NAMESPACE`]).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = if let Some(r) = url.strip_prefix("etcd://") {
            ("http", r)
        } else if let Some(r) = url.strip_prefix("etcds://") {
            ("https", r)
        } else {
            return Err(bad("it must start with etcd:// or etcds://"));
        };
        let (hosts, namespace) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, DEFAULT_NAMESPACE.to_string()),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(bad(&format!("endpoint {h:?} has no :PORT")));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("endpoint {h:?} is not HOST:PORT")));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        if namespace.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(bad("the namespace must be printable ASCII without spaces"));
        }
        Ok(Self {
            endpoints,
            namespace,
            ..Self::default()
        })
    }
}

/// The etcd-backed store. Cheap to clone.
///
/// It talks to one member at a time, as etcd's own client does, and moves to the
/// next when that one cannot be reached: a balancer that keeps a dead member in its
/// set (etcd-client's, over tonic) fails a share of requests for as long as the
/// member is down.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
    namespace: String,
}

struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// A client per endpoint, connected the first time it is used.
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    /// The endpoint in use.
    current: AtomicUsize,
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn backend_msg(msg: String) -> StoreError {
    StoreError::Backend(msg.into())
}

/// Keys per answer when a whole range is read.
const RANGE_PAGE: usize = 1000;
/// The largest answer the client takes from etcd (one page of large objects, or a
/// watch replaying a burst of writes); gRPC's default is 4 MiB.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

impl EtcdStore {
    /// Connect to the cluster (any member answers; the client moves between them).
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.ca_pem.is_some() || config.client_cert_pem.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca_pem {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &config.client_cert_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        if config.endpoints.is_empty() {
            return Err(backend_msg("no etcd endpoint given".into()));
        }
        let store = Self {
            members: Arc::new(Members {
                clients: tokio::sync::Mutex::new(vec![None; config.endpoints.len()]),
                endpoints: config.endpoints.clone(),
                options,
                current: AtomicUsize::new(0),
            }),
            namespace: config.namespace.clone(),
        };
        // Reach one member now, so that a wrong address is an error at start.
        store
            .call(
                true,
                |c| async move { c.cluster_client().member_list().await },
            )
            .await
            .map_err(backend)?;
        Ok(store)
    }

    /// The client of endpoint `i`, connecting it if need be.
    async fn client_at(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let mut clients = self.members.clients.lock().await;
        if let Some(c) = &clients[i] {
            return Ok(c.clone());
        }
        let c = Client::connect(
            [self.members.endpoints[i].as_str()],
            Some(self.members.options.clone()),
        )
        .await?;
        clients[i] = Some(c.clone());
        Ok(c)
    }

    /// Run `f` on the member in use; when it cannot be reached (or, with
    /// `idempotent`, on any failure), move to the next member and run it again, twice
    /// around the cluster at most. A write whose answer was lost is never repeated:
    /// it may have been applied.
    async fn call<T, F, Fut>(&self, idempotent: bool, f: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.endpoints.len();
        let attempts = 2 * n;
        let mut attempt = 1;
        loop {
            let i = self.members.current.load(Ordering::Relaxed) % n;
            let result = match self.client_at(i).await {
                Ok(c) => f(c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if attempt < attempts && (idempotent || unsent(&e)) => {
                    tracing::debug!(error = %e, member = %self.members.endpoints[i], attempt, "etcd member failed; trying the next");
                    let _ = self.members.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    // Round the cluster quickly, then slower (an election takes time).
                    if attempt >= n {
                        tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.namespace).into_bytes()
    }

    /// The key recording the compaction point: beside the namespace, never in it.
    fn compact_key(&self) -> Vec<u8> {
        let mut k = b"\0verge-compact:".to_vec();
        k.extend_from_slice(self.namespace.as_bytes());
        k
    }

    /// A key of the namespace as callers know it; `None` for keys outside it.
    fn local(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        let key = key.strip_prefix(&self.namespace)?;
        if key.is_empty() || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return None;
        }
        Some(KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision() as u64,
            mod_revision: kv.mod_revision() as u64,
            version: kv.version() as u64,
        })
    }

    fn event(&self, e: &etcd_client::Event) -> Option<Event> {
        let kv = self.local(e.kv()?)?;
        let prev_kv = e.prev_kv().and_then(|p| self.local(p));
        Some(match e.event_type() {
            EventType::Put => Event {
                kind: EventKind::Put,
                kv,
                prev_kv,
            },
            EventType::Delete => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    value: Vec::new(),
                    create_revision: prev_kv.as_ref().map_or(0, |p| p.create_revision),
                    version: 0,
                    ..kv
                },
                prev_kv,
            },
        })
    }

    /// A read: safe to run again on another member whatever went wrong.
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(etcd_client::KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call(true, |c| {
            f(c.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES))
        })
        .await
        .map_err(backend)
    }

    /// [`Store::range_page`] at `at_revision` (0: the latest).
    async fn page_at(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        at_revision: u64,
    ) -> Result<RangePage, StoreError> {
        let start = match after {
            // The smallest key after `after`.
            Some(a) if a >= prefix => {
                let mut k = self.full(a);
                k.push(0);
                k
            }
            _ => self.full(prefix),
        };
        let end = self.full(&verge_store::prefix_end(prefix));
        let mut options = GetOptions::new().with_range(end);
        if at_revision > 0 {
            options = options.with_revision(i64::try_from(at_revision).unwrap_or(0));
        }
        if limit < usize::MAX {
            options = options.with_limit(i64::try_from(limit.saturating_add(1)).unwrap_or(0));
        }
        let resp = self
            .read(|mut kv| {
                let (start, options) = (start.clone(), options.clone());
                async move { kv.get(start, Some(options)).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision() as u64);
        let mut kvs: Vec<KeyValue> = resp.kvs().iter().filter_map(|kv| self.local(kv)).collect();
        let more = kvs.len() > limit || (resp.more() && kvs.len() >= limit);
        kvs.truncate(limit);
        Ok(RangePage {
            kvs,
            revision,
            more,
        })
    }

    /// Start an etcd watch of `prefix` from `start`, once etcd says it exists.
    async fn open_watch(
        &self,
        prefix: &str,
        start: u64,
    ) -> Result<etcd_client::WatchStream, StoreError> {
        // etcd creates a watch on compacted history and cancels it a moment later;
        // the recorded compaction point answers at once (a compaction by someone
        // else still ends the watch with the same error, from the stream).
        let compacted = self.recorded_compaction().await?;
        if start < compacted {
            return Err(StoreError::Compacted {
                requested: start,
                compact_revision: compacted,
            });
        }
        let watch_options = etcd_client::WatchOptions::new()
            .with_range(self.full(&verge_store::prefix_end(prefix)))
            .with_start_revision(start as i64)
            .with_prev_key();
        let key = self.full(prefix);
        let mut stream = self
            .call(true, |c| {
                let (key, options) = (key.clone(), watch_options.clone());
                async move {
                    c.watch_client()
                        .max_decoding_message_size(MAX_RESPONSE_BYTES)
                        .watch(key, Some(options))
                        .await
                }
            })
            .await
            .map_err(backend)?;
        // The first answer says whether the watch exists (or its history is gone).
        match stream.message().await.map_err(backend)? {
            Some(r) if r.canceled() && r.compact_revision() > 0 => Err(StoreError::Compacted {
                requested: start,
                compact_revision: r.compact_revision() as u64,
            }),
            Some(r) if r.canceled() => Err(backend_msg(format!(
                "etcd refused the watch: {}",
                r.cancel_reason()
            ))),
            Some(_) => Ok(stream),
            None => Err(StoreError::Closed),
        }
    }

    /// Deliver what `stream` brings as batches, advancing `next`, until the reader
    /// leaves (or history is lost: reported, and done) or the stream fails.
    async fn follow(
        &self,
        stream: &mut etcd_client::WatchStream,
        next: &mut u64,
        tx: &mpsc::Sender<Result<WatchBatch, StoreError>>,
        options: WatchOptions,
    ) -> Followed {
        let quiet = |from: tokio::time::Instant| options.progress.map(|p| from + p);
        let mut deadline = quiet(tokio::time::Instant::now());
        loop {
            let message = match deadline {
                Some(d) => tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep_until(d) => {
                        if let Err(e) = stream.request_progress().await {
                            return Followed::Failed(e.to_string());
                        }
                        deadline = quiet(tokio::time::Instant::now());
                        continue;
                    }
                    _ = tx.closed() => return Followed::Done,
                },
                None => tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return Followed::Done,
                },
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Followed::Failed("the watch stream ended".into()),
                Err(e) => return Followed::Failed(e.to_string()),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: *next,
                            compact_revision: resp.compact_revision() as u64,
                        }))
                        .await;
                    return Followed::Done;
                }
                return Followed::Failed(format!("etcd ended the watch: {}", resp.cancel_reason()));
            }
            let mut batches: Vec<WatchBatch> = Vec::new();
            for e in resp.events().iter().filter_map(|e| self.event(e)) {
                match batches.last_mut() {
                    Some(b) if b.revision == e.revision() => b.events.push(e),
                    _ => batches.push(WatchBatch {
                        revision: e.revision(),
                        events: vec![e],
                    }),
                }
            }
            let header = resp.header().map_or(0, |h| h.revision() as u64);
            if resp.events().is_empty() && options.progress.is_some() && header >= *next {
                // A progress notification: everything up to the header's revision
                // has been sent.
                batches.push(WatchBatch {
                    revision: header,
                    events: Vec::new(),
                });
            }
            for b in batches {
                // A watch opened again from `next` never repeats what was sent.
                if b.revision < *next && !b.events.is_empty() {
                    continue;
                }
                *next = b.revision + 1;
                if tx.send(Ok(b)).await.is_err() {
                    return Followed::Done;
                }
                deadline = quiet(tokio::time::Instant::now());
            }
        }
    }

    async fn recorded_compaction(&self) -> Result<u64, StoreError> {
        let key = self.compact_key();
        let resp = self
            .read(|mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
            .unwrap_or(0))
    }
}

/// How following an etcd watch stream ended.
enum Followed {
    /// The reader left, or the watch was reported ended.
    Done,
    /// The stream failed (a member died, the connection broke): watch again.
    Failed(String),
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(StoreError::InvalidKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

/// Whether a request failed before it reached any member (so repeating it cannot
/// apply it twice): the connection could not be made.
fn unsent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

/// etcd's message for a put with an ended lease.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("requested lease not found")
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = self.full(key);
        let resp = self
            .read(|mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.local(kv)))
    }

    /// A whole range, read a page at a time at the revision of the first page, so
    /// that the result is consistent and no single answer grows with the store (a
    /// range of 10,000 instances in one answer was 5.9 MB, past gRPC's 4 MiB).
    async fn range(&self, prefix: &str) -> Result<RangeResult, StoreError> {
        let mut kvs = Vec::new();
        let mut revision = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .page_at(prefix, after.as_deref(), RANGE_PAGE, revision)
                .await?;
            if revision == 0 {
                revision = page.revision;
            }
            after = page.kvs.last().map(|kv| kv.key.clone());
            kvs.extend(page.kvs);
            if !page.more || after.is_none() {
                break;
            }
        }
        Ok(RangeResult { kvs, revision })
    }

    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        self.page_at(prefix, after, limit, 0).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        for op in &txn.ops {
            check_key(op.key())?;
        }
        let compares: Vec<Compare> = txn
            .compares
            .iter()
            .map(|c| {
                Compare::mod_revision(self.full(&c.key), CompareOp::Equal, c.mod_revision as i64)
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let mut o = PutOptions::new().with_prev_key();
                    if let Some(l) = lease {
                        o = o.with_lease(*l as i64);
                    }
                    TxnOp::put(self.full(key), value.clone(), Some(o))
                }
                Op::Delete { key } => {
                    TxnOp::delete(self.full(key), Some(DeleteOptions::new().with_prev_key()))
                }
            })
            .collect();
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let resp = self
            .call(false, |c| {
                let request = request.clone();
                async move { c.kv_client().txn(request).await }
            })
            .await
            .map_err(|e| {
                let lease = txn.ops.iter().find_map(|op| match op {
                    Op::Put { lease: Some(l), .. } => Some(*l),
                    _ => None,
                });
                match lease {
                    Some(lease) if is_lease_not_found(&e) => StoreError::LeaseNotFound { lease },
                    _ => backend(e),
                }
            })?;
        let revision = resp.header().map_or(0, |h| h.revision() as u64);
        if !resp.succeeded() {
            return Ok(TxnResult {
                succeeded: false,
                revision,
                prev: Vec::new(),
            });
        }
        let prev = resp
            .op_responses()
            .iter()
            .map(|r| match r {
                TxnOpResponse::Put(p) => p.prev_key().and_then(|kv| self.local(kv)),
                TxnOpResponse::Delete(d) => d.prev_kvs().first().and_then(|kv| self.local(kv)),
                _ => None,
            })
            .collect();
        Ok(TxnResult {
            succeeded: true,
            revision,
            prev,
        })
    }

    async fn watch_with(
        &self,
        prefix: &str,
        from_revision: u64,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        let start = match from_revision {
            0 => self.revision().await? + 1,
            r => r,
        };
        let mut stream = self.open_watch(prefix, start).await?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            // Every revision below `next` has been delivered.
            let mut next = start;
            loop {
                match this.follow(&mut stream, &mut next, &tx, options).await {
                    Followed::Done => return,
                    Followed::Failed(why) => {
                        // A member died or the connection broke: watch again from
                        // where this one got to, on whichever member answers (as
                        // etcd's own client does). Only lost history ends the watch.
                        tracing::debug!(error = %why, next, "etcd watch broke; watching again");
                        let mut delay = Duration::from_millis(100);
                        stream = loop {
                            if tx.is_closed() {
                                return;
                            }
                            tokio::time::sleep(delay).await;
                            match this.open_watch(&prefix, next).await {
                                Ok(s) => break s,
                                Err(e @ StoreError::Compacted { .. }) => {
                                    let _ = tx.send(Err(e)).await;
                                    return;
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "etcd watch not re-established yet");
                                    delay = (delay * 2).min(Duration::from_secs(2));
                                }
                            }
                        };
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        // Not repeated when its answer is lost: a lease granted twice is one that
        // expires unused.
        let resp = self
            .call(false, |c| async move {
                c.lease_client().grant(secs.max(1) as i64, None).await
            })
            .await
            .map_err(backend)?;
        Ok(Lease {
            id: resp.id() as u64,
            ttl: Duration::from_secs(resp.ttl().max(0) as u64),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        // Opening the keep-alive stream sends one renewal and reads its answer (an
        // error when the lease is gone).
        let renewed = self
            .call(false, |c| async move {
                c.lease_client().keep_alive(id as i64).await.map(drop)
            })
            .await;
        match renewed {
            Ok(()) => Ok(()),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                Err(StoreError::LeaseNotFound { lease: id })
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let revoked = self
            .call(
                true,
                |c| async move { c.lease_client().revoke(id as i64).await },
            )
            .await;
        match revoked {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let current = self.revision().await?;
        // etcd keeps the compaction revision itself; "everything" is up to `current`.
        let revision = revision.min(current);
        if revision <= self.recorded_compaction().await? {
            return Ok(());
        }
        let compacted = self
            .call(true, |c| async move {
                c.kv_client().compact(revision as i64, None).await
            })
            .await;
        match compacted {
            Ok(_) => {}
            // Someone compacted further already: fine.
            Err(e) if e.to_string().contains("has been compacted") => {}
            Err(e) => return Err(backend(e)),
        }
        let key = self.compact_key();
        self.call(true, |c| {
            let key = key.clone();
            async move { c.kv_client().put(key, revision.to_string(), None).await }
        })
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        // A one-key read of the namespace's own compaction key: cheap, and its header
        // carries the cluster's revision.
        let key = self.compact_key();
        let resp = self
            .read(|mut kv| {
                let key = key.clone();
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn compact_revision(&self) -> Result<u64, StoreError> {
        self.recorded_compaction().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_or_say_how_to_write_them() {
        let c = EtcdConfig::from_url("etcd://10.0.0.1:2379,10.0.0.2:2379").expect("parses");
        assert_eq!(
            c.endpoints,
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(c.namespace, "/verge");
        let c = EtcdConfig::from_url("etcds://e:2379/prod/").expect("parses");
        assert_eq!(
            (c.endpoints[0].as_str(), c.namespace.as_str()),
            ("https://e:2379", "/prod")
        );
        for bad in ["http://e:2379", "etcd://e", "etcd://:2379", "etcd://e:x"] {
            let e = EtcdConfig::from_url(bad).expect_err(bad).to_string();
            assert!(e.contains("etcd://HOST:PORT"), "{e}");
        }
    }
}
