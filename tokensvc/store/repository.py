"""The repository: servers and their tokens, on SQLite or PostgreSQL.

Callers hand in and get back plain ``Credential`` and ``Token`` values; the
encryption is in tokensvc.store.rows. Each method is one transaction run
whole on a synchronous connection (``Rows._run``), and the statements of the
refresh path are built once, here, rather than on every call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from tokensvc.crypto import KeyRing
from tokensvc.discovery import Discovery
from tokensvc.errors import (
    ConfigurationError,
    FetchError,
    ServerNotFound,
)
from tokensvc.registration import (
    Credential,
    PreviousCredential,
    ServerSpec,
)
from tokensvc.store.contexts import FetchContexts
from tokensvc.store.notify import ChangeKind
from tokensvc.store.records import (
    FetchContext,
    Registration,
    ServerRecord,
    record_of,
)
from tokensvc.store.registering import NO_ERROR, SERVER, Registering
from tokensvc.store.tables import servers, tokens
from tokensvc.token import Clock, ServerToken, Token, utcnow


def _still(server_id: str, incarnation: str, revision: int) -> ColumnElement[bool]:
    """The server as it was when a fetch started: same incarnation and revision."""
    return (
        (servers.c.id == server_id)
        & (servers.c.incarnation == incarnation)
        & (servers.c.revision == revision)
    )


def _current_tokens() -> Any:
    """Tokens stored under their server's current revision."""
    return select(tokens).join(
        servers,
        (servers.c.id == tokens.c.server_id) & (servers.c.revision == tokens.c.revision),
    )


def _select_servers(*token_columns: Any) -> Any:
    """Servers with the expiry of their current token, if stored."""
    return select(servers, tokens.c.expires_at.label("token_expires_at"), *token_columns).outerjoin(
        tokens, (tokens.c.server_id == servers.c.id) & (tokens.c.revision == servers.c.revision)
    )


# The refresh path's statements, built once.
# The server and its current token in one statement: what a token request needs.
FOR_FETCH = _select_servers(
    tokens.c.version.label("token_row_version"),
    tokens.c.access_token_ct,
    tokens.c.token_type,
    tokens.c.scopes.label("token_scopes"),
    tokens.c.issued_at.label("token_issued_at"),
).where(servers.c.id == bindparam("sid"))
CURRENT_TOKEN = _current_tokens().where(tokens.c.server_id == bindparam("sid"))
STILL = (
    (servers.c.id == bindparam("sid"))
    & (servers.c.incarnation == bindparam("inc"))
    & (servers.c.revision == bindparam("rev"))
)
# The SET values come with each execution (column names as keys).
SAVE = (
    update(servers)
    .where(STILL)
    .values(token_version=servers.c.token_version + 1)
    .returning(servers.c.token_version)
)
SAVE_FORCED = SAVE.values(rejected_versions=servers.c.rejected_versions + 1)


def _token_upsert(insert: Callable[[Table], Any]) -> Any:
    """One row per server: inserted the first time, replaced in place after."""
    statement = insert(tokens)
    replaced = {c.name: statement.excluded[c.name] for c in tokens.c if c.name != "server_id"}
    return statement.on_conflict_do_update(index_elements=[tokens.c.server_id], set_=replaced)


TOKEN_UPSERT = {"sqlite": _token_upsert(sqlite_insert), "postgresql": _token_upsert(pg_insert)}
FAILURE = update(servers).where(STILL)


class Store(Registering):
    """Servers and their tokens."""

    def __init__(
        self, engine: AsyncEngine, keyring: KeyRing, clock: Clock = utcnow, origin: str = ""
    ) -> None:
        super().__init__(engine, keyring, clock, origin)
        # This process alone writes the rows (SQLite): keep what refreshes read.
        self._contexts = FetchContexts(enabled=not self.shared)
        self._token_upsert = TOKEN_UPSERT[engine.dialect.name]

    # reads ---------------------------------------------------------------

    async def get_server(self, server_id: str) -> ServerRecord:
        row = await self._run(lambda conn: conn.execute(SERVER, {"sid": server_id}).one_or_none())
        if row is None:
            raise ServerNotFound(server_id)
        return record_of(row)

    async def list_servers(self, after: str = "", limit: int = 50) -> list[ServerRecord]:
        query = _select_servers().order_by(servers.c.id).limit(limit)
        if after:
            query = query.where(servers.c.id > after)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [record_of(row) for row in rows]

    async def load_for_fetch(self, server_id: str) -> FetchContext:
        """The server, its credentials and its current token (see contexts.py)."""
        kept = self._contexts.get(server_id)
        if kept is not None:
            return kept
        generation = self._contexts.generation(server_id)
        row = await self._run(
            lambda conn: conn.execute(FOR_FETCH, {"sid": server_id}).one_or_none()
        )
        if row is None:
            raise ServerNotFound(server_id)
        record = record_of(row)
        if row.credential_ct is None or row.credential_kind is None:
            raise ConfigurationError(f"server {server_id!r} has no credential")
        credential = self._open_credential(server_id, row.credential_kind, row.credential_ct)
        previous = None
        if row.previous_credential_ct is not None:
            previous = self._open_credential(
                server_id, row.previous_credential_kind, row.previous_credential_ct, "previous_"
            )
        token = None
        if row.access_token_ct is not None:
            token = self._open_token_of(
                server_id,
                row.token_row_version,
                row.revision,
                row.access_token_ct,
                row.token_type,
                row.token_scopes,
                row.token_issued_at,
                row.token_expires_at,
            )
        context = FetchContext(record, credential, token, previous)
        self._contexts.put(context, generation)
        return context

    async def load_token(self, server_id: str) -> ServerToken | None:
        """The server's token, if one is stored under its current revision."""
        row = await self._run(
            lambda conn: conn.execute(CURRENT_TOKEN, {"sid": server_id}).one_or_none()
        )
        return self._open_token(row) if row is not None else None

    async def load_all(self) -> list[tuple[ServerRecord, ServerToken | None]]:
        """Every server with its token of the current revision, if stored (for
        warming the cache and the schedule at start)."""

        def work(conn: Connection) -> tuple[Sequence[Row[Any]], Sequence[Row[Any]]]:
            rows = conn.execute(_select_servers().order_by(servers.c.id)).all()
            return rows, conn.execute(_current_tokens()).all()

        rows, token_rows = await self._run(work)
        stored = {row.server_id: self._open_token(row) for row in token_rows}
        return [(record_of(row), stored.get(row.id)) for row in rows]

    # writes --------------------------------------------------------------

    async def register(
        self,
        spec: ServerSpec,
        credential: Credential | None,
        expected_revision: int = 0,
        actor: str = "",
        discovery: Discovery | None = None,
        previous: PreviousCredential = PreviousCredential.UNCHANGED,
    ) -> Registration:
        """Creates or replaces the server. ``revised`` says whether its revision
        changed (then its stored token was dropped). ``previous``: KEEP the
        credential a new one replaces as a fallback, or DROP the kept one."""
        args = (spec, credential, expected_revision, actor, discovery, previous)
        self._contexts.forget(spec.id)
        generation = self._contexts.generation(spec.id)
        try:
            result = await self._run(lambda conn: self._register(conn, *args))
        except IntegrityError:
            # Two creations raced and the other won: now this one is an update.
            result = await self._run(lambda conn: self._register(conn, *args))
        if result.created and credential is not None:
            # Its first token request needs nothing but what was just written.
            self._contexts.put(FetchContext(result.record, credential, None, None), generation)
        return result

    async def delete(self, server_id: str, actor: str = "") -> None:
        self._contexts.forget(server_id)

        def work(conn: Connection) -> None:
            conn.execute(delete(tokens).where(tokens.c.server_id == server_id))
            result = conn.execute(delete(servers).where(servers.c.id == server_id))
            if result.rowcount == 0:
                raise ServerNotFound(server_id)
            self._audit(conn, actor, "delete", server_id)
            self._announce(conn, ChangeKind.REMOVED, server_id)

        await self._run(work)

    async def save_token(
        self,
        server_id: str,
        incarnation: str,
        revision: int,
        token: Token,
        next_refresh: datetime | None = None,
        used: str = "current",
        forced: bool = False,
    ) -> ServerToken | None:
        """Stores a fetched token as the server's next version, only if the
        server is still the incarnation and revision it was fetched under;
        otherwise returns None and the token must be thrown away. ``forced``:
        it replaces a token an MCP server refused."""
        values: dict[str, Any] = {
            "sid": server_id,
            "inc": incarnation,
            "rev": revision,
            "last_fetch_time": token.issued_at,
            "next_refresh_time": next_refresh,
            "credential_in_use": used,
            **NO_ERROR,
        }
        if forced:
            values["forced_refresh_time"] = token.issued_at
        else:
            values["rejected_versions"] = 0
        if used == "current":
            # The new credential works: the fallback is no longer needed.
            values.update(previous_credential_kind=None, previous_credential_ct=None)
        row = {
            "revision": revision,
            "access_token_ct": self._seal_token(server_id, token.access_token),
            "token_type": token.token_type,
            "scopes": json.dumps(list(token.scopes)),
            "issued_at": token.issued_at,
            "expires_at": token.expires_at,
        }

        def work(conn: Connection) -> ServerToken | None:
            saved = conn.execute(SAVE_FORCED if forced else SAVE, values)
            version: int | None = saved.scalar_one_or_none()
            if version is None:
                return None
            conn.execute(self._token_upsert, {"server_id": server_id, "version": version, **row})
            held = ServerToken(server_id, token, version, revision)
            self._announce(conn, ChangeKind.TOKEN, server_id, version, token=held)
            return held

        held = await self._run(work)
        if held is None:
            self._contexts.forget(server_id)  # the row moved on: read it next time
            return None
        self._contexts.saved(held, next_refresh, used, forced)
        return held

    async def set_discovery(
        self, server_id: str, incarnation: str, revision: int, discovery: Discovery
    ) -> None:
        statement = (
            update(servers)
            .where(_still(server_id, incarnation, revision))
            .values(discovery=discovery.to_json())
        )
        self._contexts.forget(server_id)
        await self._run(lambda conn: conn.execute(statement))

    async def record_failure(
        self,
        server_id: str,
        incarnation: str,
        revision: int,
        error: FetchError,
        next_attempt: datetime | None = None,
    ) -> None:
        values = {
            "sid": server_id,
            "inc": incarnation,
            "rev": revision,
            "last_error_reason": error.reason,
            "last_error_code": error.oauth.error or None,
            "last_error_description": error.oauth.error_description or error.message,
            "last_error_time": self.clock(),
            "next_refresh_time": next_attempt,
        }

        def work(conn: Connection) -> None:
            conn.execute(FAILURE, values)
            self._announce(conn, ChangeKind.FAILED, server_id, revision)

        self._contexts.forget(server_id)
        await self._run(work)
