"""AES-GCM envelopes: round trips, binding to row and field, key ids, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tokensvc.crypto import KeyRing, associated_data, generate_key_entry, key_id_of, load_keyring
from tokensvc.errors import ConfigurationError, DecryptionError


def test_a_ciphertext_opens_only_with_the_row_and_field_it_was_sealed_for() -> None:
    ring = KeyRing.parse(generate_key_entry())
    sealed = ring.encrypt(b"s3cret", associated_data("servers", "a", "credential"))
    assert ring.decrypt(sealed, associated_data("servers", "a", "credential")) == b"s3cret"
    assert b"s3cret" not in sealed
    with pytest.raises(DecryptionError, match="moved from another row"):
        ring.decrypt(sealed, associated_data("servers", "b", "credential"))
    with pytest.raises(DecryptionError):
        ring.decrypt(sealed, associated_data("tokens", "a", "credential"))


def test_the_newest_key_encrypts_and_older_keys_still_decrypt() -> None:
    old, new = generate_key_entry(), generate_key_entry()
    aad = associated_data("t", "r", "f")
    sealed_old = KeyRing.parse(old).encrypt(b"x", aad)
    both = KeyRing.parse(f"{old},{new}")
    assert both.primary_id == new.split(":")[0]
    assert both.decrypt(sealed_old, aad) == b"x"
    assert key_id_of(both.encrypt(b"x", aad)) == both.primary_id


def test_a_key_id_that_is_not_configured_is_named_in_the_error() -> None:
    entry = generate_key_entry()
    sealed = KeyRing.parse(entry).encrypt(b"x", b"aad")
    with pytest.raises(DecryptionError, match=entry.split(":")[0]):
        KeyRing.parse(generate_key_entry()).decrypt(sealed, b"aad")


def test_a_tampered_ciphertext_fails() -> None:
    ring = KeyRing.parse(generate_key_entry())
    sealed = bytearray(ring.encrypt(b"hello", b"aad"))
    sealed[-1] ^= 1
    with pytest.raises(DecryptionError):
        ring.decrypt(bytes(sealed), b"aad")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no encryption key"),
        ("k1", "not 'id:base64key'"),
        ("k1:AAAA", "32"),
        ("bad id!:" + "A" * 43, "key id"),
        ("k1:!!!!", "base64|32"),
    ],
)
def test_bad_key_configuration_is_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KeyRing.parse(text)


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys"
    ring, created = load_keyring("", path)
    assert created
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created_again = load_keyring("", path)
    assert not created_again
    assert again.primary_id == ring.primary_id


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(generate_key_entry() + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_keyring("", path)


def test_keys_from_the_environment_win_over_the_file(tmp_path: Path) -> None:
    entry = generate_key_entry()
    ring, created = load_keyring(entry, tmp_path / "keys")
    assert not created
    assert ring.primary_id == entry.split(":")[0]
    assert not (tmp_path / "keys").exists()
