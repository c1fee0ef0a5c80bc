"""Registration's writes: create or revise a server in one transaction.

Part of the store (tokensvc.store.repository.Store); its statements are built
once, their values given at execution.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from sqlalchemy import bindparam, delete, insert, literal_column, select, update
from sqlalchemy.engine import Connection, Row

from tokensvc.discovery import Discovery
from tokensvc.errors import InvalidArgument, RevisionMismatch
from tokensvc.registration import (
    Credential,
    CredentialInfo,
    PreviousCredential,
    RevisionPlan,
    ServerSpec,
    plan_revision,
)
from tokensvc.store.notify import ChangeKind
from tokensvc.store.records import Registration, record_of, spec_columns, spec_of
from tokensvc.store.rotation import KeyRotation
from tokensvc.store.tables import servers, tokens

NO_ERROR: dict[str, Any] = {
    "last_error_reason": None,
    "last_error_code": None,
    "last_error_description": None,
    "last_error_time": None,
}
# A server with the expiry of its current token, if stored.
SERVER = (
    select(servers, tokens.c.expires_at.label("token_expires_at"))
    .outerjoin(
        tokens, (tokens.c.server_id == servers.c.id) & (tokens.c.revision == servers.c.revision)
    )
    .where(servers.c.id == bindparam("sid"))
)
LOCKED = select(servers).where(servers.c.id == bindparam("sid")).with_for_update()
# A new server has no token yet: it comes back as SERVER would read it.
CREATE = insert(servers).returning(*servers.c, literal_column("NULL").label("token_expires_at"))


class Registering(KeyRotation):
    def _register(
        self,
        conn: Connection,
        spec: ServerSpec,
        credential: Credential | None,
        expected_revision: int,
        actor: str,
        discovery: Discovery | None,
        previous: PreviousCredential,
    ) -> Registration:
        now = self.clock()
        found = discovery.to_json() if discovery is not None else None
        # FOR UPDATE: on PostgreSQL (read committed) two concurrent updates
        # would otherwise both build on the same revision. SQLite holds the
        # write lock from BEGIN IMMEDIATE already.
        row = conn.execute(LOCKED, {"sid": spec.id}).one_or_none()
        actual = row.revision if row is not None else 0
        if (expected_revision == -1 and row is not None) or (
            expected_revision > 0 and expected_revision != actual
        ):
            raise RevisionMismatch(spec.id, expected_revision, actual)
        if row is None:
            if credential is None:
                raise InvalidArgument(
                    "client_secret",
                    "is required to create a server: give client_secret (it is never shown again)",
                )
            stored = conn.execute(
                CREATE,
                {
                    "id": spec.id,
                    "incarnation": secrets.token_hex(16),
                    "revision": 1,
                    "credential_kind": credential.kind.value,
                    "credential_ct": self._seal_credential(spec.id, credential),
                    "credential_info": CredentialInfo.of(credential).to_json(),
                    "token_version": 0,
                    "discovery": found,
                    "create_time": now,
                    "update_time": now,
                    **spec_columns(spec),
                },
            ).one()
            self._audit(conn, actor, "create", spec.id, revision=1)
            self._announce(conn, ChangeKind.REGISTERED, spec.id, 1, revised=True)
            return Registration(record_of(stored), revised=True, changed=True, created=True)
        plan = plan_revision(
            spec_of(row),
            spec,
            credential_changed=credential is not None
            and not self._same_credential(row, credential),
            discovery_changed=Discovery.from_json(row.discovery) != discovery,
            holds_previous=row.previous_credential_ct is not None,
            previous=previous,
        )
        changed, revised = plan.changed, plan.revised
        if changed:
            self._revise(conn, row, spec, credential, found, plan)
            revision = row.revision + 1 if revised else row.revision
            self._audit(conn, actor, "update", spec.id, revision=revision, changed=plan.fields)
            self._announce(conn, ChangeKind.REGISTERED, spec.id, revision, revised)
        stored = conn.execute(SERVER, {"sid": spec.id}).one()
        return Registration(record_of(stored), revised, changed)

    def _revise(
        self,
        conn: Connection,
        row: Row[Any],
        spec: ServerSpec,
        credential: Credential | None,
        found: str | None,
        plan: RevisionPlan,
    ) -> None:
        values: dict[str, Any] = {
            "revision": row.revision + 1 if plan.revised else row.revision,
            "update_time": self.clock(),
            "discovery": found,
            **spec_columns(spec),
        }
        if plan.revised:
            values.update(NO_ERROR, next_refresh_time=None)
        if credential is not None and "credential" in plan.fields:
            values["credential_kind"] = credential.kind.value
            values["credential_ct"] = self._seal_credential(spec.id, credential)
            values["credential_info"] = CredentialInfo.of(credential).to_json()
            values["credential_in_use"] = ""
        if plan.keep_old_credential and row.credential_ct is not None:
            old = self._open_credential(spec.id, row.credential_kind, row.credential_ct)
            values["previous_credential_kind"] = old.kind.value
            values["previous_credential_ct"] = self._seal_credential(spec.id, old, "previous_")
        elif plan.drops_previous:
            values["previous_credential_kind"] = None
            values["previous_credential_ct"] = None
        conn.execute(update(servers).where(servers.c.id == spec.id).values(**values))
        if plan.revised:
            conn.execute(delete(tokens).where(tokens.c.server_id == spec.id))

    def _same_credential(self, row: Row[Any], credential: Credential) -> bool:
        if row.credential_ct is None or row.credential_kind != credential.kind.value:
            return False
        stored = self._open_credential(row.id, row.credential_kind, row.credential_ct)
        return hmac.compare_digest(
            stored.value.reveal().encode(), credential.value.reveal().encode()
        )
