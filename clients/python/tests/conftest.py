"""Fixtures: real tether servers, TCP proxies and agents, torn down after each test."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from support import Proxy, Server, server_binary

from tether_agent import Agent

ServerFactory = Callable[..., Awaitable[Server]]
ProxyFactory = Callable[[Server], Awaitable[Proxy]]

_counter = itertools.count()


@pytest_asyncio.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Give a factory that starts servers with ``TETHER__...`` overrides as keywords."""
    try:
        binary = server_binary()
    except FileNotFoundError as error:
        pytest.fail(str(error))
    servers: list[Server] = []

    async def start(**env: str) -> Server:
        workdir = tmp_path / f"server-{next(_counter)}"
        workdir.mkdir()
        server = Server(binary, env, workdir)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.kill()


@pytest_asyncio.fixture
async def server(start_server: ServerFactory) -> Server:
    """Start a server with the default settings."""
    return await start_server()


@pytest_asyncio.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    """Give a factory that starts a TCP proxy in front of a server."""
    proxies: list[Proxy] = []

    async def start(server: Server) -> Proxy:
        proxy = Proxy(server.port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.close()


@pytest_asyncio.fixture
async def agents() -> AsyncIterator[list[Agent]]:
    """Collect the test's agents and close each at teardown."""
    made: list[Agent] = []
    yield made
    for agent in made:
        with contextlib.suppress(Exception):
            await agent.close()
