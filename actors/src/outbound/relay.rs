//! The relay of a worker thread, and the rule that keeps what one producer sends one
//! agent in order whether it is written by the producer's thread or by the relay.
//!
//! Every thread that runs connections has one [`Relay`] actor. A producer on another
//! thread sends it [`Deliveries`] (frames and orders, each with the [`FrameSink`] of
//! its connection); the relay hands each frame to its sink, which writes it to the
//! kernel, and runs each order after the frames before it. The connection actor itself
//! is woken only when the kernel refuses bytes (its sink asks for attention).
//!
//! A producer may also write a frame itself, on its own thread ([`write_here`]), unless
//! frames it or anyone sent that sink earlier are still on their way through the relay
//! (the sink counts them): then the frame follows them through the relay.

use super::OutFrame;
use actix::prelude::*;
use std::cell::OnceCell;
use std::sync::{Arc, RwLock};

/// Where the frames of one connection are written. Any thread may write; the sink
/// keeps the frames of one writer in order and counts those on their way through the
/// relay of its connection's thread.
pub trait FrameSink: Send + Sync {
    /// The number of the relay of the thread the connection runs on.
    fn relay(&self) -> u32;

    /// Writes `frames` now, in order, on the calling thread, unless frames counted by
    /// [`relaying`](Self::relaying) are not written yet: then hands them back (they must
    /// follow those through the relay). Drops them if the connection is closing.
    fn write_unless_relaying(&self, frames: Vec<OutFrame>) -> Option<Vec<OutFrame>>;

    /// Counts `count` frames sent to the relay for this sink.
    fn relaying(&self, count: usize);

    /// Writes `frames` the relay brought (counted by [`relaying`](Self::relaying)), in
    /// order, and stops counting them.
    fn write_relayed(&self, frames: Vec<OutFrame>);
}

/// Most frames for one connection handed to its sink at once (one `writev`, whose
/// vector the kernel caps at 1024).
const MOST_AT_ONCE: usize = 64;

/// What is done for one connection, in the order given.
pub enum Delivery {
    /// Writes a frame into the connection's sink.
    Frame(OutFrame),
    /// Runs once the frames before it are written: sends the connection actor an order
    /// (registered, refused, close) so that it follows the frames sent before it.
    Then(Box<dyn FnOnce() + Send>),
}

/// A delivery and the sink of the connection it is for.
pub type Addressed = (Arc<dyn FrameSink>, Delivery);

/// What the relay does for connections of one thread.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliveries(Vec<Addressed>);

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
        for_each_run(msg.0, |sink, run| sink.write_relayed(run));
    }
}

/// Calls `write` with each run of frames in a row for one sink (at most
/// [`MOST_AT_ONCE`]), and runs each order where it stands.
fn for_each_run(
    deliveries: Vec<Addressed>,
    mut write: impl FnMut(&Arc<dyn FrameSink>, Vec<OutFrame>),
) {
    let mut deliveries = deliveries.into_iter().peekable();
    while let Some((sink, delivery)) = deliveries.next() {
        let frame = match delivery {
            Delivery::Frame(frame) => frame,
            Delivery::Then(order) => {
                order();
                continue;
            }
        };
        let same_sink =
            |(next, d): &Addressed| Arc::ptr_eq(next, &sink) && matches!(d, Delivery::Frame(_));
        let mut run = vec![frame];
        while run.len() < MOST_AT_ONCE {
            let Some((_, Delivery::Frame(next))) = deliveries.next_if(same_sink) else {
                break;
            };
            run.push(next);
        }
        write(&sink, run);
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

thread_local! {
    static THIS_THREAD_RELAY: OnceCell<(u32, Addr<Relay>)> = const { OnceCell::new() };
}

/// The number of this thread's relay, started on first use (a sink made on this
/// thread has it as its [`FrameSink::relay`]).
pub fn this_thread_relay() -> u32 {
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

/// Sends `deliveries` to the relay numbered `id`, counting their frames at their sinks
/// first (dropped if there is no such relay: none can be, a sink is made on a thread
/// with one).
pub(super) fn send_to_relay(id: u32, deliveries: Vec<Addressed>) {
    let relays = RELAYS.read().unwrap_or_else(|e| e.into_inner());
    let Some(relay) = relays.get(id as usize) else {
        return;
    };
    for (sink, delivery) in &deliveries {
        if matches!(delivery, Delivery::Frame(_)) {
            sink.relaying(1);
        }
    }
    relay.do_send(Deliveries(deliveries));
}

/// Writes `deliveries` (frames only) on this thread; those whose sinks have frames on
/// their way through the relay numbered `id` follow them there, in one message.
pub(super) fn write_here(id: u32, deliveries: Vec<Addressed>) {
    let mut behind = Vec::new();
    for_each_run(deliveries, |sink, run| {
        if let Some(run) = sink.write_unless_relaying(run) {
            behind.extend(run.into_iter().map(|f| (sink.clone(), Delivery::Frame(f))));
        }
    });
    if !behind.is_empty() {
        send_to_relay(id, behind);
    }
}

/// Waits until this thread's relay has delivered everything sent to it so far (for
/// tests, which look at what a sink received).
#[cfg(test)]
pub async fn delivered() {
    let (_, relay) = this_thread_relay_addr();
    let _ = relay.send(Barrier).await;
}

/// Tests' stand-in for a connection's sink: hands each write to `keep`, and counts the
/// frames on their way through the relay as a connection's sink does.
#[cfg(test)]
pub(super) struct TestSink {
    relay: u32,
    /// Frames on their way through the relay; checked and changed under the lock.
    relaying: std::sync::Mutex<usize>,
    keep: Box<dyn Fn(Vec<OutFrame>) + Send + Sync>,
}

#[cfg(test)]
impl TestSink {
    /// A sink on this thread whose writes go to `keep`.
    pub(super) fn new(keep: impl Fn(Vec<OutFrame>) + Send + Sync + 'static) -> Self {
        Self {
            relay: this_thread_relay(),
            relaying: std::sync::Mutex::new(0),
            keep: Box::new(keep),
        }
    }

    /// A sink that sends each frame to `recipient` as a message.
    pub(super) fn forwarding_to(recipient: Recipient<OutFrame>) -> Self {
        Self::new(move |frames| frames.into_iter().for_each(|f| recipient.do_send(f)))
    }
}

#[cfg(test)]
impl FrameSink for TestSink {
    fn relay(&self) -> u32 {
        self.relay
    }

    fn write_unless_relaying(&self, frames: Vec<OutFrame>) -> Option<Vec<OutFrame>> {
        let relaying = self.relaying.lock().unwrap();
        if *relaying > 0 {
            return Some(frames);
        }
        (self.keep)(frames);
        None
    }

    fn relaying(&self, count: usize) {
        *self.relaying.lock().unwrap() += count;
    }

    fn write_relayed(&self, frames: Vec<OutFrame>) {
        let mut relaying = self.relaying.lock().unwrap();
        *relaying -= frames.len();
        (self.keep)(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{Batches, Outbox, WRITE_HERE_AT_MOST};
    use std::sync::Mutex;

    /// What a test sink was given, and how many frames each hand-over held.
    #[derive(Clone, Default)]
    struct Recording {
        frames: Arc<Mutex<Vec<OutFrame>>>,
        hand_overs: Arc<Mutex<Vec<usize>>>,
    }

    impl Recording {
        fn texts(&self) -> Vec<OutFrame> {
            self.frames.lock().unwrap().clone()
        }
    }

    /// A sink on this thread that records what it is given, its outbox, and the
    /// sink itself (the connection: the outbox does not keep it alive).
    fn registered() -> (Recording, Outbox, Arc<dyn FrameSink>) {
        let recording = Recording::default();
        let kept = recording.clone();
        let sink: Arc<dyn FrameSink> = Arc::new(TestSink::new(move |frames| {
            kept.hand_overs.lock().unwrap().push(frames.len());
            kept.frames.lock().unwrap().extend(frames);
        }));
        let outbox = Outbox::new(&sink);
        (recording, outbox, sink)
    }

    fn texts(texts: &[&str]) -> Vec<OutFrame> {
        texts.iter().map(|t| OutFrame::text(t)).collect()
    }

    /// An actor that ignores what it is sent (the connection of `then_send`).
    struct Nobody;

    impl Actor for Nobody {
        type Context = Context<Self>;
    }

    impl Handler<OutFrame> for Nobody {
        type Result = ();

        fn handle(&mut self, _msg: OutFrame, _ctx: &mut Self::Context) {}
    }

    #[actix::test]
    async fn a_few_frames_are_written_by_the_sending_thread_at_once() {
        let (sink, outbox, _alive) = registered();
        outbox.push(OutFrame::text("one"));
        let mut batch = Batches::default();
        batch.push(&outbox, OutFrame::text("two"));
        batch.send();
        assert_eq!(
            sink.texts(),
            texts(&["one", "two"]),
            "before any relay turn"
        );
    }

    #[actix::test]
    async fn a_large_batch_goes_through_the_relay() {
        let (sink, outbox, _alive) = registered();
        let mut batch = Batches::default();
        let many: Vec<String> = (0..=WRITE_HERE_AT_MOST).map(|n| n.to_string()).collect();
        for text in &many {
            batch.push(&outbox, OutFrame::text(text));
        }
        batch.send();
        assert!(sink.texts().is_empty(), "written before the relay's turn");
        delivered().await;
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(sink.texts(), texts(&many));
    }

    #[actix::test]
    async fn a_frame_sent_behind_one_still_in_the_relay_follows_it() {
        let (sink, outbox, _alive) = registered();
        let nobody = Nobody.start().recipient();
        outbox.then_send(Some(OutFrame::text("answer")), &nobody, OutFrame::text("-"));
        outbox.push(OutFrame::text("routed"));
        let mut batch = Batches::default();
        batch.push(&outbox, OutFrame::text("routed too"));
        batch.send();
        assert!(sink.texts().is_empty(), "overtook the relay");
        delivered().await;
        assert_eq!(sink.texts(), texts(&["answer", "routed", "routed too"]));
        outbox.push(OutFrame::text("later"));
        assert_eq!(sink.texts().last(), Some(&OutFrame::text("later")));
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
        assert_eq!(alice.texts(), texts(&["a1", "a2", "a3", "a4"]));
        assert_eq!(
            *alice.hand_overs.lock().unwrap(),
            vec![3, 1],
            "a1..a3 at once"
        );
        assert_eq!(bob.texts(), texts(&["b1"]));
    }

    #[actix::test]
    async fn an_ended_connection_gets_nothing() {
        let (written, old_outbox, alive) = registered();
        drop(alive); // The connection ends.
        old_outbox.push(OutFrame::text("for the old connection"));
        let nobody = Nobody.start().recipient();
        old_outbox.then_send(Some(OutFrame::text("answer")), &nobody, OutFrame::text("-"));
        let mut batch = Batches::default();
        batch.push(&old_outbox, OutFrame::text("routed"));
        batch.send();
        delivered().await;
        assert!(written.texts().is_empty());
    }
}
