"""Test support: a real tether server process, an HTTP client, an SSE reader, a TCP proxy.

Nothing here sleeps to synchronise: waits are for a condition, with a deadline
(:data:`DEADLINE`) that only bounds a broken run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tether_agent import Agent, Event

DEADLINE = 20.0
"""Longest any single wait in a test may take."""

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_BIN = PACKAGE_DIR.parents[1] / "target" / "debug" / "tether"

E = TypeVar("E")


def server_binary() -> Path:
    """Return the server binary (env ``TETHER_BIN``), failing clearly if it is missing."""
    path = Path(os.environ.get("TETHER_BIN", str(DEFAULT_BIN)))
    if not path.is_file():
        raise FileNotFoundError(
            f"tether server binary not found at {path}: build it with `cargo build` "
            "(or set TETHER_BIN to its path)"
        )
    return path


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2:
        raise ConnectionError(f"bad HTTP status line {status_line!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, headers
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()


class Server:
    """A running ``tether`` process on a free port, with its own SQLite file."""

    def __init__(self, binary: Path, env: Mapping[str, str], workdir: Path) -> None:
        """Prepare (not start) a server; ``env`` overrides the test defaults."""
        self.binary = binary
        self.workdir = workdir
        self.env = {
            **os.environ,
            "RUST_LOG": "info",
            "TETHER__NETWORK__PORT": "0",
            "TETHER__STORAGE__URL": f"sqlite://{workdir / 'tether.db'}",
            "TETHER__IDENTITY__SECRET": "python-client-tests-secret-0123456789abcdef",
            "TETHER__SHUTDOWN__TIMEOUT": "5",
            **env,
        }
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self._drain: asyncio.Task[None] | None = None
        self._log_path = workdir / "server.log"

    @property
    def addr(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT/``."""
        return f"ws://{self.addr}/"

    def logs(self) -> str:
        """Return what the server wrote to stderr so far."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        """Start the process (on ``self.port`` if set, else a free one)."""
        env = dict(self.env)
        if self.port:
            env["TETHER__NETWORK__PORT"] = str(self.port)
        with open(self._log_path, "ab") as log:  # noqa: ASYNC230 (a local file, once)
            self.process = await asyncio.create_subprocess_exec(
                str(self.binary),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), DEADLINE)
        except TimeoutError:
            line = b""
        text = line.decode().strip()
        prefix = "tether listening on http://"
        if not text.startswith(prefix):
            await self.kill()
            raise RuntimeError(f"server did not start: first line {text!r}; logs:\n{self.logs()}")
        self.port = int(text.rsplit(":", 1)[1])
        stdout = self.process.stdout

        async def drain() -> None:
            while await stdout.read(65536):
                pass

        self._drain = asyncio.create_task(drain())

    async def stop(self) -> int | None:
        """SIGTERM the server and wait for it to exit; return its exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), DEADLINE)
        except TimeoutError:
            process.kill()
            code = await process.wait()
        if self._drain is not None:
            self._drain.cancel()
        return code

    async def kill(self) -> None:
        """SIGKILL the server (teardown)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.returncode is None:
            process.kill()
        await process.wait()
        if self._drain is not None:
            self._drain.cancel()

    async def restart(self) -> None:
        """SIGTERM, wait, and start again on the same port with the same env and db."""
        await self.stop()
        await self.start()

    async def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Make one HTTP request to the admin API; return (status, JSON body or None)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {self.addr}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
            status, headers = await asyncio.wait_for(_read_head(reader), DEADLINE)
            data = await asyncio.wait_for(_read_body(reader, headers), DEADLINE)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return status, (json.loads(data) if data.strip() else None)


class EventLog:
    """The server's lifecycle events, read from ``GET /events`` (server-sent events)."""

    def __init__(self) -> None:
        """Make an empty log; :meth:`open` subscribes."""
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, server: Server) -> EventLog:
        """Subscribe and return once the server says the subscription is live."""
        log = cls()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        log._writer = writer
        writer.write(
            f"GET /events HTTP/1.1\r\nHost: {server.addr}\r\nAccept: text/event-stream\r\n\r\n"
            .encode()
        )
        await writer.drain()
        status, headers = await asyncio.wait_for(_read_head(reader), DEADLINE)
        assert status == 200, f"GET /events answered {status}"
        subscribed = asyncio.get_running_loop().create_future()
        log._task = asyncio.create_task(log._read(reader, headers, subscribed))
        await asyncio.wait_for(subscribed, DEADLINE)
        return log

    async def _read(
        self,
        reader: asyncio.StreamReader,
        headers: dict[str, str],
        subscribed: asyncio.Future[None],
    ) -> None:
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        buffer = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    return
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                buffer += await reader.readexactly(size)
                await reader.readexactly(2)
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.decode().splitlines():
                    if line.startswith(":") and not subscribed.done():
                        subscribed.set_result(None)
                    if line.startswith("data:"):
                        event = json.loads(line[5:].strip())
                        async with self._changed:
                            self.events.append(event)
                            self._changed.notify_all()

    def matching(self, type_: str, **data: Any) -> list[dict[str, Any]]:
        """Events of ``type_`` whose ``data`` has every given key with that value."""
        return [
            e
            for e in self.events
            if e.get("type") == type_
            and all(e.get("data", {}).get(k) == v for k, v in data.items())
        ]

    async def wait_for(self, type_: str, **data: Any) -> dict[str, Any]:
        """Wait (bounded) for the first event matching ``type_`` and ``data``."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: bool(self.matching(type_, **data))), DEADLINE
            )
        return self.matching(type_, **data)[0]

    async def close(self) -> None:
        """Unsubscribe."""
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


class Proxy:
    """A TCP proxy in front of the server, whose open connections can be frozen.

    After :meth:`freeze`, the connections open at that moment forward nothing more in
    either direction but stay open (half-open as both ends see it); new connections
    are forwarded normally.
    """

    def __init__(self, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        """Prepare a proxy to ``127.0.0.1:target_port``; :meth:`start` listens.

        With ``tls``, clients speak TLS to the proxy (it terminates it).
        """
        self.target_port = target_port
        self.tls = tls
        self.port = 0
        self._server: asyncio.Server | None = None
        self._live: list[tuple[list[asyncio.Task[None]], list[asyncio.StreamWriter]]] = []
        self._frozen: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.paused = False

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT/`` of the proxy."""
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.paused:
            client_w.close()
            return
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        pumps = [
            asyncio.create_task(self._pump(client_r, upstream_w)),
            asyncio.create_task(self._pump(upstream_r, client_w)),
        ]
        self._live.append((pumps, [client_w, upstream_w]))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()

    def pause(self) -> None:
        """Close new connections at once (until :meth:`resume`)."""
        self.paused = True

    def resume(self) -> None:
        """Forward new connections again."""
        self.paused = False

    def drop(self) -> None:
        """Close every open connection at once (new ones are forwarded)."""
        for pumps, writers in self._live:
            for pump in pumps:
                pump.cancel()
            for writer in writers:
                writer.transport.abort()
        self._live.clear()

    def freeze(self) -> None:
        """Stop forwarding on every open connection, keeping them open."""
        for pumps, writers in self._live:
            for pump in pumps:
                pump.cancel()
            self._frozen.extend(writers)
        self._live.clear()

    async def close(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
        for pumps, writers in self._live:
            for pump in pumps:
                pump.cancel()
            self._frozen.extend(writers)
        for writer in self._frozen:
            writer.close()


async def next_event(agent: Agent) -> Event:
    """Return the agent's next event, within the deadline (fail if the stream ended)."""
    event = await asyncio.wait_for(agent.next_event(), DEADLINE)
    assert event is not None, "the agent stopped"
    return event


async def next_of(
    agent: Agent,
    kind: type[E],
    where: Callable[[E], bool] = lambda _: True,
    skipped: list[Event] | None = None,
) -> E:
    """Skip events (recording them in ``skipped``) until one of ``kind`` matching ``where``."""

    async def find() -> E:
        while True:
            event = await agent.next_event()
            assert event is not None, "the agent stopped"
            if isinstance(event, kind) and where(event):
                return event
            if skipped is not None:
                skipped.append(event)

    return await asyncio.wait_for(find(), DEADLINE)
