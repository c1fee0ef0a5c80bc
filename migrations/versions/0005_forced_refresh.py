"""When a server's token was last replaced because an MCP server refused it,
and how many tokens in a row were.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("forced_refresh_time", UTCDateTime))
        batch.add_column(
            sa.Column("rejected_versions", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("rejected_versions")
        batch.drop_column("forced_refresh_time")
