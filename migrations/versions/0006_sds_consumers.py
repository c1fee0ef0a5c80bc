"""Envoy SDS consumers, shared by the replicas.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sds_consumers",
        sa.Column("stream_id", sa.String(32), primary_key=True),
        sa.Column("server_id", sa.String(63), primary_key=True),
        sa.Column("replica", sa.String(200), nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("cluster", sa.Text, nullable=False),
        sa.Column("acked_version", sa.String(64), nullable=False),
        sa.Column("acked_time", UTCDateTime),
        sa.Column("nack_error", sa.Text, nullable=False),
        sa.Column("nack_time", UTCDateTime),
        sa.Column("seen_time", UTCDateTime, nullable=False),
    )
    op.create_index("ix_sds_consumers_server", "sds_consumers", ["server_id"])
    op.create_index("ix_sds_consumers_replica", "sds_consumers", ["replica"])


def downgrade() -> None:
    op.drop_index("ix_sds_consumers_replica", table_name="sds_consumers")
    op.drop_index("ix_sds_consumers_server", table_name="sds_consumers")
    op.drop_table("sds_consumers")
