import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientAuthMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLIENT_AUTH_METHOD_UNSPECIFIED: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_CLIENT_SECRET_POST: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_PRIVATE_KEY_JWT: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_TLS_CLIENT_AUTH: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_SELF_SIGNED_TLS_CLIENT_AUTH: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_FEDERATED_ASSERTION: _ClassVar[ClientAuthMethod]
    CLIENT_AUTH_METHOD_NONE: _ClassVar[ClientAuthMethod]

class GrantType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_TYPE_UNSPECIFIED: _ClassVar[GrantType]
    GRANT_TYPE_CLIENT_CREDENTIALS: _ClassVar[GrantType]
    GRANT_TYPE_JWT_BEARER: _ClassVar[GrantType]

class AssertionAudience(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSERTION_AUDIENCE_UNSPECIFIED: _ClassVar[AssertionAudience]
    ASSERTION_AUDIENCE_ISSUER: _ClassVar[AssertionAudience]
    ASSERTION_AUDIENCE_TOKEN_ENDPOINT: _ClassVar[AssertionAudience]
CLIENT_AUTH_METHOD_UNSPECIFIED: ClientAuthMethod
CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC: ClientAuthMethod
CLIENT_AUTH_METHOD_CLIENT_SECRET_POST: ClientAuthMethod
CLIENT_AUTH_METHOD_PRIVATE_KEY_JWT: ClientAuthMethod
CLIENT_AUTH_METHOD_TLS_CLIENT_AUTH: ClientAuthMethod
CLIENT_AUTH_METHOD_SELF_SIGNED_TLS_CLIENT_AUTH: ClientAuthMethod
CLIENT_AUTH_METHOD_FEDERATED_ASSERTION: ClientAuthMethod
CLIENT_AUTH_METHOD_NONE: ClientAuthMethod
GRANT_TYPE_UNSPECIFIED: GrantType
GRANT_TYPE_CLIENT_CREDENTIALS: GrantType
GRANT_TYPE_JWT_BEARER: GrantType
ASSERTION_AUDIENCE_UNSPECIFIED: AssertionAudience
ASSERTION_AUDIENCE_ISSUER: AssertionAudience
ASSERTION_AUDIENCE_TOKEN_ENDPOINT: AssertionAudience

class CreateCallerRequest(_message.Message):
    __slots__ = ("name", "roles", "server_patterns", "certificate_identity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    server_patterns: _containers.RepeatedScalarFieldContainer[str]
    certificate_identity: str
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., server_patterns: _Optional[_Iterable[str]] = ..., certificate_identity: _Optional[str] = ...) -> None: ...

class CreateCallerResponse(_message.Message):
    __slots__ = ("caller", "key")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    key: str
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("id", "name", "kind", "certificate_identity", "roles", "server_patterns", "create_time", "last_used_time", "revoke_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    kind: str
    certificate_identity: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    server_patterns: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., certificate_identity: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., server_patterns: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListCallersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCallersResponse(_message.Message):
    __slots__ = ("callers",)
    CALLERS_FIELD_NUMBER: _ClassVar[int]
    callers: _containers.RepeatedCompositeFieldContainer[Caller]
    def __init__(self, callers: _Optional[_Iterable[_Union[Caller, _Mapping]]] = ...) -> None: ...

class RevokeCallerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("server_id", "actor", "start_time", "end_time", "page_size", "page_token")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    actor: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, server_id: _Optional[str] = ..., actor: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "time", "actor", "peer", "action", "server_id", "detail_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: _timestamp_pb2.Timestamp
    actor: str
    peer: str
    action: str
    server_id: str
    detail_json: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., peer: _Optional[str] = ..., action: _Optional[str] = ..., server_id: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("server_id", "min_valid_for", "rejected_token_sha256")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VALID_FOR_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    min_valid_for: _duration_pb2.Duration
    rejected_token_sha256: str
    def __init__(self, server_id: _Optional[str] = ..., min_valid_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rejected_token_sha256: _Optional[str] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("server_id", "access_token", "token_type", "scopes", "issued_at", "expires_at", "version")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    access_token: str
    token_type: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    version: int
    def __init__(self, server_id: _Optional[str] = ..., access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class WatchTokensRequest(_message.Message):
    __slots__ = ("server_ids",)
    SERVER_IDS_FIELD_NUMBER: _ClassVar[int]
    server_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, server_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("sequence", "token", "failed", "removed", "synced", "revoked")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    token: Token
    failed: FetchFailed
    removed: ServerRemoved
    synced: Synced
    revoked: TokenRevoked
    def __init__(self, sequence: _Optional[int] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., failed: _Optional[_Union[FetchFailed, _Mapping]] = ..., removed: _Optional[_Union[ServerRemoved, _Mapping]] = ..., synced: _Optional[_Union[Synced, _Mapping]] = ..., revoked: _Optional[_Union[TokenRevoked, _Mapping]] = ...) -> None: ...

class FetchFailed(_message.Message):
    __slots__ = ("server_id", "error", "next_attempt_time", "current_expires_at", "permanent")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    error: FetchError
    next_attempt_time: _timestamp_pb2.Timestamp
    current_expires_at: _timestamp_pb2.Timestamp
    permanent: bool
    def __init__(self, server_id: _Optional[str] = ..., error: _Optional[_Union[FetchError, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., current_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., permanent: _Optional[bool] = ...) -> None: ...

class ServerRemoved(_message.Message):
    __slots__ = ("server_id",)
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    def __init__(self, server_id: _Optional[str] = ...) -> None: ...

class TokenRevoked(_message.Message):
    __slots__ = ("server_id", "revision")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    revision: int
    def __init__(self, server_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class Synced(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Discovery(_message.Message):
    __slots__ = ("issuer", "token_endpoint", "token_endpoint_auth_methods_supported", "resource_metadata_url", "metadata_url", "discover_time", "mtls_token_endpoint")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_METADATA_URL_FIELD_NUMBER: _ClassVar[int]
    METADATA_URL_FIELD_NUMBER: _ClassVar[int]
    DISCOVER_TIME_FIELD_NUMBER: _ClassVar[int]
    MTLS_TOKEN_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    token_endpoint: str
    token_endpoint_auth_methods_supported: _containers.RepeatedScalarFieldContainer[str]
    resource_metadata_url: str
    metadata_url: str
    discover_time: _timestamp_pb2.Timestamp
    mtls_token_endpoint: str
    def __init__(self, issuer: _Optional[str] = ..., token_endpoint: _Optional[str] = ..., token_endpoint_auth_methods_supported: _Optional[_Iterable[str]] = ..., resource_metadata_url: _Optional[str] = ..., metadata_url: _Optional[str] = ..., discover_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mtls_token_endpoint: _Optional[str] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("server", "client_secret", "private_key_pem", "client_certificate", "assertion_file", "expected_revision", "keep_previous_credential", "drop_previous_credential")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_FILE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREVIOUS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    DROP_PREVIOUS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    server: Server
    client_secret: str
    private_key_pem: str
    client_certificate: ClientCertificate
    assertion_file: str
    expected_revision: int
    keep_previous_credential: bool
    drop_previous_credential: bool
    def __init__(self, server: _Optional[_Union[Server, _Mapping]] = ..., client_secret: _Optional[str] = ..., private_key_pem: _Optional[str] = ..., client_certificate: _Optional[_Union[ClientCertificate, _Mapping]] = ..., assertion_file: _Optional[str] = ..., expected_revision: _Optional[int] = ..., keep_previous_credential: _Optional[bool] = ..., drop_previous_credential: _Optional[bool] = ...) -> None: ...

class ClientCertificate(_message.Message):
    __slots__ = ("certificate_pem", "private_key_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    private_key_pem: str
    def __init__(self, certificate_pem: _Optional[str] = ..., private_key_pem: _Optional[str] = ...) -> None: ...

class TestServerRequest(_message.Message):
    __slots__ = ("id", "registration", "call_mcp")
    ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    CALL_MCP_FIELD_NUMBER: _ClassVar[int]
    id: str
    registration: RegisterServerRequest
    call_mcp: bool
    def __init__(self, id: _Optional[str] = ..., registration: _Optional[_Union[RegisterServerRequest, _Mapping]] = ..., call_mcp: _Optional[bool] = ...) -> None: ...

class TestServerResponse(_message.Message):
    __slots__ = ("ok", "steps")
    OK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    steps: _containers.RepeatedCompositeFieldContainer[TestStep]
    def __init__(self, ok: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[TestStep, _Mapping]]] = ...) -> None: ...

class TestStep(_message.Message):
    __slots__ = ("name", "ok", "detail", "duration", "reason", "error", "http_status", "tool_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    TOOL_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    detail: str
    duration: _duration_pb2.Duration
    reason: str
    error: str
    http_status: int
    tool_count: int
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., http_status: _Optional[int] = ..., tool_count: _Optional[int] = ...) -> None: ...

class Server(_message.Message):
    __slots__ = ("id", "mcp_url", "token_endpoint", "issuer", "client_id", "auth_method", "scopes", "resource", "audience", "extra_token_params", "refresh_fraction", "key_id", "signing_alg", "assertion_audience", "grant_type", "credential_set", "revision", "create_time", "update_time", "status", "discovery", "effective_auth_method", "previous_credential_set", "credential_in_use", "credential", "sds_consumers")
    class ExtraTokenParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MCP_URL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_TOKEN_PARAMS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FRACTION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNING_ALG_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    GRANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_SET_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CREDENTIAL_SET_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_IN_USE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SDS_CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    mcp_url: str
    token_endpoint: str
    issuer: str
    client_id: str
    auth_method: ClientAuthMethod
    scopes: _containers.RepeatedScalarFieldContainer[str]
    resource: str
    audience: str
    extra_token_params: _containers.ScalarMap[str, str]
    refresh_fraction: float
    key_id: str
    signing_alg: str
    assertion_audience: AssertionAudience
    grant_type: GrantType
    credential_set: bool
    revision: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    status: TokenStatus
    discovery: Discovery
    effective_auth_method: ClientAuthMethod
    previous_credential_set: bool
    credential_in_use: str
    credential: CredentialInfo
    sds_consumers: _containers.RepeatedCompositeFieldContainer[SdsConsumer]
    def __init__(self, id: _Optional[str] = ..., mcp_url: _Optional[str] = ..., token_endpoint: _Optional[str] = ..., issuer: _Optional[str] = ..., client_id: _Optional[str] = ..., auth_method: _Optional[_Union[ClientAuthMethod, str]] = ..., scopes: _Optional[_Iterable[str]] = ..., resource: _Optional[str] = ..., audience: _Optional[str] = ..., extra_token_params: _Optional[_Mapping[str, str]] = ..., refresh_fraction: _Optional[float] = ..., key_id: _Optional[str] = ..., signing_alg: _Optional[str] = ..., assertion_audience: _Optional[_Union[AssertionAudience, str]] = ..., grant_type: _Optional[_Union[GrantType, str]] = ..., credential_set: _Optional[bool] = ..., revision: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[TokenStatus, _Mapping]] = ..., discovery: _Optional[_Union[Discovery, _Mapping]] = ..., effective_auth_method: _Optional[_Union[ClientAuthMethod, str]] = ..., previous_credential_set: _Optional[bool] = ..., credential_in_use: _Optional[str] = ..., credential: _Optional[_Union[CredentialInfo, _Mapping]] = ..., sds_consumers: _Optional[_Iterable[_Union[SdsConsumer, _Mapping]]] = ...) -> None: ...

class CredentialInfo(_message.Message):
    __slots__ = ("kind", "expire_time", "certificate_subject", "assertion_file")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_FILE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    expire_time: _timestamp_pb2.Timestamp
    certificate_subject: str
    assertion_file: str
    def __init__(self, kind: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., certificate_subject: _Optional[str] = ..., assertion_file: _Optional[str] = ...) -> None: ...

class SdsConsumer(_message.Message):
    __slots__ = ("node_id", "cluster", "acked_version", "acked_time", "nack_error", "nack_time")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_TIME_FIELD_NUMBER: _ClassVar[int]
    NACK_ERROR_FIELD_NUMBER: _ClassVar[int]
    NACK_TIME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cluster: str
    acked_version: str
    acked_time: _timestamp_pb2.Timestamp
    nack_error: str
    nack_time: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., cluster: _Optional[str] = ..., acked_version: _Optional[str] = ..., acked_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., nack_error: _Optional[str] = ..., nack_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TokenStatus(_message.Message):
    __slots__ = ("expires_at", "last_fetch_time", "next_refresh_time", "last_error", "token_version", "rejected_versions", "forced_refresh_time", "warning")
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_FETCH_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FORCED_REFRESH_TIME_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    last_fetch_time: _timestamp_pb2.Timestamp
    next_refresh_time: _timestamp_pb2.Timestamp
    last_error: FetchError
    token_version: int
    rejected_versions: int
    forced_refresh_time: _timestamp_pb2.Timestamp
    warning: str
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_fetch_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_refresh_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[_Union[FetchError, _Mapping]] = ..., token_version: _Optional[int] = ..., rejected_versions: _Optional[int] = ..., forced_refresh_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., warning: _Optional[str] = ...) -> None: ...

class FetchError(_message.Message):
    __slots__ = ("reason", "error", "error_description", "time")
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    reason: str
    error: str
    error_description: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, reason: _Optional[str] = ..., error: _Optional[str] = ..., error_description: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetServerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteServerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListServersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListServersResponse(_message.Message):
    __slots__ = ("servers", "next_page_token")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[Server]
    next_page_token: str
    def __init__(self, servers: _Optional[_Iterable[_Union[Server, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
