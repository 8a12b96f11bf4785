//! `Application`: components (instances of any form, with replicas) deployed to every
//! cluster its placement picks, with per-region and per-cluster overrides. The hub's
//! orchestrator keeps its instances: one per replica, per component, per cluster,
//! named `APP-COMPONENT-CLUSTER-N`, placed on the cluster's nodes; a component waits
//! for the components it comes `after` to run in that cluster; a new cluster that
//! matches gets the application on its own (docs/API.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::instance::{InstanceSpec, Resources};
use crate::meta::{Kind, Object};
use crate::rollout::{RolloutStatus, RolloutStrategy};
use crate::validate::FieldErrors;

/// An Application object.
pub type Application = Object<ApplicationSpec>;

/// Most replicas of one component in one cluster.
pub const MAX_REPLICAS: u32 = 100;

/// What to run and where.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSpec {
    /// Which clusters get it.
    #[serde(default)]
    pub placement: AppPlacement,
    /// What it is made of.
    #[serde(default)]
    pub components: Vec<Component>,
    /// Changes for some regions or clusters, in order (a later one wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
    /// How a change reaches the clusters: in waves, with health gates.
    #[serde(default)]
    pub rollout: RolloutStrategy,
}

/// What an application's instances are made from: its components and overrides (not
/// where it goes, nor how changes roll out). A revision of it is what a rollout
/// carries; the hub keeps the last one that was everywhere, to run where a rollout
/// has not reached yet and to go back to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppTemplate {
    /// The components.
    pub components: Vec<Component>,
    /// The overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

impl AppTemplate {
    /// Its revision: a hash of what the instances' specs come from, replica counts
    /// left out (scaling is no rollout: counts apply at once, everywhere).
    pub fn revision(&self) -> String {
        let mut t = self.clone();
        for c in &mut t.components {
            c.replicas = 0;
        }
        for o in &mut t.overrides {
            o.replicas = None;
        }
        let json = serde_json::to_vec(&t).unwrap_or_default();
        format!("{:012x}", crate::hash::fnv1a(&json) & 0xffff_ffff_ffff)
    }
}

impl ApplicationSpec {
    /// The template its instances are made from now.
    pub fn template(&self) -> AppTemplate {
        AppTemplate {
            components: self.components.clone(),
            overrides: self.overrides.clone(),
        }
    }
}

/// Which clusters an application goes to: those named, and those whose labels match
/// the selector, and only in the regions listed (if any). At least one of `clusters`
/// and `clusterSelector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppPlacement {
    /// Clusters by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Clusters whose labels carry all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cluster_selector: BTreeMap<String, String>,
    /// Only clusters in these regions (their nodes' `region` label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// One part of an application.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    /// Its name (a DNS label).
    pub name: String,
    /// Instances of it in each cluster.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Components that must run in a cluster before this one starts there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// The instance each replica is (its placement is narrowed to the cluster).
    pub template: InstanceSpec,
}

fn one() -> u32 {
    1
}

/// A change for the clusters of one region, or for one cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Override {
    /// The region it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The cluster it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The component it changes (all of them when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Replicas there instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Container image there instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment variables added (or replaced) there: configuration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resources there instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

impl Override {
    /// Whether it applies to `component` in `cluster` (of `region`).
    pub fn applies(&self, component: &str, cluster: &str, region: &str) -> bool {
        self.component.as_deref().is_none_or(|c| c == component)
            && self.cluster.as_deref().is_none_or(|c| c == cluster)
            && self.region.as_deref().is_none_or(|r| r == region)
    }
}

/// How one cluster is doing with the application.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterProgress {
    /// Instances it should have there.
    pub desired: u32,
    /// Of those, running.
    pub running: u32,
    /// Components waiting for the ones they come after.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
}

/// What the orchestrator did (written by the hub).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationStatus {
    /// Instances it should have, everywhere.
    #[serde(default)]
    pub desired: u32,
    /// Of those, running.
    #[serde(default)]
    pub running: u32,
    /// By cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterProgress>,
    /// Why it cannot be carried out, when it cannot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The spec generation this status is about.
    #[serde(default)]
    pub observed_generation: u64,
    /// The rollout of the latest change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The last revision that was on every cluster (see [`RolloutStatus`]), and the
    /// ones before it, newest first (at most [`HISTORY`]): what `verge rollout undo`
    /// goes back to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AppTemplate>,
}

/// What a change would do in one wave (`verge apply --dry-run`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WavePreview {
    /// The wave's name.
    pub name: String,
    /// Whether the rollout waits for `verge rollout resume` after it.
    #[serde(default)]
    pub pause: bool,
    /// Its clusters and what changes in each.
    pub clusters: Vec<ClusterChanges>,
}

/// Instances a change creates, changes and deletes in one cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterChanges {
    /// The cluster.
    pub cluster: String,
    /// Instances it would create.
    #[serde(default)]
    pub create: Vec<String>,
    /// Instances whose spec would change.
    #[serde(default)]
    pub update: Vec<String>,
    /// Instances it would delete.
    #[serde(default)]
    pub delete: Vec<String>,
}

/// Revisions an application's status keeps.
pub const HISTORY: usize = 3;

impl Kind for ApplicationSpec {
    type Status = ApplicationStatus;
    const KIND: &'static str = "Application";
    const PLURAL: &'static str = "applications";

    fn validate(&self, errs: &mut FieldErrors) {
        let p = &self.placement;
        if p.clusters.is_empty() && p.cluster_selector.is_empty() {
            errs.push(
                "spec.placement",
                "{}",
                "name clusters (clusters: [paris]) or select them by label (clusterSelector: {tier: edge})",
            );
        }
        for (i, c) in p.clusters.iter().enumerate() {
            crate::validate::name(errs, &format!("spec.placement.clusters[{i}]"), c);
        }
        for (k, v) in &p.cluster_selector {
            crate::validate::label_at(errs, "spec.placement.clusterSelector", k, v);
        }
        validate_components(errs, "spec.components", &self.components);
        let names: Vec<&str> = self.components.iter().map(|c| c.name.as_str()).collect();
        self.rollout.validate("spec.rollout", errs);
        for (i, o) in self.overrides.iter().enumerate() {
            let at = format!("spec.overrides[{i}]");
            if o.region.is_none() && o.cluster.is_none() {
                errs.push(&at, "", "say where it applies: region or cluster");
            }
            if let Some(c) = &o.component
                && !names.contains(&c.as_str())
            {
                errs.push(format!("{at}.component"), c, "no component has this name");
            }
            if o.replicas.is_some_and(|r| r > MAX_REPLICAS) {
                errs.push(
                    format!("{at}.replicas"),
                    o.replicas.unwrap_or(0),
                    format!("at most {MAX_REPLICAS} per cluster"),
                );
            }
        }
    }
}

/// Check components (of an application, or a cluster template's services) under `at`:
/// names, replicas, the `after` order, and each template as an instance spec.
pub fn validate_components(errs: &mut FieldErrors, at: &str, components: &[Component]) {
    if components.is_empty() {
        errs.push(at, "[]", "list at least one component");
    }
    let names: Vec<&str> = components.iter().map(|c| c.name.as_str()).collect();
    for (i, c) in components.iter().enumerate() {
        let at = format!("{at}[{i}]");
        crate::validate::name(errs, &format!("{at}.name"), &c.name);
        if names.iter().filter(|n| **n == c.name).count() > 1 {
            errs.push(
                format!("{at}.name"),
                &c.name,
                "two components have this name",
            );
        }
        if c.replicas > MAX_REPLICAS {
            errs.push(
                format!("{at}.replicas"),
                c.replicas,
                format!("at most {MAX_REPLICAS} per cluster"),
            );
        }
        for a in &c.after {
            if !names.contains(&a.as_str()) || a == &c.name {
                errs.push(
                    format!("{at}.after"),
                    a,
                    format!("must name another component ({})", names.join(", ")),
                );
            }
        }
        // The template is an instance's spec: its own checks, under this path.
        let mut inner = FieldErrors::default();
        c.template.validate(&mut inner);
        for mut e in inner.0 {
            e.field = e.field.replacen("spec.", &format!("{at}.template."), 1);
            errs.0.push(e);
        }
    }
    if let Some(cycle) = after_cycle(components) {
        errs.push(
            at,
            cycle.join(" -> "),
            "the `after` order goes round in a circle",
        );
    }
}

/// A circle in the components' `after` order, if there is one.
fn after_cycle(components: &[Component]) -> Option<Vec<String>> {
    let by: BTreeMap<&str, &Component> = components.iter().map(|c| (c.name.as_str(), c)).collect();
    fn visit<'a>(
        n: &'a str,
        by: &BTreeMap<&'a str, &'a Component>,
        path: &mut Vec<&'a str>,
        done: &mut std::collections::BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == n) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if !done.insert(n) {
            return None;
        }
        path.push(n);
        for a in by.get(n).map(|c| c.after.as_slice()).unwrap_or_default() {
            if let Some(c) = visit(a, by, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = std::collections::BTreeSet::new();
    by.keys()
        .find_map(|n| visit(n, &by, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, after: &[&str]) -> Component {
        Component {
            name: name.into(),
            replicas: 1,
            after: after.iter().map(|s| s.to_string()).collect(),
            template: InstanceSpec {
                process: Some(crate::instance::ProcessSpec {
                    command: vec!["sleep".into(), "1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    fn errors(spec: &ApplicationSpec) -> String {
        let mut e = FieldErrors::default();
        spec.validate(&mut e);
        e.to_string()
    }

    #[test]
    fn a_bad_application_is_refused_naming_the_field() {
        let mut spec = ApplicationSpec {
            placement: AppPlacement {
                clusters: vec!["paris".into()],
                ..Default::default()
            },
            components: vec![comp("db", &[]), comp("web", &["db"])],
            ..Default::default()
        };
        assert_eq!(errors(&spec), "");
        spec.components[0].after = vec!["web".into()];
        assert!(errors(&spec).contains("circle"), "{}", errors(&spec));
        spec.components[0].after = vec!["cache".into()];
        assert!(
            errors(&spec).contains("spec.components[0].after"),
            "{}",
            errors(&spec)
        );
        spec.components[0].after.clear();
        spec.components[1].replicas = 1000;
        assert!(errors(&spec).contains("spec.components[1].replicas"));
        spec.components[1].replicas = 1;
        spec.components[1].template.process = None;
        let e = errors(&spec);
        assert!(e.contains("spec.components[1].template."), "{e}");
        spec.components[1] = comp("web", &[]);
        spec.placement.clusters.clear();
        assert!(errors(&spec).contains("spec.placement"));
        spec.placement.clusters = vec!["paris".into()];
        spec.overrides = vec![Override {
            component: Some("nope".into()),
            cluster: Some("paris".into()),
            ..Default::default()
        }];
        assert!(errors(&spec).contains("spec.overrides[0].component"));
    }
}
