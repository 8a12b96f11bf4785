//! A minimal QMP (QEMU Machine Protocol) client: JSON lines over a unix socket.
//!
//! QEMU greets with `{"QMP": ...}`; the client must send `qmp_capabilities` before any
//! other command. Replies are `{"return": ...}` or `{"error": {"class", "desc"}}`;
//! asynchronous `{"event": ...}` lines may come in between and are skipped here.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or closed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

/// A QMP session.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// How long QEMU has to answer one command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (r, writer) = stream.into_split();
        let mut q = Self {
            reader: BufReader::new(r),
            writer,
        };
        let greeting = q.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        q.execute("qmp_capabilities").await?;
        Ok(q)
    }

    async fn next_message(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(ANSWER_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Protocol("QEMU did not answer in time".into()))??;
        if n == 0 {
            return Err(QmpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Run `command` (no arguments) and return its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<serde_json::Value, QmpError> {
        let mut req = serde_json::to_vec(&serde_json::json!({ "execute": command }))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        req.push(b'\n');
        self.writer.write_all(&req).await?;
        loop {
            let msg = self.next_message().await?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // An event: not the answer.
        }
    }
}
