//! The agent connection actor: one per WebSocket, owning its TCP stream.
//!
//! The listener answers the upgrade and hands the stream over; from then on no HTTP
//! code is involved. The actor reads on readiness ([`socket`]) into a buffer shared by
//! its worker thread and parses frames there ([`frames`]), refusing oversized frames at
//! their header; it parses text frames into protocol messages ([`requests`]: system
//! requests into a [`Command`](crate::protocol::Command) once), keeps the connection's liveness clock, answers what it can answer
//! alone (pings, `list_mods`, `list_protocols`, `unregister_agent`), routes messages
//! to other agents through the registry's [`Routes`] (straight into the recipients'
//! sockets) and forwards the rest to the registry. Frames from other actors are written
//! by the sender's thread or by this thread's relay straight into the connection's
//! [`outgoing`] half, with no message to the actor;
//! only what the kernel refuses is queued, and the actor is woken then. An agent
//! whose queue stays over `limits.max_pending_bytes` for `limits.slow_consumer_grace`
//! (or exceeds `limits.max_message_queue_size` frames) is a slow consumer. After a close
//! handshake, either side starting it, the actor sends FIN at once. It always reports
//! its end to the registry, whatever the cause.

mod budget;
mod frames;
mod outgoing;
mod requests;
mod socket;

pub use frames::{FrameReader, Received};

use crate::clock::monotonic_ms;
use crate::disconnect::Disconnect;
use crate::liveness::{ConnectionClock, Liveness, SessionId};
use crate::outbound::{Batches, FrameSink, OutFrame, Outbox};
use crate::protocol::{self, ErrorCode};
use crate::registry::{Connected, ConnectionEnded, ConnectionOrder, Registry};
use crate::routes::Routes;
use crate::settings::{secs, LimitsSettings};
use actix::prelude::*;
use budget::BroadcastBudget;
use bytes::BytesMut;
use outgoing::{Attend, Backlog, Outgoing};
use serde_json::Value;
use socket::{ReadOutcome, Readable, Socket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Reads per readiness event. actix handles 16 events of a stream per turn, so a turn
/// reads at most 16 × the read size: a flooding agent cannot hold its worker thread
/// (and the tasks woken from other threads, which wait for a turn) for long.
const READS_PER_TURN: usize = 1;

/// How long a backlog waits for write readiness before the kernel is asked again.
const WRITE_RETRY: Duration = Duration::from_millis(50);

/// Longest a closed connection waits for the agent to close its side after FIN.
const LINGER: Duration = Duration::from_secs(2);

/// Registration state of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegistrationState {
    /// No successful `register_agent` yet.
    Unregistered,
    /// A `register_agent` is with the registry.
    Pending,
    /// Registered as this agent id.
    Registered(Arc<str>),
}

/// Settings a connection needs, shared by all connections.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Frame, metadata, queue and invalid-frame limits.
    pub limits: LimitsSettings,
    /// Seconds a socket may stay unregistered.
    pub registration_timeout: f64,
    /// The liveness rules (when activity ends an inactive period).
    pub liveness: Liveness,
    /// The cluster, if clustered: broadcasts go there too.
    pub cluster: Option<Addr<crate::cluster::Cluster>>,
    /// If clustered: direct messages the local routing table cannot deliver are sent
    /// to their target's node with it, from the connection's own thread.
    pub direct: Option<Arc<crate::cluster::DirectLine>>,
    /// The instruction dispatcher, which `instruction_ack`s go to.
    pub instructions: Option<Recipient<crate::instructions::Acknowledge>>,
}

/// What every connection is given by the server: whom it reports to, where it routes
/// messages, its settings, the count of open sockets.
#[derive(Clone)]
pub struct ConnectionContext {
    /// The registry, which owns the agents' lifecycle.
    pub registry: Addr<Registry>,
    /// The routing table the registry keeps.
    pub routes: Arc<Routes>,
    /// Settings shared by all connections.
    pub settings: Arc<ConnectionSettings>,
    /// The server's count of open sockets.
    pub open_sockets: Arc<AtomicUsize>,
}

/// How far a connection's close has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Open.
    No,
    /// The close frame is written or queued; FIN follows once the queue is empty.
    CloseFrameQueued,
    /// FIN sent; waiting for the agent's end of stream.
    FinSent,
}

/// One agent's WebSocket, as an actor.
pub struct AgentConnection {
    session_id: SessionId,
    remote_addr: Arc<str>,
    registry: Addr<Registry>,
    routes: Arc<Routes>,
    settings: Arc<ConnectionSettings>,
    socket: Socket,
    /// The writing half, shared with the thread's relay and with whoever writes to
    /// the agent (only this one is strong: others' outboxes end with the connection).
    outgoing: Arc<Outgoing>,
    reader: FrameReader,
    clock: Arc<ConnectionClock>,
    state: RegistrationState,
    /// Invalid frames received in a row.
    invalid_in_row: u32,
    /// The budget of system requests (`limits.max_requests_per_second`, `request_burst`).
    requests: governor::DefaultDirectRateLimiter,
    /// Requests refused by `requests` in a row.
    limited_in_row: u32,
    /// The budget of broadcast copies (`limits.max_broadcast_copies_per_second`,
    /// `broadcast_copy_burst`), made at the connection's first broadcast: an agent that
    /// never broadcasts pays a word.
    broadcasts: Option<Box<BroadcastBudget>>,
    /// Broadcasts refused by `broadcasts` in a row.
    broadcasts_limited_in_row: u32,
    /// How the connection ends, once known.
    end: Option<Disconnect>,
    closing: Closing,
    /// Set once the end has been reported to the registry.
    reported: bool,
    /// A wait for write readiness is in flight.
    awaiting_writable: bool,
    /// Since when the queued bytes are over `limits.max_pending_bytes`.
    over_budget_since: Option<Instant>,
    /// The server's count of open sockets, which this one is part of until dropped.
    open_sockets: Arc<AtomicUsize>,
    /// The registration timeout, cancelled once registered (a pending timer costs
    /// memory for every connection that holds it).
    registration_timer: Option<SpawnHandle>,
}

impl AgentConnection {
    /// Builds the actor for an upgraded stream in `context`; `early` holds bytes read after the
    /// upgrade request. Start it with [`Actor::start`] on the worker that accepted it.
    pub fn new(
        session_id: SessionId,
        remote_addr: Arc<str>,
        stream: TcpStream,
        early: BytesMut,
        context: &ConnectionContext,
    ) -> Self {
        let ConnectionContext {
            registry,
            routes,
            settings,
            open_sockets,
        } = context.clone();
        open_sockets.fetch_add(1, Ordering::AcqRel);
        let reader = FrameReader::new(settings.limits.max_frame_bytes);
        let io = Arc::new(stream);
        let limits = &settings.limits;
        let requests = budget::budget(limits.max_requests_per_second, limits.request_burst);
        let ceiling = limits.max_pending_bytes.saturating_mul(2);
        let outgoing = Outgoing::new(io.clone(), limits.max_message_queue_size, ceiling);
        Self {
            session_id,
            remote_addr,
            registry,
            routes,
            socket: Socket::new(io, early),
            outgoing: Arc::new(outgoing),
            reader,
            settings,
            clock: Arc::new(ConnectionClock::starting_at(monotonic_ms())),
            state: RegistrationState::Unregistered,
            invalid_in_row: 0,
            requests,
            limited_in_row: 0,
            broadcasts: None,
            broadcasts_limited_in_row: 0,
            end: None,
            closing: Closing::No,
            reported: false,
            awaiting_writable: false,
            over_budget_since: None,
            open_sockets,
            registration_timer: None,
        }
    }

    /// Starts closing: reports the end, writes the close frame (after the queued frames
    /// if `drain`), then FIN once written.
    fn close(&mut self, ctx: &mut Context<Self>, disconnect: Disconnect, drain: bool) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(disconnect);
        crate::metrics::connection_closed(disconnect);
        self.report_end();
        if !drain {
            self.outgoing.discard_pending();
        }
        self.closing = Closing::CloseFrameQueued;
        let frame = OutFrame::close(disconnect.code, disconnect.reason.as_str());
        if let Err(error) = self.outgoing.write_close(frame.0) {
            return self.lost(ctx, error);
        }
        let grace = secs(self.settings.limits.close_grace);
        ctx.run_later(grace, |act, ctx| {
            if act.closing == Closing::CloseFrameQueued {
                ctx.stop(); // The agent did not read its backlog in time.
            }
        });
        self.after_write(ctx);
    }

    /// The transport failed: ends at once, without a close frame (1006).
    fn lost(&mut self, ctx: &mut Context<Self>, error: std::io::Error) {
        log::debug!("session {}: connection lost: {error}", self.session_id);
        if self.end.is_none() {
            self.end = Some(Disconnect::CONNECTION_LOST);
        }
        ctx.stop();
    }

    /// Writes a frame for the agent (nothing after the close frame).
    fn send(&mut self, ctx: &mut Context<Self>, frame: OutFrame) {
        if self.closing != Closing::No {
            return;
        }
        if let Err(error) = self.outgoing.write(frame.0) {
            return self.lost(ctx, error);
        }
        self.after_write(ctx);
    }

    fn send_json(&mut self, ctx: &mut Context<Self>, frame: &Value) {
        self.send(ctx, OutFrame::json(frame));
    }

    /// After a write or flush: waits for the kernel if it refused bytes, judges the
    /// backlog, and sends FIN once a close frame is out.
    fn after_write(&mut self, ctx: &mut Context<Self>) {
        // While a wait for write readiness is in flight, writers need not wake us.
        let backlog = self.outgoing.settle(self.awaiting_writable);
        self.clock.set_queued_frames(backlog.frames);
        if backlog.frames > 0 {
            self.await_writable(ctx);
        }
        match self.closing {
            Closing::No => self.judge_backlog(ctx, backlog),
            Closing::CloseFrameQueued if backlog.frames == 0 => {
                self.outgoing.shutdown_write();
                self.closing = Closing::FinSent;
                ctx.run_later(LINGER, |_, ctx| ctx.stop());
            }
            _ => {}
        }
    }

    /// A slow consumer is an agent whose kernel buffer stays full: more frames queued
    /// than `max_message_queue_size`, more bytes than `max_pending_bytes` for longer
    /// than `slow_consumer_grace`, or a frame that would take the queue past twice
    /// `max_pending_bytes` (at once: what a client is sent stays bounded in memory).
    fn judge_backlog(&mut self, ctx: &mut Context<Self>, backlog: Backlog) {
        let limits = &self.settings.limits;
        if backlog.overflowed || backlog.frames > limits.max_message_queue_size {
            return self.close(ctx, Disconnect::SLOW_CONSUMER, false);
        }
        if backlog.bytes <= limits.max_pending_bytes {
            self.over_budget_since = None;
            return;
        }
        if self.over_budget_since.is_none() {
            let since = Instant::now();
            self.over_budget_since = Some(since);
            let grace = secs(limits.slow_consumer_grace);
            ctx.run_later(grace, move |act, ctx| {
                if act.over_budget_since == Some(since) {
                    act.close(ctx, Disconnect::SLOW_CONSUMER, false);
                }
            });
        }
    }

    fn await_writable(&mut self, ctx: &mut Context<Self>) {
        if self.awaiting_writable {
            return;
        }
        self.awaiting_writable = true;
        let io = self.socket.io();
        // Write readiness, or a retry after a short while should its edge go missing
        // (see `Socket::send`).
        let wait = async move {
            tokio::select! {
                ready = io.writable() => ready,
                () = tokio::time::sleep(WRITE_RETRY) => Ok(()),
            }
        };
        ctx.spawn(fut::wrap_future(wait).map(|ready, act: &mut Self, ctx| {
            act.awaiting_writable = false;
            let flushed = ready.and_then(|()| act.outgoing.flush());
            match flushed {
                Ok(()) => act.after_write(ctx),
                Err(error) => act.lost(ctx, error),
            }
        }));
    }

    /// Reads what the kernel has, until it would block (or a turn's worth).
    fn on_readable(&mut self, ctx: &mut Context<Self>) {
        for _ in 0..READS_PER_TURN {
            if self.closing != Closing::No {
                // Closing: discard what the agent still sends, wait for its FIN.
                match self.socket.read_with(BytesMut::clear) {
                    Ok((ReadOutcome::Data, ())) => continue,
                    Ok((ReadOutcome::Drained | ReadOutcome::WouldBlock, ())) => return,
                    Ok((ReadOutcome::Eof, ())) | Err(_) => return ctx.stop(),
                }
            }
            let reader = &mut self.reader;
            let read = self.socket.read_with(|buf| drain(reader, buf));
            let (outcome, (received, error)) = match read {
                Ok(read) => read,
                Err(error) => return self.lost(ctx, error),
            };
            self.on_all_received(ctx, received);
            if let Some(disconnect) = error {
                return self.close(ctx, disconnect, false);
            }
            match outcome {
                ReadOutcome::Data => {}
                ReadOutcome::Drained | ReadOutcome::WouldBlock => return,
                ReadOutcome::Eof => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return self.lost(ctx, eof);
                }
            }
        }
    }

    /// Handles the messages of one read. The messages they route to other agents go
    /// out together at the end (a few written here, many in one relay message per
    /// worker thread), so that several for one agent reach its socket in one write.
    fn on_all_received(&mut self, ctx: &mut Context<Self>, received: Vec<Received>) {
        let mut routed = Batches::default();
        for received in received {
            if self.end.is_some() {
                break;
            }
            self.on_received(ctx, received, &mut routed);
        }
        routed.send();
    }

    fn on_received(&mut self, ctx: &mut Context<Self>, received: Received, routed: &mut Batches) {
        let now = monotonic_ms();
        match received {
            Received::Text(text) => self.on_text(ctx, &text, routed),
            Received::Binary(_) => {
                self.clock.seen(now);
                let error = ErrorCode::UnsupportedFrame.into();
                self.send_json(ctx, &protocol::error_frame(&error, None));
            }
            Received::Ping(payload) => {
                self.clock.seen(now);
                self.send(ctx, OutFrame::pong(&payload));
            }
            Received::Pong => self.clock.seen(now),
            Received::Close(_) => self.close(ctx, Disconnect::CLIENT_CLOSED, false),
        }
    }

    fn report_end(&mut self) {
        if self.reported {
            return;
        }
        self.reported = true;
        let agent_id = match &self.state {
            RegistrationState::Registered(id) => Some(id.clone()),
            _ => None,
        };
        self.registry.do_send(ConnectionEnded {
            session_id: self.session_id,
            agent_id,
            disconnect: self.end.unwrap_or(Disconnect::INTERNAL_ERROR),
        });
    }
}

/// Every complete message in `buf`, and the framing error that stopped the reading,
/// if one did.
fn drain(reader: &mut FrameReader, buf: &mut BytesMut) -> (Vec<Received>, Option<Disconnect>) {
    let mut received = Vec::new();
    loop {
        match reader.next(buf) {
            Ok(Some(message)) => received.push(message),
            Ok(None) => return (received, None),
            Err(disconnect) => {
                buf.clear();
                return (received, Some(disconnect));
            }
        }
    }
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.add_stream(Readable(self.socket.io()));
        let address = ctx.address();
        self.outgoing.set_owner(&address.clone().recipient());
        let sink: Arc<dyn FrameSink> = self.outgoing.clone();
        let outbox = Outbox::new(&sink);
        self.registry.do_send(Connected {
            session_id: self.session_id,
            orders: address.recipient(),
            outbox,
            remote_addr: self.remote_addr.clone(),
        });
        let timeout = secs(self.settings.registration_timeout);
        self.registration_timer = Some(ctx.run_later(timeout, |act, ctx| {
            if !matches!(act.state, RegistrationState::Registered(_)) {
                act.close(ctx, Disconnect::REGISTRATION_TIMEOUT, true);
            }
        }));
        // Frames the agent sent right behind its upgrade request.
        let reader = &mut self.reader;
        let (received, error) = self.socket.take_buffered(|buf| drain(reader, buf));
        self.on_all_received(ctx, received);
        if let Some(disconnect) = error {
            self.close(ctx, disconnect, false);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.end.get_or_insert(Disconnect::CLIENT_CLOSED);
        self.report_end();
    }
}

impl Drop for AgentConnection {
    fn drop(&mut self) {
        self.open_sockets.fetch_sub(1, Ordering::AcqRel);
        // Reached without `stopped()` only when the actor panicked.
        if !self.reported {
            self.end.get_or_insert(Disconnect::INTERNAL_ERROR);
            self.report_end();
        }
    }
}

impl StreamHandler<std::io::Result<()>> for AgentConnection {
    fn handle(&mut self, readiness: std::io::Result<()>, ctx: &mut Self::Context) {
        match readiness {
            Ok(()) => self.on_readable(ctx),
            Err(error) => self.lost(ctx, error),
        }
    }
}

impl Handler<Attend> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: Attend, ctx: &mut Self::Context) {
        match msg.failure {
            Some(error) => self.lost(ctx, error),
            None => self.after_write(ctx),
        }
    }
}

impl Handler<ConnectionOrder> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: ConnectionOrder, ctx: &mut Self::Context) {
        match msg {
            ConnectionOrder::Registered(agent_id) => {
                self.state = RegistrationState::Registered(agent_id);
                if let Some(timer) = self.registration_timer.take() {
                    ctx.cancel_future(timer);
                }
            }
            ConnectionOrder::Refused(close) => {
                self.state = RegistrationState::Unregistered;
                if let Some(disconnect) = close {
                    self.close(ctx, disconnect, true);
                }
            }
            ConnectionOrder::Close { disconnect, notice } => {
                if let Some(notice) = notice {
                    self.send(ctx, OutFrame::text(&notice));
                }
                self.close(ctx, disconnect, disconnect.drains_queue());
            }
        }
    }
}
