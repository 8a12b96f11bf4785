//! `verge exec` and `verge port-forward`: data streams through the hub to an instance
//! on an edge that is reachable only through its own outbound channel.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_tunnel::chunk::{Chunk, bridge, read_chunk, write_chunk};

use crate::client::Client;

/// Puts the local terminal in raw mode for the life of the value (keys go to the
/// remote terminal as typed, Ctrl-C included), and restores it after.
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if tcsetattr(&stdin, OptionalActions::Now, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// The local terminal's size, if there is one.
fn terminal_size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Run `command` in `instance`; returns the command's exit code.
///
/// With `tty` the command gets a terminal on the node; when the local standard input
/// is a terminal too it is put in raw mode and window size changes are sent along.
/// With `stdin`, local input is sent to the command (end of input closes its input).
pub async fn exec(
    client: &Client,
    instance: &str,
    command: &[String],
    stdin: bool,
    tty: bool,
) -> Result<i32> {
    if command.is_empty() {
        bail!("no command given: use `verge exec {instance} -- COMMAND [ARGS...]`");
    }
    let local_tty = rustix::termios::isatty(std::io::stdin());
    let (cols, rows) = if tty {
        terminal_size().unwrap_or((80, 24))
    } else {
        (0, 0)
    };
    let command_json = serde_json::to_string(command)?;
    let (cols_s, rows_s) = (cols.to_string(), rows.to_string());
    let io = client
        .upgrade(
            &format!("/v1/instances/{instance}/exec"),
            &[
                ("command", &command_json),
                ("tty", if tty { "true" } else { "false" }),
                ("cols", &cols_s),
                ("rows", &rows_s),
            ],
        )
        .await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    if !stdin && !tty {
        // No input for the command: its standard input ends at once.
        write_chunk(&mut wr, &Chunk::Eof).await?;
    }
    let _raw = (tty && local_tty).then(RawTerminal::enter);
    let input = async {
        let mut winch = if tty && local_tty {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
        } else {
            None
        };
        let mut local = tokio::io::stdin();
        let mut buf = vec![0u8; 16 << 10];
        let mut open = stdin;
        loop {
            tokio::select! {
                n = local.read(&mut buf), if open => {
                    let c = match n {
                        Ok(0) | Err(_) => { open = false; Chunk::Eof }
                        Ok(n) => Chunk::Data(buf[..n].to_vec()),
                    };
                    if write_chunk(&mut wr, &c).await.is_err() { break; }
                }
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    if let Some((cols, rows)) = terminal_size()
                        && write_chunk(&mut wr, &Chunk::Resize { cols, rows }).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    let output = async {
        let mut out = tokio::io::stdout();
        let mut err = tokio::io::stderr();
        loop {
            match read_chunk(&mut rd).await {
                Ok(Some(Chunk::Data(b))) => {
                    out.write_all(&b).await?;
                    out.flush().await?;
                }
                Ok(Some(Chunk::Stderr(b))) => {
                    err.write_all(&b).await?;
                    err.flush().await?;
                }
                Ok(Some(Chunk::Exit(code))) => return Ok(code),
                Ok(Some(Chunk::Error(m))) => bail!("exec ended: {m}"),
                Ok(Some(_)) => {}
                Ok(None) => bail!("exec ended: the hub closed the stream without an exit code"),
                Err(e) => bail!("exec ended: {e}"),
            }
        }
    };
    tokio::select! {
        r = output => r,
        _ = input => unreachable!("input never ends on its own"),
    }
}

/// Parse `LOCAL:REMOTE` (or just `PORT` for both). LOCAL may be 0 (any free port).
pub fn parse_local_remote(spec: &str) -> Result<(u16, u16)> {
    let port = |s: &str| -> Result<u16> {
        s.parse::<u16>().ok().with_context(|| {
            format!("'{s}' in '{spec}' is not a port (0-65535); use LOCAL:REMOTE, e.g. 8080:80")
        })
    };
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (port(l)?, port(r)?),
        None => (port(spec)?, port(spec)?),
    };
    if remote == 0 {
        bail!("the remote port in '{spec}' must be 1-65535; use LOCAL:REMOTE, e.g. 8080:80");
    }
    Ok((local, remote))
}

/// Listen on `address:local` and forward each connection to port `remote` of
/// `instance`, each over its own data stream. Runs until interrupted; a connection
/// whose stream breaks (the edge's channel was lost) is closed with a message, and
/// the next connection goes over the edge's new channel.
pub async fn port_forward(
    client: std::sync::Arc<Client>,
    instance: &str,
    address: &str,
    (local, remote): (u16, u16),
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((address, local))
        .await
        .with_context(|| format!("listening on {address}:{local}"))?;
    let bound = listener.local_addr()?;
    ready(bound);
    let path = format!("/v1/instances/{instance}/portforward");
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (client, path) = (client.clone(), path.clone());
        tokio::spawn(async move {
            let port = remote.to_string();
            let result = match client.upgrade(&path, &[("port", &port)]).await {
                Ok(io) => bridge(io, tcp).await,
                Err(e) => Err(format!("{e:#}")),
            };
            if let Err(why) = result {
                eprintln!("port-forward: connection from {peer} ended: {why}");
            }
        });
    }
}
