"""The plumbing every store method shares: its transactions (transactions.py),
announcements to the other replicas, the advisory lock around a token
request, audit rows, and the encrypted columns.

Encryption happens here and only here: the database sees AES-GCM envelopes whose
associated data names the row and field.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import insert, text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.crypto import KeyRing, associated_data
from tokensvc.errors import DecryptionError
from tokensvc.registration import Credential, CredentialKind
from tokensvc.store.engine import PG_REFRESH_LOCKS
from tokensvc.store.notify import CHANNEL, Change, ChangeKind
from tokensvc.store.records import audit_row
from tokensvc.store.tables import audit_events
from tokensvc.store.transactions import Transactions, Work, transaction
from tokensvc.token import Clock, Secret, ServerToken, Token, utcnow

# The first key of tokensvc's advisory locks (the second is the server id's hash).
LOCK_SPACE = 0x746B73  # "tks"
# PostgreSQL refuses notification payloads of 8000 bytes or more; a token whose
# sealed form would not fit is left out, and the receivers read its row.
MAX_SEALED = 6000

T = TypeVar("T")

NOTIFY = text("SELECT pg_notify(:channel, :payload)")
AUDIT = insert(audit_events)


class Rows:
    """A store's engine, keys and clock, and what its methods share."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: KeyRing,
        clock: Clock = utcnow,
        origin: str = "",
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.clock = clock
        # Who writes: the replica id that changes are announced under.
        self.origin = origin
        self.shared = engine.dialect.name == "postgresql"
        self._lock_slots = asyncio.Semaphore(PG_REFRESH_LOCKS)
        # Every transaction of the store, and of the stores that share it
        # (AccessStore), runs through this one (see transactions.py).
        self.transactions = Transactions(engine)

    async def close(self) -> None:
        await self.transactions.close()

    async def _run(self, work: Work[T]) -> T:
        """``work`` as one transaction on a synchronous connection."""
        return await self.transactions.run(work)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute(text("SELECT 1")))

    def _announce(
        self,
        conn: Connection,
        kind: ChangeKind,
        server_id: str,
        number: int = 0,
        revised: bool = False,
        token: ServerToken | None = None,
    ) -> None:
        """Tells the other replicas, when this transaction commits (PostgreSQL)."""
        if self.shared:
            sealed = self.seal_announced(token) if token is not None else ""
            sealed = sealed if len(sealed) <= MAX_SEALED else ""
            change = Change(self.origin, kind, server_id, number, revised, sealed)
            conn.execute(NOTIFY, {"channel": CHANNEL, "payload": change.payload()})

    async def announce(self, kind: ChangeKind, server_id: str = "") -> None:
        """Tells the other replicas of a change that has no row of its own here."""
        if self.shared:
            await self._run(lambda conn: self._announce(conn, kind, server_id))

    @asynccontextmanager
    async def refresh_lock(self, server_id: str) -> AsyncIterator[None]:
        """Held around a token request, so that one replica at a time asks for a
        server's token (PostgreSQL; one process needs nothing more).

        A transaction-scoped advisory lock rather than a lease row: a replica
        that dies mid-request (even SIGKILL) drops its connection and the lock
        with it, so another takes over at once instead of waiting for a lease to
        expire, and a waiter is woken by PostgreSQL rather than polling. The
        price is a pooled connection held for the length of the request (at
        most the HTTP timeout), one per server being refreshed, and at most
        PG_REFRESH_LOCKS at once, whoever started the refresh (the schedule or a
        GetToken), so that the pool never runs dry under its holders.
        """
        if not self.shared:
            yield
            return
        async with self._lock_slots, transaction(self.engine) as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:space, hashtext(:id))"),
                {"space": LOCK_SPACE, "id": server_id},
            )
            yield

    def _seal_credential(self, server_id: str, credential: Credential, slot: str = "") -> bytes:
        aad = associated_data("servers", server_id, f"{slot}credential:{credential.kind.value}")
        return self.keyring.encrypt(credential.value.reveal().encode(), aad)

    def _open_credential(
        self, server_id: str, kind: str, envelope: bytes, slot: str = ""
    ) -> Credential:
        aad = associated_data("servers", server_id, f"{slot}credential:{kind}")
        plain = self.keyring.decrypt(envelope, aad).decode()
        return Credential(CredentialKind(kind), Secret(plain))

    def _seal_token(self, server_id: str, access_token: str) -> bytes:
        aad = associated_data("tokens", server_id, "access_token")
        return self.keyring.encrypt(access_token.encode(), aad)

    def seal_announced(self, held: ServerToken) -> str:
        """The token as its notification carries it: under the data key, its
        version, revision and times inside the envelope with it, and the
        associated data naming the server, so that nothing in the payload can
        be changed, moved to another server or read without the key."""
        token = held.token
        plain = {
            "a": token.access_token,
            "y": token.token_type,
            "s": list(token.scopes),
            "i": token.issued_at.isoformat(),
            "e": token.expires_at.isoformat(),
            "v": held.version,
            "r": held.revision,
        }
        aad = associated_data("notifications", held.server_id, "token")
        return base64.b64encode(self.keyring.encrypt(json.dumps(plain).encode(), aad)).decode()

    def open_announced(self, server_id: str, sealed: str) -> ServerToken | None:
        """The token a notification carried, or None if it does not open (the
        receiver then reads the row)."""
        aad = associated_data("notifications", server_id, "token")
        try:
            data = json.loads(self.keyring.decrypt(base64.b64decode(sealed), aad))
            token = Token(
                access_token=str(data["a"]),
                token_type=str(data["y"]),
                issued_at=datetime.fromisoformat(data["i"]),
                expires_at=datetime.fromisoformat(data["e"]),
                scopes=tuple(str(scope) for scope in data["s"]),
            )
            return ServerToken(server_id, token, int(data["v"]), int(data["r"]))
        except (DecryptionError, ValueError, KeyError, TypeError):
            return None

    def _open_token(self, row: Row[Any]) -> ServerToken:
        return self._open_token_of(
            row.server_id,
            row.version,
            row.revision,
            row.access_token_ct,
            row.token_type,
            row.scopes,
            row.issued_at,
            row.expires_at,
        )

    def _open_token_of(
        self,
        server_id: str,
        version: int,
        revision: int,
        envelope: bytes,
        token_type: str,
        scopes: str,
        issued_at: datetime,
        expires_at: datetime,
    ) -> ServerToken:
        aad = associated_data("tokens", server_id, "access_token")
        token = Token(
            access_token=self.keyring.decrypt(envelope, aad).decode(),
            token_type=token_type,
            issued_at=issued_at,
            expires_at=expires_at,
            scopes=tuple(json.loads(scopes)),
        )
        return ServerToken(server_id, token, version, revision)

    async def audit(self, actor: str, action: str, server_id: str | None, **detail: Any) -> None:
        await self._run(lambda conn: self._audit(conn, actor, action, server_id, **detail))

    def _audit(
        self, conn: Connection, actor: str, action: str, server_id: str | None, **detail: Any
    ) -> None:
        conn.execute(AUDIT, audit_row(self.clock(), actor, action, server_id, detail))
