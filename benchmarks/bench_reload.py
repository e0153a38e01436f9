"""Reload in place (SIGHUP) against a plain restart (SIGTERM, then a new process), measured in
one run on the same database, the same session and the same upstream.

For each reload and each restart, one WebSocket client is attached to a session (with a
message to replay) and a Streamable HTTP request waits for /healthz. Printed, p50 and p99:

- signal → accepting: from the signal to the first HTTP answer of the next program;
- drop → accepting: from the client's drop (WebSocket 1012) to that answer: what a client
  sees as the outage (a reload validates the program on disk before it drops anyone);
- drop → first resumed message: from the drop to the first message replayed on the client's
  new connection (it resumes with its cursor as soon as it was dropped).

The upstream (the bundled demo server) keeps running across a reload; a restart stops it
and the next process spawns it again on demand. Everything runs on loopback.

    python benchmarks/bench_reload.py [--reloads 20] [--restarts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_ws import INIT, report, terminate

ROOT = Path(__file__).resolve().parent.parent
DEMO = f"{sys.executable} -m mcproxy.examples.demo_server"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """``python -m mcproxy`` on a fixed port; its JSON log read for the reload's end."""

    def __init__(self, db: Path, port: int) -> None:
        self.db, self.port = db, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[str] = []
        self.listening = threading.Event()

    def start(self) -> None:
        self.listening.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "--listen", f"127.0.0.1:{self.port}",
             "--db", str(self.db), "--upstream", f"stdio:{DEMO}", "--log-format", "json"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            try:
                event = json.loads(raw).get("event", "")
            except ValueError:
                continue
            self.events.append(event)
            if event == "daemon.listening":
                self.listening.set()
            if event == "reload.rejected":
                print(f"  reload rejected: {raw[:300]!r}", file=sys.stderr)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            terminate(self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def healthz_answered(port: int, deadline: float) -> float:
    """When /healthz is first answered, trying from now (connections wait in the listen
    backlog during a reload; a restart refuses them until the next process binds)."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(HEALTHZ)
                reply = sock.recv(64)
            if reply.startswith(b"HTTP/1.1 200"):
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError("/healthz never answered")


async def attach(http: aiohttp.ClientSession, url: str, session_id: str, after: int) -> Any:
    return await http.ws_connect(
        url, params={"mcp_session_id": session_id, "mcp_last_lsn": str(after)}
    )


async def one_gap(
    proxy: Proxy, http: aiohttp.ClientSession, session_id: str, head: int, reload: bool
) -> tuple[float, float, float]:
    """(signal → accepting, drop → accepting, drop → first resumed message)."""
    ws = await attach(http, proxy.url, session_id, head)
    loop = asyncio.get_running_loop()
    proxy.listening.clear()  # the next program says daemon.listening, reloaded or not
    t0 = time.monotonic()
    proxy.signal(signal.SIGHUP if reload else signal.SIGTERM)
    while True:  # the 1012 drop (the replayed message, if any, comes first)
        frame = await ws.receive(timeout=60)
        if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            break
        if frame.type is aiohttp.WSMsgType.ERROR:
            break
    dropped = time.monotonic()
    await ws.close()
    deadline = dropped + 60
    accepting = loop.run_in_executor(None, healthz_answered, proxy.port, deadline)
    if not reload:
        await loop.run_in_executor(None, proxy.proc.wait, 60)  # type: ignore[union-attr]
        proxy.start()
    while True:  # resume at once, with a cursor one behind: one message to replay
        try:
            ws = await attach(http, proxy.url, session_id, head - 1)
            break
        except (aiohttp.ClientError, OSError):
            await asyncio.sleep(0.002)
            if time.monotonic() > deadline:
                raise
    await ws.receive_json(timeout=60)
    resumed = time.monotonic()
    await ws.close()
    accepted = await accepting
    # Started for good before the next signal (a reload in progress refuses another).
    await loop.run_in_executor(None, proxy.listening.wait, 60)
    return accepted - t0, accepted - dropped, resumed - dropped


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    print(f"mcproxy reload vs restart on {platform.node()} ({os.cpu_count()} cpus, "
          f"Python {platform.python_version()})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        proxy = Proxy(Path(tmp) / "bench.db", free_port())
        proxy.start()
        if not proxy.listening.wait(60):
            raise RuntimeError("proxy did not start")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(proxy.url, protocols=("mcp",)) as ws:
                    await ws.send_json(INIT)
                    session_id = (await ws.receive_json())["result"]["mcpSessionId"]
                    await ws.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})
                    call = {"name": "echo", "arguments": {"text": "hello"}}
                    await ws.send_json(
                        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": call}
                    )
                    answer = await ws.receive_json()  # the upstream runs: a reload keeps it
                    head = answer["result"]["_meta"]["io.mcproxy/lsn"]
                results: dict[str, list[tuple[float, float, float]]] = {}
                for kind, count in (("reload", args.reloads), ("restart", args.restarts)):
                    results[kind] = [
                        await one_gap(proxy, http, session_id, head, kind == "reload")
                        for _ in range(count)
                    ]
        finally:
            proxy.stop()
    for kind in ("reload", "restart"):
        print(f"{kind} (SIGHUP)" if kind == "reload" else f"{kind} (SIGTERM + start)")
        rows = results[kind]
        report("signal -> accepting", [r[0] for r in rows])
        report("drop -> accepting", [r[1] for r in rows])
        report("drop -> first resumed message", [r[2] for r in rows])


if __name__ == "__main__":
    asyncio.run(main())
