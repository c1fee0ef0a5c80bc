"""Key rotation: which keys the stored envelopes are under, and re-encrypting
them under the newest key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Executable

from tokensvc.crypto import associated_data, key_id_of
from tokensvc.errors import ConfigurationError
from tokensvc.store.rows import Rows
from tokensvc.store.tables import servers, tokens


class KeyRotation(Rows):
    """The key checks and rotation of a store."""

    async def key_ids_in_use(self) -> set[str]:
        def work(conn: Connection) -> list[bytes | None]:
            return [
                *conn.execute(select(servers.c.credential_ct)).scalars(),
                *conn.execute(select(servers.c.previous_credential_ct)).scalars(),
                *conn.execute(select(tokens.c.access_token_ct)).scalars(),
            ]

        blobs = await self._run(work)
        return {key_id_of(blob) for blob in blobs if blob is not None}

    async def check_keys(self) -> None:
        """Refuses to run on ciphertext under a key id that is not configured."""
        missing = await self.key_ids_in_use() - self.keyring.key_ids
        if missing:
            raise ConfigurationError(
                f"the database holds data encrypted under key id(s) {sorted(missing)} "
                "that are not configured: add those keys (TOKENSVC_KEYS or the key file); "
                "nothing was changed"
            )

    async def rotate_keys(self, progress: Callable[[str], None] | None = None) -> int:
        """Re-encrypts every row not under the newest key, one row per short
        transaction with compare-and-swap, so a running service is not held up
        and a concurrent write is never overwritten. Returns rows rewritten."""
        primary = self.keyring.primary_id
        rewritten = 0

        def read(conn: Connection) -> tuple[Sequence[Any], Sequence[Any]]:
            return (
                conn.execute(select(servers)).all(),
                conn.execute(select(tokens.c.server_id, tokens.c.access_token_ct)).all(),
            )

        rows, token_rows = await self._run(read)
        server_rows = [(row.id, row.credential_kind, row.credential_ct, "") for row in rows] + [
            (row.id, row.previous_credential_kind, row.previous_credential_ct, "previous_")
            for row in rows
        ]
        for sid, kind, blob, slot in server_rows:
            if blob is None or key_id_of(blob) == primary:
                continue
            fresh = self._seal_credential(sid, self._open_credential(sid, kind, blob, slot), slot)
            column = servers.c[f"{slot}credential_ct"]
            rewritten += await self._rowcount(
                update(servers).where(servers.c.id == sid, column == blob).values({column: fresh})
            )
            if progress:
                progress(sid)
        for sid, blob in token_rows:
            if key_id_of(blob) == primary:
                continue
            plain = self.keyring.decrypt(blob, associated_data("tokens", sid, "access_token"))
            rewritten += await self._rowcount(
                update(tokens)
                .where(tokens.c.server_id == sid, tokens.c.access_token_ct == blob)
                .values(access_token_ct=self._seal_token(sid, plain.decode()))
            )
        return rewritten

    async def _rowcount(self, statement: Executable) -> int:
        """``statement`` as a transaction of its own; the rows it changed."""
        return await self._run(lambda conn: int(conn.execute(statement).rowcount))
