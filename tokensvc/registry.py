"""The admin use cases: register, test and delete servers; create and revoke callers.

Written once here and called by the AdminService servicer, the CLI and the
tests alike. Each runs its cheap checks first, then what goes over the
network, then the store, then tells the token manager and the audit trail.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime

from tokensvc.assertions import AssertionDir
from tokensvc.auth import Role, check_patterns, key_hash, new_key, typed_identity
from tokensvc.discovery import complete, discover, needs_discovery
from tokensvc.egress import Egress
from tokensvc.errors import InvalidArgument
from tokensvc.fallbacks import Fetch
from tokensvc.manager import TokenManager
from tokensvc.probe import Step, probe
from tokensvc.registration import (
    Credential,
    PreviousCredential,
    ServerSpec,
    check_certificate_endpoint,
    validate_credential,
    validate_server_id,
    validate_spec,
)
from tokensvc.store import ServerRecord, Store
from tokensvc.store.access import AccessStore, AuditEvent, CallerRecord
from tokensvc.store.notify import ChangeKind
from tokensvc.token import Clock, utcnow

log = logging.getLogger(__name__)


class Registry:
    """The registered servers, as admins change them."""

    def __init__(
        self,
        store: Store,
        manager: TokenManager,
        egress: Egress,
        fetch: Fetch,
        assertions: AssertionDir | None = None,
    ) -> None:
        self._store = store
        self._manager = manager
        self._egress = egress
        self._fetch = fetch
        self._assertions = assertions

    async def register(
        self,
        spec: ServerSpec,
        credential: Credential | None,
        *,
        actor: str,
        expected_revision: int = 0,
        keep_previous: bool = False,
        drop_previous: bool = False,
    ) -> ServerRecord:
        """Creates or replaces a server; returns what is stored."""
        previous = previous_choice(keep_previous, drop_previous, credential)
        if expected_revision < -1:
            raise InvalidArgument("expected_revision", "must be -1, 0 or a revision number")
        spec = await validate_spec(spec, self._egress.policy)
        if credential is not None:
            validate_credential(credential, spec, self._assertions)
        found = None
        if needs_discovery(spec):
            found = await discover(spec, self._egress.get, self._egress.policy)
            if credential is not None:
                # A client certificate may not go to a discovered http endpoint.
                endpoint = complete(spec, credential.kind, found).token_endpoint
                where = "server.issuer" if spec.issuer else "server.mcp_url"
                check_certificate_endpoint(credential.kind, endpoint, where)
        result = await self._store.register(
            spec, credential, expected_revision, actor, found, previous
        )
        if result.changed:
            self._manager.registered(result.record, result.revised)
            log.info(
                "server registered",
                extra={"server_id": spec.id, "revision": result.record.revision, "actor": actor},
            )
        return result.record

    async def test_stored(self, server_id: str, *, actor: str, call_mcp: bool) -> list[Step]:
        """Probes a stored server with its stored credential."""
        validate_server_id(server_id)
        loaded = await self._store.load_for_fetch(server_id)
        record = loaded.record
        return await self._probe(record.spec, loaded.credential, record, actor, call_mcp)

    async def test_given(
        self, spec: ServerSpec, credential: Credential | None, *, actor: str, call_mcp: bool
    ) -> list[Step]:
        """Probes a registration before it is stored."""
        spec = await validate_spec(spec, self._egress.policy, "registration.server.")
        if credential is None:
            raise InvalidArgument(
                "registration.client_secret", "is required: the credential to test"
            )
        credential = validate_credential(credential, spec, self._assertions)
        return await self._probe(spec, credential, None, actor, call_mcp)

    async def _probe(
        self,
        spec: ServerSpec,
        credential: Credential,
        record: ServerRecord | None,
        actor: str,
        call_mcp: bool,
    ) -> list[Step]:
        discovery = record.discovery if record is not None else None
        steps = await probe(
            spec, credential, discovery, fetch=self._fetch, egress=self._egress, call_mcp=call_mcp
        )
        ok = all(step.ok for step in steps)
        await self._store.audit(
            actor, "test", spec.id, ok=ok, steps=[s.name for s in steps if s.ok]
        )
        return steps

    async def get(self, server_id: str) -> ServerRecord:
        validate_server_id(server_id)
        return await self._store.get_server(server_id)

    async def page(self, after: str, limit: int) -> list[ServerRecord]:
        return await self._store.list_servers(after, limit)

    async def delete(self, server_id: str, *, actor: str) -> None:
        validate_server_id(server_id)
        await self._store.delete(server_id, actor)
        self._manager.removed(server_id)
        log.info("server deleted", extra={"server_id": server_id, "actor": actor})


def previous_choice(keep: bool, drop: bool, credential: Credential | None) -> PreviousCredential:
    """What becomes of the credential a registration replaces."""
    if keep and drop:
        raise InvalidArgument(
            "keep_previous_credential", "cannot be set together with drop_previous_credential"
        )
    if keep and credential is None:
        raise InvalidArgument(
            "keep_previous_credential", "needs a new client_secret or private_key_pem"
        )
    if keep:
        return PreviousCredential.KEEP
    return PreviousCredential.DROP if drop else PreviousCredential.UNCHANGED


class Callers:
    """Who may call tokensvc: created and revoked by admins or the CLI.

    ``reload`` re-reads the callers in this process and ``end_watches`` ends a
    revoked caller's streams; the CLI, which serves nothing, has neither.
    Other replicas learn of a change through the store's announcement.
    """

    def __init__(
        self,
        access: AccessStore,
        store: Store,
        *,
        reload: Callable[[], Awaitable[None]] | None = None,
        end_watches: Callable[[str], None] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._access = access
        self._store = store
        self._reload = reload
        self._end_watches = end_watches
        self._clock = clock

    async def create(
        self,
        *,
        actor: str,
        name: str,
        roles: list[str],
        patterns: list[str] | None = None,
        certificate_identity: str = "",
    ) -> tuple[CallerRecord, str]:
        """Creates a caller; returns it and, for a key caller, its key (shown once)."""
        record, key = new_caller(
            name, roles, patterns or ["*"], certificate_identity, self._clock()
        )
        await self._access.create_caller(record)
        await self._changed()
        await self._store.audit(actor, "caller_create", None, caller_id=record.id, name=record.name)
        return record, key

    async def revoke(self, caller_id: str, *, actor: str) -> CallerRecord:
        revoked = await self._access.revoke_caller(caller_id, self._clock())
        if revoked is None:
            raise InvalidArgument("id", f"no caller with id {caller_id[:40]!r}: see ListCallers")
        await self._changed()
        if self._end_watches is not None:
            self._end_watches(revoked.id)
        await self._store.audit(
            actor, "caller_revoke", None, caller_id=revoked.id, name=revoked.name
        )
        return revoked

    async def _changed(self) -> None:
        if self._reload is not None:
            await self._reload()
        await self._store.announce(ChangeKind.CALLERS)

    async def all(self) -> list[CallerRecord]:
        return await self._access.list_callers()

    async def audit_events(
        self,
        *,
        server_id: str,
        actor: str,
        start: datetime | None,
        end: datetime | None,
        before_id: int,
        limit: int,
    ) -> list[AuditEvent]:
        return await self._access.list_audit(
            server_id=server_id,
            actor=actor,
            start=start,
            end=end,
            before_id=before_id,
            limit=limit,
        )


def new_caller(
    name: str, roles: list[str], patterns: list[str], certificate_identity: str, now: datetime
) -> tuple[CallerRecord, str]:
    """A checked caller record and, for a key caller, its key."""
    if not name or len(name) > 200 or any(ord(c) < 0x20 for c in name):
        raise InvalidArgument("name", "is required: 1 to 200 printable characters")
    known = {role.value for role in Role}
    if not roles or not set(roles) <= known:
        raise InvalidArgument("roles", f"give one or more of {', '.join(sorted(known))}")
    checked = check_patterns(patterns)
    if certificate_identity:
        certificate_identity = typed_identity(certificate_identity)
        caller_id, key, digest = secrets.token_hex(8), "", None
        kind = "certificate"
    else:
        caller_id, key = new_key()
        digest, kind = key_hash(key), "key"
    record = CallerRecord(
        id=caller_id,
        name=name,
        kind=kind,
        identity=certificate_identity,
        key_hash=digest,
        roles=tuple(sorted(set(roles))),
        server_patterns=checked,
        create_time=now,
        last_used_time=None,
        revoke_time=None,
    )
    return record, key
