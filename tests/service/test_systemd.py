"""sd_notify over a real unix datagram socket bound in tmp_path (and in the abstract namespace)."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from service import systemd
from service.systemd import Notifier, Watchdog, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd: yields (socket, NOTIFY_SOCKET value)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_in_order(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    env = {"NOTIFY_SOCKET": name}
    assert systemd.ready(env)
    assert systemd.status("annotating\n3 queued", env)
    assert systemd.watchdog_ping(env)
    assert systemd.stopping(env)
    assert systemd.notify("RELOADING=1", env)
    got = [recv(sock) for _ in range(5)]
    assert got[0].splitlines() == ["READY=1", f"MAINPID={os.getpid()}"]
    assert got[1:] == ["STATUS=annotating 3 queued", "WATCHDOG=1", "STOPPING=1", "RELOADING=1"]


def test_abstract_namespace_socket() -> None:
    name = f"annotator-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        assert Notifier("@" + name).ready()
        assert recv(sock).startswith("READY=1")


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_systemd_every_call_is_a_noop(env: dict[str, str]) -> None:
    assert not systemd.ready(env)
    assert not systemd.watchdog_ping(env)
    assert not Watchdog.from_environ({**env, "WATCHDOG_USEC": "1000000"}).start()


def test_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "nobody-listens")).ready()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_pings_only_while_healthy(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    healthy = {"ok": True}
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    dog = Watchdog.from_environ(env, healthy=lambda: healthy["ok"])
    assert dog.interval == 0.1
    assert dog.start()
    try:
        assert recv(sock) == "WATCHDOG=1"
        assert recv(sock) == "WATCHDOG=1"  # a second beat, half an interval later
        healthy["ok"] = False
        sock.settimeout(0.3)
        while True:  # drain a ping that was already on its way
            try:
                recv(sock)
            except TimeoutError:
                break
        with pytest.raises(TimeoutError):  # unhealthy: no pings for several periods
            recv(sock)
        healthy["ok"] = True
        sock.settimeout(5.0)
        assert recv(sock) == "WATCHDOG=1"
    finally:
        dog.stop()
    assert dog.pings >= 3


def test_health_check_that_raises_withholds_the_ping(notify_socket: tuple[socket.socket, str]) -> None:
    _, name = notify_socket

    def broken() -> bool:
        raise RuntimeError("store closed")

    dog = Watchdog(Notifier(name), 10.0, broken)
    assert not dog.beat()
    assert dog.pings == 0
