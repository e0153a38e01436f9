"""Host/Origin policy and the rate limiters, with the clock passed in."""

from __future__ import annotations

from mcproxy.core.guard import (
    AddressLimiter,
    Authority,
    HostPolicy,
    TokenBucket,
    parse_authority,
    parse_origin,
)


def h(host: str | None = None, origin: str | None = None) -> dict[str, list[str]]:
    """The header values a front hands the guard."""
    return {"host": [] if host is None else [host], "origin": [] if origin is None else [origin]}


def test_host_and_origin_policy() -> None:
    policy = HostPolicy(("localhost", "127.0.0.1", "[::1]"), ("https://app.example.com",), "::")
    assert policy.check("/mcp", h("127.0.0.1:8765")) is None
    assert policy.check("/mcp", h("[::1]:80", "http://localhost:3000")) is None
    assert policy.check("/mcp", h("LOCALHOST", "https://app.example.com/")) is None
    refused = policy.check("/mcp", h("evil.example.com"))
    assert refused is not None and refused.status == 421
    refused = policy.check("/mcp", h("localhost:1", "http://evil.example.com"))
    assert refused is not None and refused.status == 403
    assert policy.check("/mcp", h("localhost", "null")) is not None
    specific = HostPolicy((), (), "10.0.0.5")
    assert specific.check("/mcp", h("10.0.0.5:8765")) is None
    anything = HostPolicy(("*",), (), "0.0.0.0")
    assert anything.check("/", h("whatever")) is None
    assert anything.check("/", h("whatever", "http://whatever")) is not None  # Origins still


def test_authority_parser_is_strict() -> None:
    assert parse_authority("LocalHost:8765") == Authority("localhost", 8765)
    assert parse_authority("[::1]") == Authority("[::1]", None)
    assert parse_authority("[::1]:80") == Authority("[::1]", 80)
    for bad in (
        "[::1]evil",  # was read as [::1]
        "[::1]:80evil",
        "[evil]",
        "[::1",
        "localhost:1@evil.com",  # user information
        "user@localhost",
        "localhost:",
        "localhost:99999",
        "localhost:8x",
        "local host",
        "localhost/path",
        "",
        "::1",  # an IPv6 address must be bracketed
    ):
        assert parse_authority(bad) is None, bad
    assert parse_origin("http://localhost:3000") == ("http", Authority("localhost", 3000))
    for bad in ("http://localhost:1@evil.com", "null", "localhost", "http://[::1]evil", "http://"):
        assert parse_origin(bad) is None, bad


def test_header_edge_cases_are_refused() -> None:
    policy = HostPolicy(("localhost", "127.0.0.1", "[::1]"), (), "127.0.0.1")
    cases = {
        "malformed host": ("/mcp", h("[::1]evil"), 400),
        "userinfo origin": ("/mcp", h("localhost", "http://localhost:1@evil.com"), 403),
        "no host (HTTP/1.0)": ("/mcp", h(), 400),
        "absolute form, other host": ("http://evil.com/mcp", h("localhost"), 400),
        "absolute form, other port": ("http://localhost:1/mcp", h("localhost:2"), 400),
        "absolute form, garbage": ("evil.com/mcp", h("localhost"), 400),
        "two hosts": ("/mcp", {"host": ["localhost", "evil"]}, 400),
        "two origins": (
            "/mcp",
            h("localhost") | {"origin": ["http://localhost", "http://evil.com"]},
            400,
        ),
        "two authorizations": ("/mcp", h("localhost") | {"authorization": ["Bearer a", "b"]}, 400),
    }
    for name, (target, headers, status) in cases.items():
        refused = policy.check(target, headers)
        assert refused is not None and refused.status == status, name
    assert policy.check("http://LOCALHOST:8765/mcp?x=1", h("localhost:8765")) is None
    assert policy.check("/mcp", h("localhost") | {"authorization": ["Bearer a"]}) is None
    # "*" allows any name, never a malformed one.
    anything = HostPolicy(("*",), ("*",), "0.0.0.0")
    refused = anything.check("/mcp", h("[::1]evil"))
    assert refused is not None and refused.status == 400


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False  # 0.8 of a token
    assert bucket.take(0.5) is True
    assert bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0)
    assert not bucket.take(100.0)  # never more than the burst


def test_address_limiter_is_per_address_and_bounded() -> None:
    limiter = AddressLimiter(rate=1.0, burst=1, max_addresses=2)
    assert limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0)  # "a" is forgotten to make room
    assert limiter.allow("a", 0.0)
