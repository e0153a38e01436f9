"""Operator commands on the database: ``mcproxy sessions list|show|events|delete``.

They read the SQLite file with the stdlib ``sqlite3`` (a CLI has no event loop to keep free),
safely while the daemon runs:

- ``list``, ``show`` and ``events`` open the file read-only (``mode=ro``). A WAL reader never
  blocks the daemon's writer and sees committed data only; each command reads one snapshot.
- ``delete`` removes a session's rows in one ``BEGIN IMMEDIATE`` transaction. The daemon
  commits a batch per event-loop turn, so its write lock is only ever held briefly; the busy
  timeout waits it out. A daemon that has the session loaded keeps it in memory, though, and
  goes on serving it (and may write it back): the clean way to end a live session is an HTTP
  DELETE with its ``Mcp-Session-Id``, which ``delete`` says in its help and its warning.

No command creates the file, and a file with a newer schema than this mcproxy's is refused.
Session ids are printed in full: the operator needs them to act, and only the operator can
read the database anyway. A session is its principal's: two principals may each have one
under the same id (schema 8, ``engine.schema.session_key``), so ``show``, ``events`` and
``delete`` take ``--principal`` and, without it, refuse an id that names more than one.
Text that came from clients or servers is printed with control characters escaped, so it
cannot drive the terminal.

The wiring: ``cli`` calls ``add_parser`` on its sub-parsers and ``run(args, db_path)``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec

from mcproxy.core.auth import ANONYMOUS
from mcproxy.engine import schema
from mcproxy.engine.schema import SCHEMA_VERSION, id_of, session_key
from mcproxy.errors import StoreError

EXIT_FAILED: Final = 1  # unknown or ambiguous session, delete not confirmed, a query failed
EXIT_REFUSED: Final = 2  # no database file, not mcproxy's, or a newer schema
BUSY_TIMEOUT_MS: Final = 5000  # the daemon holds the write lock for one commit at most

_DELETE_WARNING: Final = (
    "a running mcproxy that has this session loaded keeps serving it from memory until it"
    " restarts (and may write it back); to end a live session, send an HTTP DELETE with its"
    " Mcp-Session-Id header instead"
)


# --- output records (the --json shapes) ---------------------------------------------------


class SessionSummary(msgspec.Struct, kw_only=True):
    """One line of ``sessions list``."""

    id: str
    principal: str | None  # None: not recorded (a session of before schema 4)
    created_at: str
    last_seen_at: str
    head_lsn: int
    events: int
    event_bytes: int
    in_flight: int
    initialized: bool
    client: str | None


class InFlightRow(msgspec.Struct, kw_only=True):
    """A client request sent upstream and not answered yet (``requests.done = 0``)."""

    client_key: str  # the client's request id, JSON-encoded ('"a"' or '7')
    method: str
    upstream_id: int
    stream: int
    safe: bool  # re-issued after a restart (else answered "outcome unknown")


class SessionDetail(msgspec.Struct, kw_only=True):
    """``sessions show``: the session row, its counters and its requests in flight."""

    id: str
    principal: str | None
    created_at: str
    last_seen_at: str
    client: str | None
    initialized: bool
    log_level: str | None
    subscriptions: list[str] | None  # None: the column is not readable JSON
    safe_tools: list[str] | None
    next_upstream_id: int
    next_server_id: int
    next_lsn: int
    delivered_lsn: int
    head_lsn: int
    first_lsn: int  # the oldest LSN still in the log (0: none); older ones were pruned
    events: int
    event_bytes: int
    requests: int
    in_flight: list[InFlightRow]
    init_request: msgspec.Raw | None
    init_result: msgspec.Raw | None


class EventLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of ``sessions events --json``; ``raw`` only when the payload is not JSON."""

    lsn: int
    stream: int
    at: str
    message: msgspec.Raw | None
    raw: str | None = None


class _ClientInfo(msgspec.Struct):
    name: str | None = None


class _InitParams(msgspec.Struct, rename="camel"):
    client_info: _ClientInfo | None = None


class _InitRequest(msgspec.Struct):
    params: _InitParams | None = None


# --- the parser -----------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sessions`` and its sub-commands; ``run`` executes the parsed result."""
    sessions = subparsers.add_parser(
        "sessions",
        help="inspect or delete stored sessions (safe while the daemon runs)",
        description="Inspect or delete the sessions stored in the database. Reads open the"
        " file read-only and see committed data only, so they are safe while the daemon runs.",
    )
    sub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="COMMAND")

    ls = sub.add_parser(
        "list",
        help="one line per session, most recently seen first",
        description="One line per session, most recently seen first: id, created, last seen"
        " (UTC), head LSN, events and their bytes, requests in flight, initialized, client.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument("--limit", type=_positive, metavar="N", help="at most N sessions")

    show = sub.add_parser(
        "show",
        help="one session: its stored state and requests in flight",
        description="A session's row (initialize request and result, log level,"
        " subscriptions, counters) and its requests in flight.",
    )
    show.add_argument("session_id", metavar="ID", help="the full session id")
    _principal_option(show)
    show.add_argument("--json", action="store_true", help="one JSON object")

    events = sub.add_parser(
        "events",
        help="a session's logged server messages, oldest first",
        description="The logged server->client messages of a session (what a reconnecting client"
        " is replayed from), oldest first: 'LSN STREAM TIME PAYLOAD' lines.",
    )
    events.add_argument("session_id", metavar="ID", help="the full session id")
    _principal_option(events)
    events.add_argument(
        "--after", type=_non_negative, default=0, metavar="LSN", help="only LSNs above this"
    )
    events.add_argument("--limit", type=_positive, metavar="N", help="at most N messages")
    events.add_argument(
        "--stream",
        type=_non_negative,
        metavar="S",
        help="only messages of this HTTP stream (0 is the general stream, any other number"
        " the stream of the request that got that upstream id)",
    )
    events.add_argument(
        "--json",
        action="store_true",
        help='one {"lsn","stream","at","message"} object per line',
    )

    delete = sub.add_parser(
        "delete",
        help="remove a session's rows (see its help before using it on a live session)",
        description="Remove a session, its event log and its requests in one transaction."
        " A running daemon that has the session loaded keeps serving it from memory until it"
        " restarts, and may write it back. The clean way to end a live session is an HTTP"
        " DELETE to the daemon's endpoint with its Mcp-Session-Id header; use this command"
        " for sessions the daemon does not hold (stopped daemon, abandoned sessions).",
    )
    delete.add_argument("session_id", metavar="ID", help="the full session id")
    _principal_option(delete)
    delete.add_argument(
        "--yes", action="store_true", help="really delete (without it: show what would go)"
    )


def _principal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--principal",
        metavar="NAME",
        help="whose session (needed when principals have sessions under the same id;"
        f" '{ANONYMOUS}' with authentication off)",
    )


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


# --- running ---------------------------------------------------------------------------


def run(args: argparse.Namespace, db: Path) -> int:
    """Execute a parsed ``sessions`` command on the database at ``db``; the exit code."""
    commands: dict[str, Callable[[argparse.Namespace, Path], int]] = {
        "list": _list,
        "show": _show,
        "events": _events,
        "delete": _delete,
    }
    try:
        return commands[args.sessions_command](args, db)
    except StoreError as exc:
        _error(str(exc))
        return EXIT_REFUSED
    except sqlite3.Error as exc:
        _error(f"{db}: {exc}")
        return EXIT_FAILED
    except BrokenPipeError:
        # `mcproxy sessions events ID | head`: stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again (Python docs, "Note on SIGPIPE").
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _error(message: str) -> None:
    print(f"mcproxy: sessions: {message}", file=sys.stderr)


class _Db:
    """One connection in autocommit mode; ``stream`` is the column, or 0 before schema 2."""

    def __init__(self, path: Path, write: bool) -> None:
        if not path.is_file():
            raise StoreError(f"{path}: no such database file")
        # The URI's mode never creates the file; as_uri() escapes '?' and '#' in the path.
        uri = f"{path.resolve().as_uri()}?mode={'rw' if write else 'ro'}"
        try:
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        try:
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            self.conn.close()
            raise StoreError(f"cannot read {path}: {exc}") from exc
        if version > SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(
                f"{path}: schema version {version} is newer than this mcproxy"
                f" ({SCHEMA_VERSION}); use the mcproxy that wrote it"
            )
        if version == 0:
            self.conn.close()
            raise StoreError(f"{path}: not an mcproxy database (user_version 0)")
        self.stream = "stream" if version >= schema.STREAM_SINCE else "0"
        # Version 6 keeps answers past pruning while their request ids are remembered for
        # retries: such a row below the session's floor is not part of the log any more.
        since = version >= schema.LOG_FLOOR_SINCE
        self.remembered = "request_key IS NOT NULL" if since else "0"
        self.floor = "s.log_floor" if since else "0"
        self.principal = "principal" if version >= schema.PRINCIPAL_SINCE else "NULL"
        self.keyed = version >= schema.KEYED_SINCE

    def __enter__(self) -> _Db:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn.in_transaction:
            self.conn.rollback()
        self.conn.close()

    def begin(self, immediate: bool = False) -> None:
        """One snapshot for several reads (or the write lock, with ``immediate``)."""
        self.conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def find(self, session_id: str, principal: str | None) -> list[tuple[str, str | None]]:
        """(key, principal) of the sessions with this id, of ``principal`` if given."""
        if self.keyed:
            sql = (
                "SELECT id, principal FROM sessions"
                " WHERE id = ?1 OR id = ?1 || char(31) || principal ORDER BY id"
            )
        else:  # before schema 8 an id named one session, whoever's it was
            sql = f"SELECT id, {self.principal} FROM sessions WHERE id = ?1"
        rows = [(str(key), owner) for key, owner in self.execute(sql, (session_id,))]
        if principal is not None:
            rows = [(key, owner) for key, owner in rows if (owner or ANONYMOUS) == principal]
        return rows

    def key(self, args: argparse.Namespace) -> str | None:
        """The key of the one session ``args`` name; None (said on stderr) if there is no
        such session or the id names several (one per principal) and none was chosen."""
        found = self.find(args.session_id, args.principal)
        if len(found) == 1:
            return found[0][0]
        if not found:
            _unknown(args.session_id, args.principal)
            return None
        owners = ", ".join(_printable(owner or ANONYMOUS) for _, owner in found)
        _error(
            f"{len(found)} sessions have the id {_printable(args.session_id)!r}"
            f" (principals: {owners}); choose one with --principal"
        )
        return None


# The head is the last LSN assigned: the log's last row, or the session row's counter when
# the log has been pruned (the counter is written with the session, so it may lag the log).
_AGGREGATES: Final = """
    max(s.next_lsn - 1, (SELECT coalesce(max(lsn), 0) FROM events WHERE session_id = s.id)),
    (SELECT count(*) FROM events WHERE session_id = s.id),
    (SELECT coalesce(sum(length(payload)), 0) FROM events WHERE session_id = s.id),
    (SELECT count(*) FROM requests WHERE done = 0 AND session_id = s.id)
"""


def _list(args: argparse.Namespace, db: Path) -> int:
    # The inner query sorts and limits first, so the per-session aggregates (index range
    # scans) run for the listed sessions only. One statement: one snapshot.
    sql = f"""
        SELECT s.id, s.created_at, s.last_seen_at, s.initialized, s.init_request, {_AGGREGATES},
            s.principal
        FROM (SELECT id, created_at, last_seen_at, initialized, init_request, next_lsn,
                {{principal}} AS principal
              FROM sessions
              ORDER BY last_seen_at DESC, id LIMIT ?) AS s
        ORDER BY s.last_seen_at DESC, s.id
    """
    with _Db(db, write=False) as conn:
        rows = conn.execute(sql.format(principal=conn.principal), (args.limit or -1,)).fetchall()
    summaries = [
        SessionSummary(
            id=id_of(str(r[0])),
            principal=r[9],
            created_at=_iso(r[1]),
            last_seen_at=_iso(r[2]),
            initialized=bool(r[3]),
            client=_client_name(_blob(r[4])),
            head_lsn=int(r[5]),
            events=int(r[6]),
            event_bytes=int(r[7]),
            in_flight=int(r[8]),
        )
        for r in rows
    ]
    if args.json:
        for summary in summaries:
            print(msgspec.json.encode(summary).decode())
        return 0
    table = [
        [
            "ID",
            "PRINCIPAL",
            "CREATED",
            "LAST SEEN",
            "HEAD",
            "EVENTS",
            "BYTES",
            "IN FLIGHT",
            "INIT",
            "CLIENT",
        ]
    ]
    table += [
        [
            _printable(s.id),
            _printable(s.principal) if s.principal is not None else "-",
            s.created_at,
            s.last_seen_at,
            str(s.head_lsn),
            str(s.events),
            str(s.event_bytes),
            str(s.in_flight),
            "yes" if s.initialized else "no",
            _printable(s.client) if s.client else "-",
        ]
        for s in summaries
    ]
    for line in _columns(table):
        print(line)
    return 0


def _show(args: argparse.Namespace, db: Path) -> int:
    session_id: str = args.session_id
    with _Db(db, write=False) as conn:
        conn.begin()
        key = conn.key(args)
        if key is None:
            return EXIT_FAILED
        row = conn.one(
            "SELECT s.created_at, s.last_seen_at, s.init_request, s.init_result, s.initialized,"
            " s.log_level, s.subscriptions, s.safe_tools, s.next_upstream_id, s.next_server_id,"
            f" s.next_lsn, s.delivered_lsn, {_AGGREGATES},"
            " (SELECT count(*) FROM requests WHERE session_id = s.id)"
            f" + (SELECT count(*) FROM events WHERE session_id = s.id AND {conn.remembered}),"
            " (SELECT coalesce(min(lsn), 0) FROM events"
            f" WHERE session_id = s.id AND lsn > {conn.floor}), {conn.principal}"
            " FROM sessions AS s WHERE s.id = ?",
            (key,),
        )
        if row is None:
            return _unknown(session_id, args.principal)
        flights = [
            InFlightRow(
                client_key=str(r[0]),
                method=str(r[1]),
                upstream_id=int(r[2]),
                stream=int(r[3]),
                safe=bool(r[4]),
            )
            for r in conn.execute(
                f"SELECT client_key, method, upstream_id, {conn.stream}, safe FROM requests"
                " WHERE done = 0 AND session_id = ? ORDER BY upstream_id",
                (key,),
            )
        ]
    init_request = _blob(row[2])
    init_result = _blob(row[3])
    detail = SessionDetail(
        id=session_id,
        principal=row[18],
        created_at=_iso(row[0]),
        last_seen_at=_iso(row[1]),
        client=_client_name(init_request),
        initialized=bool(row[4]),
        log_level=None if row[5] is None else str(row[5]),
        subscriptions=_str_list(row[6]),
        safe_tools=_str_list(row[7]),
        next_upstream_id=int(row[8]),
        next_server_id=int(row[9]),
        next_lsn=int(row[10]),
        delivered_lsn=int(row[11]),
        head_lsn=int(row[12]),
        first_lsn=int(row[17]),
        events=int(row[13]),
        event_bytes=int(row[14]),
        requests=int(row[16]),
        in_flight=flights,
        init_request=None if init_request is None else _embed(init_request)[0],
        init_result=None if init_result is None else _embed(init_result)[0],
    )
    if args.json:
        print(msgspec.json.encode(detail).decode())
        return 0
    fields = [
        ("id", _printable(detail.id)),
        ("principal", _printable(detail.principal) if detail.principal is not None else "-"),
        ("created", detail.created_at),
        ("last seen", detail.last_seen_at),
        ("client", _printable(detail.client) if detail.client else "-"),
        ("initialized", "yes" if detail.initialized else "no"),
        ("log level", _printable(detail.log_level) if detail.log_level else "-"),
        ("subscriptions", _names(detail.subscriptions)),
        ("safe tools", _names(detail.safe_tools)),
        ("next upstream id", str(detail.next_upstream_id)),
        ("next server id", str(detail.next_server_id)),
        ("next lsn", str(detail.next_lsn)),
        ("delivered lsn", str(detail.delivered_lsn)),
        ("head lsn", str(detail.head_lsn)),
        ("events", _log_range(detail)),
        ("requests", f"{detail.requests} ({len(flights)} in flight)"),
    ]
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        print(f"{name + ':':<{width}} {value}")
    if flights:
        print("in flight:")
        table = [["CLIENT KEY", "METHOD", "UPSTREAM ID", "STREAM", "SAFE"]]
        table += [
            [
                _printable(f.client_key),
                _printable(f.method),
                str(f.upstream_id),
                str(f.stream),
                "yes" if f.safe else "no",
            ]
            for f in flights
        ]
        for line in _columns(table):
            print(f"  {line}")
    for name, data in (("init request", init_request), ("init result", init_result)):
        print(f"{name}:" + ("" if data is not None else " -"))
        if data is not None:
            for line in _pretty(data).splitlines():
                print(f"  {_printable(line)}")
    return 0


def _events(args: argparse.Namespace, db: Path) -> int:
    with _Db(db, write=False) as conn:
        conn.begin()
        key = conn.key(args)
        if key is None:
            return EXIT_FAILED
        where = "session_id = ? AND lsn > ?"
        params: tuple[Any, ...] = (key, args.after)
        if args.stream is not None:
            where += f" AND {conn.stream} = ?"
            params += (args.stream,)
        sql = f"SELECT lsn, {conn.stream}, created_at, payload FROM events WHERE {where}"
        # Rows are printed as the cursor steps: a long log is never held in memory.
        for lsn, stream, at, payload in conn.execute(
            f"{sql} ORDER BY lsn LIMIT ?", (*params, args.limit or -1)
        ):
            data = _blob(payload) or b""
            if args.json:
                message, raw = _embed(data)
                line = EventLine(
                    lsn=int(lsn), stream=int(stream), at=_iso(at, ms=True), message=message, raw=raw
                )
                print(msgspec.json.encode(line).decode())
            else:
                text = _printable(data.decode("utf-8", "replace"))
                print(f"{lsn} {stream} {_iso(at, ms=True)} {text}")
    return 0


def _delete(args: argparse.Namespace, db: Path) -> int:
    session_id: str = args.session_id
    with _Db(db, write=args.yes) as conn:
        # Without --yes nothing is written; with it, the counts and the deletes are one
        # transaction, so what is reported is exactly what went.
        conn.begin(immediate=args.yes)
        found = conn.find(session_id, args.principal)
        has_row = bool(found)
        if len(found) > 1:
            conn.key(args)  # says which principals, and to choose one
            return EXIT_FAILED
        # No session row: rows left behind (a crash between deletes) under the key it had.
        key = found[0][0] if found else _orphan_key(conn, session_id, args.principal)
        events, requests, in_flight = conn.one(
            "SELECT (SELECT count(*) FROM events WHERE session_id = :id),"
            " (SELECT count(*) FROM requests WHERE session_id = :id),"
            " (SELECT count(*) FROM requests WHERE session_id = :id AND done = 0)",
            {"id": key},
        )
        if not has_row and events == 0 and requests == 0:
            return _unknown(session_id, args.principal)
        owner = found[0][1] if found else args.principal
        whose = f" of {_printable(owner)}" if owner is not None else ""
        what = (
            f"session {_printable(session_id)}{whose}{'' if has_row else ' (no session row)'}:"
            f" {events} events, {requests} requests ({in_flight} in flight)"
        )
        if not args.yes:
            print(f"would delete {what}")
            _error(f"nothing deleted; run again with --yes to delete. Note: {_DELETE_WARNING}")
            return EXIT_FAILED
        for sql in schema.DELETE_SESSION:
            conn.execute(sql, (key,))
        conn.execute("COMMIT")
    print(f"deleted {what}")
    print(f"mcproxy: sessions: warning: {_DELETE_WARNING}", file=sys.stderr)
    return 0


def _log_range(detail: SessionDetail) -> str:
    text = f"{detail.events} ({detail.event_bytes} bytes)"
    if detail.events:
        text += f", LSN {detail.first_lsn}..{detail.head_lsn}"
    return text


def _orphan_key(conn: _Db, session_id: str, principal: str | None) -> str:
    return session_key(session_id, principal) if conn.keyed else session_id


def _unknown(session_id: str, principal: str | None = None) -> int:
    whose = f" of principal {_printable(principal)!r}" if principal is not None else ""
    _error(f"no session {_printable(session_id)!r}{whose}")
    return EXIT_FAILED


# --- formatting ------------------------------------------------------------------------


# msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
_BAD_JSON: Final = (msgspec.DecodeError, UnicodeDecodeError)


def _blob(value: object) -> bytes | None:
    """A BLOB column as bytes (TEXT is accepted too: the file is not ours to trust)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")


def _iso(ts: float, ms: bool = False) -> str:
    """Seconds since the epoch as ISO 8601 UTC: 2025-01-31T12:00:00Z (or ...00.123Z)."""
    moment = datetime.fromtimestamp(float(ts), UTC)
    return moment.isoformat(timespec="milliseconds" if ms else "seconds").replace("+00:00", "Z")


def _printable(text: str) -> str:
    """Escape control characters (and newlines): the text cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def _client_name(init_request: bytes | None) -> str | None:
    """``params.clientInfo.name`` of the stored initialize request, if it has a string one."""
    if init_request is None:
        return None
    try:
        request = msgspec.json.decode(init_request, type=_InitRequest)
    except _BAD_JSON:  # garbage, or a member of an unexpected type
        return None
    if request.params is None or request.params.client_info is None:
        return None
    return request.params.client_info.name


def _embed(payload: bytes) -> tuple[msgspec.Raw | None, str | None]:
    """A payload for a JSON line: its own bytes when they are one line of JSON, re-encoded
    when the JSON spans lines, else ``(None, the text)``."""
    try:
        decoded = msgspec.json.decode(payload)
    except _BAD_JSON:
        return None, payload.decode("utf-8", "replace")
    if b"\n" in payload or b"\r" in payload:
        return msgspec.Raw(msgspec.json.encode(decoded)), None
    return msgspec.Raw(payload), None


def _pretty(data: bytes) -> str:
    try:
        return msgspec.json.format(data, indent=2).decode()
    except _BAD_JSON:
        return data.decode("utf-8", "replace").replace("\n", "\\n") + "  (not JSON)"


def _str_list(text: object) -> list[str] | None:
    if not isinstance(text, str | bytes):
        return None
    try:
        return msgspec.json.decode(text, type=list[str])
    except _BAD_JSON:
        return None


def _names(values: list[str] | None) -> str:
    if values is None:
        return "(unreadable)"
    return ", ".join(_printable(v) for v in values) if values else "-"
