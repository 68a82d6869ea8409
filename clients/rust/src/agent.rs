//! The [`Agent`]: the application's handle, and the task behind it that keeps one
//! connection at a time and reconnects when it is lost.

use crate::backoff::Backoff;
use crate::certificate::CertificateStore;
use crate::config::AgentConfig;
use crate::connection::{self, Connection};
use crate::error::Error;
use crate::event::{Disconnect, Event};
use crate::handle::{lock, AgentHandle, Command, Shared};
use crate::instructions::Ledger;
use crate::session::{self, End};
use serde_json::Value;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Sends (messages, acknowledgements, requests) that wait for a connection before the
/// calls themselves wait.
const COMMAND_BUFFER: usize = 1024;

/// An agent connected to a Tether server, reconnecting by itself.
///
/// Send with [`send_direct`](AgentHandle::send_direct),
/// [`broadcast`](AgentHandle::broadcast), [`ack`](AgentHandle::ack) and
/// [`request`](AgentHandle::request): the agent dereferences to its [`AgentHandle`],
/// which other tasks use through [`handle`](Self::handle); receive
/// with [`next_event`](Self::next_event), or use the agent as a
/// [`Stream`](futures_core::Stream) of [`Event`]s. The stream ends after a
/// [`Event::Disconnected`] whose `reconnecting` is false. Dropping the agent closes it.
pub struct Agent {
    handle: AgentHandle,
    events: mpsc::Receiver<Event>,
    closing: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// The task that owns the connection.
pub(crate) struct Runner {
    pub(crate) config: AgentConfig,
    certificates: CertificateStore,
    pub(crate) commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pub(crate) closing: watch::Receiver<bool>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) ledger: Ledger,
    /// `reconnect_url` of the last `network_shutdown`.
    pub(crate) reconnect_url: Option<String>,
    /// The reconnect delays, carried across connections that did not last.
    backoff: Backoff,
    /// Requests sent (names their `request_id`s).
    pub(crate) requests: u64,
}

impl Agent {
    /// Connects and registers: one attempt (a refusal is
    /// [`Error::Refused`] with the server's `error_code`). From then on the agent keeps
    /// itself connected. Needs a tokio runtime.
    pub async fn connect(config: AgentConfig) -> Result<Self, Error> {
        if config.agent_id.is_empty() {
            return Err(Error::InvalidConfig("agent_id is empty".into()));
        }
        if !(config.url.starts_with("ws://") || config.url.starts_with("wss://")) {
            return Err(Error::InvalidConfig(format!(
                "url {:?} is not a ws:// or wss:// URL",
                config.url
            )));
        }
        let mut certificates =
            CertificateStore::open(config.certificate_file.clone(), &config.agent_id)?;
        let connection = connection::establish(&config.url, &config, &mut certificates).await?;
        let shared = Arc::new(Shared {
            registration: Mutex::new(connection.registration.clone()),
            certificate: Mutex::new(certificates.get().cloned()),
            stopped: Mutex::new(None),
            connected: AtomicBool::new(true),
            pings_answered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            instructions_received: AtomicU64::new(0),
        });
        let (commands_tx, commands) = mpsc::channel(COMMAND_BUFFER);
        let (events_tx, events) = mpsc::channel(config.event_buffer);
        let (closing, closing_rx) = watch::channel(false);
        let handle = AgentHandle {
            commands: commands_tx,
            shared: shared.clone(),
            request_timeout: config.request_timeout,
        };
        let backoff = Backoff::new(config.reconnect);
        let runner = Runner {
            config,
            certificates,
            commands,
            events: events_tx,
            closing: closing_rx,
            shared,
            ledger: Ledger::default(),
            reconnect_url: None,
            backoff,
            requests: 0,
        };
        let task = tokio::spawn(runner.run(connection));
        Ok(Self {
            handle,
            events,
            closing,
            task: Some(task),
        })
    }

    /// The next event; `None` once the agent has stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle for sending from other tasks.
    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// Closes the connection (WebSocket close 1000; the server publishes the end of
    /// this incarnation with reason `client_closed`) and stops the agent. Waits at
    /// most a few seconds for the server.
    pub async fn close(mut self) -> Result<(), Error> {
        // Events nobody will read: a task waiting for room in the queue sees `closing`.
        self.events.close();
        self.closing.send_replace(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .map_err(|_| Error::Timeout("the agent did not stop within 10 s".into()))?
                .map_err(|error| Error::Stopped(format!("the agent's task failed: {error}")))?;
        }
        Ok(())
    }
}

/// Sending and the agent's state: every [`AgentHandle`] method works on the agent.
impl std::ops::Deref for Agent {
    type Target = AgentHandle;

    fn deref(&self) -> &AgentHandle {
        &self.handle
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.closing.send_replace(true);
    }
}

impl futures_core::Stream for Agent {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Runner {
    /// Serves connections until the agent stops.
    async fn run(mut self, first: Connection) {
        let mut connection = first;
        loop {
            let connected_at = Instant::now();
            let end = session::serve(&mut self, connection).await;
            self.backoff.connection_lasted(connected_at.elapsed());
            let disconnect = match end {
                End::Closed => {
                    return self
                        .stop(Some(1000), "closed by the application".into())
                        .await
                }
                End::Stop(disconnect) => {
                    return self.stop(disconnect.close_code, disconnect.reason).await
                }
                End::Lost(disconnect) => disconnect,
            };
            self.shared.connected.store(false, Ordering::Relaxed);
            log::info!(
                "{}: connection lost ({}); reconnecting",
                self.config.agent_id,
                disconnect.reason
            );
            self.emit(Event::Disconnected(disconnect)).await;
            connection = match self.reconnect().await {
                Ok(connection) => connection,
                Err(reason) => return self.stop(None, reason).await,
            };
            self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
            self.shared.connected.store(true, Ordering::Relaxed);
            *lock(&self.shared.registration) = connection.registration.clone();
            *lock(&self.shared.certificate) = self.certificates.get().cloned();
            self.emit(Event::Reconnected(connection.registration.clone()))
                .await;
        }
    }

    /// Connects again, with backoff, until it works, the application closes the agent,
    /// a refusal says retrying cannot help, or the attempts run out.
    async fn reconnect(&mut self) -> Result<Connection, String> {
        // Attempts of this reconnection: after a `network_shutdown` with a
        // `reconnect_url`, the odd ones go there.
        let mut tried = 0usize;
        while let Some(delay) = self.backoff.next_delay() {
            tried += 1;
            let attempts = self.backoff.attempts();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closing(&mut self.closing) => return Err("closed by the application".into()),
            }
            let url = match (&self.reconnect_url, tried % 2) {
                (Some(moved_to), 1) => moved_to.clone(),
                _ => self.config.url.clone(),
            };
            let attempt = tokio::select! {
                attempt = connection::establish(&url, &self.config, &mut self.certificates) => attempt,
                _ = closing(&mut self.closing) => return Err("closed by the application".into()),
            };
            match attempt {
                Ok(connection) => {
                    self.reconnect_url = None;
                    return Ok(connection);
                }
                Err(Error::Refused { code, message }) if !code.is_retryable() => {
                    return Err(format!("registration refused ({code}): {message}"))
                }
                Err(error) => log::info!(
                    "{}: reconnect attempt {attempts} to {url} failed: {error}",
                    self.config.agent_id
                ),
            }
        }
        Err(format!(
            "gave up after {} reconnect attempts",
            self.backoff.attempts()
        ))
    }

    /// Keeps the certificate a renewal (`claim_agent_id` on a registered connection)
    /// answered with; a refusal leaves the current one, to be tried again.
    pub(crate) fn renewed(&mut self, answer: Value) {
        let agent_id = &self.config.agent_id;
        let answer = match Error::answered("claim_agent_id", answer) {
            Ok(answer) => answer,
            Err(error) => return log::warn!("{agent_id}: certificate renewal refused: {error}"),
        };
        match self.certificates.set(answer["certificate"].clone()) {
            Ok(()) => log::debug!("{agent_id}: certificate renewed"),
            Err(error) => {
                log::warn!("{agent_id}: renewed certificate kept in memory only: {error}")
            }
        }
        *lock(&self.shared.certificate) = self.certificates.get().cloned();
    }

    /// The agent's certificate store.
    pub(crate) fn certificates(&self) -> &CertificateStore {
        &self.certificates
    }

    /// Hands `event` to the application (waits while its queue is full).
    pub(crate) async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }

    async fn stop(self, close_code: Option<u16>, reason: String) {
        log::info!("{}: stopped ({reason})", self.config.agent_id);
        self.shared.connected.store(false, Ordering::Relaxed);
        *lock(&self.shared.stopped) = Some(reason.clone());
        self.emit(Event::Disconnected(Disconnect {
            close_code,
            reason,
            reconnecting: false,
        }))
        .await;
    }
}

/// Resolves once the agent is to close (or its [`Agent`] is gone).
pub(crate) async fn closing(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}
