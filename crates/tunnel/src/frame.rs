//! Framing: each frame is a 4-byte big-endian length followed by that many bytes of
//! JSON. Frames larger than [`MAX_FRAME`] are refused before any allocation, so a
//! hostile peer cannot make the hub buffer gigabytes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted from an authenticated peer (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;

/// Largest frame accepted before the peer is known: an enrolment request (a join
/// token, a CSR, a few labels) or a hello is a few KiB. A peer with no credentials
/// must not be able to make the hub hold megabytes.
pub const MAX_UNAUTHENTICATED_FRAME: usize = 64 << 10;

/// How much of a frame body is read (and allocated) at a time: a frame's memory grows
/// with the bytes that have actually arrived, not with the length its prefix claims.
const READ_STEP: usize = 64 << 10;

/// Framing failures.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The connection failed.
    #[error("channel i/o")]
    Io(#[from] std::io::Error),
}

/// Encode one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode a frame body into a message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Incremental decoder over a byte buffer (pure: no I/O).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes still missing from the frame being received (0 between frames).
    fn wanted(&self) -> usize {
        match self.buf.get(..4) {
            Some(h) => {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                (4 + len.min(self.max)).saturating_sub(self.buf.len())
            }
            None => 0,
        }
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        if self.buf.is_empty() {
            // An idle session holds no buffer (a hub holds one per edge).
            self.buf = Vec::new();
        }
        Ok(Some(body))
    }
}

/// Read one frame body; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_limited(r, MAX_FRAME).await
}

/// Read one frame body of at most `max` bytes. The body's buffer grows as its bytes
/// arrive, so a length prefix alone allocates nothing.
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = Vec::with_capacity(len.min(READ_STEP));
    while body.len() < len {
        let step = (len - body.len()).min(READ_STEP);
        let n = (&mut *r).take(step as u64).read_to_end(&mut body).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(Some(body))
}

/// Reads messages from a stream and may be cancelled between any two polls without
/// losing bytes: what it has read stays buffered in it. Use it wherever a read races
/// other work in `tokio::select!` (a plain [`read_msg`] dropped halfway through a large
/// frame loses the part it read, and every frame after it is garbage).
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
}

/// The most a [`FrameReader`] asks of its stream at a time. Between frames it asks
/// for 1 KiB: that is what an idle session holds while it waits.
const READ_CHUNK: usize = 16 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::default(),
        }
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames.
    /// Cancellation-safe.
    pub async fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(body) = self.decoder.next_frame()? {
                return decode(&body).map(Some);
            }
            // Straight into the decoder's buffer. `read_buf` either returns bytes or,
            // when dropped, has taken none.
            let buffered = self.decoder.buf.len();
            self.decoder
                .buf
                .reserve(self.decoder.wanted().clamp(1024, READ_CHUNK));
            let n = self.inner.read_buf(&mut self.decoder.buf).await?;
            if n == 0 {
                return if buffered == 0 {
                    Ok(None)
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                };
            }
        }
    }
}

/// Read and decode one message; `Ok(None)` on end of stream.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    read_msg_limited(r, MAX_FRAME).await
}

/// Read and decode one message of at most `max` bytes; `Ok(None)` on end of stream.
pub async fn read_msg_limited<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame_limited(r, max).await? {
        Some(body) => decode(&body).map(Some),
        None => Ok(None),
    }
}

/// Encode and write one message, then flush.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use verge_api::channel::{EdgeToHub, HubToEdge, InstanceChange};

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut d = FrameDecoder::default();
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    /// A peer announces a frame just under the limit and sends a few bytes: the
    /// reader holds only what arrived (it used to allocate the whole announced length
    /// at once, 16 MiB per unauthenticated connection).
    #[tokio::test]
    async fn a_frames_buffer_grows_with_what_arrived_not_with_its_length_prefix() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&((MAX_FRAME - 1) as u32).to_be_bytes())
            .await
            .expect("write");
        tx.write_all(&[b'x'; 1000]).await.expect("write");
        drop(tx);
        let mut body = Vec::new();
        // Read the way read_frame does, but look at the buffer on the way.
        let mut len = [0u8; 4];
        rx.read_exact(&mut len).await.expect("len");
        let n = (&mut rx)
            .take(READ_STEP as u64)
            .read_to_end(&mut body)
            .await
            .expect("body");
        assert_eq!(n, 1000);
        assert!(body.capacity() <= 2 * READ_STEP, "{}", body.capacity());
        // And the reader itself ends with an error at the early EOF, not a hang.
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&((MAX_FRAME - 1) as u32).to_be_bytes())
            .await
            .expect("write");
        drop(tx);
        assert!(matches!(read_frame(&mut rx).await, Err(FrameError::Io(_))));
    }

    #[tokio::test]
    async fn an_unauthenticated_peer_may_not_announce_more_than_64_kib() {
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&((MAX_UNAUTHENTICATED_FRAME + 1) as u32).to_be_bytes())
            .await
            .expect("write");
        let r = read_frame_limited(&mut rx, MAX_UNAUTHENTICATED_FRAME).await;
        assert!(
            matches!(r, Err(FrameError::TooLarge { max, .. }) if max == MAX_UNAUTHENTICATED_FRAME)
        );
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        assert!(matches!(
            decode::<EdgeToHub>(b"\xff\x00{"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<EdgeToHub>(br#"{"type":"noSuchMessage"}"#),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_any_split(
            names in proptest::collection::vec("[a-z][a-z0-9-]{0,20}", 1..8),
            rev in any::<u64>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let msgs: Vec<HubToEdge> = names.iter().map(|n| HubToEdge::Changes {
                revision: rev,
                changes: vec![InstanceChange::Remove { name: n.clone() }],
            }).collect();
            let mut wire = Vec::new();
            for m in &msgs {
                wire.extend(encode(m).expect("encode"));
            }
            let cut = cut.index(wire.len() + 1);
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                d.push(part);
                while let Some(f) = d.next_frame().expect("frame") {
                    got.push(decode::<HubToEdge>(&f).expect("decode"));
                }
            }
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            while let Ok(Some(f)) = d.next_frame() {
                let _ = decode::<EdgeToHub>(&f);
            }
        }
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    /// A large frame arrives in small pieces while a fast timer keeps winning the
    /// `select!`: every message still arrives whole.
    #[tokio::test]
    async fn a_frame_reader_loses_nothing_when_cancelled_mid_frame() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let msgs: Vec<String> = (0..5).map(|i| format!("{i}").repeat(200_000)).collect();
        let sent = msgs.clone();
        tokio::spawn(async move {
            for m in &sent {
                let frame = encode(m).expect("encode");
                for piece in frame.chunks(3000) {
                    tx.write_all(piece).await.expect("write");
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
        });
        let mut frames = FrameReader::new(rx);
        let mut tick = tokio::time::interval(std::time::Duration::from_micros(100));
        let (mut got, mut ticks) = (Vec::new(), 0u32);
        loop {
            tokio::select! {
                m = frames.next_msg::<String>() => match m.expect("frame") {
                    Some(m) => got.push(m),
                    None => break,
                },
                _ = tick.tick() => ticks += 1,
            }
        }
        assert!(ticks > 10, "the timer won races ({ticks})");
        assert_eq!(got, msgs);
    }
}
