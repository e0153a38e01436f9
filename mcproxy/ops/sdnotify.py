"""systemd integration without libsystemd: the notify protocol and socket activation.

Both protocols are small and stable, so they are spoken here with the standard library only
(the systemd Python bindings would add a C dependency for three environment variables and one
datagram).

Notify protocol (sd_notify(3), systemd.service(5) ``Type=notify``, ``WatchdogSec=``):
systemd passes ``$NOTIFY_SOCKET``, the address of an ``AF_UNIX``/``SOCK_DGRAM`` socket: a
filesystem path, or, when it starts with ``@``, a name in the abstract namespace (the ``@``
stands for the leading NUL byte). A service reports its state by sending one datagram of
newline-separated ``VARIABLE=value`` assignments: ``READY=1`` once it serves (the unit becomes
"active" only then, so ``systemctl start`` and units ordered after it wait for it),
``STATUS=...`` (free text shown by ``systemctl status``), ``STOPPING=1`` when shutdown begins,
``WATCHDOG=1`` as a keep-alive, ``RELOADING=1`` and ``EXTEND_TIMEOUT_USEC=...``. The kernel
attaches the sender's credentials, which is how ``NotifyAccess=main`` rejects datagrams from
any process but the main one. With ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``, the process it is meant for) and kills the service, then applies
``Restart=``, when no ``WATCHDOG=1`` arrives within that time (sd_watchdog_enabled(3)).

Socket activation (sd_listen_fds(3), systemd.socket(5)): systemd binds the listening sockets
itself and starts the service with them as file descriptors 3, 4, ... (``SD_LISTEN_FDS_START``)
and ``$LISTEN_FDS`` = their number, ``$LISTEN_PID`` = the pid they are meant for (a forked
child must not take them for its own) and ``$LISTEN_FDNAMES``. systemd keeps its own copy of
each socket, so while the service restarts the kernel queues new connections in the listen
backlog instead of refusing them, and the next process accepts them.

Nothing here raises or blocks on the notify path: a service must keep running when systemd
is not listening, and a full notify queue must not stall the event loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Final

from mcproxy.errors import ConfigError

SD_LISTEN_FDS_START: Final = 3  # <systemd/sd-daemon.h>: the first passed file descriptor

NOTIFY_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_ENV: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify(3) state datagrams to ``$NOTIFY_SOCKET``; a no-op when it is unset.

    Every method returns True when the datagram was handed to the kernel and False otherwise
    (no socket configured, systemd gone, its queue full): the caller never has to care.
    """

    def __init__(self, notify_socket: str | None, watchdog_interval_s: float | None = None) -> None:
        self._address = _notify_address(notify_socket)
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                # Opened once, never connected: sendto() names the address on every datagram,
                # as libsystemd does, so a systemd that re-executes and binds its socket anew
                # is still reached (a connected socket would keep pointing at the old one).
                # Python sockets are close-on-exec already (PEP 446): children never get it.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            except OSError:
                self._address = None
        # Pinging is pointless when nobody listens, so the interval goes with the socket.
        self.watchdog_interval_s = watchdog_interval_s if self._sock is not None else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, unset_environment: bool = False) -> Notifier:
        """Build from ``NOTIFY_SOCKET`` (and the watchdog variables) of ``environ``.

        ``unset_environment=True`` then removes ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
        ``WATCHDOG_PID`` from ``os.environ`` (and from ``environ``), like sd_notify's
        ``unset_environment``: the upstream servers mcproxy spawns inherit its environment and
        must not talk to systemd in its name.
        """
        notifier = cls(environ.get("NOTIFY_SOCKET"), watchdog_interval(environ))
        if unset_environment:
            _unset(environ, NOTIFY_ENV)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``VARIABLE=value`` lines; the helpers below build them."""
        if self._sock is None or self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
        except OSError:  # ENOENT/ECONNREFUSED (systemd gone), EAGAIN (queue full), ...
            return False
        return True

    def ready(self, status: str | None = None, *, reloaded: bool = False) -> bool:
        """Startup is complete: the unit becomes active (``Type=notify``). ``reloaded``: the
        end of a reload (after ``reloading``), stamped with ``MONOTONIC_USEC`` as well."""
        stamp = (f"MONOTONIC_USEC={_monotonic_us()}",) if reloaded else ()
        return self.send("READY=1", *stamp, *_status(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status for ``systemctl status``."""
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (the unit shows "deactivating" before the process exits)."""
        return self.send("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; send ``ready()`` when it is done.

        ``MONOTONIC_USEC`` lets systemd (253+, ``Type=notify-reload``) tell this reload from
        an earlier one; older versions ignore the unknown variable.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_us()}", *_status(status))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``; send every ``watchdog_interval_s`` seconds."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop timeout fires.

        For a startup that can legitimately outlast ``TimeoutStartSec=`` (a long recovery);
        the extension counts from now, so repeat it while the work goes on.
        """
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.watchdog_interval_s = None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is armed for us.

    Half the ``WatchdogSec=`` timeout, as sd_watchdog_enabled(3) recommends, so one late ping
    (a slow loop turn, a busy machine) does not get the service killed. ``WATCHDOG_PID``, when
    set, must be our pid: the variables are meant for the main process only.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if "WATCHDOG_PID" in environ:
        try:
            pid = int(environ["WATCHDOG_PID"])
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 2 / 1_000_000


def listen_fds(
    environ: Mapping[str, str],
    *,
    start_fd: int = SD_LISTEN_FDS_START,
    unset_environment: bool = True,
) -> list[socket.socket]:
    """The listening sockets systemd passed us (sd_listen_fds(3)), or [] when not activated.

    Each socket is made non-blocking (asyncio needs it; the flag is on the open file, which
    systemd shares, but systemd only polls it) and close-on-exec (the spawned upstream servers
    must not hold the listener: a stray copy would keep the port open after mcproxy exits).
    ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` are then removed from ``os.environ`` (and
    from ``environ``), whatever the outcome, so children never see them. ``start_fd`` exists
    for tests.

    Raises:
        ConfigError: a passed descriptor is not a listening stream socket (the .socket
            unit must use ``ListenStream=`` and ``Accept=no``).
    """
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:  # unset or garbled: not activated (sd_listen_fds returns 0 or -EINVAL)
        pid, count = 0, 0
    if unset_environment:
        _unset(environ, LISTEN_ENV)
    if pid != os.getpid() or count <= 0:
        return []
    socks: list[socket.socket] = []
    try:
        for fd in range(start_fd, start_fd + count):
            socks.append(listening_socket(fd))
    except BaseException:
        _close(socks)
        raise
    return socks


def listening_socket(fd: int) -> socket.socket:
    """A listening stream socket from an inherited descriptor (socket activation, or a
    reload in place), non-blocking and close-on-exec.

    Raises:
        ConfigError: the descriptor is not a listening stream socket.
    """
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    except OSError as exc:  # EBADF, ENOTSOCK: a FIFO or a file was passed
        raise ConfigError(f"socket activation: fd {fd} is unusable: {exc}") from exc
    # Accept=yes would pass one connected stream socket per client: SO_ACCEPTCONN tells.
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.close()
        raise ConfigError(
            f"socket activation: fd {fd} is not a listening stream socket "
            "(use ListenStream= with Accept=no in the .socket unit)"
        )
    sock.setblocking(False)
    return sock


def _monotonic_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _notify_address(value: str | None) -> bytes | None:
    # sd_notify(3) accepts an absolute path or "@" + an abstract name; anything else (newer
    # systemd's "vsock:" addresses, a relative path) is not supported here: no notifications.
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def _status(text: str | None) -> tuple[str, ...]:
    # Assignments are newline-separated, so a newline inside the text would end it early.
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


def _unset(environ: Mapping[str, str], names: Iterable[str]) -> None:
    for name in names:
        os.environ.pop(name, None)
        if environ is not os.environ and isinstance(environ, MutableMapping):
            environ.pop(name, None)


def _close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
