//! The store contract on a real etcd (Debian's etcd-server, started here on loopback):
//! one member, and a three-member cluster. Each test gets a fresh namespace of its
//! own server.

use verge_store_etcd::{EtcdConfig, EtcdStore};
use verge_testkit::etcd::EtcdCluster;

/// A store in a fresh namespace of `cluster`.
async fn open(cluster: &EtcdCluster) -> EtcdStore {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    EtcdStore::connect(&EtcdConfig {
        endpoints: cluster.endpoints(),
        namespace: format!("/t{}-{n}", std::process::id()),
        ..EtcdConfig::default()
    })
    .await
    .expect("connect to etcd")
}

mod one_member {
    use super::*;
    static CLUSTER: std::sync::LazyLock<EtcdCluster> =
        std::sync::LazyLock::new(|| EtcdCluster::start(1));
    verge_store::conformance_tests!(async { ((), open(&CLUSTER).await) });
}

mod three_members {
    use super::*;
    static CLUSTER: std::sync::LazyLock<EtcdCluster> =
        std::sync::LazyLock::new(|| EtcdCluster::start(3));
    verge_store::conformance_tests!(async { ((), open(&CLUSTER).await) });
}
