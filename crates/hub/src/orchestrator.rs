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

use verge_api::application::{
    AppTemplate, ApplicationStatus, ClusterChanges, ClusterProgress, Component, HISTORY,
    WavePreview,
};
use verge_api::rollout::{RolloutState, RolloutStatus, WaveProgress};
use verge_api::{
    Application, ApplicationSpec, Cluster, ClusterSpec, ClusterTemplate, ClusterTemplateSpec,
    Instance, InstancePhase, InstanceSpec,
};

use crate::rollout::{self, Target, WaveObservation};

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
/// The label naming the cluster template whose service an instance is.
pub const TEMPLATE_LABEL: &str = "verge.io/cluster-template";

/// What owns the instances a plan keeps: an application, or a cluster template (whose
/// services are planned as an application's components: one piece of code serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// An application: instances labelled `app` and [`APP_LABEL`].
    Application,
    /// A cluster template: instances labelled [`TEMPLATE_LABEL`], each cluster's
    /// parameters in their environment.
    Template,
}

impl Owner {
    /// The label naming the owner on its instances.
    pub fn label(self) -> &'static str {
        match self {
            Owner::Application => APP_LABEL,
            Owner::Template => TEMPLATE_LABEL,
        }
    }
}

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

/// The instance for replica `n` of `component` (of template `t`) in `cluster`.
fn instance_for(
    owner: (Owner, &str),
    t: &AppTemplate,
    component: &Component,
    cluster: &Cluster,
    n: u32,
) -> Instance {
    let (kind, app) = owner;
    let region = cluster.status.region.as_str();
    let mut spec = component.template.clone();
    if kind == Owner::Template {
        // The template's parameters as the cluster sets them (the defaults are in
        // the services' environment already: `template_as_application`).
        let env = if let Some(c) = spec.container.as_mut() {
            Some(&mut c.env)
        } else {
            spec.process.as_mut().map(|p| &mut p.env)
        };
        if let Some(env) = env {
            env.extend(cluster.spec.parameters.clone());
        }
    }
    for o in t
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
    let name = format!("{app}-{}-{}-{n}", component.name, cluster.name());
    let mut i = Instance::new(name, spec);
    i.metadata.labels = BTreeMap::from([
        (kind.label().to_string(), app.to_string()),
        (COMPONENT_LABEL.to_string(), component.name.clone()),
        (CLUSTER_LABEL.to_string(), cluster.name().to_string()),
    ]);
    if kind == Owner::Application {
        i.metadata.labels.insert("app".to_string(), app.to_string());
    }
    i
}

/// Replicas of `component` in `cluster`: counts always come from the current spec
/// (scaling is no rollout), overrides applied; a component only an older revision
/// has keeps that revision's count.
fn replicas(current: &ApplicationSpec, t: &AppTemplate, component: &str, cluster: &Cluster) -> u32 {
    let (overrides, base) = match current.components.iter().find(|c| c.name == component) {
        Some(c) => (&current.overrides, c.replicas),
        None => (
            &t.overrides,
            t.components
                .iter()
                .find(|c| c.name == component)
                .map_or(0, |c| c.replicas),
        ),
    };
    overrides
        .iter()
        .filter(|o| o.applies(component, cluster.name(), &cluster.status.region))
        .filter_map(|o| o.replicas)
        .next_back()
        .unwrap_or(base)
}

/// Whether an instance is up: running, and healthy if it has a health check (the
/// gates of a rollout wait for this).
fn ready(i: &Instance) -> bool {
    i.status.serves()
}

fn in_cluster(i: &Instance, component: &str, cluster: &str) -> bool {
    i.metadata.labels.get(COMPONENT_LABEL).map(String::as_str) == Some(component)
        && i.metadata.labels.get(CLUSTER_LABEL).map(String::as_str) == Some(cluster)
}

/// The instances `t` wants in `cluster`, with whether each component waits there for
/// those it comes after.
fn wanted(
    owner: Owner,
    app: &Application,
    t: &AppTemplate,
    cluster: &Cluster,
    owned: &[Arc<Instance>],
) -> Vec<(Instance, bool)> {
    let mut out = Vec::new();
    for component in &t.components {
        let waiting = component.after.iter().any(|a| {
            let want = replicas(&app.spec, t, a, cluster).max(1);
            let up = owned
                .iter()
                .filter(|i| in_cluster(i, a, cluster.name()) && ready(i))
                .count() as u32;
            up < want
        });
        for k in 0..replicas(&app.spec, t, &component.name, cluster) {
            out.push((
                instance_for((owner, app.name()), t, component, cluster, k),
                waiting,
            ));
        }
    }
    out
}

/// The rollout to carry on with: the one recorded, or (the spec changed) a new one
/// from the last revision that was everywhere. An application's first revision is
/// everywhere at once (there is nothing to roll out from).
fn current_rollout(
    app: &Application,
    revision: &str,
    history: &mut Vec<AppTemplate>,
    now: u64,
) -> RolloutStatus {
    match (&app.status.rollout, history.first()) {
        (Some(r), Some(_)) if r.revision == revision => r.clone(),
        (_, Some(stable)) => rollout::begin(revision, &stable.revision(), now),
        (_, None) => {
            history.push(app.spec.template());
            RolloutStatus {
                revision: revision.to_string(),
                stable_revision: revision.to_string(),
                state: RolloutState::Complete,
                ..Default::default()
            }
        }
    }
}

/// What to do for `app`, given every cluster and the instances it owns, at `now`
/// (seconds since the epoch).
pub fn plan(
    owner: Owner,
    app: &Application,
    clusters: &[Cluster],
    owned: &[Arc<Instance>],
    now: u64,
) -> Plan {
    let mut out = Plan::default();
    let have: BTreeMap<&str, &Instance> = owned.iter().map(|i| (i.name(), &**i)).collect();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let new_t = app.spec.template();
    let revision = new_t.revision();
    let mut history = app.status.history.clone();
    let mut r = current_rollout(app, &revision, &mut history, now);
    let stable = history.first().cloned().unwrap_or_else(|| new_t.clone());
    let placed = clusters_for(&app.spec, clusters);
    let names: Vec<&str> = placed.iter().map(|c| c.name()).collect();
    let strategy = &app.spec.rollout;
    let waves = strategy.assign(&names);
    let wave_of = |cluster: &str| {
        waves
            .iter()
            .position(|w| w.iter().any(|c| c == cluster))
            .unwrap_or(0)
    };
    let mut progress: Vec<WaveProgress> = waves
        .iter()
        .enumerate()
        .map(|(i, w)| WaveProgress {
            name: strategy.wave_name(i),
            clusters: w.clone(),
            ..Default::default()
        })
        .collect();
    let mut obs = WaveObservation::default();
    // The current wave's changes wait for its budget of unavailable instances.
    let (mut throttled, mut down_in_wave) = (Vec::new(), 0u32);
    for cluster in &placed {
        let wave = wave_of(cluster.name());
        let target = rollout::target(&r, wave);
        let shape = match target {
            Target::New | Target::NewThrottled => &new_t,
            Target::Keep | Target::Stable => &stable,
        };
        let mut cp = ClusterProgress::default();
        // Progress counts against the new revision, whatever the cluster runs.
        for (want, _) in wanted(owner, app, &new_t, cluster, owned) {
            let cur = have.get(want.name());
            let updated = cur.is_some_and(|c| c.spec == want.spec);
            let up = updated && cur.is_some_and(|c| ready(c));
            let p = &mut progress[wave];
            p.desired += 1;
            p.updated += u32::from(updated);
            p.ready += u32::from(up);
            if wave == r.wave as usize {
                obs.desired += 1;
                obs.updated += u32::from(updated);
                obs.ready += u32::from(up);
                if let Some(c) = cur.filter(|_| updated) {
                    obs.restarts += u64::from(c.status.restarts);
                    if c.status.phase == InstancePhase::Failed && obs.failed.is_none() {
                        obs.failed = Some(format!(
                            "instance {} failed: {}",
                            c.name(),
                            c.status.message
                        ));
                    }
                }
                if !up && obs.not_ready.is_none() {
                    obs.not_ready = Some(match cur {
                        None => format!("{}: not created yet", want.name()),
                        Some(_) if !updated => {
                            format!("{}: still on the old revision", want.name())
                        }
                        Some(c) => {
                            format!("{}: {:?} {}", c.name(), c.status.phase, c.status.message)
                                .trim_end()
                                .to_string()
                        }
                    });
                }
            }
        }
        for (want, waiting) in wanted(owner, app, shape, cluster, owned) {
            cp.desired += 1;
            if waiting && !cp.waiting.contains(&want.metadata.labels[COMPONENT_LABEL]) {
                cp.waiting
                    .push(want.metadata.labels[COMPONENT_LABEL].clone());
            }
            match have.get(want.name()) {
                Some(cur) => {
                    keep.insert(want.name().to_string());
                    cp.running += u32::from(ready(cur));
                    if target == Target::NewThrottled && !ready(cur) {
                        down_in_wave += 1;
                    }
                    let changed =
                        cur.spec != want.spec || cur.metadata.labels != want.metadata.labels;
                    if !changed || target == Target::Keep {
                        continue;
                    }
                    let mut next = (*cur).clone();
                    next.spec = want.spec;
                    next.metadata.labels = want.metadata.labels;
                    if target == Target::NewThrottled && ready(cur) {
                        throttled.push(next);
                    } else {
                        out.update.push(next);
                    }
                }
                // A waiting component starts nothing more; what runs of it stays.
                None if waiting => {}
                None => {
                    keep.insert(want.name().to_string());
                    out.create.push(want);
                }
            }
        }
        // A component only another revision has, in a cluster that keeps what it
        // runs, stays there too.
        if target == Target::Keep {
            for i in owned.iter().filter(|i| {
                i.metadata.labels.get(CLUSTER_LABEL).map(String::as_str) == Some(cluster.name())
            }) {
                keep.insert(i.name().to_string());
            }
        }
        out.status.desired += cp.desired;
        out.status.running += cp.running;
        out.status.clusters.insert(cluster.name().to_string(), cp);
    }
    let budget = strategy.max_unavailable.saturating_sub(down_in_wave) as usize;
    out.update.extend(throttled.into_iter().take(budget));
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
    let was = r.state;
    r = rollout::step(strategy, r, waves.len(), &obs, now);
    if r.state == RolloutState::Complete && was != RolloutState::Complete {
        if history.first().map(AppTemplate::revision) != Some(revision.clone()) {
            history.insert(0, new_t);
            history.truncate(HISTORY);
        }
        r.stable_revision = revision;
    }
    r.waves = progress;
    out.status.rollout = Some(r);
    out.status.history = history;
    out.status.observed_generation = app.metadata.generation;
    out
}

/// What a change to an application would do, wave by wave, before it is made
/// (`verge apply --dry-run`): every cluster's instances to create, change and delete
/// once its wave comes.
pub fn preview(
    owner: Owner,
    app: &Application,
    clusters: &[Cluster],
    owned: &[Arc<Instance>],
) -> Vec<WavePreview> {
    let placed = clusters_for(&app.spec, clusters);
    let names: Vec<&str> = placed.iter().map(|c| c.name()).collect();
    let strategy = &app.spec.rollout;
    let new_t = app.spec.template();
    strategy
        .assign(&names)
        .into_iter()
        .enumerate()
        .map(|(i, clusters_of_wave)| {
            let mut w = WavePreview {
                name: strategy.wave_name(i),
                pause: strategy.waves.get(i).is_some_and(|w| w.pause),
                ..Default::default()
            };
            for cluster in placed
                .iter()
                .filter(|c| clusters_of_wave.iter().any(|n| n == c.name()))
            {
                let want = wanted(owner, app, &new_t, cluster, owned);
                let mut cp = ClusterChanges {
                    cluster: cluster.name().to_string(),
                    ..Default::default()
                };
                for (i, _) in &want {
                    match owned.iter().find(|o| o.name() == i.name()) {
                        None => cp.create.push(i.name().to_string()),
                        Some(o) if o.spec != i.spec => cp.update.push(i.name().to_string()),
                        Some(_) => {}
                    }
                }
                for o in owned.iter().filter(|o| {
                    o.metadata.labels.get(CLUSTER_LABEL).map(String::as_str) == Some(cluster.name())
                        && !want.iter().any(|(w, _)| w.name() == o.name())
                }) {
                    cp.delete.push(o.name().to_string());
                }
                w.clusters.push(cp);
            }
            w
        })
        .collect()
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
    let (templates, _) = st.objects.list::<ClusterTemplateSpec>().await?;
    let instances = cache.instances();
    let owned_by = |owner: Owner, name: &str| -> Vec<Arc<Instance>> {
        instances
            .iter()
            .filter(|i| i.metadata.labels.get(owner.label()).map(String::as_str) == Some(name))
            .cloned()
            .collect()
    };
    // Instances of applications and templates that are gone go with them.
    let apps_named: BTreeSet<&str> = apps.iter().map(|a| a.name()).collect();
    let templates_named: BTreeSet<&str> = templates.iter().map(|t| t.name()).collect();
    let orphan = |i: &Instance, label: &str, names: &BTreeSet<&str>| {
        i.metadata
            .labels
            .get(label)
            .is_some_and(|a| !names.contains(a.as_str()))
    };
    for i in instances.iter().filter(|i| {
        orphan(i, APP_LABEL, &apps_named) || orphan(i, TEMPLATE_LABEL, &templates_named)
    }) {
        delete_instance(st, i.name()).await;
    }
    if apps.is_empty() && templates.is_empty() {
        return Ok(());
    }
    let (clusters, _) = st.objects.list::<ClusterSpec>().await?;
    for app in &apps {
        let owned = owned_by(Owner::Application, app.name());
        carry_out::<ApplicationSpec>(st, Owner::Application, app, &clusters, &owned).await;
    }
    for t in &templates {
        let owned = owned_by(Owner::Template, t.name());
        let app = template_as_application(t, &clusters);
        carry_out::<ClusterTemplateSpec>(st, Owner::Template, &app, &clusters, &owned).await;
    }
    Ok(())
}

/// A cluster template planned as an application: its services are the components,
/// on every cluster that names it; its parameters' defaults are in every service's
/// environment (a changed default is a new revision, and rolls out).
pub fn template_as_application(t: &ClusterTemplate, clusters: &[Cluster]) -> Application {
    let mut components = t.spec.services.clone();
    for c in &mut components {
        let env = if let Some(c) = c.template.container.as_mut() {
            Some(&mut c.env)
        } else {
            c.template.process.as_mut().map(|p| &mut p.env)
        };
        if let Some(env) = env {
            for (k, v) in &t.spec.parameters {
                env.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    let mut app = Application::new(
        t.name(),
        ApplicationSpec {
            placement: verge_api::application::AppPlacement {
                clusters: clusters
                    .iter()
                    .filter(|c| c.spec.template.as_deref() == Some(t.name()))
                    .map(|c| c.name().to_string())
                    .collect(),
                ..Default::default()
            },
            components,
            overrides: Vec::new(),
            rollout: t.spec.rollout.clone(),
        },
    );
    app.metadata = t.metadata.clone();
    app.status = t.status.clone();
    app
}

/// Plan `app` (an application, or a template as one) and carry the plan out; its
/// status is written to the object of kind `S`.
async fn carry_out<S: verge_api::Kind<Status = ApplicationStatus>>(
    st: &HubState,
    owner: Owner,
    app: &Application,
    clusters: &[Cluster],
    owned: &[Arc<Instance>],
) {
    let p = plan(owner, app, clusters, owned, verge_api::clock::now_secs());
    for i in p.create {
        let name = i.name().to_string();
        match st.objects.create(i).await {
            Ok(_) => record(st, "Created", &name, app.name()),
            Err(e) => {
                tracing::warn!(owner = app.name(), instance = %name, error = %e.message, "not created")
            }
        }
    }
    for i in p.update {
        let name = i.name().to_string();
        if let Err(e) = st.objects.apply(i).await {
            tracing::warn!(owner = app.name(), instance = %name, error = %e.message, "not changed");
        }
    }
    for name in p.delete {
        delete_instance(st, &name).await;
    }
    if p.status != app.status {
        rollout_events(st, S::PLURAL, app, &p.status);
        let status = p.status;
        // Only over the status this plan was made from: an operator's resume in
        // between wins, and the next pass plans again from it.
        let _ = st
            .objects
            .update_status::<S>(app.name(), |_, s| {
                if s.rollout != app.status.rollout {
                    return Ok(false);
                }
                *s = status.clone();
                Ok(true)
            })
            .await;
    }
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

/// Events for what a pass did to `app`'s rollout: a wave passed, a pause, the end.
fn rollout_events(st: &HubState, plural: &str, app: &Application, now: &ApplicationStatus) {
    use verge_api::event::{Event, EventType};
    let (Some(before), Some(after)) = (&app.status.rollout, &now.rollout) else {
        return;
    };
    let wave = |i: u32| app.spec.rollout.wave_name(i as usize);
    let (kind, reason, what) = if before.revision != after.revision {
        (
            EventType::Normal,
            "RolloutStarted",
            format!(
                "rollout of revision {} started (from {})",
                after.revision, after.stable_revision
            ),
        )
    } else if before.state == after.state && before.wave == after.wave {
        return;
    } else {
        match after.state {
            RolloutState::Complete => (
                EventType::Normal,
                "RolloutComplete",
                format!("revision {} is on every cluster", after.revision),
            ),
            RolloutState::Failed => (EventType::Warning, "RolloutFailed", after.message.clone()),
            RolloutState::RolledBack => (EventType::Warning, "RolledBack", after.message.clone()),
            RolloutState::Paused => (EventType::Normal, "RolloutPaused", after.message.clone()),
            RolloutState::Progressing if after.wave != before.wave => (
                EventType::Normal,
                "WavePassed",
                format!(
                    "wave {} passed its gate; wave {} started",
                    wave(before.wave),
                    wave(after.wave)
                ),
            ),
            RolloutState::Progressing => (
                EventType::Normal,
                "RolloutResumed",
                "rollout goes on".into(),
            ),
        }
    };
    let mut ev = Event::new(kind, reason, plural, app.name(), what);
    ev.actor = Some("orchestrator".into());
    st.events.record(ev);
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
                rollout: Default::default(),
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
        let p = plan(Owner::Application, &a, &clusters, &[], 1000);
        let names: Vec<&str> = p.create.iter().map(|i| i.name()).collect();
        assert_eq!(names, ["shop-db-paris-0", "shop-db-mumbai-0"]);
        assert_eq!(p.status.clusters["paris"].waiting, ["web"]);
        assert_eq!(p.status.desired, (1 + 2) + (1 + 3));
        let db = &p.create[0];
        assert_eq!(db.spec.placement.node_selector["site"], "paris");
        assert_eq!(db.metadata.labels["app"], "shop");
        // Once they run, the web replicas come, with mumbai's override.
        let owned = run_all(&p);
        let p = plan(Owner::Application, &a, &clusters, &owned, 1000);
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
        let p = plan(Owner::Application, &a, &clusters, &all, 1000);
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
        let p = plan(Owner::Application, &a2, &clusters, &all, 1000);
        assert_eq!(p.delete, ["shop-web-paris-1"]);
        assert_eq!(
            p.update.len(),
            1,
            "paris's first web replica; mumbai keeps its override"
        );
        // A cluster no longer picked loses the application.
        let p = plan(Owner::Application, &a, &clusters[..1], &all, 1000);
        assert_eq!(p.delete.len(), 4);
    }

    /// Apply a plan to the instances, as the pass and the nodes would: created and
    /// changed instances run (`up`) or fail to start (`!up`).
    fn carry_out(p: &Plan, owned: &mut Vec<Arc<Instance>>, up: bool) {
        for i in p.create.iter().chain(&p.update) {
            let mut i = i.clone();
            i.status.phase = if up {
                InstancePhase::Running
            } else {
                InstancePhase::Pending
            };
            owned.retain(|o| o.name() != i.name());
            owned.push(Arc::new(i));
        }
        owned.retain(|o| !p.delete.iter().any(|d| d == o.name()));
    }

    fn image_of(owned: &[Arc<Instance>], name: &str) -> String {
        let i = owned.iter().find(|i| i.name() == name).expect(name);
        i.spec.container.as_ref().unwrap().image.clone()
    }

    #[test]
    fn a_change_rolls_out_wave_by_wave_and_a_failed_gate_rolls_it_back() {
        use verge_api::rollout::{RolloutStrategy, Wave};
        let clusters = vec![
            cluster("paris", "eu-west", "edge"),
            cluster("lyon", "eu-west", "edge"),
            cluster("mumbai", "ap-south", "edge"),
        ];
        let mut a = app();
        a.spec.overrides.clear();
        a.spec.rollout = RolloutStrategy {
            waves: vec![Wave {
                name: "canary".into(),
                clusters: vec!["paris".into()],
                ..Default::default()
            }],
            healthy_for_seconds: 10,
            timeout_seconds: 60,
            ..Default::default()
        };
        // Up everywhere (db first, then web), the first revision everywhere at once.
        let mut owned = Vec::new();
        let mut t = 1000;
        for _ in 0..3 {
            let p = plan(Owner::Application, &a, &clusters, &owned, t);
            carry_out(&p, &mut owned, true);
            a.status = p.status;
            t += 2;
        }
        assert_eq!(owned.len(), 3 * 3);
        let r = a.status.rollout.clone().unwrap();
        assert_eq!(r.state, RolloutState::Complete);
        let first = r.revision.clone();
        // A new image: the canary's web replicas change one at a time; no other
        // cluster's do until the canary has stayed up for 10 s.
        let set_image = |a: &mut Application, image: &str| {
            for c in &mut a.spec.components {
                c.template.container.as_mut().unwrap().image = image.into();
            }
        };
        set_image(&mut a, "shop/web:2");
        let mut seen_paris_down = 0;
        let mut when_lyon_changed = None;
        for _ in 0..30 {
            let p = plan(Owner::Application, &a, &clusters, &owned, t);
            assert!(
                p.update.len() <= 1,
                "at most one instance of a wave down at once"
            );
            if p.update.iter().any(|i| !i.name().contains("paris")) && when_lyon_changed.is_none() {
                when_lyon_changed = Some(t);
                assert!(
                    owned
                        .iter()
                        .filter(|i| i.name().contains("paris"))
                        .all(|i| image_of(&owned, i.name()) == "shop/web:2")
                );
            }
            seen_paris_down += p
                .update
                .iter()
                .filter(|i| i.name().contains("paris"))
                .count();
            // Changed instances take a pass to come up.
            carry_out(&p, &mut owned, false);
            a.status = p.status;
            for i in owned.iter_mut() {
                Arc::make_mut(i).status.phase = InstancePhase::Running;
            }
            t += 2;
        }
        assert_eq!(
            seen_paris_down, 3,
            "paris's db and two web replicas, each once"
        );
        assert!(when_lyon_changed.is_some(), "the next wave started");
        let r = a.status.rollout.clone().unwrap();
        assert_eq!(r.state, RolloutState::Complete, "{r:?}");
        assert_eq!(a.status.history.len(), 2);
        assert!(
            owned
                .iter()
                .all(|i| i.spec.container.as_ref().unwrap().image == "shop/web:2")
        );
        // A bad image: the canary never comes up; after 60 s the gate fails and it
        // goes back to shop/web:2; lyon and mumbai were never touched.
        set_image(&mut a, "shop/web:bad");
        for _ in 0..40 {
            let p = plan(Owner::Application, &a, &clusters, &owned, t);
            carry_out(&p, &mut owned, false);
            for i in owned
                .iter_mut()
                .filter(|i| i.spec.container.as_ref().unwrap().image != "shop/web:bad")
            {
                Arc::make_mut(i).status.phase = InstancePhase::Running;
            }
            a.status = p.status;
            t += 2;
        }
        let r = a.status.rollout.clone().unwrap();
        assert_eq!(r.state, RolloutState::RolledBack, "{r:?}");
        assert!(
            r.message
                .contains("wave canary did not pass its gate in 60s"),
            "{}",
            r.message
        );
        assert!(
            owned
                .iter()
                .all(|i| image_of(&owned, i.name()) == "shop/web:2")
        );
        assert_ne!(first, r.revision);
        // A scale-up is no rollout: the new replica comes at once, everywhere.
        set_image(&mut a, "shop/web:2");
        a.spec.components[1].replicas = 3;
        let p = plan(Owner::Application, &a, &clusters, &owned, t);
        assert_eq!(
            p.create.len(),
            3,
            "{:?}",
            p.create.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
    }
}
