"""The session state machine, driven directly: no loop, no sockets, no database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mcproxy.core import jsonrpc
from mcproxy.core.actions import (
    Action,
    Dropped,
    Emit,
    FinishRequest,
    Forget,
    MarkWritten,
    Reply,
    Resend,
    RestartUpstream,
    SaveRequest,
    SaveSession,
    SendUpstream,
    StartUpstream,
    Tally,
)
from mcproxy.core.session import (
    UPSTREAM_ID_BLOCK,
    IllegalTransition,
    Limits,
    PendingRow,
    Session,
    UpstreamEvent,
    UpstreamState,
)

LIMITS = Limits(max_pending_requests=4, dedupe_window=3)


def msg(**fields: Any) -> jsonrpc.Message:
    return jsonrpc.decode(json.dumps({"jsonrpc": "2.0", **fields}))


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, SendUpstream)]


def emitted(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, Emit)]


def ready_session() -> Session:
    """A session whose upstream answered initialize and whose client sent initialized."""
    s = Session("S" * 20, LIMITS)
    actions = s.client_message(msg(id=0, method="initialize", params={"protocolVersion": "x"}))
    assert any(isinstance(a, StartUpstream) for a in actions)
    [init] = sent(s.upstream_spawned())
    s.upstream_message(msg(id=init["id"], result={"protocolVersion": "x"}))
    s.client_message(msg(method="notifications/initialized"))
    assert s.state is UpstreamState.READY
    return s


def test_fresh_initialize_is_forwarded_once_and_answered_with_the_session_id() -> None:
    s = Session("session-id-0123456789", LIMITS)
    actions = s.client_message(
        msg(id=0, method="initialize", mcpSessionId="ignored-x", params={"protocolVersion": "x"})
    )
    assert sent(actions) == []  # queued until the process exists
    [init] = sent(s.upstream_spawned())
    assert init["method"] == "initialize" and "mcpSessionId" not in init
    assert init["id"] == 1  # the proxy's own id space, not the client's 0
    actions = s.upstream_message(msg(id=init["id"], result={"protocolVersion": "x"}))
    [response] = emitted(actions)
    assert response["id"] == 0
    assert response["result"]["mcpSessionId"] == "session-id-0123456789"
    assert response["result"]["_meta"]["io.mcproxy/lsn"] == 1


def test_reinitialize_is_answered_locally() -> None:
    s = ready_session()
    actions = s.client_message(msg(id=0, method="initialize", params={}))
    assert sent(actions) == []
    [reply] = [a for a in actions if isinstance(a, Reply)]
    result = json.loads(reply.data)["result"]
    assert result["_meta"]["io.mcproxy/resumed"] is True
    assert result["_meta"]["io.mcproxy/headLsn"] == 1
    assert s.client_message(msg(method="notifications/initialized")) == []  # absorbed


def test_ids_are_rewritten_both_ways_keeping_types() -> None:
    s = ready_session()
    for client_id in ("7", 7):
        [out] = sent(s.client_message(msg(id=client_id, method="tools/list")))
        assert isinstance(out["id"], int)
        [back] = emitted(s.upstream_message(msg(id=out["id"], result={"tools": []})))
        assert back["id"] == client_id and type(back["id"]) is type(client_id)


def test_retry_resends_or_joins_and_never_reruns() -> None:
    s = ready_session()
    actions = s.client_message(msg(id="a", method="tools/call", params={"name": "w"}))
    [out] = sent(actions)
    joined = s.client_message(msg(id="a", method="tools/call", params={"name": "w"}))
    assert joined == [Tally("deduplicated")]  # nothing sent: the running call answers it
    # Another method under a running id is a reuse, not a retry: refused, not joined.
    tally, clash = s.client_message(msg(id="a", method="resources/read"))
    assert tally == Tally("error", -32600)
    assert isinstance(clash, Reply) and json.loads(clash.data)["error"]["code"] == -32600
    done = s.upstream_message(msg(id=out["id"], result={}))
    [emit] = [a for a in done if isinstance(a, Emit)]
    again = s.client_message(msg(id="a", method="tools/call"))
    assert again == [Tally("deduplicated"), Resend(emit.lsn)]
    tally, clash = s.client_message(msg(id="a", method="tools/list"))
    assert tally == Tally("error", -32600)
    assert isinstance(clash, Reply) and json.loads(clash.data)["error"]["code"] == -32600


def test_dedupe_window_is_bounded_and_forgotten_rows_go_from_the_store() -> None:
    s = ready_session()
    forgotten: list[tuple[str, int | None]] = []
    answer_lsn = {jsonrpc.id_key(0): s._answered[jsonrpc.id_key(0)][0]}
    for i in range(9):
        [out] = sent(s.client_message(msg(id=i + 10, method="ping")))
        done = s.upstream_message(msg(id=out["id"], result={}))
        [emit] = [a for a in done if isinstance(a, Emit)]
        [finish] = [a for a in done if isinstance(a, FinishRequest)]
        # The answer is logged with its request's key: that row is what a restart remembers.
        assert emit.answers == (jsonrpc.id_key(i + 10), "ping") and finish.lsn == emit.lsn
        answer_lsn[jsonrpc.id_key(i + 10)] = emit.lsn
        forgotten += finish.forget
        assert len(s._answered) <= LIMITS.dedupe_window + 1
    # Answers beyond the window are forgotten, oldest first (initialize's too), in batches,
    # each with the LSN of its answer (the store unmarks or drops that row).
    answered = [jsonrpc.id_key(0)] + [jsonrpc.id_key(i + 10) for i in range(9)]
    assert len(s._answered) >= LIMITS.dedupe_window and len(forgotten) >= 6
    assert forgotten == [(key, answer_lsn[key]) for key in answered[: len(forgotten)]]
    assert list(s._answered) == answered[len(forgotten) :]


def test_upstream_ids_are_reserved_in_blocks_and_never_reused_after_restore() -> None:
    s = ready_session()
    saves = 0
    for i in range(UPSTREAM_ID_BLOCK + 5):
        actions = s.client_message(msg(id=f"r{i}", method="ping"))
        saves += sum(isinstance(a, SaveSession) for a in actions)
        [out] = sent(actions)
        s.upstream_message(msg(id=out["id"], result={}))
    # One session write per block of ids, not one per request.
    assert saves == 1
    record = s.snapshot()
    highest = s.next_upstream_id - 1
    assert record.next_upstream_id > highest
    # A crash: nothing of the answered requests is left but the session row.
    restored, _ = Session.restore(s.id, LIMITS, record, [], [])
    queued = restored.client_message(msg(id="after", method="ping"))
    assert any(isinstance(a, SaveSession) for a in queued)  # a new block is reserved first
    [replay] = sent(restored.upstream_spawned())  # the next process: initialize replayed
    assert replay["method"] == "initialize" and replay["id"] > highest
    [_, call] = sent(restored.upstream_message(msg(id=replay["id"], result={})))
    assert call["method"] == "ping" and call["id"] > highest


def test_restore_forgets_what_the_store_holds_beyond_the_window() -> None:
    """A smaller window than the last process's: the excess is forgotten at once (the store
    drops those rows), oldest first, or nothing would ever forget them."""
    s = ready_session()
    held = [(jsonrpc.id_key(n), n, "tools/call") for n in range(1, 7)]
    restored, actions = Session.restore(s.id, LIMITS, s.snapshot(), [], held)
    [forget] = [a for a in actions if isinstance(a, Forget)]
    # Window 3, forgotten in batches once it is exceeded by an eighth (at least one).
    assert forget.pairs == tuple((key, lsn) for key, lsn, _ in held[:2])
    assert list(restored._answered) == [key for key, _, _ in held[2:]]


def test_an_id_answered_again_forgets_its_earlier_answer() -> None:
    s = ready_session()
    first = s._answered[jsonrpc.id_key(0)][0]
    assert s._remember(jsonrpc.id_key(0), 99, "initialize") == ((jsonrpc.id_key(0), first),)


def test_pending_limit() -> None:
    s = ready_session()
    for i in range(LIMITS.max_pending_requests):
        s.client_message(msg(id=i + 1, method="ping"))
    [_, refused] = s.client_message(msg(id=99, method="ping"))
    assert isinstance(refused, Reply) and json.loads(refused.data)["error"]["code"] == -32012


def test_cancel_is_translated_and_late_response_dropped() -> None:
    s = ready_session()
    [out] = sent(s.client_message(msg(id=5, method="tools/call", params={"name": "slow"})))
    actions = s.client_message(
        msg(method="notifications/cancelled", params={"requestId": 5, "reason": "r"})
    )
    [cancel] = sent(actions)
    assert cancel["params"] == {"requestId": out["id"], "reason": "r"}
    assert FinishRequest(jsonrpc.id_key(5), None, out["id"]) in actions
    assert s.upstream_message(msg(id=out["id"], result={})) == []
    assert s.client_message(msg(method="notifications/cancelled", params={"requestId": 404})) == []


def test_server_requests_get_proxy_ids_and_answers_route_back() -> None:
    s = ready_session()
    [ask] = emitted(s.upstream_message(msg(id=0, method="elicitation/create", params={})))
    [ask2] = emitted(s.upstream_message(msg(id="x", method="roots/list")))
    assert ask["id"] != ask2["id"]
    [answer] = sent(s.client_message(msg(id=ask2["id"], result={"roots": []})))
    assert answer["id"] == "x"
    # Answered already: dropped, and the driver logs it.
    assert s.client_message(msg(id=ask2["id"], result={})) == [Dropped("late answer", ask2["id"])]
    assert s.client_message(msg(id=999, result={})) == [Dropped("unknown id", 999)]
    null = msg(id=None, error={"code": -32603, "message": "x"})
    assert s.client_message(null) == [Dropped("unknown id", None)]
    [withdrawn] = emitted(
        s.upstream_message(msg(method="notifications/cancelled", params={"requestId": 0}))
    )
    assert withdrawn["params"]["requestId"] == ask["id"]


def test_upstream_loss_reissues_safe_and_fails_unsafe() -> None:
    s = ready_session()
    [tools] = sent(s.client_message(msg(id=1, method="tools/list")))
    s.upstream_message(
        msg(
            id=tools["id"],
            result={"tools": [{"name": "r", "annotations": {"readOnlyHint": True}}, {"name": "w"}]},
        )
    )
    [safe] = sent(s.client_message(msg(id=2, method="tools/call", params={"name": "r"})))
    [unsafe] = sent(s.client_message(msg(id=3, method="tools/call", params={"name": "w"})))
    s.upstream_message(msg(id=9, method="sampling/createMessage", params={}))
    actions = s.upstream_lost("exited")
    errors = emitted(actions)
    assert errors[0]["method"] == "notifications/cancelled"  # the dead server's request
    assert errors[1]["id"] == 3 and errors[1]["error"]["code"] == -32010
    assert StartUpstream() in actions
    saved = [a for a in actions if isinstance(a, SaveRequest)]
    assert [a.upstream_id > safe["id"] for a in saved] == [True]  # a new id, never reused
    [replay] = sent(s.upstream_spawned())
    assert replay["method"] == "initialize"
    actions = s.upstream_message(msg(id=replay["id"], result={}))
    out = sent(actions)
    assert out[0]["method"] == "notifications/initialized"
    assert out[-1]["params"] == {"name": "r"} and out[-1]["id"] != safe["id"]
    assert unsafe["id"] not in {m.get("id") for m in out}


def test_requests_the_upstream_never_passed_on_are_sent_again_not_failed() -> None:
    s = ready_session()
    sent(s.client_message(msg(id=1, method="tools/call", params={"name": "w"})))
    [second] = sent(s.client_message(msg(id=2, method="tools/call", params={"name": "w"})))
    actions = s.upstream_lost("exited", frozenset({second["id"]}))  # held in a queue upstream
    assert [e["id"] for e in emitted(actions)] == [1]  # only the one that reached it
    assert emitted(actions)[0]["error"]["code"] == jsonrpc.OUTCOME_UNKNOWN
    assert Tally("resent") in actions and StartUpstream() in actions
    assert not [a for a in actions if isinstance(a, SaveRequest)]  # its row is unchanged
    [replay] = sent(s.upstream_spawned())
    out = sent(s.upstream_message(msg(id=replay["id"], result={})))
    assert out[-1] == second  # the same message, same id: no process ever saw that id
    reply = s.upstream_message(msg(id=second["id"], result={"ok": True}))
    [answer] = emitted(reply)
    assert answer["id"] == 2 and answer["result"]["ok"] is True


def test_respawn_reapplies_log_level_and_subscriptions() -> None:
    s = ready_session()
    for i, (method, params) in enumerate(
        [
            ("logging/setLevel", {"level": "debug"}),
            ("resources/subscribe", {"uri": "a://1"}),
            ("resources/subscribe", {"uri": "a://2"}),
            ("resources/unsubscribe", {"uri": "a://1"}),
        ]
    ):
        [out] = sent(s.client_message(msg(id=i + 1, method=method, params=params)))
        s.upstream_message(msg(id=out["id"], result={}))
    s.upstream_lost("gone")
    [replay] = sent(s.upstream_spawned())
    out = sent(s.upstream_message(msg(id=replay["id"], result={})))
    assert [(m["method"], m.get("params")) for m in out] == [
        ("notifications/initialized", None),
        ("logging/setLevel", {"level": "debug"}),
        ("resources/subscribe", {"uri": "a://2"}),
    ]
    # The internal requests' answers never reach the client.
    assert s.upstream_message(msg(id=out[1]["id"], result={})) == []


def test_replayed_initialize_rejected_restarts() -> None:
    s = ready_session()
    s.upstream_lost("gone")
    [replay] = sent(s.upstream_spawned())
    actions = s.upstream_message(msg(id=replay["id"], error={"code": -1, "message": "no"}))
    assert isinstance(actions[0], RestartUpstream)


def test_restore_resolves_what_was_in_flight() -> None:
    s = ready_session()
    record = s.snapshot()
    body = jsonrpc.encode(msg(id="w", method="tools/call", params={"name": "w"}))
    pending = [
        PendingRow('"w"', 41, "tools/call", False, body, 41),
        PendingRow(
            '"r"',
            42,
            "resources/read",
            True,
            jsonrpc.encode(msg(id="r", method="resources/read")),
            40,
        ),
    ]
    restored, actions = Session.restore(s.id, LIMITS, record, pending, [('"old"', 1, "ping")])
    [error] = emitted(actions)
    assert error["id"] == "w" and error["error"]["data"]["reason"] == "proxy restarted"
    assert [a.stream for a in actions if isinstance(a, Emit)] == [41]
    assert restored.stream_of("r") == (40, 0)  # re-issued under a new id, same stream
    assert restored.next_upstream_id > 42
    assert StartUpstream() in actions
    assert restored.client_message(msg(id="old", method="ping"))[-1] == Resend(1)


def test_unavailable_upstream_answers_everything() -> None:
    s = Session("S" * 20, LIMITS)
    s.client_message(msg(id=0, method="initialize", params={}))
    [error] = emitted(s.upstream_unavailable("spawn failed"))
    assert error["error"]["code"] == -32011
    assert s.init_request is None  # initialize may be tried again


def test_illegal_transition() -> None:
    s = Session("S" * 20, LIMITS)
    with pytest.raises(IllegalTransition):
        s._transition(UpstreamEvent.INITIALIZED)  # DOWN cannot become READY directly
    assert s.upstream_lost("nothing to lose") == []  # losing a DOWN upstream is a no-op


def streams(actions: list[Action]) -> list[int]:
    return [a.stream for a in actions if isinstance(a, Emit)]


def test_messages_are_routed_to_the_stream_of_the_request_they_belong_to() -> None:
    """transports §"Sending Messages": related messages go on that request's stream."""
    s = ready_session()
    token_call = msg(
        id="a", method="tools/call", params={"name": "t", "_meta": {"progressToken": "pa"}}
    )
    [a] = sent(s.client_message(token_call))
    [b] = sent(s.client_message(msg(id="b", method="tools/call", params={"name": "t"})))
    stream_a, start_a = s.stream_of("a") or (0, 0)
    stream_b, _ = s.stream_of("b") or (0, 0)
    assert (stream_a, stream_b) == (a["id"], b["id"]) and start_a == s.next_lsn - 1
    # Progress follows its token even when another request is newer.
    progress = msg(method="notifications/progress", params={"progressToken": "pa", "progress": 1})
    assert streams(s.upstream_message(progress)) == [stream_a]
    # Anything else unrelated goes with the newest request in flight.
    log_note = msg(method="notifications/message", params={"level": "info", "data": "x"})
    assert streams(s.upstream_message(log_note)) == [stream_b]
    elicit = s.upstream_message(msg(id=77, method="elicitation/create", params={}))
    assert streams(elicit) == [stream_b]
    # The upstream withdraws it: the cancel follows it onto the same stream.
    withdraw = msg(method="notifications/cancelled", params={"requestId": 77})
    assert streams(s.upstream_message(withdraw)) == [stream_b]
    # Each answer is on its request's stream and ends it.
    answer_b = s.upstream_message(msg(id=b["id"], result={}))
    assert streams(answer_b) == [stream_b]
    assert FinishRequest(jsonrpc.id_key("b"), s.next_lsn - 1, stream_b) in answer_b
    assert not s.stream_live(stream_b) and s.stream_live(stream_a)
    s.upstream_message(msg(id=a["id"], result={}))
    # Nothing in flight: everything is general (the GET stream).
    assert streams(s.upstream_message(log_note)) == [0]
    late = msg(method="notifications/progress", params={"progressToken": "pa", "progress": 2})
    assert streams(s.upstream_message(late)) == [0]


def test_task_related_messages_follow_the_request_about_that_task() -> None:
    s = ready_session()
    [r] = sent(s.client_message(msg(id=1, method="tasks/result", params={"taskId": "T1"})))
    s.client_message(msg(id=2, method="tools/call", params={"name": "other"}))
    tagged = msg(
        id=9,
        method="elicitation/create",
        params={"_meta": {"io.modelcontextprotocol/related-task": {"taskId": "T1"}}},
    )
    assert streams(s.upstream_message(tagged)) == [r["id"]]


def test_an_upstream_loss_withdraws_server_requests_before_failing_their_request() -> None:
    s = ready_session()
    [call] = sent(s.client_message(msg(id="c", method="tools/call", params={"name": "t"})))
    s.upstream_message(msg(id=5, method="sampling/createMessage", params={}))
    actions = s.upstream_lost("crash")
    kinds = [(m.get("method"), m.get("id")) for m in emitted(actions)]
    assert kinds == [("notifications/cancelled", None), (None, "c")]
    assert streams(actions) == [call["id"], call["id"]]


def test_an_upstream_that_names_the_related_request_beats_the_heuristics() -> None:
    s = ready_session()
    [a] = sent(s.client_message(msg(id="a", method="tools/call", params={"name": "t"})))
    s.client_message(msg(id="b", method="tools/call", params={"name": "t"}))
    note = msg(method="notifications/message", params={"level": "info", "data": "x"})
    assert streams(s.upstream_message(note, related=a["id"])) == [a["id"]]
    assert streams(s.upstream_message(note, related=999)) != [a["id"]]  # unknown: heuristic


def test_restore_withdraws_the_server_requests_the_client_never_answered() -> None:
    s = ready_session()
    [call] = sent(s.client_message(msg(id="c", method="tools/call", params={"name": "t"})))
    [ask] = emitted(s.upstream_message(msg(id=4, method="sampling/createMessage", params={})))
    [other] = emitted(s.upstream_message(msg(id=5, method="roots/list")))
    sent(s.client_message(msg(id=other["id"], result={"roots": []})))  # this one is answered
    record = s.snapshot()
    assert record.server_requests == [(ask["id"], 4, call["id"])]
    body = jsonrpc.encode(msg(id="c", method="tools/call", params={"name": "t"}))
    pending = [PendingRow('"c"', call["id"], "tools/call", False, body, call["id"])]
    restored, actions = Session.restore(s.id, LIMITS, record, pending, [])
    kinds = [(m.get("method"), m.get("id")) for m in emitted(actions)]
    assert kinds == [("notifications/cancelled", None), (None, "c")]
    assert emitted(actions)[0]["params"]["requestId"] == ask["id"]
    assert SaveSession() in actions and restored.snapshot().server_requests == []
    late = restored.client_message(msg(id=ask["id"], result={}))
    assert late == [Dropped("late answer", ask["id"])]


def test_a_request_never_written_is_sent_to_the_next_process_after_restore() -> None:
    s = ready_session()
    s.upstream_lost("gone")  # a respawn is under way: requests wait in the queue
    actions = s.client_message(msg(id="w", method="tools/call", params={"name": "w"}))
    [save] = [a for a in actions if isinstance(a, SaveRequest)]
    assert save.written is False and sent(actions) == []
    unwritten = PendingRow(
        save.key, save.upstream_id, save.method, save.safe, save.body, save.stream, written=False
    )
    restored, actions = Session.restore(s.id, LIMITS, s.snapshot(), [unwritten], [])
    assert emitted(actions) == [] and StartUpstream() in actions  # no -32010
    [replay] = sent(restored.upstream_spawned())
    actions = restored.upstream_message(msg(id=replay["id"], result={}))
    # On record as (possibly) written before it is, and only after that commit (durable).
    marks = [i for i, a in enumerate(actions) if isinstance(a, MarkWritten)]
    sends = [i for i, a in enumerate(actions) if isinstance(a, SendUpstream) and a.durable]
    assert actions[marks[0]] == MarkWritten('"w"', True) and marks[0] < sends[0]
    assert sent(actions)[-1]["id"] == save.upstream_id


def test_requests_held_back_at_a_stop_are_recorded_as_never_written() -> None:
    s = ready_session()
    [out] = sent(s.client_message(msg(id="w", method="tools/call", params={"name": "w"})))
    assert s.never_written(frozenset({out["id"], 999})) == [MarkWritten('"w"', False)]


def test_progress_never_goes_backwards_after_a_reissue() -> None:
    """basic/utilities/progress: the value MUST increase; a re-issued call starts over at 1
    under the same token, and is held back until it passes what the client saw."""
    s = ready_session()
    [tools] = sent(s.client_message(msg(id=1, method="tools/list")))
    listing = {"tools": [{"name": "r", "annotations": {"readOnlyHint": True}}]}
    s.upstream_message(msg(id=tools["id"], result=listing))
    call = msg(id=2, method="tools/call", params={"name": "r", "_meta": {"progressToken": "p"}})
    sent(s.client_message(call))

    def progress(value: float) -> list[Action]:
        note = {"progressToken": "p", "progress": value, "total": 3}
        return s.upstream_message(msg(method="notifications/progress", params=note))

    shown = [emitted(progress(v)) for v in (1, 2)]
    s.upstream_lost("gone")
    [replay] = sent(s.upstream_spawned())
    [reissued] = sent(s.upstream_message(msg(id=replay["id"], result={})))[-1:]
    assert reissued["params"]["name"] == "r"
    shown += [emitted(progress(v)) for v in (1, 2, 2.5, 3)]
    values = [n[0]["params"]["progress"] for n in shown if n]
    assert values == [1, 2, 2.5, 3]


def tools_session() -> tuple[Session, dict[str, Any]]:
    """A session whose server offers tools: the proxy lists them itself after initialized."""
    s = Session("S" * 20, LIMITS)
    s.client_message(msg(id=0, method="initialize", params={"protocolVersion": "x"}))
    [init] = sent(s.upstream_spawned())
    s.upstream_message(msg(id=init["id"], result={"capabilities": {"tools": {}}}))
    out = sent(s.client_message(msg(method="notifications/initialized")))
    assert [m["method"] for m in out] == ["notifications/initialized", "tools/list"]
    return s, out[1]


READ_ONLY = {"readOnlyHint": True}


def test_the_proxy_learns_tool_annotations_itself_page_by_page() -> None:
    s, listing = tools_session()
    assert "params" not in listing
    page1 = {"tools": [{"name": "r", "annotations": READ_ONLY}], "nextCursor": "c2"}
    actions = s.upstream_message(msg(id=listing["id"], result=page1))
    assert emitted(actions) == []  # never shown to the client
    [page2_request] = sent(actions)
    assert page2_request["params"] == {"cursor": "c2"}
    page2 = {"tools": [{"name": "i", "annotations": {"idempotentHint": True}}, {"name": "w"}]}
    actions = s.upstream_message(msg(id=page2_request["id"], result=page2))
    assert SaveSession() in actions and s.safe_tools == {"r", "i"}
    # The list changed: the client is told, and the proxy lists again; "r" went unsafe.
    actions = s.upstream_message(msg(method="notifications/tools/list_changed"))
    [note] = emitted(actions)
    assert note["method"] == "notifications/tools/list_changed"
    [again] = sent(actions)
    s.upstream_message(msg(id=again["id"], result={"tools": [{"name": "r"}]}))
    assert s.safe_tools == set()
    # A client call of a tool it never listed is re-issued if the proxy knows it is safe.
    [relist] = sent(s.upstream_message(msg(method="notifications/tools/list_changed")))
    s.upstream_message(msg(id=relist["id"], result=page2))
    [_call] = sent(s.client_message(msg(id=1, method="tools/call", params={"name": "i"})))
    actions = s.upstream_lost("gone")
    assert Tally("reissued") in actions and emitted(actions) == []


def test_safety_is_decided_at_the_loss_not_when_the_request_arrived() -> None:
    """A page sends tools/list and tools/call back to back: the list answer naming the tool
    read-only comes after the call, long before the loss."""
    s = ready_session()
    [tools] = sent(s.client_message(msg(id=1, method="tools/list")))
    [call] = sent(s.client_message(msg(id=2, method="tools/call", params={"name": "r"})))
    listed = {"tools": [{"name": "r", "annotations": READ_ONLY}]}
    s.upstream_message(msg(id=tools["id"], result=listed))
    actions = s.upstream_lost("killed")
    assert Tally("reissued") in actions and emitted(actions) == []
    [save] = [a for a in actions if isinstance(a, SaveRequest)]
    assert save.key == jsonrpc.id_key(2) and save.upstream_id > call["id"]


def test_restore_with_the_upstream_kept_leaves_requests_in_flight_on_it() -> None:
    """A reload in place handed the upstream over alive: what it was sent stays pending on
    it (no -32010, no re-issue), server requests stay open, its answers route as before."""
    s = ready_session()
    [call] = sent(s.client_message(msg(id="c", method="tools/call", params={"name": "t"})))
    [ask] = emitted(s.upstream_message(msg(id=4, method="roots/list")))
    body = jsonrpc.encode(msg(id="c", method="tools/call", params={"name": "t"}))
    pending = [PendingRow('"c"', call["id"], "tools/call", False, body, call["id"])]
    unwritten_body = jsonrpc.encode(msg(id="u", method="tools/call", params={"name": "u"}))
    unwritten = PendingRow('"u"', call["id"] + 1, "tools/call", False, unwritten_body, 0, False)
    restored, actions = Session.restore(
        s.id, LIMITS, s.snapshot(), [*pending, unwritten], [], upstream_kept=True
    )
    assert restored.state is UpstreamState.READY
    assert emitted(actions) == [] and StartUpstream() not in actions
    assert [m["id"] for m in sent(actions)] == [call["id"] + 1]  # only the never-written one
    assert MarkWritten('"u"', True) in actions
    answer = emitted(restored.upstream_message(msg(id=call["id"], result={"ok": 1})))
    assert answer[0]["id"] == "c" and answer[0]["result"]["ok"] == 1
    # The child's question is still open: the client's answer goes back to it.
    [back] = sent(restored.client_message(msg(id=ask["id"], result={"roots": []})))
    assert back["id"] == 4
