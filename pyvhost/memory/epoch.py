"""Grace periods without reader-side locks.

Theory of operation. Each worker thread owns a `WorkerEpoch` with a sequence number that it bumps
when it enters a burst (odd: inside) and when it leaves (even: outside) — two attribute stores,
no lock, no atomic instruction needed under the GIL (the burst itself runs in nogil compiled code,
but enter/leave happen in Python). A worker loads the memory table *after* `enter()`.

A writer first publishes the new table, then calls `synchronize()`: it samples every worker's
sequence number, raises the `leave_request` flag of each worker inside a burst (odd), and waits
until each has moved on. A compiled burst loop that keeps polling its ring (`ring/poll.py`)
reads the flag after every burst and returns; the worker lowers it as it enters (before the
sequence turns odd, so a writer that saw it inside cannot have its request lowered unseen).
Bursts that began after the publish already see the new table, so when `synchronize()`
returns nobody can still be reading through the old one. The wait is bounded by one burst; the
writer never blocks on anything else, and there is no start/end counter pair that could drift
apart.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np


class WorkerEpoch:
    __slots__ = ("seq", "name", "leave_request", "__weakref__")

    def __init__(self, name: str) -> None:
        self.seq = 0
        self.name = name
        #: Nonzero: a writer waits; leave the burst loop after this burst (compiled code reads it).
        self.leave_request = np.zeros(1, dtype=np.int64)

    def enter(self) -> None:
        self.leave_request[0] = 0
        self.seq += 1

    def leave(self) -> None:
        self.seq += 1

    @property
    def inside(self) -> bool:
        return self.seq & 1 == 1


class GraceTimeout(RuntimeError):
    """A worker stayed inside one burst longer than the bound: a bug, reported, not waited on."""


class EpochDomain:
    """The set of workers whose bursts a writer must wait out."""

    def __init__(self) -> None:
        self._workers: "weakref.WeakSet[WorkerEpoch]" = weakref.WeakSet()
        self._lock = threading.Lock()  # guards registration only, never taken by readers

    def register(self, name: str) -> WorkerEpoch:
        epoch = WorkerEpoch(name)
        with self._lock:
            self._workers.add(epoch)
        return epoch

    def unregister(self, epoch: WorkerEpoch) -> None:
        with self._lock:
            self._workers.discard(epoch)

    def synchronize(self, timeout: float = 1.0) -> float:
        """Wait until every burst running now has ended. Returns the seconds waited."""
        start = time.perf_counter()
        with self._lock:
            inside = [(w, w.seq) for w in self._workers if w.seq & 1]
        for worker, _ in inside:
            worker.leave_request[0] = 1
        delay = 0.0
        for worker, seq in inside:
            while worker.seq == seq:
                waited = time.perf_counter() - start
                if waited > timeout:
                    raise GraceTimeout(f"worker {worker.name} inside one burst for {waited:.3f}s")
                # sleep(0) yields the GIL to a worker finishing its Python epilogue; the short
                # back-off keeps a long compiled burst from costing a whole core of spinning.
                time.sleep(delay)
                delay = min(delay * 2 or 2e-6, 50e-6)
        return time.perf_counter() - start
