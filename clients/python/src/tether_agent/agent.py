"""The agent handle: one identity kept online across connections.

:class:`Agent` owns the current :class:`~tether_agent.connection.Connection`, the
reconnect loop (``tenacity``: exponential backoff with jitter, bounded), the
certificate, the queue of outgoing commands and the stream of events.

Delivery guarantees, as built:

- Instructions are delivered by the server at least once; within one process the
  application sees each ``instruction_id`` once. A redelivery of an instruction the
  application has acknowledged is answered again with the same ack automatically.
- Messages (``send_direct``, ``broadcast``) have no acknowledgement in the protocol: a
  message written to a connection that then dies is lost. A command issued while the
  agent is disconnected waits (in a bounded queue) and is written after it reconnects.
- Events wait for the application in a bounded queue (1 024); an application that
  stops reading events stops the agent reading its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import protocol
from .certificate import CertificateStore, claim, keep_renewing
from .config import AgentConfig, Keepalive
from .connection import Connection, Delivered, Ended
from .errors import (
    AgentStopped,
    ConnectionFailed,
    ErrorCode,
    RegistrationRefused,
    RequestFailed,
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
from .instructions import InstructionLedger, Verdict
from .reconnect import retrying
from .stream import EventStream

log = logging.getLogger(__name__)

COMMAND_QUEUE_SIZE = 1024
"""Commands (messages, acks) that may wait for a connection before callers block."""

STOP_CLOSE_CODES = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010, 4001})
"""Close codes after which the agent stops for good instead of reconnecting."""

LIST_PAGE_SIZE = 100
"""Entries per ``list_agents`` page (a page costs 1 + 10 of the server's default 100
requests per second)."""

LIST_PAUSE = 0.12
"""Seconds to wait after a page refused ``rate_limited``: what its cost takes to refill."""

LIST_RETRIES = 20
"""Pages refused ``rate_limited`` in a row before :meth:`Agent.list_agents` fails."""


@dataclass
class _Outgoing:
    frame: dict[str, Any]
    written: asyncio.Future[None]


class Agent:
    """A connected agent. Make one with :meth:`Agent.connect`."""

    def __init__(self, config: AgentConfig) -> None:
        """Prepare an agent without connecting (use :meth:`connect`)."""
        self._config = config
        self._certificates = CertificateStore(config.certificate_file)
        self._events = EventStream()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue(COMMAND_QUEUE_SIZE)
        self._held: _Outgoing | None = None
        self._ledger = InstructionLedger()
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._connected_at = 0.0
        self._attempts = 0
        """Reconnect attempts since the last connection that lasted ``max_delay``."""
        self._runner: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[Connection] | None = None
        self._registration: Registration | None = None
        self._shutdown_url: str | None = None
        self._closing = False
        self._stopped = False
        self._pings_answered = 0
        self._reconnects = 0
        self._messages_received = 0
        self._instructions_received = 0

    # --- Life --------------------------------------------------------------------

    @classmethod
    async def connect(cls, config: AgentConfig) -> Agent:
        """Connect and register, in one attempt, and return the running agent.

        Raises :class:`~tether_agent.errors.RegistrationRefused` when the server
        refuses the registration and :class:`~tether_agent.errors.ConnectionFailed`
        when no connection can be made. Once connected, the agent reconnects by
        itself (see :class:`~tether_agent.config.ReconnectPolicy`).
        """
        agent = cls(config)
        connection = await agent._establish(config.url, first=True)
        agent._runner = asyncio.create_task(agent._run(connection))
        return agent

    async def close(self) -> None:
        """Leave: close the connection (1000) and stop for good.

        Waits, bounded by ``connect_timeout``, for the server's close. Idempotent.
        """
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        connection = self._conn
        if connection is not None and not connection.ended:
            await connection.close()
        if self._runner is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._runner), self._config.connect_timeout)
            if not self._runner.done():
                self._runner.cancel()
        await self._stop(Disconnected(1000, "closed by the application", False))

    async def __aenter__(self) -> Agent:
        """Return the agent itself (``async with await Agent.connect(c) as agent``)."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the agent."""
        await self.close()

    # --- State -------------------------------------------------------------------

    @property
    def registration(self) -> Registration:
        """The registration of the current (or last) connection."""
        assert self._registration is not None, "Agent.connect registers before returning"
        return self._registration

    @property
    def certificate(self) -> dict[str, Any] | None:
        """The identity certificate the agent holds, or ``None``."""
        return self._certificates.certificate

    @property
    def stats(self) -> AgentStats:
        """A snapshot of the agent's counters."""
        return AgentStats(
            pings_answered=self._pings_answered,
            reconnects=self._reconnects,
            messages_received=self._messages_received,
            instructions_received=self._instructions_received,
        )

    @property
    def connected(self) -> bool:
        """Whether the agent is registered on a live connection right now."""
        return self._connected.is_set()

    @property
    def stopped(self) -> bool:
        """Whether the agent has stopped for good."""
        return self._stopped

    # --- Commands ----------------------------------------------------------------

    async def send_direct(self, target_agent_id: str, content: Any) -> str:
        """Send a direct message and return its ``message_id``.

        Returns once the frame is written to a connection (it waits for one while
        disconnected). There is no delivery acknowledgement: a refusal comes later as
        a :class:`~tether_agent.events.ServerError` with this ``message_id``
        (``unknown_agent``), and a message written to a connection that then dies is
        lost. Raises :class:`~tether_agent.errors.AgentStopped` once stopped.
        """
        message_id = protocol.new_id()
        await self._command(protocol.direct_message(target_agent_id, content, message_id))
        return message_id

    async def broadcast(self, content: Any, exclude: Sequence[str] | None = None) -> str:
        """Send a message to every other agent but ``exclude``; return its ``message_id``.

        Same delivery rules as :meth:`send_direct`.
        """
        message_id = protocol.new_id()
        await self._command(protocol.broadcast_message(content, message_id, exclude))
        return message_id

    async def ack(self, instruction_id: str, status: AckStatus, result: Any = None) -> None:
        """Acknowledge an instruction (``done``, ``failed`` or ``rejected``).

        While disconnected the ack waits and is sent on the next connection. If the
        server delivers the instruction again (the ack was lost), the same ack is sent
        again automatically. Success is silent; a refusal comes as a
        :class:`~tether_agent.events.ServerError` with this ``instruction_id``.
        """
        status = AckStatus(status)
        self._ledger.acked(instruction_id, status, result)
        await self._command(protocol.instruction_ack(instruction_id, status, result))

    async def list_agents(self) -> list[dict[str, Any]]:
        """Return every registered agent (all pages), as the server describes them.

        Waits up to ``request_timeout`` for a connection. Raises
        :class:`~tether_agent.errors.RequestFailed` when the server refuses and
        :class:`~tether_agent.errors.ConnectionFailed` when the connection is lost.
        """
        agents: list[dict[str, Any]] = []
        cursor: str | None = None
        refused = 0
        while True:
            connection = await self._live_connection()
            fields: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if cursor is not None:
                fields["cursor"] = cursor
            try:
                page = await connection.request("list_agents", **fields)
            except RequestFailed as error:
                if error.error_code != ErrorCode.RATE_LIMITED or refused >= LIST_RETRIES:
                    raise
                refused += 1
                await asyncio.sleep(LIST_PAUSE)
                continue
            refused = 0
            agents.extend(a for a in page.get("agents") or [] if isinstance(a, dict))
            next_cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(next_cursor, str):
                return agents
            cursor = next_cursor

    # --- Events ------------------------------------------------------------------

    async def next_event(self) -> Event | None:
        """Return the next event, or ``None`` once the agent has stopped for good."""
        return await self._events.get()

    def __aiter__(self) -> Agent:
        """Iterate over the events (the same stream as :meth:`next_event`)."""
        return self

    async def __anext__(self) -> Event:
        """Return the next event; stop once the agent has stopped for good."""
        event = await self._events.get()
        if event is None:
            raise StopAsyncIteration
        return event

    # --- Internals: connecting ---------------------------------------------------

    async def _establish(self, url: str, first: bool) -> Connection:
        """Open a connection, register, start serving it and keep the certificate."""
        config = self._config
        connection = await Connection.open(url, config.connect_timeout, config.request_timeout)
        certificate = self._certificates.certificate
        try:
            try:
                registration = await connection.register(
                    config.agent_id,
                    config.registration_metadata(),
                    certificate,
                    config.force_reconnect,
                )
            except RegistrationRefused as refusal:
                if certificate is None or refusal.error_code != ErrorCode.INVALID_CERTIFICATE:
                    raise
                log.warning("certificate refused (%s): forgetting it", refusal.message)
                self._certificates.forget()
                certificate = None
                registration = await connection.register(
                    config.agent_id,
                    config.registration_metadata(),
                    None,
                    config.force_reconnect,
                )
        except BaseException:
            connection.abort()
            raise
        self._registration = registration
        self._conn = connection
        self._connected_at = time.monotonic()
        self._shutdown_url = None
        if not first:
            self._reconnects += 1
            await self._events.put(Reconnected(registration))
        keepalive = config.keepalive or Keepalive(
            idle=registration.heartbeat_interval + registration.ping_timeout,
            timeout=registration.ping_timeout,
        )
        connection.start(self._dispatch, self._ping_answered, keepalive)
        self._writer = asyncio.create_task(self._write_loop(connection))
        self._connected.set()
        if certificate is None or self._certificates.needs_renewal():
            await claim(self._certificates, connection, config.agent_id)
        self._renewer = asyncio.create_task(
            keep_renewing(self._certificates, connection, config.agent_id)
        )
        return connection

    async def _reconnect(self) -> Connection:
        """Reconnect with backoff; raise the last error when giving up."""
        policy = self._config.reconnect
        carried = self._attempts
        left = None if policy.max_attempts is None else policy.max_attempts - carried
        if left is not None and left <= 0:
            raise ConnectionFailed(
                f"{carried} reconnect attempts since the last connection that lasted "
                f"{policy.max_delay} s"
            )
        await asyncio.sleep(policy.delay(carried + 1))
        async for attempt in retrying(policy, carried, left):
            with attempt:
                number = attempt.retry_state.attempt_number
                self._attempts = carried + number
                url = self._config.url
                if self._shutdown_url is not None and number % 2 == 1:
                    url = self._shutdown_url
                return await self._establish(url, first=False)
        raise AssertionError("unreachable: tenacity either returns or raises")

    # --- Internals: running ------------------------------------------------------

    async def _run(self, connection: Connection) -> None:
        """Serve connections one after another until the agent stops for good."""
        try:
            while True:
                ended = await connection.wait_ended()
                self._disconnected()
                if time.monotonic() - self._connected_at >= self._config.reconnect.max_delay:
                    self._attempts = 0
                if self._should_stop(ended):
                    await self._stop(Disconnected(ended.close_code, ended.reason, False))
                    return
                log.info("connection ended (%s, %s): reconnecting", ended.close_code, ended.reason)
                await self._events.put(Disconnected(ended.close_code, ended.reason, True))
                if self._closing:
                    await self._stop(Disconnected(None, "closed by the application", False))
                    return
                self._reconnecting = asyncio.create_task(self._reconnect())
                await asyncio.wait({self._reconnecting})
                task, self._reconnecting = self._reconnecting, None
                if task.cancelled():
                    await self._stop(Disconnected(None, "closed by the application", False))
                    return
                error = task.exception()
                if error is not None:
                    reason = f"gave up reconnecting: {error}"
                    log.warning("%s", reason)
                    await self._stop(Disconnected(None, reason, False))
                    return
                connection = task.result()
                if self._closing:
                    await connection.close()
        except Exception as error:
            log.exception("agent loop failed")
            await self._stop(Disconnected(None, f"internal error: {error!r}", False))

    def _should_stop(self, ended: Ended) -> bool:
        if self._closing or ended.replaced:
            return True
        if ended.cause in ("keepalive", "leaving"):
            return False
        return ended.close_code in STOP_CLOSE_CODES

    def _disconnected(self) -> None:
        self._connected.clear()
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def _stop(self, last: Disconnected) -> None:
        """Stop for good: end the event stream with ``last``, fail waiting commands."""
        if self._stopped:
            return
        self._stopped = True
        self._disconnected()
        if self._conn is not None and not self._conn.ended:
            self._conn.abort()
        stopped = AgentStopped(f"the agent has stopped: {last.reason}")
        if self._held is not None and not self._held.written.done():
            self._held.written.set_exception(stopped)
        self._held = None
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if not item.written.done():
                item.written.set_exception(stopped)
        await self._events.end(last)

    async def _command(self, frame: dict[str, Any]) -> None:
        if self._stopped:
            raise AgentStopped()
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._outbox.put(_Outgoing(frame, written))
        if self._stopped and not written.done():
            raise AgentStopped()
        await written

    async def _write_loop(self, connection: Connection) -> None:
        """Write queued commands, in order, to ``connection`` until it fails."""
        while True:
            if self._held is None:
                self._held = await self._outbox.get()
            item = self._held
            if item.written.done():  # its caller gave up waiting
                self._held = None
                continue
            try:
                await connection.send(item.frame)
            except ConnectionFailed:
                return  # kept in self._held for the next connection
            self._held = None
            item.written.set_result(None)

    async def _live_connection(self) -> Connection:
        if self._stopped:
            raise AgentStopped()
        try:
            await asyncio.wait_for(self._connected.wait(), self._config.request_timeout)
        except TimeoutError as error:
            raise ConnectionFailed("not connected") from error
        assert self._conn is not None
        return self._conn

    def _ping_answered(self) -> None:
        self._pings_answered += 1

    async def _dispatch(self, connection: Connection, frame: Delivered) -> None:
        """Handle a frame the connection delivered (called in order, awaited)."""
        if isinstance(frame, Message):
            self._messages_received += 1
            await self._events.put(frame)
        elif isinstance(frame, Instruction):
            await self._instruction(connection, frame)
        elif isinstance(frame, Notification):
            if frame.event == "network_shutdown":
                self._shutdown_url = frame.reconnect_url
                log.info("network shutting down: leaving to reconnect")
                connection.leave("network shutdown")
            await self._events.put(frame)
        elif isinstance(frame, ServerError):
            if (
                frame.error_code == ErrorCode.INSTRUCTION_FINISHED
                and frame.instruction_id is not None
                and self._ledger.swallow_finished(frame.instruction_id)
            ):
                return
            await self._events.put(frame)

    async def _instruction(self, connection: Connection, instruction: Instruction) -> None:
        verdict = self._ledger.received(instruction.instruction_id)
        if verdict is Verdict.DELIVER:
            self._instructions_received += 1
            await self._events.put(instruction)
        elif verdict is Verdict.REACK:
            ack = self._ledger.ack_of(instruction.instruction_id)
            assert ack is not None
            self._ledger.reacked(instruction.instruction_id)
            log.info("instruction %s delivered again: re-acking", instruction.instruction_id)
            frame = protocol.instruction_ack(instruction.instruction_id, ack.status, ack.result)
            with contextlib.suppress(ConnectionFailed):
                await connection.send(frame)
