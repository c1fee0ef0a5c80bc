"""private_key_jwt settings, discovered metadata, a previous credential.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("key_id", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("signing_alg", sa.String(16), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("assertion_audience", sa.String(32), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("discovery", sa.Text))
        batch.add_column(sa.Column("previous_credential_kind", sa.String(16)))
        batch.add_column(sa.Column("previous_credential_ct", sa.LargeBinary))
        batch.add_column(
            sa.Column("credential_in_use", sa.String(16), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        for column in (
            "credential_in_use",
            "previous_credential_ct",
            "previous_credential_kind",
            "discovery",
            "assertion_audience",
            "signing_alg",
            "key_id",
        ):
            batch.drop_column(column)
