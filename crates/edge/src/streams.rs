//! Data streams the edge opens to the hub: logs, exec and port-forward at the hub's
//! request, and relayed connections of its instances' links ([`crate::links`]).
//!
//! Over QUIC a data stream is a new bidirectional stream of the channel's connection;
//! over TLS/TCP it is a new connection with ALPN `verge-stream/1`. Either way it has
//! its own flow control, so a log transfer or a busy port-forward never delays the
//! control stream's heartbeats. After a JSON hello the stream speaks chunks
//! (`verge_tunnel::chunk`).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use verge_api::channel::{StreamHello, StreamPurpose};
use verge_tunnel::chunk::{Chunk, DATA_CHUNK, bridge, read_chunk, write_chunk};
use verge_tunnel::frame::write_msg;
use verge_tunnel::quic::Duplex;

use crate::agent::Agent;

/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// An idle followed log sends a ping this often, which keeps NAT mappings alive and
/// notices a reader that went away.
const PING_EVERY: Duration = Duration::from_secs(20);

/// Opens data streams to the hub over the current session's transport.
#[derive(Clone)]
pub enum Opener {
    /// A new stream of the session's QUIC connection.
    Quic(quinn::Connection),
    /// A new TLS connection to the session's endpoint.
    Tls {
        /// Hub endpoint `host:port`.
        addr: String,
        /// The local address to connect from (`None`: the system picks).
        source: Option<std::net::IpAddr>,
        /// Client configuration (node certificate, ALPN `verge-stream/1`).
        config: Arc<rustls::ClientConfig>,
    },
}

impl Opener {
    /// Open a data stream and send its hello.
    pub async fn open(&self, hello: &StreamHello) -> Result<Box<dyn Duplex>, String> {
        let mut io: Box<dyn Duplex> = match self {
            Self::Quic(conn) => {
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| format!("opening a QUIC stream: {e}"))?;
                Box::new(tokio::io::join(recv, send))
            }
            Self::Tls {
                addr,
                source,
                config,
            } => Box::new(
                tokio::time::timeout(
                    Duration::from_secs(10),
                    verge_tunnel::tls::dial_from(addr, config.clone(), *source),
                )
                .await
                .map_err(|_| format!("connecting to {addr} timed out"))?
                .map_err(|e| e.to_string())?,
            ),
        };
        write_msg(&mut io, hello)
            .await
            .map_err(|e| format!("stream hello: {e}"))?;
        Ok(io)
    }
}

/// The current session's [`Opener`] (none while disconnected), shared with the link
/// listeners.
#[derive(Clone, Default)]
pub struct CurrentOpener(Arc<Mutex<Option<Opener>>>);

impl CurrentOpener {
    /// Set (on connect) or clear (on disconnect).
    pub fn set(&self, o: Option<Opener>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = o;
    }
    /// The opener, if connected.
    pub fn get(&self) -> Option<Opener> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Open the stream the hub asked for (`id`) and serve `purpose` on it.
pub async fn serve(opener: Opener, agent: Arc<Agent>, id: u64, purpose: StreamPurpose) {
    let io = match opener.open(&StreamHello::Accept { id }).await {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(id, error = %e, "could not open the data stream the hub asked for");
            return;
        }
    };
    match purpose {
        StreamPurpose::Logs {
            instance,
            tail_bytes,
            follow,
        } => logs(&agent, io, &instance, tail_bytes, follow).await,
        StreamPurpose::PortForward { instance, port } => {
            if let Err(e) = port_forward(&agent, io, &instance, port).await {
                tracing::info!(instance, port, reason = %e, "port-forward ended");
            }
        }
        StreamPurpose::Exec {
            instance,
            command,
            tty,
            cols,
            rows,
        } => exec(&agent, io, &instance, &command, tty, (cols, rows)).await,
    }
}

/// End a stream with an error the user will see.
async fn fail<W: AsyncWrite + Unpin>(mut io: W, message: String) {
    let _ = write_chunk(&mut io, &Chunk::Error(message)).await;
    let _ = io.shutdown().await;
}

/// The tail of an instance's log and, with `follow`, what it writes next. Reads are
/// async and bounded, so a chatty instance cannot stall the agent.
async fn logs(agent: &Agent, mut io: Box<dyn Duplex>, instance: &str, tail: u64, follow: bool) {
    use tokio::io::AsyncSeekExt;
    let Some(path) = agent.log_path(instance) else {
        return fail(io, format!("no instance '{instance}' on this node")).await;
    };
    let len_of = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut pos = len_of(&path).saturating_sub(tail);
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut idle = Duration::ZERO;
    let mut rotations = agent.log_rotations(instance);
    loop {
        let len = len_of(&path);
        let now = agent.log_rotations(instance);
        if len < pos || now != rotations {
            // Rotated (emptied in place) or truncated: read the log from its start.
            rotations = now;
            pos = 0;
        }
        if pos < len {
            let mut f = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) => return fail(io, format!("reading {}: {e}", path.display())).await,
            };
            if f.seek(std::io::SeekFrom::Start(pos)).await.is_err() {
                return fail(io, format!("seeking in {}", path.display())).await;
            }
            while pos < len {
                let want = ((len - pos) as usize).min(buf.len());
                let n = match f.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                pos += n as u64;
                if write_chunk(&mut io, &Chunk::Data(buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            idle = Duration::ZERO;
        }
        if !follow {
            let _ = write_chunk(&mut io, &Chunk::Eof).await;
            let _ = io.shutdown().await;
            return;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
        idle += FOLLOW_POLL;
        if idle >= PING_EVERY {
            idle = Duration::ZERO;
            if write_chunk(&mut io, &Chunk::Ping).await.is_err() {
                return;
            }
        }
        if agent.log_path(instance).is_none() {
            return fail(
                io,
                format!("instance '{instance}' was removed from this node"),
            )
            .await;
        }
    }
}

/// Connect to `port` on this node for `instance` and join it to the stream.
pub async fn port_forward(
    agent: &Agent,
    mut io: Box<dyn Duplex>,
    instance: &str,
    port: u16,
) -> Result<(), String> {
    if agent.instance(instance).is_none() {
        let why = format!("no instance '{instance}' on this node");
        fail(io, why.clone()).await;
        return Err(why);
    }
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let tcp = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = format!("connecting to port {port} of instance '{instance}': {e}");
            let _ = write_chunk(&mut io, &Chunk::Error(why.clone())).await;
            return Err(why);
        }
        Err(_) => {
            let why = format!("connecting to port {port} of instance '{instance}' timed out");
            let _ = write_chunk(&mut io, &Chunk::Error(why.clone())).await;
            return Err(why);
        }
    };
    let _ = tcp.set_nodelay(true);
    bridge(io, tcp).await
}

/// A pseudo-terminal: the master side stays with the agent, the slave becomes the
/// command's terminal.
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, std::fs::File)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    resize(&master, cols, rows);
    Ok((master, slave))
}

fn resize(master: &OwnedFd, cols: u16, rows: u16) {
    if cols > 0 && rows > 0 {
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let _ = rustix::termios::tcsetwinsize(master, ws);
    }
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A started exec command and its plumbing.
struct Started {
    child: tokio::process::Child,
    stdin: Writer,
    /// Output streams, `true` for standard error.
    outputs: Vec<(Reader, bool)>,
    /// The terminal's master, for resizes (tty only).
    pty: Option<OwnedFd>,
}

fn start(spec: &verge_runtime::ExecSpec, tty: bool, size: (u16, u16)) -> std::io::Result<Started> {
    use std::process::Stdio;
    if spec.user.is_some() {
        verge_runtime::process::find_program(&spec.argv[0])?;
    }
    let argv = spec.argv_as_user();
    let mut cmd = if tty {
        // `setsid --ctty` makes the terminal the command's controlling terminal (job
        // control, Ctrl-C, SIGWINCH) without any unsafe code in the agent.
        let mut c = tokio::process::Command::new("setsid");
        c.arg("--ctty").args(&argv);
        c
    } else {
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    // A command in a workload gets the workload's environment, not the agent's.
    if spec.user.is_some() {
        cmd.env_clear();
    }
    if tty && !spec.env.contains_key("TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(&spec.env)
        .current_dir(&spec.cwd)
        .kill_on_drop(true);
    if tty {
        let (master, slave) = open_pty(size.0, size.1)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn()?;
        // `cmd` still holds the slave; drop it so the master sees EOF when the
        // command's side closes.
        drop(cmd);
        let read = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
        let write = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
        return Ok(Started {
            child,
            stdin: Box::new(write),
            outputs: vec![(Box::new(read), false)],
            pty: Some(master),
        });
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let missing = || std::io::Error::other("child pipes missing");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Started {
        child,
        stdin: Box::new(stdin),
        outputs: vec![(Box::new(stdout), false), (Box::new(stderr), true)],
        pty: None,
    })
}

/// Run a command inside an instance's environment, joined to the stream: input and
/// resizes in, output out, then its exit code. The command is killed if the stream
/// goes away first.
async fn exec(
    agent: &Agent,
    io: Box<dyn Duplex>,
    instance: &str,
    command: &[String],
    tty: bool,
    size: (u16, u16),
) {
    let spec = match agent.exec_spec(instance, command) {
        Ok(s) => s,
        Err(e) => return fail(io, e).await,
    };
    let started = match start(&spec, tty, size) {
        Ok(s) => s,
        Err(e) => {
            return fail(io, format!("could not start {:?}: {e}", spec.argv[0])).await;
        }
    };
    tracing::info!(instance, command = ?spec.argv, tty, "exec started");
    let Started {
        mut child,
        stdin,
        outputs,
        pty,
    } = started;
    // Dropped (closed) when the client's input ends.
    let mut stdin = Some(stdin);
    let (mut rd, wr) = tokio::io::split(io);
    let wr = tokio::sync::Mutex::new(wr);
    let output = futures_util::future::join_all(outputs.into_iter().map(|(mut r, err)| {
        let wr = &wr;
        async move {
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                // A terminal's master reads EIO once the command's side is closed.
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let bytes = buf[..n].to_vec();
                let c = if err {
                    Chunk::Stderr(bytes)
                } else {
                    Chunk::Data(bytes)
                };
                if write_chunk(&mut *wr.lock().await, &c).await.is_err() {
                    return;
                }
            }
        }
    }));
    let input = async {
        loop {
            match read_chunk(&mut rd).await {
                Ok(Some(Chunk::Data(b))) => {
                    if let Some(w) = stdin.as_mut()
                        && (w.write_all(&b).await.is_err() || w.flush().await.is_err())
                    {
                        // The command closed its input; keep serving output.
                        stdin = None;
                    }
                }
                Ok(Some(Chunk::Resize { cols, rows })) => {
                    if let Some(m) = &pty {
                        resize(m, cols, rows);
                    }
                }
                Ok(Some(Chunk::Eof)) => {
                    if let (Some(_), Some(w)) = (&pty, stdin.as_mut()) {
                        // End of input on a terminal is the EOF character.
                        let _ = w.write_all(&[4]).await;
                        let _ = w.flush().await;
                    } else {
                        stdin = None;
                    }
                }
                Ok(Some(Chunk::Ping)) => {}
                _ => return,
            }
        }
    };
    // The futures borrow the stream's write half; they are gone at the end of this
    // block, before the exit code is written.
    let status = {
        tokio::pin!(output, input);
        let mut output_done = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = &mut output, if !output_done => output_done = true,
                _ = &mut input => {
                    tracing::info!(instance, "exec client went away; stopping the command");
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return;
                }
            }
        };
        // Whatever the command wrote last is still in the pipe or terminal: drain it,
        // but do not wait for a background child that keeps the terminal open.
        if !output_done {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut output).await;
        }
        status
    };
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
        }),
        Err(_) => 255,
    };
    tracing::info!(instance, code, "exec ended");
    let mut wr = wr.into_inner();
    let _ = write_chunk(&mut wr, &Chunk::Exit(code)).await;
    let _ = wr.shutdown().await;
}
