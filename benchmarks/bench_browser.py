"""Browser reconnect benchmark: the JS client (mcproxy/web/mcproxy-client.js) in a real
headless Chromium, next to the Python client, in the same run, through the same relay.

A TCP relay between client and proxy aborts every link (no close frame: a network drop). The
browser's time is from its `disconnected` event to its `resumed` event (its resume handshake
answered); the Python client's from the cut to its `on_resumed` callback. Both use
minUptime 250 ms (drops come faster than the default 5 s; see bench_client.py).

    python benchmarks/bench_browser.py [--drops 30]

Needs node, tests/js/node_modules and chromium-headless-shell (scripts/test installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the browser driver and the relay live with the tests

from bench_ws import report  # noqa: E402

from mcproxy.client.connection import ReconnectingConnection, ReconnectOptions  # noqa: E402
from tests.browser import Browser, Relay, missing  # noqa: E402
from tests.helpers import ProxyProcess  # noqa: E402

DEMO = f"stdio:{sys.executable} -m mcproxy.examples.demo_server"
MIN_UPTIME_S = 0.25
INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"}}  # fmt: skip

# Runs in the page: a client of its own (the module the daemon serves), marks in globalThis.
SETUP = """(async () => {
  const { McproxyClient } = await import('/mcproxy-client/mcproxy-client.js');
  const client = new McproxyClient(%r, { minUptime: %d });
  globalThis.marks = { down: [], resumed: [] };
  client.addEventListener('disconnected', () => marks.down.push(performance.now()));
  client.addEventListener('resumed', () => marks.resumed.push(performance.now()));
  globalThis.bench = client;
  await client.start();
  return client.sessionId;
})()"""


async def browser_drops(
    browser: Browser, proxy: ProxyProcess, relay: Relay, drops: int
) -> list[float]:
    page = await browser.open(f"http://127.0.0.1:{proxy.port}/demo/")
    await browser.eval(page, SETUP % (relay.url, int(MIN_UPTIME_S * 1000)))
    samples: list[float] = []
    for i in range(drops):
        await asyncio.sleep(MIN_UPTIME_S)  # a healthy connection: the retry is immediate
        relay.cut()
        await browser.wait(page, f"marks.resumed.length > {i}", 30)
        down, up = await browser.eval(page, f"[marks.down[{i}], marks.resumed[{i}]]")
        samples.append((up - down) / 1000)
    await browser.eval(page, "bench.close()")
    return samples


async def python_drops(relay: Relay, drops: int) -> list[float]:
    loop = asyncio.get_running_loop()
    resumed: asyncio.Queue[float] = asyncio.Queue()
    answered = asyncio.Event()

    async def on_message(message: dict[str, Any]) -> None:
        if message.get("id") == 1:
            answered.set()

    async def on_resumed(_: bool) -> None:
        resumed.put_nowait(loop.time())

    conn = ReconnectingConnection(
        relay.url, on_message, options=ReconnectOptions(min_uptime_s=MIN_UPTIME_S),
        on_resumed=on_resumed,
    )  # fmt: skip
    await conn.start()
    await conn.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
    await answered.wait()
    await conn.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    samples: list[float] = []
    try:
        for _ in range(drops):
            await asyncio.sleep(MIN_UPTIME_S)
            relay.cut()
            at = await asyncio.wait_for(resumed.get(), 30)
            samples.append(at - relay.cut_at)
    finally:
        await conn.close()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=30)
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        sys.exit(f"bench_browser: {reason}")
    structlog.configure(processors=[lambda *_: (_ for _ in ()).throw(structlog.DropEvent)])
    with tempfile.TemporaryDirectory() as tmp:
        proxy = ProxyProcess(Path(tmp) / "bench.db", DEMO, "--demo-page").start()
        relay = await Relay(proxy.port).start()
        try:
            async with Browser() as browser:
                print(f"{platform.node()} {platform.machine()} Python {platform.python_version()}"
                      f" {browser.version}, {args.drops} drops each")  # fmt: skip
                print("reconnect to resumed after a drop (relay aborts the TCP links):")
                report(
                    "browser (mcproxy-client.js)",
                    await browser_drops(browser, proxy, relay, args.drops),
                )
                report("python (mcproxy.client)", await python_drops(relay, args.drops))
        finally:
            await relay.close()
            proxy.kill()


if __name__ == "__main__":
    asyncio.run(main())
