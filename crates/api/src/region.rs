//! `Region`: a scheduling domain with a location. Nodes belong to a region through
//! their `region` label; the location lets the scheduler find the next nearest region
//! when one is full, and score nearness to users.

use serde::{Deserialize, Serialize};

use crate::meta::{Kind, Object};
use crate::validate::FieldErrors;

/// A Region object (its name is the value nodes carry in their `region` label).
pub type Region = Object<RegionSpec>;

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

/// Regions have no status yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegionStatus {}

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
