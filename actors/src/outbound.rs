//! What other actors send an agent: WebSocket frames encoded once, delivered to the
//! connection actor's mailbox through its [`Outbox`].
//!
//! Server frames are unmasked, so one encoded frame (a [`Bytes`]) serves every
//! recipient of a broadcast without a copy. Producers never wait and never see a full
//! queue: the connection writes each frame straight to its socket and queues only what
//! the kernel refused; whether the agent reads too slowly is the connection's decision
//! (PROTOCOL.md §6), not the producer's.
//!
//! A producer on another thread that sends many frames at once (the heartbeat's pings
//! of a tick, a broadcast) groups them in [`Batches`]: one message per worker thread to
//! that worker's [`Relay`], which hands each frame to its connection on the same
//! thread, instead of one cross-thread wake-up per frame.

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::RwLock;

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
}

fn encode(payload: &[u8], opcode: OpCode) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    Parser::write_message(&mut buf, payload, opcode, true, false);
    buf.freeze()
}

/// Frames for connections of one worker thread, handed over by its [`Relay`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliveries(pub Vec<(Recipient<OutFrame>, OutFrame)>);

/// One per thread that runs connections: delivers [`Deliveries`] locally.
pub struct Relay;

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
    }
}

impl Handler<Deliveries> for Relay {
    type Result = ();

    fn handle(&mut self, msg: Deliveries, _ctx: &mut Self::Context) {
        for (recipient, frame) in msg.0 {
            recipient.do_send(frame);
        }
    }
}

/// Every thread's relay, by number. An [`Outbox`] keeps only the number: a cloned
/// address costs about 130 bytes, which every agent would pay several times over.
static RELAYS: RwLock<Vec<Recipient<Deliveries>>> = RwLock::new(Vec::new());

thread_local! {
    static THIS_THREAD_RELAY: std::cell::OnceCell<u32> = const { std::cell::OnceCell::new() };
}

/// The number of this thread's relay, started on first use.
fn this_thread_relay() -> u32 {
    THIS_THREAD_RELAY.with(|relay| {
        *relay.get_or_init(|| {
            let mut relays = RELAYS.write().unwrap_or_else(|e| e.into_inner());
            relays.push(Relay.start().recipient());
            (relays.len() - 1) as u32
        })
    })
}

/// Sends `deliveries` to the relay numbered `id`; gives them back if there is none.
fn send_to_relay(id: u32, deliveries: Deliveries) -> Result<(), Deliveries> {
    let relays = RELAYS.read().unwrap_or_else(|e| e.into_inner());
    match relays.get(id as usize) {
        Some(relay) => {
            relay.do_send(deliveries);
            Ok(())
        }
        None => Err(deliveries),
    }
}

/// Frames for many agents, grouped by the thread their connections run on.
#[derive(Default)]
pub struct Batches {
    by_relay: HashMap<u32, Vec<(Recipient<OutFrame>, OutFrame)>>,
}

impl Batches {
    /// Adds a frame for the agent behind `outbox`.
    pub fn push(&mut self, outbox: &Outbox, frame: OutFrame) {
        let frames = self.by_relay.entry(outbox.relay).or_default();
        frames.push((outbox.recipient.clone(), frame));
    }

    /// Sends every group to its thread: one message each.
    pub fn send(self) {
        for (id, frames) in self.by_relay {
            if let Err(Deliveries(frames)) = send_to_relay(id, Deliveries(frames)) {
                for (recipient, frame) in frames {
                    recipient.do_send(frame);
                }
            }
        }
    }
}

/// Where an agent's frames go: its connection actor (and the relay of its thread, for
/// [`Batches`]). Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    recipient: Recipient<OutFrame>,
    /// The relay of the connection's thread.
    relay: u32,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("connected", &self.recipient.connected())
            .finish()
    }
}

impl Outbox {
    /// The outbox of the actor behind `recipient`, which runs on this thread.
    pub fn new(recipient: Recipient<OutFrame>) -> Self {
        Self {
            recipient,
            relay: this_thread_relay(),
        }
    }

    /// Sends a frame without waiting; dropped if the connection has ended.
    pub fn push(&self, frame: OutFrame) {
        self.recipient.do_send(frame);
    }

    /// Sends a routed message through the relay of the agent's thread, the way
    /// [`Batches`] send broadcasts, so that the messages one agent routes to another
    /// arrive in the order they were routed, direct or broadcast.
    pub fn push_routed(&self, frame: OutFrame) {
        let delivery = Deliveries(vec![(self.recipient.clone(), frame)]);
        if let Err(Deliveries(mut frames)) = send_to_relay(self.relay, delivery) {
            if let Some((_, frame)) = frames.pop() {
                self.push(frame);
            }
        }
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
