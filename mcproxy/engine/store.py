"""The durable state: sessions, their LSN-numbered event logs and in-flight requests, in SQLite.

Two connections to one WAL-mode database file:

- a *writer* that commits whatever has queued up in a single transaction (group commit):
  in a loop callback once per event-loop turn for durability ``normal``, in aiosqlite's
  worker thread for ``full`` (whose fsync must not block the loop). Every write returns a
  future that resolves once its transaction has committed; writes commit in submission
  order, so a resolved future means every earlier write is durable too. The session driver
  writes a message to a socket only after its future resolved, which is what "committed
  before it is written to any socket" means.
- a *reader*, which only ever sees committed data (WAL readers never see an open write
  transaction), used for replay and for loading sessions.

Durability: ``normal`` is ``synchronous=NORMAL`` in WAL mode. A commit is in the WAL file when
it returns, so it survives the proxy being killed (SIGKILL, OOM); only an OS crash or power
loss can take back the last transactions. ``full`` fsyncs the WAL on every commit, which the
group commit amortises over a batch.

This module stores bytes for sessions; it knows nothing of WebSockets or of JSON-RPC. A
session is named here by its key (``schema.session_key``: its principal and its id, issue 15
finding 8); every ``session_id`` parameter below is such a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiosqlite

from mcproxy.core.session import PendingRow, SessionRecord
from mcproxy.engine import schema
from mcproxy.errors import StoreError
from mcproxy.tasks import TaskSet

# With durability "normal" the writer commits on the event loop, so SQLite's automatic WAL
# checkpoint (which copies pages back into the database file, and fsyncs it) would stall the
# loop for milliseconds. It is turned off there. Instead, after this many writes (a few
# thousand WAL pages), a third connection checkpoints in its own thread, *beside* the writer:
# a PASSIVE checkpoint takes no lock a writer needs, so commits never wait for it. (Holding
# commits back for it cost 20% of the time under load on a 2-core machine: the checkpoint's
# thread competes for a core, and every answer waits for a commit.)
CHECKPOINT_EVERY_WRITES: Final = 1000
# SQLite restarts the WAL from its start only once every frame in it has been copied, and a
# checkpoint beside a writer that never pauses copies only what was written before it began.
# So after this many writes, right after a checkpoint beside the writer has finished, one
# runs in the writer's own thread with commits held back: it copies only what the last one
# missed (a few milliseconds), and the next commit restarts the WAL.
RESTART_WAL_EVERY_WRITES: Final = 8000

_UPSERT_SESSION: Final = """
INSERT INTO sessions (id, created_at, last_seen_at, init_request, init_result, initialized,
    log_level, subscriptions, safe_tools, next_upstream_id, next_server_id, next_lsn,
    delivered_lsn, principal, server_requests)
VALUES (:id, :now, :now, :init_request, :init_result, :initialized, :log_level,
    :subscriptions, :safe_tools, :next_upstream_id, :next_server_id, :next_lsn, :delivered_lsn,
    :principal, :server_requests)
ON CONFLICT (id) DO UPDATE SET
    last_seen_at = :now, init_request = :init_request, init_result = :init_result,
    initialized = :initialized, log_level = :log_level, subscriptions = :subscriptions,
    safe_tools = :safe_tools, server_requests = :server_requests,
    next_upstream_id = max(next_upstream_id, :next_upstream_id),
    next_server_id = max(next_server_id, :next_server_id),
    next_lsn = max(next_lsn, :next_lsn), delivered_lsn = max(delivered_lsn, :delivered_lsn)
"""
# Pruning keeps the answers still remembered for retries (their keys go with forgetting).
_PRUNE: Final = "DELETE FROM events WHERE session_id = ? AND lsn <= ? AND request_key IS NULL"
_PRUNE_STREAM: Final = (
    "DELETE FROM events WHERE session_id = ? AND lsn <= ? AND request_key IS NULL AND stream = ?"
)
_RAISE_FLOOR: Final = "UPDATE sessions SET log_floor = max(log_floor, ?) WHERE id = ?"
# A stream's pruning may take the newest rows; the next LSN must not fall back to them.
_RAISE_NEXT_LSN: Final = "UPDATE sessions SET next_lsn = max(next_lsn, ? + 1) WHERE id = ?"
_BARRIER: Final = ""  # an op with no statement: resolves with its batch's commit
_APPEND: Final = (
    "INSERT INTO events (session_id, lsn, created_at, payload, stream) VALUES (?, ?, ?, ?, ?)"
)
_APPEND_ANSWER: Final = (
    "INSERT INTO events (session_id, lsn, created_at, payload, stream, request_key,"
    " request_method) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SAVE_REQUEST: Final = (
    "INSERT OR REPLACE INTO requests (session_id, client_key, upstream_id, method, safe, body,"
    " done, lsn, stream, written) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?, ?)"
)
_MARK_WRITTEN: Final = (
    "UPDATE requests SET written = ? WHERE session_id = ? AND client_key = ? AND done = 0"
)
_CANCELLED_REQUEST: Final = (
    "UPDATE requests SET done = 1, lsn = NULL, body = NULL, remembered_at ="
    " (SELECT coalesce(max(lsn), 0) FROM events WHERE session_id = ?1)"
    " WHERE session_id = ?1 AND client_key = ?2"
)
_FORGET_REQUEST: Final = "DELETE FROM requests WHERE session_id = ? AND client_key = ? AND done = 1"
# A forgotten answer still in the log stays there, unmarked, until it is pruned like any
# other message; one below the floor was kept only for retries and goes now.
_FORGET_PRUNED_ANSWER: Final = (
    "DELETE FROM events WHERE session_id = ?1 AND lsn = ?2"
    " AND lsn <= (SELECT log_floor FROM sessions WHERE id = ?1)"
)
_FORGET_ANSWER: Final = (
    "UPDATE events SET request_key = NULL, request_method = NULL WHERE session_id = ? AND lsn = ?"
)
# An UPDATE, not an upsert: the row is written when `initialize` arrives, before any upstream
# session can exist, and a deleted session must not come back through its upstream's state.
_SAVE_UPSTREAM_STATE: Final = "UPDATE sessions SET upstream_state = ? WHERE id = ?"


@dataclass(frozen=True, slots=True)
class LoadedSession:
    record: SessionRecord
    pending: list[PendingRow]
    answered: list[tuple[str, int | None, str]]
    log_floor: int  # every LSN up to here is gone from the log (pruned)


@dataclass(frozen=True, slots=True)
class StoreStats:
    sessions: int
    log_rows: int
    log_bytes: int
    file_bytes: int  # the database and its WAL


@dataclass(slots=True)
class _Batch:
    """Writes committed in one transaction. One future for all of them: they succeed or fail
    together, and a future per write (with its done callback) cost more than the write."""

    statements: list[tuple[str, Any]]
    future: asyncio.Future[None]


class Store:
    """Open with ``await Store.open(path)``; close with ``await store.aclose()``.

    The writer's state. Its six fields are not independent: they make up these states, and
    only the transitions drawn here happen (durability ``normal``; with ``full`` the writer
    task commits every batch in its thread and only IDLE, SCHEDULED, FAILED and CLOSED exist).

    ```
                    _submit                     _flush_in_loop (next loop turn)
      IDLE ───────────────────────▶ SCHEDULED ───────────────────────────────▶ IDLE
      _flush_scheduled = False      _flush_scheduled      commits one batch on the loop;
      _pending empty                = True                 reschedules itself while
        ▲                                                  _pending is not empty
        │ commit done                    │ _writes_since_checkpoint >= CHECKPOINT_EVERY_WRITES
        │                                ▼ (and none running)
        │                     CHECKPOINTING: _checkpointing is a task; a PASSIVE checkpoint on
        │                     the third connection, beside the writer; commits go on. When it
        │                     ends it may set _restart_wal (SQLITE_BUSY, an error, or
        │                     _writes_since_restart >= RESTART_WAL_EVERY_WRITES)
        │                                │ _restart_wal and _checkpointing is None, at a flush
        │                                ▼
        └──────────────────── CATCHING_UP: _catching_up is a task committing one batch plus
                              a checkpoint in the writer's thread; _flush_in_loop does
                              nothing meanwhile (writes queue in _pending), and the task
                              schedules the next flush when it is done

      any state ── a storage failure (_fail) ──▶ FAILED: _failed is set, every pending future
                                                 fails, later writes are refused
      any state ── aclose ──▶ CLOSED: _closed; no new checkpoint starts, queued batches are
                              committed synchronously, later writes are refused
    ```
    """

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection | None,
        max_batch: int,
        restart_wal_every: int,
    ) -> None:
        self.path = path
        self._writer = writer
        self._writes_since_checkpoint = 0
        self._writes_since_restart = 0
        self._checkpointer = checkpointer  # durability "normal": commits on the loop
        self._checkpointing: asyncio.Task[None] | None = None  # beside the writer
        self._catching_up: asyncio.Task[None] | None = None  # in its thread; commits wait
        self._restart_wal = False  # the next checkpoint is the writer's own
        self._restart_wal_every = restart_wal_every
        self._in_loop = checkpointer is not None
        self._own_checkpoints = True  # False: store.checkpoints = "external"
        self._reader = reader
        self._max_batch = max_batch
        self._wake = asyncio.Event()  # durability "full": the writer task has work
        self._tasks = TaskSet("store")
        self._failed: BaseException | None = None
        self._writer_task: asyncio.Task[None] | None = None
        # Submitted and not yet committed, oldest first; the last one may still be open.
        self._pending: deque[_Batch] = deque()
        self._open: _Batch | None = None
        self._flush_scheduled = False
        self._closed = False
        self.last_write: asyncio.Future[None] | None = None
        self.commits = 0  # transactions committed (for tests and benchmarks)
        self.sessions_failed = 0  # sessions whose writes failed alone (fault isolation)
        # Told (before the batch's future resolves) that a session's writes in a batch failed
        # and were rolled back while everyone else's committed; the Hub sets it.
        self.on_session_failed: Callable[[str, StoreError], None] | None = None
        # Resolved with the error once the storage itself fails (I/O, disk full, corruption):
        # the store refuses every write from then on, and the daemon exits (docs/SECURITY.md).
        self.failure: asyncio.Future[StoreError] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        path: Path,
        durability: str = "normal",
        max_batch: int = 512,
        restart_wal_every: int = RESTART_WAL_EVERY_WRITES,
        checkpoints: bool = True,
    ) -> Store:
        """Open (creating if needed) the database and start the group-commit writer.

        ``checkpoints=False`` (``store.checkpoints = "external"``): no checkpoint at all, not
        even SQLite's automatic one; a replication tool that runs its own (Litestream) keeps
        the WAL in bounds (docs/DEPLOY.md *Replication*).

        Raises:
            StoreError: the file cannot be opened or has a newer schema.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
            await writer.execute("PRAGMA journal_mode=WAL")
            sync = "FULL" if durability == "full" else "NORMAL"
            await writer.execute(f"PRAGMA synchronous={sync}")
            await writer.execute("PRAGMA busy_timeout=5000")
            async with writer.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            try:
                scripts = schema.steps(version)
            except ValueError as exc:
                raise StoreError(f"{path}: {exc}") from exc
            for script in scripts:
                await writer.executescript(script)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=5000")
            checkpointer = None
            if not checkpoints:
                await writer.execute("PRAGMA wal_autocheckpoint=0")
            if durability != "full":
                await writer.execute("PRAGMA wal_autocheckpoint=0")
                checkpointer = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        store = cls(path, writer, reader, checkpointer, max_batch, restart_wal_every)
        store._own_checkpoints = checkpoints
        if not store._in_loop:
            store._writer_task = store._tasks.spawn(store._write_loop(), "store-writer")
        return store

    # --- writes (group-committed, FIFO) ------------------------------------------------

    def _submit(self, sql: str, params: Any) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._failed is not None or self._closed:
            refused: asyncio.Future[None] = _Commit(loop=loop)
            refused.add_done_callback(_consume_exception)
            refused.set_exception(StoreError("the event log is not writable"))
            return refused
        batch = self._open
        if batch is None or len(batch.statements) >= self._max_batch:
            future: asyncio.Future[None] = _Commit(loop=loop)
            # Nobody may await a write (e.g. a session row update); still mark errors as seen.
            future.add_done_callback(_consume_exception)
            batch = self._open = _Batch([], future)
            self._pending.append(batch)
        batch.statements.append((sql, params))
        self.last_write = batch.future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._in_loop:
                # Group commit without a task switch: everything submitted during this turn
                # of the event loop is committed together in a callback at the next.
                loop.call_soon(self._flush_in_loop)
            else:
                self._wake.set()
        return batch.future

    def _take(self) -> _Batch | None:
        """The oldest batch not yet committed, closed to further writes."""
        if not self._pending:
            return None
        batch = self._pending.popleft()
        if batch is self._open:
            self._open = None
        return batch

    def append(
        self,
        session_id: str,
        lsn: int,
        payload: bytes,
        stream: int = 0,
        answers: tuple[str, str] | None = None,
    ) -> asyncio.Future[None]:
        """Log a message. ``answers``: the (client key, method) of the request it answers,
        remembered with it for retries after a restart."""
        if answers is None:
            return self._submit(_APPEND, (session_id, lsn, time.time(), payload, stream))
        key, method = answers
        return self._submit(
            _APPEND_ANSWER, (session_id, lsn, time.time(), payload, stream, key, method)
        )

    def save_request(
        self,
        session_id: str,
        key: str,
        upstream_id: int,
        method: str,
        safe: bool,
        body: bytes,
        stream: int,
        written: bool = True,
    ) -> asyncio.Future[None]:
        return self._submit(
            _SAVE_REQUEST,
            (session_id, key, upstream_id, method, int(safe), body, stream, int(written)),
        )

    def mark_written(self, session_id: str, key: str, written: bool) -> asyncio.Future[None]:
        """Whether the request ``key`` in flight may have reached an upstream process."""
        return self._submit(_MARK_WRITTEN, (int(written), session_id, key))

    def finish_request(
        self,
        session_id: str,
        key: str,
        lsn: int | None,
        forget: tuple[tuple[str, int | None], ...] = (),
    ) -> asyncio.Future[None]:
        """A request was answered (by the logged message ``lsn``) or cancelled (``lsn``
        None). An answer needs no write here: appending it with ``answers`` retired the
        request's row (the `answer_retires_request` trigger). ``forget``: (key, answer LSN) of
        requests that fell out of the dedupe window; what was kept for them goes."""
        if forget:
            self.forget(session_id, forget)
        if lsn is None:
            return self._submit(_CANCELLED_REQUEST, (session_id, key))
        last = self.last_write
        if last is None or self._failed is not None or self._closed:
            return self.barrier()  # (refused, if the log is not writable)
        return last

    def forget(
        self, session_id: str, pairs: tuple[tuple[str, int | None], ...]
    ) -> asyncio.Future[None]:
        """Requests that left the dedupe window, as (key, answer LSN or None): a cancelled
        one's row goes; an answer is unmarked, or dropped if pruning kept it only for that."""
        for key, answer in pairs:
            self._submit(_FORGET_REQUEST, (session_id, key))
            if answer is not None:
                self._submit(_FORGET_PRUNED_ANSWER, (session_id, answer))
                self._submit(_FORGET_ANSWER, (session_id, answer))
        return self.barrier()

    def save_session(self, session_id: str, record: SessionRecord) -> asyncio.Future[None]:
        return self._submit(
            _UPSERT_SESSION,
            {
                "id": session_id,
                "now": time.time(),
                "init_request": record.init_request,
                "init_result": record.init_result,
                "initialized": int(record.initialized),
                "log_level": record.log_level,
                "subscriptions": json.dumps(record.subscriptions),
                "safe_tools": json.dumps(record.safe_tools),
                "next_upstream_id": record.next_upstream_id,
                "next_server_id": record.next_server_id,
                "next_lsn": record.next_lsn,
                "delivered_lsn": record.delivered_lsn,
                "principal": record.principal,
                "server_requests": json.dumps(record.server_requests),
            },
        )

    def save_upstream_state(self, session_id: str, value: str | None) -> asyncio.Future[None]:
        """Record what the upstream transport needs after a restart (opaque text, or None)."""
        return self._submit(_SAVE_UPSTREAM_STATE, (value, session_id))

    def delete_session(self, session_id: str) -> asyncio.Future[None]:
        """Forget a session: its row, its log and its requests (one transaction)."""
        for sql in schema.DELETE_SESSION:
            future = self._submit(sql, (session_id,))
        return future

    def prune(
        self, session_id: str, through_lsn: int, stream: int | None = None
    ) -> asyncio.Future[None]:
        """Drop logged messages up to ``through_lsn`` (of one stream only, if given); answers
        remembered for retries stay until forgotten (``finish_request``)."""
        if stream is not None:
            self._submit(_PRUNE_STREAM, (session_id, through_lsn, stream))
            return self._submit(_RAISE_NEXT_LSN, (through_lsn, session_id))
        self._submit(_PRUNE, (session_id, through_lsn))
        return self._submit(_RAISE_FLOOR, (through_lsn, session_id))

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once every write submitted so far has committed."""
        return self._submit(_BARRIER, ())

    def _flush_in_loop(self) -> None:
        self._flush_scheduled = False
        if self._catching_up is not None:
            return  # the writer is busy in its thread; it flushes the rest when done
        batch = self._take()
        if batch is None:
            return
        # Closing flushes synchronously: no checkpoint is started then (aclose runs none).
        if self._restart_wal and self._checkpointing is None and not self._closed:
            self._restart_wal = False
            self._writes_since_checkpoint = self._writes_since_restart = 0
            self._catching_up = self._tasks.spawn(
                self._commit(batch, checkpoint=True), "store-wal-restart"
            )
            return
        if self._pending:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_in_loop)
        try:
            failed = _run_transaction(self._writer._conn, batch.statements)
        except sqlite3.Error as exc:
            self._fail(batch, exc)
            return
        self._succeed(batch, failed)
        if (
            self._writes_since_checkpoint >= CHECKPOINT_EVERY_WRITES
            and self._own_checkpoints
            and self._checkpointing is None
            and not self._restart_wal
            and not self._closed
        ):
            self._writes_since_checkpoint = 0
            self._checkpointing = self._tasks.spawn(self._checkpoint(), "store-checkpoint")

    async def _checkpoint(self) -> None:
        """A PASSIVE checkpoint beside the writer (see CHECKPOINT_EVERY_WRITES)."""
        assert self._checkpointer is not None
        try:
            async with self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                row = await cursor.fetchone()
            if row is not None and int(row[0]) != 0:
                self._restart_wal = True  # SQLITE_BUSY: it could not even start; do it there
        except sqlite3.Error:
            self._restart_wal = True  # the writer's own checkpoint reports what is wrong
        finally:
            self._checkpointing = None
        if self._writes_since_restart >= self._restart_wal_every:
            self._restart_wal = True

    async def _write_loop(self) -> None:
        """Durability "full": whatever was submitted while the last commit was in the
        writer's thread is the next transaction."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._flush_scheduled = False
            while self._failed is None and (batch := self._take()) is not None:
                await self._commit(batch)
            if self._closed:
                return

    async def _commit(self, batch: _Batch, checkpoint: bool = False) -> None:
        """In the writer's thread: every transaction with durability "full" (it fsyncs), and
        with "normal" the occasional one that also checkpoints (see RESTART_WAL_EVERY_WRITES)."""
        try:
            # The whole transaction goes to aiosqlite's thread in one hop, not one hop per
            # statement. aiosqlite has no public "run this function on the connection" call;
            # `_execute` is the one its own methods use.
            failed = await self._writer._execute(  # type: ignore[no-untyped-call]
                _run_transaction, self._writer._conn, batch.statements, checkpoint
            )
        except sqlite3.Error as exc:
            self._fail(batch, exc)
            return
        finally:
            if checkpoint:
                self._catching_up = None
                if self._pending and not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush_in_loop)
        self._succeed(batch, failed)

    def _succeed(self, batch: _Batch, failed: dict[str, sqlite3.Error]) -> None:
        # Sessions whose statements failed (a constraint, a bug) lost this batch's writes
        # alone; they hear it before anyone's future resolves, so nothing of theirs that did
        # not commit reaches a socket or an upstream, and their writes still queued go too
        # (they build on what was rolled back).
        for session_id, exc in failed.items():
            self.sessions_failed += 1
            for queued in self._pending:
                queued.statements = [
                    st for st in queued.statements if _session_of(*st) != session_id
                ]
            if self.on_session_failed is not None:
                self.on_session_failed(session_id, StoreError(f"session write failed: {exc}"))
        self.commits += 1
        if not batch.future.done():
            batch.future.set_result(None)
        self._writes_since_checkpoint += len(batch.statements)
        self._writes_since_restart += len(batch.statements)

    def _fail(self, batch: _Batch, exc: sqlite3.Error) -> None:
        # litestream's rule: return errors, don't log and go on. Every waiter learns the log
        # is broken, and later writes are refused: sessions fail instead of losing messages.
        self._failed = exc
        error = StoreError(f"event log write failed: {exc}")
        if not self.failure.done():
            self.failure.set_result(error)
        for failed in (batch, *self._pending):
            if not failed.future.done():
                failed.future.set_exception(error)
        self._pending.clear()
        self._open = None

    # --- reads (committed data only) ---------------------------------------------------

    async def read_events(
        self, session_id: str, after: int, limit: int = 1000, stream: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Logged messages with LSN > ``after``, oldest first, at most ``limit``; only those
        of ``stream`` unless it is None."""
        if stream is None:
            sql = (
                "SELECT lsn, payload FROM events WHERE session_id = ? AND lsn > ?"
                " ORDER BY lsn LIMIT ?"
            )
            params: tuple[Any, ...] = (session_id, after, limit)
        else:
            sql = (
                "SELECT lsn, payload FROM events WHERE session_id = ? AND lsn > ?"
                " AND stream = ? ORDER BY lsn LIMIT ?"
            )
            params = (session_id, after, stream, limit)
        return [(int(r[0]), bytes(r[1])) for r in await self._read(sql, params)]

    async def read_event(self, session_id: str, lsn: int) -> bytes | None:
        rows = await self.read_events(session_id, lsn - 1, 1)
        return rows[0][1] if rows and rows[0][0] == lsn else None

    async def load_session(self, session_id: str) -> LoadedSession | None:
        try:
            return await self._load(session_id)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot load session: {exc}") from exc

    async def _load(self, session_id: str) -> LoadedSession | None:
        found = await self._rows(
            "SELECT init_request, init_result, initialized, log_level, subscriptions,"
            " safe_tools, next_upstream_id, next_server_id, next_lsn, delivered_lsn, principal,"
            " log_floor, (SELECT max(lsn) FROM events WHERE session_id = :id),"
            " (SELECT max(upstream_id) FROM requests WHERE session_id = :id), server_requests"
            " FROM sessions WHERE id = :id",
            {"id": session_id},
        )
        row = _first(found)
        if row is None:
            return None
        pruned = int(row[11])
        last_lsn = max(int(row[12] or 0), pruned)
        found = await self._rows(
            "SELECT min(lsn) FROM events WHERE session_id = ? AND lsn > ?", (session_id, pruned)
        )
        first = _first(found)
        record = SessionRecord(
            init_request=None if row[0] is None else bytes(row[0]),
            init_result=None if row[1] is None else bytes(row[1]),
            initialized=bool(row[2]),
            log_level=row[3],
            subscriptions=list(json.loads(row[4])),
            safe_tools=list(json.loads(row[5])),
            # The row holds a reservation (Session._alloc_id); rows in flight are below it.
            next_upstream_id=max(int(row[6]), int(row[13] or 0) + 1),
            next_server_id=int(row[7]),
            next_lsn=max(int(row[8]), last_lsn + 1),
            delivered_lsn=min(int(row[9]), last_lsn),
            principal=row[10],
            server_requests=[(int(c), u, int(st)) for c, u, st in json.loads(row[14] or "[]")],
        )
        found = await self._rows(
            "SELECT client_key, upstream_id, method, safe, body, stream, written FROM requests"
            " WHERE session_id = ? AND done = 0",
            (session_id,),
        )
        pending = [
            PendingRow(
                str(r[0]), int(r[1]), str(r[2]), bool(r[3]), bytes(r[4]), int(r[5]), bool(r[6])
            )
            for r in found
        ]
        # Remembered ids, in the order they were remembered: keys on answer rows, and
        # cancelled requests (plus, from before schema 6, answered ones whose answer had been
        # pruned) in `requests`. All of them: the core forgets what exceeds its window, and
        # a row it never saw would never be forgotten (nor pruned).
        found = await self._rows(
            "SELECT key, lsn, method FROM ("
            " SELECT request_key AS key, lsn, request_method AS method, lsn AS at, 0 AS late"
            "  FROM events WHERE session_id = :id AND request_key IS NOT NULL"
            " UNION ALL"
            " SELECT client_key, lsn, method, coalesce(remembered_at, lsn, 0), 1 FROM requests"
            "  WHERE session_id = :id AND done = 1"
            ") ORDER BY at, late",
            {"id": session_id},
        )
        answered = [(str(r[0]), None if r[1] is None else int(r[1]), str(r[2])) for r in found]
        # With no rows left above the floor, everything before the next LSN is gone (or
        # never existed).
        floor = int(first[0]) - 1 if first and first[0] is not None else record.next_lsn - 1
        return LoadedSession(record, pending, answered, floor)

    async def load_upstream_state(self, session_id: str) -> str | None:
        """The last committed ``save_upstream_state`` value (None if none, or no such row)."""
        try:
            found = await self._rows(
                "SELECT upstream_state FROM sessions WHERE id = ?", (session_id,)
            )
            row = _first(found)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot load upstream state: {exc}") from exc
        return None if row is None or row[0] is None else str(row[0])

    async def session_counts(self) -> dict[str | None, int]:
        """Stored sessions per principal (for the session limits after a restart)."""
        rows = await self._read("SELECT principal, count(*) FROM sessions GROUP BY principal")
        return {r[0]: int(r[1]) for r in rows}

    async def newest_event_at(self) -> float | None:
        """Wall-clock time of the newest logged message (None: an empty log): after a
        restore from a replica, the recovery point (docs/DEPLOY.md *Restore*)."""
        found = await self._rows("SELECT created_at FROM events ORDER BY id DESC LIMIT 1")
        row = _first(found)
        return float(row[0]) if row else None

    async def expired_sessions(self, last_seen_before: float) -> list[tuple[str, str | None]]:
        """(id, principal) of sessions not seen since the given wall-clock time."""
        rows = await self._read(
            "SELECT id, principal FROM sessions WHERE last_seen_at < ?", (last_seen_before,)
        )
        return [(str(r[0]), r[1]) for r in rows]

    async def stats(self) -> StoreStats:
        """For the metrics: counts read from committed data, sizes from the file system."""
        try:
            found = await self._rows("SELECT count(*) FROM sessions")
            sessions = _first(found)
            found = await self._rows(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
            )
            events = _first(found)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read statistics: {exc}") from exc
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.stat(f"{self.path}{suffix}").st_size
        assert sessions is not None and events is not None
        return StoreStats(int(sessions[0]), int(events[0]), int(events[1]), size)

    def delete_orphans(self) -> asyncio.Future[None]:
        """Startup: rows whose session row is gone (a crash between deletes, an old bug)."""
        for sql in schema.DELETE_ORPHANS:
            self._submit(sql, ())
        return self.barrier()

    @property
    def healthy(self) -> bool:
        return self._failed is None and not self._closed

    async def ping(self) -> bool:
        """Readiness: writable, and the file answers a read."""
        if not self.healthy:
            return False
        try:
            await self._rows("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    async def sessions_with_pending(self) -> list[str]:
        """Sessions that had requests in flight (to resolve right after a restart)."""
        rows = await self._read("SELECT DISTINCT session_id FROM requests WHERE done = 0")
        return [str(r[0]) for r in rows]

    async def _rows(self, sql: str, params: Any = ()) -> list[Any]:
        """Every row of one query, in one hop of the reader's thread. Never a cursor held
        across hops: reads share one connection, and a statement stepped once (sqlite3's
        ``execute``) but not yet fetched holds the connection's read snapshot; every read
        that ran meanwhile saw the log as it was then, not what had committed since. An
        outbox that waited for its answer's commit read nothing and ended a POST stream
        without the answer (peer benchmark, issue 20)."""
        return list(await self._reader.execute_fetchall(sql, params))

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one query on the reader; sqlite3's errors become StoreError here, at the
        edge, so callers (the sweeper, start-up) handle one exception type.

        Raises:
            StoreError: the query failed.
        """
        try:
            return await self._rows(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"event log read failed: {exc}") from exc

    # --- lifecycle -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit what is queued, stop the writer, close both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in (self._checkpointing, self._catching_up):
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)
        if self._in_loop:
            while self._pending and self._failed is None:
                self._flush_in_loop()
        self._wake.set()  # the writer task commits what is pending, then returns
        if self._writer_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer_task), timeout=30)
        await self._tasks.cancel_all()
        for db in (self._writer, self._reader, self._checkpointer):
            if db is not None:
                with contextlib.suppress(Exception):
                    await db.close()


def _first(rows: list[Any]) -> Any | None:
    return rows[0] if rows else None


def _run_transaction(
    conn: sqlite3.Connection, statements: list[tuple[str, Any]], checkpoint: bool = False
) -> dict[str, sqlite3.Error]:
    """One transaction, consecutive equal statements batched; then, if asked, a PASSIVE
    checkpoint (it never waits for readers; what it cannot copy now waits for the next).

    Returns the sessions whose statements failed, with the error: if a statement fails for a
    reason of its own (a constraint, a bug), the batch is run again with each session's
    statements under a savepoint, so that session's writes alone are rolled back and
    everyone else's commit. A storage failure (see ``_storage_failure``) raises.
    """
    failed: dict[str, sqlite3.Error] = {}
    try:
        conn.execute("BEGIN")
        i = 0
        while i < len(statements):
            j = i + 1
            while j < len(statements) and statements[j][0] is statements[i][0]:
                j += 1
            if statements[i][0] is _BARRIER:
                pass
            elif j - i == 1:
                conn.execute(*statements[i])
            else:
                conn.executemany(statements[i][0], [p for _, p in statements[i:j]])
            i = j
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if _storage_failure(exc):
            raise
        failed = _run_isolated(conn, statements)
    if checkpoint:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return failed


def _run_isolated(
    conn: sqlite3.Connection, statements: list[tuple[str, Any]]
) -> dict[str, sqlite3.Error]:
    """The slow path of a batch with a failing statement: a savepoint per session. Sessions
    touch disjoint rows, so running one session's statements after another's (each in its
    own order) commits the same rows as the batch in submission order."""
    groups: dict[str | None, list[tuple[str, Any]]] = {}
    for statement in statements:
        if statement[0] is not _BARRIER:
            groups.setdefault(_session_of(*statement), []).append(statement)
    failed: dict[str, sqlite3.Error] = {}
    try:
        conn.execute("BEGIN")
        for session_id, group in groups.items():
            conn.execute("SAVEPOINT session")
            try:
                for statement in group:
                    conn.execute(*statement)
            except sqlite3.Error as exc:
                if session_id is None or _storage_failure(exc):
                    raise  # not one session's (start-up housekeeping), or the disk's
                conn.execute("ROLLBACK TO session")
                failed[session_id] = exc
            conn.execute("RELEASE session")
        conn.execute("COMMIT")
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return failed


# SQLite's primary result codes (sqlite.org/rescode.html) that mean the storage, not one
# statement, is at fault: PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL,
# CANTOPEN, PROTOCOL, NOTADB. Anything else (CONSTRAINT, MISMATCH, TOOBIG, RANGE, a
# misuse from a bug) is the statement's own, and fails its session alone.
_STORAGE_CODES: Final = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 26})


def _storage_failure(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _STORAGE_CODES


# Where each write statement carries its session id (the params are a tuple, or a dict with
# "id"); statements of no session (start-up housekeeping) are absent.
_SESSION_PARAM: Final[dict[str, int]] = {
    _APPEND: 0,
    _APPEND_ANSWER: 0,
    _SAVE_REQUEST: 0,
    _CANCELLED_REQUEST: 0,
    _FORGET_REQUEST: 0,
    _FORGET_PRUNED_ANSWER: 0,
    _FORGET_ANSWER: 0,
    _PRUNE: 0,
    _PRUNE_STREAM: 0,
    _RAISE_FLOOR: 1,
    _RAISE_NEXT_LSN: 1,
    _SAVE_UPSTREAM_STATE: 1,
    **dict.fromkeys(schema.DELETE_SESSION, 0),
}


def _session_of(sql: str, params: Any) -> str | None:
    if isinstance(params, dict):
        return str(params["id"])
    index = _SESSION_PARAM.get(sql)
    return None if index is None else str(params[index])


class _Commit(asyncio.Future[None]):
    """A batch's future, shared by every write in it and awaited by many tasks. Only the
    store resolves it: ``Task.cancel`` cancels the future its task awaits, so one waiter's
    cancellation (a socket closing mid-wait) would otherwise cancel the commit for every
    other waiter. Here the cancelled task gets its CancelledError once the commit is done."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
