"""``mcproxy sessions``: the operator commands, on a real database written by the real Store."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mcproxy.core.session import SessionRecord
from mcproxy.engine.schema import SCHEMA_VERSION, session_key
from mcproxy.engine.store import Store
from mcproxy.ops import admin
from tests.helpers import SCHEMA_V1

A = "sessA-0123456789abcdefghijklmnop"  # full-length ids: the tool prints them whole
B = "sessB-0123456789abcdefghijklmnop"
INIT_REQUEST = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"inspector","version":"1.2"}}}'
)
INIT_RESULT = b'{"protocolVersion":"2025-11-25","capabilities":{},"serverInfo":{"name":"demo"}}'
EVENTS = [  # lsn, stream, payload
    (1, 0, b'{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}'),
    (2, 7, b'{"jsonrpc":"2.0","id":7,"result":{"n":2}}'),
    (3, 7, b'{"a":\n1}'),  # JSON over two lines
    (4, 0, b"not json \x1b[31m"),  # garbage with a terminal escape
    (5, 0, b'{"bad":"\xff"}'),  # not UTF-8
]
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcproxy")
    admin.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def call(db: Path, *argv: str) -> int:
    return admin.run(parse("sessions", *argv), db)


def sql(db: Path, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        return conn.execute(statement, params).fetchall()


def json_lines(text: str) -> list[Any]:
    return [msgspec.json.decode(line) for line in text.splitlines()]


async def fill(store: Store) -> None:
    store.save_session(
        A,
        SessionRecord(
            init_request=INIT_REQUEST,
            init_result=INIT_RESULT,
            initialized=True,
            log_level="debug",
            subscriptions=["file:///a"],
            safe_tools=["echo"],
            next_upstream_id=9,
            next_lsn=6,
            delivered_lsn=3,
        ),
    )
    store.save_request(A, '"a"', 7, "tools/call", False, b'{"id":"a"}', 7)
    store.save_request(A, '"b"', 8, "ping", True, b'{"id":"b"}', 8)
    for lsn, stream, payload in EVENTS:  # lsn 2 answers "b"
        store.append(A, lsn, payload, stream, ('"b"', "ping") if lsn == 2 else None)
    store.finish_request(A, '"b"', 2)
    store.save_session(B, SessionRecord(init_request=b"not json"))
    await store.barrier()


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "mcproxy.db"
    store = await Store.open(path)
    await fill(store)
    await store.aclose()
    # Fixed times, B seen last.
    update = "UPDATE sessions SET created_at = ?, last_seen_at = ? WHERE id = ?"
    sql(path, update, (T0, T0 + 100, A))
    sql(path, update, (T0, T0 + 300, B))
    sql(path, "UPDATE events SET created_at = ? + lsn + 0.25", (T0,))
    return path


# --- list -------------------------------------------------------------------------------


def test_list_text(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "list") == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "ID", "PRINCIPAL", "CREATED", "LAST", "SEEN", "HEAD", "EVENTS", "BYTES", "IN", "FLIGHT",
        "INIT", "CLIENT",
    ]  # fmt: skip
    size = sum(len(p) for _, _, p in EVENTS)
    assert first.split() == [
        B, "-", "2023-11-14T22:13:20Z", "2023-11-14T22:18:20Z", "0", "0", "0", "0", "no", "-"
    ]  # fmt: skip
    assert second.split() == [
        A, "-", "2023-11-14T22:13:20Z", "2023-11-14T22:15:00Z", "5", "5", str(size), "1", "yes",
        "inspector",
    ]  # fmt: skip
    assert header.index("CLIENT") == second.index("inspector")  # aligned columns


def test_list_json_and_limit(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "list", "--json") == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [B, A]
    assert rows[1] == {
        "id": A,
        "principal": None,  # not recorded (SessionRecord's default, as before schema 4)
        "created_at": "2023-11-14T22:13:20Z",
        "last_seen_at": "2023-11-14T22:15:00Z",
        "head_lsn": 5,
        "events": 5,
        "event_bytes": sum(len(p) for _, _, p in EVENTS),
        "in_flight": 1,
        "initialized": True,
        "client": "inspector",
    }
    assert rows[0]["client"] is None  # garbage init request tolerated
    assert call(db, "list", "--json", "--limit", "1") == 0
    assert [r["id"] for r in json_lines(capsys.readouterr().out)] == [B]


def test_bad_numbers_are_usage_errors() -> None:
    for argv in (["list", "--limit", "0"], ["events", A, "--after", "-1"], ["list", "--x"]):
        with pytest.raises(SystemExit) as exc:
            parse("sessions", *argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse("sessions")  # a sub-command is required


def test_client_text_cannot_drive_the_terminal(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = b'{"params":{"clientInfo":{"name":"evil\\u001b[2J\\u009b"}}}'
    sql(db, "UPDATE sessions SET init_request = ? WHERE id = ?", (evil, B))
    assert call(db, "list") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out
    assert "evil\\x1b[2J\\x9b" in out
    assert call(db, "list", "--json") == 0
    assert json_lines(capsys.readouterr().out)[0]["client"] == "evil\x1b[2J\x9b"


# --- show -------------------------------------------------------------------------------


def test_show_text(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "show", A) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["id"].strip() == A
    assert fields["client"].strip() == "inspector"
    assert fields["log level"].strip() == "debug"
    assert fields["subscriptions"].strip() == "file:///a"
    assert fields["safe tools"].strip() == "echo"
    assert fields["next lsn"].strip() == "6"
    assert fields["delivered lsn"].strip() == "3"
    assert fields["head lsn"].strip() == "5"
    assert fields["requests"].strip() == "2 (1 in flight)"
    assert fields["events"].strip() == f"5 ({sum(len(p) for _, _, p in EVENTS)} bytes), LSN 1..5"
    assert '  "a"         tools/call  7            7       no' in out.splitlines()
    assert not [line for line in out.splitlines() if line.endswith(" ")]
    assert '    "clientInfo": {' in out  # pretty-printed initialize request
    assert '    "name": "demo"' in out


def test_show_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "show", A, "--json") == 0
    (detail,) = json_lines(capsys.readouterr().out)
    assert detail["init_request"] == msgspec.json.decode(INIT_REQUEST)
    assert detail["init_result"] == msgspec.json.decode(INIT_RESULT)
    assert detail["in_flight"] == [
        {"client_key": '"a"', "method": "tools/call", "upstream_id": 7, "stream": 7, "safe": False}
    ]
    assert (detail["events"], detail["requests"], detail["next_upstream_id"]) == (5, 2, 9)
    assert detail["subscriptions"] == ["file:///a"] and detail["initialized"] is True


def test_show_tolerates_garbage(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "show", B) == 0
    out = capsys.readouterr().out
    assert "  not json  (not JSON)" in out.splitlines()
    assert "init result: -" in out.splitlines()
    assert call(db, "show", B, "--json") == 0
    (detail,) = json_lines(capsys.readouterr().out)
    assert detail["init_request"] is None and detail["client"] is None
    assert detail["in_flight"] == [] and detail["head_lsn"] == 0


def test_head_survives_pruning(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql(db, "DELETE FROM events WHERE session_id = ? AND lsn <= 2", (A,))
    assert call(db, "show", A, "--json") == 0
    (detail,) = json_lines(capsys.readouterr().out)
    assert (detail["first_lsn"], detail["head_lsn"], detail["events"]) == (3, 5, 3)
    sql(db, "DELETE FROM events WHERE session_id = ?", (A,))
    assert call(db, "list", "--json") == 0
    row = json_lines(capsys.readouterr().out)[1]
    assert (row["id"], row["head_lsn"], row["events"], row["event_bytes"]) == (A, 5, 0, 0)


# --- events -----------------------------------------------------------------------------


def test_events_text(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "events", A) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # one line each, the two-line JSON included
    assert lines[0] == f"1 0 2023-11-14T22:13:21.250Z {EVENTS[0][2].decode()}"
    assert lines[2] == '3 7 2023-11-14T22:13:23.250Z {"a":\\n1}'
    assert "\x1b" not in lines[3] and lines[3].endswith("not json \\x1b[31m")
    assert lines[4].endswith('{"bad":"\ufffd"}')


def test_events_filters(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def lsns(*argv: str) -> list[int]:
        assert call(db, "events", A, "--json", *argv) == 0
        return [e["lsn"] for e in json_lines(capsys.readouterr().out)]

    assert lsns() == [1, 2, 3, 4, 5]
    assert lsns("--after", "2") == [3, 4, 5]
    assert lsns("--after", "1", "--limit", "2") == [2, 3]
    assert lsns("--stream", "7") == [2, 3]
    assert lsns("--stream", "0", "--after", "1", "--limit", "1") == [4]
    assert lsns("--stream", "3") == []
    assert lsns("--after", "5") == []


def test_events_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "events", A, "--json") == 0
    out = capsys.readouterr().out
    first, second, third, fourth, fifth = json_lines(out)
    assert first == {
        "lsn": 1,
        "stream": 0,
        "at": "2023-11-14T22:13:21.250Z",
        "message": msgspec.json.decode(EVENTS[0][2]),
    }
    assert EVENTS[1][2] in out.encode()  # single-line JSON is embedded byte for byte
    assert second["message"] == {"jsonrpc": "2.0", "id": 7, "result": {"n": 2}}
    assert third["message"] == {"a": 1}
    assert fourth["message"] is None and fourth["raw"] == "not json \x1b[31m"
    assert fifth["message"] is None and fifth["raw"] == '{"bad":"\ufffd"}'
    assert "raw" not in first


# --- delete -----------------------------------------------------------------------------


def counts(db: Path, session_id: str) -> tuple[int, int, int]:
    return (
        sql(db, "SELECT count(*) FROM sessions WHERE id = ?", (session_id,))[0][0],
        sql(db, "SELECT count(*) FROM events WHERE session_id = ?", (session_id,))[0][0],
        sql(db, "SELECT count(*) FROM requests WHERE session_id = ?", (session_id,))[0][0],
    )


def test_delete_needs_yes(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "delete", A) == 1
    captured = capsys.readouterr()
    assert captured.out == f"would delete session {A}: 5 events, 1 requests (1 in flight)\n"
    assert "--yes" in captured.err
    assert counts(db, A) == (1, 5, 1)


def test_delete(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, "delete", A, "--yes") == 0
    captured = capsys.readouterr()
    assert captured.out == f"deleted session {A}: 5 events, 1 requests (1 in flight)\n"
    assert "warning" in captured.err and "Mcp-Session-Id" in captured.err
    assert counts(db, A) == (0, 0, 0)
    assert counts(db, B) == (1, 0, 0)
    assert call(db, "delete", A, "--yes") == 1  # gone
    assert "no session" in capsys.readouterr().err


def test_delete_removes_rows_left_without_a_session_row(db: Path) -> None:
    sql(db, "DELETE FROM sessions WHERE id = ?", (A,))
    assert call(db, "delete", A, "--yes") == 0
    assert counts(db, A) == (0, 0, 0)


async def test_one_id_of_two_principals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Schema 8: alice and bob each have a session under the id A (issue 15 finding 8).
    ``list`` shows both with their principals; ``show``, ``events`` and ``delete`` refuse the
    bare id and act on the one ``--principal`` names."""
    path = tmp_path / "two.sqlite"

    async def write() -> None:
        store = await Store.open(path)
        for who in ("alice", "bob"):
            key = session_key(A, who)
            store.save_session(key, SessionRecord(init_request=INIT_REQUEST, principal=who))
            store.append(key, 1, f'{{"of":"{who}"}}'.encode())
        await store.barrier()
        await store.aclose()

    await write()
    assert call(path, "list", "--json") == 0
    rows = json_lines(capsys.readouterr().out)
    assert sorted((r["id"], r["principal"]) for r in rows) == [(A, "alice"), (A, "bob")]
    for argv in (["show", A], ["events", A], ["delete", A, "--yes"]):
        assert call(path, *argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "2 sessions have the id" in captured.err and "alice, bob" in captured.err
        assert "--principal" in captured.err
    assert call(path, "show", A, "--principal", "bob", "--json") == 0
    detail = msgspec.json.decode(capsys.readouterr().out)
    assert (detail["id"], detail["principal"]) == (A, "bob")
    assert call(path, "events", A, "--principal", "alice") == 0
    assert '{"of":"alice"}' in capsys.readouterr().out
    assert call(path, "show", A, "--principal", "carol") == 1
    assert f"no session '{A}' of principal 'carol'" in capsys.readouterr().err
    assert call(path, "delete", A, "--principal", "bob", "--yes") == 0
    assert capsys.readouterr().out.startswith(f"deleted session {A} of bob: 1 events")
    assert counts(path, session_key(A, "bob")) == (0, 0, 0)
    assert counts(path, session_key(A, "alice")) == (1, 1, 0)
    assert call(path, "show", A) == 0  # one left: the bare id names it
    assert "principal: alice" in " ".join(capsys.readouterr().out.split())


def test_delete_help_points_to_http_delete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("sessions", "delete", "--help")
    assert "Mcp-Session-Id" in capsys.readouterr().out


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["show", "nope"], ["events", "nope"], ["delete", "nope"]])
def test_unknown_session(db: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert call(db, *argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no session 'nope'" in captured.err


@pytest.mark.parametrize("argv", [["list"], ["show", A], ["events", A], ["delete", A, "--yes"]])
def test_missing_file_is_not_created(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.db"
    assert call(path, *argv) == 2
    assert "no such database file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["list"], ["delete", A, "--yes"]])
def test_newer_schema_refused(
    db: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sql(db, f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    assert call(db, *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "is newer than this mcproxy" in captured.err
    assert counts(db, A) == (1, 5, 1)


def test_not_an_mcproxy_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    assert call(empty, "list") == 2
    assert "not an mcproxy database" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not SQLite\n" * 100)
    assert call(text, "list") == 2
    assert "cannot read" in capsys.readouterr().err


def test_version_1_database_is_read_without_migrating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the layout mcproxy 0.1 wrote
        conn.executescript(
            SCHEMA_V1 + "INSERT INTO sessions (id, created_at, last_seen_at) VALUES ('S', 0, 0);"
            "INSERT INTO events VALUES ('S', 1, 0, x'7b7d');"
            "INSERT INTO requests VALUES ('S', '1', 1, 'ping', 1, x'7b7d', 0, NULL);"
        )
    assert call(path, "events", "S", "--stream", "0") == 0
    assert capsys.readouterr().out == "1 0 1970-01-01T00:00:00.000Z {}\n"
    assert call(path, "show", "S", "--json") == 0
    assert json_lines(capsys.readouterr().out)[0]["in_flight"][0]["stream"] == 0
    assert sql(path, "PRAGMA user_version") == [(1,)]


# --- next to a running writer -------------------------------------------------------------


async def test_reads_and_delete_while_the_store_is_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "live.db"
    store = await Store.open(path)
    try:
        await fill(store)
        assert call(path, "list", "--json") == 0
        assert {r["id"]: r["head_lsn"] for r in json_lines(capsys.readouterr().out)} == {
            A: 5,
            B: 0,
        }
        # Submitted but not committed yet (the group commit runs on the next loop turn):
        # a WAL reader does not see it.
        written = store.append(A, 6, b'{"n":6}', 0)
        assert call(path, "events", A, "--after", "5") == 0
        assert capsys.readouterr().out == ""
        await written
        assert call(path, "events", A, "--after", "5", "--json") == 0
        assert [e["message"] for e in json_lines(capsys.readouterr().out)] == [{"n": 6}]

        # The daemon's writer holds no lock between commits: delete gets its turn.
        assert call(path, "delete", B, "--yes") == 0
        capsys.readouterr()
        assert await store.load_session(B) is None
        assert await store.load_session(A) is not None
        store.append(A, 7, b'{"n":7}', 0)
        await store.barrier()  # the store still writes after the admin's transaction
        assert call(path, "show", A, "--json") == 0
        assert json_lines(capsys.readouterr().out)[0]["head_lsn"] == 7
    finally:
        await store.aclose()
