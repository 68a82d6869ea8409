//! The relay of a worker thread: it writes frames sent from other threads straight into
//! the sinks of that thread's connections, in one pass, without a message per frame.
//!
//! Every thread that runs connections has one [`Relay`] actor and one table of
//! [`FrameSink`]s (a slab: a connection's place in it is a [`SinkKey`], which other
//! threads can hold). A producer on another thread (the registry routing a message, the
//! heartbeat's tick) sends one [`Deliveries`] per thread; the relay looks each key up and
//! hands the frame to the sink, which writes it to the kernel. The connection actor
//! itself is woken only when the kernel refuses bytes (its sink asks for attention).

use super::OutFrame;
use actix::prelude::*;
use slab::Slab;
use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::sync::RwLock;

/// Where the frames of one connection are written, on the connection's own thread.
pub trait FrameSink {
    /// Writes `frame` for the agent (or queues what the kernel refuses); drops it if the
    /// connection is closing.
    fn deliver(&self, frame: OutFrame);

    /// Writes `frames`, in order, as [`deliver`](Self::deliver) would each (a sink that
    /// can writes them in one system call).
    fn deliver_all(&self, frames: Vec<OutFrame>) {
        for frame in frames {
            self.deliver(frame);
        }
    }
}

/// Most frames for one connection handed to its sink at once (one `writev`, whose
/// vector the kernel caps at 1024).
const MOST_AT_ONCE: usize = 64;

/// A connection's place in its thread's sink table: valid on any thread, resolved only
/// on the connection's own. The generation tells a reused slot from the one the key
/// was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkKey {
    index: u32,
    generation: u32,
}

/// What the relay does for one connection, in the order given.
pub enum Delivery {
    /// Writes a frame into the connection's sink.
    Frame(OutFrame),
    /// Runs once the frames before it are written: sends the connection actor an order
    /// (registered, refused, close) so that it follows the frames sent before it.
    Then(Box<dyn FnOnce() + Send>),
}

/// What the relay does for connections of one thread, keyed by their sinks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliveries(pub Vec<(SinkKey, Delivery)>);

/// Answers once every [`Deliveries`] sent to the relay before it has been delivered.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
struct Barrier;

/// One per thread that runs connections: hands [`Deliveries`] to the sinks.
pub struct Relay;

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
    }
}

impl Handler<Deliveries> for Relay {
    type Result = ();

    /// Frames in a row for one connection (several messages an agent sent another in
    /// one read, say) are handed over together, so they reach the kernel in one write.
    fn handle(&mut self, msg: Deliveries, _ctx: &mut Self::Context) {
        let mut deliveries = msg.0.into_iter().peekable();
        while let Some((key, delivery)) = deliveries.next() {
            let frame = match delivery {
                Delivery::Frame(frame) => frame,
                Delivery::Then(order) => {
                    order();
                    continue;
                }
            };
            let same_sink =
                |(next, d): &(SinkKey, Delivery)| *next == key && matches!(d, Delivery::Frame(_));
            // The table is not borrowed while the sink writes.
            let Some(sink) = sink_of(key) else { continue };
            if !deliveries.peek().is_some_and(same_sink) {
                sink.deliver(frame);
                continue;
            }
            let mut run = vec![frame];
            while run.len() < MOST_AT_ONCE {
                let Some((_, Delivery::Frame(next))) = deliveries.next_if(same_sink) else {
                    break;
                };
                run.push(next);
            }
            sink.deliver_all(run);
        }
    }
}

#[cfg(test)]
impl Handler<Barrier> for Relay {
    type Result = ();

    fn handle(&mut self, _msg: Barrier, _ctx: &mut Self::Context) {}
}

/// Every thread's relay, by number. An outbox keeps only the number: a cloned address
/// costs about 130 bytes, which every agent would pay several times over.
static RELAYS: RwLock<Vec<Recipient<Deliveries>>> = RwLock::new(Vec::new());

/// This thread's sinks and the generation counter of their keys.
struct Sinks {
    table: Slab<(u32, Rc<dyn FrameSink>)>,
    next_generation: u32,
}

thread_local! {
    static THIS_THREAD_RELAY: OnceCell<(u32, Addr<Relay>)> = const { OnceCell::new() };
    static SINKS: RefCell<Sinks> = RefCell::new(Sinks {
        table: Slab::new(),
        next_generation: 0,
    });
}

/// The number of this thread's relay, started on first use.
pub(super) fn this_thread_relay() -> u32 {
    this_thread_relay_addr().0
}

fn this_thread_relay_addr() -> (u32, Addr<Relay>) {
    THIS_THREAD_RELAY.with(|cell| {
        cell.get_or_init(|| {
            let addr = Relay.start();
            let mut relays = RELAYS.write().unwrap_or_else(|e| e.into_inner());
            relays.push(addr.clone().recipient());
            ((relays.len() - 1) as u32, addr)
        })
        .clone()
    })
}

/// Sends `deliveries` to the relay numbered `id` (dropped if there is none: no sink
/// can have been registered on a thread without a relay).
pub(super) fn send_to_relay(id: u32, deliveries: Deliveries) {
    let relays = RELAYS.read().unwrap_or_else(|e| e.into_inner());
    if let Some(relay) = relays.get(id as usize) {
        relay.do_send(deliveries);
    }
}

/// Waits until this thread's relay has delivered everything sent to it so far (for
/// tests, which look at what a sink received).
#[cfg(test)]
pub async fn delivered() {
    let (_, relay) = this_thread_relay_addr();
    let _ = relay.send(Barrier).await;
}

fn sink_of(key: SinkKey) -> Option<Rc<dyn FrameSink>> {
    SINKS.with(|sinks| {
        let sinks = sinks.borrow();
        match sinks.table.get(key.index as usize) {
            Some((generation, sink)) if *generation == key.generation => Some(sink.clone()),
            _ => None,
        }
    })
}

/// A sink's entry in its thread's table; dropping it removes the entry, after which
/// frames for its key are dropped.
pub struct SinkRegistration {
    key: SinkKey,
    /// Tied to the thread whose table holds the entry.
    _not_send: std::marker::PhantomData<Rc<()>>,
}

impl SinkRegistration {
    /// Enters `sink` in this thread's table (starting the thread's relay if needed).
    pub fn new(sink: Rc<dyn FrameSink>) -> (Self, u32) {
        let relay = this_thread_relay();
        let key = SINKS.with(|sinks| {
            let mut sinks = sinks.borrow_mut();
            sinks.next_generation = sinks.next_generation.wrapping_add(1);
            let generation = sinks.next_generation;
            let index = sinks.table.insert((generation, sink)) as u32;
            SinkKey { index, generation }
        });
        let registration = Self {
            key,
            _not_send: std::marker::PhantomData,
        };
        (registration, relay)
    }

    /// The key other threads address the sink by.
    pub fn key(&self) -> SinkKey {
        self.key
    }
}

impl Drop for SinkRegistration {
    fn drop(&mut self) {
        let key = self.key;
        // `try_with`: a thread being torn down may already have dropped its table.
        let _ = SINKS.try_with(|sinks| {
            let mut sinks = sinks.borrow_mut();
            if matches!(sinks.table.get(key.index as usize), Some((g, _)) if *g == key.generation) {
                sinks.table.remove(key.index as usize);
                if sinks.table.is_empty() {
                    sinks.table.shrink_to_fit();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{Batches, Outbox};

    /// A sink that keeps what it is given, and how many frames each hand-over held.
    #[derive(Default)]
    struct Recording(RefCell<Vec<OutFrame>>, RefCell<Vec<usize>>);

    impl FrameSink for Recording {
        fn deliver(&self, frame: OutFrame) {
            self.0.borrow_mut().push(frame);
            self.1.borrow_mut().push(1);
        }

        fn deliver_all(&self, frames: Vec<OutFrame>) {
            self.1.borrow_mut().push(frames.len());
            self.0.borrow_mut().extend(frames);
        }
    }

    fn registered() -> (Rc<Recording>, Outbox, SinkRegistration) {
        let sink = Rc::new(Recording::default());
        let (outbox, registration) = Outbox::register(sink.clone());
        (sink, outbox, registration)
    }

    #[actix::test]
    async fn frames_reach_the_sink_in_the_order_they_were_sent() {
        let (sink, outbox, _registration) = registered();
        outbox.push(OutFrame::text("one"));
        let mut batch = Batches::default();
        batch.push(&outbox, OutFrame::text("two"));
        batch.send();
        outbox.push(OutFrame::text("three"));
        delivered().await;
        let expected: Vec<_> = ["one", "two", "three"].map(OutFrame::text).into();
        assert_eq!(*sink.0.borrow(), expected);
    }

    #[actix::test]
    async fn frames_in_a_row_for_one_sink_are_handed_over_together_and_in_order() {
        let (alice, to_alice, _a) = registered();
        let (bob, to_bob, _b) = registered();
        let mut batch = Batches::default();
        for text in ["a1", "a2", "a3"] {
            batch.push(&to_alice, OutFrame::text(text));
        }
        batch.push(&to_bob, OutFrame::text("b1"));
        batch.push(&to_alice, OutFrame::text("a4"));
        batch.send();
        delivered().await;
        let expected: Vec<_> = ["a1", "a2", "a3", "a4"].map(OutFrame::text).into();
        assert_eq!(*alice.0.borrow(), expected);
        assert_eq!(*alice.1.borrow(), vec![3, 1], "a1..a3 in one hand-over");
        assert_eq!(*bob.0.borrow(), vec![OutFrame::text("b1")]);
    }

    #[actix::test]
    async fn an_ended_sink_gets_nothing_even_when_its_slot_is_reused() {
        let (old_sink, old_outbox, old_registration) = registered();
        drop(old_registration);
        let (new_sink, new_outbox, _registration) = registered();
        assert_eq!(
            old_outbox.sink.index, new_outbox.sink.index,
            "the slot is reused"
        );
        old_outbox.push(OutFrame::text("for the old connection"));
        new_outbox.push(OutFrame::text("for the new one"));
        delivered().await;
        assert!(old_sink.0.borrow().is_empty());
        assert_eq!(
            *new_sink.0.borrow(),
            vec![OutFrame::text("for the new one")]
        );
    }
}
