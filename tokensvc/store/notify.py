"""Changes shared between replicas through PostgreSQL LISTEN/NOTIFY.

A notification carries ids and numbers, never a secret or a token in the
clear. A stored token's notification carries it sealed under the data key (see
Rows.seal_announced), so that the others need not read it back; any other
change, or a token too big for a notification, the receiver reads (and
decrypts) from its row. Notifications are sent inside
the transaction that makes the change, so they are delivered exactly when it
commits. They are lost while a listener is disconnected, so after every
(re)connection the listener asks for a full resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "tokensvc_changes"


class ChangeKind(StrEnum):
    TOKEN = "token"  # a token was stored (number: its version)
    FAILED = "failed"  # a token request failed (number: the revision)
    REGISTERED = "registered"  # a server was created or changed (number: its revision)
    REMOVED = "removed"  # a server was deleted
    CALLERS = "callers"  # a caller was created or revoked
    REPLICAS = "replicas"  # a replica joined or left (tokensvc.ownership)


@dataclass(frozen=True, slots=True)
class Change:
    """What another replica did."""

    origin: str
    kind: ChangeKind
    server_id: str
    number: int = 0  # token version, or revision
    revised: bool = False
    sealed: str = ""  # TOKEN: the token, sealed under the data key (or "": read the row)

    def payload(self) -> str:
        return json.dumps(
            {
                "o": self.origin,
                "k": self.kind,
                "s": self.server_id,
                "n": self.number,
                "r": self.revised,
                **({"t": self.sealed} if self.sealed else {}),
            }
        )

    @classmethod
    def parse(cls, payload: str) -> Change | None:
        try:
            data = json.loads(payload)
            return cls(
                str(data["o"]),
                ChangeKind(str(data["k"])),
                str(data["s"]),
                int(data["n"]),
                bool(data["r"]),
                str(data.get("t", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """Keeps one LISTEN connection up; calls ``on_change`` for other replicas'
    changes and ``on_connected`` after each (re)connection."""

    def __init__(
        self,
        url: str,
        origin: str,
        on_change: Callable[[Change], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]],
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._origin = origin
        self._on_change = on_change
        self._on_connected = on_connected
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="listener")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            lost = asyncio.Event()
            connection: Any = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=5)
                connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._received)
                self.connected.set()
                delay = 0.2
                log.info("listening for changes of other replicas")
                await self._on_connected()  # what was missed while disconnected
                while not lost.is_set():
                    # A dead peer is not always noticed without traffic: ping.
                    # asyncio.timeout, not wait_for, which on Python 3.11 can
                    # swallow the cancellation that stop() sends.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await lost.wait()
                    if not lost.is_set():
                        async with asyncio.timeout(5):
                            await connection.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("change listener disconnected", extra={"exc_type": type(exc).__name__})
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 5.0)

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        change = Change.parse(payload)
        if change is None or change.origin == self._origin:
            return
        task = asyncio.create_task(self._handle(change))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, change: Change) -> None:
        try:
            await self._on_change(change)
        except Exception as exc:  # the next resync repairs what this missed
            log.warning(
                "could not apply a change from another replica",
                extra={"server_id": change.server_id, "exc_type": type(exc).__name__},
            )
