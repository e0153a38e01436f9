"""The shared upstream's routing tables, without processes: a fake child records what it is
sent, and what it "writes" is fed to the pool's demultiplexer directly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from typing import Any

import pytest

from mcproxy.core import jsonrpc
from mcproxy.errors import UpstreamError
from mcproxy.upstreams.shared import (
    CANNOT_ATTRIBUTE,
    MAX_PENDING_PER_SESSION,
    SharedPool,
    SharedUpstream,
)

INIT_RESULT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}},
    "serverInfo": {"name": "child", "version": "1"},
}
FULL_CAPS = {"sampling": {}, "elicitation": {"form": {}}, "roots": {}}


class FakeProc:
    """Stands in for a child process (``StdioUpstream``): records every line sent to it.
    What the child writes is fed to ``handler``, the pool's demultiplexer for it."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


class Recorder:
    """A session as the shared upstream sees it (``UpstreamHandler``)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.related: list[int | None] = []
        self.lost: list[str] = []
        self.unsent: list[list[int]] = []

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        self.messages.append(json.loads(line))
        self.related.append(related)

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self.lost.append(reason)
        self.unsent.append(sorted(unsent))

    def take(self) -> list[dict[str, Any]]:
        messages, self.messages = self.messages, []
        self.related.clear()
        return messages


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def request(rid: int | str, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        message["params"] = params
    return encode(message)


def notification(method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return encode(message)


def result(rid: int | str, value: Any) -> bytes:
    return encode({"jsonrpc": "2.0", "id": rid, "result": value})


async def settle() -> None:
    """Let the pool's own answers (queued with call_soon) run: one loop turn, no timing."""
    await asyncio.sleep(0)


class Rig:
    def __init__(self, size: int = 1, max_in_flight: int = 0) -> None:
        self.spawned: list[FakeProc] = []
        self.pool = SharedPool(self.spawn, size, init_timeout_s=5.0, max_in_flight=max_in_flight)

    def spawn(self, handler: Any, label: str) -> FakeProc:
        proc = FakeProc(handler)
        self.spawned.append(proc)
        return proc

    @property
    def child(self) -> Any:
        return self.pool.children[0]

    @property
    def proc(self) -> FakeProc:
        proc = self.child.proc
        assert isinstance(proc, FakeProc)
        return proc

    def feed(self, line: bytes) -> None:
        """The (current) first child writes ``line``."""
        self.proc.handler.on_upstream_message(line)

    async def session(self, caps: dict[str, Any] | None = None) -> tuple[SharedUpstream, Recorder]:
        """A session started and initialized on the pool (local id 1 for its initialize)."""
        recorder = Recorder()
        up = self.pool("session-id-0123456789", recorder)
        await up.start()
        params = {"protocolVersion": "2025-11-25", "capabilities": caps or {}}
        up.send(request(1, "initialize", {**params, "clientInfo": {"name": "t", "version": "1"}}))
        assert up.child is not None and isinstance(up.child.proc, FakeProc)
        proc = up.child.proc
        for sent in proc.take():
            if sent.get("method") == "initialize":  # the first on this child: answer it
                up.child.from_child(result(sent["id"], INIT_RESULT))
                assert proc.take() == [{"jsonrpc": "2.0", "method": "notifications/initialized"}]
        await settle()
        assert recorder.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
        up.send(notification("notifications/initialized"))
        return up, recorder


async def test_first_initialize_reaches_the_child_later_ones_are_answered_locally() -> None:
    rig = Rig()
    a, b = Recorder(), Recorder()
    first, second = rig.pool("s1", a), rig.pool("s2", b)
    await first.start()
    await second.start()
    first.send(request(1, "initialize", {"capabilities": FULL_CAPS, "clientInfo": {"name": "a"}}))
    second.send(request(7, "initialize", {"capabilities": {}, "clientInfo": {"name": "b"}}))
    (init,) = rig.proc.take()  # one initialize: the first client's, under a pool id
    assert init["method"] == "initialize" and init["params"]["clientInfo"] == {"name": "a"}
    rig.feed(result(init["id"], INIT_RESULT))
    assert rig.proc.take() == [{"jsonrpc": "2.0", "method": "notifications/initialized"}]
    await settle()
    assert a.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    assert b.take() == [{"jsonrpc": "2.0", "id": 7, "result": INIT_RESULT}]  # its own id
    first.send(notification("notifications/initialized"))
    second.send(notification("notifications/initialized"))
    assert rig.proc.take() == []  # the pool sent the child its own
    third, c = rig.pool("s3", Recorder()), None
    await third.start()
    third.send(request("init", "initialize", {"capabilities": {}}))
    await settle()
    c = third.handler
    assert isinstance(c, Recorder) and c.take()[0]["id"] == "init"
    assert rig.proc.take() == [] and rig.pool.stats["spawned"] == 1


async def test_a_refused_initialize_lets_the_next_client_try_its_own() -> None:
    rig = Rig()
    a, b = Recorder(), Recorder()
    first, second = rig.pool("s1", a), rig.pool("s2", b)
    await first.start()
    await second.start()
    first.send(request(1, "initialize", {"protocolVersion": "1999-01-01"}))
    second.send(request(1, "initialize", {"protocolVersion": "2025-11-25"}))
    (init,) = rig.proc.take()
    rig.feed(
        encode({"jsonrpc": "2.0", "id": init["id"], "error": {"code": -32602, "message": "v"}})
    )
    assert a.take()[0]["error"]["code"] == -32602
    (retry,) = rig.proc.take()  # the second client's own initialize, not the refused one's
    assert retry["params"]["protocolVersion"] == "2025-11-25" and retry["id"] != init["id"]
    rig.feed(result(retry["id"], INIT_RESULT))
    assert b.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]


async def test_ids_are_rewritten_both_ways_keeping_their_json_type() -> None:
    rig = Rig()
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(request(5, "tools/call", {"name": "echo"}))
    b.send(request(5, "tools/call", {"name": "echo"}))
    b.send(request("5", "tools/call", {"name": "echo"}))
    sent = rig.proc.take()
    ids = [m["id"] for m in sent]
    assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
    for position, pool_id in reversed(list(enumerate(ids))):  # answered out of order
        rig.feed(result(pool_id, {"n": position}))
    assert ra.messages == [{"jsonrpc": "2.0", "id": 5, "result": {"n": 0}}]
    assert ra.related == [5]
    assert rb.take() == [
        {"jsonrpc": "2.0", "id": "5", "result": {"n": 2}},
        {"jsonrpc": "2.0", "id": 5, "result": {"n": 1}},
    ]
    assert not rig.child.pending and not rig.child.busy and not a._local and not b._local
    rig.feed(result(ids[0], {}))  # a duplicate answer: nobody waits for it
    assert len(ra.messages) == 1 and rig.pool.stats["late_response"] == 1


async def test_progress_tokens_are_made_unique_and_routed_back() -> None:
    rig = Rig()
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "tok"}}))
    b.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "tok"}}))
    b.send(request(3, "tools/call", {"name": "slow", "_meta": {"progressToken": 7}}))
    calls = rig.proc.take()
    tokens = [m["params"]["_meta"]["progressToken"] for m in calls]
    assert len(set(tokens)) == 3 and "tok" not in tokens
    assert [type(t) for t in tokens] == [str, str, int]  # the JSON type is kept
    for token, step in zip(reversed(tokens), (1, 2, 3), strict=True):
        params = {"progressToken": token, "progress": step}
        rig.feed(notification("notifications/progress", params))
    assert ra.messages == [
        {"jsonrpc": "2.0", "method": "notifications/progress",
         "params": {"progressToken": "tok", "progress": 3}},
    ]  # fmt: skip
    assert ra.related == [2]  # the request it belongs to
    assert [(m["params"]["progressToken"], m["params"]["progress"]) for m in rb.messages] == [
        (7, 1),
        ("tok", 2),
    ]
    assert rb.related == [3, 2]
    rig.feed(result(calls[0]["id"], {}))
    rig.feed(notification("notifications/progress", {"progressToken": tokens[0], "progress": 9}))
    assert ra.take()[-1]["id"] == 2  # the late progress note was not delivered
    assert rig.pool.stats["unrouted_progress"] == 1
    assert len(rig.child.tokens) == 2


async def test_cancellation_is_translated_and_forgets_the_request() -> None:
    rig = Rig()
    (a, ra), _ = await rig.session(), await rig.session()
    a.send(request(4, "tools/call", {"name": "slow", "_meta": {"progressToken": 1}}))
    (call,) = rig.proc.take()
    a.send(notification("notifications/cancelled", {"requestId": 4, "reason": "bored"}))
    (cancel,) = rig.proc.take()
    assert cancel["params"] == {"requestId": call["id"], "reason": "bored"}
    assert not rig.child.pending and not rig.child.tokens and not rig.child.busy
    rig.feed(encode({"jsonrpc": "2.0", "id": call["id"], "error": {"code": 0, "message": "x"}}))
    assert ra.take() == []  # the core forgot it too
    a.send(notification("notifications/cancelled", {"requestId": 99}))  # unknown: ignored
    assert rig.proc.take() == []


async def test_server_requests_go_only_where_they_can_be_attributed() -> None:
    rig = Rig()
    (a, ra) = await rig.session(FULL_CAPS)
    # The only session on the child: it must be the one.
    rig.feed(request(0, "elicitation/create", {"message": "name?"}))
    assert ra.take()[0]["method"] == "elicitation/create"
    a.send(result(0, {"action": "accept"}))
    assert rig.proc.take() == [{"jsonrpc": "2.0", "id": 0, "result": {"action": "accept"}}]

    (b, rb) = await rig.session(FULL_CAPS)
    # Two sessions, neither busy: refused, never guessed.
    rig.feed(request(1, "sampling/createMessage", {}))
    (refusal,) = rig.proc.take()
    assert refusal["id"] == 1 and refusal["error"]["message"] == CANNOT_ATTRIBUTE
    assert ra.take() == [] and rb.take() == []
    # Exactly one of them with a request in flight: that one.
    b.send(request(9, "tools/call", {"name": "ask"}))
    call = rig.proc.take()[0]
    rig.feed(request(2, "elicitation/create", {"message": "name?"}))
    assert rb.messages[-1]["method"] == "elicitation/create" and rb.related[-1] == 9
    assert ra.take() == []
    a.send(result(2, {"action": "accept"}))  # not given to a: never forwarded
    assert rig.proc.take() == []
    rig.feed(notification("notifications/cancelled", {"requestId": 2}))  # the child withdraws
    assert rb.messages[-1]["method"] == "notifications/cancelled"
    b.send(result(2, {"action": "accept"}))  # too late: withdrawn
    assert rig.proc.take() == []
    # Both busy: refused again.
    a.send(request(3, "tools/call", {"name": "slow"}))
    rig.proc.take()
    rig.feed(request(3, "roots/list"))
    assert rig.proc.take()[0]["error"]["message"] == CANNOT_ATTRIBUTE
    assert rig.pool.stats["unattributed_request"] == 2
    # A ping from the child is the pool's to answer.
    rig.feed(request("p", "ping"))
    assert rig.proc.take() == [{"jsonrpc": "2.0", "id": "p", "result": {}}]
    del call


async def test_a_server_request_needs_the_capability_of_its_client() -> None:
    rig = Rig()
    (_, ra), (b, rb) = await rig.session(FULL_CAPS), await rig.session({})
    b.send(request(1, "tools/call", {"name": "sample"}))
    rig.proc.take()
    rig.feed(request(5, "sampling/createMessage", {}))
    (refusal,) = rig.proc.take()
    assert refusal["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert "'sampling'" in refusal["error"]["message"]
    assert ra.take() == [] and rb.take() == []


async def test_list_changed_fans_out_and_resource_updates_follow_subscriptions() -> None:
    rig = Rig()
    (a, ra), (b, rb), (c, rc) = [await rig.session() for _ in range(3)]
    a.send(request(2, "resources/subscribe", {"uri": "res://x"}))
    b.send(request(2, "resources/subscribe", {"uri": "res://x"}))  # while a's is in flight
    (subscribe,) = rig.proc.take()  # once per URI
    assert subscribe["params"] == {"uri": "res://x"}
    rig.feed(result(subscribe["id"], {}))
    await settle()
    assert ra.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    assert rb.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    c.send(request(2, "resources/subscribe", {"uri": "res://x"}))
    await settle()
    assert rig.proc.take() == [] and rc.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    c.send(request(3, "resources/unsubscribe", {"uri": "res://x"}))
    await settle()
    assert rig.proc.take() == [] and rc.take()[0]["id"] == 3

    rig.feed(notification("notifications/tools/list_changed"))
    rig.feed(notification("notifications/resources/updated", {"uri": "res://x"}))
    rig.feed(notification("notifications/resources/updated", {"uri": "res://other"}))
    methods = [[m["method"] for m in r.take()] for r in (ra, rb, rc)]
    changed, updated = "notifications/tools/list_changed", "notifications/resources/updated"
    assert methods == [[changed, updated], [changed, updated], [changed]]

    a.send(request(4, "resources/unsubscribe", {"uri": "res://x"}))
    await settle()
    assert rig.proc.take() == [] and ra.take()[0]["id"] == 4  # b still holds it
    await b.aclose()  # the last subscriber leaves: the child is told
    (unsubscribe,) = rig.proc.take()
    assert unsubscribe["method"] == "resources/unsubscribe"
    assert unsubscribe["params"] == {"uri": "res://x"} and not rig.child.subs


async def test_a_refused_subscribe_is_the_answer_of_everyone_who_waited() -> None:
    rig = Rig()
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(request(2, "resources/subscribe", {"uri": "res://y"}))
    b.send(request(5, "resources/subscribe", {"uri": "res://y"}))
    (subscribe,) = rig.proc.take()
    error = {"code": -32601, "message": "no subscriptions"}
    rig.feed(encode({"jsonrpc": "2.0", "id": subscribe["id"], "error": error}))
    await settle()
    assert ra.take() == [{"jsonrpc": "2.0", "id": 2, "error": error}]
    assert rb.take() == [{"jsonrpc": "2.0", "id": 5, "error": error}]
    assert not rig.child.subs and not a._subs and not b._subs


async def test_log_level_is_the_most_verbose_asked_and_messages_are_filtered() -> None:
    rig = Rig()
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(request(2, "logging/setLevel", {"level": "warning"}))
    (forwarded,) = rig.proc.take()  # changes the child's level: the child answers a
    rig.feed(result(forwarded["id"], {}))
    assert ra.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    b.send(request(2, "logging/setLevel", {"level": "error"}))  # less verbose: no change
    await settle()
    assert rig.proc.take() == [] and rb.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    b.send(request(3, "logging/setLevel", {"level": "debug"}))
    (more,) = rig.proc.take()
    assert more["params"] == {"level": "debug"}
    rig.feed(result(more["id"], {}))
    rb.take()
    # a has a request in flight, so the log is attributable to it; at "info" it is below a's
    # "warning" (b asked for debug, which is why the child sends it).
    a.send(request(4, "tools/call", {"name": "x"}))
    rig.proc.take()
    log = {"level": "info", "data": "hello"}
    rig.feed(notification("notifications/message", log))
    assert ra.take() == []
    rig.feed(notification("notifications/message", {**log, "level": "error"}))
    assert ra.take()[0]["params"]["level"] == "error"
    await b.aclose()  # the most verbose one leaves: back to a's level
    assert rig.proc.take()[-1]["params"] == {"level": "warning"}


async def test_unattributable_notifications_are_dropped_and_counted() -> None:
    rig = Rig()
    await rig.session()
    (_, rb) = await rig.session()
    rig.feed(notification("notifications/message", {"level": "info", "data": "whose?"}))
    assert rb.take() == [] and rig.pool.stats["unattributed_notification"] == 1


async def test_losing_the_child_loses_every_session_on_it() -> None:
    rig = Rig()
    sessions = [await rig.session() for _ in range(3)]
    sessions[0][0].send(request(2, "tools/call", {"name": "x", "_meta": {"progressToken": 1}}))
    dead = rig.proc
    dead.handler.on_upstream_lost("exit status 3")
    assert [r.lost for _, r in sessions] == [["exit status 3"]] * 3
    assert not rig.child.sessions and not rig.child.pending and not rig.child.tokens
    assert rig.child.init_result is None and rig.child.proc is None
    sessions[1][0].send(request(3, "ping"))  # a lost upstream sends nothing
    # Each core respawns: the first start() restarts the child, once, for everyone.
    again = [rig.pool("s", Recorder()) for _ in range(3)]
    await asyncio.gather(*(up.start() for up in again))
    assert len(rig.spawned) == 2 and rig.proc is not dead
    dead.handler.on_upstream_message(result(1, {}))  # a stale line of the dead process
    assert all(r.take() == [] for _, r in sessions)
    assert rig.child.sessions == set(again)


async def test_a_detached_session_leaves_nothing_behind() -> None:
    rig = Rig()
    (a, ra), (b, rb) = await rig.session(FULL_CAPS), await rig.session()
    a.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "t"}}))
    a.send(request(3, "logging/setLevel", {"level": "debug"}))
    a.send(request(4, "resources/subscribe", {"uri": "res://z"}))
    for sent in rig.proc.take():
        if sent.get("method") in ("logging/setLevel", "resources/subscribe"):
            rig.feed(result(sent["id"], {}))
    rig.feed(request(8, "sampling/createMessage", {}))  # a is the only busy one: a's
    assert [m.get("method") for m in ra.take()] == [None, None, "sampling/createMessage"]
    await a.aclose()
    sent = rig.proc.take()
    methods = [m.get("method") or m["error"]["message"] for m in sent]
    assert methods == [
        "notifications/cancelled",  # its call in flight
        "client session closed",  # the server request it held
        "resources/unsubscribe",  # nobody else wanted res://z
    ]
    rig.feed(result(sent[-1]["id"], {}))  # the pool's own request: its answer goes nowhere
    assert ra.take() == [] and rb.take() == []
    child = rig.child
    assert child.sessions == {b} and not child.pending and not child.tokens
    assert not child.server_requests and not child.subs and not child.busy
    assert child.levels["debug"] == 0
    proc = rig.proc
    await b.aclose()  # the last session left: the idle child is stopped
    await rig.pool.aclose()
    assert proc.closed and child.proc is None


async def test_in_flight_requests_per_session_are_bounded() -> None:
    rig = Rig()
    (a, ra) = await rig.session()
    for rid in range(MAX_PENDING_PER_SESSION):
        a.send(request(rid + 10, "tools/call", {"name": "x"}))
    a.send(request("over", "tools/call", {"name": "x"}))
    await settle()
    assert ra.take() == [
        {
            "jsonrpc": "2.0",
            "id": "over",
            "error": {"code": jsonrpc.TOO_MANY_PENDING, "message": "too many requests in flight"},
        }
    ]
    assert len(rig.proc.take()) == MAX_PENDING_PER_SESSION


def call(rid: int, text: str) -> bytes:
    return request(rid, "tools/call", {"name": "echo", "arguments": {"text": text}})


def texts(sent: list[dict[str, Any]]) -> list[str]:
    return [m["params"]["arguments"]["text"] for m in sent]


async def test_a_child_works_on_at_most_max_in_flight_requests_the_rest_wait_in_order() -> None:
    rig = Rig(max_in_flight=2)
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(call(2, "a2"))
    b.send(call(2, "b2"))
    a.send(call(3, "a3"))
    b.send(call(3, "b3"))
    first = rig.proc.take()
    assert texts(first) == ["a2", "b2"] and rig.child.queued == 2
    b.send(request(9, "ping"))  # a liveness check never waits behind slow calls
    [ping] = rig.proc.take()
    assert ping["method"] == "ping" and rig.child.in_flight == 2
    rig.feed(result(ping["id"], {}))
    assert rb.take() == [{"jsonrpc": "2.0", "id": 9, "result": {}}]
    assert rig.proc.take() == []  # answering it freed no slot
    rig.feed(result(first[1]["id"], "b2"))  # a slot frees: the oldest waiting one goes
    [third] = rig.proc.take()
    assert texts([third]) == ["a3"] and rb.take() == [{"jsonrpc": "2.0", "id": 2, "result": "b2"}]
    rig.feed(result(first[0]["id"], "a2"))
    [fourth] = rig.proc.take()
    assert texts([fourth]) == ["b3"]
    rig.feed(result(fourth["id"], "b3"))
    rig.feed(result(third["id"], "a3"))
    assert [m["result"] for m in ra.take()] == ["a2", "a3"]
    assert rb.take() == [{"jsonrpc": "2.0", "id": 3, "result": "b3"}]
    child = rig.child
    assert child.in_flight == 0 and child.queued == 0 and not child.waiting


async def test_a_queued_request_withdrawn_never_reaches_the_child() -> None:
    rig = Rig(max_in_flight=1)
    (a, _), (b, _) = await rig.session(), await rig.session()
    a.send(call(2, "running"))
    a.send(call(3, "cancelled while queued"))
    b.send(call(2, "b leaves"))
    a.send(call(4, "next"))
    [running] = rig.proc.take()
    a.send(notification("notifications/cancelled", {"requestId": 3}))
    await b.aclose()  # its queued request goes with it, untold
    assert rig.proc.take() == []
    rig.feed(result(running["id"], "done"))
    assert texts(rig.proc.take()) == ["next"]  # the withdrawn ones were skipped
    assert rig.child.queued == 0 and rig.child.in_flight == 1
    # Withdrawn entries do not pile up in the queue while the child is stuck.
    for rid in range(100, 400):
        a.send(call(rid, "x"))
        a.send(notification("notifications/cancelled", {"requestId": rid}))
    assert len(rig.child.waiting) <= 64 and rig.child.queued == 0
    assert rig.proc.take() == []


async def test_requests_queued_when_the_child_dies_are_reported_as_never_sent() -> None:
    rig = Rig(max_in_flight=1)
    (a, ra), (b, rb) = await rig.session(), await rig.session()
    a.send(call(2, "sent"))
    a.send(call(3, "queued"))
    b.send(call(7, "queued too"))
    rig.proc.handler.on_upstream_lost("killed")
    assert (ra.lost, ra.unsent) == (["killed"], [[3]])
    assert (rb.lost, rb.unsent) == (["killed"], [[7]])
    assert rig.child.in_flight == 0 and rig.child.queued == 0


async def test_sessions_spread_over_the_pool() -> None:
    rig = Rig(size=2)
    sessions = [await rig.session() for _ in range(4)]
    assert [len(c.sessions) for c in rig.pool.children] == [2, 2]
    assert len(rig.spawned) == 2
    (a, _), (b, _) = sessions[0], sessions[1]
    assert a.child is not b.child


async def test_a_child_lives_as_long_as_it_has_sessions() -> None:
    rig = Rig()
    (a, _), (b, _) = await rig.session(), await rig.session()
    first = rig.proc
    await a.aclose()
    assert not first.closed  # b is still on it
    await b.aclose()
    late = rig.pool("s", Recorder())
    await late.start()  # waits for the stop, then starts a new child
    assert first.closed and rig.proc is not first and len(rig.spawned) == 2
    late.send(request(1, "initialize", {"capabilities": {}}))
    assert rig.proc.take()[0]["method"] == "initialize"  # the new child needs its own
    await rig.pool.aclose()
    assert rig.child.proc is None
    with pytest.raises(UpstreamError, match="shutting down"):
        await rig.pool("s", Recorder()).start()


async def test_a_child_that_cannot_start_fails_the_sessions_starting() -> None:
    rig = Rig()

    def broken(handler: Any, label: str) -> Any:
        proc = FakeProc(handler)

        async def start() -> None:
            raise UpstreamError("cannot start 'nope'")

        proc.start = start  # type: ignore[method-assign]
        return proc

    rig.pool.spawn = broken
    results = await asyncio.gather(
        *(rig.pool("s", Recorder()).start() for _ in range(3)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["cannot start 'nope'"] * 3
    assert rig.child.proc is None and rig.child.reserved == 0


@pytest.mark.parametrize("size", [0, -1])
def test_a_pool_needs_a_child(size: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        SharedPool(FakeProc, size, 1.0)


def test_config_and_factory() -> None:
    from mcproxy import config
    from mcproxy.errors import ConfigError
    from mcproxy.ops.daemon import upstream_factory

    assert config.Config().upstream.mode == "per-session"
    shared = config.load(None, {"upstream": {"mode": "shared", "pool_size": 3}})
    pool = upstream_factory(shared, None)  # type: ignore[arg-type]  # stdio needs no store
    assert isinstance(pool, SharedPool) and len(pool.children) == 3
    with pytest.raises(ConfigError, match="needs a 'stdio:' target"):
        config.load(None, {"upstream": {"mode": "shared", "target": "https://h/mcp"}})
    with pytest.raises(ConfigError, match=r"upstream.pool_size: .* >= 1"):
        config.load(None, {"upstream": {"mode": "shared", "pool_size": 0}})
    with pytest.raises(ConfigError, match="mode"):
        config.load(None, {"upstream": {"mode": "pooled"}})
