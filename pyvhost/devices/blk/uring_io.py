"""virtio-blk over io_uring: one ring per virtqueue, run by the queue's worker in compiled code.

`UringQueue` owns what one virtqueue's compiled path needs: an io_uring (`ring/uring.py`) of
2x the queue size (at least 2048 SQEs: a request of 256 zeroing segments takes 513), an
eventfd registered with it, the in-flight table (`uring_kernels.inf`), the pop scratch, and
the pins that keep guest memory mapped under pending I/O. It is made when the ring starts
(protocol thread) and closed when it stops, after `drain()`.

Who touches what: `burst()` runs on the queue's worker, inside its epoch (`process_burst`);
`arm()` on the same worker just before it sleeps (`extra_wait_fds`); `drain()` and `close()`
on the protocol thread once no worker runs the ring. `_lock` keeps `arm()` (which the worker
may call for a ring being stopped: its sleep is outside the epoch) off a closed ring.

Memory: requests in flight hold host addresses of guest buffers past their burst. When a burst
leaves any in flight, the table it ran on is pinned (`Device.pin_table`), and the pin goes
when the last request submitted under that table completes (each in-flight row carries the
generation of its table's pin). A memory-map change then never unmaps under pending I/O, and
grace periods never wait for the I/O.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from pyvhost.devices.blk import uring_kernels as BK
from pyvhost.devices.blk.io import BOUNCE_SIZE
from pyvhost.memory.guest_memory import TablePin
from pyvhost.memory.table import KernelMemory, RegionTable
from pyvhost.ring import uring as U
from pyvhost.ring.chains import ChainScratch
from pyvhost.ring.direct_map import NO_VIEWS, RingViews
from pyvhost.ring.jit import overload_entry
from pyvhost.ring.poll import PollWindow
from pyvhost.ring.split_queue import SplitQueue

log = logging.getLogger(__name__)

MIN_SQ_ENTRIES = 2048
MAX_SQ_ENTRIES = 32768   # IORING_MAX_ENTRIES


class UringQueue:
    """One virtqueue's io_uring data path (see the module docstring)."""

    def __init__(self, index: int, queue_size: int, max_burst: int, settings: dict[int, int],
                 serial: bytes, pin: Callable[[RegionTable], TablePin]) -> None:
        self.index = index
        entries = min(MAX_SQ_ENTRIES, max(MIN_SQ_ENTRIES, 2 * queue_size))
        self.uring = U.Uring(entries)  # UringUnavailable if the host refuses
        try:
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.uring.register_eventfd(self.eventfd)
        except BaseException:
            self.uring.close()
            raise
        self.st = np.zeros(BK.ST_LEN, dtype=np.int64)
        for slot, value in settings.items():
            self.st[slot] = value
        self.st[BK.ST_EVENTFD] = self.eventfd
        self.inf = np.zeros((max(queue_size, 1), BK.INF_COLS), dtype=np.int64)
        self.scratch = ChainScratch(max_burst, max(queue_size, 1))
        # Room for the most pieces one chain has, and a burst's worth of ordinary ones.
        chain_pieces = self.scratch.piece_host.shape[0]
        self.iov = np.zeros(2 * (chain_pieces + 8 * max_burst), dtype=np.int64)
        self.st[BK.ST_MAX_REQ_SQES] = max(
            2 * max(self.st[BK.ST_MAX_WZ_SEG], self.st[BK.ST_MAX_DISCARD_SEG]) + 1,
            (chain_pieces + BK.UIO_MAXIOV - 1) // BK.UIO_MAXIOV)
        if self.st[BK.ST_MAX_REQ_SQES] > self.uring.sq_entries // 2:
            self.uring.close()
            os.close(self.eventfd)
            raise ValueError(f"queue size {queue_size}: requests may need more SQEs than "
                             f"an io_uring of {self.uring.sq_entries} can take")
        self.used_heads = np.zeros(max(queue_size, 1) + max_burst + 1, dtype=np.int64)
        self.cu = np.zeros(self.uring.cq_entries, dtype=np.int64)
        self.cr = np.zeros(self.uring.cq_entries, dtype=np.int64)
        # Headers and segments are parsed in `hdr`; with O_DIRECT it is also the bounce
        # buffer of unaligned requests: page-aligned (an anonymous mapping), BOUNCE_SIZE bytes.
        self._bounce_map: mmap.mmap | None = None
        if self.st[BK.ST_DIRECT]:
            self._bounce_map = mmap.mmap(-1, BOUNCE_SIZE)
            self.hdr = np.frombuffer(self._bounce_map, dtype=np.uint8)
        else:
            self.hdr = np.zeros(BK.HEADER_LEN, dtype=np.uint8)
        self.serial = np.frombuffer(serial.ljust(BK.ID_BYTES, b"\0"), dtype=np.uint8).copy()
        self.efd_buf = np.zeros(1, dtype=np.int64)
        self._pin = pin
        self._table: RegionTable | None = None   # the table the last burst ran on
        self._pins: dict[int, TablePin] = {}      # generation -> pin
        self._entry: dict[bool, Any] = {}
        self._lock = threading.Lock()
        self.closed = False

    # -- the worker --

    def burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
              views: RingViews, window: PollWindow) -> tuple[int, bool]:
        st = self.st
        if table is not self._table:
            self._table = table
            st[BK.ST_GEN] += 1
        s = self.scratch
        u = self.uring
        args = (mem, queue.q, views, queue.inflight.views, st, u.ur, u.sqes, u.cqes, self.inf,
                self.used_heads, queue.max_burst, s.heads, s.piece_end, s.first_writable, s.readable, s.writable, s.seg_addr,
                s.seg_len, s.seg_flags, s.piece_region, s.piece_offset, s.piece_host,
                s.piece_gpa, s.piece_len, self.iov, self.cu, self.cr, self.hdr, self.serial,
                window.cycles, window.idle_cycles, window.leave, self.efd_buf)
        key = views is NO_VIEWS
        entry = self._entry.get(key)
        if entry is None:
            done, notify = BK.blk_poll(*args)
            self._entry[key] = overload_entry(BK.blk_poll, args) or BK.blk_poll
        else:
            done, notify = entry(*args)
        self._update_pins(table)
        return max(int(done), 0), bool(notify)

    def arm(self) -> int:
        """The worker is about to sleep: let completions signal the eventfd (and signal it
        now if some are waiting already). Returns the eventfd to poll."""
        with self._lock:
            if self.closed:
                return self.eventfd
            if self.st[BK.ST_INFLIGHT] > 0 and U.arm(self.uring.ur):
                os.eventfd_write(self.eventfd, 1)
        return self.eventfd

    def _update_pins(self, table: RegionTable) -> None:
        """Pin the table the in-flight requests use; unpin tables none uses any more."""
        st = self.st
        gen = int(st[BK.ST_GEN])
        if st[BK.ST_INFLIGHT] == 0:
            if self._pins:
                self._release(list(self._pins))
            return
        if gen not in self._pins:
            self._pins[gen] = self._pin(table)
        if len(self._pins) > 1:
            busy = self.inf[self.inf[:, BK.F_STATE] != 0, BK.F_GEN]
            self._release([g for g in self._pins if g != gen and not (busy == g).any()])

    def _release(self, gens: list[int]) -> None:
        for g in gens:
            self._pins.pop(g).release()

    # -- the protocol thread, no worker running the ring --

    def drain(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
              timeout: float) -> tuple[int, bool]:
        """Wait (bounded) for the ring's I/O in flight, publish it; True in [1] if the driver
        wants an interrupt. I/O still running after `timeout` is abandoned: its requests are
        never answered, and its pins are kept for good (the kernel may still write there)."""
        st = self.st
        done = 0
        notify = False
        deadline = time.monotonic() + timeout
        delay = 20e-6
        while True:
            n, want = BK.blk_reap(mem, queue.q, views, queue.inflight.views, st,
                                  self.uring.ur, self.uring.cqes, self.inf, self.used_heads,
                                  self.cu, self.cr, False)
            done += int(n)
            notify = notify or bool(want)
            if st[BK.ST_INFLIGHT] == 0:
                break
            if time.monotonic() > deadline:
                log.error("blk queue %d: %d requests still doing I/O %.1f s after the ring "
                          "stopped; abandoned (their guest memory stays mapped)", self.index,
                          int(st[BK.ST_INFLIGHT]), timeout)
                self._pins = {-1 - g: p for g, p in self._pins.items()}  # never released
                return done, notify
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        self._release(list(self._pins))
        return done, notify

    @property
    def in_flight(self) -> int:
        return int(self.st[BK.ST_INFLIGHT])

    def counters(self) -> dict[str, int]:
        return {name: int(self.st[slot]) for name, slot in BK.COUNTER_NAMES.items()}

    def close(self) -> None:
        """After drain(): the ring, its mappings and the eventfd go. Pins of abandoned I/O
        stay (see drain)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.uring.close()
        os.close(self.eventfd)
        if self._bounce_map is not None:
            self.hdr = np.zeros(BK.HEADER_LEN, dtype=np.uint8)  # the map's only view
            self._bounce_map.close()
            self._bounce_map = None


def warm_up() -> None:
    """Compile (or load) the kernels a queue runs, on a queue of size 1 and a null disk."""
    from pyvhost.ring.poll import one_pass_window
    q = SplitQueue(0)
    q.set_size(1)
    table = RegionTable()
    uq = UringQueue(0, 1, 1, {BK.ST_FD: -1}, b"", lambda t: TablePin(None, t))  # type: ignore[arg-type]
    try:
        uq.burst(q, table, table.kernel(), NO_VIEWS, one_pass_window())
        uq.drain(q, table.kernel(), NO_VIEWS, 0.0)
        uq.arm()
    finally:
        uq.close()
