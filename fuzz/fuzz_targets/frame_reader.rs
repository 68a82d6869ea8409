//! Fuzzes `tether_actors::connection::FrameReader`: arbitrary bytes, as an agent would
//! send them, cut into arbitrary TCP-sized pieces.
//!
//! Input layout: byte 0 picks the message limit (bits 0–1: 4096, 256, 125 or 16 bytes,
//! small so the limit paths are reached with short inputs) and the number of cuts
//! (bits 2–7, 0–63); the next that-many bytes are the lengths of the first pieces
//! (0–255 each; 0 feeds nothing new); the rest of the input is the byte stream, whose
//! remainder after the cuts is the last piece.
//!
//! Checked after every call to `next` (the loop stops at the first `Err`, as the
//! connection does):
//! - the reader never holds more than the limit (`held_bytes() <= limit`);
//! - a returned message consumed bytes, and is within the limit; text is UTF-8;
//! - `Ok(None)` never leaves a complete frame at the front of the buffer (progress);
//! - the stream read in pieces gives the same messages, the same close code and the same
//!   leftover as the stream read at once (how TCP segments it changes nothing).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_actors::connection::{FrameReader, Received};
use tether_actors::disconnect::Disconnect;

const LIMITS: [usize; 4] = [4096, 256, 125, 16];

/// What reading a stream gave: the messages, the error that stopped it (if any), and
/// the bytes left in the buffer and held by the reader.
#[derive(Debug, PartialEq)]
struct Outcome {
    received: Vec<Received>,
    error: Option<Disconnect>,
    left: usize,
    held: usize,
}

/// Whether `buf` starts with a whole frame, by its header alone (RFC 6455 §5.2).
fn complete_frame_at_front(buf: &[u8]) -> bool {
    let Some(&second) = buf.get(1) else {
        return false;
    };
    let (mut header, length) = match second & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (4u64, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return false,
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().unwrap())),
            None => return false,
        },
        short => (2, u64::from(short)),
    };
    if second & 0x80 != 0 {
        header += 4;
    }
    (buf.len() as u64) >= header.saturating_add(length)
}

/// Calls `next` until it has nothing more to give; `Err` when the reader refused the
/// stream.
fn drain(
    reader: &mut FrameReader,
    buf: &mut BytesMut,
    limit: usize,
    received: &mut Vec<Received>,
) -> Result<(), Disconnect> {
    loop {
        let before = buf.len();
        let result = reader.next(buf);
        assert!(
            reader.held_bytes() <= limit,
            "reader holds {} bytes, limit {limit}",
            reader.held_bytes()
        );
        match result? {
            Some(message) => {
                assert!(
                    buf.len() < before,
                    "a message was returned without consuming bytes"
                );
                match &message {
                    Received::Text(text) => {
                        assert!(std::str::from_utf8(text.as_bytes()).is_ok());
                        assert!(text.len() <= limit, "text of {} bytes", text.len());
                    }
                    Received::Binary(bytes) => {
                        assert!(bytes.len() <= limit, "binary of {} bytes", bytes.len())
                    }
                    Received::Ping(bytes) => {
                        assert!(
                            bytes.len() <= limit.min(125),
                            "ping of {} bytes",
                            bytes.len()
                        )
                    }
                    Received::Pong | Received::Close(_) => {}
                }
                received.push(message);
            }
            None => {
                assert!(
                    !complete_frame_at_front(buf),
                    "Ok(None) with a complete frame in the buffer: {:02x?}",
                    &buf[..buf.len().min(16)]
                );
                return Ok(());
            }
        }
    }
}

/// Reads `pieces` one after the other through one reader and buffer.
fn read<'a>(limit: usize, pieces: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut reader = FrameReader::new(limit);
    let mut buf = BytesMut::new();
    let mut received = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        if let Err(error) = drain(&mut reader, &mut buf, limit, &mut received) {
            return Outcome {
                received,
                error: Some(error),
                left: 0,
                held: 0,
            };
        }
    }
    Outcome {
        received,
        error: None,
        left: buf.len(),
        held: reader.held_bytes(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(selector & 0b11)];
    let cuts = usize::from(selector >> 2).min(rest.len());
    let (lengths, stream) = rest.split_at(cuts);

    let mut pieces = Vec::with_capacity(cuts + 1);
    let mut remaining = stream;
    for &length in lengths {
        let (piece, tail) = remaining.split_at(usize::from(length).min(remaining.len()));
        pieces.push(piece);
        remaining = tail;
    }
    pieces.push(remaining);

    let in_pieces = read(limit, pieces);
    let at_once = read(limit, [stream]);
    assert_eq!(
        in_pieces, at_once,
        "reading in pieces differs from reading at once"
    );
});
