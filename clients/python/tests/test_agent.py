"""The client against a real tether server.

Registration, messages, pings, reconnects, instructions and refusals.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import ProxyFactory, ServerFactory
from support import DEADLINE, PACKAGE_DIR, EventLog, Proxy, Server, next_event, next_of

from tether_agent import (
    INSTRUCTIONS_CAPABILITY,
    AckStatus,
    Agent,
    AgentConfig,
    AgentStopped,
    ConnectionFailed,
    Disconnected,
    Event,
    Instruction,
    Keepalive,
    Message,
    Notification,
    Reconnected,
    ReconnectPolicy,
    RegistrationRefused,
    ServerError,
)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.5)


async def connect(agents: list[Agent], url: str, agent_id: str, **options: Any) -> Agent:
    """Connect an agent (closed at teardown by the ``agents`` fixture)."""
    options.setdefault("reconnect", FAST)
    agent = await Agent.connect(AgentConfig(url=url, agent_id=agent_id, **options))
    agents.append(agent)
    return agent


async def test_registers_and_exchanges_direct_and_broadcast_messages(
    server: Server, agents: list[Agent]
) -> None:
    alice = await connect(agents, server.ws_url, "alice", name="Alice", capabilities=["chat"])
    bob = await connect(agents, server.ws_url, "bob")
    carol = await connect(agents, server.ws_url, "carol")

    reg = alice.registration
    assert reg.agent_id == "alice"
    assert reg.incarnation == 1
    assert reg.session_id and reg.session_id != bob.registration.session_id
    assert (reg.heartbeat_interval, reg.ping_timeout, reg.agent_timeout) == (30.0, 5.0, 90.0)
    assert (reg.network_name, reg.network_id) == ("Tether", "tether-1")
    assert alice.certificate is not None and alice.certificate["agent_id"] == "alice"

    mid = await bob.send_direct("alice", {"text": "hi"})
    got = await next_of(alice, Message)
    assert (got.message_id, got.sender_id, got.kind) == (mid, "bob", "direct")
    assert got.content == {"text": "hi"}
    assert isinstance(got.timestamp, int)
    assert got.data["target_agent_id"] == "alice"

    bid = await alice.broadcast({"text": "to all"}, exclude=["carol"])
    marker = await alice.send_direct("carol", "after the broadcast")
    got = await next_of(bob, Message)
    assert (got.message_id, got.sender_id, got.kind) == (bid, "alice", "broadcast")
    assert got.content == {"text": "to all"}
    # Messages from one agent arrive in order: carol's first is the marker, so the
    # broadcast that came before it skipped her.
    first = await next_event(carol)
    assert isinstance(first, Message) and first.message_id == marker

    listed = {a["agent_id"]: a for a in await bob.list_agents()}
    assert set(listed) == {"alice", "bob", "carol"}
    assert listed["alice"]["metadata"]["capabilities"] == ["chat"]
    assert listed["alice"]["name"] == "Alice"

    unknown = await alice.send_direct("nobody", "x")
    error = await next_of(alice, ServerError)
    assert (error.error_code, error.message_id) == ("unknown_agent", unknown)

    await carol.close()
    last = await next_event(carol)
    assert isinstance(last, Disconnected) and not last.reconnecting
    assert await carol.next_event() is None
    with pytest.raises(AgentStopped):
        await carol.send_direct("alice", "too late")
    await carol.close()  # idempotent


def _rust_echo() -> str:
    path = os.environ.get("TETHER_RUST_ECHO")
    if not path:
        pytest.fail(
            "TETHER_RUST_ECHO is not set: it names the Rust echo example, which "
            "scripts/test.sh builds with `cargo build -p tether-client --examples` "
            "(target/debug/examples/echo)"
        )
    if not Path(path).is_file():
        pytest.fail(f"TETHER_RUST_ECHO={path} does not exist: run scripts/test.sh")
    return path


async def _echo_roundtrip(
    command: list[str], server: Server, agents: list[Agent], echo_id: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, "--url", server.ws_url, "--agent-id", echo_id, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
        assert line.decode().split() == ["registered", echo_id, "1"]
        me = await connect(agents, server.ws_url, f"asks-{echo_id}")
        mid = await me.send_direct(echo_id, {"text": "ping", "n": 1})
        reply = await next_of(me, Message)
        assert reply.sender_id == echo_id
        assert reply.content == {"echo": {"text": "ping", "n": 1}}
        assert reply.message_id != mid

        log = await EventLog.open(server)
        status, created = await server.http(
            "POST", f"/agents/{echo_id}/instructions", {"payload": {"job": 7}}
        )
        assert status == 201, created
        done = await log.wait_for("instruction.done", instruction_id=created["instruction_id"])
        assert done["data"]["result"] == {"echoed": {"job": 7}}
        await log.close()

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), DEADLINE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_exchanges_messages_with_the_rust_echo_example(
    server: Server, agents: list[Agent]
) -> None:
    await _echo_roundtrip([_rust_echo()], server, agents, "rust-echo")


async def test_python_echo_example_keeps_its_contract(server: Server, agents: list[Agent]) -> None:
    script = str(PACKAGE_DIR / "examples" / "echo.py")
    await _echo_roundtrip([sys.executable, script], server, agents, "py-echo")


async def test_answers_pings_for_three_intervals_without_going_stale(
    start_server: ServerFactory, agents: list[Agent]
) -> None:
    # ping_timeout must be below the interval (the server refuses 1 and 1).
    server = await start_server(
        TETHER__HEARTBEAT__INTERVAL="1", TETHER__HEARTBEAT__PING_TIMEOUT="0.5"
    )
    log = await EventLog.open(server)
    agent = await connect(agents, server.ws_url, "quiet")

    async def three_pings() -> None:
        while agent.stats.pings_answered < 3:  # noqa: ASYNC110 (a counter: polled, bounded)
            await asyncio.sleep(0.05)

    await asyncio.wait_for(three_pings(), DEADLINE)
    assert not log.matching("agent.stale", agent_id="quiet")
    assert not log.matching("agent.disconnected", agent_id="quiet")
    assert [e["data"]["incarnation"] for e in log.matching("agent.registered")] == [1]
    status, described = await server.http("GET", "/agents/quiet")
    assert status == 200 and described["incarnation"] == 1
    assert agent.registration.incarnation == 1 and agent.stats.reconnects == 0
    await log.close()


async def test_survives_a_half_open_connection(
    server: Server, start_proxy: ProxyFactory, agents: list[Agent]
) -> None:
    proxy = await start_proxy(server)
    log = await EventLog.open(server)
    agent = await connect(
        agents, proxy.ws_url, "half-open", keepalive=Keepalive(idle=0.3, timeout=0.5)
    )
    assert agent.certificate is not None
    proxy.freeze()

    gone = await next_of(agent, Disconnected)
    assert gone.reconnecting and gone.close_code is None
    back = await next_of(agent, Reconnected)
    assert back.registration.incarnation == 2

    replaced = await log.wait_for("agent.replaced", agent_id="half-open", incarnation=1)
    assert replaced["data"]["proof"] == "certificate"
    assert replaced["data"]["by_incarnation"] == 2
    registered = await log.wait_for("agent.registered", agent_id="half-open", incarnation=2)
    assert registered["data"]["takeover"] == "certificate"
    incarnations = [e["data"]["incarnation"] for e in log.matching("agent.registered")]
    assert incarnations == [1, 2]
    assert not log.matching("agent.registration_failed")
    assert agent.stats.reconnects == 1
    await log.close()


async def test_renews_its_certificate_while_connected_and_takes_its_id_back_with_it(
    start_server: ServerFactory, start_proxy: ProxyFactory, agents: list[Agent]
) -> None:
    # Certificates live 2 s: the one claimed at registration has long expired when
    # the connection goes half-open.
    server = await start_server(TETHER__IDENTITY__CERTIFICATE_TTL="2")
    proxy = await start_proxy(server)
    log = await EventLog.open(server)
    agent = await connect(
        agents, proxy.ws_url, "veteran", keepalive=Keepalive(idle=0.3, timeout=0.5)
    )
    first = agent.certificate
    assert first is not None
    seen = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        current = agent.certificate
        assert current is not None
        seen.add(current["certificate_hash"])
        if current["issued_at"] > first["expires_at"]:
            break
        assert loop.time() < deadline, f"no renewal past the first expiry ({len(seen)} seen)"
        await asyncio.sleep(0.05)  # poll interval
    assert len(seen) >= 3, "renewed at each half-life"
    assert agent.connected

    proxy.freeze()
    back = await next_of(agent, Reconnected)
    assert back.registration.incarnation == 2
    registered = await log.wait_for("agent.registered", agent_id="veteran", incarnation=2)
    assert registered["data"]["takeover"] == "certificate"
    assert not log.matching("agent.registration_failed")
    await log.close()


async def test_reconnect_delays_carry_on_across_connections_that_do_not_last(
    server: Server, start_proxy: ProxyFactory, agents: list[Agent]
) -> None:
    proxy = await start_proxy(server)
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=30.0, factor=2.0)
    agent = await connect(agents, proxy.ws_url, "flapping", reconnect=policy)
    loop = asyncio.get_running_loop()
    gaps = []
    for _ in range(4):
        proxy.drop()  # each connection ends right after it was made
        assert (await next_of(agent, Disconnected)).reconnecting
        lost_at = loop.time()
        await next_of(agent, Reconnected)
        gaps.append(loop.time() - lost_at)
    # Attempt n waits at least half of 0.1 * 2 ** (n - 1) s. The count carries on
    # across connections that did not last, so the fourth reconnection is attempt 4
    # (at least 0.4 s); counted afresh, it would wait at most 0.1 s.
    assert gaps[3] >= 0.35, gaps
    assert agent.stats.reconnects == 4


async def test_list_agents_waits_out_rate_limited_pages(
    start_server: ServerFactory, agents: list[Agent]
) -> None:
    # A budget of 15 requests: one 100-entry page costs 11, so the pages of a 250-agent
    # network run past it and some are refused `rate_limited` until it refills.
    server = await start_server(TETHER__LIMITS__REQUEST_BURST="15")
    await asyncio.gather(
        *(connect(agents, server.ws_url, f"member-{n}") for n in range(249))
    )
    lister = await connect(agents, server.ws_url, "lister")
    listed = await lister.list_agents()
    ids = {entry["agent_id"] for entry in listed}
    assert len(listed) == len(ids) == 250
    assert lister.connected, "the refusals did not cost the connection"


async def test_survives_a_server_restart(server: Server, agents: list[Agent]) -> None:
    alice = await connect(agents, server.ws_url, "restarted")
    before = alice.registration.session_id
    await server.restart()

    skipped: list[Event] = []
    gone = await next_of(alice, Disconnected, skipped=skipped)
    assert gone.reconnecting
    assert any(isinstance(e, Notification) and e.event == "network_shutdown" for e in skipped)
    back = await next_of(alice, Reconnected)
    assert back.registration.session_id != before

    bob = await connect(agents, server.ws_url, "after-restart")
    mid = await bob.send_direct("restarted", "welcome back")
    got = await next_of(alice, Message)
    assert (got.message_id, got.sender_id, got.content) == (mid, "after-restart", "welcome back")


async def worker_with_instruction(
    agents: list[Agent], server: Server, url: str, agent_id: str, payload: Any
) -> tuple[Agent, Instruction]:
    """Connect a worker through ``url`` and return it with an instruction it received.

    The worker takes instructions and notices a dead connection within a second.
    """
    worker = await connect(
        agents,
        url,
        agent_id,
        capabilities=[INSTRUCTIONS_CAPABILITY],
        keepalive=Keepalive(idle=0.3, timeout=0.5),
    )
    status, created = await server.http(
        "POST", f"/agents/{agent_id}/instructions", {"payload": payload}
    )
    assert status == 201, created
    instruction = await next_of(worker, Instruction)
    assert instruction.instruction_id == created["instruction_id"]
    return worker, instruction


async def test_acknowledges_an_instruction_once_across_a_reconnect(
    server: Server, start_proxy: ProxyFactory, agents: list[Agent]
) -> None:
    proxy = await start_proxy(server)
    log = await EventLog.open(server)
    worker, instruction = await worker_with_instruction(
        agents, server, proxy.ws_url, "worker", {"task": "count"}
    )
    iid = instruction.instruction_id
    assert instruction.attempt == 1
    assert instruction.payload == {"task": "count"}

    proxy.freeze()
    await worker.ack(iid, AckStatus.DONE, result={"pages": 12})  # lost in the frozen socket

    skipped: list[Event] = []
    await next_of(worker, Reconnected, skipped=skipped)
    redelivered = await log.wait_for("instruction.delivered", instruction_id=iid, attempt=2)
    assert redelivered["data"]["reason"] == "connection_ended"
    done = await log.wait_for("instruction.done", instruction_id=iid)
    assert done["data"]["result"] == {"pages": 12}
    status, shown = await server.http("GET", f"/instructions/{iid}")
    assert status == 200 and shown["state"] == "done"

    # Everything the worker received before this marker has been handed over by now.
    probe = await connect(agents, server.ws_url, "probe")
    marker = await probe.send_direct("worker", "marker")
    await next_of(worker, Message, lambda m: m.message_id == marker, skipped=skipped)
    assert not [e for e in skipped if isinstance(e, (Instruction, ServerError))], skipped
    assert worker.stats.instructions_received == 1
    assert len(log.matching("instruction.done", instruction_id=iid)) == 1
    await log.close()


async def test_reports_a_refused_registration_with_its_error_code(
    server: Server, agents: list[Agent]
) -> None:
    await connect(agents, server.ws_url, "taken")
    with pytest.raises(RegistrationRefused) as refused:
        await Agent.connect(AgentConfig(url=server.ws_url, agent_id="taken"))
    assert refused.value.error_code == "agent_id_in_use"
    with pytest.raises(RegistrationRefused) as refused:
        await Agent.connect(AgentConfig(url=server.ws_url, agent_id="not valid!"))
    assert refused.value.error_code == "invalid_agent_id"


async def test_certificate_file_takes_the_id_over_and_the_old_agent_stops(
    server: Server, agents: list[Agent], tmp_path: Path
) -> None:
    path = tmp_path / "certs" / "twin.json"
    first = await connect(agents, server.ws_url, "twin", certificate_file=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.certificate is not None
    # A second process with the same file proves it owns the id: it takes it over.
    second = await connect(agents, server.ws_url, "twin", certificate_file=path)
    assert second.registration.incarnation == 2
    skipped: list[Event] = []
    gone = await next_of(first, Disconnected, skipped=skipped)
    assert (gone.close_code, gone.reconnecting) == (4001, False)
    assert any(isinstance(e, Notification) and e.event == "connection_replaced" for e in skipped)
    assert await asyncio.wait_for(first.next_event(), DEADLINE) is None

    # A certificate the server refuses is forgotten and the id registered without it.
    path.write_text('{"agent_id": "twin", "signature": "forged"}')
    await second.close()
    third = await connect(agents, server.ws_url, "twin", certificate_file=path)
    assert third.registration.incarnation == 3
    assert third.certificate is not None and third.certificate.get("signature") != "forged"
    assert json.loads(path.read_text()) == third.certificate


async def test_an_ack_made_while_disconnected_waits_for_the_next_connection(
    server: Server, start_proxy: ProxyFactory, agents: list[Agent]
) -> None:
    proxy = await start_proxy(server)
    log = await EventLog.open(server)
    worker, instruction = await worker_with_instruction(
        agents, server, proxy.ws_url, "offline-worker", [1, 2]
    )
    iid = instruction.instruction_id

    proxy.pause()
    proxy.freeze()
    gone = await next_of(worker, Disconnected)
    assert gone.reconnecting and not worker.connected
    ack = asyncio.create_task(worker.ack(iid, AckStatus.FAILED, result="no luck"))
    await asyncio.sleep(0)
    assert not ack.done()  # waiting for a connection
    assert not log.matching("instruction.failed", instruction_id=iid)
    proxy.resume()

    skipped: list[Event] = []
    await next_of(worker, Reconnected, skipped=skipped)
    await asyncio.wait_for(ack, DEADLINE)
    failed = await log.wait_for("instruction.failed", instruction_id=iid)
    assert failed["data"]["result"] == "no luck" and failed["data"]["reason"] is None
    probe = await connect(agents, server.ws_url, "offline-probe")
    marker = await probe.send_direct("offline-worker", "marker")
    await next_of(worker, Message, lambda m: m.message_id == marker, skipped=skipped)
    assert not [e for e in skipped if isinstance(e, (Instruction, ServerError))], skipped
    assert worker.stats.instructions_received == 1
    await log.close()


async def test_gives_up_after_max_attempts(server: Server, agents: list[Agent]) -> None:
    agent = await connect(
        agents,
        server.ws_url,
        "gives-up",
        reconnect=ReconnectPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3),
    )
    await server.kill()
    gone = await next_of(agent, Disconnected)
    assert gone.reconnecting
    last = await next_of(agent, Disconnected)
    assert not last.reconnecting and "gave up" in last.reason
    assert await asyncio.wait_for(agent.next_event(), DEADLINE) is None


async def test_follows_reconnect_url_when_its_clustered_node_shuts_down(
    start_server: ServerFactory, agents: list[Agent]
) -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        pytest.fail("this test needs Redis on 127.0.0.1:6379 (scripts/test.sh starts it)")
    cluster = {
        "TETHER__CLUSTER__ENABLED": "true",
        "TETHER__CLUSTER__REDIS_URL": "redis://127.0.0.1:6379",
        "TETHER__CLUSTER__PREFIX": f"tether-py-{uuid.uuid4().hex}",
        "TETHER__CLUSTER__NODE_LEASE": "10",
    }
    first = await start_server(**cluster)
    second = await start_server(**cluster)
    for node in (first, second):  # both are live members before the move
        await wait_until_ready(node)
    mover = await connect(agents, first.ws_url, "mover")

    stopping = asyncio.create_task(first.stop())
    notice = await next_of(mover, Notification, lambda n: n.event == "network_shutdown")
    assert notice.reconnect_url is not None and f":{second.port}/" in notice.reconnect_url
    await next_of(mover, Reconnected)
    assert await stopping == 0
    assert mover.stats.reconnects == 1, "straight to reconnect_url"

    witness = await connect(agents, second.ws_url, "witness")
    await witness.send_direct("mover", "here")
    got = await next_of(mover, Message)
    assert (got.sender_id, got.content) == ("witness", "here")
    _, shown = await second.http("GET", "/agents/mover")
    _, witness_shown = await second.http("GET", "/agents/witness")
    assert shown["node_id"] == witness_shown["node_id"], (shown, witness_shown)


async def wait_until_ready(server: Server) -> None:
    """Wait until ``GET /readyz`` answers 200 (a clustered node: a live member)."""

    async def ready() -> None:
        # A condition on another process, polled: no event to wait on.
        while (await server.http("GET", "/readyz"))[0] != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(ready(), DEADLINE)


async def test_connects_over_wss(
    server: Server, agents: list[Agent], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await openssl.communicate()
    assert openssl.returncode == 0, f"openssl could not make a certificate: {stderr!r}"
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    proxy = Proxy(server.port, tls=tls)
    await proxy.start()
    try:
        # The agent trusts the system store; here that store is this one certificate.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        secure = await connect(agents, f"wss://localhost:{proxy.port}/", "secure")
        assert secure.registration.incarnation == 1
        plain = await connect(agents, server.ws_url, "plain")
        await plain.send_direct("secure", "over tls")
        got = await next_of(secure, Message)
        assert (got.sender_id, got.content) == ("plain", "over tls")
        # A certificate the store does not hold is refused.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
        with pytest.raises(ConnectionFailed):
            await Agent.connect(AgentConfig(url=f"wss://localhost:{proxy.port}/", agent_id="x"))
    finally:
        await proxy.close()
