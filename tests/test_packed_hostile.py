"""Hostile packed rings: each bad input breaks only its queue, with a clear error, on both
metadata paths (the packed counterpart of test_ring_hostile.py)."""

from __future__ import annotations

import pytest

from pyvhost.ring.errors import RingError, RingErrorCode as E
from pyvhost.ring.packed_layout import VIRTQ_DESC_F_INDIRECT as IND
from pyvhost.ring.packed_layout import VIRTQ_DESC_F_NEXT as NEXT
from pyvhost.ring.packed_layout import VIRTQ_DESC_F_WRITE as WRITE
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.pairing import backend_memory, device_queue

MiB = 1 << 20
SIZE = 7  # not a power of two


def buf(ram: GuestRam, n: int = 64) -> int:
    return ram.alloc(n, 16)


def case_chain_fills_the_ring(d, ram):
    d.add_raw([(buf(ram), 64, 1, NEXT)] * SIZE)
    return E.CHAIN_TOO_LONG


def case_indirect_with_next(d, ram):
    table = buf(ram, 16)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, 0)])
    d.add_raw([(table, 16, 1, IND | NEXT), (buf(ram), 64, 1, 0)])
    return E.INDIRECT_WITH_NEXT


def case_indirect_inside_a_chain(d, ram):
    table = buf(ram, 16)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, 0)])
    d.add_raw([(buf(ram), 64, 1, NEXT), (table, 16, 1, IND)])
    return E.INDIRECT_WITH_NEXT


def case_nested_indirect(d, ram):
    inner = buf(ram, 32)
    outer = buf(ram, 32)
    d.write_raw_indirect_table(inner, [(buf(ram), 64, 0, 0)])
    d.write_raw_indirect_table(outer, [(inner, 16, 0, IND)])
    d.add_raw([(outer, 16, 3, IND)])
    return E.NESTED_INDIRECT


def case_indirect_bad_len(d, ram):
    table = buf(ram, 64)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, 0)])
    d.add_raw([(table, 24, 0, IND)])
    return E.INDIRECT_BAD_LEN


def case_indirect_zero_len(d, ram):
    d.add_raw([(buf(ram), 0, 0, IND)])
    return E.INDIRECT_BAD_LEN


def case_indirect_table_unmapped(d, ram):
    d.add_raw([(0x7000_0000_0000, 64, 0, IND)])
    return E.ADDR_UNMAPPED


def case_indirect_table_too_big(d, ram):
    # 100,000 mapped entries: more than any chain's segments (never a chain to serve).
    table = ram.alloc(16 * 100_000, 16)  # zeros: readable empty buffers at GPA 0
    d.add_raw([(table, 16 * 100_000, 0, IND)])
    return E.CHAIN_TOO_LONG


def case_indirect_read_after_write(d, ram):
    table = buf(ram, 32)
    d.write_raw_indirect_table(table, [(buf(ram), 64, 0, WRITE), (buf(ram), 64, 0, 0)])
    d.add_raw([(table, 32, 0, IND)])
    return E.READ_AFTER_WRITE


def case_length_overflow(d, ram):
    n, seg = 1100, 0x3FF000
    table = ram.alloc(16 * n, 16)
    d.write_raw_indirect_table(table, [(0, seg, 0, 0)] * n)
    d.add_raw([(table, 16 * n, 0, IND)])
    return E.LEN_OVERFLOW


def case_address_unmapped(d, ram):
    d.add_raw([(0x9000_0000, 64, 0, 0)])
    return E.ADDR_UNMAPPED


def case_address_past_region_end(d, ram):
    d.add_raw([(4 * MiB - 10, 64, 0, 0)])
    return E.ADDR_UNMAPPED


def case_address_top_bit(d, ram):
    d.add_raw([(0xFFFF_FFFF_FFFF_F000, 64, 0, 0)])
    return E.ADDR_UNMAPPED


def case_read_after_write(d, ram):
    d.add_raw([(buf(ram), 64, 2, WRITE | NEXT), (buf(ram), 64, 2, 0)])
    return E.READ_AFTER_WRITE


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


def _pair(ram: GuestRam, mode: str):
    bad_driver = MockPackedQueue(ram, SIZE)
    good_driver = MockPackedQueue(ram, SIZE)
    memory = backend_memory(ram)
    bad = device_queue(bad_driver, memory, index=0, metadata_access=mode)
    good = device_queue(good_driver, memory, index=1, metadata_access=mode)
    return bad_driver, good_driver, memory, bad, good


def _good_still_works(good_driver, good, memory) -> None:
    for k in range(2 * SIZE):  # two laps
        ident = good_driver.add_chain([b"still fine"], [16])
        good_driver.publish()
        chain = good.pop_descriptor_chain(memory.table)
        assert chain is not None and chain.read(memory.table) == b"still fine"
        good.push_used(memory.table, [(chain.head, 3)])
        assert good_driver.used() == [(ident, 3)]


@pytest.mark.parametrize("mode", ["direct", "copy"])
@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_hostile_packed_ring_breaks_only_its_queue(case, mode):
    with GuestRam([(0, 4 * MiB)]) as ram:
        bad_driver, good_driver, memory, bad, good = _pair(ram, mode)
        expected = case(bad_driver, ram)
        with pytest.raises(RingError) as err:
            bad.pop_burst(memory.table)
        assert err.value.code == expected, str(err.value)
        assert bad.broken and str(err.value).startswith("queue 0: ")
        with pytest.raises(RingError):
            bad.pop_burst(memory.table)
        _good_still_works(good_driver, good, memory)
        assert good.stats.direct_rounds if mode == "direct" else good.stats.copy_rounds
        memory.close()


@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_incomplete_chain_is_not_consumed(mode):
    """A head made available with NEXT into a descriptor that is not: the chain is not
    complete yet, nothing is consumed (the driver makes the head available last)."""
    with GuestRam([(0, 4 * MiB)]) as ram:
        bad_driver, good_driver, memory, bad, good = _pair(ram, mode)
        bad_driver.add_raw([(buf(ram), 64, 1, NEXT)])
        assert bad.pop_burst(memory.table) == []
        assert not bad.broken and bad.next_avail == 0
        _good_still_works(good_driver, good, memory)
        memory.close()


@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_used_token_out_of_range_is_ours(mode):
    with GuestRam([(0, 4 * MiB)]) as ram:
        _bd, good_driver, memory, bad, good = _pair(ram, mode)
        with pytest.raises(RingError) as err:
            bad.push_used(memory.table, [(5 | (SIZE + 1) << 16, 0)])
        assert err.value.code == E.USED_ID_OUT_OF_RANGE
        _good_still_works(good_driver, good, memory)
        memory.close()


@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_rewind_gives_back_chains_of_any_length(mode):
    """rewind(n) steps back over the slots each chain took, across the wrap."""
    from pyvhost.ring import kernels as K
    with GuestRam([(0, 4 * MiB)]) as ram:
        driver, _gd, memory, q, _g = _pair(ram, mode)
        for lap in range(3):
            ids = [driver.add_chain([b"x"] * n, []) for n in (1, 3, 2)]
            driver.publish()
            chains = q.pop_burst(memory.table)
            assert [len(c.segments) for c in chains] == [1, 3, 2]
            K.rewind(q.q, 2)
            again = q.pop_burst(memory.table)
            assert [len(c.segments) for c in again] == [3, 2]
            q.push_used(memory.table, [(c.head, 0) for c in chains])
            assert [i for i, _ in driver.used()] == ids
        memory.close()
