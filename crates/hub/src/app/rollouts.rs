//! Operators' hands on an application's rollout: pause, resume, undo, and what a
//! change would do before it is made. Operators only.

use std::sync::Arc;

use verge_api::application::{AppTemplate, WavePreview};
use verge_api::rollout::RolloutState;
use verge_api::{ApiError, Application, ApplicationSpec, ClusterSpec, ErrorCode, InstanceSpec};

use super::{Principal, admin_only};
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

/// How many times a change that lost a race with another writer is tried again.
const RETRIES: usize = 5;

/// Do `action` to application `name`'s rollout; the application after it.
pub async fn act(
    st: &HubState,
    p: &Principal,
    name: &str,
    action: Action,
) -> Result<Application, ApiError> {
    admin_only(p, &format!("changing the rollout of application '{name}'"))?;
    for _ in 0..RETRIES {
        let current = st.objects.get::<ApplicationSpec>(name).await?;
        let mut next = current.clone();
        match action {
            Action::Pause => next.spec.rollout.paused = true,
            Action::Resume => next.spec.rollout.paused = false,
            Action::Undo => {
                let back = undo_target(&current)?;
                next.spec.components = back.components;
                next.spec.overrides = back.overrides;
            }
        }
        if action == Action::Resume {
            // A wave that paused waits in the status: let the next one start.
            st.objects
                .update_status::<ApplicationSpec>(name, |_, s| {
                    let Some(r) = s.rollout.take() else {
                        return Ok(false);
                    };
                    s.rollout = Some(crate::rollout::resume(r));
                    Ok(true)
                })
                .await?;
        }
        if next.spec == current.spec {
            return st.objects.get::<ApplicationSpec>(name).await;
        }
        // Only over what was read: a concurrent change is read again.
        next.metadata.revision = current.metadata.revision;
        match super::apply(st, p, name, next).await {
            Ok((app, _)) => return Ok(app),
            Err(e) if e.code == ErrorCode::Conflict => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        format!("application '{name}' is changing too fast; try again"),
    ))
}

/// What `undo` goes back to.
fn undo_target(app: &Application) -> Result<AppTemplate, ApiError> {
    let complete = app
        .status
        .rollout
        .as_ref()
        .is_none_or(|r| r.state == RolloutState::Complete);
    // Complete: the current revision is history[0]; the one before is next.
    let back = app.status.history.get(usize::from(complete));
    back.cloned().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Invalid,
            format!(
                "application '{}' has no earlier revision to go back to (it keeps {} after they were everywhere)",
                app.name(),
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
