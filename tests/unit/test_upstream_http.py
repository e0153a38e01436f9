"""The HTTP upstream's credentials and TLS settings, resolved at daemon start."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mcproxy.config import UpstreamConfig
from mcproxy.errors import ConfigError, UpstreamError
from mcproxy.upstreams.http import HttpOptions

URL = "https://mcp.example.com/mcp"


def options(env: dict[str, str] | None = None, **config: object) -> HttpOptions:
    return HttpOptions.from_config(URL, UpstreamConfig(**config), env or {})  # type: ignore[arg-type]


def test_static_headers_and_a_token_from_the_environment() -> None:
    opts = options({"TOKEN": " abc.def \n"}, headers={"X-Tenant": "a"}, bearer_token_env="TOKEN")
    headers = opts.session_headers()
    assert headers["Authorization"] == "Bearer abc.def"  # surrounding whitespace dropped
    assert headers["X-Tenant"] == "a" and headers["User-Agent"].startswith("mcproxy/")
    assert opts.ssl is True  # verified against the system trust store
    assert "Authorization" not in options().session_headers()


@pytest.mark.parametrize(
    ("env", "fragment"),
    [({}, "TOKEN is not set"), ({"TOKEN": "  "}, "is empty"), ({"TOKEN": "a\nb"}, "one line")],
)
def test_a_missing_or_bad_token_variable_stops_the_start(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        options(env, bearer_token_env="TOKEN")


def test_a_token_file_is_read_again_for_each_upstream_session(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(ConfigError, match="cannot read the bearer token file"):
        options(bearer_token_file=str(path))
    path.write_text("first\n")
    opts = options(bearer_token_file=str(path))
    assert opts.session_headers()["Authorization"] == "Bearer first"
    path.write_text("rotated\n")
    assert opts.session_headers()["Authorization"] == "Bearer rotated"
    path.unlink()
    with pytest.raises(UpstreamError, match="cannot read"):  # a start fails, not the daemon
        opts.session_headers()


def test_tls_settings(tmp_path: Path) -> None:
    assert options(tls_verify=False).ssl is False
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_ca_file"):
        options(tls_ca_file=str(bad))
    with pytest.raises(ConfigError, match="tls_ca_file"):
        options(tls_ca_file=str(tmp_path / "missing.pem"))
    default_ca = ssl.get_default_verify_paths().cafile
    if default_ca:
        context = options(tls_ca_file=default_ca).ssl
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
