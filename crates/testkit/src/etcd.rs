//! Real etcd servers for tests: Debian's `etcd` (package `etcd-server`), one member or
//! a cluster of several, on loopback ports picked at start, each with its data in a
//! temporary directory. Members can be killed and started again.
//!
//! Nothing here fakes etcd: a test that needs it and finds no `etcd` binary fails
//! with a message saying which package to install (`scripts/test.sh` installs it).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary, overridable with `VERGE_TEST_ETCD`.
fn etcd_binary() -> String {
    std::env::var("VERGE_TEST_ETCD").unwrap_or_else(|_| "etcd".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One member of a test cluster.
pub struct Member {
    /// Its name in the cluster.
    pub name: String,
    /// Where clients connect.
    pub client: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members.
pub struct EtcdCluster {
    /// The members, in order.
    pub members: Vec<Member>,
    initial_cluster: String,
    /// With TLS on the client port: the PEM files (and what a client needs).
    pub tls: Option<ClientTls>,
    dir: tempfile::TempDir,
}

/// What a client of a TLS cluster needs: the CA, and a client certificate the members
/// require (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM CA of the members' certificates and of the client's.
    pub ca_pem: String,
    /// PEM client certificate.
    pub cert_pem: String,
    /// PEM key of the client certificate.
    pub key_pem: String,
}

impl EtcdCluster {
    /// Start `n` members and wait until the cluster answers.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, false)
    }

    /// Start `n` members that serve clients over TLS only and require a client
    /// certificate from a CA made here ([`EtcdCluster::tls`]).
    pub fn start_tls(n: usize) -> Self {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> Self {
        // Ports are picked free and then handed to etcd, which binds them a moment
        // later: on a busy machine another test can take one in between, and that
        // member exits at once ("address already in use"). So a start whose member
        // exits is tried again on fresh ports; only a member that stays up and never
        // becomes healthy (or exits every time) fails the test.
        const ATTEMPTS: usize = 4;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let mut cluster = Self::spawn_all(n, tls);
            match cluster.poll_healthy(Duration::from_secs(60)) {
                Ok(()) => return cluster,
                Err(Unhealthy::Exited(why)) if attempt < ATTEMPTS => {
                    eprintln!("etcd test cluster, attempt {attempt}: {why}; again on other ports");
                    last = why;
                }
                Err(Unhealthy::Exited(why) | Unhealthy::TimedOut(why)) => {
                    panic!("{why}")
                }
            }
        }
        panic!("{last}")
    }

    fn spawn_all(n: usize, tls: bool) -> Self {
        let dir = tempfile::tempdir_in(process_root()).expect("tempdir");
        let tls = tls.then(|| make_tls(dir.path()));
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members: Vec::new(),
            initial_cluster,
            tls,
            dir,
        };
        for m in &mut members {
            cluster.spawn(m);
        }
        cluster.members = members;
        cluster
    }

    fn spawn(&self, m: &mut Member) {
        let log = std::fs::File::create(m.dir.with_extension("log")).expect("log file");
        let scheme = self.scheme();
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--", &etcd_binary()])
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.dir.display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "verge-test",
                // Quicker elections than the defaults (100 ms / 1 s): loopback.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        if self.tls.is_some() {
            let f = |name: &str| self.dir.path().join(name).display().to_string();
            command.args([
                "--cert-file",
                &f("server.crt"),
                "--key-file",
                &f("server.key"),
                "--trusted-ca-file",
                &f("ca.crt"),
                "--client-cert-auth",
            ]);
        }
        let child = spawn_tied(command).unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install Debian's etcd-server (scripts/test.sh does)",
                etcd_binary()
            )
        });
        m.child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `etcd://` (or with TLS `etcds://`) address of every member, for
    /// `verge hub --store`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", hosts.join(","))
    }

    /// Client endpoints (`http://...`, or `https://` with TLS) of the members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://{}", self.scheme(), m.client))
            .collect()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again (after [`EtcdCluster::kill`]), on its old data.
    pub fn restart(&mut self, i: usize) {
        let mut m = std::mem::replace(
            &mut self.members[i],
            Member {
                name: String::new(),
                client: SocketAddr::from(([0, 0, 0, 0], 0)),
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                dir: PathBuf::new(),
                child: None,
            },
        );
        self.spawn(&mut m);
        self.members[i] = m;
    }

    /// Wait until every running member accepts TCP connections on its client port
    /// and the cluster has elected a leader (a member reports one through `/health`).
    /// Panics with the member's log if it exits or is not healthy `within`.
    pub fn wait_healthy(&mut self, within: Duration) {
        if let Err(Unhealthy::Exited(why) | Unhealthy::TimedOut(why)) = self.poll_healthy(within) {
            panic!("{why}")
        }
    }

    fn poll_healthy(&mut self, within: Duration) -> Result<(), Unhealthy> {
        let deadline = Instant::now() + within;
        let tls = self.tls.is_some();
        for m in self.members.iter_mut().filter(|m| m.child.is_some()) {
            loop {
                // A TLS member is not asked over plain HTTP: accepting connections
                // will do (a lone member elects itself as it starts).
                let up = if tls {
                    std::net::TcpStream::connect_timeout(&m.client, Duration::from_millis(500))
                        .is_ok()
                } else {
                    health(m.client)
                };
                if up {
                    if tls {
                        // Give it an election timeout or two to elect itself.
                        #[allow(clippy::disallowed_methods)]
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    break;
                }
                if let Some(status) = m.exit_status() {
                    return Err(Unhealthy::Exited(format!(
                        "etcd member {} exited ({status}); its log ends:\n{}",
                        m.name,
                        m.log_tail()
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(Unhealthy::TimedOut(format!(
                        "etcd member {} did not become healthy in {within:?}; its log ends:\n{}",
                        m.name,
                        m.log_tail()
                    )));
                }
                // Start-up is synchronous (tests call it before their runtime runs).
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// Why a cluster did not come up.
enum Unhealthy {
    /// A member's process ended (a port taken in between, most often).
    Exited(String),
    /// Every member runs, but one did not answer healthy in time.
    TimedOut(String),
}

impl Member {
    /// How the member's process ended, if it has (without waiting).
    fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The last lines of the member's log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// The directory this process's clusters keep their data in, removed when the process
/// ends however it ends. A cluster in a `static` (shared by the cases of a property
/// test) is never dropped, and each member preallocates 128 MB of write-ahead log:
/// left behind, a test run's clusters filled the disk in a few runs. So a watcher
/// process removes the directory once this process is gone.
fn process_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let pid = std::process::id();
        let root = std::env::temp_dir().join(format!("verge-etcd-{pid}"));
        std::fs::create_dir_all(&root).expect("etcd test directory");
        let watcher = Command::new("sh")
            .args([
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; rm -rf "$2""#,
                "verge-etcd-cleanup",
                &pid.to_string(),
                &root.display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        if let Err(e) = watcher {
            eprintln!("cannot start the cleanup of {}: {e}", root.display());
        }
        root
    })
    .clone()
}

/// Start `command` from a thread that lives as long as this process, so that the
/// child's parent-death signal (`setpriv --pdeathsig KILL`) fires when the process
/// ends however it ends: a test that panics, or whose cluster is a static that is
/// never dropped, leaves no etcd behind.
fn spawn_tied(command: Command) -> std::io::Result<Child> {
    use std::sync::mpsc;
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Req>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::spawn(move || {
            for (mut c, reply) in rx {
                let _ = reply.send(c.spawn());
            }
            // The senders live in a static: this loop, and the thread, last as long
            // as the process.
        });
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// A CA, a server certificate for loopback and a client certificate, written where
/// the members read them.
fn make_tls(dir: &std::path::Path) -> ClientTls {
    use verge_tunnel::pki::{CertAuthority, new_node_key_and_csr};
    let ca = CertAuthority::generate("etcd-test-ca").expect("CA");
    let server = ca
        .issue_server(&["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server certificate");
    let (key_pem, csr) = new_node_key_and_csr("verge-hub").expect("client key");
    let cert_pem = ca
        .sign_node_csr(&csr, "verge-hub", None, time::Duration::days(1))
        .expect("client certificate");
    for (name, pem) in [
        ("ca.crt", ca.cert_pem()),
        ("server.crt", server.cert_pem.as_str()),
        ("server.key", server.key_pem.as_str()),
    ] {
        std::fs::write(dir.join(name), pem).expect("write a TLS file");
    }
    ClientTls {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    }
}

/// Whether the member at `addr` says it is healthy (GET /health: `"health":"true"`).
fn health(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
