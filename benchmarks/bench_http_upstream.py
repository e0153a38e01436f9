"""HTTP upstream benchmark: a remote Streamable HTTP MCP server behind mcproxy, measured in one
run against calling that server directly.

The upstream is the SDK fixture server (``tests/fixtures/server.py http PORT``, the official
``mcp`` SDK over uvicorn, with an event store: resumable SSE answers) in its own process.

1. tools/call ``echo`` round trip, direct: a raw aiohttp Streamable HTTP client (a POST per
   call, the SSE answer read to its end, the connection reused) against the fixture;
2. the same calls through mcproxy's WebSocket front, mcproxy posting to the same fixture;
   p50, p99, ratio and the time mcproxy adds per call.

Everything runs on loopback and stops by itself.

    python benchmarks/bench_http_upstream.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_http import HttpSession, sequential
from bench_ws import ROOT, Proxy, report, terminate, through_proxy

FIXTURE = ROOT / "tests" / "fixtures" / "server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fixture:
    """The SDK fixture server over Streamable HTTP, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(FIXTURE), "http", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "FIXTURE_COUNTER_DIR": tempfile.gettempdir()},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("fixture server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        terminate(self.proc)


class HttpUpstreamProxy(Proxy):
    """mcproxy with ``--upstream http://...`` (bench_ws's Proxy starts stdio upstreams)."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "--listen", "127.0.0.1:0", "--db", str(self.db),
             "--upstream", self.upstream, "--log-format", "json", "--log-level", "warning"],
            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        self.wait_listening()


async def direct_http(url: str, calls: int, first: int) -> list[float]:
    async with aiohttp.ClientSession() as http:
        session = await HttpSession(http, url).start()
        samples: list[float] = (await sequential(session, calls, first))["samples"]
        async with http.delete(url, headers=session.headers):
            pass
        return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"mcproxy HTTP upstream benchmark on {platform.node()} ({os.cpu_count()} cpus, "
          f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}), "
          "upstream: SDK fixture over Streamable HTTP")  # fmt: skip
    warm = max(50, args.calls // 10)
    fixture = Fixture()
    try:
        await direct_http(fixture.url, warm, 100_000)
        direct = report("tools/call direct HTTP (aiohttp)", await direct_http(
            fixture.url, args.calls, 1))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            proxy = HttpUpstreamProxy(Path(tmp) / "bench.db", fixture.url)
            proxy.start()
            try:
                await through_proxy(proxy, warm)
                proxied = report("tools/call WS -> mcproxy -> HTTP", await through_proxy(
                    proxy, args.calls))  # fmt: skip
            finally:
                proxy.stop()
    finally:
        fixture.stop()
    ratio = proxied["p50_ms"] / direct["p50_ms"]
    added = proxied["p50_ms"] - direct["p50_ms"]
    added99 = proxied["p99_ms"] - direct["p99_ms"]
    print(f"  round trip p50 ratio proxy/direct: {ratio:.2f}x (+{added:.3f} ms per call at p50, "
          f"+{added99:.3f} ms at p99)")  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
