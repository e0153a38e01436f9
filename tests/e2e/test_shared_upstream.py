"""``upstream.mode = "shared"``: many sessions on one child (or a small pool), against the
real daemon and the SDK fixture server. Every answer must reach its own session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcproxy.upstreams.shared_router import CANNOT_ATTRIBUTE
from tests.helpers import (
    ProxyProcess,
    WsClient,
    pid_alive,
    scrape,
    tool_text,
    value,
    wait_for_metric,
    wait_until,
)

PROGRESS = "notifications/progress"


def shared_proxy(
    tmp_path: Path, counter_dir: Path, pool_size: int = 1, max_in_flight: int = 64
) -> ProxyProcess:
    config = tmp_path / "shared.toml"
    config.write_text(
        f'[upstream]\nmode = "shared"\npool_size = {pool_size}\nmax_in_flight = {max_in_flight}\n'
    )
    return ProxyProcess(
        tmp_path / "mcproxy.db",
        None,
        "--config",
        str(config),
        env={"FIXTURE_COUNTER_DIR": str(counter_dir)},
    )


@pytest.fixture
def shared(tmp_path: Path, counter_dir: Path) -> Iterator[ProxyProcess]:
    proxy = shared_proxy(tmp_path, counter_dir).start()
    yield proxy
    proxy.kill()


async def session(proxy: ProxyProcess) -> WsClient:
    client = await WsClient.connect(proxy.url)
    init = await client.initialize()
    assert init["result"]["serverInfo"]["name"] == "fixture"
    client.received.clear()
    return client


def responses(client: WsClient) -> dict[Any, dict[str, Any]]:
    return {m["id"]: m for m in client.received if "method" not in m}


async def next_progress(client: WsClient, token: Any) -> dict[str, Any]:
    for message in client.received:
        if message.get("method") == PROGRESS and message["params"]["progressToken"] == token:
            return message
    while True:
        message = await client.recv()
        if message.get("method") == PROGRESS and message["params"]["progressToken"] == token:
            return message


async def test_hundreds_of_sessions_on_one_child_get_only_their_own_answers(
    shared: ProxyProcess,
) -> None:
    count = 200

    async def run(i: int) -> None:
        client = await session(shared)
        try:
            sent: set[Any] = set()
            # Every session uses the same two tokens: only the pool's rewriting tells them apart.
            token: str | int = "same-token" if i % 2 else 7
            echo = await client.call_tool("echo", {"text": f"payload-{i}"})
            slow = await client.request(
                "tools/call",
                {
                    "name": "slow",
                    "arguments": {"steps": 3, "delay": 0.05},
                    "_meta": {"progressToken": token},
                },
            )
            sent |= {echo, slow}
            cancelled = i % 5 == 0
            if cancelled:
                await next_progress(client, token)
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": slow, "reason": "test"},
                    }
                )
            assert tool_text(await client.response(echo)) == f"payload-{i}"
            if not cancelled:
                assert tool_text(await client.response(slow)) == "slow done after 3"
            final = await client.call_tool("echo", {"text": f"final-{i}"})
            sent.add(final)
            assert tool_text(await client.response(final)) == f"final-{i}"

            got = responses(client)
            assert set(got) <= sent, f"session {i} got answers to {set(got) - sent}"
            assert (slow in got) is not cancelled
            progress = [m for m in client.received if m.get("method") == PROGRESS]
            assert progress and all(m["params"]["progressToken"] == token for m in progress)
            steps = [m["params"]["progress"] for m in progress]
            assert steps == sorted(steps) and len(steps) == len(set(steps))
            if not cancelled:
                assert steps == [1, 2, 3]
        finally:
            await client.close()

    await asyncio.gather(*(run(i) for i in range(count)))
    assert len(shared.upstream_pids()) == 1  # one child served them all
    assert not shared.events("upstream.shared_unattributed")


async def test_a_crash_of_the_shared_child_is_recovered_by_every_session(
    shared: ProxyProcess,
) -> None:
    clients = await asyncio.gather(*(session(shared) for _ in range(60)))
    try:
        for client in clients:  # how each session learns which tools are read-only
            assert "result" in await client.call("tools/list")
        calls = []
        for i, client in enumerate(clients):
            # Safe to repeat (read-only): re-issued on the new child. Unsafe: -32010.
            name = "slow" if i % 3 == 0 else "slow_read"
            token = f"t{i}"
            rid = await client.request(
                "tools/call",
                {
                    "name": name,
                    "arguments": {"steps": 20, "delay": 0.05},
                    "_meta": {"progressToken": token},
                },
            )
            calls.append((client, name, rid, token))
        for client, _, _, token in calls:
            await next_progress(client, token)  # each call is running on the child
        crasher = await session(shared)
        try:
            crash = await crasher.response(await crasher.call_tool("crash", {}))
            assert crash["error"]["code"] == -32010
        finally:
            await crasher.close()
        for client, name, rid, _ in calls:
            answer = await client.response(rid)
            if name == "slow":
                assert answer["error"]["code"] == -32010
                assert answer["error"]["data"]["method"] == "tools/call"
            else:
                assert "result" in answer, answer
                assert tool_text(answer) == "read done after 20"
        for i, client in enumerate(clients):
            echoed = await client.response(await client.call_tool("echo", {"text": f"after-{i}"}))
            assert tool_text(echoed) == f"after-{i}"
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    pids = shared.upstream_pids()
    assert len(pids) == 2, pids  # restarted once, for all 61 sessions
    assert len(shared.events("upstream.shared_lost")) == 1


async def test_a_child_runs_at_most_max_in_flight_calls_the_others_wait_in_the_proxy(
    tmp_path: Path, counter_dir: Path
) -> None:
    proxy = shared_proxy(tmp_path, counter_dir, max_in_flight=2).start()
    try:
        clients = await asyncio.gather(*(session(proxy) for _ in range(8)))
        rids = [await c.call_tool("hold", {"delay": 0.1}) for c in clients]
        peaks = [tool_text(await c.response(rid)) for c, rid in zip(clients, rids, strict=True)]
        assert max(int(p) for p in peaks) == 2, peaks  # every call ran; never three at once
        await asyncio.gather(*(c.close() for c in clients))
    finally:
        proxy.kill()


async def test_requests_still_waiting_for_a_slot_survive_a_crash_of_the_child(
    tmp_path: Path, counter_dir: Path
) -> None:
    proxy = shared_proxy(tmp_path, counter_dir, max_in_flight=1).start()
    try:
        a, b = await session(proxy), await session(proxy)
        running = await a.request(
            "tools/call",
            {
                "name": "slow",
                "arguments": {"steps": 200, "delay": 0.05},
                "_meta": {"progressToken": "p"},
            },
        )
        await next_progress(a, "p")  # it holds the only slot
        waiting = await b.call_tool("bump", {"name": "queued"})  # not safe to repeat
        [child] = proxy.upstream_pids()
        await wait_for_metric(proxy, "mcproxy_shared_requests_queued", 1)
        os.kill(child, signal.SIGKILL)
        lost = await a.response(running)
        assert lost["error"]["code"] == -32010  # it reached the child: outcome unknown
        answer = await b.response(waiting)
        assert tool_text(answer) == "1", answer  # never reached it: run once, on the new one
        assert (counter_dir / "queued").read_text() == "x\n"
        assert len(proxy.upstream_pids()) == 2
        samples = await scrape(proxy)
        assert value(samples, "mcproxy_inflight_resolved_total", outcome="resent") == 1
        # The bump waited for the slot (and so may each session's own tools/list).
        assert value(samples, "mcproxy_shared_events_total", event="queued") >= 1
        assert value(samples, "mcproxy_shared_requests_queued") == 0
        await asyncio.gather(a.close(), b.close())
    finally:
        proxy.kill()


async def test_list_changed_fans_out_and_resource_updates_reach_subscribers_only(
    shared: ProxyProcess,
) -> None:
    a, b, c = [await session(shared) for _ in range(3)]
    try:
        for client in (a, b):
            answer = await client.call("resources/subscribe", {"uri": "res://doc"})
            assert "error" not in answer, answer
        log = await a.response(await a.call_tool("subscription_log", {}))
        assert log["result"]["structuredContent"]["result"] == ["subscribe res://doc"]  # once

        announced = await b.response(await b.call_tool("announce", {"uri": "res://doc"}))
        assert tool_text(announced) == "announced"
        # What the child wrote before that answer was routed before it; a later answer to c
        # proves c has been given everything meant for it.
        for client in (a, c):
            await client.response(await client.call_tool("echo", {"text": "sync"}))

        def methods(client: WsClient) -> list[str]:
            return [m["method"] for m in client.received if m.get("method")]

        changed, updated = "notifications/tools/list_changed", "notifications/resources/updated"
        assert methods(a) == [changed, updated]
        assert methods(b) == [changed, updated]
        assert methods(c) == [changed]  # not subscribed

        for client in (a, b):
            assert "error" not in await client.call("resources/unsubscribe", {"uri": "res://doc"})
        log = await c.response(await c.call_tool("subscription_log", {}))
        assert log["result"]["structuredContent"]["result"] == [
            "subscribe res://doc",
            "unsubscribe res://doc",  # when the last subscriber left
        ]
    finally:
        for client in (a, b, c):
            await client.close()


async def test_server_requests_go_to_their_session_or_are_refused(shared: ProxyProcess) -> None:
    a, b = await session(shared), await session(shared)
    try:
        # Only a has a request in flight: the elicitation can only be a's.
        ask = await a.call_tool("ask", {"message": "your name?"})
        elicitation = await a.recv()
        assert elicitation["method"] == "elicitation/create"
        await a.send(
            {
                "jsonrpc": "2.0",
                "id": elicitation["id"],
                "result": {"action": "accept", "content": {"name": "ada"}},
            }
        )
        assert tool_text(await a.response(ask)) == "accept:ada"

        # Both busy: the child's request cannot be attributed, so it is refused, not guessed.
        slow = await b.call_tool("slow", {"steps": 40, "delay": 0.05}, progress_token="b")
        await next_progress(b, "b")
        ask = await a.call_tool("ask", {"message": "again?"})
        refused = await a.response(ask)
        # The SDK fails the tool call with the error the child was answered.
        assert refused["error"]["message"] == CANNOT_ATTRIBUTE, refused
        wait_until(lambda: bool(shared.events("upstream.shared_unattributed")))
        for client in (a, b):
            assert not [m for m in client.received if m.get("method") == "elicitation/create"][1:]
        assert tool_text(await b.response(slow)) == "slow done after 40"
    finally:
        await a.close()
        await b.close()


async def test_a_pool_of_children_shares_the_sessions(tmp_path: Path, counter_dir: Path) -> None:
    proxy = shared_proxy(tmp_path, counter_dir, pool_size=2).start()
    try:
        clients = await asyncio.gather(*(session(proxy) for _ in range(20)))
        try:
            pids = set()
            for i, client in enumerate(clients):
                answer = await client.response(await client.call_tool("pid", {}))
                pids.add(tool_text(answer))
                echoed = await client.response(await client.call_tool("echo", {"text": f"{i}"}))
                assert tool_text(echoed) == f"{i}"
            assert len(pids) == 2  # both children serve sessions
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        assert len(proxy.upstream_pids()) == 2
        assert proxy.terminate() == 0  # the daemon stops its pool
        assert not [pid for pid in proxy.upstream_pids() if pid_alive(pid)]
    finally:
        proxy.kill()


async def test_parked_sessions_stop_the_child_and_resume_on_a_new_one(
    tmp_path: Path, counter_dir: Path
) -> None:
    config = tmp_path / "park.toml"
    config.write_text(
        '[upstream]\nmode = "shared"\n[sessions]\npark_after_s = 0.3\nsweep_interval_s = 0.1\n'
    )
    proxy = ProxyProcess(
        tmp_path / "db.sqlite",
        None,
        "--config",
        str(config),
        env={"FIXTURE_COUNTER_DIR": str(counter_dir)},
    ).start()
    try:
        clients = [await session(proxy) for _ in range(3)]
        ids, cursors = [], []
        for client in clients:
            await client.response(await client.call_tool("echo", {"text": "before"}))
            ids.append(client.ws._response.cookies["mcp_session_id"].value)
            cursors.append(max(client.lsns()))
            await client.close()
        wait_until(lambda: len(proxy.events("session.parked")) == 3)
        [pid] = proxy.upstream_pids()
        wait_until(lambda: not pid_alive(pid))  # the last session left: the child stopped
        assert proxy.events("upstream.shared_idle")
        back = [
            await WsClient.connect(proxy.url, sid, last_lsn=cursor)
            for sid, cursor in zip(ids, cursors, strict=True)
        ]
        try:
            for i, client in enumerate(back):
                echoed = await client.response(await client.call_tool("echo", {"text": f"{i}"}))
                assert tool_text(echoed) == f"{i}"
            assert len(proxy.upstream_pids()) == 2  # one new child for the three of them
        finally:
            for client in back:
                await client.close()
    finally:
        proxy.kill()


async def test_one_sessions_log_level_does_not_silence_the_others(shared: ProxyProcess) -> None:
    """Issue 15, finding 14: a client asking for "emergency" only must not lower the level of
    the child it shares with a client that never sent logging/setLevel."""
    quiet, bystander = await session(shared), await session(shared)
    try:
        answer = await quiet.call("logging/setLevel", {"level": "emergency"})
        assert "result" in answer, answer
        rid = await bystander.call_tool("log_later", {"text": "for the bystander", "delay": 0})
        assert tool_text(await bystander.response(rid)) == "logged"
        logs = [m for m in bystander.received if m.get("method") == "notifications/message"]
        assert [m["params"]["data"] for m in logs] == ["for the bystander"]
        # The quiet one still gets nothing below its own level.
        rid = await quiet.call_tool("log_later", {"text": "too verbose", "delay": 0})
        assert tool_text(await quiet.response(rid)) == "logged"
        assert not [m for m in quiet.received if m.get("method") == "notifications/message"]
    finally:
        await asyncio.gather(quiet.close(), bystander.close())


# A stdio server that, like many, finishes the work in hand when its stdin closes before it
# exits (the SDK server instead cancels it and answers -32000 "Connection closed").
FINISHER = """
import json, sys, threading, time
lock = threading.Lock()
def write(msg):
    with lock:
        sys.stdout.write(json.dumps(msg) + "\\n")
        sys.stdout.flush()
def work(rid, token, delay):
    if token is not None:
        write({"jsonrpc": "2.0", "method": "notifications/progress",
               "params": {"progressToken": token, "progress": 1}})
    time.sleep(delay)
    write({"jsonrpc": "2.0", "id": rid,
           "result": {"content": [{"type": "text", "text": "finished"}]}})
threads = []
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    if msg["method"] == "initialize":
        write({"jsonrpc": "2.0", "id": msg["id"], "result": {
            "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
            "serverInfo": {"name": "finisher", "version": "1"}}})
    elif msg["method"] == "tools/call":
        params = msg["params"]
        token = params.get("_meta", {}).get("progressToken")
        args = (msg["id"], token, params["arguments"]["delay"])
        thread = threading.Thread(target=work, args=args)
        thread.start()
        threads.append(thread)
    else:
        write({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
for thread in threads:
    thread.join()
"""


async def restart_during_call(
    tmp_path: Path, upstream: str | None, env: dict[str, str], arguments: dict[str, Any]
) -> dict[str, Any]:
    """Start a call of the tool ``work`` (``slow`` on the fixture server), SIGTERM the proxy
    once the child runs it, restart, resume: the call's answer as the client then sees it."""
    config = tmp_path / "stop.toml"
    # The child's stop ladder waits long enough after closing its stdin for it to answer;
    # no drain, so the call is still running when the shutdown stops the child (the drain
    # itself: tests/e2e/test_drain.py).
    config.write_text(
        '[server]\ndrain_timeout_s = 0\n[upstream]\nmode = "shared"\nstdin_close_grace_s = 8.0\n'
    )
    proxy = ProxyProcess(tmp_path / "db.sqlite", upstream, "--config", str(config), env=env)
    proxy.start()
    try:
        client = await WsClient.connect(proxy.url)
        assert "result" in await client.initialize()
        sid = client.ws._response.cookies["mcp_session_id"].value
        name = "slow" if upstream is None else "work"  # slow: unsafe to repeat, -32010 if lost
        params = {"name": name, "arguments": arguments, "_meta": {"progressToken": "p"}}
        rid = await client.request("tools/call", params)
        await next_progress(client, "p")  # running on the child
        cursor = max(client.lsns())
        stopping = asyncio.ensure_future(asyncio.to_thread(proxy.terminate))
        with contextlib.suppress(ConnectionError):
            while True:  # read on, so the 1012 close is answered at once
                await client.recv()
        assert await stopping == 0
        await client.close()
        assert all(m.get("id") != rid for m in client.received)  # not answered before the close
        proxy.start()
        back = await WsClient.connect(proxy.url, sid, last_lsn=cursor)
        try:
            return await back.response(rid)
        finally:
            await back.close()
    finally:
        proxy.kill()


async def test_an_answer_written_during_a_graceful_shutdown_reaches_the_client(
    tmp_path: Path,
) -> None:
    """Issue 16, item 11: a call still running when the proxy gets SIGTERM is answered by the
    child while it is being stopped; that answer is logged and replayed after the restart,
    not replaced by -32010 (the session used to cancel its calls on the child first)."""
    finisher = tmp_path / "finisher.py"
    finisher.write_text(FINISHER)
    upstream = f"stdio:{sys.executable} {finisher}"
    answer = await restart_during_call(tmp_path, upstream, {}, {"delay": 1.0})
    assert "result" in answer, answer
    assert tool_text(answer) == "finished"


async def test_the_sdk_servers_own_answer_at_shutdown_reaches_the_client(
    tmp_path: Path, counter_dir: Path
) -> None:
    """The SDK server answers a call cut by its stdin closing with its own error: the client
    gets that answer (the server's word on it), not the proxy's -32010."""
    env = {"FIXTURE_COUNTER_DIR": str(counter_dir)}
    answer = await restart_during_call(tmp_path, None, env, {"steps": 50, "delay": 0.2})
    assert answer["error"]["code"] == -32000, answer
    assert answer["error"]["message"] == "Connection closed"
