"""Test helpers for workload identity: a platform issuer that signs JWTs for
tokensvc (as a Kubernetes API server or a SPIFFE server would), and a
directory that the tests rotate the way the kubelet rotates a projected
service-account token."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

PLATFORM_ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:mcp:tokensvc"


class PlatformIssuer:
    """Signs short-lived JWTs with its own RSA key; ``jwks`` is what a trusting
    authorization server would fetch."""

    def __init__(self, issuer: str = PLATFORM_ISSUER) -> None:
        self.issuer = issuer
        self.key = RSAKey.generate_key(2048, parameters={"kid": "platform-1", "use": "sig"})

    def issue(
        self, audience: str, subject: str = SUBJECT, lifetime: float = 600, **claims: Any
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode({"alg": "RS256", "kid": "platform-1"}, payload, self.key)

    @property
    def jwks(self) -> KeySet:
        return KeySet([self.key])


class ProjectedVolume:
    """A directory laid out as the kubelet lays out a projected volume:
    ``NAME -> ..data/NAME`` and ``..data -> ..<timestamp>``; ``write`` makes a
    new timestamped directory and swaps ``..data`` atomically (rename)."""

    def __init__(self, root: Path, name: str = "token") -> None:
        self.root = root
        self.name = name
        self._generation = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, content: str) -> None:
        self._generation += 1
        stamp = f"..2026_12_01_00_00_{self._generation:02d}.{os.getpid()}"
        (self.root / stamp).mkdir()
        (self.root / stamp / self.name).write_text(content)
        staging = self.root / "..data_tmp"
        staging.symlink_to(stamp)
        previous = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        staging.replace(self.root / "..data")
        if not (self.root / self.name).is_symlink():
            (self.root / self.name).symlink_to(Path("..data") / self.name)
        if previous is not None:
            for child in previous.iterdir():
                child.unlink()
            previous.rmdir()
