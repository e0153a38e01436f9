"""Property-based abuse of both fronts (hypothesis): malformed frames, bodies, headers and
JSON-RPC envelopes. The daemon must answer each with a 4xx, a JSON-RPC error or a close, never
crash, hang or leak a file descriptor, and a well-behaved session must keep working meanwhile.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ProxyProcess, wait_until

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ENVELOPE = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "id": st.none()
        | st.integers()
        | st.text(max_size=8)
        | st.booleans()
        | st.floats(allow_nan=False),
        "method": st.sampled_from(
            ["initialize", "ping", "tools/call", "notifications/cancelled", ""]
        )
        | st.text(max_size=12),
        "params": JSON,
        "result": JSON,
        "error": JSON,
        "mcpSessionId": st.text(max_size=40) | st.integers(),
    },
)
BODY = st.binary(max_size=300) | ENVELOPE.map(lambda e: json.dumps(e).encode())
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Accept",
            "Mcp-Session-Id",
            "MCP-Protocol-Version",
            "Last-Event-ID",
            "Origin",
            "Authorization",
            "Upgrade",
            "Sec-WebSocket-Protocol",
        ]
    ),
    HEADER_VALUE,
    max_size=5,
)
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "mcproxy.toml"
    # Generous limits: the fuzzer comes from one address and must not be rate limited.
    config.write_text("[limits]\nconnections_per_s = 10000.0\nconnection_burst = 10000\n")
    proxy = ProxyProcess(tmp / "db.sqlite", None, "--config", str(config)).start()
    yield proxy
    proxy.kill()


def open_fds(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


@given(method=st.sampled_from(["POST", "GET", "DELETE", "PUT"]), headers=HEADERS, body=BODY)
@SETTINGS
def test_http_front_never_fails_on_bad_input(
    target: ProxyProcess, method: str, headers: dict[str, str], body: bytes
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    try:
        conn.request(method, "/mcp", body=body if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        assert resp.status < 500, (resp.status, resp.read()[:200])
        if resp.getheader("Content-Type", "").startswith("application/json"):
            json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    else:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_upgrade(port: int, query: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET /mcp{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
        "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mcp",
    ]  # fmt: skip
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


FRAMES = st.lists(
    st.tuples(st.sampled_from([0x1, 0x2, 0x0, 0x3, 0x8, 0x9, 0xA, 0xF]), BODY, st.booleans()),
    min_size=1,
    max_size=5,
)


@given(frames=FRAMES, query=st.sampled_from(["", "?mcp_session_id=short", "?mcp_last_lsn=x"]))
@SETTINGS
def test_websocket_front_never_fails_on_bad_frames(
    target: ProxyProcess, frames: list[tuple[int, bytes, bool]], query: str
) -> None:
    sock = ws_upgrade(target.port, query)
    try:
        reply = sock.recv(4096)
        if not reply.startswith(b"HTTP/1.1 101"):
            assert reply[9:12] < b"500", reply[:80]
            return
        for opcode, payload, fin in frames:
            frame = ws_frame(opcode, payload[:125] if opcode >= 0x8 else payload, fin)
            try:
                sock.sendall(frame)
            except ConnectionError:
                break  # the proxy closed on a bad frame already: that is an answer
        sock.settimeout(0.2)
        try:
            while sock.recv(65536):
                pass  # answers or a close; either is fine
        except (TimeoutError, ConnectionError):
            pass
    finally:
        sock.close()


def test_the_daemon_survived_and_leaked_nothing(target: ProxyProcess, tmp_path: Path) -> None:
    """Runs after the fuzzers (file order): still serving, descriptors back to normal."""
    assert target.proc is not None and target.proc.poll() is None
    wait_until(lambda: open_fds(target) < 40)  # closed sockets are released promptly
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    body: dict[str, Any] = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "after-fuzz", "version": "1"}},
    }  # fmt: skip
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    conn.request("POST", "/mcp", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Mcp-Session-Id")
    conn.close()
