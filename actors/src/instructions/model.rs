//! What an instruction and a session are: their states, their stored rows, and how
//! they are shown to the admin API and to agents.

use serde::Serialize;
use serde_json::{json, value::RawValue, Value};
use std::time::{Duration, UNIX_EPOCH};

/// The state of an instruction (PROTOCOL.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for its agent (or for an agent with its capability).
    Pending,
    /// Sent to an agent, not yet acknowledged.
    Delivered,
    /// Acknowledged `done`.
    Done,
    /// Acknowledged `failed`, or not acknowledged after `max_attempts` deliveries.
    Failed,
    /// Acknowledged `rejected`.
    Rejected,
    /// Not finished within its `ttl`.
    Expired,
    /// Cancelled (`DELETE /instructions/{id}`, or its session closed).
    Cancelled,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 7] = [
        State::Pending,
        State::Delivered,
        State::Done,
        State::Failed,
        State::Rejected,
        State::Expired,
        State::Cancelled,
    ];

    /// The state's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == name)
    }

    /// Whether nothing can change it any more.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Delivered)
    }

    /// The CloudEvent type of reaching this state.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Pending => "instruction.created",
            Self::Delivered => "instruction.delivered",
            Self::Done => "instruction.done",
            Self::Failed => "instruction.failed",
            Self::Rejected => "instruction.rejected",
            Self::Expired => "instruction.expired",
            Self::Cancelled => "instruction.cancelled",
        }
    }
}

/// How an instruction given to a capability picks its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The agent with the fewest unacknowledged instructions (the default).
    LeastLoaded,
    /// Each agent in turn.
    RoundRobin,
}

impl Strategy {
    /// The strategy's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastLoaded => "least_loaded",
            Self::RoundRobin => "round_robin",
        }
    }

    /// The strategy named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "least_loaded" => Some(Self::LeastLoaded),
            "round_robin" => Some(Self::RoundRobin),
            _ => None,
        }
    }
}

/// One stored instruction.
#[derive(Debug, Clone)]
pub struct Instruction {
    /// Creation order (per database).
    pub seq: i64,
    /// Its id (a UUID).
    pub id: String,
    /// The agent it is for (or was last given to, when assigned by capability).
    pub agent_id: Option<String>,
    /// The capability it asks for, when not given to one agent.
    pub capability: Option<String>,
    /// How its agent is chosen, with a capability.
    pub strategy: Option<Strategy>,
    /// The session it belongs to.
    pub session_id: Option<String>,
    /// The payload, as the JSON text it was given as.
    pub payload: String,
    /// Where it is in its lifecycle.
    pub state: State,
    /// Deliveries so far.
    pub attempt: i64,
    /// Most deliveries.
    pub max_attempts: i64,
    /// Milliseconds an agent has to acknowledge one delivery.
    pub ack_timeout_ms: i64,
    /// Number of its last change (the `seq` of its last event).
    pub version: i64,
    /// Epoch milliseconds.
    pub created_at_ms: i64,
    /// Epoch milliseconds after which it expires.
    pub expires_at_ms: i64,
    /// Epoch milliseconds of its last delivery.
    pub delivered_at_ms: Option<i64>,
    /// Epoch milliseconds by which its current delivery must be acknowledged.
    pub ack_deadline_ms: Option<i64>,
    /// Epoch milliseconds it reached a final state.
    pub finished_at_ms: Option<i64>,
    /// The agent's `result` (JSON text).
    pub result: Option<String>,
    /// Why it failed, expired or was cancelled.
    pub reason: Option<String>,
}

/// Epoch milliseconds as an RFC 3339 time.
pub fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

fn raw(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl Instruction {
    /// How the admin API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "instruction_id": self.id,
            "agent_id": self.agent_id,
            "capability": self.capability,
            "strategy": self.strategy.map(Strategy::as_str),
            "session_id": self.session_id,
            "payload": raw(&self.payload),
            "state": self.state.as_str(),
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "ack_timeout": self.ack_timeout_ms as f64 / 1000.0,
            "created_at": rfc3339(self.created_at_ms),
            "expires_at": rfc3339(self.expires_at_ms),
            "delivered_at": self.delivered_at_ms.map(rfc3339),
            "finished_at": self.finished_at_ms.map(rfc3339),
            "result": self.result.as_deref().map(raw),
            "reason": self.reason,
        })
    }

    /// The instruction as it was when created (pending, change 1), for one that was
    /// stored already delivered.
    pub fn as_created(&self) -> Self {
        Self {
            state: State::Pending,
            attempt: 0,
            version: 1,
            delivered_at_ms: None,
            ack_deadline_ms: None,
            agent_id: self
                .capability
                .is_none()
                .then(|| self.agent_id.clone())
                .flatten(),
            ..self.clone()
        }
    }

    /// The frame its agent receives.
    pub fn frame(&self) -> String {
        #[derive(Serialize)]
        struct Frame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            instruction_id: &'a str,
            session_id: Option<&'a str>,
            payload: &'a RawValue,
            attempt: i64,
            expires_at: String,
        }
        let payload: Box<RawValue> = serde_json::from_str(&self.payload)
            .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"));
        serde_json::to_string(&Frame {
            kind: "instruction",
            instruction_id: &self.id,
            session_id: self.session_id.as_deref(),
            payload: &payload,
            attempt: self.attempt,
            expires_at: rfc3339(self.expires_at_ms),
        })
        .expect("an instruction frame serializes")
    }
}

/// The state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Instructions may be created in it.
    Open,
    /// Closed (by `POST /sessions/{id}/close` or for inactivity).
    Closed,
}

impl SessionState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "open" => Some(Self::Open),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// One stored session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its id (a UUID).
    pub id: String,
    /// The agent it is with.
    pub agent_id: String,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its parameters (JSON text of an object).
    pub parameters: String,
    /// Open or closed.
    pub state: SessionState,
    /// Number of its last change.
    pub version: i64,
    /// Epoch milliseconds.
    pub created_at_ms: i64,
    /// Epoch milliseconds of the last instruction created or acknowledged in it.
    pub last_activity_ms: i64,
    /// Epoch milliseconds it closed.
    pub closed_at_ms: Option<i64>,
    /// `closed` (asked) or `idle` (no activity for `sessions.idle_timeout`).
    pub close_reason: Option<String>,
}

impl Session {
    /// How the admin API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "session_id": self.id,
            "agent_id": self.agent_id,
            "name": self.name,
            "description": self.description,
            "parameters": raw(&self.parameters),
            "state": self.state.as_str(),
            "created_at": rfc3339(self.created_at_ms),
            "last_activity_at": rfc3339(self.last_activity_ms),
            "closed_at": self.closed_at_ms.map(rfc3339),
            "close_reason": self.close_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_by_name_and_only_two_are_unfinished() {
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
        let unfinished: Vec<_> = State::ALL.into_iter().filter(|s| !s.is_final()).collect();
        assert_eq!(unfinished, [State::Pending, State::Delivered]);
        assert_eq!(State::parse("done "), None);
    }

    #[test]
    fn an_agent_receives_the_payload_as_it_was_given() {
        let instruction = Instruction {
            seq: 1,
            id: "i-1".into(),
            agent_id: Some("a".into()),
            capability: None,
            strategy: None,
            session_id: None,
            payload: r#"{"task":"x","n":[1,2]}"#.into(),
            state: State::Delivered,
            attempt: 2,
            max_attempts: 3,
            ack_timeout_ms: 30_000,
            version: 3,
            created_at_ms: 0,
            expires_at_ms: 1_000,
            delivered_at_ms: Some(10),
            ack_deadline_ms: Some(30_010),
            finished_at_ms: None,
            result: None,
            reason: None,
        };
        let frame: Value = serde_json::from_str(&instruction.frame()).unwrap();
        assert_eq!(frame["type"], "instruction");
        assert_eq!(frame["payload"], json!({"task": "x", "n": [1, 2]}));
        assert_eq!(frame["attempt"], 2);
        assert_eq!(frame["session_id"], Value::Null);
        assert_eq!(frame["expires_at"], "1970-01-01T00:00:01.000Z");
    }
}
