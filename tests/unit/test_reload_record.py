"""The reload handover record (ops/reload.py): what crosses execve, and its checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest

from mcproxy.core.framing import LineFramer
from mcproxy.errors import ReloadFailed
from mcproxy.ops import reload
from mcproxy.ops.reload import HANDOVER_ENV, RECORD_VERSION, Handover, KeptChild
from mcproxy.upstreams.shared_router import Router


def record(**changes: object) -> Handover:
    base = Handover(
        RECORD_VERSION,
        os.getpid(),
        3,
        [5, 6],
        [KeptChild("anon/abc", 1234, 7, 8, 9, b'{"jsonrpc":"2.0","id":3,"res\xff')],
    )
    return msgspec.structs.replace(base, **changes)


def test_round_trip_keeps_every_field_and_the_unread_bytes_exactly() -> None:
    original = record()
    decoded = reload.decode_record(reload.encode_record(original))
    assert decoded == original
    assert decoded.children[0].handed_over().unread.endswith(b"\xff")  # not text: bytes
    assert decoded.descriptors() == [5, 6, 7, 8, 9]


def test_the_shared_pool_section_round_trips_and_an_older_record_has_none() -> None:
    tables = Router(2).snapshot()
    pool = reload.KeptPool(
        reload.POOL_VERSION,
        [reload.KeptPoolChild(1, 4321, 10, 11, 12, b'{"id":')],
        msgspec.Raw(tables),
        {"anon/abc": 7},
    )
    decoded = reload.decode_record(reload.encode_record(record(pool=pool)))
    assert decoded.pool is not None
    assert bytes(decoded.pool.router) == tables  # opaque here: the router reads it
    assert decoded.pool.children[0].handed_over().unread == b'{"id":'
    assert decoded.pool.sessions == {"anon/abc": 7}
    assert decoded.descriptors() == [5, 6, 7, 8, 9, 10, 11, 12]
    older = msgspec.json.encode({"version": 1, "pid": os.getpid(), "reloads": 1})
    assert reload.decode_record(older).pool is None  # its pool was stopped before exec


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (reload.encode_record(record(version=RECORD_VERSION + 1)), "version"),
        (reload.encode_record(record(pid=os.getpid() + 1)), "pid"),
        (b'{"version": 1, "pid": 1, "reloads": 0, "extra": 1}', "extra"),
        (b"not json", "record"),
    ],
)
def test_a_record_not_of_this_version_or_process_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ReloadFailed, match=why):
        reload.decode_record(data)


def test_the_record_file_is_private_and_taken_once(tmp_path: Path) -> None:
    path = reload.write_record(tmp_path, record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    environ = {HANDOVER_ENV: str(path)}
    assert reload.take_record(environ) == record()
    assert not path.exists() and HANDOVER_ENV not in environ  # children never see it
    assert reload.take_record(environ) is None


def test_an_unreadable_record_fails_the_reload(tmp_path: Path) -> None:
    with pytest.raises(ReloadFailed, match="handover"):
        reload.take_record({HANDOVER_ENV: str(tmp_path / "gone.json")})


def test_the_next_program_runs_with_the_same_options() -> None:
    argv = ["--config", "x.toml", "--listen", "127.0.0.1:1"]
    assert reload.check_argv(argv)[-6:] == ["mcproxy", "check-config", *argv]
    assert reload.program_argv(argv)[1:] == ["-m", "mcproxy", *argv]


def test_the_framer_hands_over_an_unfinished_line() -> None:
    framer = LineFramer(100)
    assert framer.feed(b'{"a":1}\n{"b":') == [b'{"a":1}']
    assert framer.take_partial() == b'{"b":'
    assert framer.pending == 0
    assert framer.feed(b"2}\n") == [b"2}"]  # what follows is the next program's
