//! Fuzzes the agent protocol parser: arbitrary UTF-8 text, as the frame reader hands it
//! over, through `tether_actors::protocol::parse_frame` and what the connection does next
//! with each kind of frame.
//!
//! - `Inbound::Message`: `message_kind`, then `stamp_message(&mut frame, "fuzzer")`; the
//!   stamped frame must carry `data.sender_id == "fuzzer"`, a non-empty `message_id` equal
//!   to the one returned and a non-null `timestamp`, and must parse again, serialized, as
//!   a message of the same kind.
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
            let kind = protocol::message_kind(&frame);
            let id = protocol::stamp_message(&mut frame, "fuzzer");
            let data = frame["data"]
                .as_object()
                .expect("a message has a data object");
            assert_eq!(data["sender_id"], "fuzzer");
            assert!(!id.is_empty());
            assert_eq!(data["message_id"].as_str(), Some(id.as_str()));
            assert!(!data["timestamp"].is_null());

            let again = serde_json::to_string(&frame).expect("a JSON map serializes");
            let Ok(Inbound::Message(reparsed)) = protocol::parse_frame(&again) else {
                panic!("a stamped message does not parse again: {again}");
            };
            assert_eq!(protocol::message_kind(&reparsed), kind);
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
