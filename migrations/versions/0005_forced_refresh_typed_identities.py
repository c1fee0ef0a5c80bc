"""When a server's token was last replaced because an MCP server refused it,
and how many tokens in a row were; certificate identities typed.

Identities stored before this revision were untyped, and matched a
certificate's SPIFFE ID, DNS name or common name alike. They become
``uri:`` (a SPIFFE ID), ``dns:`` (a name with a dot that is a valid DNS name)
or ``cn:`` (anything else). A caller that was matched by a common name that
looks like a DNS name must be created again with ``cn:``: it fails closed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

from tokensvc.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


callers = sa.table(
    "callers", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("identity")
)
DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9-]{1,63}\.)+[A-Za-z0-9-]{1,63}\.?")


def _typed(identity: str) -> str:
    if identity.startswith(("uri:", "dns:", "cn:")):
        return identity
    if identity.startswith("spiffe://"):
        return "uri:" + identity
    if DNS_NAME.fullmatch(identity):
        return "dns:" + identity.lower()
    return "cn:" + identity


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("forced_refresh_time", UTCDateTime))
        batch.add_column(
            sa.Column("rejected_versions", sa.BigInteger, nullable=False, server_default="0")
        )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(callers.c.id, callers.c.identity).where(callers.c.kind == "certificate")
    ).all()
    for row in rows:
        connection.execute(
            callers.update().where(callers.c.id == row.id).values(identity=_typed(row.identity))
        )


def downgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(callers.c.id, callers.c.identity).where(callers.c.kind == "certificate")
    ).all()
    for row in rows:
        untyped = row.identity.split(":", 1)[1] if ":" in row.identity else row.identity
        connection.execute(callers.update().where(callers.c.id == row.id).values(identity=untyped))
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("rejected_versions")
        batch.drop_column("forced_refresh_time")
