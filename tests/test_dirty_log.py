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
