"""The wire protocol: builders of outgoing frames, parsing of incoming ones.

Frames are JSON objects, one per WebSocket text frame (PROTOCOL.md). :func:`parse`
turns a received text into one of the typed values of :mod:`tether_agent.events`, or
into :class:`Ping` / :class:`Response` / :class:`Unknown` for what the connection
handles itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import RegistrationRefused
from .events import (
    AckStatus,
    Instruction,
    Message,
    Notification,
    Registration,
    ServerError,
)


def new_id() -> str:
    """Return a fresh random id (uuid4) for a message or a request."""
    return str(uuid.uuid4())


def encode(frame: Mapping[str, Any]) -> str:
    """Serialize a frame as compact JSON text."""
    return json.dumps(frame, separators=(",", ":"))


# --- Outgoing frames -------------------------------------------------------------


def register(
    agent_id: str,
    metadata: Mapping[str, Any],
    certificate: Mapping[str, Any] | None,
    force_reconnect: bool,
    request_id: str,
) -> dict[str, Any]:
    """Build a ``register_agent`` request."""
    frame: dict[str, Any] = {
        "type": "system_request",
        "command": "register_agent",
        "agent_id": agent_id,
        "metadata": dict(metadata),
        "request_id": request_id,
    }
    if certificate is not None:
        frame["certificate"] = dict(certificate)
    if force_reconnect:
        frame["force_reconnect"] = True
    return frame


def request(command: str, request_id: str, **fields: Any) -> dict[str, Any]:
    """Build any other system request (``claim_agent_id``, ``list_agents``, ...)."""
    return {"type": "system_request", "command": command, **fields, "request_id": request_id}


def pong(timestamp: Any) -> dict[str, Any]:
    """Build the answer to the server's ``ping_agent``, echoing its timestamp."""
    return {
        "type": "system_response",
        "command": "ping_agent",
        "success": True,
        "timestamp": timestamp,
    }


def direct_message(target_agent_id: str, content: Any, message_id: str) -> dict[str, Any]:
    """Build a direct message to ``target_agent_id``."""
    return {
        "type": "message",
        "data": {
            "message_type": "direct_message",
            "target_agent_id": target_agent_id,
            "content": content,
            "message_id": message_id,
        },
    }


def broadcast_message(
    content: Any, message_id: str, exclude: Sequence[str] | None = None
) -> dict[str, Any]:
    """Build a broadcast to every other agent but those in ``exclude``."""
    data: dict[str, Any] = {
        "message_type": "broadcast_message",
        "content": content,
        "message_id": message_id,
    }
    if exclude:
        data["exclude_agent_ids"] = list(exclude)
    return {"type": "message", "data": data}


def instruction_ack(instruction_id: str, status: AckStatus, result: Any = None) -> dict[str, Any]:
    """Build an ``instruction_ack`` (``result`` omitted when ``None``)."""
    frame: dict[str, Any] = {
        "type": "instruction_ack",
        "instruction_id": instruction_id,
        "status": str(status),
    }
    if result is not None:
        frame["result"] = result
    return frame


# --- Incoming frames -------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    """The server's ``ping_agent`` request, to be answered at once."""

    timestamp: Any


@dataclass(frozen=True)
class Response:
    """A ``system_response``: the answer to one of our requests."""

    command: str
    request_id: str | None
    success: bool
    frame: dict[str, Any]

    def error_code(self) -> str | None:
        """Return the answer's ``error_code``, if any."""
        code = self.frame.get("error_code")
        return code if isinstance(code, str) else None

    def error(self) -> str:
        """Return the answer's human-readable ``error`` text."""
        return str(self.frame.get("error") or "request refused")


@dataclass(frozen=True)
class Unknown:
    """A frame this library does not understand (kept for logging)."""

    text: str


Inbound = Ping | Response | Message | Notification | Instruction | ServerError | Unknown
"""What :func:`parse` returns."""


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse(text: str) -> Inbound:
    """Parse one received text frame."""
    try:
        frame = json.loads(text)
    except ValueError:
        return Unknown(text)
    if not isinstance(frame, dict):
        return Unknown(text)
    kind = frame.get("type")
    if kind == "system_request" and frame.get("command") == "ping_agent":
        return Ping(frame.get("timestamp"))
    if kind == "system_response":
        return Response(
            command=str(frame.get("command", "")),
            request_id=_opt_str(frame.get("request_id")),
            success=frame.get("success") is True,
            frame=frame,
        )
    if kind == "message":
        return _message(frame, text)
    if kind == "system_notification":
        return Notification(
            event=str(frame.get("event", "")),
            message=_opt_str(frame.get("message")),
            reconnect_url=_opt_str(frame.get("reconnect_url")),
            frame=frame,
        )
    if kind == "instruction" and isinstance(frame.get("instruction_id"), str):
        attempt = frame.get("attempt")
        return Instruction(
            instruction_id=frame["instruction_id"],
            session_id=_opt_str(frame.get("session_id")),
            payload=frame.get("payload"),
            attempt=attempt if isinstance(attempt, int) else 1,
            expires_at=_opt_str(frame.get("expires_at")),
        )
    if kind == "error":
        return ServerError(
            error_code=str(frame.get("error_code", "")),
            message=str(frame.get("error", "")),
            message_id=_opt_str(frame.get("message_id")),
            instruction_id=_opt_str(frame.get("instruction_id")),
        )
    return Unknown(text)


def _message(frame: dict[str, Any], text: str) -> Inbound:
    data = frame.get("data")
    if not isinstance(data, dict):
        return Unknown(text)
    message_type = data.get("message_type")
    if message_type == "direct_message":
        kind: Any = "direct"
    elif message_type == "broadcast_message":
        kind = "broadcast"
    else:
        return Unknown(text)
    timestamp = data.get("timestamp")
    return Message(
        message_id=str(data.get("message_id", "")),
        sender_id=str(data.get("sender_id", frame.get("sender_id", ""))),
        kind=kind,
        content=data.get("content"),
        timestamp=timestamp if isinstance(timestamp, int) else None,
        data=data,
    )


def registration(response: Response) -> Registration:
    """Turn a ``register_agent`` answer into a :class:`Registration`.

    Raises :class:`RegistrationRefused` when the answer is a refusal.
    """
    if not response.success:
        raise RegistrationRefused(response.error_code() or "unknown", response.error())
    f = response.frame
    return Registration(
        agent_id=str(f.get("agent_id", "")),
        session_id=str(f.get("session_id", "")),
        incarnation=int(f.get("incarnation", 0)),
        heartbeat_interval=float(f.get("heartbeat_interval", 30.0)),
        ping_timeout=float(f.get("ping_timeout", 5.0)),
        agent_timeout=float(f.get("agent_timeout", 90.0)),
        network_name=str(f.get("network_name", "")),
        network_id=str(f.get("network_id", "")),
    )
