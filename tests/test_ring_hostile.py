"""Hostile rings: each bad input breaks only its queue, with a clear error, on both paths."""

from __future__ import annotations

import pytest

from pyvhost.ring import kernels as K
from pyvhost.ring.errors import RingError, RingErrorCode as E
from pyvhost.ring.layout import VIRTQ_DESC_F_INDIRECT as IND, VIRTQ_DESC_F_NEXT as NEXT
from pyvhost.ring.layout import VIRTQ_DESC_F_WRITE as WRITE
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

MiB = 1 << 20
SIZE = 8


def offer(driver: MockSplitQueue, head: int) -> None:
    driver.write_raw_avail_slot(driver.next_avail, head)
    driver.write_raw_avail_idx(driver.next_avail + 1)


def buf(ram: GuestRam, n: int = 64) -> int:
    return ram.alloc(n, 16)


def case_head_out_of_range(d, ram):
    offer(d, SIZE)
    return E.HEAD_OUT_OF_RANGE


def case_next_out_of_range(d, ram):
    d.write_raw_desc(0, buf(ram), 64, NEXT, SIZE + 3)
    offer(d, 0)
    return E.NEXT_OUT_OF_RANGE


def case_loop(d, ram):
    b = buf(ram)
    d.write_raw_desc(0, b, 64, NEXT, 1)
    d.write_raw_desc(1, b, 64, NEXT, 0)
    offer(d, 0)
    return E.CHAIN_TOO_LONG


def case_self_loop(d, ram):
    d.write_raw_desc(2, buf(ram), 64, NEXT, 2)
    offer(d, 2)
    return E.CHAIN_TOO_LONG


def case_nested_indirect(d, ram):
    inner = buf(ram, 32)
    outer = buf(ram, 32)
    d.write_raw_indirect_table(inner, [(buf(ram), 64, 0, 0)])
    d.write_raw_indirect_table(outer, [(inner, 16, IND, 0)])
    d.write_raw_desc(0, outer, 16, IND, 0)
    offer(d, 0)
    return E.NESTED_INDIRECT


def case_indirect_bad_len(d, ram):
    table = buf(ram, 64)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, 0)])
    d.write_raw_desc(0, table, 24, IND, 0)
    offer(d, 0)
    return E.INDIRECT_BAD_LEN


def case_indirect_zero_len(d, ram):
    d.write_raw_desc(0, buf(ram), 0, IND, 0)
    offer(d, 0)
    return E.INDIRECT_BAD_LEN


def case_indirect_loop(d, ram):
    table = buf(ram, 64)
    b = buf(ram)
    d.write_raw_indirect_table(table, [(b, 64, NEXT, 1), (b, 64, NEXT, 0)])
    d.write_raw_desc(0, table, 32, IND, 0)
    offer(d, 0)
    return E.CHAIN_TOO_LONG


def case_indirect_next_out_of_range(d, ram):
    table = buf(ram, 64)
    d.write_raw_indirect_table(table, [(buf(ram), 64, NEXT, 2), (buf(ram), 64, 0, 0)])
    d.write_raw_desc(0, table, 32, IND, 0)
    offer(d, 0)
    return E.NEXT_OUT_OF_RANGE


def case_indirect_table_unmapped(d, ram):
    d.write_raw_desc(0, 0x7000_0000_0000, 64, IND, 0)
    offer(d, 0)
    return E.ADDR_UNMAPPED


def case_length_overflow(d, ram):
    # 1100 mapped segments of almost 4 MiB each (all the same memory): the sum passes 2**32.
    n, seg = 1100, 0x3FF000
    table = ram.alloc(16 * n, 16)
    d.write_raw_indirect_table(table, [(0, seg, NEXT, i + 1) for i in range(n - 1)] + [(0, seg, 0, 0)])
    d.write_raw_desc(0, table, 16 * n, IND, 0)
    offer(d, 0)
    return E.LEN_OVERFLOW


def case_address_unmapped(d, ram):
    d.write_raw_desc(0, 0x9000_0000, 64, 0, 0)
    offer(d, 0)
    return E.ADDR_UNMAPPED


def case_address_past_region_end(d, ram):
    d.write_raw_desc(0, 4 * MiB - 10, 64, 0, 0)
    offer(d, 0)
    return E.ADDR_UNMAPPED


def case_address_top_bit(d, ram):
    d.write_raw_desc(0, 0xFFFF_FFFF_FFFF_F000, 64, 0, 0)
    offer(d, 0)
    return E.ADDR_UNMAPPED


def case_avail_idx_jump(d, ram):
    d.write_raw_avail_idx(d.next_avail + SIZE + 1)
    return E.AVAIL_IDX_JUMP


def case_read_after_write(d, ram):
    d.write_raw_desc(0, buf(ram), 64, WRITE | NEXT, 1)
    d.write_raw_desc(1, buf(ram), 64, 0, 0)
    offer(d, 0)
    return E.READ_AFTER_WRITE


def case_indirect_with_next(d, ram):
    table = buf(ram, 16)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, 0)])
    d.write_raw_desc(0, table, 16, IND | NEXT, 1)
    offer(d, 0)
    return E.INDIRECT_WITH_NEXT


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("mode", ["direct", "copy"])
@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_hostile_ring_breaks_only_its_queue(case, mode):
    with GuestRam([(0, 4 * MiB)]) as ram:
        bad_driver = MockSplitQueue(ram, SIZE)
        good_driver = MockSplitQueue(ram, SIZE)
        memory = backend_memory(ram)
        bad = device_queue(bad_driver, memory, index=0, metadata_access=mode)
        good = device_queue(good_driver, memory, index=1, metadata_access=mode)
        memory.table  # noqa: B018 (both queues share one table)
        expected = case(bad_driver, ram)
        # The region table was built before the case allocated: refresh is not needed, the
        # buffers live in the same region.
        with pytest.raises(RingError) as err:
            bad.pop_burst(memory.table)
        assert err.value.code == expected, str(err.value)
        assert bad.broken and str(err.value).startswith("queue 0: ")
        # Still broken on the next try, and nothing was consumed past the bad chain.
        with pytest.raises(RingError):
            bad.pop_burst(memory.table)
        # The other queue in the same memory keeps working.
        good_driver.add_chain([b"still fine"], [16])
        good_driver.publish()
        chain = good.pop_descriptor_chain(memory.table)
        assert chain.read(memory.table) == b"still fine"
        good.push_used(memory.table, [(chain.head, 0)])
        assert good_driver.used() == [(chain.head, 0)]
        memory.close()


@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_ring_outside_every_region_is_rejected(mode):
    with GuestRam([(0, MiB)]) as ram:
        driver = MockSplitQueue(ram, SIZE)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, metadata_access=mode)
        queue.set_addresses(0x6000_0000_0000, 0x6000_0001_0000, 0x6000_0002_0000)
        with pytest.raises(RingError) as err:
            queue.pop_burst(memory.table)
        assert err.value.code == E.RING_UNMAPPED
        if mode == "direct":  # the direct map said why it could not be built
            assert any("not mapped" in r for r in queue.stats.copy_reasons)
        memory.close()


def test_misaligned_or_huge_ring_address_refused_at_configuration():
    from pyvhost.ring.split_queue import SplitQueue
    q = SplitQueue(0)
    q.set_size(8)
    with pytest.raises(ValueError, match="aligned"):
        q.set_addresses(0x1008, 0x2000, 0x3000)
    with pytest.raises(ValueError, match="aligned"):
        q.set_addresses(0x1000, 0x2000, 0x3002)
    with pytest.raises(ValueError, match="aligned"):
        q.set_addresses(1 << 63, 0x2000, 0x3000)
    with pytest.raises(ValueError, match="power of two"):
        q.set_size(12)
    assert K.QSTATE_LEN >= 13
