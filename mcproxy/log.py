"""structlog setup: JSON lines for journald and pipes, readable console output in a terminal.

Event names are fixed dotted strings (``session.attached``, ``upstream.lost``, ...) so logs can
be grepped and alerted on; variable data goes in key/value pairs. Session ids appear only
shortened (``core.ids.short_id``).

Every line on stderr goes through here, the libraries' too: the standard ``logging`` records
of aiohttp, asyncio and anything else reach the root logger, whose one handler renders them
with structlog (``ProcessorFormatter``), and the hooks for unraisable exceptions, thread
exceptions and warnings log too. So in JSON mode every stderr line is a JSON object, and an
exception is a structured ``exception`` field (structlog's ``dict_tracebacks``, without the
frames' local variables), never a
plain-text traceback between the lines.

Credentials never reach a line: the last step before rendering rewrites every string in the
event (exception messages and frames included) to hide bearer tokens, ``Authorization`` and
``Cookie`` values and ``mcp.auth.*`` subprotocols (aiohttp's parser errors quote the raw
header bytes of a malformed request, a token with a control character in it included).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, Final

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
REDACTED: Final = "[redacted]"
# What a credential looks like wherever it is quoted: a header line or its repr, a bearer
# value, the WebSocket subprotocol that carries a browser's token (docs/SECURITY.md).
_SECRETS: Final = (
    # A header and its value, up to the end of the line or the quote after it. No word
    # boundary before the name: in a repr of raw bytes it follows a literal "\\n".
    re.compile(
        r"(?i)((?:proxy-)?authorization|(?:set-)?cookie)(['\"]?\s*[:=,]\s*['\"]?)"
        r"[^\r\n'\"]*"
    ),
    # Tokens are at least 16 characters (core/auth.py): "bearer token" in prose stays.
    re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\",\\]{8,}"),
    re.compile(r"(?i)\b(mcp\.auth\.)()[^\s'\",\\]+"),
)


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``[redacted]``."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("latin-1"))
    if isinstance(value, Mapping):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact_processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the last one before the renderer (after the traceback is data)."""
    return {key: _scrub(value) for key, value in event.items()}


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog and the standard ``logging`` tree once per process (the CLI calls
    it before the daemon starts)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    if use_json:
        renderer: list[Any] = [
            # No local variables in the frames: they hold request bytes, tokens, payloads.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            redact_processor,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [redact_processor, structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The libraries' records: same renderer, same redaction, one JSON object per line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)  # the warnings Python shows anyway, as log lines
    std = logging.getLogger("mcproxy.python")
    # The interpreter's last-resort printers would write plain text: log instead.
    sys.unraisablehook = lambda u: std.error(
        "python.unraisable: %s",
        u.err_msg or "exception ignored",
        exc_info=(u.exc_type, u.exc_value, u.exc_traceback),  # type: ignore[arg-type]
    )
    threading.excepthook = lambda t: std.error(
        "python.thread_failed: %s",
        t.thread.name if t.thread else "?",
        exc_info=(t.exc_type, t.exc_value, t.exc_traceback),  # type: ignore[arg-type]
    )
