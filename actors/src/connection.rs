//! The agent connection actor: one per WebSocket.
//!
//! It is fed by the actix-ws message stream, parses frames into protocol messages
//! (system requests into a [`Command`] once), enforces frame and metadata limits, keeps
//! the connection's liveness clock, answers what it can answer alone (pings,
//! `list_mods`, `list_protocols`, `unregister_agent`) and forwards the rest to the
//! registry. It writes only through its bounded [`Outbox`], and it always reports its
//! end to the registry, whatever the cause: in `stopped()`, or from `Drop` when a panic
//! skipped `stopped()`.

use crate::clock::{epoch_secs, monotonic_ms};
use crate::disconnect::Disconnect;
use crate::liveness::{ConnectionClock, Liveness, SessionId};
use crate::outbound::{spawn_writer, CloseOrder, OutFrame, Outbox, PushError};
use crate::protocol::command::{Command, Refusal, Registration, Request};
use crate::protocol::{self, ErrorCode, Inbound, MessageKind, ProtocolError};
use crate::registry::{
    ActivityResumed, Connected, ConnectionEnded, ConnectionOrder, RegisterAgent,
    RegistrationRefused, Registry, Route, SystemRequest,
};
use crate::settings::{secs, LimitsSettings};
use actix::prelude::*;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, Session};
use bytestring::ByteString;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::oneshot;

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
    end: Option<Disconnect>,
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
            clock: Arc::new(ConnectionClock::starting_at(monotonic_ms())),
            state: RegistrationState::Unregistered,
            invalid_in_row: 0,
            end: None,
            reported: false,
        }
    }

    /// Ends the connection: remembers how, tells the writer to close (after writing
    /// what is queued if `drain`), stops the actor.
    fn close(&mut self, ctx: &mut Context<Self>, disconnect: Disconnect, drain: bool) {
        let disconnect = *self.end.get_or_insert(disconnect);
        if let Some(close_tx) = self.close_tx.take() {
            let _ = close_tx.send(CloseOrder {
                code: disconnect.code,
                description: disconnect.reason.as_str().to_owned(),
                drain,
            });
        }
        ctx.stop();
    }

    /// Queues a frame for this agent; a full queue ends the connection.
    fn send(&mut self, ctx: &mut Context<Self>, frame: OutFrame) {
        match self.outbox.push_frame(frame) {
            Ok(()) => {}
            Err(PushError::Full) => self.close(ctx, Disconnect::SLOW_CONSUMER, false),
            Err(PushError::Closed) => self.close(ctx, Disconnect::INTERNAL_ERROR, false),
        }
    }

    fn send_json(&mut self, ctx: &mut Context<Self>, frame: &Value) {
        self.send(ctx, OutFrame::Text(ByteString::from(frame.to_string())));
    }

    /// Answers `request` with `error`.
    fn refuse_request(&mut self, ctx: &mut Context<Self>, request: &Request, error: ProtocolError) {
        let frame =
            protocol::response_error(request.command.name(), request.request_id.as_ref(), &error);
        self.send_json(ctx, &frame);
    }

    /// Answers `request` with success and `fields`.
    fn answer(&mut self, ctx: &mut Context<Self>, request: &Request, fields: Value) {
        let frame =
            protocol::response_ok(request.command.name(), request.request_id.as_ref(), fields);
        self.send_json(ctx, &frame);
    }

    fn invalid_frame(&mut self, ctx: &mut Context<Self>, error: String) {
        self.invalid_in_row += 1;
        let error = ProtocolError::new(ErrorCode::InvalidFrame, error);
        self.send_json(ctx, &protocol::error_frame(&error, None));
        if self.invalid_in_row >= self.settings.limits.max_invalid_frames {
            self.close(ctx, Disconnect::POLICY_VIOLATION, true);
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
                    self.clock.answered_ping(epoch_secs() - sent);
                }
            }
            Inbound::OtherResponse => self.clock.seen(now),
            Inbound::Request(_) | Inbound::Message(_) => {
                let previous = self.clock.active(now);
                if self.settings.liveness.is_idle(previous, now) {
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
        let registered = matches!(self.state, RegistrationState::Registered(_));
        if !registered && !request.command.allowed_unregistered() {
            let mut frame = protocol::error_frame(&ErrorCode::NotRegistered.into(), None);
            frame["command"] = json!(request.command.name());
            if let Some(id) = &request.request_id {
                frame["request_id"] = id.clone();
            }
            return self.send_json(ctx, &frame);
        }
        match &request.command {
            Command::RegisterAgent(registration) => {
                let registration = registration.clone();
                self.on_register(ctx, &request, registration)
            }
            Command::PingAgent { timestamp } => {
                let timestamp = timestamp.clone().unwrap_or_else(|| json!(epoch_secs()));
                self.answer(ctx, &request, json!({ "timestamp": timestamp }));
            }
            Command::ClaimAgentId(_)
            | Command::ValidateCertificate { .. }
            | Command::GetNetworkInfo
            | Command::ListAgents => self.registry.do_send(SystemRequest {
                session_id: self.session_id,
                request,
            }),
            Command::ListMods => self.answer(ctx, &request, json!({"mods": []})),
            Command::ListProtocols => self.answer(ctx, &request, json!({"protocols": []})),
            Command::UnregisterAgent => {
                self.answer(ctx, &request, json!({}));
                self.close(ctx, Disconnect::UNREGISTERED, true);
            }
            Command::Unknown(_) => {
                self.refuse_request(ctx, &request, ErrorCode::UnknownCommand.into())
            }
        }
    }

    fn on_register(
        &mut self,
        ctx: &mut Context<Self>,
        request: &Request,
        registration: Result<Registration, Refusal>,
    ) {
        let checked = if self.state != RegistrationState::Unregistered {
            let agent_id = match registration {
                Ok(registration) => Some(registration.agent_id),
                Err(refusal) => refusal.agent_id,
            };
            Err(Refusal {
                agent_id,
                error: ErrorCode::AlreadyRegistered.into(),
            })
        } else {
            registration
        };
        let checked = checked.and_then(|registration| {
            let size = registration.metadata.to_string().len();
            let max = self.settings.limits.max_metadata_bytes;
            if size > max {
                let error = format!("metadata is {size} bytes serialized; the limit is {max}");
                return Err(Refusal {
                    agent_id: Some(registration.agent_id),
                    error: ProtocolError::new(ErrorCode::InvalidMetadata, error),
                });
            }
            Ok(registration)
        });
        let registration = match checked {
            Ok(registration) => registration,
            Err(refusal) => {
                self.refuse_request(ctx, request, refusal.error.clone());
                return self.registry.do_send(RegistrationRefused {
                    agent_id: refusal.agent_id,
                    error_code: refusal.error.code,
                });
            }
        };
        self.state = RegistrationState::Pending;
        self.registry.do_send(RegisterAgent {
            session_id: self.session_id,
            registration,
            request_id: request.request_id.clone(),
            clock: self.clock.clone(),
        });
    }

    fn on_message(&mut self, ctx: &mut Context<Self>, mut frame: serde_json::Map<String, Value>) {
        let RegistrationState::Registered(agent_id) = &self.state else {
            let error = ProtocolError::new(
                ErrorCode::NotRegistered,
                "Register with register_agent before sending messages",
            );
            return self.send_json(ctx, &protocol::error_frame(&error, None));
        };
        let agent_id = agent_id.clone();
        let kind = match protocol::message_kind(&frame) {
            Ok(kind) => kind,
            Err(error) => return self.invalid_frame(ctx, error.0),
        };
        let message_id = protocol::stamp_message(&mut frame, &agent_id);
        if kind == MessageKind::Mod {
            let error = ErrorCode::UnsupportedMod.into();
            let frame = protocol::error_frame(&error, Some(&message_id));
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

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(stream) = self.stream.take() {
            ctx.add_stream(stream);
        }
        self.registry.do_send(Connected {
            session_id: self.session_id,
            orders: ctx.address().recipient(),
            outbox: self.outbox.clone(),
            remote_addr: self.remote_addr.clone(),
        });
        let timeout = secs(self.settings.registration_timeout);
        ctx.run_later(timeout, |act, ctx| {
            if !matches!(act.state, RegistrationState::Registered(_)) {
                act.close(ctx, Disconnect::REGISTRATION_TIMEOUT, true);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(close_tx) = self.close_tx.take() {
            let disconnect = self.end.unwrap_or(Disconnect::CLIENT_CLOSED);
            let _ = close_tx.send(CloseOrder {
                code: disconnect.code,
                description: disconnect.reason.as_str().to_owned(),
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
            self.end.get_or_insert(Disconnect::INTERNAL_ERROR);
            self.report_end();
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, actix_ws::ProtocolError>> for AgentConnection {
    fn handle(
        &mut self,
        item: Result<AggregatedMessage, actix_ws::ProtocolError>,
        ctx: &mut Self::Context,
    ) {
        use actix_ws::ProtocolError as WsError;
        if self.end.is_some() {
            return;
        }
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(ctx, &text),
            Ok(AggregatedMessage::Binary(_)) => {
                self.clock.seen(monotonic_ms());
                let error = ErrorCode::UnsupportedFrame.into();
                self.send_json(ctx, &protocol::error_frame(&error, None));
            }
            Ok(AggregatedMessage::Ping(bytes)) => {
                self.clock.seen(monotonic_ms());
                self.send(ctx, OutFrame::Pong(bytes));
            }
            Ok(AggregatedMessage::Pong(_)) => self.clock.seen(monotonic_ms()),
            Ok(AggregatedMessage::Close(_)) => self.close(ctx, Disconnect::CLIENT_CLOSED, false),
            Err(WsError::Overflow) => self.close(ctx, Disconnect::MESSAGE_TOO_BIG, false),
            // actix-ws reports reassembled continuations over the limit as this I/O error.
            Err(WsError::Io(error))
                if error.to_string() == "Exceeded maximum continuation size" =>
            {
                self.close(ctx, Disconnect::MESSAGE_TOO_BIG, false)
            }
            // The transport failed (actix-ws wraps payload errors as `Other`): the client
            // vanished without a close frame (crash, reset, cut cable).
            Err(WsError::Io(error)) if error.kind() == std::io::ErrorKind::Other => {
                log::debug!("session {}: connection lost: {error}", self.session_id);
                self.close(ctx, Disconnect::CONNECTION_LOST, false)
            }
            Err(error) => {
                log::debug!("session {}: protocol error: {error}", self.session_id);
                self.close(ctx, Disconnect::BAD_FRAMING, false)
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.end.get_or_insert(Disconnect::CLIENT_CLOSED);
        ctx.stop();
    }
}

impl Handler<ConnectionOrder> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: ConnectionOrder, ctx: &mut Self::Context) {
        match msg {
            ConnectionOrder::Registered(agent_id) => {
                self.state = RegistrationState::Registered(agent_id)
            }
            ConnectionOrder::Refused(close) => {
                self.state = RegistrationState::Unregistered;
                if let Some(disconnect) = close {
                    self.close(ctx, disconnect, true);
                }
            }
            ConnectionOrder::Close { disconnect, notice } => {
                if let Some(notice) = notice {
                    let _ = self.outbox.push(notice);
                }
                self.close(ctx, disconnect, disconnect.drains_queue());
            }
        }
    }
}
