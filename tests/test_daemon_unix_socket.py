"""The socket shell and eventfds: fds arrive owned, truncation and peer close are told apart."""

from __future__ import annotations

import array
import os
import socket

import pytest

from pyvhost.daemon.eventfd import EventFd
from pyvhost.daemon.unix_socket import (
    Connection,
    FdsTruncated,
    PeerClosed,
    SocketBroken,
    Stopped,
    connect,
)
from pyvhost.protocol.constants import MAX_FDS


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(a, "test")
    yield conn, b
    conn.close()
    b.close()


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_fds_arrive_owned_with_their_bytes(pair):
    conn, peer = pair
    r, w = os.pipe()
    try:
        send_fds(peer, b"hello", [r, w])
        data, fds = conn.recv_message_bytes()
        assert data == b"hello" and len(fds) == 2
        os.write(fds[1].fileno(), b"x")
        assert os.read(r, 1) == b"x"
        for fd in fds:
            fd.close()
    finally:
        os.close(r)
        os.close(w)


def test_more_fds_than_room_is_an_error_and_leaks_nothing(pair):
    conn, peer = pair
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    try:
        before = open_fds()
        send_fds(peer, b"m", [fd] * (MAX_FDS + 1))
        with pytest.raises(FdsTruncated):
            conn.recv_message_bytes()
        assert open_fds() == before
    finally:
        os.close(fd)


def test_peer_close_is_not_breakage(pair):
    conn, peer = pair
    peer.close()
    with pytest.raises(PeerClosed):
        conn.recv_message_bytes()
    with pytest.raises(PeerClosed):
        conn.send(b"x")


def test_broken_socket_keeps_the_oserror_as_cause():
    a, b = socket.socketpair()
    conn = Connection(a, "t")
    a.shutdown(socket.SHUT_RDWR)
    a.close()
    with pytest.raises(SocketBroken) as info:
        conn.recv_message_bytes()
    assert isinstance(info.value.__cause__, OSError)
    b.close()


def test_wait_readable_stops_on_stop_fd(pair):
    conn, _ = pair
    stop = EventFd.create()
    try:
        assert conn.wait_readable(stop.fileno(), timeout=0) is False
        stop.signal()
        with pytest.raises(Stopped):
            conn.wait_readable(stop.fileno())
    finally:
        stop.close()


def test_client_connect_gives_up_after_timeout(tmp_path):
    with pytest.raises(SocketBroken) as info:
        connect(str(tmp_path / "nobody"), timeout=0.2, backoff=(0.01, 0.05))
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_eventfd_signal_and_drain():
    e = EventFd.create("t")
    try:
        assert e.drain() == 0
        e.signal()
        e.signal()
        assert e.drain() == 2
        assert e.drain() == 0
    finally:
        e.close()
    assert e.closed
