//! The protocol's error codes (PROTOCOL.md §3, §6), as values, after centrifuge's
//! `errors.go`: each code carries its wire string and the message an agent reads.
//!
//! An error that needs detail (the metadata size, the network's capacity) is an
//! [`ProtocolError`] with the code and a message of its own.

use std::borrow::Cow;
use std::fmt;

/// An `error_code` the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `register_agent` or `claim_agent_id` without an `agent_id`.
    MissingAgentId,
    /// An `agent_id` outside the allowed characters or length.
    InvalidAgentId,
    /// `metadata` not an object, or over `limits.max_metadata_bytes`.
    InvalidMetadata,
    /// A second `register_agent` on a registered connection.
    AlreadyRegistered,
    /// The id is held by a live agent and no takeover was proven.
    AgentIdInUse,
    /// A certificate that does not validate for the id.
    InvalidCertificate,
    /// The network is at `network.max_connections`.
    ServerFull,
    /// The server is shutting down.
    ShuttingDown,
    /// A request or message before `register_agent`.
    NotRegistered,
    /// A system request with an unknown command.
    UnknownCommand,
    /// A direct message to an id that is not connected.
    UnknownAgent,
    /// A frame that is not a protocol frame.
    InvalidFrame,
    /// A binary frame.
    UnsupportedFrame,
    /// A mod message (no mods are loaded).
    UnsupportedMod,
    /// `claim_agent_id` for an id claimed and not expired.
    AlreadyClaimed,
    /// A broadcast listing more than `limits.max_broadcast_exclusions` ids.
    TooManyExclusions,
    /// A claim past `limits.max_claims_per_connection` or `limits.max_outstanding_claims`.
    TooManyClaims,
    /// A request past `limits.max_requests_per_second` (and its burst).
    RateLimited,
    /// The cluster (its Redis) is unreachable, or this node is rejoining it:
    /// retryable.
    ClusterUnavailable,
    /// An `instruction_ack` names no instruction Tether knows.
    UnknownInstruction,
    /// An `instruction_ack` names an instruction delivered to another agent.
    NotYourInstruction,
    /// An `instruction_ack` names an instruction that already finished.
    InstructionFinished,
    /// Instructions are unavailable (their storage cannot be reached): retryable.
    StorageUnavailable,
}

impl ErrorCode {
    /// The `error_code` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingAgentId => "missing_agent_id",
            Self::InvalidAgentId => "invalid_agent_id",
            Self::InvalidMetadata => "invalid_metadata",
            Self::AlreadyRegistered => "already_registered",
            Self::AgentIdInUse => "agent_id_in_use",
            Self::InvalidCertificate => "invalid_certificate",
            Self::ServerFull => "server_full",
            Self::ShuttingDown => "shutting_down",
            Self::NotRegistered => "not_registered",
            Self::UnknownCommand => "unknown_command",
            Self::UnknownAgent => "unknown_agent",
            Self::InvalidFrame => "invalid_frame",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::UnsupportedMod => "unsupported_mod",
            Self::AlreadyClaimed => "already_claimed",
            Self::TooManyExclusions => "too_many_exclusions",
            Self::TooManyClaims => "too_many_claims",
            Self::RateLimited => "rate_limited",
            Self::ClusterUnavailable => "cluster_unavailable",
            Self::UnknownInstruction => "unknown_instruction",
            Self::NotYourInstruction => "not_your_instruction",
            Self::InstructionFinished => "instruction_finished",
            Self::StorageUnavailable => "storage_unavailable",
        }
    }

    /// The message sent with the code when there is nothing more specific to say.
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingAgentId => "agent_id is required",
            Self::InvalidAgentId => "agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
            Self::InvalidMetadata => "metadata must be an object or null",
            Self::AlreadyRegistered => "This connection is already registered",
            Self::AgentIdInUse => "Agent with this ID is already connected to the network. Use force_reconnect=true or provide valid certificate to override.",
            Self::InvalidCertificate => "Invalid certificate",
            Self::ServerFull => "The network is full; try again later",
            Self::ShuttingDown => "The network is shutting down",
            Self::NotRegistered => "Register with register_agent before sending other requests",
            Self::UnknownCommand => "Unknown command",
            Self::UnknownAgent => "The target agent is not connected",
            Self::InvalidFrame => "The frame is not a protocol frame",
            Self::UnsupportedFrame => "Binary frames are not supported; send JSON in text frames",
            Self::UnsupportedMod => "This network has no mods loaded",
            Self::AlreadyClaimed => "The agent id is already claimed",
            Self::TooManyExclusions => "The broadcast excludes more agents than the network allows",
            Self::TooManyClaims => "Too many claims; register with the certificates already claimed",
            Self::RateLimited => "Too many requests on this connection; slow down",
            Self::ClusterUnavailable => {
                "The network's cluster is unreachable from this node; retry shortly"
            }
            Self::UnknownInstruction => "No instruction has this instruction_id",
            Self::NotYourInstruction => "This instruction was delivered to another agent",
            Self::InstructionFinished => "This instruction has already finished",
            Self::StorageUnavailable => {
                "Instructions are unavailable: their storage cannot be reached; retry shortly"
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error to send: a code and the message for this occurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The `error_code`.
    pub code: ErrorCode,
    /// The `error` text.
    pub message: Cow<'static, str>,
}

impl ProtocolError {
    /// `code` with a message of its own.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ErrorCode> for ProtocolError {
    fn from(code: ErrorCode) -> Self {
        Self::new(code, code.message())
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
