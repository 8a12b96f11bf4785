//! The files instances are made from, fetched to the node before a start.
//!
//! A manifest's artifact fields (`spec.function.component`, `spec.vm.kernel`,
//! `initrd`, `disk`) name a path on the node, a digest in the hub's artifact store, or
//! an OCI reference ([`Source`]). Before starting an instance the agent replaces each
//! with a path in the node's cache (`DATA_DIR/artifacts`, shared with container image
//! layers): a digest is fetched from the hub over the channel (a data stream with hello
//! `artifact`), a reference from its registry; both are verified against their digest.
//! What is in the cache is used without asking anyone, so a node cut off from the hub
//! and the registry still restarts everything it ran before.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use verge_api::InstanceSpec;
use verge_api::channel::StreamHello;
use verge_artifacts::{ArtifactError, Cache, Registry, Source};
use verge_tunnel::chunk::{Chunk, read_chunk};

use crate::streams::CurrentOpener;

/// A fetch that receives nothing for this long fails (and is retried with the start).
const STALL: Duration = Duration::from_secs(60);

/// The node's artifact cache and the ways to fill it.
pub struct Artifacts {
    cache: Cache,
    registry: Registry,
    hub: CurrentOpener,
    /// One fetch per artifact at a time: a thousand instances of one component, or
    /// two VMs of one disk image, download it once.
    in_flight: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Artifacts {
    /// The cache under `data_dir/artifacts`; `plain_http` registries are spoken to
    /// without TLS; `hub` opens streams to the hub while connected.
    pub fn new(data_dir: &Path, plain_http: Vec<String>, hub: CurrentOpener) -> Self {
        let cache = Cache::new(data_dir.join("artifacts"));
        // The agent is the cache's only writer, and it is only starting.
        cache.clear_partial();
        Self {
            cache,
            registry: Registry::new(plain_http),
            hub,
            in_flight: Default::default(),
        }
    }

    /// `spec` with every artifact field replaced by a path on the node (fetching what
    /// the cache lacks). The error names the field.
    pub async fn localize(&self, spec: &InstanceSpec) -> Result<InstanceSpec, String> {
        let mut out = spec.clone();
        if let Some(f) = &mut out.function {
            self.localize_field("spec.function.component", &mut f.component)
                .await?;
        }
        if let Some(vm) = &mut out.vm {
            for (field, value) in [
                ("spec.vm.kernel", &mut vm.kernel),
                ("spec.vm.initrd", &mut vm.initrd),
                ("spec.vm.disk", &mut vm.disk),
            ] {
                if let Some(v) = value {
                    self.localize_field(field, v).await?;
                }
            }
        }
        Ok(out)
    }

    async fn localize_field(&self, field: &str, value: &mut String) -> Result<(), String> {
        let path = self
            .fetch(value)
            .await
            .map_err(|e| format!("{field} ({value}): {e}"))?;
        *value = path.display().to_string();
        Ok(())
    }

    /// The local path of an artifact.
    pub async fn fetch(&self, value: &str) -> Result<PathBuf, String> {
        if let Source::NodePath(p) = Source::of(value) {
            return Ok(PathBuf::from(p));
        }
        let gate = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(value.to_string())
            .or_default()
            .clone();
        let fetched = {
            let _one_at_a_time = gate.lock().await;
            self.fetch_now(value).await
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out removes the gate (the map holds one reference).
        if Arc::strong_count(&gate) == 2 {
            in_flight.remove(value);
        }
        fetched
    }

    async fn fetch_now(&self, value: &str) -> Result<PathBuf, String> {
        match Source::of(value) {
            Source::NodePath(p) => Ok(PathBuf::from(p)),
            Source::Oci(r) => self
                .registry
                .pull_file(&self.cache, r)
                .await
                .map_err(|e| e.to_string()),
            Source::Hub(digest) => match self.cache.get(digest) {
                Some(p) => Ok(p),
                None => self.fetch_from_hub(digest).await,
            },
        }
    }

    /// What the cache must keep for `specs` to start without anyone's help: the blobs
    /// of their artifact fields (hub digests, and what their OCI references resolved
    /// to), and the unpacked images of their containers.
    pub fn wanted<'a>(
        &self,
        specs: impl IntoIterator<Item = &'a InstanceSpec>,
    ) -> (HashSet<String>, HashSet<String>) {
        let (mut blobs, mut images) = (HashSet::new(), HashSet::new());
        for spec in specs {
            let fields = spec.function.iter().map(|f| &f.component).chain(
                spec.vm
                    .iter()
                    .flat_map(|vm| [&vm.kernel, &vm.initrd, &vm.disk].into_iter().flatten()),
            );
            for value in fields {
                match Source::of(value) {
                    Source::Hub(d) => {
                        blobs.insert(d.to_string());
                    }
                    Source::Oci(r) => blobs.extend(self.cache.reference("files", r)),
                    Source::NodePath(_) => {}
                }
            }
            if let Some(c) = &spec.container {
                images.extend(self.cache.reference("images", &c.image));
            }
        }
        (blobs, images)
    }

    /// Bring the cache under `budget` bytes, keeping what `specs` need
    /// ([`Artifacts::wanted`]).
    pub fn collect<'a>(
        &self,
        specs: impl IntoIterator<Item = &'a InstanceSpec>,
        budget: u64,
    ) -> verge_artifacts::Collected {
        let (blobs, images) = self.wanted(specs);
        self.cache.collect(&blobs, &images, budget)
    }

    async fn fetch_from_hub(&self, digest: &str) -> Result<PathBuf, String> {
        self.cache.path(digest).map_err(|e| e.to_string())?;
        let opener = self.hub.get().ok_or_else(|| {
            "the node has no copy and is not connected to the hub; it is fetched once the hub is reachable".to_string()
        })?;
        let mut io = opener
            .open(&StreamHello::Artifact {
                digest: digest.to_string(),
            })
            .await?;
        let mut w = self
            .cache
            .writer(&format!("artifact {digest} from the hub"), u64::MAX)
            .map_err(|e| e.to_string())?;
        loop {
            let chunk = tokio::time::timeout(STALL, read_chunk(&mut io))
                .await
                .map_err(|_| format!("the hub sent nothing for {}s", STALL.as_secs()))?
                .map_err(|e| format!("fetching from the hub: {e}"))?;
            match chunk {
                Some(Chunk::Data(d)) => w.write(&d).map_err(|e| e.to_string())?,
                Some(Chunk::Eof) => break,
                Some(Chunk::Error(m)) => return Err(m),
                Some(_) => {}
                None => return Err("the hub closed the stream before the end".into()),
            }
        }
        let size = w.size();
        let got = w
            .finish(Some(digest))
            .map_err(|e: ArtifactError| e.to_string())?;
        tracing::info!(digest = %got, size, "artifact fetched from the hub");
        self.cache.path(&got).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{ContainerSpec, FunctionSpec, VmSpec};

    /// What the cache keeps is what the desired state needs to restart offline: hub
    /// digests, what OCI references resolved to, unpacked images; node paths are not
    /// the cache's.
    #[test]
    fn the_cache_keeps_what_the_desired_state_needs() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Artifacts::new(dir.path(), Vec::new(), CurrentOpener::default());
        let hub_digest = format!("sha256:{}", "1".repeat(64));
        let pulled = a.cache.put("component", b"wasm", None).expect("put");
        a.cache
            .set_reference("files", "reg:5000/fn:1", &pulled)
            .expect("ref");
        let image = format!("sha256:{}", "2".repeat(64));
        a.cache
            .set_reference("images", "reg:5000/app:1", &image)
            .expect("ref");
        let specs = [
            InstanceSpec {
                vm: Some(VmSpec {
                    kernel: Some(hub_digest.clone()),
                    disk: Some("/srv/disk.img".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            InstanceSpec {
                function: Some(FunctionSpec {
                    component: "reg:5000/fn:1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            InstanceSpec {
                container: Some(ContainerSpec {
                    image: "reg:5000/app:1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        let (blobs, images) = a.wanted(&specs);
        assert_eq!(blobs, [hub_digest, pulled].into_iter().collect());
        assert_eq!(images, [image].into_iter().collect());
    }
}
