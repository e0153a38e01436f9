"""The database's schema, in one place: the DDL of the current version, the migrations from
every older one, and the statements that delete a session. Used by ``engine.store`` (the
daemon) and ``ops.admin`` (the operator's commands), so the two never disagree about what a
session's rows are.

The version is SQLite's ``PRAGMA user_version``. Each migration step takes a database from
version N-1 to N and commits together with its version number (``steps``): a crash between
the two would otherwise run a step again on a database it has already changed.
"""

from __future__ import annotations

from typing import Final

from mcproxy.core.auth import ANONYMOUS

SCHEMA_VERSION: Final = 8
# Columns that older versions lacked, for readers of any version (ops.admin).
STREAM_SINCE: Final = 2  # events.stream, requests.stream
PRINCIPAL_SINCE: Final = 4  # sessions.principal
LOG_FLOOR_SINCE: Final = 6  # sessions.log_floor, events.request_key
KEYED_SINCE: Final = 8  # sessions.id and every session_id column hold session keys

# Schema 8: a session is named by its principal *and* its id (issue 15, findings 8 and 9).
# Another principal's id names a different session of one's own, so a foreign id is looked up
# (in memory, then with one database read) exactly like an id nobody has: no refusal, no
# timing difference tells that it exists, and probing it never loads it or refreshes its
# `last_seen_at`. The key is one TEXT value, so the write path, its statements and its
# indexes are those of schema 7: the id, then the unit separator and the principal; the bare
# id for the anonymous principal (authentication off) and for rows of before schema 4
# (principal NULL). The separator is never in a session id (visible ASCII only, MCP
# transports §Session Management), so the first one splits a key back into its two parts.
KEY_SEPARATOR: Final = "\x1f"


def session_key(session_id: str, principal: str | None) -> str:
    """The store's name for ``principal``'s session ``session_id`` (see KEY_SEPARATOR)."""
    if principal is None or principal == ANONYMOUS:
        return session_id
    return f"{session_id}{KEY_SEPARATOR}{principal}"


def id_of(key: str) -> str:
    """The session id (what the client knows) of a session key."""
    return key.partition(KEY_SEPARATOR)[0]


_TABLES_V6: Final = """
CREATE TABLE IF NOT EXISTS events (
    id             INTEGER PRIMARY KEY,
    session_id     TEXT NOT NULL,
    lsn            INTEGER NOT NULL,
    created_at     REAL NOT NULL,
    stream         INTEGER NOT NULL DEFAULT 0,
    request_key    TEXT,
    request_method TEXT,
    payload        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id            INTEGER PRIMARY KEY,
    session_id    TEXT NOT NULL,
    client_key    TEXT NOT NULL,
    upstream_id   INTEGER NOT NULL,
    method        TEXT NOT NULL,
    safe          INTEGER NOT NULL,
    done          INTEGER NOT NULL DEFAULT 0,
    lsn           INTEGER,
    stream        INTEGER NOT NULL DEFAULT 0,
    remembered_at INTEGER,
    body          BLOB
);
"""
# The trigger: logging a request's answer retires its row in the same statement (one
# statement less per call than a DELETE of its own, measured at ~7 µs of CPU each).
_INDEXES_V6: Final = """
CREATE UNIQUE INDEX IF NOT EXISTS events_by_lsn ON events (session_id, lsn);
CREATE UNIQUE INDEX IF NOT EXISTS requests_by_key ON requests (session_id, client_key);
CREATE TRIGGER IF NOT EXISTS answer_retires_request AFTER INSERT ON events
WHEN NEW.request_key IS NOT NULL
BEGIN
    DELETE FROM requests WHERE session_id = NEW.session_id AND client_key = NEW.request_key;
END;
"""
# Schema 7. `sessions.server_requests`: the server→client requests the client has not answered
# (JSON [[client id, upstream id, stream], ...]), so a restored session withdraws them.
# `requests.written`: 0 while the request has certainly not been written to any upstream
# process (queued for one that is starting, or held back when the proxy stopped); such a
# request goes to the next process after a restart instead of being answered "outcome
# unknown". 1 (the default, also for rows of before version 7) means it may have been.
V7: Final = (
    "ALTER TABLE sessions ADD COLUMN server_requests TEXT NOT NULL DEFAULT '[]';"
    "ALTER TABLE requests ADD COLUMN written INTEGER NOT NULL DEFAULT 1;"
)

# The layout is chosen for the write path (schema 6). A message's row and a request's row are
# each written once and never moved, and the tables are ordered by insertion (rowid), so one
# group commit fills a few pages at the tail instead of dirtying a page per session, as
# tables clustered by session did (measured: 17 KiB of WAL per proxied call at 1,000 sessions
# down to 6.5, and 2.5x less CPU). Only the small (session_id, lsn) index is written at
# random. `requests` holds requests in flight, plus cancelled ones while they are remembered
# for retries; an answered request's row is deleted, and its answer's row in `events`
# carries the client key and method (`request_key`, `request_method`) instead, kept past
# pruning until the key falls out of the dedupe window. `sessions.log_floor`: every LSN up
# to it has been pruned (rows kept for retries aside). Small columns come before the blobs:
# reading them then never walks a large payload's overflow pages. `remembered_at` orders a
# cancelled request among the answers remembered for retries (the head LSN when cancelled).
# `sessions.id`, `events.session_id` and `requests.session_id` hold the session key (schema 8,
# `session_key`), not the id the client knows.
CREATE: Final = (
    """
CREATE TABLE IF NOT EXISTS sessions (
    id               TEXT PRIMARY KEY,
    created_at       REAL NOT NULL,
    last_seen_at     REAL NOT NULL,
    init_request     BLOB,
    init_result      BLOB,
    initialized      INTEGER NOT NULL DEFAULT 0,
    log_level        TEXT,
    subscriptions    TEXT NOT NULL DEFAULT '[]',
    safe_tools       TEXT NOT NULL DEFAULT '[]',
    next_upstream_id INTEGER NOT NULL DEFAULT 1,
    next_server_id   INTEGER NOT NULL DEFAULT 1,
    next_lsn         INTEGER NOT NULL DEFAULT 1,
    delivered_lsn    INTEGER NOT NULL DEFAULT 0,
    upstream_state   TEXT,
    principal        TEXT,
    log_floor        INTEGER NOT NULL DEFAULT 0
);
"""
    + _TABLES_V6
    + _INDEXES_V6
    + V7
)

# Schema 8: the session key (see KEY_SEPARATOR). Rows of the anonymous principal (and of no
# principal) keep their id as their key; the others get `<id> US <principal>`, their log and
# requests first (they are found through the session row's old id). No DDL changes.
_NAMED: Final = "principal IS NOT NULL AND principal <> '" + ANONYMOUS + "'"
V8: Final = (
    "UPDATE events SET session_id = session_id || char(31) ||"
    " (SELECT principal FROM sessions WHERE id = events.session_id)"
    f" WHERE session_id IN (SELECT id FROM sessions WHERE {_NAMED});"
    "UPDATE requests SET session_id = session_id || char(31) ||"
    " (SELECT principal FROM sessions WHERE id = requests.session_id)"
    f" WHERE session_id IN (SELECT id FROM sessions WHERE {_NAMED});"
    f"UPDATE sessions SET id = id || char(31) || principal WHERE {_NAMED};"
)

# Each step takes a database from version N-1 to N (PRAGMA user_version).
MIGRATIONS: Final = {
    2: (
        "ALTER TABLE events ADD COLUMN stream INTEGER NOT NULL DEFAULT 0;"
        "ALTER TABLE requests ADD COLUMN stream INTEGER NOT NULL DEFAULT 0;"
    ),
    # What an upstream transport keeps about its own side of a session (an HTTP upstream's
    # Mcp-Session-Id), opaque to the store; NULL for stdio upstreams.
    3: "ALTER TABLE sessions ADD COLUMN upstream_state TEXT;",
    # Who created the session (docs/SECURITY.md); NULL for sessions of before version 4.
    4: "ALTER TABLE sessions ADD COLUMN principal TEXT;",
    # Only requests in flight are looked up by state (recovery, loading a session), so only
    # they are indexed: finishing a request removes its entry instead of moving it, and
    # deleting an answered one (out of the dedupe window) touches no index at all.
    5: (
        "DROP INDEX IF EXISTS requests_pending;"
        "CREATE INDEX IF NOT EXISTS requests_in_flight ON requests (session_id) WHERE done = 0;"
    ),
    # The insertion-ordered layout (see CREATE). An answered request's key moves onto its
    # answer's row; one whose answer was pruned keeps its row (done = 1) until forgotten.
    6: (
        "ALTER TABLE events RENAME TO events_v5;"
        "ALTER TABLE requests RENAME TO requests_v5;"
        "DROP INDEX IF EXISTS requests_in_flight;"
        "CREATE INDEX requests_v5_answers ON requests_v5 (session_id, lsn) WHERE done = 1;"
        + _TABLES_V6
        + "INSERT INTO events (session_id, lsn, created_at, payload, stream, request_key,"
        " request_method)"
        " SELECT e.session_id, e.lsn, e.created_at, e.payload, e.stream, r.client_key, r.method"
        " FROM events_v5 AS e LEFT JOIN requests_v5 AS r"
        " ON r.session_id = e.session_id AND r.lsn = e.lsn AND r.done = 1"
        " ORDER BY e.created_at, e.session_id, e.lsn;"
        "INSERT INTO requests (session_id, client_key, upstream_id, method, safe, body, done,"
        " lsn, stream)"
        " SELECT session_id, client_key, upstream_id, method, safe, body, done, lsn, stream"
        " FROM requests_v5 AS r WHERE NOT (done = 1 AND lsn IS NOT NULL AND EXISTS"
        " (SELECT 1 FROM events_v5 AS e WHERE e.session_id = r.session_id AND e.lsn = r.lsn))"
        " ORDER BY upstream_id;"
        "ALTER TABLE sessions ADD COLUMN log_floor INTEGER NOT NULL DEFAULT 0;"
        "UPDATE sessions SET log_floor = coalesce("
        "(SELECT min(lsn) - 1 FROM events_v5 WHERE session_id = sessions.id), next_lsn - 1);"
        # Upstream ids are reserved in blocks in the session row from now on (Session
        # restore); the highest one of a deleted row must not be handed out again.
        "UPDATE sessions SET next_upstream_id = max(next_upstream_id, 1 + coalesce("
        "(SELECT max(upstream_id) FROM requests_v5 WHERE session_id = sessions.id), 0));"
        "DROP TABLE events_v5;"
        "DROP TABLE requests_v5;" + _INDEXES_V6
    ),
    7: V7,
    8: V8,
}

# Forgetting a session: its log, its requests, then its row (one transaction, in this order;
# ``?`` is the session key).
DELETE_SESSION: Final = (
    "DELETE FROM events WHERE session_id = ?",
    "DELETE FROM requests WHERE session_id = ?",
    "DELETE FROM sessions WHERE id = ?",
)
# Start-up: rows whose session row is gone (a crash between deletes, an old bug).
DELETE_ORPHANS: Final = (
    "DELETE FROM events WHERE session_id NOT IN (SELECT id FROM sessions)",
    "DELETE FROM requests WHERE session_id NOT IN (SELECT id FROM sessions)",
)


def steps(version: int) -> list[str]:
    """The scripts that bring a database at ``version`` (0: empty) to ``SCHEMA_VERSION``, each
    one transaction that also records the version it reaches.

    Raises:
        ValueError: ``version`` is newer than this mcproxy's schema.
    """
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema version {version} is newer than this mcproxy ({SCHEMA_VERSION})")
    if version == 0:
        return [f"BEGIN;{CREATE}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"]
    return [
        f"BEGIN;{MIGRATIONS[step]}PRAGMA user_version={step};COMMIT;"
        for step in range(version + 1, SCHEMA_VERSION + 1)
    ]
