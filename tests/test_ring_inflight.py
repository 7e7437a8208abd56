"""Inflight I/O tracking at the ring layer (ring/inflight.py): a device "killed" at every point
of the pop / publish sequence restarts on the same guest ring and inflight region, resubmits
exactly the requests it had taken and not published, in the order it took them, before new
ones, and no request is lost or used twice.

A kill is modelled by abandoning every piece of device state but guest memory and the region
(the queue's local indices, the counter, the resubmit list) after running the real kernels up
to the point in question; the next "life" starts as a restarted device does: SET_VRING_BASE =
used->idx (what QEMU sends after a failed GET_VRING_BASE), then `InflightRing.recover`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.address import UserAddress
from pyvhost.ring import kernels as K
from pyvhost.ring import inflight as I
from pyvhost.ring.split_queue import SplitQueue
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory

SIZE = 16
MiB = 1 << 20


class Life:
    """One run of the device on the ring: a fresh queue and tracking state over the same ring
    and region."""

    def __init__(self, driver: MockSplitQueue, memory: GuestMemory, region: np.ndarray) -> None:
        q = SplitQueue(0)
        q.set_size(driver.size)
        user = driver.ring_addresses().user
        q.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                        UserAddress(user.used_ring))
        q.set_features(event_idx=False, indirect=True)
        q.set_next_avail(driver.used_idx())  # the base a frontend sends after our crash
        assert q.sync_used_from_ring(memory.table) is None
        q.inflight.attach(region, driver.size)
        self.recovery = q.inflight.recover(q.next_used, driver.size)
        q.set_next_avail(self.recovery.next_avail)
        self.q = q
        self.memory = memory
        self.heads = np.zeros(SIZE, np.int64)
        self.ends = np.zeros(SIZE, np.int64)
        self.seg = [np.zeros(4 * SIZE, np.int64) for _ in range(3)]

    @property
    def iv(self) -> tuple:
        return self.q.inflight.views

    def args(self) -> tuple:
        table = self.memory.table
        return table.kernel(), self.q.q, self.q.round_views(table)

    def pop(self, n: int) -> list[int]:
        mem, q, views = self.args()
        got = I.pop_burst_inflight(mem, q, views, self.iv, n, self.heads, self.ends, *self.seg)
        assert got >= 0, self.q.error_text()
        return self.heads[:got].tolist()

    def complete(self, heads: list[int]) -> None:
        """Publish heads as one batch, the whole tracked sequence (either primitive)."""
        mem, q, views = self.args()
        arr = np.array(heads, np.int64)
        if len(heads) % 2:
            assert I.push_used_burst_inflight(mem, q, views, self.iv, arr, arr * 0,
                                              len(heads)) >= 0
        else:
            for h in heads:
                assert K.add_used(mem, q, views, h, 0)
            assert I.publish_used_inflight(mem, q, views, self.iv, arr, len(heads))

    def complete_until(self, heads: list[int], point: str) -> None:
        """The tracked publish of one batch, stopped (killed) at `point`."""
        mem, q, views = self.args()
        arr = np.array(heads, np.int64)
        n = len(heads)
        if point == "before_batch":
            return
        for h in heads:
            assert K.add_used(mem, q, views, h, 0)
        I.inflight_begin_batch(q, self.iv, arr, n)
        if point == "linked":
            return
        assert K.publish_used(mem, q, views)
        if point == "published":
            return
        flags = self.iv[0]
        flags[I.B_INFLIGHT0 + I.DESC_STATE_SIZE * heads[0]] = 0  # the first clear
        if point == "half_cleared":
            return
        for h in heads:
            flags[I.B_INFLIGHT0 + I.DESC_STATE_SIZE * h] = 0
        if point == "cleared":
            return
        I.inflight_end_batch(q, self.iv, arr, n)
        assert point == "done"


CRASH_POINTS = ["before_batch", "linked", "published", "half_cleared", "cleared", "done"]


@pytest.fixture
def ring() -> tuple[GuestRam, GuestMemory]:
    with GuestRam([(0, 4 * MiB)]) as ram:
        memory = backend_memory(ram)
        try:
            yield ram, memory
        finally:
            memory.close()


def _chain(driver: MockSplitQueue, tag: int) -> int:
    return driver.add_indirect_chain([tag.to_bytes(4, "little")], [1])


@pytest.mark.parametrize("start", [0, 65530])  # 65530: the indices wrap during the test
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_publish_resubmits_exactly_the_unpublished(ring, point: str,
                                                               start: int) -> None:
    ram, memory = ring
    driver = MockSplitQueue(ram, SIZE, initial_avail_idx=start)
    region = np.zeros(I.queue_region_size(SIZE), np.uint8)
    life = Life(driver, memory, region)
    assert life.recovery.fresh
    heads = [_chain(driver, i) for i in range(10)]
    driver.publish()
    popped = life.pop(6)  # heads[6:] stay in the avail ring: taken by nobody
    assert popped == heads[:6]
    life.complete([heads[2], heads[0]])
    batch = [heads[4], heads[1]]
    life.complete_until(batch, point)
    used_before = [h for h, _ in driver.used()]

    life2 = Life(driver, memory, region)  # the restarted device
    published = point not in ("before_batch", "linked")
    expect = [heads[i] for i in (1, 3, 4, 5) if published is False or i in (3, 5)]
    assert used_before == [heads[2], heads[0]] + (batch if published else [])
    assert life2.recovery.resubmit == expect
    assert life2.recovery.cleared == (2 if point in ("published", "half_cleared", "cleared")
                                      else 0)
    assert life2.recovery.next_avail == (start + 6) & 0xFFFF
    more = [_chain(driver, 100 + i) for i in range(3)]
    driver.publish()
    order = life2.pop(SIZE)
    assert order == expect + heads[6:] + more  # resubmitted first, in the order taken
    life2.complete(order)
    assert sorted(h for h, _ in driver.used()) == sorted(order)  # strict: none used twice
    assert driver.in_flight == 0
    assert not life2.iv[0][I.B_INFLIGHT0::I.DESC_STATE_SIZE].any()


@pytest.mark.parametrize("seed", range(40))
def test_random_kills_lose_and_repeat_nothing(ring, seed: int) -> None:
    """Random bursts, out-of-order batches and kills at random points, over several lives:
    every life resubmits what its predecessors took and did not publish, in the order they
    took it, before anything new; at the end every chain offered was used exactly once."""
    ram, memory = ring
    rnd = random.Random(seed)
    driver = MockSplitQueue(ram, SIZE, initial_avail_idx=rnd.choice([0, 65500]))
    region = np.zeros(I.queue_region_size(SIZE), np.uint8)
    offered = used = 0
    taken: list[int] = []  # heads taken by some life and not published, in the order taken
    for _ in range(8):  # lives
        life = Life(driver, memory, region)
        assert life.recovery.resubmit == taken
        to_retake = list(taken)
        for _ in range(rnd.randint(0, 6)):
            for _ in range(rnd.randint(0, driver.num_free)):
                _chain(driver, offered)
                offered += 1
            driver.publish()
            got = life.pop(rnd.randint(1, SIZE))
            k = min(len(to_retake), len(got))
            assert got[:k] == to_retake[:k]  # resubmitted first, in order
            del to_retake[:k]
            taken.extend(got[k:])
            in_hand = [h for h in taken if h not in to_retake]
            if in_hand and rnd.random() < 0.7:
                batch = rnd.sample(in_hand, rnd.randint(1, len(in_hand)))
                life.complete(batch)
                taken = [h for h in taken if h not in batch]
                used += len(driver.used())
        in_hand = [h for h in taken if h not in to_retake]
        if in_hand:  # killed while publishing a batch
            batch = rnd.sample(in_hand, rnd.randint(1, len(in_hand)))
            point = rnd.choice(CRASH_POINTS)
            life.complete_until(batch, point)
            if point not in ("before_batch", "linked"):
                taken = [h for h in taken if h not in batch]
            used += len(driver.used())
    last = Life(driver, memory, region)
    assert last.recovery.resubmit == taken
    rest = last.pop(SIZE)
    while rest:
        last.complete(rest)
        used += len(driver.used())
        rest = last.pop(SIZE)
    assert used == offered and driver.in_flight == 0


def test_fresh_region_starts_at_the_rings_used_index(ring) -> None:
    """Version 0 (a new area, after a VM reset or a migration): no resubmission, and used_idx
    is the ring's, so a moved ring is not taken for a batch to clear (spdk/spdk#3766)."""
    ram, memory = ring
    driver = MockSplitQueue(ram, SIZE, initial_avail_idx=1234)
    region = np.zeros(I.queue_region_size(SIZE), np.uint8)
    region[I.B_INFLIGHT0] = 0  # head 0 not in flight; a wrong fix-up would not show either
    life = Life(driver, memory, region)
    words = region.view(np.uint16)
    assert life.recovery == I.InflightRecovery(True, 0, [], 1234)
    assert (words[I.W_VERSION], words[I.W_DESC_NUM], words[I.W_USED_IDX]) == (1, SIZE, 1234)
    assert Life(driver, memory, region).recovery == I.InflightRecovery(False, 0, [], 1234)


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.__setitem__(I.W_DESC_NUM, 32), "descriptor states"),
    (lambda w: w.__setitem__(I.W_VERSION, 7), "version 7"),
    (lambda w: w.__setitem__(I.W_USED_IDX, 1000), "more than a batch"),
    (lambda w: (w.__setitem__(I.W_USED_IDX, 65535), w.__setitem__(I.W_LAST_BATCH_HEAD, 99)),
     "head 99"),
])
def test_malformed_region_is_refused(ring, damage, message: str) -> None:
    ram, memory = ring
    driver = MockSplitQueue(ram, SIZE)
    region = np.zeros(I.queue_region_size(SIZE), np.uint8)
    Life(driver, memory, region)
    damage(region.view(np.uint16))
    with pytest.raises(I.InflightError, match=message):
        Life(driver, memory, region)


def test_region_size_matches_libvhost_user_and_dpdk() -> None:
    for qs in (1, 2, 4, 128, 256, 1024, 32768):
        libvhost_user = (16 * qs + 2 + 63) // 64 * 64       # ALIGN_UP(16*qs + 2, 64)
        dpdk = (16 * qs + 8 + 2 * 4 + 63) // 64 * 64        # RTE_ALIGN_MUL_CEIL(..., 64)
        assert I.queue_region_size(qs) == libvhost_user == dpdk


def test_untracked_queue_pays_nothing(ring) -> None:
    """With no region the tracked kernels are the plain ones (the Python tier always calls
    them)."""
    ram, memory = ring
    driver = MockSplitQueue(ram, SIZE)
    q = SplitQueue(0)
    q.set_size(SIZE)
    user = driver.ring_addresses().user
    q.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                    UserAddress(user.used_ring))
    q.set_features(event_idx=False, indirect=True)
    q.sync_used_from_ring(memory.table)
    assert not q.inflight.enabled
    heads = [_chain(driver, i) for i in range(3)]
    driver.publish()
    table = memory.table
    out = np.zeros(SIZE, np.int64)
    ends = np.zeros(SIZE, np.int64)
    segs = [np.zeros(4 * SIZE, np.int64) for _ in range(3)]
    n = I.pop_burst_inflight(table.kernel(), q.q, q.round_views(table), q.inflight.views, SIZE,
                             out, ends, *segs)
    assert out[:n].tolist() == heads
    assert I.push_used_burst_inflight(table.kernel(), q.q, q.round_views(table),
                                      q.inflight.views, out, out * 0, n) >= 0
    assert [h for h, _ in driver.used()] == heads
    q.drop_views()
