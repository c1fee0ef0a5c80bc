"""Who is calling, and may they have this.

A caller is identified by its client certificate under mTLS (a SPIFFE URI SAN,
else a DNS SAN, else the common name, each typed: ``uri:``, ``dns:``, ``cn:``)
or by a bearer key in the ``authorization`` metadata (``Bearer
tsk_<id>_<secret>``). Keys are stored as SHA-256 digests and shown once, at
creation. Roles: ``admin`` may call
AdminService, ``broker`` TokenService, for the server ids its patterns match.

With no caller ever created and a loopback listener, tokensvc is open to
anything on the host (and says so at start). Once any caller has existed (the
database keeps revoked callers), every call must authenticate, for good: the
last admin cannot be revoked, and a database whose callers are all revoked
refuses every call until ``tokensvc create-caller`` adds one on the host.
Health and reflection stay open to all.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from tokensvc.errors import InvalidArgument, PermissionDenied, Unauthenticated
from tokensvc.store.access import AccessStore, CallerRecord
from tokensvc.token import Clock, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "tsk_"
DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}\.?")
# How often an unknown key or certificate may make the caller list be re-read
# (a key created by the CLI, or on another replica, is found without a restart).
RELOAD_INTERVAL = 1.0
# Bounds of what is remembered between calls: callers per connection, and the
# visibility of server ids per caller (ids come from callers, so both are capped).
MAX_REMEMBERED_CALLERS = 4096
MAX_REMEMBERED_VISIBLE = 1024
NO_USABLE_CALLER = (
    "every caller is revoked, so every call is refused: create a caller on the host "
    "with 'tokensvc create-caller' (tokensvc does not reopen to anonymous callers)"
)


class Role(StrEnum):
    ADMIN = "admin"
    BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Caller:
    id: str
    name: str
    kind: str  # key | certificate | open
    roles: frozenset[str]
    patterns: tuple[str, ...]
    peer: str = ""
    # may_see's answers so far: a caller is remembered between its calls (see
    # Authenticator), and its patterns never change (a reload makes new callers).
    _seen: dict[str, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def actor(self) -> str:
        """How the audit trail names the caller: ``kind:name@peer``."""
        return f"{self.kind}:{self.name}@{self.peer}"

    def may_see(self, server_id: str) -> bool:
        seen = self._seen.get(server_id)
        if seen is None:
            seen = any(fnmatch.fnmatchcase(server_id, pattern) for pattern in self.patterns)
            if len(self._seen) < MAX_REMEMBERED_VISIBLE:
                self._seen[server_id] = seen
        return seen


def new_key() -> tuple[str, str]:
    """A new caller id and its key (``tsk_<id>_<secret>``), 256 random bits."""
    caller_id = secrets.token_hex(8)
    return caller_id, f"{KEY_PREFIX}{caller_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_patterns(patterns: Iterable[str], field: str = "server_patterns") -> tuple[str, ...]:
    checked = tuple(patterns)
    for i, pattern in enumerate(checked):
        if (
            not pattern
            or len(pattern) > 128
            or not all(c.isalnum() or c in "._-*?[]!" for c in pattern)
        ):
            raise InvalidArgument(
                f"{field}[{i}]", "is a server id pattern: a-z, 0-9, . _ - and the wildcards * ? [ ]"
            )
    return checked


def _authorization(context: Any) -> str:
    """The call's authorization metadata: the last one, as a dict of the
    metadata would have it; "" if none."""
    header = ""
    for name, value in context.invocation_metadata() or ():
        if name == "authorization":
            header = value
    return str(header)


def _open_caller(peer: str) -> Caller:
    """Anyone, in open mode: every role, every server."""
    return Caller("", "local", "open", frozenset(Role), ("*",), peer)


def certificate_identity(auth_context: dict[str, list[bytes]]) -> str:
    """The client certificate's identity, typed so that one kind never matches
    another: ``uri:`` its SPIFFE ID, else ``dns:`` its first DNS name, else
    ``cn:`` its common name."""
    pem = (auth_context.get("x509_pem_cert") or [b""])[0]
    return _identity_of(pem) if pem else ""


@functools.lru_cache(maxsize=1024)
def _identity_of(pem: bytes) -> str:
    # Parsed once per certificate, not on every call of a connection.
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                return f"uri:{uri}"
        for dns in names.get_values_for_type(x509.DNSName):
            return f"dns:{dns}"
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"cn:{common[0].value!s}" if common else ""


def typed_identity(value: str, field: str = "certificate_identity") -> str:
    """A caller's certificate identity as stored: ``uri:spiffe://...``,
    ``dns:NAME`` or ``cn:NAME``; a bare SPIFFE ID is taken as ``uri:``."""
    if value.startswith("spiffe://"):
        value = "uri:" + value
    kind, _, name = value.partition(":")
    if len(value) > 512 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(field, "must be at most 512 printable characters")
    if kind == "uri" and name.startswith("spiffe://") and len(name) > len("spiffe://"):
        return value
    if kind == "dns" and DNS_NAME.fullmatch(name):
        return value.lower()
    if kind == "cn" and name:
        return value
    raise InvalidArgument(
        field,
        f"{value[:80]!r} does not say which kind of identity it is: give uri:spiffe://..., "
        "dns:NAME (the certificate's first DNS name) or cn:NAME (its common name, for "
        "certificates without SANs)",
    )


class Authenticator:
    """Who a call comes from. Every call is checked against the callers as last
    loaded; what a call of a known caller needs is looked up, not recomputed: a
    key by its SHA-256 digest (the form in which keys are stored), and the
    :class:`Caller` of each (caller, connection). :meth:`load` (after any
    change of callers, a revocation above all) replaces both, at once."""

    def __init__(
        self,
        access: AccessStore,
        *,
        open_allowed: bool,
        clock: Clock = utcnow,
        certificates: bool = True,
    ) -> None:
        self._access = access
        self._open_allowed = open_allowed
        # False: the listener asks for no client certificate (no client CA), so
        # a call's auth context cannot name one and is not read.
        self._certificates = certificates
        self._clock = clock
        self._by_id: dict[str, CallerRecord] = {}
        self._by_identity: dict[str, CallerRecord] = {}
        self._by_key_hash: dict[str, CallerRecord] = {}
        # (caller id, "" when open; peer) -> the record it was made of, and the caller
        self._callers: dict[tuple[str, str], tuple[CallerRecord | None, Caller]] = {}
        self._loaded_at = 0.0
        # Bumped by every load: what was concluded about a call before it may no longer hold.
        self.generation = 0
        self._ever = False  # a caller has existed (revoked ones included)
        self._lock = asyncio.Lock()
        self.used: dict[str, datetime] = {}  # last use per caller, flushed with the audit

    @property
    def caller_ids(self) -> set[str]:
        return set(self._by_id)

    @property
    def open(self) -> bool:
        """No caller ever created, on loopback: anything on this host may call."""
        return self._open_allowed and not self._ever

    @property
    def locked_out(self) -> bool:
        """Callers existed, and every one is revoked: no call can succeed."""
        return self._ever and not self._by_id

    async def load(self) -> None:
        every = await self._access.list_callers()
        records = [r for r in every if r.revoke_time is None]
        was_locked_out = self.locked_out
        self._ever = bool(every)
        self._by_id = {r.id: r for r in records}
        if self.locked_out and not was_locked_out:
            log.warning(NO_USABLE_CALLER)
        self._by_identity = {r.identity: r for r in records if r.kind == "certificate"}
        self._by_key_hash = {r.key_hash: r for r in records if r.key_hash is not None}
        self._callers = {}
        self.generation += 1
        self._loaded_at = asyncio.get_running_loop().time()

    async def _reload_soon(self) -> None:
        async with self._lock:
            if asyncio.get_running_loop().time() - self._loaded_at >= RELOAD_INTERVAL:
                await self.load()

    def credential(self, context: Any) -> tuple[str, str] | None:
        """What :meth:`authenticate` decides a call's caller by, when that is
        the call's metadata alone: its authorization header, or (open, with no
        certificates asked for) its peer. None when a client certificate may
        decide it, which is read afresh from each call's auth context."""
        header = _authorization(context)
        if header:
            return header, ""
        if self.open and not self._certificates:
            return "", str(context.peer())
        return None

    def stamp(self, caller: Caller, now: datetime) -> None:
        """``caller`` made a call at ``now`` (its last use, as stored)."""
        if caller.kind != "open":
            self.used[caller.id] = now

    async def authenticate(self, context: Any) -> Caller:
        peer = str(context.peer())
        header = _authorization(context)
        record: CallerRecord | None
        if header:
            record = await self._by_key(str(header))
        elif self._certificates and (identity := certificate_identity(context.auth_context())):
            record = self._by_identity.get(identity)
            if record is None:
                await self._reload_soon()
                record = self._by_identity.get(identity)
            if record is None:
                if self.open:  # mTLS on loopback before any caller exists
                    return self._caller(None, peer)
                raise Unauthenticated(
                    f"the client certificate {identity!r} is not a registered caller"
                )
        elif self.open:
            return self._caller(None, peer)
        elif self.locked_out:
            raise Unauthenticated(NO_USABLE_CALLER)
        else:
            raise Unauthenticated(
                "authenticate with a client certificate or 'authorization: Bearer <key>'"
            )
        caller = self._caller(record, peer)
        self.stamp(caller, self._clock())
        return caller

    def _caller(self, record: CallerRecord | None, peer: str) -> Caller:
        """The caller of ``record`` (None: open mode) on connection ``peer``,
        made once per load."""
        remembered = self._callers.get((record.id if record else "", peer))
        if remembered is not None and remembered[0] is record:
            return remembered[1]
        if record is None:
            caller = _open_caller(peer)
        else:
            caller = Caller(
                record.id,
                record.name,
                record.kind,
                frozenset(record.roles),
                record.server_patterns,
                peer,
            )
        if len(self._callers) >= MAX_REMEMBERED_CALLERS:
            self._callers.clear()
        self._callers[(caller.id, peer)] = (record, caller)
        return caller

    async def _by_key(self, header: str) -> CallerRecord:
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key.startswith(KEY_PREFIX):
            raise Unauthenticated("the authorization metadata must be 'Bearer tsk_...'")
        digest = key_hash(key)
        known = self._by_key_hash.get(digest)
        if known is not None:
            return known  # the key of a caller as loaded: its digest is the stored one
        caller_id = key[len(KEY_PREFIX) :].split("_", 1)[0]
        record = self._by_id.get(caller_id)
        if record is None:
            await self._reload_soon()
            record = self._by_id.get(caller_id)
        if (
            record is None
            or record.key_hash is None
            or not hmac.compare_digest(record.key_hash, digest)
        ):
            raise Unauthenticated("the key is not valid: unknown, revoked or mistyped")
        return record

    async def require(self, context: Any, role: Role) -> Caller:
        caller = await self.authenticate(context)
        if role not in caller.roles:
            raise PermissionDenied(f"caller {caller.name!r} does not have the {role.value} role")
        return caller
