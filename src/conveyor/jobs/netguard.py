"""A guard against server-side request forgery for fetching URLs users give.

Every connection is checked at the moment it is made, after DNS resolution, so a name that
resolves to an inside address (or a redirect to one, or a name re-pointed between two requests)
is refused before a socket opens: :class:`GuardedBackend` is httpcore's network backend that
resolves the host itself, refuses when any of its addresses is not a public one, and connects to
the address it checked. Hosts named in the allowlist skip the check (an API on the same host).
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from collections.abc import Awaitable, Callable, Iterable

import anyio
import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


class Refused(httpx.ConnectError):
    """A connection the guard refused (an inside address, or a host that does not resolve)."""


def refusal(address: str) -> str | None:
    """Why a connection to ``address`` is refused (None: it is a public address)."""
    try:
        ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ip.sixtofour if ip in _SIX_TO_FOUR else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refusal(str(embedded))
            return None if inner is None else f"{ip} carries {embedded}: {inner}"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address (cloud metadata lives there)"),
        (ip in _CGNAT, "a carrier-grade NAT address"),
        (ip.is_private, "a private address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, reason in checks:
        if hit:
            return f"{ip} is {reason}"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with every connection checked after resolution."""

    def __init__(
        self, allow_hosts: Iterable[str] = (), resolver: Resolver = system_resolver
    ) -> None:
        self.allow_hosts = frozenset(h.lower().strip("[]") for h in allow_hosts if h)
        self.resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        name = host.lower().strip("[]")
        if name in self.allow_hosts:
            target = host
        else:
            try:
                with anyio.fail_after(timeout):
                    addresses = await self.resolver(name, port)
            except (OSError, TimeoutError) as exc:
                raise Refused(f"cannot resolve {host!r}: {exc}") from None
            if not addresses:
                raise Refused(f"{host!r} has no address")
            for address in addresses:
                reason = refusal(address)
                if reason is not None:
                    raise Refused(f"refused to connect to {host!r}: {reason}")
            target = addresses[0]
        return await self._inner.connect_tcp(
            target,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise Refused("unix sockets are refused")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(
    allow_hosts: Iterable[str] = (), resolver: Resolver = system_resolver
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection (each redirect hop too) passes the guard.
    No proxy from the environment: a proxy would make the connection on the guard's behalf."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx builds its httpcore pool without a way to pass a network backend: build it again
    # with the guarded one (the same options as httpx's defaults)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=GuardedBackend(allow_hosts, resolver),
    )
    return transport
