"""Workload-identity assertions: JWTs the platform issues to tokensvc, read from files.

A Kubernetes projected service-account token or a SPIFFE JWT-SVID lands in a
directory the operator names (``serve --assertion-dir``); a registration names
one file in it (``assertion_file``) and tokensvc sends what the file holds as
its client assertion (RFC 7523 section 2.2) or as a jwt-bearer grant (section
2.1). Nothing is stored: the platform rotates the file and tokensvc reads it
again on each token request.

The directory is the boundary. A name is relative, has no ``..`` and, with
every symlink resolved, stays inside the directory: at registration and again
at every read, because a symlink can be changed after it was checked. The
kubelet's layout (``token -> ..data/token``, ``..data -> ..2026_12_01_...``,
the ``..data`` link swapped atomically) resolves inside and keeps working.

An assertion is a bearer credential like a client secret: it is wrapped in
:class:`Secret`, never logged, and never sent once its ``exp`` has passed
(the platform failed to renew it; the authorization server would refuse it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tokensvc.errors import InvalidArgument
from tokensvc.token import Clock, Secret, jwt_expiry, utcnow

MAX_NAME = 255
MAX_ASSERTION_BYTES = 16384
# An assertion this close to its exp is not sent: it could expire on the way.
EXPIRY_MARGIN = timedelta(seconds=5)
FIELD = "assertion_file"


class AssertionUnusable(Exception):
    """The file cannot give a usable assertion now (missing, not a JWT, expired).
    The message names the file and what is wrong, never its content."""


@dataclass(frozen=True, slots=True)
class Assertion:
    value: Secret
    expires_at: datetime


class AssertionDir:
    """The operator's directory of platform-issued JWTs. ``root`` None: none
    configured, so registrations that name an assertion file are refused."""

    def __init__(self, root: Path | str | None, clock: Clock = utcnow) -> None:
        self._root = Path(root).resolve() if root else None
        self._clock = clock

    @property
    def configured(self) -> bool:
        return self._root is not None

    def check_name(self, name: str, field: str = FIELD) -> str:
        """Validates a registration's file name; returns it. Refuses what would
        leave the directory, and a file that is missing or holds no JWT."""
        if self._root is None:
            raise InvalidArgument(
                field,
                "this tokensvc has no assertion directory: the operator must start it with "
                "--assertion-dir (TOKENSVC_ASSERTION_DIR) to use platform-issued tokens",
            )
        if not name:
            raise InvalidArgument(field, "is empty: give a file name inside the assertion dir")
        if len(name) > MAX_NAME:
            raise InvalidArgument(field, f"is longer than {MAX_NAME} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise InvalidArgument(field, "contains control characters")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            raise InvalidArgument(
                field,
                f"{name[:80]!r} must be a relative name inside the assertion directory, "
                "without '..'",
            )
        try:
            self._path(name)
            self.read(name)
        except AssertionUnusable as exc:
            raise InvalidArgument(field, str(exc)) from None
        return name

    def read(self, name: str) -> Assertion:
        """The file's JWT, checked to be unexpired; raises AssertionUnusable."""
        path = self._path(name)
        try:
            with path.open("rb") as file:
                data = file.read(MAX_ASSERTION_BYTES + 1)
        except OSError as exc:
            raise AssertionUnusable(
                f"{name!r} cannot be read ({os.strerror(exc.errno or 0).lower()})"
            ) from None
        if len(data) > MAX_ASSERTION_BYTES:
            raise AssertionUnusable(f"{name!r} is larger than {MAX_ASSERTION_BYTES} bytes")
        text = data.decode("ascii", "replace").strip()
        expires_at = jwt_expiry(text)
        if expires_at is None:
            raise AssertionUnusable(
                f"{name!r} does not hold a JWT with an exp claim (a projected service-account "
                "token or a JWT-SVID)"
            )
        if expires_at - EXPIRY_MARGIN <= self._clock():
            raise AssertionUnusable(
                f"{name!r} holds a JWT that expired at {expires_at.isoformat()}: "
                "the platform has not renewed it"
            )
        return Assertion(Secret(text), expires_at)

    def _path(self, name: str) -> Path:
        if self._root is None:
            raise AssertionUnusable(f"{name!r} cannot be read: no --assertion-dir is set")
        try:
            resolved = (self._root / name).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise AssertionUnusable(f"{name!r} does not exist in the assertion directory") from None
        if not resolved.is_relative_to(self._root):
            raise AssertionUnusable(
                f"{name!r} resolves outside the assertion directory (through a symlink), "
                "which is refused"
            )
        if not resolved.is_file():
            raise AssertionUnusable(f"{name!r} is not a regular file")
        return resolved
