"""The daemon's backend driven over a real Unix socketpair by a small vhost-user frontend.

The frontend speaks through pyvhost's own protocol codec (`FrontendProtocol`); guest memory is
memfd RAM from `GuestRam` and the rings are driven by `MockSplitQueue`, so every test crosses
the whole stack: SCM_RIGHTS, the codec, the backend state machine, GuestMemory, the worker and
the compiled TX drop kernel.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest

from pyvhost.daemon.backend import STATUS_DEVICE_NEEDS_RESET, BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.daemon.unix_socket import Connection
from pyvhost.devices.net.device import NetDevice
from pyvhost.protocol import (
    EMPTY,
    U64,
    ConfigSpace,
    FrontendProtocol,
    FrontendRequest as R,
    MemoryRegionDesc,
    MemoryTable,
    Payload,
    ProtocolFeature as P,
    SingleMemRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.protocol.constants import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam

HDR = bytes(12)  # virtio_net_hdr (VERSION_1): all zero for a plain frame
DEADLINE = 30.0  # generous: a bound against hangs, never a performance assertion
RAM_SIZE = 1 << 20


class MiniFrontend:
    """A vhost-user frontend over one end of a socketpair, using pyvhost's codec."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.proto = FrontendProtocol()
        self.eventfds: list[int] = []

    def send_raw(self, data: bytes, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def request(self, req: R, payload: Payload = EMPTY, fds: list[int] = (),
                need_reply: bool = False) -> Payload | None:
        data, fdnums = self.proto.send_request(req, payload, fds, need_reply)
        self.send_raw(data, fdnums)
        if not self.proto.awaiting_reply:
            return None
        return self.read_reply()

    def read_reply(self) -> Payload:
        self.sock.settimeout(DEADLINE)
        while True:
            data = self.sock.recv(4096)
            assert data, "backend closed the connection"
            msgs = self.proto.receive(data, ())
            if msgs:
                assert len(msgs) == 1
                return msgs[0].payload

    def acked(self, req: R, payload: Payload = EMPTY, fds: list[int] = ()) -> int:
        """Send with NEED_REPLY; the REPLY_ACK status (0 = success)."""
        reply = self.request(req, payload, fds, need_reply=True)
        assert isinstance(reply, U64)
        return reply.value

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.eventfds.append(fd)
        return fd

    def closed_by_peer(self) -> bool:
        self.sock.settimeout(DEADLINE)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds.clear()


class Daemon:
    """A Server serving one socketpair connection on a thread."""

    def __init__(self, options: BackendOptions = BackendOptions(), queue_pairs: int = 1):
        self.server = Server(lambda: NetDevice(queue_pairs), "unused", options=options)
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.frontend = MiniFrontend(theirs)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.serve_connection(Connection(self.ours, "test-conn"))

    @property
    def backend(self):
        return self.server.current

    def stats(self) -> dict:
        return self.server.stats()

    def disconnect(self) -> None:
        self.frontend.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


def wait_until(pred, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture
def ram():
    with GuestRam([(0, RAM_SIZE)]) as r:
        yield r


@pytest.fixture(params=["auto", "copy"])
def daemon(request):
    d = Daemon(BackendOptions(metadata_access=request.param))
    yield d
    if d.thread.is_alive():
        d.disconnect()


def negotiate(fe: MiniFrontend, *, event_idx: bool = True) -> int:
    offered = fe.request(R.GET_FEATURES).value
    assert offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert offered >> VIRTIO_F_VERSION_1 & 1
    wanted = (1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    if event_idx:
        wanted |= 1 << VIRTIO_RING_F_EVENT_IDX
    proto = fe.request(R.GET_PROTOCOL_FEATURES).value
    for f in (P.MQ, P.REPLY_ACK, P.BACKEND_REQ, P.CONFIG, P.CONFIGURE_MEM_SLOTS,
              P.RESET_DEVICE, P.STATUS, P.LOG_SHMFD):
        assert proto & f.mask, f.name
    assert offered >> VHOST_F_LOG_ALL & 1  # live migration: dirty logging
    fe.request(R.SET_PROTOCOL_FEATURES, U64(proto))
    fe.request(R.SET_OWNER)
    assert fe.acked(R.SET_FEATURES, U64(wanted)) == 0
    return wanted


def mem_table(ram: GuestRam) -> tuple[MemoryTable, list[int]]:
    specs = ram.region_specs()
    table = MemoryTable(tuple(MemoryRegionDesc(gpa, size, uaddr, off)
                              for _, gpa, size, uaddr, off in specs))
    return table, [fd for fd, *_ in specs]


def setup_ring(fe: MiniFrontend, index: int, mq: MockSplitQueue, *, kick: bool = True,
               base: int = 0) -> tuple[int | None, int]:
    user = mq.ring_addresses().user
    assert fe.acked(R.SET_VRING_NUM, VringState(index, mq.size)) == 0
    assert fe.acked(R.SET_VRING_BASE, VringState(index, base)) == 0
    assert fe.acked(R.SET_VRING_ADDR, VringAddr(index, 0, user.desc_table, user.used_ring,
                                                user.avail_ring, 0)) == 0
    call = fe.eventfd()
    assert fe.acked(R.SET_VRING_CALL, VringFd(index), [call]) == 0
    kick_fd = fe.eventfd() if kick else None
    status = fe.acked(R.SET_VRING_KICK, VringFd(index, nofd=not kick),
                      [kick_fd] if kick else [])
    assert status == 0
    assert fe.acked(R.SET_VRING_ENABLE, VringState(index, 1)) == 0
    return kick_fd, call


def connect_tx(fe: MiniFrontend, ram: GuestRam, *, event_idx: bool = True, size: int = 256,
               kick: bool = True):
    negotiate(fe, event_idx=event_idx)
    table, fds = mem_table(ram)
    assert fe.acked(R.SET_MEM_TABLE, table, fds) == 0
    rx = MockSplitQueue(ram, size, event_idx=event_idx)
    tx = MockSplitQueue(ram, size, event_idx=event_idx)
    setup_ring(fe, 0, rx)
    kick_fd, call = setup_ring(fe, 1, tx, kick=kick)
    return tx, kick_fd, call


def send_packets(tx: MockSplitQueue, kick_fd: int | None, frames: list[bytes]) -> None:
    for frame in frames:
        tx.add_chain([HDR + frame], [])
    tx.publish()
    if kick_fd is not None and tx.needs_kick():
        os.eventfd_write(kick_fd, 1)


def collect_used(tx: MockSplitQueue, n: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    wait_until(lambda: got.extend(tx.used()) or len(got) >= n, f"{n} used elements")
    return got


# -------------------------------------------------------------------------------- tests --


def test_full_session_counts_packets_and_get_vring_base_returns_next_avail(daemon, ram):
    fe = daemon.frontend
    tx, kick, call = connect_tx(fe, ram)
    assert fe.request(R.GET_QUEUE_NUM).value == 3
    assert fe.request(R.GET_MAX_MEM_SLOTS).value == 509
    cfg = fe.request(R.GET_CONFIG, ConfigSpace(0, 10, 0, bytes(10)))
    assert isinstance(cfg, ConfigSpace) and cfg.payload[:6] == NetDevice().mac

    frames = [bytes([i]) * 64 for i in range(100)] + [bytes(1518 - 4)] * 20
    sent = 0
    for start in range(0, len(frames), 30):  # in batches: the ring holds 256
        batch = frames[start:start + 30]
        send_packets(tx, kick, batch)
        sent += len(batch)
        used = collect_used(tx, len(batch))
        assert all(length == 0 for _, length in used)
    stats = daemon.stats()
    assert stats["tx_packets"] == len(frames)
    assert stats["tx_bytes"] == sum(len(f) for f in frames)
    assert fe.request(R.GET_VRING_BASE, VringState(1, 0)) == VringState(1, sent)
    # Stopped: new buffers are not consumed and nothing is written to guest memory.
    used_idx = tx.used_idx()
    send_packets(tx, kick, [bytes(64)])
    time.sleep(0.05)
    assert tx.used_idx() == used_idx and daemon.stats()["tx_packets"] == len(frames)
    daemon.disconnect()


def test_polling_ring_without_kick_fd(daemon, ram):
    tx, kick, _ = connect_tx(daemon.frontend, ram, kick=False)
    assert kick is None
    send_packets(tx, None, [bytes(60)] * 10)
    collect_used(tx, 10)
    assert daemon.stats()["tx_packets"] == 10


def test_busy_poll_mode(ram):
    d = Daemon(BackendOptions(poll=True))
    try:
        tx, kick, _ = connect_tx(d.frontend, ram, event_idx=False)
        send_packets(tx, kick, [bytes(64)] * 50)
        collect_used(tx, 50)
        assert d.stats()["tx_packets"] == 50
        # The worker asked the driver not to kick while it polls.
        assert tx.used_flags() & 1
    finally:
        d.disconnect()


def test_disabled_tx_ring_discards_without_counting(daemon, ram):
    fe = daemon.frontend
    tx, kick, _ = connect_tx(fe, ram)
    assert fe.acked(R.SET_VRING_ENABLE, VringState(1, 0)) == 0
    send_packets(tx, kick, [bytes(64)] * 5)
    collect_used(tx, 5)
    s = daemon.stats()
    assert s["tx_packets"] == 0 and s["tx_discarded"] == 5


def test_rings_enabled_at_start_without_protocol_features(daemon, ram):
    fe = daemon.frontend
    fe.request(R.GET_FEATURES)
    fe.request(R.SET_OWNER)
    fe.request(R.SET_FEATURES, U64(1 << VIRTIO_F_VERSION_1))
    table, fds = mem_table(ram)
    fe.request(R.SET_MEM_TABLE, table, fds)
    tx = MockSplitQueue(ram, 64)
    user = tx.ring_addresses().user
    fe.request(R.SET_VRING_NUM, VringState(1, 64))
    fe.request(R.SET_VRING_BASE, VringState(1, 0))
    fe.request(R.SET_VRING_ADDR, VringAddr(1, 0, user.desc_table, user.used_ring,
                                           user.avail_ring, 0))
    kick = fe.eventfd()
    fe.request(R.SET_VRING_KICK, VringFd(1), [kick])
    send_packets(tx, kick, [bytes(64)] * 3)
    collect_used(tx, 3)
    assert daemon.stats()["tx_packets"] == 3


def test_memory_table_replaced_while_ring_runs(daemon, ram):
    fe = daemon.frontend
    tx, kick, _ = connect_tx(fe, ram)
    send_packets(tx, kick, [bytes(64)] * 10)
    collect_used(tx, 10)
    for _ in range(5):  # same memory under new fds: a new table each time
        table, _ = mem_table(ram)
        fds = [fd for fd, *_ in ram.region_specs(owned=True)]
        try:
            assert fe.acked(R.SET_MEM_TABLE, table, fds) == 0
        finally:
            for fd in fds:
                os.close(fd)
        send_packets(tx, kick, [bytes(64)] * 10)
        collect_used(tx, 10)
    s = daemon.stats()
    assert s["tx_packets"] == 60
    assert s["grace_periods"] >= 5


def test_add_and_remove_memory_region(daemon, ram):
    fe = daemon.frontend
    tx, kick, _ = connect_tx(fe, ram)
    ram.add_region(0x10000000, 1 << 16)
    fd, gpa, size, uaddr, off = ram.region_specs()[1]
    region = SingleMemRegion(MemoryRegionDesc(gpa, size, uaddr, off))
    assert fe.acked(R.ADD_MEM_REG, region, [fd]) == 0
    assert len(daemon.backend.memory.table) == 2
    # The identical region again (QEMU: once per queue pair) is counted, not refused...
    assert fe.acked(R.ADD_MEM_REG, region, [fd]) == 0
    assert len(daemon.backend.memory.table) == 2
    # ...so it goes after as many removals as additions.
    assert fe.acked(R.REM_MEM_REG, region) == 0
    assert len(daemon.backend.memory.table) == 2
    assert fe.acked(R.REM_MEM_REG, region) == 0
    assert len(daemon.backend.memory.table) == 1
    assert fe.acked(R.REM_MEM_REG, region) != 0  # no longer there
    # A different region overlapping a mapped one is still refused.
    overlap = SingleMemRegion(MemoryRegionDesc(gpa + 4096, size, uaddr + (1 << 20), off))
    assert fe.acked(R.ADD_MEM_REG, overlap, [fd]) == 0  # gpa range now free: accepted
    assert fe.acked(R.ADD_MEM_REG, SingleMemRegion(MemoryRegionDesc(
        gpa + 8192, size, uaddr + (2 << 20), off)), [fd]) != 0  # overlaps the one just added
    send_packets(tx, kick, [bytes(64)] * 4)
    collect_used(tx, 4)


def test_status_and_reset_device(daemon, ram):
    fe = daemon.frontend
    tx, kick, _ = connect_tx(fe, ram)
    assert fe.acked(R.SET_STATUS, U64(0x0F)) == 0
    assert fe.request(R.GET_STATUS).value == 0x0F
    assert fe.acked(R.RESET_DEVICE) == 0
    assert fe.request(R.GET_STATUS).value == 0
    assert not any(vr.running for vr in daemon.backend.vrings)


def test_logging_is_accepted(daemon, ram):
    """Dirty logging (live migration) is never refused: QEMU aborts if it is."""
    fe = daemon.frontend
    negotiate(fe)
    assert fe.acked(R.SET_FEATURES, U64((1 << VIRTIO_F_VERSION_1) | (1 << 26))) == 0
    memfd = os.memfd_create("log")
    try:
        os.ftruncate(memfd, 4096)
        from pyvhost.protocol import LogDesc
        assert isinstance(fe.request(R.SET_LOG_BASE, LogDesc(4096, 0), [memfd]), U64)
    finally:
        os.close(memfd)
    assert daemon.stats()["log_enabled"] == 1
    assert fe.request(R.GET_QUEUE_NUM).value == 3  # still serving


def test_broken_queue_is_stopped_and_reported(daemon, ram):
    fe = daemon.frontend
    tx, kick, _ = connect_tx(fe, ram)
    err = fe.eventfd()
    assert fe.acked(R.SET_VRING_ERR, VringFd(1), [err]) == 0
    tx.write_raw_avail_slot(tx.next_avail, 999)  # head index out of range
    tx.next_avail = (tx.next_avail + 1) & 0xFFFF
    tx.publish()
    os.eventfd_write(kick, 1)
    wait_until(lambda: daemon.stats()["queues_broken"] == 1, "the queue to break")
    assert fe.request(R.GET_STATUS).value & STATUS_DEVICE_NEEDS_RESET
    assert os.eventfd_read(err) >= 1
    # The daemon still serves this connection: the other ring and requests work.
    assert fe.request(R.GET_QUEUE_NUM).value == 3
