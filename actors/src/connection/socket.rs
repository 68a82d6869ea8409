//! The reading half of a connection's TCP stream: reading on readiness into a buffer
//! shared by the worker thread ([`Outgoing`](super::outgoing::Outgoing) is the writing
//! half).
//!
//! A connection owns bytes of its own only while a frame is partial (inbound) or while
//! the kernel will not take more (outbound): an idle agent costs its actor, its stream's
//! registration and a few words here.

use bytes::BytesMut;
use futures_util::Stream;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
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
pub struct Readable(pub Arc<TcpStream>);

impl Stream for Readable {
    type Item = io::Result<()>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_read_ready(cx).map(Some)
    }
}

/// What one read did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes were read into the buffer; there may be more.
    Data,
    /// Bytes were read, fewer than asked for: the kernel had no more, and readiness is
    /// cleared without a read that would block (one `recv` per arrival, not two).
    Drained,
    /// Nothing more to read now.
    WouldBlock,
    /// The peer closed its side.
    Eof,
}

/// The stream and the inbound bytes owned by one connection.
pub struct Socket {
    io: Arc<TcpStream>,
    /// Bytes of a partial inbound frame (empty, without capacity, otherwise).
    partial: BytesMut,
}

impl Socket {
    /// Wraps an upgraded stream; `early` holds bytes read with the upgrade request.
    pub fn new(io: Arc<TcpStream>, early: BytesMut) -> Self {
        Self { io, partial: early }
    }

    /// The stream, for readiness.
    pub fn io(&self) -> Arc<TcpStream> {
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
        let room = buf.capacity() - buf.len();
        let outcome = match self.io.try_read_buf(&mut buf) {
            Ok(0) => ReadOutcome::Eof,
            Ok(n) if n < room => {
                // A short read emptied the kernel's buffer. Clearing readiness here is
                // safe: the worker's runtime is single-threaded, so an edge for bytes
                // that arrive after the read is processed later, with a new tick, and
                // sets readiness again.
                let _ = self.io.try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
                ReadOutcome::Drained
            }
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
}
