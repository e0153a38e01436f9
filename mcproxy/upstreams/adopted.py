"""A stdio child handed over by a reload (docs/ARCHITECTURE.md *Reload in place*).

The previous program exec'd into this one with the child still running: same pid, so the
child is still ours to wait for, and the proxy's ends of its three pipes open as inherited
descriptors. ``adopt`` wraps them in a ``StdioUpstream`` exactly as a spawned child is
wrapped (``StdioUpstream.attach``), the stdout bytes the previous program had read but not
consumed first. The child's exit is learnt with ``waitpid`` on its pid: the event loop's
child watcher only knows the processes this program spawned, and never reaps this one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from mcproxy.config import UpstreamConfig
from mcproxy.upstreams.base import UpstreamHandler
from mcproxy.upstreams.stdio import HandedOver, StdioUpstream


class AdoptedChild:
    """The process half of an adopted child (``stdio.Child``): its pid, its exit status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        """None while it runs; polled (``StdioUpstream`` polls it while stopping)."""
        if self._returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (cannot happen to our own child)
                self._returncode = -1
            else:
                if pid != 0:
                    self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode


async def adopt(
    handed: HandedOver,
    argv: tuple[str, ...],
    handler: UpstreamHandler,
    config: UpstreamConfig,
    session_label: str,
    env: Mapping[str, str] | None = None,
) -> StdioUpstream:
    """The running child of ``handed`` as a started upstream of ``handler``.

    ``argv`` and ``env`` are this program's configuration: they describe the next child of
    the session, not this one, which keeps the command it was started with."""
    fds = (handed.stdin_fd, handed.stdout_fd, handed.stderr_fd)
    for fd in fds:
        # Inheritable only to cross exec: children spawned from now on must not get them.
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    upstream = StdioUpstream(argv, handler, config, session_label, env)
    await upstream.attach(AdoptedChild(handed.pid), fds, handed.unread)
    return upstream
