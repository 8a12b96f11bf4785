//! The embedded backend: SQLite in WAL mode.
//!
//! Layout: `current` holds the latest value of every live key; `log` holds every
//! change (puts, and deletes as tombstones that keep the deleted value so that watchers
//! get `prev_kv`); `meta` holds the global revision and the compaction point.
//!
//! One writer thread owns the write connection and commits queued transactions in
//! groups (one fsync for many writers), then publishes their events to live watchers.
//! Reads use their own connection; WAL gives them a consistent snapshot. Ranges run
//! in the blocking pool; a read of a key or a few runs on the caller's thread when
//! that connection is free (it takes less than the hand-off to the pool would).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::lease::{Attachments, LeaseBook};
use crate::{
    Event, EventKind, KeyValue, Lease, LeaseId, Op, Store, StoreError, Txn, TxnResult, WatchBatch,
    WatchOptions, WatchStream, check_key, prefix_end,
};

/// How many queued transactions one group commit takes at most.
const MAX_GROUP: usize = 512;
/// Batches a watch queues for a reader that has not taken them yet.
const WATCH_QUEUE: usize = 8;
/// Rows read per history query when a watch replays from the log.
// Kept small: a watcher replaying history holds one page, and a slow or hostile
// watcher must not make the hub hold megabytes per watch (50 watches from revision 1
// once took the hub from 338 MiB to 2.2 GiB with 2,048-revision pages).
const REPLAY_PAGE: i64 = 256;
/// And at most about this many bytes of values.
const REPLAY_PAGE_BYTES: usize = 1 << 20;

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

enum WriteReq {
    Txn(Txn, oneshot::Sender<Result<TxnResult, StoreError>>),
    Compact(u64, oneshot::Sender<Result<(), StoreError>>),
    Grant(
        std::time::Duration,
        oneshot::Sender<Result<Lease, StoreError>>,
    ),
    Revoke(LeaseId, oneshot::Sender<Result<(), StoreError>>),
}

struct Shared {
    revision: AtomicU64,
    compact_revision: AtomicU64,
    events: broadcast::Sender<Arc<WatchBatch>>,
    reader: Mutex<Connection>,
    /// Live leases; changed only by the writer thread (and keep-alives, which move
    /// deadlines only).
    leases: Mutex<LeaseBook>,
}

impl Shared {
    fn leases(&self) -> std::sync::MutexGuard<'_, LeaseBook> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The SQLite-backed [`Store`]. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer: std_mpsc::Sender<WriteReq>,
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    // FULL: a committed write survives a power cut, not only a crash of the hub.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (or create) the store in the SQLite file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let conn = open_conn(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS current(
                key TEXT PRIMARY KEY, value BLOB NOT NULL,
                create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS log(
                id INTEGER PRIMARY KEY AUTOINCREMENT, rev INTEGER NOT NULL, key TEXT NOT NULL,
                value BLOB NOT NULL, create_rev INTEGER NOT NULL, version INTEGER NOT NULL,
                prev_rev INTEGER, deleted INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS log_rev ON log(rev);
             CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compact', 0);
             CREATE TABLE IF NOT EXISTS leases(id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS lease_keys(key TEXT PRIMARY KEY, lease INTEGER NOT NULL);",
        )
        .map_err(backend)?;
        let revision = read_meta(&conn, "revision")?;
        let compact = read_meta(&conn, "compact")?;
        let leases = read_leases(&conn)?;
        let reader = open_conn(path)?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            revision: AtomicU64::new(revision),
            compact_revision: AtomicU64::new(compact),
            events,
            reader: Mutex::new(reader),
            leases: Mutex::new(leases),
        });
        let (tx, rx) = std_mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("verge-store-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_shared))
            .map_err(backend)?;
        Ok(Self { shared, writer: tx })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = shared.reader.lock().map_err(|_| StoreError::Closed)?;
            f(&conn)
        })
        .await
        .map_err(backend)?
    }

    /// A read of a key or a few: on the caller's thread when the reader is free, in
    /// the blocking pool (as [`Self::read`]) while it is busy with a larger read.
    ///
    /// Such a read takes microseconds from pages in memory, less than the hand-off
    /// to the pool and the wake-up for its answer: after a hub restart at 100,000
    /// edges, with five such reads per returning edge, `spawn_blocking` was 10% of
    /// the hub's samples and futex calls 13%.
    async fn point_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self.shared.reader.try_lock() {
            Ok(conn) => return f(&conn),
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(StoreError::Closed),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        self.read(f).await
    }
}

/// The leases on disk, each with a full TTL from now, and the keys they hold.
fn read_leases(conn: &Connection) -> Result<LeaseBook, StoreError> {
    let mut book = LeaseBook::default();
    let mut stmt = conn
        .prepare("SELECT id, ttl_ms FROM leases")
        .map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(backend)?;
    for row in rows {
        let (id, ttl) = row.map_err(backend)?;
        book.insert(id as u64, std::time::Duration::from_millis(ttl as u64));
    }
    let mut stmt = conn
        .prepare("SELECT key, lease FROM lease_keys")
        .map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(backend)?;
    let mut keys = Vec::new();
    for row in rows {
        let (key, lease) = row.map_err(backend)?;
        keys.push(Op::Put {
            key,
            value: Vec::new(),
            lease: Some(lease as u64),
        });
    }
    let attach = book.check(&Txn {
        compares: Vec::new(),
        ops: keys,
    });
    // A key whose lease row is missing (a crash between revoking and forgetting) is
    // left unattached; everything else goes back where it was.
    if let Ok(a) = attach {
        book.apply(a);
    }
    Ok(book)
}

fn read_meta(conn: &Connection, name: &str) -> Result<u64, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
    .map_err(backend)
}

fn row_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_revision: r.get::<_, i64>(2)? as u64,
        mod_revision: r.get::<_, i64>(3)? as u64,
        version: r.get::<_, i64>(4)? as u64,
    })
}

fn get_current(conn: &Connection, key: &str) -> Result<Option<KeyValue>, StoreError> {
    conn.prepare_cached(
        "SELECT key, value, create_rev, mod_rev, version FROM current WHERE key = ?1",
    )
    .map_err(backend)?
    .query_row([key], row_kv)
    .optional()
    .map_err(backend)
}

fn writer_loop(mut conn: Connection, rx: std_mpsc::Receiver<WriteReq>, shared: Arc<Shared>) {
    loop {
        // Between requests (and at least every check interval), end expired leases.
        let expired = shared.leases().expired();
        for id in expired {
            if let Err(e) = revoke(&mut conn, id, &shared) {
                tracing::error!(lease = id, error = %e, "could not end an expired lease");
            }
        }
        let first = match rx.recv_timeout(crate::lease::EXPIRY_CHECK) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(req) => group.push(req),
                Err(_) => break,
            }
        }
        let mut txns = Vec::new();
        for req in group {
            match req {
                WriteReq::Txn(t, reply) => txns.push((t, reply)),
                WriteReq::Compact(rev, reply) => {
                    let _ = reply.send(compact(&mut conn, rev, &shared));
                }
                WriteReq::Grant(ttl, reply) => {
                    let _ = reply.send(grant(&conn, ttl, &shared));
                }
                WriteReq::Revoke(id, reply) => {
                    let _ = reply.send(revoke(&mut conn, id, &shared));
                }
            }
        }
        if !txns.is_empty() {
            commit_group(&mut conn, txns, &shared);
        }
    }
}

fn grant(
    conn: &Connection,
    ttl: std::time::Duration,
    shared: &Shared,
) -> Result<Lease, StoreError> {
    let mut book = shared.leases();
    let id = book.grant(ttl);
    let saved = conn.execute(
        "INSERT INTO leases(id, ttl_ms) VALUES (?1, ?2)",
        params![id as i64, ttl.as_millis().min(i64::MAX as u128) as i64],
    );
    if let Err(e) = saved {
        book.remove(id);
        return Err(backend(e));
    }
    Ok(Lease { id, ttl })
}

/// End lease `id`: delete its keys under one revision, then forget it.
fn revoke(conn: &mut Connection, id: LeaseId, shared: &Shared) -> Result<(), StoreError> {
    let deletes = shared.leases().remove(id);
    let (reply, done) = oneshot::channel();
    commit_group(conn, vec![(deletes, reply)], shared);
    let mut done = done;
    match done.try_recv() {
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => {}
        Err(_) => return Err(StoreError::Closed),
    }
    conn.execute("DELETE FROM leases WHERE id = ?1", [id as i64])
        .map_err(backend)?;
    Ok(())
}

type Outcome = (Result<TxnResult, StoreError>, Option<WatchBatch>);

fn commit_group(
    conn: &mut Connection,
    txns: Vec<(Txn, oneshot::Sender<Result<TxnResult, StoreError>>)>,
    shared: &Shared,
) {
    let start_rev = shared.revision.load(Ordering::SeqCst);
    let result = (|| -> Result<(Vec<Outcome>, u64), StoreError> {
        let tx = conn.transaction().map_err(backend)?;
        let mut rev = start_rev;
        let mut outcomes = Vec::with_capacity(txns.len());
        for (t, _) in &txns {
            let attachments = match shared.leases().check(t) {
                Ok(a) => a,
                Err(e) => {
                    outcomes.push((Err(e), None));
                    continue;
                }
            };
            // Cached, as every statement of the hot path: parsing these two for each
            // transaction was most of the store writer's parsing in a burst (about a
            // tenth of its time, a profile at 20,000 edges).
            tx.prepare_cached("SAVEPOINT one")
                .and_then(|mut s| s.execute([]))
                .map_err(backend)?;
            match apply_txn(&tx, t, rev, &attachments) {
                Ok((res, batch)) => {
                    tx.prepare_cached("RELEASE one")
                        .and_then(|mut s| s.execute([]))
                        .map_err(backend)?;
                    rev = res.revision;
                    // Into the book at once, so that later transactions of the
                    // group see them (undone below if the group fails).
                    if res.succeeded {
                        shared.leases().apply(attachments);
                    }
                    outcomes.push((Ok(res), batch));
                }
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO one; RELEASE one")
                        .map_err(backend)?;
                    outcomes.push((Err(e), None));
                }
            }
        }
        if rev != start_rev {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'revision'",
                [rev as i64],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok((outcomes, rev))
    })();
    match result {
        Ok((outcomes, rev)) => {
            shared.revision.store(rev, Ordering::SeqCst);
            for ((_, reply), (res, batch)) in txns.into_iter().zip(outcomes) {
                if let Some(batch) = batch {
                    // No receivers is fine: nobody is watching.
                    let _ = shared.events.send(Arc::new(batch));
                }
                let _ = reply.send(res);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            tracing::error!(error = %msg, "store group commit failed");
            // The book took the group's attachments as they applied: read back what
            // is on disk instead.
            match read_leases(conn) {
                Ok(book) => *shared.leases() = book,
                Err(e) => tracing::error!(error = %e, "could not read the leases back"),
            }
            for (_, reply) in txns {
                let _ = reply.send(Err(StoreError::Backend(msg.clone().into())));
            }
        }
    }
}

fn apply_txn(
    tx: &rusqlite::Transaction<'_>,
    t: &Txn,
    current_rev: u64,
    attachments: &Attachments,
) -> Result<(TxnResult, Option<WatchBatch>), StoreError> {
    for c in &t.compares {
        let actual = get_current(tx, &c.key)?.map_or(0, |kv| kv.mod_revision);
        if actual != c.mod_revision {
            return Ok((
                TxnResult {
                    succeeded: false,
                    revision: current_rev,
                    prev: Vec::new(),
                },
                None,
            ));
        }
    }
    let rev = current_rev + 1;
    let mut prev = Vec::with_capacity(t.ops.len());
    let mut events = Vec::new();
    for op in &t.ops {
        match op {
            Op::Put { key, value, .. } => {
                check_key(key)?;
                let old = get_current(tx, key)?;
                let (create_rev, version) = match &old {
                    Some(kv) => (kv.create_revision, kv.version + 1),
                    None => (rev, 1),
                };
                tx.prepare_cached(
                    "INSERT INTO current(key, value, create_rev, mod_rev, version)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                       mod_rev = excluded.mod_rev, version = excluded.version",
                )
                .map_err(backend)?
                .execute(params![
                    key,
                    value,
                    create_rev as i64,
                    rev as i64,
                    version as i64
                ])
                .map_err(backend)?;
                tx.prepare_cached(
                    "INSERT INTO log(rev, key, value, create_rev, version, prev_rev, deleted)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
                )
                .map_err(backend)?
                .execute(params![
                    rev as i64,
                    key,
                    value,
                    create_rev as i64,
                    version as i64,
                    old.as_ref().map(|kv| kv.mod_revision as i64)
                ])
                .map_err(backend)?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create_rev,
                        mod_revision: rev,
                        version,
                    },
                    prev_kv: old.clone(),
                });
                prev.push(old);
            }
            Op::Delete { key } => {
                check_key(key)?;
                let old = get_current(tx, key)?;
                if let Some(kv) = &old {
                    tx.prepare_cached("DELETE FROM current WHERE key = ?1")
                        .map_err(backend)?
                        .execute([key])
                        .map_err(backend)?;
                    // The tombstone keeps the deleted value so replayed deletes carry prev_kv.
                    tx.prepare_cached(
                        "INSERT INTO log(rev, key, value, create_rev, version, prev_rev, deleted)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
                    )
                    .map_err(backend)?
                    .execute(params![
                        rev as i64,
                        key,
                        kv.value,
                        kv.create_revision as i64,
                        kv.version as i64,
                        kv.mod_revision as i64
                    ])
                    .map_err(backend)?;
                    events.push(delete_event(key, rev, kv.clone()));
                }
                prev.push(old);
            }
        }
    }
    for (key, lease) in attachments.iter() {
        match lease {
            Some(l) => tx
                .prepare_cached("INSERT OR REPLACE INTO lease_keys(key, lease) VALUES (?1, ?2)")
                .map_err(backend)?
                .execute(params![key, *l as i64]),
            None => tx
                .prepare_cached("DELETE FROM lease_keys WHERE key = ?1")
                .map_err(backend)?
                .execute([key]),
        }
        .map_err(backend)?;
    }
    if events.is_empty() {
        // Nothing changed (e.g. deleting absent keys): no new revision.
        return Ok((
            TxnResult {
                succeeded: true,
                revision: current_rev,
                prev,
            },
            None,
        ));
    }
    Ok((
        TxnResult {
            succeeded: true,
            revision: rev,
            prev,
        },
        Some(WatchBatch {
            revision: rev,
            events,
        }),
    ))
}

fn delete_event(key: &str, rev: u64, prev: KeyValue) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: prev.create_revision,
            mod_revision: rev,
            version: 0,
        },
        prev_kv: Some(prev),
    }
}

fn compact(conn: &mut Connection, rev: u64, shared: &Shared) -> Result<(), StoreError> {
    let current = shared.revision.load(Ordering::SeqCst);
    let rev = rev.min(current + 1);
    if rev <= shared.compact_revision.load(Ordering::SeqCst) {
        return Ok(());
    }
    let tx = conn.transaction().map_err(backend)?;
    // Keep, for every key, its newest change below the compaction point (a watcher
    // starting at `rev` may need it as prev_kv), except tombstones, which nobody needs.
    tx.execute(
        "DELETE FROM log WHERE rev < ?1 AND (deleted = 1 OR id NOT IN
            (SELECT max(id) FROM log WHERE rev < ?1 GROUP BY key))",
        [rev as i64],
    )
    .map_err(backend)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'compact'",
        [rev as i64],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)?;
    shared.compact_revision.store(rev, Ordering::SeqCst);
    Ok(())
}

/// Read history batches with `from <= revision <= to` under `prefix`.
/// History of `prefix` from `from` to `to`, cut short (at a revision boundary) once it
/// holds [`REPLAY_PAGE_BYTES`]; then also the last revision it holds.
fn read_history(
    conn: &Connection,
    prefix: &str,
    from: u64,
    to: u64,
) -> Result<(Vec<WatchBatch>, Option<u64>), StoreError> {
    let end = prefix_end(prefix);
    let mut stmt = conn
        .prepare_cached(
            "SELECT l.rev, l.key, l.value, l.create_rev, l.version, l.prev_rev, l.deleted,
                    p.value, p.version
             FROM log l LEFT JOIN log p ON p.key = l.key AND p.rev = l.prev_rev AND p.deleted = 0
             WHERE l.rev >= ?1 AND l.rev <= ?4 AND l.key >= ?2 AND l.key < ?3
             ORDER BY l.rev, l.id",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![from as i64, prefix, end, to as i64], |r| {
            let rev = r.get::<_, i64>(0)? as u64;
            let key: String = r.get(1)?;
            let value: Vec<u8> = r.get(2)?;
            let create_revision = r.get::<_, i64>(3)? as u64;
            let version = r.get::<_, i64>(4)? as u64;
            let prev_rev: Option<i64> = r.get(5)?;
            let deleted: i64 = r.get(6)?;
            let prev_value: Option<Vec<u8>> = r.get(7)?;
            let prev_version: Option<i64> = r.get(8)?;
            Ok(if deleted == 1 {
                delete_event(
                    &key,
                    rev,
                    KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: prev_rev.unwrap_or(0) as u64,
                        version,
                    },
                )
            } else {
                Event {
                    kind: EventKind::Put,
                    prev_kv: match (prev_rev, prev_value) {
                        (Some(pr), Some(pv)) => Some(KeyValue {
                            key: key.clone(),
                            value: pv,
                            create_revision,
                            mod_revision: pr as u64,
                            version: prev_version.unwrap_or(0) as u64,
                        }),
                        _ => None,
                    },
                    kv: KeyValue {
                        key,
                        value,
                        create_revision,
                        mod_revision: rev,
                        version,
                    },
                }
            })
        })
        .map_err(backend)?;
    let mut batches: Vec<WatchBatch> = Vec::new();
    let mut bytes = 0usize;
    for ev in rows {
        let ev = ev.map_err(backend)?;
        match batches.last_mut() {
            Some(b) if b.revision == ev.revision() => b.events.push(ev),
            last => {
                // Stop at a revision boundary once the page holds enough bytes: the
                // next page starts after the last whole revision read.
                if let Some(b) = last
                    && bytes > REPLAY_PAGE_BYTES
                {
                    let reached = b.revision;
                    return Ok((batches, Some(reached)));
                }
                batches.push(WatchBatch {
                    revision: ev.revision(),
                    events: vec![ev],
                })
            }
        }
        if let Some(e) = batches.last().and_then(|b| b.events.last()) {
            bytes += e.kv.value.len() + e.prev_kv.as_ref().map_or(0, |p| p.value.len());
        }
    }
    Ok((batches, None))
}

/// The highest revision that a history page starting at `from` covers.
fn history_page_end(conn: &Connection, from: u64) -> Result<Option<u64>, StoreError> {
    conn.prepare_cached(
        "SELECT max(rev) FROM (SELECT rev FROM log WHERE rev >= ?1 ORDER BY rev LIMIT ?2)",
    )
    .map_err(backend)?
    .query_row(params![from as i64, REPLAY_PAGE], |r| {
        r.get::<_, Option<i64>>(0)
    })
    .map(|v| v.map(|v| v as u64))
    .map_err(backend)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.point_read(move |c| get_current(c, &key)).await
    }

    async fn get_each(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        self.point_read(move |c| keys.iter().map(|k| get_current(c, k)).collect())
            .await
    }

    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::RangePage, StoreError> {
        let prefix = prefix.to_string();
        let after = after.unwrap_or_default().to_string();
        self.read(move |c| {
            c.execute_batch("BEGIN").map_err(backend)?;
            let res = (|| {
                let revision = read_meta(c, "revision")?;
                let mut stmt = c
                    .prepare_cached(
                        "SELECT key, value, create_rev, mod_rev, version FROM current
                         WHERE key >= ?1 AND key < ?2 AND key > ?3 ORDER BY key LIMIT ?4",
                    )
                    .map_err(backend)?;
                let kvs = stmt
                    .query_map(
                        params![
                            prefix,
                            prefix_end(&prefix),
                            after,
                            // SQLite takes a negative limit as none.
                            i64::try_from(limit.saturating_add(1)).unwrap_or(-1)
                        ],
                        row_kv,
                    )
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?;
                Ok(crate::page_of(kvs, revision, limit))
            })();
            c.execute_batch("COMMIT").map_err(backend)?;
            res
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriteReq::Txn(txn, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<Lease, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriteReq::Grant(ttl, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.shared.leases().keep_alive(id)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriteReq::Revoke(id, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn watch_with(
        &self,
        prefix: &str,
        from_revision: u64,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history so that nothing committed in between is missed;
        // revisions seen twice are skipped below.
        let mut live = self.shared.events.subscribe();
        let mut next = crate::watch_start(
            from_revision,
            self.shared.revision.load(Ordering::SeqCst),
            self.shared.compact_revision.load(Ordering::SeqCst),
        )?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            loop {
                // Replay history from `next` until caught up with what is committed.
                loop {
                    if next > this.shared.revision.load(Ordering::SeqCst) {
                        break;
                    }
                    let p = prefix.clone();
                    let from = next;
                    let compact = this.shared.compact_revision.load(Ordering::SeqCst);
                    if next < compact {
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                requested: next,
                                compact_revision: compact,
                            }))
                            .await;
                        return;
                    }
                    let page = this
                        .read(move |c| {
                            // One snapshot for the page bounds and its rows.
                            c.execute_batch("BEGIN").map_err(backend)?;
                            let res = (|| {
                                let end = history_page_end(c, from)?;
                                let (batches, cut) = match end {
                                    Some(to) => read_history(c, &p, from, to)?,
                                    None => (Vec::new(), None),
                                };
                                Ok((batches, cut.or(end)))
                            })();
                            c.execute_batch("COMMIT").map_err(backend)?;
                            res
                        })
                        .await;
                    match page {
                        Ok((batches, end)) => {
                            for b in batches {
                                if tx.send(Ok(b)).await.is_err() {
                                    return;
                                }
                            }
                            match end {
                                Some(end) => next = end + 1,
                                None => break,
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                // Follow live commits; behind the feed, go back to the log and replay.
                if let crate::LiveEnd::Done =
                    crate::follow_live(&mut live, &mut next, &prefix, &tx, options.progress).await
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriteReq::Compact(revision, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.shared.revision.load(Ordering::SeqCst))
    }

    async fn compact_revision(&self) -> Result<u64, StoreError> {
        Ok(self.shared.compact_revision.load(Ordering::SeqCst))
    }
}
