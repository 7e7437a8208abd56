"""Bad frontend input: each case gets a clear log line naming the connection and the request,
then an error reply (the connection goes on) or a closed connection (the daemon goes on).

The daemon is a real `Server` listening on a socket path in a thread; the frontend is
pyvhost's `VhostUserFrontend` test double, with `send_raw` for what the codec would refuse
to produce. After every case a fresh session must still negotiate, map memory and count
transmitted packets: the daemon keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest

from pyvhost.daemon.backend import BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.devices.net.device import NetDevice
from pyvhost.protocol import (
    U64,
    FrontendRequest as R,
    InflightDesc,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolFeature as P,
    VringFd,
    VringState,
)
from pyvhost.protocol.codec import HEADER
from pyvhost.protocol.constants import VERSION
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.testing.driver import MockSplitQueue, RingAddresses
from pyvhost.testing.frontend import RequestFailed, VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
PROTOCOL = (P.MQ.mask | P.REPLY_ACK.mask | P.CONFIG.mask | P.STATUS.mask
            | P.CONFIGURE_MEM_SLOTS.mask | P.RESET_DEVICE.mask)
TIMEOUT = 30.0  # a bound against hangs only


class ServerThread:
    def __init__(self, path: str, options: BackendOptions = BackendOptions()) -> None:
        self.server = Server(NetDevice, path, options=options)
        self.path = path
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        assert self.server.listening.wait(TIMEOUT)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def daemon(tmp_path):
    st = ServerThread(str(tmp_path / "vhost.sock"))
    yield st
    st.stop()


@pytest.fixture
def ram():
    with GuestRam([(0, 1 << 20)]) as r:
        yield r


def connect(daemon: ServerThread) -> VhostUserFrontend:
    return VhostUserFrontend(daemon.path, timeout=TIMEOUT)


def negotiate(fe: VhostUserFrontend) -> None:
    fe.negotiate(FEATURES, PROTOCOL)


def transmit(fe: VhostUserFrontend, ram: GuestRam, n: int = 8) -> None:
    fe.setup_queue(1, MockSplitQueue(ram, 64, event_idx=True))
    fe.enable_queue(1)
    fe.send_frames(1, [bytes(60)] * n)
    fe.wait_tx_done(1)


def still_serving(daemon: ServerThread, ram: GuestRam) -> None:
    """A complete new session works: negotiation, memory, a ring, packets counted."""
    before = daemon.server.stats().get("tx_packets", 0)
    with connect(daemon) as fe:
        negotiate(fe)
        fe.set_mem_table(ram)
        transmit(fe, ram)
        assert fe.get_vring_base(1) == 8
    assert daemon.server.stats()["tx_packets"] - before >= 8


def hdr(request: int, size: int, flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, size)


def logged(caplog, *words: str) -> bool:
    """Some ERROR record contains every word (connection and request names included)."""
    return any(all(w in r.getMessage() for w in words)
               for r in caplog.records if r.levelno >= logging.ERROR)


# ------------------------------------------------------------------ connection-closing --


def test_truncated_header_then_close(daemon, ram, caplog):
    with connect(daemon) as fe:
        fe.send_raw(hdr(R.GET_FEATURES, 0)[:7])
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "middle of a message")


def test_payload_shorter_than_header_says_then_close(daemon, ram, caplog):
    with connect(daemon) as fe:
        fe.send_raw(hdr(R.SET_VRING_NUM, 8) + bytes(4))
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "middle of a message")


def test_payload_size_not_allowed_for_request(daemon, ram, caplog):
    with connect(daemon) as fe:
        fe.send_raw(hdr(R.GET_FEATURES, 8) + bytes(8))
        fe.wait_closed()
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "GET_FEATURES", "payload size")


def test_fds_on_a_message_that_takes_none(daemon, ram, caplog):
    fd = os.memfd_create("stray", os.MFD_CLOEXEC)
    try:
        with connect(daemon) as fe:
            fe.send_raw(hdr(R.GET_QUEUE_NUM, 0), [fd, fd])
            fe.wait_closed()
    finally:
        os.close(fd)
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "GET_QUEUE_NUM")


def test_unknown_request_and_bad_version(daemon, ram, caplog):
    with connect(daemon) as fe:
        fe.send_raw(hdr(99, 0))
        fe.wait_closed()
    with connect(daemon) as fe:
        fe.send_raw(hdr(R.GET_FEATURES, 0, flags=0x2))
        fe.wait_closed()
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "99")


def test_get_vring_base_out_of_range_closes(daemon, ram, caplog):
    with connect(daemon) as fe:
        negotiate(fe)
        fe.send(R.GET_VRING_BASE, VringState(17, 0))
        fe.wait_closed()
    still_serving(daemon, ram)
    assert logged(caplog, daemon.path, "GET_VRING_BASE", "17")


# ------------------------------------------------------- refused, the connection goes on --


def refused(fe: VhostUserFrontend, req: R, payload, fds=()) -> None:
    with pytest.raises(RequestFailed):
        fe.request(req, payload, fds, need_reply=True)


def test_memfd_shorter_than_region(daemon, ram, caplog):
    short = os.memfd_create("short", os.MFD_CLOEXEC)
    try:
        os.ftruncate(short, 4096)
        with connect(daemon) as fe:
            negotiate(fe)
            table = MemoryTable((MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0),))
            refused(fe, R.SET_MEM_TABLE, table, [short])
            fe.set_mem_table(ram)  # the same connection goes on
            transmit(fe, ram)
    finally:
        os.close(short)
    assert logged(caplog, daemon.path, "SET_MEM_TABLE", "4096")


def test_overlapping_regions(daemon, ram, caplog):
    fd, gpa, size, uaddr, off = ram.region_specs()[0]
    with connect(daemon) as fe:
        negotiate(fe)
        table = MemoryTable((MemoryRegionDesc(gpa, size, uaddr, off),
                             MemoryRegionDesc(gpa + 4096, size, uaddr + (1 << 30), off)))
        refused(fe, R.SET_MEM_TABLE, table, [fd, fd])
        fe.set_mem_table(ram)
        transmit(fe, ram)
    assert logged(caplog, daemon.path, "SET_MEM_TABLE", "overlap")


def test_ring_address_outside_every_region(daemon, ram, caplog):
    with connect(daemon) as fe:
        negotiate(fe)
        fe.set_mem_table(ram)
        driver = MockSplitQueue(ram, 64)
        fe.request(R.SET_VRING_NUM, VringState(1, 64), need_reply=True)
        with pytest.raises(RequestFailed):
            fe.set_vring_addr(1, RingAddresses(0xDEAD0000, 0xDEAE0000, 0xDEAF0000))
        # Starting the ring without valid addresses is refused too, not crashed on.
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            refused(fe, R.SET_VRING_KICK, VringFd(1), [kick])
        finally:
            os.close(kick)
        del driver
        transmit(fe, ram)
    assert logged(caplog, daemon.path, "SET_VRING_ADDR", "outside every memory region")


def test_queue_index_out_of_range_and_bad_sizes(daemon, ram, caplog):
    with connect(daemon) as fe:
        negotiate(fe)
        fe.set_mem_table(ram)
        refused(fe, R.SET_VRING_NUM, VringState(9, 64))
        refused(fe, R.SET_VRING_ENABLE, VringState(200, 1))
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            refused(fe, R.SET_VRING_KICK, VringFd(9), [kick])
        finally:
            os.close(kick)
        for size in (0, 300, 65536):
            refused(fe, R.SET_VRING_NUM, VringState(1, size))
        refused(fe, R.SET_VRING_BASE, VringState(1, 0x10000))
        refused(fe, R.SET_VRING_ENABLE, VringState(1, 2))
        transmit(fe, ram)
    assert logged(caplog, daemon.path, "SET_VRING_NUM", "out of range")
    assert logged(caplog, daemon.path, "SET_VRING_NUM", "300")


def test_unsupported_requests_refused_cleanly(daemon, ram, caplog):
    with connect(daemon) as fe:
        negotiate(fe)
        refused(fe, R.SET_VRING_ENDIAN, VringState(0, 0))
        reply = fe.request(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 2, 256))
        assert reply == InflightDesc(0, 0, 0, 0)  # "no inflight area"
        refused(fe, R.SET_FEATURES, U64(1 << 63))  # never offered
        fe.set_mem_table(ram)
        transmit(fe, ram)
    assert logged(caplog, daemon.path, "SET_VRING_ENDIAN", "not supported")
    assert logged(caplog, daemon.path, "SET_FEATURES", "not offered")
