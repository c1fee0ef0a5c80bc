"""Callers (bearer keys and certificate identities) and the audit trail's peer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("identity", sa.Text, nullable=False),
        sa.Column("key_hash", sa.String(64)),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("server_patterns", sa.Text, nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("last_used_time", UTCDateTime),
        sa.Column("revoke_time", UTCDateTime),
    )
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("peer", sa.Text, nullable=False, server_default=""))
    op.create_index("ix_audit_events_time", "audit_events", ["time"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_time", table_name="audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("peer")
    op.drop_table("callers")
