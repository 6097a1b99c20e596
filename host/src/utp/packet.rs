//! The uTP packet format (BEP 29, "Header format"): a 20-byte big-endian
//! header, an optional chain of extensions, then the payload.
//!
//! ```text
//! 0       4       8               16              24              32
//! +-------+-------+---------------+---------------+---------------+
//! | type  | ver   | extension     | connection_id                 |
//! +-------+-------+---------------+---------------+---------------+
//! | timestamp_microseconds                                        |
//! +---------------+---------------+---------------+---------------+
//! | timestamp_difference_microseconds                             |
//! +---------------+---------------+---------------+---------------+
//! | wnd_size                                                      |
//! +---------------+---------------+---------------+---------------+
//! | seq_nr                        | ack_nr                        |
//! +---------------+---------------+---------------+---------------+
//! ```
//!
//! Each extension is `next extension type (1 byte), length (1 byte), length
//! bytes`; the header's `extension` byte names the first. We read and write
//! the selective ACK (type 1) and the extension bits (type 2, exactly 8
//! bytes, as libutp parses them and stores without acting on them; we use
//! one bit, [`CAP_SECURE_SESSION_V1`]); others are skipped.
//! Decoding never panics on network input: anything malformed is an
//! [`DecodeError`].

use std::fmt;

/// Size of the fixed header in bytes (BEP 29).
pub const HEADER_LEN: usize = 20;
/// The protocol version in the low nibble of the first byte (BEP 29).
pub const VERSION: u8 = 1;
/// Extension type of the selective ACK (BEP 29, "Extension").
pub const EXT_SELECTIVE_ACK: u8 = 1;
/// The longest selective-ACK bitmask we write, in bytes: 256 packets past
/// `ack_nr + 1`. BEP 29 asks for a multiple of 4 bytes; longer masks from a
/// peer are read whole.
pub const MAX_SELECTIVE_ACK_LEN: usize = 32;
/// Extension type of the extension bits (BEP 29 names type 2; libutp reads
/// it only when exactly [`EXTENSION_BITS_LEN`] bytes long and acts on none
/// of the bits, utp_internal.cpp `UTP_ProcessIncoming`).
pub const EXT_BITS: u8 = 2;
/// The length of the extension bits, in bytes.
pub const EXTENSION_BITS_LEN: usize = 8;
/// Our capability bit in the extension bits (bit 0 of byte 0): "I am a
/// grenache-host and speak the Noise sessions of docs/wire.md §8". Node
/// (libutp) sends all bits zero, or no extension 2 at all.
pub const CAP_SECURE_SESSION_V1: [u8; EXTENSION_BITS_LEN] = [1, 0, 0, 0, 0, 0, 0, 0];

/// The packet types of BEP 29, as the high nibble of the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// `ST_DATA` (0): carries payload and uses up a sequence number.
    Data = 0,
    /// `ST_FIN` (1): the sender's last sequence number; uses one up.
    Fin = 1,
    /// `ST_STATE` (2): an ACK with no payload; uses no sequence number.
    State = 2,
    /// `ST_RESET` (3): the connection is gone on the sender's side.
    Reset = 3,
    /// `ST_SYN` (4): opens a connection; uses one sequence number.
    Syn = 4,
}

impl PacketType {
    fn from_nibble(n: u8) -> Option<PacketType> {
        Some(match n {
            0 => PacketType::Data,
            1 => PacketType::Fin,
            2 => PacketType::State,
            3 => PacketType::Reset,
            4 => PacketType::Syn,
            _ => return None,
        })
    }
}

/// The fixed 20-byte header (BEP 29). Times are in microseconds of the
/// sender's clock, truncated to 32 bits; sequence numbers wrap at 2^16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the packet is.
    pub packet_type: PacketType,
    /// The type of the first extension, 0 for none. Filled in by
    /// [`Packet::encode`] from the extensions present.
    pub extension: u8,
    /// The receiving side's id of the connection (the SYN carries the
    /// initiator's own receive id, see [`super::connection`]).
    pub connection_id: u16,
    /// The sender's clock when it sent the packet, in microseconds.
    pub timestamp_us: u32,
    /// The sender's clock minus the timestamp of the last packet it
    /// received, when it received it, in microseconds.
    pub timestamp_difference_us: u32,
    /// Bytes the sender can still receive (its advertised window).
    pub wnd_size: u32,
    /// The packet's sequence number (the next one to be used, on a STATE).
    pub seq_nr: u16,
    /// The last sequence number the sender received in order.
    pub ack_nr: u16,
}

/// A selective ACK (extension 1): bit `i` of the mask (byte `i / 8`, least
/// significant bit first) says packet `ack_nr + 2 + i` was received. Packet
/// `ack_nr + 1` is implied missing (BEP 29, "Extension").
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SelectiveAck {
    /// The bitmask as on the wire.
    pub mask: Vec<u8>,
}

impl SelectiveAck {
    /// The packets past `ack_nr + 1` that were received: offsets from
    /// `ack_nr + 2`.
    pub fn received_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.mask.iter().enumerate().flat_map(|(byte, bits)| {
            (0..8)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| byte * 8 + bit)
        })
    }

    /// A mask marking `offsets` (each an offset from `ack_nr + 2` below
    /// `8 * MAX_SELECTIVE_ACK_LEN`; others are left out), padded to a
    /// multiple of 4 bytes.
    pub fn from_offsets(offsets: impl IntoIterator<Item = usize>) -> SelectiveAck {
        let mut mask = Vec::new();
        for offset in offsets {
            if offset >= MAX_SELECTIVE_ACK_LEN * 8 {
                continue;
            }
            let byte = offset / 8;
            if mask.len() <= byte {
                mask.resize(byte + 1, 0);
            }
            mask[byte] |= 1 << (offset % 8);
        }
        let padded = mask.len().div_ceil(4) * 4;
        mask.resize(padded.max(4), 0);
        SelectiveAck { mask }
    }
}

impl fmt::Debug for SelectiveAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.received_offsets()).finish()
    }
}

/// One decoded packet, borrowing its payload from the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The fixed header.
    pub header: Header,
    /// The selective ACK, if the packet carried one.
    pub selective_ack: Option<SelectiveAck>,
    /// The extension bits (type 2), if the packet carried them.
    pub extension_bits: Option<[u8; EXTENSION_BITS_LEN]>,
    /// Everything after the header and extensions.
    pub payload: &'a [u8],
}

/// Why a datagram is not a uTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("{0} bytes is shorter than the 20-byte uTP header")]
    TooShort(usize),
    /// The low nibble of byte 0 is not 1.
    #[error("uTP version {0}, only version 1 is spoken")]
    Version(u8),
    /// The high nibble of byte 0 is above 4.
    #[error("unknown uTP packet type {0}")]
    Type(u8),
    /// An extension runs past the end of the datagram.
    #[error("an extension runs past the end of the packet")]
    Extension,
}

impl<'a> Packet<'a> {
    /// Decodes one datagram.
    pub fn decode(bytes: &'a [u8]) -> Result<Packet<'a>, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort(bytes.len()));
        }
        let version = bytes[0] & 0x0F;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let packet_type =
            PacketType::from_nibble(bytes[0] >> 4).ok_or(DecodeError::Type(bytes[0] >> 4))?;
        let u16_at = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Header {
            packet_type,
            extension: bytes[1],
            connection_id: u16_at(2),
            timestamp_us: u32_at(4),
            timestamp_difference_us: u32_at(8),
            wnd_size: u32_at(12),
            seq_nr: u16_at(16),
            ack_nr: u16_at(18),
        };
        let mut selective_ack = None;
        let mut extension_bits = None;
        let mut next = header.extension;
        let mut at = HEADER_LEN;
        while next != 0 {
            let (kind, len) = match bytes.get(at..at + 2) {
                Some(&[kind, len]) => (kind, usize::from(len)),
                _ => return Err(DecodeError::Extension),
            };
            let body = bytes
                .get(at + 2..at + 2 + len)
                .ok_or(DecodeError::Extension)?;
            if next == EXT_SELECTIVE_ACK && !body.is_empty() {
                selective_ack = Some(SelectiveAck {
                    mask: body.to_vec(),
                });
            }
            if next == EXT_BITS {
                // libutp takes type 2 only at exactly 8 bytes; so do we.
                extension_bits = body.try_into().ok();
            }
            next = kind;
            at += 2 + len;
        }
        Ok(Packet {
            header,
            selective_ack,
            extension_bits,
            payload: &bytes[at..],
        })
    }

    /// Appends the packet's bytes to `out`. The header's `extension` byte
    /// and the extension chain are written from `selective_ack` and
    /// `extension_bits` (in that order), whatever the field holds.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let h = &self.header;
        out.reserve(
            HEADER_LEN + self.payload.len() + 4 + MAX_SELECTIVE_ACK_LEN + EXTENSION_BITS_LEN,
        );
        let bits_type = if self.extension_bits.is_some() {
            EXT_BITS
        } else {
            0
        };
        out.push((h.packet_type as u8) << 4 | VERSION);
        out.push(if self.selective_ack.is_some() {
            EXT_SELECTIVE_ACK
        } else {
            bits_type
        });
        out.extend_from_slice(&h.connection_id.to_be_bytes());
        out.extend_from_slice(&h.timestamp_us.to_be_bytes());
        out.extend_from_slice(&h.timestamp_difference_us.to_be_bytes());
        out.extend_from_slice(&h.wnd_size.to_be_bytes());
        out.extend_from_slice(&h.seq_nr.to_be_bytes());
        out.extend_from_slice(&h.ack_nr.to_be_bytes());
        if let Some(sack) = &self.selective_ack {
            // A longer mask than one byte of length can say is cut: it only
            // ever reports extra packets.
            let len = sack.mask.len().min(252);
            out.push(bits_type);
            out.push(len as u8);
            out.extend_from_slice(&sack.mask[..len]);
        }
        if let Some(bits) = &self.extension_bits {
            out.push(0);
            out.push(EXTENSION_BITS_LEN as u8);
            out.extend_from_slice(bits);
        }
        out.extend_from_slice(self.payload);
    }

    /// A packet with no payload and no extension.
    pub fn without_payload(header: Header) -> Packet<'static> {
        Packet {
            header,
            selective_ack: None,
            extension_bits: None,
            payload: &[],
        }
    }

    /// The encoded bytes in a new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Sequence-number arithmetic modulo 2^16: `a` comes before `b` when `b`
/// is less than half the number space ahead of it.
pub fn seq_less(a: u16, b: u16) -> bool {
    (b.wrapping_sub(a) as i16) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_vectors::hex;

    const TV2: &[u8] = crate::test_vectors::TV2.as_bytes();

    fn state(ack_nr: u16) -> Header {
        Header {
            packet_type: PacketType::State,
            extension: 0,
            connection_id: 7,
            timestamp_us: 1,
            timestamp_difference_us: 2,
            wnd_size: 3,
            seq_nr: 4,
            ack_nr,
        }
    }

    #[test]
    fn tv9_syn_decodes_and_encodes_byte_exact() {
        // docs/wire.md §4 and §7: a Node (libutp) SYN.
        let bytes = hex("41 00 4567 003713ba 00000000 00100000 23c6 0000");
        let packet = Packet::decode(&bytes).unwrap();
        assert_eq!(
            packet.header,
            Header {
                packet_type: PacketType::Syn,
                extension: 0,
                connection_id: 17767,
                timestamp_us: 0x003713ba,
                timestamp_difference_us: 0,
                wnd_size: 1 << 20,
                seq_nr: 9158,
                ack_nr: 0,
            }
        );
        assert!(packet.payload.is_empty());
        assert_eq!(packet.selective_ack, None);
        assert_eq!(packet.to_vec(), bytes);
    }

    #[test]
    fn tv9_state_and_first_data_decode_and_encode_byte_exact() {
        let state = hex("21 00 4567 00371455 00000000 00100000 4567 23c6");
        let packet = Packet::decode(&state).unwrap();
        assert_eq!(packet.header.packet_type, PacketType::State);
        assert_eq!(packet.header.connection_id, 17767);
        assert_eq!((packet.header.seq_nr, packet.header.ack_nr), (17767, 9158));
        assert_eq!(packet.to_vec(), state);

        let mut data = hex("01 00 4568 00371455 00000000 00100000 23c7 4566");
        data.extend_from_slice(TV2);
        let packet = Packet::decode(&data).unwrap();
        assert_eq!(packet.header.packet_type, PacketType::Data);
        assert_eq!(packet.header.connection_id, 17768, "SYN id + 1");
        assert_eq!(packet.header.seq_nr, 9159, "SYN seq + 1");
        assert_eq!(packet.header.ack_nr, 17766, "STATE seq - 1");
        assert_eq!(packet.payload, TV2);
        assert_eq!(packet.to_vec(), data);
    }

    #[test]
    fn every_type_round_trips() {
        for (first, kind) in [
            (0x01, PacketType::Data),
            (0x11, PacketType::Fin),
            (0x21, PacketType::State),
            (0x31, PacketType::Reset),
            (0x41, PacketType::Syn),
        ] {
            let mut bytes = vec![0u8; 20];
            bytes[0] = first;
            let packet = Packet::decode(&bytes).unwrap();
            assert_eq!(packet.header.packet_type, kind);
            assert_eq!(packet.to_vec(), bytes);
        }
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert_eq!(Packet::decode(&[0x01; 19]), Err(DecodeError::TooShort(19)));
        let mut bytes = vec![0u8; 20];
        bytes[0] = 0x02;
        assert_eq!(Packet::decode(&bytes), Err(DecodeError::Version(2)));
        bytes[0] = 0x51;
        assert_eq!(Packet::decode(&bytes), Err(DecodeError::Type(5)));
        // An extension announced but absent, or longer than the datagram.
        bytes[0] = 0x21;
        bytes[1] = 1;
        assert_eq!(Packet::decode(&bytes), Err(DecodeError::Extension));
        bytes.extend_from_slice(&[0, 8, 0xFF]);
        assert_eq!(Packet::decode(&bytes), Err(DecodeError::Extension));
        // Every prefix of every length is handled.
        let mut good = Packet {
            header: state(5),
            selective_ack: Some(SelectiveAck::from_offsets([0, 9])),
            extension_bits: None,
            payload: b"abc",
        }
        .to_vec();
        for n in 0..good.len() {
            let _ = Packet::decode(&good[..n]);
        }
        good[1] = 7; // an unknown extension type is skipped, not read as a SACK
        assert_eq!(Packet::decode(&good).unwrap().selective_ack, None);
    }

    #[test]
    fn selective_ack_bits_are_least_significant_first() {
        // BEP 29: the first byte covers ack_nr + 2 ..= ack_nr + 9, its least
        // significant bit being ack_nr + 2.
        let sack = SelectiveAck::from_offsets([0, 7, 8, 33]);
        assert_eq!(
            sack.mask,
            vec![0b1000_0001, 0b0000_0001, 0, 0, 0b10, 0, 0, 0]
        );
        assert_eq!(
            sack.received_offsets().collect::<Vec<_>>(),
            vec![0, 7, 8, 33]
        );
        assert_eq!(SelectiveAck::from_offsets([]).mask, vec![0; 4]);
        assert_eq!(
            SelectiveAck::from_offsets([MAX_SELECTIVE_ACK_LEN * 8]).mask,
            vec![0; 4],
            "offsets past the longest mask are left out"
        );

        let packet = Packet {
            header: state(100),
            selective_ack: Some(sack.clone()),
            extension_bits: None,
            payload: &[],
        };
        let bytes = packet.to_vec();
        assert_eq!(bytes.len(), 20 + 2 + 8);
        assert_eq!(&bytes[20..22], &[0, 8], "last extension, 8 bytes");
        assert_eq!(bytes[1], EXT_SELECTIVE_ACK);
        let decoded = Packet::decode(&bytes).unwrap();
        assert_eq!(decoded.selective_ack, Some(sack));
        assert_eq!(decoded.header.extension, EXT_SELECTIVE_ACK);
    }

    #[test]
    fn extension_bits_chain_after_a_selective_ack_and_alone() {
        let sack = SelectiveAck::from_offsets([3]);
        let both = Packet {
            header: state(9),
            selective_ack: Some(sack.clone()),
            extension_bits: Some(CAP_SECURE_SESSION_V1),
            payload: b"x",
        };
        let bytes = both.to_vec();
        assert_eq!(bytes[1], EXT_SELECTIVE_ACK);
        assert_eq!(
            &bytes[20..22],
            &[EXT_BITS, 4],
            "the SACK names the bits next"
        );
        assert_eq!(&bytes[26..28], &[0, 8], "the bits are last, 8 bytes");
        assert_eq!(&bytes[28..36], &CAP_SECURE_SESSION_V1);
        let decoded = Packet::decode(&bytes).unwrap();
        assert_eq!(decoded.selective_ack, Some(sack));
        assert_eq!(decoded.extension_bits, Some(CAP_SECURE_SESSION_V1));
        assert_eq!(decoded.payload, b"x");

        let alone = Packet {
            selective_ack: None,
            ..both
        };
        let bytes = alone.to_vec();
        assert_eq!(bytes[1], EXT_BITS);
        assert_eq!(bytes.len(), 20 + 2 + 8 + 1);
        let decoded = Packet::decode(&bytes).unwrap();
        assert_eq!(decoded.extension_bits, Some(CAP_SECURE_SESSION_V1));
        assert_eq!((decoded.selective_ack, decoded.payload), (None, &b"x"[..]));

        // libutp's rule: type 2 of any other length is skipped.
        let mut short = alone.to_vec();
        short[21] = 4;
        short.truncate(26);
        let decoded = Packet::decode(&short).unwrap();
        assert_eq!(decoded.extension_bits, None);
        assert!(decoded.payload.is_empty());
    }

    #[test]
    fn sequence_numbers_wrap() {
        assert!(seq_less(1, 2));
        assert!(!seq_less(2, 1));
        assert!(!seq_less(5, 5));
        assert!(seq_less(65535, 0));
        assert!(seq_less(65000, 300));
        assert!(!seq_less(300, 65000));
    }
}
