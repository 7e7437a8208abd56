"""The inflight area: shared memory the frontend keeps for the device's inflight I/O tracking
(GET_INFLIGHT_FD / SET_INFLIGHT_FD, payload `{u64 mmap_size, u64 mmap_offset, u16 num_queues,
u16 queue_size}`), one queue region after another, each `region_size` bytes (its layout is the
ring's business: ring/inflight.py).

GET_INFLIGHT_FD: the device allocates a zeroed, sealed memfd (`allocate`), the frontend maps it
and keeps it for as long as the device may restart (QEMU frees it at a device reset).
SET_INFLIGHT_FD (every start, also after the device restarted): the device maps what the
frontend gives (`InflightArea`), checking every number first; an area is unmapped only when no
view of it is left (as guest memory regions).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat

import numpy as np

from pyvhost.fd import OwnedFd
from pyvhost.memory.errors import BadRegionError
from pyvhost.memory.region import unmap

MAX_AREA = 1 << 40  # far above 65535 queues of 32768 entries (35 GiB), below int64 trouble


class BadInflightArea(BadRegionError):
    """A GET/SET_INFLIGHT_FD whose numbers or fd cannot be an inflight area."""


def allocate(num_queues: int, region_size: int) -> tuple[OwnedFd, int]:
    """A zero-filled memfd of num_queues regions, size-sealed (the frontend cannot shrink it
    under our mapping: a SIGBUS would kill the device): (fd, its size)."""
    size = num_queues * region_size
    fd = OwnedFd(os.memfd_create("pyvhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        os.ftruncate(fd.fileno(), size)
        fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except OSError:
        fd.close()
        raise
    return fd, size


class InflightArea:
    """A mapped inflight area; `region(i)` is queue i's region as a uint8 view."""

    def __init__(self, fd: OwnedFd, size: int, offset: int, num_queues: int,
                 region_size: int) -> None:
        try:
            if num_queues <= 0 or region_size <= 0 or region_size % 64:
                raise BadInflightArea(f"{num_queues} queues of {region_size} bytes")
            if not 0 <= offset <= MAX_AREA or not 0 < size <= MAX_AREA or offset % 64:
                raise BadInflightArea(f"size {size} at offset {offset} (offset must be "
                                      "64-byte aligned, both below 1 TiB)")
            if size < num_queues * region_size:
                raise BadInflightArea(f"{size} bytes cannot hold {num_queues} queue regions of "
                                      f"{region_size} bytes")
            try:
                st = os.fstat(fd.fileno())
            except OSError as exc:
                raise BadInflightArea(f"inflight fd unusable: {exc}") from exc
            if not stat.S_ISREG(st.st_mode):
                raise BadInflightArea(f"inflight fd is not a regular file (mode "
                                      f"0o{st.st_mode:o})")
            if st.st_size < offset + size:
                raise BadInflightArea(f"inflight fd holds {st.st_size} bytes, the area needs "
                                      f"{offset + size} (offset {offset} + size {size})")
            try:
                self._mmap: mmap.mmap | None = mmap.mmap(
                    fd.fileno(), offset + size, mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as exc:
                raise BadInflightArea(f"cannot map the inflight area: {exc}") from exc
        except BadInflightArea:
            fd.close()
            raise
        self._fd = fd
        self.size = size
        self.num_queues = num_queues
        self.region_size = region_size
        self.data: np.ndarray | None = np.frombuffer(self._mmap, dtype=np.uint8, count=size,
                                                     offset=offset)

    def region(self, index: int) -> np.ndarray:
        """Queue `index`'s region (0 <= index < num_queues)."""
        assert self.data is not None and 0 <= index < self.num_queues
        start = index * self.region_size
        return self.data[start:start + self.region_size]

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> bool:
        """Unmap and close the fd; False (kept) while views of it are alive."""
        if self._mmap is None:
            return True
        self.data = None
        if not unmap(self._mmap, self._fd):
            return False
        self._mmap = None
        return True

    def __repr__(self) -> str:
        return (f"InflightArea({self.num_queues} x {self.region_size} bytes"
                f"{', closed' if self.closed else ''})")
