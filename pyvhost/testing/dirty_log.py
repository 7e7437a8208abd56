"""The frontend's side of the dirty log, for tests: a log memfd, and a reader that consumes it
the way QEMU does while migrating (vhost_dev_sync_region: xchg each nonzero 64-bit chunk with
0 and mark its pages dirty), concurrently with the device setting bits.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from pyvhost.ring.hostmem import atomic_xchg_u64
from pyvhost.ring.jit import kernel

PAGE = 4096


@kernel
def _consume(base, chunks, seen):
    """xchg every nonzero chunk with 0; OR what it held into seen (one bool per page)."""
    found = 0
    for i in range(chunks):
        v = atomic_xchg_u64(base + 8 * i, np.uint64(0))
        if v != 0:
            for b in range(64):
                if (v >> np.uint64(b)) & np.uint64(1):
                    seen[i * 64 + b] = True
                    found += 1
    return found


class LogMemfd:
    """A dirty log covering `memory_bytes` of guest-physical memory, as QEMU sizes it."""

    def __init__(self, memory_bytes: int) -> None:
        chunks = -(-memory_bytes // (PAGE * 64))
        self.size = chunks * 8
        self.fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._mm = mmap.mmap(self.fd, self.size)
        self.bits = np.frombuffer(self._mm, dtype=np.uint8)
        self.chunks = chunks
        self.seen = np.zeros(chunks * 64, dtype=np.bool_)  # pages consumed so far

    def consume(self) -> int:
        """One pass of QEMU's sync: pages found set (and now cleared)."""
        return int(_consume(self.bits.ctypes.data, self.chunks, self.seen))

    def pages(self) -> set[int]:
        """Every page seen set so far, plus those set now (consumed)."""
        self.consume()
        return set(np.flatnonzero(self.seen).tolist())

    def close(self) -> None:
        del self.bits
        self._mm.close()
        os.close(self.fd)


class LogReader:
    """A thread that consumes the log again and again, as QEMU does during precopy."""

    def __init__(self, log: LogMemfd) -> None:
        self.log = log
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-reader", daemon=True)

    def __enter__(self) -> "LogReader":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.log.consume()
            self.passes += 1
            self._stop.wait(0.0002)
