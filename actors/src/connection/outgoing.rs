//! The writing half of a connection: frames go straight to the kernel, and only what it
//! refuses is queued.
//!
//! It is shared (an `Arc`) by the connection actor, which writes its own answers, by
//! the relay of the connection's thread, and by any thread that sends the agent a few
//! frames (a direct message from an agent on the other worker is written by that
//! worker). Every write happens under one lock, so each writer's frames go out whole
//! and in order. When a write for others leaves bytes queued, or fails, the actor is
//! asked to attend to it ([`Attend`]) unless it is already watching the backlog:
//! waiting for write readiness and judging a slow consumer stay the actor's work.

use crate::outbound::{FrameSink, OutFrame};
use actix::prelude::*;
use actix::WeakRecipient;
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::net::TcpStream;

/// Asks the connection actor to look at its backlog (or at a failed write).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attend {
    /// The write that failed, if one did.
    pub failure: Option<io::Error>,
}

/// Outbound frames (or the rest of one) the kernel has not taken yet, and what
/// changes with them.
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front of `frames` is the rest of a frame the kernel took part of.
    front_started: bool,
    /// False once the close frame is written or queued: nothing may follow it.
    accepting: bool,
    /// The actor will look at the backlog without being asked: an [`Attend`] is on its
    /// way, or it waits for write readiness.
    watched: bool,
    /// A frame was dropped at the byte ceiling: the actor closes the connection.
    overflowed: bool,
}

impl State {
    fn backlog(&self) -> Backlog {
        Backlog {
            frames: self.frames.len(),
            bytes: self.bytes,
            overflowed: self.overflowed,
        }
    }
}

/// What the kernel has not taken, read under one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Frames (or the rest of one) queued.
    pub frames: usize,
    /// Bytes queued.
    pub bytes: usize,
    /// A frame was dropped at the byte ceiling.
    pub overflowed: bool,
}

/// The writing half of one connection.
pub struct Outgoing {
    io: Arc<TcpStream>,
    /// The relay of the thread the connection runs on (the one it is made on).
    relay: u32,
    state: Mutex<State>,
    /// Frames sent to the relay for this connection and not written yet: a frame
    /// written on the spot must not overtake them.
    relaying: AtomicUsize,
    /// Queued frames past which the actor is asked again even if it is watching (it
    /// closes a slow consumer that has more).
    frame_limit: usize,
    /// Queued bytes never exceed this (but for the rest of a frame already partly
    /// written): a frame that would is dropped and the agent is a slow consumer.
    byte_ceiling: usize,
    /// The actor to ask for attention (weak: the sink must not keep it alive).
    owner: OnceLock<WeakRecipient<Attend>>,
}

impl Outgoing {
    /// The writing half of `io`, whose actor runs on this thread and closes it past
    /// `frame_limit` queued frames or when a frame would take the queue past
    /// `byte_ceiling` bytes.
    pub fn new(io: Arc<TcpStream>, frame_limit: usize, byte_ceiling: usize) -> Self {
        Self {
            io,
            relay: crate::outbound::relay::this_thread_relay(),
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                front_started: false,
                accepting: true,
                watched: false,
                overflowed: false,
            }),
            relaying: AtomicUsize::new(0),
            frame_limit,
            byte_ceiling,
            owner: OnceLock::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change to the state is whole before anything that can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the actor that attends to the backlog.
    pub fn set_owner(&self, owner: &Recipient<Attend>) {
        let _ = self.owner.set(owner.downgrade());
    }

    /// What is still queued, after the actor wrote or flushed: unless there is some or
    /// it waits for write readiness (`awaiting`), it stops watching, and the next frame
    /// another thread leaves queued asks it to attend (under the lock that frame is
    /// written with, so none can be left unwatched).
    pub fn settle(&self, awaiting: bool) -> Backlog {
        let mut state = self.state();
        state.watched = awaiting || !state.frames.is_empty();
        state.backlog()
    }

    /// Writes `frame` now if nothing is queued before it; queues what the kernel does
    /// not take.
    pub fn write(&self, frame: Bytes) -> io::Result<()> {
        self.write_locked(&mut self.state(), frame, true)
    }

    /// Writes the close frame, after which no frame is accepted: like
    /// [`write`](Self::write), but never dropped at the byte ceiling (it is a few
    /// bytes, and the last frame the connection writes).
    pub fn write_close(&self, frame: Bytes) -> io::Result<()> {
        let mut state = self.state();
        state.accepting = false;
        self.write_locked(&mut state, frame, false)
    }

    fn write_locked(&self, state: &mut State, frame: Bytes, bounded: bool) -> io::Result<()> {
        if !state.frames.is_empty() {
            self.queue(state, frame, bounded);
            return Ok(());
        }
        let written = match send(&self.io, &frame) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < frame.len() {
            self.keep_rest(state, frame, written);
        }
        Ok(())
    }

    /// Writes `frames` in order, as [`write`](Self::write) would each, in one system
    /// call when nothing is queued before them.
    #[cfg(test)]
    pub fn write_all(&self, frames: Vec<Bytes>) -> io::Result<()> {
        self.write_all_locked(&mut self.state(), frames)
    }

    fn write_all_locked(&self, state: &mut State, frames: Vec<Bytes>) -> io::Result<()> {
        let mut written = 0;
        if state.frames.is_empty() {
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
            } else if state.frames.is_empty() {
                self.keep_rest(state, frame, written);
                written = 0;
            } else {
                self.queue(state, frame, true);
            }
        }
        Ok(())
    }

    /// Queues `frame` behind what is queued; a `bounded` one that would take the queue
    /// past the byte ceiling is dropped instead, and the agent is a slow consumer.
    fn queue(&self, state: &mut State, frame: Bytes, bounded: bool) {
        if bounded && state.bytes + frame.len() > self.byte_ceiling {
            state.overflowed = true;
            return;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
    }

    /// Queues what the kernel did not take of `frame` (`written` bytes it did), with
    /// nothing queued before it. The rest of a started frame is always kept: the stream
    /// must stay framed.
    fn keep_rest(&self, state: &mut State, frame: Bytes, written: usize) {
        let rest = frame.slice(written..);
        state.front_started = written > 0;
        state.bytes += rest.len();
        state.frames.push_back(rest);
        if state.bytes > self.byte_ceiling {
            state.overflowed = true;
        }
    }

    /// Writes what is queued until the kernel refuses or the queue is empty.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = self.state();
        let state = &mut *state;
        while let Some(front) = state.frames.front_mut() {
            let written = match send(&self.io, front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            state.bytes -= written;
            if written == front.len() {
                state.frames.pop_front();
                state.front_started = false;
            } else {
                front.advance(written);
                state.front_started |= written > 0;
                return Ok(());
            }
        }
        state.frames.shrink_to(0);
        Ok(())
    }

    /// Drops the queued frames (a slow consumer's backlog), but for the rest of a
    /// frame already partly written: the stream must stay well framed.
    pub fn discard_pending(&self) {
        let mut state = self.state();
        let keep = if state.front_started {
            state.frames.pop_front()
        } else {
            None
        };
        state.frames = keep.into_iter().collect();
        state.bytes = state.frames.iter().map(Bytes::len).sum();
    }

    /// What the kernel has not taken (for tests; the actor reads it from `settle`).
    #[cfg(test)]
    pub fn backlog(&self) -> Backlog {
        self.state().backlog()
    }

    /// Sends FIN: the agent reads everything written so far, then the end of stream.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write);
    }

    /// Writes frames for others (dropped once the close frame is out), and says
    /// whether the actor must be asked to attend: to what the kernel refused, unless it
    /// is watching already and nothing new needs it (no failure, and the queue did not
    /// just pass `frame_limit`, however many frames took it past, or the byte ceiling);
    /// or to a failed write.
    fn write_for_others(&self, state: &mut State, frames: Vec<OutFrame>) -> Option<Attend> {
        if !state.accepting {
            return None;
        }
        let queued_before = state.frames.len();
        let written = match <[OutFrame; 1]>::try_from(frames) {
            Ok([frame]) => self.write_locked(state, frame.0, true),
            Err(frames) => {
                let frames = frames.into_iter().map(|frame| frame.0).collect();
                self.write_all_locked(state, frames)
            }
        };
        let failure = match written {
            Ok(()) if state.frames.is_empty() => return None,
            Ok(()) => None,
            Err(error) => {
                state.accepting = false;
                Some(error)
            }
        };
        let queued = state.frames.len();
        let passed_limit = queued_before <= self.frame_limit && queued > self.frame_limit;
        let news = failure.is_some() || passed_limit || state.overflowed;
        if std::mem::replace(&mut state.watched, true) && !news {
            return None;
        }
        Some(Attend { failure })
    }

    /// Asks the actor to attend (called with the lock released).
    fn ask(&self, attend: Option<Attend>) {
        let Some(attend) = attend else { return };
        if let Some(owner) = self.owner.get().and_then(WeakRecipient::upgrade) {
            owner.do_send(attend);
        }
    }
}

impl FrameSink for Outgoing {
    fn relay(&self) -> u32 {
        self.relay
    }

    fn write_unless_relaying(&self, frames: Vec<OutFrame>) -> Option<Vec<OutFrame>> {
        let mut state = self.state();
        if self.relaying.load(Ordering::Acquire) > 0 {
            return Some(frames);
        }
        let attend = self.write_for_others(&mut state, frames);
        drop(state);
        self.ask(attend);
        None
    }

    fn relaying(&self, count: usize) {
        self.relaying.fetch_add(count, Ordering::AcqRel);
    }

    fn write_relayed(&self, frames: Vec<OutFrame>) {
        let count = frames.len();
        let mut state = self.state();
        let attend = self.write_for_others(&mut state, frames);
        self.relaying.fetch_sub(count, Ordering::AcqRel);
        drop(state);
        self.ask(attend);
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
    async fn unread_pair() -> (Arc<TcpStream>, TcpStream) {
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
        (Arc::new(near), far)
    }

    #[actix::test]
    async fn a_frame_past_the_byte_ceiling_is_dropped_but_the_close_frame_never_is() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, 64 * 1024);
        let frame = Bytes::from(vec![b'x'; 16 * 1024]);
        while outgoing.backlog().frames == 0 {
            outgoing.write(frame.clone()).unwrap();
        }
        while !outgoing.backlog().overflowed {
            outgoing.write(frame.clone()).unwrap();
        }
        let Backlog { frames, bytes, .. } = outgoing.backlog();
        assert!(bytes <= 64 * 1024 + frame.len(), "{bytes} bytes queued");

        outgoing
            .write_close(Bytes::from_static(b"\x88\x02\x0f\xa3"))
            .unwrap();
        let after = outgoing.backlog();
        assert_eq!(after.frames, frames + 1, "the close frame is queued");
        assert_eq!(after.bytes, bytes + 4);
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
        let Backlog {
            frames: queued,
            bytes,
            ..
        } = outgoing.backlog();
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
        while outgoing.backlog().frames > 0 {
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
        while outgoing.backlog().frames == 0 {
            outgoing.write(Bytes::from(vec![b'x'; 16 * 1024])).unwrap();
        }
        let before = outgoing.backlog();
        outgoing.write_all(numbered_frames(3)).unwrap();
        let after = outgoing.backlog();
        assert_eq!(after.frames, before.frames + 3);
        assert_eq!(after.bytes, before.bytes + 3 * 8 * 1024);
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
        while outgoing.backlog().frames == 0 {
            outgoing.write(Bytes::from(vec![b'x'; 16 * 1024])).unwrap();
        }
        assert_eq!(outgoing.backlog().frames, 1);
        // The actor already waits for write readiness; five more frames at once take
        // the queue from 1 past the limit of 2 without ever holding exactly 3.
        assert_eq!(outgoing.settle(true).frames, 1);
        let frames = numbered_frames(5).into_iter().map(OutFrame).collect();
        assert!(outgoing.write_unless_relaying(frames).is_none());
        assert_eq!(outgoing.backlog().frames, 6);
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
        let started = outgoing.backlog().bytes - frame.len();
        assert!(started > 0 && started < frame.len(), "{started}");

        outgoing.discard_pending();
        let after = outgoing.backlog();
        assert_eq!(after.frames, 1);
        assert_eq!(after.bytes, started);
    }

    #[actix::test]
    async fn a_frame_is_not_written_on_the_spot_while_frames_are_on_their_way_through_the_relay() {
        let (io, _far) = unread_pair().await;
        let outgoing = Outgoing::new(io, 100, usize::MAX);
        outgoing.relaying(1);
        let handed_back = outgoing.write_unless_relaying(vec![OutFrame::text("routed")]);
        assert_eq!(handed_back, Some(vec![OutFrame::text("routed")]));
        outgoing.write_relayed(vec![OutFrame::text("answer")]);
        assert_eq!(
            outgoing.write_unless_relaying(vec![OutFrame::text("x")]),
            None
        );
    }

    #[actix::test]
    async fn frames_written_from_many_threads_at_once_arrive_whole_and_in_each_writers_order() {
        use actix_codec::Decoder;
        use actix_http::ws::{Codec, Frame};
        const WRITERS: usize = 4;
        const EACH: usize = 2_000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut far = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (near, _) = listener.accept().await.unwrap();
        let outgoing = Arc::new(Outgoing::new(Arc::new(near), usize::MAX, usize::MAX));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let outgoing = outgoing.clone();
                std::thread::spawn(move || {
                    for n in 0..EACH {
                        // Frames of different sizes, so that the kernel takes parts.
                        let text = format!("{writer} {n} {}", "x".repeat(n % 700));
                        let frames = vec![OutFrame::text(&text)];
                        assert!(outgoing.write_unless_relaying(frames).is_none());
                    }
                })
            })
            .collect();
        let reader = tokio::spawn(async move {
            let (mut buf, mut codec) = (bytes::BytesMut::new(), Codec::new().client_mode());
            let mut next = [0; WRITERS];
            while next.iter().sum::<usize>() < WRITERS * EACH {
                let n = tokio::io::AsyncReadExt::read_buf(&mut far, &mut buf)
                    .await
                    .unwrap();
                assert!(n > 0, "the stream ended early");
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    let Frame::Text(text) = frame else {
                        panic!("not a text frame: {frame:?}")
                    };
                    let text = std::str::from_utf8(&text).unwrap();
                    let mut words = text.split(' ');
                    let writer: usize = words.next().unwrap().parse().unwrap();
                    let n: usize = words.next().unwrap().parse().unwrap();
                    assert_eq!(n, next[writer], "writer {writer}'s frames out of order");
                    next[writer] += 1;
                }
            }
        });
        while !writers.iter().all(std::thread::JoinHandle::is_finished)
            || outgoing.backlog().frames > 0
        {
            // Nobody attends in this test: flush what the kernel refused.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            outgoing.flush().unwrap();
        }
        for writer in writers {
            writer.join().unwrap();
        }
        reader.await.unwrap();
    }
}
