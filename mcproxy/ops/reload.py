"""Reload in place (SIGHUP, ``systemctl reload``): the handover record and its helpers.

The daemon (the composition root) runs the reload; this module holds what it needs that is
not wiring: validating the program on disk before anything is touched, the versioned record
that crosses ``execve``, and the exec itself. docs/ARCHITECTURE.md *Reload in place* has the
whole sequence and why it is safe; in short:

1. ``validate``: the program now on disk is run as a subprocess (``mcproxy check-config``
   with this process's arguments) that imports the code and loads the configuration; if it
   fails, the reload is refused (``reload.rejected``) and nothing changes.
2. The daemon quiesces: it stops accepting (the listening sockets stay open), closes every
   client connection (WebSocket 1012, SSE streams end), commits the log, stops reading each
   stdio child at a message boundary without stopping it, and closes the database.
3. ``write_record`` puts the descriptors to keep (listening sockets, each child's pipes) and
   each child's unconsumed output in a private file; ``exec_program`` replaces the program,
   same pid, so the children stay ours and systemd's main pid does not change.
4. The next program finds ``MCPROXY_HANDOVER`` (``take_record``), adopts the sockets and the
   children, and serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Final, NoReturn

import msgspec

from mcproxy.errors import ReloadFailed
from mcproxy.upstreams.stdio import HandedOver

HANDOVER_ENV: Final = "MCPROXY_HANDOVER"
RECORD_VERSION: Final = 1
VALIDATE_TIMEOUT_S: Final = 60.0  # a cold import of the code and a config load
_STDERR_TAIL: Final = 2000


class KeptChild(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A stdio child kept running across the reload, and the session it belongs to."""

    session: str  # the store's key of the session (engine.schema.session_key)
    pid: int
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int
    unread: bytes = b""  # read from its stdout, not yet consumed: the next reader's first

    def handed_over(self) -> HandedOver:
        return HandedOver(self.pid, self.stdin_fd, self.stdout_fd, self.stderr_fd, self.unread)


POOL_VERSION: Final = 1


class KeptPoolChild(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A child of the shared pool kept running across the reload (``upstream.mode =
    "shared"``), by its index in the pool."""

    index: int
    pid: int
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int
    unread: bytes = b""

    def handed_over(self) -> HandedOver:
        return HandedOver(self.pid, self.stdin_fd, self.stdout_fd, self.stderr_fd, self.unread)


class KeptPool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shared pool across the reload: its children, the router's tables
    (``shared_router.Router.snapshot``, opaque here and versioned inside: a snapshot the next
    program cannot restore sends the pool down the restart path, not the whole record), and
    which session holds which router handle. ``version``: of this section's meaning; another
    one is not taken up either (the children are stopped, the sessions restart)."""

    version: int
    children: list[KeptPoolChild]
    router: msgspec.Raw
    sessions: dict[str, int]  # session key -> its router handle (sid)


class Handover(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one program hands the next across ``execve``. ``version`` changes with any
    change of meaning; a program refuses a record of another version: it exits 1 (``ReloadFailed``),
    its inherited children die with it, and systemd starts it anew (the restart path)."""

    version: int
    pid: int  # the process that wrote it: exec keeps it, so the reader checks it
    reloads: int  # reloads in place since the process started (mcproxy_reloads_total)
    listeners: list[int] = msgspec.field(default_factory=list)
    children: list[KeptChild] = msgspec.field(default_factory=list)
    # Sessions whose HTTP upstream session was released, not ended: its id is in the
    # session's ``upstream_state`` (committed before exec), the next program takes it up.
    http_sessions: list[str] = msgspec.field(default_factory=list)
    # The shared pool, if it was kept (absent from records of programs that did not keep it:
    # their pool's children were stopped before exec, as on a restart).
    pool: KeptPool | None = None

    def descriptors(self) -> list[int]:
        fds = list(self.listeners)
        kept: list[KeptChild | KeptPoolChild] = [*self.children]
        if self.pool is not None:
            kept += self.pool.children
        for child in kept:
            fds += [child.stdin_fd, child.stdout_fd, child.stderr_fd]
        return fds


_DECODER = msgspec.json.Decoder(Handover)


def encode_record(record: Handover) -> bytes:
    return msgspec.json.encode(record)


def decode_record(data: bytes) -> Handover:
    """Raises: ReloadFailed: not a handover record of this version, or not this process's
    (exit 1, not the config error's 2: systemd's Restart= starts the program anew, whereas
    RestartPreventExitStatus=2 would leave the service down after a reload)."""
    try:
        record = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ReloadFailed(f"reload handover record: {exc}") from exc
    if record.version != RECORD_VERSION:
        raise ReloadFailed(
            f"reload handover record: version {record.version}, this program reads {RECORD_VERSION}"
        )
    if record.pid != os.getpid():
        raise ReloadFailed(f"reload handover record: written by pid {record.pid}, not this one")
    return record


def write_record(directory: Path, record: Handover) -> Path:
    """The record in a new file of ``directory`` (the database's, private to this user),
    readable by this user only (mkstemp: 0600, O_EXCL)."""
    fd, name = tempfile.mkstemp(prefix=".mcproxy-handover-", suffix=".json", dir=directory)
    with os.fdopen(fd, "wb") as file:
        file.write(encode_record(record))
    return Path(name)


def take_record(environ: MutableMapping[str, str]) -> Handover | None:
    """The record the previous program left, if this start is a reload in place; the file is
    deleted and the variable removed (children must not see it) whatever the outcome.

    Raises:
        ReloadFailed: the record cannot be read or is not for this program.
    """
    value = environ.pop(HANDOVER_ENV, None)
    if environ is not os.environ:
        os.environ.pop(HANDOVER_ENV, None)
    if not value:
        return None
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReloadFailed(f"reload handover record: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return decode_record(data)


def close_descriptors(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def program_argv(argv: Sequence[str]) -> list[str]:
    """The command line of the next program: this interpreter, this package, these
    arguments (``sys.executable -m mcproxy``, whichever way this one was started)."""
    return [sys.executable, "-m", "mcproxy", *argv]


def check_argv(argv: Sequence[str]) -> list[str]:
    """``mcproxy check-config`` with the daemon's own options (``argv`` has no command
    word: ``cli`` removed ``run``)."""
    return program_argv(["check-config", *argv])


async def validate(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """Run the program now on disk far enough to know it can start: import the code, load
    and validate the configuration (``check-config``). None if it can; otherwise why not
    (the end of its stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *check_argv(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(environ),
        )
    except OSError as exc:
        return f"cannot run {sys.executable}: {exc}"
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), VALIDATE_TIMEOUT_S)
    except TimeoutError:
        return f"check-config did not finish within {VALIDATE_TIMEOUT_S:g} s"
    finally:  # timed out, or cancelled (a stop during validation): no process left behind
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode == 0:
        return None
    tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
    return f"check-config exited {proc.returncode}: {tail}"


def exec_program(argv: Sequence[str], environ: Mapping[str, str], record: Path) -> NoReturn:
    """Replace this program with the one on disk: same pid, the inheritable descriptors
    kept, everything else closed by the kernel (close-on-exec).

    Raises:
        OSError: exec failed (this process goes on, with nothing left to serve with).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.execve(sys.executable, program_argv(argv), {**environ, HANDOVER_ENV: str(record)})
