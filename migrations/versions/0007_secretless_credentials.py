"""Secretless credentials: client certificates, assertion files, the jwt-bearer grant.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        # "client_certificate" is longer than the 16 characters kinds had.
        batch.alter_column("credential_kind", type_=sa.String(32), existing_type=sa.String(16))
        batch.alter_column(
            "previous_credential_kind", type_=sa.String(32), existing_type=sa.String(16)
        )
        batch.add_column(sa.Column("credential_info", sa.Text))
        batch.add_column(sa.Column("grant_type", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("grant_type")
        batch.drop_column("credential_info")
        batch.alter_column(
            "previous_credential_kind", type_=sa.String(16), existing_type=sa.String(32)
        )
        batch.alter_column("credential_kind", type_=sa.String(16), existing_type=sa.String(32))
