"""Bearer tokens → principals, for both fronts. Pure: the daemon reads the file or variable
and passes the text in; the fronts pass in what the client presented.

Token lines (docs/SECURITY.md), one per line, ``#`` comments and blank lines ignored:

    alice:2f9c...            a principal and its token, as given to the client
    bob:sha256:5e88...       a principal and the SHA-256 (hex) of its token: hashed at rest

A token is looked up by its SHA-256 digest, compared with ``hmac.compare_digest`` against every
entry (no early exit), so the time taken does not tell which entry, or how much of one,
matched. Tokens are never logged; principals are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Final

from mcproxy.errors import ConfigError

SUBPROTOCOL_PREFIX: Final = "mcp.auth."  # browsers cannot set headers on a WebSocket
ANONYMOUS: Final = "anonymous"  # the one principal when authentication is off
_MIN_TOKEN_CHARS: Final = 16


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    def __init__(self, entries: list[tuple[str, bytes]]) -> None:
        self.entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        """Raises ``ConfigError`` naming the line (never the token) for a malformed entry."""
        entries: list[tuple[str, bytes]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            principal, sep, secret = line.partition(":")
            if not sep or not principal or not secret:
                raise ConfigError(f"{source}:{number}: expected 'principal:token'")
            if secret.startswith("sha256:"):
                try:
                    hashed = bytes.fromhex(secret[len("sha256:") :])
                except ValueError:
                    hashed = b""
                if len(hashed) != hashlib.sha256().digest_size:
                    raise ConfigError(f"{source}:{number}: sha256: needs 64 hex digits")
                entries.append((principal, hashed))
            else:
                if len(secret) < _MIN_TOKEN_CHARS:
                    raise ConfigError(f"{source}:{number}: token shorter than {_MIN_TOKEN_CHARS}")
                entries.append((principal, digest(secret)))
        return cls(entries)

    def authenticate(self, authorization: str | None, subprotocols: str | None) -> str | None:
        """The principal of a request (``Authorization: Bearer``, else the WebSocket
        subprotocol form); ``ANONYMOUS`` when authentication is off; None if refused."""
        if not self.enabled:
            return ANONYMOUS
        return self.principal_for(bearer(authorization) or from_subprotocols(subprotocols))

    def principal_for(self, token: str | None) -> str | None:
        """The principal a token belongs to; None if it is absent or unknown."""
        if token is None:
            return None
        presented = digest(token)
        found: str | None = None
        for principal, hashed in self.entries:
            if hmac.compare_digest(presented, hashed) and found is None:
                found = principal
        return found


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def from_subprotocols(offered: str | None) -> str | None:
    """The token of an ``mcp.auth.<base64url>`` entry in Sec-WebSocket-Protocol."""
    if offered is None:
        return None
    for item in offered.split(","):
        name = item.strip()
        if name.startswith(SUBPROTOCOL_PREFIX):
            encoded = name[len(SUBPROTOCOL_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None
