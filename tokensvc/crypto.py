"""AES-256-GCM envelopes with key ids, bound to the row and field they belong to.

An envelope is ``0x01 | len(key_id) | key_id | nonce(12) | ciphertext+tag``.
The associated data names the table, the row and the field, so a ciphertext
copied into another row or column fails to open rather than decrypting to
someone else's secret. Keys have ids so that old rows stay readable while
``rotate-keys`` re-encrypts them under the newest key.

Key configuration is one string: ``id:base64key`` entries separated by commas
or newlines, the newest last. The newest encrypts; all decrypt.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokensvc.errors import ConfigurationError, DecryptionError

VERSION = 1
NONCE_BYTES = 12
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def associated_data(table: str, row: str, field: str) -> bytes:
    return f"tokensvc/v1|{table}|{row}|{field}".encode()


class KeyRing:
    """The configured keys; encrypts under the newest, decrypts under any."""

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._keys: dict[str, AESGCM] = {}
        self.primary_id = ""
        for key_id, key in keys:
            if not KEY_ID.fullmatch(key_id):
                raise ConfigurationError(
                    f"key id {key_id[:64]!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ -"
                )
            if len(key) != 32:
                raise ConfigurationError(
                    f"key {key_id!r} is {len(key)} bytes; AES-256 needs 32 "
                    "(make one with `tokensvc keygen`)"
                )
            if key_id in self._keys:
                raise ConfigurationError(f"key id {key_id!r} is configured twice")
            self._keys[key_id] = AESGCM(key)
            self.primary_id = key_id
        if not self._keys:
            raise ConfigurationError("no encryption key is configured")

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """Parses ``id:base64key`` entries (comma or newline separated, '#' comments)."""
        keys = []
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        for raw in ",".join(lines).split(","):
            entry = raw.strip()
            if not entry:
                continue
            key_id, sep, encoded = entry.partition(":")
            if not sep:
                raise ConfigurationError(f"key entry for {key_id[:8]!r}... is not 'id:base64key'")
            try:
                key = base64.urlsafe_b64decode(encoded.strip() + "=" * (-len(encoded) % 4))
            except ValueError:
                raise ConfigurationError(f"key {key_id!r} is not valid base64") from None
            keys.append((key_id.strip(), key))
        return cls(keys)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        key_id = self.primary_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.primary_id].encrypt(nonce, plaintext, aad)
        return bytes([VERSION, len(key_id)]) + key_id + nonce + sealed

    def decrypt(self, envelope: bytes, aad: bytes) -> bytes:
        key_id = key_id_of(envelope)
        aead = self._keys.get(key_id)
        if aead is None:
            raise DecryptionError(
                f"data is encrypted under key {key_id!r}, which is not configured"
            )
        start = 2 + len(key_id.encode())
        nonce = envelope[start : start + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, envelope[start + NONCE_BYTES :], aad)
        except InvalidTag:
            raise DecryptionError(
                "a ciphertext failed authentication: it was altered, or moved from another row"
            ) from None


def key_id_of(envelope: bytes) -> str:
    if len(envelope) < 2 + NONCE_BYTES + 16 or envelope[0] != VERSION:
        raise DecryptionError("not a tokensvc envelope (unknown version or truncated)")
    length = envelope[1]
    return envelope[2 : 2 + length].decode("ascii", errors="replace")


def generate_key_entry(now: datetime | None = None) -> str:
    """A new ``id:base64key`` line; the id carries the date for the operator's benefit."""
    when = (now or datetime.now(UTC)).strftime("%Y%m%d")
    key_id = f"k{when}-{secrets.token_hex(3)}"
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"{key_id}:{key}"


def load_keyring(keys: str, key_file: os.PathLike[str] | str) -> tuple[KeyRing, bool]:
    """The configured keys: ``keys`` if given, else the key file, created (mode
    0600) when missing. Returns the ring and whether a file was created."""
    if keys.strip():
        return KeyRing.parse(keys), False
    path = os.fspath(key_file)
    created = False
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(
                    "# tokensvc encryption keys, newest last. Keep this file secret, and back\n"
                    "# it up:"
                    " without it the stored credentials and tokens cannot be decrypted.\n"
                )
                handle.write(generate_key_entry() + "\n")
            created = True
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(
            f"key file {path} is readable by others (mode {mode:o}): chmod 600 {path}"
        )
    with open(path) as handle:
        return KeyRing.parse(handle.read()), created
