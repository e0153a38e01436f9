"""Host and Origin checks against DNS rebinding, shared by both fronts.

MCP 2025-11-25 transports §"Security Warning": servers MUST validate ``Origin`` on every
incoming connection (403 when it is present and not allowed), and local servers should only
be reachable as themselves. A DNS-rebinding page reaches a loopback server under a hostile
name, so the ``Host`` header is checked too (421, as the Python SDK does). A request without
``Origin`` comes from a non-browser client and is allowed. The WebSocket upgrade gets the same
checks: browsers do not apply the same-origin policy to WebSockets at all.

Pure: no I/O; the fronts pass the two header values in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

ANY: Final = "*"
_WILDCARD_LISTEN: Final = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


def _hostname(host: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostPolicy:
    def __init__(
        self, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...], listen_host: str
    ) -> None:
        hosts = {_hostname(h) for h in allowed_hosts}
        if listen_host not in _WILDCARD_LISTEN:
            hosts.add(_hostname(f"[{listen_host}]" if ":" in listen_host else listen_host))
        self._any_host = ANY in allowed_hosts
        self._hosts = frozenset(hosts)
        self._any_origin = ANY in allowed_origins
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    def check(self, host: str | None, origin: str | None) -> Refusal | None:
        """None if the request may proceed, else the status and reason to refuse it with."""
        if not self._any_host and (host is None or _hostname(host) not in self._hosts):
            return Refusal(421, "Host header not allowed (server.allowed_hosts)")
        if origin is None or self._any_origin:
            return None
        normalized = origin.rstrip("/").lower()
        if normalized in self._origins:
            return None
        parts = urlsplit(normalized)
        if parts.scheme in ("http", "https") and _hostname(parts.netloc) in self._hosts:
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
