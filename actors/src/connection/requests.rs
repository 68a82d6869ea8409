//! What a connection does with a text frame from its agent: parse it once, answer what
//! needs no table (pings, `list_mods`, `list_protocols`, `unregister_agent`), check a
//! registration, stamp messages and route them ([`Routes`](crate::routes::Routes)), and
//! forward the rest to the registry.

use super::{AgentConnection, BroadcastBudget, RegistrationState};
use crate::clock::{epoch_secs, monotonic_ms};
use crate::cluster::{Forward, Spread};
use crate::disconnect::Disconnect;
use crate::instructions::Acknowledge;
use crate::outbound::{Batches, OutFrame};
use crate::protocol::command::{Command, Refusal, Registration, Request};
use crate::protocol::{
    self, ErrorCode, Inbound, InstructionAck, MessageFrame, MessageKind, ProtocolError,
};
use crate::registry::{ActivityResumed, RegisterAgent, RegistrationRefused, SystemRequest};
use crate::routes::Routed;
use actix::prelude::*;
use serde_json::{json, Value};

impl AgentConnection {
    /// Answers `request` with `error`.
    pub(super) fn refuse_request(
        &mut self,
        ctx: &mut Context<Self>,
        request: &Request,
        error: ProtocolError,
    ) {
        let frame =
            protocol::response_error(request.command.name(), request.request_id.as_ref(), &error);
        self.send_json(ctx, &frame);
    }

    /// Answers `request` with success and `fields`.
    pub(super) fn answer(&mut self, ctx: &mut Context<Self>, request: &Request, fields: Value) {
        let frame =
            protocol::response_ok(request.command.name(), request.request_id.as_ref(), fields);
        self.send_json(ctx, &frame);
    }

    pub(super) fn invalid_frame(&mut self, ctx: &mut Context<Self>, error: String) {
        self.invalid_in_row += 1;
        crate::metrics::frame_rejected("invalid_frame");
        let error = ProtocolError::new(ErrorCode::InvalidFrame, error);
        self.send_json(ctx, &protocol::error_frame(&error, None));
        if self.invalid_in_row >= self.settings.limits.max_invalid_frames {
            self.close(ctx, Disconnect::POLICY_VIOLATION, true);
        }
    }

    /// Handles one text message; messages for other agents go into `routed`.
    pub(super) fn on_text(&mut self, ctx: &mut Context<Self>, text: &str, routed: &mut Batches) {
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
            Inbound::Request(_) | Inbound::Message(_) | Inbound::InstructionAck(_) => {
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
            Inbound::Message(frame) => self.on_message(ctx, frame, routed),
            Inbound::InstructionAck(ack) => self.on_instruction_ack(ctx, ack),
        }
    }

    /// Hands an `instruction_ack` to the dispatcher, which answers errors itself (and
    /// bounds how many wrong acknowledgements an agent may make it look up).
    fn on_instruction_ack(&mut self, ctx: &mut Context<Self>, ack: InstructionAck) {
        let refuse = |error: ProtocolError, id: &str| {
            let mut frame = protocol::error_frame(&error, None);
            frame["instruction_id"] = json!(id);
            frame
        };
        let RegistrationState::Registered(agent_id) = &self.state else {
            let frame = refuse(ErrorCode::NotRegistered.into(), &ack.instruction_id);
            return self.send_json(ctx, &frame);
        };
        match &self.settings.instructions {
            Some(dispatcher) => dispatcher.do_send(Acknowledge {
                agent_id: agent_id.clone(),
                ack,
            }),
            None => {
                let frame = refuse(ErrorCode::UnknownInstruction.into(), &ack.instruction_id);
                self.send_json(ctx, &frame);
            }
        }
    }

    pub(super) fn on_request(&mut self, ctx: &mut Context<Self>, request: Request) {
        // A request dearer than the whole burst costs the burst (it stays possible).
        let burst = self.settings.limits.request_burst.max(1);
        let cost =
            std::num::NonZeroU32::new(request.command.cost().clamp(1, burst)).expect("at least 1");
        if !matches!(self.requests.check_n(cost), Ok(Ok(()))) {
            self.limited_in_row += 1;
            crate::metrics::frame_rejected("rate_limited");
            if self.limited_in_row >= burst {
                return self.close(ctx, Disconnect::POLICY_VIOLATION, true);
            }
            let rate = self.settings.limits.max_requests_per_second;
            let error = ProtocolError::new(
                ErrorCode::RateLimited,
                format!(
                    "This connection sends more than {rate} requests per second \
                     (limits.max_requests_per_second; a list_agents page counts one more \
                     per ten entries asked for); {burst} refused in a row close it"
                ),
            );
            return self.refuse_request(ctx, &request, error);
        }
        self.limited_in_row = 0;
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
            | Command::ListAgents(_) => self.registry.do_send(SystemRequest {
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

    pub(super) fn on_register(
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

    /// Takes a broadcast's copies from the connection's budget: one per agent on this
    /// node but the sender (exclusions only make the real count smaller). False, and
    /// nothing taken, when the budget does not hold them.
    fn broadcast_allowed(&mut self) -> bool {
        let limits = &self.settings.limits;
        let (per_second, burst) = (
            limits.max_broadcast_copies_per_second,
            limits.broadcast_copy_burst,
        );
        let copies = u32::try_from(self.routes.len().saturating_sub(1)).unwrap_or(u32::MAX);
        self.broadcasts
            .get_or_insert_with(|| Box::new(BroadcastBudget::new(per_second, burst)))
            .take(copies)
    }

    /// Answers a message of `kind` refused before routing with `error`, and counts it.
    fn refuse_message(
        &mut self,
        ctx: &mut Context<Self>,
        kind: &'static str,
        error: &ProtocolError,
        message_id: Option<&str>,
    ) {
        crate::metrics::message_refused(kind, error.code.as_str());
        self.send_json(ctx, &protocol::error_frame(error, message_id));
    }

    pub(super) fn on_message(
        &mut self,
        ctx: &mut Context<Self>,
        mut frame: MessageFrame<'_>,
        out: &mut Batches,
    ) {
        let RegistrationState::Registered(agent_id) = &self.state else {
            let error = ProtocolError::new(
                ErrorCode::NotRegistered,
                "Register with register_agent before sending messages",
            );
            return self.refuse_message(ctx, "unknown", &error, None);
        };
        let agent_id = agent_id.clone();
        let kind = match frame.kind() {
            Ok(kind) => kind,
            Err(error) => return self.invalid_frame(ctx, error.0),
        };
        let message_id = frame.stamp(&agent_id);
        if let MessageKind::Broadcast(exclude) = &kind {
            let limits = &self.settings.limits;
            let (max_exclusions, per_second, close_after) = (
                limits.max_broadcast_exclusions,
                limits.max_broadcast_copies_per_second,
                limits.request_burst.max(1),
            );
            if exclude.len() > max_exclusions {
                let error = ProtocolError::new(
                    ErrorCode::TooManyExclusions,
                    format!(
                        "exclude_agent_ids lists {} ids; the limit is {max_exclusions} \
                         (limits.max_broadcast_exclusions)",
                        exclude.len()
                    ),
                );
                return self.refuse_message(ctx, "broadcast", &error, Some(&message_id));
            }
            if !self.broadcast_allowed() {
                // An agent that ignores the refusals is closed as one that ignores the
                // request budget's: after as many in a row.
                self.broadcasts_limited_in_row += 1;
                if self.broadcasts_limited_in_row >= close_after {
                    crate::metrics::message_refused("broadcast", ErrorCode::RateLimited.as_str());
                    return self.close(ctx, Disconnect::POLICY_VIOLATION, true);
                }
                let error = ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "Broadcasts from this connection are past {per_second} copies a second \
                         on this node, one per recipient (limits.max_broadcast_copies_per_second, \
                         broadcast_copy_burst at once); nothing was sent: slow down ({close_after} \
                         refused in a row close the connection, limits.request_burst)"
                    ),
                );
                return self.refuse_message(ctx, "broadcast", &error, Some(&message_id));
            }
            self.broadcasts_limited_in_row = 0;
        }
        if kind == MessageKind::Mod {
            let error = ErrorCode::UnsupportedMod.into();
            return self.refuse_message(ctx, "mod", &error, Some(&message_id));
        }
        let text = frame.to_text();
        let encoded = OutFrame::text(&text);
        let routed = self
            .routes
            .route(self.session_id, &agent_id, &kind, encoded, out);
        crate::metrics::message_routed(&kind, &routed);
        if let (Some(cluster), Some(direct)) = (&self.settings.cluster, &self.settings.direct) {
            match (routed, &kind) {
                (Routed::UnknownTarget, MessageKind::Direct(target)) => {
                    return direct.forward(Forward {
                        target: target.clone(),
                        frame: text,
                        sender_id: agent_id.to_string(),
                        message_id,
                    });
                }
                (Routed::Sent(_), MessageKind::Broadcast(exclude)) => {
                    let mut exclude = exclude.clone();
                    exclude.push(agent_id.to_string());
                    return cluster.do_send(Spread {
                        exclude,
                        frame: text,
                    });
                }
                _ => {}
            }
        }
        if let (Routed::UnknownTarget, MessageKind::Direct(target)) = (routed, &kind) {
            let error = ProtocolError::new(
                ErrorCode::UnknownAgent,
                format!("Agent {target} is not connected"),
            );
            self.send_json(ctx, &protocol::error_frame(&error, Some(&message_id)));
        }
    }
}
