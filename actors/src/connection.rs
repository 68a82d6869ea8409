//! The agent connection actor: one per WebSocket.
//!
//! It is fed by the actix-ws message stream, parses frames into protocol messages,
//! enforces frame and metadata limits, keeps the connection's liveness clock, answers
//! what it can answer alone (pings, `list_mods`, `list_protocols`, `unregister_agent`)
//! and forwards the rest to the registry. It writes only through its bounded
//! [`Outbox`], and it always reports its end to the registry, whatever the cause: in
//! `stopped()`, or from `Drop` when a panic skipped `stopped()`.

use crate::clock::{monotonic_ms, ConnectionClock};
use crate::event::EndReason;
use crate::outbound::{spawn_writer, CloseOrder, OutFrame, Outbox, PushError};
use crate::protocol::{self, close_code, Inbound, MessageKind, Request};
use crate::registry::{
    ActivityResumed, Connected, ConnectionEnded, RegisterAgent, RegistrationRefused, Registry,
    Route, SystemRequest,
};
use crate::settings::{secs, LimitsSettings};
use actix::prelude::*;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, ProtocolError, Session};
use bytestring::ByteString;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Identifies one WebSocket connection for the lifetime of the process.
pub type SessionId = u64;

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
}

/// Tells a connection to close. Sent by the registry (takeover, stale, admin, shutdown,
/// slow consumer); the registry has already ended the incarnation's lifecycle.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Close {
    /// Close code for the agent.
    pub code: u16,
    /// Reason reported in `agent.disconnected`.
    pub reason: EndReason,
    /// A notification written before the close frame (takeover notice).
    pub notice: Option<ByteString>,
}

/// Tells a connection how its `register_agent` ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum RegistrationOutcome {
    /// Registered as this agent id; the response is already in the outbox.
    Accepted(Arc<str>),
    /// Refused; the response is already in the outbox. Close with this code if set.
    Refused(Option<u16>),
}

/// One agent's WebSocket, as an actor.
pub struct AgentConnection {
    session_id: SessionId,
    remote_addr: Arc<str>,
    registry: Addr<Registry>,
    settings: Arc<ConnectionSettings>,
    outbox: Outbox,
    close_tx: Option<oneshot::Sender<CloseOrder>>,
    stream: Option<AggregatedMessageStream>,
    clock: Arc<ConnectionClock>,
    state: RegistrationState,
    /// Invalid frames received in a row.
    invalid_in_row: u32,
    /// How the connection ended, once known.
    end: Option<(EndReason, u16)>,
    /// Set once the end has been reported to the registry.
    reported: bool,
}

impl AgentConnection {
    /// Builds the actor for an upgraded WebSocket. Start it with [`Actor::start`] on
    /// the worker that accepted the socket.
    pub fn new(
        session_id: SessionId,
        remote_addr: Arc<str>,
        session: Session,
        stream: actix_ws::MessageStream,
        registry: Addr<Registry>,
        settings: Arc<ConnectionSettings>,
    ) -> Self {
        let max = settings.limits.max_frame_bytes;
        let stream = stream
            .max_frame_size(max)
            .aggregate_continuations()
            .max_continuation_size(max);
        let (outbox, close_tx) = spawn_writer(session, settings.limits.max_message_queue_size);
        Self {
            session_id,
            remote_addr,
            registry,
            settings,
            outbox,
            close_tx: Some(close_tx),
            stream: Some(stream),
            clock: Arc::new(ConnectionClock::new()),
            state: RegistrationState::Unregistered,
            invalid_in_row: 0,
            end: None,
            reported: false,
        }
    }

    /// Ends the connection: remembers why, tells the writer to close, stops the actor.
    fn close(&mut self, ctx: &mut Context<Self>, code: u16, reason: EndReason, drain: bool) {
        if self.end.is_none() {
            self.end = Some((reason, code));
        }
        if let Some(close_tx) = self.close_tx.take() {
            let description = reason.as_str().to_owned();
            let _ = close_tx.send(CloseOrder {
                code,
                description,
                drain,
            });
        }
        ctx.stop();
    }

    /// Queues a frame for this agent; a full queue ends the connection.
    fn send(&mut self, ctx: &mut Context<Self>, frame: OutFrame) {
        match self.outbox.push_frame(frame) {
            Ok(()) => {}
            Err(PushError::Full) => self.close(
                ctx,
                close_code::SLOW_CONSUMER,
                EndReason::SlowConsumer,
                false,
            ),
            Err(PushError::Closed) => self.close(ctx, close_code::NORMAL, EndReason::Error, false),
        }
    }

    fn send_json(&mut self, ctx: &mut Context<Self>, frame: &Value) {
        self.send(ctx, OutFrame::Text(ByteString::from(frame.to_string())));
    }

    fn invalid_frame(&mut self, ctx: &mut Context<Self>, error: String) {
        self.invalid_in_row += 1;
        self.send_json(ctx, &protocol::error_frame("invalid_frame", &error, None));
        if self.invalid_in_row >= self.settings.limits.max_invalid_frames {
            self.close(ctx, close_code::POLICY, EndReason::ProtocolError, true);
        }
    }

    fn on_text(&mut self, ctx: &mut Context<Self>, text: &str) {
        let now = monotonic_ms();
        let inbound = match protocol::parse_frame(text) {
            Ok(inbound) => inbound,
            Err(error) => {
                self.clock.seen(now);
                return self.invalid_frame(ctx, error.0);
            }
        };
        match &inbound {
            Inbound::PingAnswer { timestamp } => {
                self.clock.seen(now);
                if let Some(sent) = timestamp {
                    self.clock.answered_ping(crate::clock::epoch_secs() - sent);
                }
            }
            Inbound::OtherResponse => self.clock.seen(now),
            Inbound::Request(_) | Inbound::Message(_) => {
                if self.clock.active(now) {
                    self.registry.do_send(ActivityResumed {
                        session_id: self.session_id,
                    });
                }
            }
        }
        self.invalid_in_row = 0;
        match inbound {
            Inbound::PingAnswer { .. } | Inbound::OtherResponse => {}
            Inbound::Request(request) => self.on_request(ctx, request),
            Inbound::Message(frame) => self.on_message(ctx, frame),
        }
    }

    fn on_request(&mut self, ctx: &mut Context<Self>, request: Request) {
        let command = request.command.as_str();
        let registered = matches!(self.state, RegistrationState::Registered(_));
        match command {
            "register_agent" => self.on_register(ctx, request),
            "ping_agent" => {
                let timestamp = request
                    .fields
                    .get("timestamp")
                    .cloned()
                    .unwrap_or_else(|| json!(crate::clock::epoch_secs()));
                let frame = protocol::response_ok(
                    command,
                    request.request_id(),
                    json!({ "timestamp": timestamp }),
                );
                self.send_json(ctx, &frame);
            }
            "claim_agent_id" | "validate_certificate" | "get_network_info" => {
                self.forward_request(request)
            }
            _ if !registered => {
                let mut frame = protocol::error_frame(
                    "not_registered",
                    "Register with register_agent before sending other requests",
                    None,
                );
                frame["command"] = json!(command);
                if let Some(id) = request.request_id() {
                    frame["request_id"] = id.clone();
                }
                self.send_json(ctx, &frame);
            }
            "list_agents" => self.forward_request(request),
            "list_mods" => {
                let frame =
                    protocol::response_ok(command, request.request_id(), json!({"mods": []}));
                self.send_json(ctx, &frame);
            }
            "list_protocols" => {
                let frame =
                    protocol::response_ok(command, request.request_id(), json!({"protocols": []}));
                self.send_json(ctx, &frame);
            }
            "unregister_agent" => {
                let frame = protocol::response_ok(command, request.request_id(), json!({}));
                self.send_json(ctx, &frame);
                self.close(ctx, close_code::NORMAL, EndReason::Unregistered, true);
            }
            _ => {
                let frame = protocol::response_error(
                    command,
                    request.request_id(),
                    "unknown_command",
                    "Unknown command",
                );
                self.send_json(ctx, &frame);
            }
        }
    }

    fn forward_request(&self, request: Request) {
        self.registry.do_send(SystemRequest {
            session_id: self.session_id,
            request,
        });
    }

    fn on_register(&mut self, ctx: &mut Context<Self>, request: Request) {
        let refuse = |this: &mut Self,
                      ctx: &mut Context<Self>,
                      agent_id: Option<&str>,
                      code: &str,
                      error: &str| {
            let frame =
                protocol::response_error("register_agent", request.request_id(), code, error);
            this.send_json(ctx, &frame);
            this.registry.do_send(RegistrationRefused {
                agent_id: agent_id.map(str::to_owned),
                error_code: code.to_owned(),
            });
        };
        if self.state != RegistrationState::Unregistered {
            let error = "This connection is already registered";
            return refuse(
                self,
                ctx,
                request.str_field("agent_id"),
                "already_registered",
                error,
            );
        }
        let agent_id = match request.fields.get("agent_id") {
            None | Some(Value::Null) => {
                return refuse(self, ctx, None, "missing_agent_id", "agent_id is required")
            }
            Some(Value::String(id)) if id.is_empty() => {
                return refuse(self, ctx, None, "missing_agent_id", "agent_id is required")
            }
            Some(Value::String(id)) if protocol::valid_agent_id(id) => id.clone(),
            Some(_) => {
                let error = "agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -";
                return refuse(
                    self,
                    ctx,
                    request.str_field("agent_id"),
                    "invalid_agent_id",
                    error,
                );
            }
        };
        let metadata = match request.fields.get("metadata") {
            None | Some(Value::Null) => json!({}),
            Some(meta @ Value::Object(_)) => {
                let size = meta.to_string().len();
                let max = self.settings.limits.max_metadata_bytes;
                if size > max {
                    let error = format!("metadata is {size} bytes serialized; the limit is {max}");
                    return refuse(self, ctx, Some(&agent_id), "invalid_metadata", &error);
                }
                meta.clone()
            }
            Some(_) => {
                let error = "metadata must be an object or null";
                return refuse(self, ctx, Some(&agent_id), "invalid_metadata", error);
            }
        };
        self.state = RegistrationState::Pending;
        self.registry.do_send(RegisterAgent {
            session_id: self.session_id,
            agent_id,
            metadata,
            certificate: request
                .fields
                .get("certificate")
                .filter(|c| !c.is_null())
                .cloned(),
            force_reconnect: request.bool_field("force_reconnect"),
            request_id: request.request_id().cloned(),
            clock: self.clock.clone(),
        });
    }

    fn on_message(&mut self, ctx: &mut Context<Self>, mut frame: serde_json::Map<String, Value>) {
        let RegistrationState::Registered(agent_id) = &self.state else {
            let error = "Register with register_agent before sending messages";
            return self.send_json(ctx, &protocol::error_frame("not_registered", error, None));
        };
        let agent_id = agent_id.clone();
        let kind = match protocol::message_kind(&frame) {
            Ok(kind) => kind,
            Err(error) => return self.invalid_frame(ctx, error.0),
        };
        let message_id = protocol::stamp_message(&mut frame, &agent_id);
        if kind == MessageKind::Mod {
            let error = "This network has no mods loaded";
            let frame = protocol::error_frame("unsupported_mod", error, Some(&message_id));
            return self.send_json(ctx, &frame);
        }
        let encoded = ByteString::from(Value::Object(frame).to_string());
        self.registry.do_send(Route {
            session_id: self.session_id,
            sender_id: agent_id,
            kind,
            frame: encoded,
            message_id,
        });
    }

    fn report_end(&mut self) {
        if self.reported {
            return;
        }
        self.reported = true;
        let (reason, close_code) = self.end.unwrap_or((EndReason::Error, close_code::INTERNAL));
        let agent_id = match &self.state {
            RegistrationState::Registered(id) => Some(id.clone()),
            _ => None,
        };
        self.registry.do_send(ConnectionEnded {
            session_id: self.session_id,
            agent_id,
            reason,
            close_code,
        });
    }
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(stream) = self.stream.take() {
            ctx.add_stream(stream);
        }
        self.registry.do_send(Connected {
            session_id: self.session_id,
            addr: ctx.address(),
            outbox: self.outbox.clone(),
            remote_addr: self.remote_addr.clone(),
        });
        let timeout = secs(self.settings.registration_timeout);
        ctx.run_later(timeout, |act, ctx| {
            if !matches!(act.state, RegistrationState::Registered(_)) {
                let code = close_code::REGISTRATION_TIMEOUT;
                act.close(ctx, code, EndReason::ProtocolError, true);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(close_tx) = self.close_tx.take() {
            let (reason, code) = self
                .end
                .unwrap_or((EndReason::ClientClosed, close_code::NORMAL));
            let _ = close_tx.send(CloseOrder {
                code,
                description: reason.as_str().to_owned(),
                drain: true,
            });
        }
        self.report_end();
    }
}

impl Drop for AgentConnection {
    fn drop(&mut self) {
        // Reached without `stopped()` only when the actor panicked.
        if !self.reported {
            self.end
                .get_or_insert((EndReason::Error, close_code::INTERNAL));
            self.report_end();
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for AgentConnection {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Self::Context) {
        if self.end.is_some() {
            return;
        }
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(ctx, &text),
            Ok(AggregatedMessage::Binary(_)) => {
                self.clock.seen(monotonic_ms());
                let error = "Binary frames are not supported; send JSON in text frames";
                self.send_json(
                    ctx,
                    &protocol::error_frame("unsupported_frame", error, None),
                );
            }
            Ok(AggregatedMessage::Ping(bytes)) => {
                self.clock.seen(monotonic_ms());
                self.send(ctx, OutFrame::Pong(bytes));
            }
            Ok(AggregatedMessage::Pong(_)) => self.clock.seen(monotonic_ms()),
            Ok(AggregatedMessage::Close(_)) => {
                self.close(ctx, close_code::NORMAL, EndReason::ClientClosed, false)
            }
            Err(ProtocolError::Overflow) => {
                self.close(ctx, close_code::TOO_BIG, EndReason::ProtocolError, false)
            }
            // actix-ws reports reassembled continuations over the limit as this I/O error.
            Err(ProtocolError::Io(error))
                if error.to_string() == "Exceeded maximum continuation size" =>
            {
                self.close(ctx, close_code::TOO_BIG, EndReason::ProtocolError, false)
            }
            // The transport failed (actix-ws wraps payload errors as `Other`): the client
            // vanished without a close frame (crash, reset, cut cable). 1006 = abnormal.
            Err(ProtocolError::Io(error)) if error.kind() == std::io::ErrorKind::Other => {
                log::debug!("session {}: connection lost: {error}", self.session_id);
                self.close(ctx, 1006, EndReason::ClientClosed, false)
            }
            Err(error) => {
                log::debug!("session {}: protocol error: {error}", self.session_id);
                self.close(ctx, 1002, EndReason::ProtocolError, false)
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.end.is_none() {
            self.end = Some((EndReason::ClientClosed, close_code::NORMAL));
        }
        ctx.stop();
    }
}

impl Handler<Close> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        if let Some(notice) = msg.notice {
            let _ = self.outbox.push(notice);
        }
        let drain = msg.reason != EndReason::SlowConsumer;
        self.close(ctx, msg.code, msg.reason, drain);
    }
}

impl Handler<RegistrationOutcome> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: RegistrationOutcome, ctx: &mut Self::Context) {
        match msg {
            RegistrationOutcome::Accepted(agent_id) => {
                self.state = RegistrationState::Registered(agent_id)
            }
            RegistrationOutcome::Refused(close) => {
                self.state = RegistrationState::Unregistered;
                if let Some(code) = close {
                    let reason = if code == close_code::GOING_AWAY {
                        EndReason::Shutdown
                    } else {
                        EndReason::ProtocolError
                    };
                    self.close(ctx, code, reason, true);
                }
            }
        }
    }
}
