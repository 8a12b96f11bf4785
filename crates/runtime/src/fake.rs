//! A fake runtime: workloads that "run" until told to exit. Stands in for real drivers
//! in tests and in the fleet simulator, where thousands of nodes cannot all run real
//! processes. It is named as a fake everywhere it is used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use verge_api::clock::now_rfc3339;

use crate::{Exit, RunRecord, Running, Runtime, RuntimeError, Workload};

/// Fake workloads by pid: name and the sender that reports their exit.
type Workloads = HashMap<u32, (String, watch::Sender<Option<Exit>>)>;

/// The fake driver. Clones share state.
#[derive(Debug, Default, Clone)]
pub struct FakeRuntime {
    running: Arc<Mutex<Workloads>>,
    next_pid: Arc<Mutex<u32>>,
}

impl FakeRuntime {
    /// Names of the workloads currently "running".
    pub fn running(&self) -> Vec<String> {
        let map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = map.values().map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }

    /// Make the named workload exit with `exit`.
    pub fn exit(&self, name: &str, exit: Exit) {
        let mut map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (n, tx)| {
            if n == name {
                let _ = tx.send(Some(exit));
                false
            } else {
                true
            }
        });
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn writes_log(&self, _spec: &verge_api::InstanceSpec) -> bool {
        false
    }
    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        let pid = {
            let mut next = self.next_pid.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let (tx, rx) = watch::channel(None);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, (w.name().to_string(), tx));
        Ok(Running {
            record: RunRecord {
                driver: "fake".into(),
                instance: w.name().to_string(),
                pid,
                start_ticks: 0,
                started_at: now_rfc3339(),
                run_id: String::new(),
            },
            exited: rx,
        })
    }

    async fn adopt(&self, _w: &Workload, record: &RunRecord) -> Option<Running> {
        let map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (_, tx) = map.get(&record.pid)?;
        Some(Running {
            record: record.clone(),
            exited: tx.subscribe(),
        })
    }

    async fn stop(&self, record: &RunRecord, _grace: Duration) -> Result<(), RuntimeError> {
        if let Some((_, tx)) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&record.pid)
        {
            let _ = tx.send(Some(Exit::Signal(15)));
        }
        Ok(())
    }
}
