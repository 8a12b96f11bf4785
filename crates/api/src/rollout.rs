//! Rollouts in waves with health gates: how a change to an application reaches its
//! clusters. The strategy is written by users (strict); the status by the hub.
//!
//! A change (a new *revision*: the instances' specs, not their counts) goes to the
//! clusters wave by wave: the first wave's clusters, then the next wave's once every
//! instance of the first is up on the new revision and has stayed up, without a
//! restart, for `healthyForSeconds` (the gate). At most `maxUnavailable` instances of
//! a wave are down at once while it is updated. A wave that does not pass its gate
//! within `timeoutSeconds`, or whose updated instance fails, stops the rollout; with
//! `autoRollback` its clusters go back to the last revision that was everywhere.
//! Clusters of later waves keep what they run until their wave comes.

use serde::{Deserialize, Serialize};

use crate::validate::FieldErrors;

/// Most waves in a strategy.
pub const MAX_WAVES: usize = 20;

/// How changes roll out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// The waves, in order. Clusters no wave takes form a last wave of their own; no
    /// waves at all is one wave of every cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// Instances of a wave that may be down at once while it is updated.
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// The gate: how long every instance of a wave must run on the new revision,
    /// without restarting, before the next wave starts.
    #[serde(default = "ten")]
    pub healthy_for_seconds: u32,
    /// A wave that has not passed its gate this long after it started fails.
    #[serde(default = "six_hundred")]
    pub timeout_seconds: u32,
    /// On a failed gate, put the wave's clusters back on the last revision that was
    /// everywhere (otherwise the rollout just stops).
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    /// Stop where it is (`verge rollout pause`); `false` goes on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

fn one() -> u32 {
    1
}
fn ten() -> u32 {
    10
}
fn six_hundred() -> u32 {
    600
}
fn yes() -> bool {
    true
}

impl Default for RolloutStrategy {
    fn default() -> Self {
        Self {
            waves: Vec::new(),
            max_unavailable: one(),
            healthy_for_seconds: ten(),
            timeout_seconds: six_hundred(),
            auto_rollback: true,
            paused: false,
        }
    }
}

/// One wave: named clusters, a share of all of them, or (neither) the rest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Wave {
    /// Its name (shown in `verge rollout status`).
    pub name: String,
    /// Clusters by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Enough clusters (in name order, of those no earlier wave took) that this and
    /// the earlier waves hold this percentage of all the application's clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Once this wave passes its gate, wait for `verge rollout resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
}

impl RolloutStrategy {
    /// Check what a user wrote, under `at` (e.g. `spec.rollout`).
    pub fn validate(&self, at: &str, errs: &mut FieldErrors) {
        if self.waves.len() > MAX_WAVES {
            errs.push(
                format!("{at}.waves"),
                self.waves.len(),
                format!("at most {MAX_WAVES} waves"),
            );
        }
        let mut last_percent = 0;
        for (i, w) in self.waves.iter().enumerate() {
            let wat = format!("{at}.waves[{i}]");
            crate::validate::name(errs, &format!("{wat}.name"), &w.name);
            if self.waves[..i].iter().any(|o| o.name == w.name) {
                errs.push(format!("{wat}.name"), &w.name, "two waves have this name");
            }
            for (j, c) in w.clusters.iter().enumerate() {
                crate::validate::name(errs, &format!("{wat}.clusters[{j}]"), c);
            }
            match w.percent {
                Some(_) if !w.clusters.is_empty() => errs.push(
                    format!("{wat}.percent"),
                    w.percent.unwrap_or(0),
                    "a wave names clusters or takes a percentage, not both",
                ),
                Some(p) if p == 0 || p > 100 => {
                    errs.push(format!("{wat}.percent"), p, "between 1 and 100")
                }
                Some(p) if p < last_percent => errs.push(
                    format!("{wat}.percent"),
                    p,
                    format!("percentages count all waves so far: at least {last_percent}"),
                ),
                Some(p) => last_percent = p,
                None => {}
            }
        }
        if self.max_unavailable == 0 {
            errs.push(
                format!("{at}.maxUnavailable"),
                0,
                "at least 1 (an instance is down while it is replaced)",
            );
        }
        if self.timeout_seconds <= self.healthy_for_seconds {
            errs.push(
                format!("{at}.timeoutSeconds"),
                self.timeout_seconds,
                format!(
                    "longer than healthyForSeconds ({}), or no wave can pass",
                    self.healthy_for_seconds
                ),
            );
        }
    }

    /// The clusters of each wave, in order, from all of `clusters` (sorted by name):
    /// named ones first, shares of the rest, then a last wave for any left over.
    /// A named cluster that is not among `clusters` is left out.
    pub fn assign(&self, clusters: &[&str]) -> Vec<Vec<String>> {
        let mut left: Vec<&str> = clusters.to_vec();
        left.sort_unstable();
        let named: std::collections::BTreeSet<&str> = self
            .waves
            .iter()
            .flat_map(|w| w.clusters.iter().map(String::as_str))
            .collect();
        let total = left.len();
        let mut taken = 0;
        let mut out = Vec::new();
        for w in &self.waves {
            let wave: Vec<String> = if !w.clusters.is_empty() {
                w.clusters
                    .iter()
                    .filter(|c| left.contains(&c.as_str()))
                    .cloned()
                    .collect()
            } else {
                let want = match w.percent {
                    Some(p) => (total * p as usize).div_ceil(100).saturating_sub(taken),
                    None => total,
                };
                left.iter()
                    .filter(|c| !named.contains(*c))
                    .take(want)
                    .map(|c| c.to_string())
                    .collect()
            };
            left.retain(|c| !wave.iter().any(|w| w == c));
            taken += wave.len();
            out.push(wave);
        }
        if out.is_empty() || !left.is_empty() {
            out.push(left.iter().map(|c| c.to_string()).collect());
        }
        out
    }

    /// The name of wave `i` (the last one, when the waves did not take every cluster,
    /// is `rest`).
    pub fn wave_name(&self, i: usize) -> String {
        self.waves
            .get(i)
            .map_or_else(|| "rest".to_string(), |w| w.name.clone())
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    /// Updating the current wave, or waiting for its gate.
    #[default]
    Progressing,
    /// Stopped by the operator, or after a wave that pauses.
    Paused,
    /// Every cluster runs the revision.
    Complete,
    /// A gate failed; nothing more is changed.
    Failed,
    /// A gate failed and the clusters went back to the stable revision.
    RolledBack,
}

impl std::fmt::Display for RolloutState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// How one wave is doing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveProgress {
    /// Its name.
    pub name: String,
    /// Its clusters.
    pub clusters: Vec<String>,
    /// Instances it should have.
    pub desired: u32,
    /// Of those, on the revision being rolled out.
    pub updated: u32,
    /// Of those, running.
    pub ready: u32,
}

/// A rollout's state (written by the hub).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out (a hash of the instances' specs).
    pub revision: String,
    /// The last revision that was on every cluster: what clusters not yet reached
    /// run, and what a rollback goes back to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stable_revision: String,
    /// Where it is.
    pub state: RolloutState,
    /// The wave being updated (its index).
    pub wave: u32,
    /// Every wave, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveProgress>,
    /// RFC 3339 time the current wave started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_started_at: Option<String>,
    /// RFC 3339 time since which the current wave has been whole and up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<String>,
    /// The wave's restarts counted when it came up (a restart since resets the gate).
    #[serde(default)]
    pub gate_restarts: u64,
    /// The wave that paused (waiting for `verge rollout resume`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_after_wave: Option<u32>,
    /// Why it stopped, failed or rolled back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(name: &str, clusters: &[&str], percent: Option<u32>) -> Wave {
        Wave {
            name: name.into(),
            clusters: clusters.iter().map(|s| s.to_string()).collect(),
            percent,
            pause: false,
        }
    }

    #[test]
    fn waves_take_named_clusters_then_shares_then_the_rest() {
        let s = RolloutStrategy {
            waves: vec![
                wave("canary", &["c07"], None),
                wave("ten", &[], Some(10)),
                wave("half", &[], Some(50)),
            ],
            ..Default::default()
        };
        let all: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let w = s.assign(&refs);
        assert_eq!(w.len(), 4, "{w:?}");
        assert_eq!(w[0], ["c07"]);
        assert_eq!(w[1], ["c00"], "10% of 20 is 2, one taken by the canary");
        assert_eq!(w[2].len(), 10 - 2);
        assert_eq!(w[3].len(), 10);
        let every: std::collections::BTreeSet<&String> = w.iter().flatten().collect();
        assert_eq!(every.len(), 20, "each cluster in exactly one wave");
        assert_eq!(s.wave_name(3), "rest");
        // No waves: one wave of everything.
        assert_eq!(RolloutStrategy::default().assign(&refs), vec![all.clone()]);
        // A named cluster that is not placed is left out.
        let s = RolloutStrategy {
            waves: vec![wave("canary", &["gone"], None)],
            ..Default::default()
        };
        assert_eq!(s.assign(&refs)[0], Vec::<String>::new());
    }

    #[test]
    fn a_bad_strategy_is_refused_naming_the_field() {
        let errors = |s: &RolloutStrategy| {
            let mut e = FieldErrors::default();
            s.validate("spec.rollout", &mut e);
            e.to_string()
        };
        let mut s = RolloutStrategy {
            waves: vec![wave("a", &["x"], Some(5))],
            ..Default::default()
        };
        assert!(errors(&s).contains("spec.rollout.waves[0].percent"));
        s.waves = vec![wave("a", &[], Some(50)), wave("b", &[], Some(10))];
        assert!(errors(&s).contains("spec.rollout.waves[1].percent: '10'"));
        s.waves = vec![wave("a", &[], None), wave("a", &[], None)];
        assert!(errors(&s).contains("spec.rollout.waves[1].name"));
        s.waves.clear();
        s.max_unavailable = 0;
        assert!(errors(&s).contains("spec.rollout.maxUnavailable"));
        s.max_unavailable = 1;
        s.timeout_seconds = 5;
        assert!(errors(&s).contains("spec.rollout.timeoutSeconds"));
    }
}
