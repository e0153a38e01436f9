from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from mcproxy import config
from mcproxy.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def test_example_file_lists_every_key_with_its_default() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    defaults = msgspec.json.decode(msgspec.json.encode(config.Config()))
    assert example == defaults
    assert config.load(str(EXAMPLE)) == config.Config()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nlisen = '1'\n", "lisen"),
        ("[server]\nlisten = 'nope'\n", "HOST:PORT"),
        ("[limits]\nmax_message_bytes = 0\n", r"limits.max_message_bytes: Expected `int` >= 1"),
        ("[server]\ndrain_timeout_s = -1\n", r"server.drain_timeout_s: Expected `float` >= 0"),
        ("[server]\ndrain_timeout_s = 3601\n", r"server.drain_timeout_s: Expected `float` <= 3600"),
        ("[server]\ndrain_timeout_s = 'soon'\n", r"server.drain_timeout_s: Expected `float`"),
        ("[store]\ndurability = 'sometimes'\n", "durability"),
        ("[upstream]\ntarget = 'ftp://x'\n", "stdio:"),
        ("[upstream]\ntarget = 'stdio:'\n", "needs a command"),
        ("[upstream]\ntarget = 'https://'\n", "has no host"),
        ("[upstream]\ntarget = 'http://h:99999/mcp'\n", "bad URL"),
        ("[upstream]\ntarget = 'https://u:secret@h/mcp'\n", "no credentials in the URL"),
        ("[upstream]\nheaders = {Authorization = 'Bearer x'}\n", "bearer_token_env"),
        ("[upstream]\nheaders = {'Mcp-Session-Id' = 'x'}\n", "mcproxy sets it"),
        ("[upstream]\nheaders = {'bad name' = 'x'}\n", "not a valid header name"),
        ('[upstream]\nheaders = {X-A = "a\\r\\nX-B: b"}\n', "line break"),
        ("[upstream]\nbearer_token_env = 'A'\nbearer_token_file = '/f'\n", "not both"),
        ("[upstream]\nread_timeout_s = 0\n", r"upstream.read_timeout_s: .* > 0"),
        ("[upstream]\nconnect_timeout_s = -1\n", r"upstream.connect_timeout_s: .* > 0"),
        ("[upstream]\nsse_max_reconnects = -1\n", r"upstream.sse_max_reconnects: .* >= 0"),
        ("[upstream]\nmax_in_flight = -1\n", r"upstream.max_in_flight: .* >= 0"),
        ("[upstream]\nstdin_close_grace_s = -5\n", r"upstream.stdin_close_grace_s: .* >= 0"),
        ("[upstream]\nsigterm_grace_s = -1\n", r"upstream.sigterm_grace_s: .* >= 0"),
        ("[upstream]\nrespawn_stable_s = -3\n", r"upstream.respawn_stable_s: .* >= 0"),
        ("[upstream]\nmax_queued_bytes = 0\n", r"upstream.max_queued_bytes: .* >= 1"),
        ("[upstream]\nmax_live_upstreams = 0\n", r"upstream.max_live_upstreams: .* >= 1"),
        ("[upstream]\nmax_live_upstreams = 2\n", "must not exceed"),
        ("[upstream]\nenv = {'A=B' = 'x'}\n", "not a valid variable"),
        ("[upstream]\nenv_passthrough = ['A*B']\n", "not a variable name"),
        ("[auth]\ntokens_env = 'T'\n[upstream]\nenv = {T = 'x'}\n", "never given to the child"),
        ("[server]\nsse_retry_ms = 0\n", r"server.sse_retry_ms: .* >= 1"),
        ("[sessions]\npark_after_s = 0\n", r"sessions.park_after_s: .* > 0"),
        ("[upstream]\ntls_verify = 'no'\n", "tls_verify"),
        ("[server\n", "config.toml"),
    ],
)
def test_invalid_configs_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(str(path))


def _numeric(info: msgspec.inspect.Type) -> bool:
    return isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType)


def test_every_numeric_key_carries_its_bound_on_the_record() -> None:
    # Issue 16 item 9: the bounds are msgspec constraints on the fields themselves, so a new
    # key cannot be added without one (a hand-kept table of checks drifted from the fields).
    root = msgspec.inspect.type_info(config.Config)
    assert isinstance(root, msgspec.inspect.StructType)
    seen = 0
    for section in root.fields:
        info = section.type
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            if not _numeric(field.type):
                continue
            seen += 1
            kind = field.type
            assert isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType)
            assert kind.ge is not None or kind.gt is not None, (
                f"{section.name}.{field.name} has no lower bound"
            )
    # Every default satisfies its own bound.
    defaults = msgspec.json.decode(msgspec.json.encode(config.Config()))
    assert msgspec.convert(defaults, config.Config) == config.Config()
    assert seen > 30


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("upstream.stdin_close_grace_s", "-5"),
        ("upstream.sigterm_grace_s", "-1"),
        ("upstream.respawn_stable_s", "-3"),
        ("upstream.pool_size", "0"),
        ("limits.bind_timeout_s", "0"),
        ("server.drain_timeout_s", "-0.5"),
    ],
)
def test_check_config_refuses_values_out_of_bounds(tmp_path: Path, key: str, value: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")
    done = subprocess.run(
        [sys.executable, "-m", "mcproxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert key in done.stderr and ">" in done.stderr, done.stderr


def test_drain_timeout_bounds() -> None:
    """0 is allowed (no drain: the stop of earlier versions), and so is the hour at most."""
    assert config.Config().server.drain_timeout_s == config.DEFAULT_DRAIN_TIMEOUT_S
    for edge in (0, config.MAX_DRAIN_TIMEOUT_S):
        cfg = config.load(None, {"server": {"drain_timeout_s": edge}})
        assert cfg.server.drain_timeout_s == edge
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        config.load(None, {"server": {"drain_timeout_s": config.MAX_DRAIN_TIMEOUT_S + 1}})


def test_overrides_and_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = config.load(None, {"upstream": {"target": "stdio:python -m x 'a b'"}})
    assert config.parse_target(cfg.upstream.target).argv == ("python", "-m", "x", "a b")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert config.db_path(cfg) == tmp_path / "mcproxy.db"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert config.db_path(cfg) == tmp_path / "xdg" / "mcproxy" / "mcproxy.db"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"server": {"listen": 1}}, config.Config)


def test_http_targets() -> None:
    cfg = config.load(
        None,
        {
            "upstream": {
                "target": "https://mcp.example.com:8443/mcp?tenant=a",
                "headers": {"X-Tenant": "a"},
            }
        },
    )
    assert config.parse_target(cfg.upstream.target) == config.HttpTarget(
        "https://mcp.example.com:8443/mcp?tenant=a"
    )
    assert cfg.upstream.headers == {"X-Tenant": "a"}
    assert cfg.upstream.tls_verify is True  # on unless switched off
    assert isinstance(config.parse_target("http://127.0.0.1:9/mcp"), config.HttpTarget)
