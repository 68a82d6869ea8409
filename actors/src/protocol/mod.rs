//! The agent wire protocol (PROTOCOL.md §1–7): parsing incoming frames into typed
//! messages and building the frames the server sends.
//!
//! Frames are JSON objects. System requests are parsed once into a [`Command`]
//! ([`command`]); error codes are [`ErrorCode`] values ([`error`]). Messages between
//! agents are read shallowly ([`message`]) so that every field a client sends, known or
//! not, is forwarded as sent.

pub mod command;
pub mod error;
pub mod message;
mod reserved;

pub use command::{valid_agent_id, Command, Request};
pub use error::{ErrorCode, ProtocolError};
pub use message::MessageFrame;

use serde_json::{json, Map, Value};

/// A frame received from an agent, parsed; a message borrows from the frame's text.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// `{"type":"system_request","command":...}`.
    Request(Request),
    /// `{"type":"system_response","command":"ping_agent",...}`: an answer to our ping.
    PingAnswer {
        /// The ping's `timestamp` the agent echoed (epoch seconds), if it did.
        timestamp: Option<f64>,
    },
    /// Another `system_response` (ignored, but a sign of life).
    OtherResponse,
    /// `{"type":"message","data":{...}}`, read for forwarding.
    Message(MessageFrame<'a>),
    /// `{"type":"instruction_ack","instruction_id":...,"status":...,"result":...}`.
    InstructionAck(InstructionAck),
}

/// An agent's answer to an instruction (PROTOCOL.md §11).
#[derive(Debug, Clone, PartialEq)]
pub struct InstructionAck {
    /// The instruction answered.
    pub instruction_id: String,
    /// How it ended.
    pub status: AckStatus,
    /// The agent's `result` (JSON text), if it gave one.
    pub result: Option<String>,
}

/// The `status` of an `instruction_ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// The work is done.
    Done,
    /// The agent tried and failed.
    Failed,
    /// The agent will not do it.
    Rejected,
}

impl InstructionAck {
    fn parse(fields: &mut Map<String, Value>) -> Result<Self, FrameError> {
        let instruction_id = match fields.remove("instruction_id") {
            Some(Value::String(id)) if !id.is_empty() && id.len() <= 128 => id,
            _ => {
                return Err(FrameError(
                    "instruction_ack has no `instruction_id` string (1-128 characters)".into(),
                ))
            }
        };
        let status = match fields.get("status").and_then(Value::as_str) {
            Some("done") => AckStatus::Done,
            Some("failed") => AckStatus::Failed,
            Some("rejected") => AckStatus::Rejected,
            _ => {
                return Err(FrameError(
                    "instruction_ack `status` must be \"done\", \"failed\" or \"rejected\"".into(),
                ))
            }
        };
        let result = match fields.remove("result") {
            None | Some(Value::Null) => None,
            Some(result) => Some(result.to_string()),
        };
        Ok(Self {
            instruction_id,
            status,
            result,
        })
    }
}

/// Why a text frame could not be understood (sent back as `invalid_frame`).
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

/// A `system_response`'s routing fields, read without building the frame's tree.
#[derive(serde::Deserialize)]
struct ResponseFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    command: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    timestamp: Option<Value>,
}

/// Responses longer than this are parsed the general way.
const SHORT_RESPONSE: usize = 1024;

/// The most frequent frame, a ping answer (one per agent and interval), recognised
/// without a tree of the frame: `None` when the frame is anything else or not
/// well-formed, which the general parse then handles (and explains).
fn parse_response(text: &str) -> Option<Inbound<'_>> {
    if text.len() > SHORT_RESPONSE || !text.contains("system_response") {
        return None;
    }
    // Duplicate keys make this fail; the general parse then applies last-wins.
    let fields: ResponseFields = serde_json::from_str(text).ok()?;
    if fields.kind != "system_response" {
        return None;
    }
    Some(if fields.command.as_deref() == Some("ping_agent") {
        Inbound::PingAnswer {
            timestamp: fields.timestamp.as_ref().and_then(Value::as_f64),
        }
    } else {
        Inbound::OtherResponse
    })
}

/// Parses one text frame.
pub fn parse_frame(text: &str) -> Result<Inbound<'_>, FrameError> {
    if let Some(response) = parse_response(text) {
        return Ok(response);
    }
    if let Some(message) = MessageFrame::read(text) {
        return Ok(Inbound::Message(message));
    }
    // Everything else is read as a tree: requests and acknowledgements are few, and a
    // message that reached this point is refused with the reason found here.
    // Before the tree: serde_json would turn an object with this key into something else.
    if reserved::has_reserved_key(text) {
        return Err(FrameError(format!(
            "object key `{}` is reserved by the server's JSON library; rename it",
            reserved::RESERVED_KEY
        )));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError(format!("frame is not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(FrameError("frame is not a JSON object".into()));
    };
    let kind = match fields.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(FrameError("field `type` is not a string".into())),
        None => return Err(FrameError("frame has no `type` field".into())),
    };
    match kind {
        "system_request" => {
            let name = match fields.remove("command") {
                Some(Value::String(name)) if !name.is_empty() => name,
                _ => return Err(FrameError("system_request has no `command` string".into())),
            };
            let request_id = fields.remove("request_id");
            let command = Command::parse(&name, &mut fields);
            Ok(Inbound::Request(Request {
                command,
                request_id,
            }))
        }
        "system_response" => {
            if fields.get("command").and_then(Value::as_str) == Some("ping_agent") {
                Ok(Inbound::PingAnswer {
                    timestamp: fields.get("timestamp").and_then(Value::as_f64),
                })
            } else {
                Ok(Inbound::OtherResponse)
            }
        }
        // A well-formed message was read by `MessageFrame::read`.
        "message" => Err(FrameError("message has no `data` object".into())),
        "instruction_ack" => Ok(Inbound::InstructionAck(InstructionAck::parse(&mut fields)?)),
        other => Err(FrameError(format!("unknown frame type `{other}`"))),
    }
}

/// The kind of an agent-to-agent message, from `data.message_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKind {
    /// To `data.target_agent_id`.
    Direct(String),
    /// To every registered agent but the sender and `data.exclude_agent_ids`.
    Broadcast(Vec<String>),
    /// To a mod (none are loaded): `mod_message`, or `protocol_message` from
    /// OpenAgents 0.5.x clients.
    Mod,
}

/// A successful answer to `command`, with `extra` fields merged in.
pub fn response_ok(command: &str, request_id: Option<&Value>, extra: Value) -> Value {
    let mut frame = json!({"type": "system_response", "command": command, "success": true});
    merge(&mut frame, extra);
    echo_request_id(&mut frame, request_id);
    frame
}

/// A failed answer to `command`, in the OpenAgents shape plus `error_code`.
pub fn response_error(command: &str, request_id: Option<&Value>, error: &ProtocolError) -> Value {
    let mut frame = json!({
        "type": "system_response", "command": command, "success": false,
        "error": error.message, "error_code": error.code.as_str(),
    });
    echo_request_id(&mut frame, request_id);
    frame
}

/// An `error` frame (for invalid frames and undeliverable messages).
pub fn error_frame(error: &ProtocolError, message_id: Option<&str>) -> Value {
    let mut frame =
        json!({"type": "error", "error_code": error.code.as_str(), "error": error.message});
    if let Some(id) = message_id {
        frame["message_id"] = Value::String(id.to_owned());
    }
    frame
}

/// Writes the server's heartbeat ping to `agent_id`, stamped `now` (float epoch
/// seconds), into `frame`, replacing what it held: the heartbeat reuses one buffer for
/// a tick's pings.
pub fn write_ping_frame(frame: &mut Vec<u8>, agent_id: &str, now: f64) {
    use std::io::Write as _;
    frame.clear();
    frame.extend_from_slice(br#"{"type":"system_request","command":"ping_agent","agent_id":"#);
    // Writing into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *frame, agent_id);
    let _ = write!(frame, r#","timestamp":{now}}}"#);
}

/// A `system_notification` with `event` and a human message.
pub fn notification(event: &str, agent_id: Option<&str>, message: &str) -> Value {
    let mut frame = json!({"type": "system_notification", "event": event, "message": message});
    if let Some(id) = agent_id {
        frame["agent_id"] = Value::String(id.to_owned());
    }
    frame
}

fn merge(frame: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (frame, extra) {
        target.extend(extra);
    }
}

fn echo_request_id(frame: &mut Value, request_id: Option<&Value>) {
    if let Some(id) = request_id {
        frame["request_id"] = id.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_answers_read_without_a_tree_mean_what_the_general_parse_says() {
        let frames = [
            r#"{"type":"system_response","command":"ping_agent","timestamp":12.5}"#,
            r#"{"type":"system_response","command":"ping_agent","timestamp":"x","data":{"a":[1,2]}}"#,
            r#"{"type":"system_response","command":"ping_agent"}"#,
            r#"{"type":"system_response","command":"list_agents","success":true}"#,
            r#"{"type":"system_response","command":7}"#,
            r#"{"type":"system_response","command":"ping_agent","command":"other"}"#,
            r#"{"type":"system_response","command":"ping_agent","timestamp":null}"#,
            r#"{"type":"message","data":{"text":"system_response ping_agent"}}"#,
            r#"{"type":"system_response","command":"ping_agent""#,
        ];
        for frame in frames {
            let padded = without_fast_path(frame);
            let general = parse_frame(&padded);
            match parse_response(frame) {
                Some(fast) => assert_eq!(
                    format!("{:?}", Ok::<_, FrameError>(fast)),
                    format!("{general:?}"),
                    "{frame}"
                ),
                None => assert!(
                    !matches!(general, Ok(Inbound::PingAnswer { .. }))
                        || frame.contains(r#""command":"ping_agent","command""#),
                    "{frame} is a ping answer the fast path missed"
                ),
            }
        }
        assert!(matches!(
            parse_frame(frames[0]),
            Ok(Inbound::PingAnswer {
                timestamp: Some(t)
            }) if t == 12.5
        ));
    }

    /// `text`, made too long for `parse_frame`'s fast path.
    fn without_fast_path(text: &str) -> String {
        format!("{text}{}", " ".repeat(SHORT_RESPONSE))
    }

    #[test]
    fn rejects_frames_that_are_not_objects_or_have_no_known_type() {
        assert!(parse_frame("not json").is_err());
        assert!(parse_frame("[1]").is_err());
        assert!(parse_frame(r#"{"type":"bogus"}"#).is_err());
        assert!(parse_frame(r#"{"command":"x"}"#).is_err());
        assert!(matches!(
            parse_frame(r#"{"type":"system_response","command":"ping_agent"}"#),
            Ok(Inbound::PingAnswer { timestamp: None })
        ));
    }

    #[test]
    fn a_message_with_serde_jsons_reserved_key_is_refused_not_altered() {
        // Found by `cargo fuzz run protocol_frame`: the stamped frame did not parse again.
        let found = include_str!("../../../fuzz/found/protocol_frame-rawvalue-key.json");
        let first_key = r#"{"type":"message","data":{"$serde_json::private::RawValue":"[1]"}}"#;
        for text in [found, first_key] {
            let Err(FrameError(reason)) = parse_frame(text) else {
                panic!("accepted a frame with the reserved key: {text}");
            };
            assert!(reason.contains("is reserved"), "{reason}");
        }
    }

    #[test]
    fn protocol_messages_of_openagents_0_5_are_mod_messages() {
        for kind in ["mod_message", "protocol_message"] {
            let text = format!(r#"{{"type":"message","data":{{"message_type":"{kind}"}}}}"#);
            let Ok(Inbound::Message(frame)) = parse_frame(&text) else {
                panic!("not a message")
            };
            assert_eq!(frame.kind(), Ok(MessageKind::Mod));
        }
    }

    #[test]
    fn a_ping_is_the_protocol_ping() {
        let mut text = Vec::new();
        write_ping_frame(&mut text, "al\"ice", crate::clock::epoch_secs());
        let ping: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(ping["type"], "system_request");
        assert_eq!(ping["command"], "ping_agent");
        assert_eq!(ping["agent_id"], "al\"ice");
        assert!(ping["timestamp"].as_f64().unwrap() > 1.7e9);
    }
}
