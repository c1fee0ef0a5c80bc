"""Persistence: SQLAlchemy tables, migrations and the repository."""

from tokensvc.store.engine import create_engine
from tokensvc.store.records import (
    FetchContext,
    LastError,
    Registration,
    ServerRecord,
    ServerStatus,
)
from tokensvc.store.repository import Store

__all__ = [
    "FetchContext",
    "LastError",
    "Registration",
    "ServerRecord",
    "ServerStatus",
    "Store",
    "create_engine",
]
