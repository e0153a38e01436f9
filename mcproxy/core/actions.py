"""What the session state machine asks its I/O driver to do: the actions.

``Session`` (``core.session``) answers each event with a list of these, in order; the driver
(``engine.runner``) carries them out: write to the upstream, append to the log and deliver,
persist or retire a request row, start or restart the upstream, count. Plain frozen data, so
a test reads a session's decisions without an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcproxy.core.jsonrpc import RequestId


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Write one message to the upstream, in order with every earlier ``SendUpstream``.

    ``durable``: first wait until every store write issued before it has committed. Set for
    requests that are not safe to repeat, so that one the upstream may act on is always on
    record; a safe request may race its record (repeating it is harmless by definition).
    """

    data: bytes
    durable: bool = False


@dataclass(frozen=True, slots=True)
class Emit:
    """Append to the session's log under ``lsn``, then deliver to the attached client.

    ``stream`` says which Streamable HTTP stream the message belongs to: the stream of the
    client request it relates to, or ``GENERAL_STREAM`` (see ``Session._route``). A WebSocket
    connection receives every stream.
    """

    lsn: int
    data: bytes
    stream: int = 0
    # The (client key, method) of the request this message answers: logged with it, so a
    # retry of that id after a restart still finds its answer (``Session._retry``).
    answers: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the connection that sent the message; not logged (it is about that connection)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Resend:
    """Send the logged message ``lsn`` again to the current connection (a retried request)."""

    lsn: int


@dataclass(frozen=True, slots=True)
class SaveRequest:
    """Persist an in-flight client request (insert or update; keyed by the client id)."""

    key: str
    upstream_id: int
    method: str
    safe: bool
    body: bytes
    stream: int
    # False: certainly not written to any upstream process yet (queued for one that is
    # starting). A restart sends such a request to the next process instead of answering it
    # "outcome unknown".
    written: bool = True


@dataclass(frozen=True, slots=True)
class MarkWritten:
    """Record whether the request ``key`` may have reached an upstream process. ``True`` is
    recorded before the request is written (the ``SendUpstream`` after it waits for the
    commit if the request is not safe to repeat), so the record never says "not written"
    about a request that was."""

    key: str
    written: bool


@dataclass(frozen=True, slots=True)
class FinishRequest:
    """The request is answered (``lsn`` of the response) or cancelled (``lsn`` None).

    Either way its ``stream`` carries nothing more: an HTTP response stream ends here.
    """

    key: str
    lsn: int | None
    stream: int
    # (key, answer LSN or None) of the requests that fell out of the dedupe window with this
    # one: what the store kept for their retries goes too, so it keeps about
    # ``dedupe_window`` answered requests per session, not all.
    forget: tuple[tuple[str, int | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop what the store keeps for retries of these (key, answer LSN or None) pairs: they
    fell out of the dedupe window while the session was restored."""

    pairs: tuple[tuple[str, int | None], ...]


@dataclass(frozen=True, slots=True)
class Dropped:
    """A client message that reached no one (an answer to a server request that was withdrawn,
    answered already, or never made): the driver logs it, so a client bug is visible."""

    reason: str
    request_id: RequestId | None


@dataclass(frozen=True, slots=True)
class SaveSession:
    """Persist ``Session.snapshot()``."""


@dataclass(frozen=True, slots=True)
class StartUpstream:
    """Spawn the upstream (with the driver's backoff) if it is not running."""


@dataclass(frozen=True, slots=True)
class RestartUpstream:
    """The upstream misbehaved: stop it, then treat it as lost."""

    reason: str


@dataclass(frozen=True, slots=True)
class Tally:
    """Something worth counting happened (the driver feeds its metrics): ``deduplicated``,
    ``reissued``, ``outcome_unknown``, or ``error`` with the JSON-RPC ``code`` answered."""

    name: str
    code: int = 0


Action = (
    SendUpstream
    | Emit
    | Reply
    | Resend
    | SaveRequest
    | MarkWritten
    | FinishRequest
    | Forget
    | Dropped
    | SaveSession
    | StartUpstream
    | RestartUpstream
    | Tally
)
