"""The unit files in systemd/: parsed here everywhere, verified by systemd-analyze where it is
installed (on copies whose ExecStart names an existing binary, which verify insists on)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcproxy import config

UNITS = Path(__file__).resolve().parents[2] / "systemd"
UNIT_FILES = ("mcproxy.service", "mcproxy.socket", "mcproxy@.service", "mcproxy@.socket")
BINARY = "/usr/local/bin/mcproxy"

Unit = dict[str, list[tuple[str, str]]]


def parse(path: Path) -> Unit:
    """systemd.syntax(7): [Section] headers, Key=Value lines (keys may repeat), # and ;
    comments, a trailing backslash continues a value on the next line."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not an assignment: {raw!r}"
        assert re.fullmatch(r"[A-Za-z0-9]+", key.strip()), f"{path.name}:{number}: bad key"
        current.append((key.strip(), value.strip()))
    assert not pending, f"{path.name}: ends in a continuation"
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, (section, key, found)
    return found[0]


def seconds(value: str) -> float:
    """systemd.time(7) spans, the subset used here: '45', '45s', '1min 30s', '500ms'."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "ms": 0.001, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    return {name: parse(UNITS / name) for name in UNIT_FILES}


def test_every_unit_parses(units: dict[str, Unit]) -> None:
    for name, unit in units.items():
        kind = "Service" if name.endswith(".service") else "Socket"
        assert set(unit) == {"Unit", kind, "Install"}, name
        assert one(unit, "Unit", "Description")


@pytest.mark.parametrize("name", ["mcproxy.service", "mcproxy@.service"])
def test_service_is_notify_with_watchdog(units: dict[str, Unit], name: str) -> None:
    unit = units[name]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) == 30
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"  # cli.EXIT_CONFIG
    assert one(unit, "Service", "DynamicUser") == "yes"
    # systemctl reload: a reload in place (SIGHUP to mcproxy itself), not a restart.
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


@pytest.mark.parametrize("name", ["mcproxy.service", "mcproxy@.service"])
def test_stop_leaves_the_shutdown_ladder_to_mcproxy(units: dict[str, Unit], name: str) -> None:
    unit = units[name]
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # The drain, three steps bounded by shutdown_timeout_s (clients, upstreams, HTTP
    # cleanup), then the final commit: systemd must not SIGKILL a shutdown that is still
    # within its bounds (the drain also sends EXTEND_TIMEOUT_USEC, for longer drains).
    bound = config.DEFAULT_DRAIN_TIMEOUT_S + 3 * config.DEFAULT_SHUTDOWN_TIMEOUT_S
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > bound
    # The upstream stop ladder fits in one step.
    ladder = config.DEFAULT_STDIN_CLOSE_GRACE_S + config.DEFAULT_SIGTERM_GRACE_S
    assert ladder < config.DEFAULT_SHUTDOWN_TIMEOUT_S


@pytest.mark.parametrize("name", ["mcproxy.service", "mcproxy@.service"])
def test_service_is_hardened(units: dict[str, Unit], name: str) -> None:
    unit = units[name]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert one(unit, "Service", "ProtectHome") in {"yes", "read-only", "tmpfs"}
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Inherited by the MCP servers; JIT runtimes (Node) would crash under it.
    assert not values(unit, "Service", "MemoryDenyWriteExecute")


def test_single_service_paths(units: dict[str, Unit]) -> None:
    unit = units["mcproxy.service"]
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[:3] == [BINARY, "--config", "/etc/mcproxy/mcproxy.toml"]
    assert one(unit, "Service", "StateDirectory") == "mcproxy"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_template_service_selects_config_and_state_by_instance(units: dict[str, Unit]) -> None:
    unit = units["mcproxy@.service"]
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[:3] == [BINARY, "--config", "/etc/mcproxy/%i.toml"]
    assert one(unit, "Service", "StateDirectory") == "mcproxy/%i"
    assert one(unit, "Install", "Also") == "mcproxy@%i.socket"


def test_template_service_is_in_step_with_the_single_one(units: dict[str, Unit]) -> None:
    per_instance = {"ExecStart", "StateDirectory"}
    single = [kv for kv in units["mcproxy.service"]["Service"] if kv[0] not in per_instance]
    template = [kv for kv in units["mcproxy@.service"]["Service"] if kv[0] not in per_instance]
    assert template == single


def test_socket_listens_where_the_config_default_does(units: dict[str, Unit]) -> None:
    unit = units["mcproxy.socket"]
    assert values(unit, "Socket", "ListenStream") == [config.DEFAULT_LISTEN]
    assert one(unit, "Socket", "Accept") == "no"
    assert one(unit, "Install", "WantedBy") == "sockets.target"


def test_socket_template_leaves_the_port_to_a_drop_in(units: dict[str, Unit]) -> None:
    unit = units["mcproxy@.socket"]
    assert not values(unit, "Socket", "ListenStream")
    assert one(unit, "Socket", "Accept") == "no"
    text = (UNITS / "mcproxy@.socket").read_text()
    assert "systemctl edit mcproxy@" in text
    assert "ListenStream=" in text


# --- systemd-analyze verify --------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart names an existing binary, and the documented
    drop-in giving instance "demo" of the socket template its port."""
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(
            text.replace(f"ExecStart={BINARY} ", f"ExecStart={sys.executable} ")
        )
    dropin = tmp_path / "mcproxy@demo.socket.d"
    dropin.mkdir()
    (dropin / "listen.conf").write_text("[Socket]\nListenStream=127.0.0.1:8766\n")
    return tmp_path


def verify(unit_dir: Path, *names: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", *(str(unit_dir / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def complaints(result: subprocess.CompletedProcess[str]) -> list[str]:
    # verify exits 0 on unknown keys and unparsable values, reporting them only on stderr;
    # lines about other units on the host (dependencies) are not ours to judge.
    return [line for line in result.stderr.splitlines() if "mcproxy" in line]


@needs_analyze
@pytest.mark.parametrize(
    "names",
    [("mcproxy.service", "mcproxy.socket"), ("mcproxy@demo.service", "mcproxy@demo.socket")],
)
def test_systemd_analyze_verify(unit_dir: Path, names: tuple[str, ...]) -> None:
    result = verify(unit_dir, *names)
    assert result.returncode == 0, result.stderr
    assert complaints(result) == []


@needs_analyze
def test_socket_template_without_drop_in_is_refused(unit_dir: Path) -> None:
    result = verify(unit_dir, "mcproxy@nodropin.socket")
    assert result.returncode != 0
    assert "Listen" in result.stderr


@needs_analyze
def test_verify_catches_a_bad_setting(unit_dir: Path) -> None:
    # Guards the guard: a typo must show up in complaints().
    path = unit_dir / "mcproxy.service"
    path.write_text(path.read_text().replace("Type=notify", "Type=notfy"))
    assert complaints(verify(unit_dir, "mcproxy.service"))
