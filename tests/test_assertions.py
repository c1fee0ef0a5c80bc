"""Assertion files: the platform's JWTs, read from the operator's directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokensvc.assertions import EXPIRY_MARGIN, AssertionDir, AssertionUnusable
from tokensvc.errors import InvalidArgument

from support import FakeClock
from workload import PlatformIssuer, ProjectedVolume

AUDIENCE = "https://as.example/token"


@pytest.fixture(scope="module")
def issuer() -> PlatformIssuer:
    return PlatformIssuer()


def test_reads_the_jwt_the_kubelet_projected_and_follows_each_rotation(
    tmp_path: Path, issuer: PlatformIssuer
) -> None:
    volume = ProjectedVolume(tmp_path / "tokens")
    first, second = issuer.issue(AUDIENCE), issuer.issue(AUDIENCE)
    volume.write(first + "\n")
    assertions = AssertionDir(volume.root)
    assert assertions.check_name("token") == "token"
    assert assertions.read("token").value.reveal() == first
    volume.write(second)  # a new ..<timestamp> dir, ..data swapped, the old one removed
    assert assertions.read("token").value.reveal() == second


def test_an_expired_jwt_is_never_used(tmp_path: Path, issuer: PlatformIssuer) -> None:
    jwt = issuer.issue(AUDIENCE, lifetime=60)
    (tmp_path / "token").write_text(jwt)
    clock = FakeClock()
    assertions = AssertionDir(tmp_path, clock)
    exp = assertions.read("token").expires_at
    clock.now = exp - EXPIRY_MARGIN - timedelta(seconds=1)
    assert assertions.read("token").value.reveal() == jwt
    clock.now = exp - EXPIRY_MARGIN
    with pytest.raises(AssertionUnusable, match="expired at") as caught:
        assertions.read("token")
    assert jwt not in str(caught.value)
    with pytest.raises(InvalidArgument, match="assertion_file: 'token' holds a JWT that expired"):
        assertions.check_name("token")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../outside", "without '..'"),
        ("sub/../../outside", "without '..'"),
        ("/etc/hostname", "relative name"),
        ("escape", "resolves outside the assertion directory"),
        ("missing", "does not exist"),
        ("loop", "does not exist"),
        ("subdir", "not a regular file"),
        ("notjwt", "does not hold a JWT"),
        ("noexp", "does not hold a JWT"),
        ("", "is empty"),
        ("a\nb", "control characters"),
    ],
)
def test_names_that_leave_the_directory_or_hold_no_jwt_are_refused_at_registration(
    tmp_path: Path, issuer: PlatformIssuer, name: str, says: str
) -> None:
    root = tmp_path / "tokens"
    root.mkdir()
    (tmp_path / "outside").write_text(issuer.issue(AUDIENCE))
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "loop").symlink_to(root / "loop")
    (root / "subdir").mkdir()
    (root / "notjwt").write_text("not a jwt at all")
    (root / "noexp").write_text("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln")
    with pytest.raises(InvalidArgument) as caught:
        AssertionDir(root).check_name(name)
    assert caught.value.field == "assertion_file"
    assert says in caught.value.message


def test_a_symlink_changed_after_registration_to_escape_is_refused_at_read(
    tmp_path: Path, issuer: PlatformIssuer
) -> None:
    root = tmp_path / "tokens"
    root.mkdir()
    (root / "real").write_text(issuer.issue(AUDIENCE))
    (tmp_path / "secret").write_text(issuer.issue(AUDIENCE))
    (root / "token").symlink_to("real")
    assertions = AssertionDir(root)
    assertions.check_name("token")
    (root / "token").unlink()
    (root / "token").symlink_to(tmp_path / "secret")
    with pytest.raises(AssertionUnusable, match="outside the assertion directory"):
        assertions.read("token")


def test_without_a_directory_registrations_are_refused_with_the_setting_to_use() -> None:
    with pytest.raises(InvalidArgument, match="--assertion-dir"):
        AssertionDir(None).check_name("token")


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_text("a" * 20000)
    with pytest.raises(AssertionUnusable, match="larger than"):
        AssertionDir(tmp_path).read("big")


def test_expiry_is_read_from_the_exp_claim(tmp_path: Path, issuer: PlatformIssuer) -> None:
    (tmp_path / "t").write_text(issuer.issue(AUDIENCE, lifetime=3600))
    expires = AssertionDir(tmp_path).read("t").expires_at
    assert abs(expires - datetime.now(UTC) - timedelta(hours=1)) < timedelta(seconds=30)
