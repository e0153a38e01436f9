"""CPU per call of each front, measured so that a loaded machine does not skew it.

Starts mcproxy in front of the bundled demo server and runs, in alternating rounds on the
same daemon, N sequential ``tools/call echo`` over Streamable HTTP (POST, the SSE answer read
to its end) and over WebSocket (one connection). For each front it prints, per call:

- the CPU time of the mcproxy process alone and with its upstream child, summed over their
  threads from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, on-CPU time only: time spent
  waiting for a busy core is not counted, so other load changes it little);
- with ``--callgrind``, the instructions executed (the daemon and its child run under
  ``valgrind --tool=callgrind``; counters are zeroed before and dumped after each round):
  exact and repeatable whatever the load, and the dumps (``--keep DIR``) give the native
  profile for ``callgrind_annotate``. Under valgrind everything runs ~50 times slower, so use a
  few hundred calls.

Rounds alternate the fronts (HTTP, WS, WS, HTTP, ...) so both see the same conditions; the
median over rounds is printed.

    python benchmarks/profile_front.py [--calls 2000] [--rounds 5] [--mode per-session|shared]
    python benchmarks/profile_front.py --callgrind --calls 200 --rounds 1 [--keep /tmp/cg]
    python benchmarks/profile_front.py --short-sessions 100   # idle children: close vs end
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_ws import DEMO, INIT, ROOT, _listening_port, echo_call

VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


# --- measuring -------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every live thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


class Callgrind:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dumps = 0

    def prefix(self) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={self.folder}/cg.%p",
            "--dump-instr=no",
        ]

    def zero(self, pids: list[int]) -> None:
        for pid in pids:
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)

    def dump(self, pids: list[int], label: str) -> dict[int, int]:
        """Dump each pid's counters since the last zero; their instruction counts."""
        self.dumps += 1
        counts = {}
        for pid in pids:
            before = set(self.folder.glob(f"cg.{pid}.*"))
            subprocess.run(
                ["callgrind_control", "-d", f"{label}", str(pid)], check=True, capture_output=True
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                new = set(self.folder.glob(f"cg.{pid}.*")) - before
                if new:
                    path = max(new, key=lambda p: int(p.name.rsplit(".", 1)[1]))
                    total = _totals(path)
                    if total is not None:
                        counts[pid] = total
                        break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"no callgrind dump from {pid}")
        return counts


def _totals(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    return None


def _spy(folder: Path | None, pid: int, front: str) -> subprocess.Popen[bytes] | None:
    """A sampling profile (py-spy, native frames too) of the daemon during one round."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        ["py-spy", "record", "--native", "--rate", "1000", "--format", "raw", "--pid", str(pid),
         "--output", str(folder / f"{front}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)  # it has attached
    return spy


def _strace(folder: Path | None, pid: int, front: str) -> subprocess.Popen[bytes] | None:
    """Count the daemon's system calls (every thread) during one round."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    trace = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(folder / f"{front}.strace")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)  # it has attached
    return trace


def _syscalls(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.rstrip().endswith(" total"):
            fields = line.split()
            return int(fields[3] if len(fields) > 5 else fields[2])
    return 0


# --- the daemon --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, folder: Path, mode: str, prefix: list[str]) -> None:
        config = folder / "mcproxy.toml"
        config.write_text(
            f'[upstream]\nmode = "{mode}"\npool_size = 1\n'
            # the driver is one address making many calls quickly
            "[limits]\nmessages_per_s = 1000000.0\nconnections_per_s = 1000000.0\n"
        )
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "mcproxy", "--config", str(config),
             "--listen", "127.0.0.1:0", "--db", str(folder / "db.sqlite"),
             "--upstream", f"stdio:{DEMO}", "--log-format", "json", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            if self.proc.poll() is not None:
                raise RuntimeError("mcproxy exited")
            self.port = _listening_port(self.proc.pid)
            time.sleep(0.05)
        if not self.port:
            raise RuntimeError("mcproxy did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the clients -------------------------------------------------------------------------------


class HttpClient:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.headers = {"Accept": ACCEPT, "Content-Type": "application/json"}

    async def post(self, message: dict[str, Any]) -> dict[str, Any] | None:
        async with self.http.post(self.url, json=message, headers=self.headers) as resp:
            assert resp.status in (200, 202), resp.status
            if "Mcp-Session-Id" in resp.headers:
                self.headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
                self.headers["MCP-Protocol-Version"] = VERSION
            if resp.status == 202:
                return None
            if resp.content_type == "application/json":
                result: dict[str, Any] = await resp.json()
                return result
            answer = None
            async for line in resp.content:  # to the end of the stream
                if line.startswith(b"data: ") and len(line) > 8:
                    answer = json.loads(line[6:])
            return answer

    async def open(self) -> None:
        await self.post(INIT)
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def call(self, i: int) -> None:
        answer = await self.post(echo_call(i))
        assert answer is not None and answer.get("id") == i and "result" in answer, answer


class WsClient:
    """One WebSocket; a reader task answers pings while the other front runs."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> None:
        self.ws = await self.http.ws_connect(self.url, protocols=["mcp"], max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())
        await self.rpc(INIT)
        await self.ws.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _read(self) -> None:
        async for frame in self.ws:
            answer = json.loads(frame.data)
            waiter = self.waiting.pop(answer.get("id"), None)
            if waiter is not None:
                waiter.set_result(answer)
        for waiter in self.waiting.values():
            waiter.set_exception(ConnectionError(f"closed {self.ws.close_code}"))

    async def rpc(self, message: dict[str, Any]) -> dict[str, Any]:
        waiter = self.waiting[message["id"]] = asyncio.get_running_loop().create_future()
        await self.ws.send_json(message)
        return await waiter

    async def call(self, i: int) -> None:
        answer = await self.rpc(echo_call(i))
        assert "result" in answer, answer


# --- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, folder: Path) -> None:
    grind = Callgrind(folder) if args.callgrind else None
    daemon = Daemon(folder, args.mode, grind.prefix() if grind else [])
    url = f"http://127.0.0.1:{daemon.port}/mcp"
    results: dict[str, dict[str, list[float]]] = {}
    try:
        async with aiohttp.ClientSession() as http:
            clients = {"http": HttpClient(http, url), "ws": WsClient(http, url)}
            for client in clients.values():
                await client.open()
            await asyncio.sleep(0.5 if grind is None else 5)  # the upstream child has started
            kids = children(daemon.proc.pid)
            if len(kids) != 1 and args.mode == "shared":
                print(f"  (the daemon has {len(kids)} children: {kids})")
            pids = [daemon.proc.pid, *kids]
            n = 0
            for r in range(args.rounds):
                order = ["http", "ws"] if r % 2 == 0 else ["ws", "http"]
                for front in order:
                    client = clients[front]
                    for _ in range(args.warmup):
                        n += 1
                        await client.call(n)
                    # Children now: per-session mode spawned one per session.
                    kids = children(daemon.proc.pid)
                    pids = [daemon.proc.pid, *kids]
                    if grind is not None:
                        grind.zero(pids)
                    spy = _spy(args.pyspy, daemon.proc.pid, front) if r == 0 else None
                    trace = _strace(args.strace, daemon.proc.pid, front) if r == 0 else None
                    start = {pid: cpu_ns(pid) for pid in pids}
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        n += 1
                        await client.call(n)
                    wall = time.perf_counter() - t0
                    used = {pid: cpu_ns(pid) - start[pid] for pid in pids}
                    row = results.setdefault(front, {})
                    for tool in (spy, trace):
                        if tool is not None:
                            tool.send_signal(signal.SIGINT)
                            tool.wait(60)
                    if trace is not None:
                        row.setdefault("syscalls", []).append(
                            _syscalls(args.strace / f"{front}.strace") / args.calls
                        )
                    own = used[daemon.proc.pid]
                    # Only the child serving this front's session (per-session mode has one
                    # each; they are idle while the other front runs, so the busiest is it).
                    child = max((used[k] for k in kids), default=0)
                    row.setdefault("wall_us", []).append(wall / args.calls * 1e6)
                    row.setdefault("cpu_proxy_us", []).append(own / args.calls / 1e3)
                    row.setdefault("cpu_tree_us", []).append((own + child) / args.calls / 1e3)
                    if grind is not None:
                        ir = grind.dump(pids, f"{front}-{r}")
                        child_ir = max((ir[k] for k in kids), default=0)
                        row.setdefault("ir_proxy", []).append(ir[daemon.proc.pid] / args.calls)
                        row.setdefault("ir_tree", []).append(
                            (ir[daemon.proc.pid] + child_ir) / args.calls
                        )
    finally:
        daemon.stop()
    print(
        f"mcproxy {args.mode}, demo upstream, {args.calls} sequential echo calls x "
        f"{args.rounds} rounds per front{' under callgrind' if grind else ''} (medians):"
    )
    for front, row in results.items():
        line = f"  {front:<5}"
        if grind is not None:
            line += (
                f" instr/call proxy {statistics.median(row['ir_proxy']):>10,.0f}"
                f"  +child {statistics.median(row['ir_tree']):>10,.0f} |"
            )
        line += (
            f" CPU us/call proxy {statistics.median(row['cpu_proxy_us']):7.1f}"
            f"  +child {statistics.median(row['cpu_tree_us']):7.1f}"
            f" | wall us/call {statistics.median(row['wall_us']):8.1f}"
        )
        if "syscalls" in row:
            line += f" | syscalls/call {statistics.median(row['syscalls']):5.1f}"
        print(line)
    if "http" in results and "ws" in results:
        key = "ir_proxy" if grind is not None else "cpu_proxy_us"
        ratio = statistics.median(results["http"][key]) / statistics.median(results["ws"][key])
        print(f"  http/ws ({'instructions' if grind else 'CPU'}, proxy alone): {ratio:.2f}x")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def short_sessions(args: argparse.Namespace, folder: Path) -> None:
    """Many short WebSocket sessions (one call each), left with close() or ended with end():
    the upstream children still alive afterwards, their memory, and the proxy's CPU."""
    from mcproxy.client.mcp import MCPClient

    print(f"{args.short_sessions} short sessions (per-session mode), one echo call each:")
    for how in ("close", "end"):
        sub = folder / how
        sub.mkdir()
        daemon = Daemon(sub, "per-session", [])
        url = f"ws://127.0.0.1:{daemon.port}/mcp"
        try:
            start = cpu_ns(daemon.proc.pid)
            t0 = time.perf_counter()
            for i in range(args.short_sessions):
                client = MCPClient(url)
                await client.connect()
                await client.call_tool("echo", {"text": f"short {i}"})
                await (client.end() if how == "end" else client.close())
            wall = time.perf_counter() - t0
            await asyncio.sleep(1.0)  # ended sessions' children are gone by now
            used = cpu_ns(daemon.proc.pid) - start
            kids = children(daemon.proc.pid)
            rss = sum(rss_kb(k) for k in kids)
            print(
                f"  {how + '()':<8} children alive {len(kids):4d} ({rss / 1024:7.1f} MiB RSS)"
                f" | proxy CPU/session {used / args.short_sessions / 1e3:8.1f} us"
                f" | wall/session {wall / args.short_sessions * 1e3:7.1f} ms"
            )
        finally:
            daemon.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--mode", choices=["per-session", "shared"], default="per-session")
    p.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    p.add_argument("--pyspy", type=Path, help="py-spy profiles of the first round here")
    p.add_argument("--strace", type=Path, help="count system calls in the first round here")
    p.add_argument(
        "--short-sessions", type=int, default=0, help="only: N short sessions, close vs end"
    )
    p.add_argument("--keep", type=Path, help="keep the callgrind dumps in this folder")
    args = p.parse_args()
    if args.callgrind and shutil.which("valgrind") is None:
        sys.exit("--callgrind needs valgrind (Debian: apt-get install valgrind)")
    if args.short_sessions:
        with tempfile.TemporaryDirectory(prefix="mcproxy-profile-") as tmp:
            asyncio.run(short_sessions(args, Path(tmp)))
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        asyncio.run(run(args, args.keep))
        return
    with tempfile.TemporaryDirectory(prefix="mcproxy-profile-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
