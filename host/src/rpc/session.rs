//! Authenticated, encrypted sessions between our hosts (issue 14,
//! docs/wire.md §8): `Noise_XX_25519_ChaChaPoly_BLAKE2s` from the `snow`
//! crate over the uTP byte stream, each side proving its long-lived Ed25519
//! identity by signing the session's X25519 static key (the libp2p-noise
//! idea).
//!
//! ```text
//! initiator → responder  00 'G' 'H' 01                      (MAGIC: never starts JSON)
//! then, both ways        u16 big-endian length ‖ Noise message   (a frame)
//!   1. → e
//!   2. ← e, ee, s, es      payload: the responder's IdentityProof
//!   3. → s, se             payload: the initiator's IdentityProof
//!   then transport frames, each ≤ 65535 bytes, carrying the usual
//!   Grenache byte stream (one message may span several frames)
//! ```
//!
//! An identity proof is `Ed25519 public key (32) ‖ Ed25519 signature (64)`,
//! the signature (checked with `verify_strict`) over [`PROOF_CONTEXT`] ‖ the
//! sender's Noise static public key; each side checks it against
//! `get_remote_static()` before anything else. A frame that does not
//! decrypt ends the connection and is counted ([`SessionStats`]).
//!
//! The two directions keep their own nonces ([`snow::StatelessTransportState`]),
//! so the read half ([`SecureReader`], an [`AsyncRead`] giving plaintext)
//! and the write half ([`SecureWriter`], an [`AsyncWrite`]: one write is
//! one message, encrypted into frames and given to uTP in one write) can
//! live in different tasks.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The Noise protocol name (Noise spec §8).
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// The initiator's first bytes: `0x00` cannot start a JSON text (nor a
/// whitespace a Node peer sends), so the responder tells a secure session
/// from a plaintext Grenache peer by the first byte.
pub const MAGIC: [u8; 4] = [0x00, b'G', b'H', 0x01];
/// What an identity signs, before the session's static key.
pub const PROOF_CONTEXT: &[u8] = b"grenache-host noise static key v1:";
/// Length of an identity proof on the wire: key 32 ‖ signature 64.
pub const PROOF_LEN: usize = 32 + 64;
/// The longest Noise message, hence frame body (Noise spec §3).
pub const MAX_FRAME: usize = 65535;
/// The AEAD tag each transport frame adds (ChaChaPoly).
const TAG_LEN: usize = 16;
/// The most plaintext one transport frame carries.
pub const MAX_FRAME_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;
/// The whole handshake (three messages) must be done within this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Encrypted bytes a [`SecureWriter`] still holding earlier data may add
/// a new message to instead of waiting: message 3 of the handshake (162
/// bytes) rides with the first request.
const MAX_HELD: usize = 1024;
/// Bytes one read from the stream may take.
const READ_CHUNK: usize = 16 * 1024;

/// Session counters, shared by a server or a client and its connections.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Connections that completed the Noise handshake, the peer's proof
    /// checked.
    pub secure: AtomicU64,
    /// Connections that spoke plaintext Grenache (Node peers).
    pub plaintext: AtomicU64,
    /// Handshakes that failed: malformed, timed out, a proof that does not
    /// check, or a key the caller did not pin.
    pub failed_handshakes: AtomicU64,
    /// Transport frames that did not decrypt (tampered or corrupted); each
    /// closed its connection.
    pub rejected_frames: AtomicU64,
    /// Incoming handshakes refused unanswered because their source IP was
    /// over [`crate::rpc::server::HANDSHAKES_PER_IP_PER_SECOND`].
    pub rate_limited_handshakes: AtomicU64,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The stream broke, or closed mid-handshake.
    #[error("the connection broke during the secure handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not the expected Noise message.
    #[error("the peer's secure handshake is malformed ({0})")]
    Noise(snow::Error),
    /// The peer's identity proof is not 96 bytes or does not verify.
    #[error("the peer's identity proof does not check ({0})")]
    BadProof(&'static str),
    /// The stream starts with `0x00` but not with [`MAGIC`].
    #[error("the stream starts with 0x00 but not with our magic 00 47 48 01")]
    BadMagic,
    /// No handshake within [`HANDSHAKE_TIMEOUT`].
    #[error("no secure handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
}

impl From<snow::Error> for HandshakeError {
    fn from(e: snow::Error) -> Self {
        HandshakeError::Noise(e)
    }
}

/// What a host proves itself with: its Ed25519 identity, this process's
/// X25519 static key pair for Noise, and the proof binding the two.
pub struct SessionKeys {
    identity: VerifyingKey,
    static_private: Vec<u8>,
    proof: [u8; PROOF_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("identity", &hex(self.identity.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// A fresh X25519 static key pair (one per process), signed by
    /// `identity`.
    pub fn new(identity: &SigningKey) -> SessionKeys {
        let keypair = snow::Builder::new(params())
            .generate_keypair()
            .expect("the default resolver has X25519 and an RNG");
        let mut signed = PROOF_CONTEXT.to_vec();
        signed.extend_from_slice(&keypair.public);
        let signature = identity.sign(&signed);
        let mut proof = [0u8; PROOF_LEN];
        proof[..32].copy_from_slice(identity.verifying_key().as_bytes());
        proof[32..].copy_from_slice(&signature.to_bytes());
        SessionKeys {
            identity: identity.verifying_key(),
            static_private: keypair.private,
            proof,
        }
    }

    /// A session key set for a process without a stored identity (`call`,
    /// `bench`): a new random identity.
    pub fn ephemeral() -> SessionKeys {
        SessionKeys::new(&SigningKey::from_bytes(&rand::random()))
    }

    /// The identity this host proves.
    pub fn identity(&self) -> VerifyingKey {
        self.identity
    }

    fn builder(&self) -> snow::Builder<'_> {
        snow::Builder::new(params())
            .local_private_key(&self.static_private)
            .expect("a 32-byte X25519 key")
    }
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("a valid Noise protocol name")
}

/// Checks a peer's identity proof against the static key the handshake
/// showed; returns the identity.
pub fn verify_proof(
    proof: &[u8],
    remote_static: Option<&[u8]>,
) -> Result<VerifyingKey, HandshakeError> {
    let remote_static = remote_static.ok_or(HandshakeError::BadProof("no static key"))?;
    let proof: &[u8; PROOF_LEN] = proof
        .try_into()
        .map_err(|_| HandshakeError::BadProof("not 96 bytes"))?;
    let key = VerifyingKey::from_bytes(proof[..32].try_into().expect("32 bytes"))
        .map_err(|_| HandshakeError::BadProof("not an Ed25519 public key"))?;
    let signature = Signature::from_bytes(proof[32..].try_into().expect("64 bytes"));
    let mut signed = PROOF_CONTEXT.to_vec();
    signed.extend_from_slice(remote_static);
    key.verify_strict(&signed, &signature)
        .map_err(|_| HandshakeError::BadProof("the signature over the static key is wrong"))?;
    Ok(key)
}

/// The identities allowed to answer a request (`call --peer-key`, a
/// service's `keys` in the policy); empty: any peer, plaintext ones too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinnedKeys(Vec<VerifyingKey>);

impl PinnedKeys {
    /// No pinning: any peer may answer.
    pub fn any() -> PinnedKeys {
        PinnedKeys(Vec::new())
    }

    /// Only peers proving one of `keys` may answer (any peer if empty).
    pub fn only(keys: Vec<VerifyingKey>) -> PinnedKeys {
        PinnedKeys(keys)
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `peer`, which proved `proved` (`None`: a plaintext peer),
    /// may answer; else the error saying why not, naming the key it proved.
    pub fn check(
        &self,
        peer: std::net::SocketAddr,
        proved: Option<&VerifyingKey>,
    ) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        // Pinned keys are named by their first 16 hex digits: enough to tell
        // them apart, and never a whole secret seed pasted by mistake as a
        // key (a seed and a public key are both 32 bytes).
        let pinned = || {
            self.0
                .iter()
                .map(|k| format!("{}…", &hex(k.as_bytes())[..16]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match proved {
            Some(key) if self.0.contains(key) => Ok(()),
            Some(key) => Err(format!(
                "{peer} proved identity {}, which is not a pinned key ({}); skipped",
                hex(key.as_bytes()),
                pinned()
            )),
            None => Err(format!(
                "{peer} speaks plaintext Grenache (not a grenache-host, or an old one) and cannot prove a pinned key ({}); skipped",
                pinned()
            )),
        }
    }
}

/// Lower-case hex of a key, as `grenache-host id` prints it.
pub use crate::units::hex;

/// `u16 big-endian length ‖ message` appended to `out`.
fn push_frame(out: &mut Vec<u8>, message: &[u8]) {
    debug_assert!(message.len() <= MAX_FRAME);
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// The frames of a byte stream: buffers what was read until a whole frame
/// is there. Bounded: at most one frame plus one read is held.
pub struct Frames<R> {
    inner: R,
    buffer: Vec<u8>,
    /// Where the unconsumed bytes of `buffer` start.
    start: usize,
    chunk: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> Frames<R> {
    /// Frames read from `inner`, after the bytes `already` read from it.
    pub fn new(inner: R, already: &[u8]) -> Self {
        Frames {
            inner,
            buffer: already.to_vec(),
            start: 0,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > MAX_FRAME {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }

    /// Reads more bytes; `false` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut read = ReadBuf::new(&mut self.chunk);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.buffer.extend_from_slice(&self.chunk[..n]);
        Poll::Ready(Ok(n > 0))
    }

    /// The next frame's body (copied into `out`); `Ok(false)` at a clean
    /// end of the stream between frames.
    fn poll_frame(&mut self, cx: &mut Context<'_>, out: &mut Vec<u8>) -> Poll<io::Result<bool>> {
        loop {
            let have = self.buffered();
            if have.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([have[0], have[1]]));
                if have.len() >= 2 + len {
                    out.clear();
                    out.extend_from_slice(&have[2..2 + len]);
                    self.consume(2 + len);
                    return Poll::Ready(Ok(true));
                }
            }
            if !ready!(self.poll_fill(cx))? {
                return Poll::Ready(match self.buffered().is_empty() {
                    true => Ok(false),
                    false => Err(io::ErrorKind::UnexpectedEof.into()),
                });
            }
        }
    }

    async fn next_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match std::future::poll_fn(|cx| self.poll_frame(cx, out)).await? {
            true => Ok(()),
            false => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// Reads until `n` bytes are buffered and takes them.
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buffered().len() < n {
            if !std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let taken = self.buffered()[..n].to_vec();
        self.consume(n);
        Ok(taken)
    }
}

/// The result of a handshake: both halves and the identity the peer proved.
pub struct Session<R, W> {
    /// Plaintext in.
    pub reader: SecureReader<R>,
    /// Plaintext out, one write per message.
    pub writer: SecureWriter<W>,
    /// The Ed25519 identity the peer proved.
    pub peer: VerifyingKey,
}

/// Opens a session as the initiator: sends [`MAGIC`] and message 1, reads
/// message 2 and checks the responder's proof, then `accept_peer` decides
/// whether this identity may serve us (pinning; an `Err` is returned as
/// is and nothing more is sent). Message 3 leaves with the first write
/// (or a [`flush`](AsyncWriteExt::flush)). Bounded by [`HANDSHAKE_TIMEOUT`]
/// for the caller to apply.
pub async fn initiate<R, W, E>(
    reader: R,
    mut writer: W,
    keys: &SessionKeys,
    accept_peer: impl FnOnce(&VerifyingKey) -> Result<(), E>,
) -> Result<Result<Session<R, W>, E>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut noise = keys.builder().build_initiator()?;
    let mut message = vec![0u8; MAX_FRAME];
    let mut out = MAGIC.to_vec();
    let n = noise.write_message(&[], &mut message)?;
    push_frame(&mut out, &message[..n]);
    writer.write_all(&out).await?;

    let mut frames = Frames::new(reader, &[]);
    let mut frame = Vec::new();
    frames.next_frame(&mut frame).await?;
    let mut payload = vec![0u8; MAX_FRAME];
    let n = noise.read_message(&frame, &mut payload)?;
    let peer = verify_proof(&payload[..n], noise.get_remote_static())?;
    if let Err(e) = accept_peer(&peer) {
        return Ok(Err(e));
    }
    let n = noise.write_message(&keys.proof, &mut message)?;
    let mut third = Vec::with_capacity(2 + n);
    push_frame(&mut third, &message[..n]);
    let transport = Arc::new(noise.into_stateless_transport_mode()?);
    Ok(Ok(Session {
        reader: SecureReader::new(frames, transport.clone()),
        writer: SecureWriter::new(writer, transport, third),
        peer,
    }))
}

/// Answers a session as the responder, the stream's first bytes being
/// `already` (which start with `0x00`): checks [`MAGIC`], reads message 1,
/// sends message 2 with our proof, reads message 3 and checks the
/// initiator's proof. Bounded by [`HANDSHAKE_TIMEOUT`] for the caller to
/// apply.
pub async fn respond<R, W>(
    reader: R,
    already: &[u8],
    mut writer: W,
    keys: &SessionKeys,
) -> Result<Session<R, W>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::new(reader, already);
    if frames.take(MAGIC.len()).await? != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let mut noise = keys.builder().build_responder()?;
    let mut frame = Vec::new();
    let mut payload = vec![0u8; MAX_FRAME];
    frames.next_frame(&mut frame).await?;
    noise.read_message(&frame, &mut payload)?;
    let mut message = vec![0u8; MAX_FRAME];
    let n = noise.write_message(&keys.proof, &mut message)?;
    let mut out = Vec::with_capacity(2 + n);
    push_frame(&mut out, &message[..n]);
    writer.write_all(&out).await?;
    frames.next_frame(&mut frame).await?;
    let n = noise.read_message(&frame, &mut payload)?;
    let peer = verify_proof(&payload[..n], noise.get_remote_static())?;
    let transport = Arc::new(noise.into_stateless_transport_mode()?);
    Ok(Session {
        reader: SecureReader::new(frames, transport.clone()),
        writer: SecureWriter::new(writer, transport, Vec::new()),
        peer,
    })
}

/// The plaintext of a session's incoming frames, as an [`AsyncRead`].
pub struct SecureReader<R> {
    frames: Frames<R>,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    frame: Vec<u8>,
    /// One frame's plaintext (allocated once): `plain[read..plain_len]`
    /// is not yet read.
    plain: Box<[u8]>,
    plain_len: usize,
    read: usize,
    stats: Option<Arc<SessionStats>>,
    failed: bool,
}

impl<R> SecureReader<R> {
    fn new(frames: Frames<R>, transport: Arc<StatelessTransportState>) -> Self {
        SecureReader {
            frames,
            transport,
            nonce: 0,
            frame: Vec::new(),
            plain: vec![0u8; MAX_FRAME].into_boxed_slice(),
            plain_len: 0,
            read: 0,
            stats: None,
            failed: false,
        }
    }

    /// Counts rejected frames in `stats`.
    pub fn counted_in(mut self, stats: Arc<SessionStats>) -> Self {
        self.stats = Some(stats);
        self
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SecureReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.failed {
                return Poll::Ready(Err(rejected()));
            }
            if this.read < this.plain_len {
                let n = buf.remaining().min(this.plain_len - this.read);
                buf.put_slice(&this.plain[this.read..this.read + n]);
                this.read += n;
                return Poll::Ready(Ok(()));
            }
            if !ready!(this.frames.poll_frame(cx, &mut this.frame))? {
                return Poll::Ready(Ok(()));
            }
            match this
                .transport
                .read_message(this.nonce, &this.frame, &mut this.plain)
            {
                Ok(n) => {
                    this.nonce += 1;
                    this.plain_len = n;
                    this.read = 0;
                }
                Err(_) => {
                    this.failed = true;
                    if let Some(stats) = &this.stats {
                        stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn rejected() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a secure-session frame failed authentication (tampered or corrupted); the connection is closed",
    )
}

/// A session's outgoing side: each `poll_write` encrypts the whole buffer
/// (one Grenache message) into frames and hands them to the stream in one
/// write, so one message stays one uTP write as on a plaintext stream. A
/// write is taken whole at once; if the stream cannot take it all yet, the
/// rest goes at the next write or flush ([`SessionWriter::write_message`]
/// does both).
pub struct SecureWriter<W> {
    inner: W,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    /// Encrypted bytes not yet taken by `inner` (the handshake's message 3
    /// before the first write), `pending[written..]`.
    pending: Vec<u8>,
    written: usize,
}

impl<W> SecureWriter<W> {
    fn new(inner: W, transport: Arc<StatelessTransportState>, prefix: Vec<u8>) -> Self {
        SecureWriter {
            inner,
            transport,
            nonce: 0,
            pending: prefix,
            written: 0,
        }
    }

    /// Encrypts `message` into frames appended to `pending`, in place.
    fn seal(&mut self, message: &[u8]) -> io::Result<()> {
        for chunk in message.chunks(MAX_FRAME_PLAINTEXT) {
            let len = chunk.len() + TAG_LEN;
            let at = self.pending.len();
            self.pending.extend_from_slice(&(len as u16).to_be_bytes());
            self.pending.resize(at + 2 + len, 0);
            let n = self
                .transport
                .write_message(self.nonce, chunk, &mut self.pending[at + 2..])
                .map_err(|e| io::Error::other(format!("encrypting a frame: {e}")))?;
            debug_assert_eq!(n, len);
            self.nonce += 1;
        }
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SecureWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        message: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write left (the stream was full, or that write's
        // flush was cancelled) goes first, unless it is small (message 3
        // of the handshake): then it leaves in one write with this message.
        // This message is sealed and taken whole, so a cancelled caller
        // never leaves half a frame.
        if this.pending.len() - this.written > MAX_HELD {
            ready!(this.poll_pending(cx))?;
        }
        this.seal(message)?;
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(message.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A connection's incoming bytes, plaintext from a Node peer or decrypted
/// from a secure session.
pub enum SessionReader<R> {
    /// A plaintext Grenache stream.
    Plain(R),
    /// A secure session's plaintext.
    Secure(SecureReader<R>),
}

impl<R: AsyncRead + Unpin> AsyncRead for SessionReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionReader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            SessionReader::Secure(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// A connection's outgoing side, plaintext or secure; one write is one
/// Grenache message.
pub enum SessionWriter<W> {
    /// A plaintext Grenache stream.
    Plain(W),
    /// A secure session.
    Secure(SecureWriter<W>),
}

impl<W: AsyncWrite + Unpin> SessionWriter<W> {
    /// Writes one whole Grenache message and hands all of it to the stream.
    pub async fn write_message(&mut self, message: &[u8]) -> io::Result<()> {
        self.write_all(message).await?;
        self.flush().await
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SessionWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionWriter::Plain(w) => Pin::new(w).poll_write(cx, b),
            SessionWriter::Secure(w) => Pin::new(w).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionWriter::Plain(w) => Pin::new(w).poll_flush(cx),
            SessionWriter::Secure(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionWriter::Plain(w) => Pin::new(w).poll_shutdown(cx),
            SessionWriter::Secure(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    type Halves = (
        tokio::io::ReadHalf<DuplexStream>,
        tokio::io::WriteHalf<DuplexStream>,
    );

    /// Two ends of an in-memory stream, each split in read and write.
    fn wires() -> (Halves, Halves) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (tokio::io::split(a), tokio::io::split(b))
    }

    fn keys(seed: u8) -> SessionKeys {
        SessionKeys::new(&SigningKey::from_bytes(&[seed; 32]))
    }

    #[tokio::test]
    async fn a_session_proves_both_identities_and_carries_messages_both_ways() {
        let ((ar, aw), (br, bw)) = wires();
        let (client_keys, server_keys) = (keys(1), keys(2));
        let server = tokio::spawn(async move {
            let mut first = [0u8; 1];
            let mut br = br;
            br.read_exact(&mut first).await.unwrap();
            assert_eq!(
                first[0], 0x00,
                "the magic starts with a byte JSON never does"
            );
            let s = respond(br, &first, bw, &server_keys).await.unwrap();
            assert_eq!(s.peer, SigningKey::from_bytes(&[1; 32]).verifying_key());
            let (mut reader, mut writer) = (s.reader, s.writer);
            let mut got = vec![0u8; 100_000];
            reader.read_exact(&mut got).await.unwrap();
            writer.write_all(&got[..5]).await.unwrap();
            got
        });
        let s = initiate(ar, aw, &client_keys, |_| Ok::<(), ()>(()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.peer, SigningKey::from_bytes(&[2; 32]).verifying_key());
        let (mut reader, mut writer) = (s.reader, s.writer);
        // Longer than one frame: it spans two.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&big).await.unwrap();
        let mut reply = [0u8; 5];
        reader.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, &big[..5]);
        assert_eq!(server.await.unwrap(), big);
    }

    #[tokio::test]
    async fn an_unpinned_identity_stops_the_handshake_before_message_3() {
        let ((ar, aw), (br, bw)) = wires();
        let server_keys = keys(2);
        let server = tokio::spawn(async move { respond(br, &[], bw, &server_keys).await });
        let wanted = SigningKey::from_bytes(&[9; 32]).verifying_key();
        let result = initiate(ar, aw, &keys(1), |k| match *k == wanted {
            true => Ok(()),
            false => Err(hex(k.as_bytes())),
        })
        .await
        .unwrap();
        let Err(proved) = result else {
            panic!("accepted a key not pinned")
        };
        assert_eq!(proved, hex(keys(2).identity().as_bytes()));
        // Dropping the initiator's halves ends the stream: the responder
        // never got message 3.
        assert!(server.await.unwrap().is_err());
    }

    #[test]
    fn a_proof_binds_the_identity_to_this_static_key_only() {
        let k = keys(3);
        let mut static_public = [0u8; 32];
        // The public half of our static key, through a handshake-free path:
        // the proof verifies against it and nothing else.
        let kp_public = {
            let b = snow::Builder::new(params());
            let pair = b.generate_keypair().unwrap();
            pair.public
        };
        static_public.copy_from_slice(&kp_public);
        assert!(matches!(
            verify_proof(&k.proof, Some(&static_public)),
            Err(HandshakeError::BadProof(_))
        ));
        assert!(matches!(
            verify_proof(&k.proof[..95], Some(&static_public)),
            Err(HandshakeError::BadProof("not 96 bytes"))
        ));
        assert!(matches!(
            verify_proof(&k.proof, None),
            Err(HandshakeError::BadProof(_))
        ));
    }

    #[tokio::test]
    async fn a_tampered_frame_is_rejected_counted_and_ends_the_stream() {
        let ((ar, aw), (br, bw)) = wires();
        let server_keys = keys(2);
        let stats = Arc::new(SessionStats::default());
        let counted = stats.clone();
        let server = tokio::spawn(async move {
            let s = respond(br, &[], bw, &server_keys).await.unwrap();
            let mut reader = s.reader.counted_in(counted);
            let mut buf = Vec::new();
            reader.read_to_end(&mut buf).await
        });
        // A man in the middle flips one byte of the first transport frame:
        // the initiator's session is built normally, then its write is
        // corrupted on the way.
        let s = initiate(ar, aw, &keys(1), |_| Ok::<(), ()>(()))
            .await
            .unwrap()
            .unwrap();
        let mut writer = s.writer;
        // Seal by hand, flip a byte, and send message 3 and the frame.
        writer.seal(b"[\"rid\",\"key\",{}]").unwrap();
        let at = writer.pending.len() - 3;
        writer.pending[at] ^= 1;
        writer.flush().await.unwrap();
        let result = server.await.unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(stats.rejected_frames.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_an_error_not_a_panic() {
        for garbage in [
            &b"\x00GH\x01\x00\x05hello"[..],
            b"\x00GH\x02",
            b"\x00GH\x01\xff\xff",
        ] {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            theirs.write_all(garbage).await.unwrap();
            drop(theirs);
            let (r, w) = tokio::io::split(ours);
            let result =
                tokio::time::timeout(Duration::from_secs(1), respond(r, &[], w, &keys(1))).await;
            assert!(matches!(result, Ok(Err(_))), "{garbage:?}");
        }
    }

    #[tokio::test]
    async fn a_write_cut_short_by_its_caller_leaves_the_stream_whole() {
        // A stream that takes 64 bytes until someone reads.
        let (a, b) = tokio::io::duplex(64);
        let ((ar, aw), (br, bw)) = (tokio::io::split(a), tokio::io::split(b));
        let server_keys = keys(2);
        let server = tokio::spawn(async move { respond(br, &[], bw, &server_keys).await });
        let s = initiate(ar, aw, &keys(1), |_| Ok::<(), ()>(()))
            .await
            .unwrap()
            .unwrap();
        let mut writer = SessionWriter::Secure(s.writer);
        let first = vec![b'1'; 1000];
        let cut = tokio::time::timeout(Duration::from_millis(20), writer.write_message(&first));
        assert!(
            cut.await.is_err(),
            "nobody reads yet: the write waits and is dropped"
        );
        let mut reader = server.await.unwrap().unwrap().reader;
        let reading = tokio::spawn(async move {
            let mut got = vec![0u8; 1003];
            reader.read_exact(&mut got).await.unwrap();
            got
        });
        writer.write_message(b"two").await.unwrap();
        let got = reading.await.unwrap();
        assert_eq!(&got[..1000], &first[..]);
        assert_eq!(&got[1000..], b"two");
    }
}
