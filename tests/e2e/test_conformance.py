"""The official MCP conformance suite, run against mcproxy fronting a *stdio* fixture server.

The suite only tests Streamable HTTP servers; `tests/fixtures/conformance_server.py` provides
the `test_*` tools, resources and prompts it calls, over stdio, so every check passes through
the proxy. Needs `npx` (Node and the npm registry): the suite wants Node 22, which `npx -p
node@22` fetches. Without npx the test is skipped, unless MCPROXY_REQUIRE_CONFORMANCE=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, ProxyProcess

FIXTURE = ROOT / "tests" / "fixtures" / "conformance_server.py"
STABLE = "@modelcontextprotocol/conformance@0.1.16"
ALPHA = "@modelcontextprotocol/conformance@0.2.0-alpha.12"
SUITE_TIMEOUT_S = 900  # includes downloading Node 22 and the suite on a cold npm cache


@pytest.fixture
def conformance_proxy(tmp_path: Path) -> ProxyProcess:
    npx = shutil.which("npx")
    if npx is None:
        if os.environ.get("MCPROXY_REQUIRE_CONFORMANCE") == "1":
            pytest.fail("npx is required for the conformance suite")
        pytest.skip("npx not found: the conformance suite needs Node and the npm registry")
    proxy = ProxyProcess(tmp_path / "db.sqlite", f"stdio:{sys.executable} {FIXTURE}").start()
    return proxy


def run_suite(package: str, port: int, out: Path, *extra: str) -> str:
    # The dns-rebinding check only runs against a localhost URL.
    url = f"http://localhost:{port}/mcp"
    command = ["npx", "-y", "-p", "node@22", "-p", package, "--", "conformance", "server"]
    done = subprocess.run(
        [*command, "--url", url, "-o", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    return report


def test_stable_suite_passes_every_check(conformance_proxy: ProxyProcess, tmp_path: Path) -> None:
    try:
        report = run_suite(STABLE, conformance_proxy.port, tmp_path / "stable")
    finally:
        conformance_proxy.kill()
    assert "Total: 40 passed, 0 failed" in report, report[-4000:]


def test_alpha_suite_with_2025_11_25_requirements(
    conformance_proxy: ProxyProcess, tmp_path: Path
) -> None:
    try:
        report = run_suite(
            ALPHA, conformance_proxy.port, tmp_path / "alpha", "--requirements", "2025-11-25"
        )
    finally:
        conformance_proxy.kill()
    for scenario in ("server-session-lifecycle", "server-sse-polling", "dns-rebinding-protection"):
        assert f"✓ {scenario}:" in report, report[-4000:]
    assert " 0 failed" in report.split("Total:")[-1]
