"""URL safety for server-side fetches (SSRF): only http(s), and only hosts whose every resolved
address is public, unless the operator allows private networks.

`check_url` is the up-front check of a request's URL. `resolve_checked` is what the download
layer calls for every connection it opens (every redirect hop included): it returns the vetted
addresses, and the caller connects to one of *those* addresses, so a second DNS answer (DNS
rebinding) can never swap in a private address between the check and the connection.

Tests replace name resolution with `override_resolver({"media.example": ["10.0.0.5"]})`; that
swaps the module-level resolver, the same function production uses, so nothing else is faked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from urllib.parse import urlsplit

import grpc
from longscribe.service.errors import JobError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[str, int]  # (ip address text, port): an explicit exception to the rules

ALLOWED_SCHEMES = ("http", "https")

# Cloud instance-metadata services: named in the message because they are the classic target.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# Ranges `is_global` misses on some Python versions, listed so the rule does not depend on one.
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in ("100.64.0.0/10", "0.0.0.0/8", "192.0.0.0/24", "198.18.0.0/15", "64:ff9b:1::/48")
)


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_resolver: Callable[[str, int], list[str]] = _system_resolve
_resolver_lock = threading.Lock()


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (through the test override when one is active)."""
    return _resolver(host, port)


@contextlib.contextmanager
def override_resolver(table: Mapping[str, Collection[str]]) -> Iterator[None]:
    """Resolve the names in `table` to the given addresses (others as usual) while inside."""
    global _resolver
    previous = _resolver
    lowered = {name.lower(): list(addrs) for name, addrs in table.items()}

    def lookup(host: str, port: int) -> list[str]:
        if host.lower() in lowered:
            return lowered[host.lower()]
        return previous(host, port)

    with _resolver_lock:
        _resolver = lookup
    try:
        yield
    finally:
        with _resolver_lock:
            _resolver = previous


def blocked_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public internet address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            reason = blocked_reason(mapped)
            return f"{reason} (IPv6-embedded {mapped})" if reason else None
        if address in ipaddress.ip_network("64:ff9b::/96"):  # NAT64 of an IPv4 address
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            reason = blocked_reason(embedded)
            return f"{reason} (NAT64 of {embedded})" if reason else None
    if address in METADATA_ADDRESSES:
        return "cloud metadata service"
    checks = (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    )
    for attr, name in checks:
        if getattr(address, attr):
            return name
    if any(address in net for net in _EXTRA_BLOCKED):
        return "carrier-grade NAT / special-purpose"
    if not address.is_global:
        return "not globally routable"
    return None


def _parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, or INVALID_ARGUMENT."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid URL ({e}): {url!r}") from e
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme}:" if scheme else "no scheme"
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"only http:// and https:// URLs can be fetched, not {shown} ({url[:200]!r})",
        )
    host = parts.hostname
    if not host:
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, f"the URL has no host name: {url!r}")
    return scheme, host, port or (443 if scheme == "https" else 80)


def resolve_checked(
    host: str,
    port: int,
    allow_private_networks: bool,
    allow_endpoints: Collection[Endpoint] = (),
) -> list[str]:
    """Resolve `host` and return its addresses, all of them vetted; PERMISSION_DENIED naming the
    first forbidden one. Every address must pass, so a name with one public and one private
    address is refused (the connection could land on either)."""
    try:
        addresses = resolve(host, port)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise JobError(
                grpc.StatusCode.UNAVAILABLE, f"temporary failure resolving {host!r}; try again"
            ) from e
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the host name {host!r} could not be resolved ({e})"
        ) from e
    except (OSError, UnicodeError) as e:
        raise JobError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the host name {host!r} could not be resolved ({e})"
        ) from e
    if not addresses:
        raise JobError(grpc.StatusCode.INVALID_ARGUMENT, f"the host {host!r} has no address")
    if allow_private_networks:
        return addresses
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError as e:
            raise JobError(
                grpc.StatusCode.PERMISSION_DENIED, f"{host!r} resolved to {text!r}, not an address"
            ) from e
        if (str(address), port) in allow_endpoints:
            continue
        reason = blocked_reason(address)
        if reason:
            shown = f"{host} port {port}"
            if host.strip("[]") != str(address):
                shown += f" (resolves to {address})"
            raise JobError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"refusing to fetch from {shown}: {address} is not a public address ({reason}); "
                "the server allows only public addresses (start it with "
                "--allow-private-networks to permit this)",
            )
    return addresses


def check_url(
    url: str, allow_private_networks: bool, allow_endpoints: Collection[Endpoint] = ()
) -> None:
    """Refuse `url` unless it is http(s) and its host resolves only to permitted addresses.

    `allow_endpoints` lists (ip, port) pairs permitted even when private (an operator allowlist;
    the tests use it to let exactly one local server through)."""
    _scheme, host, port = _parse(url)
    resolve_checked(host, port, allow_private_networks, allow_endpoints)
