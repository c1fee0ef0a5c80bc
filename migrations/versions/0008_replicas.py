"""Replica heartbeats, for refresh ownership across PostgreSQL replicas.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Created on SQLite too (as 0006's table is): unused there, one process
    # owns every server, but the schemas stay alike.
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("heartbeat_time", UTCDateTime, nullable=False),
        sa.Column("start_time", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replicas")
