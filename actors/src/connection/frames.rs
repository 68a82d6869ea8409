//! Reading WebSocket messages out of received bytes, with nothing buffered that was not
//! allowed.
//!
//! Frames are parsed by actix-http's WebSocket codec; this module owns only what the
//! codec does not do: it reads each frame's announced length from its header and
//! refuses a frame (or a fragmented message) that would exceed the limit *before* its
//! payload is buffered (the codec checks only once the whole frame has arrived),
//! reassembles fragments into one buffer so a message costs its own length whatever
//! its fragmentation, and checks that text is UTF-8.

use crate::disconnect::Disconnect;
use actix_codec::Decoder;
use actix_http::ws::{CloseReason, Codec, Frame, Item, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

/// A complete message or control frame from the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A text message (reassembled if it was fragmented), valid UTF-8.
    Text(ByteString),
    /// A binary message (reassembled if it was fragmented).
    Binary(Bytes),
    /// A ping with its payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame.
    Close(Option<CloseReason>),
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Fragments {
    text: bool,
    bytes: BytesMut,
}

/// Turns received bytes into [`Received`] values, one at a time.
#[derive(Debug)]
pub struct FrameReader {
    codec: Codec,
    max_message_bytes: usize,
    fragments: Option<Fragments>,
}

/// The payload length a frame header at the start of `buf` announces, once the bytes
/// carrying it have arrived (RFC 6455 §5.2).
fn announced_length(buf: &[u8]) -> Option<u64> {
    let marker = buf.get(1)? & 0x7F;
    match marker {
        126 => Some(u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]))),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }
        short => Some(u64::from(short)),
    }
}

impl FrameReader {
    /// A reader refusing frames and messages over `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            codec: Codec::new().max_size(max_message_bytes),
            max_message_bytes,
            fragments: None,
        }
    }

    /// Bytes held for a message being reassembled.
    pub fn held_bytes(&self) -> usize {
        self.fragments.as_ref().map_or(0, |f| f.bytes.len())
    }

    /// The next message or control frame in `buf`, consuming its bytes; `Ok(None)` when
    /// `buf` holds no complete one yet. `Err` says how to close the connection.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Received>, Disconnect> {
        loop {
            // The codec sees no header before its length bytes have arrived: given the
            // first bytes of a malformed header alone, it would close 1002, where the
            // whole header is closed 1009 by this check, and the close code would depend
            // on how the bytes were segmented (found by `fuzz/`, target `frame_reader`).
            let Some(length) = announced_length(buf) else {
                return Ok(None);
            };
            // A continuation adds to the message being reassembled; a control frame
            // between fragments (a ping) is not part of it.
            let continues = buf[0] & 0x0F == 0;
            let held = if continues {
                self.held_bytes() as u64
            } else {
                0
            };
            if length.saturating_add(held) > self.max_message_bytes as u64 {
                return Err(Disconnect::MESSAGE_TOO_BIG);
            }
            let frame = match self.codec.decode(buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(ProtocolError::Overflow) => return Err(Disconnect::MESSAGE_TOO_BIG),
                Err(error) => {
                    log::debug!("WebSocket framing error: {error}");
                    return Err(Disconnect::BAD_FRAMING);
                }
            };
            let received = match frame {
                Frame::Text(bytes) => Received::Text(utf8(bytes)?),
                Frame::Binary(bytes) => Received::Binary(bytes),
                Frame::Ping(bytes) => Received::Ping(bytes),
                Frame::Pong(_) => Received::Pong,
                Frame::Close(reason) => Received::Close(reason),
                Frame::Continuation(item) => match self.continuation(item)? {
                    Some(received) => received,
                    None => continue,
                },
            };
            return Ok(Some(received));
        }
    }

    fn continuation(&mut self, item: Item) -> Result<Option<Received>, Disconnect> {
        let (first, text, last, bytes) = match item {
            Item::FirstText(bytes) => (true, true, false, bytes),
            Item::FirstBinary(bytes) => (true, false, false, bytes),
            Item::Continue(bytes) => (false, false, false, bytes),
            Item::Last(bytes) => (false, false, true, bytes),
        };
        if first {
            self.fragments = Some(Fragments {
                text,
                bytes: BytesMut::new(),
            });
        }
        let fragments = self.fragments.as_mut().ok_or(Disconnect::BAD_FRAMING)?;
        if fragments.bytes.len() + bytes.len() > self.max_message_bytes {
            return Err(Disconnect::MESSAGE_TOO_BIG);
        }
        fragments.bytes.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let Fragments { text, bytes } = self.fragments.take().expect("checked above");
        let bytes = bytes.freeze();
        Ok(Some(if text {
            Received::Text(utf8(bytes)?)
        } else {
            Received::Binary(bytes)
        }))
    }
}

fn utf8(bytes: Bytes) -> Result<ByteString, Disconnect> {
    ByteString::try_from(bytes).map_err(|_| Disconnect::INVALID_PAYLOAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let mask = [1u8, 2, 3, 4];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn read_all(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Received>, Disconnect> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(received) = reader.next(&mut buf)? {
            out.push(received);
        }
        Ok(out)
    }

    #[test]
    fn a_text_frame_split_anywhere_reads_the_same() {
        let bytes = frame(true, 1, b"{\"type\":\"x\"}");
        for split in 0..bytes.len() {
            let mut reader = FrameReader::new(1024);
            let mut buf = BytesMut::from(&bytes[..split]);
            assert_eq!(reader.next(&mut buf), Ok(None));
            buf.extend_from_slice(&bytes[split..]);
            let text = reader.next(&mut buf).unwrap().unwrap();
            assert_eq!(text, Received::Text("{\"type\":\"x\"}".into()));
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_at_its_header_before_its_payload() {
        let mut reader = FrameReader::new(1024);
        // 1 TiB announced, header only (2 + 8 length bytes, no mask yet).
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(reader.next(&mut buf), Err(Disconnect::MESSAGE_TOO_BIG));
    }

    /// Regression (fuzz target `frame_reader`): a header with reserved bits and a bad
    /// opcode announcing a 64-bit length over the limit closed 1002 when its first bytes
    /// arrived alone and 1009 when its length bytes arrived with them.
    #[test]
    fn the_close_code_of_a_header_does_not_depend_on_where_it_is_split() {
        let mut header = vec![0xFF, 0xFF]; // FIN, RSV1-3, opcode 0xF; masked, 64-bit length
        header.extend_from_slice(&0x213D_0D00_5440_3E87u64.to_be_bytes());
        let mut short = vec![0xF1, 0xFE]; // RSV1-3, text; masked, 16-bit length
        short.extend_from_slice(&2000u16.to_be_bytes());
        for bytes in [header, short] {
            for split in 0..=bytes.len() {
                let mut reader = FrameReader::new(1024);
                let mut buf = BytesMut::from(&bytes[..split]);
                let mut result = reader.next(&mut buf);
                if result == Ok(None) {
                    buf.extend_from_slice(&bytes[split..]);
                    result = reader.next(&mut buf);
                }
                assert_eq!(result, Err(Disconnect::MESSAGE_TOO_BIG), "split at {split}");
            }
        }
    }

    #[test]
    fn fragments_are_reassembled_and_their_total_is_limited() {
        let mut reader = FrameReader::new(10);
        let mut bytes = frame(false, 1, b"ab");
        bytes.extend(frame(false, 0, b"cd"));
        bytes.extend(frame(true, 9, b"ping")); // a control frame between fragments
        bytes.extend(frame(true, 0, b"ef"));
        let received = read_all(&mut reader, &bytes).unwrap();
        assert_eq!(
            received,
            [
                Received::Ping(Bytes::from_static(b"ping")),
                Received::Text("abcdef".into())
            ]
        );
        let mut many = Vec::new();
        for _ in 0..6 {
            many.extend(frame(false, if many.is_empty() { 1 } else { 0 }, b"xx"));
        }
        assert_eq!(
            read_all(&mut reader, &many),
            Err(Disconnect::MESSAGE_TOO_BIG)
        );
    }

    #[test]
    fn a_ping_between_fragments_does_not_count_toward_the_message() {
        let mut reader = FrameReader::new(10);
        let mut bytes = frame(false, 1, b"abcdefgh"); // 8 of 10 bytes held
        bytes.extend(frame(true, 9, b"ping")); // 4 more would exceed 10 if counted
        bytes.extend(frame(true, 0, b"ij"));
        let received = read_all(&mut reader, &bytes).unwrap();
        assert_eq!(
            received,
            [
                Received::Ping(Bytes::from_static(b"ping")),
                Received::Text("abcdefghij".into())
            ]
        );
    }

    #[test]
    fn one_byte_fragments_cost_their_bytes_not_a_buffer_each() {
        let mut reader = FrameReader::new(1 << 20);
        let mut bytes = frame(false, 1, b"a");
        for _ in 0..10_000 {
            bytes.extend(frame(false, 0, b"a"));
        }
        assert!(read_all(&mut reader, &bytes).unwrap().is_empty());
        assert_eq!(reader.held_bytes(), 10_001);
    }

    #[test]
    fn invalid_utf8_closes_1007_and_bad_framing_1002() {
        let mut reader = FrameReader::new(1024);
        let bad = frame(true, 1, &[0xff, 0xfe]);
        assert_eq!(
            read_all(&mut reader, &bad),
            Err(Disconnect::INVALID_PAYLOAD)
        );
        let mut reader = FrameReader::new(1024);
        let unmasked = [0x81u8, 0x01, b'a'];
        assert_eq!(
            read_all(&mut reader, &unmasked),
            Err(Disconnect::BAD_FRAMING)
        );
        let mut reader = FrameReader::new(1024);
        let stray = frame(true, 0, b"x"); // a continuation with nothing to continue
        assert_eq!(read_all(&mut reader, &stray), Err(Disconnect::BAD_FRAMING));
    }
}
