"""The graceful stop that drains (issue 17): SIGTERM lets the calls the upstreams are working
on finish, refuses new ones, then stops as before; and which version is serving."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

import mcproxy
from mcproxy.client.connection import ReconnectOptions
from mcproxy.client.mcp import MCPClient
from tests.helpers import (
    FIXTURE_SERVER,
    MS,
    ROOT,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    eventually,
    free_port,
    messages,
    read_sse,
    tool_text,
)

DEAF_SERVER = FIXTURE_SERVER.with_name("deaf_server.py")


def drained(
    tmp_path: Path,
    drain_s: float,
    *,
    upstream: str | None = None,
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    config = tmp_path / "drain.toml"
    # A short stop ladder: a child that ignores its stdin closing is signalled soon after.
    config.write_text(
        f"[server]\ndrain_timeout_s = {drain_s}\nshutdown_timeout_s = {5000 * MS}\n"
        f"[upstream]\nstdin_close_grace_s = {200 * MS}\nsigterm_grace_s = {500 * MS}\n"
    )
    proxy = ProxyProcess(tmp_path / "db.sqlite", upstream, "--config", str(config), env=env)
    return proxy.start()


def signal_proxy(proxy: ProxyProcess) -> None:
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)


async def exit_status(proxy: ProxyProcess, timeout: float = TIMEOUT) -> int:
    assert proxy.proc is not None
    return await asyncio.to_thread(proxy.proc.wait, timeout)


def is_progress(message: dict[str, Any]) -> bool:
    return message.get("method") == "notifications/progress"


async def started(client: WsClient) -> None:
    """Until the call's first progress note: it runs on the child."""
    while not any(is_progress(m) for m in client.received):
        await client.recv()


async def test_sigterm_lets_an_unsafe_call_finish_on_both_fronts(
    tmp_path: Path, counter_dir: Path
) -> None:
    """A 2-second call that is not safe to repeat, running on each front when SIGTERM arrives:
    both finish, their answers are delivered on the connections they were asked on, the
    server ran each once, a new request meanwhile is refused as documented (-32016; HTTP 503
    with Retry-After), and the daemon exits 0 once they are done."""
    proxy = drained(tmp_path, 20_000 * MS, env={"FIXTURE_COUNTER_DIR": str(counter_dir)})
    ws = await WsClient.connect(proxy.url)
    http = HttpClient(proxy.url)
    try:
        await ws.initialize()
        await http.initialize()
        arguments = {"delay": 2000 * MS}
        ws_call = await ws.call_tool("bump", {"name": "ws", **arguments}, "p")
        await started(ws)
        call = {
            "jsonrpc": "2.0",
            "id": 41,
            "method": "tools/call",
            "params": {
                "name": "bump",
                "arguments": {"name": "http", **arguments},
                "_meta": {"progressToken": "p"},
            },
        }
        stream = await http.post(call)
        assert stream.status == 200
        events = await read_sse(stream, stop=lambda e: e.data and is_progress(e.json()))
        # A second kept-alive connection, idle in the client's pool when the listener closes:
        # what a new request during the drain arrives on (a new connection is refused).
        assert "result" in await http.call("ping")
        signal_proxy(proxy)
        await eventually(lambda: proxy.events("daemon.stopping"))

        refused = await ws.response(await ws.call_tool("echo", {"text": "late"}))
        assert refused["error"]["code"] == -32016, refused
        assert refused["error"]["data"]["retryAfterS"] >= 1
        late = await http.post({**call, "id": 42, "params": {"name": "pid", "arguments": {}}})
        assert late.status == 503
        assert int(late.headers["Retry-After"]) >= 1
        assert (await late.json())["error"]["code"] == -32016

        answer = await ws.response(ws_call)
        assert tool_text(answer) == "1", answer
        events += await read_sse(stream)  # the stream ends after the answer
        assert tool_text(messages(events)[-1]) == "1"
        with_close = await ws.ws.receive(timeout=TIMEOUT)  # then the usual 1012
        assert with_close.type is aiohttp.WSMsgType.CLOSE and with_close.data == 1012
        assert await exit_status(proxy) == 0
    finally:
        await ws.close()
        await http.close()
        proxy.kill()
    for name in ("ws", "http"):
        assert (counter_dir / name).read_text().splitlines() == ["x"]  # run once
    (drain,) = proxy.events("daemon.drain")
    assert (drain["finished"], drain["cut"], drain["skipped"]) == (2, 0, False), drain


async def test_the_client_library_sends_a_refused_request_again_to_the_next_process(
    tmp_path: Path, counter_dir: Path
) -> None:
    """mcproxy.client: the call running at SIGTERM completes; one made during the drain is
    refused (-32016), which the library does not surface: it re-sends the request, same id,
    after resuming on the next process, where it runs once."""
    config = tmp_path / "drain.toml"
    config.write_text(f"[server]\ndrain_timeout_s = {20_000 * MS}\n")
    env = {"FIXTURE_COUNTER_DIR": str(counter_dir)}
    proxy = ProxyProcess(
        tmp_path / "db.sqlite", None, "--config", str(config), env=env, port=free_port()
    ).start()
    options = ReconnectOptions(min_reconnection_delay_s=50 * MS, max_reconnection_delay_s=0.5)
    try:
        async with MCPClient(f"ws://127.0.0.1:{proxy.port}/mcp", options=options) as mcp:
            running = asyncio.Event()
            first = asyncio.ensure_future(
                mcp.call_tool(
                    "bump",
                    {"name": "first", "delay": 3000 * MS},
                    progress=lambda *_: running.set(),
                    timeout_s=TIMEOUT,
                )
            )
            await asyncio.wait_for(running.wait(), TIMEOUT)
            signal_proxy(proxy)
            await eventually(lambda: proxy.events("daemon.stopping"))
            late = asyncio.ensure_future(
                mcp.call_tool("bump", {"name": "late"}, timeout_s=3 * TIMEOUT)
            )
            assert tool_text({"result": await first}) == "1"
            assert await exit_status(proxy) == 0
            assert not late.done()
            await asyncio.to_thread(proxy.start)
            assert tool_text({"result": await late}) == "1"
    finally:
        proxy.kill()
    refused = [e for e in proxy.logs if e.get("event") == "daemon.drain"]
    assert refused and refused[0]["finished"] == 1
    for name in ("first", "late"):
        assert (counter_dir / name).read_text().splitlines() == ["x"]


async def test_a_call_longer_than_the_drain_is_cut_at_the_bound(tmp_path: Path) -> None:
    """A call the upstream never answers: the drain waits drain_timeout_s, then the stop goes
    on as before, and after the restart the call is answered -32010 (outcome unknown)."""
    drain_s = 1000 * MS
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's notify socket
    receiver.bind(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    deaf = f"stdio:{sys.executable} {DEAF_SERVER}"
    proxy = drained(tmp_path, drain_s, upstream=deaf, env=env)
    try:
        ws = await WsClient.connect(proxy.url)
        session_id = (await ws.initialize())["result"]["mcpSessionId"]
        assert "result" in await ws.call("tools/call", {"name": "deafen", "arguments": {}})
        call = await ws.call_tool("echo", {"text": "never answered"})
        await eventually(lambda: proxy.events("upstream.spawned"))
        cursor = max(ws.lsns())
        began = time.monotonic()
        signal_proxy(proxy)
        assert await exit_status(proxy) == 0
        took = time.monotonic() - began
        await ws.close()
        (drain,) = proxy.events("daemon.drain")
        assert (drain["finished"], drain["cut"]) == (0, 1), drain
        assert drain["waited_s"] >= drain_s
        # The bound, plus the stop ladder (stdin close, SIGTERM) and the final commit.
        assert took < drain_s + 5000 * MS, took
        assert all(m.get("id") != call for m in ws.received)
        notes: list[str] = []
        receiver.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                notes.append(receiver.recv(4096).decode())
        assert "STOPPING=1\nSTATUS=draining 1 requests" in notes, notes
        extended = [int(n.split("=")[1]) for n in notes if n.startswith("EXTEND_TIMEOUT_USEC=")]
        # What is left of the drain plus the shutdown steps (4 x shutdown_timeout_s).
        assert extended and extended[0] > 4 * 5000 * MS * 1_000_000, notes

        proxy.start()
        back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
        try:
            lost = await back.response(call)
        finally:
            await back.close()
        assert lost["error"]["code"] == -32010, lost
    finally:
        proxy.kill()
        receiver.close()


async def test_a_second_sigterm_skips_the_drain(tmp_path: Path, counter_dir: Path) -> None:
    proxy = drained(tmp_path, 60_000 * MS, env={"FIXTURE_COUNTER_DIR": str(counter_dir)})
    try:
        ws = await WsClient.connect(proxy.url)
        await ws.initialize()
        await ws.call_tool("slow", {"steps": 1000, "delay": 50 * MS}, "p")
        await started(ws)
        signal_proxy(proxy)
        await eventually(lambda: proxy.events("daemon.stopping"))
        signal_proxy(proxy)  # the drain's own handler is in place once that line is out
        assert await exit_status(proxy) == 0  # well before the minute of the drain
        await ws.drop()
    finally:
        proxy.kill()
    (drain,) = proxy.events("daemon.drain")
    assert (drain["finished"], drain["cut"], drain["skipped"]) == (0, 1, True), drain
    assert drain["waited_s"] < 30_000 * MS
    assert not proxy.events("daemon.forced_exit")


async def test_healthz_and_version_say_which_program_serves(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    proxy = ProxyProcess(tmp_path / "db.sqlite").start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{proxy.port}/healthz") as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
    finally:
        proxy.terminate()
    assert proxy.proc is not None
    assert body["status"] == "ok"
    assert body["version"] == mcproxy.__version__
    assert body["pid"] == proxy.proc.pid
    assert body["reloads"] == 0
    assert body["started_at"].endswith("Z")  # RFC 3339, UTC
    started_at = datetime.fromisoformat(body["started_at"].replace("Z", "+00:00"))
    assert before <= started_at <= datetime.now(UTC)
    (listening,) = proxy.events("daemon.listening")
    assert listening["version"] == mcproxy.__version__
    assert listening["started_at"] == body["started_at"]

    version = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcproxy", "--version", cwd=ROOT, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(version.communicate(), TIMEOUT)
    assert version.returncode == 0
    assert out.decode().strip() == f"mcproxy {mcproxy.__version__}"
