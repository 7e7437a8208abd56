"""Regression tests for fd-ownership bugs the hostile-frontend fuzzer found
(fuzz/frontend_fuzz.py, docs/robustness.md)."""

from __future__ import annotations

import os

import pytest

from pyvhost.daemon.backend import Backend, ConnectionFatal
from pyvhost.devices.net.device import NetDevice
from pyvhost.fd import OwnedFd
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import VringFd, VringState, encode_message


def test_fds_of_requests_after_a_fatal_one_are_closed_at_once():
    """When one recvmsg held several requests and a handler ended the connection
    (ConnectionFatal), the fds of the requests after it were left to the garbage collector:
    an eventfd outlived its session until a gc pass."""
    backend = Backend(NetDevice(), "test")
    try:
        call = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        data = (encode_message(R.GET_VRING_BASE, VringState(17, 0))[0]
                + encode_message(R.SET_VRING_CALL, VringFd(1), fds=[call])[0])
        with pytest.raises(ConnectionFatal):
            backend.receive(data, [call])
        assert call.closed
    finally:
        backend.close()


@pytest.mark.parametrize("kind", ["directory", "pipe write end", "memfd"])
def test_a_kick_or_call_fd_that_is_no_eventfd_is_refused(tmp_path, kind, caplog):
    """Found by the socket fuzzer: a kick fd that was a directory made the worker's drain()
    raise IsADirectoryError in the worker thread ("worker crashed; its rings stop"); a call
    fd that cannot be written would do the same in signal(). Kick, call and error fds must be
    eventfds: anything else is refused, and the session goes on."""
    from pyvhost.testing.churn import DaemonThread, clean_session
    from pyvhost.testing.driver import MockSplitQueue
    from pyvhost.testing.frontend import RequestFailed, VhostUserFrontend
    from pyvhost.testing.guest_ram import GuestRam
    from pyvhost.protocol import ProtocolFeature as P
    from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX

    if kind == "directory":
        bad = os.open(str(tmp_path), os.O_RDONLY | os.O_CLOEXEC)
    elif kind == "pipe write end":
        r, bad = os.pipe2(os.O_CLOEXEC)
        os.close(r)
    else:
        bad = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    daemon = DaemonThread(str(tmp_path / "vhost.sock"))
    try:
        with GuestRam([(0, 1 << 20)]) as ram, VhostUserFrontend(daemon.path) as fe:
            fe.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                         P.REPLY_ACK.mask | P.MQ.mask)
            fe.set_mem_table(ram)
            driver = MockSplitQueue(ram, 64, event_idx=True)
            fe.request(R.SET_VRING_NUM, VringState(1, 64), need_reply=True)
            fe.set_vring_addr(1, driver.ring_addresses().user)
            for req in (R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_KICK):
                with pytest.raises(RequestFailed):
                    fe.request(req, VringFd(1), [bad], need_reply=True)
            fe.request(R.SET_VRING_ENABLE, VringState(1, 1), need_reply=True)
            fe.request(R.VRING_KICK, VringState(1, 0), need_reply=True)  # start it, no fd
        daemon.wait_idle(1)
        clean_session(daemon.path)  # the daemon still serves
        daemon.wait_idle(2)
    finally:
        daemon.stop()
        os.close(bad)
    assert not any("crashed" in r.getMessage() for r in caplog.records)
    assert any("not an eventfd" in r.getMessage() for r in caplog.records)
