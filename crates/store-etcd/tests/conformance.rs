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

/// The cluster the property tests share, or the end of this test process: a start
/// that fails has printed why, and a poisoned static would make every case proptest
/// tries (and shrinks) panic again with a backtrace each, burying that reason under
/// megabytes of output.
fn shared_cluster(members: usize) -> EtcdCluster {
    std::panic::catch_unwind(|| EtcdCluster::start(members)).unwrap_or_else(|_| {
        eprintln!("the etcd test cluster did not start (above: why); ending this test");
        std::process::exit(101)
    })
}

mod one_member {
    use super::*;
    static CLUSTER: std::sync::LazyLock<EtcdCluster> =
        std::sync::LazyLock::new(|| shared_cluster(1));
    verge_store::conformance_tests!(async { ((), open(&CLUSTER).await) });
}

mod three_members {
    use super::*;
    static CLUSTER: std::sync::LazyLock<EtcdCluster> =
        std::sync::LazyLock::new(|| shared_cluster(3));
    verge_store::conformance_tests!(async { ((), open(&CLUSTER).await) });
}

/// With etcd's authentication on, the store connects as a user with a password, and a
/// wrong password is an error at connect that says so.
#[test]
fn connects_with_a_user_and_password() {
    let cluster = EtcdCluster::start(1);
    let endpoint = cluster.endpoints().join(",");
    for args in [vec!["user", "add", "root:s3cret"], vec!["auth", "enable"]] {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&endpoint)
            .args(&args)
            .output()
            .expect("etcdctl (Debian's etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    verge_store::conformance::rt().block_on(async {
        let config = |password: &str| EtcdConfig {
            endpoints: cluster.endpoints(),
            namespace: "/auth".into(),
            user: Some(("root".into(), password.into())),
            ..EtcdConfig::default()
        };
        let s = EtcdStore::connect(&config("s3cret"))
            .await
            .expect("connect as root");
        verge_store::conformance::revisions_and_compare_and_swap(&s).await;
        let wrong = EtcdStore::connect(&config("wrong")).await;
        let e = wrong
            .err()
            .expect("a wrong password is refused")
            .to_string();
        assert!(
            e.contains("authentication failed") || e.contains("invalid"),
            "{e}"
        );
    });
}

/// Over TLS with client-certificate authentication (what a production etcd should
/// ask for): the store connects with the CA and a client certificate, and without
/// the certificate it is refused.
#[test]
fn connects_over_tls_with_a_client_certificate() {
    let cluster = EtcdCluster::start_tls(1);
    let tls = cluster.tls.clone().expect("TLS files");
    verge_store::conformance::rt().block_on(async {
        let mut config = EtcdConfig::from_url(&format!("{}/tls", cluster.url())).expect("url");
        config.ca_pem = Some(tls.ca_pem.clone());
        config.client_cert_pem = Some((tls.cert_pem.clone(), tls.key_pem.clone()));
        let s = EtcdStore::connect(&config).await.expect("connect over TLS");
        verge_store::conformance::revisions_and_compare_and_swap(&s).await;
        config.client_cert_pem = None;
        let refused = EtcdStore::connect(&config).await;
        assert!(
            refused.is_err(),
            "a client without a certificate is refused"
        );
    });
}
