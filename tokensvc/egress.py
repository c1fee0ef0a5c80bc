"""Every outbound HTTP request of tokensvc, and where it may go.

The only module of the service that imports httpx2. Token requests (through
authlib, handed our transport), discovery GETs with each redirect hop, and
TestServer's MCP calls (the MCP SDK is handed a client built here) all leave
through :meth:`Egress.transport`.

The address policy is checked against addresses, never names: the transport's
network backend resolves a host once per connection, checks every address it
resolved to, and connects to a checked address. The URL keeps the name, so
TLS (SNI and the certificate's hostname check) is still about the name. A
resolver that answers differently the second time (DNS rebinding) therefore
gains nothing: there is no second time.

Refused in every scheme and setting: link-local, cloud metadata, unspecified,
multicast and broadcast/reserved addresses, and every IPv6 form that embeds a
refused IPv4 address. Plain http goes only to loopback addresses (whatever the
name), unless ``allow_insecure_http``. Operators may refuse more networks
(private ranges, say) and carve exceptions out of those with ``allow``.

TLS trust (the system's CAs and the operator's ``outbound_ca_file``, re-read
when it changes) and client certificates (RFC 8705) are built in
outbound_tls.py; :meth:`Egress.transport` keeps a connection pool per client
certificate presented, each behind the same address policy and pinning.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import re
import socket
import ssl
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2

from tokensvc.client_cert import ClientCertificate
from tokensvc.errors import HostNotResolved, InvalidArgument
from tokensvc.outbound_tls import OutboundTrust

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses it resolves to (as text)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

# What callers of this module need of httpx2, so that they need not import it.
Request = httpx2.Request
Response = httpx2.Response
HTTPError = httpx2.HTTPError

MAX_URL = 2048
# Connection pools per transport: one per scheme and client certificate in use.
MAX_POOLS = 64
# Connections of one pool, open at once and kept idle: httpcore's default of
# 10 would queue the scheduler's concurrent token requests behind each other.
POOL_CONNECTIONS = 100
# The request extension that carries the ClientCertificate to present (RFC 8705).
CLIENT_CERTIFICATE = "tokensvc.client_certificate"
MAX_REDIRECTS = 3
RESOLVE_TIMEOUT = 5.0
# Cloud metadata and platform services. The link-local ones are refused as
# link-local anyway; they are named so that their embedded forms are too.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
    )
)
REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local
        "fe80::/10",  # link-local
        "0.0.0.0/8",  # "this network", unspecified
        "::/128",  # unspecified
        "224.0.0.0/4",  # multicast
        "ff00::/8",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
    )
)
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True, slots=True)
class Answer:
    """A GET's answer, read in full (within the size cap)."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_networks(text: str, name: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, fc00::/7"`` as networks; ValueError names the bad entry."""
    networks = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{name}: {entry[:60]!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(networks)


def embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64,
    6to4, Teredo): a packet to it may reach them."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in net for net in NAT64) or (address in IPV4_COMPATIBLE and int(address) > 1):
        found.append(low32)
    return found


async def system_resolver(host: str, port: int) -> Sequence[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
    )
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def is_loopback(address: Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Where tokensvc may send requests (see the module docstring)."""

    allow_insecure_http: bool = False
    refuse: tuple[Network, ...] = ()
    allow: tuple[Network, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    def check_syntax(self, field_name: str, url: str) -> str:
        """Checks what can be checked without the network; returns the url."""
        if not url:
            raise InvalidArgument(field_name, "is required: an https:// URL")
        if len(url) > MAX_URL:
            raise InvalidArgument(field_name, f"is longer than {MAX_URL} characters")
        if bad := next((c for c in url if _bad_character(c)), None):
            raise InvalidArgument(
                field_name,
                f"contains {_character(bad)}, which a URL may not hold: "
                "percent-encode it, or remove it",
            )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidArgument(field_name, f"is not a valid URL ({exc})") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise InvalidArgument(field_name, "must be an absolute https:// URL with a host")
        if port == 0:
            raise InvalidArgument(field_name, "has port 0: give the server's port, or none")
        if parts.username is not None or parts.password is not None:
            raise InvalidArgument(field_name, "must not carry credentials (user:password@)")
        if parts.fragment or "#" in url:
            raise InvalidArgument(field_name, "must not have a #fragment")
        try:
            httpx2.URL(url)
        except (httpx2.InvalidURL, ValueError) as exc:
            raise InvalidArgument(field_name, f"is not a valid URL ({str(exc)[:80]})") from None
        # A name is checked by the addresses it resolves to (see ``addresses``).
        literal = _literal(parts.hostname)
        if literal is not None:
            self.check_address(field_name, literal, parts.scheme)
        return url

    async def check(self, field_name: str, url: str) -> str:
        """The syntax, and every address the host resolves to now."""
        self.check_syntax(field_name, url)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await self.addresses(field_name, parts.hostname or "", port, parts.scheme)
        return url

    async def addresses(self, field_name: str, host: str, port: int, scheme: str) -> list[Address]:
        """Resolves ``host`` once and checks every address; all must pass."""
        literal = _literal(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                found = [
                    ipaddress.ip_address(a.split("%")[0]) for a in await self.resolver(host, port)
                ]
            except (OSError, TimeoutError, ValueError):
                found = []
            if not found:
                raise HostNotResolved(
                    field_name, f"host {host[:100]!r} does not resolve: check the name"
                )
        for address in found:
            self.check_address(field_name, address, scheme, host if literal is None else "")
        return list(dict.fromkeys(found))

    def check_address(self, field_name: str, address: Address, scheme: str, host: str = "") -> None:
        via = f" ({host[:100]} resolves to {address})" if host else ""
        for candidate in (address, *embedded_ipv4(address)):
            if candidate in METADATA_ADDRESSES or any(candidate in n for n in REFUSED_NETWORKS):
                raise InvalidArgument(
                    field_name,
                    f"points at a link-local, cloud metadata, unspecified, multicast or "
                    f"reserved address{via}, which is always refused",
                )
        if not any(address in n for n in self.allow):
            for candidate in (address, *embedded_ipv4(address)):
                if any(candidate in n for n in self.refuse):
                    raise InvalidArgument(
                        field_name, f"points at an address this service refuses{via}"
                    )
        if scheme == "http" and not self.allow_insecure_http and not is_loopback(address):
            raise InvalidArgument(field_name, self._insecure_message() + via)

    @staticmethod
    def _insecure_message() -> str:
        return (
            "must use https (plain http is accepted only for loopback addresses, "
            "or with the allow-insecure-http setting)"
        )


def _bad_character(c: str) -> bool:
    """What the HTTP client would refuse later, or what reads differently to
    different parsers: controls, whitespace and separators of any script,
    backslashes."""
    return c == "\\" or c.isspace() or unicodedata.category(c)[0] in "CZ"


def _character(c: str) -> str:
    return "a space" if c == " " else f"the character U+{ord(c):04X}"


class _PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Resolves once per connection, checks, and connects to a checked address."""

    def __init__(
        self, policy: UrlPolicy, scheme: str, inner: httpcore2.AsyncNetworkBackend
    ) -> None:
        self._policy, self._scheme, self._inner = policy, scheme, inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await self._policy.addresses("url", host, port, self._scheme)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 signature)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not used for egress")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@dataclass(eq=False)
class _Pool:
    transport: httpx2.AsyncHTTPTransport
    in_flight: int = 0
    retired: bool = False


class _Pinned(httpx2.AsyncBaseTransport):
    """Connection pools behind pinned backends, one per scheme (http and https
    differ in policy: plain http goes to loopback only) and, for https, per
    client certificate presented (RFC 8705): a TLS context holds one
    certificate, and a connection made with one must not serve another's
    request. Pools made with older trust (the CA file changed) or evicted
    from the bounded cache are retired: closed once no response still reads
    from them."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._pools: OrderedDict[tuple[str, bytes], _Pool] = OrderedDict()
        self._retired: list[_Pool] = []
        self._generation = -1

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scheme = request.url.scheme
        certificate = request.extensions.get(CLIENT_CERTIFICATE)
        if scheme not in ("http", "https"):
            raise InvalidArgument("url", "must be an http(s) URL")
        if certificate is not None and scheme != "https":
            raise InvalidArgument("url", "must be https to present a client certificate")
        pool = await self._lease(scheme, certificate)
        try:
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Releasing(response.stream, functools.partial(self._release, pool)),
            extensions=response.extensions,
        )

    async def _lease(self, scheme: str, certificate: ClientCertificate | None) -> _Pool:
        # No await until the pool is counted in flight: concurrent requests
        # must not evict (and close) a pool between its choice and its use.
        trust = self._egress.trust
        trust.context()  # looks at the CA file
        closable: list[_Pool] = []
        if trust.generation != self._generation:
            self._generation = trust.generation
            while self._pools:
                closable += self._retire(next(iter(self._pools)))
        key = (scheme, _digest(certificate))
        pool = self._pools.get(key)
        if pool is None:
            context = (
                trust.client_context(certificate.chain_pem, certificate.key_pem)
                if certificate is not None
                else trust.context()
            )
            pool = self._pools[key] = _Pool(self._egress.pool(scheme, context))
        self._pools.move_to_end(key)
        pool.in_flight += 1
        while len(self._pools) > MAX_POOLS:  # the least recently used go
            closable += self._retire(next(iter(self._pools)))
        for idle in closable:
            await idle.transport.aclose()
        return pool

    def _retire(self, key: tuple[str, bytes]) -> list[_Pool]:
        """Takes a pool out of use; returns it if nothing reads from it (to close now)."""
        pool = self._pools.pop(key)
        pool.retired = True
        if pool.in_flight:
            self._retired.append(pool)
            return []
        return [pool]

    async def _release(self, pool: _Pool) -> None:
        pool.in_flight -= 1
        if pool.retired and not pool.in_flight:
            self._retired.remove(pool)
            await pool.transport.aclose()

    async def aclose(self) -> None:
        pools = [*self._pools.values(), *self._retired]
        self._pools.clear()
        self._retired.clear()
        for pool in pools:
            await pool.transport.aclose()


def _digest(certificate: ClientCertificate | None) -> bytes:
    if certificate is None:
        return b""
    return hashlib.sha256(f"{certificate.chain_pem}\0{certificate.key_pem}".encode()).digest()


class _Releasing(httpx2.AsyncByteStream):
    """A response stream that gives its pool back once, when closed."""

    def __init__(
        self, inner: httpx2.AsyncByteStream, release: Callable[[], Awaitable[None]]
    ) -> None:
        self._inner, self._release = inner, release
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._released:
                self._released = True
                await self._release()


class ResponseRefused(Exception):
    """A response refused while it is read (too large, encoded)."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _SizeLimited(httpx2.AsyncBaseTransport):
    """Stops reading a response body once it passes ``limit`` bytes."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        status = response.status_code
        length = response.headers.get("Content-Length", "")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        problem = ""
        if encoding not in ("", "identity"):
            problem = f"response is {encoding[:20]}-encoded although identity was asked for"
        elif re.fullmatch(r"[0-9]{1,20}", length) and int(length) > self._limit:
            problem = f"response larger than {self._limit} bytes"
        if problem or not isinstance(response.stream, httpx2.AsyncByteStream):
            await response.aclose()
            raise ResponseRefused(problem or "response is not an async stream", status)
        return httpx2.Response(
            status,
            headers=response.headers,
            stream=_LimitedStream(response.stream, self._limit, status),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _LimitedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, limit: int, status: int) -> None:
        self._inner, self._limit, self._status = inner, limit, status

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            if received > self._limit:
                raise ResponseRefused(f"response larger than {self._limit} bytes", self._status)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class Egress:
    """Builds the transport and clients every outbound request goes through.

    ``network`` is the backend that really connects (tests wrap it to record
    every address connected to); ``transport`` replaces the whole pinned
    transport (tests of response parsing only); ``ca_file`` adds CAs to the
    system's (``outbound_ca_file``). ValueError: ``ca_file`` is not usable.
    """

    def __init__(
        self,
        policy: UrlPolicy | None = None,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = 65536,
        user_agent: str = "tokensvc",
        network: httpcore2.AsyncNetworkBackend | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.policy = policy or UrlPolicy()
        self.trust = OutboundTrust(ca_file)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self._network = network or httpcore2.AnyIOBackend()
        self._transport = transport
        self._client: httpx2.AsyncClient | None = None

    def transport(self) -> httpx2.AsyncBaseTransport:
        """A new pinned, size-capped transport (its caller closes it). A
        request whose extensions carry CLIENT_CERTIFICATE presents it."""
        if self._transport is not None:
            return _SizeLimited(self._transport, self.max_response_bytes)
        return _SizeLimited(_Pinned(self), self.max_response_bytes)

    def pool(self, scheme: str, context: ssl.SSLContext) -> httpx2.AsyncHTTPTransport:
        """One connection pool for ``scheme`` behind the pinned backend."""
        pool = httpx2.AsyncHTTPTransport(verify=context, trust_env=False)
        # httpx2 has no parameter for the network backend: its pool is
        # rebuilt with ours, the same settings otherwise.
        pool._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            network_backend=_PinnedBackend(self.policy, scheme, self._network),
            max_connections=POOL_CONNECTIONS,
            max_keepalive_connections=POOL_CONNECTIONS,
        )
        return pool

    def client(self, headers: dict[str, str] | None = None, **options: Any) -> httpx2.AsyncClient:
        """An httpx2 client over a new egress transport (see client_options)."""
        settings = self.client_options()
        settings["headers"].update(headers or {})
        return httpx2.AsyncClient(**settings, **options)

    def client_options(self) -> dict[str, Any]:
        """The options of every egress client, for clients of other classes
        too (authlib's): a new egress transport, no redirects, no environment
        proxies or .netrc, no cookies kept, no compression."""
        return {
            "transport": self.transport(),
            "timeout": httpx2.Timeout(self.timeout),
            "follow_redirects": False,
            # Environment proxies and .netrc would send requests around the policy.
            "trust_env": False,
            "cookies": CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            # A compressed body would escape the size cap once decoded.
            "headers": {"Accept-Encoding": "identity", "User-Agent": self.user_agent},
        }

    async def get(self, url: str, field_name: str) -> Answer:
        """A GET for discovery: the URL policy on every hop, at most
        MAX_REDIRECTS redirects, the size cap, the timeout. Failures are
        InvalidArgument(field, why), never carrying a body."""
        if self._client is None:
            self._client = self.client()
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    self.policy.check_syntax(field_name, url)
                    response = await self._client.get(url, headers={"Accept": "application/json"})
                    if response.status_code not in (301, 302, 303, 307, 308):
                        return Answer(
                            response.status_code,
                            {k.lower(): v for k, v in response.headers.items()},
                            response.content,
                        )
                    url = str(response.url.join(response.headers.get("Location", "")))
                failure = f"more than {MAX_REDIRECTS} redirects"
        except InvalidArgument as exc:
            if exc.field == field_name:
                raise
            failure = exc.message.removeprefix(f"{exc.field}: ")
        except TimeoutError:
            failure = f"no answer within {self.timeout:g} s"
        except ResponseRefused as exc:
            failure = exc.reason
        except Exception as exc:  # httpx2 and h11 errors: their kind, never their text
            failure = failure_words(exc)
        raise InvalidArgument(field_name, f"{url[:200]} could not be fetched: {failure}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def failure_words(exc: BaseException) -> str:
    """What failed, in words that hold no foreign text; a server certificate
    that the trust refuses is named as such, with the fix."""
    cause: BaseException | None = exc
    for _ in range(10):  # the chain is short; never loop on a cycle
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = str(cause.verify_message or "verification failed")[:80]
            return (
                f"its TLS certificate is not trusted ({why}): if a private CA signed it, "
                "give that CA in outbound_ca_file"
            )
        cause = cause.__cause__ or cause.__context__
    return words(type(exc).__name__)


def words(name: str) -> str:
    """``ConnectTimeout`` -> ``connect timeout``: the kind of failure, never its text."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
