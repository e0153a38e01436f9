"""No client can break the shared event log for the others (issue 15): racing creations of
one session id, and a session whose writes fail, against the real daemon over real sockets,
with a bystander session that must keep working throughout."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    INIT_PARAMS,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    SseEvent,
    WsClient,
    messages,
    read_sse,
    tool_text,
)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
RACERS = 8  # connections racing for one new id, per round
ROUNDS = 6


@pytest.fixture
def secured(tmp_path: Path) -> ProxyProcess:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
    tokens.chmod(0o600)  # a tokens file others can read is refused
    config = tmp_path / "mcproxy.toml"
    config.write_text(f'[auth]\ntokens_file = "{tokens}"\n')
    return ProxyProcess(tmp_path / "db.sqlite", None, "--config", str(config)).start()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _connect(url: str, token: str, session_id: str | None) -> WsClient:
    http = aiohttp.ClientSession(headers=bearer(token))
    params = {} if session_id is None else {"mcp_session_id": session_id}
    try:
        ws = await http.ws_connect(url, params=params, protocols=("mcp",))
    except BaseException:
        await http.close()
        raise
    return WsClient(http, ws)


async def _outcome(client: WsClient) -> str:
    """What one racer got: its initialize answered, or the socket closed (with the code)."""
    try:
        answer = await client.response(1)
    except (ConnectionError, TimeoutError):
        return f"closed {client.ws.close_code}"
    return "error" if "error" in answer else "answered"


async def _bystander_works(bystander: HttpClient, text: str) -> None:
    answer = await bystander.call("tools/call", {"name": "echo", "arguments": {"text": text}})
    assert tool_text(answer) == text, answer


async def _ready(proxy: ProxyProcess) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy.url.replace("/mcp", "/readyz")) as resp,
    ):
        return resp.status


@pytest.mark.parametrize("principals", ["same", "two"])
async def test_racing_creations_of_one_new_id_make_one_session_and_hurt_nobody(
    secured: ProxyProcess, principals: str
) -> None:
    """Issue 15 finding 1: N sockets propose the same new id at once (half on the upgrade URL,
    half in a re-sent initialize); exactly one session per owner is created, the store stays
    writable, and a bystander's calls keep succeeding."""
    bystander = HttpClient(secured.url, bearer(ALICE))
    racers: list[WsClient] = []
    try:
        await bystander.initialize()
        for round_ in range(ROUNDS):
            session_id = f"race{round_}-" + secrets.token_urlsafe(18)
            tokens = [ALICE if principals == "same" or i % 2 else BOB for i in range(RACERS)]
            racers = await asyncio.gather(
                *(
                    _connect(secured.url, token, session_id if i % 2 else None)
                    for i, token in enumerate(tokens)
                )
            )
            hello: dict[str, Any] = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {**INIT_PARAMS, "_meta": {"mcpSessionId": session_id}},
            }
            await asyncio.gather(*(r.send(hello) for r in racers))
            outcomes = await asyncio.gather(*(_outcome(r) for r in racers))
            assert "answered" in outcomes, outcomes
            await _bystander_works(bystander, f"round {round_}")
            created = [
                e for e in secured.events("session.created") if e["session"] == session_id[:8] + "…"
            ]
            owners = 1 if principals == "same" else 2
            assert 1 <= len(created) <= owners, (outcomes, created)
            for racer in racers:
                await racer.close()
            racers = []
        assert await _ready(secured) == 200
        assert not secured.events("store.failed")
        assert not any(e.get("level") == "error" for e in secured.logs), [
            e for e in secured.logs if e.get("level") == "error"
        ]
        await _bystander_works(bystander, "after the races")
    finally:
        for racer in racers:
            await racer.close()
        await bystander.close()
        secured.kill()


async def test_a_session_whose_write_fails_fails_alone_and_comes_back(tmp_path: Path) -> None:
    """Issue 15 finding 2: a statement that fails for one session (here a row another writer
    put where the session's next message goes: the UNIQUE index refuses it, as in the race)
    fails that session alone. Its stream is cut without the uncommitted answer (never ended
    as if complete: the client resumes), the bystander keeps working, /readyz stays green,
    and the session is reloaded on its next use."""
    db = tmp_path / "db.sqlite"
    proxy = ProxyProcess(db).start()
    victim = HttpClient(proxy.url)
    bystander = WsClient(*(await _ws_pair(proxy.url)))
    try:
        await bystander.initialize()
        await victim.initialize()
        assert victim.session_id is not None
        with sqlite3.connect(db, timeout=TIMEOUT) as conn:
            head = conn.execute(
                "SELECT coalesce(max(lsn), 0) FROM events WHERE session_id = ?",
                (victim.session_id,),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO events (session_id, lsn, created_at, payload) VALUES (?, ?, 0, ?)",
                (victim.session_id, head + 1, b'{"planted":true}'),
            )
        call = {"name": "echo", "arguments": {"text": "lost"}}
        resp = await victim.post(
            {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": call}
        )
        events: list[SseEvent] = []
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: no chunked end
            await read_sse(resp, lambda e: events.append(e) and False)
        assert not any("result" in m for m in messages(events)), events  # never committed
        assert len(proxy.events("session.failed")) == 1
        answer = await bystander.call("tools/call", {"name": "echo", "arguments": {"text": "b"}})
        assert tool_text(answer) == "b"
        assert await _ready(proxy) == 200
        await _bystander_works(victim, "reloaded")  # the same id, loaded again from the log
        assert proxy.events("session.restored")
    finally:
        await victim.close()
        await bystander.close()
        proxy.kill()


async def _ws_pair(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    return http, await http.ws_connect(url, protocols=("mcp",))


def _fill(path: Path) -> None:
    """Take every free block of the file system, until ENOSPC."""
    with contextlib.suppress(OSError), path.open("wb") as filler:
        while True:
            filler.write(bytes(4096))
            filler.flush()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up (needs root, or skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_makes_the_daemon_exit_non_zero_and_a_restart_recovers(
    small_disk: Path,
) -> None:
    """Issue 15 finding 2: a real storage failure (ENOSPC on a full filesystem) fails the
    store; the daemon commits nothing more and exits non-zero (systemd restarts it) instead
    of answering 503 forever. Once there is room again, a new process serves the session."""
    db = small_disk / "db.sqlite"
    proxy = ProxyProcess(db).start()
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        await _bystander_works(client, "before")
        await asyncio.to_thread(_fill, small_disk / "filler")
        with contextlib.suppress(aiohttp.ClientError, KeyError, AssertionError, TimeoutError):
            # needs room in the WAL
            await asyncio.wait_for(_bystander_works(client, "x" * 20_000), TIMEOUT)
        assert proxy.proc is not None
        status = await asyncio.to_thread(proxy.proc.wait, TIMEOUT)
        assert status != 0
        failed = proxy.events("daemon.store_failed")
        assert failed and "full" in failed[0]["error"], proxy.logs[-10:]
        (small_disk / "filler").unlink()
        proxy.start()
        await _bystander_works(client, "after")  # same session, new process
    finally:
        await client.close()
        proxy.kill()
