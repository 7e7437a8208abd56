"""One region of guest memory, mapped from the fd the frontend sent."""

from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

from pyvhost.fd import OwnedFd
from pyvhost.memory.errors import BadRegionError

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """A region as the wire describes it (vhost-user memory region)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def user_end(self) -> int:
        return self.userspace_addr + self.memory_size

    def check(self) -> None:
        if self.memory_size <= 0:
            raise BadRegionError(f"region at GPA 0x{self.guest_phys_addr:x} has size 0")
        for name, value in (("guest_phys_addr", self.guest_phys_addr),
                            ("userspace_addr", self.userspace_addr),
                            ("mmap_offset", self.mmap_offset)):
            # Compiled code does its address arithmetic in int64: keep every end below 2**63.
            if value < 0 or value + self.memory_size > 1 << 63:
                raise BadRegionError(f"region {name}=0x{value:x} + size 0x{self.memory_size:x} "
                                     "reaches past 2**63")


class MappedRegion:
    """Owns a region's fd and mmap; `data` is a uint8 view of exactly the region's bytes.

    The whole file from offset 0 to mmap_offset + memory_size is mapped, so any mmap_offset works
    (mmap itself needs page-aligned offsets). `data` is made through the buffer protocol, so
    `mmap.close()` refuses (BufferError) while any view derived from it is alive: `close()`
    reports that as a leak instead of unmapping under a reader.
    """

    def __init__(self, spec: RegionSpec, fd: OwnedFd) -> None:
        spec.check()
        self.spec = spec
        self.users = 1  # ADD_MEM_REGs naming this very region, written under the writer lock
        self.pins = 0   # deferred requests using this mapping (GuestMemory.pin); unmap waits
        self._fd = fd
        length = spec.mmap_offset + spec.memory_size
        _check_backing_size(fd, length, spec)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd.fileno(), length, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise BadRegionError(f"cannot map region {spec}: {exc}") from exc
        self.data: np.ndarray | None = np.frombuffer(
            self._mmap, dtype=np.uint8, count=spec.memory_size, offset=spec.mmap_offset)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def mapped_data(self) -> np.ndarray:
        """`data` of a region that must still be mapped (every region of a table in use)."""
        data = self.data
        assert data is not None, f"{self!r} is unmapped"
        return data

    def close(self) -> bool:
        """Unmap and close the fd. Returns False (and keeps the mapping) while views are alive."""
        if self._mmap is None:
            return True
        if self.pins:
            return False
        self.data = None
        if not unmap(self._mmap, self._fd):
            return False
        self._mmap = None
        return True

    def __repr__(self) -> str:
        s = self.spec
        return (f"MappedRegion(gpa=0x{s.guest_phys_addr:x}, size=0x{s.memory_size:x}, "
                f"user=0x{s.userspace_addr:x}{', closed' if self.closed else ''})")


def unmap(mapping: mmap.mmap, fd: OwnedFd) -> bool:
    """Unmap and close the fd it came from; False (both kept) while views of it are alive
    (mmap refuses to close while a buffer export lives: the safety net against unmapping
    under a reader)."""
    try:
        mapping.close()
    except BufferError:
        return False
    fd.close()
    return True


def _check_backing_size(fd: OwnedFd, length: int, spec: RegionSpec) -> None:
    # A memfd shorter than the region it declares would SIGBUS the whole process on first
    # touch (DPDK 22.11 dies exactly so): check before mapping.
    try:
        st = os.fstat(fd.fileno())
    except OSError as exc:
        raise BadRegionError(f"region fd unusable: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise BadRegionError(f"region fd is not a regular file (mode 0o{st.st_mode:o})")
    if st.st_size < length:
        raise BadRegionError(
            f"region fd holds {st.st_size} bytes, the region needs {length} "
            f"(mmap_offset 0x{spec.mmap_offset:x} + size 0x{spec.memory_size:x})")
