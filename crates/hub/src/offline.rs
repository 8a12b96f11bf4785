//! The offline side of the scheduling centre, on demand: fragmentation by region and
//! site, a bounded defragmentation plan, and executing it (migrations committed with
//! CAS against the ledgers, like any placement).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use verge_api::{ApiError, Instance, InstancePhase, InstanceSpec, NodeSpec, RegionSpec};
use verge_sched::{Alloc, Budget, FragReport, Shape};

use crate::inventory::{self, Binding, Totals};
use crate::placement;
use crate::state::HubState;

/// What the operator asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanRequest {
    /// At most this many migrations.
    #[serde(default = "ten")]
    pub max_moves: usize,
    /// At most this many migrations of one group (application): the disruption budget.
    #[serde(default = "two")]
    pub max_moves_per_group: usize,
    /// Carry the plan out.
    #[serde(default)]
    pub apply: bool,
}

fn ten() -> usize {
    10
}
fn two() -> usize {
    2
}

impl Default for PlanRequest {
    fn default() -> Self {
        Self {
            max_moves: 10,
            max_moves_per_group: 2,
            apply: false,
        }
    }
}

/// Fragmentation summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FragSummary {
    /// Stranded / free CPU.
    pub ratio: f64,
    /// Free CPU, millicores.
    pub free_cpu: u64,
    /// Stranded CPU, millicores.
    pub stranded_cpu: u64,
    /// Nodes with nothing on them.
    pub empty_nodes: u64,
    /// Ratio by region.
    pub by_region: BTreeMap<String, f64>,
    /// Ratio by site.
    pub by_site: BTreeMap<String, f64>,
    /// Ratio by node.
    pub by_node: BTreeMap<String, f64>,
}

impl From<&FragReport> for FragSummary {
    fn from(r: &FragReport) -> Self {
        Self {
            ratio: r.total.ratio(),
            free_cpu: r.total.free_cpu,
            stranded_cpu: r.total.stranded_cpu,
            empty_nodes: r.total.empty_nodes,
            by_region: r
                .by_region
                .iter()
                .map(|(k, v)| (k.clone(), v.ratio()))
                .collect(),
            by_site: r
                .by_site
                .iter()
                .map(|(k, v)| (k.clone(), v.ratio()))
                .collect(),
            by_node: r
                .by_node
                .iter()
                .map(|(k, v)| (k.clone(), v.ratio()))
                .collect(),
        }
    }
}

/// One migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// Instance.
    pub instance: String,
    /// From node.
    pub from: String,
    /// To node.
    pub to: String,
}

/// `verge sched report`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedReport {
    /// Capacity, allocated and free by region.
    pub capacity_by_region: BTreeMap<String, Totals>,
    /// Fragmentation now.
    pub before: FragSummary,
    /// Fragmentation after the plan.
    pub after: FragSummary,
    /// The plan.
    pub migrations: Vec<Migration>,
    /// Nodes the plan empties.
    pub nodes_freed: Vec<String>,
    /// Migrations carried out (with `apply`).
    pub applied: usize,
}

/// The workload mix: shapes of what the ledgers hold.
pub fn shapes_of(
    ledgers: &BTreeMap<String, inventory::Versioned<inventory::Ledger>>,
) -> Vec<Shape> {
    let res: Vec<verge_sched::Res> = ledgers
        .values()
        .flat_map(|l| l.value.allocations.values())
        .map(|a| verge_sched::Res::cpu_mem(a.amount.cpu, a.amount.memory))
        .collect();
    verge_sched::shapes(res.iter())
}

/// Plan (and with `apply`, execute) a defragmentation.
pub async fn plan(st: &HubState, req: &PlanRequest) -> Result<SchedReport, ApiError> {
    let store = st.objects.store().clone();
    let (nodes, _) = st.objects.list::<NodeSpec>().await?;
    let (instances, _) = st.objects.list::<InstanceSpec>().await?;
    let (regions, _) = st.objects.list::<RegionSpec>().await?;
    let mut ledgers = inventory::ledgers(store.as_ref()).await?;
    let by_name: BTreeMap<&str, &Instance> = instances.iter().map(|i| (i.name(), i)).collect();
    let placement::View { mut cluster, names } = placement::view(&nodes, &regions, &ledgers);
    let index: BTreeMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut allocs = Vec::new();
    for l in ledgers.values() {
        let Some(&node) = index.get(l.value.node.as_str()) else {
            continue;
        };
        for name in l.value.allocations.keys() {
            let Some(inst) = by_name.get(name.as_str()) else {
                continue;
            };
            allocs.push(Alloc {
                id: name.clone(),
                node,
                req: placement::request(&mut cluster, inst),
                movable: inst.spec.placement.movable
                    && matches!(
                        inst.status.phase,
                        InstancePhase::Running | InstancePhase::Scheduled | InstancePhase::Starting
                    ),
            });
        }
    }
    let plan = verge_sched::defrag_plan(
        &cluster,
        &allocs,
        Budget {
            max_moves: req.max_moves,
            max_moves_per_group: req.max_moves_per_group.max(1),
        },
    );
    let migrations: Vec<Migration> = plan
        .moves
        .iter()
        .map(|m| Migration {
            instance: m.id.clone(),
            from: names[m.from as usize].clone(),
            to: names[m.to as usize].clone(),
        })
        .collect();
    let mut applied = 0;
    if req.apply {
        for m in &migrations {
            // Re-read the instance: it must still be where the plan found it.
            let inst = st.objects.get::<InstanceSpec>(&m.instance).await?;
            if inst.status.node.as_deref() != Some(m.from.as_str()) {
                continue;
            }
            let b = Binding {
                instance: inst,
                node: m.to.clone(),
                note: format!("moved by defragmentation from {}", m.from),
                from: Some(m.from.clone()),
            };
            match inventory::commit(&st.objects, &mut ledgers, &[b], "defrag").await {
                Ok(_) => applied += 1,
                Err(e) => {
                    tracing::warn!(?e, instance = %m.instance, "migration not applied; stopping the plan");
                    break;
                }
            }
        }
        st.schedule_kick.notify_one();
    }
    Ok(SchedReport {
        capacity_by_region: inventory::report(&nodes, &ledgers).by_region,
        before: FragSummary::from(&plan.before),
        after: FragSummary::from(&plan.after),
        migrations,
        nodes_freed: plan
            .nodes_freed
            .iter()
            .map(|n| names[*n as usize].clone())
            .collect(),
        applied,
    })
}
