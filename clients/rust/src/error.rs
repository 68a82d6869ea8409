//! What can go wrong, as values: [`ErrorCode`] is the server's machine-readable
//! `error_code`, [`Error`] what a call of this crate returns.

use std::fmt;

/// A server `error_code` (PROTOCOL.md), parsed once. Codes this version does not know
/// are kept as [`ErrorCode::Other`] with the string the server sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `missing_agent_id`: the registration had no agent id.
    MissingAgentId,
    /// `invalid_agent_id`: bad characters or length (1–128 of `A-Z a-z 0-9 . _ : @ -`).
    InvalidAgentId,
    /// `invalid_metadata`: metadata not an object, or too large.
    InvalidMetadata,
    /// `agent_id_in_use`: a live connection holds the id and no valid takeover was asked.
    AgentIdInUse,
    /// `invalid_certificate`: the certificate was rejected.
    InvalidCertificate,
    /// `already_registered`: this connection already registered.
    AlreadyRegistered,
    /// `server_full`: the server holds as many agents as it may.
    ServerFull,
    /// `shutting_down`: the server is shutting down.
    ShuttingDown,
    /// `rate_limited`: past the connection's request budget, or a broadcast past its
    /// copy budget (nothing was sent). The server closes a connection 1008 that goes on
    /// regardless (`limits.request_burst` refused in a row).
    RateLimited,
    /// `cluster_unavailable`: the node cannot reach its cluster; retry.
    ClusterUnavailable,
    /// `not_registered`: a request before registration.
    NotRegistered,
    /// `invalid_frame`: the server could not understand a frame.
    InvalidFrame,
    /// `unsupported_frame`: a binary frame.
    UnsupportedFrame,
    /// `unknown_agent`: a direct message to an agent that is not connected.
    UnknownAgent,
    /// `too_many_exclusions`: a broadcast excluded too many agents.
    TooManyExclusions,
    /// `unsupported_mod`: mod messages are not supported.
    UnsupportedMod,
    /// `unknown_command`: the server does not know the request.
    UnknownCommand,
    /// `already_claimed`: another certificate holds the id.
    AlreadyClaimed,
    /// `too_many_claims`: claim limits reached.
    TooManyClaims,
    /// `unknown_instruction`: no such instruction (or this agent does not take instructions).
    UnknownInstruction,
    /// `not_your_instruction`: the instruction belongs to another agent.
    NotYourInstruction,
    /// `instruction_finished`: the instruction already finished.
    InstructionFinished,
    /// `storage_unavailable`: the server's storage could not be reached; send again.
    StorageUnavailable,
    /// A code this version does not know.
    Other(String),
}

const CODES: &[(&str, ErrorCode)] = &[
    ("missing_agent_id", ErrorCode::MissingAgentId),
    ("invalid_agent_id", ErrorCode::InvalidAgentId),
    ("invalid_metadata", ErrorCode::InvalidMetadata),
    ("agent_id_in_use", ErrorCode::AgentIdInUse),
    ("invalid_certificate", ErrorCode::InvalidCertificate),
    ("already_registered", ErrorCode::AlreadyRegistered),
    ("server_full", ErrorCode::ServerFull),
    ("shutting_down", ErrorCode::ShuttingDown),
    ("rate_limited", ErrorCode::RateLimited),
    ("cluster_unavailable", ErrorCode::ClusterUnavailable),
    ("not_registered", ErrorCode::NotRegistered),
    ("invalid_frame", ErrorCode::InvalidFrame),
    ("unsupported_frame", ErrorCode::UnsupportedFrame),
    ("unknown_agent", ErrorCode::UnknownAgent),
    ("too_many_exclusions", ErrorCode::TooManyExclusions),
    ("unsupported_mod", ErrorCode::UnsupportedMod),
    ("unknown_command", ErrorCode::UnknownCommand),
    ("already_claimed", ErrorCode::AlreadyClaimed),
    ("too_many_claims", ErrorCode::TooManyClaims),
    ("unknown_instruction", ErrorCode::UnknownInstruction),
    ("not_your_instruction", ErrorCode::NotYourInstruction),
    ("instruction_finished", ErrorCode::InstructionFinished),
    ("storage_unavailable", ErrorCode::StorageUnavailable),
];

impl ErrorCode {
    /// The code for the server's string.
    pub fn parse(code: &str) -> Self {
        CODES
            .iter()
            .find(|(name, _)| *name == code)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| Self::Other(code.to_owned()))
    }

    /// The string the server sends.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Other(code) => code,
            known => CODES
                .iter()
                .find(|(_, value)| value == known)
                .map(|(name, _)| *name)
                .unwrap_or("unknown"),
        }
    }

    /// Whether the same registration may succeed later without any change: the holder
    /// may go, the server may make room or come back.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::AgentIdInUse
                | Self::ServerFull
                | Self::ShuttingDown
                | Self::RateLimited
                | Self::ClusterUnavailable
                | Self::StorageUnavailable
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call of this crate can fail with.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (the message says which setting).
    InvalidConfig(String),
    /// No WebSocket connection to `url` could be made.
    Connect {
        /// Where the agent tried to connect.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the registration.
    Refused {
        /// The server's `error_code`.
        code: ErrorCode,
        /// The server's `error` text.
        message: String,
    },
    /// The server answered a request with `success: false`.
    Request {
        /// The request's `command`.
        command: String,
        /// The server's `error_code`.
        code: ErrorCode,
        /// The server's `error` text.
        message: String,
    },
    /// The connection ended before the answer came; the agent reconnects by itself,
    /// the call may be repeated.
    ConnectionLost(String),
    /// No answer in time.
    Timeout(String),
    /// The agent has stopped for good (closed, replaced, or gave up reconnecting).
    Stopped(String),
    /// The certificate file could not be read or written.
    Certificate(String),
}

impl Error {
    /// The server's `answer` to request `command`: the answer itself when it says
    /// `success: true`, else [`Error::Request`] with its `error_code` and `error`.
    pub(crate) fn answered(
        command: &str,
        answer: serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        if answer["success"] == true {
            return Ok(answer);
        }
        Err(Error::Request {
            command: command.to_owned(),
            code: ErrorCode::parse(answer["error_code"].as_str().unwrap_or_default()),
            message: answer["error"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// The server's `error_code`, when the server gave one.
    pub fn error_code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Refused { code, .. } | Self::Request { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig(what) => write!(f, "invalid agent configuration: {what}"),
            Self::Connect { url, reason } => write!(f, "cannot connect to {url}: {reason}"),
            Self::Refused { code, message } => {
                write!(f, "registration refused ({code}): {message}")
            }
            Self::Request {
                command,
                code,
                message,
            } => write!(f, "{command} failed ({code}): {message}"),
            Self::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            Self::Timeout(what) => write!(f, "timed out: {what}"),
            Self::Stopped(why) => write!(f, "the agent has stopped: {why}"),
            Self::Certificate(what) => write!(f, "certificate file: {what}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_ones_survive() {
        for (name, code) in CODES {
            assert_eq!(ErrorCode::parse(name), *code);
            assert_eq!(code.as_str(), *name);
        }
        let future = ErrorCode::parse("brand_new_code");
        assert_eq!(future, ErrorCode::Other("brand_new_code".into()));
        assert_eq!(future.as_str(), "brand_new_code");
    }

    #[test]
    fn error_code_is_exposed_for_server_refusals_only() {
        let refused = Error::Refused {
            code: ErrorCode::AgentIdInUse,
            message: "held".into(),
        };
        assert_eq!(refused.error_code(), Some(&ErrorCode::AgentIdInUse));
        assert_eq!(Error::Timeout("x".into()).error_code(), None);
    }
}
