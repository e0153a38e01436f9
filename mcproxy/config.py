"""Configuration: a frozen, validated msgspec record loaded from TOML and the command line.

Every default is a named constant below, and ``config.example.toml`` at the repository root
lists each key with the same value (a test keeps the two in step). Units are in the names.
Nothing mutates a Config after ``load``; the daemon derives its runtime objects from it.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from mcproxy.errors import ConfigError

# --- [server] ---------------------------------------------------------------------------
DEFAULT_LISTEN: Final = "127.0.0.1:8765"  # loopback: MCP transports §Security warns against 0.0.0.0
DEFAULT_PATH: Final = "/mcp"  # the SEP says SHOULD be the Streamable HTTP endpoint
DEFAULT_REQUIRE_SESSION_ID: Final = False  # True = SEP draft v0: refuse an upgrade without an id
DEFAULT_HEARTBEAT_S: Final = 20.0  # WebSocket ping interval; python-websockets uses 20 s too
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0  # bound of each shutdown step after SIGTERM
# SIGTERM first waits this long for the requests the upstreams are working on to finish (new
# ones are refused meanwhile), so a planned stop answers them instead of -32010; 0: no wait.
# 30 s lets the usual tool call (seconds) finish while a restart stuck behind a call that never
# ends stays within half a minute plus the shutdown steps; systemd/mcproxy.service allows
# for both (TimeoutStopSec, EXTEND_TIMEOUT_USEC). docs/ARCHITECTURE.md "Shutdown".
DEFAULT_DRAIN_TIMEOUT_S: Final = 30.0
MAX_DRAIN_TIMEOUT_S: Final = 3600.0  # an hour: longer is a job to finish, not a drain
DEFAULT_COOKIE_NAME: Final = "mcp_session_id"
# DNS-rebinding defence (MCP transports §Security Warning): the Host header must name one of
# these (any port); the listen address is added when it is a specific host. "*" allows all.
DEFAULT_ALLOWED_HOSTS: Final = ("localhost", "127.0.0.1", "[::1]")
# Browser Origins allowed besides those whose host is an allowed host; "*" allows all.
DEFAULT_ALLOWED_ORIGINS: Final[tuple[str, ...]] = ()
# SSE `retry` (ms) sent with each stream's priming event: how long a client waits before it
# resumes with Last-Event-ID (transports §Resumability). The official SDKs try twice, each
# after `retry`, then give up on the stream: 3000 covers a ~6 s restart, at the cost of a
# resume that waits 3 s after any drop (docs/PROTOCOL.md "Choosing sse_retry_ms").
DEFAULT_SSE_RETRY_MS: Final = 3000
DEFAULT_SSE_KEEPALIVE_S: Final = 15.0  # SSE comment line on an idle stream (proxies, dead peers)
# This instance's name in a fleet behind a load balancer (docs/DEPLOY.md): every id it mints is
# "<instance>.<random>", so a balancer routes on the id with a static rule, and it never
# creates a session under another instance's id. Empty: a single instance, ids unprefixed.
DEFAULT_INSTANCE: Final = ""
INSTANCE_NAME_MAX: Final = 32  # [A-Za-z0-9_-]; ids stay within ids.SESSION_ID_MAX

# --- [upstream] -------------------------------------------------------------------------
DEFAULT_UPSTREAM: Final = "stdio:mcproxy-demo-server"  # the bundled example server
# "per-session": a child process per session. "shared": every session multiplexed onto
# `pool_size` children (stdio only; docs/ARCHITECTURE.md "Shared upstreams").
DEFAULT_UPSTREAM_MODE: Final = "per-session"
DEFAULT_POOL_SIZE: Final = 1
# Shared mode: requests one child works on at once; more wait in the proxy, oldest first. An
# mcp-SDK server spends a third more CPU per call with 10,000 requests in flight than with
# 64, and even 256 cost it ~15% more (benchmarks/bench_scale.py); a queue here costs a list
# entry. Raise it for servers whose tools mostly wait on I/O, so that slow calls do not hold
# every slot; 0 means no limit (docs/ARCHITECTURE.md "Shared upstreams").
DEFAULT_MAX_IN_FLIGHT: Final = 64
# Linux: children run under SCHED_BATCH (same CPU share, no nice change), so a child woken by
# a request does not preempt the proxy in the middle of its loop turn: one process serving
# every session must not wait behind the processes it feeds. With a pool of two CPU-bound
# children on two cores it raised throughput through the proxy by 2-5% (bench_scale.py).
DEFAULT_BATCH_SCHEDULING: Final = True
DEFAULT_STDIN_CLOSE_GRACE_S: Final = 2.0  # lifecycle §Shutdown: close stdin, then wait
DEFAULT_SIGTERM_GRACE_S: Final = 2.0  # then SIGTERM the process group and wait
DEFAULT_RESPAWN_INITIAL_DELAY_S: Final = 0.05  # first respawn after a crash (jittered)
DEFAULT_RESPAWN_MAX_DELAY_S: Final = 30.0  # cap of the exponential backoff
DEFAULT_RESPAWN_STABLE_S: Final = 10.0  # a child up this long resets the backoff
DEFAULT_INIT_TIMEOUT_S: Final = 30.0  # a respawned child must answer `initialize` within this
# The largest message accepted from the upstream: a stdio line, an SSE event or a JSON body.
DEFAULT_MAX_LINE_BYTES: Final = 16 * 1024 * 1024
# Streamable HTTP upstreams (transports §"Streamable HTTP", client side).
DEFAULT_HEADERS: Final[dict[str, str]] = {}  # static, non-secret request headers
DEFAULT_BEARER_TOKEN_ENV: Final = ""  # name of an environment variable holding the token
DEFAULT_BEARER_TOKEN_FILE: Final = ""  # path of a file holding it (re-read per upstream session)
DEFAULT_TLS_VERIFY: Final = True  # verify the upstream's certificate and host name
DEFAULT_TLS_CA_FILE: Final = ""  # empty: the system trust store
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0  # TCP + TLS handshake of one upstream connection
# Longest silence accepted on an upstream connection: waiting for a JSON answer, or between
# two SSE events. Not a bound on a tool call: a silent SSE stream is resumed (Last-Event-ID),
# and the SDK's servers send an SSE comment every 15 s, so 5 minutes of nothing is a dead peer.
DEFAULT_READ_TIMEOUT_S: Final = 300.0
# Resumption attempts for one dropped SSE stream (waiting `retry`, doubling) before the
# upstream counts as lost.
DEFAULT_SSE_MAX_RECONNECTS: Final = 5
# Isolation and resource bounds of the upstreams (issue 15; docs/SECURITY.md).
# The child's environment: only these variables of the daemon's ("PREFIX*" matches a prefix),
# then `env` on top. Never the variables named by auth.tokens_env or upstream.bearer_token_env,
# even if listed: the child must not see the proxy's secrets.
DEFAULT_ENV_PASSTHROUGH: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "PYTHON*",
    "VIRTUAL_ENV",
)
DEFAULT_ENV: Final[dict[str, str]] = {}  # static, non-secret variables set for the child
# Bytes written toward one stdio child and not yet read by it. Beyond this a request is
# answered -32015 at once and a notification is dropped (logged): a child that stops reading
# must not grow the proxy. A single larger message still goes when nothing is queued.
DEFAULT_MAX_QUEUED_BYTES: Final = 4 * 1024 * 1024
# Live per-session upstreams (child processes, or upstream HTTP sessions), in total and per
# principal. At the cap the least recently used idle session is parked to make room; with
# none to park the new upstream is refused (-32011). Not applied to mode = "shared", whose
# processes are `pool_size`. ~12 MB per Python SDK child: 128 of them are ~1.5 GB.
DEFAULT_MAX_LIVE_UPSTREAMS: Final = 128
DEFAULT_MAX_LIVE_UPSTREAMS_PER_PRINCIPAL: Final = 64

# --- [store] ----------------------------------------------------------------------------
DEFAULT_DB_PATH: Final = (
    ""  # empty: $STATE_DIRECTORY, else $XDG_STATE_HOME/mcproxy, else ~/.local/state/mcproxy
)
DEFAULT_DB_FILENAME: Final = "mcproxy.db"
DEFAULT_DURABILITY: Final = "normal"  # WAL + synchronous=NORMAL survives a process kill
DEFAULT_MAX_BATCH: Final = 512  # most writes committed in one group-commit transaction
# Who checkpoints the WAL. "mcproxy": the store does (beside the writer, PASSIVE only).
# "external": nobody in mcproxy does, SQLite's automatic checkpoint is off too: leave it to a
# replication tool that wants to control checkpoints (Litestream; docs/DEPLOY.md).
DEFAULT_CHECKPOINTS: Final = "mcproxy"

# --- [auth] ----------------------------------------------------------------------------
DEFAULT_TOKENS_FILE: Final = ""  # lines "principal:token" or "principal:sha256:<hex>"
DEFAULT_TOKENS_ENV: Final = ""  # name of an environment variable holding such lines
# Listening beyond loopback with no tokens is refused unless this is set (docs/SECURITY.md).
DEFAULT_ALLOW_UNAUTHENTICATED_REMOTE: Final = False

# --- [sessions] ------------------------------------------------------------------------
DEFAULT_PARK_AFTER_S: Final = 300.0  # idle (no client, nothing in flight): stop the child
DEFAULT_EXPIRE_AFTER_S: Final = 86400.0  # not seen for a day: the session is deleted
DEFAULT_MAX_LOG_EVENTS: Final = 10000  # per session; older messages are pruned
DEFAULT_SWEEP_INTERVAL_S: Final = 10.0  # how often parking, pruning and expiry run

# --- [metrics] -------------------------------------------------------------------------
DEFAULT_METRICS_ENABLED: Final = True
DEFAULT_METRICS_LISTEN: Final = ""  # empty: /metrics on the main listener; else HOST:PORT
DEFAULT_METRICS_PATH: Final = "/metrics"

# --- [limits] ---------------------------------------------------------------------------
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024  # inbound WebSocket frame; 1009 above it
DEFAULT_MAX_PENDING_REQUESTS: Final = 1024  # in-flight client requests per session
DEFAULT_DEDUPE_WINDOW: Final = 1024  # answered request ids remembered per session (at least)
DEFAULT_MAX_SESSIONS: Final = 100_000  # stored sessions in total; more: initialize refused
DEFAULT_MAX_SESSIONS_PER_PRINCIPAL: Final = 20_000
# New WebSockets, GET streams and sessions per client address. Generous: on loopback every
# local client shares one address, and after a proxy restart they all reconnect at once.
DEFAULT_CONNECTIONS_PER_S: Final = 200.0
DEFAULT_CONNECTION_BURST: Final = 2000
DEFAULT_MESSAGES_PER_S: Final = 5000.0  # client messages per session (token bucket)
DEFAULT_MESSAGE_BURST: Final = 10000
DEFAULT_BIND_TIMEOUT_S: Final = 10.0  # a WebSocket must bind a session within this
# What one client connection may leave unread (its socket's write buffer plus queued replies)
# before it is dropped: WebSocket close 1013, SSE stream ended; it resumes from its cursor.
DEFAULT_MAX_OUTPUT_BYTES: Final = 8 * 1024 * 1024
# An HTTP connection idle between requests is closed after this (aiohttp's own default is an
# hour). SDK clients reuse a connection within seconds; a reconnect costs one handshake.
DEFAULT_HTTP_KEEPALIVE_S: Final = 30.0
# Open TCP connections per client address on the main listener (both fronts); beyond it a new
# one is answered 429 and closed. High: on loopback every local client shares one address
# (the scale benchmark holds 10,000 WebSockets from 127.0.0.1). Lower it for remote clients.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: Final = 20_000
DEFAULT_SEND_QUEUE_MAX: Final = (
    4096  # live messages buffered per socket before reading back from the log
)

# --- [demo] -----------------------------------------------------------------------------
# The browser tool console (mcproxy/web/demo.html) and the JS client modules, served at
# DEMO_PATH and CLIENT_MODULES_PATH on the main listener. Off by default: a daemon serves MCP,
# not pages; `mcproxy --demo-page` turns it on (docs/CLIENT.md "The JavaScript client").
DEFAULT_DEMO_ENABLED: Final = False
DEMO_PATH: Final = "/demo/"
CLIENT_MODULES_PATH: Final = "/mcproxy-client/"

# --- [log] ------------------------------------------------------------------------------
DEFAULT_LOG_FORMAT: Final = "auto"  # json when stderr is not a terminal (journald), else console
DEFAULT_LOG_LEVEL: Final = "info"

LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})

# Bounds live on the record itself (msgspec checks them while converting, and the error names
# the key and the bound), so no hand-kept table can drift from the fields it checks.
Positive = Annotated[float, msgspec.Meta(gt=0)]  # a duration or a rate that must pass
NonNegative = Annotated[float, msgspec.Meta(ge=0)]  # 0 means "at once" / "no wait"
Count = Annotated[int, msgspec.Meta(ge=1)]  # a size or a count of at least one
OptionalCount = Annotated[int, msgspec.Meta(ge=0)]  # 0 means "none" or "no limit" (documented)
Milliseconds = Annotated[int, msgspec.Meta(ge=1)]
DrainSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_DRAIN_TIMEOUT_S)]  # 0: no drain


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = DEFAULT_LISTEN
    path: str = DEFAULT_PATH
    require_session_id: bool = DEFAULT_REQUIRE_SESSION_ID
    heartbeat_s: Positive = DEFAULT_HEARTBEAT_S
    shutdown_timeout_s: Positive = DEFAULT_SHUTDOWN_TIMEOUT_S
    drain_timeout_s: DrainSeconds = DEFAULT_DRAIN_TIMEOUT_S
    cookie_name: str = DEFAULT_COOKIE_NAME
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    sse_retry_ms: Milliseconds = DEFAULT_SSE_RETRY_MS
    sse_keepalive_s: Positive = DEFAULT_SSE_KEEPALIVE_S
    instance: str = DEFAULT_INSTANCE


class UpstreamConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    target: str = DEFAULT_UPSTREAM
    mode: Literal["per-session", "shared"] = DEFAULT_UPSTREAM_MODE
    pool_size: Count = DEFAULT_POOL_SIZE
    max_in_flight: OptionalCount = DEFAULT_MAX_IN_FLIGHT
    batch_scheduling: bool = DEFAULT_BATCH_SCHEDULING
    stdin_close_grace_s: NonNegative = DEFAULT_STDIN_CLOSE_GRACE_S
    sigterm_grace_s: NonNegative = DEFAULT_SIGTERM_GRACE_S
    respawn_initial_delay_s: NonNegative = DEFAULT_RESPAWN_INITIAL_DELAY_S
    respawn_max_delay_s: Positive = DEFAULT_RESPAWN_MAX_DELAY_S
    respawn_stable_s: NonNegative = DEFAULT_RESPAWN_STABLE_S
    init_timeout_s: Positive = DEFAULT_INIT_TIMEOUT_S
    max_line_bytes: Count = DEFAULT_MAX_LINE_BYTES
    headers: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_HEADERS))
    bearer_token_env: str = DEFAULT_BEARER_TOKEN_ENV
    bearer_token_file: str = DEFAULT_BEARER_TOKEN_FILE
    tls_verify: bool = DEFAULT_TLS_VERIFY
    tls_ca_file: str = DEFAULT_TLS_CA_FILE
    connect_timeout_s: Positive = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: Positive = DEFAULT_READ_TIMEOUT_S
    sse_max_reconnects: OptionalCount = DEFAULT_SSE_MAX_RECONNECTS
    # Isolation and resource bounds (issue 15).
    env_passthrough: tuple[str, ...] = DEFAULT_ENV_PASSTHROUGH
    env: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_ENV))
    max_queued_bytes: Count = DEFAULT_MAX_QUEUED_BYTES
    max_live_upstreams: Count = DEFAULT_MAX_LIVE_UPSTREAMS
    max_live_upstreams_per_principal: Count = DEFAULT_MAX_LIVE_UPSTREAMS_PER_PRINCIPAL


class StoreConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: str = DEFAULT_DB_PATH
    durability: Literal["normal", "full"] = DEFAULT_DURABILITY
    max_batch: Count = DEFAULT_MAX_BATCH
    checkpoints: Literal["mcproxy", "external"] = DEFAULT_CHECKPOINTS


class LimitsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_message_bytes: Count = DEFAULT_MAX_MESSAGE_BYTES
    max_pending_requests: Count = DEFAULT_MAX_PENDING_REQUESTS
    dedupe_window: Count = DEFAULT_DEDUPE_WINDOW
    send_queue_max: Count = DEFAULT_SEND_QUEUE_MAX
    max_sessions: Count = DEFAULT_MAX_SESSIONS
    max_sessions_per_principal: Count = DEFAULT_MAX_SESSIONS_PER_PRINCIPAL
    connections_per_s: Positive = DEFAULT_CONNECTIONS_PER_S
    connection_burst: Count = DEFAULT_CONNECTION_BURST
    messages_per_s: Positive = DEFAULT_MESSAGES_PER_S
    message_burst: Count = DEFAULT_MESSAGE_BURST
    bind_timeout_s: Positive = DEFAULT_BIND_TIMEOUT_S
    max_output_bytes: Count = DEFAULT_MAX_OUTPUT_BYTES
    http_keepalive_s: Positive = DEFAULT_HTTP_KEEPALIVE_S
    max_connections_per_address: Count = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS


class AuthConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tokens_file: str = DEFAULT_TOKENS_FILE
    tokens_env: str = DEFAULT_TOKENS_ENV
    allow_unauthenticated_remote: bool = DEFAULT_ALLOW_UNAUTHENTICATED_REMOTE


class SessionsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    park_after_s: Positive = DEFAULT_PARK_AFTER_S
    expire_after_s: Positive = DEFAULT_EXPIRE_AFTER_S
    max_log_events: Count = DEFAULT_MAX_LOG_EVENTS
    sweep_interval_s: Positive = DEFAULT_SWEEP_INTERVAL_S


class MetricsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = DEFAULT_METRICS_ENABLED
    listen: str = DEFAULT_METRICS_LISTEN
    path: str = DEFAULT_METRICS_PATH


class DemoConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = DEFAULT_DEMO_ENABLED


class LogConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    format: Literal["auto", "json", "console"] = DEFAULT_LOG_FORMAT
    level: Literal["debug", "info", "warning", "error"] = DEFAULT_LOG_LEVEL


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    sessions: SessionsConfig = SessionsConfig()
    metrics: MetricsConfig = MetricsConfig()
    demo: DemoConfig = DemoConfig()
    log: LogConfig = LogConfig()


class StdioTarget(msgspec.Struct, frozen=True):
    """An upstream started as a child process speaking MCP over stdio."""

    argv: tuple[str, ...]


class HttpTarget(msgspec.Struct, frozen=True):
    """A remote upstream speaking MCP over Streamable HTTP at ``url`` (its MCP endpoint)."""

    url: str


# Headers the HTTP upstream client sets itself (transports §"Streamable HTTP"); a static
# header must not override them. Authorization has its own keys, so that a secret never sits
# in the config file, on the command line or in `mcproxy check-config` output.
RESERVED_HEADERS: Final = frozenset(
    {
        "accept",
        "authorization",
        "connection",
        "content-length",
        "content-type",
        "host",
        "last-event-id",
        "mcp-protocol-version",
        "mcp-session-id",
        "transfer-encoding",
    }
)
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def parse_target(target: str) -> StdioTarget | HttpTarget:
    """Parse ``stdio:<command line>`` or an ``http://`` / ``https://`` MCP endpoint URL."""
    if target.startswith(("http://", "https://")):
        return _parse_http_target(target)
    if target.startswith("stdio:"):
        try:
            argv = tuple(shlex.split(target[len("stdio:") :]))
        except ValueError as exc:
            raise ConfigError(f"upstream: cannot parse command line: {exc}") from exc
        if not argv:
            raise ConfigError("upstream: 'stdio:' needs a command")
        return StdioTarget(argv=argv)
    raise ConfigError(f"upstream: expected 'stdio:<command>' or an http(s):// URL, got {target!r}")


def _parse_http_target(target: str) -> HttpTarget:
    try:
        url = urlsplit(target)
        url.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ConfigError(f"upstream: bad URL {target!r}: {exc}") from exc
    if not url.hostname:
        raise ConfigError(f"upstream: URL {target!r} has no host")
    if url.username is not None or url.password is not None:
        # Credentials in the URL would show in logs, `ps` and check-config output.
        raise ConfigError(
            "upstream: no credentials in the URL; use upstream.bearer_token_env or"
            " upstream.bearer_token_file"
        )
    if url.fragment:
        raise ConfigError(f"upstream: URL {target!r} must not have a fragment")
    return HttpTarget(url=target)


def _validate_headers(headers: dict[str, str]) -> None:
    for name, value in headers.items():
        if not name or not set(name) <= _TOKEN_CHARS:  # RFC 9110 §5.1: a header name is a token
            raise ConfigError(f"upstream.headers: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            hint = (
                " (use upstream.bearer_token_env or upstream.bearer_token_file)"
                if name.lower() == "authorization"
                else " (mcproxy sets it)"
            )
            raise ConfigError(f"upstream.headers: {name!r} cannot be set here{hint}")
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"upstream.headers: the value of {name!r} contains a line break")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"server.listen: expected HOST:PORT, got {listen!r}")
    try:
        port_no = int(port)
    except ValueError:
        raise ConfigError(f"server.listen: bad port in {listen!r}") from None
    if not 0 <= port_no <= 65535:
        raise ConfigError(f"server.listen: port out of range in {listen!r}")
    return host.strip("[]"), port_no


def db_path(config: Config) -> Path:
    """Where the SQLite file lives: the configured path, or a per-user/systemd state dir."""
    if config.store.path:
        return Path(config.store.path).expanduser()
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0]) / DEFAULT_DB_FILENAME
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "mcproxy" / DEFAULT_DB_FILENAME


def validate(config: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    host, _ = parse_listen(config.server.listen)
    auth = config.auth
    if (
        host not in LOOPBACK_HOSTS
        and not (auth.tokens_file or auth.tokens_env)
        and not auth.allow_unauthenticated_remote
    ):
        # MCP transports §Security Warning: bind to localhost or authenticate everyone.
        raise ConfigError(
            f"server.listen {config.server.listen!r} is not loopback and [auth] has no tokens;"
            " configure auth.tokens_file or auth.tokens_env (or set"
            " auth.allow_unauthenticated_remote = true if something in front authenticates)"
        )
    target = parse_target(config.upstream.target)
    if config.upstream.mode == "shared" and isinstance(target, HttpTarget):
        raise ConfigError("upstream.mode = 'shared' needs a 'stdio:' target")
    _validate_headers(config.upstream.headers)
    if config.upstream.bearer_token_env and config.upstream.bearer_token_file:
        raise ConfigError("upstream: set bearer_token_env or bearer_token_file, not both")
    if not config.server.path.startswith("/"):
        raise ConfigError("server.path must start with '/'")
    instance = config.server.instance
    if instance and (
        len(instance) > INSTANCE_NAME_MAX
        or not all(c.isascii() and (c.isalnum() or c in "-_") for c in instance)
    ):
        raise ConfigError(
            f"server.instance {instance!r} must be 1-{INSTANCE_NAME_MAX} characters of"
            " A-Z a-z 0-9 - _ (it prefixes every session id this instance mints)"
        )
    if not config.metrics.path.startswith("/"):
        raise ConfigError("metrics.path must start with '/'")
    if config.metrics.listen:
        parse_listen(config.metrics.listen)
    _validate_environment(config)
    return config


def secret_variables(config: Config) -> frozenset[str]:
    """The environment variables that hold the proxy's own secrets: never given to a child."""
    return frozenset(n for n in (config.auth.tokens_env, config.upstream.bearer_token_env) if n)


def _validate_environment(config: Config) -> None:
    up = config.upstream
    for name in up.env_passthrough:
        bare = name[:-1] if name.endswith("*") else name
        if not bare or "=" in bare or "*" in bare or "\0" in bare:
            raise ConfigError(f"upstream.env_passthrough: {name!r} is not a variable name")
    secrets = secret_variables(config)
    for name, value in up.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ConfigError(f"upstream.env: {name!r} is not a valid variable")
        if name in secrets:
            raise ConfigError(
                f"upstream.env: {name!r} holds the proxy's tokens; it is never given to the child"
            )
    if up.max_live_upstreams_per_principal > up.max_live_upstreams:
        raise ConfigError(
            "upstream.max_live_upstreams_per_principal must not exceed upstream.max_live_upstreams"
        )


def load(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load a TOML file (optional), apply command-line overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or an invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `float` >= 0.0, got -5.0 - at `$.upstream.sigterm_grace_s`":
        # lead with the key, as every other config error does.
        text = str(exc)
        message, sep, where = text.rpartition(" - at `$.")
        if sep and where.endswith("`"):
            text = f"{where[:-1]}: {message}"
        raise ConfigError(f"{path or 'config'}: {text}") from exc
    return validate(config)
