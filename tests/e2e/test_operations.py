"""Operations against the real daemon: metrics, health, systemd notify and socket activation,
parking, expiry and pruning."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.helpers import (
    INIT_PARAMS,
    MS,
    ROOT,
    STARTUP,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    eventually,
    fixture_upstream,
    logged,
    messages,
    pid_alive,
    read_sse,
    scrape,
    tool_text,
    value,
    wait_until,
)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mcproxy.toml"
    path.write_text(text)
    return str(path)


async def test_metrics_move_through_resume_crash_and_dedupe(proxy: ProxyProcess) -> None:
    before = await scrape(proxy)
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    rid = await client.call_tool("echo", {"text": "once"})
    first = await client.response(rid)
    await client.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"text": "once"}}})  # fmt: skip
    crashed = await client.response(await client.call_tool("crash", {}))
    assert crashed["error"]["code"] == -32010
    cursor = max(client.lsns())
    await client.drop()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor - 2)
    await back.recv()
    await back.recv()  # the two messages after the cursor, replayed
    after = await scrape(proxy)
    await back.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mcproxy_resumes_total", outcome="exact") == 1
    assert moved("mcproxy_replay_depth_count") == 1 and moved("mcproxy_replay_depth_sum") == 2
    assert moved("mcproxy_resume_seconds_count") == 1
    assert moved("mcproxy_deduplicated_requests_total") == 1
    assert moved("mcproxy_inflight_resolved_total", outcome="outcome_unknown") == 1
    assert moved("mcproxy_upstream_events_total", event="lost") == 1
    assert moved("mcproxy_upstream_events_total", event="spawned") >= 1
    assert moved("mcproxy_client_messages_total", direction="in") >= 5
    assert moved("mcproxy_client_messages_total", direction="out") >= 3
    assert value(after, "mcproxy_sessions", state="attached") == 1
    assert value(after, "mcproxy_connections", transport="websocket") == 1
    # The resume acknowledged everything up to its cursor: the replayed two remain, and the
    # answer to initialize, kept while its id is remembered for retries.
    assert value(after, "mcproxy_log_rows") == 3 and value(after, "mcproxy_db_bytes") > 0
    assert tool_text(first) == "once"


async def test_health_and_readiness(tmp_path: Path) -> None:
    good = ProxyProcess(tmp_path / "a.sqlite").start()
    bad = ProxyProcess(tmp_path / "b.sqlite", "stdio:/nonexistent/mcp-server").start()
    try:
        async with aiohttp.ClientSession() as http:
            for proxy, status in ((good, 200), (bad, 503)):
                base = f"http://127.0.0.1:{proxy.port}"
                async with http.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
                async with http.get(f"{base}/readyz") as resp:
                    assert resp.status == status
                    checks = (await resp.json())["checks"]
                    assert checks["database"] and checks["listener"]
                    assert checks["upstream"] is (status == 200)
    finally:
        good.kill()
        bad.kill()


async def test_sd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    receiver.bind(str(path))
    receiver.settimeout(TIMEOUT)
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    proxy = ProxyProcess(tmp_path / "db.sqlite", env=env).start()
    try:
        got: list[str] = []
        while not any(m.startswith("WATCHDOG=1") for m in got):
            got.append(receiver.recv(4096).decode())
        ready = [m for m in got if "READY=1" in m]
        assert ready and "STATUS=listening on 127.0.0.1" in ready[0]
        assert proxy.terminate() == 0
        while not any("STOPPING=1" in m for m in got):
            got.append(receiver.recv(4096).decode())
    finally:
        proxy.kill()
        receiver.close()


async def test_socket_activation_serves_clients_that_connected_before_start(
    tmp_path: Path,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # A client connects (and sends its request) before mcproxy even runs: the kernel queues it.
    early = socket.create_connection(("127.0.0.1", port))
    early.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    fd = listener.fileno()
    argv = [sys.executable, "-m", "mcproxy", "--db", str(tmp_path / "db.sqlite"),
            "--upstream", fixture_upstream(), "--log-format", "json"]  # fmt: skip
    # LISTEN_PID must be the daemon's pid: exec from a shell keeps it ($$).
    proc = await asyncio.create_subprocess_exec(
        *["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *argv],
        preexec_fn=lambda: os.dup2(fd, 3),
        pass_fds=(3,),
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        early.settimeout(TIMEOUT)
        reply = b""
        while chunk := early.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"ok"' in reply
        client = HttpClient(f"http://127.0.0.1:{port}/mcp")
        try:
            await client.initialize()
            echo = await client.call("tools/call", {"name": "echo", "arguments": {"text": "sa"}})
            assert tool_text(echo) == "sa"
        finally:
            await client.close()
    finally:
        proc.kill()
        await proc.wait()
        early.close()
        listener.close()


async def test_idle_session_parks_and_respawns_on_demand(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, f"[sessions]\npark_after_s = {300 * MS}\nsweep_interval_s = {100 * MS}\n"
    )
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", config).start()
    try:
        client = await WsClient.connect(proxy.url)
        session_id = (await client.initialize())["result"]["mcpSessionId"]
        first_pid = (await client.response(await client.call_tool("pid", {})))["result"]
        cursor = max(client.lsns())
        await client.close()
        wait_until(lambda: bool(proxy.events("session.parked")))
        [pid] = proxy.upstream_pids()
        wait_until(lambda: not pid_alive(pid))  # the child was stopped
        back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
        try:
            again = await back.response(await back.call_tool("pid", {}))
            assert again["result"] != first_pid  # a new child, re-initialized from the log
            assert len(proxy.upstream_pids()) == 2
        finally:
            await back.close()
    finally:
        proxy.kill()


async def test_expired_sessions_are_deleted(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"[sessions]\npark_after_s = {100 * MS}\nexpire_after_s = {500 * MS}\n"
        f"sweep_interval_s = {100 * MS}\n",
    )
    db = tmp_path / "db.sqlite"
    proxy = ProxyProcess(db, None, "--config", config).start()
    try:
        client = HttpClient(proxy.url)
        try:
            await client.initialize()
            wait_until(lambda: bool(proxy.events("session.expired")))
            resp, _ = await client.request("tools/list")
            assert resp.status == 404  # gone for good
        finally:
            await client.close()
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    finally:
        proxy.kill()


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


async def test_pruning_keeps_the_log_bounded(tmp_path: Path) -> None:
    cap = 40
    window = 16
    config = write_config(
        tmp_path,
        f"[sessions]\nmax_log_events = {cap}\nsweep_interval_s = {50 * MS}\n"
        f"[limits]\ndedupe_window = {window}\n",
    )
    db = tmp_path / "db.sqlite"
    remembered = window + window // 8
    proxy = ProxyProcess(db, None, "--config", config).start()
    sizes: list[int] = []
    try:
        client = HttpClient(proxy.url)
        try:
            await client.initialize()
            for burst in range(4):
                for i in range(150):
                    text = f"{burst}-{i}" + "x" * 500
                    await client.call("tools/call", {"name": "echo", "arguments": {"text": text}})
                # The next sweep prunes to the cap; answers whose request ids are still
                # remembered for retries stay beyond it, within the dedupe window.
                wait_until(lambda: count_rows(db) <= cap + remembered)
                with sqlite3.connect(db) as conn:
                    sizes.append(conn.execute("PRAGMA page_count").fetchone()[0])
                    # Answered requests beyond the dedupe window are forgotten (batches of
                    # 1/8): their keys go, and their rows once pruned.
                    kept = conn.execute(
                        "SELECT count(*) FROM events WHERE request_key IS NOT NULL"
                    ).fetchone()[0]
                    assert window <= kept <= remembered, kept
                    assert conn.execute("SELECT count(*) FROM requests").fetchone() == (0,)
        finally:
            await client.close()
    finally:
        proxy.kill()
    # Freed pages are reused: after the first burst the file stops growing.
    assert sizes[-1] <= sizes[1] * 1.2, sizes


async def test_children_run_under_batch_scheduling_unless_turned_off(tmp_path: Path) -> None:
    """upstream.batch_scheduling: a child (and what it starts) does not preempt the proxy."""
    policies = {}
    for enabled in (True, False):
        config = write_config(tmp_path, f"[upstream]\nbatch_scheduling = {str(enabled).lower()}\n")
        proxy = ProxyProcess(tmp_path / f"db-{enabled}.sqlite", None, "--config", config).start()
        try:
            client = await WsClient.connect(proxy.url)
            try:
                await client.initialize()
                answer = await client.response(await client.call_tool("pid", {}))
                [pid] = proxy.upstream_pids()
                assert int(tool_text(answer)) == pid
                policies[enabled] = os.sched_getscheduler(pid)
            finally:
                await client.close()
        finally:
            proxy.kill()
    assert policies == {True: os.SCHED_BATCH, False: os.SCHED_OTHER}


async def test_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Issue 15 finding 12: under umask 022 (the README's way to run it) the database, its
    WAL and shared-memory files and the directory made for them were 0644/0755."""
    state = tmp_path / "state" / "mcproxy"
    previous = os.umask(0o022)
    try:
        proxy = ProxyProcess(state / "db.sqlite").start()
    finally:
        os.umask(previous)
    try:
        client = HttpClient(proxy.url)
        await client.initialize()  # something written: the WAL and its index exist
        await client.close()
        modes = {
            path.name: path.stat().st_mode & 0o777
            for path in (state, state / "db.sqlite", state / "db.sqlite-wal")
        }
        modes["db.sqlite-shm"] = (state / "db.sqlite-shm").stat().st_mode & 0o777
        assert modes == {
            "mcproxy": 0o700,
            "db.sqlite": 0o600,
            "db.sqlite-wal": 0o600,
            "db.sqlite-shm": 0o600,
        }
        assert (tmp_path / "state").stat().st_mode & 0o077 == 0  # parents made private too
    finally:
        proxy.kill()
    # Files left readable by an older run are tightened on the next start.
    (state / "db.sqlite").chmod(0o644)
    (state / "db.sqlite-wal").chmod(0o666)
    proxy.start()
    try:
        assert (state / "db.sqlite").stat().st_mode & 0o777 == 0o600
        assert (state / "db.sqlite-wal").stat().st_mode & 0o777 == 0o600
    finally:
        proxy.kill()


def test_a_tokens_file_others_can_read_or_write_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token-0123456789abcdef\n")
    config = write_config(tmp_path, f'[auth]\ntokens_file = "{tokens}"\n')
    for mode, refused in ((0o644, True), (0o620, True), (0o602, True), (0o640, False)):
        tokens.chmod(mode)
        proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", config)
        if refused:
            run = subprocess.run(
                [sys.executable, "-m", "mcproxy", "--db", str(tmp_path / "db.sqlite"),
                 "--listen", "127.0.0.1:0", "--config", config, "--log-format", "json"],
                capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT, check=False,
            )  # fmt: skip
            assert run.returncode == 2, (oct(mode), run.stderr)
            assert f"mode {mode:04o}" in run.stderr and "chmod 600" in run.stderr
        else:
            proxy.start()
            proxy.kill()


def test_help_names_every_command() -> None:
    """Issue 16: `mcproxy --help` did not mention `connect` or `sessions`."""
    run = subprocess.run(
        [sys.executable, "-m", "mcproxy", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert "mcproxy connect ws://" in run.stdout and "mcproxy sessions list" in run.stdout


async def test_clients_that_go_away_mid_stream_are_info_not_tracebacks(tmp_path: Path) -> None:
    """Issue 16 item 8: a GET stream whose client vanished raised InvalidStateError in
    SseStream.serve (an aiohttp plain-text traceback), and a POST stream whose client vanished
    mid-write was logged as task.failed with a traceback. Both are ordinary: one info line."""
    config = write_config(tmp_path, f"[server]\nsse_keepalive_s = {50 * MS}\n")
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", config).start()
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        assert client.session_id is not None
        head = (
            f"Host: 127.0.0.1:{proxy.port}\r\nAccept: application/json, text/event-stream\r\n"
            f"Mcp-Session-Id: {client.session_id}\r\nMCP-Protocol-Version: 2025-11-25\r\n"
        )
        call = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {
                    "name": "slow",
                    "arguments": {"steps": 200, "delay": 20 * MS},
                    "_meta": {"progressToken": "p"},
                },
            }
        )
        for request in (
            f"GET /mcp HTTP/1.1\r\n{head}\r\n",  # the general stream: only keep-alives
            f"POST /mcp HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
            f"Content-Length: {len(call)}\r\n\r\n{call}",  # progress written all along
        ):
            gone = len(proxy.events("http.client_gone"))
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request.encode())
            assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)  # streaming
            writer.transport.abort()  # the client vanishes (a reset, no goodbye)
            await eventually(lambda g=gone: len(proxy.events("http.client_gone")) > g)
        echo = await client.call("tools/call", {"name": "echo", "arguments": {"text": "still"}})
        assert tool_text(echo) == "still"
    finally:
        await client.close()
        proxy.terminate()
    assert not [e for e in proxy.logs if e.get("event") == "raw"]  # JSON lines only
    assert not [e for e in proxy.logs if e.get("level") in ("error", "critical")]
    assert all(e["level"] == "info" for e in proxy.events("http.client_gone"))


async def _reset_after(
    port: int, method: str, headers: dict[str, str], body: bytes = b"", read_head: bool = False
) -> bytes:
    """Send one request and reset the connection (SO_LINGER 0: an RST, no FIN) before the
    answer, as a client that gave up or was killed; with ``read_head`` after the response's
    head and first event (the priming one). What was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    writer.write(f"{method} /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}{length}\r\n".encode())
    writer.write(body)
    await writer.drain()
    read = b""
    if read_head:
        read = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        read += await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return read


async def test_clients_that_reset_a_request_before_its_answer_are_info_not_errors(
    tmp_path: Path,
) -> None:
    """Peer benchmark (issue 20): a client that gave up on a slow session opening and reset
    its connection was logged by aiohttp at error level ("Error handling request", with a
    ClientConnectionResetError traceback): the SSE headers were written outside the front's
    care. Every write of the HTTP front (the headers, the priming event, a JSON answer, a
    resumed GET stream, DELETE's status) to a client that is gone is one info line; the
    request goes on, its answer is logged for a resume, and everyone else is served."""
    counters = tmp_path / "counters"
    counters.mkdir()
    (counters / "start_delay").write_text(str(1000 * MS))  # initialize answers are slow
    env = {"FIXTURE_COUNTER_DIR": str(counters)}
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, env=env).start()
    accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    def init(version: str) -> bytes:
        params = {**INIT_PARAMS, "protocolVersion": version}
        return json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
        ).encode()

    def errors() -> list[dict[str, object]]:
        return [e for e in proxy.logs if e.get("level") in ("error", "critical")]

    async def gone_after(count: int) -> None:
        """The ``count``-th client gone is logged, and nothing as an error."""
        await eventually(lambda: len(proxy.events("http.client_gone")) >= count or errors())
        assert not errors(), errors()

    client = HttpClient(proxy.url)
    try:
        # 1. initialize from a client older than priming: the headers are the first write.
        await _reset_after(proxy.port, "POST", accept, init("2025-06-18"))
        await gone_after(1)
        # 2. initialize from a current client, reset before anything was written...
        await _reset_after(proxy.port, "POST", accept, init("2025-11-25"))
        await gone_after(2)
        # ... and after the priming event, before the (slow) answer: the answer is logged
        # for the resume, which a reset resumption does not disturb either.
        head = await _reset_after(proxy.port, "POST", accept, init("2025-11-25"), read_head=True)
        session_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"mcp-session-id:")
        )
        priming = head.split(b"id: ", 1)[1].split(b"\n", 1)[0].decode()
        await gone_after(3)
        await eventually(lambda: logged(proxy.db, session_id, "serverInfo"), STARTUP)
        resume = {
            "Accept": "text/event-stream",
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": "2025-11-25",
            "Last-Event-ID": priming,
        }
        await _reset_after(proxy.port, "GET", resume)  # a resumption: no priming, headers first
        await gone_after(4)
        async with client.http.get(proxy.url, headers=resume) as resp:
            assert resp.status == 200
            answers = messages(await read_sse(resp))
        assert [m["id"] for m in answers] == [1] and "serverInfo" in answers[0]["result"]

        (counters / "start_delay").unlink()
        await client.initialize()
        assert client.session_id is not None
        ours = {**accept, "Mcp-Session-Id": client.session_id, "MCP-Protocol-Version": "2025-11-25"}
        # 3. a slow tools/call reset before its stream began: it runs on, its answer logged.
        arguments = {"steps": 3, "delay": 50 * MS}
        slow = json.dumps({"jsonrpc": "2.0", "id": "slow-1", "method": "tools/call",
                           "params": {"name": "slow", "arguments": arguments}})  # fmt: skip
        await _reset_after(proxy.port, "POST", ours, slow.encode())
        await gone_after(5)
        await eventually(lambda: logged(proxy.db, client.session_id or "", "slow done after 3"))
        # 4. a JSON answer (a retried id, answered from the log) to a client gone meanwhile.
        await _reset_after(proxy.port, "POST", ours, slow.encode())
        await gone_after(6)
        # 5. DELETE's status: the session ends all the same.
        other = HttpClient(proxy.url)
        await other.initialize()
        theirs = {"Mcp-Session-Id": other.session_id or "", "MCP-Protocol-Version": "2025-11-25"}
        await _reset_after(proxy.port, "DELETE", theirs)
        await gone_after(7)
        await eventually(lambda: bool(proxy.events("session.terminated")))
        async with await other.post({"jsonrpc": "2.0", "id": 9, "method": "ping"}) as resp:
            assert resp.status == 404
        await other.close()
        # Everyone else is served.
        echo = await client.call("tools/call", {"name": "echo", "arguments": {"text": "still"}})
        assert tool_text(echo) == "still"
    finally:
        await client.close()
        proxy.terminate()
    assert not [e for e in proxy.logs if e.get("event") == "raw"]  # JSON lines only
    assert not errors()
    assert not [e for e in proxy.logs if "exception" in e]
    assert all(e["level"] == "info" for e in proxy.events("http.client_gone"))
