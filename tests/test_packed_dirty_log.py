"""Dirty logging over packed rings: every page the device writes — used descriptors in the
descriptor ring, the device event area, received frames, Python devices' buffers — is in the
log, on both metadata paths (test_dirty_log.py's method: snapshot guest memory, publish, let the
device work while a reader consumes the log as QEMU does, compare).

vhost-user gives one log address per ring (SET_VRING_ADDR log_guest_addr), which QEMU sets to
the device event area's GPA for a packed ring; the used descriptors' pages are found through
the region table.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from test_dirty_log import (DEADLINE, PAGE, RAM_MIB, Scribble, _changed_pages,  # noqa: F401
                            _snapshot, _wait)

from pyvhost.daemon.backend import BackendOptions
from pyvhost.devices.net.device import VIRTIO_NET_F_MRG_RXBUF, NetDevice
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.protocol import U64
from pyvhost.protocol.constants import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG
from pyvhost.protocol.messages import LogDesc
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.ring.packed_layout import VIRTIO_F_RING_PACKED, desc_ring_size
from pyvhost.testing.dirty_log import LogMemfd, LogReader
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.session import PROTOCOL, DeviceSession

PACKED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_RING_PACKED)


def _start_logging(s: DeviceSession, log: LogMemfd, features: int, queues) -> None:
    s.fe.request(R.SET_LOG_BASE, LogDesc(log.size, 0), fds=[log.fd])
    s.fe.request(R.SET_FEATURES, U64(features | (1 << VHOST_F_LOG_ALL)), need_reply=True)
    for index, driver in queues.items():
        s.fe.set_vring_addr(index, flags=1 << VHOST_VRING_F_LOG, log=driver.device_event)


def _queue(s: DeviceSession, index: int, size: int) -> MockPackedQueue:
    """A ring whose descriptor ring and event areas have pages of their own."""
    desc = s.ram.alloc(desc_ring_size(size), PAGE)
    s.ram.alloc(PAGE, PAGE)
    device_event = s.ram.alloc(4, PAGE)
    driver_event = s.ram.alloc(4, PAGE)
    s.ram.alloc(PAGE, PAGE)
    d = MockPackedQueue(s.ram, size, desc=desc, driver_event=driver_event,
                        device_event=device_event, event_idx=True)
    s.fe.setup_queue(index, d)
    s.fe.enable_queue(index)
    return d


@pytest.mark.parametrize("path", ["direct", "copy"])
def test_python_device_over_packed_every_written_page_is_logged(tmp_path, path):
    rng = random.Random(path)
    log = LogMemfd(RAM_MIB << 20)
    with DeviceSession(Scribble, tmp_path / "dev.sock", features=PACKED,
                       options=BackendOptions(metadata_access=path), ram_mib=RAM_MIB,
                       protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        queues = {0: _queue(s, 0, 100), 1: _queue(s, 1, 100)}
        _start_logging(s, log, s.negotiated.features, queues)
        with LogReader(log):
            for _ in range(10):
                counts = {}
                for index, d in queues.items():
                    counts[index] = 0
                    while counts[index] < rng.randint(1, 30) and d.num_free >= 5:
                        bufs = [rng.randint(1, 6000) for _ in range(rng.randint(1, 4))]
                        offset = rng.randint(0, sum(bufs) - 1)
                        length = rng.randint(0, sum(bufs) - offset)
                        d.add_chain([struct.pack("<II", offset, length)], bufs)
                        counts[index] += 1
                before = _snapshot(s)
                for index, d in queues.items():
                    d.publish()
                    s.fe.kick(index)
                for index, d in queues.items():
                    _wait(lambda: len(d.used()) >= 0 and d.in_flight == 0,
                          "requests not completed")
                changed = _changed_pages(before, _snapshot(s), set())
                missing = changed - log.pages()
                assert not missing, f"pages written but not logged: {sorted(missing)}"
        assert s.backend.queues_broken == 0
        assert s.backend.stats()[f"{path}_rounds"] > 0
    log.close()


@pytest.mark.parametrize("path", ["direct", "copy"])
@pytest.mark.parametrize("mergeable", [True, False])
def test_net_loopback_over_packed_every_written_page_is_logged(tmp_path, path, mergeable):
    rng = random.Random(f"{path}{mergeable}")
    features = PACKED | ((1 << VIRTIO_NET_F_MRG_RXBUF) if mergeable else 0)
    log = LogMemfd(RAM_MIB << 20)
    with DeviceSession(lambda: NetDevice(1, source="loopback"), tmp_path / "net.sock",
                       features=features, options=BackendOptions(metadata_access=path),
                       ram_mib=RAM_MIB, protocol=PROTOCOL | P.LOG_SHMFD.mask) as s:
        rx, tx = _queue(s, 0, 200), _queue(s, 1, 200)
        _start_logging(s, log, s.negotiated.features, {0: rx, 1: tx})
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
                _wait(lambda: len(tx.used()) >= 0 and tx.in_flight == 0, "TX not completed")
                changed = _changed_pages(before, _snapshot(s), set())
                assert changed, "the device wrote nothing?"
                missing = changed - log.pages()
                assert not missing, f"pages written but not logged: {sorted(missing)}"
                rx.used()
        assert reader.passes > 0
        stats = s.backend.stats()
        assert stats["log_enabled"] == 1 and stats["log_pages"] > 0
        assert stats[f"{path}_rounds"] > 0
    log.close()
