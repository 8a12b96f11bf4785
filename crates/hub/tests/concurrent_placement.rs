//! Two hubs scheduling against one store at the same time never over-commit a node:
//! placements commit with compare-and-swap against the inventory ledgers.

use std::sync::Arc;

use proptest::prelude::*;
use verge_api::{Bytes, Cpu, Instance, InstanceSpec, NodePhase, NodeSpec, Object, ProcessSpec};
use verge_hub::HubConfig;
use verge_hub::controllers::schedule_pass;
use verge_hub::inventory;
use verge_hub::objects::Objects;
use verge_hub::state::HubState;
use verge_store::{SqliteStore, Store};
use verge_tunnel::pki::CertAuthority;

fn hub(
    store: Arc<dyn Store>,
    ca: &CertAuthority,
    dir: &std::path::Path,
    shard: Option<(u32, u32)>,
) -> Arc<HubState> {
    let mut config = HubConfig::new("127.0.0.1:0".parse().expect("addr"), dir);
    config.scheduler_shard = shard;
    HubState::new(Objects::new(store), ca.clone(), config)
}

async fn setup(objects: &Objects, nodes: &[(u64, u64)], instances: &[(u64, u64)]) {
    for (i, (cpu, mem)) in nodes.iter().enumerate() {
        let mut n = Object::<NodeSpec>::new(format!("n{i}"), NodeSpec::default());
        n.metadata.labels.insert("region".into(), "eu".into());
        objects.create(n).await.expect("node");
        objects
            .update_status::<NodeSpec>(&format!("n{i}"), |_, s| {
                s.phase = NodePhase::Ready;
                s.allocatable.cpu = Cpu(*cpu);
                s.allocatable.memory = Bytes(*mem << 20);
                Ok(true)
            })
            .await
            .expect("status");
    }
    for (k, (cpu, mem)) in instances.iter().enumerate() {
        let mut spec = InstanceSpec {
            process: Some(ProcessSpec {
                command: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        spec.resources.cpu = Cpu(*cpu);
        spec.resources.memory = Bytes(*mem << 20);
        objects
            .create(Instance::new(format!("i{k}"), spec))
            .await
            .expect("instance");
    }
}

fn check_invariants(
    nodes: &[(u64, u64)],
    all: &[Instance],
    ledgers: &std::collections::BTreeMap<String, inventory::Versioned<inventory::Ledger>>,
) {
    for (i, (cpu, mem)) in nodes.iter().enumerate() {
        let name = format!("n{i}");
        let bound: Vec<&Instance> = all
            .iter()
            .filter(|x| x.status.node.as_deref() == Some(name.as_str()))
            .collect();
        let used_cpu: u64 = bound.iter().map(|x| x.spec.resources.cpu.0).sum();
        let used_mem: u64 = bound.iter().map(|x| x.spec.resources.memory.0).sum();
        assert!(used_cpu <= *cpu, "node {name}: {used_cpu}m bound > {cpu}m");
        assert!(used_mem <= mem << 20, "node {name}: memory over-committed");
        let ledger = &ledgers[&name].value;
        let mut in_ledger: Vec<&str> = ledger.allocations.keys().map(String::as_str).collect();
        let mut bound_names: Vec<&str> = bound.iter().map(|x| x.name()).collect();
        in_ledger.sort();
        bound_names.sort();
        assert_eq!(
            in_ledger, bound_names,
            "ledger of {name} disagrees with the bindings"
        );
        assert!(ledger.allocated().within(&ledger.capacity));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Many workers commit placements planned from one and the same (soon stale)
    /// snapshot of the ledgers, all at once: the compare-and-swap lets exactly the
    /// consistent ones through.
    #[test]
    fn workers_committing_from_a_stale_snapshot_never_over_commit(
        nodes in proptest::collection::vec((500u64..4000, 64u64..2048), 1..4),
        instances in proptest::collection::vec((100u64..2000, 16u64..1024), 2..30),
        workers in 2usize..6,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async {
            verge_tunnel::install_crypto_provider();
            let dir = tempfile::tempdir().expect("tmp");
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("db")).expect("store"));
            let ca = CertAuthority::generate("t").expect("ca");
            let st = hub(store.clone(), &ca, dir.path(), None);
            setup(&st.objects, &nodes, &instances).await;
            let (ns, _) = st.objects.list::<NodeSpec>().await.expect("nodes");
            let (is, _) = st.objects.list::<InstanceSpec>().await.expect("instances");
            let empty = Default::default();
            inventory::reconcile(&st.objects, &ns, &is, &empty).await.expect("ledgers");
            for _round in 0..4 {
                let snapshot = Arc::new(inventory::ledgers(store.as_ref()).await.expect("ledgers"));
                let (pending, _) = st.objects.list::<InstanceSpec>().await.expect("list");
                let pending: Vec<Instance> = pending.into_iter().filter(|i| i.status.node.is_none()).collect();
                let barrier = Arc::new(tokio::sync::Barrier::new(workers));
                let mut tasks = Vec::new();
                for w in 0..workers {
                    let (st, snapshot, barrier) = (st.clone(), snapshot.clone(), barrier.clone());
                    let mine: Vec<Instance> = pending.iter().skip(w).step_by(workers).cloned().collect();
                    tasks.push(tokio::spawn(async move {
                        barrier.wait().await;
                        for inst in mine {
                            // First fit against the snapshot, blind to the other workers.
                            let amount = inventory::Amount::of_instance(&inst);
                            let Some(node) = snapshot.values().find(|l| l.value.fits(&amount)).map(|l| l.value.node.clone()) else { continue };
                            let b = inventory::Binding { instance: inst, node, note: String::new(), from: None };
                            // A copy, so that the worker stays on the stale versions.
                            let mut stale = (*snapshot).clone();
                            let _ = inventory::commit(&st.objects, &mut stale, &[b], "worker").await;
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("worker");
                }
            }
            let (all, _) = st.objects.list::<InstanceSpec>().await.expect("list");
            let placed = all.iter().filter(|i| i.status.node.is_some()).count();
            let any_fits = instances.iter().any(|(c, m)| nodes.iter().any(|(nc, nm)| c <= nc && m <= nm));
            assert!(placed > 0 || !any_fits, "nothing got through although something fits");
            check_invariants(&nodes, &all, &inventory::ledgers(store.as_ref()).await.expect("ledgers"));
        });
    }

    #[test]
    fn two_hubs_racing_never_over_commit(
        nodes in proptest::collection::vec((500u64..4000, 64u64..2048), 1..5),
        instances in proptest::collection::vec((100u64..2000, 16u64..1024), 1..25),
        sharded in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async {
            verge_tunnel::install_crypto_provider();
            let dir = tempfile::tempdir().expect("tmp");
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("db")).expect("store"));
            let ca = CertAuthority::generate("t").expect("ca");
            // Sharded, the two schedulers plan different instances onto the same nodes
            // from the same view: only the ledger's compare-and-swap keeps them honest.
            let (sa, sb) = if sharded { (Some((0, 2)), Some((1, 2))) } else { (None, None) };
            let a = hub(store.clone(), &ca, dir.path(), sa);
            let b = hub(store.clone(), &ca, dir.path(), sb);
            setup(&a.objects, &nodes, &instances).await;
            // Both schedulers run passes at the same time, repeatedly.
            for _ in 0..6 {
                let (ra, rb) = tokio::join!(schedule_pass(&a, None, true), schedule_pass(&b, None, true));
                ra.expect("pass a");
                rb.expect("pass b");
            }
            // Then let one settle whatever the race left for the next pass.
            for _ in 0..3 {
                schedule_pass(&a, None, true).await.expect("settle");
                schedule_pass(&b, None, true).await.expect("settle");
            }
            let (all, _) = a.objects.list::<InstanceSpec>().await.expect("list");
            check_invariants(&nodes, &all, &inventory::ledgers(store.as_ref()).await.expect("ledgers"));
            // Whatever is still pending says why it fits nowhere.
            for x in all.iter().filter(|x| x.status.node.is_none()) {
                assert!(x.status.message.contains("nodes fit"), "pending without a reason: {} {:?}", x.name(), x.status);
            }
        });
    }
}

/// The audit trail is bounded: pruning keeps exactly the newest events.
#[test]
fn audit_pruning_keeps_the_newest_events() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tmp");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join("db")).expect("store"));
        for i in 0..5 {
            let ev = inventory::AuditEvent::new(
                "test",
                "reserve",
                "n0",
                Some(&format!("i{i}")),
                None,
                "test",
            );
            store
                .txn(verge_store::Txn {
                    compares: vec![],
                    ops: vec![ev.op()],
                })
                .await
                .expect("write");
        }
        inventory::prune_audit(store.as_ref(), 2)
            .await
            .expect("prune");
        let left = inventory::audit(store.as_ref(), 100).await.expect("audit");
        let names: Vec<_> = left.iter().filter_map(|e| e.instance.clone()).collect();
        assert_eq!(names, vec!["i3".to_string(), "i4".to_string()]);
    });
}
