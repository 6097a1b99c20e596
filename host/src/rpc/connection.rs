//! The incoming side of one RPC connection: the uTP read half, a receive
//! buffer and a [`MessageDecoder`], turning the byte stream into whole
//! Grenache messages. The client's connection task and the server's
//! connection task both read through a [`MessageReader`].
//!
//! The stream has no framing (docs/wire.md §3): messages are concatenated
//! JSON values, split over packets or coalesced into one however uTP cut the
//! stream, with whitespace between them skipped (earlier hosts sent
//! keep-alive spaces, docs/wire.md#heartbeat).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::codec::{DecodeError, MessageDecoder};

/// How many bytes one read may take from the stream: 64 KiB. Messages
/// larger than this arrive over several reads (the decoder joins them).
const READ_BUFFER: usize = 64 * 1024;

/// Why a connection can no longer be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the stream failed (the connection broke or was reset).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak Grenache: bytes that are not JSON, or a
    /// message over the size limit ([`DecodeError::TooLarge`] carries its
    /// request id when it could be read, so a server can still answer it).
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// How many reads on a connection returned bytes, whether or not they
/// completed a message (whitespace counts: the peer was heard).
/// Shared, so another task can watch it while the reader runs; cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct ReadCount(Arc<AtomicU64>);

impl ReadCount {
    /// The number of reads so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Reads whole messages from one connection's byte stream `R` (the uTP
/// read half; any [`AsyncRead`] in tests).
pub struct MessageReader<R> {
    stream: R,
    buffer: Box<[u8]>,
    decoder: MessageDecoder,
    reads: ReadCount,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    /// A reader of `stream` that refuses any message longer than
    /// `max_message` bytes.
    pub fn new(stream: R, max_message: usize) -> Self {
        MessageReader {
            stream,
            buffer: vec![0u8; READ_BUFFER].into_boxed_slice(),
            decoder: MessageDecoder::new(max_message),
            reads: ReadCount::default(),
        }
    }

    /// The count of this reader's reads, shared with it.
    pub fn reads(&self) -> ReadCount {
        self.reads.clone()
    }

    /// The next whole message, reading as much as it takes; `Ok(None)` when
    /// the peer closed the stream (the bytes of an unfinished message are
    /// then dropped). After an error the connection should be dropped.
    ///
    /// Cancel-safe: the only await is the stream's read, which takes no bytes
    /// unless it completes, and the bytes of a completed read reach the
    /// decoder before anything else is awaited. Dropping this future loses
    /// nothing that was received.
    pub async fn next(&mut self) -> Result<Option<Box<RawValue>>, ReadError> {
        loop {
            if let Some(message) = self.next_buffered()? {
                return Ok(Some(message));
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads once from the stream into the decoder and returns how many
    /// bytes came: 0 when the peer closed the stream. Cancel-safe, as
    /// [`next`](Self::next) is; for a caller that watches when bytes
    /// arrive (the server's deadlines), with
    /// [`next_buffered`](Self::next_buffered) between reads.
    pub async fn read_more(&mut self) -> Result<usize, std::io::Error> {
        let n = self.stream.read(&mut self.buffer).await?;
        if n > 0 {
            self.reads.0.fetch_add(1, Ordering::Relaxed);
            self.decoder.push(&self.buffer[..n]);
        }
        Ok(n)
    }

    /// Hands the decoder bytes already read from the stream by someone
    /// else (the server's first byte, read to tell the protocols apart).
    pub fn push_received(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    /// The next whole message among the bytes already received, without
    /// reading: `Ok(None)` when they hold none.
    pub fn next_buffered(&mut self) -> Result<Option<Box<RawValue>>, DecodeError> {
        self.decoder.next_message()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::rpc::codec::{encode_request, DEFAULT_MAX_MESSAGE};

    use crate::test_vectors::{TV2, TV4};

    /// A reader on one end of an in-memory stream, and the other end.
    fn pair(max_message: usize) -> (MessageReader<DuplexStream>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(READ_BUFFER);
        (MessageReader::new(ours, max_message), theirs)
    }

    async fn next_text(reader: &mut MessageReader<DuplexStream>) -> String {
        reader.next().await.unwrap().unwrap().get().to_string()
    }

    #[tokio::test]
    async fn coalesced_messages_and_spaces_come_out_one_by_one() {
        let (mut reader, mut peer) = pair(DEFAULT_MAX_MESSAGE);
        peer.write_all(format!("{TV2} {TV4}  ").as_bytes())
            .await
            .unwrap();
        assert_eq!(next_text(&mut reader).await, TV2);
        assert_eq!(next_text(&mut reader).await, TV4);
        assert!(reader.next_buffered().unwrap().is_none());
        assert_eq!(reader.reads().get(), 1, "one read carried both");
        drop(peer);
        assert!(reader.next().await.unwrap().is_none(), "a clean close");
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_no_bytes() {
        let (mut reader, mut peer) = pair(DEFAULT_MAX_MESSAGE);
        let reads = reader.reads();
        let (head, tail) = TV4.as_bytes().split_at(30);
        peer.write_all(head).await.unwrap();
        // The first half is read, then the reader waits for more and is
        // cancelled, as the client's select! does when a timer fires.
        let waited = tokio::time::timeout(Duration::from_millis(20), reader.next()).await;
        assert!(waited.is_err(), "half a message is not a message");
        assert_eq!(reads.get(), 1);
        peer.write_all(tail).await.unwrap();
        assert_eq!(next_text(&mut reader).await, TV4);
        assert_eq!(reads.get(), 2);
    }

    #[tokio::test]
    async fn a_keep_alive_space_counts_as_a_read() {
        let (mut reader, mut peer) = pair(DEFAULT_MAX_MESSAGE);
        let reads = reader.reads();
        peer.write_all(b" ").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(20), reader.next()).await;
        assert!(waited.is_err(), "a space is not a message");
        assert_eq!(reads.get(), 1, "but the peer was heard");
    }

    #[tokio::test]
    async fn errors_say_why() {
        let (mut reader, mut peer) = pair(DEFAULT_MAX_MESSAGE);
        peer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(
            reader.next().await,
            Err(ReadError::Decode(DecodeError::NotJson(_)))
        ));

        let (mut reader, mut peer) = pair(100);
        let big = encode_request(
            "3f2cf13b-da02-4abf-bb01-9306b37281a3",
            "k",
            &format!("\"{}\"", "x".repeat(200)),
        );
        peer.write_all(&big).await.unwrap();
        match reader.next().await {
            Err(ReadError::Decode(DecodeError::TooLarge { limit: 100, rid })) => {
                assert_eq!(rid.as_deref(), Some("3f2cf13b-da02-4abf-bb01-9306b37281a3"))
            }
            other => panic!("{other:?}"),
        }
    }
}
