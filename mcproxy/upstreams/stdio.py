"""An upstream MCP server run as a child process speaking newline-delimited JSON on stdio.

The child runs in its own process group (so a stop reaches its helpers too) and is bound to
the proxy with ``PR_SET_PDEATHSIG`` (so a SIGKILLed proxy leaves no orphans). It gets a clean
environment (``child_environment``: an allow-list of the daemon's variables, never the proxy's
token variables) and no descriptor but its three pipes (``_isolate``), whichever event loop
spawns it: every stdio child, per-session or shared, is started by ``StdioUpstream.start``.
Its stderr is logged line by line with the session it belongs to (transports §stdio: stderr
is logging, not an error). Stopping follows lifecycle §Shutdown for stdio: close stdin,
wait; SIGTERM the group, wait; SIGKILL the group, every step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

import msgspec
import structlog

from mcproxy.config import Config, UpstreamConfig, secret_variables
from mcproxy.core import jsonrpc
from mcproxy.core.framing import LineFramer
from mcproxy.errors import LineTooLong, UpstreamError
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import UpstreamHandler

log = structlog.get_logger("mcproxy")

_PR_SET_PDEATHSIG = 1
_READ_CHUNK = 256 * 1024
_STDERR_LINE_MAX = 4096  # longer stderr lines are cut in the log, not in the child
_EXIT_POLL_S = 0.01


class Child(Protocol):
    """The process half of a child: ``asyncio.subprocess.Process`` for one this program
    spawned, ``upstreams.adopted.AdoptedChild`` for one handed over by a reload."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class HandedOver:
    """What a reload passes to the next program for one child (``StdioUpstream.handover``):
    its pid, the proxy's ends of its three pipes, and the stdout bytes read but not yet
    consumed (an unfinished line; read-ahead), which the next reader takes first."""

    pid: int
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int
    unread: bytes


class _Head(msgspec.Struct, gc=False):
    """Enough of a refused message to answer it: the rest is skipped while decoding."""

    id: int | str | None = None
    method: str | None = None


_HEAD = msgspec.json.Decoder(_Head)


def child_environment(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of every stdio child: the variables of ``environ`` named by
    ``upstream.env_passthrough`` ("PREFIX*" matches a prefix), then ``upstream.env``; never
    the variables holding the proxy's own secrets (``auth.tokens_env``,
    ``upstream.bearer_token_env``), even if listed (docs/SECURITY.md, "The upstream")."""
    patterns = config.upstream.env_passthrough
    secrets = secret_variables(config)
    env = {
        name: value
        for name, value in environ.items()
        if name not in secrets and any(fnmatchcase(name, p) for p in patterns)
    }
    env.update(config.upstream.env)  # validate() refused secret names here
    return env


def _isolate() -> None:  # runs in the child between fork and exec
    # Nothing the daemon holds reaches the child but its three pipes: a descriptor the daemon
    # inherited (a tokens file, a listening socket), the store, client sockets. Marked
    # close-on-exec rather than closed: the spawner's own exec-error pipe must survive until
    # exec. Needed under uvloop, whose spawn ignores close_fds and leaks every inheritable
    # descriptor (and duplicates of the pipes) into the child.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a SIGKILLed proxy leaves no orphans


def _isolate_batch() -> None:  # the same, and SCHED_BATCH (upstream.batch_scheduling)
    _isolate()
    # Set before exec, so the program and every thread or process it starts inherit it. A
    # system without the policy runs the child as it is.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def resolve_command(argv: tuple[str, ...]) -> list[str]:
    """Find the executable: as given, on PATH, then beside the running interpreter.

    The last step lets the default upstream (``mcproxy-demo-server``, installed next to
    ``mcproxy`` in the same virtualenv) work when the venv is not on PATH.
    """
    program = argv[0]
    if os.sep not in program and shutil.which(program) is None:
        beside = Path(sys.executable).parent / program
        if beside.exists():
            program = str(beside)
    return [program, *argv[1:]]


def command_available(argv: tuple[str, ...]) -> bool:
    """Readiness: the command would be found and is executable (it may still fail later)."""
    return shutil.which(resolve_command(argv)[0]) is not None


class StdioUpstream:
    """One child process. Create, ``start()``, ``send()`` lines, ``aclose()``."""

    def __init__(
        self,
        argv: tuple[str, ...],
        handler: UpstreamHandler,
        config: UpstreamConfig,
        session_label: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``env``: the child's environment (the daemon computes ``child_environment`` once);
        None filters this process's environment by ``config`` alone."""
        self.argv = argv
        self.env = (
            dict(env) if env is not None else child_environment(Config(upstream=config), os.environ)
        )
        self.handler = handler
        self.config = config
        self.session_label = session_label
        self.pid: int | None = None
        self._proc: Child | None = None
        # The proxy's ends of the child's pipes: opened here (not by the spawner), so a
        # reload knows their descriptors and can hand them to the next program.
        self._stdin: asyncio.WriteTransport | None = None
        self._stdout: asyncio.StreamReader | None = None
        self._stderr: asyncio.StreamReader | None = None
        self._fds: tuple[int, int, int] | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._framer = LineFramer(config.max_line_bytes)
        self._handing_over = False
        # A reader that dies (a bug in the session's handling of a line) must not leave the
        # child running unread: the upstream declares itself lost (issue 16 item 5).
        self._tasks = TaskSet(f"upstream:{session_label}", self._task_failed)
        self._closing = False
        self._lost = False
        self._unsent: list[bytes] = []  # lines of this loop turn, not yet written
        self._unsent_bytes = 0
        self._dropped = 0  # notifications and responses dropped over max_queued_bytes

    async def start(self) -> None:
        # Pipes made here, close-on-exec on our side: the child gets its ends as 0, 1, 2.
        pipes: list[tuple[int, int]] = []
        try:
            for _ in range(3):  # inside the try: out of descriptors is a start that failed
                pipes.append(os.pipe2(os.O_CLOEXEC))
            child_ends = (pipes[0][0], pipes[1][1], pipes[2][1])
            ours = (pipes[0][1], pipes[1][0], pipes[2][0])
            proc = await asyncio.create_subprocess_exec(
                *resolve_command(self.argv),
                stdin=child_ends[0],
                stdout=child_ends[1],
                stderr=child_ends[2],
                start_new_session=True,  # own session => own process group, pgid == pid
                env=self.env,
                close_fds=True,
                preexec_fn=_isolate_batch if self.config.batch_scheduling else _isolate,
            )
        except BaseException as exc:  # a cancelled start too: no descriptor left behind
            for pair in pipes:
                for fd in pair:
                    os.close(fd)
            if isinstance(exc, OSError | ValueError):
                raise UpstreamError(f"cannot start {self.argv[0]!r}: {exc}") from exc
            raise
        for fd in child_ends:
            os.close(fd)  # the child holds them now; our copies would hide its EOF
        log.info("upstream.spawned", session=self.session_label, pid=proc.pid)
        await self.attach(proc, ours, b"")

    async def attach(self, proc: Child, fds: tuple[int, int, int], unread: bytes) -> None:
        """Drive ``proc`` through the proxy's ends of its pipes (stdin, stdout, stderr), which
        this upstream now owns; ``unread``: stdout bytes to consume before the pipe's (a
        child handed over by a reload, ``upstreams.adopted``)."""
        loop = asyncio.get_running_loop()
        self._proc = proc
        self.pid = proc.pid
        self._fds = fds
        self._stdout = asyncio.StreamReader(limit=_READ_CHUNK, loop=loop)
        self._stderr = asyncio.StreamReader(limit=_READ_CHUNK, loop=loop)
        if unread:
            self._stdout.feed_data(unread)
        # Each pipe's file belongs to its transport from the call on (it closes it). A start
        # cancelled between two calls leaves the later descriptors open (the child itself
        # is stopped by ``aclose``, its stdout and stderr reach EOF with it).
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(fds[0], "wb", 0))
        self._stdin = stdin
        self._transports.append(stdin)
        for reader, fd in ((self._stdout, fds[1]), (self._stderr, fds[2])):
            transport, _ = await loop.connect_read_pipe(
                lambda r=reader: asyncio.StreamReaderProtocol(r, loop=loop),  # type: ignore[misc]
                os.fdopen(fd, "rb", 0),
            )
            self._transports.append(transport)
        self._tasks.spawn(self._read_stdout(proc), f"stdout:{self.session_label}")
        self._tasks.spawn(self._read_stderr(proc), f"stderr:{self.session_label}")

    def _stdin_open(self) -> bool:
        return self._stdin is not None and not self._stdin.is_closing()

    async def quiesce(self, drain_s: float) -> bool:
        """A reload begins: write what is queued for the child (waiting up to ``drain_s``
        for the pipe to take it), then stop reading its output at a message boundary,
        leaving the child running. False if the child is not fit to hand over (it is
        gone, or did not take its input in time); it is then stopped as on a restart."""
        if self._proc is None or self._closing or self._lost or not self._stdin_open():
            return False
        self._write_unsent()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while self._stdin is not None and self._stdin.get_write_buffer_size():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        # The readers stop between two messages: each chunk's lines are all handled before
        # the next read is awaited, so nothing is handled twice by the next program.
        self._handing_over = True
        await self._tasks.cancel_all()
        return self._proc.returncode is None

    def handover(self) -> HandedOver:
        """After ``quiesce``, just before exec (no await in between, so no byte arrives in
        a buffer after it was read here): the descriptors to keep and what was read ahead.
        The descriptors are left open and made inheritable for exec."""
        assert self._proc is not None and self._fds is not None and self._stdout is not None
        # StreamReader has no public "take what is buffered": its buffer is read directly.
        unread = self._framer.take_partial() + bytes(self._stdout._buffer)  # type: ignore[attr-defined]
        for fd in self._fds:
            os.set_inheritable(fd, True)
        return HandedOver(self._proc.pid, *self._fds, unread)

    def send(self, data: bytes) -> None:
        stdin = self._stdin
        if stdin is None or self._closing or self._handing_over or stdin.is_closing():
            return  # the loss is reported by the stdout reader; the session re-routes
        # transports §stdio: one message per line, no embedded newlines (JSON encoders
        # escape them inside strings, so the encoded envelope is always one line).
        # The lines of one loop turn leave in one write: each pipe write is a system call
        # and wakes the child, and a shared child gets thousands of lines a second.
        queued = self._unsent_bytes + stdin.get_write_buffer_size()
        if queued and queued + len(data) > self.config.max_queued_bytes:
            self._refuse(data, queued)
            return
        unsent = self._unsent
        unsent += (data, b"\n")
        self._unsent_bytes += len(data) + 1
        if len(unsent) == 2:
            asyncio.get_running_loop().call_soon(self._write_unsent)

    def _refuse(self, data: bytes, queued: int) -> None:
        """Over ``upstream.max_queued_bytes``: the child is not reading what it was sent.
        Holding more would grow the proxy without bound (issue 15 finding 4); a request is
        answered -32015 (never sent, so safe to retry), anything else is dropped and logged.
        The answer comes on a later loop turn, as an upstream answer would: never from inside
        the caller's ``send``."""
        try:
            head = _HEAD.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            head = _Head()
        limit = self.config.max_queued_bytes
        if head.method is not None and head.id is not None:
            error = jsonrpc.error_bytes(
                head.id,
                jsonrpc.UPSTREAM_BUSY,
                "the upstream server is not reading its input; the request was not sent",
                {"queuedBytes": queued, "limit": limit},
            )
            asyncio.get_running_loop().call_soon(self._answer_refused, error)
            return
        self._dropped += 1
        if self._dropped & (self._dropped - 1) == 0:  # 1, 2, 4, 8...: bounded logging
            log.warning(
                "upstream.send_dropped",
                session=self.session_label,
                pid=self.pid,
                message=head.method or "response",
                queued_bytes=queued,
                limit=limit,
                dropped=self._dropped,
            )

    def _answer_refused(self, error: bytes) -> None:
        if not self._closing and not self._lost:
            self.handler.on_upstream_message(error)

    def _write_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        self._unsent_bytes = 0
        if unsent and self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(b"".join(unsent))

    async def _read_stdout(self, proc: Child) -> None:
        assert self._stdout is not None
        stdout, framer = self._stdout, self._framer
        reason = "upstream closed stdout"
        try:
            while True:
                chunk = await stdout.read(_READ_CHUNK)
                if not chunk:
                    break
                for line in framer.feed(chunk):
                    self.handler.on_upstream_message(line)
        except LineTooLong as exc:
            reason = str(exc)
        except (ConnectionError, OSError) as exc:
            reason = f"stdout read failed: {exc}"
        await self._report_lost(proc, reason)

    def _task_failed(self, task: asyncio.Task[object], exc: BaseException) -> None:
        proc = self._proc
        if proc is None or self._closing or self._lost or self._handing_over:
            return
        reason = f"internal error in {task.get_name()}: {exc!r}"
        self._tasks.spawn(self._report_lost(proc, reason), f"lost:{self.session_label}")

    async def _report_lost(self, proc: Child, reason: str) -> None:
        """Stop the child (whatever is left of it) and tell the session, once."""
        if self._closing or self._lost or self._handing_over:
            return
        self._lost = True
        await self._stop(proc)
        reason = f"{reason} (exit status {proc.returncode})"
        log.warning("upstream.lost", session=self.session_label, pid=proc.pid, reason=reason)
        self.handler.on_upstream_lost(reason)

    async def _read_stderr(self, proc: Child) -> None:
        assert self._stderr is not None
        pending = b""
        while True:
            chunk = await self._stderr.read(_READ_CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._log_stderr(line)
            if len(pending) > _STDERR_LINE_MAX:
                self._log_stderr(pending)
                pending = b""
        if pending:
            self._log_stderr(pending)

    def _log_stderr(self, line: bytes) -> None:
        text = line[:_STDERR_LINE_MAX].decode("utf-8", "replace").rstrip()
        if text:
            log.info("upstream.stderr", session=self.session_label, pid=self.pid, line=text)

    async def aclose(self) -> None:
        """Stop the child (idempotent); never reports ``on_upstream_lost``."""
        if self._closing:
            await self._tasks.cancel_all()
            return
        self._closing = True
        if self._proc is not None:
            await self._stop(self._proc)
        await self._tasks.cancel_all()
        for transport in self._transports:
            transport.close()  # a grandchild may hold the pipes open: ours are let go now

    async def _stop(self, proc: Child) -> None:
        # lifecycle §Shutdown (stdio): close stdin, then SIGTERM, then SIGKILL, each bounded.
        if self._stdin is not None and not self._stdin.is_closing():
            self._write_unsent()  # what was sent before the close goes first
            self._stdin.close()
        if await self._exited_within(proc, self.config.stdin_close_grace_s):
            return
        self._signal_group(proc, signal.SIGTERM)
        if await self._exited_within(proc, self.config.sigterm_grace_s):
            return
        self._signal_group(proc, signal.SIGKILL)
        await self._exited_within(proc, 5.0)

    @staticmethod
    def _signal_group(proc: Child, sig: signal.Signals) -> None:
        log.info("upstream.signal", pid=proc.pid, signal=sig.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    @staticmethod
    async def _exited_within(proc: Child, timeout_s: float) -> bool:
        # Poll returncode rather than await proc.wait(): on 3.11+ wait() also waits for pipe
        # EOF, and a grandchild holding the pipes open would make an exited child look hung.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while proc.returncode is None:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        return True
