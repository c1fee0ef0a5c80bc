"""What the store hands out: server records, their status, and the rows they come from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row

from tokensvc.discovery import Discovery, complete
from tokensvc.registration import (
    AssertionAudience,
    AuthMethod,
    Credential,
    CredentialInfo,
    CredentialKind,
    GrantType,
    ServerSpec,
    sorted_params,
)
from tokensvc.token import ServerToken


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
    created: bool = False  # a new server


@dataclass(frozen=True, slots=True)
class FetchContext:
    """What a token request needs: the registration, its credential, and the
    stored token if it was fetched under the current revision."""

    record: ServerRecord
    credential: Credential
    token: ServerToken | None
    previous: Credential | None = None  # the fallback kept by keep_previous_credential


def spec_of(row: Row[Any]) -> ServerSpec:
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


def spec_columns(spec: ServerSpec) -> dict[str, Any]:
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


def record_of(row: Row[Any]) -> ServerRecord:
    last_error = None
    if row.last_error_reason:
        last_error = LastError(
            row.last_error_reason,
            row.last_error_code or "",
            row.last_error_description or "",
            row.last_error_time,
        )
    return ServerRecord(
        spec=spec_of(row),
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
