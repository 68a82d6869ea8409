"""Where the agent keeps its identity certificate (PROTOCOL.md §3).

The certificate is opaque JSON sent back unchanged on registration; it lets the agent
take its id back from a connection of its own that the server still believes alive.
:class:`CertificateStore` keeps it in memory or in a JSON file written atomically
(temporary file in the same directory, ``fsync``, ``rename``) with mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .connection import Connection
from .errors import TetherError

log = logging.getLogger(__name__)


class CertificateStore:
    """The agent's current certificate, in memory and optionally in a file."""

    def __init__(self, path: str | Path | None) -> None:
        """Keep the certificate in ``path`` (read now if it exists), or in memory."""
        self._path = Path(path) if path is not None else None
        self._certificate: dict[str, Any] | None = None
        if self._path is not None:
            self._certificate = self._read(self._path)

    @property
    def certificate(self) -> dict[str, Any] | None:
        """The certificate, or ``None`` when the agent has none."""
        return self._certificate

    def store(self, certificate: dict[str, Any]) -> None:
        """Keep a new certificate, then write the file, if there is one.

        The server revoked the certificate this one replaces, so it is kept in memory
        even when the file cannot be written (the ``OSError`` is raised after).
        """
        self._certificate = certificate
        if self._path is not None:
            self._write(self._path, certificate)

    def forget(self) -> None:
        """Drop the certificate (and delete the file, if there is one)."""
        self._certificate = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    def needs_renewal(self, now: float | None = None) -> bool:
        """Tell whether half or more of the certificate's lifetime has passed.

        A certificate without readable ``issued_at``/``expires_at`` needs renewal.
        """
        return self.seconds_until_renewal(now) <= 0

    def seconds_until_renewal(self, now: float | None = None) -> float:
        """Return the seconds until half the certificate's lifetime is gone (0: now)."""
        times = self._times()
        if times is None:
            return 0.0
        issued, expires = times
        now = time.time() if now is None else now
        return max((issued + expires) / 2 - now, 0.0)

    def renewal_retry(self) -> float:
        """Return the seconds to wait after a renewal before trying again.

        An eighth of the certificate's lifetime, between 0.1 s and a minute (a minute
        without a certificate).
        """
        times = self._times()
        if times is None:
            return 60.0
        issued, expires = times
        return min(max((expires - issued) / 8, 0.1), 60.0)

    def _times(self) -> tuple[float, float] | None:
        cert = self._certificate
        if cert is None:
            return None
        try:
            return float(cert["issued_at"]), float(cert["expires_at"])
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            log.warning("certificate file %s is not JSON: ignored", path)
            return None
        if not isinstance(value, dict):
            log.warning("certificate file %s does not hold an object: ignored", path)
            return None
        return value

    @staticmethod
    def _write(path: Path, certificate: dict[str, Any]) -> None:
        directory = path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(certificate, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


async def claim(store: CertificateStore, connection: Connection, agent_id: str) -> None:
    """Claim (or, registered with it, renew) the certificate for ``agent_id``.

    The holder's own claim needs no ``force``. A failure is logged and leaves the
    certificate as it was; :func:`keep_renewing` tries again.
    """
    try:
        answer = await connection.request("claim_agent_id", agent_id=agent_id)
    except TetherError as error:
        log.warning("could not claim a certificate for %s: %s", agent_id, error)
        return
    certificate = answer.get("certificate")
    if not isinstance(certificate, dict):
        log.warning("claim_agent_id answered without a certificate")
        return
    try:
        store.store(certificate)
    except OSError as error:
        log.warning("certificate kept in memory only: cannot write its file: %s", error)


async def keep_renewing(store: CertificateStore, connection: Connection, agent_id: str) -> None:
    """Renew the certificate once half its lifetime is gone, while ``connection`` serves.

    A failed claim is tried again after an eighth of the lifetime (at most a minute).
    """
    while not connection.ended:
        wait = store.seconds_until_renewal()
        if wait > 0:
            await asyncio.sleep(wait)
            continue
        await claim(store, connection, agent_id)
        await asyncio.sleep(store.renewal_retry())
