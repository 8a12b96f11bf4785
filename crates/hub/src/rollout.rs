//! Rollouts in waves with health gates, as pure code: given where a rollout is and
//! what its current wave looks like now, where it goes next ([`step`]); and what each
//! cluster may be given meanwhile ([`Target`]). The orchestrator carries the result
//! out (docs/ORCHESTRATION.md has the whole model).

use verge_api::clock::{parse_rfc3339, rfc3339};
use verge_api::rollout::{RolloutState, RolloutStatus, RolloutStrategy};

/// What a cluster's instances are given while a rollout runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The new revision, every instance at once.
    New,
    /// The new revision, a few instances at a time (the current wave).
    NewThrottled,
    /// What they run stays; missing instances come from the stable revision.
    Keep,
    /// The stable revision, every instance at once (a rollback).
    Stable,
}

/// Where a rollout is, for the cluster in wave `wave` (of `waves`).
pub fn target(r: &RolloutStatus, wave: usize) -> Target {
    let current = r.wave as usize;
    match r.state {
        RolloutState::Complete => Target::New,
        RolloutState::RolledBack => Target::Stable,
        _ if wave < current => Target::New,
        RolloutState::Progressing if wave == current => Target::NewThrottled,
        _ => Target::Keep,
    }
}

/// What the current wave looks like now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaveObservation {
    /// Instances its clusters should have.
    pub desired: u32,
    /// Of those, on the new revision.
    pub updated: u32,
    /// Of those, running (and healthy).
    pub ready: u32,
    /// Restarts of the updated instances, summed.
    pub restarts: u64,
    /// An updated instance that failed, and why.
    pub failed: Option<String>,
    /// An instance that is not up yet, and how it is (for a gate that times out).
    pub not_ready: Option<String>,
}

/// A new rollout of `revision`, from `stable_revision`, starting `now`.
pub fn begin(revision: &str, stable_revision: &str, now: u64) -> RolloutStatus {
    RolloutStatus {
        revision: revision.to_string(),
        stable_revision: stable_revision.to_string(),
        state: RolloutState::Progressing,
        wave_started_at: Some(rfc3339(now)),
        ..Default::default()
    }
}

/// The next state of rollout `r` of `waves` waves, given its current wave `obs` at
/// `now` (seconds since the epoch). Advances at most one wave.
pub fn step(
    strategy: &RolloutStrategy,
    mut r: RolloutStatus,
    waves: usize,
    obs: &WaveObservation,
    now: u64,
) -> RolloutStatus {
    let since = |t: &Option<String>| {
        t.as_deref()
            .and_then(parse_rfc3339)
            .map_or(0, |t| now.saturating_sub(t))
    };
    match r.state {
        RolloutState::Complete | RolloutState::Failed | RolloutState::RolledBack => return r,
        RolloutState::Paused if strategy.paused || r.paused_after_wave.is_some() => return r,
        RolloutState::Progressing if strategy.paused => {
            r.state = RolloutState::Paused;
            r.message = "paused by the operator (verge rollout resume goes on)".into();
            return r;
        }
        RolloutState::Paused => {
            // Resumed: the wave's clock starts again.
            r.state = RolloutState::Progressing;
            r.message.clear();
            r.wave_started_at = Some(rfc3339(now));
            r.healthy_since = None;
        }
        RolloutState::Progressing => {}
    }
    if r.wave as usize >= waves {
        r.state = RolloutState::Complete;
        return r;
    }
    let name = strategy.wave_name(r.wave as usize);
    if let Some(why) = &obs.failed {
        return fail(strategy, r, format!("wave {name}: {why}"));
    }
    let whole = obs.updated == obs.desired && obs.ready == obs.desired;
    let passed = if obs.desired == 0 {
        true
    } else if !whole {
        r.healthy_since = None;
        false
    } else if r.healthy_since.is_none() || r.gate_restarts != obs.restarts {
        // Up now (or restarted since): the gate's clock starts here.
        r.healthy_since = Some(rfc3339(now));
        r.gate_restarts = obs.restarts;
        strategy.healthy_for_seconds == 0
    } else {
        since(&r.healthy_since) >= u64::from(strategy.healthy_for_seconds)
    };
    if passed {
        r.healthy_since = None;
        r.message.clear();
        if strategy.waves.get(r.wave as usize).is_some_and(|w| w.pause)
            && r.wave as usize + 1 < waves
        {
            r.state = RolloutState::Paused;
            r.paused_after_wave = Some(r.wave);
            r.message = format!("wave {name} passed; waiting for verge rollout resume");
            return r;
        }
        r.wave += 1;
        r.wave_started_at = Some(rfc3339(now));
        if r.wave as usize >= waves {
            r.state = RolloutState::Complete;
        }
        return r;
    }
    if since(&r.wave_started_at) > u64::from(strategy.timeout_seconds) {
        let how = obs.not_ready.as_deref().unwrap_or("not all up");
        return fail(
            strategy,
            r,
            format!(
                "wave {name} did not pass its gate in {}s: {} of {} instances updated and up ({how})",
                strategy.timeout_seconds, obs.ready, obs.desired
            ),
        );
    }
    r
}

/// Rollout `r` stopped for `why`: rolled back, or just stopped.
fn fail(strategy: &RolloutStrategy, mut r: RolloutStatus, why: String) -> RolloutStatus {
    r.healthy_since = None;
    if strategy.auto_rollback && !r.stable_revision.is_empty() {
        r.state = RolloutState::RolledBack;
        r.message = format!("{why}; rolled back to {}", r.stable_revision);
    } else {
        r.state = RolloutState::Failed;
        r.message = format!("{why}; stopped (verge rollout undo goes back)");
    }
    r
}

/// Operator `resume` of `r`: a wave that paused lets the next one start, and a
/// rollout paused by the operator goes on once the strategy no longer says paused.
pub fn resume(mut r: RolloutStatus) -> RolloutStatus {
    if let Some(w) = r.paused_after_wave.take() {
        r.wave = w + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::rollout::Wave;

    fn strategy() -> RolloutStrategy {
        RolloutStrategy {
            waves: vec![
                Wave {
                    name: "canary".into(),
                    clusters: vec!["a".into()],
                    pause: true,
                    ..Default::default()
                },
                Wave {
                    name: "rest".into(),
                    ..Default::default()
                },
            ],
            healthy_for_seconds: 10,
            timeout_seconds: 60,
            ..Default::default()
        }
    }

    fn up(n: u32, restarts: u64) -> WaveObservation {
        WaveObservation {
            desired: n,
            updated: n,
            ready: n,
            restarts,
            ..Default::default()
        }
    }

    #[test]
    fn a_wave_passes_after_staying_up_and_a_restart_resets_its_clock() {
        let s = strategy();
        let r = begin("new", "old", 1000);
        assert_eq!(target(&r, 0), Target::NewThrottled);
        assert_eq!(target(&r, 1), Target::Keep);
        // Half up: waiting.
        let half = WaveObservation {
            desired: 2,
            updated: 2,
            ready: 1,
            ..Default::default()
        };
        let r = step(&s, r, 2, &half, 1005);
        assert_eq!(
            (r.state, r.wave, r.healthy_since.as_deref()),
            (RolloutState::Progressing, 0, None)
        );
        // Up: the gate's clock starts; a restart within it starts it again.
        let r = step(&s, r, 2, &up(2, 0), 1010);
        assert!(r.healthy_since.is_some());
        let r = step(&s, r, 2, &up(2, 1), 1015);
        assert_eq!(r.healthy_since, Some(rfc3339(1015)));
        let r = step(&s, r, 2, &up(2, 1), 1024);
        assert_eq!(r.wave, 0, "9 s is not 10");
        // Passed; the canary pauses.
        let r = step(&s, r, 2, &up(2, 1), 1025);
        assert_eq!(
            (r.state, r.paused_after_wave),
            (RolloutState::Paused, Some(0))
        );
        assert_eq!(target(&r, 1), Target::Keep);
        let r = step(&s, r, 2, &up(2, 1), 1100);
        assert_eq!(
            r.state,
            RolloutState::Paused,
            "waits for resume, however long"
        );
        // Resumed: the next wave, with a fresh clock (no timeout from the pause).
        let r = step(
            &s,
            resume(r),
            2,
            &WaveObservation {
                desired: 3,
                ..Default::default()
            },
            1200,
        );
        assert_eq!((r.state, r.wave), (RolloutState::Progressing, 1));
        assert_eq!(target(&r, 0), Target::New);
        assert_eq!(target(&r, 1), Target::NewThrottled);
        let r = step(&s, r, 2, &up(3, 0), 1210);
        let r = step(&s, r, 2, &up(3, 0), 1220);
        assert_eq!(r.state, RolloutState::Complete);
        assert_eq!(target(&r, 1), Target::New);
    }

    #[test]
    fn a_gate_that_fails_rolls_back_or_stops() {
        let mut s = strategy();
        s.waves[0].pause = false;
        let r = begin("new", "old", 1000);
        let stuck = WaveObservation {
            desired: 2,
            updated: 2,
            ready: 1,
            not_ready: Some("web-a-1: Pending".into()),
            ..Default::default()
        };
        let r2 = step(&s, r.clone(), 2, &stuck, 1060);
        assert_eq!(
            r2.state,
            RolloutState::Progressing,
            "60 s is the limit, not past it"
        );
        let r2 = step(&s, r2, 2, &stuck, 1061);
        assert_eq!(r2.state, RolloutState::RolledBack);
        assert!(
            r2.message
                .contains("wave canary did not pass its gate in 60s: 1 of 2"),
            "{}",
            r2.message
        );
        assert!(r2.message.contains("web-a-1: Pending"));
        assert_eq!(target(&r2, 0), Target::Stable);
        assert_eq!(target(&r2, 1), Target::Stable);
        // Without rollback: stopped where it is, and a failed instance fails it at once.
        s.auto_rollback = false;
        let failed = WaveObservation {
            failed: Some("instance web-a-0 failed: exit code 1".into()),
            ..stuck
        };
        let r3 = step(&s, r, 2, &failed, 1001);
        assert_eq!(r3.state, RolloutState::Failed);
        assert!(r3.message.contains("web-a-0 failed"), "{}", r3.message);
        assert_eq!(target(&r3, 0), Target::Keep);
        // And stays there.
        assert_eq!(step(&s, r3.clone(), 2, &up(2, 0), 2000), r3);
    }

    #[test]
    fn an_operator_pause_holds_and_a_resume_restarts_the_clock() {
        let mut s = strategy();
        s.paused = true;
        let r = step(&s, begin("new", "old", 1000), 2, &up(2, 0), 1001);
        assert_eq!(r.state, RolloutState::Paused);
        assert_eq!(
            target(&r, 0),
            Target::Keep,
            "nothing more is changed while paused"
        );
        let r = step(&s, r, 2, &up(2, 0), 5000);
        assert_eq!(r.state, RolloutState::Paused);
        s.paused = false;
        let r = step(
            &s,
            r,
            2,
            &WaveObservation {
                desired: 2,
                ..Default::default()
            },
            5001,
        );
        assert_eq!(
            (r.state, r.wave_started_at.clone()),
            (RolloutState::Progressing, Some(rfc3339(5001)))
        );
    }
}
