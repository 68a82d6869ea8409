//! System requests, parsed once into a [`Command`] (after mini-redis's
//! `Command::from_frame`): the connection and the registry match on the enum, never on
//! command strings, and every field is read and checked here.

use super::error::{ErrorCode, ProtocolError};
use serde_json::{Map, Value};

/// A `system_request` frame: its command and the `request_id` every answer echoes.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What is asked.
    pub command: Command,
    /// The request's `request_id`, if it had one.
    pub request_id: Option<Value>,
}

/// Agents per `list_agents` page when the request gives no `limit` (OpenAgents clients
/// give none: they get the first page and `has_more`).
pub const DEFAULT_PAGE: usize = 100;

/// The largest `limit` a `list_agents` request may ask for.
pub const MAX_PAGE: usize = 1000;

/// Which page of a listing: at most `limit` entries after `cursor` (an agent id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Entries wanted, 1 to [`MAX_PAGE`].
    pub limit: usize,
    /// The last id of the previous page (`next_cursor` of its answer).
    pub cursor: Option<String>,
}

impl Page {
    /// Reads `limit` and `cursor`; a missing, non-integer or out-of-range limit is
    /// clamped to 1..=[`MAX_PAGE`] ([`DEFAULT_PAGE`] when absent).
    fn read(fields: &mut Map<String, Value>) -> Self {
        let limit = match fields.get("limit").and_then(Value::as_u64) {
            Some(limit) => usize::try_from(limit)
                .unwrap_or(MAX_PAGE)
                .clamp(1, MAX_PAGE),
            None => DEFAULT_PAGE,
        };
        let cursor = match fields.remove("cursor") {
            Some(Value::String(cursor)) => Some(cursor),
            _ => None,
        };
        Self { limit, cursor }
    }
}

/// A system request's command with its checked fields (PROTOCOL.md §3–6).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `register_agent`; `Err` when the id or metadata is unusable.
    RegisterAgent(Result<Registration, Refusal>),
    /// `ping_agent` from the agent; answered with its `timestamp` (or now).
    PingAgent {
        /// The timestamp to echo.
        timestamp: Option<Value>,
    },
    /// `claim_agent_id`; `Err` when the id is unusable.
    ClaimAgentId(Result<Claim, ProtocolError>),
    /// `validate_certificate`.
    ValidateCertificate {
        /// The certificate to check (null when absent).
        certificate: Value,
    },
    /// `get_network_info`.
    GetNetworkInfo,
    /// `list_agents`: one page of the registered agents, in id order.
    ListAgents(Page),
    /// `list_mods` (none are loaded).
    ListMods,
    /// `list_protocols` (none are loaded).
    ListProtocols,
    /// `unregister_agent`: the agent leaves.
    UnregisterAgent,
    /// Any other command, by name.
    Unknown(String),
}

/// A `register_agent` whose id and metadata are usable.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// A valid agent id.
    pub agent_id: String,
    /// The metadata object (`{}` when absent or null).
    pub metadata: Value,
    /// A certificate offered for a takeover.
    pub certificate: Option<Value>,
    /// Whether the agent asks to take over a live id by force.
    pub force_reconnect: bool,
}

/// A `register_agent` refused before it reached the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The agent id as given, when it was a string (for `agent.registration_failed`).
    pub agent_id: Option<String>,
    /// What was wrong.
    pub error: ProtocolError,
}

/// A `claim_agent_id` for a valid id.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The id claimed.
    pub agent_id: String,
    /// Whether an unexpired claim is revoked and replaced.
    pub force: bool,
}

impl Command {
    /// The command's name, echoed in the `command` field of every answer.
    pub fn name(&self) -> &str {
        match self {
            Self::RegisterAgent(_) => "register_agent",
            Self::PingAgent { .. } => "ping_agent",
            Self::ClaimAgentId(_) => "claim_agent_id",
            Self::ValidateCertificate { .. } => "validate_certificate",
            Self::GetNetworkInfo => "get_network_info",
            Self::ListAgents(_) => "list_agents",
            Self::ListMods => "list_mods",
            Self::ListProtocols => "list_protocols",
            Self::UnregisterAgent => "unregister_agent",
            Self::Unknown(name) => name,
        }
    }

    /// What it costs of the connection's request budget: one, but a `list_agents` page
    /// one more per ten entries asked for (the registry builds every entry of it), so a
    /// connection cannot keep the registry busy with pages at the plain request rate.
    pub fn cost(&self) -> u32 {
        match self {
            Self::ListAgents(page) => 1 + (page.limit / 10) as u32,
            _ => 1,
        }
    }

    /// Whether an unregistered connection may send it.
    pub fn allowed_unregistered(&self) -> bool {
        matches!(
            self,
            Self::RegisterAgent(_)
                | Self::PingAgent { .. }
                | Self::ClaimAgentId(_)
                | Self::ValidateCertificate { .. }
                | Self::GetNetworkInfo
        )
    }

    /// Reads the command `name` and its fields from a request frame.
    pub fn parse(name: &str, fields: &mut Map<String, Value>) -> Self {
        match name {
            "register_agent" => Self::RegisterAgent(Registration::parse(fields)),
            "ping_agent" => Self::PingAgent {
                timestamp: fields.remove("timestamp"),
            },
            "claim_agent_id" => {
                Self::ClaimAgentId(agent_id(fields.get("agent_id")).map(|agent_id| Claim {
                    agent_id,
                    force: bool_field(fields, "force"),
                }))
            }
            "validate_certificate" => Self::ValidateCertificate {
                certificate: fields.remove("certificate").unwrap_or(Value::Null),
            },
            "get_network_info" => Self::GetNetworkInfo,
            "list_agents" => Self::ListAgents(Page::read(fields)),
            "list_mods" => Self::ListMods,
            "list_protocols" => Self::ListProtocols,
            "unregister_agent" => Self::UnregisterAgent,
            other => Self::Unknown(other.to_owned()),
        }
    }
}

impl Registration {
    fn parse(fields: &mut Map<String, Value>) -> Result<Self, Refusal> {
        let given = fields
            .get("agent_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let agent_id = agent_id(fields.get("agent_id")).map_err(|error| Refusal {
            agent_id: given.filter(|id| !id.is_empty()),
            error,
        })?;
        let metadata = match fields.remove("metadata") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(meta @ Value::Object(_)) => meta,
            Some(_) => {
                return Err(Refusal {
                    agent_id: Some(agent_id),
                    error: ErrorCode::InvalidMetadata.into(),
                })
            }
        };
        Ok(Self {
            agent_id,
            metadata,
            certificate: fields.remove("certificate").filter(|c| !c.is_null()),
            force_reconnect: bool_field(fields, "force_reconnect"),
        })
    }
}

/// Checks an `agent_id` field: present, a string, and a valid id.
fn agent_id(field: Option<&Value>) -> Result<String, ProtocolError> {
    match field {
        None | Some(Value::Null) => Err(ErrorCode::MissingAgentId.into()),
        Some(Value::String(id)) if id.is_empty() => Err(ErrorCode::MissingAgentId.into()),
        Some(Value::String(id)) if valid_agent_id(id) => Ok(id.clone()),
        Some(_) => Err(ErrorCode::InvalidAgentId.into()),
    }
}

/// A boolean field; absent or not a boolean is false.
fn bool_field(fields: &Map<String, Value>, name: &str) -> bool {
    fields.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// Whether `id` is a valid agent id: 1–128 characters of `A-Z a-z 0-9 . _ : @ -`.
pub fn valid_agent_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(frame: Value) -> Command {
        let Value::Object(mut fields) = frame else {
            panic!("not an object")
        };
        let name = fields["command"].as_str().unwrap().to_owned();
        Command::parse(&name, &mut fields)
    }

    #[test]
    fn a_list_agents_page_costs_one_more_request_per_ten_entries() {
        let page = |limit: u64| parse(json!({"command": "list_agents", "limit": limit}));
        assert_eq!(parse(json!({"command": "ping_agent"})).cost(), 1);
        assert_eq!(parse(json!({"command": "list_agents"})).cost(), 11);
        assert_eq!(page(5).cost(), 1);
        assert_eq!(page(1000).cost(), 101);
    }

    #[test]
    fn validates_agent_ids() {
        assert!(valid_agent_id("alice.bob_1:x@y-z"));
        assert!(!valid_agent_id(""));
        assert!(!valid_agent_id("has space"));
        assert!(!valid_agent_id(&"a".repeat(129)));
        assert!(valid_agent_id(&"a".repeat(128)));
    }

    #[test]
    fn a_registration_is_read_with_its_defaults() {
        let command = parse(json!({"command": "register_agent", "agent_id": "alice"}));
        let Command::RegisterAgent(Ok(registration)) = command else {
            panic!("{command:?}")
        };
        assert_eq!(registration.metadata, json!({}));
        assert_eq!(registration.certificate, None);
        assert!(!registration.force_reconnect);
    }

    #[test]
    fn a_registration_with_a_bad_id_or_metadata_is_refused_with_its_code() {
        let refused = |frame| match parse(frame) {
            Command::RegisterAgent(Err(refusal)) => (refusal.error.code, refusal.agent_id),
            other => panic!("{other:?}"),
        };
        let r = refused(json!({"command": "register_agent"}));
        assert_eq!(r, (ErrorCode::MissingAgentId, None));
        let r = refused(json!({"command": "register_agent", "agent_id": "a b"}));
        assert_eq!(r, (ErrorCode::InvalidAgentId, Some("a b".into())));
        let r = refused(json!({"command": "register_agent", "agent_id": 7}));
        assert_eq!(r, (ErrorCode::InvalidAgentId, None));
        let r = refused(json!({"command": "register_agent", "agent_id": "a", "metadata": [1]}));
        assert_eq!(r, (ErrorCode::InvalidMetadata, Some("a".into())));
    }

    #[test]
    fn unknown_commands_keep_their_name_and_need_registration() {
        let command = parse(json!({"command": "fly"}));
        assert_eq!(command, Command::Unknown("fly".into()));
        assert_eq!(command.name(), "fly");
        assert!(!command.allowed_unregistered());
        assert!(parse(json!({"command": "claim_agent_id"})).allowed_unregistered());
        assert!(!parse(json!({"command": "list_agents"})).allowed_unregistered());
    }
}
