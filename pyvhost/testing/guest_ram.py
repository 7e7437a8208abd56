"""A guest's RAM for tests: memfd regions at guest-physical addresses, as a frontend shares them.

Each region is what a vhost-user frontend describes in SET_MEM_TABLE: a guest-physical address
(GPA), a size, the frontend's own virtual address for it (`userspace_addr`) and an offset into the
fd (`mmap_offset`). This module owns its memory directly and does not use `pyvhost.memory`, so a
bug on the device side cannot hide behind the same bug here.

Frontend user addresses are deliberately unlike GPAs (high, and not in GPA order) so code that
mixes the two address spaces, or the offsets of two regions, fails visibly:

- a region GPA-adjacent to an existing one continues that region's user range too, as QEMU's
  mapping of a contiguous RAM block would, so a ring straddling the boundary is contiguous in both
  spaces;
- any other region gets a fresh user window *below* the previous ones, so user order is the
  reverse of the order regions were added in.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

# Where the first fresh user window sits; later windows go down from here by USER_WINDOW.
USER_BASE = 0x7F00_0000_0000
USER_WINDOW = 1 << 36
# The prefix of the memfd before mmap_offset holds this byte, so a backend that ignores the
# offset reads recognisable garbage instead of plausible zeros.
OFFSET_POISON = 0xA5


class AddressError(ValueError):
    """An address range is not (entirely) backed by guest RAM."""


@dataclass(slots=True)
class Region:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap
    bump: int = 0  # next free byte (region-relative) for alloc()

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def user_end(self) -> int:
        return self.userspace_addr + self.size


def _overlaps(a: int, a_len: int, b: int, b_len: int) -> bool:
    return a < b + b_len and b < a + a_len


class GuestRam:
    """Guest RAM as memfd regions. `close()` closes every fd and mapping it owns."""

    def __init__(self, regions: "Iterable[tuple[int, int]]" = (), mmap_offset: int = 0) -> None:
        self._regions: list[Region] = []  # sorted by GPA
        self._starts: list[int] = []  # their GPAs, for bisection
        self._windows = 0
        self._closed = False
        for gpa, size in regions:
            self.add_region(gpa, size, mmap_offset)

    # -- regions -------------------------------------------------------------------------------

    def add_region(
        self, gpa: int, size: int, mmap_offset: int = 0, userspace_addr: "int | None" = None
    ) -> "GuestRam":
        """Create a memfd of `mmap_offset + size` bytes whose bytes from `mmap_offset` on are the
        guest's [gpa, gpa + size). Returns self, so calls chain."""
        self._check_open()
        if size <= 0 or gpa < 0:
            raise ValueError(f"bad region gpa={gpa:#x} size={size:#x}")
        if mmap_offset < 0 or mmap_offset % mmap.PAGESIZE:
            raise ValueError(f"mmap_offset {mmap_offset:#x} is not page-aligned")
        if userspace_addr is None:
            userspace_addr = self._default_user_addr(gpa, size)
        self._check_free(gpa, size, userspace_addr)
        fd, mm = self._make_memfd(mmap_offset + size, mmap_offset)
        region = Region(gpa, size, userspace_addr, mmap_offset, fd, mm)
        i = bisect.bisect(self._starts, gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, gpa)
        return self

    def remove_region(self, gpa: int) -> None:
        """Forget the region starting at `gpa`, closing its mapping and fd."""
        region = self.region(gpa)
        i = self._regions.index(region)
        del self._regions[i], self._starts[i]
        _close_region(region)

    def move_region(
        self, gpa: int, *, new_gpa: "int | None" = None, new_userspace_addr: "int | None" = None
    ) -> None:
        """Same memory (fd, mapping, contents) at a new GPA and/or user address, as when a
        frontend re-sends its table with a region moved."""
        region = self.region(gpa)
        i = self._regions.index(region)
        del self._regions[i], self._starts[i]
        try:
            g = region.guest_phys_addr if new_gpa is None else new_gpa
            u = region.userspace_addr if new_userspace_addr is None else new_userspace_addr
            self._check_free(g, region.size, u)
            region.guest_phys_addr, region.userspace_addr = g, u
        finally:
            i = bisect.bisect(self._starts, region.guest_phys_addr)
            self._regions.insert(i, region)
            self._starts.insert(i, region.guest_phys_addr)

    def region(self, gpa: int) -> Region:
        """The region that *starts* at `gpa`."""
        self._check_open()
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa:
            raise KeyError(f"no region starts at GPA {gpa:#x}")
        return self._regions[i]

    @property
    def regions(self) -> "tuple[Region, ...]":
        return tuple(self._regions)

    def region_specs(self, *, owned: bool = False) -> "list[tuple[int, int, int, int, int]]":
        """(fd, gpa, size, userspace_addr, mmap_offset) per region, in GPA order.

        With owned=False the fds are GuestRam's: lend them, do not close them (a backend that
        takes ownership, e.g. wraps them in OwnedFd, must be given owned=True fds or receive them
        over a socket, which copies them). With owned=True each fd is a new one from
        reopen_region() that the caller owns.
        """
        self._check_open()
        return [
            (
                self.reopen_region(r.guest_phys_addr) if owned else r.fd,
                r.guest_phys_addr,
                r.size,
                r.userspace_addr,
                r.mmap_offset,
            )
            for r in self._regions
        ]

    def reopen_region(self, gpa: int) -> int:
        """A new fd for the *same* memory (a new open file description, not a dup), owned by
        the caller. Lets a test replace the memory table with identical memory under new fds."""
        return os.open(f"/proc/self/fd/{self.region(gpa).fd}", os.O_RDWR | os.O_CLOEXEC)

    # -- address translation -------------------------------------------------------------------

    def gpa_to_user(self, gpa: int) -> int:
        region = self._by_gpa(gpa)
        return region.userspace_addr + (gpa - region.guest_phys_addr)

    def user_to_gpa(self, uaddr: int) -> int:
        self._check_open()
        for region in self._regions:
            if region.userspace_addr <= uaddr < region.user_end:
                return region.guest_phys_addr + (uaddr - region.userspace_addr)
        raise AddressError(f"user address {uaddr:#x} is in no region")

    # -- data ----------------------------------------------------------------------------------

    def write(self, gpa: int, data: "bytes | bytearray | memoryview") -> None:
        """Write `data` at `gpa`; may span regions that are contiguous in GPA space."""
        pos = 0
        for region, off, n in self._spans(gpa, len(data)):
            region.mm[off : off + n] = data[pos : pos + n]
            pos += n

    def read(self, gpa: int, n: int) -> bytes:
        """Read `n` bytes at `gpa`; may span regions that are contiguous in GPA space."""
        return b"".join(region.mm[off : off + k] for region, off, k in self._spans(gpa, n))

    def read_u16(self, gpa: int) -> int:
        """The 16-bit value at `gpa` (2-aligned), read with one load: for ring indices the
        device updates concurrently. read() copies through memcpy, and glibc copies 2 bytes
        as a byte load then a word load (seen on this machine's AVX-512 variant), so a store
        landing in between is read torn: the old low byte with the new high byte."""
        if gpa % 2:
            raise ValueError(f"GPA {gpa:#x} is not 2-aligned")
        ((region, off, _),) = self._spans(gpa, 2)
        with memoryview(region.mm) as mv, mv[off:off + 2].cast("H") as word:
            return word[0]  # unpack_single: a fixed-size 2-byte memcpy, compiled to one load

    def alloc(
        self, size: int, align: int = 8, *, region: "int | None" = None, offset: "int | None" = None
    ) -> int:
        """Reserve `size` bytes and return their GPA. Never freed (a bump allocator).

        region: GPA of the region to take from (default: the first, in GPA order, with room).
        offset: place the block at this offset inside `region` instead of at its bump pointer;
        the block may run on into GPA-adjacent regions, so a test can make it straddle a
        boundary. It must not overlap what was already allocated there.
        """
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        if offset is not None:
            return self._alloc_at(self.region(self._starts[0] if region is None else region),
                                  offset, size, align)
        candidates = self._regions if region is None else [self.region(region)]
        for r in candidates:
            start = _align_up(r.guest_phys_addr + r.bump, align)
            if start + size <= r.gpa_end:
                r.bump = start + size - r.guest_phys_addr
                return start
        raise MemoryError(f"no room for {size:#x} bytes aligned to {align}")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every mapping and fd. Idempotent; later use raises ValueError."""
        if self._closed:
            return
        self._closed = True
        regions, self._regions, self._starts = self._regions, [], []
        for region in regions:
            _close_region(region)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "GuestRam":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net against leaked fds; tests should call close().
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # e.g. at interpreter exit, when os may already be gone
                pass

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("GuestRam is closed")

    def _default_user_addr(self, gpa: int, size: int) -> int:
        for r in self._regions:
            if r.gpa_end == gpa:  # continues r: continue r's user range as well
                return r.user_end
            if gpa + size == r.guest_phys_addr:  # precedes r
                return r.userspace_addr - size
        self._windows += 1
        # Middle of a fresh window, so a run can grow either way without meeting its neighbours.
        return USER_BASE - self._windows * USER_WINDOW + USER_WINDOW // 2

    def _check_free(self, gpa: int, size: int, uaddr: int) -> None:
        for r in self._regions:
            where = f"the region at GPA {r.guest_phys_addr:#x}"
            if _overlaps(gpa, size, r.guest_phys_addr, r.size):
                raise ValueError(f"GPA range {gpa:#x}+{size:#x} overlaps {where}")
            if _overlaps(uaddr, size, r.userspace_addr, r.size):
                raise ValueError(f"user range {uaddr:#x}+{size:#x} overlaps {where}")

    @staticmethod
    def _make_memfd(length: int, mmap_offset: int) -> "tuple[int, mmap.mmap]":
        fd = os.memfd_create("pyvhost-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, length)
            # Map the whole file from offset 0 (mmap's own offset must be granularity-aligned);
            # the region's bytes start at mmap_offset inside it.
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        mm[:mmap_offset] = bytes([OFFSET_POISON]) * mmap_offset
        return fd, mm

    def _by_gpa(self, gpa: int) -> Region:
        self._check_open()
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].gpa_end:
            return self._regions[i]
        raise AddressError(f"GPA {gpa:#x} is in no region")

    def _spans(self, gpa: int, n: int) -> "list[tuple[Region, int, int]]":
        """(region, file offset, length) pieces covering [gpa, gpa + n), or AddressError."""
        if n < 0:
            raise ValueError(f"negative length {n}")
        if not n:
            return []
        region = self._by_gpa(gpa)
        out: list[tuple[Region, int, int]] = []
        while n:
            rel = gpa - region.guest_phys_addr
            k = min(n, region.size - rel)
            out.append((region, region.mmap_offset + rel, k))
            gpa, n = gpa + k, n - k
            if n:
                region = self._next_adjacent(region, gpa)
        return out

    def _next_adjacent(self, region: Region, gpa: int) -> Region:
        i = self._regions.index(region) + 1
        if i < len(self._regions) and self._starts[i] == gpa:
            return self._regions[i]
        raise AddressError(f"GPA {gpa:#x} is in no region (range runs past {region.gpa_end:#x})")

    def _alloc_at(self, first: Region, offset: int, size: int, align: int) -> int:
        start = first.guest_phys_addr + offset
        if start % align:
            raise ValueError(f"GPA {start:#x} is not aligned to {align}")
        for region, file_off, k in self._spans(start, size):
            rel = file_off - region.mmap_offset
            if rel < region.bump:
                raise ValueError(f"block at {start:#x} overlaps allocated space")
            region.bump = rel + k
        return start


def _align_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def _close_region(region: Region) -> None:
    # Unmapping does not need the fd and closing the fd does not unmap: both must be done.
    region.mm.close()
    os.close(region.fd)
    region.fd = -1
