"""Credential redaction of log lines (mcproxy.log.redact), on the shapes they arrive in."""

from __future__ import annotations

from mcproxy.log import REDACTED, redact, redact_processor

TOKEN = "alice-token-0123456789abcdef"


def test_credentials_are_redacted_wherever_they_are_quoted() -> None:
    shapes = [
        f"b'Authorization: Bearer {TOKEN}\\x01'",  # aiohttp's parser error, a repr
        f"b'POST /mcp HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: {TOKEN}\\x01'",
        f"Bearer {TOKEN}",
        f"authorization={TOKEN}",
        f"b'Cookie: mcp_session_id={TOKEN}\\x7f'",
        f"Sec-WebSocket-Protocol: mcp, mcp.auth.{TOKEN}",
        f"Proxy-Authorization: Basic {TOKEN}",
    ]
    for text in shapes:
        out = redact(text)
        assert TOKEN not in out and REDACTED in out, (text, out)
    # Prose about tokens stays readable.
    assert redact("a valid bearer token is required") == "a valid bearer token is required"
    assert redact("repeated Authorization header") == "repeated Authorization header"


def test_the_processor_scrubs_nested_values() -> None:
    event = {
        "event": "x",
        "exception": [{"exc_value": f"Bearer {TOKEN}", "frames": [{"name": "f"}]}],
        "raw": f"Cookie: {TOKEN}".encode(),
        "count": 3,
    }
    out = redact_processor(None, "error", event)
    assert TOKEN not in repr(out) and out["count"] == 3
