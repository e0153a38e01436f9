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
    eventually,
    tool_text,
)

DUMPER = FIXTURE_SERVER.with_name("dump_and_serve.py")
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
