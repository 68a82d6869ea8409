//! What a broker has to provide so that [`BrokerPublisher`](super::supervisor::BrokerPublisher)
//! can deliver events to it reliably: connect, send a batch in order and say how much
//! of it was acknowledged, check an idle connection, close.
//!
//! Every future returned here is run on its own task, under a timeout, so a broker
//! client that hangs or panics cannot take the publisher (or its buffer) with it.

use super::supervisor::ConnectionLost;
use crate::event::SharedEvent;
use actix::Recipient;
use futures_util::future::LocalBoxFuture;
use std::fmt;
use std::time::Duration;

/// A broker error, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError(pub String);

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl BrokerError {
    /// An error with `context` (what was being done) and the client's `error`.
    pub fn new(context: &str, error: impl fmt::Display) -> Self {
        Self(format!("{context}: {error}"))
    }
}

/// A batch that was not entirely acknowledged.
#[derive(Debug, Clone)]
pub struct SendError {
    /// How many events at the front of the batch the broker acknowledged.
    pub acked: usize,
    /// Why the rest was not.
    pub error: BrokerError,
}

/// Lets a broker client report that its connection broke on its own (not during a
/// send), so the publisher notices without waiting for its next health check.
#[derive(Clone)]
pub struct LossReporter {
    /// The publisher.
    pub publisher: Recipient<ConnectionLost>,
    /// The connection this reporter belongs to (stale reports are ignored).
    pub generation: u64,
}

impl LossReporter {
    /// Reports that the connection is lost, with the client's reason.
    pub fn report(&self, error: impl fmt::Display) {
        self.publisher.do_send(ConnectionLost {
            generation: self.generation,
            error: error.to_string(),
        });
    }
}

/// How long each kind of operation may take before it counts as failed.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting (including declaring the exchange or creating the topic).
    pub connect: Duration,
    /// Sending one batch and getting it acknowledged.
    pub send: Duration,
    /// One health check.
    pub check: Duration,
}

/// A broker the events go to. Implementations hold their settings; the futures they
/// return own what they need (`'static`).
pub trait Broker: Unpin + 'static {
    /// A live connection; cloned into each operation's future.
    type Client: Clone + Unpin + 'static;

    /// The publisher's name (`redis`, `kafka`, `rabbitmq`).
    fn name(&self) -> &'static str;

    /// Where events go, for logs (without credentials).
    fn describe(&self) -> String;

    /// Operation timeouts.
    fn timeouts(&self) -> Timeouts;

    /// How often an idle connection is checked.
    fn health_check_interval(&self) -> Duration;

    /// Connects, and prepares the destination (declares the exchange, creates the
    /// topic). Spontaneous connection losses are reported through `lost`.
    fn connect(
        &self,
        lost: LossReporter,
    ) -> LocalBoxFuture<'static, Result<Self::Client, BrokerError>>;

    /// Sends `batch` in order; `Ok` once every event is acknowledged.
    fn send(
        &self,
        client: &Self::Client,
        batch: Vec<SharedEvent>,
    ) -> LocalBoxFuture<'static, Result<(), SendError>>;

    /// Checks that an idle connection still works.
    fn check(&self, client: &Self::Client) -> LocalBoxFuture<'static, Result<(), BrokerError>>;

    /// Closes a connection that is no longer used (best effort).
    fn close(&self, client: Self::Client) -> LocalBoxFuture<'static, ()>;
}

/// `url` with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    mask_url_password(url, "***")
}

/// `scheme://user:password@host…` with the password replaced by `mask`; other URLs
/// unchanged (also used by `tether check-config`).
pub fn mask_url_password(url: &str, mask: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:{mask}@{host}{path}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("amqp://guest:secret@10.0.0.1:5672/%2f"),
            "amqp://guest:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    }
}
