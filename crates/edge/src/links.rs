//! Links: how an instance reaches a declared port of another instance, possibly on
//! another edge. For each link in an instance's spec the agent listens on
//! `127.0.0.1:localPort`; every connection there becomes a relay stream to the hub
//! ([`StreamHello::Relay`]), which checks policy and joins it to a port-forward stream
//! on the target's edge. A refused relay is logged here and at the hub, and the local
//! connection is closed.

use std::collections::HashMap;
use std::sync::Mutex;

use verge_api::Link;
use verge_api::channel::StreamHello;
use verge_tunnel::chunk::bridge;

use crate::streams::CurrentOpener;

/// The listeners of every instance's links.
#[derive(Default)]
pub struct Links {
    opener: CurrentOpener,
    running: Mutex<HashMap<(String, Link), tokio::task::AbortHandle>>,
}

impl Links {
    /// The current session's stream opener (set by the session).
    pub fn opener(&self) -> &CurrentOpener {
        &self.opener
    }

    /// Listen for exactly the links in `wanted` (instance name, link).
    pub fn reconcile(&self, wanted: Vec<(String, Link)>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(key) {
                let (from, link) = slot.key().clone();
                let task = tokio::spawn(listen(self.opener.clone(), from, link));
                slot.insert(task.abort_handle());
            }
        }
    }
}

async fn listen(opener: CurrentOpener, from: String, link: Link) {
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", link.local_port)).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(instance = %from, port = link.local_port, error = %e, "cannot listen for a link; retrying in 5s");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    };
    tracing::info!(instance = %from, to = %link.instance, port = link.port, local_port = link.local_port, "link listening");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (opener, from, link) = (opener.clone(), from.clone(), link.clone());
        tokio::spawn(async move {
            let Some(op) = opener.get() else {
                tracing::warn!(instance = %from, to = %link.instance, "link connection dropped: the hub is not reachable right now");
                return;
            };
            let hello = StreamHello::Relay {
                from: from.clone(),
                to: link.instance.clone(),
                port: link.port,
            };
            let result = match op.open(&hello).await {
                Ok(io) => bridge(io, tcp).await,
                Err(e) => Err(e),
            };
            if let Err(why) = result {
                tracing::warn!(instance = %from, to = %link.instance, port = link.port, reason = %why, "link connection ended");
            }
        });
    }
}
