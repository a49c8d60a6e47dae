"""Outbound requests reach public addresses only: the guard against SSRF for webhooks.

A webhook URL comes from an API client. Without this guard it can point the worker at Redis on
127.0.0.1:6379, the cloud metadata service at 169.254.169.254, or anything on the private
network, in any of the spellings a resolver accepts (`2130706433`, `127.1`, `0x7f.1`,
`[::ffff:127.0.0.1]`). So:

* `check_url(url)` — at dispatch: an http(s) URL whose host, if it is an address literal in any
  spelling (or `localhost`), is a public address. No DNS lookup: dispatch stays fast.
* `GuardedTransport` — at delivery: resolves the host once, refuses unless every address it
  resolves to is public, and connects to the checked address itself (the original name still
  goes in `Host` and in TLS SNI and certificate checks), so a DNS answer that changes between
  the check and the connect (rebinding) cannot redirect the request.

JOBYARD_WEBHOOK_ALLOW opens named exceptions: comma-separated host names (exact, any case) or
addresses/CIDRs (`127.0.0.1`, `10.0.0.0/8`, `::1`), for development and tests.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
from pydantic import AfterValidator, HttpUrl

from jobyard.job_engine import env
from jobyard.job_engine.errors import UnsafeURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ranges refused although `ipaddress` may call some of them global, with why.
_BLOCKED: list[tuple[Network, str]] = [
    (ipaddress.ip_network(cidr), why)
    for cidr, why in [
        ("0.0.0.0/8", "'this network'"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("64:ff9b::/96", "NAT64"),
        ("64:ff9b:1::/48", "NAT64 (local)"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ]
]


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str]
    networks: tuple[Network, ...]

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def allow_list() -> AllowList:
    """JOBYARD_WEBHOOK_ALLOW, read per call so an operator (or a test) can change it."""
    hosts: set[str] = set()
    networks: list[Network] = []
    for item in (os.environ.get(env.WEBHOOK_ALLOW) or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            hosts.add(item.lower().rstrip("."))
    return AllowList(frozenset(hosts), tuple(networks))


def refusal(address: IPAddress) -> str | None:
    """Why `address` must not be reached, or None for a public address."""
    for network, why in _BLOCKED:
        if address.version == network.version and address in network:
            return f"{address} is {why}"
    if not address.is_global:  # whatever IANA adds to its special-purpose registries
        return f"{address} is not a public address"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, in any form a resolver accepts (`127.1`, `2130706433`,
    `0x7f.0.0.1`, `017700000001`, `[::1]`), or None for a name."""
    bare = host.strip("[]").rstrip(".")
    bare = bare.split("%", 1)[0]  # an IPv6 zone id names an interface, not another address
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if bare and all(c in "0123456789abcdefABCDEFxX." for c in bare):
        try:  # inet_aton is the parser glibc's resolver uses for these legacy forms
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except (OSError, ValueError):
            return None
    return None


def check_address(url: str, host: str, address: IPAddress, allowed: AllowList) -> None:
    if allowed.allows_host(host) or allowed.allows_address(address):
        return
    why = refusal(address)
    if why is not None:
        raise UnsafeURLError(url, f"{why}; add it to {env.WEBHOOK_ALLOW} to allow it")


def check_url(url: Any) -> str:
    """Dispatch-time check of a webhook URL; returns it, or raises UnsafeURLError (a
    ValueError): not an http(s) URL with a host, or a literal non-public address or
    `localhost` not in JOBYARD_WEBHOOK_ALLOW. Names are resolved at delivery, not here."""
    if not isinstance(url, str):
        raise UnsafeURLError(repr(url), "an http(s) URL is required")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeURLError(url, f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UnsafeURLError(url, "an http(s) URL with a host is required")
    if parsed.userinfo:
        raise UnsafeURLError(url, "credentials in a webhook URL would be sent to its host")
    host = parsed.host
    allowed = allow_list()
    if allowed.allows_host(host):
        return url
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        raise UnsafeURLError(url, f"{host} is loopback; add it to {env.WEBHOOK_ALLOW} to allow it")
    address = literal_address(host)
    if address is not None:
        check_address(url, host, address, allowed)
    return url


def _public_url(value: HttpUrl) -> HttpUrl:
    check_url(str(value))
    return value


#: A payload field for a URL jobyard will send to: a literal private address fails validation
#: (at dispatch, 422 over HTTP); names are checked again when the request is made.
PublicHttpUrl = Annotated[HttpUrl, AfterValidator(_public_url)]


def resolve_checked(url: str, host: str, port: int) -> list[IPAddress]:
    """Resolve `host` and return the addresses to connect to, in the resolver's order; refuse
    if any address it resolves to is not allowed (a name that also points inside is not one to
    trust)."""
    allowed = allow_list()
    literal = literal_address(host)
    if literal is not None:
        check_address(url, host, literal, allowed)
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        check_address(url, host, address, allowed)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise httpx.ConnectError(f"{host} resolves to no address")
    return addresses


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport that only connects to addresses `resolve_checked` let through."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = resolve_checked(str(url), host, port)
        name = literal_address(host) is None
        failure: httpx.ConnectError | None = None
        # Like a plain client, try each address in turn (localhost may be ::1, then 127.0.0.1).
        for address in addresses:
            # Connect to the checked address; the name stays in Host (already set from the
            # original URL) and in SNI, which httpcore also uses to check the certificate.
            request.url = url.copy_with(host=str(address))
            if name:
                request.extensions = {**request.extensions, "sni_hostname": host}
            try:
                return super().handle_request(request)
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure


def guarded_client(**kwargs: Any) -> httpx.Client:
    """An httpx.Client whose every request goes through GuardedTransport. No redirects are
    followed and no proxy from the environment is used: either would connect somewhere the
    guard did not check."""
    return httpx.Client(
        transport=GuardedTransport(), follow_redirects=False, trust_env=False, **kwargs
    )
