"""Device IOTLB (VIRTIO_F_IOMMU_PLATFORM): the IOTLB itself, and the daemon translating every ring
and buffer access through it, driven by the project's front-end acting as a vIOMMU.

The front-end maps guest-physical page A at IOVA A + 4 GiB (so an IOVA is never a GPA or a user
address by accident) and answers the back-end's misses with one 4 KiB UPDATE each, as QEMU does.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import pytest

import pyvhost
from pyvhost.daemon.backend import BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.devices.net.device import VIRTIO_NET_F_MRG_RXBUF, NetDevice
from pyvhost.memory.errors import BadRegionError
from pyvhost.memory.iotlb import (IOVA_LIMIT, BadIotlbEntry, Iotlb, IotlbEntry, IotlbTable,
                                  resolve)
from pyvhost.memory.region import MappedRegion, RegionSpec
from pyvhost.memory.table import RegionTable
from pyvhost.fd import OwnedFd
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import PAGE, RequestFailed, VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.session import DeviceSession

import os

MiB = 1 << 20
DEADLINE = 20.0
IOMMU = 1 << 33
OFFSET = 1 << 32          # IOVA = GPA + 4 GiB
PROTOCOL = P.REPLY_ACK.mask | P.BACKEND_REQ.mask | P.MQ.mask | P.CONFIG.mask
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
BASE = (1 << VIRTIO_F_VERSION_1) | IOMMU


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile the net kernels before any daemon runs (a first burst would take seconds)."""
    from pyvhost.devices.net.endpoints import warm_up
    warm_up()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def frame(i: int, size: int) -> bytes:
    head = b"\x52\x54\x00\x00\x00\x02\x52\x54\x00\x00\x00\x01\x08\x00" + struct.pack("!I", i)
    return (head + bytes((i + k) & 0xFF for k in range(size)))[:size]


# ---------------------------------------------------------------------------- the IOTLB --

def _region(gpa: int, size: int, user: int) -> MappedRegion:
    fd = os.memfd_create("iotlb-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return MappedRegion(RegionSpec(gpa, size, user, 0), OwnedFd(fd))


def test_iotlb_refuses_what_cannot_be_an_entry():
    t = Iotlb()
    for bad in (IotlbEntry(0x1000, 0, 0x1000, 3),            # zero size
                IotlbEntry(0x1000, 0x1000, 0x1000, 0),       # no permission
                IotlbEntry(0x1000, 0x1000, 0x1000, 4),       # not a permission
                IotlbEntry(IOVA_LIMIT - 0x1000, 0x2000, 0, 3),  # past what kernels address
                IotlbEntry(0x1000, 0x1000, (1 << 64) - 0x800, 3)):  # user address wraps
        with pytest.raises(BadIotlbEntry):
            t.update(bad)
    assert len(t) == 0
    assert t.update(IotlbEntry(0x1000, 0x1000, 0x7000, 3))
    assert not t.update(IotlbEntry(0x1000, 0x1000, 0x7000, 3))  # the same page again: no-op
    with pytest.raises(BadIotlbEntry, match="overlaps"):           # another translation
        t.update(IotlbEntry(0x1800, 0x1000, 0x9000, 3))
    with pytest.raises(BadIotlbEntry, match="overlaps"):           # another permission
        t.update(IotlbEntry(0x1000, 0x1000, 0x7000, 1))
    assert t.entries() == (IotlbEntry(0x1000, 0x1000, 0x7000, 3),)
    # Consistent overlap joins.
    assert t.update(IotlbEntry(0x1800, 0x1000, 0x7800, 3))
    assert t.entries() == (IotlbEntry(0x1000, 0x1800, 0x7000, 3),)
    with pytest.raises(BadIotlbEntry):
        t.invalidate(0x1000, 0)
    with pytest.raises(BadIotlbEntry):
        t.invalidate(1 << 63, (1 << 63) + 1)   # past 2**64


def test_invalidate_to_the_end_of_the_address_space_and_eviction():
    t = Iotlb(max_entries=4)
    for k in range(4):
        t.update(IotlbEntry(0xfff00000 + 0x2000 * k, 0x1000, 0x10000 + 0x1000 * k, 3))
    # QEMU's lazy flush: [0xfef00000, 2**64): iova + size == 2**64 is "to the end".
    assert len(t.invalidate(0xfef00000, (1 << 64) - 0xfef00000)) == 4
    assert len(t) == 0
    for k in range(6):
        t.update(IotlbEntry(0x2000 * k, 0x1000, 0x10000 + 0x1000 * k, 3))
    assert len(t) == 4 and t.stats.evictions == 2
    assert [e.iova for e in t.entries()] == [0x4000, 0x6000, 0x8000, 0xa000]  # oldest went


def test_runs_join_pages_contiguous_in_one_region_only():
    a = _region(0, 4 * PAGE, 0x100000)
    b = _region(4 * PAGE, 4 * PAGE, 0x100000 + 4 * PAGE)   # user-adjacent, another mapping
    try:
        regions = RegionTable((a, b))
        t = Iotlb()
        for k in range(8):      # IOVA pages 0x10000.. -> user pages in order: a then b
            t.update(IotlbEntry(0x10000 + k * PAGE, PAGE, 0x100000 + k * PAGE, 3))
        t.update(IotlbEntry(0x30000, PAGE, 0x100000 + PAGE, 3))     # same page, elsewhere
        t.update(IotlbEntry(0x31000, PAGE, 0x100000 + 3 * PAGE, 1))  # not host-contiguous
        runs = resolve(t.entries(), regions)
        assert [(r.iova, r.size, r.region is a, r.perm) for r in runs] == [
            (0x10000, 4 * PAGE, True, 3), (0x14000, 4 * PAGE, False, 3),
            (0x30000, PAGE, True, 3), (0x31000, PAGE, True, 1)]
        snap = IotlbTable(regions, runs)
        assert snap.gpa_of(0x14010) == 4 * PAGE + 0x10
        assert snap.check_range(0x10000, 8 * PAGE, 3) == (0, 0)
        assert snap.check_range(0x13000, 3 * PAGE, 3) == (0, 0)   # spans two runs
        assert snap.check_range(0x17000, 2 * PAGE, 1) == (1, 0x18000)
        assert snap.check_range(0x31000, 8, 2) == (2, 0x31000)
        assert snap.contiguous_user_range(0x10000, 4 * PAGE) is not None
        assert snap.contiguous_user_range(0x13000, 2 * PAGE) is None
        k = snap.kernel()
        assert list(k[8]) == [1] and list(k[6]) == [3, 3, 3, 1]
        snap.release_kernel()
        regions.release_kernel()
    finally:
        a.close()
        b.close()


def test_incremental_runs_equal_a_rebuild():
    """GuestMemory adds an UPDATE's run in place (insert_run); it must give what resolving
    every entry again gives, in any order, across two regions."""
    import random
    from pyvhost.memory.iotlb import insert_run
    a = _region(0, 16 * PAGE, 0x100000)
    b = _region(16 * PAGE, 16 * PAGE, 0x100000 + 16 * PAGE)
    try:
        regions = RegionTable((a, b))
        rng = random.Random(13)
        for _ in range(20):
            t, runs = Iotlb(), []
            pages = rng.sample(range(32), 24)
            for p in pages:
                e = IotlbEntry(0x40000 + p * PAGE, PAGE, 0x100000 + p * PAGE,
                               rng.choice((3, 3, 3, 1)))
                if t.update(e):
                    assert insert_run(runs, e, regions)
                assert runs == resolve(t.entries(), regions)
        regions.release_kernel()
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ the daemon, net loopback --

class Daemon:
    """NetDevice(1, source=loopback) behind a vIOMMU: RX ring 0, TX ring 1."""

    def __init__(self, path: str, features: int, *, options: BackendOptions = BackendOptions(),
                 size: int = 256, handler=None) -> None:
        self.server = Server(lambda: NetDevice(1, source="loopback"), path, options=options,
                             max_connections=1)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        assert self.server.listening.wait(600)
        self.ram = GuestRam([(0, 16 * MiB)])
        self.fe = VhostUserFrontend(path, timeout=DEADLINE)
        self.features = self.fe.negotiate(features, PROTOCOL).features
        assert self.features & IOMMU
        self.fe.set_mem_table(self.ram)
        self.fe.serve_iotlb_misses(handler(self.ram) if handler
                                   else self.fe.identity_pages(self.ram, OFFSET))
        ev = bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        self.fe.setup_queue(0, MockSplitQueue(self.ram, size, event_idx=ev, iova_offset=OFFSET))
        self.fe.setup_queue(1, MockSplitQueue(self.ram, size, event_idx=ev, iova_offset=OFFSET))
        self.fe.enable_queue(0)
        self.fe.enable_queue(1)
        self.received: list[bytes] = []

    def stats(self) -> dict:
        return self.server.stats()

    def receive(self, n: int) -> list[bytes]:
        def got() -> bool:
            self.received += self.fe.received_frames(0)
            return len(self.received) >= n
        wait_until(got, f"{n} frames (have {len(self.received)})")
        return self.received

    def close(self) -> dict:
        self.fe.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        self.ram.close()
        return self.server.stats()


@pytest.fixture
def make(tmp_path):
    made: list[Daemon] = []

    def _make(features: int, **kw) -> Daemon:
        d = Daemon(str(tmp_path / f"net{len(made)}.sock"), features, **kw)
        made.append(d)
        return d

    yield _make
    for d in made:
        if not d.fe.closed:
            d.close()


def test_iommu_platform_is_offered(make):
    d = make(BASE)
    assert d.features & IOMMU
    d.close()


@pytest.mark.parametrize("access", ["direct", "copy"])
@pytest.mark.parametrize("features", [BASE | MRG, BASE | (1 << VIRTIO_RING_F_EVENT_IDX)],
                         ids=["mergeable", "event_idx"])
def test_loopback_through_the_iotlb(make, access, features):
    d = make(features, options=BackendOptions(metadata_access=access))
    d.fe.post_rx_buffers(0, 200, 2048)
    frames = [frame(i, size) for i, size in enumerate([60, 1514, 100, 1000] * 25)]
    d.fe.send_frames(1, frames)
    d.fe.wait_tx_done(1)
    assert d.receive(len(frames)) == frames
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"], s["queues_broken"]) == (100, 100, 0)
    assert s["iotlb_misses"] > 0 and s["iotlb_updates"] > 0 and s["iotlb_hits"] > 0
    assert s[f"{access}_rounds"] > 0
    if access == "direct":
        assert s["copy_rounds"] == 0  # each ring part's pages join into one run
    # every miss the device sent was for an IOVA (never a GPA or a user address)
    assert all(iova >= OFFSET for iova, _ in d.fe.misses)


def test_invalidation_of_rings_and_buffers_keeps_the_queues_going(make):
    """An INVALIDATE over the rings drops the direct map and the next burst asks again; a
    lazy-mode flush to 2**64 empties the IOTLB; traffic continues after each."""
    d = make(BASE | MRG)
    d.fe.post_rx_buffers(0, 200, 2048)
    sent: list[bytes] = []
    for rnd in range(4):
        frames = [frame(100 * rnd + i, 200 + i) for i in range(20)]
        d.fe.send_frames(1, frames)
        d.fe.wait_tx_done(1)
        sent += frames
        assert d.receive(len(sent)) == sent
        misses_before = len(d.fe.misses)
        if rnd == 0:
            tx = d.fe.driver(1).iova_addresses()
            d.fe.iotlb_invalidate(tx.desc_table, PAGE)       # the TX descriptor table
        elif rnd == 1:
            d.fe.iotlb_invalidate(OFFSET, 16 * MiB)          # everything, rings included
        else:
            d.fe.iotlb_invalidate(OFFSET - PAGE, (1 << 64) - OFFSET + PAGE)  # to the end
        if rnd:
            # Emptied: an entry here can only come from a miss the device sent after the
            # flush (a worker round that ran after it asks again, and this front-end's miss
            # thread answers at once).
            assert d.stats()["iotlb_entries"] == 0 or len(d.fe.misses) > misses_before
    s = d.close()
    assert s["queues_broken"] == 0 and s["iotlb_invalidations"] == 4
    assert s["iotlb_ring_invalidations"] >= 3


def test_buffer_outside_every_entry_waits_and_nothing_is_written(make):
    """An RX buffer at an IOVA the vIOMMU does not map: the device asks (a miss), gets no
    UPDATE, and neither consumes the chain nor writes anywhere; the queue is not broken."""
    holes: set[int] = set()

    def handler(ram: GuestRam):
        def answer(iova: int, access: int):
            page = iova & ~(PAGE - 1)
            if page in holes:
                return []
            return [(page, PAGE, ram.gpa_to_user(page - OFFSET), 3)]
        return answer

    d = make(BASE | MRG, handler=handler)
    rx = d.fe.driver(0)
    buf = d.ram.alloc(PAGE, PAGE)
    d.ram.write(buf, b"\x5a" * PAGE)
    holes.add(buf + OFFSET)
    rx.add_buffers([(buf, 2048, True)])  # a GPA: the driver writes its IOVA
    rx.publish()
    d.fe.kick(0)
    d.fe.send_frames(1, [frame(1, 500)])
    d.fe.wait_tx_done(1)
    wait_until(lambda: any(i & ~(PAGE - 1) == buf + OFFSET for i, _ in d.fe.misses),
               "the miss for the unmapped buffer")
    time.sleep(0.2)
    assert rx.used_idx() == 0
    assert d.ram.read(buf, PAGE) == b"\x5a" * PAGE
    s = d.stats()
    assert s["queues_broken"] == 0 and s["rx_packets"] == 0
    # the vIOMMU maps it now: the next kick delivers the waiting frame
    holes.clear()
    d.fe.kick(0)
    assert d.receive(1) == [frame(1, 500)]
    d.close()


def test_device_write_to_a_read_only_iova_breaks_the_queue(make):
    """RX buffers the vIOMMU maps read-only: the RX queue breaks with a clear error, nothing is
    written there, the TX queue and the connection go on."""
    ro: set[int] = set()

    def handler(ram: GuestRam):
        def answer(iova: int, access: int):
            page = iova & ~(PAGE - 1)
            return [(page, PAGE, ram.gpa_to_user(page - OFFSET), 1 if page in ro else 3)]
        return answer

    d = make(BASE | MRG, handler=handler)
    rx = d.fe.driver(0)
    buf = d.ram.alloc(PAGE, PAGE)
    d.ram.write(buf, b"\x33" * PAGE)
    ro.add(buf + OFFSET)
    rx.add_buffers([(buf, 2048, True)])
    rx.publish()
    d.fe.kick(0)
    d.fe.send_frames(1, [frame(2, 300)])
    d.fe.wait_tx_done(1)
    wait_until(lambda: d.stats()["queues_broken"] == 1, "the RX queue to break")
    assert d.ram.read(buf, PAGE) == b"\x33" * PAGE
    assert rx.used_idx() == 0
    d.fe.send_frames(1, [frame(3, 300)])      # TX still served
    d.fe.wait_tx_done(1)
    s = d.close()
    assert s["tx_packets"] == 2


def test_hostile_iotlb_messages_are_refused_and_the_connection_goes_on(make):
    d = make(BASE | MRG)
    ram = d.ram
    user = ram.gpa_to_user(0)
    for iova, size, uaddr, perm in [
            (OFFSET, 0, user, 3),                   # zero size
            (OFFSET, PAGE, user, 0),                # no permission
            (OFFSET, PAGE, user, 7),                # not a permission
            (OFFSET, PAGE, 0x10, 3),                # user address outside every region
            (OFFSET, 1 << 40, user, 3),             # larger than the region
            ((1 << 63) - PAGE, 2 * PAGE, user, 3),  # IOVA past what a device addresses
            ((1 << 64) - PAGE, PAGE, user, 3)]:
        with pytest.raises(RequestFailed):
            d.fe.iotlb_update(iova, size, uaddr, perm)
    d.fe.iotlb_update(OFFSET + 8 * MiB, PAGE, user, 3)
    with pytest.raises(RequestFailed):      # another translation of the same IOVA
        d.fe.iotlb_update(OFFSET + 8 * MiB, PAGE, user + PAGE, 3)
    with pytest.raises(RequestFailed):
        d.fe.iotlb_invalidate(OFFSET, 0)
    with pytest.raises(RequestFailed):      # a type a front-end never sends (MISS)
        d.fe._iotlb_msg(pyvhost.protocol.IotlbMsg(OFFSET, PAGE, user, 3, 1))
    # and it still works
    d.fe.post_rx_buffers(0, 20, 2048)
    d.fe.send_frames(1, [frame(9, 64)])
    assert d.receive(1) == [frame(9, 64)]
    s = d.close()
    assert s["iotlb_refused"] >= 9 and s["queues_broken"] == 0


def test_iotlb_msg_without_iommu_platform_is_refused(tmp_path):
    with DeviceSession(lambda: NetDevice(1, source="loopback"), tmp_path / "n.sock",
                       features=1 << VIRTIO_F_VERSION_1, protocol=PROTOCOL) as s:
        with pytest.raises(RequestFailed):
            s.fe.iotlb_update(0, PAGE, s.ram.gpa_to_user(0), 3)
        assert s.fe.get_status() == 0   # the connection goes on


# ------------------------------------------------------------------ the Python device tier --

class Upper(pyvhost.Device):
    device_id = 4
    num_queues = 1

    def handle(self, queue: int, request: pyvhost.Request) -> int:
        return request.write(request.read().upper())


@pytest.mark.parametrize("access", ["direct", "copy"])
def test_python_device_through_the_iotlb(tmp_path, access):
    with DeviceSession(Upper, tmp_path / "u.sock", features=BASE, protocol=PROTOCOL,
                       options=BackendOptions(metadata_access=access)) as s:
        s.fe.serve_iotlb_misses(s.fe.identity_pages(s.ram, OFFSET))
        s.fe.setup_queue(0, MockSplitQueue(s.ram, 64, iova_offset=OFFSET))
        s.fe.enable_queue(0)
        for k in range(20):
            text = f"hello {k} through the iommu ".encode() * (k + 1)
            used, data = s.request(0, readable=[text], writable=[len(text)])
            assert (used, data) == (len(text), text.upper())
        st = s.backend.stats()
        assert st["iotlb_misses"] > 0 and st["queues_broken"] == 0
        assert st[f"{access}_rounds"] > 0
