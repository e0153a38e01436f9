"""Every benchmark still runs, on a small scale: they are how the speed and memory targets
are checked, and one that no longer starts checks nothing (bench_store's memory run once
failed for months unnoticed). Numbers are not asserted here; the benchmarks print them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.browser import require_browser
from tests.e2e.fleet import require
from tests.helpers import ROOT

SMALL = {
    "bench_ws": ["--calls", "20", "--resumes", "5", "--restarts", "1"],
    "bench_http": ["--calls", "20", "--concurrency", "2"],
    "bench_http_upstream": ["--calls", "20"],
    "bench_reload": ["--reloads", "2", "--restarts", "1"],
    "bench_client": ["--drops", "2", "--restarts", "1"],
    "bench_browser": ["--drops", "3"],
    "bench_store": ["--messages", "10", "--producers", "4", "--sessions", "20"],
    "bench_fleet": ["--sessions", "6", "--calls", "5", "--resumes", "2"],
    "bench_scale": ["--sessions", "30", "--pool", "1", "--duration", "1", "--rounds", "1"],
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_benchmark_runs(name: str) -> None:
    if name == "bench_browser":
        require_browser()  # node, tests/js/node_modules, Chromium (failed, not skipped, in CI)
    if name == "bench_fleet":
        require("haproxy")  # skipped without it, unless MCPROXY_REQUIRE_PEERS=1
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMALL[name]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
