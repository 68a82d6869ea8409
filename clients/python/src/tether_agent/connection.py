"""One WebSocket connection to the server: open, register, then serve.

A :class:`Connection` answers the server's pings, matches answers to its requests by
``request_id``, watches for a half-open connection (its own ``ping_agent`` after a
quiet spell, see :class:`~tether_agent.config.Keepalive`) and hands every other frame
to the handler it was started with. It never reconnects: when it ends,
:meth:`Connection.wait_ended` says how, and :class:`~tether_agent.agent.Agent` decides
what comes next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol
from .config import Keepalive
from .errors import ConnectionFailed, RequestFailed
from .events import Instruction, Message, Notification, Registration, ServerError

log = logging.getLogger(__name__)

Delivered = Message | Notification | Instruction | ServerError
"""Frames a connection hands to its handler."""

Handler = Callable[["Connection", Delivered], Awaitable[None]]
"""Called, and awaited, for each delivered frame, in order."""

EndCause = Literal["closed", "lost", "keepalive", "leaving", "aborted"]


@dataclass(frozen=True)
class Ended:
    """How a connection ended.

    ``close_code``/``reason`` come from the server's close frame (``close_code`` is
    ``None`` when none arrived). ``cause``: ``closed`` (a close handshake),
    ``lost`` (no close frame), ``keepalive`` (dropped as half-open), ``leaving``
    (we left after ``network_shutdown``), ``aborted`` (dropped by us otherwise).
    ``replaced`` is true when the server said ``connection_replaced``.
    """

    close_code: int | None
    reason: str
    cause: EndCause
    replaced: bool


class Connection:
    """One registered (or registering) WebSocket connection."""

    def __init__(self, ws: ClientConnection, url: str, request_timeout: float) -> None:
        """Wrap an open WebSocket; use :meth:`open` to make one."""
        self._ws = ws
        self.url = url
        self._request_timeout = request_timeout
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ended: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._last_received = time.monotonic()
        self._handling = False
        self._cause: EndCause | None = None
        self._replaced = False

    @classmethod
    async def open(
        cls, url: str, connect_timeout: float, request_timeout: float
    ) -> Connection:
        """Open the WebSocket; raise :class:`ConnectionFailed` when it cannot be."""
        try:
            ws = await connect(
                url,
                open_timeout=connect_timeout,
                close_timeout=connect_timeout,
                ping_interval=None,  # the keepalive is ping_agent, at application level
                max_size=None,  # the server bounds its frames
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as error:
            raise ConnectionFailed(f"cannot connect to {url}: {error!r}") from error
        except Exception as error:  # anything else the handshake may raise
            raise ConnectionFailed(f"cannot connect to {url}: {error!r}") from error
        return cls(ws, url, request_timeout)

    # --- Registration (before serve) ---------------------------------------------

    async def register(
        self,
        agent_id: str,
        metadata: Mapping[str, Any],
        certificate: Mapping[str, Any] | None,
        force_reconnect: bool,
    ) -> Registration:
        """Send ``register_agent`` and wait for its answer (before :meth:`start`).

        Raises :class:`~tether_agent.errors.RegistrationRefused` on a refusal (the
        socket may still be open: the caller may try again on it) and
        :class:`ConnectionFailed` when the connection ends or no answer comes within
        the request timeout.
        """
        request_id = protocol.new_id()
        frame = protocol.register(agent_id, metadata, certificate, force_reconnect, request_id)
        await self.send(frame)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout
        while True:
            remaining = deadline - loop.time()
            try:
                text = await asyncio.wait_for(self._ws.recv(), max(remaining, 0.0))
            except TimeoutError as error:
                raise ConnectionFailed(
                    f"no answer to register_agent within {self._request_timeout} s"
                ) from error
            except ConnectionClosed as error:
                raise ConnectionFailed(f"connection ended while registering: {error}") from error
            self._last_received = time.monotonic()
            if not isinstance(text, str):
                continue
            inbound = protocol.parse(text)
            if isinstance(inbound, protocol.Ping):
                await self.send(protocol.pong(inbound.timestamp))
            elif isinstance(inbound, protocol.Response) and inbound.command == "register_agent":
                if inbound.request_id not in (None, request_id):
                    continue
                return protocol.registration(inbound)
            else:
                log.debug("before registration, ignored: %s", text[:200])

    # --- Serving -----------------------------------------------------------------

    def start(
        self, handler: Handler, on_ping: Callable[[], None], keepalive: Keepalive
    ) -> None:
        """Start reading frames (handing them to ``handler``) and the keepalive."""
        self._reader = asyncio.create_task(self._read_loop(handler, on_ping))
        self._keeper = asyncio.create_task(self._keepalive(keepalive))

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Write one frame; raise :class:`ConnectionFailed` if the connection is closed."""
        try:
            await self._ws.send(protocol.encode(frame))
        except ConnectionClosed as error:
            raise ConnectionFailed(f"connection closed: {error}") from error

    async def request(self, command: str, **fields: Any) -> dict[str, Any]:
        """Send a system request and return its successful answer (the whole frame).

        Raises :class:`RequestFailed` when the server refuses it, and
        :class:`ConnectionFailed` when the connection ends first or no answer comes
        within the request timeout.
        """
        if self._ended.done():
            raise ConnectionFailed("connection closed")
        request_id = protocol.new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send(protocol.request(command, request_id, **fields))
            try:
                frame = await asyncio.wait_for(future, self._request_timeout)
            except TimeoutError as error:
                raise ConnectionFailed(
                    f"no answer to {command} within {self._request_timeout} s"
                ) from error
        finally:
            self._pending.pop(request_id, None)
        if frame.get("success") is not True:
            code = frame.get("error_code")
            raise RequestFailed(
                command,
                code if isinstance(code, str) else None,
                str(frame.get("error") or "request refused"),
            )
        return frame

    def leave(self, reason: str) -> None:
        """Close the connection (1000) in the background, as a planned departure."""
        if self._cause is None:
            self._cause = "leaving"
        task = asyncio.create_task(self._ws.close(1000, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Close the connection (1000) and wait, bounded, for the server's close."""
        with contextlib.suppress(Exception):
            await self._ws.close(1000, "agent closed")

    def abort(self) -> None:
        """Drop the TCP connection at once, without a close handshake."""
        if self._cause is None:
            self._cause = "aborted"
        self._ws.transport.abort()

    async def wait_ended(self) -> Ended:
        """Wait until the connection has ended (its reader has stopped)."""
        return await asyncio.shield(self._ended)

    @property
    def ended(self) -> bool:
        """Whether the connection has ended."""
        return self._ended.done()

    async def _read_loop(self, handler: Handler, on_ping: Callable[[], None]) -> None:
        try:
            async for text in self._ws:
                self._last_received = time.monotonic()
                if not isinstance(text, str):
                    continue
                inbound = protocol.parse(text)
                if isinstance(inbound, protocol.Ping):
                    with contextlib.suppress(ConnectionFailed):
                        await self.send(protocol.pong(inbound.timestamp))
                        on_ping()
                elif isinstance(inbound, protocol.Response):
                    future = self._pending.get(inbound.request_id or "")
                    if future is not None and not future.done():
                        future.set_result(inbound.frame)
                elif isinstance(inbound, protocol.Unknown):
                    log.debug("ignored frame: %s", inbound.text[:200])
                else:
                    if isinstance(inbound, Notification) and inbound.event == (
                        "connection_replaced"
                    ):
                        self._replaced = True
                    self._handling = True
                    try:
                        await handler(self, inbound)
                    finally:
                        self._handling = False
                        self._last_received = time.monotonic()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection reader failed; dropping the connection")
            self.abort()
        finally:
            self._finish()

    def _finish(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionFailed("connection lost before the answer"))
        if self._keeper is not None:
            self._keeper.cancel()
        if self._ended.done():
            return
        received = self._ws.protocol.close_rcvd
        if received is not None:
            code: int | None = received.code
            reason = received.reason or f"closed by the server ({received.code})"
        else:
            code = None
            reason = "connection lost"
        cause: EndCause = self._cause or ("closed" if received is not None else "lost")
        if cause == "keepalive":
            reason = "keepalive: no frame from the server in time (half-open connection)"
        self._ended.set_result(Ended(code, reason, cause, self._replaced))

    async def _keepalive(self, keepalive: Keepalive) -> None:
        while True:
            quiet = time.monotonic() - self._last_received
            if quiet < keepalive.idle or self._handling:
                await asyncio.sleep(max(keepalive.idle - quiet, 0.05))
                continue
            sent_at = time.monotonic()
            ping = protocol.request("ping_agent", protocol.new_id(), timestamp=time.time())
            with contextlib.suppress(ConnectionFailed, TimeoutError):
                await asyncio.wait_for(self.send(ping), keepalive.timeout)
            await asyncio.sleep(max(sent_at + keepalive.timeout - time.monotonic(), 0.0))
            if self._last_received < sent_at and not self._handling:
                log.warning(
                    "no frame within %.3g s of our ping: the connection is dead, dropping it",
                    keepalive.timeout,
                )
                self._cause = "keepalive"
                self._ws.transport.abort()
                return
