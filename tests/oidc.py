"""panva's oidc-provider (Node, OpenID-certified) as a subprocess, for interop tests.

    async with OidcProvider([secret_client("c1", "s3cret")], ttl=60) as provider:
        ...  # POST to provider.token_endpoint with resource=<an MCP URL on loopback>

``tests/interop/provider.mjs`` is the server; this module installs its
dependencies once per session if ``tests/interop/node_modules`` is missing or
stale (CI runs ``npm ci --prefix tests/interop`` itself), starts it on a free
port, and waits for the one JSON line it prints once it listens. Without
``node`` (or ``npm`` when an install is needed) the test is skipped, unless
``TOKENSVC_TEST_REQUIRE_INTEROP=1``, which turns every skip into a failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, KeyParameters, RSAKey

from support import unavailable

INTEROP = Path(__file__).parent / "interop"
NPM_CI_TIMEOUT = 300.0  # seconds
START_TIMEOUT = 30.0  # seconds for node to print its "listening" line
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

_installed = False  # npm ci ran (or was not needed) in this session


# --- clients -------------------------------------------------------------------


def secret_client(
    client_id: str,
    secret: str,
    *,
    auth_method: str = "client_secret_basic",
    scope: str = "read write",
) -> dict[str, Any]:
    """A client authenticating with a secret. oidc-provider takes only printable
    ASCII secrets, and lets either secret method through whichever is registered."""
    return {
        "client_id": client_id,
        "client_secret": secret,
        "token_endpoint_auth_method": auth_method,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "scope": scope,  # what the client may get at a resource (see provider.mjs)
    }


@dataclass(frozen=True)
class ClientKey:
    """A client's signing key for private_key_jwt: the private PEM stays with the
    client (tokensvc), the public JWK goes to the provider."""

    alg: str  # RS256, PS256 or ES256
    private_pem: str
    public_jwk: dict[str, Any]

    @classmethod
    def generate(cls, alg: str = "RS256") -> ClientKey:
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg in ("RS256", "PS256"):
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported alg {alg}")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        key = cls._import(alg, pem)
        return cls(alg, pem, dict(key.as_dict(private=False)))

    @property
    def kid(self) -> str:
        return str(self.public_jwk["kid"])

    def assertion(
        self,
        client_id: str,
        audience: str | list[str],
        *,
        lifetime: int = 60,
        jti: str | None = None,
        alg: str | None = None,
    ) -> str:
        """An RFC 7523 client assertion: iss = sub = client_id, a fresh jti."""
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": jti or secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + lifetime,
        }
        alg = alg or self.alg
        header = {"alg": alg, "kid": self.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self._import(alg, self.private_pem), algorithms=[alg])

    @staticmethod
    def _import(alg: str, pem: str) -> RSAKey | ECKey:
        parameters: KeyParameters = {"use": "sig", "alg": alg}
        key = (ECKey if alg == "ES256" else RSAKey).import_key(pem, parameters)
        key.ensure_kid()  # the RFC 7638 thumbprint
        return key


def key_client(client_id: str, key: ClientKey, *, scope: str = "read write") -> dict[str, Any]:
    """A private_key_jwt client that signs its assertions with ``key.alg`` only."""
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": key.alg,
        "jwks": {"keys": [key.public_jwk]},
        "grant_types": ["client_credentials"],
        "response_types": [],
        "scope": scope,
    }


def tls_client(client_id: str, subject_dn: str, *, scope: str = "read write") -> dict[str, Any]:
    """An RFC 8705 section 2.1 client: a certificate that the provider's
    client_ca signed, with this subject (one CN, e.g. ``CN=broker``)."""
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_subject_dn": subject_dn,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "scope": scope,
    }


def self_signed_client(
    client_id: str, cert_pem: bytes, *, scope: str = "read write"
) -> dict[str, Any]:
    """An RFC 8705 section 2.2 client: the self-signed certificate's public key
    and the certificate itself (x5c) registered in its jwks."""
    certificate = x509.load_pem_x509_certificate(cert_pem)
    public = certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = dict(ECKey.import_key(public).as_dict(private=False))
    jwk["x5c"] = [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()]
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "self_signed_tls_client_auth",
        "jwks": {"keys": [jwk]},
        "grant_types": ["client_credentials"],
        "response_types": [],
        "scope": scope,
    }


# --- the provider process ----------------------------------------------------------


class OidcProvider:
    """oidc-provider on 127.0.0.1:<free port>, with ``clients`` and access tokens
    living ``ttl`` seconds. Its URLs are known once the ``async with`` is entered."""

    def __init__(
        self,
        clients: list[dict[str, Any]],
        *,
        ttl: int = 60,
        tls: dict[str, str] | None = None,
    ) -> None:
        """``tls``: {"cert", "key", "client_ca"} PEMs, to serve https and take
        RFC 8705 client certificates (see provider.mjs)."""
        self.config: dict[str, Any] = {"clients": clients, "ttl": ttl}
        if tls is not None:
            self.config["tls"] = tls
        self.issuer = ""
        self.port = 0
        self.start_seconds = 0.0  # from spawning node to its "listening" line
        self._process: asyncio.subprocess.Process | None = None
        self._stderr: deque[str] = deque(maxlen=50)
        self._drain: asyncio.Task[None] | None = None

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    async def __aenter__(self) -> Self:
        node = shutil.which("node")
        if node is None:
            unavailable(
                "INTEROP", "node is not installed: the oidc-provider interop tests need Node 20+"
            )
        await ensure_installed()
        started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            node,
            str(INTEROP / "provider.mjs"),
            "0",
            stdin=asyncio.subprocess.PIPE,  # closing it stops node, even if we die
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "OIDC_PROVIDER_CONFIG": json.dumps(self.config),
                "OIDC_PROVIDER_WATCH_STDIN": "1",
            },
        )
        self._drain = asyncio.create_task(self._collect_stderr())
        try:
            assert self._process.stdout is not None
            try:
                line = await asyncio.wait_for(self._process.stdout.readline(), START_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(
                    f"provider.mjs printed nothing in {START_TIMEOUT:g} s:\n" + self.stderr
                ) from None
            if not line:
                await self._process.wait()
                raise RuntimeError(
                    f"provider.mjs exited ({self._process.returncode}) before listening:\n"
                    + await self._stderr_soon()
                )
            ready = json.loads(line)
        except BaseException:
            await self._stop()
            raise
        self.start_seconds = time.monotonic() - started
        self.issuer, self.port = ready["issuer"], ready["port"]
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _collect_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for line in self._process.stderr:
            self._stderr.append(line.decode(errors="replace"))

    async def _stderr_soon(self) -> str:
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 2)
        return self.stderr

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()  # provider.mjs exits on end of stdin
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await self._stderr_soon()
            self._drain.cancel()


# --- npm ci, once per session --------------------------------------------------------


def _installed_version() -> str | None:
    try:
        return str(
            json.loads((INTEROP / "node_modules/oidc-provider/package.json").read_text())["version"]
        )
    except (OSError, ValueError, KeyError):
        return None


def _locked_version() -> str:
    lock = json.loads((INTEROP / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/oidc-provider"]["version"])


async def ensure_installed() -> None:
    """Runs ``npm ci --prefix tests/interop`` unless node_modules has the locked version."""
    global _installed
    if _installed or _installed_version() == _locked_version():
        _installed = True
        return
    npm = shutil.which("npm")
    if npm is None:
        unavailable("INTEROP", "npm is not installed, and tests/interop/node_modules is missing")
    # One install at a time across processes (parallel pytest workers, say).
    lock_path = Path(tempfile.gettempdir()) / f"tokensvc-npm-ci-{os.getuid()}.lock"
    with lock_path.open("w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            if _installed_version() != _locked_version():  # another process may have done it
                await _npm_ci(npm)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _installed = True


async def _npm_ci(npm: str) -> None:
    process = await asyncio.create_subprocess_exec(
        npm,
        "ci",
        "--prefix",
        str(INTEROP),
        "--no-audit",
        "--no-fund",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), NPM_CI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        unavailable("INTEROP", f"npm ci --prefix tests/interop took over {NPM_CI_TIMEOUT:g} s")
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-2000:]
        unavailable(
            "INTEROP", f"npm ci --prefix tests/interop failed ({process.returncode}):\n{tail}"
        )
