"""No client can hurt the others through the upstreams (issue 15 findings 4-6): the child's
environment and descriptors, the bytes queued toward a child that stops reading, and the cap on
live upstream processes. Real daemons, real children, real sockets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    FIXTURE_SERVER,
    HttpClient,
    ProxyProcess,
    WsClient,
    eventually,
    tool_text,
)

DUMPER = FIXTURE_SERVER.with_name("dump_and_serve.py")
DEAF_SERVER = FIXTURE_SERVER.with_name("deaf_server.py")
MB = 1024 * 1024
TOKEN = "alice-secret-token-0123456789"


@pytest.mark.parametrize("mode", ["per-session", "shared"])
async def test_the_child_gets_a_clean_environment_and_only_its_three_pipes(
    tmp_path: Path, mode: str
) -> None:
    # The daemon inherits a descriptor on its tokens file, holds its tokens in a variable, and
    # carries unrelated variables of its own: none of it may reach the child.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    inherited = os.open(tokens, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    dump = tmp_path / "child.json"
    config = tmp_path / "mcproxy.toml"
    config.write_text(
        '[auth]\ntokens_env = "MCPROXY_TEST_TOKENS"\n'
        f'[upstream]\nmode = "{mode}"\n'
        # Listing the tokens variable does not pass it: it is the proxy's secret.
        'env_passthrough = ["PATH", "LC_*", "MCPROXY_TEST_TOKENS"]\n'
        'env = {GREETING = "hello"}\n'
    )
    proxy = ProxyProcess(
        tmp_path / "mcproxy.db",
        f"stdio:{sys.executable} {DUMPER} {dump}",
        "--config",
        str(config),
        env={
            "MCPROXY_TEST_TOKENS": f"alice:{TOKEN}",
            "DAEMON_ONLY_SETTING": "not for the child",
            "LC_TEST_ISOLATION": "C",
        },
        pass_fds=(inherited,),
    ).start()
    client = HttpClient(proxy.url, {"Authorization": f"Bearer {TOKEN}"})
    try:
        await client.initialize()
        echo = await client.call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        assert tool_text(echo) == "hi"
        await eventually(dump.exists)
        record = json.loads(dump.read_text())
        env = record["env"]
        assert env["GREETING"] == "hello"
        assert env["LC_TEST_ISOLATION"] == "C"
        assert "PATH" in env
        assert "MCPROXY_TEST_TOKENS" not in env
        assert "DAEMON_ONLY_SETTING" not in env
        assert TOKEN not in dump.read_text()
        assert record["fds"] == [0, 1, 2]
    finally:
        await client.close()
        proxy.kill()
        os.close(inherited)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from the kernel's own accounting."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# Issue 15 finding 4 measured 58 -> 265 MB for this flood; bounded, the queue toward the child
# holds at most upstream.max_queued_bytes (4 MiB by default) plus one message.
FLOOD = 200
FLOOD_GROWTH_MAX_MB = 40  # measured: +8 MB


async def test_a_child_that_stops_reading_does_not_grow_the_proxy(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "mcproxy.db", f"stdio:{sys.executable} {DEAF_SERVER}").start()
    flooder = await WsClient.connect(proxy.url)
    bystander = await WsClient.connect(proxy.url)
    try:
        assert proxy.proc is not None
        await flooder.initialize()
        await bystander.initialize()
        deaf = await flooder.response(await flooder.call_tool("deafen", {}))
        assert tool_text(deaf) == "deaf now"
        before = rss_mb(proxy.proc.pid)
        blob = "x" * MB
        for _ in range(FLOOD):
            await flooder.send(
                {"jsonrpc": "2.0", "method": "notifications/flood", "params": {"blob": blob}}
            )
        # Requests beyond the bound are answered at once, and were never sent.
        refused = await flooder.response(await flooder.call_tool("echo", {"text": blob}))
        assert refused["error"]["code"] == -32015, refused
        assert refused["error"]["data"]["limit"] == 4 * MB
        echo = await bystander.response(await bystander.call_tool("echo", {"text": "still here"}))
        assert tool_text(echo) == "still here"
        after = rss_mb(proxy.proc.pid)
        assert after - before < FLOOD_GROWTH_MAX_MB, (before, after)
        dropped = proxy.events("upstream.send_dropped")
        assert dropped and dropped[0]["message"] == "notifications/flood"
        assert len(dropped) < 10  # logged at 1, 2, 4, 8, ... drops, not once each
    finally:
        await flooder.close()
        await bystander.close()
        proxy.kill()
