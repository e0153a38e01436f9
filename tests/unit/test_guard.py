"""Host/Origin policy and the rate limiters, with the clock passed in."""

from __future__ import annotations

from mcproxy.core.guard import AddressLimiter, HostPolicy, TokenBucket


def test_host_and_origin_policy() -> None:
    policy = HostPolicy(("localhost", "127.0.0.1", "[::1]"), ("https://app.example.com",), "::")
    assert policy.check("127.0.0.1:8765", None) is None
    assert policy.check("[::1]:80", "http://localhost:3000") is None
    assert policy.check("localhost", "https://app.example.com/") is None
    refused = policy.check("evil.example.com", None)
    assert refused is not None and refused.status == 421
    refused = policy.check("localhost:1", "http://evil.example.com")
    assert refused is not None and refused.status == 403
    assert policy.check("localhost", "null") is not None
    assert policy.check(None, None) is not None
    specific = HostPolicy((), (), "10.0.0.5")
    assert specific.check("10.0.0.5:8765", None) is None
    anything = HostPolicy(("*",), (), "0.0.0.0")
    assert anything.check("whatever", None) is None
    assert anything.check("whatever", "http://whatever") is not None  # Origins still checked


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
