//! What other actors send an agent: WebSocket frames encoded once, written into the
//! agent's socket by whoever sends them, or by the relay of the connection's thread
//! ([`relay`]).
//!
//! Server frames are unmasked, so one encoded frame (a [`Bytes`]) serves every
//! recipient of a broadcast without a copy. Producers never wait and never see a full
//! queue: a frame is written straight to the socket and only what the kernel refused is
//! queued; whether the agent reads too slowly is the connection's decision
//! (PROTOCOL.md §6), not the producer's.
//!
//! A few frames (a direct message, an answer) are written by the sending thread itself,
//! into the socket of a connection that may run on another worker: no message, no wake
//! of that worker. Many at once (a broadcast's copies, the heartbeat's pings of a tick)
//! are grouped in [`Batches`] by the thread their connections run on, and each group
//! goes to that thread's relay in one message, so the workers write them in parallel.
//! What one producer sends one agent still arrives in the order sent: a sink counts the
//! frames on their way through its relay, and a frame for it is written on the spot
//! only when none are (otherwise it follows them through the relay).

pub mod relay;

pub use relay::{Delivery, FrameSink};

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, Weak};

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

/// Groups of at most this many frames for one thread are written by the sending
/// thread itself; larger ones go to the thread's relay, so the workers share them.
const WRITE_HERE_AT_MOST: usize = 8;

/// Frames for many agents, grouped by the thread their connections run on (a list, not
/// a map: there are as many threads as workers, a handful).
#[derive(Default)]
pub struct Batches {
    by_relay: Vec<(u32, Vec<relay::Addressed>)>,
}

impl Batches {
    /// Adds a frame for the agent behind `outbox` (nothing if its connection has ended).
    pub fn push(&mut self, outbox: &Outbox, frame: OutFrame) {
        let Some(sink) = outbox.sink.upgrade() else {
            return;
        };
        let relay = sink.relay();
        let delivery = (sink, Delivery::Frame(frame));
        match self.by_relay.iter_mut().find(|(id, _)| *id == relay) {
            Some((_, frames)) => frames.push(delivery),
            None => self.by_relay.push((relay, vec![delivery])),
        }
    }

    /// Writes small groups here and sends each large one to its thread's relay (one
    /// message each, sent before this thread writes anything, so that the other
    /// workers start at once).
    pub fn send(self) {
        let mut here = Vec::new();
        for (id, frames) in self.by_relay {
            if frames.len() <= WRITE_HERE_AT_MOST {
                here.push((id, frames));
            } else {
                relay::send_to_relay(id, frames);
            }
        }
        for (id, frames) in here {
            relay::write_here(id, frames);
        }
    }
}

/// Where an agent's frames go: the sink of its connection (which knows the relay of
/// the thread the connection runs on). Sixteen bytes, valid on any thread; once the
/// connection has ended, frames sent to it are dropped.
#[derive(Clone)]
pub struct Outbox {
    sink: Weak<dyn FrameSink>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// The outbox of `sink`; it does not keep the sink alive.
    pub fn new(sink: &Arc<dyn FrameSink>) -> Self {
        Self {
            sink: Arc::downgrade(sink),
        }
    }

    /// An outbox whose frames are sent to `recipient` as messages, for as long as this
    /// thread runs (tests' stand-in for a connection; [`relay::delivered`] waits until
    /// what was sent through the relay has been handed over).
    #[cfg(test)]
    pub fn forwarding_to(recipient: Recipient<OutFrame>) -> Self {
        let sink: Arc<dyn FrameSink> = Arc::new(relay::TestSink::forwarding_to(recipient));
        let outbox = Self::new(&sink);
        std::mem::forget(sink);
        outbox
    }

    /// Sends a frame without waiting; dropped if the connection has ended.
    pub fn push(&self, frame: OutFrame) {
        if let Some(sink) = self.sink.upgrade() {
            relay::write_here(sink.relay(), vec![(sink, Delivery::Frame(frame))]);
        }
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
        let Some(sink) = self.sink.upgrade() else {
            return;
        };
        let relay = sink.relay();
        let recipient = recipient.clone();
        let order = Delivery::Then(Box::new(move || recipient.do_send(order)));
        let mut deliveries = Vec::with_capacity(2);
        deliveries.extend(frame.map(|frame| (sink.clone(), Delivery::Frame(frame))));
        deliveries.push((sink, order));
        relay::send_to_relay(relay, deliveries);
    }

    /// Sends `value` as a text frame.
    pub fn push_json(&self, value: &serde_json::Value) {
        self.push(OutFrame::json(value));
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
