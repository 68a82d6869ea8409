"""The bounded queue of events between the agent and the application.

The agent awaits room in the queue before it reads the next frame from its socket, so
an application that stops reading events stops the agent reading its socket (and, in
time, the server declares it stale or a slow consumer). The final
:class:`~tether_agent.events.Disconnected` is always accepted, over the bound, so that
stopping never waits for the application.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .events import Event

EVENT_QUEUE_SIZE = 1024
"""How many events may wait for the application before the agent stops reading."""


class EventStream:
    """A bounded FIFO of events that can be ended."""

    def __init__(self, maxsize: int = EVENT_QUEUE_SIZE) -> None:
        """Make an empty stream holding at most ``maxsize`` events (but the last)."""
        self._items: deque[Event] = deque()
        self._maxsize = maxsize
        self._ended = False
        self._changed = asyncio.Condition()

    @property
    def ended(self) -> bool:
        """Whether :meth:`end` was called."""
        return self._ended

    async def put(self, event: Event) -> None:
        """Append an event, waiting while the stream is full (dropped once ended)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._ended or len(self._items) < self._maxsize
            )
            if self._ended:
                return
            self._items.append(event)
            self._changed.notify_all()

    async def end(self, last: Event | None = None) -> None:
        """Append ``last`` (over the bound) and end the stream."""
        async with self._changed:
            if self._ended:
                return
            if last is not None:
                self._items.append(last)
            self._ended = True
            self._changed.notify_all()

    async def get(self) -> Event | None:
        """Return the next event, or ``None`` once the stream has ended and is empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._ended or bool(self._items))
            if not self._items:
                return None
            event = self._items.popleft()
            self._changed.notify_all()
            return event
