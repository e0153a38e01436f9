from __future__ import annotations

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
        ("[limits]\nmax_message_bytes = 0\n", "positive"),
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
        ("[upstream]\nread_timeout_s = 0\n", "positive"),
        ("[upstream]\nconnect_timeout_s = -1\n", "positive"),
        ("[upstream]\nsse_max_reconnects = -1\n", "must not be negative"),
        ("[upstream]\nmax_in_flight = -1\n", "must not be negative"),
        ("[upstream]\ntls_verify = 'no'\n", "tls_verify"),
        ("[server\n", "config.toml"),
    ],
)
def test_invalid_configs_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(str(path))


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
