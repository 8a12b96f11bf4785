//! Test kit: start real `verge hub` and `verge edge` processes on loopback, drive them
//! with the real CLI, and wait for conditions without sleeping blindly.

#![allow(dead_code, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_verge");

/// The hello a raw channel session opens with: an edge of agent version `agent`
/// speaking `protocol`, with nothing to resume from.
pub fn hello(protocol: u32, agent: &str) -> verge_api::channel::EdgeToHub {
    verge_api::channel::EdgeToHub::Hello {
        protocol_version: protocol,
        agent_version: agent.into(),
        since_revision: 0,
        epoch: None,
    }
}

/// A small multi-threaded runtime for tests that drive async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed when dropped, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn term(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what its processes said last: CI keeps only the
        // test's own output, and a hub's or edge's log is usually the reason.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

fn spawn(args: &[&str], log: &Path, ready_prefix: &str) -> (Proc, String) {
    spawn_under(&[], args, log, ready_prefix)
}

/// Spawn `verge ARGS` under `prefix` (e.g. `prlimit --nofile=1024:1024`), and wait for
/// the line starting with `ready_prefix`.
pub fn spawn_under(
    prefix: &[&str],
    args: &[&str],
    log: &Path,
    ready_prefix: &str,
) -> (Proc, String) {
    let (program, before) = match prefix.split_first() {
        Some((p, rest)) => (*p, rest.iter().copied().chain([BIN]).collect::<Vec<_>>()),
        None => (BIN, Vec::new()),
    };
    let mut child = Command::new(program)
        .args(before)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .process_group(0)
        .spawn()
        .expect("spawn verge");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut proc = Proc {
        child,
        log: log.to_path_buf(),
    };
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with(ready_prefix) => break l,
            Some(Ok(_)) => continue,
            _ => {
                let status = proc.exited();
                panic!(
                    "{args:?} exited before ready ({status:?}):\n{}",
                    proc.log_text()
                );
            }
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (proc, line)
}

use std::os::unix::process::CommandExt;

/// A running hub.
pub struct Hub {
    pub proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
}

impl Hub {
    pub fn start(dir: &Path) -> Hub {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> Hub {
        Self::start_with(dir, port, &[])
    }

    /// Start with extra `verge hub` arguments.
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Hub {
        Self::start_under(&[], dir, port, extra)
    }

    /// Start under a wrapper command (e.g. `prlimit ...`), with extra arguments.
    pub fn start_under(prefix: &[&str], dir: &Path, port: u16, extra: &[&str]) -> Hub {
        std::fs::create_dir_all(dir).expect("dir");
        let listen = format!("127.0.0.1:{port}");
        let data = dir.join("hub");
        let log = dir.join(format!("hub-{}.log", rand_suffix()));
        let mut args = vec![
            "hub",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("utf8"),
        ];
        // Short defaults for tests, unless the test gives its own. A debug build on a
        // machine running other tests lags far more than a release hub does: shed
        // new connections only when that is well past what such a machine shows.
        for (flag, value) in [
            ("--node-grace", "3s"),
            ("--heartbeat", "500ms"),
            ("--shed-lag", "2s"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let (proc, _) = spawn_under(prefix, &args, &log, "hub ready");
        Hub {
            proc,
            dir: dir.to_path_buf(),
            port,
            url: format!("https://127.0.0.1:{port}"),
        }
    }

    pub fn admin_conf(&self) -> PathBuf {
        self.dir.join("hub").join("admin.conf")
    }

    /// Run the CLI against this hub.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with(&self.admin_conf(), args, None)
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "verge {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, manifest: &str) -> Output {
        cli_with(&self.admin_conf(), &["apply", "-f", "-"], Some(manifest))
    }

    pub fn token(&self, uses: u32) -> String {
        self.ok(&["token", "create", "--uses", &uses.to_string()])
            .trim()
            .to_string()
    }

    /// `verge get KIND NAME -o json` as JSON (None if it fails).
    pub fn get_json(&self, kind: &str, name: &str) -> Option<serde_json::Value> {
        let out = self.cli(&["get", kind, name, "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    }

    pub fn list_json(&self, kind: &str) -> Vec<serde_json::Value> {
        let out = self.ok(&["get", kind, "-o", "json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("json array")
    }

    /// Delete instances and wait until the processes carrying `markers` are gone.
    pub fn cleanup(&self, names: &[&str], markers: &[&str]) {
        for n in names {
            let _ = self.cli(&["delete", "instance", n]);
        }
        for m in markers {
            wait_for("cleanup", Duration::from_secs(30), || {
                pids_with(m).is_empty().then_some(())
            });
        }
    }

    /// The hub's `/metrics` text.
    pub fn metrics_text(&self) -> String {
        runtime().block_on(async {
            api_client(self, None)
                .get(format!("{}/metrics", self.url))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        })
    }

    /// The value of the hub's metric series `series` (name and labels, as the text
    /// format writes them), 0 when it is absent.
    pub fn metric(&self, series: &str) -> u64 {
        self.metrics_text()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Wait until instance `name` runs (within a minute), and return its pid.
    pub fn running_pid(&self, name: &str) -> u64 {
        self.wait_phase("instances", name, "Running", Duration::from_secs(60))["status"]["pid"]
            .as_u64()
            .expect("pid")
    }

    pub fn wait_phase(
        &self,
        kind: &str,
        name: &str,
        phase: &str,
        timeout: Duration,
    ) -> serde_json::Value {
        let mut last = None;
        let start = Instant::now();
        loop {
            let got = self.get_json(kind, name);
            if let Some(v) = got.as_ref().filter(|v| v["status"]["phase"] == phase) {
                return v.clone();
            }
            last = got.or(last);
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {kind}/{name} to be {phase}; last seen: {}",
                last.map_or("nothing".to_string(), |v| v["status"].to_string())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn cli_with(conf: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(conf).args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cli");
    if let Some(text) = stdin {
        use std::io::Write;
        let mut s = child.stdin.take().expect("stdin");
        s.write_all(text.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("cli output")
}

/// A running edge agent.
pub struct Edge {
    pub proc: Proc,
    pub name: String,
    pub dir: PathBuf,
    /// Where the agent serves /metrics.
    pub metrics: String,
}

impl Edge {
    pub fn start(hub: &Hub, name: &str, token: Option<&str>) -> Edge {
        let dir = hub.dir.join(name);
        Self::start_in(&hub.url, name, token, &dir)
    }

    pub fn start_in(url: &str, name: &str, token: Option<&str>, dir: &Path) -> Edge {
        Self::start_with(url, name, token, dir, &[])
    }

    /// Start with extra arguments (later `--label`s override the defaults).
    pub fn start_with(
        url: &str,
        name: &str,
        token: Option<&str>,
        dir: &Path,
        extra: &[&str],
    ) -> Edge {
        let log = dir.with_extension(format!("{}.log", rand_suffix()));
        let mut args = vec![
            "edge",
            "--hub",
            url,
            "--name",
            name,
            "--data-dir",
            dir.to_str().expect("utf8"),
            "--memory",
            "4Gi",
            "--metrics-listen",
            "127.0.0.1:0",
            "--label",
            "region=eu-west",
            "--label",
            "tier=near",
        ];
        if let Some(t) = token {
            args.push("--join-token");
            args.push(t);
        }
        if !extra.contains(&"--cpu") {
            args.extend_from_slice(&["--cpu", "2"]);
        }
        args.extend_from_slice(extra);
        let (proc, line) = spawn(&args, &log, "edge ready");
        let metrics = line.trim_start_matches("edge ready metrics=").to_string();
        Edge {
            proc,
            name: name.to_string(),
            dir: dir.to_path_buf(),
            metrics,
        }
    }

    /// Start an edge expected to fail; returns its exit status and log.
    pub fn start_failing(
        url: &str,
        name: &str,
        token: &str,
        dir: &Path,
    ) -> (std::process::ExitStatus, String) {
        let log = dir.with_extension("fail.log");
        let mut child = Command::new(BIN)
            .args([
                "edge",
                "--hub",
                url,
                "--name",
                name,
                "--data-dir",
                dir.to_str().expect("utf8"),
                "--join-token",
                token,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn edge");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                // Do not leave it running behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the edge should have given up:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }
}

/// Pids of processes whose command line contains `marker`.
pub fn pids_with(marker: &str) -> Vec<u32> {
    // (pid, parent) of every live process carrying the marker.
    let mut found: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // Skip zombies: they have exited.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = state.rsplit(')').next().unwrap_or_default();
        let mut fields = after.split_whitespace();
        let zombie = fields.next() == Some("Z");
        let parent = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if cmd.contains(marker) && !zombie {
            found.push((pid, parent));
        }
    }
    // A shell forking its next `sleep` shows the marker in the child for a moment,
    // until the child execs: that is the same workload, not a second copy.
    let all: Vec<u32> = found.iter().map(|(p, _)| *p).collect();
    found
        .into_iter()
        .filter(|(_, parent)| !all.contains(parent))
        .map(|(p, _)| p)
        .collect()
}

/// A manifest for a process instance whose command line carries `marker`.
pub fn sleeper(name: &str, marker: &str) -> String {
    format!(
        "kind: Instance\nmetadata:\n  name: {name}\nspec:\n  form: process\n  process:\n    command: [\"/bin/sh\", \"-c\", \"echo started {marker}; while :; do sleep 1; done\"]\n  resources: {{cpu: 100m, memory: 16Mi}}\n  terminationGracePeriodSeconds: 2\n"
    )
}

pub fn kill_pid(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        rand_suffix() % 1_000_000_007
    )
}

/// A test's scratch directory. When dropped (at the end of the test, or while a failing
/// test unwinds) it also kills every process still working inside it, so workloads that
/// outlive their agent by design never outlive the test.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let root = self.0.path().to_string_lossy().into_owned();
        // VERGE_TEST_KEEP=1 keeps a failed test's directory (logs of every process).
        if std::thread::panicking() && std::env::var_os("VERGE_TEST_KEEP").is_some() {
            eprintln!("kept the test directory {root}");
            self.0.disable_cleanup(true);
        }
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
                continue;
            };
            if cwd.to_string_lossy().starts_with(&root) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // A container's root file system stays mounted when its agent is killed (on
        // purpose: the workload runs on). Left mounted, the directory cannot be
        // removed and every run leaves an overlay behind; so unmount what is mounted
        // under it, deepest first, detached from whatever still holds it.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A fresh [`TestDir`].
pub fn test_dir() -> TestDir {
    // Workloads run as nobody: they must be able to pass through to their work
    // directories, as under /var/lib in production.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    TestDir(dir)
}

/// An HTTP client for the hub's API, trusting its CA; with `identity` (an edge's data
/// dir) it presents that node's certificate.
pub fn api_client(hub: &Hub, identity: Option<&std::path::Path>) -> reqwest::Client {
    verge_tunnel::install_crypto_provider();
    let ca_dir = hub.dir.join("hub").join("ca.crt");
    let ca = std::fs::read_to_string(ca_dir).expect("ca");
    let id = identity.map(|dir| {
        (
            std::fs::read_to_string(dir.join("identity/node.crt")).expect("crt"),
            std::fs::read_to_string(dir.join("identity/node.key")).expect("key"),
        )
    });
    let cfg = verge_tunnel::tls::client_config(
        &ca,
        id.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        &[b"http/1.1"],
    )
    .expect("tls");
    reqwest::Client::builder()
        .tls_backend_preconfigured((*cfg).clone())
        .build()
        .expect("client")
}

/// `PUT /v1/instances/NAME/status` as the admin (what a hub's scheduler would write).
pub fn put_instance_status(hub: &Hub, name: &str, status: serde_json::Value) -> u16 {
    let conf = verge_hub::ClientConfig::load(&hub.admin_conf()).expect("admin.conf");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        api_client(hub, None)
            .put(format!("{}/v1/instances/{name}/status", hub.url))
            .bearer_auth(conf.token)
            .json(&serde_json::json!({ "status": status }))
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    })
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// `docker-registry` on a free loopback port, stopped on drop.
pub struct Registry {
    /// The registry process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Registry {
    /// Start one keeping its data under `dir`.
    pub fn start(dir: &std::path::Path) -> Registry {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            verge_artifacts::registry_config(&dir.join("registry-data"), &addr),
        )
        .expect("config");
        let log = dir.join("registry.log");
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.join("registry.err")).expect("log"))
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let r = Registry {
            proc: Proc { child, log },
            addr,
        };
        wait_for("the registry", Duration::from_secs(60), || {
            std::net::TcpStream::connect(&r.addr).ok()
        });
        r
    }
}

/// A TCP echo server on loopback (the port an instance serves; process instances
/// share the node's network, so the test can serve it).
pub fn echo_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// Send `payload` to `addr`, close the sending side, and read everything back.
pub fn round_trip(addr: &str, payload: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = s.try_clone().expect("dup");
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || {
        // Fails when a refused forward has closed the connection already.
        let _ = w.write_all(&payload);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        // A refused forward closes the connection with our bytes unread: a reset.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("read to end: {e}"),
    }
    let _ = writer.join();
    got
}

/// Build a busybox image and push it to `reference`.
#[cfg(feature = "container")]
pub fn push_busybox(reference: &str, registry: &str) {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let layer = verge_container::image::layer_tar_gz(
        &[("bin/busybox", 0o755, &busybox)],
        &[
            ("bin/sh", "busybox"),
            ("bin/sleep", "busybox"),
            ("bin/head", "busybox"),
            ("bin/tr", "busybox"),
            ("bin/hostname", "busybox"),
            ("bin/httpd", "busybox"),
            ("bin/mkdir", "busybox"),
        ],
    );
    verge_tunnel::install_crypto_provider();
    let store = verge_container::image::ImageStore::new(
        tempfile::tempdir().expect("tmp").keep(),
        vec![registry.to_string()],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(store.push(
        reference,
        layer,
        serde_json::json!({"Cmd": ["/bin/sh", "-c", "echo from image cmd"], "Env": ["PATH=/bin"]}),
    ))
    .expect("push");
}

/// A container instance running `script` in `image`.
pub fn container(name: &str, image: &str, memory: &str, script: &str, extra: &str) -> String {
    format!(
        "kind: Instance\nmetadata: {{name: {name}}}\nspec:\n  form: container\n  container:\n    image: {image}\n    command: [/bin/sh, -c, '{script}']\n  resources: {{cpu: 200m, memory: {memory}}}\n  terminationGracePeriodSeconds: 2\n{extra}"
    )
}

/// A plain HTTP/1.0 GET to `addr` (a node's function gateway): status and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: fn\r\n\r\n").as_bytes())
        .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}
