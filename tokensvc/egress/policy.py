"""Where tokensvc may send requests: the URL and address policy.

The policy is checked against addresses, never names: a URL's host is
resolved and every address it resolves to must pass (backend.py connects
only to an address checked so).

Refused in every scheme and setting: link-local, cloud metadata, unspecified,
multicast and broadcast/reserved addresses, and every IPv6 form that embeds a
refused IPv4 address. Plain http goes only to loopback addresses (whatever the
name), unless ``allow_insecure_http``. Operators may refuse more networks
(private ranges, say: ``egress_refuse``) and carve exceptions out of those
with ``allow`` (``egress_allow``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx2

from tokensvc.errors import HostNotResolved, InvalidArgument

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses it resolves to (as text)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

MAX_URL = 2048
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
        if not _plain_ascii(url) and (bad := next((c for c in url if _bad_character(c)), None)):
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


def _plain_ascii(url: str) -> bool:
    """No character that ``_bad_character`` refuses, told without a look at
    each: in ASCII those are the controls, the space and the backslash."""
    return url.isascii() and url.isprintable() and " " not in url and "\\" not in url


def _bad_character(c: str) -> bool:
    """What the HTTP client would refuse later, or what reads differently to
    different parsers: controls, whitespace and separators of any script,
    backslashes."""
    return c == "\\" or c.isspace() or unicodedata.category(c)[0] in "CZ"


def _character(c: str) -> str:
    return "a space" if c == " " else f"the character U+{ord(c):04X}"
