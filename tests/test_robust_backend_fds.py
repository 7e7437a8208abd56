"""Regression tests for fd-ownership bugs the hostile-frontend fuzzer found
(fuzz/frontend_fuzz.py, docs/robustness.md)."""

from __future__ import annotations

import os

import pytest

from pyvhost.daemon.backend import Backend, ConnectionFatal
from pyvhost.devices.net import NetDevice
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
