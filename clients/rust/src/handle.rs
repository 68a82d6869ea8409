//! The [`AgentHandle`]: sending through an agent (messages, acknowledgements, system
//! requests) and reading its state, from any task; and the state it shares with the
//! agent's task.

use crate::error::Error;
use crate::event::{AckStatus, AgentInfo, Registration};
use crate::protocol;
use crate::session;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Entries per `list_agents` page (a page costs 1 + 10 of the server's default 100
/// requests per second).
const LIST_PAGE: u64 = 100;

/// Wait after a `list_agents` page refused `rate_limited`: what its cost takes to
/// refill at the server's default rate.
const LIST_PAUSE: Duration = Duration::from_millis(120);

/// `list_agents` pages refused `rate_limited` in a row before the call fails (the
/// server closes the connection after `limits.request_burst` refusals in a row).
const LIST_RETRIES: u32 = 20;

/// A cloneable handle for sending through an [`Agent`](crate::Agent) from other tasks.
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) request_timeout: Duration,
}

/// Counters of an agent's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Server pings answered.
    pub pings_answered: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Instructions handed to the application (redeliveries not counted).
    pub instructions_received: u64,
}

/// What the application sends the connection task.
pub(crate) enum Command {
    /// A frame to write as it is.
    Frame(String),
    /// An acknowledgement, remembered for redeliveries.
    Ack {
        instruction_id: String,
        frame: String,
    },
    /// A system request whose answer frame goes to `reply`.
    Request {
        command: String,
        fields: Map<String, Value>,
        reply: oneshot::Sender<Value>,
    },
}

/// State the task shares with the handles.
pub(crate) struct Shared {
    pub(crate) registration: Mutex<Registration>,
    pub(crate) certificate: Mutex<Option<Value>>,
    pub(crate) stopped: Mutex<Option<String>>,
    pub(crate) connected: AtomicBool,
    pub(crate) pings_answered: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) instructions_received: AtomicU64,
}

impl AgentHandle {
    /// Sends `content` to agent `target` and returns the message id. While the agent
    /// reconnects, the message waits (the call waits when many do) and goes out on the
    /// next connection. No answer comes on success; a target that is not connected
    /// gets an [`Event::Error`](crate::Event::Error) `unknown_agent` with this message id.
    pub async fn send_direct(&self, target: &str, content: Value) -> Result<String, Error> {
        let message_id = uuid::Uuid::new_v4().to_string();
        self.send(Command::Frame(protocol::direct(
            target,
            &content,
            &message_id,
        )))
        .await?;
        Ok(message_id)
    }

    /// Sends `content` to every other agent but those in `exclude`; returns the
    /// message id.
    pub async fn broadcast(&self, content: Value, exclude: &[String]) -> Result<String, Error> {
        let message_id = uuid::Uuid::new_v4().to_string();
        self.send(Command::Frame(protocol::broadcast(
            &content,
            exclude,
            &message_id,
        )))
        .await?;
        Ok(message_id)
    }

    /// Acknowledges instruction `instruction_id` with `status` and an optional
    /// `result`. Success is silent; should the acknowledgement be lost with its
    /// connection, the server delivers the instruction again and the agent answers
    /// with this same acknowledgement by itself.
    pub async fn ack(
        &self,
        instruction_id: &str,
        status: AckStatus,
        result: Option<Value>,
    ) -> Result<(), Error> {
        let frame = protocol::ack(instruction_id, status, result.as_ref());
        self.send(Command::Ack {
            instruction_id: instruction_id.to_owned(),
            frame,
        })
        .await
    }

    /// Every registered agent of the network, following `list_agents` pages. A page
    /// refused `rate_limited` (a large network: each page costs the connection's
    /// request budget one more per ten entries) is asked again once the budget had
    /// time to refill, up to 20 times in a row.
    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, Error> {
        let mut agents = Vec::new();
        let mut cursor: Option<String> = None;
        let mut refused = 0;
        loop {
            let mut fields = Map::new();
            fields.insert("limit".into(), LIST_PAGE.into());
            if let Some(cursor) = &cursor {
                fields.insert("cursor".into(), cursor.clone().into());
            }
            let page = match self.request("list_agents", fields).await {
                Err(Error::Request {
                    code: crate::ErrorCode::RateLimited,
                    ..
                }) if refused < LIST_RETRIES => {
                    refused += 1;
                    tokio::time::sleep(LIST_PAUSE).await;
                    continue;
                }
                other => other?,
            };
            refused = 0;
            if let Some(entries) = page["agents"].as_array() {
                agents.extend(entries.iter().map(AgentInfo::from_entry));
            }
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if page["has_more"] != true || cursor.is_none() {
                return Ok(agents);
            }
        }
    }

    /// Sends system request `command` with `fields` at the top level and returns the
    /// server's answer frame; `success: false` is [`Error::Request`].
    pub async fn request(&self, command: &str, fields: Map<String, Value>) -> Result<Value, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request {
            command: command.to_owned(),
            fields,
            reply,
        })
        .await?;
        let answer = tokio::time::timeout(self.request_timeout, answer)
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "no answer to {command} within {:?}",
                    self.request_timeout
                ))
            })?
            .map_err(|_| session::unanswered())?;
        Error::answered(command, answer)
    }

    /// The current (or, while reconnecting, the last) registration.
    pub fn registration(&self) -> Registration {
        lock(&self.shared.registration).clone()
    }

    /// The certificate the agent holds for its id, if any.
    pub fn certificate(&self) -> Option<Value> {
        lock(&self.shared.certificate).clone()
    }

    /// Whether the agent is registered right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Counters of the agent's life.
    pub fn stats(&self) -> AgentStats {
        let shared = &self.shared;
        AgentStats {
            pings_answered: shared.pings_answered.load(Ordering::Relaxed),
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            messages_received: shared.messages_received.load(Ordering::Relaxed),
            instructions_received: shared.instructions_received.load(Ordering::Relaxed),
        }
    }

    async fn send(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).await.map_err(|_| {
            Error::Stopped(
                lock(&self.shared.stopped)
                    .clone()
                    .unwrap_or_else(|| "closed".into()),
            )
        })
    }
}

/// Locks `mutex`, also after a panic elsewhere (the data is plain state).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
