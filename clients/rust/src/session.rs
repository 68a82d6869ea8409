//! One registered connection at work: answers pings, writes what the application
//! sends, hands it what the server sends, and notices when the connection is dead.

use crate::agent::Runner;
use crate::config::Keepalive;
use crate::connection::{Connection, Read, Ws};
use crate::error::{Error, ErrorCode};
use crate::event::{Disconnect, Event};
use crate::handle::Command;
use crate::instructions::Delivery;
use crate::protocol::{self, Incoming};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The application closed the agent.
    Closed,
    /// Lost: the agent reconnects.
    Lost(Disconnect),
    /// Ended in a way reconnecting cannot mend (replaced, removed, protocol error).
    Stop(Disconnect),
}

/// Who waits for the answer to a request.
enum Waiter {
    /// The application ([`AgentHandle::request`](crate::AgentHandle::request)).
    Application(oneshot::Sender<Value>),
    /// The session's own certificate renewal, sent then.
    Renewal(Instant),
}

/// Requests in flight on this connection, by `request_id`.
type Pending = HashMap<String, Waiter>;

/// The `request_id` of the certificate renewal (at most one is in flight).
const RENEWAL: &str = "renew";

/// Writes one frame. A write the server has not taken within `limit` (its receive
/// window and our send buffer full) is a lost connection: while it waits, nothing
/// is read and no keepalive runs.
async fn write(ws: &mut Ws, frame: String, limit: Duration) -> Result<(), End> {
    match tokio::time::timeout(limit, ws.send(WsMessage::text(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(lost(None, error.to_string())),
        Err(_) => Err(lost(
            None,
            format!("a write waited {limit:?} for the server to take it: the connection is stuck"),
        )),
    }
}

/// Serves `connection` until it ends.
pub(crate) async fn serve(runner: &mut Runner, connection: Connection) -> End {
    let Connection {
        mut ws,
        registration,
        early,
    } = connection;
    let keepalive = runner.config.keepalive.unwrap_or(Keepalive {
        idle: registration.heartbeat_interval + registration.ping_timeout,
        timeout: registration.ping_timeout,
    });
    // As long as the silence that makes the keepalive give up.
    let write_limit = keepalive.idle + keepalive.timeout;
    let mut pending = Pending::new();
    for incoming in early {
        if let Err(end) = handle(runner, &mut ws, incoming, &mut pending, write_limit).await {
            return end;
        }
    }
    let step = (keepalive.idle.min(keepalive.timeout) / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut probe: Option<Instant> = None;
    let mut next_renewal = Instant::now();
    loop {
        tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                probe = None;
                let text = match Read::from(frame) {
                    Read::Text(text) => text,
                    Read::Nothing => continue,
                    Read::Closed(code, reason) => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        return ended_by_server(code, reason);
                    }
                    Read::Lost(why) => return lost(None, why),
                };
                match protocol::parse(text.as_str()) {
                    Ok(incoming) => {
                        if let Err(end) =
                            handle(runner, &mut ws, incoming, &mut pending, write_limit).await
                        {
                            return end;
                        }
                    }
                    Err(error) => log::warn!("unreadable frame from the server ({error}): {text}"),
                }
            }
            command = runner.commands.recv() => {
                let Some(command) = command else {
                    close(&mut ws).await;
                    return End::Closed;
                };
                let frame = runner.frame_of(command, &mut pending);
                if let Err(end) = write(&mut ws, frame, write_limit).await {
                    return end;
                }
            }
            _ = tick.tick() => {
                if let Some(sent) = probe {
                    if sent.elapsed() >= keepalive.timeout {
                        return lost(None, format!(
                            "nothing from the server for {:?}: the connection is dead",
                            last_heard.elapsed()
                        ));
                    }
                } else if last_heard.elapsed() >= keepalive.idle {
                    let mut fields = Map::new();
                    fields.insert("timestamp".into(), protocol::epoch_secs().into());
                    let frame = protocol::request("ping_agent", "keepalive", fields);
                    if let Err(end) = write(&mut ws, frame, write_limit).await {
                        return end;
                    }
                    probe = Some(Instant::now());
                }
                if let Some(frame) = renewal(runner, &mut pending, &mut next_renewal) {
                    if let Err(end) = write(&mut ws, frame, write_limit).await {
                        return end;
                    }
                }
            }
            _ = crate::agent::closing(&mut runner.closing) => {
                // What the application sent before closing goes out first.
                while let Ok(command) = runner.commands.try_recv() {
                    let frame = runner.frame_of(command, &mut pending);
                    if let Err(end) = write(&mut ws, frame, write_limit).await {
                        return end;
                    }
                }
                close(&mut ws).await;
                return End::Closed;
            }
        }
    }
}

/// The `claim_agent_id` that renews the certificate, when one is due: half its life is
/// gone (or the registration could not claim one), `next` has come, and no renewal
/// is in flight. One left unanswered for `request_timeout` is given up (a later answer
/// is ignored: the next renewal replaces what it brought).
fn renewal(runner: &Runner, pending: &mut Pending, next: &mut Instant) -> Option<String> {
    let now = Instant::now();
    if let Some(Waiter::Renewal(sent)) = pending.get(RENEWAL) {
        if now.duration_since(*sent) < runner.config.request_timeout {
            return None;
        }
        log::warn!(
            "{}: no answer to a certificate renewal",
            runner.config.agent_id
        );
        pending.remove(RENEWAL);
    }
    if now < *next || runner.certificates().is_fresh() {
        return None;
    }
    *next = now + runner.certificates().renewal_retry();
    pending.insert(RENEWAL.into(), Waiter::Renewal(now));
    Some(protocol::claim(&runner.config.agent_id, RENEWAL))
}

impl Runner {
    /// The frame of an application command (an acknowledgement is remembered for
    /// redeliveries, a request's answer awaited in `pending`).
    fn frame_of(&mut self, command: Command, pending: &mut Pending) -> String {
        match command {
            Command::Frame(frame) => frame,
            Command::Ack {
                instruction_id,
                frame,
            } => {
                self.ledger.acknowledged(&instruction_id, &frame);
                frame
            }
            Command::Request {
                command,
                fields,
                reply,
            } => {
                self.requests += 1;
                let request_id = format!("r{}", self.requests);
                pending.insert(request_id.clone(), Waiter::Application(reply));
                protocol::request(&command, &request_id, fields)
            }
        }
    }
}

/// Acts on one frame from the server; `Err` ends the connection.
async fn handle(
    runner: &mut Runner,
    ws: &mut Ws,
    incoming: Incoming,
    pending: &mut Pending,
    write_limit: Duration,
) -> Result<(), End> {
    match incoming {
        Incoming::Ping { timestamp } => {
            write(ws, protocol::pong(timestamp), write_limit).await?;
            runner.shared.pings_answered.fetch_add(1, Ordering::Relaxed);
        }
        Incoming::Response {
            request_id, frame, ..
        } => match request_id.and_then(|id| pending.remove(&id)) {
            Some(Waiter::Application(reply)) => {
                let _ = reply.send(frame);
            }
            Some(Waiter::Renewal(_)) => runner.renewed(frame),
            None => {}
        },
        Incoming::Message(message) => {
            runner
                .shared
                .messages_received
                .fetch_add(1, Ordering::Relaxed);
            runner.emit(Event::Message(message)).await;
        }
        Incoming::Notification(notification) => {
            let shutdown = notification.event == "network_shutdown";
            if let Some(url) = notification.reconnect_url.as_ref().filter(|_| shutdown) {
                runner.reconnect_url = Some(url.clone());
            }
            runner.emit(Event::Notification(notification)).await;
            if shutdown {
                // Leave at once (the server waits for its agents to go) and come back
                // on another node, or on this one once it is back.
                close(ws).await;
                return Err(lost(None, "the server is shutting down".into()));
            }
        }
        Incoming::Instruction(instruction) => {
            match runner.ledger.arrived(&instruction.instruction_id) {
                Delivery::New => {
                    runner
                        .shared
                        .instructions_received
                        .fetch_add(1, Ordering::Relaxed);
                    runner.emit(Event::Instruction(instruction)).await;
                }
                Delivery::Held => log::debug!(
                    "instruction {} delivered again (attempt {}) while the application holds it",
                    instruction.instruction_id,
                    instruction.attempt
                ),
                Delivery::Acknowledged(frame) => {
                    log::debug!(
                        "instruction {} delivered again (attempt {}): acknowledging it again",
                        instruction.instruction_id,
                        instruction.attempt
                    );
                    write(ws, frame, write_limit).await?;
                }
            }
        }
        Incoming::Error(error) => {
            let expected = error.code == ErrorCode::InstructionFinished
                && error
                    .instruction_id
                    .as_deref()
                    .is_some_and(|id| runner.ledger.answers_resent_ack(id));
            if !expected {
                runner.emit(Event::Error(error)).await;
            }
        }
        Incoming::Other(frame) => log::debug!("frame of an unknown type ignored: {frame}"),
    }
    Ok(())
}

/// Sends a normal close and waits (briefly) for the server to end the connection.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// What a close frame from the server means for the agent.
fn ended_by_server(code: Option<u16>, reason: String) -> End {
    let why = |what: &str| {
        let mut text = what.to_owned();
        if !reason.is_empty() {
            text.push_str(": ");
            text.push_str(&reason);
        }
        text
    };
    let stop = |what: &str| {
        End::Stop(Disconnect {
            close_code: code,
            reason: why(what),
            reconnecting: false,
        })
    };
    match code {
        Some(4001) => stop("replaced: another connection took this agent id"),
        Some(1000) => stop("closed by the server"),
        Some(1002 | 1003 | 1007 | 1008 | 1009 | 1010) => stop("closed for a protocol error"),
        Some(code) => lost(Some(code), why(&format!("closed by the server ({code})"))),
        None => lost(None, why("closed by the server")),
    }
}

fn lost(close_code: Option<u16>, reason: String) -> End {
    End::Lost(Disconnect {
        close_code,
        reason,
        reconnecting: true,
    })
}

/// The error a request gets when its connection ended before the answer.
pub(crate) fn unanswered() -> Error {
    Error::ConnectionLost("the connection ended before the answer came; retry".into())
}
