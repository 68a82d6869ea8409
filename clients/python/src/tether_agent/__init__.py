"""tether-agent: an asyncio client for Tether agents.

Connect with :meth:`Agent.connect`, read events with :meth:`Agent.next_event` (or
``async for event in agent``), send with :meth:`Agent.send_direct` and
:meth:`Agent.broadcast`, acknowledge instructions with :meth:`Agent.ack`, and leave
with :meth:`Agent.close`. The agent answers the server's pings, keeps its identity
certificate and reconnects by itself.
"""

from .agent import Agent
from .config import INSTRUCTIONS_CAPABILITY, AgentConfig, Keepalive, ReconnectPolicy
from .errors import (
    AgentStopped,
    ConnectionFailed,
    ErrorCode,
    RegistrationRefused,
    RequestFailed,
    TetherError,
)
from .events import (
    AckStatus,
    AgentStats,
    Disconnected,
    Event,
    Instruction,
    Message,
    Notification,
    Reconnected,
    Registration,
    ServerError,
)

__all__ = [
    "INSTRUCTIONS_CAPABILITY",
    "AckStatus",
    "Agent",
    "AgentConfig",
    "AgentStats",
    "AgentStopped",
    "ConnectionFailed",
    "Disconnected",
    "ErrorCode",
    "Event",
    "Instruction",
    "Keepalive",
    "Message",
    "Notification",
    "ReconnectPolicy",
    "Reconnected",
    "Registration",
    "RegistrationRefused",
    "RequestFailed",
    "ServerError",
    "TetherError",
]
