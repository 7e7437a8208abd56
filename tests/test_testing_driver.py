"""Tests of the test doubles: GuestRam (memfd guest memory) and MockSplitQueue (driver side).

A minimal device (`_Device`) lives here too. It maps the fds itself from region_specs() and
follows ring addresses in *user* space and buffer addresses in GPA space, so these tests check
what a real backend would see, not just that the double agrees with itself.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvhost.ring.layout import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    avail_used_event_offset,
    desc_table_size,
    used_avail_event_offset,
    used_ring_size,
)
from pyvhost.testing.driver import MockSplitQueue, RingFullError, UsedRingError
from pyvhost.testing.guest_ram import OFFSET_POISON, AddressError, GuestRam

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Device:
    """Just enough of a split-ring device to round-trip chains (virtio 1.x 2.7)."""

    def __init__(self, ram: GuestRam, q: MockSplitQueue) -> None:
        self.maps = []  # (gpa, user, size, mmap, mmap_offset)
        for fd, gpa, size, user, off in ram.region_specs(owned=True):
            self.maps.append((gpa, user, size, mmap.mmap(fd, off + size), off))
            os.close(fd)
        self.size = q.size
        self.desc, self.avail, self.used = q.ring_addresses().user
        self.next_avail = self.next_used = q.initial_avail_idx

    def close(self) -> None:
        for m in self.maps:
            m[3].close()

    def _pieces(self, addr: int, n: int, space: int):
        while n:
            for m in self.maps:
                base, size = m[space], m[2]
                if base <= addr < base + size:
                    k = min(n, base + size - addr)
                    yield m[3], m[4] + addr - base, k
                    addr, n = addr + k, n - k
                    break
            else:
                raise AddressError(f"device: {addr:#x} unmapped")

    def read(self, addr: int, n: int, space: int = 1) -> bytes:  # space 1 = user, 0 = GPA
        return b"".join(mm[o : o + k] for mm, o, k in self._pieces(addr, n, space))

    def write(self, addr: int, data: bytes, space: int = 1) -> None:
        pos = 0
        for mm, o, k in self._pieces(addr, len(data), space):
            mm[o : o + k] = data[pos : pos + k]
            pos += k

    def r16(self, addr: int) -> int:
        return struct.unpack("<H", self.read(addr, 2))[0]

    def chain(self, head: int):
        """[(gpa, len, flags)] of the chain at head, following one indirect table."""
        table, index, out = self.desc, head, []
        while True:
            addr, n, flags, nxt = struct.unpack("<QIHH", self.read(table + DESC_SIZE * index, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, index = self.user_of_gpa(addr), 0
                continue
            out.append((addr, n, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return out
            index = nxt

    def user_of_gpa(self, gpa: int) -> int:
        return next(u + gpa - g for g, u, s, _, _ in self.maps if g <= gpa < g + s)

    def serve(self, reply=lambda data: data) -> int:
        """Pop every available chain, write reply(readable bytes) into its writable buffers."""
        count = 0
        while self.next_avail != self.r16(self.avail + 2):
            head = self.r16(self.avail + 4 + 2 * (self.next_avail % self.size))
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            descs = self.chain(head)
            data = b"".join(self.read(a, n, 0) for a, n, f in descs if not f & VIRTQ_DESC_F_WRITE)
            out, written = reply(data), 0
            for a, n, f in descs:
                if f & VIRTQ_DESC_F_WRITE and written < len(out):
                    piece = out[written : written + n]
                    self.write(a, piece, 0)
                    written += len(piece)
            elem = self.used + 4 + 8 * (self.next_used % self.size)
            self.write(elem, struct.pack("<II", head, written))
            self.next_used = (self.next_used + 1) & 0xFFFF
            self.write(self.used + 2, struct.pack("<H", self.next_used))
            count += 1
        return count


@pytest.fixture
def ram():
    r = GuestRam([(0x10_0000, 2 * MiB), (0x100_0000, 2 * MiB)])
    yield r
    r.close()


# -- GuestRam ------------------------------------------------------------------------------------


def test_user_addresses_differ_from_gpas_and_reverse_order(ram):
    (_, g0, _, u0, _), (_, g1, _, u1, _) = ram.region_specs()
    assert u0 >= 0x7000_0000_0000 and u1 >= 0x7000_0000_0000
    assert u1 < u0  # later region, lower user window: user order is not GPA order
    assert ram.gpa_to_user(g1 + 5) == u1 + 5
    assert ram.user_to_gpa(u0 + 7) == g0 + 7
    with pytest.raises(AddressError):
        ram.gpa_to_user(u0)
    with pytest.raises(AddressError):
        ram.user_to_gpa(g0)


def test_gpa_adjacent_regions_are_user_adjacent():
    with GuestRam([(0, MiB), (MiB, MiB)]).add_region(0x8000_0000 - MiB, MiB) as r:
        lo, hi, far = r.regions
        assert hi.userspace_addr == lo.userspace_addr + MiB
        assert far.userspace_addr + MiB <= lo.userspace_addr or far.userspace_addr >= hi.user_end


def test_overlapping_regions_rejected(ram):
    with pytest.raises(ValueError):
        ram.add_region(0x10_0000 + PAGE, PAGE)
    with pytest.raises(ValueError):  # user range clash
        ram.add_region(0x4000_0000, PAGE, userspace_addr=ram.regions[0].userspace_addr)


def test_mmap_offset_places_region_inside_the_file():
    off = 3 * PAGE
    with GuestRam([(0x2000, 4 * PAGE)], mmap_offset=off) as r:
        fd, gpa, size, _, mmap_offset = r.region_specs()[0]
        assert mmap_offset == off and os.fstat(fd).st_size == off + size
        r.write(gpa + 10, b"hello")
        assert os.pread(fd, 5, off + 10) == b"hello"
        assert os.pread(fd, off, 0) == bytes([OFFSET_POISON]) * off
    with pytest.raises(ValueError):
        GuestRam([(0, PAGE)], mmap_offset=100)


def test_read_write_span_adjacent_regions_only():
    with GuestRam([(0, PAGE), (PAGE, PAGE), (4 * PAGE, PAGE)]) as r:
        r.write(PAGE - 3, b"abcdef")
        assert r.read(PAGE - 3, 6) == b"abcdef"
        assert r.read(PAGE, 3) == b"def"
        with pytest.raises(AddressError):
            r.write(2 * PAGE - 1, b"xy")
        with pytest.raises(AddressError):
            r.read(3 * PAGE, 1)


def test_alloc_bump_alignment_region_and_offset():
    with GuestRam([(0, PAGE), (PAGE, PAGE)]) as r:
        a = r.alloc(3, 1)
        b = r.alloc(8, 16)
        assert (a, b) == (0, 16)
        straddle = r.alloc(32, 16, region=0, offset=PAGE - 16)
        assert straddle == PAGE - 16
        assert r.alloc(8, region=PAGE) == PAGE + 16  # after the straddling block's tail
        with pytest.raises(ValueError):  # overlaps that tail
            r.alloc(8, region=PAGE, offset=0)
        with pytest.raises(ValueError):
            r.alloc(8, 16, region=0, offset=100)  # misaligned
        with pytest.raises(MemoryError):
            r.alloc(2 * PAGE)


def test_reopen_region_is_the_same_memory(ram):
    gpa = ram.regions[1].guest_phys_addr
    fd = ram.reopen_region(gpa)
    try:
        old = ram.region(gpa).fd
        assert fd != old and os.fstat(fd).st_ino == os.fstat(old).st_ino
        with mmap.mmap(fd, 2 * MiB) as mm:
            ram.write(gpa + 100, b"from ram")
            assert mm[100:108] == b"from ram"
            mm[200:204] = b"back"
            assert ram.read(gpa + 200, 4) == b"back"
    finally:
        os.close(fd)


def test_remove_and_move_region(ram):
    ram.write(0x100_0000, b"kept")
    ram.move_region(0x100_0000, new_gpa=0x200_0000, new_userspace_addr=0x7E00_0000_0000)
    assert ram.read(0x200_0000, 4) == b"kept"
    assert ram.gpa_to_user(0x200_0004) == 0x7E00_0000_0004
    fd = ram.region(0x200_0000).fd
    ram.remove_region(0x200_0000)
    with pytest.raises(OSError):  # closed (nothing else opens fds meanwhile)
        os.fstat(fd)
    with pytest.raises(AddressError):
        ram.read(0x200_0000, 1)


def test_close_leaves_no_fd_open():
    before = _open_fds()
    r = GuestRam([(0, MiB), (MiB, MiB)], mmap_offset=PAGE).add_region(0x1000_0000, MiB)
    q = MockSplitQueue(r, 64)
    q.add_chains_and_publish([([b"x"], [10])])
    for fd, *_ in r.region_specs(owned=True):
        os.close(fd)
    assert _open_fds() >= before + 3  # each mmap also holds a dup of its fd
    r.close()
    r.close()  # idempotent
    assert _open_fds() == before
    with pytest.raises(ValueError):
        r.read(0, 1)


# -- MockSplitQueue: layout ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_auto_layout_is_tight_and_aligned(size):
    with GuestRam([(0x1000, 4 * MiB)]) as r:
        r.alloc(1)  # knock the bump pointer off alignment
        q = MockSplitQueue(r, size)
        assert q.desc_table % 16 == 0 and q.avail_ring % 2 == 0 and q.used_ring % 4 == 0
        assert q.avail_ring == q.desc_table + desc_table_size(size)
        avail_end = q.avail_ring + avail_ring_size(size)
        assert avail_end <= q.used_ring < avail_end + 4  # only the 4-alignment padding between
        assert r.read(q.used_ring, used_ring_size(size)) == bytes(used_ring_size(size))


def test_bad_size_and_misaligned_parts(ram):
    with pytest.raises(ValueError):
        MockSplitQueue(ram, 3)
    with pytest.raises(ValueError):
        MockSplitQueue(ram, 65536)
    with pytest.raises(ValueError):
        MockSplitQueue(ram, 8, desc=0x10_0008)
    with pytest.raises(ValueError):
        MockSplitQueue(ram, 8, used=0x10_0002)


def test_ring_addresses_in_both_spaces(ram):
    q = MockSplitQueue(ram, 16)
    user, gpa = q.ring_addresses()
    assert gpa == (q.desc_table, q.avail_ring, q.used_ring)
    for u, g in zip(user, gpa):
        assert u != g and ram.user_to_gpa(u) == g


def test_initial_ring_state_and_event_fields(ram):
    q = MockSplitQueue(ram, 8, event_idx=True, initial_avail_idx=65530)
    r16 = lambda a: struct.unpack("<H", ram.read(a, 2))[0]
    assert r16(q.avail_ring + 2) == 65530 and q.used_idx() == 65530
    assert q.avail_event() == 65530
    q.set_used_event(7)
    assert r16(q.avail_ring + avail_used_event_offset(8)) == 7
    q.set_no_interrupt(True)
    assert r16(q.avail_ring) == VRING_AVAIL_F_NO_INTERRUPT
    q.set_no_interrupt(False)
    assert r16(q.avail_ring) == 0


# -- chains --------------------------------------------------------------------------------------


def test_direct_chain_descriptors(ram):
    q = MockSplitQueue(ram, 8)
    head = q.add_chain([b"hdr", b"payload"], [100])
    assert q.num_free == 5 and q.in_flight == 1
    a0, n0, f0, nx0 = q.read_desc(head)
    a1, n1, f1, nx1 = q.read_desc(nx0)
    a2, n2, f2, _ = q.read_desc(nx1)
    assert (n0, f0) == (3, VIRTQ_DESC_F_NEXT) and ram.read(a0, 3) == b"hdr"
    assert (n1, f1) == (7, VIRTQ_DESC_F_NEXT) and ram.read(a1, 7) == b"payload"
    assert (n2, f2) == (100, VIRTQ_DESC_F_WRITE)
    # Not visible before publish (2.7.13.3).
    assert struct.unpack("<H", ram.read(q.avail_ring + 2, 2))[0] == 0
    q.publish()
    assert struct.unpack("<HH", ram.read(q.avail_ring + 2, 4)) == (1, head)


def test_indirect_chain_descriptors(ram):
    q = MockSplitQueue(ram, 8)
    head = q.add_indirect_chain([b"req"], [16, 1])
    assert q.num_free == 7
    table, n, flags, _ = q.read_desc(head)
    assert (n, flags) == (3 * DESC_SIZE, VIRTQ_DESC_F_INDIRECT) and table % 16 == 0
    entries = [struct.unpack("<QIHH", ram.read(table + 16 * i, 16)) for i in range(3)]
    assert [(e[1], e[2], e[3]) for e in entries] == [
        (3, VIRTQ_DESC_F_NEXT, 1),
        (16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        (1, VIRTQ_DESC_F_WRITE, 0),
    ]
    assert ram.read(entries[0][0], 3) == b"req"


def test_round_trip_frees_descriptors_and_recycles_buffers(ram):
    q = MockSplitQueue(ram, 8)
    dev = _Device(ram, q)
    try:
        heads = q.add_chains_and_publish([([b"ab"], [8]), ([b"cd", b"e"], [1, 8])])
        first_bufs = {q.read_desc(i)[0] for i in range(8)}
        assert q.num_free == 2
        with pytest.raises(RingFullError):
            q.add_chain([b"x", b"y"], [1])
        assert dev.serve(lambda d: d.upper()) == 2
        assert q.used() == [(heads[0], 2), (heads[1], 3)]
        assert q.written_data(heads[0]) == b"AB"
        assert q.written_data(heads[1]) == b"CDE"  # gathered across two writable buffers
        assert q.num_free == 8 and q.in_flight == 0
        q.used()  # buffers go back to the pool at the next used()
        again = q.add_chain([b"zz"], [8])
        assert q.read_desc(again)[0] in first_bufs
    finally:
        dev.close()


def test_indirect_round_trip(ram):
    q = MockSplitQueue(ram, 4)
    dev = _Device(ram, q)
    try:
        with pytest.raises(ValueError):  # longer than the queue, even indirect (2.7.5.3.1)
            q.add_indirect_chain([b""] * 5, [])
        head = q.add_chains_and_publish([([b"abc"], [2, 2])], indirect=True)[0]
        dev.serve()
        assert q.used() == [(head, 3)] and q.written_data(head) == b"abc"
    finally:
        dev.close()


@pytest.mark.parametrize("part, back", [("desc", 16), ("avail", 6), ("used", 8)])
def test_ring_part_straddling_two_regions(part, back):
    """One part placed `back` bytes before the boundary of two GPA-adjacent regions."""
    boundary = 0x4_0000
    with GuestRam([(boundary - PAGE, PAGE), (boundary, 4 * PAGE)]) as r:
        size_of = {"desc": desc_table_size, "avail": avail_ring_size, "used": used_ring_size}
        align = {"desc": 16, "avail": 2, "used": 4}[part]
        gpa = r.alloc(size_of[part](16), align, region=boundary - PAGE, offset=PAGE - back)
        q = MockSplitQueue(r, 16, region=boundary, **{part: gpa})
        assert gpa < boundary < gpa + size_of[part](16)
        dev = _Device(r, q)
        try:
            for rnd in range(3):  # enough rounds to use every avail and used slot
                heads = q.add_chains_and_publish([([bytes([i]) * 5], [5]) for i in range(rnd, 8)])
                dev.serve()
                assert [e[0] for e in q.used()] == heads
                assert q.written_data(heads[-1]) == b"\x07" * 5
        finally:
            dev.close()


def test_buffer_straddling_two_regions():
    with GuestRam([(0, PAGE), (PAGE, PAGE)]) as r:
        q = MockSplitQueue(r, 4, region=0)
        buf = r.alloc(16, region=0, offset=PAGE - 8)
        r.write(buf, b"0123456789abcdef")
        head = q.add_buffers([(buf, 16, False)])
        assert q.read_desc(head)[:3] == (buf, 16, 0)
        assert r.read(PAGE, 8) == b"89abcdef"


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 0xFFFF), batches=st.lists(st.integers(1, 4), min_size=1, max_size=12))
def test_indices_wrap_around(start, batches):
    with GuestRam([(0, MiB)]) as r:
        q = MockSplitQueue(r, 8, initial_avail_idx=start)
        dev = _Device(r, q)
        try:
            for n in batches:
                heads = q.add_chains_and_publish([([bytes([n])], [1])] * n)
                dev.serve()
                assert [e[0] for e in q.used()] == heads
            total = sum(batches)
            assert q.next_avail == q.last_used == (start + total) & 0xFFFF
            assert q.used_idx() == (start + total) & 0xFFFF
        finally:
            dev.close()


# -- notifications -------------------------------------------------------------------------------


def test_needs_kick_without_event_idx(ram):
    q = MockSplitQueue(ram, 8)
    q.add_chains_and_publish([([b"a"], [])])
    assert q.needs_kick()
    ram.write(q.used_ring, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    q.add_chains_and_publish([([b"a"], [])])
    assert not q.needs_kick()


def test_needs_kick_with_event_idx(ram):
    q = MockSplitQueue(ram, 8, event_idx=True, initial_avail_idx=65534)
    q.add_chains_and_publish([([b"a"], [])])
    assert q.needs_kick()  # avail_event starts at the initial idx, as a fresh ring's 0 does
    set_event = lambda v: ram.write(q.used_ring + used_avail_event_offset(8), struct.pack("<H", v))
    set_event(1)  # device: wake me when idx passes 1
    q.add_chains_and_publish([([b"a"], [])])  # 65535 -> 0
    assert not q.needs_kick()
    q.add_chains_and_publish([([b"a"], []), ([b"a"], [])])  # 0 -> 2 passes 1
    assert q.needs_kick()
    assert not q.needs_kick()  # nothing new since


# -- device-bug detection and hostile helpers ----------------------------------------------------


def test_used_rejects_what_the_device_was_never_given(ram):
    q = MockSplitQueue(ram, 4)
    head = q.add_chains_and_publish([([b"a"], [4])])[0]
    elem = lambda i, n: ram.write(q.used_ring + 4, struct.pack("<II", i, n))
    bump = lambda v: ram.write(q.used_ring + 2, struct.pack("<H", v))
    elem(head, 5)
    bump(1)
    with pytest.raises(UsedRingError):  # len beyond the 4 writable bytes
        q.used()
    q2 = MockSplitQueue(ram, 4)
    ram.write(q2.used_ring + 2, struct.pack("<H", 1))
    with pytest.raises(UsedRingError):  # nothing in flight
        q2.used()
    q3 = MockSplitQueue(ram, 4)
    q3.add_chains_and_publish([([b"a"], [])])
    ram.write(q3.used_ring + 4, struct.pack("<II", 3, 0))
    ram.write(q3.used_ring + 2, struct.pack("<H", 1))
    assert q3.used(strict=False) == [(3, 0)]


def test_raw_writers(ram):
    q = MockSplitQueue(ram, 4)
    q.write_raw_desc(3, 0xDEAD_0000_0000, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, 3)  # a self-loop
    assert q.read_desc(3) == (0xDEAD_0000_0000, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, 3)
    q.write_raw_avail_slot(6, 99)  # slot taken modulo the size
    q.write_raw_avail_idx(0x1_0005)
    assert struct.unpack("<HHHHHH", ram.read(q.avail_ring, 12)) == (0, 5, 0, 0, 99, 0)
    table = ram.alloc(40, 16)
    q.write_raw_indirect_table(table, [(0, 1, VIRTQ_DESC_F_INDIRECT, 0), (0, 2, 0, 0)])
    q.write_raw_desc(0, table, 24, VIRTQ_DESC_F_INDIRECT, 0)  # not a multiple of 16
    assert struct.unpack("<QIHH", ram.read(table, 16)) == (0, 1, VIRTQ_DESC_F_INDIRECT, 0)
    with pytest.raises(IndexError):
        q.write_raw_desc(4, 0, 0, 0, 0)


def test_raw_head_through_the_device(ram):
    """A hand-built loop offered with add_raw_head; the device's report is taken leniently."""
    q = MockSplitQueue(ram, 4, initial_avail_idx=0xFFFF)
    q.write_raw_desc(1, 0x10_0000, 4, VIRTQ_DESC_F_NEXT, 2)
    q.write_raw_desc(2, 0x10_0000, 4, VIRTQ_DESC_F_NEXT, 1)
    q.add_raw_head(1)
    q.publish()
    assert struct.unpack("<HH", ram.read(q.avail_ring + 2, 4)) == (0, 0)
    assert struct.unpack("<H", ram.read(q.avail_ring + 4 + 2 * 3, 2))[0] == 1  # slot 0xFFFF % 4
    assert q.in_flight == 0 and q.num_free == 4
