"""What a session needs from an upstream MCP server, independent of how it is reached.

``runner.py`` sees upstreams only through ``Upstream`` and ``UpstreamHandler``; the daemon picks
the concrete class (``upstreams.stdio.StdioUpstream``, a child process, or
``upstreams.http.HttpUpstream``, a session at a Streamable HTTP endpoint) through an
``UpstreamFactory``. The respawn policy is ``core.backoff``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol


class UpstreamHandler(Protocol):
    """Callbacks an upstream makes into its session, on the event loop, in order."""

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        """One complete message (a stdio line or an SSE event's data). ``related``: the
        upstream request id whose response stream carried it, if the transport knows."""

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        """The upstream is gone (exited, broke its framing). Not called after ``aclose``.

        ``unsent``: ids of requests that ``send`` accepted but that never reached the server
        (a shared child's admission queue held them), so they cannot have taken effect and
        go to the next upstream as they are, unlike a request whose outcome is unknown."""


class Upstream(Protocol):
    async def start(self) -> None:
        """Start the upstream. Raises ``UpstreamError`` if it cannot be started."""

    def send(self, data: bytes) -> None:
        """Queue one encoded JSON-RPC message for the upstream; never blocks."""

    async def aclose(self) -> None:
        """Stop the upstream. Idempotent, bounded, and always releases the process."""


UpstreamFactory = Callable[[str, UpstreamHandler], Upstream]
"""``factory(session_id, handler)`` builds an unstarted upstream for one session."""
