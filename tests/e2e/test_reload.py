"""Reload in place (SIGHUP): the program is replaced, the MCP servers keep running.

Real daemon processes, real stdio children, real clients; each reload is a real ``execve``
of ``python -m mcproxy`` (same pid) that adopts the listening socket and the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mcproxy.client.connection import ReconnectOptions
from mcproxy.client.mcp import MCPClient
from tests.e2e.test_http_upstream import HttpFixture
from tests.e2e.test_shared_upstream import PROGRESS, next_progress, shared_proxy
from tests.helpers import (
    MS,
    ROOT,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    children_of,
    eventually,
    lsn_of,
    messages,
    pid_alive,
    read_sse,
    rss,
    scrape,
    tool_text,
    value,
    wait_until,
)

FAST = ReconnectOptions(min_reconnection_delay_s=0.05, max_reconnection_delay_s=0.5)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def reload(proxy: ProxyProcess, expect: str = "reload.done") -> dict[str, Any]:
    """SIGHUP the daemon and wait for the log line that ends the reload (``reload.done`` of
    the next program, or ``reload.rejected``)."""
    assert proxy.proc is not None
    before = len(proxy.events(expect))
    proxy.proc.send_signal(signal.SIGHUP)
    try:  # validating the program on disk and starting it: two interpreters' start-up
        wait_until(lambda: len(proxy.events(expect)) > before, 3 * TIMEOUT)
    except AssertionError:
        for e in proxy.logs[-40:]:
            print(str(e)[:600])
        raise
    return proxy.events(expect)[-1]


async def until_closed(client: WsClient) -> int | None:
    """Receive (keeping what arrives) until the server closes; its close code."""
    while True:
        frame = await client.ws.receive(timeout=TIMEOUT)
        if frame.type is not aiohttp.WSMsgType.TEXT:
            return client.ws.close_code
        client.received.append(json.loads(frame.data))


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
    call = await ws.call_tool("bump", {"name": "ws", "delay": 5000 * MS}, progress_token="w")
    http = HttpClient(proxy.url)
    await http.initialize()
    post = asyncio.ensure_future(
        http.post(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {
                    "name": "bump",
                    "arguments": {"name": "http", "delay": 5000 * MS},
                    "_meta": {"progressToken": "h"},
                },
            }
        )
    )
    # Both calls are running in the child: each reported "started" (its progress).
    await next_progress(ws, "w")
    resp = await post
    started = await read_sse(resp, lambda e: '"notifications/progress"' in e.data)
    pids = set(proxy.upstream_pids())
    daemon_pid = proxy.proc.pid if proxy.proc else 0
    cursor = max(ws.lsns())
    closed = asyncio.ensure_future(until_closed(ws))  # a client reads: it answers the close
    done = await asyncio.to_thread(reload, proxy)
    assert done["adopted_upstreams"] == 2
    assert proxy.proc is not None and proxy.proc.pid == daemon_pid  # same process: exec
    assert all(pid_alive(p) for p in pids)
    assert set(proxy.upstream_pids()) == pids  # nothing spawned anew
    # The WebSocket was closed 1012; the client resumes with its cursor.
    assert await closed == 1012
    await ws.close()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        answer = await back.response(call)
        assert tool_text(answer) == "1"
        assert bumped(counter_dir, "ws") == 1
    finally:
        await back.close()
    # The HTTP client's POST stream ended; it resumes the stream with Last-Event-ID.
    events = started + await read_sse(resp)
    assert not any("result" in m for m in messages(events))
    last = [e.id for e in events if e.id][-1]
    resumed = await http.http.get(http.url, headers=http.headers(**{"Last-Event-ID": last}))
    got = [m for m in messages(await read_sse(resumed)) if m.get("id") == 7]
    assert tool_text(got[0]) == "1"
    assert bumped(counter_dir, "http") == 1
    await http.close()


async def test_stateful_server_keeps_its_state(proxy: ProxyProcess) -> None:
    """An in-memory counter in the child goes on counting across reloads: same process."""
    ws = await WsClient.connect(proxy.url)
    session_id = (await ws.initialize())["result"]["mcpSessionId"]
    assert tool_text(await ws.response(await ws.call_tool("count", {}))) == "1"
    assert tool_text(await ws.response(await ws.call_tool("count", {}))) == "2"
    child = tool_text(await ws.response(await ws.call_tool("pid", {})))
    cursor = max(ws.lsns())
    await ws.close()
    for _ in range(2):
        await asyncio.to_thread(reload, proxy)
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        assert tool_text(await back.response(await back.call_tool("count", {}))) == "3"
        assert tool_text(await back.response(await back.call_tool("pid", {}))) == child
        assert len(proxy.upstream_pids()) == 1
    finally:
        await back.close()


async def test_broken_config_is_rejected_and_the_old_daemon_serves_on(
    tmp_path: Path, counter_dir: Path
) -> None:
    config = tmp_path / "mcproxy.toml"
    config.write_text('[store]\ndurability = "normal"\n')
    proxy = ProxyProcess(
        tmp_path / "db.sqlite",
        None,
        "--config",
        str(config),
        env={"FIXTURE_COUNTER_DIR": str(counter_dir)},
    ).start()
    try:
        ws = await WsClient.connect(proxy.url)
        await ws.initialize()
        assert tool_text(await ws.response(await ws.call_tool("count", {}))) == "1"
        config.write_text('[store]\ndurability = "sometimes"\n')
        rejected = await asyncio.to_thread(reload, proxy, "reload.rejected")
        assert "durability" in rejected["reason"]
        assert not proxy.events("reload.exec")
        assert value(await scrape(proxy), "mcproxy_errors_total", code="reload_rejected") == 1
        # The same program, the same connection, the same child: nothing was touched.
        assert tool_text(await ws.response(await ws.call_tool("count", {}))) == "2"
        await ws.close()
        # Fixed, the next reload goes through.
        config.write_text('[store]\ndurability = "normal"\n')
        await asyncio.to_thread(reload, proxy)
    finally:
        proxy.kill()


async def test_no_connection_refused_during_reloads(proxy: ProxyProcess) -> None:
    """A client connecting in a loop all through three reloads is never refused: the
    listening socket stays open across exec, connections wait in its backlog."""
    refused: list[str] = []
    answered = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as s:
                    s.sendall(
                        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                    )
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
                if reply.startswith(b"HTTP/1.1 200"):
                    answered += 1
            except ConnectionRefusedError as exc:
                refused.append(repr(exc))
            except OSError:
                pass  # reset by a program that was quiescing: an ordinary drop, not a refusal

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for _ in range(3):
            await asyncio.to_thread(reload, proxy)
            before = answered
            await eventually(lambda b=before: answered > b)
    finally:
        stop.set()
        thread.join()
    assert refused == []


async def test_upgrade_serves_the_same_sessions_with_the_new_code(
    tmp_path: Path, counter_dir: Path
) -> None:
    """The code on disk changes (here a copy of the package, its version string edited),
    the reload runs it: the new version serves the sessions and children of the old."""
    install = tmp_path / "install"
    shutil.copytree(ROOT / "mcproxy", install / "mcproxy")
    proxy = ProxyProcess(
        tmp_path / "db.sqlite",
        env={"FIXTURE_COUNTER_DIR": str(counter_dir)},
        cwd=install,
    ).start()
    try:
        old = proxy.events("daemon.listening")[-1]["version"]
        ws = await WsClient.connect(proxy.url)
        session_id = (await ws.initialize())["result"]["mcpSessionId"]
        assert tool_text(await ws.response(await ws.call_tool("count", {}))) == "1"
        cursor = max(ws.lsns())
        await ws.close()
        version_file = install / "mcproxy" / "__init__.py"
        text = version_file.read_text()
        assert f'"{old}"' in text
        version_file.write_text(text.replace(f'"{old}"', '"99.0-upgraded"'))
        done = await asyncio.to_thread(reload, proxy)
        assert done["version"] == "99.0-upgraded"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{proxy.port}/healthz") as resp,
        ):
            health = await resp.json()
        assert proxy.proc is not None
        assert (health["version"], health["pid"], health["reloads"]) == (
            "99.0-upgraded",
            proxy.proc.pid,  # the same process, the new program
            1,
        )
        back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
        try:
            assert tool_text(await back.response(await back.call_tool("count", {}))) == "2"
        finally:
            await back.close()
    finally:
        proxy.kill()


async def test_http_upstream_session_is_kept_not_deleted(tmp_path: Path) -> None:
    """An HTTP upstream's session goes on across a reload: the same upstream session id is
    taken up by the next program, nothing DELETEs it, the server still has one session."""
    upstream = await HttpFixture(tmp_path).start()
    proxy = ProxyProcess(tmp_path / "db.sqlite", upstream.url).start()
    try:
        ws = await WsClient.connect(proxy.url)
        session_id = (await ws.initialize())["result"]["mcpSessionId"]
        assert tool_text(await ws.response(await ws.call_tool("echo", {"text": "a"}))) == "a"
        [before] = proxy.events("upstream.session")
        cursor = max(ws.lsns())
        await ws.close()
        done = await asyncio.to_thread(reload, proxy)
        assert done["adopted_upstreams"] == 1
        [taken] = proxy.events("upstream.session_taken_up")
        assert taken["upstream_session"] == before["upstream_session"]
        back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
        try:
            echo = await back.response(await back.call_tool("echo", {"text": "b"}))
            assert tool_text(echo) == "b"
            live = await back.response(await back.call_tool("live_sessions", {}))
            assert tool_text(live) == "1"
        finally:
            await back.close()
        assert not proxy.events("upstream.session_ended")  # no DELETE
        assert not proxy.events("upstream.stale_session_ended")
        assert len(proxy.events("upstream.session")) == 1  # no new initialize
    finally:
        proxy.kill()
        upstream.kill()


def descriptors(pid: int) -> dict[str, int]:
    """The process's open descriptors by kind (pipe, socket, file, other)."""
    kinds = {"pipe": 0, "socket": 0, "file": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kind = target.split(":")[0] if ":[" in target else "file" if "/" in target else "other"
        kinds[kind if kind in kinds else "other"] += 1
    return kinds


async def http_call(
    http: HttpClient,
    rid: int,
    name: str,
    arguments: dict[str, Any],
    trail: list[str] | None = None,
) -> Any:
    """A tools/call over Streamable HTTP that survives drops: POSTed again under the same id
    (the proxy answers a retry with the logged or the live answer, never a second run).
    ``trail`` gets one line per step of each attempt, so a call that stops progressing says
    where it waits (connecting, for the head, or inside the stream after which event)."""

    def note(step: str) -> None:
        if trail is not None:
            trail.append(f"{time.monotonic():.3f} id={rid} {step}")
            del trail[:-40]

    message = {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    while True:
        note("POST")
        try:
            answer = await _attempt(http, message, rid, note)
            if answer is not None:
                return answer
        except (aiohttp.ClientError, ValueError) as exc:
            note(f"dropped: {exc!r}"[:200])  # the program was quiescing or exec'ing
        await asyncio.sleep(20 * MS)


async def _attempt(
    http: HttpClient, message: dict[str, Any], rid: int, note: Callable[[str], None]
) -> Any:
    """One POST of ``http_call``: the call's result, or None when the stream ended without
    its answer."""
    async with await http.post(message) as resp:
        note(f"status {resp.status} {resp.content_type}")
        if resp.content_type == "application/json":  # a retry of an answered call
            got = [await resp.json()]
        elif resp.status == 200:
            got = messages(await read_sse(resp, lambda e: note(f"event {e.id} {e.data[:60]!r}")))
        else:
            got = []
        note(f"ended with {len(got)} messages")
        for m in got:
            if m.get("id") == rid and "method" not in m:
                assert "result" in m, m  # an error answer: the call's outcome was lost
                return m["result"]["structuredContent"]["result"]
    return None


def sockets_of(pid: int, port: int) -> str:
    """What a stalled client waits on: the TCP sockets of ``port`` (both ends, with their
    queues and owners) and the daemon's descriptors with their open flags (02000000 is
    O_CLOEXEC: a client socket without it would outlive an exec unserved)."""
    ss = subprocess.run(
        ["ss", "-tanpo", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    lines = [ss]
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            flags = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().split()[3]
            lines.append(f"fd {fd.name} -> {os.readlink(fd)} flags {flags}")
    return "\n".join(lines)


async def test_fifty_reloads_under_traffic_lose_duplicate_and_leak_nothing(
    proxy: ProxyProcess, counter_dir: Path
) -> None:
    """Both fronts call non-idempotent tools without pause while the daemon reloads 50
    times: every call is answered once and ran once (the in-memory counter of the WebSocket
    session's child counts 1, 2, 3... without a gap or a repeat; the HTTP session's tool
    appends one line per run), and the daemon holds as many descriptors, children and about
    as much memory after as before."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    http = HttpClient(proxy.url)
    await http.initialize()
    counted: list[int] = []
    bumps: list[int] = []
    trail: list[str] = []
    stop = asyncio.Event()
    async with MCPClient(f"ws://127.0.0.1:{proxy.port}/mcp", options=FAST) as mcp:

        async def ws_traffic() -> None:
            while not stop.is_set():
                result = await mcp.call_tool("count", timeout_s=TIMEOUT)
                counted.append(result["structuredContent"]["result"])

        async def http_traffic() -> None:
            rid = 1000
            while not stop.is_set():
                rid += 1
                bumps.append(await http_call(http, rid, "bump", {"name": "soak"}, trail))

        async def flowing() -> None:
            n, m = len(counted), len(bumps)
            try:
                await eventually(
                    lambda: (len(counted) > n and len(bumps) > m) or any(t.done() for t in traffic)
                )
                for task in traffic:
                    if task.done():
                        task.result()  # a client that failed says why
                        raise AssertionError("traffic ended")
            except AssertionError:
                for e in proxy.logs[-60:]:
                    print(e)
                print("warnings and errors:")
                for e in proxy.logs:
                    if e.get("level") in ("warning", "error"):
                        print(e)
                print(n, m, len(counted), len(bumps))
                print(f"the HTTP client's last steps (now {time.monotonic():.3f}):")
                print("\n".join(trail))
                print(sockets_of(pid, proxy.port))
                raise

        traffic = [asyncio.ensure_future(ws_traffic()), asyncio.ensure_future(http_traffic())]
        await eventually(lambda: counted and bumps)
        await asyncio.to_thread(reload, proxy)  # the first reload's program is the baseline
        await flowing()
        fds, children, memory = descriptors(pid), children_of(pid), rss(pid)
        assert len(children) == 2
        for _ in range(50):
            await asyncio.to_thread(reload, proxy)
            # Traffic flows again on both fronts before the next reload.
            await flowing()
        stop.set()
        await asyncio.gather(*traffic)
    await http.close()
    assert counted == list(range(1, len(counted) + 1))
    assert bumps == list(range(1, len(bumps) + 1))
    assert bumped(counter_dir, "soak") == len(bumps)
    assert len(proxy.events("reload.done")) == 51 and proxy.proc.pid == pid
    after = descriptors(pid)
    # Pipes (the children's) and files (the database) exactly; sockets come and go with the
    # clients' connections, a leak would grow them by the reload.
    assert after["pipe"] == fds["pipe"] and after["file"] == fds["file"], (fds, after)
    assert after["socket"] <= fds["socket"] + 4, (fds, after)
    assert children_of(pid) == children  # the same two children, nothing spawned or left
    assert len(proxy.upstream_pids()) == 2
    assert rss(pid) < memory * 1.5, (memory, rss(pid))


async def test_systemd_sees_reloading_then_ready_and_the_watchdog_goes_on(tmp_path: Path) -> None:
    """sd_notify across a reload: RELOADING=1 and READY=1, each with MONOTONIC_USEC (systemd
    253+ Type=notify-reload), the watchdog fed on both sides of the exec, the same pid."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    receiver.bind(str(path))
    receiver.settimeout(100 * MS)
    got: list[str] = []
    done = threading.Event()

    def receive() -> None:  # at once: the kernel queues only a few datagrams
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                got.append(receiver.recv(4096).decode())

    reader = threading.Thread(target=receive)
    reader.start()
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
    proxy = ProxyProcess(tmp_path / "db.sqlite", env=env).start()
    try:

        async def until(fragment: str, after: int = 0) -> tuple[int, str]:
            await eventually(lambda: any(fragment in m for m in got[after:]))
            index = next(i for i, m in enumerate(got) if i >= after and fragment in m)
            return index, got[index]

        first, _ = await until("READY=1")
        await asyncio.to_thread(reload, proxy)
        at, reloading = await until("RELOADING=1", first + 1)
        at, ready = await until("READY=1", at + 1)
        assert "MONOTONIC_USEC=" in reloading and "MONOTONIC_USEC=" in ready
        stamps = [int(m.split("MONOTONIC_USEC=")[1].split()[0]) for m in (reloading, ready)]
        assert stamps[0] < stamps[1] <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await until("WATCHDOG=1", at + 1)  # the new program pings
        assert value(await scrape(proxy), "mcproxy_reloads_total") == 1
    finally:
        proxy.kill()
        done.set()
        reader.join()
        receiver.close()


async def test_shared_pool_children_are_kept_with_their_calls_in_flight(
    tmp_path: Path, counter_dir: Path
) -> None:
    """Shared mode, pool_size 2, one session on each child: an unsafe call in flight on each
    spans a reload. Both are answered once, each to its own session, and ran once (fixture
    log); the children are the same processes; an in-memory counter goes on; the progress of
    a call in flight still reaches its client under its own token."""
    proxy = shared_proxy(tmp_path, counter_dir, pool_size=2).start()
    try:
        a, b = await WsClient.connect(proxy.url), await WsClient.connect(proxy.url)
        session_a = (await a.initialize())["result"]["mcpSessionId"]
        session_b = (await b.initialize())["result"]["mcpSessionId"]
        assert tool_text(await a.response(await a.call_tool("count", {}))) == "1"
        pid_a = tool_text(await a.response(await a.call_tool("pid", {})))
        pid_b = tool_text(await b.response(await b.call_tool("pid", {})))
        assert pid_a != pid_b  # one session on each child
        assert tool_text(await a.response(await a.call_tool("bump", {"name": "a"}))) == "1"
        call_a = await a.call_tool("bump", {"name": "a", "delay": 4000 * MS}, progress_token="a")
        call_b = await b.call_tool("bump", {"name": "b", "delay": 3000 * MS}, progress_token="b")
        steps = 10
        slow = await b.call_tool("slow", {"steps": steps, "delay": 600 * MS}, progress_token="p")
        for client, token in ((a, "a"), (b, "b"), (b, "p")):  # every call is running
            await next_progress(client, token)
        pids = set(proxy.upstream_pids())
        assert {str(p) for p in pids} == {pid_a, pid_b}
        cursors = max(a.lsns()), max(b.lsns())
        closing = [asyncio.ensure_future(until_closed(c)) for c in (a, b)]
        done = await asyncio.to_thread(reload, proxy)
        assert done["adopted_pool_children"] == 2 and done["adopted_upstreams"] == 2
        assert [await c for c in closing] == [1012, 1012]
        assert not proxy.events("reload.shared_pool_not_kept")
        await a.close()
        await b.close()
        back_a = await WsClient.connect(proxy.url, session_a, last_lsn=cursors[0])
        back_b = await WsClient.connect(proxy.url, session_b, last_lsn=cursors[1])
        try:
            assert tool_text(await back_a.response(call_a)) == "2"
            assert tool_text(await back_b.response(call_b)) == "1"
            finished = await back_b.response(slow)
            assert tool_text(finished) == f"slow done after {steps}"
            assert bumped(counter_dir, "a") == 2 and bumped(counter_dir, "b") == 1
            # Each answer once, and only to its own session.
            for mine, theirs, ids in ((back_a, back_b, {call_a}), (back_b, back_a, {call_b, slow})):
                got = [m.get("id") for m in mine.received if "method" not in m]
                assert all(got.count(i) == 1 for i in ids)
                assert not ids & {m.get("id") for m in theirs.received}
            # The progress went on after the reload (its last step comes seconds after it),
            # under the client's own token; nothing twice.
            seen = [m for m in b.received if (lsn_of(m) or 0) <= cursors[1]]  # then resumed
            notes = [m["params"] for m in back_b.received if m.get("method") == PROGRESS]
            assert {n["progressToken"] for n in notes} <= {"b", "p"}  # the client's tokens
            progress = [
                m["params"]["progress"]
                for m in [*seen, *back_b.received]
                if m.get("method") == PROGRESS and m["params"]["progressToken"] == "p"
            ]
            assert progress[-1] == steps and len(set(progress)) == len(progress)
            assert not any(m.get("method") == PROGRESS for m in back_a.received)
            # Same processes, their state kept.
            assert tool_text(await back_a.response(await back_a.call_tool("count", {}))) == "2"
            assert tool_text(await back_a.response(await back_a.call_tool("pid", {}))) == pid_a
            assert tool_text(await back_b.response(await back_b.call_tool("pid", {}))) == pid_b
            assert set(proxy.upstream_pids()) == pids  # nothing spawned anew
            assert all(pid_alive(p) for p in pids)
            assert not [e for e in proxy.logs if e.get("level") == "error"]
        finally:
            await back_a.close()
            await back_b.close()
    finally:
        proxy.kill()


async def test_a_pool_the_next_program_cannot_take_up_takes_the_restart_path(
    tmp_path: Path, counter_dir: Path
) -> None:
    """The next program's pool is smaller than the tables handed over (pool_size 2 -> 1):
    they are refused, said so in the log, the kept children are stopped and every session
    restarts as after a restart (its unsafe call in flight: -32010, never run twice)."""
    proxy = shared_proxy(tmp_path, counter_dir, pool_size=2).start()
    try:
        a, b = await WsClient.connect(proxy.url), await WsClient.connect(proxy.url)
        session_b = (await b.initialize())["result"]["mcpSessionId"]
        await a.initialize()
        assert tool_text(await b.response(await b.call_tool("count", {}))) == "1"
        call = await b.call_tool("bump", {"name": "b", "delay": 3000 * MS}, progress_token="b")
        await next_progress(b, "b")  # it is running in the child
        pids = set(proxy.upstream_pids())
        assert len(pids) == 2
        cursor = max(b.lsns())
        config = tmp_path / "shared.toml"
        config.write_text(config.read_text().replace("pool_size = 2", "pool_size = 1"))
        closing = [asyncio.ensure_future(until_closed(c)) for c in (a, b)]
        done = await asyncio.to_thread(reload, proxy)
        assert [await c for c in closing] == [1012, 1012]
        (refused,) = proxy.events("reload.shared_pool_not_kept")
        assert refused["children"] == 2 and "pool has 1" in refused["reason"]
        assert done["adopted_pool_children"] == 0 and done["adopted_upstreams"] == 0
        wait_until(lambda: not any(pid_alive(p) for p in pids))
        await a.close()
        await b.close()
        back = await WsClient.connect(proxy.url, session_b, last_lsn=cursor)
        try:
            assert (await back.response(call))["error"]["code"] == -32010
            assert tool_text(await back.response(await back.call_tool("count", {}))) == "1"
            assert len(set(proxy.upstream_pids()) - pids) == 1  # a new child, re-initialized
            assert bumped(counter_dir, "b") <= 1
        finally:
            await back.close()
    finally:
        proxy.kill()


async def test_a_new_program_that_fails_after_exec_takes_the_restart_path(
    tmp_path: Path, counter_dir: Path
) -> None:
    """No rollback: code that passes the validation but fails once exec'd exits non-zero
    (systemd's Restart= starts it again); its children die with it, and the next start
    resolves what was in flight as after any restart. Nothing is lost from the log."""
    install = tmp_path / "install"
    shutil.copytree(ROOT / "mcproxy", install / "mcproxy")
    proxy = ProxyProcess(
        tmp_path / "db.sqlite", env={"FIXTURE_COUNTER_DIR": str(counter_dir)}, cwd=install
    ).start()
    try:
        ws = await WsClient.connect(proxy.url)
        session_id = (await ws.initialize())["result"]["mcpSessionId"]
        call = await ws.call_tool(
            "bump", {"name": "broken", "delay": 3000 * MS}, progress_token="k"
        )
        await next_progress(ws, "k")  # it is running in the child
        children = set(proxy.upstream_pids())
        cursor = max(ws.lsns())
        daemon = install / "mcproxy" / "ops" / "daemon.py"
        good = daemon.read_text()
        marker = "    identity = _identity()\n"  # the first line of serve() that can fail
        assert marker in good
        # Imports fine (check-config passes), fails as soon as it serves.
        daemon.write_text(good.replace(marker, '    raise StoreError("broken on purpose")\n', 1))
        closed = asyncio.ensure_future(until_closed(ws))
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(proxy.proc.wait, TIMEOUT) == 1
        assert await closed == 1012
        await ws.close()
        assert any(
            e.get("error") == "broken on purpose" for e in proxy.events("daemon.store_failed")
        )
        wait_until(lambda: not any(pid_alive(p) for p in children))  # PR_SET_PDEATHSIG
        daemon.write_text(good)
        proxy.start()  # what Restart= does
        back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
        try:
            lost = await back.response(call)
            assert lost["error"]["code"] == -32010
        finally:
            await back.close()
    finally:
        proxy.kill()
