//! The store contract ([`verge_store::conformance`]) on the SQLite and in-memory
//! backends, plus what only a durable backend promises (surviving a reopen).

use verge_store::{SqliteStore, Store, StoreExt};

mod sqlite_backend {
    verge_store::conformance_tests!(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = verge_store::SqliteStore::open(dir.path().join("db")).expect("open");
        (dir, s)
    });
}

mod memory_backend {
    verge_store::conformance_tests!(async { ((), verge_store::MemoryStore::new()) });
}

#[test]
fn survives_reopen_with_every_revision() {
    verge_store::conformance::rt().block_on(async {
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

/// A lease and its keys survive a reopen (with a full TTL again, as etcd gives them
/// after a leader change), and still go when it ends.
#[test]
fn leases_survive_reopen() {
    verge_store::conformance::rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let lease = {
            let s = SqliteStore::open(&path).expect("open");
            let l = s
                .lease_grant(std::time::Duration::from_secs(60))
                .await
                .expect("grant");
            s.txn(verge_store::Txn {
                compares: vec![],
                ops: vec![verge_store::Op::Put {
                    key: "/l".into(),
                    value: vec![1],
                    lease: Some(l.id),
                }],
            })
            .await
            .expect("put");
            l.id
        };
        let s = SqliteStore::open(&path).expect("reopen");
        s.lease_keep_alive(lease).await.expect("still there");
        assert!(s.get("/l").await.expect("get").is_some());
        s.lease_revoke(lease).await.expect("revoke");
        assert!(s.get("/l").await.expect("get").is_none());
    });
}
