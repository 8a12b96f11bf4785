//! Operators' hands on the rollout of an application or a cluster template: pause,
//! resume, undo, and what a change would do before it is made. Operators only.

use std::sync::Arc;

use verge_api::application::{AppTemplate, ApplicationStatus, WavePreview};
use verge_api::rollout::{RolloutState, RolloutStrategy};
use verge_api::{
    ApiError, Application, ApplicationSpec, ClusterSpec, ClusterTemplateSpec, ErrorCode,
    InstanceSpec, Kind, Object,
};

use super::{NodeScoped, Principal, admin_only};
use crate::orchestrator::{APP_LABEL, preview as plan_preview};
use crate::state::HubState;

/// What an operator does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop changing anything more (`spec.rollout.paused`).
    Pause,
    /// Go on: after an operator's pause, or after a wave that pauses.
    Resume,
    /// Go back to the revision before: the stable one while a rollout runs or
    /// failed, the one before the current one once it is complete. A new rollout
    /// carries it, wave by wave.
    Undo,
}

impl std::str::FromStr for Action {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        match s {
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            "undo" => Ok(Self::Undo),
            other => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no rollout action '{other}': pause, resume or undo"),
            )),
        }
    }
}

/// What rolls out: an application, or a cluster template (planned as one).
pub trait Rolled: NodeScoped + Kind<Status = ApplicationStatus> {
    /// Its rollout strategy.
    fn strategy(&mut self) -> &mut RolloutStrategy;
    /// Make it what an earlier revision was.
    fn restore(&mut self, back: AppTemplate);
}

impl Rolled for ApplicationSpec {
    fn strategy(&mut self) -> &mut RolloutStrategy {
        &mut self.rollout
    }
    fn restore(&mut self, back: AppTemplate) {
        self.components = back.components;
        self.overrides = back.overrides;
    }
}

impl Rolled for ClusterTemplateSpec {
    fn strategy(&mut self) -> &mut RolloutStrategy {
        &mut self.rollout
    }
    /// A template's revisions are of its services with its parameters' defaults in
    /// their environment (`orchestrator::template_as_application`): a default the
    /// template still has is taken out again, so that the services read as written
    /// and the parameter keeps working; one that differs stays, as it was.
    fn restore(&mut self, back: AppTemplate) {
        let mut services = back.components;
        for c in &mut services {
            let env = match (c.template.container.as_mut(), c.template.process.as_mut()) {
                (Some(ct), _) => Some(&mut ct.env),
                (None, Some(pr)) => Some(&mut pr.env),
                _ => None,
            };
            if let Some(env) = env {
                env.retain(|k, v| self.parameters.get(k) != Some(v));
            }
        }
        self.services = services;
    }
}

/// How many times a change that lost a race with another writer is tried again.
const RETRIES: usize = 5;

/// Do `action` to the rollout of `S` `name`; the object after it.
pub async fn act<S: Rolled>(
    st: &HubState,
    p: &Principal,
    name: &str,
    action: Action,
) -> Result<Object<S>, ApiError> {
    let kind = S::KIND.to_lowercase();
    admin_only(p, &format!("changing the rollout of {kind} '{name}'"))?;
    for _ in 0..RETRIES {
        let current = st.objects.get::<S>(name).await?;
        let mut next = current.clone();
        match action {
            Action::Pause => next.spec.strategy().paused = true,
            Action::Resume => next.spec.strategy().paused = false,
            Action::Undo => next.spec.restore(undo_target(&current)?),
        }
        if action == Action::Resume {
            // A wave that paused waits in the status: let the next one start.
            st.objects
                .update_status::<S>(name, |_, s| {
                    let Some(r) = s.rollout.take() else {
                        return Ok(false);
                    };
                    s.rollout = Some(crate::rollout::resume(r));
                    Ok(true)
                })
                .await?;
        }
        if next.spec == current.spec {
            return st.objects.get::<S>(name).await;
        }
        // Only over what was read: a concurrent change is read again.
        next.metadata.revision = current.metadata.revision;
        match super::apply(st, p, name, next).await {
            Ok((obj, _)) => return Ok(obj),
            Err(e) if e.code == ErrorCode::Conflict => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        format!("{kind} '{name}' is changing too fast; try again"),
    ))
}

/// What `undo` goes back to.
fn undo_target<S: Rolled>(obj: &Object<S>) -> Result<AppTemplate, ApiError> {
    let complete = obj
        .status
        .rollout
        .as_ref()
        .is_none_or(|r| r.state == RolloutState::Complete);
    // Complete: the current revision is history[0]; the one before is next.
    let back = obj.status.history.get(usize::from(complete));
    back.cloned().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Invalid,
            format!(
                "{} '{}' has no earlier revision to go back to (it keeps {} after they were everywhere)",
                S::KIND.to_lowercase(),
                obj.name(),
                verge_api::application::HISTORY
            ),
        )
    })
}

/// What applying `app` would do, wave by wave, without doing it.
pub async fn preview(
    st: &HubState,
    p: &Principal,
    app: Application,
) -> Result<Vec<WavePreview>, ApiError> {
    admin_only(p, "previewing an application")?;
    app.validate().map_err(ApiError::invalid)?;
    let (clusters, _) = st.objects.list::<ClusterSpec>().await?;
    let (instances, _) = st.objects.list::<InstanceSpec>().await?;
    let owned: Vec<Arc<verge_api::Instance>> = instances
        .into_iter()
        .filter(|i| i.metadata.labels.get(APP_LABEL).map(String::as_str) == Some(app.name()))
        .map(Arc::new)
        .collect();
    Ok(plan_preview(
        crate::orchestrator::Owner::Application,
        &app,
        &clusters,
        &owned,
    ))
}
