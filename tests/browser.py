"""A real headless Chromium for the tests and benchmarks of the JS client, driven through
``tests/js/browser-driver.mjs`` (puppeteer-core): one JSON command a line.

Needs the Debian package ``chromium-headless-shell`` and ``npm ci`` in ``tests/js`` (both
installed by ``scripts/test``). Without them the browser tests are skipped, unless
``MCPROXY_REQUIRE_BROWSER=1`` (CI, set in ``.ci/run``): then they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")


def chromium() -> str | None:
    """The browser's path: ``$CHROMIUM``, else the first of CHROMIUM_NAMES on the PATH."""
    given = os.environ.get("CHROMIUM")
    if given:
        return given
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (JS_DIR / "node_modules" / "puppeteer-core").is_dir():
        return "tests/js/node_modules is missing (run scripts/test, or npm ci in tests/js)"
    if chromium() is None:
        return "chromium-headless-shell is not installed (apt-get install chromium-headless-shell)"
    return None


def require_browser() -> None:
    """Skip the calling test when the browser is missing, or fail it in CI."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("MCPROXY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser tests must run here: {reason}")
    pytest.skip(reason)


class BrowserError(Exception):
    """A command failed in the browser (the page's exception, a wait that timed out)."""


class Browser:
    """``async with Browser() as b: page = await b.open(url); await b.wait(page, "expr")``."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = 0
        self._lock = asyncio.Lock()
        self.version = ""

    async def __aenter__(self) -> Browser:
        exe = chromium()
        assert exe is not None
        self._proc = await asyncio.create_subprocess_exec(
            "node",
            str(JS_DIR / "browser-driver.mjs"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CHROMIUM": exe},
            cwd=JS_DIR,
            limit=16 * 1024 * 1024,
        )
        assert self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            raise BrowserError("the browser driver did not start (see its stderr)")
        self.version = json.loads(line)["version"]
        return self

    async def __aexit__(self, *_: object) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def command(self, op: str, **args: Any) -> Any:
        assert self._proc is not None and self._proc.stdin is not None
        assert self._proc.stdout is not None
        async with self._lock:  # one command at a time: answers come in order
            self._ids += 1
            self._proc.stdin.write(json.dumps({"id": self._ids, "op": op, **args}).encode() + b"\n")
            await self._proc.stdin.drain()
            line = await self._proc.stdout.readline()
        if not line:
            raise BrowserError("the browser driver exited")
        answer = json.loads(line)
        if not answer["ok"]:
            raise BrowserError(answer["error"])
        return answer["value"]

    async def open(self, url: str) -> int:
        return int(await self.command("open", url=url))

    async def eval(self, page: int, expr: str) -> Any:
        return await self.command("eval", page=page, expr=expr)

    async def wait(self, page: int, expr: str, timeout_s: float) -> Any:
        """Wait until ``expr`` is truthy in the page; its value."""
        return await self.command("wait", page=page, expr=expr, timeoutMs=int(timeout_s * 1000))

    async def reload(self, page: int) -> None:
        await self.command("reload", page=page)

    async def goto(self, page: int, url: str) -> None:
        await self.command("goto", page=page, url=url)

    async def click(self, page: int, selector: str) -> None:
        await self.command("click", page=page, selector=selector)

    async def logs(self, page: int) -> list[str]:
        return list(await self.command("logs", page=page))


class Relay:
    """A TCP relay in front of a proxy that can cut every link (abort both sides, no close
    frame: what a network drop looks like). ``cut_on`` set: it cuts, once, when the proxy
    sends bytes containing that pattern, before they reach the client."""

    def __init__(self, target_port: int, cut_on: bytes | None = None) -> None:
        self.target_port, self.port = target_port, 0
        self.cut_on = cut_on
        self.cuts = 0
        self.cut_at = 0.0  # loop time of the last cut
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/mcp"

    def cut(self) -> None:
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()
        self.cut_at = asyncio.get_running_loop().time()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            try:
                while data := await src.read(65536):
                    if down and self.cut_on is not None and self.cut_on in data:
                        self.cut_on = None
                        self.cuts += 1
                        self.cut()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            dst.transport.abort()
            self._links.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
