//! The bounded outbound queue of one connection, and the task that writes it to the
//! WebSocket.
//!
//! Every frame for an agent (registration answer, routed messages, pings, notices)
//! goes through its [`Outbox`]. Producers never wait: a full queue means the agent
//! does not read fast enough, and the producer reports it as a slow consumer.

use actix_ws::{CloseCode, CloseReason, Session};
use bytestring::ByteString;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A frame waiting to be written.
#[derive(Debug)]
pub enum OutFrame {
    /// A text frame (JSON).
    Text(ByteString),
    /// A control pong answering a client ping.
    Pong(bytes::Bytes),
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the agent is a slow consumer.
    Full,
    /// The connection's writer is gone.
    Closed,
}

/// The sending side of a connection's outbound queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<OutFrame>,
}

impl Outbox {
    /// A queue of `capacity` frames and its receiving end, for a writer of the caller's
    /// (or a test that reads what an agent would receive).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<OutFrame>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }

    /// Queues a text frame without waiting.
    pub fn push(&self, frame: ByteString) -> Result<(), PushError> {
        self.push_frame(OutFrame::Text(frame))
    }

    /// Queues a JSON value as a text frame.
    pub fn push_json(&self, frame: &serde_json::Value) -> Result<(), PushError> {
        self.push(ByteString::from(frame.to_string()))
    }

    /// Queues any frame without waiting.
    pub fn push_frame(&self, frame: OutFrame) -> Result<(), PushError> {
        self.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PushError::Full,
            mpsc::error::TrySendError::Closed(_) => PushError::Closed,
        })
    }

    /// Frames waiting in the queue.
    pub fn len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the writer should end the WebSocket.
#[derive(Debug, Clone)]
pub struct CloseOrder {
    /// Close code sent to the agent.
    pub code: u16,
    /// Close reason text.
    pub description: String,
    /// Write the frames already queued before closing (false for slow consumers,
    /// whose backlog is the problem).
    pub drain: bool,
}

/// Longest the writer spends draining and sending the close frame once told to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Creates a queue of `capacity` frames and spawns its writer on the current arbiter.
/// The returned sender closes the WebSocket when sent to (or dropped).
pub fn spawn_writer(session: Session, capacity: usize) -> (Outbox, oneshot::Sender<CloseOrder>) {
    let (outbox, rx) = Outbox::channel(capacity);
    let (close_tx, close_rx) = oneshot::channel();
    actix::spawn(write_loop(session, rx, close_rx));
    (outbox, close_tx)
}

async fn write_loop(
    mut session: Session,
    mut rx: mpsc::Receiver<OutFrame>,
    mut close_rx: oneshot::Receiver<CloseOrder>,
) {
    let order = loop {
        tokio::select! {
            biased;
            order = &mut close_rx => break order.ok(),
            frame = rx.recv() => {
                let Some(frame) = frame else { break None };
                tokio::select! {
                    biased;
                    order = &mut close_rx => break order.ok(),
                    sent = send(&mut session, frame) => if sent.is_err() { return },
                }
            }
        }
    };
    let order = order.unwrap_or(CloseOrder {
        code: crate::disconnect::Disconnect::CLIENT_CLOSED.code,
        description: String::new(),
        drain: true,
    });
    let _ = tokio::time::timeout(CLOSE_GRACE, async move {
        if order.drain {
            while let Ok(frame) = rx.try_recv() {
                if send(&mut session, frame).await.is_err() {
                    return;
                }
            }
        }
        drop(rx);
        let reason = CloseReason {
            code: CloseCode::from(order.code),
            description: (!order.description.is_empty()).then_some(order.description),
        };
        let _ = session.close(Some(reason)).await;
    })
    .await;
}

async fn send(session: &mut Session, frame: OutFrame) -> Result<(), actix_ws::Closed> {
    match frame {
        OutFrame::Text(text) => session.text(text).await,
        OutFrame::Pong(bytes) => session.pong(&bytes).await,
    }
}
