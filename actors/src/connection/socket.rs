//! The connection's TCP stream: reading on readiness into a buffer shared by the worker
//! thread, and writing straight to the kernel, queueing only what it refused.
//!
//! A connection owns bytes of its own only while a frame is partial (inbound) or while
//! the kernel will not take more (outbound): an idle agent costs its actor, its stream's
//! registration and a few words here.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// Bytes read per `read` call into the worker's shared buffer.
const READ_CHUNK: usize = 32 * 1024;

thread_local! {
    /// The worker thread's read buffer, lent to one connection at a time.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Yields each time the stream becomes readable (tokio clears readiness only when a
/// read would block, so the owner reads until then).
pub struct Readable(pub Rc<TcpStream>);

impl Stream for Readable {
    type Item = io::Result<()>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_read_ready(cx).map(Some)
    }
}

/// What one read did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes were read into the buffer.
    Data,
    /// Nothing more to read now.
    WouldBlock,
    /// The peer closed its side.
    Eof,
}

/// The stream and the bytes owned by one connection.
pub struct Socket {
    io: Rc<TcpStream>,
    /// Bytes of a partial inbound frame (empty, without capacity, otherwise).
    partial: BytesMut,
    /// Outbound frames (or the rest of one) the kernel has not taken yet.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    /// The front of `pending` is the rest of a frame the kernel took part of.
    front_started: bool,
}

impl Socket {
    /// Wraps an upgraded stream; `early` holds bytes read with the upgrade request.
    pub fn new(io: TcpStream, early: BytesMut) -> Self {
        Self {
            io: Rc::new(io),
            partial: early,
            pending: VecDeque::new(),
            pending_bytes: 0,
            front_started: false,
        }
    }

    /// The stream, for readiness.
    pub fn io(&self) -> Rc<TcpStream> {
        self.io.clone()
    }

    /// Reads once and hands the buffered bytes to `consume`, which takes what it can
    /// parse; what it leaves (a partial frame) stays with this connection.
    pub fn read_with<T>(
        &mut self,
        consume: impl FnOnce(&mut BytesMut) -> T,
    ) -> io::Result<(ReadOutcome, T)> {
        let shared = self.partial.is_empty();
        let mut buf = if shared {
            SCRATCH.with(|scratch| scratch.take())
        } else {
            std::mem::take(&mut self.partial)
        };
        buf.reserve(READ_CHUNK);
        let outcome = match self.io.try_read_buf(&mut buf) {
            Ok(0) => ReadOutcome::Eof,
            Ok(_) => ReadOutcome::Data,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
            Err(e) => {
                self.give_back(buf, shared);
                return Err(e);
            }
        };
        let parsed = consume(&mut buf);
        self.give_back(buf, shared);
        Ok((outcome, parsed))
    }

    /// Bytes already buffered (read with the upgrade request) handed to `consume`.
    pub fn take_buffered<T>(&mut self, consume: impl FnOnce(&mut BytesMut) -> T) -> T {
        let mut buf = std::mem::take(&mut self.partial);
        let parsed = consume(&mut buf);
        self.give_back(buf, false);
        parsed
    }

    /// After a read: a partial frame stays with this connection (copied out of the
    /// worker's buffer if it was read there); the worker's buffer goes back to it.
    fn give_back(&mut self, mut buf: BytesMut, shared: bool) {
        match (buf.is_empty(), shared) {
            (true, true) => SCRATCH.with(|scratch| *scratch.borrow_mut() = buf),
            (true, false) => {} // The connection's own buffer is freed.
            (false, true) => {
                self.partial = BytesMut::from(&buf[..]);
                buf.clear();
                SCRATCH.with(|scratch| *scratch.borrow_mut() = buf);
            }
            (false, false) => self.partial = buf,
        }
    }

    /// Writes `frame` now if nothing is queued before it; queues what the kernel does
    /// not take.
    pub fn write(&mut self, frame: Bytes) -> io::Result<()> {
        if self.pending.is_empty() {
            let written = match Self::send(&self.io, &frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if written == frame.len() {
                return Ok(());
            }
            let rest = frame.slice(written..);
            self.front_started = written > 0;
            self.pending_bytes += rest.len();
            self.pending.push_back(rest);
        } else {
            self.pending_bytes += frame.len();
            self.pending.push_back(frame);
        }
        Ok(())
    }

    /// Writes what is queued until the kernel refuses or the queue is empty.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(front) = self.pending.front_mut() {
            let written = match Self::send(&self.io, front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            self.pending_bytes -= written;
            if written == front.len() {
                self.pending.pop_front();
                self.front_started = false;
            } else {
                front.advance(written);
                self.front_started |= written > 0;
                return Ok(());
            }
        }
        self.pending.shrink_to(0);
        Ok(())
    }

    /// Drops the queued frames (a slow consumer's backlog), but for the rest of a
    /// frame already partly written: the stream must stay well framed.
    pub fn discard_pending(&mut self) {
        let keep = if self.front_started {
            self.pending.pop_front()
        } else {
            None
        };
        self.pending = keep.into_iter().collect();
        self.pending_bytes = self.pending.iter().map(Bytes::len).sum();
    }

    /// Frames (or parts of one) the kernel has not taken.
    pub fn pending_frames(&self) -> usize {
        self.pending.len()
    }

    /// Bytes the kernel has not taken.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Writes what the kernel takes of `buf`. When tokio's readiness says the socket
    /// is not writable, the kernel is asked anyway: on this project's machines a
    /// write-readiness edge was seen to go missing after a partial write (the kernel
    /// had room, tokio never heard of it), which would leave a backlog stuck until the
    /// close grace ran out.
    fn send(io: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        match io.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket2::SockRef::from(io).send(buf),
            other => other,
        }
    }

    /// Sends FIN: the agent reads everything written so far, then the end of stream.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write);
    }
}
