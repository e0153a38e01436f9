"""Reload in place (SIGHUP): the program is replaced, the MCP servers keep running.

Real daemon processes, real stdio children, real clients; each reload is a real ``execve``
of ``python -m mcproxy`` (same pid) that adopts the listening socket and the children.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    MS,
    HttpClient,
    ProxyProcess,
    WsClient,
    messages,
    pid_alive,
    read_sse,
    tool_text,
    wait_until,
)


def reload(proxy: ProxyProcess, expect: str = "reload.done") -> dict[str, Any]:
    """SIGHUP the daemon and wait for the log line that ends the reload (``reload.done`` of
    the next program, or ``reload.rejected``)."""
    assert proxy.proc is not None
    before = len(proxy.events(expect))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(proxy.events(expect)) > before)
    return proxy.events(expect)[-1]


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as file:
            found |= {int(p) for p in file.read().split()}
    return found


def bumped(counter_dir: Path, name: str) -> int:
    path = counter_dir / name
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_unsafe_call_in_flight_completes_once_across_a_reload(
    proxy: ProxyProcess, counter_dir: Path
) -> None:
    """A 5-second non-idempotent call spans a reload: its answer is delivered (WebSocket and
    Streamable HTTP), and the fixture's own log shows it ran exactly once."""
    ws = await WsClient.connect(proxy.url)
    session_id = (await ws.initialize())["result"]["mcpSessionId"]
    call = await ws.call_tool("bump", {"name": "ws", "delay": 5000 * MS})
    http = HttpClient(proxy.url)
    await http.initialize()
    post = asyncio.ensure_future(
        http.post(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "bump", "arguments": {"name": "http", "delay": 5000 * MS}},
            }
        )
    )
    await asyncio.sleep(500 * MS)  # both calls reached the child
    pids = set(proxy.upstream_pids())
    daemon_pid = proxy.proc.pid if proxy.proc else 0
    cursor = max(ws.lsns())
    done = await asyncio.to_thread(reload, proxy)
    assert done["adopted_upstreams"] == 2
    assert proxy.proc is not None and proxy.proc.pid == daemon_pid  # same process: exec
    assert all(pid_alive(p) for p in pids)
    assert set(proxy.upstream_pids()) == pids  # nothing spawned anew
    # The WebSocket was closed 1012; the client resumes with its cursor.
    with pytest.raises(ConnectionError):
        await ws.recv()
    await ws.close()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        answer = await back.response(call)
        assert tool_text(answer) == "1"
        assert bumped(counter_dir, "ws") == 1
    finally:
        await back.close()
    # The HTTP client's POST stream ended; it resumes the stream with Last-Event-ID.
    resp = await post
    events = await read_sse(resp)
    assert not any("result" in m for m in messages(events))
    last = [e.id for e in events if e.id][-1]
    resumed = await http.http.get(http.url, headers=http.headers(**{"Last-Event-ID": last}))
    got = [m for m in messages(await read_sse(resumed)) if m.get("id") == 7]
    assert tool_text(got[0]) == "1"
    assert bumped(counter_dir, "http") == 1
    await http.close()
