//! Counters and histograms recorded where things happen, through the `metrics` facade
//! (the binary installs the Prometheus recorder before any actor starts; without a
//! recorder, as in unit tests, they cost a branch). What `/stats` already counts
//! (agents, registrations, disconnections, publishers) is not recorded here: the
//! `/metrics` handler reads those snapshots when scraped. Labels are of bounded
//! cardinality: never an agent id.

use crate::disconnect::Disconnect;
use crate::protocol::MessageKind;
use crate::routes::Routed;
use metrics::{counter, histogram, Counter};
use std::sync::OnceLock;

/// Ping round trips, in seconds (histogram).
pub const PING_ROUND_TRIP: &str = "tether_ping_round_trip_seconds";
/// Messages routed, by `kind` and `result` (counter).
pub const MESSAGES_ROUTED: &str = "tether_messages_routed_total";
/// Frames refused, by `reason` (counter).
pub const FRAMES_REJECTED: &str = "tether_frames_rejected_total";
/// Connections closed by the server, by `reason` and close `code` (counter).
pub const CONNECTIONS_CLOSED: &str = "tether_connections_closed_total";
/// Connections cut off for not reading what they were sent (counter).
pub const SLOW_CONSUMER_CUTOFFS: &str = "tether_slow_consumer_cutoffs_total";
/// Refused registrations, by `error_code` (counter).
pub const REGISTRATIONS_REFUSED: &str = "tether_registrations_refused_total";

/// Times this node lost its cluster lease and closed its agents (counter).
pub const CLUSTER_LEASES_LOST: &str = "tether_cluster_leases_lost_total";
/// Incarnations of lost nodes' agents this node ended as their reaper (counter).
pub const CLUSTER_NODE_LOST_AGENTS: &str = "tether_cluster_node_lost_agents_total";
/// Messages this node sent through Redis to agents of other nodes, by `kind` (counter).
pub const CLUSTER_MESSAGES_FORWARDED: &str = "tether_cluster_messages_forwarded_total";
/// Times this node re-asserted its lease and claims after Redis lost them (counter).
pub const CLUSTER_REASSERTS: &str = "tether_cluster_reasserts_total";
/// Direct messages from or for other nodes that were dropped, by `reason` (counter).
pub const CLUSTER_MESSAGES_DROPPED: &str = "tether_cluster_messages_dropped_total";

/// Instructions that reached a state, by `state` (`pending` counts creations) (counter).
pub const INSTRUCTIONS: &str = "tether_instructions_total";

/// How long incarnations stayed registered, in seconds (histogram).
pub const CONNECTION_DURATION: &str = "tether_connection_duration_seconds";
/// Buckets of [`CONNECTION_DURATION`], in seconds: 1 s to 1 day.
pub const CONNECTION_DURATION_BUCKETS: [f64; 10] = [
    1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0,
];

/// Buckets of [`PING_ROUND_TRIP`], in seconds: 100 µs to 10 s.
pub const PING_ROUND_TRIP_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A ping answered after `rtt_us` microseconds.
pub fn ping_answered(rtt_us: u64) {
    histogram!(PING_ROUND_TRIP).record(rtt_us as f64 / 1e6);
}

/// Kinds and results of [`MESSAGES_ROUTED`] as routed (index order of [`routed`]).
const ROUTED_KINDS: [&str; 3] = ["direct", "broadcast", "mod"];
const ROUTED_RESULTS: [&str; 3] = ["delivered", "unknown_target", "sender_gone"];

/// The [`MESSAGES_ROUTED`] counters of routed messages, looked up once: routing is
/// the hot path, and a macro call hashes its name and labels each time. (Taken after
/// the recorder is installed, which the binary does before any actor starts.)
fn routed() -> &'static [[Counter; 3]; 3] {
    static COUNTERS: OnceLock<[[Counter; 3]; 3]> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        ROUTED_KINDS.map(|kind| {
            ROUTED_RESULTS
                .map(|result| counter!(MESSAGES_ROUTED, "kind" => kind, "result" => result))
        })
    })
}

/// A message of `kind` was routed with `routed` as its outcome.
pub fn message_routed(kind: &MessageKind, outcome: &Routed) {
    let kind = match kind {
        MessageKind::Direct(_) => 0,
        MessageKind::Broadcast(_) => 1,
        MessageKind::Mod => 2,
    };
    let (result, copies) = match outcome {
        Routed::Sent(n) => (0, *n as u64),
        Routed::UnknownTarget => (1, 1),
        Routed::SenderGone => (2, 1),
    };
    routed()[kind][result].increment(copies);
}

/// A message of `kind` (`direct`, `broadcast`, `mod` or `unknown`) refused before
/// routing with the error code `reason`.
pub fn message_refused(kind: &'static str, reason: &'static str) {
    counter!(MESSAGES_ROUTED, "kind" => kind, "result" => reason).increment(1);
}

/// A frame refused for `reason` (an error code or a close reason).
pub fn frame_rejected(reason: &'static str) {
    counter!(FRAMES_REJECTED, "reason" => reason).increment(1);
}

/// The server closed a connection with `disconnect`.
pub fn connection_closed(disconnect: Disconnect) {
    let reason = disconnect.reason.as_str();
    counter!(CONNECTIONS_CLOSED, "reason" => reason, "code" => close_code_label(disconnect.code))
        .increment(1);
    if disconnect == Disconnect::SLOW_CONSUMER {
        counter!(SLOW_CONSUMER_CUTOFFS).increment(1);
    }
    match disconnect.code {
        1002 => frame_rejected("bad_framing"),
        1003 => frame_rejected("unsupported_data"),
        1007 => frame_rejected("invalid_utf8"),
        1009 => frame_rejected("message_too_big"),
        _ => {}
    }
}

/// An incarnation ended after `connected_secs` registered.
pub fn incarnation_ended(connected_secs: f64) {
    histogram!(CONNECTION_DURATION).record(connected_secs);
}

/// A registration refused with `error_code`.
pub fn registration_refused(error_code: &'static str) {
    counter!(REGISTRATIONS_REFUSED, "error_code" => error_code).increment(1);
}

/// Close codes as label values without allocating (the codes the server sends).
fn close_code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1011 => "1011",
        1013 => "1013",
        4001 => "4001",
        4002 => "4002",
        4003 => "4003",
        4008 => "4008",
        4009 => "4009",
        _ => "other",
    }
}

/// This node lost its cluster lease.
pub fn cluster_fenced() {
    counter!(CLUSTER_LEASES_LOST).increment(1);
}

/// This node re-asserted its lease and claims after Redis lost them.
pub fn cluster_reasserted() {
    counter!(CLUSTER_REASSERTS).increment(1);
}

/// This node ended an incarnation of a lost node's agent.
pub fn node_lost_agent() {
    counter!(CLUSTER_NODE_LOST_AGENTS).increment(1);
}

/// `count` direct messages that crossed nodes were dropped for `reason`
/// (`takeover_failed`, `cluster_unavailable`, `sender_gone`).
pub fn cluster_messages_dropped(reason: &'static str, count: usize) {
    counter!(CLUSTER_MESSAGES_DROPPED, "reason" => reason).increment(count as u64);
}

/// A message of `kind` (`direct`, `broadcast`) went through Redis to other nodes.
pub fn cross_node_message(kind: &'static str) {
    counter!(CLUSTER_MESSAGES_FORWARDED, "kind" => kind).increment(1);
}

/// An instruction reached `state` (`pending`: it was created).
pub fn instruction_event(state: &'static str) {
    counter!(INSTRUCTIONS, "state" => state).increment(1);
}
