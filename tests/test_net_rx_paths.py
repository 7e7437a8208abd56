"""RX delivery (`rx_deliver`) gives the same result on the direct map, whose fast path writes a
frame straight into a lone writable buffer that holds it, as on the copy path: the same used
elements, the same bytes in guest memory, the same queue state and counters, for any mix of
buffer shapes the driver posts and frames of any size, mergeable or not."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.devices.net.endpoints import FrameRing, _Segments
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

MiB = 1 << 20

buffer_shape = st.sampled_from(["big", "small", "two", "indirect", "read-only"])


def _post(driver: MockSplitQueue, shape: str) -> None:
    if shape == "big":
        driver.add_chain([], [2048])
    elif shape == "small":
        driver.add_chain([], [40])
    elif shape == "two":
        driver.add_chain([], [12, 600])
    elif shape == "indirect":
        driver.add_indirect_chain([], [2048])
    else:
        driver.add_chain([b"r" * 16], [])


def _deliver(mode: str, shapes: list[str], sizes: list[int], mergeable: bool):
    with GuestRam([(0, 4 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 64)
        for shape in shapes:
            _post(driver, shape)
        driver.publish()
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, index=0, metadata_access=mode)
        ring = FrameRing(64, 2048)
        for k, size in enumerate(sizes):
            slot = k & (ring.capacity - 1)
            ring.data[slot, RK.HDR:RK.HDR + size] = (np.arange(size) + 7 * k) & 0xFF
            ring.lens[slot] = RK.HDR + size
        ring.ctl[RK.R_TAIL] = len(sizes)
        result, counters = _rx_deliver(queue, memory, ring, mergeable)
        used = driver.used(strict=False)
        written = [driver.written_data(head, length) for head, length in used]
        out = (result, used, written, queue.q.tolist(), counters.tolist(), ring.ctl.tolist())
        queue.drop_views()
        memory.close()
        return out


def _rx_deliver(queue, memory, ring: FrameRing, mergeable: bool):
    """One rx_deliver of `ring`'s frames into `queue` (burst 32). Returns (its result as
    ints, the RX counters)."""
    segs = _Segments(32)
    segs.resize(64)
    counters = np.zeros(RK.RX_COUNTERS_LEN, np.int64)
    views = queue.round_views(memory.table)
    result = RK.rx_deliver(memory.table.kernel(), queue.q, views, mergeable, 32, segs.seg_addr,
                           segs.seg_len, segs.seg_flags, segs.chain_heads, segs.chain_ends,
                           ring.data, ring.lens, ring.ctl, counters)
    return tuple(int(x) for x in result), counters


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(buffer_shape, min_size=1, max_size=20),
       st.lists(st.integers(14, 1514), min_size=1, max_size=12), st.booleans())
def test_rx_delivery_is_the_same_on_both_paths(shapes, sizes, mergeable):
    direct = _deliver("direct", shapes, sizes, mergeable)
    copy = _deliver("copy", shapes, sizes, mergeable)
    assert direct[0] == copy[0] and direct[1] == copy[1] and direct[2] == copy[2]
    assert direct[4] == copy[4] and direct[5] == copy[5]
    q_direct, q_copy = direct[3], copy[3]
    assert q_direct[:8] + q_direct[9:] == q_copy[:8] + q_copy[9:]  # all but the path flag


def test_fast_path_frame_lands_whole_with_its_header():
    frames, used, written, *_ = _deliver("direct", ["big"] * 3, [60, 1514, 14], True)
    assert frames[0] == 3 and [length for _, length in used] == [72, 1526, 26]
    for data, size, k in zip(written, (60, 1514, 14), range(3)):
        assert data[:RK.HDR] == bytes(RK.HDR - 2) + b"\x01\x00"  # num_buffers = 1
        assert data[RK.HDR:] == bytes(((np.arange(size) + 7 * k) & 0xFF).astype(np.uint8))


@given(st.lists(st.tuples(st.integers(14, 300), st.integers(0, 127)), min_size=1, max_size=24),
       st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_small_frames_land_whole_at_any_alignment_over_stale_bytes(frames, keep_header):
    """The fast path copies a burst's frames first (small ones, STREAM_MAX, with non-temporal
    stores for the whole cache lines they cover) and then writes each header only where the
    buffer does not hold it already: whatever a buffer held before, it ends up holding
    exactly header + frame, and not a byte past it changes."""
    base = 1 * MiB
    span = 512
    with GuestRam([(0, 4 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 64)
        heads = []
        for k, (size, offset) in enumerate(frames):
            gpa = base + k * span + offset
            ram.write(gpa, bytes([0xA5 ^ k]) * (RK.HDR + size + 16))  # a previous frame's
            heads.append(driver.add_buffers([(gpa, RK.HDR + size + 16, True)]))
        driver.publish()
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, index=0, metadata_access="direct")
        ring = FrameRing(64, 2048)
        expected = []
        for k, (size, _offset) in enumerate(frames):
            header = bytes([k + 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x77, 0x77])
            frame = bytes(((np.arange(size) * 3 + k) & 0xFF).astype(np.uint8))
            ring.data[k, :RK.HDR] = np.frombuffer(header, np.uint8)
            ring.data[k, RK.HDR:RK.HDR + size] = np.frombuffer(frame, np.uint8)
            ring.lens[k] = RK.HDR + size
            kept = header[:10] if keep_header else bytes(10)
            expected.append(kept + b"\x01\x00" + frame + bytes([0xA5 ^ k]) * 16)
        ring.ctl[RK.R_TAIL] = len(frames)
        ring.ctl[RK.R_KEEP_HDR] = int(keep_header)
        result, _counters = _rx_deliver(queue, memory, ring, True)
        assert result[:2] == (len(frames), len(frames))
        assert driver.used() == [(h, RK.HDR + size) for h, (size, _o) in zip(heads, frames)]
        for k, (size, offset) in enumerate(frames):
            assert ram.read(base + k * span + offset, RK.HDR + size + 16) == expected[k], k
        assert queue.q[RK.K.Q_FLAGS] & RK.K.F_DIRECT  # the fast path served them
        queue.drop_views()
        memory.close()
