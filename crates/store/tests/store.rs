//! The store contract, as one conformance suite that every backend passes: revisions,
//! CAS, range, watch, compaction (the SQLite and in-memory backends here; each test
//! runs once per backend), plus what only a durable backend promises (surviving a
//! reopen).

use proptest::prelude::*;
use verge_store::{
    Compare, EventKind, MemoryStore, Op, SqliteStore, Store, StoreError, StoreExt, Txn,
};

/// Each test of the contract, once per backend.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[test]
                fn $name() {
                    super::rt().block_on(async {
                        let dir = tempfile::tempdir().expect("tempdir");
                        let s = verge_store::SqliteStore::open(dir.path().join("db")).expect("open");
                        super::$name(&s).await
                    })
                }
            )*
        }
        mod memory_backend {
            $(
                #[test]
                fn $name() {
                    super::rt().block_on(super::$name(&verge_store::MemoryStore::new()))
                }
            )*
        }
    };
}

on_every_backend!(
    revisions_and_compare_and_swap,
    compacted_history_is_a_clear_error,
    ranges_come_in_pages_with_a_continuation,
);

/// Paging through a prefix returns every key once, in order, and says when it is done;
/// keys outside the prefix never appear.
async fn ranges_come_in_pages_with_a_continuation(s: &dyn Store) {
    for i in 0..25u8 {
        s.put(&format!("/p/{i:02}"), vec![i], None)
            .await
            .expect("put");
    }
    s.put("/q/outside", vec![], None).await.expect("put");
    s.put("/o/before", vec![], None).await.expect("put");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = s
            .range_page("/p/", after.as_deref(), 10)
            .await
            .expect("page");
        pages += 1;
        assert!(page.kvs.len() <= 10);
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..25).map(|i| format!("/p/{i:02}")).collect();
    assert_eq!(seen, want);
    // An exact fit says there is no more.
    let page = s.range_page("/p/", Some("/p/14"), 10).await.expect("page");
    assert_eq!(page.kvs.len(), 10);
    assert!(!page.more);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn revisions_and_compare_and_swap(s: &dyn Store) {
    {
        let r1 = s.put("/a", b"1".to_vec(), Some(0)).await.expect("put");
        assert!(r1.succeeded);
        assert_eq!(r1.revision, 1);
        // Creating again with "must not exist" fails and does not bump the revision.
        let r = s.put("/a", b"x".to_vec(), Some(0)).await.expect("put");
        assert!(!r.succeeded);
        assert_eq!(s.revision().await.expect("rev"), 1);
        // Updating with the right mod revision works; with a stale one it fails.
        assert!(
            s.put("/a", b"2".to_vec(), Some(1))
                .await
                .expect("put")
                .succeeded
        );
        assert!(
            !s.put("/a", b"3".to_vec(), Some(1))
                .await
                .expect("put")
                .succeeded
        );
        let kv = s.get("/a").await.expect("get").expect("exists");
        assert_eq!(kv.value, b"2");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        // A multi-key transaction gets one revision.
        let t = s
            .txn(Txn {
                compares: vec![Compare {
                    key: "/a".into(),
                    mod_revision: 2,
                }],
                ops: vec![
                    Op::Put {
                        key: "/b".into(),
                        value: b"b".to_vec(),
                    },
                    Op::Delete { key: "/a".into() },
                ],
            })
            .await
            .expect("txn");
        assert!(t.succeeded);
        assert_eq!(t.revision, 3);
        let range = s.range("/").await.expect("range");
        assert_eq!(range.revision, 3);
        assert_eq!(range.kvs.len(), 1);
        assert_eq!(range.kvs[0].key, "/b");
        // Bad keys are refused.
        assert!(matches!(
            s.put("", vec![], None).await,
            Err(StoreError::InvalidKey { .. })
        ));
    }
}

#[test]
fn survives_reopen_with_every_revision() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let s = SqliteStore::open(&path).expect("open");
            for i in 0..50 {
                s.put(&format!("/k/{}", i % 7), vec![i as u8], None)
                    .await
                    .expect("put");
            }
            s.delete("/k/3", None).await.expect("delete");
        }
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.revision().await.expect("rev"), 51);
        assert_eq!(s.range("/k/").await.expect("range").kvs.len(), 6);
        // History is still there to watch from.
        let mut w = s.watch("/k/", 45).await.expect("watch");
        let mut seen = Vec::new();
        while seen.len() < 7 {
            let b = w.recv().await.expect("open").expect("ok");
            seen.push(b.revision);
        }
        assert_eq!(seen, (45..=51).collect::<Vec<_>>());
    });
}

async fn compacted_history_is_a_clear_error(s: &dyn Store) {
    {
        for i in 0..10u8 {
            s.put("/x", vec![i], None).await.expect("put");
        }
        s.compact(8).await.expect("compact");
        let err = s.watch("/", 3).await.expect_err("compacted");
        assert!(matches!(
            err,
            StoreError::Compacted {
                requested: 3,
                compact_revision: 8
            }
        ));
        assert!(err.to_string().contains("list again"));
        // From the compaction point itself, history is complete, with prev_kv.
        let mut w = s.watch("/", 8).await.expect("watch");
        let b = w.recv().await.expect("open").expect("ok");
        assert_eq!(b.revision, 8);
        assert_eq!(
            b.events[0].prev_kv.as_ref().map(|p| p.mod_revision),
            Some(7)
        );
    }
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(u8, u8),
    Delete(u8),
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (0u8..6, any::<u8>()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        1 => (0u8..6).prop_map(ModelOp::Delete),
    ]
}

type Expected = Vec<(u64, String, EventKind, Vec<u8>)>;

async fn run_ops(
    s: &dyn Store,
    ops: &[ModelOp],
    expected: &mut Expected,
    live: &mut std::collections::BTreeMap<String, u8>,
) {
    for op in ops {
        match op {
            ModelOp::Put(k, v) => {
                let key = format!("/k/{k}");
                let r = s.put(&key, vec![*v], None).await.expect("put");
                expected.push((r.revision, key.clone(), EventKind::Put, vec![*v]));
                live.insert(key, *v);
            }
            ModelOp::Delete(k) => {
                let key = format!("/k/{k}");
                let r = s.delete(&key, None).await.expect("delete");
                if let Some(old) = live.remove(&key) {
                    expected.push((r.revision, key, EventKind::Delete, vec![old]));
                }
            }
        }
    }
}

/// A watch started at any revision sees every later change under its prefix exactly
/// once and in order, whether the change was committed before the watch started
/// (history replay) or after (live), and deletes carry the deleted value.
async fn watch_sees_every_change_once(
    s: &dyn Store,
    ops: &[ModelOp],
    split: usize,
    start_pick: usize,
    prefix_all: bool,
) {
    let prefix = if prefix_all { "/" } else { "/k/1" };
    // Expected changes: (revision, key, kind, value)
    let mut expected: Expected = Vec::new();
    let mut live = std::collections::BTreeMap::new();
    let split = split.min(ops.len());
    run_ops(s, &ops[..split], &mut expected, &mut live).await;
    let head = s.revision().await.expect("rev");
    let start = 1 + (start_pick as u64 % (head + 1));
    let mut w = s.watch(prefix, start).await.expect("watch");
    run_ops(s, &ops[split..], &mut expected, &mut live).await;
    let last = s.revision().await.expect("rev");
    let want: Vec<_> = expected
        .into_iter()
        .filter(|(rev, key, _, _)| *rev >= start && key.starts_with(prefix))
        .collect();
    let mut got = Vec::new();
    let mut last_rev = 0;
    // Drain until every revision up to `last` has passed (or nothing more can come).
    while got.len() < want.len() {
        let b = tokio::time::timeout(std::time::Duration::from_secs(10), w.recv())
            .await
            .expect("watch stalled")
            .expect("watch open")
            .expect("watch ok");
        assert!(b.revision > last_rev, "revisions must increase");
        assert!(b.revision <= last);
        last_rev = b.revision;
        for e in b.events {
            let value = match e.kind {
                EventKind::Put => e.kv.value.clone(),
                EventKind::Delete => e.prev_kv.expect("delete carries prev_kv").value,
            };
            got.push((e.kv.mod_revision, e.kv.key, e.kind, value));
        }
    }
    // Nothing extra arrives afterwards.
    let extra = tokio::time::timeout(std::time::Duration::from_millis(50), w.recv()).await;
    assert!(extra.is_err(), "unexpected extra event: {extra:?}");
    assert_eq!(got, want);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn watch_from_any_revision_sees_every_change_once_sqlite(
        ops in proptest::collection::vec(model_op(), 1..60),
        split in 0usize..60,
        start_pick in 0usize..1000,
        prefix_all in any::<bool>(),
    ) {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = SqliteStore::open(dir.path().join("db")).expect("open");
            watch_sees_every_change_once(&s, &ops, split, start_pick, prefix_all).await
        });
    }

    #[test]
    fn watch_from_any_revision_sees_every_change_once_memory(
        ops in proptest::collection::vec(model_op(), 1..60),
        split in 0usize..60,
        start_pick in 0usize..1000,
        prefix_all in any::<bool>(),
    ) {
        rt().block_on(watch_sees_every_change_once(
            &MemoryStore::new(), &ops, split, start_pick, prefix_all,
        ));
    }
}
