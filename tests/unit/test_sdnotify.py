"""sd_notify and socket activation against real sockets: the exact datagrams systemd would
read, abstract addresses, failures that must not raise or block, and passed listeners."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcproxy.errors import ConfigError
from mcproxy.ops import sdnotify
from mcproxy.ops.sdnotify import Notifier, listen_fds, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def notifier(receiver: tuple[socket.socket, str]) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": receiver[1]})
    yield n
    n.close()


def recv(receiver: tuple[socket.socket, str]) -> bytes:
    return receiver[0].recv(4096)


# --- Notifier --------------------------------------------------------------------------------


def test_ready_with_status_is_one_datagram(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    assert notifier.enabled
    assert notifier.ready("listening on 127.0.0.1:8765")
    assert recv(receiver) == b"READY=1\nSTATUS=listening on 127.0.0.1:8765"


def test_each_message_is_exact(notifier: Notifier, receiver: tuple[socket.socket, str]) -> None:
    assert notifier.ready()
    assert recv(receiver) == b"READY=1"
    assert notifier.status("3 sessions")
    assert recv(receiver) == b"STATUS=3 sessions"
    assert notifier.watchdog()
    assert recv(receiver) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert recv(receiver) == b"STOPPING=1"
    assert notifier.stopping("draining")
    assert recv(receiver) == b"STOPPING=1\nSTATUS=draining"
    assert notifier.extend_timeout(1.5)
    assert recv(receiver) == b"EXTEND_TIMEOUT_USEC=1500000"


def test_reloading_carries_a_monotonic_timestamp(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    assert notifier.reloading()
    first, stamp = recv(receiver).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = stamp.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert int(value) > 0


def test_status_text_cannot_inject_assignments(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    assert notifier.status("line one\nREADY=1")
    assert recv(receiver) == b"STATUS=line one READY=1"


def test_status_is_utf8(notifier: Notifier, receiver: tuple[socket.socket, str]) -> None:
    assert notifier.status("prêt ✓")
    assert recv(receiver) == "STATUS=prêt ✓".encode()


def test_abstract_namespace_address() -> None:
    name = f"mcproxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        try:
            assert notifier.ready("ok")
            assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
        finally:
            notifier.close()


@pytest.mark.parametrize("value", [None, "", "relative/path.sock", "vsock:2:1234"])
def test_without_a_usable_socket_every_call_is_a_noop(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "30000000"}
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None  # nobody to ping
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert not notifier.reloading()
    assert not notifier.extend_timeout(5)
    notifier.close()


def test_send_to_a_vanished_receiver_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    sock.close()  # ECONNREFUSED
    assert not notifier.ready()
    path.unlink()  # ENOENT
    assert not notifier.watchdog()
    notifier.close()


def test_a_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    # Nobody reads the receiver: once its queue is full, sends fail at once with EAGAIN.
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver[1]})
    payload = "x" * 8192
    results = [notifier.status(payload) for _ in range(10_000)]
    assert results[0] is True
    assert False in results
    notifier.close()


def test_close_is_idempotent_and_later_sends_are_noops(notifier: Notifier) -> None:
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready()


def test_from_env_reads_the_watchdog(receiver: tuple[socket.socket, str]) -> None:
    env = {"NOTIFY_SOCKET": receiver[1], "WATCHDOG_USEC": "30000000"}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval_s == 15.0
    notifier.close()
    assert notifier.watchdog_interval_s is None


def test_unset_environment_hides_systemd_from_children(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver[1])
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(os.environ, unset_environment=True)
    for name in sdnotify.NOTIFY_ENV:
        assert name not in os.environ
    # The notifier keeps what it read.
    assert notifier.watchdog_interval_s == 10.0
    assert notifier.ready()
    assert recv(receiver) == b"READY=1"
    notifier.close()


def test_environment_is_kept_by_default(receiver: tuple[socket.socket, str]) -> None:
    env = {"NOTIFY_SOCKET": receiver[1]}
    Notifier.from_env(env).close()
    assert env == {"NOTIFY_SOCKET": receiver[1]}


# --- watchdog_interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


# --- listen_fds --------------------------------------------------------------------------------


def free_fds(count: int, start: int = 50) -> int:
    """The first of ``count`` consecutive unused descriptors at or above ``start``."""
    base = start
    while True:
        for fd in range(base, base + count):
            try:
                os.fstat(fd)
            except OSError:
                continue
            base = fd + 1
            break
        else:
            return base


def pass_fds(socks: list[socket.socket]) -> int:
    """Put copies of ``socks`` on consecutive descriptors, as systemd does from fd 3."""
    base = free_fds(len(socks))
    for offset, sock in enumerate(socks):
        os.dup2(sock.fileno(), base + offset)  # inheritable, like systemd's
    return base


def activation_env(count: int, pid: int | None = None) -> dict[str, str]:
    return {
        "LISTEN_PID": str(os.getpid() if pid is None else pid),
        "LISTEN_FDS": str(count),
        "LISTEN_FDNAMES": ":".join(["mcproxy"] * count),
    }


def listener(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.listen()
    return sock


def test_passed_listeners_accept_connections() -> None:
    originals = [listener(), listener()]
    base = pass_fds(originals)
    env = activation_env(2)
    socks = listen_fds(env, start_fd=base)
    try:
        assert [s.fileno() for s in socks] == [base, base + 1]
        for sock, original in zip(socks, originals, strict=True):
            assert sock.family == socket.AF_INET
            assert sock.type == socket.SOCK_STREAM
            assert not sock.getblocking()
            assert not os.get_inheritable(sock.fileno())  # the upstream servers never get it
            assert sock.getsockname() == original.getsockname()
            with socket.create_connection(original.getsockname(), timeout=2.0) as client:
                sock.settimeout(2.0)
                conn, _ = sock.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
        assert env == {}  # consumed, as sd_listen_fds(unset_environment=1)
    finally:
        for sock in socks + originals:
            sock.close()


def test_unset_environment_applies_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in activation_env(1, pid=os.getpid() + 1).items():
        monkeypatch.setenv(name, value)
    assert listen_fds(os.environ) == []  # meant for another process
    for name in sdnotify.LISTEN_ENV:
        assert name not in os.environ


def test_environment_can_be_kept() -> None:
    env = activation_env(1, pid=os.getpid() + 1)
    assert listen_fds(env, unset_environment=False) == []
    assert env == activation_env(1, pid=os.getpid() + 1)


@pytest.mark.parametrize(
    "env",
    [
        {},
        activation_env(1, pid=os.getpid() + 1),
        activation_env(0),
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"},
        {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
    ],
)
def test_not_activated(env: dict[str, str]) -> None:
    # The descriptors are never touched: fd 3 may well be pytest's own.
    assert listen_fds(env) == []
    assert not set(env) & set(sdnotify.LISTEN_ENV)


def test_ipv6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        original = listener(socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    base = pass_fds([original])
    socks = listen_fds(activation_env(1), start_fd=base)
    try:
        assert [s.family for s in socks] == [socket.AF_INET6]
    finally:
        for sock in [*socks, original]:
            sock.close()


def test_a_datagram_socket_is_refused() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    base = pass_fds([udp])
    with pytest.raises(ConfigError, match="not a listening stream socket"):
        listen_fds(activation_env(1), start_fd=base)
    assert_closed(base)
    udp.close()


def test_a_connected_socket_is_refused() -> None:
    # What Accept=yes would pass: one connection, not a listener.
    server = listener()
    client = socket.create_connection(server.getsockname())
    base = pass_fds([client])
    with pytest.raises(ConfigError, match="Accept=no"):
        listen_fds(activation_env(1), start_fd=base)
    assert_closed(base)
    client.close()
    server.close()


def test_a_bad_descriptor_closes_the_good_ones(tmp_path: Path) -> None:
    good = listener()
    base = free_fds(2)
    os.dup2(good.fileno(), base)
    with open(tmp_path / "file", "w") as fh:
        os.dup2(fh.fileno(), base + 1)  # a file, not a socket: ENOTSOCK
    try:
        with pytest.raises(ConfigError, match=f"fd {base + 1}"):
            listen_fds(activation_env(2), start_fd=base)
        assert_closed(base)
    finally:
        os.close(base + 1)
        good.close()


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError):
        os.fstat(fd)
