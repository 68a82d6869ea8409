//! The messages a [`BrokerPublisher`](super::BrokerPublisher) takes besides the
//! publisher interface, and the error it refuses events with.

use crate::event::SharedEvent;
use crate::publisher::FlushReport;
use actix::prelude::*;
use std::fmt;
use std::time::Duration;

/// Why an event was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// The publisher was closed (flushed at shutdown) and accepts no more events.
    Closed {
        /// Publisher name.
        publisher: &'static str,
    },
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { publisher } => write!(
                f,
                "publisher `{publisher}` is closed: it was flushed and closed (at shutdown) and accepts no more events; start a new publisher to publish again"
            ),
        }
    }
}

impl std::error::Error for PublishError {}

/// Offers one event and says whether it was accepted (buffered for delivery).
#[derive(Message)]
#[rtype(result = "Result<(), PublishError>")]
pub struct TryDeliver(pub SharedEvent);

/// Delivers what is buffered within `timeout`, reports, and closes the publisher.
/// Closing again returns the same report.
#[derive(Message)]
#[rtype(result = "FlushReport")]
pub struct Close {
    /// Time the publisher gets to deliver what it buffered.
    pub timeout: Duration,
}

/// A broker client noticed that its connection broke.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionLost {
    /// The connection it concerns.
    pub generation: u64,
    /// The client's reason.
    pub error: String,
}
