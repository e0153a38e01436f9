"""The exception tree of mcproxy, in one place.

::

    MCProxyError
    ├── ConfigError            the operator's configuration is invalid (exit code 2)
    ├── ProtocolError          a peer sent something that is not valid JSON-RPC / MCP
    │   ├── ParseError         not JSON at all                 -> JSON-RPC -32700
    │   ├── InvalidMessage     JSON, but not one JSON-RPC msg  -> JSON-RPC -32600
    │   └── FrameError         a WebSocket peer broke RFC 6455 -> close code
    ├── UpstreamError          the upstream MCP server cannot be reached or died
    │   └── LineTooLong        the upstream wrote a line over the configured limit
    └── StoreError             the SQLite event log failed; the session cannot go on

The core (``jsonrpc``, ``session``, ``framing``) raises only these types; the I/O drivers
translate foreign exceptions (OSError, sqlite3.Error, aiohttp errors) into them at the edge,
chained with ``from exc`` so the cause is kept for the log but never put on the wire.
"""

from __future__ import annotations


class MCProxyError(Exception):
    """Root of every error mcproxy raises on purpose."""


class ConfigError(MCProxyError):
    """The configuration file or command line is invalid."""


class ProtocolError(MCProxyError):
    """A peer broke the JSON-RPC 2.0 / MCP framing rules.

    ``code`` is the JSON-RPC error code to answer with.
    """

    code: int = -32600


class ParseError(ProtocolError):
    """The frame or line is not valid JSON (JSON-RPC 2.0 §5.1: -32700)."""

    code = -32700


class InvalidMessage(ProtocolError):
    """Valid JSON that is not a single JSON-RPC 2.0 message (-32600)."""

    code = -32600


class FrameError(ProtocolError):
    """A WebSocket peer broke RFC 6455: fail the connection with ``close_code`` (§7.1.7)."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code


class UpstreamError(MCProxyError):
    """The upstream server could not be started, or it broke the connection."""


class UpstreamCapacity(UpstreamError):
    """No upstream may start: ``upstream.max_live_upstreams`` (or its per-principal share) is
    reached and no idle session could be parked. Its text is safe to show the client."""


class LineTooLong(UpstreamError):
    """A stdio line exceeded ``upstream.max_line_bytes`` (the framing cannot resync)."""


class LimitExceeded(MCProxyError):
    """A configured limit refuses the operation; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StoreError(MCProxyError):
    """A write to or read from the event log failed."""


class ReloadFailed(MCProxyError):
    """A reload in place failed after clients were told to go: the process exits for
    systemd to start it anew (docs/ARCHITECTURE.md *Reload in place*)."""
