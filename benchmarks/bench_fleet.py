"""A fleet behind HAProxy (issue 19, docs/DEPLOY.md): aggregate calls/s and resume latency for
1, 2 and 3 instances behind the shipped deploy/haproxy/haproxy.cfg, next to a direct connection
to one instance, in one run, with each process's CPU so the reader sees where the time went.

Each configuration: ``--sessions`` WebSocket sessions created through the balancer (spread by
it; ids carry their instance), each calling ``echo`` in a loop for ``--calls`` calls, all at
once; then ``--resumes`` sessions drop their socket and resume through the balancer (URL with
the id and cursor) and the time to the first answer on the new socket is taken. The upstream is
the bundled demo server in ``shared`` mode (one child per instance). On a 2-core machine the
scaling flattens: the client, the balancer and the instances share the two cores (see the CPU
column: an instance near 100% of one core is the bottleneck, several well below it mean the
machine is).

    python benchmarks/bench_fleet.py [--sessions 30] [--calls 100] [--resumes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.fleet import NAMES, Balancer, instance  # noqa: E402
from tests.helpers import ProxyProcess, free_port, pid_alive  # noqa: E402

INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"},
}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Session:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.id = ""
        self.cursor = 0
        self.n = 0

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        self.n += 1
        rid = self.n
        await self.ws.send_str(
            json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        )
        while True:
            message = json.loads(await self.ws.receive_str(timeout=30))
            meta = (message.get("result") or message.get("params") or {}).get("_meta") or {}
            self.cursor = max(self.cursor, int(meta.get("io.mcproxy/lsn", 0)))
            if message.get("id") == rid:
                return dict(message)

    async def start(self) -> None:
        self.ws = await self.http.ws_connect(self.url, protocols=("mcp",))
        result = await self.call("initialize", INIT)
        self.id = result["result"]["mcpSessionId"]
        await self.ws.send_str('{"jsonrpc":"2.0","method":"notifications/initialized"}')

    async def echo(self) -> None:
        await self.call("tools/call", {"name": "echo", "arguments": {"text": "x"}})

    async def resume(self) -> float:
        """Drop the socket, resume through the balancer: seconds to the first answer."""
        assert self.ws is not None
        await self.ws.close()
        began = time.perf_counter()
        params = {"mcp_session_id": self.id, "mcp_last_lsn": str(self.cursor)}
        self.ws = await self.http.ws_connect(self.url, params=params, protocols=("mcp",))
        await self.echo()
        return time.perf_counter() - began


async def measure(url: str, sessions: int, calls: int, resumes: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        fleet = [Session(http, url) for _ in range(sessions)]
        await asyncio.gather(*(s.start() for s in fleet))
        began = time.perf_counter()

        async def loop(s: Session) -> None:
            for _ in range(calls):
                await s.echo()

        await asyncio.gather(*(loop(s) for s in fleet))
        elapsed = time.perf_counter() - began
        waits = [await fleet[i % sessions].resume() for i in range(resumes)]
        for s in fleet:
            if s.ws is not None:
                await s.ws.close()
    return {
        "calls_per_s": sessions * calls / elapsed,
        "elapsed_s": elapsed,
        "resume_p50_ms": statistics.median(waits) * 1000,
        "resume_max_ms": max(waits) * 1000,
    }


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ports = {name: free_port() for name in NAMES}
        proxies: dict[str, ProxyProcess] = {
            name: instance(base, name, ports[name]) for name in NAMES
        }
        print(
            f"{args.sessions} sessions x {args.calls} echo calls, {args.resumes} resumes;"
            f" {os.cpu_count()} CPUs"
        )
        header = f"{'setup':<16}{'calls/s':>10}{'resume p50':>12}{'max':>9}   CPU s per process"
        print(header)
        try:
            for name in NAMES:
                proxies[name].start()
            await measure(proxies["a"].url, args.sessions, 5, 1)  # warm-up, not shown
            setups: list[tuple[str, tuple[str, ...]]] = [("direct (a)", ())]
            setups += [(f"haproxy + {n}", NAMES[:n]) for n in (1, 2, 3)]
            for label, names in setups:
                balancer = None
                url = proxies["a"].url
                if names:
                    where = base / label.replace(" ", "_")
                    where.mkdir()
                    balancer = Balancer("haproxy", where, ports, names).start()
                    url = balancer.url
                pids = {n: proxies[n].proc.pid for n in (names or ("a",))}  # type: ignore[union-attr]
                if balancer is not None and balancer.proc is not None:
                    pids["haproxy"] = balancer.proc.pid
                for n in names or ("a",):  # each instance's upstream child (shared mode)
                    for i, child in enumerate(proxies[n].upstream_pids()):
                        if pid_alive(child):
                            pids[f"{n}/up{i}"] = child
                pids["client"] = os.getpid()  # this load generator: one loop, one core at most
                before = {n: cpu_s(p) for n, p in pids.items()}
                row = await measure(url, args.sessions, args.calls, args.resumes)
                used = {n: cpu_s(p) - before[n] for n, p in pids.items()}
                cpu = "  ".join(f"{n} {s:.2f}" for n, s in used.items())
                print(
                    f"{label:<16}{row['calls_per_s']:>10.0f}{row['resume_p50_ms']:>10.2f}ms"
                    f"{row['resume_max_ms']:>7.1f}ms   {cpu}  (wall {row['elapsed_s']:.2f} s)"
                )
                if balancer is not None:
                    balancer.stop()
        finally:
            for proxy in proxies.values():
                proxy.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--resumes", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
