"""Streamable HTTP front benchmarks (MCP 2025-11-25), measured in one run against a baseline
from the same run.

1. sequential tools/call: direct over stdio (the baseline) vs POSTs to mcproxy's ``/mcp``,
   each answered with an SSE stream; p50, p99, requests/s, ratio.
2. concurrent throughput: N tasks, each on its own session (so its own upstream process) doing
   M calls in a row, vs N direct upstream processes driven the same way; aggregate requests/s.

Latency is the time to the parsed JSON-RPC answer; requests/s is calls over wall time, which
also covers reading each SSE stream to its end (the connection is reused only after that).
The upstream is the bundled stdlib demo server by default, or the SDK fixture with
``--upstream fixture``. Everything runs on loopback and stops by itself.

    python benchmarks/bench_http.py [--calls 2000] [--concurrency 8] [--upstream demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_ws import DEMO, FIXTURE, INIT, Proxy, echo_call, pct

VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


def row(name: str, samples: list[float], wall: float) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    out = {"p50_ms": statistics.median(ms), "p99_ms": pct(ms, 99), "rps": len(ms) / wall}
    print(f"  {name:<34} p50 {out['p50_ms']:8.3f} ms   p99 {out['p99_ms']:8.3f} ms   "
          f"{out['rps']:8.0f} req/s   n={len(ms)}")  # fmt: skip
    return out


class Stdio:
    """One upstream process driven with raw newline-delimited JSON-RPC."""

    async def start(self, upstream: str) -> Stdio:
        self.proc = await asyncio.create_subprocess_exec(
            *shlex.split(upstream),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self.rpc(INIT)
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def rpc(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdout is not None
        self._write(message)
        while True:
            reply: dict[str, Any] = json.loads(await self.proc.stdout.readline())
            if reply.get("id") == message["id"]:
                return reply

    async def call(self, i: int) -> float:
        t0 = time.perf_counter()
        reply = await self.rpc(echo_call(i))
        elapsed = time.perf_counter() - t0
        assert "result" in reply, reply
        return elapsed

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


class HttpSession:
    """One MCP session on the Streamable HTTP front: a POST per message, SSE answers."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.headers = {"Content-Type": "application/json", "Accept": ACCEPT}

    async def start(self) -> HttpSession:
        async with self.http.post(self.url, data=json.dumps(INIT), headers=self.headers) as resp:
            assert resp.status == 200, resp.status
            self.headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
            await read_answer(resp, INIT["id"])
        self.headers["MCP-Protocol-Version"] = VERSION
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        async with self.http.post(self.url, data=note, headers=self.headers) as resp:
            assert resp.status == 202, resp.status
        # like any client: list first (the proxy learns which tools are read-only)
        await self.rpc({"jsonrpc": "2.0", "id": "tools", "method": "tools/list"})
        return self

    async def rpc(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(self.url, data=json.dumps(message), headers=self.headers) as r:
            assert r.status == 200, r.status
            return await read_answer(r, message["id"])

    async def call(self, i: int) -> float:
        t0 = time.perf_counter()
        body = json.dumps(echo_call(i))
        async with self.http.post(self.url, data=body, headers=self.headers) as r:
            assert r.headers.get("Content-Type", "").startswith("text/event-stream"), r.headers
            reply = await read_answer(r, i, drain=False)
            elapsed = time.perf_counter() - t0
            await r.read()  # the stream ends after the answer; reuse the connection
        assert "result" in reply, reply
        return elapsed


async def read_answer(
    resp: aiohttp.ClientResponse, request_id: object, drain: bool = True
) -> dict[str, Any]:
    """The JSON-RPC answer to ``request_id`` from an SSE stream (or a plain JSON body)."""
    if resp.content_type == "application/json":
        answer: dict[str, Any] = await resp.json()
        return answer
    data: list[bytes] = []
    async for raw in resp.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif not line and data:  # end of an event
            payload = b"\n".join(data).strip()
            data = []
            if payload:
                message: dict[str, Any] = json.loads(payload)
                if message.get("id") == request_id and "method" not in message:
                    if drain:
                        await resp.read()
                    return message
    raise ConnectionError(f"SSE stream ended without an answer to {request_id!r}")


async def sequential(client: Stdio | HttpSession, calls: int, first: int = 1) -> dict[str, Any]:
    t0 = time.perf_counter()
    samples = [await client.call(i) for i in range(first, first + calls)]
    return {"samples": samples, "wall": time.perf_counter() - t0}


async def concurrent(
    clients: list[Stdio] | list[HttpSession], calls: int, first: int = 1
) -> dict[str, Any]:
    """Every client does ``calls`` calls in a row, all at once; wall time of the whole."""
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(sequential(c, calls, first) for c in clients))
    return {"samples": [s for r in runs for s in r["samples"]], "wall": time.perf_counter() - t0}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--upstream", choices=["demo", "fixture"], default="demo")
    args = parser.parse_args()
    upstream = DEMO if args.upstream == "demo" else FIXTURE
    n, per_task = args.concurrency, max(1, args.calls // args.concurrency)
    warm = max(50, args.calls // 10)
    print(f"mcproxy Streamable HTTP benchmarks on {platform.node()} ({os.cpu_count()} cpus, "
          f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}), "
          f"upstream: {args.upstream}")  # fmt: skip

    stdio = await Stdio().start(upstream)
    await sequential(stdio, warm)
    direct = row("tools/call direct stdio", **await sequential(stdio, args.calls))
    await stdio.close()
    pool = [await Stdio().start(upstream) for _ in range(n)]
    await concurrent(pool, max(10, warm // n), 100_000)
    label = f"{n}x{per_task} direct stdio ({n} procs)"
    direct_n = row(label, **await concurrent(pool, per_task))
    for proc in pool:
        await proc.close()

    with tempfile.TemporaryDirectory() as tmp:
        proxy = Proxy(Path(tmp) / "http.db", upstream)
        proxy.start()
        try:
            async with aiohttp.ClientSession() as http:
                session = await HttpSession(http, proxy.url).start()
                await sequential(session, warm, 100_000)
                proxied = row("tools/call through mcproxy HTTP", **await sequential(
                    session, args.calls))  # fmt: skip
                sessions = [await HttpSession(http, proxy.url).start() for _ in range(n)]
                await concurrent(sessions, max(10, warm // n), 100_000)
                label = f"{n}x{per_task} through HTTP ({n} sessions)"
                proxied_n = row(label, **await concurrent(sessions, per_task))
        finally:
            proxy.kill()

    ratio = proxied["p50_ms"] / direct["p50_ms"]
    added = proxied["p50_ms"] - direct["p50_ms"]
    print(f"  round trip p50 ratio proxy/direct: {ratio:.2f}x (+{added:.3f} ms per call); "
          f"sequential req/s {proxied['rps']:.0f} vs {direct['rps']:.0f} direct")  # fmt: skip
    print(f"  concurrency {n}: {proxied_n['rps']:.0f} req/s through HTTP vs "
          f"{direct_n['rps']:.0f} direct ({proxied_n['rps'] / direct_n['rps']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
