"""Inflight I/O tracking on a packed ring (ring/packed_inflight.py): a device "killed" at every
point of the pop / publish sequence restarts on the same guest ring and region and resubmits
exactly the chains it had taken and not published, in the order it took them, before new ones,
from the region's copies of their descriptors (the ring's were overwritten by used descriptors
of chains completed out of order); none is lost or used twice.

A kill is modelled as in test_ring_inflight.py: every piece of device state but guest memory
and the region is abandoned; the next life starts as a restarted device does under QEMU 7.2,
whose SET_VRING_BASE after a crash is the ring's base at its start (it restores nothing for
packed), then `InflightRing.recover_packed`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pyvhost.memory.address import UserAddress
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.ring import inflight as I
from pyvhost.ring import kernels as K
from pyvhost.ring import packed_inflight as PI
from pyvhost.ring.packed_layout import NEW_RING_BASE
from pyvhost.ring.virtqueue import Virtqueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.pairing import backend_memory

SIZE = 16
MiB = 1 << 20


class Life:
    """One run of the device on the ring: a fresh queue and tracking state over the same ring
    and region."""

    def __init__(self, driver: MockPackedQueue, memory: GuestMemory, region: np.ndarray) -> None:
        q = Virtqueue(0)
        q.set_features(event_idx=False, indirect=True, packed=True)
        q.set_size(driver.size)
        user = driver.ring_addresses().user
        q.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                        UserAddress(user.used_ring))
        q.set_base(NEW_RING_BASE.encode())  # what QEMU sends after our crash
        assert q.sync_used_from_ring(memory.table) is None
        q.inflight.attach(region, driver.size, packed=True)
        self.recovery = q.inflight.recover_packed(q.packed_base, driver.size,
                                                  q.descriptor_flags(memory.table))
        assert self.recovery.base is not None
        q.set_packed_base(self.recovery.base)
        self.q = q
        self.memory = memory
        self.heads = np.zeros(SIZE, np.int64)
        self.ends = np.zeros(SIZE, np.int64)
        self.seg = [np.zeros(4 * SIZE, np.int64) for _ in range(3)]
        self.segments: dict[int, list[tuple[int, int, int]]] = {}  # buffer id -> its segments

    @property
    def iv(self) -> tuple:
        return self.q.inflight.views

    def args(self) -> tuple:
        table = self.memory.table
        return table.kernel(), self.q.q, self.q.round_views(table)

    def pop(self, n: int) -> list[int]:
        """Buffer ids of up to n chains popped (resubmitted ones first); their segments are
        recorded in `segments`."""
        mem, q, views = self.args()
        got = I.pop_burst_inflight(mem, q, views, self.iv, n, self.heads, self.ends, *self.seg)
        assert got >= 0, self.q.error_text()
        start = 0
        out = []
        for k in range(got):
            end = int(self.ends[k])
            self.segments[int(self.heads[k]) & 0xFFFF] = [
                (int(self.seg[0][s]), int(self.seg[1][s]), int(self.seg[2][s]))
                for s in range(start, end)]
            start = end
            out.append(int(self.heads[k]))
        return out

    def complete(self, tokens: list[int]) -> None:
        """Publish tokens as one batch, the whole tracked sequence (either primitive)."""
        mem, q, views = self.args()
        arr = np.array(tokens, np.int64)
        if len(tokens) % 2:
            assert I.push_used_burst_inflight(mem, q, views, self.iv, arr, arr * 0 + 1,
                                              len(tokens)) >= 0
        else:
            for t in tokens:
                assert K.add_used(mem, q, views, t, 1)
            assert I.publish_used_inflight(mem, q, views, self.iv, arr, len(tokens))

    def complete_until(self, tokens: list[int], point: str) -> None:
        """The tracked publish of one batch, stopped (killed) at `point`."""
        mem, q, views = self.args()
        arr = np.array(tokens, np.int64)
        n = len(tokens)
        if point == "before_batch":
            return
        for t in tokens:
            assert K.add_used(mem, q, views, t, 1)
        if point == "added":
            return
        I.inflight_begin_batch(q, self.iv, arr, n)
        if point == "completing":
            return
        assert K.publish_used(mem, q, views)
        if point == "published":
            return
        entry = int(self.iv[5][tokens[0] & 0xFFFF])
        self.iv[0][PI.B_ENTRY0 + PI.ENTRY_SIZE * entry] = PI.FREE  # the first free
        if point == "half_freed":
            return
        I.inflight_end_batch(q, self.iv, arr, n)
        assert point == "done"


CRASH_POINTS = ["before_batch", "added", "completing", "published", "half_freed", "done"]
PUBLISHED = ("published", "half_freed", "done")


@pytest.fixture
def ring() -> tuple[GuestRam, GuestMemory]:
    with GuestRam([(0, 4 * MiB)]) as ram:
        memory = backend_memory(ram)
        try:
            yield ram, memory
        finally:
            memory.close()


def _chain(driver: MockPackedQueue, tag: int, rnd: random.Random | None = None) -> int:
    """A chain of 1 (indirect) or 2-3 ring descriptors (a request, its status byte)."""
    data = [tag.to_bytes(4, "little")]
    kind = rnd.randrange(3) if rnd is not None else tag % 3
    if kind == 0:
        return driver.add_indirect_chain(data, [1])
    if kind == 1:
        return driver.add_chain(data, [1])
    return driver.add_chain(data + [b"x" * 8], [1])


def _ids(tokens: list[int]) -> list[int]:
    return [t & 0xFFFF for t in tokens]


def _region() -> np.ndarray:
    return np.zeros(I.queue_region_size(SIZE, packed=True), np.uint8)


@pytest.mark.parametrize("laps", [0, 3])  # 3: the ring has wrapped (both wrap counters 0/1)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_publish_resubmits_exactly_the_unpublished(ring, point: str,
                                                               laps: int) -> None:
    ram, memory = ring
    driver = MockPackedQueue(ram, SIZE)
    region = _region()
    life = Life(driver, memory, region)
    assert life.recovery.fresh
    for lap in range(laps * 4):  # move the ring on, a few chains at a time
        ids = [_chain(driver, 1000 + 4 * lap + i) for i in range(4)]
        driver.publish()
        life.complete(life.pop(SIZE))
        assert sorted(i for i, _ in driver.used()) == sorted(ids)
    ids = [_chain(driver, i) for i in range(8)]
    driver.publish()
    popped = life.pop(6)  # ids[6:] stay in the ring: taken by nobody
    assert _ids(popped) == ids[:6]
    first = dict(life.segments)
    # Out of order: the used descriptors of 2 and 0 overwrite the ring slots of 0 and 1.
    life.complete([popped[2], popped[0]])
    batch = [popped[4], popped[1]]
    life.complete_until(batch, point)
    used_before = [i for i, _ in driver.used()]

    life2 = Life(driver, memory, region)  # the restarted device
    published = point in PUBLISHED
    expect = [ids[i] for i in (1, 3, 4, 5) if not published or i in (3, 5)]
    assert used_before == [ids[2], ids[0]] + (_ids(batch) if published else [])
    rec = life2.recovery
    assert rec.cleared == {"published": 2, "half_freed": 1}.get(point, 0)
    assert rec.rolled_back == (2 if point == "completing" else 0)
    more = [_chain(driver, 100 + i) for i in range(2)]
    driver.publish()
    order = life2.pop(SIZE)
    assert _ids(order) == expect + ids[6:] + more  # resubmitted first, in the order taken
    for ident in expect:  # from the region's copies: the same buffers as the first pop
        assert life2.segments[ident] == first[ident]
    life2.complete(order)
    assert sorted(i for i, _ in driver.used()) == sorted(_ids(order))  # strict: none twice
    assert driver.in_flight == 0
    entries = life2.iv[0][PI.B_ENTRY0:PI.B_ENTRY0 + PI.ENTRY_SIZE * SIZE:PI.ENTRY_SIZE]
    assert not entries.any()


@pytest.mark.parametrize("seed", range(40))
def test_random_kills_lose_and_repeat_nothing(ring, seed: int) -> None:
    """Random bursts, out-of-order batches and kills at random points, over several lives:
    every life resubmits what its predecessors took and did not publish, in the order they
    took it, with the buffers they had, before anything new; at the end every chain offered
    was used exactly once."""
    ram, memory = ring
    rnd = random.Random(seed)
    driver = MockPackedQueue(ram, SIZE)
    region = _region()
    offered = used = 0
    taken: list[int] = []  # ids taken by some life and not published, in the order taken
    segments: dict[int, list[tuple[int, int, int]]] = {}
    for _ in range(8):  # lives
        life = Life(driver, memory, region)
        assert len(life.recovery.resubmit) == len(taken)
        to_retake = list(taken)
        tokens: dict[int, int] = {}
        for _ in range(rnd.randint(0, 6)):
            while driver.num_free >= 3 and rnd.random() < 0.8:
                _chain(driver, offered, rnd)
                offered += 1
            driver.publish()
            got = life.pop(rnd.randint(1, SIZE))
            for ident, segs in life.segments.items():
                if ident in segments:
                    assert segs == segments[ident]  # resubmitted from the right copy
                segments[ident] = segs
            life.segments.clear()
            k = min(len(to_retake), len(got))
            assert _ids(got[:k]) == to_retake[:k]  # resubmitted first, in order
            del to_retake[:k]
            taken.extend(_ids(got[k:]))
            tokens.update((t & 0xFFFF, t) for t in got)
            in_hand = [i for i in taken if i not in to_retake]
            if in_hand and rnd.random() < 0.7:
                batch = rnd.sample(in_hand, rnd.randint(1, len(in_hand)))
                life.complete([tokens[i] for i in batch])
                taken = [i for i in taken if i not in batch]
                for i, _ in driver.used():
                    segments.pop(i)
                    used += 1
        in_hand = [i for i in taken if i not in to_retake]
        if in_hand:  # killed while publishing a batch
            batch = rnd.sample(in_hand, rnd.randint(1, len(in_hand)))
            point = rnd.choice(CRASH_POINTS)
            life.complete_until([tokens[i] for i in batch], point)
            if point in PUBLISHED:
                taken = [i for i in taken if i not in batch]
            for i, _ in driver.used():
                segments.pop(i)
                used += 1
    last = Life(driver, memory, region)
    assert len(last.recovery.resubmit) == len(taken)
    rest = last.pop(SIZE)
    assert _ids(rest[:len(taken)]) == taken
    while rest:
        last.complete(rest)
        used += len(driver.used())
        rest = last.pop(SIZE)
    assert used == offered and driver.in_flight == 0


def test_fresh_region_starts_at_the_frontends_base(ring) -> None:
    ram, memory = ring
    driver = MockPackedQueue(ram, SIZE)
    region = _region()
    life = Life(driver, memory, region)
    words = region.view(np.uint16)
    assert life.recovery.fresh and life.recovery.base == NEW_RING_BASE
    assert (words[PI.W_VERSION], words[PI.W_DESC_NUM], words[PI.W_FREE_HEAD]) == (1, SIZE, 0)
    again = Life(driver, memory, region).recovery
    assert not again.fresh and again.resubmit == [] and again.base == NEW_RING_BASE


def _entry_word(e: int, field: int) -> int:
    return PI.EW0 + PI.EWS * e + field


@pytest.mark.parametrize("damage, message", [
    (lambda f, w: w.__setitem__(PI.W_DESC_NUM, 32), "holds 32 entries"),
    (lambda f, w: w.__setitem__(PI.W_VERSION, 7), "version 7"),
    (lambda f, w: w.__setitem__(PI.W_USED_IDX, 99), "outside a ring"),
    (lambda f, w: f.__setitem__(PI.B_ENTRY0 + PI.ENTRY_SIZE * 3, 9), "state 9"),
    (lambda f, w: w.__setitem__(_entry_word(0, PI.EW_NUM), 0), "chain of 0"),
    (lambda f, w: w.__setitem__(_entry_word(0, PI.EW_NEXT), 999), "runs into entry 999"),
    (lambda f, w: w.__setitem__(_entry_word(0, PI.EW_LAST), 5), "not at its last"),
])
def test_malformed_region_is_refused(ring, damage, message: str) -> None:
    ram, memory = ring
    driver = MockPackedQueue(ram, SIZE)
    region = _region()
    life = Life(driver, memory, region)
    driver.add_chain([b"abcd"], [1])  # two descriptors: entries 0 and 1
    driver.publish()
    assert len(life.pop(1)) == 1
    damage(region, region.view(np.uint16))
    with pytest.raises(I.InflightError, match=message):
        Life(driver, memory, region)


def test_buffer_id_made_available_twice_breaks_the_queue(ring) -> None:
    """A driver that offers a buffer id still in flight: the queue breaks (the region could
    not tell the two apart at completion)."""
    ram, memory = ring
    driver = MockPackedQueue(ram, SIZE)
    life = Life(driver, memory, _region())
    ident = driver.add_indirect_chain([b"abcd"], [1])
    driver.publish()
    assert _ids(life.pop(1)) == [ident]
    addr, length, _, flags = driver.read_desc(0)
    driver.write_raw_desc(1, addr, length, ident, flags)  # the same id again, available
    mem, q, views = life.args()
    got = I.pop_burst_inflight(mem, q, views, life.iv, 1, life.heads, life.ends, *life.seg)
    assert got == -1
    assert "still in flight" in life.q.error_text()


def test_region_size_is_the_spec_layout() -> None:
    for qs in (1, 2, 100, 128, 256, 32768):
        assert I.queue_region_size(qs, packed=True) == (32 + 32 * qs + 63) // 64 * 64
