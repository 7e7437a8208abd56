"""The device IOTLB (vIOMMU, VIRTIO_F_IOMMU_PLATFORM): I/O virtual addresses to guest memory.

With VIRTIO_F_IOMMU_PLATFORM acked, every address the device sees — ring addresses from
SET_VRING_ADDR, descriptor buffers, the used ring's log address — is an IOVA, translated through
entries the frontend sends (IOTLB_MSG UPDATE: iova, size, frontend user address, permission)
and takes back (INVALIDATE: a range). The memory table still supplies the mappings; only the
user-address half of its regions is used ("Memory access" in vhost-user.rst).

Two layers, like the region table's:
- `Iotlb`: the writer's set of entries (the protocol thread only): sorted by IOVA, never
  overlapping, checked as they come (zero size, bad permission, past the device's address
  range, an overlap that translates differently: refused). A bounded cache: past
  `MAX_ENTRIES` the oldest entry is evicted (the frontend re-sends it on the next miss; Linux
  vhost retires the oldest too).
- `IotlbTable`: an immutable snapshot, a `RegionTable` to every reader (the worker loads it once
  per burst as `GuestMemory.table`). Its entries are resolved against the regions into *runs*:
  IOVA-adjacent entries with the same permission whose memory is adjacent in one region's
  mapping are joined (QEMU sends one 4 KiB page per UPDATE, so a ring or a buffer spans
  several entries, and one run lets the direct map view it). Its kernel form has the region
  table's shape, runs in place of regions — both address spaces of the ring kernels translate
  IOVAs — plus each run's permission and guest-physical start (the dirty log is kept in
  guest-physical pages) and a flag that says "translate through the IOTLB": a lookup that
  finds no run is then a *miss* (the burst stops, nothing consumed; the frontend is asked),
  not a fault.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pyvhost.memory.address import GuestAddress, UserAddress
from pyvhost.memory.errors import AddressNotMappedError, MemoryError_
from pyvhost.memory.region import MappedRegion
from pyvhost.memory.table import KernelMemory, RegionTable, Segment

PERM_RO = 1
PERM_WO = 2
PERM_RW = 3
#: Addresses the compiled kernels can name (their arithmetic is int64).
IOVA_LIMIT = 1 << 63
ADDRESS_SPACE_END = 1 << 64
#: Cache bound. QEMU sends one page per entry: 2**16 entries cover 256 MiB of live buffers.
MAX_ENTRIES = 1 << 16


class BadIotlbEntry(MemoryError_):
    """An IOTLB message the device refuses (its reply says so; nothing changed)."""


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    iova: int
    size: int
    uaddr: int
    perm: int

    @property
    def end(self) -> int:
        return self.iova + self.size

    def check(self) -> None:
        if self.size <= 0:
            raise BadIotlbEntry(f"entry at IOVA 0x{self.iova:x} has size {self.size}")
        if self.perm not in (PERM_RO, PERM_WO, PERM_RW):
            raise BadIotlbEntry(f"entry at IOVA 0x{self.iova:x} has permission {self.perm} "
                                "(1 read, 2 write, 3 both)")
        if self.iova < 0 or self.end > IOVA_LIMIT:
            raise BadIotlbEntry(f"entry IOVA 0x{self.iova:x}+0x{self.size:x} reaches past "
                                "2**63 (beyond what the device can address)")
        if self.uaddr < 0 or self.uaddr + self.size > ADDRESS_SPACE_END:
            raise BadIotlbEntry(f"entry user address 0x{self.uaddr:x}+0x{self.size:x} wraps")

    def same_translation(self, other: "IotlbEntry") -> bool:
        return self.perm == other.perm and self.uaddr - self.iova == other.uaddr - other.iova


@dataclass
class IotlbStats:
    updates: int = 0
    invalidations: int = 0
    entries_invalidated: int = 0
    evictions: int = 0


class Iotlb:
    """The entries the frontend sent; the writer's side (one thread: the protocol's)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._starts: list[int] = []
        self._entries: list[IotlbEntry] = []
        self._age: dict[int, IotlbEntry] = {}   # by IOVA, oldest first (eviction order)
        self.stats = IotlbStats()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> tuple[IotlbEntry, ...]:
        return tuple(self._entries)

    def clear(self) -> None:
        self._starts.clear()
        self._entries.clear()
        self._age.clear()

    def _overlapping(self, start: int, end: int) -> range:
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._entries[lo].end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)
        return range(lo, hi)

    def update(self, entry: IotlbEntry) -> bool:
        """Add an entry (checked). An entry overlapping others that translate the same way is
        joined with them (a page sent twice: QEMU's unrequested used-ring UPDATE at start and
        our miss for it); one that would translate an IOVA differently is refused — the
        frontend must invalidate first. Returns False if nothing changed."""
        entry.check()
        span = self._overlapping(entry.iova, entry.end)
        old = self._entries[span.start:span.stop]
        for e in old:
            if not e.same_translation(entry):
                raise BadIotlbEntry(
                    f"entry IOVA 0x{entry.iova:x}+0x{entry.size:x} -> 0x{entry.uaddr:x} "
                    f"perm {entry.perm} overlaps IOVA 0x{e.iova:x}+0x{e.size:x} -> "
                    f"0x{e.uaddr:x} perm {e.perm} (invalidate it first)")
        if old:
            start = min(entry.iova, old[0].iova)
            end = max(entry.end, old[-1].end)
            if start == old[0].iova and end == old[0].end and len(old) == 1:
                return False  # already there
            entry = IotlbEntry(start, end - start, entry.uaddr - (entry.iova - start),
                               entry.perm)
            for e in old:
                del self._age[e.iova]
            del self._starts[span.start:span.stop]
            del self._entries[span.start:span.stop]
        while len(self._entries) >= self.max_entries:
            oldest = next(iter(self._age.values()))
            self._remove(oldest)
            self.stats.evictions += 1
        i = bisect.bisect_left(self._starts, entry.iova)
        self._starts.insert(i, entry.iova)
        self._entries.insert(i, entry)
        self._age[entry.iova] = entry
        return True

    def invalidate(self, iova: int, size: int) -> list[IotlbEntry]:
        """Remove every entry overlapping [iova, iova+size) (whole: a part of an entry is
        asked for again on its next use). iova + size == 2**64 means "to the end" (QEMU's
        lazy-mode flush of [0xfef00000, 2**64)). Returns the entries removed."""
        if size <= 0 or iova < 0 or iova + size > ADDRESS_SPACE_END:
            raise BadIotlbEntry(f"invalidation of IOVA 0x{iova:x}+0x{size:x} is not a range")
        span = self._overlapping(iova, min(iova + size, IOVA_LIMIT))
        gone = self._entries[span.start:span.stop]
        for e in gone:
            del self._age[e.iova]
        del self._starts[span.start:span.stop]
        del self._entries[span.start:span.stop]
        return gone

    def _remove(self, entry: IotlbEntry) -> None:
        i = bisect.bisect_left(self._starts, entry.iova)
        del self._starts[i]
        del self._entries[i]
        del self._age[entry.iova]


class Run(NamedTuple):
    """IOVA-contiguous entries with one permission over contiguous memory of one region."""

    iova: int
    size: int
    region: MappedRegion
    offset: int   # into region.data
    perm: int

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def gpa(self) -> int:
        return self.region.spec.guest_phys_addr + self.offset


def insert_run(runs: list[Run], entry: IotlbEntry, regions: RegionTable) -> bool:
    """Add one entry that overlaps no other to `runs` (sorted), joining it with its neighbours
    as `resolve` would: the common UPDATE costs a search, not a rebuild of every run. False
    (nothing changed) when it does not lie in one region: call `resolve` then."""
    region = regions.region_at_user(UserAddress(entry.uaddr))
    if region is None:
        return False
    offset = entry.uaddr - region.spec.userspace_addr
    if entry.size > region.spec.memory_size - offset:
        return False
    new = Run(entry.iova, entry.size, region, offset, entry.perm)
    i = _bisect_runs(runs, entry.iova)
    if i > 0:
        prev = runs[i - 1]
        if (prev.end == new.iova and prev.region is region and prev.perm == new.perm
                and prev.offset + prev.size == offset):
            new = Run(prev.iova, prev.size + new.size, region, prev.offset, new.perm)
            i -= 1
            del runs[i]
    if i < len(runs):
        nxt = runs[i]
        if (new.end == nxt.iova and nxt.region is region and nxt.perm == new.perm
                and new.offset + new.size == nxt.offset):
            new = Run(new.iova, new.size + nxt.size, region, new.offset, new.perm)
            del runs[i]
    runs.insert(i, new)
    return True


def _bisect_runs(runs: list[Run], iova: int) -> int:
    lo, hi = 0, len(runs)
    while lo < hi:
        mid = (lo + hi) >> 1
        if runs[mid].iova < iova:
            lo = mid + 1
        else:
            hi = mid
    return lo


def resolve(entries: tuple[IotlbEntry, ...], regions: RegionTable) -> list[Run]:
    """The runs of `entries` over `regions`. A part of an entry outside every region is left
    out (its use is then a miss: the frontend checked the entry against the regions it sent,
    so this happens only across a memory-table change)."""
    runs: list[Run] = []
    for e in entries:
        cur, left, iova = e.uaddr, e.size, e.iova
        while left > 0:
            region = regions.region_at_user(UserAddress(cur))
            if region is None:
                break
            offset = cur - region.spec.userspace_addr
            n = min(left, region.spec.memory_size - offset)
            if runs:
                last = runs[-1]
                if (last.end == iova and last.region is region and last.perm == e.perm
                        and last.offset + last.size == offset):
                    runs[-1] = last._replace(size=last.size + n)
                    cur, left, iova = cur + n, left - n, iova + n
                    continue
            runs.append(Run(iova, n, region, offset, e.perm))
            cur, left, iova = cur + n, left - n, iova + n
    return runs


class IotlbTable(RegionTable):
    """A snapshot of the IOTLB over a region table, read like a region table: both the
    guest-physical and the user address space of a region table mean "IOVA" here."""

    __slots__ = ("_base", "runs", "_run_starts", "_run_views")

    iotlb = True

    def __init__(self, base: RegionTable, runs: list[Run]) -> None:
        # Not RegionTable.__init__: the regions were checked when `base` was made.
        self.regions = base.regions
        self.log = base.log
        self._gpa_starts = base._gpa_starts
        self._user_order = base._user_order
        self._user_starts = base._user_starts
        self._kernel = None
        self._views = None
        #: The region table the runs point into (the direct map of a queue stays valid across
        #: snapshots over the same base until an invalidation touches its rings).
        self._base = base
        self.runs = tuple(runs)
        self._run_starts = [r.iova for r in runs]
        self._run_views: list[memoryview] | None = None

    @property
    def base(self) -> RegionTable:
        return self._base

    def run_at(self, iova: int) -> Run | None:
        i = bisect.bisect_right(self._run_starts, iova) - 1
        if i >= 0 and iova < self.runs[i].end:
            return self.runs[i]
        return None

    def check_range(self, iova: int, length: int, perm: int) -> tuple[int, int]:
        """(0, 0) when the device may access [iova, iova+length) with `perm`; (1, first
        IOVA not in the IOTLB): a miss; (2, first IOVA without the permission): a fault."""
        cur, end = iova, iova + length
        while cur < end:
            run = self.run_at(cur)
            if run is None:
                return 1, cur
            if run.perm & perm != perm:
                return 2, cur
            cur = run.end
        return 0, 0

    # -- the RegionTable reader interface, in IOVAs --

    def region_at_gpa(self, addr: GuestAddress) -> MappedRegion | None:
        run = self.run_at(addr)
        return run.region if run is not None else None

    def region_at_user(self, addr: UserAddress) -> MappedRegion | None:
        return self.region_at_gpa(GuestAddress(addr))

    def translate_gpa(self, addr: GuestAddress, length: int) -> list[Segment]:
        if length < 0 or addr < 0 or addr + length > ADDRESS_SPACE_END:
            raise AddressNotMappedError("IOVA", addr, length)
        segments: list[Segment] = []
        cur, left = int(addr), length
        while left > 0:
            run = self.run_at(cur)
            if run is None:
                raise AddressNotMappedError("IOVA", addr, length)
            off = cur - run.iova
            n = min(left, run.size - off)
            segments.append(Segment(run.region, run.offset + off, n))
            cur += n
            left -= n
        return segments

    def translate_user(self, addr: UserAddress, length: int) -> list[Segment]:
        return self.translate_gpa(GuestAddress(addr), length)

    def contiguous_user_range(self, addr: UserAddress, length: int) -> Segment | None:
        run = self.run_at(addr)
        if run is None or length <= 0 or addr + length > run.end:
            return None
        return Segment(run.region, run.offset + addr - run.iova, length)

    def gpa_of(self, addr: int) -> int | None:
        run = self.run_at(addr)
        return None if run is None else run.gpa + addr - run.iova

    def kernel(self) -> KernelMemory:
        if self._kernel is None:
            runs = self.runs
            starts = np.array([r.iova for r in runs], dtype=np.int64)
            self._kernel = (
                starts,
                starts,
                np.array([r.size for r in runs], dtype=np.int64),
                np.arange(len(runs), dtype=np.int64),
                np.array([r.region.mapped_data().ctypes.data + r.offset for r in runs],
                         dtype=np.int64),
                self.log,
                np.array([r.perm for r in runs], dtype=np.int64),
                np.array([r.gpa for r in runs], dtype=np.int64),
                np.ones(1, dtype=np.int64))
        return self._kernel

    def memoryviews(self) -> list[memoryview]:
        """One memoryview per run (pieces of the Python tier name runs, not regions)."""
        views = self._run_views
        if views is None:
            by_region: dict[int, memoryview] = {}
            views = []
            for r in self.runs:
                whole = by_region.get(id(r.region))
                if whole is None:
                    whole = by_region[id(r.region)] = r.region.mapped_data().data
                views.append(whole[r.offset:r.offset + r.size])
            self._run_views = views
        return views

    def release_kernel(self) -> None:
        self._kernel = None
        self._run_views = None
