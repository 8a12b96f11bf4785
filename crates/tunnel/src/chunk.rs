//! Chunks: the framing of a data stream (logs, exec, port-forward, relay) after its
//! first JSON frame. Bytes dominate there, so a chunk is binary: a one-byte tag, a
//! four-byte big-endian length, then the payload. The hub relays data streams chunk by
//! chunk, which is what lets it end a stream with an [`Chunk::Error`] at a chunk
//! boundary when the other side goes away.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::FrameError;

/// Largest chunk payload accepted (1 MiB). Writers send at most [`DATA_CHUNK`].
pub const MAX_CHUNK: usize = 1 << 20;
/// Size of the data chunks writers produce.
pub const DATA_CHUNK: usize = 64 << 10;

/// One unit on a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes of the stream (stdout, or the forwarded connection).
    Data(Vec<u8>),
    /// Bytes of a command's standard error (exec without a terminal).
    Stderr(Vec<u8>),
    /// The sender will send no more data (half-close).
    Eof,
    /// The terminal was resized.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The command exited with this code; the stream ends.
    Exit(i32),
    /// The stream ends because of this; shown to the user as is.
    Error(String),
    /// Keeps an idle stream's NAT mapping alive; ignored.
    Ping,
}

const DATA: u8 = 0;
const STDERR: u8 = 1;
const EOF: u8 = 2;
const RESIZE: u8 = 3;
const EXIT: u8 = 4;
const ERROR: u8 = 5;
const PING: u8 = 6;

impl Chunk {
    /// Build a chunk from its tag and payload (pure; what the reader and fuzzers use).
    pub fn from_parts(tag: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        let bad = |what: &str| FrameError::Malformed(format!("chunk tag {tag}: {what}"));
        let fixed = |n: usize| {
            if payload.len() == n {
                Ok(())
            } else {
                Err(bad(&format!(
                    "payload is {} bytes, expected {n}",
                    payload.len()
                )))
            }
        };
        Ok(match tag {
            DATA => Self::Data(payload),
            STDERR => Self::Stderr(payload),
            EOF => {
                fixed(0)?;
                Self::Eof
            }
            RESIZE => {
                fixed(4)?;
                Self::Resize {
                    cols: u16::from_be_bytes([payload[0], payload[1]]),
                    rows: u16::from_be_bytes([payload[2], payload[3]]),
                }
            }
            EXIT => {
                fixed(4)?;
                Self::Exit(i32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]))
            }
            ERROR => Self::Error(String::from_utf8_lossy(&payload).into_owned()),
            PING => {
                fixed(0)?;
                Self::Ping
            }
            _ => return Err(bad("unknown tag")),
        })
    }

    /// The chunk on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Self::Data(b) => (DATA, b.into()),
            Self::Stderr(b) => (STDERR, b.into()),
            Self::Eof => (EOF, (&[][..]).into()),
            Self::Resize { cols, rows } => {
                let mut p = cols.to_be_bytes().to_vec();
                p.extend_from_slice(&rows.to_be_bytes());
                (RESIZE, p.into())
            }
            Self::Exit(code) => (EXIT, code.to_be_bytes().to_vec().into()),
            Self::Error(m) => (ERROR, m.as_bytes().into()),
            Self::Ping => (PING, (&[][..]).into()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(tag);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

/// Read one chunk; `Ok(None)` at a clean end of stream.
pub async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Chunk>, FrameError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_CHUNK {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_CHUNK,
        });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Chunk::from_parts(head[0], payload).map(Some)
}

/// Write one chunk and flush it.
pub async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, c: &Chunk) -> std::io::Result<()> {
    w.write_all(&c.encode()).await?;
    w.flush().await
}

/// Copy a byte stream into `Data` chunks until it ends, then send `Eof`.
pub async fn pump_bytes<R, W>(from: &mut R, to: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            write_chunk(to, &Chunk::Eof).await?;
            return Ok(total);
        }
        total += n as u64;
        write_chunk(to, &Chunk::Data(buf[..n].to_vec())).await?;
    }
}

/// Join a data stream to a plain byte connection (a TCP connection being forwarded):
/// bytes from `conn` go out as `Data` chunks, `Data` chunks come in as bytes, and a
/// half-close travels as `Eof` either way. Ends when both directions are done, or with
/// `Err(reason)` when the stream ends without a clean `Eof` (the reason comes from an
/// `Error` chunk when the far side sent one).
pub async fn bridge<S, C>(stream: S, conn: C) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sr, mut sw) = tokio::io::split(stream);
    let (mut cr, mut cw) = tokio::io::split(conn);
    let outgoing = async {
        pump_bytes(&mut cr, &mut sw)
            .await
            .map(|_| ())
            .map_err(|e| format!("forwarding: {e}"))
    };
    let incoming = async {
        loop {
            match read_chunk(&mut sr).await {
                Ok(Some(Chunk::Data(b) | Chunk::Stderr(b))) => {
                    if let Err(e) = cw.write_all(&b).await {
                        return Err(format!("forwarding: {e}"));
                    }
                }
                Ok(Some(Chunk::Eof | Chunk::Exit(_))) => {
                    let _ = cw.shutdown().await;
                    return Ok(());
                }
                Ok(Some(Chunk::Ping | Chunk::Resize { .. })) => {}
                Ok(Some(Chunk::Error(m))) => return Err(m),
                Ok(None) => return Err("the stream closed before the connection ended".into()),
                Err(e) => return Err(format!("stream: {e}")),
            }
        }
    };
    tokio::pin!(outgoing, incoming);
    let (mut out_done, mut in_done) = (false, false);
    while !(out_done && in_done) {
        tokio::select! {
            r = &mut outgoing, if !out_done => {
                if let Err(e) = r {
                    // The stream stopped taking data: the far side has usually sent an
                    // `Error` saying why, which explains more than a broken pipe.
                    if !in_done
                        && let Ok(Err(why)) =
                            tokio::time::timeout(std::time::Duration::from_secs(2), &mut incoming).await
                    {
                        return Err(why);
                    }
                    return Err(e);
                }
                out_done = true;
            }
            r = &mut incoming, if !in_done => { r?; in_done = true; }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_chunk_round_trips_and_bad_ones_are_refused() {
        let all = [
            Chunk::Data(b"hello".to_vec()),
            Chunk::Data(vec![]),
            Chunk::Stderr(vec![0, 255]),
            Chunk::Eof,
            Chunk::Resize {
                cols: 132,
                rows: 43,
            },
            Chunk::Exit(-9),
            Chunk::Error("the edge went away".into()),
            Chunk::Ping,
        ];
        let mut wire = Vec::new();
        for c in &all {
            wire.extend(c.encode());
        }
        let mut r = &wire[..];
        for c in &all {
            assert_eq!(read_chunk(&mut r).await.expect("read").as_ref(), Some(c));
        }
        assert!(read_chunk(&mut r).await.expect("end").is_none());

        assert!(Chunk::from_parts(99, vec![]).is_err(), "unknown tag");
        assert!(Chunk::from_parts(RESIZE, vec![1]).is_err(), "short resize");
        let mut huge = vec![DATA];
        huge.extend_from_slice(&((MAX_CHUNK as u32) + 1).to_be_bytes());
        assert!(matches!(
            read_chunk(&mut &huge[..]).await,
            Err(FrameError::TooLarge { .. })
        ));
        let truncated = [DATA, 0, 0, 0, 9, 1, 2];
        assert!(read_chunk(&mut &truncated[..]).await.is_err());
    }
}
