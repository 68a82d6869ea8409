"""Bookkeeping that turns at-least-once instruction delivery into once for the application.

The server may deliver an instruction again (its ack was lost, the connection ended,
the server restarted). :class:`InstructionLedger` remembers the instructions handed to
the application and not yet acknowledged (a redelivery of one is dropped), and the
last :data:`REMEMBERED_ACKS` acknowledgements sent (a redelivery of one is answered
again with the same ack, without the application seeing it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .events import AckStatus

REMEMBERED_ACKS = 10_000
"""How many sent acknowledgements are remembered for automatic re-acks."""


class Verdict(Enum):
    """What to do with a received instruction."""

    DELIVER = "deliver"
    """New: hand it to the application."""
    DROP = "drop"
    """Already with the application, not acknowledged yet: drop the redelivery."""
    REACK = "reack"
    """Already acknowledged: send the same acknowledgement again."""


@dataclass(frozen=True)
class Ack:
    """An acknowledgement as it was sent."""

    status: AckStatus
    result: Any


class InstructionLedger:
    """Instructions seen and acknowledged by this process."""

    def __init__(self, remembered_acks: int = REMEMBERED_ACKS) -> None:
        """Make an empty ledger remembering at most ``remembered_acks`` acks.

        As many instructions handed to the application and not yet acknowledged are
        remembered (the oldest forgotten first).
        """
        self._open: OrderedDict[str, None] = OrderedDict()
        self._acked: OrderedDict[str, Ack] = OrderedDict()
        self._limit = remembered_acks
        self._reacks: dict[str, int] = {}

    def received(self, instruction_id: str) -> Verdict:
        """Classify a delivery of ``instruction_id`` (and note a new one as open)."""
        if instruction_id in self._acked:
            return Verdict.REACK
        if instruction_id in self._open:
            return Verdict.DROP
        self._open[instruction_id] = None
        while len(self._open) > self._limit:  # held and never acked: forget the oldest
            self._open.popitem(last=False)
        return Verdict.DELIVER

    def acked(self, instruction_id: str, status: AckStatus, result: Any) -> None:
        """Record the application's acknowledgement."""
        self._open.pop(instruction_id, None)
        self._acked[instruction_id] = Ack(status, result)
        self._acked.move_to_end(instruction_id)
        while len(self._acked) > self._limit:
            self._acked.popitem(last=False)

    def ack_of(self, instruction_id: str) -> Ack | None:
        """Return the acknowledgement sent for ``instruction_id``, if remembered."""
        return self._acked.get(instruction_id)

    def reacked(self, instruction_id: str) -> None:
        """Note that an automatic re-ack of ``instruction_id`` was sent."""
        self._reacks[instruction_id] = self._reacks.get(instruction_id, 0) + 1
        while len(self._reacks) > self._limit:
            del self._reacks[next(iter(self._reacks))]

    def swallow_finished(self, instruction_id: str) -> bool:
        """Tell whether an ``instruction_finished`` error answers an automatic re-ack.

        Each automatic re-ack swallows at most one such error.
        """
        count = self._reacks.get(instruction_id, 0)
        if count == 0:
            return False
        if count == 1:
            del self._reacks[instruction_id]
        else:
            self._reacks[instruction_id] = count - 1
        return True
