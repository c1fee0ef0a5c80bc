"""The schema. Changed only together with a new Alembic migration in migrations/versions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which keeps no zone) too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

servers = Table(
    "servers",
    metadata,
    Column("id", String(63), primary_key=True),
    # Random per creation: a server deleted and registered again is another server.
    Column("incarnation", String(32), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("mcp_url", Text, nullable=False),
    Column("token_endpoint", Text, nullable=False),
    Column("issuer", Text, nullable=False),
    Column("client_id", Text, nullable=False),
    Column("auth_method", String(32), nullable=False),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("resource", Text, nullable=False),
    Column("audience", Text, nullable=False),
    Column("extra_token_params", Text, nullable=False),  # JSON object
    Column("refresh_fraction", Float, nullable=False, server_default="0"),
    Column("key_id", Text, nullable=False, server_default=""),
    Column("signing_alg", String(16), nullable=False, server_default=""),
    Column("assertion_audience", String(32), nullable=False, server_default=""),
    Column("discovery", Text),  # JSON: what discovery found (tokensvc.discovery.Discovery)
    # The credential replaced with keep_previous_credential, until the new one works.
    Column("previous_credential_kind", String(32)),
    Column("previous_credential_ct", LargeBinary),  # AES-GCM envelope
    Column("credential_in_use", String(16), nullable=False, server_default=""),
    Column("credential_kind", String(32)),
    Column("credential_ct", LargeBinary),  # AES-GCM envelope
    # JSON: what may be shown of the credential (registration.CredentialInfo).
    Column("credential_info", Text),
    Column("grant_type", String(64), nullable=False, server_default=""),
    Column("token_version", BigInteger, nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Column("last_fetch_time", UTCDateTime),
    Column("next_refresh_time", UTCDateTime),
    Column("last_error_reason", String(64)),
    Column("last_error_code", String(64)),
    Column("last_error_description", Text),
    Column("last_error_time", UTCDateTime),
    # The last token replaced because an MCP server refused it, and how many
    # tokens in a row were (0 once a token lives to its scheduled refresh).
    Column("forced_refresh_time", UTCDateTime),
    Column("rejected_versions", BigInteger, nullable=False, server_default="0"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("server_id", String(63), ForeignKey("servers.id", ondelete="CASCADE"), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("access_token_ct", LargeBinary, nullable=False),  # AES-GCM envelope
    Column("token_type", String(64), nullable=False),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", UTCDateTime, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(32), nullable=False),
    Column("server_id", String(63)),
    Column("detail", Text, nullable=False),  # JSON; never a secret or token
    Column("peer", Text, nullable=False, server_default=""),
    Index("ix_audit_events_server_time", "server_id", "time"),
    Index("ix_audit_events_time", "time"),
)

# Who may call: a bearer key (stored as its SHA-256: the key is 256 random
# bits, so a slow hash buys nothing) or a client-certificate identity.
callers = Table(
    "callers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # key | certificate
    Column("identity", Text, nullable=False),  # certificate: SPIFFE ID, DNS name or CN
    Column("key_hash", String(64)),
    Column("roles", Text, nullable=False),  # JSON list
    Column("server_patterns", Text, nullable=False),  # JSON list of fnmatch patterns
    Column("create_time", UTCDateTime, nullable=False),
    Column("last_used_time", UTCDateTime),
    Column("revoke_time", UTCDateTime),
)

# Envoy nodes holding a server's secret over SDS, written by the replica each
# is connected to, so that every replica's GetServer shows them all. A row
# whose replica stopped refreshing seen_time is stale and ignored.
sds_consumers = Table(
    "sds_consumers",
    metadata,
    Column("stream_id", String(32), primary_key=True),
    Column("server_id", String(63), primary_key=True),
    Column("replica", String(200), nullable=False),
    Column("node_id", Text, nullable=False),
    Column("cluster", Text, nullable=False),
    Column("acked_version", String(64), nullable=False),
    Column("acked_time", UTCDateTime),
    Column("nack_error", Text, nullable=False),
    Column("nack_time", UTCDateTime),
    Column("seen_time", UTCDateTime, nullable=False),
    Index("ix_sds_consumers_server", "server_id"),
    Index("ix_sds_consumers_replica", "replica"),
)

# PostgreSQL replicas' heartbeats (tokensvc.ownership): who is live, by the
# database's clock. SQLite serves one process, which owns everything; the
# table exists there too, empty, so that both schemas stay alike.
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("heartbeat_time", UTCDateTime, nullable=False),
    Column("start_time", UTCDateTime, nullable=False),
)
