//! What other actors send an agent: WebSocket frames encoded once, delivered to the
//! connection actor's mailbox through its [`Outbox`].
//!
//! Server frames are unmasked, so one encoded frame (a [`Bytes`]) serves every
//! recipient of a broadcast without a copy. Producers never wait and never see a full
//! queue: the connection writes each frame straight to its socket and queues only what
//! the kernel refused; whether the agent reads too slowly is the connection's decision
//! (PROTOCOL.md §6), not the producer's.

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use bytes::{Bytes, BytesMut};

/// One encoded WebSocket frame for an agent.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct OutFrame(pub Bytes);

impl OutFrame {
    /// A text frame carrying `text`.
    pub fn text(text: &str) -> Self {
        Self(encode(text.as_bytes(), OpCode::Text))
    }

    /// A text frame carrying `value` serialized.
    pub fn json(value: &serde_json::Value) -> Self {
        Self::text(&value.to_string())
    }

    /// A pong answering a client ping with `payload`.
    pub fn pong(payload: &[u8]) -> Self {
        Self(encode(payload, OpCode::Pong))
    }

    /// A close frame with `code` and `reason`.
    pub fn close(code: u16, reason: &str) -> Self {
        let mut buf = BytesMut::with_capacity(4 + reason.len());
        let reason = CloseReason {
            code: CloseCode::from(code),
            description: (!reason.is_empty()).then(|| reason.to_owned()),
        };
        Parser::write_close(&mut buf, Some(reason), false);
        Self(buf.freeze())
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it has no bytes (never, for a real frame).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn encode(payload: &[u8], opcode: OpCode) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    Parser::write_message(&mut buf, payload, opcode, true, false);
    buf.freeze()
}

/// Where an agent's frames go: its connection actor. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    recipient: Recipient<OutFrame>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("connected", &self.recipient.connected())
            .finish()
    }
}

impl Outbox {
    /// The outbox of the actor behind `recipient`.
    pub fn new(recipient: Recipient<OutFrame>) -> Self {
        Self { recipient }
    }

    /// Sends a frame without waiting; dropped if the connection has ended.
    pub fn push(&self, frame: OutFrame) {
        self.recipient.do_send(frame);
    }

    /// Sends `value` as a text frame.
    pub fn push_json(&self, value: &serde_json::Value) {
        self.push(OutFrame::json(value));
    }

    /// Whether the connection is still there.
    pub fn is_connected(&self) -> bool {
        self.recipient.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder;
    use actix_http::ws::{Codec, Frame};

    fn decode(frame: &OutFrame) -> Frame {
        let mut buf = BytesMut::from(&frame.0[..]);
        let frame = Codec::new()
            .max_size(1 << 24)
            .client_mode()
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        frame
    }

    #[test]
    fn frames_decode_as_what_they_were_built_from() {
        let text = OutFrame::text(&"x".repeat(70_000));
        assert_eq!(decode(&text), Frame::Text(Bytes::from("x".repeat(70_000))));
        assert_eq!(
            decode(&OutFrame::pong(b"hi")),
            Frame::Pong(Bytes::from("hi"))
        );
        let Frame::Close(Some(reason)) = decode(&OutFrame::close(4003, "slow_consumer")) else {
            panic!("not a close frame")
        };
        assert_eq!(u16::from(reason.code), 4003);
        assert_eq!(reason.description.as_deref(), Some("slow_consumer"));
    }
}
