//! Verge's store: a revisioned key-value store with watch, modelled on etcd.
//!
//! Every write bumps one global revision; each key remembers the revision that
//! created it and the one that last modified it. Writers guard their changes with
//! compare-and-swap on a key's modification revision ([`Txn`]). Watchers name a key
//! prefix and a start revision and receive every later change exactly once, in
//! order, even across a reconnect, or a clear [`StoreError::Compacted`] if that
//! history has been compacted away.
//!
//! [`Store`] is the interface callers use; [`SqliteStore`] is the default, embedded
//! backend (SQLite in WAL mode, one writer thread with group commit); [`MemoryStore`]
//! keeps everything in memory with the same semantics (tests, the fleet simulator).
//! Both pass one conformance suite (`tests/store.rs`). Start reading at [`Store`].

#[cfg(feature = "conformance")]
pub mod conformance;
mod lease;
mod memory;
mod sqlite;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use memory::MemoryStore;

/// Split `kvs` (read with one key more than `limit`) into a page.
pub(crate) fn page_of(mut kvs: Vec<KeyValue>, revision: u64, limit: usize) -> RangePage {
    let more = kvs.len() > limit;
    kvs.truncate(limit);
    RangePage {
        kvs,
        revision,
        more,
    }
}
pub use sqlite::SqliteStore;

/// One key's current value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (ASCII, `/`-separated by convention).
    pub key: String,
    /// The value bytes (empty for a delete event's `kv`).
    pub value: Vec<u8>,
    /// Revision of the write that created this key.
    pub create_revision: u64,
    /// Revision of the write that last modified this key.
    pub mod_revision: u64,
    /// Number of writes to this key since it was created (1 for a new key).
    pub version: u64,
}

/// A condition on a key, evaluated atomically at the start of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The key's modification revision must equal this; 0 means "the key must not exist".
    pub mod_revision: u64,
}

/// Identifies a lease ([`Store::lease_grant`]); never 0.
pub type LeaseId = u64;

/// A write inside a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace a key.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The lease the key is attached to: it is deleted when the lease ends.
        /// `None` detaches it from any lease it had (as etcd does).
        lease: Option<LeaseId>,
    },
    /// Remove a key (no-op if absent).
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// Put `key` = `value`, with no lease.
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease: None,
        }
    }

    /// Delete `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key this op writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// An atomic transaction: if every compare holds, apply `ops` under one new revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions; all must hold.
    pub compares: Vec<Compare>,
    /// Writes applied when they do.
    pub ops: Vec<Op>,
}

/// What a [`Txn`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held and the ops were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if nothing was written).
    pub revision: u64,
    /// For each op (when succeeded): the key's value before the op.
    pub prev: Vec<Option<KeyValue>>,
}

/// The result of a range read: the matching keys at one consistent revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResult {
    /// Matching keys in key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read observed.
    pub revision: u64,
}

/// One page of a range read ([`Store::range_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePage {
    /// Matching keys in key order, at most the limit asked for.
    pub kvs: Vec<KeyValue>,
    /// The store revision this page observed.
    pub revision: u64,
    /// Whether more keys follow (ask again with the last key of this page).
    pub more: bool,
}

/// Kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, `value` is empty and `mod_revision` is
    /// the revision of the delete.
    pub kv: KeyValue,
    /// The key before the change, when it existed and that history is still kept.
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// Revision at which this change happened.
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }
}

/// Events delivered by a watch: all changes under the prefix at one revision.
///
/// A batch with no events is a *progress notification* (only on watches that asked
/// for them, [`WatchOptions::progress`]): every change under the prefix up to and
/// including `revision` has been delivered, so a watcher may resume from
/// `revision + 1` even though nothing under its prefix changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision of every event in the batch (of a progress notification: the
    /// revision the watch has caught up with).
    pub revision: u64,
    /// The changes (empty only in a progress notification).
    pub events: Vec<Event>,
}

impl WatchBatch {
    /// Whether this is a progress notification rather than changes.
    pub fn is_progress(&self) -> bool {
        self.events.is_empty()
    }
}

/// How a watch is to be delivered ([`Store::watch_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// When nothing under the prefix has been delivered for this long, send a progress
    /// notification (a batch with no events). `None`: never.
    pub progress: Option<std::time::Duration>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id, to attach keys ([`Op::Put`]) and keep it alive.
    pub id: LeaseId,
    /// How long it lives without a keep-alive (backends may round it up: etcd keeps
    /// whole seconds and a minimum).
    pub ttl: std::time::Duration,
}

/// A live watch: receive batches in revision order. Dropping it cancels the watch.
pub type WatchStream = mpsc::Receiver<Result<WatchBatch, StoreError>>;

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested start revision is older than the oldest history kept.
    #[error(
        "revision {requested} has been compacted (oldest kept revision is {compact_revision}); list again and watch from the list's revision"
    )]
    Compacted {
        /// The revision the caller asked for.
        requested: u64,
        /// Revisions below this one are gone.
        compact_revision: u64,
    },
    /// A key was refused (empty, or not printable ASCII).
    #[error("invalid key {key:?}: keys must be non-empty printable ASCII")]
    InvalidKey {
        /// The key.
        key: String,
    },
    /// The lease does not exist (it expired, was revoked, or never was).
    #[error("lease {lease:x} not found: it expired or was revoked; grant a new one")]
    LeaseNotFound {
        /// The lease.
        lease: LeaseId,
    },
    /// The backend failed (disk, database, the etcd cluster).
    #[error("store backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
}

/// The store interface: get, range, transactions, watch, compaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// The current values of a few keys, in the order asked, in one trip to the
    /// backend where it can (a hub checks a node and its enrolment on every session:
    /// two trips through the blocking pool cost it twice). Not one consistent
    /// revision: each value is current when read.
    async fn get_each(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }
    /// Every key starting with `prefix`, at one consistent revision.
    async fn range(&self, prefix: &str) -> Result<RangeResult, StoreError> {
        let page = self.range_page(prefix, None, usize::MAX).await?;
        Ok(RangeResult {
            kvs: page.kvs,
            revision: page.revision,
        })
    }
    /// At most `limit` keys starting with `prefix` that sort after `after` (the last key
    /// of the previous page; `None` for the first), in key order, at one consistent
    /// revision. Each page is consistent in itself; keys written between pages show up
    /// if they sort after the page already read.
    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError>;
    /// Apply a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;
    /// Watch `prefix` from `from_revision` (inclusive). 0 means "changes after now".
    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        self.watch_with(prefix, from_revision, WatchOptions::default())
            .await
    }
    /// [`Store::watch`], delivered as `options` say (progress notifications).
    async fn watch_with(
        &self,
        prefix: &str,
        from_revision: u64,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError>;
    /// Grant a lease that lives `ttl` unless kept alive. Keys put with it are deleted
    /// (one revision, seen by watchers as deletes) when it expires or is revoked.
    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<Lease, StoreError>;
    /// Renew a lease for another full TTL; [`StoreError::LeaseNotFound`] once it ended.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError>;
    /// End a lease now, deleting its keys. Revoking an ended lease is not an error.
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError>;
    /// Drop history older than `revision`; watches from before it fail with `Compacted`.
    async fn compact(&self, revision: u64) -> Result<(), StoreError>;
    /// The current revision.
    async fn revision(&self) -> Result<u64, StoreError>;
    /// The oldest revision a watch may still start from.
    async fn compact_revision(&self) -> Result<u64, StoreError>;
}

/// Convenience writes on top of [`Store::txn`].
#[async_trait]
pub trait StoreExt: Store {
    /// Put `key` if its modification revision is `expect` (`Some(0)`: must not exist;
    /// `None`: unconditional). Returns the result; `succeeded == false` on conflict.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Option<u64>,
    ) -> Result<TxnResult, StoreError> {
        self.txn(Txn {
            compares: guard(key, expect),
            ops: vec![Op::put(key, value)],
        })
        .await
    }

    /// Delete `key` if its modification revision is `expect` (`None`: unconditional).
    async fn delete(&self, key: &str, expect: Option<u64>) -> Result<TxnResult, StoreError> {
        self.txn(Txn {
            compares: guard(key, expect),
            ops: vec![Op::delete(key)],
        })
        .await
    }
}

impl<T: Store + ?Sized> StoreExt for T {}

/// The compare for "`key` is at modification revision `expect`" (none when `None`).
fn guard(key: &str, expect: Option<u64>) -> Vec<Compare> {
    expect
        .map(|r| {
            vec![Compare {
                key: key.to_string(),
                mod_revision: r,
            }]
        })
        .unwrap_or_default()
}

/// The smallest key greater than every key starting with `prefix` (for range scans).
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            // Keys are ASCII, so incrementing a byte below 0x7f keeps it valid UTF-8.
            return String::from_utf8(bytes).unwrap_or_default();
        }
    }
    // Empty prefix (or all 0x7f): the whole keyspace; DEL sorts after every printable key.
    "\u{7f}".to_string()
}

/// `batch` restricted to `prefix`, if anything of it is under it.
pub(crate) fn filter_batch(batch: &WatchBatch, prefix: &str) -> Option<WatchBatch> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| e.kv.key.starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then_some(WatchBatch {
        revision: batch.revision,
        events,
    })
}

/// The first revision a watch from `from_revision` delivers (0: after `current`), or
/// the error when that history was compacted (below `compact`).
pub(crate) fn watch_start(
    from_revision: u64,
    current: u64,
    compact: u64,
) -> Result<u64, StoreError> {
    match from_revision {
        0 => Ok(current + 1),
        r if r < compact => Err(StoreError::Compacted {
            requested: r,
            compact_revision: compact,
        }),
        r => Ok(r),
    }
}

/// How following a backend's live feed ended.
pub(crate) enum LiveEnd {
    /// The watcher fell behind the feed: replay history from `next`, then follow again.
    Lagged,
    /// The watch is over (its reader left, or the store closed).
    Done,
}

/// Forward live batches under `prefix` to a watch, skipping revisions below `next`
/// (already sent from history) and advancing it. Every backend's watch is history
/// replay, then this. With `progress`, a quiet spell that long sends a progress
/// notification at `next - 1`: every revision below `next` has been seen.
pub(crate) async fn follow_live(
    live: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<WatchBatch>>,
    next: &mut u64,
    prefix: &str,
    tx: &mpsc::Sender<Result<WatchBatch, StoreError>>,
    progress: Option<std::time::Duration>,
) -> LiveEnd {
    use tokio::sync::broadcast::error::RecvError;
    let quiet = |from: tokio::time::Instant| progress.map(|p| from + p);
    let mut deadline = quiet(tokio::time::Instant::now());
    loop {
        let received = match deadline {
            Some(d) => match tokio::time::timeout_at(d, live.recv()).await {
                Ok(r) => r,
                Err(_) => {
                    let note = WatchBatch {
                        revision: next.saturating_sub(1),
                        events: Vec::new(),
                    };
                    if tx.send(Ok(note)).await.is_err() {
                        return LiveEnd::Done;
                    }
                    deadline = quiet(tokio::time::Instant::now());
                    continue;
                }
            },
            None => live.recv().await,
        };
        match received {
            Ok(batch) => {
                if batch.revision < *next {
                    continue;
                }
                *next = batch.revision + 1;
                if let Some(b) = filter_batch(&batch, prefix) {
                    if tx.send(Ok(b)).await.is_err() {
                        return LiveEnd::Done;
                    }
                    deadline = quiet(tokio::time::Instant::now());
                }
            }
            Err(RecvError::Lagged(_)) => return LiveEnd::Lagged,
            Err(RecvError::Closed) => return LiveEnd::Done,
        }
    }
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(StoreError::InvalidKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), "/a0");
        assert_eq!(prefix_end("abc"), "abd");
        assert_eq!(prefix_end(""), "\u{7f}");
    }
}
