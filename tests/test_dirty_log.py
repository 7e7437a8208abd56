"""Dirty logging (live migration) without a VM: every page the device writes is in the log.

Each round, the driver writes its descriptors and buffers, the test snapshots guest memory,
and only then publishes the chains (the avail index, the driver's only write after the
snapshot) and kicks. The device processes them while a reader thread consumes the log as QEMU
does (xchg each chunk with 0). Every page that changed between the snapshot and the end of
the round — the device's writes: received frames, used rings, Python devices' buffers — must
have been seen in the log. Random workloads, both metadata paths.
"""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest

import pyvhost
from pyvhost.daemon.backend import BackendOptions
from pyvhost.devices.net.device import VIRTIO_NET_F_MRG_RXBUF, NetDevice
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.protocol import U64
from pyvhost.protocol.constants import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG
from pyvhost.protocol.messages import LogDesc
from pyvhost.ring.layout import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, avail_ring_size,
                                 used_ring_size)
from pyvhost.testing.dirty_log import LogMemfd, LogReader
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.session import PROTOCOL, DeviceSession

PAGE = 4096
RAM_MIB = 4
DEADLINE = 60.0  # a bound against hangs (a cold numba cache compiles for a while)


class Scribble(pyvhost.Device):
    """Request: u32 offset, u32 length. Writes `length` random bytes at `offset`."""

    num_queues = 2

    def handle(self, queue, request):
        offset, length = request.read_struct("II")
        request.write(os.urandom(length), offset)
        return offset + length


def _start_logging(s: DeviceSession, log: LogMemfd, features: int, queues) -> None:
    """As QEMU's vhost_migration_log(true): SET_LOG_BASE, SET_FEATURES+LOG_ALL, then
    SET_VRING_ADDR with VHOST_VRING_F_LOG and the used ring's GPA for every started ring."""
    s.fe.request(R.SET_LOG_BASE, LogDesc(log.size, 0), fds=[log.fd])
    s.fe.request(R.SET_FEATURES, U64(features | (1 << VHOST_F_LOG_ALL)), need_reply=True)
    for index, driver in queues.items():
        s.fe.set_vring_addr(index, flags=1 << VHOST_VRING_F_LOG, log=driver.used_ring)


def _queue(s: DeviceSession, index: int, size: int) -> MockSplitQueue:
    """A ring whose used ring has pages of its own (the driver never writes them)."""
    used = s.ram.alloc(used_ring_size(size), PAGE)
    s.ram.alloc(PAGE, PAGE)  # what comes next starts on another page
    event_idx = bool(s.negotiated.features >> VIRTIO_RING_F_EVENT_IDX & 1)
    d = MockSplitQueue(s.ram, size, used=used, event_idx=event_idx)
    s.ram.alloc(PAGE, PAGE)
    s.fe.setup_queue(index, d)
    s.fe.enable_queue(index)
    return d


def _snapshot(s: DeviceSession) -> np.ndarray:
    return np.frombuffer(s.ram.read(0, RAM_MIB << 20), dtype=np.uint8).reshape(-1, PAGE)


def _changed_pages(before: np.ndarray, after: np.ndarray, exclude: set[int]) -> set[int]:
    return set(np.flatnonzero((before != after).any(axis=1)).tolist()) - exclude


def _avail_pages(d: MockSplitQueue) -> set[int]:
    return set(range(d.avail_ring // PAGE, (d.avail_ring + avail_ring_size(d.size) - 1) // PAGE + 1))


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


@pytest.mark.parametrize("path", ["direct", "copy"])
@pytest.mark.parametrize("mergeable", [True, False])
def test_net_loopback_every_written_page_is_logged(tmp_path, path, mergeable):
    rng = random.Random(f"{path}{mergeable}")
    features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
                | ((1 << VIRTIO_NET_F_MRG_RXBUF) if mergeable else 0))
    log = LogMemfd(RAM_MIB << 20)
    with DeviceSession(lambda: NetDevice(1, source="loopback"), tmp_path / "net.sock",
                       features=features, options=BackendOptions(metadata_access=path),
                       ram_mib=RAM_MIB, protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        rx, tx = _queue(s, 0, 256), _queue(s, 1, 256)
        _start_logging(s, log, s.negotiated.features, {0: rx, 1: tx})
        excluded = _avail_pages(rx) | _avail_pages(tx)
        sent = 0
        with LogReader(log) as reader:
            for _ in range(12):
                frames = [os.urandom(rng.randint(14, 1500)) for _ in range(rng.randint(1, 24))]
                for _ in range(len(frames) * (7 if mergeable else 1)):
                    if rx.num_free:
                        rx.add_chain([], [256 if mergeable else 1526])
                for f in frames:
                    tx.add_chain([bytes(12) + f], [])
                before = _snapshot(s)
                rx.publish()
                tx.publish()
                s.fe.kick(0)
                s.fe.kick(1)
                sent += len(frames)
                _wait(lambda: s.device.stats()["rx_packets"] == sent, "frames not received")
                _wait(lambda: tx.used_idx() == tx.published_avail, "TX not completed")
                changed = _changed_pages(before, _snapshot(s), excluded)
                assert changed, "the device wrote nothing?"
                missing = changed - log.pages()
                assert not missing, f"pages written but not logged: {sorted(missing)}"
                rx.used()
                tx.used()
        assert reader.passes > 0
        stats = s.backend.stats()
        assert stats["log_enabled"] == 1 and stats["log_pages"] > 0
        assert stats[f"{path}_rounds"] > 0
    log.close()


@pytest.mark.parametrize("path", ["direct", "copy"])
def test_python_device_every_written_page_is_logged(tmp_path, path):
    rng = random.Random(path)
    log = LogMemfd(RAM_MIB << 20)
    with DeviceSession(Scribble, tmp_path / "dev.sock", options=BackendOptions(
            metadata_access=path), ram_mib=RAM_MIB,
            protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        queues = {0: _queue(s, 0, 128), 1: _queue(s, 1, 128)}
        _start_logging(s, log, s.negotiated.features, queues)
        excluded = set().union(*(_avail_pages(d) for d in queues.values()))
        with LogReader(log):
            for _ in range(10):
                heads = {}
                for index, d in queues.items():
                    heads[index] = 0
                    for _ in range(rng.randint(1, 30)):
                        bufs = [rng.randint(1, 6000) for _ in range(rng.randint(1, 4))]
                        offset = rng.randint(0, sum(bufs) - 1)
                        length = rng.randint(0, sum(bufs) - offset)
                        d.add_chain([struct.pack("<II", offset, length)], bufs)
                        heads[index] += 1
                before = _snapshot(s)
                for index, d in queues.items():
                    d.publish()
                    s.fe.kick(index)
                for index, d in queues.items():
                    _wait(lambda: d.used_idx() == d.published_avail, "requests not completed")
                changed = _changed_pages(before, _snapshot(s), excluded)
                missing = changed - log.pages()
                assert not missing, f"pages written but not logged: {sorted(missing)}"
                for d in queues.values():
                    d.used()
        assert s.backend.queues_broken == 0
    log.close()


@pytest.mark.parametrize("path", ["direct", "copy"])
def test_blk_reads_every_written_page_is_logged(tmp_path, path):
    """Block reads land in guest memory from I/O threads (deferred) or from handle() (the page
    cache fast path), through host iovecs: the worker logs them when it publishes."""
    from pyvhost.devices.blk import BlkDevice, BlkImage

    rng = random.Random(path)
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    log = LogMemfd(RAM_MIB << 20)
    blk = BlkImage.open(image)
    with DeviceSession(lambda: BlkDevice(blk, queues=1), tmp_path / "blk.sock",
                       options=BackendOptions(metadata_access=path), ram_mib=RAM_MIB,
                       protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        d = _queue(s, 0, 128)
        _start_logging(s, log, s.negotiated.features, {0: d})
        excluded = _avail_pages(d)
        with LogReader(log):
            for _ in range(8):
                for _ in range(rng.randint(1, 24)):
                    sectors = rng.randint(1, 24)
                    sector = rng.randint(0, (1 << 11) - sectors)
                    cuts = sorted(rng.sample(range(1, sectors * 512), min(2, sectors * 512 - 1)))
                    bufs = [b - a for a, b in zip([0] + cuts, cuts + [sectors * 512]) if b > a]
                    d.add_chain([struct.pack("<IIQ", 0, 0, sector)], bufs + [1])  # IN
                before = _snapshot(s)
                d.publish()
                s.fe.kick(0)
                _wait(lambda: d.used_idx() == d.published_avail, "reads not completed")
                changed = _changed_pages(before, _snapshot(s), excluded)
                assert changed
                missing = changed - log.pages()
                assert not missing, f"pages written but not logged: {sorted(missing)}"
                d.used()
        assert s.backend.queues_broken == 0
    log.close()


def test_logging_off_and_a_new_log(tmp_path):
    """LOG_ALL off (migration cancelled): nothing is logged any more; a new SET_LOG_BASE
    while logging: the new log gets the bits, the old one no longer changes."""
    first, second = LogMemfd(RAM_MIB << 20), LogMemfd(RAM_MIB << 20)
    with DeviceSession(Scribble, tmp_path / "dev.sock", ram_mib=RAM_MIB,
                       protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        d = _queue(s, 0, 64)
        features = s.negotiated.features
        _start_logging(s, first, features, {0: d})

        def scribble(n: int = 8) -> None:
            for _ in range(n):
                d.add_chain([struct.pack("<II", 0, 100)], [100])
            d.publish()
            s.fe.kick(0)
            _wait(lambda: d.used_idx() == d.published_avail, "not completed")
            d.used()

        scribble()
        assert first.pages()
        s.fe.request(R.SET_LOG_BASE, LogDesc(second.size, 0), fds=[second.fd])
        first.seen[:] = False
        scribble()
        assert second.pages() and not first.pages()
        s.fe.request(R.SET_FEATURES, U64(features), need_reply=True)  # LOG_ALL off
        second.seen[:] = False
        scribble()
        assert not second.pages()
        assert s.backend.stats()["log_enabled"] == 0
    first.close()
    second.close()


# -- the log cache of the kernels, without a session: exactly the pages written get bits ------

def _kernel_memory(log_addr: int, log_size: int) -> tuple:
    """A KernelMemory with no regions and a log (log_ranges translates nothing)."""
    empty = np.zeros(0, np.int64)
    return (empty, empty, empty, empty, empty, np.array([log_addr, log_size], np.int64),
            empty, empty, empty)  # no device IOTLB (KM_PERM, KM_RUN_GPA, KM_IOTLB)


@pytest.mark.parametrize("misalign", [0, 3])  # an 8-byte aligned log (word ORs) or not (bytes)
@pytest.mark.parametrize("log_size", [64, 61])  # bytes: whole words, or a tail of 5 bytes
def test_log_cache_sets_exactly_the_pages_of_each_range(misalign, log_size):
    """Ranges straddling pages, log bytes and 64-page words, longer than a word, beyond the
    log's end, repeated, descending, more words than the cache holds: after log_ranges the log
    has the bits of exactly the pages written (within it), whatever was set before stays, and
    what lies beyond is counted as dropped."""
    from pyvhost.ring import kernels as K

    rng = random.Random(f"{misalign}/{log_size}")
    pages_in_log = log_size * 8
    backing = np.zeros(log_size + 16, np.uint8)
    start = (-backing.ctypes.data) % 8 + misalign
    log = backing[start:start + log_size]
    mem = _kernel_memory(log.ctypes.data, log_size)
    cases = [
        [(PAGE - 1, 2)],                          # straddles pages 0 and 1
        [(7 * PAGE + 100, PAGE)],                 # pages 7 and 8: a log byte boundary
        [(63 * PAGE, PAGE + 1)],                  # pages 63, 64: a word boundary
        [(5 * PAGE, 200 * PAGE)],                 # more than three words
        [(3 * PAGE, 10), (3 * PAGE + 10, 10), (3 * PAGE, 1)],  # the same page again
        [(100 * PAGE, 1), (2 * PAGE, 1), (300 * PAGE, 1), (70 * PAGE, 1)],  # any order
        [((pages_in_log - 2) * PAGE, 5 * PAGE)],  # runs off the end of the log
        [(k * 64 * PAGE % (pages_in_log * PAGE), 1) for k in range(200)],  # > cache entries
        [(rng.randrange(0, (pages_in_log + 40) * PAGE), rng.randint(1, 3 * PAGE))
         for _ in range(300)],
    ]
    for ranges in cases:
        before = np.array([rng.getrandbits(8) & rng.getrandbits(8) for _ in range(log_size)],
                          np.uint8)
        log[:] = before
        q = np.zeros(K.QSTATE_LEN, np.int64)
        gpas = np.array([g for g, _ in ranges], np.int64)
        lens = np.array([n for _, n in ranges], np.int64)
        K.log_ranges(mem, q, gpas, lens, len(ranges))
        written = {p for g, n in ranges for p in range(g // PAGE, (g + n - 1) // PAGE + 1)}
        expected = before.copy()
        for p in written:
            if p < pages_in_log:
                expected[p >> 3] |= 1 << (p & 7)
        assert log.tobytes() == expected.tobytes(), ranges
        assert q[K.Q_LOG_N] == 0
        beyond = {p for p in written if p >= pages_in_log}
        assert q[K.Q_LOG_PAGES] >= len(written - beyond)
        assert (q[K.Q_LOG_DROPPED] > 0) == bool(beyond)
        assert backing[:start].sum() == 0 and backing[start + log_size:].sum() == 0


@pytest.mark.parametrize("path", ["direct", "copy"])
def test_used_ring_writes_logged_per_burst_across_the_wrap(path):
    """Used elements are logged once per burst, as the slots it filled, used->idx and
    avail_event apart: a burst that wraps from the end of a 3-page used ring to its start logs
    the first and last pages and not the middle one; every page written is logged before
    push_used_burst returns."""
    from pyvhost.fd import OwnedFd
    from pyvhost.memory.dirty_log import DirtyLog
    from pyvhost.ring import kernels as K
    from pyvhost.testing.guest_ram import GuestRam
    from pyvhost.testing.pairing import backend_memory, device_queue

    size = 1024  # used ring: 4 + 8 * 1024 + 2 bytes, from the middle of a page over 3 pages
    ram = GuestRam([(0, 1 << 20)])
    base = ram.alloc(3 * PAGE, PAGE) + PAGE // 2
    driver = MockSplitQueue(ram, size, used=base, event_idx=True)
    memory = backend_memory(ram)
    queue = device_queue(driver, memory, metadata_access=path)
    log = LogMemfd(1 << 20)
    memory.set_log(DirtyLog(OwnedFd(os.dup(log.fd)), log.size, 0))
    memory.set_log_all(True)
    queue.set_used_log(driver.used_ring)
    try:
        table = memory.table
        views = queue.round_views(table)
        mem = table.kernel()

        def pages(offset: int, n: int) -> set[int]:
            return set(range((base + offset) // PAGE, (base + offset + n - 1) // PAGE + 1))

        for first, n in [(0, 3), (300, 200), (1000, 40), (1020, 1030), (5, 1)]:
            queue.q[K.Q_NEXT_USED] = queue.q[K.Q_LOG_USED_FROM] = first  # as a ring start
            log.seen[:] = False
            log.consume()
            heads = np.arange(n, dtype=np.int64) % size
            assert K.push_used_burst(mem, queue.q, views, heads, heads, n) >= 0
            expect = pages(2, 2)  # used->idx
            for k in range(n):
                expect |= pages(4 + 8 * ((first + k) % size), 8)
            assert log.pages() == expect, (first, n)
            assert queue.q[K.Q_LOG_N] == 0
            assert queue.q[K.Q_LOG_USED_HI] <= queue.q[K.Q_LOG_USED_LO]
        log.seen[:] = False
        log.consume()
        K.enable_notification(mem, queue.q, views)  # writes avail_event, at the ring's end
        assert log.pages() == pages(4 + 8 * size, 2)
        assert queue.q[K.Q_ERROR] == 0
    finally:
        queue.drop_views()
        memory.close()
        ram.close()
        log.close()


def test_bench_log_all_logs_without_the_frontend_asking(tmp_path):
    """`--bench-log-all` (BackendOptions.bench_log_all): a frontend that negotiates neither
    LOG_SHMFD nor LOG_ALL still gets every page written logged — into the backend's own log,
    which its thread clears as QEMU would — with the used rings logged at their GPAs."""
    from pyvhost.ring import kernels as K

    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    with DeviceSession(lambda: NetDevice(1, source="loopback"), tmp_path / "net.sock",
                       features=features, options=BackendOptions(bench_log_all=True),
                       ram_mib=RAM_MIB) as s:
        rx, tx = _queue(s, 0, 256), _queue(s, 1, 256)
        for vr, d in zip(s.backend.vrings, (rx, tx)):
            assert vr.queue.q[K.Q_FLAGS] & K.F_LOG_USED
            assert vr.queue.q[K.Q_LOG_USED] == d.used_ring  # the GPA (user addresses differ)
        sent = 0
        for _ in range(5):
            for _ in range(16):
                rx.add_chain([], [1526])
                tx.add_chain([bytes(12) + os.urandom(60)], [])
            rx.publish()
            tx.publish()
            s.fe.kick(0)
            s.fe.kick(1)
            sent += 16
            _wait(lambda: s.device.stats()["rx_packets"] == sent, "frames not received")
            rx.used()
            tx.used()
            time.sleep(0.03)  # a few passes of the clearing thread
        _wait(lambda: s.backend.self_log.pages_cleared > 0, "the clearing thread saw no bit")
        stats = s.backend.stats()
        assert stats["log_simulated"] == 1 and stats["log_enabled"] == 1
        assert stats["log_pages"] > 0 and stats["log_dropped"] == 0
        assert stats["log_sync_passes"] > 0


@pytest.mark.parametrize("path", ["direct", "copy"])
def test_bits_of_a_burst_that_broke_off_are_set_before_get_vring_base(tmp_path, path):
    """A receive burst writes a frame into the first buffer, then finds a head out of range
    and breaks the ring before it publishes: the frame's page and its used element are still
    written guest memory, so their bits are set by the time GET_VRING_BASE is answered."""
    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    log = LogMemfd(RAM_MIB << 20)
    with DeviceSession(lambda: NetDevice(1, source="loopback"), tmp_path / "net.sock",
                       features=features, options=BackendOptions(metadata_access=path),
                       ram_mib=RAM_MIB, protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        rx, tx = _queue(s, 0, 256), _queue(s, 1, 256)
        _start_logging(s, log, s.negotiated.features, {0: rx, 1: tx})
        head = rx.add_chain([], [1526])
        buffer = rx._in_flight[head].writable[0][0]
        rx.add_raw_head(999)  # out of range: the ring breaks at the second frame
        rx.publish()
        for _ in range(2):
            tx.add_chain([bytes(12) + os.urandom(100)], [])
        before = _snapshot(s)
        tx.publish()  # both frames in one TX burst, so one RX burst takes both
        s.fe.kick(1)
        _wait(lambda: s.backend.queues_broken == 1, "the RX ring did not break")
        changed = _changed_pages(before, _snapshot(s), _avail_pages(rx) | _avail_pages(tx))
        assert buffer // PAGE in changed  # the first frame was written
        s.fe.get_vring_base(0)
        missing = changed - log.pages()
        assert not missing, f"pages written but not logged: {sorted(missing)}"
    log.close()
