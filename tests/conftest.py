"""Shared fixtures: real servers on loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tokensvc.demo.authserver import AuthServer


@pytest.fixture
async def authserver() -> AsyncIterator[AuthServer]:
    """A started, well-behaved authorization server with no clients yet."""
    async with AuthServer() as server:
        yield server


# The fixtures of support.py (databases, stores, a running service).
from support import (  # noqa: E402, F401
    auth,
    database_url,
    harness,
    key_entry,
    keyring,
    manual,
    restore_logging,
    store,
)
