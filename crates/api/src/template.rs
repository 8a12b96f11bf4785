//! `ClusterTemplate`: the platform services a cluster needs (a load balancer, local
//! disks, a cache server: any form, artifact, resources and configuration), with
//! parameters each cluster may set. A cluster names its template
//! (`Cluster.spec.template`); the hub's orchestrator deploys exactly the template's
//! services to each cluster that uses it, and nothing else, as instances whose
//! resources the nodes' Resource Manager reserves, so customer instances schedule
//! around them. A change to a template rolls out in waves with health gates, as an
//! application's does (docs/ORCHESTRATION.md).
//!
//! The service model is open: a service is a component (an instance spec with
//! replicas and a start order), so a new kind of service (cloud disk, VPC, DNS) is a
//! new workload, not a new field here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::application::{ApplicationStatus, Component, validate_components};
use crate::meta::{Kind, Object};
use crate::rollout::RolloutStrategy;
use crate::validate::FieldErrors;

/// A ClusterTemplate object.
pub type ClusterTemplate = Object<ClusterTemplateSpec>;

/// The services, their parameters, and how changes roll out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTemplateSpec {
    /// The platform services: each an instance spec, with replicas per cluster and a
    /// start order (`after`).
    pub services: Vec<Component>,
    /// Parameters and their defaults. Every service of a cluster gets them as
    /// environment variables, with the values the cluster sets
    /// (`Cluster.spec.parameters`) in place of the defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// How a change to the services reaches the clusters.
    #[serde(default)]
    pub rollout: RolloutStrategy,
}

impl Kind for ClusterTemplateSpec {
    // The same record as an application's: per cluster, rollout, history.
    type Status = ApplicationStatus;
    const KIND: &'static str = "ClusterTemplate";
    const PLURAL: &'static str = "clustertemplates";

    fn validate(&self, errs: &mut FieldErrors) {
        validate_components(errs, "spec.services", &self.services);
        for k in self.parameters.keys() {
            crate::validate::env_name(errs, &format!("spec.parameters[{k}]"), k);
        }
        self.rollout.validate("spec.rollout", errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_template_is_refused_naming_the_field() {
        let errors = |t: &ClusterTemplateSpec| {
            let mut e = FieldErrors::default();
            t.validate(&mut e);
            e.to_string()
        };
        let mut t = ClusterTemplateSpec::default();
        assert!(errors(&t).contains("spec.services: '[]'"), "{}", errors(&t));
        t.services = vec![Component {
            name: "lb".into(),
            replicas: 1,
            after: vec!["disk".into()],
            template: Default::default(),
        }];
        let e = errors(&t);
        assert!(e.contains("spec.services[0].after: 'disk'"), "{e}");
        assert!(e.contains("spec.services[0].template."), "{e}");
        t.parameters.insert("bad name".into(), "x".into());
        assert!(errors(&t).contains("spec.parameters[bad name]"));
    }
}
