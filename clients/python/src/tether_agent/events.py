"""Typed values the agent hands to the application.

:data:`Event` is what :meth:`tether_agent.Agent.next_event` returns: a message from
another agent, a server notification, an instruction, an error frame, or a change of
the connection (:class:`Reconnected`, :class:`Disconnected`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class AckStatus(StrEnum):
    """How an instruction ended, as the agent reports it in ``instruction_ack``."""

    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Registration:
    """The server's answer to a successful ``register_agent`` (one connection)."""

    agent_id: str
    session_id: str
    incarnation: int
    heartbeat_interval: float
    ping_timeout: float
    agent_timeout: float
    network_name: str
    network_id: str


@dataclass(frozen=True)
class AgentStats:
    """Counters of one agent over its whole life (all its connections)."""

    pings_answered: int = 0
    reconnects: int = 0
    messages_received: int = 0
    instructions_received: int = 0


@dataclass(frozen=True)
class Message:
    """A message from another agent (``{"type":"message","data":{...}}``).

    ``kind`` is ``"direct"`` or ``"broadcast"``; ``data`` is the whole ``data`` object
    of the envelope, unknown fields included.
    """

    message_id: str
    sender_id: str
    kind: Literal["direct", "broadcast"]
    content: Any
    timestamp: int | None
    data: dict[str, Any]


@dataclass(frozen=True)
class Notification:
    """A ``system_notification`` frame (``network_shutdown``, ``connection_replaced``).

    ``frame`` is the whole frame as received.
    """

    event: str
    message: str | None
    reconnect_url: str | None
    frame: dict[str, Any]


@dataclass(frozen=True)
class Instruction:
    """An instruction to carry out and acknowledge with :meth:`Agent.ack`.

    The application sees each ``instruction_id`` once per process, however often the
    server delivers it; ``attempt`` is the delivery it came with.
    """

    instruction_id: str
    session_id: str | None
    payload: Any
    attempt: int
    expires_at: str | None


@dataclass(frozen=True)
class ServerError:
    """An ``error`` frame: something the agent sent was refused.

    ``message_id`` names the refused message, ``instruction_id`` the refused ack.
    """

    error_code: str
    message: str
    message_id: str | None
    instruction_id: str | None


@dataclass(frozen=True)
class Reconnected:
    """The agent registered again after losing its connection."""

    registration: Registration


@dataclass(frozen=True)
class Disconnected:
    """The connection ended.

    ``close_code`` is the code of the server's close frame (``None`` when none came:
    the TCP connection was lost or the keepalive gave up). With ``reconnecting``
    false the agent has stopped for good and the event stream ends after this event.
    """

    close_code: int | None
    reason: str
    reconnecting: bool


Event = Message | Notification | Instruction | ServerError | Reconnected | Disconnected
"""Anything :meth:`tether_agent.Agent.next_event` returns."""
