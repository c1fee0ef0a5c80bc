"""Proto in, domain values out, and back. No policy lives here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tokensvc import client_cert
from tokensvc.errors import FetchError, InvalidArgument
from tokensvc.events import Event, FetchFailed, ServerRemoved, TokenIssued, TokenRevoked
from tokensvc.probe import Step
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
from tokensvc.sds import Consumer
from tokensvc.store import ServerRecord, ServerStatus
from tokensvc.store.access import AuditEvent, CallerRecord
from tokensvc.token import Secret, ServerToken
from tokensvc.v1 import tokensvc_pb2 as pb

AUTH_METHODS = {
    pb.CLIENT_AUTH_METHOD_UNSPECIFIED: AuthMethod.UNSPECIFIED,
    pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC: AuthMethod.CLIENT_SECRET_BASIC,
    pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_POST: AuthMethod.CLIENT_SECRET_POST,
    pb.CLIENT_AUTH_METHOD_PRIVATE_KEY_JWT: AuthMethod.PRIVATE_KEY_JWT,
    pb.CLIENT_AUTH_METHOD_TLS_CLIENT_AUTH: AuthMethod.TLS_CLIENT_AUTH,
    pb.CLIENT_AUTH_METHOD_SELF_SIGNED_TLS_CLIENT_AUTH: AuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH,
    pb.CLIENT_AUTH_METHOD_FEDERATED_ASSERTION: AuthMethod.FEDERATED_ASSERTION,
    pb.CLIENT_AUTH_METHOD_NONE: AuthMethod.NONE,
}
AUTH_METHOD_PROTO = {method: number for number, method in AUTH_METHODS.items()}
GRANT_TYPES = {
    pb.GRANT_TYPE_UNSPECIFIED: GrantType.CLIENT_CREDENTIALS,
    pb.GRANT_TYPE_CLIENT_CREDENTIALS: GrantType.CLIENT_CREDENTIALS,
    pb.GRANT_TYPE_JWT_BEARER: GrantType.JWT_BEARER,
}
GRANT_TYPE_PROTO = {
    GrantType.CLIENT_CREDENTIALS: pb.GRANT_TYPE_UNSPECIFIED,
    GrantType.JWT_BEARER: pb.GRANT_TYPE_JWT_BEARER,
}


AUDIENCES = {
    pb.ASSERTION_AUDIENCE_UNSPECIFIED: AssertionAudience.UNSPECIFIED,
    pb.ASSERTION_AUDIENCE_ISSUER: AssertionAudience.ISSUER,
    pb.ASSERTION_AUDIENCE_TOKEN_ENDPOINT: AssertionAudience.TOKEN_ENDPOINT,
}
AUDIENCE_PROTO = {value: key for key, value in AUDIENCES.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


MAX_DURATION = timedelta(days=1)
# What datetime can hold: 0001-01-01 to 9999-12-31, in seconds since 1970.
MIN_TIMESTAMP, MAX_TIMESTAMP = -62_135_596_800, 253_402_300_799


def duration(value: Duration, field: str, default: timedelta) -> timedelta:
    if value.seconds == 0 and value.nanos == 0:
        return default
    # Checked before converting: timedelta overflows long before Duration does.
    if not 0 <= value.seconds <= MAX_DURATION.total_seconds() or not 0 <= value.nanos < 10**9:
        raise InvalidArgument(field, 'must be between 0 and 24h, e.g. "30s"')
    result: timedelta = value.ToTimedelta()
    if result > MAX_DURATION:
        raise InvalidArgument(field, 'must be between 0 and 24h, e.g. "30s"')
    return result


def moment(value: Timestamp, field: str) -> datetime:
    """A Timestamp as an aware datetime; out of datetime's range is INVALID_ARGUMENT."""
    if not MIN_TIMESTAMP <= value.seconds <= MAX_TIMESTAMP or not 0 <= value.nanos < 10**9:
        raise InvalidArgument(
            field, 'must be between 0001-01-01 and 9999-12-31, e.g. "2026-01-02T03:04:05Z"'
        )
    return value.ToDatetime(tzinfo=UTC)


def spec_from_proto(server: pb.Server) -> ServerSpec:
    if server.auth_method not in AUTH_METHODS:
        raise InvalidArgument(
            "server.auth_method",
            "unknown method: use one of "
            + ", ".join(pb.ClientAuthMethod.Name(n) for n in AUTH_METHODS if n),
        )
    if server.grant_type not in GRANT_TYPES:
        raise InvalidArgument(
            "server.grant_type",
            "unknown grant: use GRANT_TYPE_CLIENT_CREDENTIALS or GRANT_TYPE_JWT_BEARER",
        )
    if server.assertion_audience not in AUDIENCES:
        raise InvalidArgument(
            "server.assertion_audience",
            "unknown audience: use ASSERTION_AUDIENCE_ISSUER or ASSERTION_AUDIENCE_TOKEN_ENDPOINT",
        )
    return ServerSpec(
        id=server.id,
        mcp_url=server.mcp_url,
        token_endpoint=server.token_endpoint,
        issuer=server.issuer,
        client_id=server.client_id,
        auth_method=AUTH_METHODS[server.auth_method],
        scopes=tuple(server.scopes),
        resource=server.resource,
        audience=server.audience,
        extra_token_params=sorted_params(server.extra_token_params),
        refresh_fraction=server.refresh_fraction,
        key_id=server.key_id,
        signing_alg=server.signing_alg,
        assertion_audience=AUDIENCES[server.assertion_audience],
        grant_type=GRANT_TYPES[server.grant_type],
    )


def credential_from_proto(request: pb.RegisterServerRequest) -> Credential | None:
    which = request.WhichOneof("credential")
    if which == "client_secret":
        return Credential(CredentialKind.CLIENT_SECRET, Secret(request.client_secret))
    if which == "private_key_pem":
        return Credential(CredentialKind.PRIVATE_KEY, Secret(request.private_key_pem))
    if which == "client_certificate":
        given = request.client_certificate
        value = client_cert.bundle(given.certificate_pem, given.private_key_pem)
        return Credential(CredentialKind.CLIENT_CERTIFICATE, Secret(value))
    if which == "assertion_file":
        return Credential(CredentialKind.ASSERTION_FILE, Secret(request.assertion_file))
    return None


# From this many refused tokens in a row, the status says so in words.
REJECTED_VERSIONS_WARNING = 2


def _warning(status: ServerStatus) -> str:
    if status.rejected_versions >= REJECTED_VERSIONS_WARNING:
        return (
            f"the MCP server keeps refusing this server's tokens: {status.rejected_versions} "
            "in a row were reported rejected and replaced; check the registration's resource, "
            "audience and scopes against what the MCP server expects (TestServer with call_mcp)"
        )
    return ""


def credential_info_to_proto(info: CredentialInfo | None) -> pb.CredentialInfo | None:
    if info is None:
        return None
    return pb.CredentialInfo(
        kind=info.kind.value,
        expire_time=timestamp(info.expire_time),
        certificate_subject=info.certificate_subject,
        assertion_file=info.assertion_file,
    )


def consumer_to_proto(consumer: Consumer) -> pb.SdsConsumer:
    return pb.SdsConsumer(
        node_id=consumer.node.id,
        cluster=consumer.node.cluster,
        acked_version=consumer.acked_version,
        acked_time=timestamp(consumer.acked_at),
        nack_error=consumer.nack_error,
        nack_time=timestamp(consumer.nacked_at),
    )


def server_to_proto(record: ServerRecord, consumers: Iterable[Consumer] = ()) -> pb.Server:
    spec, status = record.spec, record.status
    out = pb.Server(
        id=spec.id,
        mcp_url=spec.mcp_url,
        token_endpoint=spec.token_endpoint,
        issuer=spec.issuer,
        client_id=spec.client_id,
        auth_method=AUTH_METHOD_PROTO[spec.auth_method],
        scopes=spec.scopes,
        resource=spec.resource,
        audience=spec.audience,
        extra_token_params=dict(spec.extra_token_params),
        refresh_fraction=spec.refresh_fraction,
        key_id=spec.key_id,
        signing_alg=spec.signing_alg,
        assertion_audience=AUDIENCE_PROTO[spec.assertion_audience],
        grant_type=GRANT_TYPE_PROTO[spec.grant_type],
        effective_auth_method=AUTH_METHOD_PROTO[record.effective_spec.auth_method],
        credential_set=record.credential_kind is not None,
        previous_credential_set=record.previous_credential,
        credential_in_use=record.credential_in_use,
        credential=credential_info_to_proto(record.credential_info),
        revision=record.revision,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        status=pb.TokenStatus(
            expires_at=timestamp(status.expires_at),
            last_fetch_time=timestamp(status.last_fetch_time),
            next_refresh_time=timestamp(status.next_refresh_time),
            token_version=status.token_version,
            rejected_versions=status.rejected_versions,
            forced_refresh_time=timestamp(status.forced_refresh_time),
            warning=_warning(status),
        ),
        sds_consumers=[consumer_to_proto(c) for c in consumers],
    )
    if record.discovery is not None:
        found = record.discovery
        out.discovery.CopyFrom(
            pb.Discovery(
                issuer=found.issuer,
                token_endpoint=found.token_endpoint,
                token_endpoint_auth_methods_supported=found.auth_methods_supported,
                resource_metadata_url=found.resource_metadata_url,
                metadata_url=found.metadata_url,
                discover_time=timestamp(found.time),
                mtls_token_endpoint=found.mtls_token_endpoint,
            )
        )
    if status.last_error is not None:
        error = status.last_error
        out.status.last_error.CopyFrom(
            pb.FetchError(
                reason=error.reason,
                error=error.error,
                error_description=error.error_description,
                time=timestamp(error.time),
            )
        )
    return out


def token_to_proto(held: ServerToken) -> pb.Token:
    token = held.token
    return pb.Token(
        server_id=held.server_id,
        access_token=token.access_token,
        token_type=token.token_type,
        scopes=token.scopes,
        issued_at=timestamp(token.issued_at),
        expires_at=timestamp(token.expires_at),
        version=held.version,
    )


def fetch_error_to_proto(error: FetchError, time: datetime) -> pb.FetchError:
    return pb.FetchError(
        reason=error.reason,
        error=error.oauth.error,
        error_description=error.oauth.error_description or error.message,
        time=timestamp(time),
    )


def event_to_proto(event: Event, sequence: int) -> pb.TokenEvent:
    match event:
        case TokenIssued(token=held):
            return pb.TokenEvent(sequence=sequence, token=token_to_proto(held))
        case FetchFailed():
            return pb.TokenEvent(
                sequence=sequence,
                failed=pb.FetchFailed(
                    server_id=event.server_id,
                    error=fetch_error_to_proto(event.error, event.time),
                    next_attempt_time=timestamp(event.next_attempt),
                    current_expires_at=timestamp(event.current_expires_at),
                    permanent=event.permanent,
                ),
            )
        case TokenRevoked(server_id=server_id, revision=revision):
            return pb.TokenEvent(
                sequence=sequence,
                revoked=pb.TokenRevoked(server_id=server_id, revision=revision),
            )
        case ServerRemoved(server_id=server_id):
            return pb.TokenEvent(sequence=sequence, removed=pb.ServerRemoved(server_id=server_id))
    raise TypeError(f"unknown event {type(event).__name__}")


def synced(sequence: int) -> pb.TokenEvent:
    return pb.TokenEvent(sequence=sequence, synced=pb.Synced())


def step_to_proto(step: Step) -> pb.TestStep:
    result = pb.TestStep(
        name=step.name,
        ok=step.ok,
        detail=step.detail,
        reason=step.reason,
        error=step.error,
        http_status=step.http_status,
        tool_count=step.tool_count,
    )
    result.duration.FromTimedelta(timedelta(seconds=round(step.seconds, 3)))
    return result


def caller_to_proto(record: CallerRecord) -> pb.Caller:
    return pb.Caller(
        id=record.id,
        name=record.name,
        kind=record.kind,
        certificate_identity=record.identity,
        roles=record.roles,
        server_patterns=record.server_patterns,
        create_time=timestamp(record.create_time),
        last_used_time=timestamp(record.last_used_time),
        revoke_time=timestamp(record.revoke_time),
    )


def audit_to_proto(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.id,
        time=timestamp(event.time),
        actor=event.actor,
        peer=event.peer,
        action=event.action,
        server_id=event.server_id,
        detail_json=json.dumps(event.detail, sort_keys=True),
    )
