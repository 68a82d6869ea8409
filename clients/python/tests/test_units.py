"""Pieces that need no server: frame parsing, the instruction ledger, the certificate file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tether_agent import (
    AckStatus,
    ErrorCode,
    Instruction,
    Message,
    ReconnectPolicy,
    ServerError,
)
from tether_agent.certificate import CertificateStore
from tether_agent.instructions import InstructionLedger, Verdict
from tether_agent.protocol import Ping, Response, parse


def test_parses_frames_into_typed_values() -> None:
    ping = parse('{"type":"system_request","command":"ping_agent","timestamp":1.5}')
    assert ping == Ping(1.5)
    message = parse(
        '{"type":"message","data":{"message_type":"broadcast_message","sender_id":"a",'
        '"message_id":"m","content":[1],"timestamp":7,"extra":true}}'
    )
    assert isinstance(message, Message)
    assert (message.kind, message.sender_id, message.timestamp, message.data["extra"]) == (
        "broadcast",
        "a",
        7,
        True,
    )
    instruction = parse(
        '{"type":"instruction","instruction_id":"i","session_id":null,"payload":{},'
        '"attempt":2,"expires_at":"2026-01-01T00:00:00.000Z"}'
    )
    assert isinstance(instruction, Instruction) and instruction.attempt == 2
    error = parse('{"type":"error","error_code":"future_code","error":"x","instruction_id":"i"}')
    assert isinstance(error, ServerError) and error.error_code == "future_code"
    response = parse('{"type":"system_response","command":"list_agents","request_id":"r"}')
    assert isinstance(response, Response) and response.request_id == "r"
    code: str = error.error_code
    assert code != ErrorCode.AGENT_ID_IN_USE and ErrorCode("agent_id_in_use") == code.replace(
        "future_code", "agent_id_in_use"
    )


def test_ledger_drops_open_redeliveries_and_reacks_acked_ones() -> None:
    ledger = InstructionLedger(remembered_acks=2)
    assert ledger.received("a") is Verdict.DELIVER
    assert ledger.received("a") is Verdict.DROP
    ledger.acked("a", AckStatus.DONE, {"n": 1})
    assert ledger.received("a") is Verdict.REACK
    ledger.reacked("a")
    assert ledger.swallow_finished("a") and not ledger.swallow_finished("a")
    ledger.acked("b", AckStatus.FAILED, None)
    ledger.acked("c", AckStatus.REJECTED, None)
    assert ledger.ack_of("a") is None  # only the last two are remembered
    assert ledger.received("a") is Verdict.DELIVER


def test_certificate_file_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "cert.json"
    store = CertificateStore(path)
    assert store.certificate is None
    cert = {"agent_id": "a", "issued_at": 1000.0, "expires_at": 3000.0}
    store.store(cert)
    assert json.loads(path.read_text()) == cert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cert.json"]
    assert CertificateStore(path).certificate == cert
    assert not store.needs_renewal(now=1999.0)
    assert store.needs_renewal(now=2000.0)
    assert store.seconds_until_renewal(now=1500.0) == 500.0
    assert store.renewal_retry() == 60.0  # an eighth of 2 000 s, at most a minute
    store.store({"agent_id": "a", "issued_at": 1000.0, "expires_at": 1004.0})
    assert store.renewal_retry() == 0.5
    store.forget()
    assert not path.exists() and store.certificate is None
    assert store.seconds_until_renewal() == 0.0 and store.renewal_retry() == 60.0


def test_reconnect_delays_grow_with_equal_jitter_up_to_max_delay() -> None:
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=0.8, factor=2.0)
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (9, 0.8)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 10, "jittered"
    # Hours of outage: attempt numbers far past where the growth would overflow.
    assert 0.4 <= policy.delay(100_000) <= 0.8


def test_ledger_forgets_the_oldest_unacknowledged_instructions_beyond_its_limit() -> None:
    ledger = InstructionLedger(remembered_acks=3)
    for n in range(5):
        assert ledger.received(f"i{n}") is Verdict.DELIVER
    assert ledger.received("i4") is Verdict.DROP, "a recent one is still held"
    assert ledger.received("i0") is Verdict.DELIVER, "the oldest was forgotten"


def test_a_certificate_that_cannot_be_written_is_still_kept(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    store = CertificateStore(blocked / "cert.json")
    blocked.write_text("a file where the directory should be")
    cert = {"agent_id": "a", "issued_at": 1.0, "expires_at": 2.0}
    with pytest.raises(OSError):
        store.store(cert)
    assert store.certificate == cert, "the server revoked the old one: keep the new"
