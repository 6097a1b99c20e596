//! Sockets talking through a simulated network in simulated time: datagrams
//! take [`LATENCY`] and can be dropped, duplicated or delayed per packet;
//! time jumps to the next delivery or timer. Packets that a libutp (Node)
//! peer would send are written by hand from docs/wire.md §4 (TV-9).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::connection::{
    ConnectionError, RecvError, SendError, State, ACK_DELAY, IDLE_TIMEOUT, LINGER, MAX_PAYLOAD,
    MIN_RTO, PEER_SILENCE_LIMIT, RECV_WINDOW, REORDER_LIMIT, SEND_BUFFER, SYN_RETRY,
};
use super::packet::{Header, Packet, PacketType, CAP_SECURE_SESSION_V1};
use super::socket::{
    ConnectionHandle, Socket, ACCEPT_BACKLOG, EVICTABLE_SILENCE, MAX_CONNECTIONS_PER_IP,
    MAX_INCOMING_CONNECTIONS, PUNCHER_SYN_BUDGET,
};

const LATENCY: Duration = Duration::from_millis(5);

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Deliver,
    Drop,
    Duplicate,
    Delay(Duration),
}

/// One datagram seen on the wire.
#[derive(Debug, Clone)]
struct Wire {
    at: Instant,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl Wire {
    fn packet(&self) -> Packet<'_> {
        Packet::decode(&self.bytes).expect("we send valid packets")
    }
}

type Filter = Box<dyn FnMut(&Wire) -> Fate>;

struct Net {
    now: Instant,
    nodes: HashMap<SocketAddr, Socket>,
    queue: Vec<(Instant, Wire)>,
    filter: Filter,
    /// Every datagram sent, in order.
    log: Vec<Wire>,
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

const A: &str = "10.0.0.1:1000";
const B: &str = "10.0.0.2:2000";

impl Net {
    fn new() -> Net {
        Net::with_seeds(1, 2)
    }

    /// A network whose sockets A and B are seeded with `a` and `b`.
    fn with_seeds(a: u64, b: u64) -> Net {
        let now = Instant::now();
        let mut nodes = HashMap::new();
        nodes.insert(addr(A), Socket::new(now, a));
        nodes.insert(addr(B), Socket::new(now, b));
        Net {
            now,
            nodes,
            queue: Vec::new(),
            filter: Box::new(|_| Fate::Deliver),
            log: Vec::new(),
        }
    }

    fn node(&mut self, at: &str) -> &mut Socket {
        self.nodes.get_mut(&addr(at)).unwrap()
    }

    fn set_filter(&mut self, filter: impl FnMut(&Wire) -> Fate + 'static) {
        self.filter = Box::new(filter);
    }

    /// Sends what every node has to send.
    fn flush(&mut self) {
        let now = self.now;
        let mut sent = Vec::new();
        for (&from, socket) in self.nodes.iter_mut() {
            while let Some(t) = socket.poll_transmit(now) {
                sent.push(Wire {
                    at: now,
                    from,
                    to: t.destination,
                    bytes: t.contents,
                });
            }
        }
        for wire in sent {
            self.log.push(wire.clone());
            match (self.filter)(&wire) {
                Fate::Deliver => self.queue.push((now + LATENCY, wire)),
                Fate::Drop => {}
                Fate::Duplicate => {
                    self.queue.push((now + LATENCY, wire.clone()));
                    self.queue.push((now + LATENCY, wire));
                }
                Fate::Delay(extra) => self.queue.push((now + LATENCY + extra, wire)),
            }
        }
    }

    /// Moves time to the next event and handles it; `false` if nothing is
    /// left to happen.
    fn step(&mut self) -> bool {
        self.flush();
        let next_delivery = self.queue.iter().map(|(at, _)| *at).min();
        let next_timer = self.nodes.values().filter_map(|s| s.poll_timeout()).min();
        let Some(next) = [next_delivery, next_timer].into_iter().flatten().min() else {
            return false;
        };
        self.now = self.now.max(next);
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|(at, _)| *at <= now);
        self.queue = later;
        for (_, wire) in due {
            if let Some(socket) = self.nodes.get_mut(&wire.to) {
                socket.handle_datagram(now, wire.from, &wire.bytes);
            }
        }
        for socket in self.nodes.values_mut() {
            if socket.poll_timeout().is_some_and(|t| t <= now) {
                socket.handle_timeout(now);
            }
        }
        self.flush();
        true
    }

    /// Steps until `done` holds; panics after `limit` of simulated time.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Net) -> bool) {
        let deadline = self.now + limit;
        self.flush();
        while !done(self) {
            assert!(self.now < deadline, "not done within {limit:?}");
            if !self.step() {
                assert!(done(self), "nothing left to happen and not done");
                return;
            }
        }
    }

    /// Lets `span` of simulated time pass.
    fn run_for(&mut self, span: Duration) {
        let until = self.now + span;
        loop {
            self.flush();
            let next_delivery = self.queue.iter().map(|(at, _)| *at).min();
            let next_timer = self.nodes.values().filter_map(|s| s.poll_timeout()).min();
            match [next_delivery, next_timer].into_iter().flatten().min() {
                Some(next) if next <= until => {
                    self.step();
                }
                _ => break,
            }
        }
        self.now = until;
    }

    /// A connects to B; returns both handles.
    fn connect(&mut self) -> (ConnectionHandle, ConnectionHandle) {
        let now = self.now;
        let client = self.node(A).connect(now, addr(B)).unwrap();
        let mut server = None;
        self.run_until(Duration::from_secs(10), |net| {
            if server.is_none() {
                server = net.node(B).accept();
            }
            server.is_some() && net.node(A).state(client) == Some(State::Connected)
        });
        (client, server.unwrap())
    }

    /// Releases `handle` of `node` now.
    fn release_now(&mut self, node: &str, handle: ConnectionHandle) {
        let now = self.now;
        self.node(node).release(now, handle);
    }

    /// Aborts `handle` of `node` now.
    fn abort_now(&mut self, node: &str, handle: ConnectionHandle) {
        let now = self.now;
        self.node(node).abort(now, handle);
    }

    /// Reads everything available on `handle` of `node`.
    fn read(&mut self, node: &str, handle: ConnectionHandle) -> Result<Vec<u8>, RecvError> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.node(node).recv(handle, &mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(RecvError::WouldBlock) => return Ok(out),
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => return Ok(out),
            }
        }
    }

    /// Runs until `node` has read `len` bytes on `handle`; returns them.
    fn read_exactly(&mut self, node: &str, handle: ConnectionHandle, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        self.run_until(Duration::from_secs(120), |net| {
            got.extend(net.read(node, handle).unwrap());
            got.len() >= len
        });
        assert_eq!(got.len(), len);
        got
    }

    /// The DATA packets sent by `from` so far, as payloads.
    fn data_sent_by(&self, from: &str) -> Vec<Vec<u8>> {
        self.log
            .iter()
            .filter(|w| w.from == addr(from))
            .filter(|w| w.packet().header.packet_type == PacketType::Data)
            .map(|w| w.packet().payload.to_vec())
            .collect()
    }
}

fn is_type(wire: &Wire, kind: PacketType) -> bool {
    wire.packet().header.packet_type == kind
}

fn message(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

// ---- Handshake. ----

#[test]
fn handshake_opens_one_connection_on_each_side() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    assert_eq!(net.node(B).state(server), Some(State::Connected));
    assert_eq!(net.node(A).syn_count(client), 1);
    assert_eq!(net.node(A).open_connections(), 1);
    assert_eq!(net.node(B).open_connections(), 1);
    // SYN, STATE, and the initiator's STATE acknowledging it (which
    // verifies it to the responder), nothing else.
    net.run_for(Duration::from_millis(100));
    let kinds: Vec<_> = net
        .log
        .iter()
        .map(|w| w.packet().header.packet_type)
        .collect();
    assert_eq!(
        kinds,
        vec![PacketType::Syn, PacketType::State, PacketType::State]
    );
    let syn = net.log[0].packet().header;
    let state = net.log[1].packet().header;
    let third = net.log[2].packet().header;
    assert_eq!(
        (third.connection_id, third.ack_nr),
        (
            syn.connection_id.wrapping_add(1),
            state.seq_nr.wrapping_sub(1)
        )
    );
    assert_eq!(
        state.connection_id, syn.connection_id,
        "STATE goes to the SYN's id"
    );
    assert_eq!(state.ack_nr, syn.seq_nr);
    // The RTT of the handshake is measured.
    assert_eq!(net.node(A).rtt(client), Some(2 * LATENCY));

    // Data flows both ways, with the ids of BEP 29.
    net.node(A).send(client, b"[1]").unwrap();
    assert_eq!(net.read_exactly(B, server, 3), b"[1]");
    net.node(B).send(server, b"[2]").unwrap();
    assert_eq!(net.read_exactly(A, client, 3), b"[2]");
    let data: Vec<_> = net
        .log
        .iter()
        .filter(|w| is_type(w, PacketType::Data))
        .map(|w| w.packet().header)
        .collect();
    assert_eq!(data[0].connection_id, syn.connection_id.wrapping_add(1));
    assert_eq!(data[0].seq_nr, syn.seq_nr.wrapping_add(1));
    assert_eq!(
        data[0].ack_nr,
        state.seq_nr.wrapping_sub(1),
        "libutp's STATE seq − 1"
    );
    assert_eq!(data[1].connection_id, syn.connection_id);
    assert_eq!(
        data[1].seq_nr, state.seq_nr,
        "the responder's first DATA repeats the STATE's seq"
    );
    assert_eq!(data[1].ack_nr, data[0].seq_nr);
}

#[test]
fn our_hosts_see_each_others_capability_bit_in_the_handshake() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    net.run_for(Duration::from_millis(100));
    assert!(net.node(A).peer_speaks_secure(client), "from the STATE");
    assert!(net.node(B).peer_speaks_secure(server), "from the SYN");
    // Only the SYN and the responder's STATE before the peer is verified
    // carry the bits; the initiator's STATE and data carry none.
    net.node(A).send(client, b"[1]").unwrap();
    assert_eq!(net.read_exactly(B, server, 3), b"[1]");
    let bits: Vec<_> = net
        .log
        .iter()
        .map(|w| {
            let p = w.packet();
            (p.header.packet_type, p.extension_bits)
        })
        .collect();
    assert_eq!(bits[0], (PacketType::Syn, Some(CAP_SECURE_SESSION_V1)));
    assert_eq!(bits[1], (PacketType::State, Some(CAP_SECURE_SESSION_V1)));
    assert!(bits[2..].iter().all(|(_, bits)| bits.is_none()), "{bits:?}");
}

#[test]
fn a_lost_syn_is_sent_again() {
    let mut net = Net::new();
    let mut syns = 0;
    net.set_filter(move |w| {
        if is_type(w, PacketType::Syn) {
            syns += 1;
            if syns <= 2 {
                return Fate::Drop;
            }
        }
        Fate::Deliver
    });
    let started = net.now;
    let (client, _) = net.connect();
    assert_eq!(net.node(A).syn_count(client), 3);
    let took = net.now - started;
    assert!(took >= 2 * SYN_RETRY && took < 3 * SYN_RETRY, "{took:?}");
    // The handshake's RTT is not sampled from a repeated SYN (Karn).
    assert_eq!(net.node(A).rtt(client), None);
}

#[test]
fn a_lost_state_is_answered_again_without_a_second_connection() {
    let mut net = Net::new();
    let mut states = 0;
    net.set_filter(move |w| {
        if is_type(w, PacketType::State) {
            states += 1;
            if states == 1 {
                return Fate::Drop;
            }
        }
        Fate::Deliver
    });
    let (client, server) = net.connect();
    assert_eq!(net.node(A).syn_count(client), 2);
    assert_eq!(net.node(B).accept(), None, "one connection only");
    assert_eq!(net.node(B).open_connections(), 1);
    net.node(A).send(client, b"[\"x\"]").unwrap();
    assert_eq!(net.read_exactly(B, server, 5), b"[\"x\"]");
}

#[test]
fn a_reset_answers_a_syn_nobody_takes_and_the_connect_fails() {
    let mut net = Net::new();
    // B's backlog is full: nobody accepts.
    for i in 0..ACCEPT_BACKLOG {
        let from: SocketAddr = format!("10.1.{}.{}:7", i / 200, i % 200 + 1)
            .parse()
            .unwrap();
        let syn = syn_header(i as u16, 1);
        let now = net.now;
        net.node(B)
            .handle_datagram(now, from, &Packet::without_payload(syn).to_vec());
    }
    let now = net.now;
    let client = net.node(A).connect(now, addr(B)).unwrap();
    net.run_until(Duration::from_secs(5), |net| {
        net.node(A).state(client) != Some(State::SynSent)
    });
    assert_eq!(
        net.node(A).state(client),
        Some(State::Closed(Some(ConnectionError::Refused)))
    );
    assert!(net.node(B).stats().refused >= 1);
}

// ---- libutp's conventions, byte for byte (docs/wire.md §4, TV-9). ----

use crate::test_vectors::hex;

const TV2: &[u8] = crate::test_vectors::TV2.as_bytes();
const TV3: &[u8] = crate::test_vectors::TV3.as_bytes();

fn syn_header(connection_id: u16, seq_nr: u16) -> Header {
    Header {
        packet_type: PacketType::Syn,
        extension: 0,
        connection_id,
        timestamp_us: 0,
        timestamp_difference_us: 0,
        wnd_size: 1 << 20,
        seq_nr,
        ack_nr: 0,
    }
}

/// Everything one socket has to send now.
fn drain(socket: &mut Socket, now: Instant) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| socket.poll_transmit(now).map(|t| t.contents)).collect()
}

#[test]
fn tv9_a_node_initiator_is_answered_as_libutp_answers() {
    let now = Instant::now();
    let node: SocketAddr = addr("127.0.0.1:38772");
    let mut ours = Socket::new(now, 9);
    ours.handle_datagram(
        now,
        node,
        &hex("41 00 4567 003713ba 00000000 00100000 23c6 0000"),
    );
    let out = drain(&mut ours, now);
    assert_eq!(out.len(), 1);
    let state = Packet::decode(&out[0]).unwrap().header;
    assert_eq!(state.packet_type, PacketType::State);
    assert_eq!(state.connection_id, 0x4567);
    assert_eq!(state.ack_nr, 0x23c6);
    assert_eq!(state.wnd_size as usize, RECV_WINDOW);
    let x = state.seq_nr;
    let server = ours.accept().unwrap();

    // Node's first DATA: id + 1, SYN seq + 1, ack = STATE seq − 1, TV-2.
    let mut data = Header {
        packet_type: PacketType::Data,
        connection_id: 0x4568,
        seq_nr: 0x23c7,
        ack_nr: x.wrapping_sub(1),
        ..syn_header(0, 0)
    };
    let packet = Packet {
        header: data,
        selective_ack: None,
        extension_bits: None,
        payload: TV2,
    };
    ours.handle_datagram(now, node, &packet.to_vec());
    let mut buf = [0u8; 256];
    let n = ours.recv(server, &mut buf).unwrap();
    assert_eq!(&buf[..n], TV2);
    assert!(!ours.peer_speaks_secure(server), "a Node SYN has no bits");

    // Our reply: one packet, seq = the STATE's, to the SYN's id.
    ours.send(server, TV3).unwrap();
    let out = drain(&mut ours, now);
    assert_eq!(out.len(), 1, "the reply carries the ACK");
    let reply = Packet::decode(&out[0]).unwrap();
    assert_eq!(reply.header.packet_type, PacketType::Data);
    assert_eq!(reply.header.connection_id, 0x4567);
    assert_eq!(reply.header.seq_nr, x);
    assert_eq!(reply.header.ack_nr, 0x23c7);
    assert_eq!(reply.payload, TV3);

    // Node acknowledges it; nothing is resent.
    data.packet_type = PacketType::State;
    data.seq_nr = 0x23c8;
    data.ack_nr = x;
    ours.handle_datagram(now, node, &Packet::without_payload(data).to_vec());
    ours.handle_timeout(now + Duration::from_secs(1));
    assert!(drain(&mut ours, now + Duration::from_secs(1)).is_empty());
}

#[test]
fn tv9_our_initiator_takes_a_libutp_state_and_its_first_data() {
    let now = Instant::now();
    let node: SocketAddr = addr("127.0.0.1:38772");
    let mut ours = Socket::new(now, 10);
    let client = ours.connect(now, node).unwrap();
    let out = drain(&mut ours, now);
    assert_eq!(out.len(), 1);
    let syn = Packet::decode(&out[0]).unwrap().header;
    assert_eq!(syn.packet_type, PacketType::Syn);
    assert_eq!(syn.ack_nr, 0);
    // libutp answers with its STATE: seq 17767, ack = our SYN's seq.
    let state = Header {
        packet_type: PacketType::State,
        connection_id: syn.connection_id,
        seq_nr: 17767,
        ack_nr: syn.seq_nr,
        ..syn_header(0, 0)
    };
    ours.handle_datagram(now, node, &Packet::without_payload(state).to_vec());
    assert_eq!(ours.state(client), Some(State::Connected));
    assert!(
        !ours.peer_speaks_secure(client),
        "a libutp STATE has no bits"
    );
    ours.send(client, TV2).unwrap();
    let out = drain(&mut ours, now);
    assert_eq!(out.len(), 1);
    let request = Packet::decode(&out[0]).unwrap();
    assert_eq!(
        request.header.connection_id,
        syn.connection_id.wrapping_add(1)
    );
    assert_eq!(request.header.seq_nr, syn.seq_nr.wrapping_add(1));
    assert_eq!(request.header.ack_nr, 17766, "STATE seq − 1");
    assert_eq!(request.payload, TV2);
    // libutp's reply has the STATE's seq.
    let reply = Packet {
        header: Header {
            packet_type: PacketType::Data,
            seq_nr: 17767,
            ack_nr: request.header.seq_nr,
            ..state
        },
        selective_ack: None,
        extension_bits: None,
        payload: TV3,
    };
    ours.handle_datagram(now, node, &reply.to_vec());
    let mut buf = [0u8; 256];
    let n = ours.recv(client, &mut buf).unwrap();
    assert_eq!(&buf[..n], TV3);
    // Its ACK waits for our next DATA to carry it; with none by then it
    // goes as a STATE.
    assert!(drain(&mut ours, now).is_empty(), "nothing at once");
    let later = now + ACK_DELAY;
    ours.handle_timeout(later);
    let out = drain(&mut ours, later);
    assert_eq!(out.len(), 1);
    let ack = Packet::decode(&out[0]).unwrap().header;
    assert_eq!((ack.packet_type, ack.ack_nr), (PacketType::State, 17767));
}

#[test]
fn a_data_packet_that_answers_our_syn_completes_the_handshake() {
    // The responder's STATE was lost, and it sent data: that DATA
    // acknowledges the SYN too.
    let now = Instant::now();
    let node: SocketAddr = addr("127.0.0.1:38772");
    let mut ours = Socket::new(now, 11);
    let client = ours.connect(now, node).unwrap();
    let syn = Packet::decode(&drain(&mut ours, now)[0]).unwrap().header;
    let data = Packet {
        header: Header {
            packet_type: PacketType::Data,
            connection_id: syn.connection_id,
            seq_nr: 500,
            ack_nr: syn.seq_nr,
            ..syn_header(0, 0)
        },
        selective_ack: None,
        extension_bits: None,
        payload: b"[0]",
    };
    ours.handle_datagram(now, node, &data.to_vec());
    assert_eq!(ours.state(client), Some(State::Connected));
    let mut buf = [0u8; 16];
    assert_eq!(ours.recv(client, &mut buf), Ok(3));
}

// ---- Messages and packets. ----

#[test]
fn a_1382_byte_message_is_the_first_data_packet_whole() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let big = message(1, MAX_PAYLOAD);
    net.node(A).send(client, &big).unwrap();
    assert_eq!(net.read_exactly(B, server, MAX_PAYLOAD), big);
    assert_eq!(net.data_sent_by(A), vec![big.clone()]);
    let wire = net
        .log
        .iter()
        .find(|w| is_type(w, PacketType::Data))
        .unwrap();
    assert_eq!(wire.bytes.len(), 1402, "libutp's largest packet");

    // One byte more is two packets: 1382 + 1.
    let bigger = message(2, MAX_PAYLOAD + 1);
    net.node(A).send(client, &bigger).unwrap();
    assert_eq!(net.read_exactly(B, server, MAX_PAYLOAD + 1), bigger);
    let sent = net.data_sent_by(A);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1], bigger[..MAX_PAYLOAD]);
    assert_eq!(sent[2], bigger[MAX_PAYLOAD..]);
}

#[test]
fn eight_messages_in_flight_are_eight_packets_each_starting_a_message() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    // Queued before anything is sent, as a busy client does; sizes from
    // a few bytes to a full packet.
    let messages: Vec<Vec<u8>> = [100, 1300, 78, 1382, 10, 556, 1000, 600]
        .iter()
        .enumerate()
        .map(|(i, &len)| message(i, len))
        .collect();
    for m in &messages {
        assert_eq!(net.node(A).send(client, m), Ok(m.len()));
    }
    let total = messages.iter().map(Vec::len).sum();
    net.read_exactly(B, server, total);
    assert_eq!(
        net.data_sent_by(A),
        messages,
        "one packet per message, none packed"
    );
    // All eight left at once, in one flight.
    let first = net
        .log
        .iter()
        .find(|w| is_type(w, PacketType::Data))
        .unwrap()
        .at;
    let data_times: Vec<_> = net
        .log
        .iter()
        .filter(|w| is_type(w, PacketType::Data))
        .map(|w| w.at)
        .collect();
    assert!(data_times.iter().all(|&t| t == first), "{data_times:?}");

    // And the same for eight replies from the responder.
    for m in &messages {
        net.node(B).send(server, m).unwrap();
    }
    net.read_exactly(A, client, total);
    assert_eq!(net.data_sent_by(B), messages);
}

#[test]
fn a_1_mib_message_arrives_whole_through_loss_reordering_and_duplicates() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut rng = StdRng::seed_from_u64(7);
    net.set_filter(move |_| match rng.random_range(0..100) {
        0..=2 => Fate::Drop,
        3..=4 => Fate::Duplicate,
        5..=9 => Fate::Delay(Duration::from_millis(rng.random_range(1..20))),
        _ => Fate::Deliver,
    });
    let big = message(3, 1 << 20);
    let mut sent = 0;
    let mut got = Vec::new();
    net.run_until(Duration::from_secs(120), |net| {
        if sent < big.len() {
            match net.node(A).send(client, &big[sent..]) {
                Ok(n) => sent += n,
                Err(SendError::Full) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        got.extend(net.read(B, server).unwrap());
        got.len() >= big.len()
    });
    assert!(got == big, "the bytes arrive intact and in order");
    // Every packet was full but the message's last.
    let sizes: Vec<usize> = net.data_sent_by(A).iter().map(Vec::len).collect();
    let last = big.len() % MAX_PAYLOAD;
    assert!(sizes.iter().all(|&s| s == MAX_PAYLOAD || s == last));
    // Packets were lost and resent, and both sides are still connected.
    assert!(sizes.len() > big.len() / MAX_PAYLOAD + 1);
    assert_eq!(net.node(A).state(client), Some(State::Connected));
    assert_eq!(net.node(B).state(server), Some(State::Connected));
}

// ---- Loss and retransmission. ----

#[test]
fn a_lost_data_packet_is_resent_after_the_retransmission_timeout() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut dropped = false;
    net.set_filter(move |w| {
        if is_type(w, PacketType::Data) && !dropped {
            dropped = true;
            return Fate::Drop;
        }
        Fate::Deliver
    });
    let sent = net.now;
    net.node(A).send(client, b"[\"lost once\"]").unwrap();
    net.read_exactly(B, server, 13);
    let took = net.now - sent;
    assert!(took >= MIN_RTO && took < MIN_RTO + 4 * LATENCY, "{took:?}");
    assert_eq!(net.data_sent_by(A).len(), 2);
}

#[test]
fn a_hole_in_a_burst_is_filled_by_fast_retransmit_before_the_timeout() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut data = 0;
    net.set_filter(move |w| {
        if is_type(w, PacketType::Data) {
            data += 1;
            if data == 3 {
                return Fate::Drop;
            }
        }
        Fate::Deliver
    });
    let sent = net.now;
    let messages: Vec<_> = (0..10).map(|i| message(i, 200)).collect();
    for m in &messages {
        net.node(A).send(client, m).unwrap();
    }
    let got = net.read_exactly(B, server, 2000);
    assert_eq!(got, messages.concat());
    let took = net.now - sent;
    assert!(
        took < MIN_RTO,
        "recovered in {took:?}, without waiting for the timeout"
    );
    // The receiver told which packets it held.
    assert!(net
        .log
        .iter()
        .any(|w| w.from == addr(B) && w.packet().selective_ack.is_some()));
    assert_eq!(
        net.data_sent_by(A).len(),
        11,
        "only the lost packet was sent twice"
    );
}

#[test]
fn reordered_and_duplicated_packets_are_delivered_once_in_order() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut rng = StdRng::seed_from_u64(3);
    net.set_filter(move |_| match rng.random_range(0..4) {
        0 => Fate::Duplicate,
        1 => Fate::Delay(Duration::from_millis(rng.random_range(1..30))),
        _ => Fate::Deliver,
    });
    let messages: Vec<_> = (0..300).map(|i| message(i, 1 + i * 3 % 1382)).collect();
    for m in &messages {
        net.node(A).send(client, m).unwrap();
    }
    let expected = messages.concat();
    assert!(net.read_exactly(B, server, expected.len()) == expected);
}

#[test]
fn every_packet_of_a_flight_lost_once_still_gets_through() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut seen = std::collections::HashSet::new();
    // The first transmission of every DATA packet, and every first ACK, is lost.
    net.set_filter(move |w| {
        let h = w.packet().header;
        if seen.insert((w.from, h.packet_type as u8, h.seq_nr, h.ack_nr)) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    let messages: Vec<_> = (0..20).map(|i| message(i, 700)).collect();
    for m in &messages {
        net.node(A).send(client, m).unwrap();
    }
    assert_eq!(net.read_exactly(B, server, 14_000), messages.concat());
}

// ---- The end of a connection. ----

#[test]
fn fin_ends_each_direction_and_both_sides_let_go() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    net.node(A).send(client, b"[\"bye\"]").unwrap();
    net.node(A).shutdown(client);
    assert_eq!(net.read_exactly(B, server, 7), b"[\"bye\"]");
    net.run_until(Duration::from_secs(1), |net| {
        net.read(B, server) == Ok(Vec::new()) && net.node(B).recv(server, &mut [0; 1]) == Ok(0)
    });
    // B can still answer after A's FIN (a half-close).
    net.node(B).send(server, b"[\"ok\"]").unwrap();
    assert_eq!(net.read_exactly(A, client, 6), b"[\"ok\"]");
    assert_eq!(net.node(A).send(client, b"x"), Err(SendError::Finished));
    net.release_now(B, server);
    net.run_until(Duration::from_secs(1), |net| {
        net.node(A).recv(client, &mut [0; 1]) == Ok(0)
    });
    net.release_now(A, client);
    net.run_for(LINGER + Duration::from_millis(100));
    for node in [A, B] {
        assert_eq!(net.node(node).open_connections(), 0, "{node}");
        assert_eq!(net.node(node).held_connections(), 0, "{node}");
    }
    assert!(
        !net.log.iter().any(|w| is_type(w, PacketType::Reset)),
        "a clean close"
    );
}

#[test]
fn a_lost_fin_is_resent() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let mut fins = 0;
    net.set_filter(move |w| {
        if is_type(w, PacketType::Fin) {
            fins += 1;
            if fins == 1 {
                return Fate::Drop;
            }
        }
        Fate::Deliver
    });
    net.release_now(A, client);
    net.run_until(Duration::from_secs(2), |net| {
        net.node(B).recv(server, &mut [0; 1]) == Ok(0)
    });
}

#[test]
fn a_reset_closes_the_peer_with_an_error() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    net.node(A).send(client, b"[1]").unwrap();
    net.read_exactly(B, server, 3);
    net.abort_now(B, server);
    net.run_until(Duration::from_secs(1), |net| {
        net.node(A).state(client) != Some(State::Connected)
    });
    let reset = Err(RecvError::Closed(ConnectionError::Reset));
    assert_eq!(net.node(A).recv(client, &mut [0; 8]), reset);
    assert_eq!(
        net.node(A).send(client, b"[2]"),
        Err(SendError::Closed(ConnectionError::Reset))
    );
    assert_eq!(net.node(A).open_connections(), 0);
}

#[test]
fn packets_for_no_connection_get_a_reset_and_resets_get_nothing() {
    let mut net = Net::new();
    let (client, _) = net.connect();
    net.run_for(Duration::from_millis(100));
    // B forgets everything (a restart on the same port).
    let now = net.now;
    net.nodes.insert(addr(B), Socket::new(now, 99));
    net.node(A).send(client, b"[\"anyone?\"]").unwrap();
    net.run_until(Duration::from_secs(1), |net| {
        net.node(A).state(client) != Some(State::Connected)
    });
    assert_eq!(
        net.node(A).state(client),
        Some(State::Closed(Some(ConnectionError::Reset)))
    );
    assert_eq!(net.node(B).stats().unknown, 1);
    // A RESET to nobody is not answered.
    let mut header = syn_header(5, 5);
    header.packet_type = PacketType::Reset;
    let now = net.now;
    net.node(B)
        .handle_datagram(now, addr(A), &Packet::without_payload(header).to_vec());
    assert!(drain(net.node(B), now).is_empty());
}

// ---- Liveness. ----

#[test]
fn a_peer_that_stops_acknowledging_is_given_up_after_the_silence_limit() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    net.node(A).send(client, b"[1]").unwrap();
    net.read_exactly(B, server, 3);
    // B's ACK of [1] (delayed, waiting for data of B's) reaches A.
    net.run_for(ACK_DELAY + LATENCY * 2);
    // B dies: nothing reaches it or leaves it any more.
    net.set_filter(|_| Fate::Drop);
    let sent = net.now;
    net.node(A).send(client, b"[2]").unwrap();
    net.run_until(Duration::from_secs(10), |net| {
        net.node(A).state(client) != Some(State::Connected)
    });
    assert_eq!(
        net.node(A).state(client),
        Some(State::Closed(Some(ConnectionError::PeerSilent)))
    );
    let took = net.now - sent;
    assert!(
        took >= PEER_SILENCE_LIMIT && took <= PEER_SILENCE_LIMIT + LATENCY,
        "{took:?}"
    );
    // It retransmitted a few times meanwhile.
    assert!(
        net.data_sent_by(A).len() >= 4,
        "{}",
        net.data_sent_by(A).len()
    );
}

#[test]
fn acks_ride_on_replies_and_requests_and_a_lone_packet_is_acked_after_the_delay() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    let before = net.log.len();
    // Three request/reply rounds: the server's ACK of each request leaves
    // with its reply, the client's ACK of each reply with its next request.
    for i in 0..3u8 {
        net.node(A).send(client, &[b'q', i]).unwrap();
        net.read_exactly(B, server, 2);
        net.node(B).send(server, &[b'r', i]).unwrap();
        net.read_exactly(A, client, 2);
    }
    let states_from = |net: &Net, from: &str| {
        net.log[before..]
            .iter()
            .filter(|w| w.from == addr(from) && is_type(w, PacketType::State))
            .count()
    };
    assert_eq!(states_from(&net, B), 0, "the server sent only replies");
    assert_eq!(states_from(&net, A), 0, "the client sent only requests");
    // The last reply has no request after it: its ACK goes alone, after
    // the delay, and the server's data is all acknowledged.
    let last = net.now;
    net.run_for(ACK_DELAY + LATENCY * 2);
    assert_eq!(states_from(&net, A), 1);
    let ack = net.log[before..]
        .iter()
        .find(|w| w.from == addr(A) && is_type(w, PacketType::State))
        .unwrap();
    assert_eq!(ack.at - last, ACK_DELAY, "sent when the delay ran out");
    // Two packets in a row are acknowledged at once, without the delay.
    let mark = net.log.len();
    net.node(A)
        .send(client, &vec![7u8; 2 * MAX_PAYLOAD])
        .unwrap();
    net.read_exactly(B, server, 2 * MAX_PAYLOAD);
    net.run_for(LATENCY * 2);
    let prompt = net.log[mark..]
        .iter()
        .filter(|w| w.from == addr(B) && is_type(w, PacketType::State))
        .count();
    assert_eq!(prompt, 1, "every second packet is acknowledged at once");
}

#[test]
fn a_slow_answer_needs_no_keepalive_bytes() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    net.node(A).send(client, b"[\"slow\"]").unwrap();
    net.read_exactly(B, server, 8);
    // The answer takes 20 s: nothing is outstanding on either side.
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.node(A).state(client), Some(State::Connected));
    assert_eq!(net.node(B).state(server), Some(State::Connected));
    net.node(B).send(server, b"[\"done\"]").unwrap();
    assert_eq!(net.read_exactly(A, client, 8), b"[\"done\"]");
    // Only the two messages carried bytes.
    assert_eq!(net.data_sent_by(A).len() + net.data_sent_by(B).len(), 2);
}

#[test]
fn an_idle_connection_lives_on_keepalives_and_dies_when_the_path_does() {
    let mut net = Net::new();
    // The client's ACK of the STATE verifies it to the server, though it
    // sends nothing else.
    let (client, server) = net.connect();
    net.run_for(3 * IDLE_TIMEOUT);
    assert_eq!(net.node(A).state(client), Some(State::Connected));
    assert_eq!(net.node(B).state(server), Some(State::Connected));
    let keepalives = net
        .log
        .iter()
        .filter(|w| is_type(w, PacketType::State))
        .count();
    assert!(keepalives >= 2 * 11, "{keepalives} keep-alives");
    // The path dies: both sides give up once idle for IDLE_TIMEOUT.
    net.set_filter(|_| Fate::Drop);
    net.run_for(IDLE_TIMEOUT + Duration::from_secs(30));
    for (node, handle) in [(A, client), (B, server)] {
        assert_eq!(
            net.node(node).state(handle),
            Some(State::Closed(Some(ConnectionError::Idle))),
            "{node}"
        );
    }
}

// ---- Bounds. ----

/// Opens the most connections A's address may have to B, each carrying a
/// message at the same moment (none is half-open); returns A's handles.
fn fill_an_address(net: &mut Net) -> Vec<ConnectionHandle> {
    let mut handles = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_IP {
        let now = net.now;
        handles.push(net.node(A).connect(now, addr(B)).unwrap());
        net.run_until(Duration::from_secs(1), |net| net.node(B).accept().is_some());
    }
    for &handle in &handles {
        net.node(A).send(handle, b"[]").unwrap();
    }
    net.run_for(Duration::from_millis(100));
    handles
}

#[test]
fn connections_per_address_are_bounded() {
    let mut net = Net::new();
    let handles = fill_an_address(&mut net);
    let now = net.now;
    // The initiator refuses a connection too many...
    assert!(net.node(A).connect(now, addr(B)).is_err());
    // ...and so does the responder, to a SYN from a new port of that IP.
    let other = addr("10.0.0.1:1001");
    net.node(B).handle_datagram(
        now,
        other,
        &Packet::without_payload(syn_header(1, 1)).to_vec(),
    );
    let out = drain(net.node(B), now);
    assert_eq!(
        Packet::decode(&out[0]).unwrap().header.packet_type,
        PacketType::Reset
    );
    // Letting one go makes room.
    net.node(A).abort(now, handles[0]);
    net.run_for(Duration::from_millis(50));
    let now = net.now;
    assert!(net.node(A).connect(now, addr(B)).is_ok());
}

#[test]
fn a_full_address_makes_room_by_dropping_a_connection_silent_for_30_s() {
    let mut net = Net::new();
    fill_an_address(&mut net);
    // A's process exits without a word: B hears nothing from now on.
    net.set_filter(|_| Fate::Drop);
    net.run_for(EVICTABLE_SILENCE - Duration::from_secs(1));
    let other = addr("10.0.0.1:1001");
    // What B answers a SYN from another port of A's address.
    let answer = |net: &mut Net, id| {
        let now = net.now;
        let syn = Packet::without_payload(syn_header(id, 1)).to_vec();
        net.node(B).handle_datagram(now, other, &syn);
        std::iter::from_fn(|| net.node(B).poll_transmit(now))
            .find(|t| t.destination == other)
            .map(|t| Packet::decode(&t.contents).unwrap().header.packet_type)
    };
    assert_eq!(
        answer(&mut net, 1),
        Some(PacketType::Reset),
        "29 s is not dead yet"
    );
    assert_eq!(net.node(B).stats().evicted, 0);
    net.run_for(Duration::from_secs(2));
    assert_eq!(answer(&mut net, 2), Some(PacketType::State));
    assert!(net.node(B).accept().is_some(), "30 s silent: one gave way");
    assert_eq!(net.node(B).stats().evicted, 1);
    assert_eq!(net.node(B).open_connections(), MAX_CONNECTIONS_PER_IP);
}

#[test]
fn a_full_table_drops_half_open_connections_first() {
    let now = Instant::now();
    let mut socket = Socket::new(now, 5);
    // Half-open connections from many addresses: SYNs and nothing since.
    let mut opened = 0;
    for i in 0..MAX_INCOMING_CONNECTIONS {
        let from: SocketAddr = format!("10.{}.{}.1:9", i / 250, i % 250).parse().unwrap();
        socket.handle_datagram(
            now,
            from,
            &Packet::without_payload(syn_header(7, 7)).to_vec(),
        );
        drain(&mut socket, now);
        while socket.accept().is_some() {
            opened += 1;
        }
    }
    assert_eq!(opened, MAX_INCOMING_CONNECTIONS);
    assert_eq!(socket.open_connections(), MAX_INCOMING_CONNECTIONS);
    let from = addr("192.0.2.1:9");
    socket.handle_datagram(
        now,
        from,
        &Packet::without_payload(syn_header(7, 7)).to_vec(),
    );
    assert!(socket.accept().is_some(), "the new SYN is accepted");
    assert_eq!(socket.stats().evicted, 1);
    assert_eq!(socket.open_connections(), MAX_INCOMING_CONNECTIONS);
    // The incoming junk took none of the outgoing budget.
    assert!(socket.connect(now, addr("192.0.2.2:9")).is_ok());
}

// ---- What a forged source address gets back. ----

/// Every datagram `socket` sends to `to` while `span` of simulated time
/// passes (its timers run every 100 ms).
fn sent_to_over(
    socket: &mut Socket,
    to: SocketAddr,
    from: Instant,
    span: Duration,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut now = from;
    while now <= from + span {
        socket.handle_timeout(now);
        while let Some(t) = socket.poll_transmit(now) {
            if t.destination == to {
                out.push(t.contents);
            }
        }
        now += Duration::from_millis(100);
    }
    out
}

#[test]
fn a_spoofed_syn_is_answered_by_one_state_and_nothing_after() {
    let now = Instant::now();
    let mut socket = Socket::new(now, 21);
    let victim = addr("192.0.2.7:4000");
    let syn = Packet::without_payload(syn_header(300, 3000)).to_vec();
    socket.handle_datagram(now, victim, &syn);
    // The application even accepts it and writes (a server that speaks
    // first): nothing but the one STATE leaves, no keep-alive, no RESET.
    let server = socket.accept().unwrap();
    socket.send(server, b"[1]").unwrap();
    let out = sent_to_over(&mut socket, victim, now, 3 * IDLE_TIMEOUT);
    assert_eq!(out.len(), 1, "{out:02x?}");
    assert_eq!(out[0].len(), syn.len(), "×1 in bytes");
    assert_eq!(
        Packet::decode(&out[0]).unwrap().header.packet_type,
        PacketType::State
    );
    assert_eq!(
        socket.state(server),
        Some(State::Closed(Some(ConnectionError::Unverified)))
    );
    assert_eq!(socket.open_connections(), 0);
    assert_eq!(socket.stats().unverified, 1);
}

#[test]
fn before_the_state_is_acknowledged_packets_with_a_wrong_ack_are_dropped_unanswered() {
    let now = Instant::now();
    let mut socket = Socket::new(now, 22);
    let victim = addr("192.0.2.8:4000");
    socket.handle_datagram(
        now,
        victim,
        &Packet::without_payload(syn_header(400, 4000)).to_vec(),
    );
    let x = Packet::decode(&drain(&mut socket, now)[0])
        .unwrap()
        .header
        .seq_nr;
    let server = socket.accept().unwrap();
    // A blind attacker's request: the right ids, a guessed ACK.
    let data = |ack_nr: u16| {
        Packet {
            header: Header {
                packet_type: PacketType::Data,
                connection_id: 401,
                seq_nr: 4001,
                ack_nr,
                ..syn_header(0, 0)
            },
            selective_ack: None,
            extension_bits: None,
            payload: TV2,
        }
        .to_vec()
    };
    socket.handle_datagram(now, victim, &data(x.wrapping_add(100)));
    assert!(drain(&mut socket, now).is_empty(), "no ACK, no RESET");
    let mut buf = [0u8; 256];
    assert_eq!(socket.recv(server, &mut buf), Err(RecvError::WouldBlock));
    // The initiator's real first DATA acknowledges the STATE: delivered.
    socket.handle_datagram(now, victim, &data(x.wrapping_sub(1)));
    let n = socket.recv(server, &mut buf).unwrap();
    assert_eq!(&buf[..n], TV2);
}

#[test]
fn an_address_that_punched_and_never_answers_gets_a_bounded_number_of_syns() {
    let now = Instant::now();
    let mut socket = Socket::new(now, 23);
    let puncher = addr("192.0.2.9:5000");
    socket.note_punch(now, puncher);
    // A plugin's `on-punch` calls back, twice, and keeps retrying.
    let first = socket.connect(now, puncher).unwrap();
    let out = sent_to_over(&mut socket, puncher, now, Duration::from_secs(10));
    assert_eq!(out.len(), PUNCHER_SYN_BUDGET as usize);
    assert_eq!(
        socket.state(first),
        Some(State::Closed(Some(ConnectionError::Unanswered)))
    );
    let later = now + Duration::from_secs(10);
    socket.note_punch(later, puncher);
    let second = socket.connect(later, puncher).unwrap();
    assert!(sent_to_over(&mut socket, puncher, later, Duration::from_secs(10)).is_empty());
    assert_eq!(
        socket.state(second),
        Some(State::Closed(Some(ConnectionError::Unanswered)))
    );
    assert_eq!(socket.stats().syns_withheld, 1);
    // Other addresses are not limited.
    let other = addr("192.0.2.10:5000");
    socket.connect(later, other).unwrap();
    let out = sent_to_over(&mut socket, other, later, Duration::from_secs(10));
    assert!(out.len() > PUNCHER_SYN_BUDGET as usize);
}

#[test]
fn a_puncher_that_answers_is_connected_to_as_usual() {
    let mut net = Net::new();
    let now = net.now;
    net.node(A).note_punch(now, addr(B));
    let (client, server) = net.connect();
    net.node(A).send(client, b"[]").unwrap();
    assert_eq!(net.read_exactly(B, server, 2), b"[]");
    // It answered: later connects are not limited, however many SYNs
    // they need.
    let now = net.now;
    net.node(A).note_punch(now, addr(B));
    net.set_filter(|w| {
        if is_type(w, PacketType::Syn) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    let second = net.node(A).connect(now, addr(B)).unwrap();
    net.run_for(Duration::from_secs(3));
    assert!(net.node(A).syn_count(second) > PUNCHER_SYN_BUDGET);
}

#[test]
fn the_receive_window_holds_a_reader_that_does_not_read() {
    let mut net = Net::new();
    let (client, server) = net.connect();
    // A sends 3 MiB; B reads nothing for 5 s.
    let big = message(4, 3 << 20);
    let mut sent = 0;
    let mut push = move |net: &mut Net| {
        if sent < big.len() {
            if let Ok(n) = net.node(A).send(client, &big[sent..]) {
                sent += n;
            }
        }
    };
    let until = net.now + Duration::from_secs(5);
    net.run_until(Duration::from_secs(10), |net| {
        push(net);
        net.now >= until
    });
    // The sender is held by the window, and the connection is alive.
    assert_eq!(net.node(A).state(client), Some(State::Connected));
    assert!(net.node(A).send(client, b"x") == Err(SendError::Full));
    let last = net.log.iter().rev().find(|w| w.from == addr(B)).unwrap();
    assert!((last.packet().header.wnd_size as usize) < MAX_PAYLOAD);
    // Then B reads everything, intact.
    let mut got = Vec::new();
    net.run_until(Duration::from_secs(60), |net| {
        push(net);
        got.extend(net.read(B, server).unwrap());
        got.len() >= 3 << 20
    });
    assert!(got == message(4, 3 << 20));
}

#[test]
fn the_send_buffer_is_bounded() {
    let mut net = Net::new();
    let (client, _) = net.connect();
    net.set_filter(|_| Fate::Drop);
    let chunk = vec![b' '; 100_000];
    let mut taken = 0;
    while let Ok(n) = net.node(A).send(client, &chunk) {
        taken += n;
    }
    assert!(
        (SEND_BUFFER..SEND_BUFFER + chunk.len()).contains(&taken),
        "{taken}"
    );
    assert_eq!(net.node(A).send(client, &chunk), Err(SendError::Full));
    // A message longer than the whole buffer is taken a buffer at a time,
    // in whole packets.
    let mut net = Net::new();
    let (client, _) = net.connect();
    let huge = vec![b' '; 3 * SEND_BUFFER];
    let n = net.node(A).send(client, &huge).unwrap();
    assert!(n <= SEND_BUFFER && n.is_multiple_of(MAX_PAYLOAD), "{n}");
}

#[test]
fn packets_beyond_the_reorder_limit_are_dropped() {
    let now = Instant::now();
    let node = addr("127.0.0.1:4000");
    let mut ours = Socket::new(now, 12);
    ours.handle_datagram(
        now,
        node,
        &Packet::without_payload(syn_header(100, 1000)).to_vec(),
    );
    let x = Packet::decode(&drain(&mut ours, now)[0])
        .unwrap()
        .header
        .seq_nr;
    let server = ours.accept().unwrap();
    let data = |seq: u16| {
        Packet {
            header: Header {
                packet_type: PacketType::Data,
                connection_id: 101,
                seq_nr: seq,
                ack_nr: x.wrapping_sub(1),
                ..syn_header(0, 0)
            },
            selective_ack: None,
            extension_bits: None,
            payload: b"z",
        }
        .to_vec()
    };
    // Within the limit it is held and selectively acknowledged.
    ours.handle_datagram(now, node, &data(1002));
    let ack = drain(&mut ours, now);
    let sack = Packet::decode(&ack[0]).unwrap().selective_ack.unwrap();
    assert_eq!(sack.received_offsets().collect::<Vec<_>>(), vec![0]);
    // Beyond it, it is not.
    ours.handle_datagram(now, node, &data(1001 + REORDER_LIMIT as u16 + 1));
    let ack = drain(&mut ours, now);
    let sack = Packet::decode(&ack[0]).unwrap().selective_ack.unwrap();
    assert_eq!(sack.received_offsets().collect::<Vec<_>>(), vec![0]);
    // The gap filled: both delivered.
    ours.handle_datagram(now, node, &data(1001));
    let mut buf = [0u8; 8];
    assert_eq!(ours.recv(server, &mut buf), Ok(2));
}

// ---- Long runs. ----

/// A seed whose socket's first sequence number, read by `first_seq`, is
/// within 200 of wrapping around.
fn seed_near_wrap(first_seq: impl Fn(u64) -> u16) -> u64 {
    (0..100_000)
        .find(|&seed| first_seq(seed) > u16::MAX - 200)
        .expect("some seed starts near the wrap")
}

#[test]
fn sequence_numbers_wrap_around_in_both_directions() {
    let now = Instant::now();
    let a = seed_near_wrap(|seed| {
        let mut socket = Socket::new(now, seed);
        socket.connect(now, addr(B)).unwrap();
        Packet::decode(&drain(&mut socket, now)[0])
            .unwrap()
            .header
            .seq_nr
    });
    let b = seed_near_wrap(|seed| {
        let mut socket = Socket::new(now, seed);
        let syn = Packet::without_payload(syn_header(1, 1)).to_vec();
        socket.handle_datagram(now, addr(A), &syn);
        Packet::decode(&drain(&mut socket, now)[0])
            .unwrap()
            .header
            .seq_nr
    });
    let mut net = Net::with_seeds(a, b);
    let (client, server) = net.connect();
    let mut rng = StdRng::seed_from_u64(11);
    net.set_filter(move |_| match rng.random_range(0..100) {
        0..=4 => Fate::Drop,
        5..=9 => Fate::Delay(Duration::from_millis(rng.random_range(1..20))),
        _ => Fate::Deliver,
    });
    let messages: Vec<_> = (0..400).map(|i| message(i, 500 + i % 700)).collect();
    for m in &messages {
        net.node(A).send(client, m).unwrap();
        net.node(B).send(server, m).unwrap();
    }
    let expected = messages.concat();
    assert!(net.read_exactly(B, server, expected.len()) == expected);
    assert!(net.read_exactly(A, client, expected.len()) == expected);
    let seqs: Vec<u16> = net
        .log
        .iter()
        .filter(|w| is_type(w, PacketType::Data))
        .map(|w| w.packet().header.seq_nr)
        .collect();
    assert!(seqs.iter().any(|&s| s > u16::MAX - 200) && seqs.iter().any(|&s| s < 200));
}

#[test]
fn random_loss_delay_and_duplication_in_both_directions_never_corrupt_a_stream() {
    for seed in 0..12u64 {
        let mut net = Net::with_seeds(seed * 2 + 100, seed * 2 + 101);
        let (client, server) = net.connect();
        let mut rng = StdRng::seed_from_u64(seed);
        let loss = 2 + seed % 10; // 2–11 %
        net.set_filter(move |_| {
            let roll = rng.random_range(0..100);
            if roll < loss {
                Fate::Drop
            } else if roll < loss + 3 {
                Fate::Duplicate
            } else if roll < loss + 10 {
                Fate::Delay(Duration::from_millis(rng.random_range(1..40)))
            } else {
                Fate::Deliver
            }
        });
        let mut sizes = StdRng::seed_from_u64(seed + 1000);
        let up: Vec<_> = (0..60)
            .map(|i| message(i, sizes.random_range(1..6000)))
            .collect();
        let down: Vec<_> = (0..60)
            .map(|i| message(i + 7, sizes.random_range(1..6000)))
            .collect();
        let (up_all, down_all) = (up.concat(), down.concat());
        let (mut up_next, mut down_next) = (0, 0);
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        net.run_until(Duration::from_secs(300), |net| {
            // Messages go out as the send buffers take them.
            while up_next < up.len() && net.node(A).send(client, &up[up_next]).is_ok() {
                up_next += 1;
            }
            while down_next < down.len() && net.node(B).send(server, &down[down_next]).is_ok() {
                down_next += 1;
            }
            got_up.extend(net.read(B, server).unwrap());
            got_down.extend(net.read(A, client).unwrap());
            got_up.len() >= up_all.len() && got_down.len() >= down_all.len()
        });
        assert!(got_up == up_all, "seed {seed}: A to B intact");
        assert!(got_down == down_all, "seed {seed}: B to A intact");
        // Both finish cleanly.
        net.release_now(A, client);
        net.release_now(B, server);
        net.set_filter(|_| Fate::Deliver);
        net.run_for(Duration::from_secs(5));
        assert_eq!(net.node(A).held_connections(), 0, "seed {seed}");
        assert_eq!(net.node(B).held_connections(), 0, "seed {seed}");
    }
}
