"""SIGKILL the proxy mid-traffic, restart it on the same database: nothing lost or doubled."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    INIT_PARAMS,
    MS,
    ProxyProcess,
    WsClient,
    eventually,
    logged,
    lsn_of,
    pid_alive,
    tool_text,
    wait_until,
)


async def test_sigkill_mid_traffic_then_resume(proxy: ProxyProcess, counter_dir: Path) -> None:
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    await client.call("tools/list")  # the proxy learns slow_read is read-only
    unsafe = await client.call_tool("slow", {"steps": 30, "delay": 0.1}, "unsafe")
    safe = await client.call_tool("slow_read", {"steps": 2, "delay": 0.4}, "safe")
    done_before: list[int | str] = []
    for i in range(20):  # traffic while the slow calls run
        rid = await client.call_tool("echo", {"text": f"m{i}"})
        done_before.append(rid)
    for rid in done_before:
        await client.response(rid)
    pids = proxy.upstream_pids()
    seen = list(client.received)
    cursor = max(client.lsns())
    await client.drop()
    proxy.kill()
    wait_until(lambda: not any(pid_alive(p) for p in pids))  # children died with the proxy

    proxy.start()  # same database file
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        lost = await back.response(unsafe)
        assert lost["error"]["code"] == -32010
        assert lost["error"]["data"]["reason"] == "proxy restarted"
        assert tool_text(await back.response(safe)) == "read done after 2"  # re-issued
        # The session carries on without a new initialize; the child is respawned on demand.
        echo = await back.response(await back.call_tool("echo", {"text": "after"}))
        assert tool_text(echo) == "after"
        lsns = [lsn_of(m) for m in seen + back.received]
        assert lsns == list(range(1, len(lsns) + 1))
    finally:
        await back.close()


async def test_every_logged_message_survives_sigkill(proxy: ProxyProcess, tmp_path: Path) -> None:
    """Kill while responses stream; everything committed is replayed, in order, once."""
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    for i in range(200):
        await client.call_tool("echo", {"text": f"burst {i}"})
    while len(client.received) < 40:
        await client.recv()
    proxy.kill()  # mid-burst
    received_before = list(client.received)
    await client.drop()

    proxy.start()
    # Read-only calls (the proxy learned `echo` is one) are re-issued: wait for their answers.
    wait_until(lambda: _request_rows(proxy.db, session_id) == 0)
    head = (
        sqlite3.connect(proxy.db)
        .execute("SELECT max(lsn), count(*) FROM events WHERE session_id = ?", (session_id,))
        .fetchone()
    )
    assert head[0] == head[1]  # the log itself is dense
    back = await WsClient.connect(proxy.url, session_id, last_lsn=0)
    try:
        replay = [await back.recv() for _ in range(head[0])]
        assert [lsn_of(m) for m in replay] == list(range(1, head[0] + 1))
        # Whatever the client saw before the kill is a prefix of the durable log.
        assert replay[: len(received_before)] == received_before
        # Every request the proxy had recorded is answered (a result or outcome-unknown):
        # none is left in flight, and each answer is logged with its request's key. Requests
        # still in the client's socket buffer at the kill were never accepted.
        answered = {m["id"] for m in replay if "id" in m and "method" not in m}
        db = sqlite3.connect(proxy.db)
        (open_,) = db.execute(
            "SELECT count(*) FROM requests WHERE session_id = ? AND done = 0", (session_id,)
        ).fetchone()
        keys = db.execute(
            "SELECT request_key FROM events WHERE session_id = ? AND request_key IS NOT NULL",
            (session_id,),
        ).fetchall()
        assert open_ == 0 and {json.loads(k) for (k,) in keys} == answered
        assert len(answered) > 40
    finally:
        await back.close()


async def test_unknown_session_in_url_becomes_a_new_session(proxy: ProxyProcess) -> None:
    proposed = "client-chosen-id-0123456789"
    client = await WsClient.connect(proxy.url, proposed)
    try:
        init = await client.initialize()
        assert init["result"]["mcpSessionId"] == proposed
    finally:
        await client.close()
    wait_until(lambda: logged(proxy.db, proposed, "serverInfo"))
    proxy.kill()
    proxy.start()
    again = await WsClient.connect(proxy.url, proposed, last_lsn=1)
    try:
        resumed = await again.call("initialize", INIT_PARAMS)
        assert resumed["result"]["_meta"]["io.mcproxy/resumed"] is True
    finally:
        await again.close()


@pytest.mark.parametrize(
    ("tool", "arguments", "method"),
    [
        ("sample", {"prompt": "hello"}, "sampling/createMessage"),
        ("ask", {"message": "your name?"}, "elicitation/create"),
    ],
)
async def test_server_requests_pending_at_a_sigkill_are_withdrawn(
    proxy: ProxyProcess, tool: str, arguments: dict[str, Any], method: str
) -> None:
    """PROTOCOL.md, *Upstream loss*: a server request of a dead upstream is withdrawn, also
    when the proxy itself was killed; a late answer to it goes nowhere (and is logged).
    Sampling and elicitation alike (issue 16 item 2)."""
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    call = await client.call_tool(tool, arguments)
    ask = await client.recv()
    while ask.get("method") != method:
        ask = await client.recv()
    cursor = max(client.lsns())
    await client.drop()
    proxy.kill()

    proxy.start()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        withdrawn = await back.recv()
        assert withdrawn["method"] == "notifications/cancelled"
        assert withdrawn["params"]["requestId"] == ask["id"]
        assert withdrawn["params"]["reason"] == "upstream lost: proxy restarted"
        lost = await back.response(call)  # after its server request was withdrawn
        assert lost["error"]["code"] == -32010
        assert [lsn_of(m) for m in back.received] == [cursor + 1, cursor + 2]
        await back.send({"jsonrpc": "2.0", "id": ask["id"], "result": {"late": True}})
        await eventually(lambda: proxy.events("session.answer_dropped"))
        [dropped] = proxy.events("session.answer_dropped")
        assert dropped["id"] == ask["id"] and dropped["reason"] == "late answer"
    finally:
        await back.close()
    # Withdrawn once: a second restart does not withdraw it again.
    proxy.kill()
    proxy.start()
    again = await WsClient.connect(proxy.url, session_id, last_lsn=cursor + 2)
    try:
        echo = await again.response(await again.call_tool("echo", {"text": "x"}))
        assert tool_text(echo) == "x" and lsn_of(echo) == cursor + 3
    finally:
        await again.close()


async def test_a_request_never_written_to_the_child_runs_after_a_sigterm_restart(
    proxy: ProxyProcess, counter_dir: Path
) -> None:
    """A request queued for a child that was still starting when the proxy stopped never
    reached any process: the next one runs it (once), no -32010."""
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    await client.call("tools/call", {"name": "echo", "arguments": {"text": "up"}})
    (counter_dir / "start_delay").write_text("60")  # the respawned child starts slowly
    crashed = await client.response(await client.call_tool("crash", {}))
    assert crashed["error"]["code"] == -32010
    bump = await client.call_tool("bump", {"name": "queued"})
    wait_until((counter_dir / "start_delay.waiting").exists)  # the new child is not reading
    wait_until(lambda: _request_rows(proxy.db, session_id) == 1)  # on record, not written
    cursor = max(client.lsns())
    (counter_dir / "start_delay").unlink()
    assert proxy.terminate() == 0
    await client.drop()

    proxy.start()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        answer = await back.response(bump)
        assert tool_text(answer) == "1"  # ran once, on the new process
        assert (counter_dir / "queued").read_text() == "x\n"
    finally:
        await back.close()


def _request_rows(db: Path, session_id: str) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM requests WHERE session_id = ? AND done = 0", (session_id,)
        ).fetchone()
    return int(count)


async def test_an_answer_the_child_writes_while_stopping_is_delivered(
    tmp_path: Path, counter_dir: Path
) -> None:
    """SIGTERM: the child's stdin is closed and it answers what it was running (the mcp SDK
    says "Connection closed") before it exits; that answer is logged and delivered after the
    restart, not replaced by -32010. (No drain here, so the call is still running when the
    child is stopped: the drain is tests/e2e/test_drain.py.)"""
    config = tmp_path / "nodrain.toml"
    config.write_text("[server]\ndrain_timeout_s = 0\n")
    env = {"FIXTURE_COUNTER_DIR": str(counter_dir)}
    proxy = ProxyProcess(tmp_path / "own.db", None, "--config", str(config), env=env).start()
    try:
        await _answer_while_stopping(proxy)
    finally:
        proxy.kill()


async def _answer_while_stopping(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    call = await client.call_tool("slow", {"steps": 1000, "delay": 50 * MS}, "p")
    while not any(m.get("method") == "notifications/progress" for m in client.received):
        await client.recv()
    cursor = max(client.lsns())
    assert proxy.terminate() == 0
    await client.drop()

    proxy.start()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        answer = await back.response(call)
        assert answer["error"]["code"] != -32010, answer  # the child's own answer
        assert answer["error"]["message"] == "Connection closed"
    finally:
        await back.close()


async def test_progress_keeps_increasing_when_a_call_is_reissued_after_a_sigkill(
    proxy: ProxyProcess,
) -> None:
    """basic/utilities/progress: the value MUST increase, also across a proxy restart that
    re-issues a read-only call (its new process starts over at 1 under the same token)."""
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    call = await client.call_tool("slow_read", {"steps": 4, "delay": 300 * MS}, "tok")

    def notes(received: list[dict[str, Any]]) -> list[float]:
        return [
            m["params"]["progress"] for m in received if m.get("method") == "notifications/progress"
        ]

    while len(notes(client.received)) < 2:
        await client.recv()
    before = notes(client.received)
    cursor = max(client.lsns())
    await client.drop()
    proxy.kill()

    proxy.start()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        assert tool_text(await back.response(call)) == "read done after 4"  # re-issued
        values = before + notes(back.received)
        assert values == sorted(set(values)) and values[-1] == 4, values
    finally:
        await back.close()
