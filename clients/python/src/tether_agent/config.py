"""Configuration of an agent: where to connect, who it is, how it reconnects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, wait_exponential, wait_random_exponential

INSTRUCTIONS_CAPABILITY = "instructions"
"""The capability an agent lists to receive instructions (PROTOCOL.md §11)."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How the agent retries after losing its connection.

    Before attempt ``n`` it waits a random time between half and all of
    ``min(initial_delay * factor ** (n - 1), max_delay)`` seconds ("equal jitter").
    Attempts are counted across connections that end within ``max_delay`` of being
    made (a server that accepts and drops at once is not hammered every
    ``initial_delay``); a connection that lasted longer starts the count over.
    ``max_attempts`` bounds the attempts so counted (``None``: retry forever).
    """

    initial_delay: float = 0.1
    max_delay: float = 10.0
    factor: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        """Check the values are usable."""
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("reconnect delays must not be negative")
        if self.factor < 1:
            raise ValueError("reconnect factor must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1, or None")

    def delay(self, attempt: int) -> float:
        """Return the wait before attempt ``attempt`` (1 for the first).

        tenacity's exponential waits, half of them fixed and half random (they also
        stay at ``max_delay`` for attempt numbers whose growth would overflow).
        """
        half_initial, half_max = self.initial_delay / 2, self.max_delay / 2
        wait = wait_exponential(
            multiplier=half_initial, max=half_max, exp_base=self.factor
        ) + wait_random_exponential(multiplier=half_initial, max=half_max, exp_base=self.factor)
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = max(attempt, 1)
        return wait(state)


@dataclass(frozen=True)
class Keepalive:
    """Half-open connection detection.

    When nothing at all has been received for ``idle`` seconds the agent sends its own
    ``ping_agent`` request; when no frame arrives within ``timeout`` seconds after that,
    the connection is considered dead, dropped without a close handshake, and the
    agent reconnects.
    """

    idle: float
    timeout: float

    def __post_init__(self) -> None:
        """Check the values are usable."""
        if self.idle <= 0 or self.timeout <= 0:
            raise ValueError("keepalive idle and timeout must be positive")


@dataclass(frozen=True)
class AgentConfig:
    """Everything :meth:`tether_agent.Agent.connect` needs.

    ``metadata`` is sent as the registration's ``metadata``, with ``name`` and
    ``capabilities`` set from the fields of the same names. ``certificate_file`` keeps
    the identity certificate in that JSON file (written atomically, mode 0600) so it
    survives the process; ``None`` keeps it in memory. ``keepalive=None`` derives the
    half-open detection from the server's registration answer (``idle`` =
    ``heartbeat_interval + ping_timeout``, ``timeout`` = ``ping_timeout``). Durations
    are seconds.
    """

    url: str
    agent_id: str
    name: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    capabilities: Sequence[str] = ()
    certificate_file: str | Path | None = None
    force_reconnect: bool = False
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    keepalive: Keepalive | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 10.0

    def registration_metadata(self) -> dict[str, Any]:
        """Return the ``metadata`` object sent with ``register_agent``."""
        metadata = dict(self.metadata)
        if self.name is not None:
            metadata["name"] = self.name
        if self.capabilities or "capabilities" not in metadata:
            metadata["capabilities"] = list(self.capabilities)
        return metadata
