"""The peer benchmark's wrong-answer detector (benchmarks/bench_peers.py) catches what it is
for: an answer or a notification that belongs to another call or client, a mangled id, a
malformed message; and it does not count a late answer or an error as a wrong one."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def peers() -> Iterator[ModuleType]:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import each other by name
    try:
        yield importlib.import_module("bench_peers")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def answer(call: Any, text: str | None = None, **fields: Any) -> bytes:
    content = [{"type": "text", "text": text or call.expected}]
    message = {"jsonrpc": "2.0", "id": call.id, "result": {"content": content}}
    message.update(fields)
    return json.dumps(message).encode()


@pytest.mark.parametrize("upstream", ["python", "node"])
def test_right_answers_count_as_right(peers: ModuleType, upstream: str) -> None:
    tally = peers.Tally()
    for seq in (1, 2):  # a string id ("c-1"), then a number
        call = peers.Call("a", seq, upstream)
        assert peers.check(call, answer(call), tally, set())
    assert (tally.ok, tally.wrong) == (2, 0)
    node = peers.Call("a", 3, "node")
    assert node.expected == "Echo: a-3" and json.loads(node.body)["id"] == "c-3"


def test_swapped_answers_are_wrong(peers: ModuleType) -> None:
    """Two sessions' answers delivered to each other: both wrong. With the same id on both
    sessions only the payload tells them apart; with different ids, the session still waits
    for its own answer, which is right when it comes."""
    tally = peers.Tally()
    a, b = peers.Call("s0", 17, "python"), peers.Call("s1", 17, "python")
    assert a.id == b.id == "c-17"
    assert peers.check(a, answer(b), tally, set())  # under a's id: a's call is done, wrongly
    assert peers.check(b, answer(a), tally, set())
    assert (tally.ok, tally.wrong) == (0, 2)
    assert "another call's payload" in tally.examples[0]
    c, d = peers.Call("s0", 18, "python"), peers.Call("s1", 19, "python")
    assert not peers.check(c, answer(d), tally, set())
    assert "an answer to another call" in tally.examples[2]
    assert peers.check(c, answer(c), tally, set())
    assert (tally.ok, tally.wrong) == (1, 3)


def test_a_mangled_id_is_wrong(peers: ModuleType) -> None:
    """supergateway's ws mode answers a string id with null; a number for a string is as bad."""
    tally = peers.Tally()
    call = peers.Call("s0", 17, "python")
    assert peers.check(call, answer(call, id=None), tally, set())  # own payload: call done
    assert peers.check(call, answer(call, id=17), tally, set())
    assert (tally.ok, tally.wrong) == (0, 2)
    assert "under id None" in tally.examples[0]
    number = peers.Call("s0", 2, "python")  # id 2: 2.0 equals it in Python, not on the wire
    assert peers.check(number, answer(number, id=2.0), tally, set())
    assert (tally.ok, tally.wrong) == (0, 3)


def test_another_payload_under_this_id_is_wrong(peers: ModuleType) -> None:
    tally = peers.Tally()
    call = peers.Call("s0", 4, "python")
    assert peers.check(call, answer(call, text="s9-4"), tally, set())
    assert (tally.ok, tally.wrong) == (0, 1)


def test_notifications(peers: ModuleType) -> None:
    """Another call's progress token is wrong; this call's is fine; one without a token (a
    log message, a list change) is a note."""
    tally = peers.Tally()
    mine, other = peers.Call("s0", 5, "python"), peers.Call("s1", 5, "python")

    def progress(token: str, where: str) -> bytes:
        params: dict[str, Any] = {"progress": 1}
        if where == "params":
            params["progressToken"] = token
        else:
            params["_meta"] = {"progressToken": token}
        return json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                           "params": params}).encode()  # fmt: skip

    for where in ("params", "_meta"):
        assert not peers.check(mine, progress(mine.token, where), tally, set())
        assert not peers.check(mine, progress(other.token, where), tally, set())
    log = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"x"}}'
    assert not peers.check(mine, log, tally, set())
    assert (tally.wrong, tally.notes, tally.ok) == (2, 1, 0)


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'{"jsonrpc":"1.0","id":1,"result":{}}', b'{"jsonrpc":"2.0"}']
)
def test_malformed_messages_are_wrong(peers: ModuleType, raw: bytes) -> None:
    tally = peers.Tally()
    assert not peers.check(peers.Call("s0", 2, "python"), raw, tally, set())
    assert tally.wrong == 1


def test_errors_and_late_answers_are_not_wrong(peers: ModuleType) -> None:
    tally = peers.Tally()
    call = peers.Call("s0", 6, "python")
    error = {"jsonrpc": "2.0", "id": 6, "error": {"code": -32603, "message": "boom"}}
    assert peers.check(call, json.dumps(error).encode(), tally, set())
    late = peers.Call("s0", 7, "python")
    pending = {late.expected}  # it timed out; its answer comes during the next call
    assert not peers.check(peers.Call("s0", 8, "python"), answer(late), tally, pending)
    assert (tally.errors, tally.late, tally.wrong) == (1, 1, 0)
    assert not pending
    # without the timeout on record, the same answer is another call's: wrong
    assert not peers.check(peers.Call("s0", 8, "python"), answer(late), tally, set())
    assert tally.wrong == 1


def test_an_answer_with_no_call_in_flight_is_wrong(peers: ModuleType) -> None:
    tally = peers.Tally()
    assert not peers.check(None, answer(peers.Call("s0", 9, "python")), tally, set())
    assert tally.wrong == 1


def test_the_progress_probe_call(peers: ModuleType) -> None:
    """The probe's call reports progress: its own notifications are counted as such, its
    answer is any result under its (numeric) id, and its notifications reaching the echo
    session beside it are wrong there."""
    tally = peers.Tally()
    talker = peers.Call("s0", 1, "node", progress=True)
    assert talker.id == 1 and b"trigger-long-running-operation" in talker.body
    note = {"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": talker.token, "progress": 1}}  # fmt: skip
    assert not peers.check(talker, json.dumps(note).encode(), tally, set())
    assert peers.check(talker, answer(talker, text="Long running operation completed"),
                       tally, set())  # fmt: skip
    assert (tally.progress, tally.ok, tally.wrong) == (1, 1, 0)
    listener = peers.Call("s1", 2, "node")
    assert not peers.check(listener, json.dumps(note).encode(), tally, set())
    assert tally.wrong == 1
