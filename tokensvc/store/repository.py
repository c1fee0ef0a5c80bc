"""The repository: servers, their tokens and the audit trail, on SQLite or PostgreSQL.

Encryption happens here and only here: callers hand in and get back plain
``Credential`` and ``Token`` values; the database sees AES-GCM envelopes whose
associated data names the row and field.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from tokensvc.crypto import KeyRing, associated_data, key_id_of
from tokensvc.discovery import Discovery, complete
from tokensvc.errors import (
    ConfigurationError,
    FetchError,
    InvalidArgument,
    RevisionMismatch,
    ServerNotFound,
    StoreUnavailable,
)
from tokensvc.registration import (
    NON_REVISION_FIELDS,
    AssertionAudience,
    AuthMethod,
    Credential,
    CredentialInfo,
    CredentialKind,
    GrantType,
    PreviousCredential,
    ServerSpec,
    sorted_params,
)
from tokensvc.store.notify import CHANNEL, Change
from tokensvc.store.tables import audit_events, servers, tokens
from tokensvc.token import Clock, Secret, ServerToken, Token, utcnow


@dataclass(frozen=True, slots=True)
class LastError:
    reason: str
    error: str
    error_description: str
    time: datetime


@dataclass(frozen=True, slots=True)
class ServerStatus:
    token_version: int = 0
    expires_at: datetime | None = None
    last_fetch_time: datetime | None = None
    next_refresh_time: datetime | None = None
    last_error: LastError | None = None
    forced_refresh_time: datetime | None = None
    rejected_versions: int = 0


@dataclass(frozen=True, slots=True)
class ServerRecord:
    spec: ServerSpec
    incarnation: str
    revision: int
    credential_kind: CredentialKind | None
    create_time: datetime
    update_time: datetime
    status: ServerStatus
    discovery: Discovery | None = None
    previous_credential: bool = False
    credential_in_use: str = ""
    credential_info: CredentialInfo | None = None

    @property
    def effective_spec(self) -> ServerSpec:
        """What a token is fetched with (see tokensvc.discovery.complete)."""
        return complete(self.spec, self.credential_kind, self.discovery)


@dataclass(frozen=True, slots=True)
class Registration:
    record: ServerRecord
    revised: bool  # the revision moved: tokens fetched before are void
    changed: bool  # anything changed (revised, or only refresh_fraction)


@dataclass(frozen=True, slots=True)
class FetchContext:
    """What a token request needs: the registration, its credential, and the
    stored token if it was fetched under the current revision."""

    record: ServerRecord
    credential: Credential
    token: ServerToken | None
    previous: Credential | None = None  # the fallback kept by keep_previous_credential


def _spec_of(row: Row[Any]) -> ServerSpec:
    return ServerSpec(
        id=row.id,
        mcp_url=row.mcp_url,
        token_endpoint=row.token_endpoint,
        issuer=row.issuer,
        client_id=row.client_id,
        auth_method=AuthMethod(row.auth_method),
        scopes=tuple(json.loads(row.scopes)),
        resource=row.resource,
        audience=row.audience,
        extra_token_params=sorted_params(json.loads(row.extra_token_params)),
        refresh_fraction=row.refresh_fraction,
        key_id=row.key_id,
        signing_alg=row.signing_alg,
        assertion_audience=AssertionAudience(row.assertion_audience),
        grant_type=GrantType(row.grant_type),
    )


def _spec_columns(spec: ServerSpec) -> dict[str, Any]:
    return {
        "mcp_url": spec.mcp_url,
        "token_endpoint": spec.token_endpoint,
        "issuer": spec.issuer,
        "client_id": spec.client_id,
        "auth_method": spec.auth_method.value,
        "scopes": json.dumps(list(spec.scopes)),
        "resource": spec.resource,
        "audience": spec.audience,
        "extra_token_params": json.dumps(dict(spec.extra_token_params)),
        "refresh_fraction": spec.refresh_fraction,
        "key_id": spec.key_id,
        "signing_alg": spec.signing_alg,
        "assertion_audience": spec.assertion_audience.value,
        "grant_type": spec.grant_type.value,
    }


def _changed_fields(old: ServerSpec, new: ServerSpec) -> list[str]:
    return [name for name in ServerSpec.__slots__ if getattr(old, name) != getattr(new, name)]


# The first key of tokensvc's advisory locks (the second is the server id's hash).
LOCK_SPACE = 0x746B73  # "tks"

NO_ERROR: dict[str, Any] = {
    "last_error_reason": None,
    "last_error_code": None,
    "last_error_description": None,
    "last_error_time": None,
}


def audit_row(
    time: datetime, actor: str, action: str, server_id: str | None, detail: dict[str, Any]
) -> dict[str, Any]:
    """An audit_events row. ``actor`` is "who@peer" (tokensvc.auth.Caller.actor)."""
    who, _, peer = actor.rpartition("@") if "@" in actor else (actor, "", "")
    return {
        "time": time,
        "actor": who,
        "peer": peer,
        "action": action,
        "server_id": server_id,
        "detail": json.dumps(detail, sort_keys=True),
    }


def _still(server_id: str, incarnation: str, revision: int) -> ColumnElement[bool]:
    """The server as it was when a fetch started: same incarnation and revision."""
    return (
        (servers.c.id == server_id)
        & (servers.c.incarnation == incarnation)
        & (servers.c.revision == revision)
    )


def _bumps_revision(fields: list[str]) -> bool:
    return any(name not in NON_REVISION_FIELDS for name in fields)


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction; database faults become StoreUnavailable."""
    try:
        async with engine.begin() as conn:
            yield conn
    except (OperationalError, InterfaceError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"the database is unavailable ({type(exc).__name__})") from None
    except DBAPIError as exc:
        if exc.connection_invalidated or _unavailable(exc):
            raise StoreUnavailable("the database connection was lost") from None
        raise


def _unavailable(exc: DBAPIError) -> bool:
    """SQLSTATE classes that mean "not now" rather than "wrong": connection
    exceptions (08), shutting down or starting up (57P), out of resources (53)."""
    state = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")
    return state.startswith(("08", "57P", "53"))


class Store:
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

    async def close(self) -> None:
        await self.engine.dispose()

    def _tx(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return transaction(self.engine)

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(text("SELECT 1"))

    async def _announce(
        self,
        conn: AsyncConnection,
        kind: str,
        server_id: str,
        number: int = 0,
        revised: bool = False,
    ) -> None:
        """Tells the other replicas, when this transaction commits (PostgreSQL)."""
        if self.shared:
            change = Change(self.origin, kind, server_id, number, revised)
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": change.payload()},
            )

    async def announce(self, kind: str, server_id: str = "") -> None:
        """Tells the other replicas of a change that has no row of its own here."""
        if self.shared:
            async with self._tx() as conn:
                await self._announce(conn, kind, server_id)

    @asynccontextmanager
    async def refresh_lock(self, server_id: str) -> AsyncIterator[None]:
        """Held around a token request, so that one replica at a time asks for a
        server's token (PostgreSQL; one process needs nothing more).

        A transaction-scoped advisory lock rather than a lease row: a replica
        that dies mid-request (even SIGKILL) drops its connection and the lock
        with it, so another takes over at once instead of waiting for a lease to
        expire, and a waiter is woken by PostgreSQL rather than polling. The
        price is a pooled connection held for the length of the request (at
        most the HTTP timeout), one per server being refreshed: the manager's
        in-process single flight and the scheduler's concurrency bound that.
        """
        if not self.shared:
            yield
            return
        async with self._tx() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:space, hashtext(:id))"),
                {"space": LOCK_SPACE, "id": server_id},
            )
            yield

    # encryption boundary -------------------------------------------------

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

    def _open_token(self, row: Row[Any]) -> ServerToken:
        aad = associated_data("tokens", row.server_id, "access_token")
        token = Token(
            access_token=self.keyring.decrypt(row.access_token_ct, aad).decode(),
            token_type=row.token_type,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            scopes=tuple(json.loads(row.scopes)),
        )
        return ServerToken(row.server_id, token, row.version, row.revision)

    # reads ---------------------------------------------------------------

    def _record(self, row: Row[Any]) -> ServerRecord:
        last_error = None
        if row.last_error_reason:
            last_error = LastError(
                row.last_error_reason,
                row.last_error_code or "",
                row.last_error_description or "",
                row.last_error_time,
            )
        return ServerRecord(
            spec=_spec_of(row),
            incarnation=row.incarnation,
            revision=row.revision,
            credential_kind=CredentialKind(row.credential_kind) if row.credential_kind else None,
            credential_info=CredentialInfo.from_json(
                CredentialKind(row.credential_kind), row.credential_info
            )
            if row.credential_kind
            else None,
            create_time=row.create_time,
            update_time=row.update_time,
            discovery=Discovery.from_json(row.discovery),
            previous_credential=row.previous_credential_ct is not None,
            credential_in_use=row.credential_in_use,
            status=ServerStatus(
                token_version=row.token_version,
                expires_at=row.token_expires_at,
                last_fetch_time=row.last_fetch_time,
                next_refresh_time=row.next_refresh_time,
                last_error=last_error,
                forced_refresh_time=row.forced_refresh_time,
                rejected_versions=row.rejected_versions,
            ),
        )

    @staticmethod
    def _current_tokens() -> Any:
        """Tokens stored under their server's current revision."""
        return select(tokens).join(
            servers,
            (servers.c.id == tokens.c.server_id) & (servers.c.revision == tokens.c.revision),
        )

    def _select_servers(self) -> Any:
        return select(servers, tokens.c.expires_at.label("token_expires_at")).outerjoin(
            tokens, (tokens.c.server_id == servers.c.id) & (tokens.c.revision == servers.c.revision)
        )

    async def get_server(self, server_id: str) -> ServerRecord:
        async with self._tx() as conn:
            row = (
                await conn.execute(self._select_servers().where(servers.c.id == server_id))
            ).one_or_none()
        if row is None:
            raise ServerNotFound(server_id)
        return self._record(row)

    async def list_servers(self, after: str = "", limit: int = 50) -> list[ServerRecord]:
        query = self._select_servers().order_by(servers.c.id).limit(limit)
        if after:
            query = query.where(servers.c.id > after)
        async with self._tx() as conn:
            rows = (await conn.execute(query)).all()
        return [self._record(row) for row in rows]

    async def load_for_fetch(self, server_id: str) -> FetchContext:
        async with self._tx() as conn:
            row = (
                await conn.execute(self._select_servers().where(servers.c.id == server_id))
            ).one_or_none()
            if row is None:
                raise ServerNotFound(server_id)
            token_row = (
                await conn.execute(
                    select(tokens).where(
                        tokens.c.server_id == server_id, tokens.c.revision == row.revision
                    )
                )
            ).one_or_none()
        record = self._record(row)
        if row.credential_ct is None or row.credential_kind is None:
            raise ConfigurationError(f"server {server_id!r} has no credential")
        credential = self._open_credential(server_id, row.credential_kind, row.credential_ct)
        previous = None
        if row.previous_credential_ct is not None:
            previous = self._open_credential(
                server_id, row.previous_credential_kind, row.previous_credential_ct, "previous_"
            )
        token = self._open_token(token_row) if token_row is not None else None
        return FetchContext(record, credential, token, previous)

    async def load_token(self, server_id: str) -> ServerToken | None:
        """The server's token, if one is stored under its current revision."""
        async with self._tx() as conn:
            row = (
                await conn.execute(self._current_tokens().where(tokens.c.server_id == server_id))
            ).one_or_none()
        return self._open_token(row) if row is not None else None

    async def load_all(self) -> list[tuple[ServerRecord, ServerToken | None]]:
        """Every server with its token of the current revision, if stored (for
        warming the cache and the schedule at start)."""
        async with self._tx() as conn:
            rows = (await conn.execute(self._select_servers().order_by(servers.c.id))).all()
            token_rows = (await conn.execute(self._current_tokens())).all()
        stored = {row.server_id: self._open_token(row) for row in token_rows}
        return [(self._record(row), stored.get(row.id)) for row in rows]

    # writes --------------------------------------------------------------

    async def audit(self, actor: str, action: str, server_id: str | None, **detail: Any) -> None:
        async with self._tx() as conn:
            await self._audit(conn, actor, action, server_id, **detail)

    async def _audit(
        self, conn: AsyncConnection, actor: str, action: str, server_id: str | None, **detail: Any
    ) -> None:
        await conn.execute(
            insert(audit_events).values(audit_row(self.clock(), actor, action, server_id, detail))
        )

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
        try:
            return await self._register(*args)
        except IntegrityError:
            # Two creations raced and the other won: now this one is an update.
            return await self._register(*args)

    async def _register(
        self,
        spec: ServerSpec,
        credential: Credential | None,
        expected_revision: int,
        actor: str,
        discovery: Discovery | None,
        previous: PreviousCredential,
    ) -> Registration:
        now = self.clock()
        found = discovery.to_json() if discovery is not None else None
        async with self._tx() as conn:
            # FOR UPDATE: on PostgreSQL (read committed) two concurrent updates
            # would otherwise both build on the same revision. SQLite holds the
            # write lock from BEGIN IMMEDIATE already.
            row = (
                await conn.execute(select(servers).where(servers.c.id == spec.id).with_for_update())
            ).one_or_none()
            actual = row.revision if row is not None else 0
            if (expected_revision == -1 and row is not None) or (
                expected_revision > 0 and expected_revision != actual
            ):
                raise RevisionMismatch(spec.id, expected_revision, actual)
            if row is None:
                if credential is None:
                    raise InvalidArgument(
                        "client_secret",
                        "is required to create a server: give client_secret "
                        "(it is never shown again)",
                    )
                await conn.execute(
                    insert(servers).values(
                        id=spec.id,
                        incarnation=secrets.token_hex(16),
                        revision=1,
                        credential_kind=credential.kind.value,
                        credential_ct=self._seal_credential(spec.id, credential),
                        credential_info=CredentialInfo.of(credential).to_json(),
                        token_version=0,
                        discovery=found,
                        create_time=now,
                        update_time=now,
                        **_spec_columns(spec),
                    )
                )
                await self._audit(conn, actor, "create", spec.id, revision=1)
                await self._announce(conn, "registered", spec.id, 1, revised=True)
                changed = revised = True
            else:
                fields = _changed_fields(_spec_of(row), spec)
                if credential is not None and not self._same_credential(row, credential):
                    fields.append("credential")
                if Discovery.from_json(row.discovery) != discovery:
                    fields.append("discovery")
                if (previous is PreviousCredential.KEEP and "credential" in fields) or (
                    previous is PreviousCredential.DROP and row.previous_credential_ct is not None
                ):
                    fields.append("previous_credential")
                changed = bool(fields)
                revised = _bumps_revision(fields)
                if changed:
                    revision = row.revision + 1 if revised else row.revision
                    values: dict[str, Any] = {
                        "revision": revision,
                        "update_time": now,
                        "discovery": found,
                        **_spec_columns(spec),
                    }
                    if revised:
                        values.update(NO_ERROR, next_refresh_time=None)
                    if credential is not None and "credential" in fields:
                        values["credential_kind"] = credential.kind.value
                        values["credential_ct"] = self._seal_credential(spec.id, credential)
                        values["credential_info"] = CredentialInfo.of(credential).to_json()
                        values["credential_in_use"] = ""
                        if previous is PreviousCredential.KEEP and row.credential_ct is not None:
                            old = self._open_credential(
                                spec.id, row.credential_kind, row.credential_ct
                            )
                            values["previous_credential_kind"] = old.kind.value
                            values["previous_credential_ct"] = self._seal_credential(
                                spec.id, old, "previous_"
                            )
                    if "previous_credential" in fields and "previous_credential_ct" not in values:
                        values["previous_credential_kind"] = None
                        values["previous_credential_ct"] = None
                    await conn.execute(
                        update(servers).where(servers.c.id == spec.id).values(**values)
                    )
                    if revised:
                        await conn.execute(delete(tokens).where(tokens.c.server_id == spec.id))
                    await self._audit(
                        conn, actor, "update", spec.id, revision=revision, changed=fields
                    )
                    await self._announce(conn, "registered", spec.id, revision, revised)
            row = (await conn.execute(self._select_servers().where(servers.c.id == spec.id))).one()
        return Registration(self._record(row), revised, changed)

    def _same_credential(self, row: Row[Any], credential: Credential) -> bool:
        if row.credential_ct is None or row.credential_kind != credential.kind.value:
            return False
        stored = self._open_credential(row.id, row.credential_kind, row.credential_ct)
        return hmac.compare_digest(
            stored.value.reveal().encode(), credential.value.reveal().encode()
        )

    async def delete(self, server_id: str, actor: str = "") -> None:
        async with self._tx() as conn:
            await conn.execute(delete(tokens).where(tokens.c.server_id == server_id))
            result = await conn.execute(delete(servers).where(servers.c.id == server_id))
            if result.rowcount == 0:
                raise ServerNotFound(server_id)
            await self._audit(conn, actor, "delete", server_id)
            await self._announce(conn, "removed", server_id)

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
        rejections: dict[str, Any] = {"rejected_versions": 0}
        if forced:
            rejections = {
                "forced_refresh_time": token.issued_at,
                "rejected_versions": servers.c.rejected_versions + 1,
            }
        async with self._tx() as conn:
            version = (
                await conn.execute(
                    update(servers)
                    .where(_still(server_id, incarnation, revision))
                    .values(
                        token_version=servers.c.token_version + 1,
                        last_fetch_time=token.issued_at,
                        next_refresh_time=next_refresh,
                        credential_in_use=used,
                        **rejections,
                        **NO_ERROR,
                        # The new credential works: the fallback is no longer needed.
                        **(
                            {"previous_credential_kind": None, "previous_credential_ct": None}
                            if used == "current"
                            else {}
                        ),
                    )
                    .returning(servers.c.token_version)
                )
            ).scalar_one_or_none()
            if version is None:
                return None
            await conn.execute(delete(tokens).where(tokens.c.server_id == server_id))
            await conn.execute(
                insert(tokens).values(
                    server_id=server_id,
                    version=version,
                    revision=revision,
                    access_token_ct=self._seal_token(server_id, token.access_token),
                    token_type=token.token_type,
                    scopes=json.dumps(list(token.scopes)),
                    issued_at=token.issued_at,
                    expires_at=token.expires_at,
                )
            )
            await self._announce(conn, "token", server_id, version)
        return ServerToken(server_id, token, version, revision)

    async def set_discovery(
        self, server_id: str, incarnation: str, revision: int, discovery: Discovery
    ) -> None:
        async with self._tx() as conn:
            await conn.execute(
                update(servers)
                .where(_still(server_id, incarnation, revision))
                .values(discovery=discovery.to_json())
            )

    async def record_failure(
        self,
        server_id: str,
        incarnation: str,
        revision: int,
        error: FetchError,
        next_attempt: datetime | None = None,
    ) -> None:
        async with self._tx() as conn:
            await conn.execute(
                update(servers)
                .where(_still(server_id, incarnation, revision))
                .values(
                    last_error_reason=error.reason,
                    last_error_code=error.oauth.error or None,
                    last_error_description=error.oauth.error_description or error.message,
                    last_error_time=self.clock(),
                    next_refresh_time=next_attempt,
                )
            )
            await self._announce(conn, "failed", server_id, revision)

    # keys ------------------------------------------------------------------

    async def key_ids_in_use(self) -> set[str]:
        async with self._tx() as conn:
            blobs: Sequence[bytes | None] = [
                *(await conn.execute(select(servers.c.credential_ct))).scalars(),
                *(await conn.execute(select(servers.c.previous_credential_ct))).scalars(),
                *(await conn.execute(select(tokens.c.access_token_ct))).scalars(),
            ]
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
        async with self._tx() as conn:
            server_rows = [
                (row.id, row.credential_kind, row.credential_ct, "")
                for row in await conn.execute(select(servers))
            ] + [
                (row.id, row.previous_credential_kind, row.previous_credential_ct, "previous_")
                for row in await conn.execute(select(servers))
            ]
            token_rows = (
                await conn.execute(select(tokens.c.server_id, tokens.c.access_token_ct))
            ).all()
        for sid, kind, blob, slot in server_rows:
            if blob is None or key_id_of(blob) == primary:
                continue
            fresh = self._seal_credential(sid, self._open_credential(sid, kind, blob, slot), slot)
            column = servers.c[f"{slot}credential_ct"]
            async with self._tx() as conn:
                result = await conn.execute(
                    update(servers)
                    .where(servers.c.id == sid, column == blob)
                    .values({column: fresh})
                )
            rewritten += result.rowcount
            if progress:
                progress(sid)
        for sid, blob in token_rows:
            if key_id_of(blob) == primary:
                continue
            plain = self.keyring.decrypt(blob, associated_data("tokens", sid, "access_token"))
            async with self._tx() as conn:
                result = await conn.execute(
                    update(tokens)
                    .where(tokens.c.server_id == sid, tokens.c.access_token_ct == blob)
                    .values(access_token_ct=self._seal_token(sid, plain.decode()))
                )
            rewritten += result.rowcount
        return rewritten
