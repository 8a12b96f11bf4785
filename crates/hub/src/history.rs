//! Epochs of the store's history, so that an edge never resumes from a revision this
//! store did not write.
//!
//! Revisions are only comparable within one history. A hub restored from a backup
//! goes back to an older revision and then writes new, different revisions under the
//! same numbers; an edge that cached revision 144 from before the restore must not
//! resume from 144 of the new history. So each hub start begins an *epoch*: a key
//! under [`EPOCH_PREFIX`] whose create revision marks where it began. An edge keeps
//! the epoch in which its revision was last confirmed (by a snapshot or by a resumed
//! sync). It may resume only if this store knows that epoch and its revision is
//! below the start of the epoch that followed it (a restore loses the later epochs and
//! starts a new one at the restored revision), and not above the store's revision.
//! Anything else gets a snapshot. A store that never saw the epoch (another store
//! altogether) gives a snapshot too.

use verge_store::{Op, Store, StoreError, Txn};

/// Where epochs are kept, one key each.
pub const EPOCH_PREFIX: &str = "/verge/epochs/";

/// Begin a new epoch; returns its id.
pub async fn begin(store: &dyn Store) -> Result<String, StoreError> {
    let b: [u8; 12] = rand::random();
    let id = verge_tunnel::pki::hex(&b);
    store
        .txn(Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: format!("{EPOCH_PREFIX}{id}"),
                value: verge_api::clock::now_rfc3339().into_bytes(),
                lease: None,
            }],
        })
        .await?;
    Ok(id)
}

/// Join the store's current epoch (the newest), or begin one if it has none: what a
/// replica does on a store other replicas share, where every start beginning an epoch
/// would send every edge a snapshot after each replica restart. After restoring a
/// shared store from a backup, start one hub with `--new-epoch`.
pub async fn join(store: &dyn Store) -> Result<String, StoreError> {
    let epochs = store.range(EPOCH_PREFIX).await?;
    match epochs.kvs.iter().max_by_key(|kv| kv.create_revision) {
        Some(kv) => Ok(kv.key.trim_start_matches(EPOCH_PREFIX).to_string()),
        None => begin(store).await,
    }
}

/// Whether an edge at `since` (confirmed in `epoch`) may resume from there.
pub async fn can_resume(
    store: &dyn Store,
    epoch: Option<&str>,
    since: u64,
) -> Result<bool, StoreError> {
    let epochs = store.range(EPOCH_PREFIX).await?;
    if since > epochs.revision {
        return Ok(false);
    }
    let Some(epoch) = epoch else {
        // An edge from before epochs: only the revision can be checked.
        return Ok(true);
    };
    let start_of = |id: &str| {
        epochs
            .kvs
            .iter()
            .find(|kv| kv.key.strip_prefix(EPOCH_PREFIX) == Some(id))
            .map(|kv| kv.create_revision)
    };
    let Some(start) = start_of(epoch) else {
        return Ok(false);
    };
    let next = epochs
        .kvs
        .iter()
        .map(|kv| kv.create_revision)
        .filter(|r| *r > start)
        .min();
    Ok(next.is_none_or(|n| since < n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_store::{SqliteStore, StoreExt};

    #[tokio::test]
    async fn an_edge_resumes_only_from_revisions_of_this_history() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = SqliteStore::open(dir.path().join("s.db")).expect("store");
        let e1 = begin(&store).await.expect("e1");
        for i in 0..10 {
            store
                .put(&format!("/k/{i}"), b"v".to_vec(), None)
                .await
                .expect("put");
        }
        let at = store.revision().await.expect("rev");
        let e2 = begin(&store).await.expect("e2");
        // A plain restart: what the edge saw in e1 is still this history.
        assert!(can_resume(&store, Some(&e1), at,).await.expect("q"));
        assert!(can_resume(&store, Some(&e2), at + 1).await.expect("q"));
        // Ahead of the store, or from an epoch it never had: snapshot.
        assert!(!can_resume(&store, Some(&e2), at + 100).await.expect("q"));
        assert!(!can_resume(&store, Some("elsewhere"), 3).await.expect("q"));
        // A revision e1 never wrote (it was after e2 began): snapshot.
        for i in 0..5 {
            store
                .put(&format!("/k/{i}"), b"w".to_vec(), None)
                .await
                .expect("put");
        }
        let later = store.revision().await.expect("rev");
        assert!(!can_resume(&store, Some(&e1), later).await.expect("q"));
        assert!(can_resume(&store, None, later).await.expect("q"));
    }
}
