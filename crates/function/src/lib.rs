//! Verge's function driver: `form: function` instances are WebAssembly components
//! (WASI 0.2, the `wasi:http/proxy` world) run by wasmtime inside the edge agent and
//! served by its HTTP gateway at `http://GATEWAY/<instance>/<path>`.
//!
//! - **Instance per request.** Each request gets a fresh component instance in its own
//!   `Store`, created from a pre-instantiated `ProxyPre` out of the pooling allocator
//!   (slots reserved up front, so instantiation is a few microseconds). No state
//!   survives a request: a function that wants state keeps it elsewhere.
//! - **Limits.** Memory: the instance's `resources.memory` caps each request's store
//!   (a guest that grows past it traps, and the request gets a 500). CPU time: epoch
//!   interruption, one epoch every 10 ms, so a request that runs past `timeoutMs`
//!   (default 10 s) is stopped and gets a 504.
//! - Functions live in the agent's process: after an agent restart the supervisor
//!   simply starts them again (compiling a component takes milliseconds for small
//!   ones).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt, Full};
use verge_api::clock::now_rfc3339;
use verge_runtime::{Exit, RunRecord, Running, Runtime, RuntimeError, Workload};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

const DRIVER: &str = "function";
/// How often the engine's epoch advances: the granularity of request timeouts.
const EPOCH: Duration = Duration::from_millis(10);
/// Default longest run of one request.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest linear memory any function may have (the pool reserves this per slot).
pub const MAX_MEMORY: usize = 256 << 20;

/// What a function's Wasm stores use, for its metrics.
#[derive(Default)]
struct Usage {
    /// Linear memory of the stores alive now (requests in flight).
    memory: std::sync::atomic::AtomicU64,
    /// Requests served.
    requests: std::sync::atomic::AtomicU64,
}

/// The store's limits, counting the memory it grows into its function's [`Usage`]
/// (and giving it back when the store goes).
struct Metered {
    limits: StoreLimits,
    usage: Arc<Usage>,
    held: u64,
}

impl wasmtime::ResourceLimiter for Metered {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            let grown = desired.saturating_sub(current) as u64;
            self.held += grown;
            self.usage
                .memory
                .fetch_add(grown, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.usage
            .memory
            .fetch_sub(self.held, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Per-request state of a function's store.
struct RequestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: Metered,
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

/// A deployed function.
struct Function {
    pre: ProxyPre<RequestState>,
    memory: usize,
    timeout: Duration,
    /// The instance's `output.log`: the guest's stdout and stderr.
    log: wasmtime_wasi::cli::OutputFile,
    /// Kept so the supervisor's wait never ends while the function is deployed.
    _alive: tokio::sync::watch::Sender<Option<Exit>>,
    /// What its stores use.
    usage: Arc<Usage>,
}

/// Runs `form: function` instances and serves them over HTTP.
pub struct FunctionRuntime {
    engine: Engine,
    linker: Linker<RequestState>,
    functions: RwLock<HashMap<String, Arc<Function>>>,
    /// Compiled components by file (path, size, modification time): many instances of
    /// one function share one compilation.
    compiled: std::sync::Mutex<HashMap<(String, u64, std::time::SystemTime), Component>>,
}

fn wasm_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Start {
        what: "the function's component".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl FunctionRuntime {
    /// An engine with the pooling allocator (room for `max_instances` concurrent
    /// requests) and epoch interruption, and its epoch ticker.
    pub fn new(max_instances: u32) -> Result<Arc<Self>, RuntimeError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances)
            .total_memories(max_instances)
            .total_tables(max_instances)
            .max_memory_size(MAX_MEMORY);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(wasm_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wasm_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(wasm_err)?;
        let ticker = engine.weak();
        // A plain thread, not a task: it must tick even while every worker runs guests.
        #[allow(clippy::disallowed_methods)]
        std::thread::Builder::new()
            .name("verge-epoch".into())
            .spawn(move || {
                while let Some(e) = ticker.upgrade() {
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(EPOCH);
                }
            })
            .map_err(|e| wasm_err(format!("epoch thread: {e}")))?;
        Ok(Arc::new(Self {
            engine,
            linker,
            functions: RwLock::new(HashMap::new()),
            compiled: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The compiled component at `path` (compiled once per file version).
    fn component(&self, path: &str) -> Result<Component, RuntimeError> {
        let start_err = |e: String| RuntimeError::Start {
            what: path.to_string(),
            source: std::io::Error::other(e),
        };
        let meta = std::fs::metadata(path).map_err(|e| start_err(e.to_string()))?;
        let key = (
            path.to_string(),
            meta.len(),
            meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        );
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let c =
            Component::from_file(&self.engine, path).map_err(|e| start_err(format!("{e:#}")))?;
        cache.retain(|k, _| k.0 != path);
        cache.insert(key, c.clone());
        Ok(c)
    }

    /// A store for one request of `f`: its memory limit, counted in its usage.
    fn new_store(&self, f: &Function, wasi: WasiCtx) -> Store<RequestState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(f.memory)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            RequestState {
                wasi,
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limits: Metered {
                    limits,
                    usage: f.usage.clone(),
                    held: 0,
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        store
    }

    /// How long instantiating function `name` takes, `n` times (for benchmarks): a
    /// fresh store and instance from the pre-instantiated component, as each request
    /// gets.
    pub async fn instantiation_times(&self, name: &str, n: usize) -> Result<Vec<Duration>, String> {
        let f = self
            .get(name)
            .ok_or_else(|| format!("no function '{name}'"))?;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let mut store = self.new_store(&f, WasiCtx::builder().build());
            store.set_epoch_deadline(u64::MAX / 2);
            let t = std::time::Instant::now();
            f.pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| format!("{e:#}"))?;
            times.push(t.elapsed());
        }
        Ok(times)
    }

    fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Serve the gateway on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    /// Answer one request: `/<instance>/<rest>` goes to that function as `/<rest>`.
    pub async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let path = req.uri().path().to_string();
        let trimmed = path.trim_start_matches('/');
        let (name, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        let Some(f) = self.get(name) else {
            return plain(
                404,
                format!("no function '{name}' on this node; call /<instance name>/<path>\n"),
            );
        };
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let (mut parts, body) = req.into_parts();
        match format!("/{rest}{query}").parse() {
            Ok(uri) => parts.uri = uri,
            Err(_) => return plain(400, "bad path\n".into()),
        }
        let req = hyper::Request::from_parts(parts, body);
        match self.call(&f, req).await {
            Ok(resp) => resp,
            Err(Failure::Timeout) => plain(
                504,
                format!(
                    "function '{name}' ran past its {} ms limit and was stopped\n",
                    f.timeout.as_millis()
                ),
            ),
            Err(Failure::Trap(e)) => {
                tracing::info!(function = name, error = %e, "function failed");
                plain(500, format!("function '{name}' failed: {e}\n"))
            }
        }
    }

    async fn call(
        &self,
        f: &Function,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>, Failure> {
        let wasi = WasiCtx::builder()
            .stdout(f.log.clone())
            .stderr(f.log.clone())
            .build();
        f.usage
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut store = self.new_store(f, wasi);
        let ticks = (f.timeout.as_millis() / EPOCH.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let trap = |e: &dyn std::fmt::Display| Failure::Trap(e.to_string());
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(|e| trap(&e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let out = store
            .data_mut()
            .http()
            .new_response_outparam(tx)
            .map_err(|e| trap(&e))?;
        let pre = f.pre.clone();
        let task = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        });
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(Failure::Trap(format!("{e:?}"))),
            Err(_) => match task.await {
                Ok(Ok(())) => Err(Failure::Trap("it never set a response".into())),
                Ok(Err(e)) => {
                    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                        Err(Failure::Timeout)
                    } else {
                        Err(Failure::Trap(format!("{e:#}")))
                    }
                }
                Err(e) => Err(Failure::Trap(e.to_string())),
            },
        }
    }
}

enum Failure {
    Timeout,
    Trap(String),
}

fn plain(status: u16, text: String) -> hyper::Response<HyperOutgoingBody> {
    let body = Full::new(bytes::Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

#[async_trait]
impl Runtime for FunctionRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }

    async fn start(&self, w: &Workload) -> Result<Running, RuntimeError> {
        let Some(spec) = &w.spec().function else {
            return Err(RuntimeError::Unsupported(w.spec().form.to_string()));
        };
        let component = self.component(&spec.component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(ProxyPre::new)
            .map_err(|e| RuntimeError::Start {
                what: spec.component.clone(),
                source: std::io::Error::other(format!(
                    "not a wasi:http/proxy component this node can run: {e:#}"
                )),
            })?;
        let log = w.prepare()?;
        let (alive, exited) = tokio::sync::watch::channel(None);
        let f = Function {
            log: wasmtime_wasi::cli::OutputFile::new(log),
            pre,
            memory: (w.spec().resources.memory.0 as usize).min(MAX_MEMORY),
            timeout: spec
                .timeout_ms
                .map_or(DEFAULT_TIMEOUT, Duration::from_millis),
            _alive: alive,
            usage: Arc::default(),
        };
        self.functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.name().to_string(), Arc::new(f));
        tracing::info!(function = w.name(), component = %spec.component, "function deployed");
        Ok(Running {
            record: RunRecord {
                driver: DRIVER.into(),
                instance: w.name().to_string(),
                pid: 0,
                start_ticks: 0,
                started_at: now_rfc3339(),
                run_id: String::new(),
            },
            exited,
        })
    }

    fn metrics(&self, instance: &str) -> Vec<(u16, f64)> {
        use std::sync::atomic::Ordering::Relaxed;
        use verge_api::metrics::{INSTANCE_MEMORY, INSTANCE_REQUESTS};
        self.get(instance).map_or_else(Vec::new, |f| {
            vec![
                (INSTANCE_MEMORY, f.usage.memory.load(Relaxed) as f64),
                (INSTANCE_REQUESTS, f.usage.requests.load(Relaxed) as f64),
            ]
        })
    }

    async fn adopt(&self, _w: &Workload, _record: &RunRecord) -> Option<Running> {
        // Functions live in the agent: a new agent deploys them again.
        None
    }

    async fn stop(&self, record: &RunRecord, _grace: Duration) -> Result<(), RuntimeError> {
        self.functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&record.instance);
        Ok(())
    }
}
