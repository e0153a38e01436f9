"""Store benchmarks: event-log throughput with group commit, and memory per session.

1. throughput: K producer coroutines (one session each) append M messages of ~300 bytes of
   JSON the way the session driver does (submit, await the commit, then "send"), with
   durability normal and full: msgs/s, commits, mean batch, p50/p99 append->commit. The
   baseline, same run: stdlib sqlite3 in WAL mode, one autocommit INSERT per message, with
   synchronous=NORMAL and =FULL (time-capped; the line says so).
2. memory: N stored sessions (initialize request/result, three logged responses and their
   request rows), loaded by a fresh process as idle runners of a Hub built like the daemon's,
   then parked. tracemalloc bytes per session after gc.collect() (SQLite's own page cache is
   not Python memory and is not counted), and the allocation sites that dominate.

    python benchmarks/bench_store.py [--messages 300] [--producers 64] [--sessions 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sqlite3
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench_ws import pct

from mcproxy import log as mcproxy_log
from mcproxy.config import Config
from mcproxy.core import jsonrpc
from mcproxy.core.ids import mint_session_id
from mcproxy.core.session import SessionRecord
from mcproxy.engine.hub import Hub
from mcproxy.engine.store import Store
from mcproxy.errors import UpstreamError
from mcproxy.metrics import Metrics
from mcproxy.upstreams.base import Upstream, UpstreamHandler

ROOT = Path(__file__).resolve().parent.parent
BASELINE_BUDGET_S = 10.0
EVENTS = (
    "CREATE TABLE events (session_id TEXT NOT NULL, lsn INTEGER NOT NULL, created_at REAL"
    " NOT NULL, payload BLOB NOT NULL, stream INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (session_id, lsn)) WITHOUT ROWID"
)
INSERT = "INSERT INTO events (session_id, lsn, created_at, payload, stream) VALUES (?,?,?,?,?)"
INIT_REQUEST = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "clientInfo": {"name": "claude-code", "version": "2.1.3"},
    "capabilities": {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {}}},
}).encode()  # fmt: skip
INIT_RESULT = json.dumps({
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {"listChanged": True}, "logging": {}, "completions": {},
                     "resources": {"subscribe": True, "listChanged": True}},
    "serverInfo": {"name": "example-files-server", "version": "1.4.0"},
    "instructions": "Read, search and edit files in the workspace. " * 12,
}).encode()  # fmt: skip


def payload(n: int) -> bytes:
    """A tools/call result of ~300 bytes, as the upstream would send it."""
    text = f"result {n}: " + "lorem ipsum dolor sit amet " * 6
    body = {"jsonrpc": "2.0", "id": n, "result": {"content": [{"type": "text", "text": text}],
            "isError": False, "_meta": {"io.mcproxy/lsn": n}}}  # fmt: skip
    return json.dumps(body).encode()


def row(name: str, lat_s: list[float], wall: float, commits: int, note: str = "") -> float:
    ms = sorted(s * 1000 for s in lat_s)
    rate = len(ms) / wall
    print(f"  {name:<30} {rate:9.0f} msgs/s  commits {commits:6d}  batch "
          f"{len(ms) / commits:6.1f}  p50 {pct(ms, 50):7.3f} ms  p99 {pct(ms, 99):7.3f} ms  "
          f"n={len(ms)}{note}")  # fmt: skip
    return rate


async def store_run(path: Path, durability: str, producers: int, messages: int) -> float:
    store = await Store.open(path, durability)
    bodies = [payload(n) for n in range(1, messages + 1)]
    lat: list[float] = []

    async def producer(session_id: str) -> None:
        for lsn, body in enumerate(bodies, 1):
            t0 = time.perf_counter()
            await store.append(session_id, lsn, body)
            lat.append(time.perf_counter() - t0)  # ... and here the driver writes the socket

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(f"session-{k:04d}") for k in range(producers)))
    wall = time.perf_counter() - t0
    commits = store.commits
    await store.aclose()
    return row(f"Store durability={durability}", lat, wall, commits)


def sqlite_run(path: Path, sync: str, producers: int, messages: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit: a transaction per INSERT
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(EVENTS)
    bodies = [payload(n) for n in range(1, messages + 1)]
    lat: list[float] = []
    total = producers * messages
    start = time.perf_counter()
    for i in range(total):
        lsn, k = divmod(i, producers)
        t0 = time.perf_counter()
        conn.execute(INSERT, (f"session-{k:04d}", lsn + 1, time.time(), bodies[lsn], 0))
        lat.append(time.perf_counter() - t0)
        if t0 - start > BASELINE_BUDGET_S:
            break
    wall = time.perf_counter() - start
    conn.close()
    note = f" (time-capped at {BASELINE_BUDGET_S:.0f} s of {total})" if len(lat) < total else ""
    return row(f"sqlite3 autocommit sync={sync}", lat, wall, len(lat), note)


async def populate(db: Path, sessions: int) -> None:
    store = await Store.open(db)
    responses = [(0, "initialize", INIT_RESULT), (1, "tools/list", payload(1) * 4),
                 (2, "tools/call", payload(2))]  # fmt: skip
    record = SessionRecord(INIT_REQUEST, INIT_RESULT, True, safe_tools=["read_file", "search"],
                           next_upstream_id=4, next_lsn=4, delivered_lsn=3)  # fmt: skip
    for _ in range(sessions):
        sid = mint_session_id()
        store.save_session(sid, record)
        for client_id, method, body in responses:
            key, lsn = jsonrpc.id_key(client_id), client_id + 1
            store.save_request(sid, key, lsn, method, True, b"{}", lsn)
            store.append(sid, lsn, body, lsn, (key, method))  # an answer, as the core logs it
            store.finish_request(sid, key, lsn)
        await asyncio.sleep(0)  # let the group commit run
    await store.barrier()
    await store.aclose()


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def short(filename: str) -> str:
    for prefix in (sysconfig.get_path("purelib"), str(ROOT), sysconfig.get_path("stdlib")):
        if filename.startswith(prefix):
            return filename[len(prefix) + 1 :]
    return filename


async def memory(db: Path) -> None:
    """Runs in a fresh process: load every stored session as an idle runner, then park all."""
    mcproxy_log.configure("console", "warning")
    tracemalloc.start(1)
    config = Config()
    store = await Store.open(db, config.store.durability, config.store.max_batch)
    spawned: list[str] = []

    def factory(session_id: str, handler: UpstreamHandler) -> Upstream:
        spawned.append(session_id)
        raise UpstreamError("bench_store: nobody attached, nothing may spawn")

    hub = Hub(store, config, factory, Metrics())
    ids = [sid for sid, _ in await store.expired_sessions(time.time() + 1)]  # every one
    warm, ids = ids[0], ids[1:]  # first load and park: caches, statements, metric children
    await hub.get(warm)
    await hub.park(warm)
    base = tracemalloc.take_snapshot()
    before = traced()
    for sid in ids:
        assert await hub.get(sid) is not None
    await asyncio.sleep(0.1)  # anything a load scheduled gets to run
    loaded = traced()
    top = tracemalloc.take_snapshot().compare_to(base, "lineno")[:6]
    for sid in ids:
        await hub.park(sid)
    parked = traced()
    n = len(ids)
    print(f"  idle runner in memory (hub.get)  {(loaded - before) / n:9.0f} B/session  n={n}")
    for stat in top:
        print(f"      {stat.size_diff / n:7.0f} B  {stat.count_diff / n:5.1f} blocks  "
              f"{short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}")  # fmt: skip
    print(f"  parked (hub.park)                {(parked - before) / n:9.0f} B/session  "
          f"runners left {len(hub.runners)}")  # fmt: skip
    print(f"  upstream spawns (must be 0)      {len(spawned):9d}")
    await store.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300, help="per producer")
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--memory-of", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory_of is not None:
        return await memory(args.memory_of)
    print(f"mcproxy store benchmarks on {platform.node()} ({os.cpu_count()} cpus, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        k, m = args.producers, args.messages
        print(f"event log: {k} producers x {m} messages of {len(payload(m))} bytes, in {tmp}")
        normal = await store_run(Path(tmp) / "normal.db", "normal", k, m)
        full = await store_run(Path(tmp) / "full.db", "full", k, m)
        naive_normal = sqlite_run(Path(tmp) / "naive-normal.db", "NORMAL", k, m)
        naive_full = sqlite_run(Path(tmp) / "naive-full.db", "FULL", k, m)
        print(f"  group commit vs a transaction per message: normal "
              f"{normal / naive_normal:.1f}x, full {full / naive_full:.1f}x")  # fmt: skip
        print(f"memory per session: {args.sessions} stored sessions, measured in a fresh process")
        db = Path(tmp) / "sessions.db"
        await populate(db, args.sessions + 1)  # +1: warm-up session
        sys.stdout.flush()
        child = [sys.executable, __file__, "--memory-of", str(db)]
        proc = await asyncio.create_subprocess_exec(*child)
        if await proc.wait():
            raise SystemExit(f"the memory measurement failed: exit status {proc.returncode}")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
