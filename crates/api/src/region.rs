//! `Region`: a scheduling domain with a location. Nodes belong to a region through
//! their `region` label; the location lets the scheduler find the next nearest region
//! when one is full, and score nearness to users.

use serde::{Deserialize, Serialize};

use crate::meta::{Kind, Object};
use crate::validate::FieldErrors;

/// A Region object (its name is the value nodes carry in their `region` label).
pub type Region = Object<RegionSpec>;

/// The node label naming a node's region.
pub const REGION_LABEL: &str = "region";

/// Whether the region has its own hub.
pub fn has_hub(r: &Region) -> bool {
    r.status.hub.is_some()
}

/// Where the region is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// Latitude of the region's centre, degrees.
    pub latitude: f64,
    /// Longitude of the region's centre, degrees.
    pub longitude: f64,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// What the centre knows of the region.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// The region's own hub, once one has enrolled: it then serves, schedules and
    /// watches the region's nodes, and the centre leaves them to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<RegionHub>,
}

/// A region hub as its centre sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionHub {
    /// Its enrolment (in its client certificate; a new enrolment revokes the old).
    pub enrolment: String,
    /// Whether its uplink is connected.
    #[serde(default)]
    pub connected: bool,
    /// RFC 3339 time the uplink last connected or disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl Kind for RegionSpec {
    type Status = RegionStatus;
    const KIND: &'static str = "Region";
    const PLURAL: &'static str = "regions";
    fn validate(&self, errs: &mut FieldErrors) {
        if !(-90.0..=90.0).contains(&self.latitude) {
            errs.push("spec.latitude", self.latitude, "must be within -90..90");
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            errs.push("spec.longitude", self.longitude, "must be within -180..180");
        }
    }
}
