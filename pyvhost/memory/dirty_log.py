"""The dirty log of live migration: one bit per 4 KiB page of guest-physical memory.

The frontend (QEMU) shares the log as a memfd (SET_LOG_BASE, payload `{mmap_size,
mmap_offset}`) and, while migrating, xchg-clears it chunk by chunk and copies the pages whose
bits were set. The device sets `log[page / 8] |= 1 << (page % 8)` atomically for every page it
writes (vhost-user.rst "Live migration"): guest buffers it fills and, for rings whose
SET_VRING_ADDR carried VHOST_VRING_F_LOG, the used ring at `log_guest_addr`.

Ordering (why bits are set late, never early): a bit that QEMU clears before the device's data
is visible makes QEMU copy the page without the data, and nothing sets the bit again. So the
kernels write the data, remember the page (a per-queue cache), and before used->idx is
published issue a full fence and set the bits (ring/kernels.py `log_write`/`log_flush`).

How the kernels see the log: `RegionTable.kernel()`'s KM_LOG array, `[host address, bytes]`
while LOG_ALL is on and a log is mapped, empty otherwise. Swapping it is a memory-map change
like any other (a new table, a grace period), so no burst can still write into a log that was
replaced or switched off, and an old log is unmapped only after that.
"""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np

from pyvhost.fd import OwnedFd
from pyvhost.memory.errors import BadRegionError
from pyvhost.memory.region import unmap

PAGE_SHIFT = 12  # the log's page: 4 KiB whatever the host's page size


class BadLogError(BadRegionError):
    """A SET_LOG_BASE whose fd or sizes cannot be a log."""


class DirtyLog:
    """A mapped log memfd. `bits` is a uint8 view of its `size` bytes."""

    def __init__(self, fd: OwnedFd, size: int, offset: int) -> None:
        if size <= 0 or offset < 0 or size > 1 << 40 or offset > 1 << 40:
            fd.close()
            raise BadLogError(f"dirty log of {size} bytes at offset {offset} is not a log")
        try:
            st = os.fstat(fd.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BadLogError(f"dirty log fd is not a regular file (mode 0o{st.st_mode:o})")
            if st.st_size < offset + size:
                raise BadLogError(f"dirty log fd holds {st.st_size} bytes, the log needs "
                                  f"{offset + size} (offset {offset} + size {size})")
            self._mmap: mmap.mmap | None = mmap.mmap(fd.fileno(), offset + size, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            fd.close()
            raise BadLogError(f"cannot map the dirty log: {exc}") from exc
        except BadLogError:
            fd.close()
            raise
        self._fd = fd
        self.size = size
        self.bits: np.ndarray | None = np.frombuffer(self._mmap, dtype=np.uint8, count=size,
                                                     offset=offset)
        self.kernel = np.array([self.bits.ctypes.data, size], dtype=np.int64)

    def covers(self, gpa_end: int) -> bool:
        """Whether the log has a bit for every page below gpa_end."""
        return ((gpa_end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT) <= self.size * 8

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> bool:
        """Unmap and close; False (kept) while views of it are alive."""
        if self._mmap is None:
            return True
        self.bits = None
        if not unmap(self._mmap, self._fd):
            return False
        self._mmap = None
        return True


NO_LOG = np.zeros(0, dtype=np.int64)
