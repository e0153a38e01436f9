"""Three mcproxy instances behind the shipped HAProxy or nginx configuration, on loopback.

Shared by tests/e2e/test_fleet.py and benchmarks/bench_fleet.py. The balancer runs the very
files in deploy/, with only their loopback ports (and HAProxy's socket path) replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    MS,
    ROOT,
    TIMEOUT,
    ProxyProcess,
    children_of,
    eventually,
    free_port,
)

DEPLOY = ROOT / "deploy"
NAMES = ("a", "b", "c")
DEMO_UPSTREAM = f"stdio:{sys.executable} -m mcproxy.examples.demo_server"
BALANCER_PORT = "127.0.0.1:8700"
INSTANCE_PORTS = {"a": "127.0.0.1:8701", "b": "127.0.0.1:8702", "c": "127.0.0.1:8703"}
HAPROXY_SOCKET = "/run/haproxy/mcproxy.sock"


def require(binary: str) -> str:
    """The balancer's binary; without it the test is skipped, unless CI requires it
    (MCPROXY_REQUIRE_PEERS=1, set by .ci/run, whose scripts/test installs them)."""
    found = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/sbin/{binary}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("MCPROXY_REQUIRE_PEERS") == "1":
            pytest.fail(f"{binary} is required (apt-get install {binary})")
        pytest.skip(f"{binary} not installed (apt-get install haproxy nginx-light)")
    return found


def instance(tmp: Path, name: str, port: int, *toml: str) -> ProxyProcess:
    config = tmp / f"{name}.toml"
    config.write_text(
        "\n".join(
            [
                "[server]",
                f'instance = "{name}"',
                "[upstream]",
                'mode = "shared"',
                "[sessions]",
                "max_log_events = 100000",
                *toml,
            ]
        )
        + "\n"
    )
    return ProxyProcess(tmp / f"{name}.db", DEMO_UPSTREAM, "--config", str(config), port=port)


def wait_port(port: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(20 * MS)


class Balancer:
    """HAProxy or nginx on the shipped configuration."""

    def __init__(
        self, kind: str, tmp: Path, ports: dict[str, int], servers: tuple[str, ...] = NAMES
    ) -> None:
        self.kind = kind
        self.servers = servers  # HAProxy: the others' server and use-server lines are dropped
        self.tmp = tmp
        self.port = free_port()
        self.ports = ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = tmp / "haproxy.sock"
        self.config = tmp / ("haproxy.cfg" if kind == "haproxy" else "nginx.conf")
        self.binary = require(kind)

    def render(self, drained: tuple[str, ...] = ()) -> None:
        source = DEPLOY / (
            "haproxy/haproxy.cfg" if self.kind == "haproxy" else "nginx/mcproxy.conf"
        )
        text = source.read_text()
        text = text.replace(BALANCER_PORT, f"127.0.0.1:{self.port}")
        text = text.replace(HAPROXY_SOCKET, str(self.socket))
        for name, address in INSTANCE_PORTS.items():
            line = f"server {address} max_fails=1 fail_timeout=2s;"
            if name in drained:  # nginx: draining is "down" in the new-session group
                text = text.replace(line, f"server {address} down;")
            text = text.replace(address, f"127.0.0.1:{self.ports[name]}")
        absent = tuple(
            f"{kw} {n} " for n in NAMES if n not in self.servers for kw in ("server", "use-server")
        )
        lines = [
            line for line in text.splitlines() if not line.strip().startswith(absent or ("\0",))
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Balancer:
        self.render()
        if self.kind == "haproxy":
            args = [self.binary, "-f", str(self.config), "-db"]
        else:
            args = [self.binary, "-p", f"{self.tmp}/", "-c", str(self.config)]
            args += ["-g", "daemon off;"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_port(self.port)
        except OSError:
            raise RuntimeError(f"{self.kind} did not start: {self.stop()}") from None
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def drain(self, name: str) -> None:
        """Maintenance: no new sessions to ``name``; its own still reach it. Returns once
        the balancer applies it."""
        if self.kind == "haproxy":  # the runtime API answers once it is applied
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                s.sendall(f"set server mcproxy/{name} state drain\n".encode())
                s.recv(4096)
            return
        self.render(drained=(name,))
        assert self.proc is not None
        old = children_of(self.proc.pid)
        self.proc.send_signal(signal.SIGHUP)  # nginx -s reload
        # The master starts workers on the new configuration, then tells the old ones to
        # stop accepting: each retitles itself "shutting down" (and stays while the
        # WebSockets it carries last) or is gone.
        await eventually(lambda: self._reloaded(old))

    def _reloaded(self, old: set[int]) -> bool:
        assert self.proc is not None
        if not children_of(self.proc.pid) - old:
            return False
        for pid in old:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if b"shutting down" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return False
        return True

    def stop(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


def stored_sessions(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {str(r[0]) for r in conn.execute("SELECT id FROM sessions")}
