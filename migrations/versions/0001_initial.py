"""Servers, their tokens, and the audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "servers",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("mcp_url", sa.Text, nullable=False),
        sa.Column("token_endpoint", sa.Text, nullable=False),
        sa.Column("issuer", sa.Text, nullable=False),
        sa.Column("client_id", sa.Text, nullable=False),
        sa.Column("auth_method", sa.String(32), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("audience", sa.Text, nullable=False),
        sa.Column("extra_token_params", sa.Text, nullable=False),
        sa.Column("credential_kind", sa.String(16)),
        sa.Column("credential_ct", sa.LargeBinary),
        sa.Column("token_version", sa.BigInteger, nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.Column("last_fetch_time", UTCDateTime),
        sa.Column("next_refresh_time", UTCDateTime),
        sa.Column("last_error_reason", sa.String(64)),
        sa.Column("last_error_code", sa.String(64)),
        sa.Column("last_error_description", sa.Text),
        sa.Column("last_error_time", UTCDateTime),
    )
    op.create_table(
        "tokens",
        sa.Column(
            "server_id",
            sa.String(63),
            sa.ForeignKey("servers.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("access_token_ct", sa.LargeBinary, nullable=False),
        sa.Column("token_type", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("issued_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", UTCDateTime, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("server_id", sa.String(63)),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_events_server_time", "audit_events", ["server_id", "time"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_server_time", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("tokens")
    op.drop_table("servers")
