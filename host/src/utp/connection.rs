//! One uTP connection as a sans-IO state machine: it is given received
//! packets and the time, and hands back packets to send and the time it
//! next wants to be woken. It never reads a clock or touches a socket; the
//! [`super::Socket`] routes packets to it and the driver owns the I/O.
//!
//! # Handshake (BEP 29 with libutp's conventions, docs/wire.md §4, TV-9)
//!
//! - The initiator picks a receive id `r` and sends `SYN` with
//!   `connection_id = r`, `seq_nr = s`; it then sends with id `r + 1` and
//!   its first DATA has `seq_nr = s + 1`.
//! - The responder receives on `r + 1`, sends with id `r`, picks `x` and
//!   answers `STATE` with `seq_nr = x`, `ack_nr = s`. A STATE uses up no
//!   sequence number, so the responder's first DATA also has `seq_nr = x`.
//! - The initiator therefore takes the STATE as "everything before `x`
//!   received": its `ack_nr` becomes `x − 1`.
//!
//! # Sending: one message, whole packets
//!
//! Each [`send`](Connection::send) starts a new DATA packet and is never
//! packed with another message; a message of up to [`MAX_PAYLOAD`] = 1382
//! bytes goes in one packet, from the first packet of a connection on
//! (libutp's packet size, docs/wire.md §3: Node parses each packet as one
//! message). Larger messages are cut into [`MAX_PAYLOAD`]-byte packets.
//! There is no Nagle rule: a packet leaves as soon as the window allows.
//!
//! # Reliability
//!
//! - Retransmission timeout from RTT samples as RFC 6298 computes it
//!   (Karn's rule: no samples from retransmitted packets), between
//!   [`MIN_RTO`] and [`MAX_RTO`], doubled on each expiry.
//! - Fast retransmit: a packet is resent when [`DUPLICATE_THRESHOLD`]
//!   packets sent after it have been selectively acknowledged, or after
//!   that many duplicate ACKs.
//! - Congestion window: Reno-style (slow start, halving once per loss
//!   episode, one packet after a timeout), bounded by the peer's advertised
//!   window and [`MAX_IN_FLIGHT`] packets. BEP 29's LEDBAT is not used: it
//!   yields to other traffic by measuring queueing delay, which RPC traffic
//!   does not need (docs/wire.md §4.1).
//! - ACKs ride on our data where they can: one in-order DATA packet may
//!   wait up to [`ACK_DELAY`] for our next DATA (a request's ACK leaves with
//!   its reply, a reply's with the next request), else it goes as a STATE.
//!   A second unacknowledged packet, a packet out of order or repeated, a
//!   FIN, the handshake and a window update are acknowledged at the next
//!   transmit, with a selective ACK while packets are missing. (TCP's
//!   delayed ACK, RFC 1122 §4.2.3.2, with a much shorter delay: nothing in
//!   RPC traffic waits for the ACK of a lone packet.)
//!
//! # Liveness
//!
//! - While our data is unacknowledged, a peer that sends nothing for
//!   [`PEER_SILENCE_LIMIT`] closes the connection with
//!   [`ConnectionError::PeerSilent`].
//! - With nothing outstanding, silence is fine: a request may take long to
//!   answer. Both sides send a keep-alive STATE after [`KEEPALIVE`] without
//!   sending, and a connection that hears nothing at all for
//!   [`IDLE_TIMEOUT`] is closed ([`ConnectionError::Idle`]).
//!
//! # An unverified peer gets no more bytes than it sent
//!
//! A SYN's source address may be forged. Until the initiator shows that it
//! receives what we send, by acknowledging our STATE's random sequence
//! number (its first DATA carries `ack_nr = x − 1`), the responder is
//! *unverified* and sends exactly one STATE per SYN received: no
//! keep-alive, no RESET when it gives up, and packets whose ACK does not
//! match are dropped unanswered (they could only come from someone who
//! never saw our STATE). An unverified responder that hears nothing valid
//! for [`HANDSHAKE_TIMEOUT`] closes silently ([`ConnectionError::Unverified`]).
//! So a spoofed SYN costs the forged address one 20-byte STATE for each
//! 20-byte SYN, ×1.
//!
//! # Capability bits
//!
//! Every SYN we send, and the responder's STATEs until the peer is
//! verified (if its SYN had extension bits: a STATE is never longer than
//! its SYN), carry the extension bits (BEP 29 extension 2) with
//! [`CAP_SECURE_SESSION_V1`] set. The peer's bits are recorded from its SYN
//! (responder) or from the packet completing the handshake (initiator), so
//! the RPC layer knows a peer is ours before it sends a byte
//! ([`Connection::peer_extension_bits`]; docs/wire.md §8).
//!
//! Our initiator acknowledges the STATE at once (with its first DATA, or a
//! STATE of its own), so a connection opened ahead of its first request
//! stays; libutp's initiator sends its first DATA at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::packet::{
    seq_less, Header, Packet, PacketType, SelectiveAck, CAP_SECURE_SESSION_V1, EXTENSION_BITS_LEN,
    HEADER_LEN,
};

/// The payload of one packet: libutp's `UDP_IPV4_MTU` (1402) − the 20-byte
/// header, the most a Node peer sends or reads in one packet
/// (docs/wire.md §3).
pub const MAX_PAYLOAD: usize = 1382;
/// An unanswered SYN is sent again this often until the caller's deadline.
pub const SYN_RETRY: Duration = Duration::from_millis(400);
/// Retransmission timeout before the first RTT sample (RFC 6298 says 1 s;
/// shorter, so one lost packet costs less than [`PEER_SILENCE_LIMIT`] / 4).
pub const INITIAL_RTO: Duration = Duration::from_millis(500);
/// The shortest retransmission timeout: loopback RTTs are tens of
/// microseconds, but a peer's scheduler can stall for longer (the floor
/// Linux TCP uses).
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// The longest retransmission timeout, backoff included: at least two
/// retransmissions fit in [`PEER_SILENCE_LIMIT`].
pub const MAX_RTO: Duration = Duration::from_secs(1);
/// A connection whose peer sends nothing for this long while our data is
/// unacknowledged is closed, so requests to a host that died fail fast.
pub const PEER_SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// How long the ACK of one in-order DATA packet may wait for our next DATA
/// to carry it. Measured (`cargo xtask bench`): a fibonacci reply leaves
/// 10–100 µs after its request arrives, so the request's ACK rides on it and
/// the server sends one datagram per request instead of two. The host's
/// socket task runs timers on a 5 ms grid (`transport::TIMER_GRID`), so
/// the STATE leaves 5–11 ms after the packet when nothing carried it
/// (measured: median 9.1 ms, max 11.4 ms; tokio adds its 1 ms timer tick).
pub const ACK_DELAY: Duration = Duration::from_millis(5);
/// A STATE is sent after this long without sending anything (libutp's
/// keep-alive interval, docs/wire.md §3), which also keeps NAT mappings.
pub const KEEPALIVE: Duration = Duration::from_secs(29);
/// A connection that hears nothing at all for this long is closed: four
/// keep-alive intervals of a live peer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 29);
/// An incoming connection whose initiator has not acknowledged our STATE
/// after this long is dropped without a word (see the module
/// documentation): a real initiator sends its first DATA within a round
/// trip, or repeats its SYN every few hundred ms if our STATE was lost.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A finished connection still answers a retransmitted FIN for this long.
pub const LINGER: Duration = Duration::from_secs(1);
/// Packets sent after an unacknowledged one that must be acknowledged
/// before it counts as lost, as duplicate ACKs or selective ACKs.
pub const DUPLICATE_THRESHOLD: usize = 3;
/// Bytes we can receive and hold: the window we advertise when the
/// application keeps up (libutp advertises the same 1 MiB, TV-9).
pub const RECV_WINDOW: usize = 1 << 20;
/// How far past the next expected packet we keep out-of-order packets, in
/// packets (bytes are bounded by [`RECV_WINDOW`] too).
pub const REORDER_LIMIT: usize = 1024;
/// Bytes a connection holds for sending (queued and unacknowledged) before
/// a write waits; one write may exceed it by at most this much again.
pub const SEND_BUFFER: usize = 1 << 20;
/// Packets in flight at most, whatever the windows say.
pub const MAX_IN_FLIGHT: usize = 512;
/// Congestion window of a new connection, in bytes: 16 full packets, so a
/// burst of requests leaves at once.
pub const INITIAL_WINDOW: usize = 16 * PACKET_SIZE;
/// The congestion window never exceeds this many bytes.
pub const MAX_WINDOW: usize = 4 << 20;

/// A full packet on the wire, the unit of the congestion window.
const PACKET_SIZE: usize = HEADER_LEN + MAX_PAYLOAD;
/// The window update threshold: after reads free this much of the receive
/// window, the new window is sent at once.
const WINDOW_UPDATE: usize = RECV_WINDOW / 4;

/// Why a connection ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// A RESET came after the handshake.
    #[error("the peer reset the uTP connection")]
    Reset,
    /// A RESET answered our SYN.
    #[error("the peer refused the uTP connection")]
    Refused,
    /// [`PEER_SILENCE_LIMIT`] without a packet while our data waited.
    #[error("the peer stopped acknowledging our data for {} s", PEER_SILENCE_LIMIT.as_secs())]
    PeerSilent,
    /// [`IDLE_TIMEOUT`] without a packet.
    #[error("nothing heard from the peer for {} s", IDLE_TIMEOUT.as_secs())]
    Idle,
    /// Closed on our side (too many connections, or the socket stopped).
    #[error("the uTP connection was closed on this side")]
    Aborted,
    /// An incoming connection whose initiator never acknowledged our STATE
    /// within [`HANDSHAKE_TIMEOUT`] (its SYN was likely spoofed).
    #[error("the peer never acknowledged the handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Unverified,
    /// Our SYNs went unanswered to an address that punched us and that
    /// used up its SYN budget (see [`super::socket::PUNCHER_SYN_BUDGET`]).
    #[error("the peer punched this host but never answered its SYNs")]
    Unanswered,
    /// The kernel reported the peer unreachable (ICMP port or host
    /// unreachable) while our SYN waited: nothing listens there.
    #[error("nothing listens there (ICMP destination unreachable)")]
    Unreachable,
}

/// Why a [`Connection::send`] took nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The send buffer is full; retry after the peer acknowledges data.
    Full,
    /// Our side already finished writing (FIN queued).
    Finished,
    /// The connection is gone.
    Closed(ConnectionError),
}

/// Why a [`Connection::recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// No data yet.
    WouldBlock,
    /// The connection is gone (data received before that was delivered).
    Closed(ConnectionError),
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// We sent a SYN and wait for its STATE.
    SynSent,
    /// Data flows (the responder is here from the SYN on).
    Connected,
    /// Nothing more is exchanged; `None` when both sides finished cleanly.
    Closed(Option<ConnectionError>),
}

/// One packet we sent that is not yet cumulatively acknowledged.
#[derive(Debug)]
struct Sent {
    seq: u16,
    fin: bool,
    payload: Vec<u8>,
    /// Its last transmission.
    sent_at: Instant,
    /// Its last transmission's place among all of ours (packets sent in
    /// one burst share an instant but not a place).
    order: u64,
    transmissions: u32,
    /// Selectively acknowledged: the peer holds it.
    sacked: bool,
    /// Judged lost and waiting to be sent again.
    lost: bool,
}

impl Sent {
    fn size(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// A packet waiting for its first transmission: a piece of a message, or
/// the FIN.
#[derive(Debug)]
enum Unsent {
    Data(Vec<u8>),
    Fin,
}

/// The state of one uTP connection; see the module documentation.
#[derive(Debug)]
pub struct Connection {
    state: State,
    /// Packets to us carry this id.
    recv_id: u16,
    /// Packets from us carry this id (the SYN excepted).
    send_id: u16,
    /// The socket's clock origin, for the microsecond timestamps.
    epoch: Instant,
    initiator: bool,

    // Receiving.
    /// The last sequence number received in order.
    ack_nr: u16,
    /// Out-of-order packets: slot `i` holds sequence `ack_nr + 2 + i` (the
    /// selective-ACK offset), `ack_nr + 1` being missing by definition.
    reorder: VecDeque<Option<Vec<u8>>>,
    reorder_bytes: usize,
    /// In-order bytes the application has not read, front first.
    received: VecDeque<Vec<u8>>,
    /// How much of `received`'s front chunk was read.
    read_offset: usize,
    received_bytes: usize,
    /// The peer's FIN, once seen.
    fin_seq: Option<u16>,
    /// Everything up to and including the peer's FIN was received.
    eof: bool,
    /// The application will not read any more: received data is dropped.
    read_closed: bool,
    /// An ACK must go out with the next transmit...
    ack_due: bool,
    /// ...or, if set, may wait until then for our next DATA to carry it.
    ack_delay_until: Option<Instant>,
    /// The window in our last packet.
    advertised: usize,
    /// Our clock minus the peer's timestamp at its last packet, in µs.
    reply_micro: u32,
    last_received: Instant,
    /// The peer showed it receives what we send: an initiator got the
    /// STATE answering its SYN, a responder a packet acknowledging its
    /// STATE. Until then a responder sends one STATE per SYN and nothing
    /// else (module documentation); a repeated SYN is answered again.
    verified: bool,
    /// SYNs this initiator may still send (`None`: no limit).
    syn_budget: Option<u32>,
    /// The peer's extension bits (see the module documentation), `None`
    /// until seen or when it sent none.
    peer_bits: Option<[u8; EXTENSION_BITS_LEN]>,

    // Sending.
    /// The sequence number of the next new packet.
    next_seq: u16,
    /// The peer's cumulative ACK: `in_flight` starts at `last_ack + 1`.
    last_ack: u16,
    unsent: VecDeque<Unsent>,
    in_flight: VecDeque<Sent>,
    /// Payload bytes unsent or unacknowledged (the send buffer's fill).
    buffered: usize,
    /// Bytes sent, not acknowledged, not judged lost.
    flight_bytes: usize,
    lost_count: usize,
    write_closed: bool,
    fin_acked: bool,
    peer_window: usize,
    cwnd: usize,
    ssthresh: usize,
    /// In a loss episode until this sequence number is acknowledged.
    recovery_until: Option<u16>,
    duplicate_acks: usize,
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    rto_deadline: Option<Instant>,
    /// Since when some of our data has been outstanding.
    outstanding_since: Option<Instant>,
    last_sent: Instant,
    /// Transmissions of DATA and FIN so far (gives [`Sent::order`]).
    transmissions: u64,
    reset_due: bool,
    /// When a finished connection stops answering.
    linger_until: Option<Instant>,

    // Handshake (initiator).
    syn_seq: u16,
    syn_sent_at: Option<Instant>,
    syn_due: bool,
    syn_count: u32,
}

impl Connection {
    fn new(now: Instant, epoch: Instant, recv_id: u16, send_id: u16, initiator: bool) -> Self {
        Connection {
            state: State::SynSent,
            recv_id,
            send_id,
            epoch,
            initiator,
            ack_nr: 0,
            reorder: VecDeque::new(),
            reorder_bytes: 0,
            received: VecDeque::new(),
            read_offset: 0,
            received_bytes: 0,
            fin_seq: None,
            eof: false,
            read_closed: false,
            ack_due: false,
            ack_delay_until: None,
            advertised: RECV_WINDOW,
            reply_micro: 0,
            last_received: now,
            verified: false,
            syn_budget: None,
            peer_bits: None,
            next_seq: 0,
            last_ack: 0,
            unsent: VecDeque::new(),
            in_flight: VecDeque::new(),
            buffered: 0,
            flight_bytes: 0,
            lost_count: 0,
            write_closed: false,
            fin_acked: false,
            peer_window: RECV_WINDOW,
            cwnd: INITIAL_WINDOW,
            ssthresh: MAX_WINDOW,
            recovery_until: None,
            duplicate_acks: 0,
            srtt: None,
            rttvar: Duration::ZERO,
            rto: INITIAL_RTO,
            rto_deadline: None,
            outstanding_since: None,
            last_sent: now,
            transmissions: 0,
            reset_due: false,
            linger_until: None,
            syn_seq: 0,
            syn_sent_at: None,
            syn_due: false,
            syn_count: 0,
        }
    }

    /// A connection we open: receive id `recv_id` (sent in the SYN), SYN
    /// sequence number `syn_seq`. The SYN goes out at the next transmit.
    pub fn connect(now: Instant, epoch: Instant, recv_id: u16, syn_seq: u16) -> Self {
        let mut c = Connection::new(now, epoch, recv_id, recv_id.wrapping_add(1), true);
        c.syn_seq = syn_seq;
        c.next_seq = syn_seq.wrapping_add(1);
        c.last_ack = syn_seq;
        c.syn_due = true;
        c
    }

    /// A connection the peer opened with `syn`; our first sequence number
    /// is `initial_seq`. The STATE answering the SYN goes out at the next
    /// transmit.
    pub fn accept(now: Instant, epoch: Instant, syn: &Packet<'_>, initial_seq: u16) -> Self {
        let peer_bits = syn.extension_bits;
        let syn = &syn.header;
        let mut c = Connection::new(
            now,
            epoch,
            syn.connection_id.wrapping_add(1),
            syn.connection_id,
            false,
        );
        c.state = State::Connected;
        c.ack_nr = syn.seq_nr;
        c.next_seq = initial_seq;
        // The initiator acknowledges our STATE with `initial_seq - 1`.
        c.last_ack = initial_seq.wrapping_sub(1);
        c.peer_window = syn.wnd_size as usize;
        c.reply_micro = c.micros(now).wrapping_sub(syn.timestamp_us);
        c.ack_at_once();
        c.peer_bits = peer_bits;
        c
    }

    /// The peer's extension bits (BEP 29 extension 2): from its SYN, or
    /// from the packet that completed our handshake; all zero when it sent
    /// none (a Node peer) or before that.
    pub fn peer_extension_bits(&self) -> [u8; EXTENSION_BITS_LEN] {
        self.peer_bits.unwrap_or_default()
    }

    /// The peer set [`CAP_SECURE_SESSION_V1`]: it is a grenache-host and
    /// speaks the Noise sessions of docs/wire.md §8.
    pub fn peer_speaks_secure(&self) -> bool {
        self.peer_extension_bits()
            .iter()
            .zip(CAP_SECURE_SESSION_V1)
            .all(|(have, want)| have & want == want)
    }

    /// Where the handshake is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The id packets to us carry.
    pub fn recv_id(&self) -> u16 {
        self.recv_id
    }

    /// The id packets from us carry.
    pub fn send_id(&self) -> u16 {
        self.send_id
    }

    /// How many SYNs we sent.
    pub fn syn_count(&self) -> u32 {
        self.syn_count
    }

    /// The smoothed round-trip time, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// A responder that has heard nothing since the SYN (a half-open
    /// connection, the first to go when the socket is full).
    pub fn is_half_open(&self) -> bool {
        !self.initiator && !self.verified && matches!(self.state, State::Connected)
    }

    /// Whether the peer showed that it receives what we send (an answered
    /// SYN, an acknowledged STATE).
    pub fn is_verified(&self) -> bool {
        self.verified
    }

    /// Limits the SYNs this connecting initiator sends to `budget` more
    /// (first one included); once they are spent unanswered, the next
    /// retry closes it with [`ConnectionError::Unanswered`].
    pub fn limit_syns(&mut self, budget: u32) {
        self.syn_budget = Some(budget);
        if budget == 0 && self.state == State::SynSent {
            self.close(Some(ConnectionError::Unanswered));
        }
    }

    /// How long since the peer last sent anything.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_received)
    }

    /// Whether `syn` repeats the one that opened this connection (its
    /// STATE was lost): it is then answered again.
    pub fn is_repeated_syn(&self, syn: &Header) -> bool {
        !self.initiator && !self.verified && syn.seq_nr == self.ack_nr
    }

    /// Whether the connection has nothing left to do: closed, or both
    /// directions finished and the linger time over.
    pub fn is_done(&self, now: Instant) -> bool {
        match self.state {
            State::Closed(_) => !self.reset_due,
            _ => self.linger_until.is_some_and(|t| now >= t),
        }
    }

    /// Sends the SYN again at the next transmit (the peer's NAT just
    /// opened: its punch arrived).
    pub fn resend_syn(&mut self) {
        if self.state == State::SynSent && self.syn_budget != Some(0) {
            self.syn_due = true;
        }
    }

    fn micros(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_micros() as u32
    }

    fn recv_window(&self) -> usize {
        RECV_WINDOW.saturating_sub(self.received_bytes + self.reorder_bytes)
    }

    // ---- The application's side. ----

    /// Queues one message: it starts a new packet and is cut into
    /// [`MAX_PAYLOAD`]-byte packets. Returns how many bytes were taken:
    /// all of `message`, unless it is longer than [`SEND_BUFFER`], when a
    /// multiple of [`MAX_PAYLOAD`] is taken and the rest must follow (the
    /// packets are the same as if it had been taken whole).
    pub fn send(&mut self, message: &[u8]) -> Result<usize, SendError> {
        match self.state {
            State::Closed(Some(e)) => return Err(SendError::Closed(e)),
            State::Closed(None) => return Err(SendError::Finished),
            _ if self.write_closed => return Err(SendError::Finished),
            _ if self.buffered >= SEND_BUFFER => return Err(SendError::Full),
            _ => {}
        }
        let take = if message.len() <= SEND_BUFFER {
            message.len()
        } else {
            SEND_BUFFER / MAX_PAYLOAD * MAX_PAYLOAD
        };
        for chunk in message[..take].chunks(MAX_PAYLOAD) {
            self.unsent.push_back(Unsent::Data(chunk.to_vec()));
        }
        self.buffered += take;
        Ok(take)
    }

    /// Whether a [`send`](Self::send) would take bytes now (or fail for
    /// good rather than wait).
    pub fn is_writable(&self) -> bool {
        self.buffered < SEND_BUFFER || self.write_closed || matches!(self.state, State::Closed(_))
    }

    /// Reads received bytes in order: `Ok(0)` once the peer finished
    /// (FIN) and everything was read. Returns whether reading freed
    /// enough window that an update should be sent (the second value).
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, bool), RecvError> {
        if self.received_bytes == 0 {
            return match self.state {
                _ if self.eof => Ok((0, false)),
                State::Closed(Some(e)) => Err(RecvError::Closed(e)),
                State::Closed(None) => Ok((0, false)),
                _ if buf.is_empty() => Ok((0, false)),
                _ => Err(RecvError::WouldBlock),
            };
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = self.received.front() else {
                break;
            };
            let available = &front[self.read_offset..];
            let take = available.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&available[..take]);
            n += take;
            self.read_offset += take;
            if self.read_offset == front.len() {
                self.received.pop_front();
                self.read_offset = 0;
            }
        }
        self.received_bytes -= n;
        let window = self.recv_window();
        let update = self.state == State::Connected
            && (window >= self.advertised + WINDOW_UPDATE
                || (self.advertised < PACKET_SIZE && window >= PACKET_SIZE));
        if update {
            self.ack_at_once();
        }
        Ok((n, update))
    }

    /// Whether [`recv`](Self::recv) would return something now (data, the
    /// end, or an error).
    pub fn is_readable(&self) -> bool {
        self.received_bytes > 0 || self.eof || matches!(self.state, State::Closed(_))
    }

    /// The application finished writing: a FIN follows the queued data.
    pub fn shutdown(&mut self) {
        if !self.write_closed {
            self.write_closed = true;
            if !matches!(self.state, State::Closed(_)) {
                self.unsent.push_back(Unsent::Fin);
            }
        }
    }

    /// The application will read no more: what is received is dropped
    /// (and still acknowledged, so the peer is not stalled).
    pub fn close_read(&mut self, now: Instant) {
        self.read_closed = true;
        self.received.clear();
        self.received_bytes = 0;
        self.read_offset = 0;
        for slot in self.reorder.iter_mut().flatten() {
            slot.clear();
        }
        self.reorder_bytes = 0;
        self.check_finished(now);
    }

    /// Ends the connection at once: a RESET goes to the peer unless the
    /// handshake never finished.
    pub fn abort(&mut self, why: ConnectionError) {
        if !matches!(self.state, State::Closed(_)) {
            // A peer that never showed it receives gets no RESET: its
            // address may be forged.
            self.reset_due = self.state == State::Connected && self.verified;
            self.close(Some(why));
        }
    }

    fn close(&mut self, why: Option<ConnectionError>) {
        self.state = State::Closed(why);
        self.unsent.clear();
        self.in_flight.clear();
        self.reorder.clear();
        self.buffered = 0;
        self.flight_bytes = 0;
        self.lost_count = 0;
        self.rto_deadline = None;
        self.outstanding_since = None;
        self.ack_due = false;
        self.ack_delay_until = None;
        self.syn_due = false;
        if why.is_some() {
            self.received.clear();
            self.received_bytes = 0;
            self.read_offset = 0;
        }
    }

    // ---- The network's side. ----

    /// Handles one packet the socket routed here (its connection id
    /// matched).
    pub fn handle_packet(&mut self, now: Instant, packet: &Packet<'_>) {
        let h = &packet.header;
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        if !self.initiator
            && !self.verified
            && !matches!(h.packet_type, PacketType::Syn | PacketType::Reset)
        {
            // Only a packet acknowledging our STATE (its ACK lies in
            // `[last_ack, next_seq − 1]`, our random initial sequence
            // number − 1 while nothing else left) verifies the peer;
            // anything else is from someone who never saw it, and is
            // neither answered nor keeps the connection.
            let newest = self.next_seq.wrapping_sub(1);
            if seq_less(h.ack_nr, self.last_ack) || seq_less(newest, h.ack_nr) {
                return;
            }
            self.verified = true;
        }
        self.last_received = now;
        self.reply_micro = self.micros(now).wrapping_sub(h.timestamp_us);
        if h.packet_type == PacketType::Reset {
            let why = if self.state == State::SynSent {
                ConnectionError::Refused
            } else {
                ConnectionError::Reset
            };
            self.close(Some(why));
            return;
        }
        if self.state == State::SynSent {
            // Only a packet acknowledging our SYN completes the handshake;
            // libutp's responder gives its first DATA the STATE's seq.
            if h.ack_nr != self.syn_seq
                || !matches!(h.packet_type, PacketType::State | PacketType::Data)
            {
                return;
            }
            self.state = State::Connected;
            self.verified = true;
            self.peer_bits = packet.extension_bits;
            self.ack_nr = h.seq_nr.wrapping_sub(1);
            self.syn_due = false;
            // Acknowledge the STATE at once (TCP's third handshake packet):
            // it verifies us to the responder even if we send nothing for
            // a while (a connection opened ahead of its first request).
            // Our first DATA, if it leaves at the same transmit, carries
            // the ACK instead.
            self.ack_at_once();
            if let (1, Some(at)) = (self.syn_count, self.syn_sent_at) {
                self.rtt_sample(now.saturating_duration_since(at));
            }
        }
        if h.packet_type == PacketType::Syn {
            // A repeated SYN (our STATE was lost): answer it again.
            if self.is_repeated_syn(h) {
                self.ack_at_once();
            }
            return;
        }
        self.on_ack(now, packet);
        match h.packet_type {
            PacketType::Data => self.on_data(now, h.seq_nr, packet.payload),
            PacketType::Fin => self.on_fin(h.seq_nr),
            _ => {}
        }
        self.check_finished(now);
    }

    fn on_ack(&mut self, now: Instant, packet: &Packet<'_>) {
        let h = &packet.header;
        // A valid ACK lies in [last_ack, next_seq - 1]; older or newer ones
        // are stale or forged and say nothing about our packets.
        let newest = self.next_seq.wrapping_sub(1);
        if seq_less(h.ack_nr, self.last_ack) || seq_less(newest, h.ack_nr) {
            return;
        }
        let window_opened = self.peer_window < PACKET_SIZE && h.wnd_size as usize >= PACKET_SIZE;
        self.peer_window = h.wnd_size as usize;
        let mut acked_bytes = 0;
        let mut sample = None;
        if h.ack_nr != self.last_ack {
            while self
                .in_flight
                .front()
                .is_some_and(|p| !seq_less(h.ack_nr, p.seq))
            {
                let p = self.in_flight.pop_front().expect("front exists");
                if !p.sacked && !p.lost {
                    self.flight_bytes -= p.size();
                }
                if p.lost {
                    self.lost_count -= 1;
                }
                if p.transmissions == 1 && !p.sacked {
                    sample = Some(now.saturating_duration_since(p.sent_at));
                }
                if p.fin {
                    self.fin_acked = true;
                }
                self.buffered -= p.payload.len();
                acked_bytes += p.size();
            }
            self.last_ack = h.ack_nr;
            self.duplicate_acks = 0;
            if self
                .recovery_until
                .is_some_and(|until| !seq_less(h.ack_nr, until))
            {
                self.recovery_until = None;
            }
            self.rto_deadline = (!self.in_flight.is_empty()).then(|| now + self.rto);
            if self.in_flight.is_empty() && self.unsent.is_empty() {
                self.outstanding_since = None;
            }
        } else if packet.header.packet_type == PacketType::State
            && packet.selective_ack.is_none()
            && !self.in_flight.is_empty()
        {
            self.duplicate_acks += 1;
            if self.duplicate_acks == DUPLICATE_THRESHOLD {
                let front = &mut self.in_flight[0];
                if !front.sacked && !front.lost {
                    front.lost = true;
                    self.flight_bytes -= front.size();
                    self.lost_count += 1;
                    self.on_loss();
                }
            }
        }
        if let Some(sack) = &packet.selective_ack {
            self.on_selective_ack(h.ack_nr, sack);
        }
        if window_opened {
            // What we sent while the peer's window was closed (a probe)
            // was most likely dropped: send it again now, not at the
            // next timeout.
            for p in self.in_flight.iter_mut().filter(|p| !p.sacked && !p.lost) {
                p.lost = true;
                self.flight_bytes -= p.size();
                self.lost_count += 1;
            }
        }
        if let Some(rtt) = sample {
            self.rtt_sample(rtt);
        }
        if acked_bytes > 0 && self.recovery_until.is_none() {
            self.cwnd = if self.cwnd < self.ssthresh {
                self.cwnd + acked_bytes
            } else {
                self.cwnd + (PACKET_SIZE * acked_bytes / self.cwnd).max(1)
            }
            .min(MAX_WINDOW);
        }
    }

    fn on_selective_ack(&mut self, ack_nr: u16, sack: &SelectiveAck) {
        let base = self.last_ack.wrapping_add(1);
        for offset in sack.received_offsets() {
            let seq = ack_nr.wrapping_add(2).wrapping_add(offset as u16);
            let index = seq.wrapping_sub(base) as usize;
            let Some(p) = self.in_flight.get_mut(index) else {
                continue;
            };
            if p.sacked {
                continue;
            }
            p.sacked = true;
            if p.lost {
                p.lost = false;
                self.lost_count -= 1;
            } else {
                self.flight_bytes -= p.size();
            }
        }
        // A packet is lost once enough packets after it were received, at
        // least one of them sent after its own last transmission (so a
        // retransmission is not judged again by the same evidence).
        let mut sacked_after = 0;
        let mut newest_sacked = None;
        let mut lost_any = false;
        for p in self.in_flight.iter_mut().rev() {
            if p.sacked {
                sacked_after += 1;
                newest_sacked = newest_sacked.max(Some(p.order));
            } else if !p.lost
                && sacked_after >= DUPLICATE_THRESHOLD
                && newest_sacked.is_some_and(|order| order > p.order)
            {
                p.lost = true;
                self.flight_bytes -= p.size();
                self.lost_count += 1;
                lost_any = true;
            }
        }
        if lost_any {
            self.on_loss();
        }
    }

    /// A loss was detected without a timeout: halve the window once per
    /// episode.
    fn on_loss(&mut self) {
        if self.recovery_until.is_none() {
            self.ssthresh = (self.cwnd / 2).max(2 * PACKET_SIZE);
            self.cwnd = self.ssthresh;
            self.recovery_until = Some(self.next_seq.wrapping_sub(1));
        }
    }

    fn rtt_sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        self.rto = (srtt + self.rttvar * 4).clamp(MIN_RTO, MAX_RTO);
    }

    fn on_data(&mut self, now: Instant, seq: u16, payload: &[u8]) {
        let offset = seq.wrapping_sub(self.ack_nr.wrapping_add(1)) as i16;
        if offset == 0 && self.reorder.is_empty() && !self.eof {
            self.ack_soon(now);
        } else {
            self.ack_at_once();
        }
        if offset < 0 || self.eof {
            return; // a duplicate: the ACK just goes out again
        }
        let offset = offset as usize;
        if offset >= REORDER_LIMIT || self.fin_seq.is_some_and(|fin| !seq_less(seq, fin)) {
            return;
        }
        let keep = if self.read_closed {
            Vec::new()
        } else {
            payload.to_vec()
        };
        if offset > 0 {
            let slot = offset - 1;
            if self.reorder.len() <= slot {
                self.reorder.resize(slot + 1, None);
            }
            if self.reorder[slot].is_none() && self.has_room(keep.len()) {
                self.reorder_bytes += keep.len();
                self.reorder[slot] = Some(keep);
            }
            return;
        }
        if !self.has_room(keep.len()) {
            return; // the peer overran our window: it will resend
        }
        self.deliver(keep);
        self.ack_nr = seq;
        loop {
            if self.fin_seq == Some(self.ack_nr.wrapping_add(1)) {
                self.reach_fin();
                break;
            }
            match self.reorder.pop_front() {
                Some(Some(next)) => {
                    self.reorder_bytes -= next.len();
                    self.deliver(next);
                    self.ack_nr = self.ack_nr.wrapping_add(1);
                }
                _ => break,
            }
        }
    }

    /// An ACK goes out with the next transmit.
    fn ack_at_once(&mut self) {
        self.ack_due = true;
        self.ack_delay_until = None;
    }

    /// An in-order packet arrived: its ACK may wait [`ACK_DELAY`] for our
    /// next DATA, unless an earlier packet's ACK is waiting already (then
    /// both go at once: every second packet is acknowledged promptly, so a
    /// bulk sender's window keeps opening).
    fn ack_soon(&mut self, now: Instant) {
        if !self.ack_due {
            self.ack_due = true;
            self.ack_delay_until = Some(now + ACK_DELAY);
        } else {
            self.ack_delay_until = None;
        }
    }

    fn has_room(&self, len: usize) -> bool {
        self.received_bytes + self.reorder_bytes + len <= RECV_WINDOW
    }

    fn deliver(&mut self, payload: Vec<u8>) {
        if !payload.is_empty() && !self.read_closed {
            self.received_bytes += payload.len();
            self.received.push_back(payload);
        }
    }

    fn on_fin(&mut self, seq: u16) {
        self.ack_at_once();
        let offset = seq.wrapping_sub(self.ack_nr.wrapping_add(1)) as i16;
        if offset < 0 || offset as usize >= REORDER_LIMIT || self.fin_seq.is_some() {
            return;
        }
        self.fin_seq = Some(seq);
        if offset == 0 {
            self.reach_fin();
        } else {
            // Nothing after the FIN counts.
            let keep = offset as usize - 1;
            for dropped in self.reorder.drain(keep.min(self.reorder.len())..).flatten() {
                self.reorder_bytes -= dropped.len();
            }
        }
    }

    fn reach_fin(&mut self) {
        self.ack_nr = self.ack_nr.wrapping_add(1);
        self.eof = true;
        self.reorder.clear();
        self.reorder_bytes = 0;
    }

    fn check_finished(&mut self, now: Instant) {
        if self.linger_until.is_none()
            && self.state == State::Connected
            && self.fin_acked
            && (self.eof || self.read_closed)
        {
            self.linger_until = Some(now + LINGER);
        }
    }

    // ---- Time. ----

    /// When the connection next needs [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let closing = match self.state {
            State::Closed(_) => return None,
            // A due SYN is the socket's to send, not a timer.
            State::SynSent if self.syn_due => return None,
            State::SynSent => return self.syn_sent_at.map(|at| at + SYN_RETRY),
            State::Connected if !self.verified => {
                return Some(self.last_received + HANDSHAKE_TIMEOUT);
            }
            State::Connected => self.linger_until,
        };
        let silence = self
            .outstanding_since
            .map(|since| since.max(self.last_received) + PEER_SILENCE_LIMIT);
        let ack = self.ack_delay_until.filter(|_| self.ack_due);
        [
            ack,
            self.rto_deadline,
            silence,
            Some(self.last_sent + KEEPALIVE),
            Some(self.last_received + IDLE_TIMEOUT),
            closing,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed(_) => {}
            State::SynSent => {
                if self.syn_sent_at.is_some_and(|at| now >= at + SYN_RETRY) {
                    if self.syn_budget == Some(0) {
                        self.close(Some(ConnectionError::Unanswered));
                    } else {
                        self.syn_due = true;
                    }
                }
            }
            State::Connected if !self.verified => {
                if now >= self.last_received + HANDSHAKE_TIMEOUT {
                    self.abort(ConnectionError::Unverified);
                }
            }
            State::Connected => {
                let silent_since = self
                    .outstanding_since
                    .map(|since| since.max(self.last_received));
                if silent_since.is_some_and(|t| now >= t + PEER_SILENCE_LIMIT) {
                    self.abort(ConnectionError::PeerSilent);
                } else if now >= self.last_received + IDLE_TIMEOUT {
                    self.abort(ConnectionError::Idle);
                } else if self.linger_until.is_some_and(|t| now >= t) {
                    self.close(None);
                } else if self.rto_deadline.is_some_and(|t| now >= t) {
                    self.on_retransmission_timeout(now);
                }
            }
        }
    }

    fn on_retransmission_timeout(&mut self, now: Instant) {
        let mut any = false;
        for p in self.in_flight.iter_mut().filter(|p| !p.sacked) {
            if !p.lost {
                p.lost = true;
                self.flight_bytes -= p.size();
                self.lost_count += 1;
            }
            any = true;
        }
        if !any {
            // Everything in flight is held by the peer, waiting for one
            // missing packet that is no longer ours to send: nothing to do.
            self.rto_deadline = None;
            return;
        }
        // Slow start again from one packet (no recovery episode: the window
        // grows with every ACK of the resent packets).
        self.ssthresh = (self.cwnd / 2).max(2 * PACKET_SIZE);
        self.cwnd = PACKET_SIZE;
        self.recovery_until = None;
        self.rto = (self.rto * 2).min(MAX_RTO);
        self.rto_deadline = Some(now + self.rto);
    }

    // ---- Output. ----

    /// Writes the next packet to send into `out` (cleared first); `false`
    /// when there is nothing to send now.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        out.clear();
        if self.reset_due {
            self.reset_due = false;
            let header = self.header(now, PacketType::Reset, self.next_seq);
            Packet::without_payload(header).encode(out);
            return true;
        }
        match self.state {
            State::Closed(_) => return false,
            State::SynSent => {
                if !self.syn_due {
                    return false;
                }
                self.syn_due = false;
                self.syn_count += 1;
                if let Some(budget) = &mut self.syn_budget {
                    *budget = budget.saturating_sub(1);
                }
                self.syn_sent_at = Some(now);
                let mut header = self.header(now, PacketType::Syn, self.syn_seq);
                header.connection_id = self.recv_id;
                header.ack_nr = 0;
                Packet {
                    extension_bits: Some(CAP_SECURE_SESSION_V1),
                    ..Packet::without_payload(header)
                }
                .encode(out);
                self.last_sent = now;
                return true;
            }
            // Data waits until the peer shows it receives: a forged
            // source gets nothing but the STATE.
            State::Connected if !self.initiator && !self.verified => {
                return self.write_ack(now, out);
            }
            State::Connected => {}
        }
        let window = self.cwnd.min(self.peer_window);
        let fits = |size: usize, flight: usize| flight == 0 || flight + size <= window;
        // Lost packets first, oldest first.
        if self.lost_count > 0 {
            if let Some(i) = self.in_flight.iter().position(|p| p.lost) {
                if fits(self.in_flight[i].size(), self.flight_bytes) {
                    let p = &mut self.in_flight[i];
                    p.lost = false;
                    p.transmissions += 1;
                    self.lost_count -= 1;
                    self.flight_bytes += p.size();
                    self.write_sent(now, i, out);
                    return true;
                }
                // The window is full: nothing new goes before it.
                return self.write_ack(now, out);
            }
        }
        if let Some(next) = self.unsent.front() {
            let size = HEADER_LEN
                + match next {
                    Unsent::Data(payload) => payload.len(),
                    Unsent::Fin => 0,
                };
            if self.in_flight.len() < MAX_IN_FLIGHT && fits(size, self.flight_bytes) {
                let (payload, fin) = match self.unsent.pop_front().expect("front exists") {
                    Unsent::Data(payload) => (payload, false),
                    Unsent::Fin => (Vec::new(), true),
                };
                let seq = self.next_seq;
                self.next_seq = seq.wrapping_add(1);
                if self.in_flight.is_empty() && self.outstanding_since.is_none() {
                    self.outstanding_since = Some(now);
                }
                self.in_flight.push_back(Sent {
                    seq,
                    fin,
                    payload,
                    sent_at: now,
                    order: 0,
                    transmissions: 1,
                    sacked: false,
                    lost: false,
                });
                self.flight_bytes += size;
                self.write_sent(now, self.in_flight.len() - 1, out);
                return true;
            }
        }
        self.write_ack(now, out)
    }

    /// Writes `in_flight[i]` (a first transmission or a retransmission)
    /// and stamps its send time.
    fn write_sent(&mut self, now: Instant, i: usize, out: &mut Vec<u8>) {
        self.transmissions += 1;
        let p = &mut self.in_flight[i];
        p.sent_at = now;
        p.order = self.transmissions;
        let kind = if p.fin {
            PacketType::Fin
        } else {
            PacketType::Data
        };
        let seq = p.seq;
        let header = self.header(now, kind, seq);
        Packet {
            header,
            selective_ack: None,
            extension_bits: None,
            payload: &self.in_flight[i].payload,
        }
        .encode(out);
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rto);
        }
        self.last_sent = now;
        // The packet carries our ACK; a selective ACK still needs a STATE.
        if self.reorder.is_empty() {
            self.ack_due = false;
            self.ack_delay_until = None;
        }
    }

    /// A STATE, if an ACK or a keep-alive is due.
    fn write_ack(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        // No keep-alive to a peer that never showed it receives.
        let keepalive = self.verified && now >= self.last_sent + KEEPALIVE;
        let ack_waits = self.ack_delay_until.is_some_and(|until| now < until);
        if !keepalive && (!self.ack_due || ack_waits) {
            return false;
        }
        self.ack_due = false;
        self.ack_delay_until = None;
        let header = self.header(now, PacketType::State, self.next_seq);
        let selective_ack = (!self.reorder.is_empty()).then(|| {
            SelectiveAck::from_offsets(
                self.reorder
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| slot.is_some())
                    .map(|(i, _)| i),
            )
        });
        // The responder's STATEs before the peer is verified answer its SYN:
        // they carry our bits, if the SYN carried some (so a spoofed SYN
        // still gets no more bytes than it had).
        let extension_bits = (!self.initiator && !self.verified && self.peer_bits.is_some())
            .then_some(CAP_SECURE_SESSION_V1);
        Packet {
            header,
            selective_ack,
            extension_bits,
            payload: &[],
        }
        .encode(out);
        self.last_sent = now;
        true
    }

    fn header(&mut self, now: Instant, packet_type: PacketType, seq_nr: u16) -> Header {
        let window = self.recv_window();
        self.advertised = window;
        Header {
            packet_type,
            extension: 0,
            connection_id: self.send_id,
            timestamp_us: self.micros(now),
            timestamp_difference_us: self.reply_micro,
            wnd_size: window as u32,
            seq_nr,
            ack_nr: self.ack_nr,
        }
    }
}
