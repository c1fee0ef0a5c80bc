"""What a token request needs, kept between refreshes of a server.

Reading the server, decrypting its credential and the stored token and
parsing the row make up most of a refresh's work in the store, and they give
the same answer every time until the row changes. Where this process is the
only writer of the servers and their tokens (SQLite: one process serves a
database), the store keeps the context of each server and changes it with
each write it makes: a refresh then costs one transaction, the save. With
PostgreSQL, other replicas write too, and the row is read every time.

A context that went stale anyway cannot make a wrong token stick: a token is
saved only under the incarnation and revision it was fetched for, and a
refused save forgets the context, so the next round reads the row again.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from tokensvc.store.records import FetchContext
from tokensvc.token import ServerToken


class FetchContexts:
    """Contexts by server id. Each write forgets the server's context and
    bumps its generation; a read keeps what it read only if no write began
    meanwhile (a read that raced a registration would keep the old row)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._held: dict[str, FetchContext] = {}
        self._generations: dict[str, int] = {}

    def get(self, server_id: str) -> FetchContext | None:
        return self._held.get(server_id)

    def generation(self, server_id: str) -> int:
        return self._generations.get(server_id, 0)

    def put(self, context: FetchContext, generation: int) -> None:
        """Keeps a context read at ``generation``, unless a write began since."""
        server_id = context.record.spec.id
        if self.enabled and self.generation(server_id) == generation:
            self._held[server_id] = context

    def forget(self, server_id: str) -> None:
        self._generations[server_id] = self.generation(server_id) + 1
        self._held.pop(server_id, None)

    def saved(
        self,
        held: ServerToken,
        next_refresh: datetime | None,
        used: str,
        forced: bool,
    ) -> None:
        """A token was saved: the context now holds it, and the status the
        save wrote. A save that also changed the credentials (the fallback
        dropped, or the fallback in use) is rare: forgotten, read next time."""
        context = self._held.get(held.server_id)
        if context is None or context.record.revision != held.revision:
            return
        record, was = context.record, context.record.status
        if used != "current" or context.previous is not None:
            self.forget(held.server_id)
            return
        status = replace(
            was,
            token_version=held.version,
            expires_at=held.token.expires_at,
            last_fetch_time=held.token.issued_at,
            next_refresh_time=next_refresh,
            last_error=None,
            forced_refresh_time=held.token.issued_at if forced else was.forced_refresh_time,
            rejected_versions=was.rejected_versions + 1 if forced else 0,
        )
        self._held[held.server_id] = replace(
            context,
            record=replace(record, status=status, credential_in_use=used),
            token=held,
        )
