"""Fleet session ids (docs/DEPLOY.md): minted ids name their instance; an instance never
creates a session under an id that names another instance or none."""

from __future__ import annotations

import pytest

from mcproxy import config
from mcproxy.core.ids import (
    SESSION_ID_MAX,
    instance_of,
    mint_session_id,
    misdirected,
    valid_session_id,
)
from mcproxy.errors import ConfigError


def test_minted_ids_carry_the_instance_and_stay_valid() -> None:
    assert instance_of(mint_session_id()) is None  # token_urlsafe has no "."
    longest = "x" * config.INSTANCE_NAME_MAX
    sid = mint_session_id(longest)
    assert sid.startswith(longest + ".") and instance_of(sid) == longest
    assert valid_session_id(sid) and len(sid) <= SESSION_ID_MAX
    assert mint_session_id("a") != mint_session_id("a")


def test_an_instance_creates_only_under_its_own_name() -> None:
    assert misdirected("b.abcdefghijklmnopqrstuvwxyz", "") is None  # a single instance
    assert misdirected("a.abcdefghijklmnopqrstuvwxyz", "a") is None
    assert "instance 'b'" in (misdirected("b.abcdefghijklmnopqrstuvwxyz", "a") or "")
    assert misdirected("abcdefghijklmnopqrstuvwxyz", "a") is not None
    assert misdirected(".abcdefghijklmnopqrstuvwxyz", "a") is not None


@pytest.mark.parametrize("name", ["a.b", "x" * 33, "é", "a b", "a/b"])
def test_instance_names_are_checked(name: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.instance"):
        config.load(overrides={"server": {"instance": name}})


def test_a_good_instance_name_loads() -> None:
    assert config.load(overrides={"server": {"instance": "mcp-a_1"}}).server.instance == "mcp-a_1"
