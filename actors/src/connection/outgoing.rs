//! The writing half of a connection: frames go straight to the kernel, and only what it
//! refuses is queued.
//!
//! It is shared (an `Rc`) by the connection actor, which writes its own answers, and
//! by its thread's relay, which writes what other actors send (routed messages,
//! broadcasts, pings) without a message to the actor. When a write leaves bytes
//! queued, or fails, the actor is asked to attend to it ([`Attend`]) unless it is already
//! watching the backlog: waiting for write readiness and judging a slow consumer stay
//! the actor's work.

use crate::outbound::{FrameSink, OutFrame};
use actix::prelude::*;
use actix::WeakRecipient;
use bytes::{Buf, Bytes};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;
use tokio::net::TcpStream;

/// Asks the connection actor to look at its backlog (or at a failed write).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attend {
    /// The write that failed, if one did.
    pub failure: Option<io::Error>,
}

/// Outbound frames (or the rest of one) the kernel has not taken yet.
#[derive(Default)]
struct Backlog {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front of `frames` is the rest of a frame the kernel took part of.
    front_started: bool,
}

/// The writing half of one connection.
pub struct Outgoing {
    io: Rc<TcpStream>,
    backlog: RefCell<Backlog>,
    /// False once the close frame is written or queued: nothing may follow it.
    accepting: Cell<bool>,
    /// The actor will look at the backlog without being asked: an [`Attend`] is on its
    /// way, or it waits for write readiness.
    watched: Cell<bool>,
    /// Queued frames past which the actor is asked again even if it is watching (it
    /// closes a slow consumer that has more).
    frame_limit: usize,
    /// Queued bytes never exceed this (but for the rest of a frame already partly
    /// written): a frame that would is dropped and the agent is a slow consumer.
    byte_ceiling: usize,
    /// A frame was dropped at the ceiling: the actor closes the connection.
    overflowed: Cell<bool>,
    /// The actor to ask for attention (weak: the relay's table must not keep it alive).
    owner: OnceCell<WeakRecipient<Attend>>,
}

impl Outgoing {
    /// The writing half of `io`, whose actor closes it past `frame_limit` queued
    /// frames or when a frame would take the queue past `byte_ceiling` bytes.
    pub fn new(io: Rc<TcpStream>, frame_limit: usize, byte_ceiling: usize) -> Self {
        Self {
            io,
            backlog: RefCell::default(),
            accepting: Cell::new(true),
            watched: Cell::new(false),
            frame_limit,
            byte_ceiling,
            overflowed: Cell::new(false),
            owner: OnceCell::new(),
        }
    }

    /// Whether a frame was dropped at the byte ceiling.
    pub fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    /// Sets the actor that attends to the backlog.
    pub fn set_owner(&self, owner: &Recipient<Attend>) {
        let _ = self.owner.set(owner.downgrade());
    }

    /// Stops accepting frames from others: the close frame is next.
    pub fn stop_accepting(&self) {
        self.accepting.set(false);
    }

    /// Whether the actor will look at the backlog without being asked.
    pub fn set_watched(&self, watched: bool) {
        self.watched.set(watched);
    }

    /// Writes `frame` now if nothing is queued before it; queues what the kernel does
    /// not take.
    pub fn write(&self, frame: Bytes) -> io::Result<()> {
        self.write_bounded(frame, true)
    }

    /// Writes the close frame: like [`write`](Self::write), but never dropped at the
    /// byte ceiling (it is a few bytes, and the last frame the connection writes).
    pub fn write_close(&self, frame: Bytes) -> io::Result<()> {
        self.write_bounded(frame, false)
    }

    fn write_bounded(&self, frame: Bytes, bounded: bool) -> io::Result<()> {
        let mut guard = self.backlog.borrow_mut();
        let backlog = &mut *guard;
        if !backlog.frames.is_empty() {
            self.queue(backlog, frame, bounded);
            return Ok(());
        }
        let written = match send(&self.io, &frame) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < frame.len() {
            self.keep_rest(backlog, frame, written);
        }
        Ok(())
    }

    /// Writes `frames` in order, as [`write`](Self::write) would each, in one system
    /// call when nothing is queued before them.
    pub fn write_all(&self, frames: Vec<Bytes>) -> io::Result<()> {
        let mut guard = self.backlog.borrow_mut();
        let backlog = &mut *guard;
        let mut written = 0;
        if backlog.frames.is_empty() {
            let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
            written = match send_vectored(&self.io, &slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        }
        // Frames the kernel took whole are done; the first it did not is kept as
        // `write` keeps it; the ones after it are queued behind it.
        for frame in frames {
            if written >= frame.len() {
                written -= frame.len();
            } else if backlog.frames.is_empty() {
                self.keep_rest(backlog, frame, written);
                written = 0;
            } else {
                self.queue(backlog, frame, true);
            }
        }
        Ok(())
    }

    /// Queues `frame` behind what is queued; a `bounded` one that would take the queue
    /// past the byte ceiling is dropped instead, and the agent is a slow consumer.
    fn queue(&self, backlog: &mut Backlog, frame: Bytes, bounded: bool) {
        if bounded && backlog.bytes + frame.len() > self.byte_ceiling {
            self.overflowed.set(true);
            return;
        }
        backlog.bytes += frame.len();
        backlog.frames.push_back(frame);
    }

    /// Queues what the kernel did not take of `frame` (`written` bytes it did), with
    /// nothing queued before it. The rest of a started frame is always kept: the stream
    /// must stay framed.
    fn keep_rest(&self, backlog: &mut Backlog, frame: Bytes, written: usize) {
        let rest = frame.slice(written..);
        backlog.front_started = written > 0;
        backlog.bytes += rest.len();
        backlog.frames.push_back(rest);
        if backlog.bytes > self.byte_ceiling {
            self.overflowed.set(true);
        }
    }

    /// Writes what is queued until the kernel refuses or the queue is empty.
    pub fn flush(&self) -> io::Result<()> {
        let mut guard = self.backlog.borrow_mut();
        let backlog = &mut *guard;
        while let Some(front) = backlog.frames.front_mut() {
            let written = match send(&self.io, front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            backlog.bytes -= written;
            if written == front.len() {
                backlog.frames.pop_front();
                backlog.front_started = false;
            } else {
                front.advance(written);
                backlog.front_started |= written > 0;
                return Ok(());
            }
        }
        backlog.frames.shrink_to(0);
        Ok(())
    }

    /// Drops the queued frames (a slow consumer's backlog), but for the rest of a
    /// frame already partly written: the stream must stay well framed.
    pub fn discard_pending(&self) {
        let mut guard = self.backlog.borrow_mut();
        let backlog = &mut *guard;
        let keep = if backlog.front_started {
            backlog.frames.pop_front()
        } else {
            None
        };
        backlog.frames = keep.into_iter().collect();
        backlog.bytes = backlog.frames.iter().map(Bytes::len).sum();
    }

    /// Frames (or parts of one) the kernel has not taken.
    pub fn pending_frames(&self) -> usize {
        self.backlog.borrow().frames.len()
    }

    /// Bytes the kernel has not taken.
    pub fn pending_bytes(&self) -> usize {
        self.backlog.borrow().bytes
    }

    /// Sends FIN: the agent reads everything written so far, then the end of stream.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write);
    }

    /// After a write for others, with `queued_before` frames queued before it: asks the
    /// actor to attend to what the kernel refused, or to a failed write.
    fn after_delivery(&self, written: io::Result<()>, queued_before: usize) {
        match written {
            Ok(()) if self.pending_frames() == 0 => {}
            Ok(()) => self.ask_attention(None, queued_before),
            Err(error) => {
                self.accepting.set(false);
                self.ask_attention(Some(error), queued_before);
            }
        }
    }

    /// Asks the actor to attend, unless it is watching already and nothing new needs
    /// it: no failure, and the queue did not just pass `frame_limit` (however many
    /// frames took it past) or the byte ceiling.
    fn ask_attention(&self, failure: Option<io::Error>, queued_before: usize) {
        let passed_limit =
            queued_before <= self.frame_limit && self.pending_frames() > self.frame_limit;
        let over_limit = passed_limit || self.overflowed();
        if self.watched.replace(true) && failure.is_none() && !over_limit {
            return;
        }
        if let Some(owner) = self.owner.get().and_then(|owner| owner.upgrade()) {
            owner.do_send(Attend { failure });
        }
    }
}

impl FrameSink for Outgoing {
    fn deliver(&self, frame: OutFrame) {
        if self.accepting.get() {
            let queued_before = self.pending_frames();
            self.after_delivery(self.write(frame.0), queued_before);
        }
    }

    fn deliver_all(&self, frames: Vec<OutFrame>) {
        if self.accepting.get() {
            let queued_before = self.pending_frames();
            let frames = frames.into_iter().map(|frame| frame.0).collect();
            self.after_delivery(self.write_all(frames), queued_before);
        }
    }
}

/// Writes what the kernel takes of `buf`. When tokio's readiness says the socket is not
/// writable, the kernel is asked anyway: on this project's machines a write-readiness
/// edge was seen to go missing after a partial write (the kernel had room, tokio never
/// heard of it), which would leave a backlog stuck until the close grace ran out.
fn send(io: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    match io.try_write(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket2::SockRef::from(io).send(buf),
        other => other,
    }
}

/// Writes what the kernel takes of `bufs`, in order; asks the kernel even when tokio's
/// readiness says no, as [`send`] does.
fn send_vectored(io: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    match io.try_write_vectored(bufs) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            socket2::SockRef::from(io).send_vectored(bufs)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair whose far end never reads (its buffers stay small).
    async fn unread_pair() -> (Rc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (near, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&near)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&far)
            .set_recv_buffer_size(4096)
            .unwrap();
        (Rc::new(near), far)
    }

    #[actix::test]
    async fn a_frame_past_the_byte_ceiling_is_dropped_but_the_close_frame_never_is() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, 64 * 1024);
        let frame = Bytes::from(vec![b'x'; 16 * 1024]);
        while outgoing.pending_frames() == 0 {
            outgoing.write(frame.clone()).unwrap();
        }
        while !outgoing.overflowed() {
            outgoing.write(frame.clone()).unwrap();
        }
        let (frames, bytes) = (outgoing.pending_frames(), outgoing.pending_bytes());
        assert!(bytes <= 64 * 1024 + frame.len(), "{bytes} bytes queued");

        outgoing
            .write_close(Bytes::from_static(b"\x88\x02\x0f\xa3"))
            .unwrap();
        assert_eq!(
            outgoing.pending_frames(),
            frames + 1,
            "the close frame is queued"
        );
        assert_eq!(outgoing.pending_bytes(), bytes + 4);
    }

    /// Frames of 8 KiB, each filled with its own number.
    fn numbered_frames(count: u8) -> Vec<Bytes> {
        (0..count).map(|n| Bytes::from(vec![n; 8 * 1024])).collect()
    }

    #[actix::test]
    async fn frames_written_together_reach_the_agent_whole_and_in_order_when_the_kernel_takes_part()
    {
        let (io, mut far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, usize::MAX);
        let frames = numbered_frames(8);
        let total: usize = frames.iter().map(Bytes::len).sum();
        outgoing.write_all(frames.clone()).unwrap();
        let (queued, bytes) = (outgoing.pending_frames(), outgoing.pending_bytes());
        assert!(
            bytes > 0 && bytes < total,
            "the kernel took part: {bytes} left"
        );
        let whole_left = bytes / (8 * 1024);
        assert!(
            queued == whole_left || queued == whole_left + 1,
            "{queued} frames for {bytes} bytes"
        );

        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < total {
                let mut chunk = vec![0; 64 * 1024];
                let n = tokio::io::AsyncReadExt::read(&mut far, &mut chunk)
                    .await
                    .unwrap();
                assert!(n > 0, "the stream ended early");
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        while outgoing.pending_frames() > 0 {
            outgoing.io.writable().await.unwrap();
            outgoing.flush().unwrap();
        }
        let got = reader.await.unwrap();
        assert_eq!(got, frames.concat(), "every byte, in order");
    }

    #[actix::test]
    async fn frames_written_together_behind_a_backlog_are_queued_one_by_one() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, usize::MAX);
        while outgoing.pending_frames() == 0 {
            outgoing.write(Bytes::from(vec![b'x'; 16 * 1024])).unwrap();
        }
        let before = (outgoing.pending_frames(), outgoing.pending_bytes());
        outgoing.write_all(numbered_frames(3)).unwrap();
        assert_eq!(outgoing.pending_frames(), before.0 + 3);
        assert_eq!(outgoing.pending_bytes(), before.1 + 3 * 8 * 1024);
    }

    /// Counts the [`Attend`]s it gets.
    struct Owner(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Actor for Owner {
        type Context = Context<Self>;
    }

    impl Handler<Attend> for Owner {
        type Result = ();

        fn handle(&mut self, _msg: Attend, _ctx: &mut Self::Context) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[actix::test]
    async fn frames_written_together_past_the_frame_limit_wake_a_watching_actor() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 2, usize::MAX);
        let attended = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let owner = Owner(attended.clone()).start();
        outgoing.set_owner(&owner.clone().recipient());
        while outgoing.pending_frames() == 0 {
            outgoing.write(Bytes::from(vec![b'x'; 16 * 1024])).unwrap();
        }
        assert_eq!(outgoing.pending_frames(), 1);
        // The actor already waits for write readiness; five more frames at once take
        // the queue from 1 past the limit of 2 without ever holding exactly 3.
        outgoing.set_watched(true);
        let frames = numbered_frames(5).into_iter().map(OutFrame).collect();
        outgoing.deliver_all(frames);
        assert_eq!(outgoing.pending_frames(), 6);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while attended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the actor was never told the queue passed its limit"
            );
            tokio::task::yield_now().await;
        }
    }

    #[actix::test]
    async fn discarding_keeps_the_rest_of_a_started_frame_so_the_stream_stays_framed() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, usize::MAX);
        let frame = Bytes::from(vec![b'x'; 1024 * 1024]);
        outgoing.write(frame.clone()).unwrap(); // The kernel takes part of it.
        outgoing.write(frame.clone()).unwrap();
        let started = outgoing.pending_bytes() - frame.len();
        assert!(started > 0 && started < frame.len(), "{started}");

        outgoing.discard_pending();
        assert_eq!(outgoing.pending_frames(), 1);
        assert_eq!(outgoing.pending_bytes(), started);
    }
}
