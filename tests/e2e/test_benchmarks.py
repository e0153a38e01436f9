"""Every benchmark still runs, on a small scale: they are how the speed and memory targets
are checked, and one that no longer starts checks nothing (bench_store's memory run once
failed for months unnoticed). Numbers are not asserted here; the benchmarks print them.
bench_peers' wrong answers are asserted: they are correctness, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    "profile_front": ["--calls", "20", "--rounds", "2", "--warmup", "5"],
    "bench_peers": ["--quick"],
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_benchmark_runs(name: str, tmp_path: Path) -> None:
    if name == "bench_browser":
        require_browser()  # node, tests/js/node_modules, Chromium (failed, not skipped, in CI)
    if name == "bench_fleet":
        require("haproxy")  # skipped without it, unless MCPROXY_REQUIRE_PEERS=1
    extra = []
    if name == "bench_peers":
        require("npm")  # it installs supergateway into benchmarks/.peers (skipped as above)
        extra = ["--json", str(tmp_path / "peers.json")]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMALL[name], *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
    if name == "bench_peers":
        result = json.loads((tmp_path / "peers.json").read_text())
        check_peer_answers(result)
        if result["peers_missing"]:  # then it ran without supergateway and the Node upstream,
            # which it does only when MCPROXY_REQUIRE_PEERS is unset (else it exits with 75)
            pytest.skip(f"supergateway not installed: {result['peers_missing']}")


def check_peer_answers(result: dict[str, object]) -> None:
    """Wrong answers are correctness, not speed: mcproxy gives none, on either front and in
    either upstream mode, while supergateway's ws mode (one child for every client, string
    ids turned into null) gives some, which shows the detector sees them."""
    rows = result["rows"]
    assert isinstance(rows, list) and rows
    for row in rows:
        counts = [row["seq"], row["probe"], *(v for v in row["levels"].values() if "wrong" in v)]
        wrong = sum(c["wrong"] for c in counts)
        if row["target"] == "sg-ws":
            assert wrong > 0, row
        elif not row["target"].startswith("sg-"):
            assert wrong == 0, row
            assert sum(c.get("ok", 0) for c in counts) > 0, row
            # the progress probe's notifications reach the session that asked for them
            assert row["probe"]["own_progress"] > 0, row
