"""Host and Origin checks against DNS rebinding, shared by both fronts.

MCP 2025-11-25 transports §"Security Warning": servers MUST validate ``Origin`` on every
incoming connection (403 when it is present and not allowed), and local servers should only
be reachable as themselves. A DNS-rebinding page reaches a loopback server under a hostile
name, so the ``Host`` header is checked too (421, as the Python SDK does). A request without
``Origin`` comes from a non-browser client and is allowed. The WebSocket upgrade gets the same
checks: browsers do not apply the same-origin policy to WebSockets at all.

One strict parser reads ``Host``, the authority of an ``Origin`` and of an absolute-form
request target (RFC 3986 §3.2: ``host [ ":" port ]``, no user information, nothing after
the port): a lenient one let ``[::1]evil`` pass as ``[::1]`` and
``http://localhost:1@evil.com`` as ``localhost``. Both fronts hand ``check`` every value of
the headers that must appear at most once, so a repeat is refused the same way on both
(RFC 9110 §5.3: a singleton field must not be repeated; two fronts that picked different
copies would disagree about who the client is).

Pure: no I/O; the fronts pass the request target and the header values in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

ANY: Final = "*"
_WILDCARD_LISTEN: Final = frozenset({"", "0.0.0.0", "::"})
# Headers a request may carry at most once; a repeat is refused (400) by both fronts.
SINGLETON_HEADERS: Final[tuple[str, ...]] = ("host", "origin", "authorization")
_REG_NAME: Final = re.compile(r"[a-z0-9_.-]{1,253}")
_PORT: Final = re.compile(r"[0-9]{1,5}")
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Authority:
    """``host[:port]``: the host lower-cased, an IPv6 address in brackets."""

    host: str
    port: int | None


def parse_authority(text: str) -> Authority | None:
    """RFC 3986 §3.2.2-3 ``host [ ":" port ]`` strictly, or None: no user information, no
    empty port, no path, nothing after a bracketed address, no whitespace inside."""
    text = text.strip(" \t").lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        literal, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        host = f"[{literal}]"
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        if not _REG_NAME.fullmatch(host):
            return None
    if not rest:
        return Authority(host, None)
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return Authority(host, int(rest[1:]))


def parse_origin(text: str) -> tuple[str, Authority] | None:
    """RFC 6454 §7 ``scheme "://" host [ ":" port ]`` (one trailing "/" tolerated), or None
    (``null`` and anything else that names no host)."""
    scheme, sep, rest = text.strip(" \t").lower().partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    authority = parse_authority(rest[:-1] if rest.endswith("/") else rest)
    return None if authority is None else (scheme, authority)


def _allowed_name(entry: str) -> str:
    """A configured host (``localhost``, ``[::1]``, ``example.com:8080``): its host part."""
    parsed = parse_authority(entry)
    return parsed.host if parsed is not None else entry.strip().lower()


class HostPolicy:
    def __init__(
        self, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...], listen_host: str
    ) -> None:
        hosts = {_allowed_name(h) for h in allowed_hosts if h != ANY}
        if listen_host not in _WILDCARD_LISTEN:
            hosts.add(_allowed_name(f"[{listen_host}]" if ":" in listen_host else listen_host))
        self._any_host = ANY in allowed_hosts
        self._hosts = frozenset(hosts)
        self._any_origin = ANY in allowed_origins
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    def check(self, target: str, headers: Mapping[str, Sequence[str]]) -> Refusal | None:
        """None if the request may proceed, else the status and reason to refuse it with.

        ``target`` is the request target as sent; ``headers`` maps lower-case names to every
        value received (at least those of ``SINGLETON_HEADERS``)."""
        for name in SINGLETON_HEADERS:
            if len(headers.get(name, ())) > 1:
                return Refusal(400, f"repeated {name.title()} header")
        hosts = headers.get("host", ())
        if not hosts:
            # RFC 9112 §3.2: HTTP/1.1 requires it; an HTTP/1.0 request without it names no
            # host we could check, so it is refused as well (both fronts alike).
            return Refusal(400, "Host header is required")
        host = parse_authority(hosts[0])
        if host is None:
            return Refusal(400, "malformed Host header")
        if not target.startswith("/") and target != "*":
            # Absolute form (RFC 9112 §3.2.2): the target's authority is the one that counts;
            # one that differs from Host is refused rather than guessed at.
            _, sep, rest = target.partition("://")
            named = parse_authority(rest.partition("/")[0].partition("?")[0]) if sep else None
            if named is None or named != host:
                return Refusal(400, "request target's host differs from the Host header")
        if not self._any_host and host.host not in self._hosts:
            return Refusal(421, "Host header not allowed (server.allowed_hosts)")
        origins = headers.get("origin", ())
        if not origins or self._any_origin:
            return None
        origin = origins[0]
        if origin.strip(" \t").rstrip("/").lower() in self._origins:
            return None
        parsed = parse_origin(origin)
        if parsed is not None and parsed[0] in ("http", "https") and parsed[1].host in self._hosts:
            return None
        return Refusal(403, "Origin not allowed (server.allowed_origins)")


class TokenBucket:
    """``rate`` per second, up to ``burst`` at once. The caller passes the clock in."""

    __slots__ = ("_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._level = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._level >= 1.0:
            self._level -= 1.0
            return True
        return False


class AddressLimiter:
    """One bucket per client address, for new connections. The table is bounded: when full,
    the least recently seen address is forgotten (it starts again with a full bucket)."""

    def __init__(self, rate: float, burst: int, max_addresses: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, address: str | None, now: float) -> bool:
        key = address or "?"
        bucket = self._buckets.pop(key, None)  # re-inserted last: dict order is recency
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) >= self.max_addresses:
                del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = bucket
        return bucket.take(now)
