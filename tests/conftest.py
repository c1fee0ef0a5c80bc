"""Shared fixtures: real servers on loopback sockets (defined in support.py)."""

from support import (  # noqa: F401
    auth,
    database_url,
    harness,
    key_entry,
    keyring,
    manual,
    restore_logging,
    store,
)
