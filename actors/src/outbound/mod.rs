//! What other actors send an agent: WebSocket frames encoded once, written into the
//! agent's connection by the relay of the connection's thread ([`relay`]).
//!
//! Server frames are unmasked, so one encoded frame (a [`Bytes`]) serves every
//! recipient of a broadcast without a copy. Producers never wait and never see a full
//! queue: the connection writes each frame straight to its socket and queues only what
//! the kernel refused; whether the agent reads too slowly is the connection's decision
//! (PROTOCOL.md §6), not the producer's.
//!
//! Every frame for an agent goes through its [`Outbox`] to the [`relay::Relay`] of the
//! connection's thread, so what one producer sends one agent arrives in the order sent.
//! A producer that sends many frames at once (the heartbeat's pings of a tick, the
//! messages an agent sent in one read, a broadcast's copies among them) groups them in
//! [`Batches`]: one message per thread, whose relay writes every frame into its
//! connection's sink in one pass, with no message per frame, and frames in a row for one
//! connection in one system call.

pub mod relay;

pub use relay::{Delivery, FrameSink, SinkKey, SinkRegistration};

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use bytes::{Bytes, BytesMut};
use std::rc::Rc;

/// One encoded WebSocket frame for an agent.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct OutFrame(pub Bytes);

impl OutFrame {
    /// A text frame carrying `text`.
    pub fn text(text: &str) -> Self {
        Self(encode(text.as_bytes(), OpCode::Text))
    }

    /// A text frame carrying `text`, which must be UTF-8 (JSON written by serde_json).
    pub fn text_bytes(text: &[u8]) -> Self {
        Self(encode(text, OpCode::Text))
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
}

fn encode(payload: &[u8], opcode: OpCode) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    Parser::write_message(&mut buf, payload, opcode, true, false);
    buf.freeze()
}

/// Frames for many agents, grouped by the thread their connections run on (a list, not
/// a map: there are as many threads as workers, a handful).
#[derive(Default)]
pub struct Batches {
    by_relay: Vec<(u32, Vec<(SinkKey, Delivery)>)>,
}

impl Batches {
    /// Adds a frame for the agent behind `outbox`.
    pub fn push(&mut self, outbox: &Outbox, frame: OutFrame) {
        let delivery = (outbox.sink, Delivery::Frame(frame));
        match self.by_relay.iter_mut().find(|(id, _)| *id == outbox.relay) {
            Some((_, frames)) => frames.push(delivery),
            None => self.by_relay.push((outbox.relay, vec![delivery])),
        }
    }

    /// Sends every group to its thread: one message each.
    pub fn send(self) {
        for (id, frames) in self.by_relay {
            relay::send_to_relay(id, relay::Deliveries(frames));
        }
    }
}

/// Where an agent's frames go: the sink of its connection, on the connection's thread.
/// Twelve bytes, `Copy`, valid on any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbox {
    /// The relay of the connection's thread.
    relay: u32,
    sink: SinkKey,
}

impl Outbox {
    /// Enters `sink` in this thread's table: the outbox, and the registration whose drop
    /// ends it (frames sent after that are dropped).
    pub fn register(sink: Rc<dyn FrameSink>) -> (Self, SinkRegistration) {
        let (registration, relay) = SinkRegistration::new(sink);
        let outbox = Self {
            relay,
            sink: registration.key(),
        };
        (outbox, registration)
    }

    /// An outbox whose frames are sent to `recipient` as messages, for as long as this
    /// thread runs (tests' stand-in for a connection; [`relay::delivered`] waits until
    /// what was sent has been handed over).
    #[cfg(test)]
    pub fn forwarding_to(recipient: Recipient<OutFrame>) -> Self {
        let (outbox, registration) = Self::register(Rc::new(recipient));
        std::mem::forget(registration);
        outbox
    }

    /// Sends a frame without waiting; dropped if the connection has ended.
    pub fn push(&self, frame: OutFrame) {
        self.relay_one(Delivery::Frame(frame));
    }

    /// Sends `order` to `recipient` (the connection actor) once every frame pushed
    /// before it has been written, and `frame` if given (in the same message to the
    /// relay, so the order is handed over in the turn that writes the frame: the
    /// connection has it before it can read the agent's reply): an order that ends or
    /// changes the connection comes after what was sent to it first.
    pub fn then_send<M>(&self, frame: Option<OutFrame>, recipient: &Recipient<M>, order: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let recipient = recipient.clone();
        let order = Delivery::Then(Box::new(move || recipient.do_send(order)));
        let mut deliveries = Vec::with_capacity(2);
        deliveries.extend(frame.map(|frame| (self.sink, Delivery::Frame(frame))));
        deliveries.push((self.sink, order));
        relay::send_to_relay(self.relay, relay::Deliveries(deliveries));
    }

    fn relay_one(&self, delivery: Delivery) {
        relay::send_to_relay(self.relay, relay::Deliveries(vec![(self.sink, delivery)]));
    }

    /// Sends `value` as a text frame.
    pub fn push_json(&self, value: &serde_json::Value) {
        self.push(OutFrame::json(value));
    }
}

#[cfg(test)]
impl FrameSink for Recipient<OutFrame> {
    fn deliver(&self, frame: OutFrame) {
        self.do_send(frame);
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
