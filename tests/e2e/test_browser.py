"""The JS client (mcproxy/web/) for real: its Node unit tests, the official TypeScript SDK's
Client over its Transport through a connection cut mid-call, and the demo page in a real
headless Chromium against a real mcproxy (SIGKILLed and restarted mid-call, a reload, a second
tab, a token in the subprotocol, a foreign Origin).

Needs node, tests/js/node_modules and chromium-headless-shell (scripts/test installs them);
skipped without, failed without when MCPROXY_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.browser import JS_DIR, Browser, Relay, require_browser
from tests.helpers import ROOT, TIMEOUT, ProxyProcess, eventually, free_port

COUNTDOWN = ROOT / "tests" / "fixtures" / "resumable_countdown.py"
DEMO_UPSTREAM = f"stdio:{sys.executable} -m mcproxy.examples.demo_server"
WEB_DIR = ROOT / "mcproxy" / "web"

# Page state, read in one evaluation.
LOG = """[...document.querySelectorAll('#log li')].map(li => ({
    kind: li.className, text: li.textContent, data: {...li.dataset}}))"""
READY = "document.body.dataset.ready === 'true'"


@pytest.fixture
def browser_required() -> None:
    require_browser()


@pytest.fixture
async def browser(browser_required: None) -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


@pytest.fixture
def demo_proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    """The demo page on, the resumable countdown upstream, a fixed port (restarts keep it)."""
    state = tmp_path / "countdowns"
    state.mkdir()
    p = ProxyProcess(
        tmp_path / "mcproxy.db",
        f"stdio:{sys.executable} {COUNTDOWN}",
        "--demo-page",
        env={"FIXTURE_COUNTDOWN_STATE_DIR": str(state)},
        port=free_port(),
    )
    p.start()
    yield p
    p.kill()


def page_url(proxy: ProxyProcess, query: str = "") -> str:
    return f"http://127.0.0.1:{proxy.port}/demo/{query}"


async def call_in_page(browser: Browser, page: int, tool: str, args: dict[str, Any]) -> None:
    await browser.eval(
        page,
        f"""document.getElementById('tool').value = {json.dumps(tool)};
            document.getElementById('args').value = {json.dumps(json.dumps(args))};""",
    )
    await browser.click(page, "#call")


async def log_of(browser: Browser, page: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in await browser.eval(page, LOG) if e["kind"] == kind]


# --- the routes ------------------------------------------------------------------------


async def test_demo_routes_are_off_by_default_and_checked_like_mcp(tmp_path: Path) -> None:
    off = ProxyProcess(tmp_path / "off.db", DEMO_UPSTREAM).start()
    on = ProxyProcess(tmp_path / "on.db", DEMO_UPSTREAM, "--demo-page").start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{off.port}"
            for path in ("/demo/", "/mcproxy-client/mcproxy-client.js"):
                assert (await http.get(base + path)).status == 404
            base = f"http://127.0.0.1:{on.port}"
            types = {
                "/demo/": "text/html",
                "/demo/demo.js": "text/javascript",
                "/mcproxy-client/mcproxy-client.js": "text/javascript",
                "/mcproxy-client/sdk-transport.js": "text/javascript",
                "/mcproxy-client/mcproxy-client.d.ts": "text/plain",
            }
            for path, kind in types.items():
                resp = await http.get(base + path)
                assert resp.status == 200, path
                assert resp.headers["Content-Type"].startswith(kind), path
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
            # The very file the package ships (one source of truth).
            served = await (await http.get(base + "/mcproxy-client/mcproxy-client.js")).read()
            assert served == (WEB_DIR / "mcproxy-client.js").read_bytes()
            page = await (await http.get(base + "/demo/")).text()
            assert '<meta name="mcproxy-endpoint" content="/mcp">' in page
            for path in ("/demo/package.json", "/demo/..%2fconfig.py", "/mcproxy-client/x.js"):
                assert (await http.get(base + path)).status == 404, path
            evil = {"Origin": "http://evil.example"}
            assert (await http.get(base + "/demo/", headers=evil)).status == 403
            rebound = {"Host": f"evil.example:{on.port}"}
            assert (await http.get(base + "/demo/demo.js", headers=rebound)).status == 421
    finally:
        off.kill()
        on.kill()


# --- Node ------------------------------------------------------------------------------


def test_node_unit_tests(browser_required: None) -> None:
    """tests/js/*.test.mjs with Node's own runner: the client's logic over a fake socket."""
    files = sorted(str(p) for p in JS_DIR.glob("*.test.mjs"))
    run = subprocess.run(
        ["node", "--test", "--test-timeout=30000", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout


def test_types_check(browser_required: None) -> None:
    """tsc (strict) over the JSDoc of mcproxy/web/*.js and the .d.ts files, and the SDK
    adapter assigned to the SDK's own ``Transport`` type (tests/js/types.check.ts)."""
    run = subprocess.run(
        [str(JS_DIR / "node_modules" / ".bin" / "tsc"), "-p", str(JS_DIR)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


async def test_sdk_client_over_the_transport_survives_a_cut_mid_call(
    browser_required: None, tmp_path: Path
) -> None:
    """The official TS SDK Client, unchanged, over McproxyTransport: the relay cuts the
    connection when the second progress step passes; the call completes, once."""
    proxy = ProxyProcess(tmp_path / "mcproxy.db", DEMO_UPSTREAM).start()
    relay = await Relay(proxy.port, cut_on=b'"progress":2').start()
    try:
        run = await asyncio.create_subprocess_exec(
            "node",
            str(JS_DIR / "sdk-client.e2e.mjs"),
            relay.url,
            "countdown",
            json.dumps({"n": 4}),
            cwd=JS_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(run.communicate(), 6 * TIMEOUT)
        assert run.returncode == 0, err.decode()[-4000:]
        report = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        await relay.close()
        proxy.kill()
    assert relay.cuts == 1
    assert report["result"] == [{"type": "text", "text": "liftoff after 4s"}]
    assert report["after"] == [{"type": "text", "text": "after"}]
    assert report["progress"] == [1, 2, 3, 4]  # the step cut off was replayed, none twice
    assert report["connects"] == 2
    assert report["events"] == ["open", "disconnected", "open", "resumed"]
    assert report["errors"] == []  # no answer to an unknown id: nothing came twice


# --- the demo page in Chromium -----------------------------------------------------------


async def test_demo_page_completes_a_countdown_across_a_proxy_sigkill(
    browser: Browser, demo_proxy: ProxyProcess
) -> None:
    page = await browser.open(page_url(demo_proxy))
    await browser.wait(page, READY, TIMEOUT)
    session = await browser.eval(page, "document.getElementById('session').textContent")
    await call_in_page(browser, page, "countdown", {"n": 8, "delay": 0.4})
    await browser.wait(page, "document.querySelectorAll('#log .progress').length >= 2", TIMEOUT)
    demo_proxy.kill()
    await browser.wait(page, "document.getElementById('state').textContent !== 'open'", TIMEOUT)
    demo_proxy.start()  # same port, same database: the call is re-issued to a new child
    await browser.wait(page, "!!document.querySelector('#log .result')", 4 * TIMEOUT)
    # Anything still due (a second answer) would arrive before the answer to a later call.
    await call_in_page(browser, page, "echo", {"text": "after"})
    await browser.wait(page, "document.querySelectorAll('#log .result').length >= 2", TIMEOUT)
    progress = [int(e["data"]["progress"]) for e in await log_of(browser, page, "progress")]
    results = [e["text"] for e in await log_of(browser, page, "result")]
    assert progress == list(range(1, 9))
    assert results == ["liftoff after 8 steps", "after"]
    assert await log_of(browser, page, "error") == []
    assert await browser.eval(page, "document.getElementById('session').textContent") == session
    assert await browser.eval(page, "document.getElementById('state').textContent") == "open"
    assert int(await browser.eval(page, "document.getElementById('connects').textContent")) >= 2
    lsn = int(await browser.eval(page, "document.getElementById('lsn').textContent"))
    assert lsn == await browser.eval(page, "mcproxyClient.cursor") and lsn > 10


async def test_a_reload_resumes_the_same_session_and_shows_the_answer(
    browser: Browser, demo_proxy: ProxyProcess
) -> None:
    page = await browser.open(page_url(demo_proxy))
    await browser.wait(page, READY, TIMEOUT)
    session = await browser.eval(page, "mcproxyClient.sessionId")
    # Long enough that the answer comes after the reload, however slow the machine.
    await call_in_page(browser, page, "countdown", {"n": 20, "delay": 0.25})
    await browser.wait(page, "document.querySelectorAll('#log .progress').length >= 1", TIMEOUT)
    lsn_before = await browser.eval(page, "mcproxyClient.cursor")
    await browser.reload(page)  # the call is in flight; sessionStorage keeps the session
    await browser.wait(page, READY, TIMEOUT)
    assert await browser.eval(page, "mcproxyClient.sessionId") == session
    assert await browser.eval(page, "mcproxyClient.initResult._meta['io.mcproxy/resumed']")
    # The answer to the call made before the reload arrives, once, in the new page.
    await browser.wait(page, "!!document.querySelector('#log .result[data-earlier]')", TIMEOUT)
    await call_in_page(browser, page, "echo", {"text": "after"})
    await browser.wait(page, "document.querySelectorAll('#log .result').length >= 2", TIMEOUT)
    results = [e["text"] for e in await log_of(browser, page, "result")]
    assert results == ["liftoff after 20 steps", "after"]
    assert await browser.eval(page, "mcproxyClient.cursor") > lsn_before
    progress = [int(e["data"]["progress"]) for e in await log_of(browser, page, "progress")]
    assert progress == sorted(set(progress)) and progress[-1] == 20  # the rest, once each


async def test_a_second_tab_takes_the_session_over_and_the_first_stops(
    browser: Browser, demo_proxy: ProxyProcess
) -> None:
    first = await browser.open(page_url(demo_proxy))
    await browser.wait(first, READY, TIMEOUT)
    session = await browser.eval(first, "mcproxyClient.sessionId")
    second = await browser.open(page_url(demo_proxy, f"?session={session}"))
    await browser.wait(second, READY, TIMEOUT)
    kind = await browser.wait(
        first, "document.querySelector('#log li[data-kind]')?.dataset.kind", TIMEOUT
    )
    assert kind == "superseded"
    assert await browser.eval(first, "mcproxyClient.state") == "closed"
    # No ping-pong: the second tab keeps the session while it works.
    await call_in_page(browser, second, "echo", {"text": "mine now"})
    await browser.wait(second, "!!document.querySelector('#log .result')", TIMEOUT)
    # A closed client has no retry pending (the state is final), and the session was attached
    # twice in all: once per tab.
    assert await browser.eval(second, "mcproxyClient.state") == "open"
    attached = [e for e in demo_proxy.events("session.attached") if e.get("conn")]
    assert len(attached) == 2
    assert await browser.eval(second, "mcproxyClient.connects") == 1
    assert await browser.eval(first, "mcproxyClient.connects") == 1
    assert await browser.eval(second, "mcproxyClient.sessionId") == session


async def test_an_auth_protected_proxy_through_the_subprotocol_token(
    browser: Browser, tmp_path: Path
) -> None:
    config = tmp_path / "mcproxy.toml"
    config.write_text('[auth]\ntokens_env = "MCPROXY_TEST_TOKENS"\n[demo]\nenabled = true\n')
    proxy = ProxyProcess(
        tmp_path / "mcproxy.db",
        DEMO_UPSTREAM,
        "--config",
        str(config),
        env={"MCPROXY_TEST_TOKENS": "alice:s3cret-token-for-the-browser"},
    ).start()
    try:
        denied = await browser.open(page_url(proxy, "#token=wrong"))
        allowed = await browser.open(page_url(proxy, "#token=s3cret-token-for-the-browser"))
        await browser.wait(allowed, READY, TIMEOUT)
        names = await browser.eval(allowed, "[...document.querySelectorAll('#tool option')]"
                                            ".map(o => o.value)")  # fmt: skip
        assert names == ["echo", "add", "countdown"]
        await eventually(lambda: any(e.get("status") == 401 for e in proxy.events("ws.refused")))
        assert await browser.eval(denied, "mcproxyClient.connects") == 0  # never opened
        assert not await browser.eval(denied, "document.body.dataset.ready === 'true'")
    finally:
        proxy.kill()


async def test_the_origin_check_refuses_a_page_from_a_foreign_origin(
    browser: Browser, demo_proxy: ProxyProcess
) -> None:
    """The same page, served by another site (foreign.test, which the browser resolves to
    loopback), pointed at the proxy: the upgrade is refused with 403, and no session is made.
    The proxy's own page under a foreign Host name is refused too (421: DNS rebinding)."""

    async def serve(request: web.Request) -> web.FileResponse:
        name = request.match_info.get("name") or "demo.html"
        return web.FileResponse(WEB_DIR / name)

    app = web.Application()
    app.router.add_get("/", serve)
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        endpoint = f"ws://127.0.0.1:{demo_proxy.port}/mcp"
        page = await browser.open(f"http://foreign.test:{port}/?endpoint={endpoint}")
        await browser.wait(page, "mcproxyClient.state === 'reconnecting'", TIMEOUT)
        await eventually(
            lambda: any(e.get("status") == 403 for e in demo_proxy.events("ws.refused"))
        )
        assert await browser.eval(page, "mcproxyClient.connects") == 0
        async with aiohttp.ClientSession() as http:
            own = await http.get(page_url(demo_proxy))
            assert own.status == 200
            assert own.headers["Content-Type"].startswith("text/html")
            module = await http.get(f"http://127.0.0.1:{demo_proxy.port}/demo/mcproxy-client.js")
            assert module.headers["Content-Type"].startswith("text/javascript")
        rebound = await browser.open(f"http://foreign.test:{demo_proxy.port}/demo/")
        assert "Host header not allowed" in await browser.eval(rebound, "document.body.innerText")
    finally:
        await runner.cleanup()
