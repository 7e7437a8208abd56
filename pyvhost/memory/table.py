"""The region table: an immutable, sorted, overlap-checked snapshot of guest memory.

A table is never changed in place: adding or removing a region returns a new table, and the
holder (`GuestMemory`) swaps the reference. A reader that loaded a table keeps a consistent view
for as long as it holds it; mappings die only after the grace period (see `guest_memory.py`).
"""

from __future__ import annotations

import bisect
from typing import Iterator, NamedTuple

import numpy as np

from pyvhost.memory.address import GuestAddress, UserAddress
from pyvhost.memory.dirty_log import NO_LOG
from pyvhost.memory.errors import AddressNotMappedError, BadRegionError
from pyvhost.memory.region import MappedRegion

MAX_MEM_SLOTS = 509


# The table as compiled kernels see it: a plain tuple of int64 arrays, regions in GPA order.
# (A plain tuple of plain arrays costs numba ~0.3 us to type per call; a NamedTuple or a typed
# List of region arrays costs 60-120 us, more than a whole burst.)
KM_GPA_START = 0   # guest-physical start of each region
KM_USER_START = 1  # frontend user address of each region
KM_SIZE = 2
KM_BY_USER = 3     # region indices sorted by user address
KM_HOST = 4        # host address of each region's first byte in our mapping
KM_LOG = 5         # the dirty log while logging: [host address, bytes]; empty otherwise
# Device IOTLB (memory/iotlb.py): empty arrays for a region table.
KM_PERM = 6        # permission of each IOTLB run (1 read, 2 write)
KM_RUN_GPA = 7     # guest-physical address of each IOTLB run's first byte (the dirty log)
KM_IOTLB = 8       # [1]: addresses are IOVAs translated by IOTLB runs; empty: regions
KernelMemory = tuple


class Segment(NamedTuple):
    """A piece of a translated range that lies inside one region."""

    region: MappedRegion
    offset: int  # into region.data
    length: int


_NONE = np.zeros(0, dtype=np.int64)


class RegionTable:
    #: Addresses are IOVAs translated through a device IOTLB (memory/iotlb.py IotlbTable).
    iotlb = False

    __slots__ = ("regions", "log", "_gpa_starts", "_user_order", "_user_starts", "_kernel",
                 "_views")

    def __init__(self, regions: tuple[MappedRegion, ...] = (), log: np.ndarray = NO_LOG
                 ) -> None:
        if len(regions) > MAX_MEM_SLOTS:
            raise BadRegionError(f"{len(regions)} regions exceed the {MAX_MEM_SLOTS} slots")
        self.regions = tuple(sorted(regions, key=lambda r: r.spec.guest_phys_addr))
        #: The dirty log the device writes while migrating (DirtyLog.kernel), or NO_LOG.
        self.log = log
        self._gpa_starts = [r.spec.guest_phys_addr for r in self.regions]
        self._user_order = sorted(range(len(self.regions)),
                                  key=lambda i: self.regions[i].spec.userspace_addr)
        self._user_starts = [self.regions[i].spec.userspace_addr for i in self._user_order]
        _check_no_overlap(self.regions, "guest-physical", lambda r: (r.spec.guest_phys_addr,
                                                                     r.spec.gpa_end))
        _check_no_overlap([self.regions[i] for i in self._user_order], "user",
                          lambda r: (r.spec.userspace_addr, r.spec.user_end))
        self._kernel: KernelMemory | None = None
        self._views: list[memoryview] | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self.regions)

    def with_region(self, region: MappedRegion) -> "RegionTable":
        return RegionTable(self.regions + (region,), self.log)

    def without_region(self, region: MappedRegion) -> "RegionTable":
        return RegionTable(tuple(r for r in self.regions if r is not region), self.log)

    def with_log(self, log: np.ndarray) -> "RegionTable":
        """The same regions, with the device writing into `log` (or NO_LOG: not logging)."""
        return RegionTable(self.regions, log)

    @property
    def base(self) -> "RegionTable":
        """The region table under this one (itself; an IOTLB snapshot's regions)."""
        return self

    def gpa_of(self, addr: int) -> int | None:
        """The guest-physical address of a device (bus) address: itself here."""
        return addr

    @property
    def logging(self) -> bool:
        return self.log.shape[0] != 0

    @property
    def gpa_end(self) -> int:
        return max((r.spec.gpa_end for r in self.regions), default=0)

    def find_exact(self, guest_phys_addr: int, memory_size: int,
                   userspace_addr: int) -> MappedRegion | None:
        for r in self.regions:
            s = r.spec
            if (s.guest_phys_addr, s.memory_size, s.userspace_addr) == (
                    guest_phys_addr, memory_size, userspace_addr):
                return r
        return None

    def region_at_gpa(self, addr: GuestAddress) -> MappedRegion | None:
        i = bisect.bisect_right(self._gpa_starts, addr) - 1
        if i >= 0 and addr < self.regions[i].spec.gpa_end:
            return self.regions[i]
        return None

    def region_at_user(self, addr: UserAddress) -> MappedRegion | None:
        i = bisect.bisect_right(self._user_starts, addr) - 1
        if i >= 0:
            r = self.regions[self._user_order[i]]
            if addr < r.spec.user_end:
                return r
        return None

    def translate_gpa(self, addr: GuestAddress, length: int) -> list[Segment]:
        """Scatter list for [addr, addr+length): each piece clamped to its region's end."""
        return self._translate(addr, length, "guest-physical", self.region_at_gpa,
                               lambda r: r.spec.guest_phys_addr)

    def translate_user(self, addr: UserAddress, length: int) -> list[Segment]:
        return self._translate(addr, length, "user", self.region_at_user,
                               lambda r: r.spec.userspace_addr)

    def _translate(self, addr, length, space, find, start_of) -> list[Segment]:
        if length < 0 or addr < 0 or addr + length > 1 << 64:
            raise AddressNotMappedError(space, addr, length)
        segments: list[Segment] = []
        cur, left = addr, length
        while left > 0:
            region = find(cur)
            if region is None:
                raise AddressNotMappedError(space, addr, length)
            offset = cur - start_of(region)
            n = min(left, region.spec.memory_size - offset)
            segments.append(Segment(region, offset, n))
            cur += n
            left -= n
        return segments

    def contiguous_user_range(self, addr: UserAddress, length: int) -> Segment | None:
        """The one region holding all of [addr, addr+length), or None (not mapped or split)."""
        region = self.region_at_user(addr)
        if region is None or length <= 0:
            return None
        offset = addr - region.spec.userspace_addr
        if offset + length > region.spec.memory_size:
            return None
        return Segment(region, offset, length)

    def kernel(self) -> KernelMemory:
        """The compiled-code form, built once per table (tables are immutable).

        It holds raw host addresses, not views: it is valid only while this table's regions
        are mapped, which the grace period guarantees for any burst that loaded this table.
        """
        if self._kernel is None:
            self._kernel = (
                np.array([r.spec.guest_phys_addr for r in self.regions], dtype=np.int64),
                np.array([r.spec.userspace_addr for r in self.regions], dtype=np.int64),
                np.array([r.spec.memory_size for r in self.regions], dtype=np.int64),
                np.array(self._user_order, dtype=np.int64),
                np.array([r.mapped_data().ctypes.data for r in self.regions], dtype=np.int64),
                self.log, _NONE, _NONE, _NONE)
        return self._kernel

    def memoryviews(self) -> list[memoryview]:
        """Each region's bytes as a memoryview, GPA order (the Python device tier's fast access:
        a slice assignment costs a tenth of a ctypes.memmove here). Dropped by release_kernel:
        a request holding them keeps its mapping alive (mmap refuses to close while exported)."""
        views = self._views
        if views is None:
            # ndarray.data is memoryview(ndarray); numpy types ndarray a Buffer only for 3.12+.
            views = self._views = [r.mapped_data().data for r in self.regions]
        return views

    def release_kernel(self) -> None:
        self._kernel = None
        self._views = None


def _check_no_overlap(ordered, space, bounds) -> None:
    for a, b in zip(ordered, ordered[1:]):
        a_start, a_end = bounds(a)
        b_start, _ = bounds(b)
        if b_start < a_end:
            raise BadRegionError(f"regions overlap in {space} space at 0x{b_start:x} "
                                 f"(previous ends at 0x{a_end:x})")

