"""The WebSocket front against the real daemon and a real stdio MCP server."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.test_http_upstream import HttpFixture
from tests.e2e.test_shared_upstream import shared_proxy
from tests.helpers import (
    INIT_PARAMS,
    MS,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    logged,
    lsn_of,
    pid_alive,
    read_sse,
    tool_text,
    wait_until,
)


async def test_initialize_mints_session_and_numbers_every_message(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        assert client.ws.protocol == "mcp"  # the SDKs' subprotocol is echoed
        cookie = client.ws._response.cookies["mcp_session_id"]
        init = await client.initialize()
        session_id = init["result"]["mcpSessionId"]
        assert session_id == cookie.value and len(session_id) >= 22  # >= 128 bits
        assert init["result"]["serverInfo"]["name"] == "fixture"
        assert lsn_of(init) == 1
        response = await client.response(await client.call_tool("echo", {"text": "hi"}))
        assert tool_text(response) == "hi"
        assert client.lsns() == [1, 2]
    finally:
        await client.close()


async def test_resume_after_drop_during_slow_call(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    init = await client.initialize()
    session_id = init["result"]["mcpSessionId"]
    call_id = await client.call_tool("slow", {"steps": 5, "delay": 100 * MS}, progress_token="p1")
    first = await client.recv()
    assert first["method"] == "notifications/progress"
    cursor = client.lsns()[-1]
    before = list(client.received)
    await client.drop()  # no close frame: a network cut

    # The call keeps running while nobody is attached; progress is logged meanwhile.
    wait_until(lambda: logged(proxy.db, session_id, '"progress":3'))
    again = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        result = await again.response(call_id)
        assert tool_text(result) == "slow done after 5"
        progress = [
            m["params"]["progress"]
            for m in again.received
            if m.get("method") == "notifications/progress"
        ]
        assert progress == [2, 3, 4, 5]  # exactly what was missed, once, in order
        lsns = [lsn_of(m) for m in before + again.received]
        assert lsns == list(range(1, len(lsns) + 1))  # dense, no gap, no duplicate
    finally:
        await again.close()


async def test_resume_by_reinitialize_with_mcp_session_id(proxy: ProxyProcess) -> None:
    """SEP draft v3: the session id travels in the re-sent initialize, not in the URL."""
    client = await WsClient.connect(proxy.url)
    init = await client.initialize()
    session_id = init["result"]["mcpSessionId"]
    call_id = await client.call_tool("echo", {"text": "while away"})
    await client.response(call_id)
    await client.close()

    fresh = await WsClient.connect(proxy.url)  # no id on the URL
    try:
        params = {**INIT_PARAMS, "_meta": {"io.mcproxy/lastLsn": 1}}
        resumed = await fresh.response(
            await fresh.request("initialize", {**params, "mcpSessionId": session_id})
        )
        meta = resumed["result"]["_meta"]
        assert meta["io.mcproxy/resumed"] is True and meta["io.mcproxy/headLsn"] == 2
        assert resumed["result"]["mcpSessionId"] == session_id
        assert resumed["result"]["serverInfo"]["name"] == "fixture"
        replayed = await fresh.recv()  # LSN 2, the echo response, replayed after the answer
        assert replayed["id"] == call_id and lsn_of(replayed) == 2
        # The resumed initialize was answered by the proxy: the upstream saw one initialize.
        assert len(proxy.upstream_pids()) == 1
    finally:
        await fresh.close()


async def test_last_connection_wins(proxy: ProxyProcess) -> None:
    first = await WsClient.connect(proxy.url)
    session_id = (await first.initialize())["result"]["mcpSessionId"]
    second = await WsClient.connect(proxy.url, session_id, last_lsn=1)
    try:
        closed = await first.ws.receive(timeout=TIMEOUT)
        assert closed.type is aiohttp.WSMsgType.CLOSE
        assert closed.data == 1000
        assert closed.extra == "MCP session reconnected on another connection"
        await first.close()  # the old socket's late close must not unbind the new one
        wait_until(lambda: len(proxy.events("ws.closed")) == 1)
        response = await second.response(await second.call_tool("echo", {"text": "still"}))
        assert tool_text(response) == "still"
    finally:
        await second.close()


async def test_retried_request_id_runs_once(proxy: ProxyProcess, counter_dir: Path) -> None:
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    params = {"name": "bump", "arguments": {"name": "done", "delay": 0}}
    first = await client.response(await client.request("tools/call", params, "r1"))
    client.received.clear()
    again = await client.response(await client.request("tools/call", params, "r1"))
    assert again == first  # the logged response, same LSN: a cursor-keeping client drops it
    assert (counter_dir / "done").read_text().count("x") == 1

    # A retry of a request still running after a drop: joined, not re-run.
    params = {"name": "bump", "arguments": {"name": "flying", "delay": 300 * MS}}
    await client.request("tools/call", params, "r2")
    cursor = client.lsns()[-1]
    await client.drop()
    resumed = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        await resumed.request("tools/call", params, "r2")
        response = await resumed.response("r2")
        assert tool_text(response) == "1"
        await asyncio.sleep(100 * MS)  # proves an absence: no second answer turns up
        assert [m for m in resumed.received if m.get("id") == "r2"] == [response]
        assert (counter_dir / "flying").read_text().count("x") == 1
    finally:
        await resumed.close()


async def test_upstream_crash_is_respawned_and_reinitialized(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        await client.call("tools/list")  # teaches the proxy which tools are read-only
        pid_before = int(tool_text(await client.response(await client.call_tool("pid", {}))))
        reading = await client.call_tool("slow_read", {"steps": 3, "delay": 100 * MS}, "r")
        assert (await client.recv())["method"] == "notifications/progress"  # it is running
        crashed = await client.response(await client.call_tool("crash", {}))
        assert crashed["error"]["code"] == -32010  # outcome unknown: never silently re-run
        assert crashed["error"]["data"]["method"] == "tools/call"
        # The read-only call in flight was re-issued to the new child and completes.
        assert tool_text(await client.response(reading)) == "read done after 3"
        pid_after = int(tool_text(await client.response(await client.call_tool("pid", {}))))
        assert pid_after != pid_before
        wait_until(lambda: not pid_alive(pid_before))
        assert len(proxy.events("upstream.lost")) == 1
    finally:
        await client.close()


async def test_elicitation_waits_for_the_client_to_return(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    call_id = await client.call_tool("ask", {"message": "your name?"})
    await client.drop()  # gone before the server asks
    wait_until(lambda: logged(proxy.db, session_id, "elicitation/create"))  # asked, nobody there

    back = await WsClient.connect(proxy.url, session_id, last_lsn=1)
    try:
        ask = await back.recv()
        assert ask["method"] == "elicitation/create"
        assert ask["params"]["message"] == "your name?"
        await back.send(
            {
                "jsonrpc": "2.0",
                "id": ask["id"],
                "result": {"action": "accept", "content": {"name": "Ada"}},
            }
        )
        assert tool_text(await back.response(call_id)) == "accept:Ada"
    finally:
        await back.close()


async def test_sampling_round_trip(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        call_id = await client.call_tool("sample", {"prompt": "say hi"})
        request = await client.recv()
        assert request["method"] == "sampling/createMessage"
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": request["id"],
                "result": {
                    "role": "assistant",
                    "content": {"type": "text", "text": "hi there"},
                    "model": "test-model",
                    "stopReason": "endTurn",
                },
            }
        )
        assert tool_text(await client.response(call_id)) == "hi there"
    finally:
        await client.close()


async def test_cancel_is_forwarded_with_translated_id(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        call_id = await client.call_tool("slow", {"steps": 20, "delay": 50 * MS}, "tok")
        await client.recv()  # first progress: the call is running upstream
        await client.send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": call_id, "reason": "changed my mind"},
            }
        )
        echo = await client.response(await client.call_tool("echo", {"text": "after"}))
        assert tool_text(echo) == "after"
        await asyncio.sleep(1200 * MS)  # longer than the call would have taken
        assert not [m for m in client.received if m.get("id") == call_id]
        progress = [m for m in client.received if m.get("method") == "notifications/progress"]
        assert len(progress) < 20  # the upstream stopped: it got the cancel under its own id
        retry = await client.response(
            await client.request(
                "tools/call", {"name": "slow", "arguments": {"steps": 1, "delay": 0}}, call_id
            )
        )
        assert retry["error"]["code"] == -32800
    finally:
        await client.close()


async def test_sigterm_closes_with_1012_and_stops_children(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    await client.initialize()
    pids = proxy.upstream_pids()
    assert pids and all(pid_alive(p) for p in pids)
    proxy.proc.send_signal(15)  # type: ignore[union-attr]
    frame = await client.ws.receive(timeout=TIMEOUT)
    assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == 1012
    assert proxy.proc.wait(TIMEOUT) == 0  # type: ignore[union-attr]
    await client.close()
    wait_until(lambda: not any(pid_alive(p) for p in pids))


async def test_progress_keeps_increasing_when_a_call_is_reissued(proxy: ProxyProcess) -> None:
    """basic/utilities/progress: the value MUST increase. A read-only call re-issued after
    its child was killed starts over at 1 under the client's token: held back until it
    passes what the client already saw."""
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        await client.call("tools/list")
        call = await client.call_tool("slow_read", {"steps": 4, "delay": 300 * MS}, "tok")

        def notes() -> list[float]:
            return [
                m["params"]["progress"]
                for m in client.received
                if m.get("method") == "notifications/progress"
            ]

        while len(notes()) < 2:
            await client.recv()
        [child] = proxy.upstream_pids()
        os.kill(child, signal.SIGKILL)
        answer = await client.response(call)
        assert tool_text(answer) == "read done after 4"  # re-issued on a new child
        assert len(proxy.upstream_pids()) == 2
        values = notes()
        assert values == sorted(set(values)) and values[-1] == 4, values
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["per-session", "shared"])
async def test_read_only_calls_are_reissued_for_a_client_that_never_listed_tools(
    mode: str, tmp_path: Path, counter_dir: Path
) -> None:
    """The proxy lists the tools itself (its answers never reach the client or the log), so
    a client that cached its tool list still gets its read-only call re-issued."""
    if mode == "shared":
        proxy = shared_proxy(tmp_path, counter_dir)
    else:
        proxy = ProxyProcess(tmp_path / "mcproxy.db", env={"FIXTURE_COUNTER_DIR": str(counter_dir)})
    proxy.start()
    client = await WsClient.connect(proxy.url)
    try:
        session_id = (await client.initialize())["result"]["mcpSessionId"]
        call = await client.call_tool("slow_read", {"steps": 3, "delay": 300 * MS}, "tok")
        while not any(m.get("method") == "notifications/progress" for m in client.received):
            await client.recv()
        [child] = proxy.upstream_pids()
        os.kill(child, signal.SIGKILL)
        answer = await client.response(call)
        assert tool_text(answer) == "read done after 3"  # re-issued, not -32010
        assert len(proxy.upstream_pids()) == 2
        assert not logged(proxy.db, session_id, '"tools":[')  # the listing stayed inside
        assert not any("tools" in m.get("result", {}) for m in client.received)
    finally:
        await client.close()
        proxy.kill()


async def test_a_resume_below_the_log_floor_is_told_its_replay_is_partial(
    proxy: ProxyProcess,
) -> None:
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    done = await client.response(await client.call_tool("slow", {"steps": 3, "delay": 0}, "p"))
    assert client.lsns() == [1, 2, 3, 4, 5] and lsn_of(done) == 5  # 2-4: progress
    await client.drop()
    # A resume from 4 acknowledges (and prunes) everything up to it: the floor is 4.
    acked = await WsClient.connect(proxy.url, session_id, last_lsn=4)
    assert lsn_of(await acked.recv()) == 5
    await acked.close()
    wait_until(lambda: not logged(proxy.db, session_id, "notifications/progress"))

    # A stale cursor (draft v3: in a re-sent initialize): LSNs 2-4 are gone, and it is told.
    stale = await WsClient.connect(proxy.url)
    try:
        params = {**INIT_PARAMS, "_meta": {"mcpSessionId": session_id, "io.mcproxy/lastLsn": 1}}
        await stale.send(
            {"jsonrpc": "2.0", "id": "again", "method": "initialize", "params": params}
        )
        answer = await stale.recv()
        # The answer to a re-sent initialize is the connection's own: no LSN (documented),
        # the log head instead.
        assert answer["id"] == "again" and lsn_of(answer) is None
        assert answer["result"]["_meta"]["io.mcproxy/headLsn"] == 5
        notice = await stale.recv()
        assert notice["method"] == "notifications/io.mcproxy/replayPartial"
        assert notice["params"] == {"afterLsn": 1, "floorLsn": 4}  # no LSN either
        assert lsn_of(await stale.recv()) == 5  # then the replay, from what is left
    finally:
        await stale.close()
    # An exact resume gets no notice.
    exact = await WsClient.connect(proxy.url, session_id, last_lsn=5)
    try:
        echo = await exact.response(await exact.call_tool("echo", {"text": "x"}))
        assert [lsn_of(m) for m in exact.received] == [6] and tool_text(echo) == "x"
    finally:
        await exact.close()


async def test_read_only_calls_are_reissued_without_a_client_listing_over_http(
    tmp_path: Path,
) -> None:
    """The same with a Streamable HTTP upstream killed and started again mid-call."""
    upstream = await HttpFixture(tmp_path).start()
    config = tmp_path / "resume.toml"  # keep resuming the stream until the server is back
    config.write_text("[upstream]\nsse_max_reconnects = 10\n")
    proxy = ProxyProcess(tmp_path / "mcproxy.db", upstream.url, "--config", str(config)).start()
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        call = await client.call_tool("slow_read", {"steps": 4, "delay": 300 * MS}, "tok")
        while not any(m.get("method") == "notifications/progress" for m in client.received):
            await client.recv()
        upstream.kill()
        await upstream.start()  # same port, no sessions: 404 for the old one
        answer = await client.response(call)
        assert tool_text(answer) == "read done after 4"  # re-issued, not -32010
        assert not any("tools" in m.get("result", {}) for m in client.received)
    finally:
        await client.close()
        proxy.kill()
        upstream.kill()


async def test_an_http_resume_below_the_log_floor_is_told_too(proxy: ProxyProcess) -> None:
    """Over SSE the notice is an event without `id` (the client's Last-Event-ID stays)."""
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        arguments = {"steps": 3, "delay": 0}
        slow = {"name": "slow", "arguments": arguments, "_meta": {"progressToken": 1}}
        _, events = await client.request("tools/call", slow)  # LSNs 2-4: progress; 5: answer
        assert [e.id for e in events if e.data.strip()][-1].endswith(".5")
        headers = client.headers(**{"Last-Event-ID": "4"})  # a plain LSN: every stream
        async with client.http.get(proxy.url, headers=headers) as resp:
            assert resp.status == 200
            await read_sse(resp, stop=lambda e: e.id == "5")
        headers = client.headers(**{"Last-Event-ID": "1"})  # stale: 2-4 were acknowledged
        async with client.http.get(proxy.url, headers=headers) as resp:
            events = await read_sse(resp, stop=lambda e: e.id == "5")
        notice = events[0]
        assert notice.id is None
        assert notice.json()["method"] == "notifications/io.mcproxy/replayPartial"
        assert notice.json()["params"] == {"afterLsn": 1, "floorLsn": 4}
    finally:
        await client.close()
