//! The orchestrator: keeps every Application's instances. [`plan`] is pure: given an
//! application, the clusters and the instances it owns, what to create, change and
//! delete, and its status. [`run`] carries plans out on the leader every [`EVERY`].
//!
//! An application's instances are one per replica, per component, per cluster its
//! placement picks, named `APP-COMPONENT-CLUSTER-N` and labelled with the application
//! (`app`, and `verge.io/application`, `/component`, `/cluster`), placed on the
//! cluster's nodes (the cluster's selector joins the template's node selector).
//! Overrides for a region or a cluster change replicas, image, environment or
//! resources there. A component waits in a cluster until every component it comes
//! `after` runs there. A lost replica is the instance's own business: its disconnect
//! policy replaces it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use verge_api::application::{ApplicationStatus, ClusterProgress};
use verge_api::{
    Application, ApplicationSpec, Cluster, ClusterSpec, Instance, InstancePhase, InstanceSpec,
};

use crate::cache::ControllerCache;
use crate::state::HubState;

/// How often applications are reconciled.
pub const EVERY: Duration = Duration::from_secs(2);
/// The label naming the application that owns an instance.
pub const APP_LABEL: &str = "verge.io/application";
/// The label naming its component.
pub const COMPONENT_LABEL: &str = "verge.io/component";
/// The label naming its cluster.
pub const CLUSTER_LABEL: &str = "verge.io/cluster";

/// What the orchestrator does for one application.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Instances to create.
    pub create: Vec<Instance>,
    /// Instances whose spec or labels change.
    pub update: Vec<Instance>,
    /// Instances to delete, by name.
    pub delete: Vec<String>,
    /// The application's status.
    pub status: ApplicationStatus,
}

/// The clusters `app` goes to.
pub fn clusters_for<'a>(app: &ApplicationSpec, clusters: &'a [Cluster]) -> Vec<&'a Cluster> {
    let p = &app.placement;
    clusters
        .iter()
        .filter(|c| {
            p.clusters.iter().any(|n| n == c.name())
                || (!p.cluster_selector.is_empty()
                    && p.cluster_selector
                        .iter()
                        .all(|(k, v)| c.metadata.labels.get(k) == Some(v)))
        })
        .filter(|c| {
            p.regions.is_empty()
                || c.status
                    .region
                    .split(',')
                    .any(|r| p.regions.iter().any(|w| w == r))
        })
        .collect()
}

/// The instance for replica `n` of `component` in `cluster`.
fn instance_for(
    app: &Application,
    component: &verge_api::application::Component,
    cluster: &Cluster,
    n: u32,
) -> Instance {
    let region = cluster.status.region.as_str();
    let mut spec = component.template.clone();
    for o in app
        .spec
        .overrides
        .iter()
        .filter(|o| o.applies(&component.name, cluster.name(), region))
    {
        if let (Some(image), Some(c)) = (&o.image, spec.container.as_mut()) {
            c.image = image.clone();
        }
        if !o.env.is_empty() {
            let env = if let Some(c) = spec.container.as_mut() {
                Some(&mut c.env)
            } else {
                spec.process.as_mut().map(|p| &mut p.env)
            };
            if let Some(env) = env {
                env.extend(o.env.clone());
            }
        }
        if let Some(r) = &o.resources {
            spec.resources = r.clone();
        }
    }
    spec.placement
        .node_selector
        .extend(cluster.spec.selector.clone());
    let name = format!("{}-{}-{}-{n}", app.name(), component.name, cluster.name());
    let mut i = Instance::new(name, spec);
    i.metadata.labels = BTreeMap::from([
        ("app".to_string(), app.name().to_string()),
        (APP_LABEL.to_string(), app.name().to_string()),
        (COMPONENT_LABEL.to_string(), component.name.clone()),
        (CLUSTER_LABEL.to_string(), cluster.name().to_string()),
    ]);
    i
}

/// Replicas of `component` in `cluster`, overrides applied.
fn replicas(app: &Application, component: &str, cluster: &Cluster, base: u32) -> u32 {
    app.spec
        .overrides
        .iter()
        .filter(|o| o.applies(component, cluster.name(), &cluster.status.region))
        .filter_map(|o| o.replicas)
        .next_back()
        .unwrap_or(base)
}

fn running(i: &Instance) -> bool {
    i.status.phase == InstancePhase::Running
}

/// What to do for `app`, given every cluster and the instances it owns.
pub fn plan(app: &Application, clusters: &[Cluster], owned: &[Arc<Instance>]) -> Plan {
    let mut out = Plan::default();
    let have: BTreeMap<&str, &Instance> = owned.iter().map(|i| (i.name(), &**i)).collect();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    for cluster in clusters_for(&app.spec, clusters) {
        let mut progress = ClusterProgress::default();
        for component in &app.spec.components {
            let n = replicas(app, &component.name, cluster, component.replicas);
            // Its replicas that exist in this cluster already stay while it waits.
            let waiting = component.after.iter().any(|a| {
                let want = replicas(app, a, cluster, 0).max(1);
                let up = owned
                    .iter()
                    .filter(|i| {
                        i.metadata.labels.get(COMPONENT_LABEL) == Some(a)
                            && i.metadata.labels.get(CLUSTER_LABEL).map(String::as_str)
                                == Some(cluster.name())
                            && running(i)
                    })
                    .count() as u32;
                up < want
            });
            if waiting {
                progress.waiting.push(component.name.clone());
            }
            for k in 0..n {
                let want = instance_for(app, component, cluster, k);
                progress.desired += 1;
                match have.get(want.name()) {
                    Some(cur) => {
                        keep.insert(want.name().to_string());
                        if running(cur) {
                            progress.running += 1;
                        }
                        if cur.spec != want.spec || cur.metadata.labels != want.metadata.labels {
                            let mut changed = (*cur).clone();
                            changed.spec = want.spec;
                            changed.metadata.labels = want.metadata.labels;
                            out.update.push(changed);
                        }
                    }
                    None if waiting => {}
                    None => {
                        keep.insert(want.name().to_string());
                        out.create.push(want);
                    }
                }
            }
            if waiting {
                // Keep what runs of a waiting component; start nothing more of it.
                for i in owned.iter().filter(|i| {
                    i.metadata.labels.get(COMPONENT_LABEL) == Some(&component.name)
                        && i.metadata.labels.get(CLUSTER_LABEL).map(String::as_str)
                            == Some(cluster.name())
                }) {
                    keep.insert(i.name().to_string());
                }
            }
        }
        out.status.desired += progress.desired;
        out.status.running += progress.running;
        out.status
            .clusters
            .insert(cluster.name().to_string(), progress);
    }
    out.delete = owned
        .iter()
        .map(|i| i.name().to_string())
        .filter(|n| !keep.contains(n))
        .collect();
    let too_long: Vec<&str> = out
        .create
        .iter()
        .map(|i| i.name())
        .filter(|n| n.len() > 63)
        .collect();
    if let Some(n) = too_long.first() {
        out.status.message = format!(
            "instance name '{n}' is longer than 63 characters: shorten the application, component or cluster name"
        );
        out.create.retain(|i| i.name().len() <= 63);
    }
    out.status.observed_generation = app.metadata.generation;
    out
}

/// Keep every application's instances, for as long as this replica leads.
pub async fn run(st: Arc<HubState>, cache: Arc<ControllerCache>) {
    cache
        .clone()
        .every(EVERY, || {
            let (st, cache) = (st.clone(), cache.clone());
            async move {
                if let Err(e) = pass(&st, &cache).await {
                    tracing::warn!(error = %e.message, "orchestrator pass failed");
                }
            }
        })
        .await
}

async fn pass(st: &HubState, cache: &ControllerCache) -> Result<(), verge_api::ApiError> {
    let (apps, _) = st.objects.list::<ApplicationSpec>().await?;
    let instances = cache.instances();
    let owned_by = |app: &str| -> Vec<Arc<Instance>> {
        instances
            .iter()
            .filter(|i| i.metadata.labels.get(APP_LABEL).map(String::as_str) == Some(app))
            .cloned()
            .collect()
    };
    // Instances of applications that are gone go with them.
    let names: BTreeSet<&str> = apps.iter().map(|a| a.name()).collect();
    for i in instances.iter().filter(|i| {
        i.metadata
            .labels
            .get(APP_LABEL)
            .is_some_and(|a| !names.contains(a.as_str()))
    }) {
        delete_instance(st, i.name()).await;
    }
    if apps.is_empty() {
        return Ok(());
    }
    let (clusters, _) = st.objects.list::<ClusterSpec>().await?;
    for app in &apps {
        let p = plan(app, &clusters, &owned_by(app.name()));
        for i in p.create {
            let name = i.name().to_string();
            match st.objects.create(i).await {
                Ok(_) => record(st, "Created", &name, app.name()),
                Err(e) => {
                    tracing::warn!(app = app.name(), instance = %name, error = %e.message, "not created")
                }
            }
        }
        for i in p.update {
            let name = i.name().to_string();
            if let Err(e) = st.objects.apply(i).await {
                tracing::warn!(app = app.name(), instance = %name, error = %e.message, "not changed");
            }
        }
        for name in p.delete {
            delete_instance(st, &name).await;
        }
        if p.status != app.status {
            let status = p.status;
            let _ = st
                .objects
                .update_status::<ApplicationSpec>(app.name(), |_, s| {
                    *s = status.clone();
                    Ok(true)
                })
                .await;
        }
    }
    Ok(())
}

async fn delete_instance(st: &HubState, name: &str) {
    use crate::app::NodeScoped;
    let also = InstanceSpec::deleted_with(name);
    if st
        .objects
        .delete_with::<InstanceSpec>(name, also)
        .await
        .is_ok()
    {
        InstanceSpec::after_delete(st, name);
        record(st, "Deleted", name, "");
    }
}

fn record(st: &HubState, reason: &str, instance: &str, app: &str) {
    let what = if reason == "Created" {
        format!("instance {instance} created for application {app}")
    } else {
        format!("instance {instance} deleted: its application no longer wants it")
    };
    let mut ev = verge_api::event::Event::new(
        verge_api::event::EventType::Normal,
        reason,
        InstanceSpec::PLURAL,
        instance,
        what,
    );
    ev.actor = Some("orchestrator".into());
    st.events.record(ev);
}

use verge_api::Kind as _;

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::application::{AppPlacement, Component, Override};
    use verge_api::{ClusterStatus, ContainerSpec, Form};

    fn cluster(name: &str, region: &str, tier: &str) -> Cluster {
        let mut c = Cluster::new(
            name,
            ClusterSpec {
                selector: [("site".to_string(), name.to_string())].into(),
                ..Default::default()
            },
        );
        c.metadata.labels.insert("tier".into(), tier.into());
        c.status = ClusterStatus {
            region: region.into(),
            ..Default::default()
        };
        c
    }

    fn app() -> Application {
        let web = InstanceSpec {
            form: Form::Container,
            container: Some(ContainerSpec {
                image: "shop/web:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut a = Application::new(
            "shop",
            ApplicationSpec {
                placement: AppPlacement {
                    cluster_selector: [("tier".to_string(), "edge".to_string())].into(),
                    ..Default::default()
                },
                components: vec![
                    Component {
                        name: "db".into(),
                        replicas: 1,
                        after: vec![],
                        template: web.clone(),
                    },
                    Component {
                        name: "web".into(),
                        replicas: 2,
                        after: vec!["db".into()],
                        template: web,
                    },
                ],
                overrides: vec![Override {
                    region: Some("ap-south".into()),
                    component: Some("web".into()),
                    replicas: Some(3),
                    image: Some("shop/web:1-in".into()),
                    env: [("LANG".to_string(), "hi".to_string())].into(),
                    ..Default::default()
                }],
            },
        );
        a.metadata.generation = 4;
        a
    }

    fn run_all(p: &Plan) -> Vec<Arc<Instance>> {
        p.create
            .iter()
            .cloned()
            .map(|mut i| {
                i.status.phase = InstancePhase::Running;
                Arc::new(i)
            })
            .collect()
    }

    #[test]
    fn components_start_in_order_per_cluster_with_overrides() {
        let clusters = vec![
            cluster("paris", "eu-west", "edge"),
            cluster("mumbai", "ap-south", "edge"),
            cluster("core", "eu-west", "cloud"),
        ];
        let a = app();
        // First pass: only the databases (web comes after db).
        let p = plan(&a, &clusters, &[]);
        let names: Vec<&str> = p.create.iter().map(|i| i.name()).collect();
        assert_eq!(names, ["shop-db-paris-0", "shop-db-mumbai-0"]);
        assert_eq!(p.status.clusters["paris"].waiting, ["web"]);
        assert_eq!(p.status.desired, (1 + 2) + (1 + 3));
        let db = &p.create[0];
        assert_eq!(db.spec.placement.node_selector["site"], "paris");
        assert_eq!(db.metadata.labels["app"], "shop");
        // Once they run, the web replicas come, with mumbai's override.
        let owned = run_all(&p);
        let p = plan(&a, &clusters, &owned);
        let web: Vec<&Instance> = p.create.iter().collect();
        assert_eq!(web.len(), 2 + 3);
        let mumbai: Vec<&&Instance> = web.iter().filter(|i| i.name().contains("mumbai")).collect();
        assert_eq!(mumbai.len(), 3);
        let c = mumbai[0].spec.container.as_ref().unwrap();
        assert_eq!(
            (c.image.as_str(), c.env["LANG"].as_str()),
            ("shop/web:1-in", "hi")
        );
        let paris = web.iter().find(|i| i.name().contains("paris")).unwrap();
        assert_eq!(paris.spec.container.as_ref().unwrap().image, "shop/web:1");
        assert!(p.delete.is_empty());
        // Everything running: nothing to do, and the status says so.
        let mut all = owned;
        all.extend(run_all(&p));
        let p = plan(&a, &clusters, &all);
        assert!(p.create.is_empty() && p.update.is_empty() && p.delete.is_empty());
        assert_eq!((p.status.desired, p.status.running), (7, 7));
        assert_eq!(p.status.observed_generation, 4);
        // Scaled down in paris: the extra replica goes; a changed image is an update.
        let mut a2 = app();
        a2.spec.components[1].replicas = 1;
        a2.spec.components[1]
            .template
            .container
            .as_mut()
            .unwrap()
            .image = "shop/web:2".into();
        let p = plan(&a2, &clusters, &all);
        assert_eq!(p.delete, ["shop-web-paris-1"]);
        assert_eq!(
            p.update.len(),
            1,
            "paris's first web replica; mumbai keeps its override"
        );
        // A cluster no longer picked loses the application.
        let p = plan(&a, &clusters[..1], &all);
        assert_eq!(p.delete.len(), 4);
    }
}
