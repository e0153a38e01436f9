"""No client can break the shared event log for the others (issue 15): racing creations of
one session id, and a session whose writes fail, against the real daemon over real sockets,
with a bystander session that must keep working throughout."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import INIT_PARAMS, HttpClient, ProxyProcess, WsClient, tool_text

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
RACERS = 8  # connections racing for one new id, per round
ROUNDS = 6


@pytest.fixture
def secured(tmp_path: Path) -> ProxyProcess:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
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
