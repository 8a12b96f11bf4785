//! The store contract as a conformance suite that every backend runs
//! ([`conformance_tests!`](crate::conformance_tests)): revisions and compare-and-swap,
//! ranges in pages, watch from any revision (a property test), compaction, leases and
//! watch progress. Revisions are counted from wherever the store stands when a test
//! starts (etcd begins at 1, the embedded backends at 0), and every test keeps to its
//! own keys, so a backend may hand each test a fresh namespace of one server.

use std::time::Duration;

use proptest::prelude::*;

use crate::{Compare, EventKind, Op, Store, StoreError, StoreExt, Txn, WatchOptions};

#[doc(hidden)]
pub use proptest;

/// A runtime for one contract test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every test of the contract for one backend. `$open` is an async block that yields
/// `(guard, store)`: the guard (a temporary directory, a server) lives as long as the
/// test does.
#[macro_export]
macro_rules! conformance_tests {
    ($open:expr) => {
        $crate::conformance_tests!(@each $open;
            revisions_and_compare_and_swap,
            compacted_history_is_a_clear_error,
            ranges_come_in_pages_with_a_continuation,
            leases_take_their_keys_with_them,
            a_quiet_watch_hears_progress,
            a_range_larger_than_any_one_answer_comes_back_whole,
        );
        $crate::conformance::proptest::proptest! {
            #![proptest_config($crate::conformance::proptest::prelude::ProptestConfig {
                cases: 24, .. Default::default()
            })]
            #[test]
            fn watch_from_any_revision_sees_every_change_once(
                ops in $crate::conformance::proptest::collection::vec(
                    $crate::conformance::model_op(), 1..60),
                split in 0usize..60,
                start_pick in 0usize..1000,
                prefix_all in $crate::conformance::proptest::prelude::any::<bool>(),
            ) {
                $crate::conformance::rt().block_on(async {
                    let (_guard, s) = $open.await;
                    $crate::conformance::watch_sees_every_change_once(
                        &s, &ops, split, start_pick, prefix_all).await
                });
            }
        }
    };
    (@each $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::rt().block_on(async {
                    let (_guard, s) = $open.await;
                    $crate::conformance::$name(&s).await
                })
            }
        )*
    };
}

/// Paging through a prefix returns every key once, in order, and says when it is done;
/// keys outside the prefix never appear.
pub async fn ranges_come_in_pages_with_a_continuation(s: &dyn Store) {
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

/// A range of many keys and more bytes than one answer of a backend may carry (gRPC's
/// 4 MiB for etcd) comes back whole, in key order, at one revision.
pub async fn a_range_larger_than_any_one_answer_comes_back_whole(s: &dyn Store) {
    let value = vec![b'x'; 2048];
    let n = 2500;
    for chunk in (0..n).collect::<Vec<usize>>().chunks(100) {
        let ops = chunk
            .iter()
            .map(|i| Op::Put {
                key: format!("/big/{i:05}"),
                value: value.clone(),
                lease: None,
            })
            .collect();
        let r = s
            .txn(Txn {
                compares: Vec::new(),
                ops,
            })
            .await
            .expect("txn");
        assert!(r.succeeded);
    }
    let before = s.revision().await.expect("revision");
    let r = s.range("/big/").await.expect("a range of 5 MB");
    assert_eq!(r.kvs.len(), n);
    assert!(r.kvs.windows(2).all(|w| w[0].key < w[1].key), "key order");
    assert!(r.revision >= before);
    assert!(r.kvs.iter().all(|kv| kv.mod_revision <= r.revision));
}

/// Every write bumps one revision; compare-and-swap on modification revisions;
/// multi-key transactions; bad keys refused.
pub async fn revisions_and_compare_and_swap(s: &dyn Store) {
    {
        // etcd starts at revision 1, the embedded backends at 0: count from here.
        let base = s.revision().await.expect("rev");
        let r1 = s.put("/a", b"1".to_vec(), Some(0)).await.expect("put");
        assert!(r1.succeeded);
        assert_eq!(r1.revision, base + 1);
        // Creating again with "must not exist" fails and does not bump the revision.
        let r = s.put("/a", b"x".to_vec(), Some(0)).await.expect("put");
        assert!(!r.succeeded);
        assert_eq!(s.revision().await.expect("rev"), base + 1);
        // Updating with the right mod revision works; with a stale one it fails.
        assert!(
            s.put("/a", b"2".to_vec(), Some(base + 1))
                .await
                .expect("put")
                .succeeded
        );
        assert!(
            !s.put("/a", b"3".to_vec(), Some(base + 1))
                .await
                .expect("put")
                .succeeded
        );
        let kv = s.get("/a").await.expect("get").expect("exists");
        assert_eq!(kv.value, b"2");
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (base + 1, base + 2, 2)
        );
        // A multi-key transaction gets one revision.
        let t = s
            .txn(Txn {
                compares: vec![Compare {
                    key: "/a".into(),
                    mod_revision: base + 2,
                }],
                ops: vec![Op::put("/b", b"b".to_vec()), Op::delete("/a")],
            })
            .await
            .expect("txn");
        assert!(t.succeeded);
        assert_eq!(t.revision, base + 3);
        let range = s.range("/").await.expect("range");
        assert_eq!(range.revision, base + 3);
        assert_eq!(range.kvs.len(), 1);
        assert_eq!(range.kvs[0].key, "/b");
        // A few keys at once come back in the order asked, the missing as none.
        let each = s.get_each(&["/b", "/a", "/b"]).await.expect("get_each");
        assert_eq!(
            each.iter()
                .map(|kv| kv.as_ref().map(|kv| kv.value.as_slice()))
                .collect::<Vec<_>>(),
            vec![Some(&b"b"[..]), None, Some(&b"b"[..])]
        );
        assert!(s.get_each(&[]).await.expect("get_each").is_empty());
        // Bad keys are refused.
        assert!(matches!(
            s.put("", vec![], None).await,
            Err(StoreError::InvalidKey { .. })
        ));
    }
}

/// A watch from compacted history is a clear error that names the oldest revision
/// kept; from the compaction point on, history is whole.
pub async fn compacted_history_is_a_clear_error(s: &dyn Store) {
    {
        let base = s.revision().await.expect("rev");
        for i in 0..10u8 {
            s.put("/x", vec![i], None).await.expect("put");
        }
        s.compact(base + 8).await.expect("compact");
        let err = s.watch("/", base + 3).await.expect_err("compacted");
        assert!(
            matches!(
                err,
                StoreError::Compacted { requested, compact_revision }
                    if requested == base + 3 && compact_revision == base + 8
            ),
            "{err:?}"
        );
        assert_eq!(s.compact_revision().await.expect("compact"), base + 8);
        assert!(err.to_string().contains("list again"));
        // From the compaction point itself, history is complete; the previous value
        // of its first change may be gone with the compacted history (etcd drops it;
        // the embedded backends keep it), but if it is there it is the right one.
        let mut w = s.watch("/", base + 8).await.expect("watch");
        let b = w.recv().await.expect("open").expect("ok");
        assert_eq!(b.revision, base + 8);
        let prev = b.events[0].prev_kv.as_ref().map(|p| p.mod_revision);
        assert!(prev.is_none() || prev == Some(base + 7), "{prev:?}");
    }
}

/// One write of the watch property test.
#[derive(Debug, Clone)]
pub enum ModelOp {
    /// Put key N = value.
    Put(u8, u8),
    /// Delete key N.
    Delete(u8),
}

/// Random writes over a few keys, mostly puts.
pub fn model_op() -> impl Strategy<Value = ModelOp> {
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
pub async fn watch_sees_every_change_once(
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
    let base = s.revision().await.expect("rev");
    run_ops(s, &ops[..split], &mut expected, &mut live).await;
    let head = s.revision().await.expect("rev");
    let start = base + 1 + (start_pick as u64 % (head - base + 1));
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

/// Keys put with a lease live while it is kept alive and vanish, as deletes a watcher
/// sees, when it expires or is revoked; a key put again without the lease is no
/// longer its; an ended lease is refused.
pub async fn leases_take_their_keys_with_them(s: &dyn Store) {
    let ttl = Duration::from_secs(2);
    let leased = |key: &str, lease| Txn {
        compares: Vec::new(),
        ops: vec![Op::Put {
            key: key.into(),
            value: b"v".to_vec(),
            lease: Some(lease),
        }],
    };
    let a = s.lease_grant(ttl).await.expect("grant");
    assert_ne!(a.id, 0);
    assert!(a.ttl >= ttl);
    s.txn(leased("/l/a", a.id)).await.expect("put a");
    s.txn(leased("/l/moved", a.id)).await.expect("put moved");
    s.put("/l/moved", b"mine".to_vec(), None)
        .await
        .expect("detach");
    s.put("/l/plain", b"p".to_vec(), None).await.expect("plain");
    let mut w = s.watch("/l/", 0).await.expect("watch");
    // Kept alive across more than two TTLs, the key stays.
    for _ in 0..10 {
        tokio::time::sleep(ttl / 4).await;
        tokio::time::timeout(Duration::from_secs(5), s.lease_keep_alive(a.id))
            .await
            .expect("keep-alive answers")
            .expect("keep alive");
    }
    assert!(s.get("/l/a").await.expect("get").is_some(), "kept alive");
    // Left alone, it goes: one delete of /l/a, and nothing else.
    let b = tokio::time::timeout(ttl * 4, w.recv())
        .await
        .expect("the lease expires")
        .expect("open")
        .expect("ok");
    let deleted: Vec<_> = b
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str()))
        .collect();
    assert_eq!(deleted, vec![(EventKind::Delete, "/l/a")]);
    assert!(s.get("/l/moved").await.expect("get").is_some());
    assert!(matches!(
        s.lease_keep_alive(a.id).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        s.txn(leased("/l/late", a.id)).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(s.get("/l/late").await.expect("get").is_none());
    // Revoked, its keys go at once.
    let b = s.lease_grant(Duration::from_secs(60)).await.expect("grant");
    s.txn(leased("/l/b", b.id)).await.expect("put b");
    s.txn(leased("/l/c", b.id)).await.expect("put c");
    s.lease_revoke(b.id).await.expect("revoke");
    let left: Vec<String> = s
        .range("/l/")
        .await
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, vec!["/l/moved".to_string(), "/l/plain".to_string()]);
    s.lease_revoke(b.id).await.expect("revoking twice is fine");
}

/// A watch that asked for progress and hears nothing under its prefix is told how far
/// the store has got, so it can resume from there even after that history is
/// compacted away.
pub async fn a_quiet_watch_hears_progress(s: &dyn Store) {
    let options = WatchOptions {
        progress: Some(Duration::from_millis(300)),
    };
    let mut w = s.watch_with("/quiet/", 0, options).await.expect("watch");
    let mut last = 0;
    for i in 0..5u8 {
        last = s.put("/loud", vec![i], None).await.expect("put").revision;
    }
    let progressed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let b = w.recv().await.expect("open").expect("ok");
            assert!(b.is_progress(), "nothing under /quiet/ changed: {b:?}");
            if b.revision >= last {
                return b.revision;
            }
        }
    })
    .await
    .expect("progress arrives");
    assert_eq!(progressed, last, "progress never runs ahead of the store");
    s.compact(last).await.expect("compact");
    let mut resumed = s.watch("/quiet/", progressed + 1).await.expect("resume");
    let r = s
        .put("/quiet/now", vec![1], None)
        .await
        .expect("put")
        .revision;
    let b = resumed.recv().await.expect("open").expect("ok");
    assert_eq!((b.revision, b.events.len()), (r, 1));
}
