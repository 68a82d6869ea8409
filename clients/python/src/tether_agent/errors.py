"""Errors raised by the library, and the error codes the server sends.

Every exception derives from :class:`TetherError` and carries ``error_code``: the raw
string the server sent (``None`` when the failure did not come from the server), so a
code added to the server later still reaches the application unchanged. Compare it with
the members of :class:`ErrorCode`, which is a ``StrEnum``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``error_code`` values of the Tether wire protocol (PROTOCOL.md)."""

    # Registration refusals (§2).
    MISSING_AGENT_ID = "missing_agent_id"
    INVALID_AGENT_ID = "invalid_agent_id"
    INVALID_METADATA = "invalid_metadata"
    AGENT_ID_IN_USE = "agent_id_in_use"
    INVALID_CERTIFICATE = "invalid_certificate"
    ALREADY_REGISTERED = "already_registered"
    SERVER_FULL = "server_full"
    SHUTTING_DOWN = "shutting_down"
    RATE_LIMITED = "rate_limited"
    CLUSTER_UNAVAILABLE = "cluster_unavailable"
    # Certificates (§3).
    ALREADY_CLAIMED = "already_claimed"
    TOO_MANY_CLAIMS = "too_many_claims"
    # Frames and requests (§1, §2, §5, §6).
    NOT_REGISTERED = "not_registered"
    INVALID_FRAME = "invalid_frame"
    UNSUPPORTED_FRAME = "unsupported_frame"
    UNKNOWN_COMMAND = "unknown_command"
    UNKNOWN_AGENT = "unknown_agent"
    TOO_MANY_EXCLUSIONS = "too_many_exclusions"
    UNSUPPORTED_MOD = "unsupported_mod"
    # Instruction acknowledgements (§11).
    UNKNOWN_INSTRUCTION = "unknown_instruction"
    NOT_YOUR_INSTRUCTION = "not_your_instruction"
    INSTRUCTION_FINISHED = "instruction_finished"
    STORAGE_UNAVAILABLE = "storage_unavailable"


class TetherError(Exception):
    """Base class of every error this library raises."""

    def __init__(self, message: str, error_code: str | None = None) -> None:
        """Make an error with a human-readable ``message`` and the server's code."""
        super().__init__(message)
        self.message = message
        self.error_code = error_code

    def __str__(self) -> str:
        """Return the message, prefixed with the error code when there is one."""
        if self.error_code:
            return f"{self.error_code}: {self.message}"
        return self.message


class RegistrationRefused(TetherError):
    """The server answered ``register_agent`` with ``success: false``."""

    error_code: str

    def __init__(self, error_code: str, message: str) -> None:
        """Make the refusal from the answer's ``error_code`` and ``error`` text."""
        super().__init__(message, error_code)


class RequestFailed(TetherError):
    """A system request (``list_agents``, ``claim_agent_id``, ...) was refused."""

    def __init__(self, command: str, error_code: str | None, message: str) -> None:
        """Make the failure of ``command`` from the answer's code and text."""
        super().__init__(message, error_code)
        self.command = command


class ConnectionFailed(TetherError):
    """No connection could be made, or the connection ended before an answer came."""

    def __init__(self, message: str) -> None:
        """Make the failure with a description of what went wrong."""
        super().__init__(message, None)


class AgentStopped(TetherError):
    """The agent has stopped for good (closed, replaced, or gave up reconnecting)."""

    def __init__(self, message: str = "the agent has stopped") -> None:
        """Make the error, optionally saying why the agent stopped."""
        super().__init__(message, None)
