"""Guest memory: regions, the immutable table, translation, grace periods, safe unmapping."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

from pyvhost.fd import OwnedFd
from pyvhost.memory import access
from pyvhost.memory.epoch import EpochDomain
from pyvhost.memory.errors import AddressNotMappedError, BadRegionError
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.region import MappedRegion, RegionSpec

MiB = 1 << 20


def memfd(size: int) -> OwnedFd:
    fd = os.memfd_create("test-guest")
    os.ftruncate(fd, size)
    return OwnedFd(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped_memfds() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:test-guest" in line for line in f)


def test_region_maps_with_offset_and_sees_file_contents():
    fd = memfd(2 * MiB)
    os.pwrite(fd.fileno(), b"hello", MiB + 7)
    region = MappedRegion(RegionSpec(0x1000_0000, MiB, 0x7F00_0000_0000, MiB), fd)
    assert bytes(region.data[7:12]) == b"hello"
    assert region.close()
    assert fd.closed


def test_short_memfd_is_refused_before_mapping():
    # Mapping past the end of a memfd would SIGBUS on first touch.
    fd = memfd(MiB)
    with pytest.raises(BadRegionError, match="holds"):
        MappedRegion(RegionSpec(0, 2 * MiB, 0x1000_0000, 0), fd)
    fd.close()


def test_non_file_fd_is_refused():
    r, w = os.pipe()
    os.close(w)
    fd = OwnedFd(r)
    with pytest.raises(BadRegionError, match="not a regular file"):
        MappedRegion(RegionSpec(0, 4096, 0x1000, 0), fd)
    fd.close()


def test_overlapping_regions_are_refused_and_fds_closed():
    before = open_fds()
    mem = GuestMemory()
    with pytest.raises(BadRegionError, match="overlap"):
        mem.set_regions([(RegionSpec(0, 2 * MiB, 0x10_0000_0000, 0), memfd(2 * MiB)),
                         (RegionSpec(MiB, 2 * MiB, 0x20_0000_0000, 0), memfd(2 * MiB))])
    with pytest.raises(BadRegionError, match="overlap"):  # user space too
        mem.set_regions([(RegionSpec(0, MiB, 0x10_0000_0000, 0), memfd(MiB)),
                         (RegionSpec(4 * MiB, MiB, 0x10_0000_0000, 0), memfd(MiB))])
    assert len(mem.table) == 0
    mem.close()
    assert open_fds() == before


def test_translation_clamps_to_region_end_and_spans_regions():
    mem = GuestMemory()
    mem.set_regions([(RegionSpec(0, MiB, 0x5000_0000, 0), memfd(MiB)),
                     (RegionSpec(MiB, MiB, 0x9000_0000, 0), memfd(MiB))])
    segs = mem.table.translate_gpa(MiB - 100, 300)
    assert [(s.region.spec.guest_phys_addr, s.offset, s.length) for s in segs] == [
        (0, MiB - 100, 100), (MiB, 0, 200)]
    data = bytes(range(256)) + bytes(44)
    access.write_gpa(mem.table, MiB - 100, data)
    assert access.read_gpa(mem.table, MiB - 100, 300) == data
    # The same bytes by user address: the regions are not adjacent there.
    assert access.read_user(mem.table, 0x5000_0000 + MiB - 100, 100) == data[:100]
    with pytest.raises(AddressNotMappedError):
        access.read_user(mem.table, 0x5000_0000 + MiB - 100, 101)
    with pytest.raises(AddressNotMappedError):
        access.read_gpa(mem.table, 2 * MiB - 1, 2)
    mem.close()


def test_mmap_refuses_to_close_while_a_view_lives():
    # The guarantee everything rests on: a view handed out keeps its mapping alive.
    region = MappedRegion(RegionSpec(0, MiB, 0x1000_0000, 0), memfd(MiB))
    view = region.data[100:200].view(np.uint16)
    assert not region.close()
    assert not region.closed
    view[0] = 7  # still mapped, still usable
    del view
    gc.collect()
    assert region.close()


def test_removed_region_with_live_view_is_retired_then_unmapped():
    before_maps = mapped_memfds()
    mem = GuestMemory()
    mem.set_regions([(RegionSpec(0, MiB, 0x1000_0000, 0), memfd(MiB)),
                     (RegionSpec(MiB, MiB, 0x2000_0000, 0), memfd(MiB))])
    leaked_view = mem.table.regions[1].data[:16]
    mem.remove_region(RegionSpec(MiB, MiB, 0x2000_0000, 0))
    assert len(mem.table) == 1
    assert mapped_memfds() == before_maps + 2  # still mapped: a view lives
    leaked_view[:] = 1  # so reading/writing through it is safe
    del leaked_view
    mem.add_region(RegionSpec(4 * MiB, MiB, 0x3000_0000, 0), memfd(MiB))  # any later change
    assert mapped_memfds() == before_maps + 2  # retired one gone, new one in
    mem.close()
    assert mapped_memfds() == before_maps
    assert mem.leaked_mappings == 0


def test_grace_period_waits_for_a_burst_in_progress():
    domain = EpochDomain()
    worker = domain.register("w")
    inside = threading.Event()
    release = threading.Event()

    def burst():
        worker.enter()
        inside.set()
        release.wait()
        time.sleep(0.02)
        worker.leave()

    t = threading.Thread(target=burst)
    t.start()
    inside.wait()
    release.set()
    waited = domain.synchronize(timeout=5)
    assert not worker.inside
    assert waited >= 0.015
    t.join()
    # Nobody inside: no wait at all.
    assert domain.synchronize() < 0.01


def test_grace_timeout_is_bounded_and_keeps_old_mapping():
    mem = GuestMemory(grace_timeout=0.05)
    worker = mem.epochs.register("stuck")
    mem.set_regions([(RegionSpec(0, MiB, 0x1000_0000, 0), memfd(MiB))])
    worker.enter()
    table = mem.table
    view = table.regions[0].data[:8]  # what a stuck reader would hold
    t0 = time.perf_counter()
    mem.clear()
    assert time.perf_counter() - t0 < 1.0  # bounded, never an unbounded wait
    assert mem.grace.timeouts == 1
    view[0] = 1  # old mapping still alive for the stuck reader
    worker.leave()
    del view, table
    mem.close()
    assert mem.leaked_mappings == 0


def test_region_count_limit():
    from pyvhost.memory.table import MAX_MEM_SLOTS, RegionTable
    assert MAX_MEM_SLOTS == 509
    with pytest.raises(BadRegionError, match="slots"):
        RegionTable(tuple(object() for _ in range(510)))  # type: ignore[misc]


def test_identical_added_region_is_counted_not_mapped_twice():
    # QEMU adds the same region once per queue pair of a multiqueue NIC.
    before_fds = open_fds()
    mem = GuestMemory()
    spec = RegionSpec(0, MiB, 0x1000_0000, 0)
    mem.add_region(spec, memfd(MiB))
    table = mem.table
    mem.add_region(spec, memfd(MiB))
    assert mem.table is table and len(table) == 1  # no change, no new mapping
    mem.remove_region(spec)
    assert len(mem.table) == 1  # one ADD still holds it
    mem.remove_region(spec)
    assert len(mem.table) == 0
    with pytest.raises(BadRegionError, match="no region"):
        mem.remove_region(spec)
    del table
    mem.close()
    assert open_fds() == before_fds
