//! `verge rollout status|pause|resume|undo NAME`, and what `verge apply --dry-run`
//! prints for an application: its rollout wave by wave.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Result, bail};
use verge_api::Kind;
use verge_api::application::ApplicationStatus;
use verge_api::application::WavePreview;
use verge_api::rollout::{RolloutState, RolloutStatus, WaveProgress};

use crate::client::Client;

/// How often `verge rollout status --watch` looks again.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Width of a progress bar, in cells.
const BAR: usize = 20;

/// What a rollout command names: `NAME` or `application/NAME` (an application),
/// `clustertemplate/NAME` (or `template/`, `ct/`); its kind and plural, and its name.
pub fn target(arg: &str) -> Result<(&'static str, &'static str, &str)> {
    let (kind, name) = arg.split_once('/').unwrap_or(("application", arg));
    match kind {
        "application" | "applications" | "app" => {
            Ok(("application", verge_api::ApplicationSpec::PLURAL, name))
        }
        "clustertemplate" | "clustertemplates" | "template" | "ct" => Ok((
            "clustertemplate",
            verge_api::ClusterTemplateSpec::PLURAL,
            name,
        )),
        other => bail!(
            "'{other}' has no rollouts: name an application (NAME or application/NAME) or a cluster template (clustertemplate/NAME)"
        ),
    }
}

/// An application's or a template's generation and status (a template's status is
/// an application's).
async fn rolled(client: &Client, plural: &str, name: &str) -> Result<(u64, ApplicationStatus)> {
    let obj: serde_json::Value = client.get(&format!("/v1/{plural}/{name}")).await?;
    let generation = obj["metadata"]["generation"].as_u64().unwrap_or(0);
    let status = serde_json::from_value(obj["status"].clone()).unwrap_or_default();
    Ok((generation, status))
}

/// `verge rollout status [KIND/]NAME [--watch]`. Watching ends when the rollout
/// does: with success once complete, with an error when it failed or rolled back.
pub async fn status(client: &Client, arg: &str, watch: bool) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let (kind, plural, name) = target(arg)?;
    loop {
        let (generation, status) = rolled(client, plural, name).await?;
        // A status from before the latest change says nothing about it yet.
        let current = status.observed_generation >= generation;
        let Some(r) = status.rollout.as_ref().filter(|_| current) else {
            if !watch {
                println!("{kind} {name}: the hub has not planned generation {generation} yet");
                return Ok(());
            }
            tokio::time::sleep(WATCH_EVERY).await;
            continue;
        };
        let text = render(&format!("{kind} {name}"), r, tty);
        if tty && watch {
            // Redraw in place: clear the screen below the cursor's home.
            print!("\x1b[H\x1b[J");
        }
        print!("{text}");
        match r.state {
            RolloutState::Failed | RolloutState::RolledBack if watch => {
                bail!("rollout of {name} {}: {}", r.state, r.message)
            }
            RolloutState::Complete => return Ok(()),
            _ if !watch => return Ok(()),
            _ => tokio::time::sleep(WATCH_EVERY).await,
        }
    }
}

/// The status of rollout `r` of application `name`, a line per wave; with `bars`,
/// each wave's progress as a bar.
pub fn render(what: &str, r: &RolloutStatus, bars: bool) -> String {
    let mut out = format!(
        "{what}: revision {} ({})",
        r.revision,
        match r.state {
            RolloutState::Progressing => format!(
                "wave {} of {}: {}",
                r.wave + 1,
                r.waves.len(),
                r.waves.get(r.wave as usize).map_or("", |w| w.name.as_str())
            ),
            s => s.to_string(),
        }
    );
    if !r.stable_revision.is_empty() && r.stable_revision != r.revision {
        out.push_str(&format!(", from {}", r.stable_revision));
    }
    out.push('\n');
    let width = r.waves.iter().map(|w| w.name.len()).max().unwrap_or(4);
    for (i, w) in r.waves.iter().enumerate() {
        let how = wave_state(r, i as u32, w);
        let bar = if bars {
            format!("{} ", bar(w.ready, w.desired))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {:width$}  {bar}{}/{} updated, {} up  {} cluster{}  {how}\n",
            w.name,
            w.updated,
            w.desired,
            w.ready,
            w.clusters.len(),
            if w.clusters.len() == 1 { "" } else { "s" },
        ));
    }
    if !r.message.is_empty() {
        out.push_str(&format!("  {}\n", r.message));
    }
    out
}

fn wave_state(r: &RolloutStatus, i: u32, w: &WaveProgress) -> &'static str {
    match r.state {
        RolloutState::Complete => "done",
        RolloutState::RolledBack => "rolled back",
        _ if i < r.wave => "passed",
        _ if i > r.wave => "waiting",
        RolloutState::Failed => "failed",
        RolloutState::Paused => "paused",
        RolloutState::Progressing if w.desired > 0 && w.ready == w.desired => "gate",
        RolloutState::Progressing => "updating",
    }
}

fn bar(done: u32, of: u32) -> String {
    let filled = if of == 0 {
        BAR
    } else {
        (done as usize * BAR) / of as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled))
}

/// `verge rollout pause|resume|undo [KIND/]NAME`.
pub async fn act(client: &Client, arg: &str, action: &str) -> Result<()> {
    if !matches!(action, "pause" | "resume" | "undo") {
        bail!("no rollout action '{action}': status, pause, resume or undo");
    }
    let (kind, plural, name) = target(arg)?;
    let obj: serde_json::Value = client
        .post(
            &format!("/v1/{plural}/{name}/rollout/{action}"),
            &serde_json::Value::Null,
        )
        .await?;
    let done = match action {
        "pause" => "paused".to_string(),
        "resume" => "resumed".to_string(),
        _ => format!(
            "going back (generation {}; verge rollout status {arg} follows it)",
            obj["metadata"]["generation"]
        ),
    };
    println!("{kind}/{name} {done}");
    Ok(())
}

/// What applying `app` would do, wave by wave (`verge apply --dry-run`).
pub async fn preview(client: &Client, app: &serde_json::Value, name: &str) -> Result<String> {
    let waves: Vec<WavePreview> = client
        .post(&format!("/v1/applications/{name}/preview"), app)
        .await?;
    Ok(render_preview(name, &waves))
}

/// The text of a preview.
pub fn render_preview(name: &str, waves: &[WavePreview]) -> String {
    let mut out = format!("application/{name} (dry run): {} wave(s)\n", waves.len());
    for (i, w) in waves.iter().enumerate() {
        let n = |f: fn(&verge_api::application::ClusterChanges) -> usize| {
            w.clusters.iter().map(f).sum::<usize>()
        };
        out.push_str(&format!(
            "  wave {} {}: {} cluster(s), {} to create, {} to change, {} to delete{}\n",
            i + 1,
            w.name,
            w.clusters.len(),
            n(|c| c.create.len()),
            n(|c| c.update.len()),
            n(|c| c.delete.len()),
            if w.pause {
                "; then waits for verge rollout resume"
            } else {
                ""
            }
        ));
        for c in w
            .clusters
            .iter()
            .filter(|c| !(c.create.is_empty() && c.update.is_empty() && c.delete.is_empty()))
        {
            let list = |what: &str, v: &[String]| {
                (!v.is_empty()).then(|| format!("{what} {}", v.join(", ")))
            };
            let parts: Vec<String> = [
                list("create", &c.create),
                list("change", &c.update),
                list("delete", &c.delete),
            ]
            .into_iter()
            .flatten()
            .collect();
            out.push_str(&format!("    {}: {}\n", c.cluster, parts.join("; ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_each_wave_with_a_bar_on_a_terminal() {
        let r = RolloutStatus {
            revision: "abc".into(),
            stable_revision: "old".into(),
            state: RolloutState::Progressing,
            wave: 1,
            waves: vec![
                WaveProgress {
                    name: "canary".into(),
                    clusters: vec!["paris".into()],
                    desired: 2,
                    updated: 2,
                    ready: 2,
                },
                WaveProgress {
                    name: "rest".into(),
                    clusters: vec!["a".into(), "b".into()],
                    desired: 4,
                    updated: 1,
                    ready: 1,
                },
            ],
            ..Default::default()
        };
        let t = render("application shop", &r, true);
        assert!(
            t.starts_with("application shop: revision abc (wave 2 of 2: rest), from old\n"),
            "{t}"
        );
        assert!(
            t.contains("canary  [####################] 2/2 updated, 2 up  1 cluster  passed"),
            "{t}"
        );
        assert!(
            t.contains("rest    [#####---------------] 1/4 updated, 1 up  2 clusters  updating"),
            "{t}"
        );
        let plain = render("application shop", &r, false);
        assert!(!plain.contains('['), "{plain}");
    }
}
