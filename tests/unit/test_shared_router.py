"""The shared pool's router (``upstreams.shared_router``), without processes or an event loop:
events go in, the actions it returns are recorded per child (what it is written) and per
session (what it is given)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mcproxy.core import jsonrpc
from mcproxy.upstreams.shared_router import (
    CANNOT_ATTRIBUTE,
    DEFAULT_LOG_LEVEL,
    MAX_PENDING_PER_SESSION,
    MAX_SERVER_REQUESTS_PER_SESSION,
    Action,
    CancelInitTimer,
    Child,
    Deliver,
    Lose,
    Router,
    StartInitTimer,
    Stop,
    Warn,
    Write,
    client_capabilities,
)

INIT_RESULT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}},
    "serverInfo": {"name": "child", "version": "1"},
}
FULL_CAPS = {"sampling": {}, "elicitation": {"form": {}}, "roots": {}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


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


def call(rid: int, text: str) -> bytes:
    return request(rid, "tools/call", {"name": "echo", "arguments": {"text": text}})


def texts(sent: list[dict[str, Any]]) -> list[str]:
    return [m["params"]["arguments"]["text"] for m in sent]


class Recorder:
    """What one session was given (``Deliver``) and told (``Lose``)."""

    def __init__(self, sid: int, rig: Rig) -> None:
        self.sid = sid
        self.rig = rig
        self.messages: list[dict[str, Any]] = []
        self.related: list[int | None] = []
        self.soon: list[bool] = []
        self.lost: list[str] = []
        self.unsent: list[list[int]] = []

    def take(self) -> list[dict[str, Any]]:
        messages, self.messages = self.messages, []
        self.related.clear()
        self.soon.clear()
        return messages

    def send(self, data: bytes) -> None:
        self.rig.run(self.rig.router.from_session(self.sid, data))

    def close(self) -> None:
        self.rig.run(self.rig.router.detach(self.sid))

    @property
    def state(self) -> Any:
        return self.rig.router.sessions.get(self.sid)


class Rig:
    def __init__(self, size: int = 1, max_in_flight: int = 0) -> None:
        self.router = Router(size, max_in_flight)
        self.written: dict[int, list[dict[str, Any]]] = {i: [] for i in range(size)}
        self.recorders: dict[int, Recorder] = {}
        self.other: list[Action] = []  # timers, stops, warnings

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Write):
                self.written[action.child].append(json.loads(action.data))
            elif isinstance(action, Deliver):
                recorder = self.recorders[action.sid]
                recorder.messages.append(json.loads(action.data))
                recorder.related.append(action.related)
                recorder.soon.append(action.soon)
            elif isinstance(action, Lose):
                recorder = self.recorders[action.sid]
                recorder.lost.append(action.reason)
                recorder.unsent.append(sorted(action.unsent))
            else:
                self.other.append(action)

    def take(self, child: int = 0) -> list[dict[str, Any]]:
        sent, self.written[child] = self.written[child], []
        return sent

    def take_other(self) -> list[Action]:
        other, self.other = self.other, []
        return other

    @property
    def child(self) -> Child:
        return self.router.children[0]

    def feed(self, line: bytes, child: int = 0) -> None:
        """Child ``child`` writes ``line``."""
        self.run(self.router.from_child(child, line))

    def attach(self) -> Recorder:
        """A session starts (the pool starts the child it picks if it is not up)."""
        index = self.router.pick()
        if not self.router.children[index].up:
            self.router.started(index)
        sid, actions = self.router.attach(index)
        recorder = self.recorders[sid] = Recorder(sid, self)
        self.run(actions)
        return recorder

    def session(self, caps: dict[str, Any] | None = None) -> Recorder:
        """A session started and initialized on the pool (local id 1 for its initialize)."""
        rec = self.attach()
        index = rec.state.child
        params = {"protocolVersion": "2025-11-25", "capabilities": caps or {}}
        rec.send(request(1, "initialize", {**params, "clientInfo": {"name": "t", "version": "1"}}))
        for sent in self.take(index):
            if sent.get("method") == "initialize":  # the first on this child: answer it
                self.feed(result(sent["id"], INIT_RESULT), index)
                assert self.take(index) == [INITIALIZED]
        assert rec.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
        rec.send(notification("notifications/initialized"))
        self.take_other()
        return rec


def test_first_initialize_reaches_the_child_later_ones_are_answered_locally() -> None:
    rig = Rig()
    a, b = rig.attach(), rig.attach()
    a.send(request(1, "initialize", {"capabilities": FULL_CAPS, "clientInfo": {"name": "a"}}))
    assert rig.take_other() == [StartInitTimer(0)]  # the pool arms the deadline
    b.send(request(7, "initialize", {"capabilities": {}, "clientInfo": {"name": "b"}}))
    (init,) = rig.take()  # one initialize: the first client's, under a pool id
    assert init["method"] == "initialize" and init["params"]["clientInfo"] == {"name": "a"}
    rig.feed(result(init["id"], INIT_RESULT))
    assert rig.take() == [INITIALIZED]
    assert rig.take_other() == [CancelInitTimer(0)]
    assert a.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    assert b.take() == [{"jsonrpc": "2.0", "id": 7, "result": INIT_RESULT}]  # its own id
    assert b.soon == []  # taken; b's answer was the pool's own, delivered after b's event
    a.send(notification("notifications/initialized"))
    b.send(notification("notifications/initialized"))
    assert rig.take() == []  # the pool sent the child its own
    c = rig.attach()
    c.send(request("init", "initialize", {"capabilities": {}}))
    assert c.soon == [True] and c.take()[0]["id"] == "init"
    assert rig.take() == [] and rig.router.stats["spawned"] == 1
    assert a.state.caps == frozenset(FULL_CAPS) and b.state.caps == frozenset()


def test_a_refused_initialize_lets_the_next_client_try_its_own() -> None:
    rig = Rig()
    a, b = rig.attach(), rig.attach()
    a.send(request(1, "initialize", {"protocolVersion": "1999-01-01"}))
    b.send(request(1, "initialize", {"protocolVersion": "2025-11-25"}))
    (init,) = rig.take()
    rig.feed(
        encode({"jsonrpc": "2.0", "id": init["id"], "error": {"code": -32602, "message": "v"}})
    )
    assert a.take()[0]["error"]["code"] == -32602
    assert not a.state.ready
    (retry,) = rig.take()  # the second client's own initialize, not the refused one's
    assert retry["params"]["protocolVersion"] == "2025-11-25" and retry["id"] != init["id"]
    rig.feed(result(retry["id"], INIT_RESULT))
    assert b.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    # Before initialize is answered a session sends nothing else (defensive).
    a.send(request(2, "tools/list"))
    assert a.take()[0]["error"]["message"] == "shared upstream not initialized"


def test_ids_are_rewritten_both_ways_keeping_their_json_type() -> None:
    rig = Rig()
    a, b = rig.session(), rig.session()
    a.send(request(5, "tools/call", {"name": "echo"}))
    b.send(request(5, "tools/call", {"name": "echo"}))
    b.send(request("5", "tools/call", {"name": "echo"}))
    sent = rig.take()
    ids = [m["id"] for m in sent]
    assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
    for position, pool_id in reversed(list(enumerate(ids))):  # answered out of order
        rig.feed(result(pool_id, {"n": position}))
    assert a.messages == [{"jsonrpc": "2.0", "id": 5, "result": {"n": 0}}]
    assert a.related == [5]
    assert b.take() == [
        {"jsonrpc": "2.0", "id": "5", "result": {"n": 2}},
        {"jsonrpc": "2.0", "id": 5, "result": {"n": 1}},
    ]
    assert not rig.child.pending and not rig.child.busy and not a.state.local
    assert not b.state.local
    rig.feed(result(ids[0], {}))  # a duplicate answer: nobody waits for it
    assert len(a.messages) == 1 and rig.router.stats["late_response"] == 1
    rig.feed(result("nope", {}))  # not an id of the pool's
    assert rig.router.stats["unknown_response"] == 1


def test_progress_tokens_are_made_unique_and_routed_back() -> None:
    rig = Rig()
    a, b = rig.session(), rig.session()
    a.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "tok"}}))
    b.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "tok"}}))
    b.send(request(3, "tools/call", {"name": "slow", "_meta": {"progressToken": 7}}))
    calls = rig.take()
    tokens = [m["params"]["_meta"]["progressToken"] for m in calls]
    assert len(set(tokens)) == 3 and "tok" not in tokens
    assert [type(t) for t in tokens] == [str, str, int]  # the JSON type is kept
    for token, step in zip(reversed(tokens), (1, 2, 3), strict=True):
        params = {"progressToken": token, "progress": step}
        rig.feed(notification("notifications/progress", params))
    assert a.messages == [
        {"jsonrpc": "2.0", "method": "notifications/progress",
         "params": {"progressToken": "tok", "progress": 3}},
    ]  # fmt: skip
    assert a.related == [2]  # the request it belongs to
    assert [(m["params"]["progressToken"], m["params"]["progress"]) for m in b.messages] == [
        (7, 1),
        ("tok", 2),
    ]
    assert b.related == [3, 2]
    rig.feed(result(calls[0]["id"], {}))
    rig.feed(notification("notifications/progress", {"progressToken": tokens[0], "progress": 9}))
    assert a.take()[-1]["id"] == 2  # the late progress note was not delivered
    assert rig.router.stats["unrouted_progress"] == 1
    assert len(rig.child.tokens) == 2
    for params in ({"progressToken": True}, {"progressToken": "x"}, {"progress": 1}, None):
        rig.feed(notification("notifications/progress", params))
    assert rig.router.stats["unrouted_progress"] == 5


@pytest.mark.parametrize(
    "meta",
    [{"progressToken": True}, {"progressToken": None}, {"other": 1}, "not an object"],
)
def test_an_invalid_progress_token_passes_unchanged(meta: Any) -> None:
    rig = Rig()
    a = rig.session()
    a.send(request(2, "tools/call", {"name": "x", "_meta": meta, "progressToken": 1}))
    (sent,) = rig.take()
    assert sent["params"]["_meta"] == meta and not rig.child.tokens


def test_cancellation_is_translated_and_forgets_the_request() -> None:
    rig = Rig()
    a, _ = rig.session(), rig.session()
    a.send(request(4, "tools/call", {"name": "slow", "_meta": {"progressToken": 1}}))
    (call_,) = rig.take()
    a.send(notification("notifications/cancelled", {"requestId": 4, "reason": "bored"}))
    (cancel,) = rig.take()
    assert cancel["params"] == {"requestId": call_["id"], "reason": "bored"}
    assert not rig.child.pending and not rig.child.tokens and not rig.child.busy
    rig.feed(encode({"jsonrpc": "2.0", "id": call_["id"], "error": {"code": 0, "message": "x"}}))
    assert a.take() == []  # the core forgot it too
    a.send(notification("notifications/cancelled", {"requestId": 99}))  # unknown: ignored
    assert rig.take() == []


def test_server_requests_go_only_where_they_can_be_attributed() -> None:
    rig = Rig()
    a = rig.session(FULL_CAPS)
    # The only session on the child: it must be the one.
    rig.feed(request(0, "elicitation/create", {"message": "name?"}))
    assert a.take()[0]["method"] == "elicitation/create"
    a.send(result(0, {"action": "accept"}))
    assert rig.take() == [{"jsonrpc": "2.0", "id": 0, "result": {"action": "accept"}}]

    b = rig.session(FULL_CAPS)
    # Two sessions, neither busy: refused, never guessed.
    rig.feed(request(1, "sampling/createMessage", {}))
    (refusal,) = rig.take()
    assert refusal["id"] == 1 and refusal["error"]["message"] == CANNOT_ATTRIBUTE
    assert a.take() == [] and b.take() == []
    (warning,) = rig.take_other()
    assert isinstance(warning, Warn) and warning.event == "upstream.shared_unattributed"
    assert warning.fields["sessions"] == 2 and warning.fields["method"] == "sampling/createMessage"
    # Exactly one of them with a request in flight: that one.
    b.send(request(9, "tools/call", {"name": "ask"}))
    rig.take()
    rig.feed(request(2, "elicitation/create", {"message": "name?"}))
    assert b.messages[-1]["method"] == "elicitation/create" and b.related[-1] == 9
    assert a.take() == []
    a.send(result(2, {"action": "accept"}))  # not given to a: never forwarded
    assert rig.take() == []
    rig.feed(notification("notifications/cancelled", {"requestId": 2}))  # the child withdraws
    assert b.messages[-1]["method"] == "notifications/cancelled"
    b.send(result(2, {"action": "accept"}))  # too late: withdrawn
    assert rig.take() == []
    # Both busy: refused again.
    a.send(request(3, "tools/call", {"name": "slow"}))
    rig.take()
    rig.feed(request(3, "roots/list"))
    assert rig.take()[0]["error"]["message"] == CANNOT_ATTRIBUTE
    assert rig.router.stats["unattributed_request"] == 2
    # A ping from the child is the pool's to answer.
    rig.feed(request("p", "ping"))
    assert rig.take() == [{"jsonrpc": "2.0", "id": "p", "result": {}}]


def test_a_server_request_needs_the_capability_of_its_client() -> None:
    rig = Rig()
    a, b = rig.session(FULL_CAPS), rig.session({})
    b.send(request(1, "tools/call", {"name": "sample"}))
    rig.take()
    rig.feed(request(5, "sampling/createMessage", {}))
    (refusal,) = rig.take()
    assert refusal["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert "'sampling'" in refusal["error"]["message"]
    assert a.take() == [] and b.take() == []
    assert rig.router.stats["capability_missing"] == 1


def test_server_requests_held_by_one_session_are_bounded() -> None:
    rig = Rig()
    a = rig.session(FULL_CAPS)
    for rid in range(MAX_SERVER_REQUESTS_PER_SESSION):
        rig.feed(request(rid, "roots/list"))
    assert len(a.take()) == MAX_SERVER_REQUESTS_PER_SESSION and rig.take() == []
    rig.feed(request("over", "roots/list"))
    assert rig.take()[0]["error"]["message"] == "too many server requests pending"


def test_list_changed_fans_out_and_resource_updates_follow_subscriptions() -> None:
    rig = Rig()
    a, b, c = (rig.session() for _ in range(3))
    a.send(request(2, "resources/subscribe", {"uri": "res://x"}))
    b.send(request(2, "resources/subscribe", {"uri": "res://x"}))  # while a's is in flight
    (subscribe,) = rig.take()  # once per URI
    assert subscribe["params"] == {"uri": "res://x"}
    rig.feed(result(subscribe["id"], {}))
    assert a.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    assert b.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    c.send(request(2, "resources/subscribe", {"uri": "res://x"}))
    assert rig.take() == [] and c.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    c.send(request(3, "resources/unsubscribe", {"uri": "res://x"}))
    assert rig.take() == [] and c.take()[0]["id"] == 3

    rig.feed(notification("notifications/tools/list_changed"))
    rig.feed(notification("notifications/resources/updated", {"uri": "res://x"}))
    rig.feed(notification("notifications/resources/updated", {"uri": "res://other"}))
    methods = [[m["method"] for m in r.take()] for r in (a, b, c)]
    changed, updated = "notifications/tools/list_changed", "notifications/resources/updated"
    assert methods == [[changed, updated], [changed, updated], [changed]]

    a.send(request(4, "resources/unsubscribe", {"uri": "res://x"}))
    assert rig.take() == [] and a.take()[0]["id"] == 4  # b still holds it
    b.close()  # the last subscriber leaves: the child is told
    (unsubscribe,) = rig.take()
    assert unsubscribe["method"] == "resources/unsubscribe"
    assert unsubscribe["params"] == {"uri": "res://x"} and not rig.child.subs
    # Without a URI, or for a URI nobody here holds, the child answers for itself.
    a.send(request(5, "resources/subscribe", {}))
    a.send(request(6, "resources/unsubscribe", {"uri": "res://never"}))
    assert [m["method"] for m in rig.take()] == ["resources/subscribe", "resources/unsubscribe"]


def test_the_last_unsubscribe_goes_to_the_child_and_its_answer_back() -> None:
    rig = Rig()
    a = rig.session()
    a.send(request(2, "resources/subscribe", {"uri": "res://u"}))
    (subscribe,) = rig.take()
    rig.feed(result(subscribe["id"], {}))
    a.take()
    a.send(request(3, "resources/unsubscribe", {"uri": "res://u"}))
    (unsubscribe,) = rig.take()
    assert unsubscribe["method"] == "resources/unsubscribe" and not rig.child.subs
    rig.feed(result(unsubscribe["id"], {}))
    assert a.take() == [{"jsonrpc": "2.0", "id": 3, "result": {}}]


def test_a_subscribe_whose_sessions_all_left_is_undone() -> None:
    rig = Rig()
    c, d = rig.session(), rig.session()
    c.send(request(2, "resources/subscribe", {"uri": "res://late"}))
    (subscribe,) = rig.take()
    c.close()  # the only subscriber left while the subscribe is in flight
    assert rig.take() == []  # its outcome still matters: the pool waits for it
    rig.feed(result(subscribe["id"], {}))  # confirmed, nobody holds it: undone at once
    (undo,) = rig.take()
    assert undo["method"] == "resources/unsubscribe" and not rig.child.subs
    assert c.messages == [] and d.take() == []


def test_a_refused_subscribe_is_the_answer_of_everyone_who_waited() -> None:
    rig = Rig()
    a, b = rig.session(), rig.session()
    a.send(request(2, "resources/subscribe", {"uri": "res://y"}))
    b.send(request(5, "resources/subscribe", {"uri": "res://y"}))
    (subscribe,) = rig.take()
    error = {"code": -32601, "message": "no subscriptions"}
    rig.feed(encode({"jsonrpc": "2.0", "id": subscribe["id"], "error": error}))
    assert a.take() == [{"jsonrpc": "2.0", "id": 2, "error": error}]
    assert b.take() == [{"jsonrpc": "2.0", "id": 5, "error": error}]
    assert not rig.child.subs and not a.state.subs and not b.state.subs


def test_log_level_is_the_most_verbose_asked_and_messages_are_filtered() -> None:
    rig = Rig()
    a, b = rig.session(), rig.session()
    b.send(request(1, "logging/setLevel", {"level": "error"}))  # b asked first, then a
    (first,) = rig.take()
    assert first["params"] == {"level": DEFAULT_LOG_LEVEL}  # a never asked (see below)
    rig.feed(result(first["id"], {}))
    assert b.take() == [{"jsonrpc": "2.0", "id": 1, "result": {}}]
    a.send(request(2, "logging/setLevel", {"level": "warning"}))
    (forwarded,) = rig.take()  # changes the child's level: the child answers a
    assert forwarded["params"] == {"level": "warning"}
    rig.feed(result(forwarded["id"], {}))
    assert a.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    b.send(request(2, "logging/setLevel", {"level": "error"}))  # less verbose: no change
    assert rig.take() == [] and b.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    b.send(request(3, "logging/setLevel", {"level": "debug"}))
    (more,) = rig.take()
    assert more["params"] == {"level": "debug"}
    rig.feed(result(more["id"], {}))
    b.take()
    # a has a request in flight, so the log is attributable to it; at "info" it is below a's
    # "warning" (b asked for debug, which is why the child sends it).
    a.send(request(4, "tools/call", {"name": "x"}))
    rig.take()
    log = {"level": "info", "data": "hello"}
    rig.feed(notification("notifications/message", log))
    assert a.take() == []
    rig.feed(notification("notifications/message", {**log, "level": "error"}))
    assert a.take()[0]["params"]["level"] == "error"
    rig.feed(notification("notifications/message", {"data": "no level"}))
    assert len(a.take()) == 1  # not a level it can compare: delivered
    b.close()  # the most verbose one leaves: back to a's level
    assert rig.take()[-1]["params"] == {"level": "warning"}
    a.send(request(5, "logging/setLevel", {"level": "loud"}))  # not a level: the child's call
    assert rig.take()[0]["params"] == {"level": "loud"}


def test_one_sessions_set_level_never_silences_a_session_that_never_asked() -> None:
    """Issue 15, finding 14: "emergency" from one session must not lower the level the child
    logs at for a session that never sent logging/setLevel."""
    rig = Rig()
    quiet, bystander = rig.session(), rig.session()
    quiet.send(request(2, "logging/setLevel", {"level": "emergency"}))
    sent = rig.take()
    assert [m["params"]["level"] for m in sent] == [DEFAULT_LOG_LEVEL]  # never "emergency"
    rig.feed(result(sent[0]["id"], {}))  # the pool's own request: its answer goes nowhere
    assert quiet.take() == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    assert bystander.take() == []
    # The bystander calls a tool that logs at "info": it gets the message; the quiet one
    # would not (its own level filters it).
    bystander.send(request(3, "tools/call", {"name": "log_later"}))
    rig.take()
    rig.feed(notification("notifications/message", {"level": "info", "data": "hi"}))
    assert [m["params"]["data"] for m in bystander.take()] == ["hi"]
    bystander.close()  # only the quiet one left: now its level is the child's
    assert rig.take()[-1]["params"] == {"level": "emergency"}
    late = rig.attach()  # a newcomer never asked: the child goes back to the default
    assert [m["params"] for m in rig.take()] == [{"level": DEFAULT_LOG_LEVEL}]
    late.send(request(1, "initialize", {}))
    assert late.take()[0]["result"] == INIT_RESULT
    quiet.send(request(3, "tools/call", {"name": "x"}))
    rig.take()
    rig.feed(notification("notifications/message", {"level": "alert", "data": "x"}))
    assert quiet.take() == [] and late.take() == []  # below quiet's level; not late's call


def test_no_level_is_set_until_a_session_asks() -> None:
    rig = Rig()
    rig.session()
    rig.session().close()
    assert rig.take() == [] and rig.child.level is None


def test_unattributable_notifications_are_dropped_and_counted() -> None:
    rig = Rig()
    rig.session()
    b = rig.session()
    rig.feed(notification("notifications/message", {"level": "info", "data": "whose?"}))
    assert b.take() == [] and rig.router.stats["unattributed_notification"] == 1


def test_junk_from_the_child_is_counted_and_reported() -> None:
    rig = Rig()
    rig.session()
    rig.feed(b"not json")
    (warning,) = rig.take_other()
    assert isinstance(warning, Warn) and warning.event == "upstream.junk"
    assert warning.fields["line"] == "not json" and rig.router.stats["junk"] == 1


def test_losing_the_child_loses_every_session_on_it() -> None:
    rig = Rig()
    sessions = [rig.session() for _ in range(3)]
    sessions[0].send(request(2, "tools/call", {"name": "x", "_meta": {"progressToken": 1}}))
    rig.take()
    rig.run(rig.router.lost(0, "exit status 3"))
    assert [r.lost for r in sessions] == [["exit status 3"]] * 3
    assert CancelInitTimer(0) in rig.take_other()
    assert not rig.child.sessions and not rig.child.pending and not rig.child.tokens
    assert rig.child.init_result is None and not rig.child.up
    sessions[1].send(request(3, "ping"))  # a lost upstream sends nothing
    assert rig.take() == [] and rig.router.stats["lost"] == 1
    rig.feed(result(1, {}))  # a line while it is down
    assert all(r.take() == [] for r in sessions)
    assert rig.router.lost(0, "again") == []  # reported once
    again = [rig.attach() for _ in range(3)]  # each core respawns: the pool restarts it
    assert {r.state for r in again} == rig.child.sessions
    assert rig.router.stats["spawned"] == 2


def test_a_detached_session_leaves_nothing_behind() -> None:
    rig = Rig()
    a, b = rig.session(FULL_CAPS), rig.session()
    a.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "t"}}))
    a.send(request(3, "logging/setLevel", {"level": "debug"}))
    a.send(request(4, "resources/subscribe", {"uri": "res://z"}))
    for sent in rig.take():
        if sent.get("method") in ("logging/setLevel", "resources/subscribe"):
            rig.feed(result(sent["id"], {}))
    rig.feed(request(8, "sampling/createMessage", {}))  # a is the only busy one: a's
    assert [m.get("method") for m in a.take()] == [None, None, "sampling/createMessage"]
    state = a.state
    a.close()
    sent = rig.take()
    methods = [m.get("method") or m["error"]["message"] for m in sent]
    assert methods == [
        "notifications/cancelled",  # its call in flight
        "client session closed",  # the server request it held
        "resources/unsubscribe",  # nobody else wanted res://z
    ]
    rig.feed(result(sent[-1]["id"], {}))  # the pool's own request: its answer goes nowhere
    assert a.take() == [] and b.take() == []
    child = rig.child
    assert child.sessions == {b.state} and not child.pending and not child.tokens
    assert not child.server_requests and not child.subs and not child.busy
    assert child.levels["debug"] == 0 and not state.local and state.server is None
    assert a.state is None and rig.router.detach(a.sid) == []  # twice: nothing
    b.close()  # the last session left: the idle child is stopped
    assert rig.take_other() == [CancelInitTimer(0), Stop(0)] and not child.up


def test_a_session_leaving_while_initialize_is_in_flight() -> None:
    rig = Rig()
    a, b, c = rig.attach(), rig.attach(), rig.attach()
    a.send(request(1, "initialize", {"capabilities": {}}))
    b.send(request(1, "initialize", {"capabilities": {}}))
    c.send(request(1, "initialize", {"capabilities": {}}))
    (init,) = rig.take()
    a.close()  # the first one's initialize is still the child's: its outcome is b's and c's
    b.close()
    rig.feed(result(init["id"], INIT_RESULT))
    assert rig.take() == [INITIALIZED]
    assert c.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    assert a.messages == [] and b.messages == []


def test_in_flight_requests_per_session_are_bounded() -> None:
    rig = Rig()
    a = rig.session()
    for rid in range(MAX_PENDING_PER_SESSION):
        a.send(request(rid + 10, "tools/call", {"name": "x"}))
    a.send(request("over", "tools/call", {"name": "x"}))
    assert a.take() == [
        {
            "jsonrpc": "2.0",
            "id": "over",
            "error": {"code": jsonrpc.TOO_MANY_PENDING, "message": "too many requests in flight"},
        }
    ]
    assert len(rig.take()) == MAX_PENDING_PER_SESSION


def test_a_child_works_on_at_most_max_in_flight_requests_the_rest_wait_in_order() -> None:
    rig = Rig(max_in_flight=2)
    a, b = rig.session(), rig.session()
    a.send(call(2, "a2"))
    b.send(call(2, "b2"))
    a.send(call(3, "a3"))
    b.send(call(3, "b3"))
    first = rig.take()
    assert texts(first) == ["a2", "b2"] and rig.child.queued == 2
    assert rig.router.queued() == 2 and rig.router.in_flight() == 2
    b.send(request(9, "ping"))  # a liveness check never waits behind slow calls
    [ping] = rig.take()
    assert ping["method"] == "ping" and rig.child.in_flight == 2
    rig.feed(result(ping["id"], {}))
    assert b.take() == [{"jsonrpc": "2.0", "id": 9, "result": {}}]
    assert rig.take() == []  # answering it freed no slot
    rig.feed(result(first[1]["id"], "b2"))  # a slot frees: the oldest waiting one goes
    [third] = rig.take()
    assert texts([third]) == ["a3"] and b.take() == [{"jsonrpc": "2.0", "id": 2, "result": "b2"}]
    rig.feed(result(first[0]["id"], "a2"))
    [fourth] = rig.take()
    assert texts([fourth]) == ["b3"]
    rig.feed(result(fourth["id"], "b3"))
    rig.feed(result(third["id"], "a3"))
    assert [m["result"] for m in a.take()] == ["a2", "a3"]
    assert b.take() == [{"jsonrpc": "2.0", "id": 3, "result": "b3"}]
    child = rig.child
    assert child.in_flight == 0 and child.queued == 0 and not child.waiting
    assert rig.router.stats["queued"] == 2


def test_an_answer_to_a_queued_request_is_not_taken() -> None:
    rig = Rig(max_in_flight=1)
    a = rig.session()
    a.send(call(2, "sent"))
    a.send(call(3, "queued"))
    (sent,) = rig.take()
    queued_id = next(pid for pid, e in rig.child.pending.items() if e.queued is not None)
    rig.feed(result(queued_id, "forged"))  # the child cannot know this id: not its answer
    assert a.take() == [] and rig.router.stats["unknown_response"] == 1
    rig.feed(result(sent["id"], "ok"))
    assert texts(rig.take()) == ["queued"]


def test_a_queued_request_withdrawn_never_reaches_the_child() -> None:
    rig = Rig(max_in_flight=1)
    a, b = rig.session(), rig.session()
    a.send(call(2, "running"))
    a.send(call(3, "cancelled while queued"))
    b.send(call(2, "b leaves"))
    a.send(call(4, "next"))
    [running] = rig.take()
    a.send(notification("notifications/cancelled", {"requestId": 3}))
    b.close()  # its queued request goes with it, untold
    assert rig.take() == []
    rig.feed(result(running["id"], "done"))
    assert texts(rig.take()) == ["next"]  # the withdrawn ones were skipped
    assert rig.child.queued == 0 and rig.child.in_flight == 1
    # Withdrawn entries do not pile up in the queue while the child is stuck.
    for rid in range(100, 400):
        a.send(call(rid, "x"))
        a.send(notification("notifications/cancelled", {"requestId": rid}))
    assert len(rig.child.waiting) <= 64 and rig.child.queued == 0
    assert rig.take() == []


def test_requests_queued_when_the_child_dies_are_reported_as_never_sent() -> None:
    rig = Rig(max_in_flight=1)
    a, b = rig.session(), rig.session()
    a.send(call(2, "sent"))
    a.send(call(3, "queued"))
    b.send(call(7, "queued too"))
    b.send(request("s", "tools/call", {"name": "string ids are not reported"}))
    rig.run(rig.router.lost(0, "killed"))
    assert (a.lost, a.unsent) == (["killed"], [[3]])
    assert (b.lost, b.unsent) == (["killed"], [[7]])
    assert rig.child.in_flight == 0 and rig.child.queued == 0


def test_sessions_spread_over_the_pool() -> None:
    rig = Rig(size=2)
    sessions = [rig.session() for _ in range(4)]
    assert [len(c.sessions) for c in rig.router.children] == [2, 2]
    assert rig.router.stats["spawned"] == 2
    a, b = sessions[0], sessions[1]
    assert a.state.child != b.state.child
    rig.router.reserve(0)  # a session starting counts as load
    assert rig.router.pick() == 1
    rig.router.unreserve(0)


def test_a_child_is_stopped_only_when_nothing_is_on_it() -> None:
    rig = Rig()
    a = rig.session()
    rig.router.reserve(0)
    a.close()
    assert rig.take_other() == [] and rig.child.up  # a session is starting on it
    rig.router.unreserve(0)
    assert rig.router.idle(0) == [CancelInitTimer(0), Stop(0)]
    assert rig.router.idle(0) == []  # already down


def test_shutdown_forgets_the_sessions_without_telling_them() -> None:
    rig = Rig()
    a = rig.session()
    a.send(call(2, "x"))
    rig.router.down(0)
    assert not rig.router.sessions and not rig.child.up and a.lost == []
    assert texts(rig.take()) == ["x"]
    assert rig.router.from_session(a.sid, call(4, "y")) == []
    assert rig.router.detach(a.sid) == []


def test_client_capabilities_and_interning() -> None:
    def caps(params: Any) -> frozenset[str]:
        return client_capabilities(jsonrpc.decode(request(1, "initialize", params)))

    assert caps({"capabilities": {"roots": {}, "sampling": {}}}) == {"roots", "sampling"}
    assert caps(None) == frozenset() and caps({"capabilities": 3}) == frozenset()
    assert caps({"capabilities": None}) == frozenset()
    router = Router(1)
    one = router.intern(frozenset({"roots"}))
    assert router.intern(frozenset({"roots"})) is one
    for n in range(300):  # bounded: odd clients do not grow it
        router.intern(frozenset({f"x{n}"}))
    assert len(router._caps) == 256


def test_client_notifications_reach_the_child_once_initialized() -> None:
    rig = Rig()
    a = rig.attach()
    a.send(notification("notifications/roots/list_changed"))
    assert rig.take() == []  # not initialized yet
    a.send(b"{not json")
    a.send(request(1, "initialize", {}))
    (init,) = rig.take()
    rig.feed(result(init["id"], INIT_RESULT))
    rig.take()
    a.send(notification("notifications/roots/list_changed"))
    assert rig.take() == [{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}]
    a.send(encode({"jsonrpc": "2.0", "id": None, "error": {"code": 1, "message": "m"}}))
    assert rig.take() == []


@pytest.mark.parametrize("size", [0, -1])
def test_a_pool_needs_a_child(size: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        Router(size)
    with pytest.raises(ValueError, match="max_in_flight"):
        Router(1, -1)


def test_a_cancelled_subscribe_still_settles_for_the_others() -> None:
    rig = Rig()
    a, b = rig.session(), rig.session()
    a.send(request(2, "resources/subscribe", {"uri": "res://c"}))
    b.send(request(3, "resources/subscribe", {"uri": "res://c"}))
    (subscribe,) = rig.take()
    a.send(notification("notifications/cancelled", {"requestId": 2}))
    (cancel,) = rig.take()
    assert cancel["params"] == {"requestId": subscribe["id"]}
    rig.feed(result(subscribe["id"], {}))  # its outcome is still b's answer
    assert a.take() == [] and b.take() == [{"jsonrpc": "2.0", "id": 3, "result": {}}]
    assert rig.child.subs["res://c"].confirmed


def test_log_messages_without_a_level_reach_a_session_that_set_one() -> None:
    rig = Rig()
    a = rig.session()
    a.send(request(2, "logging/setLevel", {"level": "error"}))
    rig.feed(result(rig.take()[0]["id"], {}))
    a.take()
    rig.feed(notification("notifications/message"))
    rig.feed(notification("notifications/message", {"level": 3}))
    assert len(a.take()) == 2  # nothing it can compare: not filtered


# --- reload in place: snapshot and restore --------------------------------------------------


def moved(rig: Rig, size: int = 2, max_in_flight: int = 1) -> Rig:
    """The rig's router as the next program rebuilds it from its snapshot: a new Router,
    the same sessions (recorders) by the same sids."""
    data = rig.router.snapshot()
    after = Rig(size, max_in_flight)
    after.run(after.router.restore(data))
    for sid, recorder in rig.recorders.items():
        recorder.rig = after
        after.recorders[sid] = recorder
    return after


def test_a_snapshot_taken_during_the_childs_first_initialize_restores() -> None:
    """The child's own initialize (its first session's) in flight at the reload: the next
    program answers that session when the child does, and the child goes on initialized."""
    rig = Rig(1)
    a = rig.attach()
    params = {"protocolVersion": "2025-11-25", "capabilities": {}}
    a.send(request(1, "initialize", {**params, "clientInfo": {"name": "t", "version": "1"}}))
    (init,) = rig.take()
    before = rig.router.snapshot()

    after = moved(rig, size=1)
    assert after.router.snapshot() == before
    after.feed(result(init["id"], INIT_RESULT))
    assert a.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    assert after.take() == [INITIALIZED]


def test_a_snapshot_round_trip_routes_what_the_children_answer_after_it() -> None:
    rig = Rig(2, max_in_flight=1)
    a, b = rig.session({"sampling": {}}), rig.session()  # one on each child
    assert (a.state.child, b.state.child) == (0, 1)
    a.send(request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": "tok"}}))
    a.send(request(3, "tools/call", {"name": "echo"}))  # queued: the only slot is taken
    b.send(request("s", "resources/subscribe", {"uri": "file:///x"}))
    b.send(request(4, "logging/setLevel", {"level": "error"}))
    (running,) = rig.take(0)
    (subscribe,) = rig.take(1)
    rig.feed(result(subscribe["id"], {}), 1)
    assert b.take() == [{"jsonrpc": "2.0", "id": "s", "result": {}}]
    rig.take(1)
    rig.feed(request(99, "sampling/createMessage", {}), 0)  # a server request, a's to answer
    assert a.take()[0]["id"] == 99
    before = rig.router.snapshot()

    after = moved(rig)
    assert after.router.snapshot() == before  # nothing lost or invented on the way
    token = running["params"]["_meta"]["progressToken"]
    after.feed(notification("notifications/progress", {"progressToken": token, "progress": 1}))
    assert a.messages[0]["params"] == {"progressToken": "tok", "progress": 1}
    assert a.related == [2]
    after.feed(result(running["id"], {"done": True}))
    assert a.take()[1] == {"jsonrpc": "2.0", "id": 2, "result": {"done": True}}
    (admitted,) = after.take(0)  # the slot freed: the queued request goes out now
    assert admitted["params"]["name"] == "echo"
    after.feed(result(admitted["id"], {}))
    assert a.take() == [{"jsonrpc": "2.0", "id": 3, "result": {}}]
    a.send(encode({"jsonrpc": "2.0", "id": 99, "result": {}}))  # its answer is let through
    assert after.take(0) == [{"jsonrpc": "2.0", "id": 99, "result": {}}]
    after.feed(notification("notifications/resources/updated", {"uri": "file:///x"}), 1)
    assert [m["method"] for m in b.take()] == ["notifications/resources/updated"]
    c = after.attach()  # a new session: fresh ids, the child's stored initialize result
    assert c.sid > b.sid
    c.send(request(1, "initialize", {"capabilities": {}}))
    assert c.take() == [{"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}]
    assert after.take(0) == [] and after.take(1) == []  # no second initialize
    b.close()  # its setLevel in flight is cancelled; the last subscriber left: unsubscribed
    assert [m["method"] for m in after.take(1)] == [
        "notifications/cancelled",
        "resources/unsubscribe",
    ]


def test_a_snapshot_that_does_not_hold_together_is_refused_whole() -> None:
    rig = Rig(2)
    a, b = rig.session(), rig.session()
    a.send(request(2, "tools/call", {"name": "slow"}))
    snap = json.loads(rig.router.snapshot())

    def refused(data: bytes, size: int = 2) -> str:
        router = Router(size)
        with pytest.raises(ValueError) as info:
            router.restore(data)
        assert not router.sessions and not any(c.up for c in router.children)  # untouched
        return str(info.value)

    assert "snapshot" in refused(b"{not json")
    assert "version 9" in refused(json.dumps({**snap, "version": 9}).encode())
    broken = json.loads(json.dumps(snap))
    broken["sessions"][0]["local"] = [[2, 12345]]  # a request the child has no entry for
    refused(json.dumps(broken).encode())
    broken = json.loads(json.dumps(snap))
    broken["children"] = []  # its session on a child that is down
    assert "down" in refused(json.dumps(broken).encode())
    refused(rig.router.snapshot(), size=1)  # a smaller pool cannot hold child 1's tables...
    assert b.state.child == 1
    broken = json.loads(json.dumps(snap))
    broken["children"][0]["index"] = 5
    assert "child 5" in refused(json.dumps(broken).encode())
    assert Router(2).restore(rig.router.snapshot()) == []  # nothing queued to admit
    used = Router(2)
    used.started(0)
    with pytest.raises(ValueError, match="new router"):
        used.restore(rig.router.snapshot())
    Router(2).restore(rig.router.snapshot())  # ...and the intact one restores


def test_a_higher_limit_after_the_reload_admits_the_queued_requests_at_once() -> None:
    rig = Rig(1, max_in_flight=1)
    a = rig.session()
    a.send(request(2, "tools/call", {"name": "slow"}))
    a.send(request(3, "tools/call", {"name": "echo"}))
    assert len(rig.take()) == 1  # the second waits for the only slot
    after = moved(rig, size=1, max_in_flight=0)  # the next program has no limit
    (admitted,) = after.take()
    assert admitted["params"]["name"] == "echo"
    assert after.child.queued == 0 and after.child.in_flight == 2
