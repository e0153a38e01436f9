"""Prometheus metrics, on a registry owned by the daemon (never the process-global one).

Labels are low-cardinality by construction: no session ids, no method names from clients, no
tool names; error codes are the proxy's own short list. Gauges that describe the state of the
world (sessions by state, connections, the size of the log) are refreshed right before each
scrape by ``refresh``, so nothing has to keep them in step on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# A resume on loopback takes about a millisecond; anything near a second is an incident.
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_DEPTH_BUCKETS: Final = (0, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000)


@dataclass(frozen=True, slots=True)
class WorldState:
    """What ``refresh`` sets: counted by the hub, the fronts and the store at scrape time."""

    sessions_attached: int
    sessions_idle: int
    sessions_stored: int
    connections_ws: int
    connections_http: int
    commits: int
    log_rows: int
    log_bytes: int
    db_bytes: int


class LoopCounter:
    """A running total kept as a plain integer, added to its Prometheus counter at each
    scrape: bumped on every message from the event loop (prometheus_client takes a lock per
    ``inc``; four per call were 2% of the proxy's CPU), or set from a total kept elsewhere
    (the store's commits, a shared pool's counters)."""

    __slots__ = ("_flushed", "_target", "value")

    def __init__(self, target: Counter) -> None:
        self._target = target
        self.value = 0
        self._flushed = 0

    def inc(self) -> None:
        self.value += 1

    def flush(self) -> None:
        if self.value > self._flushed:
            self._target.inc(self.value - self._flushed)
            self._flushed = self.value


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions = Gauge(
            "mcproxy_sessions",
            "Sessions by state: attached (a client connected), idle (in memory, no client),"
            " parked (only in the database)",
            ["state"],
            registry=r,
        )
        self.connections = Gauge(
            "mcproxy_connections", "Open client connections", ["transport"], registry=r
        )
        self.client_messages = Counter(
            "mcproxy_client_messages",
            "Messages from clients (in) and logged for clients (out)",
            ["direction"],
            registry=r,
        )
        self.upstream_messages = Counter(
            "mcproxy_upstream_messages",
            "Messages read from (in) and written to (out) upstream servers",
            ["direction"],
            registry=r,
        )
        self.resumes = Counter(
            "mcproxy_resumes",
            "Resume attempts by outcome: exact, partial (the log was pruned past the cursor),"
            " unknown_session",
            ["outcome"],
            registry=r,
        )
        self.replay_depth = Histogram(
            "mcproxy_replay_depth",
            "Messages a resuming connection had to catch up on",
            buckets=_DEPTH_BUCKETS,
            registry=r,
        )
        self.resume_seconds = Histogram(
            "mcproxy_resume_seconds",
            "From a resuming connection's arrival to the end of its replay",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_events = Counter(
            "mcproxy_upstream_events",
            "Upstream lifecycle: spawned, spawn_failed, lost, restarted, parked, adopted"
            " (kept running across a reload in place)",
            ["event"],
            registry=r,
        )
        self.reloads = Counter(
            "mcproxy_reloads",
            "Reloads in place (SIGHUP) this process went through since it was started",
            registry=r,
        )
        self.inflight_resolved = Counter(
            "mcproxy_inflight_resolved",
            "In-flight requests of a lost upstream: reissued (safe to repeat), resent (it"
            " never reached the process) or outcome_unknown",
            ["outcome"],
            registry=r,
        )
        self.deduplicated = Counter(
            "mcproxy_deduplicated_requests",
            "Retried request ids answered from the log or joined to the running request",
            registry=r,
        )
        self.errors = Counter(
            "mcproxy_errors",
            "JSON-RPC errors and HTTP refusals produced by the proxy itself, by code",
            ["code"],
            registry=r,
        )
        self.session_loads = Counter(
            "mcproxy_session_loads",
            "Sessions looked up in the database (not in memory) by outcome: loaded, or"
            " not_found (no session of that principal by that id; many are a client trying ids)",
            ["outcome"],
            registry=r,
        )
        self.sessions_expired = Counter(
            "mcproxy_sessions_expired", "Sessions deleted after their idle lifetime", registry=r
        )
        self.log_pruned = Counter(
            "mcproxy_log_pruned_rows",
            "Log rows deleted to keep sessions within max_log_events",
            registry=r,
        )
        self.log_rows = Gauge(
            "mcproxy_log_rows",
            "Messages held in the log (and answers kept past it for retries)",
            registry=r,
        )
        self.log_bytes = Gauge("mcproxy_log_bytes", "Payload bytes held in the log", registry=r)
        self.db_bytes = Gauge(
            "mcproxy_db_bytes", "Size of the database and its WAL on disk", registry=r
        )
        self.store_commits = Counter(
            "mcproxy_store_commits", "Group-commit transactions", registry=r
        )
        self._commits = LoopCounter(self.store_commits)
        self.shared_children = Gauge(
            "mcproxy_shared_children", "Shared upstream children running", registry=r
        )
        self.shared_in_flight = Gauge(
            "mcproxy_shared_requests_in_flight",
            "Requests the shared children are working on",
            registry=r,
        )
        self.shared_queued = Gauge(
            "mcproxy_shared_requests_queued",
            "Requests waiting in the proxy for a slot on a shared child (upstream.max_in_flight)",
            registry=r,
        )
        self.shared_events = Counter(
            "mcproxy_shared_events",
            "Shared pool: children spawned and lost, requests queued, and messages it refused"
            " or dropped because they could not be attributed to one session",
            ["event"],
            registry=r,
        )
        self._shared_totals: dict[str, LoopCounter] = {}
        # The per-message counters: plain integers, published at scrape time.
        self.client_in = LoopCounter(self.client_messages.labels("in"))
        self.client_out = LoopCounter(self.client_messages.labels("out"))
        self.upstream_in = LoopCounter(self.upstream_messages.labels("in"))
        self.upstream_out = LoopCounter(self.upstream_messages.labels("out"))

    def error(self, code: int | str) -> None:
        """A JSON-RPC error code, or an HTTP status / close code as ``http_404``/``ws_1009``."""
        self.errors.labels(str(code)).inc()

    def refresh(self, world: WorldState) -> None:
        for counter in (self.client_in, self.client_out, self.upstream_in, self.upstream_out):
            counter.flush()
        self.sessions.labels("attached").set(world.sessions_attached)
        self.sessions.labels("idle").set(world.sessions_idle)
        parked = world.sessions_stored - world.sessions_attached - world.sessions_idle
        self.sessions.labels("parked").set(max(parked, 0))
        self.connections.labels("websocket").set(world.connections_ws)
        self.connections.labels("http").set(world.connections_http)
        self.log_rows.set(world.log_rows)
        self.log_bytes.set(world.log_bytes)
        self.db_bytes.set(world.db_bytes)
        self._commits.value = world.commits
        self._commits.flush()

    def refresh_pool(
        self, children: int, in_flight: int, queued: int, events: Mapping[str, int]
    ) -> None:
        """A shared pool's state (``SharedPool.snapshot``); ``events`` are running totals."""
        self.shared_children.set(children)
        self.shared_in_flight.set(in_flight)
        self.shared_queued.set(queued)
        for event, count in events.items():
            total = self._shared_totals.get(event)
            if total is None:
                total = self._shared_totals[event] = LoopCounter(self.shared_events.labels(event))
            total.value = count
            total.flush()

    def render(self) -> bytes:
        return generate_latest(self.registry)
