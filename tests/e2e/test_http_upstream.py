"""A remote Streamable HTTP MCP server as the upstream: the SDK fixture server run over HTTP as
its own process, mcproxy in front of it, the raw test clients in front of mcproxy.

Where a connection must break mid-response, a small TCP relay (in the test's event loop) sits
between mcproxy and the upstream and aborts it. Waits poll conditions (``until``), and never
block the loop the relay runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FIXTURE_SERVER,
    INIT_PARAMS,
    ROOT,
    STARTUP,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    eventually,
    free_port,
    lsn_of,
    messages,
    tool_text,
)

RETRY_MS = 300  # the fixture's SSE `retry`: how long mcproxy waits before it resumes a stream


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class HttpFixture:
    """``tests/fixtures/server.py http``: one process on a fixed port (a restart keeps it)."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        json_response: bool = False,
        retry_ms: int = RETRY_MS,
    ) -> None:
        self.port = free_port()
        self.json_response = json_response
        self.retry_ms = retry_ms
        self.env = {"FIXTURE_COUNTER_DIR": str(tmp), **(env or {})}
        self.log = tmp / f"fixture-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(FIXTURE_SERVER), "http", str(self.port), str(self.retry_ms)]
                + (["json"] if self.json_response else []),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
                cwd=ROOT,
            )

    async def start(self) -> HttpFixture:
        self.launch()
        await eventually(lambda: accepts(self.port), STARTUP)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    @property
    def url(self) -> str:
        scheme = "https" if "FIXTURE_TLS_CERT" in self.env else "http"
        return f"{scheme}://127.0.0.1:{self.port}/mcp"


@dataclass
class Relayed:
    """One HTTP request as the relay saw it go upstream (head and body, as written)."""

    at: float
    data: bytearray

    def has(self, fragment: bytes) -> bool:
        return fragment.lower() in bytes(self.data).lower()


@dataclass(eq=False)  # hashed by identity, kept in a set
class Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    current: Relayed | None = None

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


@dataclass
class Relay:
    """TCP relay mcproxy → upstream that can cut the connections carrying a request."""

    target: int
    requests: list[Relayed] = field(default_factory=list)
    answered: bytearray = field(default_factory=bytearray)  # every byte the upstream sent
    conns: set[Conn] = field(default_factory=set)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        conn = Conn(writer, up_writer)
        self.conns.add(conn)

        async def upward() -> None:
            while data := await reader.read(65536):
                if re.match(rb"[A-Z]+ /", data):  # a new request on this connection
                    conn.current = Relayed(time.monotonic(), bytearray(data))
                    self.requests.append(conn.current)
                elif conn.current is not None:
                    conn.current.data += data
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                self.answered += data
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(upward(), downward())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.conns.discard(conn)
            conn.abort()

    def cut(self, fragment: bytes = b"") -> int:
        """Abort every connection whose current request contains ``fragment``."""
        hit = [c for c in self.conns if c.current is not None and c.current.has(fragment)]
        for conn in hit:
            conn.abort()
        return len(hit)

    def since(self, at: float) -> list[Relayed]:
        return [r for r in self.requests if r.at >= at]

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.abort()  # their pumps see EOF and end
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=TIMEOUT)


@pytest.fixture
async def upstream(tmp_path: Path) -> Any:
    fixture = await HttpFixture(tmp_path).start()
    yield fixture
    fixture.kill()


@pytest.fixture
def proxy_for(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(url: str, *extra: str, env: dict[str, str] | None = None) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path / "mcproxy.db", url, *extra, env=env)
        started.append(proxy.start())
        return proxy

    yield start
    for proxy in started:
        proxy.kill()


def progress_of(received: list[dict[str, Any]], token: str) -> list[float]:
    return [
        m["params"]["progress"]
        for m in received
        if m.get("method") == "notifications/progress" and m["params"]["progressToken"] == token
    ]


def progress_sent(relay: Relay, token: str) -> list[float]:
    """The progress values the upstream sent for ``token`` through the relay (SSE data
    lines of every response), whether or not they reached mcproxy before a cut."""
    found = []
    for line in bytes(relay.answered).splitlines():
        if line.startswith(b"data:") and b"notifications/progress" in line:
            params = json.loads(line[5:])["params"]
            if params["progressToken"] == token:
                found.append(params["progress"])
    return found


def answers(received: list[dict[str, Any]], request_id: int | str) -> list[dict[str, Any]]:
    return [m for m in received if m.get("id") == request_id and "method" not in m]


async def test_tools_progress_elicitation_and_sampling(
    upstream: HttpFixture, proxy_for: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_for(upstream.url)
    client = await WsClient.connect(proxy.url)
    try:
        init = await client.initialize()
        assert init["result"]["serverInfo"]["name"] == "fixture"
        assert (
            tool_text(await client.response(await client.call_tool("echo", {"text": "hi"}))) == "hi"
        )

        slow = await client.call_tool("slow", {"steps": 3, "delay": 0.01}, "p")
        assert tool_text(await client.response(slow)) == "slow done after 3"
        assert progress_of(client.received, "p") == [1, 2, 3]

        asked = await client.call_tool("ask", {"message": "your name?"})
        ask = await client.recv()
        assert ask["method"] == "elicitation/create" and ask["params"]["message"] == "your name?"
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": ask["id"],
                "result": {"action": "accept", "content": {"name": "Ada"}},
            }
        )
        assert tool_text(await client.response(asked)) == "accept:Ada"

        sampled = await client.call_tool("sample", {"prompt": "say hi"})
        request = await client.recv()
        assert request["method"] == "sampling/createMessage"
        result = {
            "role": "assistant",
            "content": {"type": "text", "text": "hi there"},
            "model": "test-model",
            "stopReason": "endTurn",
        }
        await client.send({"jsonrpc": "2.0", "id": request["id"], "result": result})
        assert tool_text(await client.response(sampled)) == "hi there"

        lsns = client.lsns()
        assert lsns == list(range(1, len(lsns) + 1))
        assert tool_text(await client.response(await client.call_tool("live_sessions", {}))) == "1"
    finally:
        await client.close()
    await eventually(lambda: len(proxy.events("upstream.session")) == 1)  # stderr is read apart
    assert not proxy.events("upstream.lost")


async def test_http_front_streams_stay_the_proxys_own(
    upstream: HttpFixture, proxy_for: Callable[..., ProxyProcess]
) -> None:
    """Through the HTTP front, a message goes on the stream of the request whose upstream
    stream carried it, even when the stdio heuristic ("the newest request in flight") would
    pick another; nothing of the upstream's session shows (its session id, its event ids);
    and ending the session ends the upstream's."""
    relay = Relay(upstream.port)
    port = await relay.start()
    proxy = proxy_for(f"http://127.0.0.1:{port}/mcp")
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        logging = asyncio.ensure_future(
            client.request(
                "tools/call", {"name": "log_later", "arguments": {"text": "mine", "delay": 0.5}}
            )
        )
        await eventually(lambda: any(r.has(b"log_later") for r in relay.requests))
        slow = {
            "name": "slow",
            "arguments": {"steps": 10, "delay": 0.1},
            "_meta": {"progressToken": 5},
        }
        (resp, events), (_, logged_events) = await asyncio.gather(
            client.request("tools/call", slow), logging
        )
        *notes, done = messages(events)
        assert [n["params"]["progress"] for n in notes] == list(range(1, 11))  # no log here
        assert tool_text(done) == "slow done after 10"
        note, answer = messages(logged_events)
        assert note["method"] == "notifications/message" and note["params"]["data"] == "mine"
        assert tool_text(answer) == "logged"

        assert all(re.fullmatch(r"\d+\.\d+", e.id or "") for e in events + logged_events)
        seen = b"".join(bytes(r.data) for r in relay.requests)
        found = re.search(rb"mcp-session-id: (\S+)", seen, re.IGNORECASE)
        assert found is not None
        upstream_session = found.group(1)
        assert upstream_session.decode() != client.session_id
        assert upstream_session not in b"".join(e.data.encode() for e in events + logged_events)
        assert upstream_session.decode() not in resp.headers.values()
        # Every request after initialize said which protocol version was negotiated.
        later = [r for r in relay.requests if r.has(b"mcp-session-id")]
        assert later and all(r.has(b"mcp-protocol-version: 2025-11-25") for r in later)

        async with client.http.delete(client.url, headers=client.headers()) as gone:
            assert gone.status == 204
        deletes = [r for r in relay.requests if r.data.startswith(b"DELETE ")]
        assert len(deletes) == 1 and deletes[0].has(upstream_session)
        other = await WsClient.connect(proxy.url)
        try:
            await other.initialize()
            alive = await other.response(await other.call_tool("live_sessions", {}))
            assert tool_text(alive) == "1"  # its own: the deleted session's is gone upstream
        finally:
            await other.close()
    finally:
        await client.close()
        await relay.aclose()


async def test_a_stream_cut_mid_response_is_resumed(
    upstream: HttpFixture, proxy_for: Callable[..., ProxyProcess]
) -> None:
    relay = Relay(upstream.port)
    port = await relay.start()
    proxy = proxy_for(f"http://127.0.0.1:{port}/mcp")
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        # Not read-only: had the stream not been resumed, the answer would be -32010.
        call = await client.call_tool("slow", {"steps": 6, "delay": 0.15}, "cut-me")
        while not progress_of(client.received, "cut-me"):
            await client.recv()
        cut_at = time.monotonic()
        assert relay.cut(b"cut-me") == 1  # mid-response: after the first progress note
        assert tool_text(await client.response(call)) == "slow done after 6"
        assert len(answers(client.received, call)) == 1
        # Each note the upstream sent reaches the client once, in order. Compared with what
        # the relay saw rather than with 1..6: the SDK server can lose a note it emits in
        # the window between replaying a resumed stream and registering it for live
        # messages (mcp's streamable_http.py says so: "the replay→live-tail ordering
        # window ... is tracked separately"); such a note never reaches the relay.
        sent = sorted(set(progress_sent(relay, "cut-me")))
        assert sent[0] == 1 and sent[-1] == 6
        assert progress_of(client.received, "cut-me") == sent  # each once, in order
        resumed = [r for r in relay.since(cut_at) if r.has(b"last-event-id")]
        assert resumed and resumed[0].data.startswith(b"GET ")
        assert resumed[0].at - cut_at >= RETRY_MS / 1000 * 0.9  # `retry` was honoured

        # The GET stream too: cut everything while a server notification is on its way.
        await client.response(await client.call_tool("notify_later", {"text": "one", "delay": 0}))
        while not any(m.get("method") == "notifications/message" for m in client.received):
            await client.recv()
        await client.response(
            await client.call_tool("notify_later", {"text": "two", "delay": 0.15})
        )
        cut_at = time.monotonic()
        assert relay.cut() >= 1
        while sum(m.get("method") == "notifications/message" for m in client.received) < 2:
            await client.recv()
        notes = [
            m["params"]["data"]
            for m in client.received
            if m.get("method") == "notifications/message"
        ]
        assert notes == ["one", "two"]
        assert [r for r in relay.since(cut_at) if r.has(b"last-event-id")]
        lsns = client.lsns()
        assert lsns == list(range(1, len(lsns) + 1))  # nothing doubled, nothing lost
    finally:
        await client.close()
        await relay.aclose()
    await eventually(lambda: len(proxy.events("upstream.stream_resumed")) >= 2)  # POST and GET
    assert not proxy.events("upstream.lost")  # one upstream session throughout


async def test_json_answers_and_the_get_stream(
    tmp_path: Path, proxy_for: Callable[..., ProxyProcess]
) -> None:
    """An upstream that answers POSTs with JSON bodies (no SSE): requests are answered, and
    what it sends on its own goes through the GET stream."""
    fixture = await HttpFixture(tmp_path, json_response=True).start()
    try:
        proxy = proxy_for(fixture.url)
        client = await WsClient.connect(proxy.url)
        try:
            await client.initialize()
            echo = await client.response(await client.call_tool("echo", {"text": "json"}))
            assert tool_text(echo) == "json"
            later = await client.call_tool("notify_later", {"text": "by GET", "delay": 0.05})
            assert tool_text(await client.response(later)) == "scheduled"
            while not any(m.get("method") == "notifications/message" for m in client.received):
                await client.recv()
            note = [m for m in client.received if m.get("method") == "notifications/message"]
            assert [m["params"]["data"] for m in note] == ["by GET"]
        finally:
            await client.close()
    finally:
        fixture.kill()


async def test_upstream_killed_and_restarted_mid_call(
    upstream: HttpFixture, proxy_for: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_for(upstream.url)
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        await client.call("tools/list")  # the proxy learns which tools are read-only
        reading = await client.call_tool("slow_read", {"steps": 4, "delay": 0.3}, "safe")
        writing = await client.call_tool("slow", {"steps": 40, "delay": 0.1}, "unsafe")
        while not (progress_of(client.received, "safe") and progress_of(client.received, "unsafe")):
            await client.recv()
        upstream.kill()
        await upstream.start()  # same port, no sessions: it answers 404 to the old one

        lost = await client.response(writing)
        assert lost["error"]["code"] == -32010  # may or may not have run: never re-run
        assert lost["error"]["data"]["method"] == "tools/call"
        assert tool_text(await client.response(reading)) == "read done after 4"  # re-issued
        echo = await client.response(await client.call_tool("echo", {"text": "after"}))
        assert tool_text(echo) == "after"
        assert tool_text(await client.response(await client.call_tool("live_sessions", {}))) == "1"
        lsns = client.lsns()
        assert lsns == list(range(1, len(lsns) + 1))
    finally:
        await client.close()
    await eventually(lambda: len(proxy.events("upstream.session")) == 2)  # re-initialized once
    assert len(proxy.events("upstream.lost")) == 1


async def test_a_call_refused_by_a_restarted_upstream_runs_once_on_the_new_one(
    tmp_path: Path, proxy_for: Callable[..., ProxyProcess]
) -> None:
    # Issue 16 item 1: the upstream restarts between two calls; the next call's POST is
    # answered 404 (the old session is unknown to it) before anything ran. It must run, once,
    # on a new upstream session, whatever its annotations (bump is not read-only), instead of
    # coming back -32010. A long `retry` keeps the GET stream from noticing the restart first.
    upstream = await HttpFixture(tmp_path, retry_ms=20_000).start()
    proxy = proxy_for(upstream.url)
    client = await WsClient.connect(proxy.url)
    try:
        await client.initialize()
        first = await client.response(await client.call_tool("bump", {"name": "runs"}))
        assert tool_text(first) == "1"
        upstream.kill()
        await upstream.start()  # same port, no sessions: it answers 404 to the old one

        again = await client.response(await client.call_tool("bump", {"name": "runs"}))
        assert "error" not in again, again
        assert tool_text(again) == "2"  # ran once more, on the new upstream session
        assert (tmp_path / "runs").read_text().count("\n") == 2
        lsns = client.lsns()
        assert lsns == list(range(1, len(lsns) + 1))
    finally:
        await client.close()
        upstream.kill()
    await eventually(lambda: len(proxy.events("upstream.session")) == 2)  # re-initialized once
    assert [e["unsent"] for e in proxy.events("upstream.lost")] == [1]


async def test_proxy_killed_and_restarted_keeps_the_session(
    upstream: HttpFixture, proxy_for: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_for(upstream.url)
    client = await WsClient.connect(proxy.url)
    session_id = (await client.initialize())["result"]["mcpSessionId"]
    await client.call("tools/list")
    assert (
        tool_text(await client.response(await client.call_tool("echo", {"text": "before"})))
        == "before"
    )
    reading = await client.call_tool("slow_read", {"steps": 3, "delay": 0.2}, "safe")
    writing = await client.call_tool("slow", {"steps": 40, "delay": 0.1}, "unsafe")
    while not (progress_of(client.received, "safe") and progress_of(client.received, "unsafe")):
        await client.recv()
    cursor = max(client.lsns())
    await client.drop()
    proxy.kill()  # its upstream session stays behind on the server

    proxy.start()
    back = await WsClient.connect(proxy.url, session_id, last_lsn=cursor)
    try:
        lost = await back.response(writing)
        assert lost["error"]["code"] == -32010
        assert lost["error"]["data"]["reason"] == "proxy restarted"
        assert tool_text(await back.response(reading)) == "read done after 3"
        echo = await back.response(await back.call_tool("echo", {"text": "after"}))
        assert tool_text(echo) == "after"
        # The session the killed proxy left on the server was ended, not leaked.
        assert tool_text(await back.response(await back.call_tool("live_sessions", {}))) == "1"
        assert [e["status"] for e in proxy.events("upstream.stale_session_ended")] == [200]
        lsns = [lsn_of(m) for m in back.received]
        assert lsns == list(range(cursor + 1, cursor + 1 + len(lsns)))
    finally:
        await back.close()


async def test_bearer_token_from_the_environment(
    tmp_path: Path, proxy_for: Callable[..., ProxyProcess]
) -> None:
    fixture = await HttpFixture(tmp_path, {"FIXTURE_BEARER_TOKEN": "s3cret-token"}).start()
    config = tmp_path / "mcproxy.toml"
    config.write_text('[upstream]\nbearer_token_env = "UPSTREAM_TOKEN"\n')
    try:
        proxy = proxy_for(
            fixture.url, "--config", str(config), env={"UPSTREAM_TOKEN": "s3cret-token"}
        )
        client = await WsClient.connect(proxy.url)
        try:
            await client.initialize()
            assert (
                tool_text(await client.response(await client.call_tool("echo", {"text": "ok"})))
                == "ok"
            )
        finally:
            await client.close()

        # A wrong token: the upstream's 401 is the answer to initialize, not a hang.
        proxy.kill()
        wrong = proxy_for(fixture.url, "--config", str(config), env={"UPSTREAM_TOKEN": "nope"})
        client = await WsClient.connect(wrong.url)
        try:
            refused = await client.call("initialize", INIT_PARAMS)
            assert refused["error"]["data"]["httpStatus"] == 401
            assert "401" in refused["error"]["message"]
        finally:
            await client.close()

        # An unset variable stops the daemon at start (exit 2), naming the variable.
        env = {k: v for k, v in os.environ.items() if k != "UPSTREAM_TOKEN"}
        unset = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcproxy", "--db", str(tmp_path / "x.db"), "--listen",
            "127.0.0.1:0", "--upstream", fixture.url, "--config", str(config),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(unset.communicate(), TIMEOUT)
        assert unset.returncode == 2 and b"UPSTREAM_TOKEN" in stderr
    finally:
        fixture.kill()


async def test_an_unreachable_upstream_is_answered_at_once(
    proxy_for: Callable[..., ProxyProcess],
) -> None:
    proxy = proxy_for(f"http://127.0.0.1:{free_port()}/mcp")  # nothing listens there
    client = await WsClient.connect(proxy.url)
    try:
        started = time.monotonic()
        refused = await client.call("initialize", INIT_PARAMS)
        assert refused["error"]["code"] == -32011
        assert time.monotonic() - started < TIMEOUT / 2
        await eventually(
            lambda: bool(proxy.events("upstream.spawn_failed"))
        )  # stderr is read apart
        assert "cannot reach" in proxy.events("upstream.spawn_failed")[0]["error"]
    finally:
        await client.close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no trust store knows, and its key."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_is_verified_unless_told_otherwise(
    tmp_path: Path, proxy_for: Callable[..., ProxyProcess]
) -> None:
    cert, key = self_signed(tmp_path)
    fixture = await HttpFixture(
        tmp_path, {"FIXTURE_TLS_CERT": str(cert), "FIXTURE_TLS_KEY": str(key)}
    ).start()
    try:
        # Verification is on by default: a self-signed certificate is refused.
        refusing = proxy_for(fixture.url)
        client = await WsClient.connect(refusing.url)
        try:
            refused = await client.call("initialize", INIT_PARAMS)
            assert refused["error"]["code"] == -32011
            await eventually(lambda: bool(refusing.events("upstream.spawn_failed")))
            assert "certificate" in refusing.events("upstream.spawn_failed")[0]["error"].lower()
        finally:
            await client.close()
        refusing.kill()

        # Trusting that certificate explicitly (a private CA) works.
        config = tmp_path / "tls.toml"
        config.write_text(f'[upstream]\ntls_ca_file = "{cert}"\n')
        trusting = proxy_for(fixture.url, "--config", str(config))
        client = await WsClient.connect(trusting.url)
        try:
            await client.initialize()
            echo = await client.response(await client.call_tool("echo", {"text": "over TLS"}))
            assert tool_text(echo) == "over TLS"
        finally:
            await client.close()
    finally:
        fixture.kill()
