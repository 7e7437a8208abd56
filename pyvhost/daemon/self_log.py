"""A dirty log the backend gives itself, for measuring what logging costs (`--bench-log-all`).

What logging costs the data path can only be measured with a frontend that turns LOG_ALL on,
and the one that drives pyvhost at millions of packets per second, DPDK's virtio-user, never
does (it cannot migrate). With this option the backend behaves as if the frontend had sent
SET_LOG_BASE with a log covering guest memory, SET_FEATURES with LOG_ALL, and SET_VRING_ADDR
with VHOST_VRING_F_LOG and each used ring's guest-physical address: the kernels log exactly as
they do during a migration. The frontend's part — QEMU xchg-clearing the log's 64-bit chunks
at every dirty sync (vhost_dev_sync_region), so that bits must be set again — is played by a
thread here, every CLEAR_INTERVAL over the words of every region, more often than QEMU syncs
(once per migration iteration) so the figure is not flattered.

It is a benchmarking aid, never the migration path: the log is private, nothing reads what it
says, and the statistics say `log_simulated` 1.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from pyvhost.fd import OwnedFd
from pyvhost.memory.address import UserAddress
from pyvhost.memory.dirty_log import PAGE_SHIFT, DirtyLog
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.table import RegionTable
from pyvhost.ring.hostmem import atomic_xchg_u64, load_u64, popcount
from pyvhost.ring.jit import kernel

CLEAR_INTERVAL = 0.01  # seconds between two passes of the clearing thread
WORD_PAGES = 64        # pages per 64-bit word of the log (256 KiB of guest memory)


@kernel
def clear_words(base, spans):
    """QEMU's sync over each [first word, end word) of `spans`: a nonzero word is exchanged
    with 0. Returns the pages whose bits were found set."""
    found = 0
    for k in range(spans.shape[0]):
        for w in range(spans[k, 0], spans[k, 1]):
            if load_u64(base + 8 * w) != 0:
                found += popcount(np.int64(atomic_xchg_u64(base + 8 * w, np.uint64(0))))
    return found


def log_bytes_for(gpa_end: int) -> int:
    """Bytes of a log covering guest-physical memory below gpa_end, whole words (as QEMU)."""
    words = -(-gpa_end // (WORD_PAGES << PAGE_SHIFT))
    return max(words, 1) * 8


class SelfLog:
    """The log, its clearing thread, and the used-ring addresses to log at."""

    def __init__(self, memory: GuestMemory, interval: float = CLEAR_INTERVAL) -> None:
        self.memory = memory
        self.interval = interval
        self.passes = 0
        self.pages_cleared = 0
        self._lock = threading.Lock()   # the mapping and spans the thread clears
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._base = 0
        self._spans = np.zeros((0, 2), np.int64)
        self._size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        clear_words(0, self._spans)  # compiled now, not in the thread's first pass

    def update(self, table: RegionTable) -> None:
        """After a memory-map change: a log covering the whole table, logging on, and the
        thread clearing every region's words."""
        need = log_bytes_for(table.gpa_end)
        if need > self._size:
            fd = os.memfd_create("pyvhost-self-log", os.MFD_CLOEXEC)
            os.ftruncate(fd, need)  # sparse: only words the device touches take memory
            mm = mmap.mmap(fd, need, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.memory.set_log(DirtyLog(OwnedFd(os.dup(fd)), need, 0))
            with self._lock:
                old_fd, old_mm = self._fd, self._mm
                self._fd, self._mm, self._size = fd, mm, need
                self._base = int(np.frombuffer(mm, np.uint8, 1).ctypes.data)
            if old_mm is not None and old_fd is not None:
                old_mm.close()
                os.close(old_fd)
        word_bytes = WORD_PAGES << PAGE_SHIFT
        spans = np.array([(r.spec.guest_phys_addr // word_bytes, -(-r.spec.gpa_end // word_bytes))
                          for r in table.regions], np.int64).reshape(-1, 2)
        with self._lock:
            self._spans = spans
        if not self.memory.log_all:
            self.memory.set_log_all(True)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="self-log-clear", daemon=True)
            self._thread.start()

    @staticmethod
    def used_ring_gpa(table: RegionTable, used: int) -> int | None:
        """The guest-physical address of a used ring the frontend gave by user address (what
        SET_VRING_ADDR's log_guest_addr would hold), None if no region holds it."""
        region = table.region_at_user(UserAddress(used))
        if region is None:
            return None
        return region.spec.guest_phys_addr + used - region.spec.userspace_addr

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._mm is None:
                    continue
                self.pages_cleared += int(clear_words(self._base, self._spans))
                self.passes += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self._mm is not None and self._fd is not None:
                self._mm.close()
                os.close(self._fd)
            self._mm = None
            self._fd = None
