"""No client can hurt the others through the upstreams (issue 15 findings 4-6): the child's
environment and descriptors, the bytes queued toward a child that stops reading, and the cap on
live upstream processes. Real daemons, real children, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    FIXTURE_SERVER,
    INIT_PARAMS,
    MS,
    HttpClient,
    ProxyProcess,
    WsClient,
    eventually,
    messages,
    pid_alive,
    rss,
    tool_text,
)

DUMPER = FIXTURE_SERVER.with_name("dump_and_serve.py")
DEAF_SERVER = FIXTURE_SERVER.with_name("deaf_server.py")
MB = 1024 * 1024
TOKEN = "alice-secret-token-0123456789"


@pytest.mark.parametrize("mode", ["per-session", "shared"])
async def test_the_child_gets_a_clean_environment_and_only_its_three_pipes(
    tmp_path: Path, mode: str
) -> None:
    # The daemon inherits a descriptor on its tokens file, holds its tokens in a variable, and
    # carries unrelated variables of its own: none of it may reach the child.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    tokens.chmod(0o600)  # a tokens file others can read is refused
    inherited = os.open(tokens, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    dump = tmp_path / "child.json"
    config = tmp_path / "mcproxy.toml"
    config.write_text(
        '[auth]\ntokens_env = "MCPROXY_TEST_TOKENS"\n'
        f'[upstream]\nmode = "{mode}"\n'
        # Listing the tokens variable does not pass it: it is the proxy's secret.
        'env_passthrough = ["PATH", "LC_*", "MCPROXY_TEST_TOKENS"]\n'
        'env = {GREETING = "hello"}\n'
    )
    proxy = ProxyProcess(
        tmp_path / "mcproxy.db",
        f"stdio:{sys.executable} {DUMPER} {dump}",
        "--config",
        str(config),
        env={
            "MCPROXY_TEST_TOKENS": f"alice:{TOKEN}",
            "DAEMON_ONLY_SETTING": "not for the child",
            "LC_TEST_ISOLATION": "C",
        },
        pass_fds=(inherited,),
    ).start()
    client = HttpClient(proxy.url, {"Authorization": f"Bearer {TOKEN}"})
    try:
        await client.initialize()
        echo = await client.call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        assert tool_text(echo) == "hi"
        await eventually(dump.exists)
        record = json.loads(dump.read_text())
        env = record["env"]
        assert env["GREETING"] == "hello"
        assert env["LC_TEST_ISOLATION"] == "C"
        assert "PATH" in env
        assert "MCPROXY_TEST_TOKENS" not in env
        assert "DAEMON_ONLY_SETTING" not in env
        assert TOKEN not in dump.read_text()
        assert record["fds"] == [0, 1, 2]
    finally:
        await client.close()
        proxy.kill()
        os.close(inherited)


# Issue 15 finding 4 measured 58 -> 265 MB for this flood; bounded, the queue toward the child
# holds at most upstream.max_queued_bytes (4 MiB by default) plus one message.
FLOOD = 200
FLOOD_GROWTH_MAX_MB = 40  # measured: +8 MB


async def test_a_child_that_stops_reading_does_not_grow_the_proxy(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "mcproxy.db", f"stdio:{sys.executable} {DEAF_SERVER}").start()
    flooder = await WsClient.connect(proxy.url)
    bystander = await WsClient.connect(proxy.url)
    try:
        assert proxy.proc is not None
        await flooder.initialize()
        await bystander.initialize()
        deaf = await flooder.response(await flooder.call_tool("deafen", {}))
        assert tool_text(deaf) == "deaf now"
        before = rss(proxy.proc.pid) / MB
        blob = "x" * MB
        for _ in range(FLOOD):
            await flooder.send(
                {"jsonrpc": "2.0", "method": "notifications/flood", "params": {"blob": blob}}
            )
        # Requests beyond the bound are answered at once, and were never sent.
        refused = await flooder.response(await flooder.call_tool("echo", {"text": blob}))
        assert refused["error"]["code"] == -32015, refused
        assert refused["error"]["data"]["limit"] == 4 * MB
        echo = await bystander.response(await bystander.call_tool("echo", {"text": "still here"}))
        assert tool_text(echo) == "still here"
        after = rss(proxy.proc.pid) / MB
        assert after - before < FLOOD_GROWTH_MAX_MB, (before, after)
        dropped = proxy.events("upstream.send_dropped")
        assert dropped and dropped[0]["message"] == "notifications/flood"
        assert len(dropped) < 10  # logged at 1, 2, 4, 8, ... drops, not once each
    finally:
        await flooder.close()
        await bystander.close()
        proxy.kill()


def live_children(proxy: ProxyProcess) -> int:
    return sum(pid_alive(pid) for pid in proxy.upstream_pids())


def capped(tmp_path: Path, total: int, per_principal: int) -> ProxyProcess:
    config = tmp_path / "capped.toml"
    config.write_text(
        f"[upstream]\nmax_live_upstreams = {total}\n"
        f"max_live_upstreams_per_principal = {per_principal}\n"
    )
    return ProxyProcess(tmp_path / "mcproxy.db", None, "--config", str(config)).start()


async def initialize_over_http(url: str) -> dict[str, object]:
    return (await new_http_session(url))[1]


async def new_http_session(url: str, token: str | None = None) -> tuple[str, dict[str, object]]:
    """A new session over HTTP: its id (a log prefix) and the answer to its initialize."""
    client = HttpClient(url, {"Authorization": f"Bearer {token}"} if token else None)
    try:
        resp, events = await client.request("initialize", INIT_PARAMS)
        return resp.headers.get("Mcp-Session-Id", "")[:8] + "…", messages(events)[-1]
    finally:
        await client.close()


async def test_live_upstreams_are_capped_parking_the_least_recently_used_idle(
    tmp_path: Path,
) -> None:
    proxy = capped(tmp_path, 3, 3)
    attached: list[WsClient] = []
    try:
        ids = []
        for _ in range(3):  # each binds its session at once (limits.bind_timeout_s)
            attached.append(await WsClient.connect(proxy.url))
            ids.append((await attached[-1].initialize())["result"]["mcpSessionId"])
        await eventually(lambda: live_children(proxy) == 3)
        # Three sessions with a client attached: none can be parked, the fourth is refused.
        refused = await initialize_over_http(proxy.url)
        error = refused["error"]
        assert isinstance(error, dict) and error["code"] == -32011, refused
        assert "upstream.max_live_upstreams" in error["data"]["reason"]
        assert live_children(proxy) == 3
        # One client leaves: its session is idle, and is parked to make room for a new one.
        leaving = attached.pop(0)
        cursor = max(leaving.lsns())
        await leaving.close()
        admitted = await initialize_over_http(proxy.url)
        assert "result" in admitted, admitted
        parked = [e["session"] for e in proxy.events("upstream.park_for_room")]
        assert parked == [ids[0][:8] + "…"]
        assert live_children(proxy) == 3
        # The parked session comes back (its upstream respawned, in room made by parking the
        # new, now idle, HTTP session), and every other session still answers.
        back = await WsClient.connect(proxy.url, ids[0], last_lsn=cursor)
        attached.append(back)
        for client in attached:
            echo = await client.response(await client.call_tool("echo", {"text": "ok"}))
            assert tool_text(echo) == "ok"
        assert live_children(proxy) <= 3
    finally:
        for client in attached:
            await client.close()
        proxy.kill()


async def test_a_session_flood_is_not_a_process_flood(tmp_path: Path) -> None:
    # Issue 15 finding 5: 30 concurrent initialize POSTs spawned 30 children.
    proxy = capped(tmp_path, 4, 4)
    bystander = await WsClient.connect(proxy.url)
    peak = 0
    flooding = True

    async def watch() -> None:
        nonlocal peak
        while flooding:
            peak = max(peak, live_children(proxy))
            await asyncio.sleep(10 * MS)  # a sampling period, not a wait

    try:
        await bystander.initialize()
        watcher = asyncio.ensure_future(watch())
        answers = await asyncio.gather(*(initialize_over_http(proxy.url) for _ in range(30)))
        flooding = False
        await watcher
        codes = [a["error"]["code"] for a in answers if "error" in a]  # type: ignore[index]
        assert set(codes) <= {-32011}, answers
        assert len(answers) - len(codes) >= 3  # at least as many as there was room for
        assert peak <= 4
        echo = await bystander.response(await bystander.call_tool("echo", {"text": "fine"}))
        assert tool_text(echo) == "fine"
        assert live_children(proxy) <= 4
    finally:
        await bystander.close()
        proxy.kill()


async def test_a_full_principal_share_parks_that_principals_own_idle_session(
    tmp_path: Path,
) -> None:
    config = tmp_path / "capped.toml"
    config.write_text(
        '[auth]\ntokens_env = "MCPROXY_TEST_TOKENS"\n'
        "[upstream]\nmax_live_upstreams = 3\nmax_live_upstreams_per_principal = 2\n"
    )
    tokens = "alice:alice-token-0123456789,bob:bob-token-0123456789"
    proxy = ProxyProcess(
        tmp_path / "mcproxy.db",
        None,
        "--config",
        str(config),
        env={"MCPROXY_TEST_TOKENS": tokens},
    ).start()
    alice, bob = "alice-token-0123456789", "bob-token-0123456789"
    try:
        b1, _ = await new_http_session(proxy.url, bob)  # the least recently used of all
        a1, _ = await new_http_session(proxy.url, alice)
        a2, _ = await new_http_session(proxy.url, alice)  # the total is full now
        # Alice's share is full: her own idle session makes room, not Bob's older one.
        a3, answer = await new_http_session(proxy.url, alice)
        assert "result" in answer, answer
        # Bob's share is not full, the total is: the least recently used idle one goes.
        b2, answer = await new_http_session(proxy.url, bob)
        assert "result" in answer, answer
        parked = [(e["session"], e["limit"]) for e in proxy.events("upstream.park_for_room")]
        assert parked == [
            (a1, "upstream.max_live_upstreams_per_principal"),
            (b1, "upstream.max_live_upstreams"),
        ]
        assert live_children(proxy) == 3
        assert len({a1, a2, a3, b1, b2}) == 5
    finally:
        proxy.kill()
