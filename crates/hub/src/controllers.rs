//! Control loops: node lifecycle, placement, and history compaction.
//!
//! Each loop reads the store, plans with pure functions (`verge_sched`), and writes
//! its decisions back with compare-and-swap, so that a loop racing an operator's
//! `apply` or another hub never overwrites a newer change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use verge_api::clock::{now_secs, parse_rfc3339};
use verge_api::{InstancePhase, InstanceSpec, NodePhase, NodeSpec};
use verge_sched::{NodeInfo, Request, first_fit};

use crate::state::HubState;

/// Mark nodes NotReady when their heartbeats stop.
pub async fn node_lifecycle(st: Arc<HubState>) {
    let grace = st.config.node_grace;
    let started = now_secs();
    let period = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Ok((nodes, _)) = st.objects.list::<NodeSpec>().await else {
            continue;
        };
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for n in &nodes {
            *counts.entry(n.status.phase.to_string()).or_default() += 1;
            if n.status.phase != NodePhase::Ready {
                continue;
            }
            // After a hub restart, give every edge a full grace period to reconnect.
            let last = n
                .status
                .last_heartbeat
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(0)
                .max(started);
            let silent = now_secs().saturating_sub(last);
            if silent <= grace.as_secs() {
                continue;
            }
            let r = st
                .objects
                .update_status::<NodeSpec>(n.name(), |_, s| {
                    if s.phase != NodePhase::Ready || s.last_heartbeat != n.status.last_heartbeat {
                        return Ok(false);
                    }
                    s.phase = NodePhase::NotReady;
                    s.message = format!(
                        "no heartbeat for {silent}s (grace {}s): the edge is down or cut off from the hub",
                        grace.as_secs()
                    );
                    Ok(true)
                })
                .await;
            if r.is_ok() {
                tracing::warn!(node = %n.name(), silent, "node is NotReady");
            }
        }
        for phase in ["Ready", "NotReady"] {
            st.metrics
                .nodes
                .get_or_create(&vec![("phase".into(), phase.into())])
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }
}

/// Place pending instances. Runs when kicked (any change) and every few seconds.
pub async fn scheduler(st: Arc<HubState>) {
    loop {
        tokio::select! {
            _ = st.schedule_kick.notified() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if let Err(e) = schedule_pass(&st).await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
    }
}

/// One pass: bind every pending instance that fits, explain the ones that do not.
pub async fn schedule_pass(st: &HubState) -> Result<(), verge_api::ApiError> {
    let (nodes, _) = st.objects.list::<NodeSpec>().await?;
    let (instances, _) = st.objects.list::<InstanceSpec>().await?;
    let mut infos: Vec<NodeInfo> = nodes.iter().map(NodeInfo::from_node).collect();
    let index: BTreeMap<String, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let mut phases: BTreeMap<String, i64> = BTreeMap::new();
    let mut pending = Vec::new();
    for inst in &instances {
        *phases.entry(inst.status.phase.to_string()).or_default() += 1;
        match &inst.status.node {
            Some(node) => {
                let done = matches!(
                    inst.status.phase,
                    InstancePhase::Succeeded | InstancePhase::Failed
                );
                if let (false, Some(&i)) = (done, index.get(node)) {
                    infos[i].reserve(&Request::from_instance(inst));
                }
            }
            None => pending.push(inst),
        }
    }
    for (phase, n) in phases {
        st.metrics
            .instances
            .get_or_create(&vec![("phase".into(), phase)])
            .set(n);
    }
    // Oldest first, so that a stream of new instances cannot starve an old one.
    pending.sort_by(|a, b| {
        a.metadata
            .creation_time
            .cmp(&b.metadata.creation_time)
            .then(a.name().cmp(b.name()))
    });
    for inst in pending {
        let req = Request::from_instance(inst);
        let revision = inst.metadata.revision;
        match first_fit(&infos, &req) {
            Ok(i) => {
                let node = infos[i].name.clone();
                let r = st
                    .objects
                    .update_status::<InstanceSpec>(inst.name(), |obj, s| {
                        // Only bind the version we planned for; otherwise the next pass decides.
                        if obj.metadata.revision != revision || s.node.is_some() {
                            return Ok(false);
                        }
                        s.node = Some(node.clone());
                        s.phase = InstancePhase::Scheduled;
                        s.message = String::new();
                        Ok(true)
                    })
                    .await;
                if let Ok(obj) = r
                    && obj.status.node.as_deref() == Some(node.as_str())
                {
                    infos[i].reserve(&req);
                    st.metrics.placements.inc();
                    tracing::info!(instance = %inst.name(), %node, "scheduled");
                }
            }
            Err(why) => {
                let message = why.to_string();
                if inst.status.message != message {
                    let _ = st
                        .objects
                        .update_status::<InstanceSpec>(inst.name(), |obj, s| {
                            if obj.metadata.revision != revision || s.node.is_some() {
                                return Ok(false);
                            }
                            s.phase = InstancePhase::Pending;
                            s.message = message.clone();
                            Ok(true)
                        })
                        .await;
                }
            }
        }
    }
    Ok(())
}

/// Keep the store's history bounded: compact all but the last `history_revisions`.
pub async fn compaction(st: Arc<HubState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(300));
    loop {
        tick.tick().await;
        let store = st.objects.store();
        let Ok(rev) = store.revision().await else {
            continue;
        };
        let keep = st.config.history_revisions;
        if rev > keep
            && let Err(e) = store.compact(rev - keep).await
        {
            tracing::warn!(error = %e, "compaction failed");
        }
    }
}
