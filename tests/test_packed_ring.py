"""The packed virtqueue (VIRTIO_F_RING_PACKED) through the real daemon, on both metadata paths:
devices written with `pyvhost.Device` (the Python request tier) served over packed rings the
test driver (`MockPackedQueue`) plays, GET/SET_VRING_BASE's 32-bit form, event suppression,
indirect tables, queue sizes that are not powers of two, and the negotiated features reported.
"""

from __future__ import annotations

import pytest

import pyvhost
from pyvhost.daemon.backend import BackendOptions
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol.messages import VringState
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, \
    VIRTIO_RING_F_INDIRECT_DESC
from pyvhost.ring.packed_layout import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
                                        VIRTIO_F_RING_PACKED, PackedBase)
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.session import DeviceSession

PACKED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED)
PACKED_ALL = PACKED | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
PATHS = ["direct", "copy"]


class Echo(pyvhost.Device):
    """Writes back what it reads, reversed, then a marker byte per writable byte left."""

    device_id = 4
    num_queues = 1

    def handle(self, queue: int, request: pyvhost.Request) -> int:
        data = request.read()[::-1]
        n = min(len(data), request.writable_size)
        request.write(data[:n])
        return n


def session(sock, path: str, features: int = PACKED_ALL) -> DeviceSession:
    return DeviceSession(Echo, sock, features=features,
                         options=BackendOptions(metadata_access=path))


def _round_trips(s: DeviceSession, d, count: int, chunk: int) -> None:
    sent = 0
    while sent < count:
        n = min(chunk, count - sent, d.num_free // 2)
        ids = []
        payloads = []
        for k in range(n):
            p = bytes([(sent + k) & 0xFF]) * (1 + (sent + k) % 7) + b"xyz"
            payloads.append(p)
            # Two-descriptor chains (readable, writable) make slots and IDs differ.
            ids.append(d.add_chain([p], [len(p)]))
        d.publish()
        if d.needs_kick():
            s.fe.kick(0)
        used = s.wait_used(0, n)
        assert [i for i, _ in used] == ids
        for (i, ln), p in zip(used, payloads):
            assert ln == len(p)
            assert d.written_data(i) == p[::-1]
        sent += n


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", [64, 37, 1])
def test_requests_round_trip_across_wraps(tmp_path, path, size):
    """Chains of two descriptors through a ring of any size, several laps (both wrap
    counters flip, positions wrap at a size that is not a power of two)."""
    with session(tmp_path / "d.sock", path) as s:
        d = s.start_queue(0, size=size)
        assert isinstance(d, MockPackedQueue)
        _round_trips(s, d, 5 * size + 3, chunk=max(1, size // 3) if size > 1 else 1) \
            if size > 1 else None
        if size == 1:
            # One slot: only one-descriptor chains fit.
            for k in range(5):
                ident = d.add_chain([], [4])
                d.publish()
                s.fe.kick(0)
                assert s.wait_used(0, 1) == [(ident, 0)]
        q = s.backend.vrings[0].queue
        assert q.packed
        stats = s.backend.stats()
        assert stats["features"] >> VIRTIO_F_RING_PACKED & 1
        key = "direct_rounds" if path == "direct" else "copy_rounds"
        assert stats[key] > 0 and stats["copy_rounds" if path == "direct" else "direct_rounds"] == 0


@pytest.mark.parametrize("path", PATHS)
def test_indirect_chains(tmp_path, path):
    with session(tmp_path / "d.sock", path) as s:
        d = s.start_queue(0, size=16)
        for lap in range(3):
            ids = [d.add_indirect_chain([b"ab", b"cdef"], [1, 2, 3]) for _ in range(10)]
            d.publish()
            s.fe.kick(0)
            used = s.wait_used(0, 10)
            assert [i for i, _ in used] == ids
            assert all(ln == 6 for _, ln in used)
            assert d.written_data(ids[0]) == b"fedcba"


@pytest.mark.parametrize("path", PATHS)
def test_vring_base_32_bits(tmp_path, path):
    """GET_VRING_BASE answers avail | wrap << 15 | used << 16 | wrap << 31; the ring resumes
    from it (QEMU's form) and from virtio-user's low half (used = avail)."""
    with session(tmp_path / "d.sock", path) as s:
        d = s.start_queue(0, size=10)
        assert d.vring_base == 0x80008000  # what QEMU sends for a new ring
        _round_trips(s, d, 13, chunk=4)    # 26 slots: 2 laps and 6
        base = s.fe.get_vring_base(0)
        assert PackedBase.decode(base) == PackedBase(6, 1, 6, 1)
        assert base == d.vring_base
        # Restart from it (QEMU: both halves), go on.
        s.fe.setup_queue(0, d)
        s.fe.enable_queue(0)
        _round_trips(s, d, 7, chunk=3)
        base = s.fe.get_vring_base(0)
        assert PackedBase.decode(base) == PackedBase(0, 1, 0, 1)  # 40 slots: four laps
        assert base == 0x80008000
        # virtio-user's form: the low half only.
        d.base_form = "virtio-user"
        s.fe.setup_queue(0, d)
        s.fe.enable_queue(0)
        _round_trips(s, d, 9, chunk=3)
        assert s.fe.get_vring_base(0) == PackedBase(8, 0, 8, 0).encode() == 8 << 16 | 8


def test_base_outside_the_ring_is_refused(tmp_path, caplog):
    with session(tmp_path / "d.sock", "auto") as s:
        s.fe._acked(R.SET_VRING_NUM, VringState(0, 10))
        with pytest.raises(Exception, match="refused SET_VRING_BASE"):
            s.fe._acked(R.SET_VRING_BASE, VringState(0, 0x8000 | 12))
        assert "outside a ring of 10" in caplog.text


@pytest.mark.parametrize("path", PATHS)
def test_event_suppression(tmp_path, path):
    """Calls follow the driver's event area: DISABLE none, DESC at off_wrap; with EVENT_IDX
    the device asks for kicks with DESC at its next descriptor."""
    with session(tmp_path / "d.sock", path) as s:
        d = s.start_queue(0, size=8)
        fe = s.fe
        d.set_no_interrupt(True)
        ident = d.add_chain([b"a"], [1])
        d.publish()
        fe.kick(0)
        assert s.wait_used(0, 1) == [(ident, 1)]
        # interrupt-driven worker: idle again, kicks re-enabled with DESC at next avail
        for _ in range(200):
            if d.device_event_flags() == RING_EVENT_FLAGS_DESC:
                break
            import time
            time.sleep(0.005)
        assert d.device_event_flags() == RING_EVENT_FLAGS_DESC
        assert d.device_event_off_wrap() == d.next_avail | d.avail_wrap << 15
        # DESC: interrupt when the used descriptor at (4, wrap 1) is written.
        d.set_used_event(4, 1)
        _drain_calls(fe)
        for k in range(2):  # slots 2,3 then 4,5: the second batch passes 4
            ident = d.add_chain([b"b"], [1])
            d.publish()
            assert d.needs_kick()
            fe.kick(0)
            assert s.wait_used(0, 1) == [(ident, 1)]
            if k == 0:
                assert not _drain_calls(fe)
        assert fe.wait_call(0, timeout=5) >= 1
        assert RING_EVENT_FLAGS_DISABLE != RING_EVENT_FLAGS_DESC


def _drain_calls(fe) -> int:
    import os
    import select
    q = fe._queue(0)
    r, _, _ = select.select([q.call], [], [], 0.05)
    return os.eventfd_read(q.call.fileno()) if r else 0


def test_split_still_refuses_a_32_bit_base(tmp_path, caplog):
    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    with session(tmp_path / "d.sock", "auto", features) as s:
        s.fe._acked(R.SET_VRING_NUM, VringState(0, 8))
        with pytest.raises(Exception, match="refused SET_VRING_BASE"):
            s.fe._acked(R.SET_VRING_BASE, VringState(0, 0x80008000))
        assert "not a split ring index" in caplog.text
        assert not s.backend.stats()["features"] >> VIRTIO_F_RING_PACKED & 1
