//! The wire protocol as an agent speaks it: builders for every frame an agent sends,
//! and [`parse`], which turns each frame the server sends into one [`Incoming`] value.
//!
//! [`Agent`](crate::Agent) is built on these; they are public for programs that drive
//! many raw sockets themselves (Tether's benchmark harness does).

use crate::error::ErrorCode;
use crate::event::{AckStatus, Instruction, Message, MessageKind, Notification, ServerError};
use serde_json::{json, Map, Value};

/// `register_agent`. `certificate` and `force_reconnect` ask for a takeover of an id
/// held by a live connection; `request_id` is echoed in the answer.
pub fn register(
    agent_id: &str,
    metadata: &Value,
    certificate: Option<&Value>,
    force_reconnect: bool,
    request_id: Option<&str>,
) -> String {
    let mut frame = json!({
        "type": "system_request", "command": "register_agent",
        "agent_id": agent_id, "metadata": metadata,
    });
    if let Some(certificate) = certificate {
        frame["certificate"] = certificate.clone();
    }
    if force_reconnect {
        frame["force_reconnect"] = true.into();
    }
    if let Some(request_id) = request_id {
        frame["request_id"] = request_id.into();
    }
    frame.to_string()
}

/// Any other system request: `command` with the fields of `fields` (an object) at the
/// top level, and `request_id`.
pub fn request(command: &str, request_id: &str, fields: Map<String, Value>) -> String {
    let mut frame = fields;
    frame.insert("type".into(), "system_request".into());
    frame.insert("command".into(), command.into());
    frame.insert("request_id".into(), request_id.into());
    Value::Object(frame).to_string()
}

/// `claim_agent_id` for the agent's own id: its certificate, or a renewal of it
/// once registered (the holder's claim needs no `force`).
pub fn claim(agent_id: &str, request_id: &str) -> String {
    let mut fields = Map::new();
    fields.insert("agent_id".into(), agent_id.into());
    request("claim_agent_id", request_id, fields)
}

/// Seconds since the Unix epoch, as the protocol's timestamps count them.
pub(crate) fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The answer to the server's `ping_agent`, echoing its `timestamp`.
pub fn pong(timestamp: f64) -> String {
    format!(
        r#"{{"type":"system_response","command":"ping_agent","success":true,"timestamp":{}}}"#,
        Value::from(timestamp)
    )
}

/// A direct message to `target` with `content`.
pub fn direct(target: &str, content: &Value, message_id: &str) -> String {
    json!({"type": "message", "data": {
        "message_type": "direct_message", "target_agent_id": target,
        "content": content, "message_id": message_id,
    }})
    .to_string()
}

/// A broadcast with `content` to every agent but the sender and `exclude`.
pub fn broadcast(content: &Value, exclude: &[String], message_id: &str) -> String {
    let mut data = json!({
        "message_type": "broadcast_message", "content": content, "message_id": message_id,
    });
    if !exclude.is_empty() {
        data["exclude_agent_ids"] = exclude.into();
    }
    json!({"type": "message", "data": data}).to_string()
}

/// `instruction_ack` of `instruction_id` with `status` and an optional `result`.
pub fn ack(instruction_id: &str, status: AckStatus, result: Option<&Value>) -> String {
    let mut frame = json!({
        "type": "instruction_ack", "instruction_id": instruction_id, "status": status.as_str(),
    });
    if let Some(result) = result {
        frame["result"] = result.clone();
    }
    frame.to_string()
}

/// A frame from the server, by what it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The server's `ping_agent`: answer with [`pong`].
    Ping {
        /// To echo.
        timestamp: f64,
    },
    /// A `system_response` to one of the agent's requests.
    Response {
        /// Its `command`.
        command: String,
        /// Its `request_id`, echoed from the request.
        request_id: Option<String>,
        /// The whole frame.
        frame: Value,
    },
    /// A message from another agent.
    Message(Message),
    /// A `system_notification`.
    Notification(Notification),
    /// An instruction.
    Instruction(Instruction),
    /// An `error` frame.
    Error(ServerError),
    /// Anything else (a later protocol version's frame), whole.
    Other(Value),
}

/// Reads one text frame of the server.
pub fn parse(text: &str) -> Result<Incoming, serde_json::Error> {
    let frame: Value = serde_json::from_str(text)?;
    let string = |value: &Value, key: &str| value[key].as_str().map(str::to_owned);
    Ok(match frame["type"].as_str().unwrap_or_default() {
        "system_request" if frame["command"] == "ping_agent" => Incoming::Ping {
            timestamp: frame["timestamp"].as_f64().unwrap_or(0.0),
        },
        "system_response" => Incoming::Response {
            command: string(&frame, "command").unwrap_or_default(),
            request_id: string(&frame, "request_id"),
            frame,
        },
        "message" => {
            let data = frame.get("data").cloned().unwrap_or(Value::Null);
            Incoming::Message(Message {
                message_id: string(&data, "message_id").unwrap_or_default(),
                sender_id: string(&data, "sender_id").unwrap_or_default(),
                kind: match data["message_type"].as_str().unwrap_or_default() {
                    "direct_message" => MessageKind::Direct,
                    "broadcast_message" => MessageKind::Broadcast,
                    other => MessageKind::Other(other.to_owned()),
                },
                content: data.get("content").cloned().unwrap_or(Value::Null),
                timestamp: data["timestamp"].as_u64(),
                data,
            })
        }
        "system_notification" => Incoming::Notification(Notification {
            event: string(&frame, "event").unwrap_or_default(),
            message: string(&frame, "message"),
            reconnect_url: string(&frame, "reconnect_url"),
            frame,
        }),
        "instruction" => Incoming::Instruction(Instruction {
            instruction_id: string(&frame, "instruction_id").unwrap_or_default(),
            session_id: string(&frame, "session_id"),
            payload: frame.get("payload").cloned().unwrap_or(Value::Null),
            attempt: frame["attempt"].as_u64().unwrap_or(1).min(u32::MAX as u64) as u32,
            expires_at: string(&frame, "expires_at").unwrap_or_default(),
        }),
        "error" => Incoming::Error(ServerError {
            code: ErrorCode::parse(frame["error_code"].as_str().unwrap_or_default()),
            message: string(&frame, "error").unwrap_or_default(),
            message_id: string(&frame, "message_id"),
            instruction_id: string(&frame, "instruction_id"),
        }),
        _ => Incoming::Other(frame),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_are_answered_with_their_own_timestamp() {
        let ping = r#"{"type":"system_request","command":"ping_agent","timestamp":1795393768.8075876,"agent_id":"a"}"#;
        let Incoming::Ping { timestamp } = parse(ping).unwrap() else {
            panic!("not a ping")
        };
        let pong: Value = serde_json::from_str(&pong(timestamp)).unwrap();
        assert_eq!(pong["timestamp"].as_f64(), Some(1795393768.8075876));
        assert_eq!(pong["command"], "ping_agent");
    }

    #[test]
    fn instructions_and_errors_are_typed() {
        let frame = r#"{"type":"instruction","instruction_id":"i1","session_id":null,"payload":{"x":1},"attempt":2,"expires_at":"2026-12-06T04:53:57.508Z"}"#;
        let Incoming::Instruction(instruction) = parse(frame).unwrap() else {
            panic!("not an instruction")
        };
        assert_eq!(instruction.attempt, 2);
        assert_eq!(instruction.session_id, None);
        let error = r#"{"type":"error","error_code":"instruction_finished","error":"done","instruction_id":"i1"}"#;
        let Incoming::Error(error) = parse(error).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(error.code, ErrorCode::InstructionFinished);
        assert_eq!(error.instruction_id.as_deref(), Some("i1"));
    }

    #[test]
    fn frames_carry_what_the_server_expects() {
        let register: Value = serde_json::from_str(&register(
            "a",
            &json!({"name": "A"}),
            Some(&json!({"agent_id": "a"})),
            false,
            Some("r1"),
        ))
        .unwrap();
        assert_eq!(register["certificate"]["agent_id"], "a");
        assert!(register.get("force_reconnect").is_none());
        let broadcast: Value =
            serde_json::from_str(&broadcast(&json!("hi"), &["b".into()], "m1")).unwrap();
        assert_eq!(broadcast["data"]["exclude_agent_ids"], json!(["b"]));
        let ack: Value =
            serde_json::from_str(&ack("i1", AckStatus::Rejected, Some(&json!(1)))).unwrap();
        assert_eq!(ack["status"], "rejected");
        assert_eq!(ack["result"], 1);
    }
}
