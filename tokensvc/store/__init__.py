"""Persistence: SQLAlchemy tables, migrations and the repository."""

from tokensvc.store.engine import create_engine
from tokensvc.store.repository import (
    FetchContext,
    LastError,
    Registration,
    ServerRecord,
    ServerStatus,
    Store,
)

__all__ = [
    "FetchContext",
    "LastError",
    "Registration",
    "ServerRecord",
    "ServerStatus",
    "Store",
    "create_engine",
]
