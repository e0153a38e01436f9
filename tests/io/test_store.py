"""The SQLite store on a real file, in both durability modes."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import sqlite3
import threading
import time
from pathlib import Path
from typing import cast

import aiosqlite
import pytest

from mcproxy.config import Config, SessionsConfig
from mcproxy.core.session import SessionRecord
from mcproxy.engine.hub import Hub, UpstreamSlots
from mcproxy.engine.outbox import Outbox, Send
from mcproxy.engine.schema import MIGRATIONS, SCHEMA_VERSION, session_key
from mcproxy.engine.store import Store
from mcproxy.errors import StoreError
from mcproxy.metrics import Metrics
from mcproxy.ops.daemon import SWEEP_FAILURES_NOT_READY, _Daemon
from mcproxy.ops.sdnotify import Notifier
from mcproxy.upstreams.base import Upstream, UpstreamFactory, UpstreamHandler
from tests.helpers import MS, SCHEMA_V1, SCHEMA_V5, TIMEOUT, eventually


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_round_trip_and_reload(tmp_path: Path, durability: str) -> None:
    store = await Store.open(tmp_path / "db.sqlite", durability)
    record = SessionRecord(
        init_request=b"{}",
        init_result=b"{}",
        initialized=True,
        log_level="debug",
        subscriptions=["a://1"],
        safe_tools=["t"],
    )
    store.save_session("S", record)
    store.save_request("S", '"a"', 7, "tools/call", False, b'{"id":"a"}', 7)
    store.save_request("S", '"b"', 8, "ping", True, b'{"id":"b"}', 8)
    for lsn in range(1, 6):  # the last one answers "b"
        answers = ('"b"', "ping") if lsn == 5 else None
        store.append("S", lsn, f'{{"n":{lsn}}}'.encode(), 7 if lsn % 2 else 0, answers)
    await store.finish_request("S", '"b"', 5)
    assert store.commits >= 1
    assert [lsn for lsn, _ in await store.read_events("S", 2)] == [3, 4, 5]
    assert [lsn for lsn, _ in await store.read_events("S", 0, stream=7)] == [1, 3, 5]
    assert [lsn for lsn, _ in await store.read_events("S", 2, stream=0)] == [4]
    assert await store.read_event("S", 4) == b'{"n":4}'
    assert await store.read_event("S", 9) is None
    await store.aclose()

    again = await Store.open(tmp_path / "db.sqlite", durability)
    loaded = await again.load_session("S")
    assert loaded is not None
    # The answered request's row is gone; ids are reserved in the session row (Session).
    assert loaded.record.next_lsn == 6 and loaded.record.next_upstream_id == 8
    assert loaded.record.log_level == "debug" and loaded.record.subscriptions == ["a://1"]
    assert [(p.key, p.upstream_id, p.safe, p.stream) for p in loaded.pending] == [
        ('"a"', 7, False, 7)
    ]
    assert loaded.answered == [('"b"', 5, "ping")]
    assert await again.sessions_with_pending() == ["S"]
    assert await again.load_session("nope") is None
    await again.delete_session("S")
    assert await again.load_session("S") is None
    assert await again.read_events("S", 0) == []
    assert await again.sessions_with_pending() == []
    await again.aclose()


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the layout mcproxy 0.1 wrote
        conn.executescript(
            SCHEMA_V1 + "INSERT INTO sessions (id, created_at, last_seen_at) VALUES ('S', 0, 0);"
            "INSERT INTO events VALUES ('S', 1, 0, x'7b7d');"
        )
    store = await Store.open(path)
    assert await store.read_events("S", 0, stream=0) == [(1, b"{}")]
    await store.append("S", 2, b"[]", stream=3)
    assert await store.read_events("S", 0, stream=3) == [(2, b"[]")]
    await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # Version 6: tables in insertion order, looked up through their session indexes.
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"events_by_lsn", "requests_by_key"} <= indexes
        assert "requests_in_flight" not in indexes and "requests_pending" not in indexes
        for query, index in (
            ("SELECT payload FROM events WHERE session_id = 'S' AND lsn > 3", "events_by_lsn"),
            ("SELECT body FROM requests WHERE session_id = 'S' AND done = 0", "requests_by_key"),
        ):
            plan = " ".join(str(r) for r in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert index in plan, plan


async def test_a_version_2_database_gains_the_upstream_state_column(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    with sqlite3.connect(path) as conn:  # the layout mcproxy wrote before HTTP upstreams
        conn.executescript(
            SCHEMA_V1.replace("PRAGMA user_version=1;", "")
            + "ALTER TABLE events ADD COLUMN stream INTEGER NOT NULL DEFAULT 0;"
            "ALTER TABLE requests ADD COLUMN stream INTEGER NOT NULL DEFAULT 0;"
            "PRAGMA user_version=2;"
            "INSERT INTO sessions (id, created_at, last_seen_at) VALUES ('S', 0, 0);"
        )
    store = await Store.open(path)
    assert await store.load_upstream_state("S") is None
    await store.save_upstream_state("S", '{"session":"u-1"}')
    await store.save_upstream_state("gone", "x")  # no row: nothing is created
    assert await store.load_upstream_state("S") == '{"session":"u-1"}'
    assert await store.load_upstream_state("gone") is None
    # The rest of the session row is not the upstream state's business, and vice versa.
    await store.save_session("S", SessionRecord(log_level="info"))
    assert await store.load_upstream_state("S") == '{"session":"u-1"}'
    await store.save_upstream_state("S", None)
    assert await store.load_upstream_state("S") is None
    await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_a_failing_statement_fails_its_session_alone(tmp_path: Path, durability: str) -> None:
    """Issue 15 finding 2: one session's constraint violation rolls back that session's writes
    in the batch, tells the store's owner before the batch's future resolves, drops its
    writes still queued, and commits everyone else's; the store stays writable."""
    store = await Store.open(tmp_path / "db.sqlite", durability)
    await store.append("A", 1, b"a1")
    told: list[tuple[str, bool]] = []
    batch: list[asyncio.Future[None]] = []

    def failed(session_id: str, error: StoreError) -> None:
        # Before the future resolves: whoever awaits it must not see success first.
        told.append((session_id, batch[0].done()))

    store.on_session_failed = failed
    batch.append(store.append("B", 1, b"b1"))
    store.append("A", 2, b"a2")  # rolled back with its session's other writes
    store.append("A", 1, b"again")  # primary key violation: A's bug
    store.append("B", 2, b"b2")
    await batch[0]  # B's writes committed: the batch's future succeeds
    assert told == [("A", False)]
    assert store.sessions_failed == 1
    assert await store.read_events("B", 0) == [(1, b"b1"), (2, b"b2")]
    assert await store.read_events("A", 0) == [(1, b"a1")]  # a2 rolled back too
    assert store.healthy and not store.failure.done()
    await store.append("A", 2, b"reloaded")  # the session may carry on once reloaded
    assert await store.read_events("A", 0) == [(1, b"a1"), (2, b"reloaded")]
    await store.aclose()


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_a_full_disk_fails_the_store_and_commits_nothing_more(
    tmp_path: Path, durability: str
) -> None:
    """A storage failure (here SQLite's own limit on the file: SQLITE_FULL, for real) fails
    every waiter, resolves ``failure`` for the daemon, and refuses every later write."""
    store = await Store.open(tmp_path / "db.sqlite", durability)
    await store.append("S", 1, b"one")
    size = store._writer._conn.execute("PRAGMA page_count").fetchone()[0]
    store._writer._conn.execute(f"PRAGMA max_page_count={size}")
    told: list[str] = []
    store.on_session_failed = lambda sid, _: told.append(sid)
    writes = [store.append("S", lsn, bytes(4000)) for lsn in range(2, 40)]
    with pytest.raises(StoreError, match="full"):
        await writes[0]
    assert store.failure.done() and "full" in str(store.failure.result())
    assert not store.healthy and told == []  # the disk's fault, not a session's
    with pytest.raises(StoreError):
        await store.append("T", 1, b"later")  # refused: nothing more is committed
    await store.aclose()
    again = await Store.open(tmp_path / "db.sqlite", durability)
    assert await again.read_events("S", 0) == [(1, b"one")]
    await again.aclose()


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_barriers_in_one_batch(tmp_path: Path, durability: str) -> None:
    """Concurrent readers each ask for a barrier in the same loop turn: one commit."""
    store = await Store.open(tmp_path / "db.sqlite", durability)
    store.append("S", 1, b"one")
    await asyncio.gather(store.barrier(), store.barrier(), store.barrier())
    assert await store.read_events("S", 0) == [(1, b"one")]
    await store.append("S", 2, b"two")  # still writable
    await store.aclose()


async def test_checkpoints_run_beside_commits_and_the_wal_restarts_under_sustained_load(
    tmp_path: Path,
) -> None:
    """Durability normal turns SQLite's own checkpoint off (it would run on the loop). The
    store's checkpoints run beside the writer, and a writer that never pauses still gets its
    WAL restarted, so the WAL does not grow with the log."""
    store = await Store.open(tmp_path / "db.sqlite", "normal", restart_wal_every=1000)
    wal = tmp_path / "db.sqlite-wal"
    payload = b"x" * 2000
    writers, rows = 50, 400
    largest = 0

    async def writer(name: str) -> None:
        # Each writes its next row as soon as the last one committed, as a session does: with
        # 50 of them the writer is never idle, so no checkpoint beside it copies the whole WAL.
        nonlocal largest
        for lsn in range(1, rows + 1):
            await store.append(name, lsn, payload)
            if wal.exists():
                largest = max(largest, wal.stat().st_size)

    await asyncio.gather(*(writer(f"S{i}") for i in range(writers)))
    assert len(await store.read_events("S7", 0)) == rows
    await store.aclose()
    # Unchecked, the WAL holds every page ever written: about 8x the payload here (a row,
    # its overflow page, the tree above them). Restarted, it stays near what one restart
    # interval writes.
    written = writers * rows * len(payload)
    assert largest < written, (largest, written)


async def test_remembered_answers_outlive_pruning_until_forgotten(tmp_path: Path) -> None:
    """An answer's row carries its request's key: pruning (a client's cursor moved past it)
    keeps it for retries; forgetting the key unmarks it, or drops it once below the floor."""
    store = await Store.open(tmp_path / "db.sqlite")
    store.save_session("S", SessionRecord(next_lsn=1))
    for n, key in ((1, '"a"'), (2, '"b"'), (3, '"c"')):
        store.save_request("S", key, n, "tools/call", False, b"{}", n)
        store.append("S", 2 * n - 1, b"progress", n)
        store.append("S", 2 * n, b"answer", n, (key, "tools/call"))
        store.finish_request("S", key, 2 * n)
    store.save_request("S", '"x"', 4, "tools/call", False, b"{}", 4)
    store.finish_request("S", '"x"', None)  # cancelled: its row stays, marked done
    await store.prune("S", 4)  # a client resumed from LSN 4
    assert [lsn for lsn, _ in await store.read_events("S", 4)] == [5, 6]
    assert await store.read_event("S", 2) == b"answer"  # a retry of "a" still gets it
    await store.aclose()

    store = await Store.open(tmp_path / "db.sqlite")
    loaded = await store.load_session("S")
    assert loaded is not None and loaded.log_floor == 4 and loaded.record.next_lsn == 7
    assert loaded.pending == []
    # All of them, in the order they were remembered (a cancel after the answer at LSN 6).
    assert loaded.answered == [
        ('"a"', 2, "tools/call"),
        ('"b"', 4, "tools/call"),
        ('"c"', 6, "tools/call"),
        ('"x"', None, "tools/call"),
    ]
    # "a" (pruned: only kept for retries) and "c" (still in the log) fall out of the window.
    await store.finish_request("S", '"y"', None, forget=(('"a"', 2), ('"c"', 6), ('"x"', None)))
    assert [lsn for lsn, _ in await store.read_events("S", 0)] == [4, 5, 6]
    loaded = await store.load_session("S")
    assert loaded is not None and loaded.answered == [('"b"', 4, "tools/call")]
    # Everything pruned: the next LSN still comes after the floor, never before it.
    await store.prune("S", 6)
    store.save_session("S", SessionRecord(next_lsn=1))  # a stale counter in the row
    loaded = await store.load_session("S")
    assert loaded is not None and loaded.record.next_lsn == 7 and loaded.log_floor == 6
    # So can a stream's pruning (a resumed GET stream at the head) take the newest rows.
    store.append("S", 7, b"general", 0)
    await store.prune("S", 7, stream=0)
    store.save_session("S", SessionRecord(next_lsn=1))
    loaded = await store.load_session("S")
    assert loaded is not None and loaded.record.next_lsn == 8
    await store.aclose()


async def test_a_version_5_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v5.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            SCHEMA_V5 + "INSERT INTO sessions (id, created_at, last_seen_at, next_upstream_id,"
            " next_lsn) VALUES ('S', 0, 0, 2, 3);"
            # LSN 1 was pruned; "a" was answered by it, "b" by LSN 3; "c" is in flight.
            "INSERT INTO events VALUES ('S', 2, 0, x'7b7d', 2), ('S', 3, 0, x'5b5d', 7);"
            "INSERT INTO requests VALUES ('S', '\"a\"', 5, 'ping', 1, NULL, 1, 1, 5),"
            " ('S', '\"b\"', 7, 'tools/call', 0, NULL, 1, 3, 7),"
            " ('S', '\"c\"', 9, 'tools/call', 0, x'7b7d', 0, NULL, 9);"
        )
    store = await Store.open(path)
    loaded = await store.load_session("S")
    assert loaded is not None
    assert loaded.answered == [('"a"', 1, "ping"), ('"b"', 3, "tools/call")]
    assert [(p.key, p.upstream_id) for p in loaded.pending] == [('"c"', 9)]
    assert loaded.log_floor == 1 and loaded.record.next_lsn == 4
    assert loaded.record.next_upstream_id == 10
    assert await store.read_events("S", 0) == [(2, b"{}"), (3, b"[]")]
    await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # "b"'s key moved onto its answer; "a" (answer pruned) keeps its row until forgotten.
        assert conn.execute("SELECT client_key FROM requests ORDER BY upstream_id").fetchall() == [
            ('"a"',),
            ('"c"',),
        ]
        assert conn.execute(
            "SELECT lsn, request_key FROM events WHERE request_key IS NOT NULL"
        ).fetchall() == [(3, '"b"')]
        # Every session's upstream ids continue above anything a row ever held.
        assert conn.execute("SELECT next_upstream_id FROM sessions").fetchall() == [(10,)]


async def test_canary_the_private_aiosqlite_api_the_store_relies_on(tmp_path: Path) -> None:
    """The store commits on the loop through ``Connection._conn`` and hands whole
    transactions to aiosqlite's thread through ``Connection._execute`` (pyproject.toml pins
    the tested range). If aiosqlite renames or changes either, this fails first, by name."""
    version = tuple(int(part) for part in importlib.metadata.version("aiosqlite").split(".")[:2])
    assert (0, 22) <= version < (0, 23), "re-test the store before widening the aiosqlite pin"
    db = await aiosqlite.connect(
        tmp_path / "canary.sqlite", isolation_level=None, check_same_thread=False
    )
    try:
        raw = db._conn
        assert isinstance(raw, sqlite3.Connection), "aiosqlite.Connection._conn changed"
        raw.execute("CREATE TABLE t (x)")  # on the loop, as Store._flush_in_loop does

        def in_worker(conn: sqlite3.Connection, value: int) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (value,))
            return threading.get_ident()

        ident = await db._execute(in_worker, raw, 7)  # type: ignore[no-untyped-call]
        assert ident != threading.get_ident(), "_execute no longer runs in the worker thread"
        assert raw.execute("SELECT x FROM t").fetchall() == [(7,)]
    finally:
        await db.close()


class _QuietUpstream:
    """An upstream that starts and says nothing; ``aclose`` fails if told to (a broken
    child-stopping path, for Hub.aclose)."""

    def __init__(self, fail_close: bool) -> None:
        self.fail_close = fail_close

    async def start(self) -> None:
        pass

    def send(self, data: bytes) -> None:
        pass

    async def aclose(self) -> None:
        if self.fail_close:
            raise RuntimeError("the child would not stop")


def _factory(fail_close: bool = False) -> UpstreamFactory:
    def factory(session_id: str, handler: UpstreamHandler) -> Upstream:
        return _QuietUpstream(fail_close)

    return factory


async def test_cancelling_the_first_requester_of_a_load_does_not_cancel_the_second(
    tmp_path: Path,
) -> None:
    """Issue 16 item 6: Hub.get shares one load between requesters; a socket that drops
    mid-bind cancels its own wait only, never the load or another requester's."""
    store = await Store.open(tmp_path / "db.sqlite")
    hub = Hub(store, Config(), _factory(), Metrics())
    sid = "S" * 20
    try:
        init = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}'
        await store.save_session(sid, SessionRecord(init_request=init))
        loop = asyncio.get_running_loop()
        first = loop.create_task(hub.get(sid))
        await asyncio.sleep(0)  # the first requester starts the load
        second = loop.create_task(hub.get(sid))
        await asyncio.sleep(0)  # the second one waits for the same load
        first.cancel()
        runner = await asyncio.wait_for(second, TIMEOUT)
        assert runner is not None and runner.id == sid
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await hub.get(sid) is runner  # loaded once
    finally:
        await hub.aclose()
        await store.aclose()


async def test_cancelling_one_outbox_pump_leaves_the_others_waiting_on_the_same_commit(
    tmp_path: Path,
) -> None:
    """Issue 16 item 6: pumps of two sessions wait for one group commit (their catch-up's
    barrier); cancelling one (its socket closed) must not cancel the commit for the other."""
    store = await Store.open(tmp_path / "db.sqlite")
    sent: dict[str, list[bytes]] = {"A": [], "B": []}

    def sender(name: str) -> Send:
        async def send(data: bytes, lsn: int | None) -> None:
            sent[name].append(data)

        return send

    outboxes = {n: Outbox(n, store, sender(n), lambda _: None, max_queue=100) for n in sent}
    loop = asyncio.get_running_loop()
    store.append("B", 1, b"b1")
    pumps = {n: loop.create_task(o.run(0, [])) for n, o in outboxes.items()}
    try:
        await asyncio.sleep(0)  # both pumps await the same batch's commit
        pumps["A"].cancel()
        with pytest.raises(asyncio.CancelledError):
            await pumps["A"]
        outboxes["B"].push_live(2, b"b2", store.append("B", 2, b"b2"))
        await eventually(lambda: sent["B"] == [b"b1", b"b2"])
        assert not pumps["B"].done()
    finally:
        pumps["B"].cancel()
        await asyncio.gather(pumps["B"], return_exceptions=True)
        await store.aclose()


async def test_store_reads_map_sqlite_errors_at_the_edge(tmp_path: Path) -> None:
    """Issue 16 item 7: every read the sweeper and start-up use raises StoreError, never a
    raw sqlite3 error (the sweeper used to die on one)."""
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    with sqlite3.connect(path) as conn:  # a real failing query: the tables are gone
        conn.execute("ALTER TABLE sessions RENAME TO elsewhere")
        conn.execute("ALTER TABLE requests RENAME TO elsewhere_too")
    for read in (
        store.expired_sessions(time.time()),
        store.session_counts(),
        store.sessions_with_pending(),
    ):
        with pytest.raises(StoreError, match="no such table"):
            await read
    await store.aclose()


async def test_hub_aclose_reports_the_sessions_it_could_not_close(tmp_path: Path) -> None:
    """Issue 16 item 5: Hub.aclose closes every session, and the failures reach the caller."""
    store = await Store.open(tmp_path / "db.sqlite")
    hub = Hub(store, Config(), _factory(fail_close=True), Metrics())
    try:
        for sid in ("A" * 20, "B" * 20):
            runner = hub.create(sid)
            runner._ensure_upstream()
            await eventually(lambda r=runner: r.upstream is not None)  # type: ignore[misc]
        with pytest.raises(ExceptionGroup) as raised:
            await hub.aclose()
        assert [str(e) for e in raised.value.exceptions] == ["the child would not stop"] * 2
        assert all(r.closed for r in hub.runners.values())
    finally:
        await store.aclose()


async def test_the_sweeper_survives_a_transient_store_error(tmp_path: Path) -> None:
    """Issue 16 item 7: a sweep that fails (here a real failing query: the table is
    briefly gone) is logged, counted, and tried again at the next interval; sweeps that keep
    failing turn /readyz's housekeeping check red, and it turns green again once one passes."""
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    config = Config(sessions=SessionsConfig(sweep_interval_s=10 * MS))
    metrics = Metrics()
    hub = Hub(store, config, _factory(), metrics)
    sweeps: list[bool] = []
    real_sweep = hub.sweep

    async def counted_sweep() -> None:
        try:
            await real_sweep()
        except BaseException:
            sweeps.append(False)
            raise
        sweeps.append(True)

    hub.sweep = counted_sweep  # type: ignore[method-assign]
    daemon = _Daemon(config, store, hub, metrics, None, None, Notifier(None))  # type: ignore[arg-type]
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE sessions RENAME TO elsewhere")
    sweeper = asyncio.get_running_loop().create_task(daemon.sweeper())
    try:
        await eventually(lambda: sweeps.count(False) >= SWEEP_FAILURES_NOT_READY)
        assert (await daemon.readiness())["housekeeping"] is False
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE elsewhere RENAME TO sessions")
        await eventually(lambda: sweeps[-1] is True)  # housekeeping goes on
        assert (await daemon.readiness())["housekeeping"] is True
        assert not sweeper.done()
        failed = metrics.errors.labels("sweep_failed")._value.get()
        assert failed >= 1
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await hub.aclose()
        await store.aclose()


async def test_a_version_7_database_keys_its_sessions_by_principal_and_id(tmp_path: Path) -> None:
    """Issue 15 finding 8, schema 8: a session is named by its principal and its id. A v7
    file with sessions of two principals, one of no principal (from before schema 4) and one
    of the anonymous principal: each keeps its row, log and requests under its new key, and
    another principal's lookup of its id finds nothing."""
    path = tmp_path / "v7.sqlite"
    v7 = "".join(MIGRATIONS[step] for step in range(2, 8))
    owners = {"A" * 20: "alice", "B" * 20: "bob", "N" * 20: None, "Z" * 20: "anonymous"}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_V1.replace("PRAGMA user_version=1;", "") + v7)
        conn.execute("PRAGMA user_version=7")
        for sid, principal in owners.items():
            conn.execute(
                "INSERT INTO sessions (id, created_at, last_seen_at, principal, next_lsn,"
                " initialized) VALUES (?, 0, 0, ?, 3, 1)",
                (sid, principal),
            )
            for lsn in (1, 2):
                conn.execute(
                    "INSERT INTO events (session_id, lsn, created_at, payload) VALUES (?, ?, 0, ?)",
                    (sid, lsn, f'{{"{sid[0]}":{lsn}}}'.encode()),
                )
            conn.execute(
                "INSERT INTO requests (session_id, client_key, upstream_id, method, safe, body)"
                " VALUES (?, '7', 5, 'tools/call', 1, ?)",
                (sid, b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}'),
            )
        conn.commit()
    store = await Store.open(path)
    try:
        keys = {sid: session_key(sid, principal) for sid, principal in owners.items()}
        assert keys["A" * 20] == "A" * 20 + "\x1falice" and keys["N" * 20] == "N" * 20
        assert keys["Z" * 20] == "Z" * 20  # the anonymous principal keeps bare ids
        assert sorted(await store.sessions_with_pending()) == sorted(keys.values())
        for sid, key in keys.items():
            loaded = await store.load_session(key)
            assert loaded is not None and loaded.record.principal == owners[sid]
            assert [p.upstream_id for p in loaded.pending] == [5]
            assert await store.read_events(key, 0) == [
                (1, f'{{"{sid[0]}":1}}'.encode()),
                (2, f'{{"{sid[0]}":2}}'.encode()),
            ]
        assert await store.load_session("A" * 20) is None  # the old name is gone
        assert await store.session_counts() == {"alice": 1, "bob": 1, None: 1, "anonymous": 1}
        # The trigger still retires a request by its session's (new) key.
        await store.append(keys["A" * 20], 3, b"{}", answers=("7", "tools/call"))
        loaded = await store.load_session(keys["A" * 20])
        assert loaded is not None and loaded.pending == []

        hub = Hub(store, Config(), _factory(), Metrics())
        try:
            assert await hub.get("B" * 20, "alice") is None  # bob's id, to alice: nothing
            runner = await hub.get("B" * 20, "bob")
            assert runner is not None and runner.id == "B" * 20 and runner.key == keys["B" * 20]
            assert await hub.get("N" * 20) is not None  # no principal: the anonymous one's
        finally:
            await hub.aclose()
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_two_principals_have_two_sessions_under_one_id(tmp_path: Path) -> None:
    """Issue 15 finding 8: the same id names one session per principal; each is created,
    parked, loaded and terminated on its own, and neither sees the other's log."""
    store = await Store.open(tmp_path / "db.sqlite")
    hub = Hub(store, Config(), _factory(), Metrics())
    sid = "S" * 20
    try:
        runners = {who: hub.create(sid, who) for who in ("alice", "bob")}
        assert runners["alice"] is not runners["bob"]
        for who, runner in runners.items():
            assert runner.id == sid and runner.key == session_key(sid, who)
            await store.save_session(runner.key, runner.core.snapshot())
            await store.append(runner.key, 1, who.encode())
        for who in runners:
            await hub.park(session_key(sid, who))
        assert hub.runners == {}
        alice = await hub.get(sid, "alice")
        assert alice is not None and alice.core.principal == "alice"
        assert await store.read_events(alice.key, 0) == [(1, b"alice")]
        await hub.terminate(sid, "bob")
        assert await hub.get(sid, "bob") is None
        assert await hub.get(sid, "alice") is alice  # untouched
        assert await hub.get(sid) is None  # nor is it the anonymous principal's
    finally:
        await hub.aclose()
        await store.aclose()


async def test_a_read_after_a_commit_sees_it_while_other_reads_run(tmp_path: Path) -> None:
    """Peer benchmark (issue 20): under load a POST stream ended without its answer. The
    answer was committed (the pump waited for the barrier), but the pump's read of the log
    missed it: reads share one connection, and a read still between its hops (a statement
    stepped once by ``execute``, not yet fetched) held that connection's snapshot, older
    than the commit, for every read that ran meanwhile. Each read is one hop now."""
    store = await Store.open(tmp_path / "db.sqlite")
    try:
        for lsn in range(1, 6):  # another session's log: its reads have rows to fetch
            store.append("other", lsn, b"o%d" % lsn)
        for lsn in range(1, 301):
            others = [asyncio.ensure_future(store.read_events("other", 0)) for _ in range(3)]
            await asyncio.sleep(0)  # their first hops are queued in the reader's thread
            store.append("S", lsn, b"m%d" % lsn, stream=1)
            await store.barrier()
            rows = await store.read_events("S", lsn - 1, 10, 1)
            assert [r[0] for r in rows] == [lsn], f"committed LSN {lsn} not read: {rows}"
            await asyncio.gather(*others)
    finally:
        await store.aclose()


def test_a_slot_held_for_a_handed_over_upstream_is_counted_like_any() -> None:
    """A reload's adopted upstream holds a slot without ``acquire``; ``release`` uncounts it
    per principal, so ``hold`` must have counted it (else the share drifts below zero and
    the per-principal cap lets one principal start more than its share)."""
    slots = UpstreamSlots(cast(Hub, None))  # hold and release never reach the hub
    slots.hold("s1", "alice")
    assert slots.per_principal["alice"] == 1
    slots.release("s1")
    assert slots.per_principal["alice"] == 0 and not slots.live
