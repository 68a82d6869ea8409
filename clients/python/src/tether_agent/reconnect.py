"""Reconnecting: which failures are worth another attempt, and the attempts' timing.

The timing is the agent's :class:`~tether_agent.config.ReconnectPolicy` (exponential
delays with equal jitter), driven by ``tenacity``. Attempts are counted on across
connections that did not last (the agent keeps the count), so one reconnection may
start at attempt ``carried + 1``.
"""

from __future__ import annotations

import logging

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
)

from .config import ReconnectPolicy
from .errors import ConnectionFailed, ErrorCode, RegistrationRefused

log = logging.getLogger(__name__)

FATAL_REFUSALS = frozenset(
    {ErrorCode.MISSING_AGENT_ID, ErrorCode.INVALID_AGENT_ID, ErrorCode.INVALID_METADATA}
)
"""Registration refusals that retrying cannot fix."""


def retryable(error: BaseException) -> bool:
    """Tell whether another attempt may succeed after ``error``."""
    if isinstance(error, RegistrationRefused):
        return error.error_code not in FATAL_REFUSALS
    return isinstance(error, ConnectionFailed)


def retrying(policy: ReconnectPolicy, carried: int, left: int | None) -> AsyncRetrying:
    """Return the retrying of one reconnection, counting on from ``carried`` attempts.

    At most ``left`` attempts (``None``: no bound). The caller waits before the first;
    tenacity waits between the others.
    """

    def wait(state: RetryCallState) -> float:
        return policy.delay(carried + state.attempt_number + 1)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "reconnect attempt %d failed (%s); next in %.2f s",
            carried + state.attempt_number,
            error,
            delay,
        )

    return AsyncRetrying(
        wait=wait,
        stop=stop_never if left is None else stop_after_attempt(left),
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
