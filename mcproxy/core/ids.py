"""Session ids: minting, validation, the instance a fleet id names, and the short form logs use.

MCP transports §Session Management: an id is visible ASCII (0x21-0x7E) and unguessable; the
SEP asks for at least 128 bits. mcproxy bounds the length too. In a fleet (docs/DEPLOY.md) a
minted id starts with the instance's name, so a load balancer routes on it with a static rule.
"""

from __future__ import annotations

import secrets
from typing import Final

SESSION_ID_MIN: Final = 16
SESSION_ID_MAX: Final = 128
SHORT_ID_CHARS: Final = 8  # logs carry this much of an id: enough to follow, not to use

SESSION_ID_BYTES: Final = 24  # 192 bits from the CSPRNG (SEP: >= 128), 32 url-safe chars


INSTANCE_SEPARATOR: Final = "."  # never in token_urlsafe's alphabet, nor in an instance name


def mint_session_id(instance: str = "") -> str:
    """192 random bits; in a fleet prefixed ``<instance>.`` so a load balancer can route on
    the id with a static rule (docs/DEPLOY.md, docs/PROTOCOL.md *Sessions*)."""
    token = secrets.token_urlsafe(SESSION_ID_BYTES)
    return f"{instance}{INSTANCE_SEPARATOR}{token}" if instance else token


def instance_of(session_id: str) -> str | None:
    """The instance an id names (the part before the first "."), None if it names none."""
    owner, dot, _ = session_id.partition(INSTANCE_SEPARATOR)
    return owner if dot and owner else None


def misdirected(session_id: str, instance: str) -> str | None:
    """Why an instance named ``instance`` must not create or serve a session under this id it
    does not hold (None: it may). Asked only after the id was not found in this instance's own
    database, so sessions it holds from before it had a name are still served; it never
    creates a twin of a session that lives on another instance."""
    if not instance:
        return None  # a single instance: any well-formed id is its to create (SEP draft v0)
    owner = instance_of(session_id)
    if owner == instance:
        return None
    if owner is None:
        return f"this fleet's session ids start with an instance name; this is {instance!r}"
    return f"session belongs to instance {owner!r}, not {instance!r}"


def valid_session_id(value: str) -> bool:
    """MCP transports §Session Management: visible ASCII (0x21-0x7E); we also bound length."""
    return SESSION_ID_MIN <= len(value) <= SESSION_ID_MAX and all(
        0x21 <= ord(c) <= 0x7E for c in value
    )


def short_id(session_id: str) -> str:
    """What the log shows of a session id: a prefix to follow it by, never the bearer secret."""
    return session_id[:SHORT_ID_CHARS] + "…"
