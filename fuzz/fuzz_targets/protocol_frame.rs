//! Fuzzes the agent protocol parser: arbitrary UTF-8 text, as the frame reader hands it
//! over, through `tether_actors::protocol::parse_frame` and what the connection does next
//! with each kind of frame.
//!
//! - `Inbound::Message`: `kind()`, then `stamp("fuzzer")`; the forwarded text must be
//!   the frame as a tree with exactly the server's stamps (`data.sender_id == "fuzzer"`, a
//!   top-level `sender_id` overwritten if present, a non-empty `message_id` equal to the
//!   one returned, a non-null `timestamp`), and must parse again as a message of the same
//!   kind.
//! - `Inbound::Request`: `command.name()` (never empty) and `allowed_unregistered()`; a
//!   registration or claim that parsed carries a valid agent id (and an object as
//!   metadata).
//! - `Inbound::InstructionAck`: the instruction id is 1–128 bytes and a `result`, when
//!   given, is JSON text that parses again.
//!
//! No input may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_actors::protocol::command::{Claim, Registration};
use serde_json::Value;
use tether_actors::protocol::{self, valid_agent_id, Command, Inbound};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(inbound) = protocol::parse_frame(text) else {
        return;
    };
    match inbound {
        Inbound::Message(mut frame) => {
            let kind = frame.kind();
            let id = frame.stamp("fuzzer");
            let again = frame.to_text();
            let forwarded: Value = serde_json::from_str(&again)
                .unwrap_or_else(|e| panic!("a stamped message is not JSON ({e}): {again}"));
            let data = forwarded["data"]
                .as_object()
                .expect("a message has a data object");
            assert_eq!(data["sender_id"], "fuzzer");
            assert!(!id.is_empty());
            assert_eq!(data["message_id"].as_str(), Some(id.as_str()));
            assert!(!data["timestamp"].is_null());

            // The tree of what was sent, stamped the same way, is what was forwarded.
            let mut sent: Value = serde_json::from_str(text).expect("a message is JSON");
            if let Some(forged) = sent.get_mut("sender_id") {
                *forged = Value::from("fuzzer");
            }
            let sent_data = sent["data"].as_object_mut().expect("a data object");
            sent_data.insert("sender_id".into(), Value::from("fuzzer"));
            // Filled in only when missing: a given id or time is kept.
            if sent_data.get("message_id").and_then(Value::as_str).is_none_or(str::is_empty) {
                sent_data.insert("message_id".into(), data["message_id"].clone());
            }
            if sent_data.get("timestamp").is_none_or(Value::is_null) {
                sent_data.insert("timestamp".into(), data["timestamp"].clone());
            }
            assert_eq!(forwarded, sent, "{text} was forwarded as {again}");

            let Ok(Inbound::Message(reparsed)) = protocol::parse_frame(&again) else {
                panic!("a stamped message does not parse again: {again}");
            };
            assert_eq!(reparsed.kind(), kind);
        }
        Inbound::Request(request) => {
            let name = request.command.name();
            assert!(!name.is_empty());
            let _ = request.command.allowed_unregistered();
            match &request.command {
                Command::RegisterAgent(Ok(Registration {
                    agent_id, metadata, ..
                })) => {
                    assert!(valid_agent_id(agent_id));
                    assert!(metadata.is_object());
                }
                Command::ClaimAgentId(Ok(Claim { agent_id, .. })) => {
                    assert!(valid_agent_id(agent_id));
                }
                _ => {}
            }
        }
        Inbound::InstructionAck(ack) => {
            assert!(!ack.instruction_id.is_empty() && ack.instruction_id.len() <= 128);
            if let Some(result) = &ack.result {
                serde_json::from_str::<serde_json::Value>(result)
                    .unwrap_or_else(|e| panic!("an ack's result is not JSON ({e}): {result}"));
            }
        }
        Inbound::PingAnswer { .. } | Inbound::OtherResponse => {}
    }
});
