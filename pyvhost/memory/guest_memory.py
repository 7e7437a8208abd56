"""The holder of the current region table, and the writer side of every memory-map change.

Readers (workers) read `GuestMemory.table` once per burst, inside `WorkerEpoch.enter/leave`.
Writers (the protocol thread) go through `_publish()`: swap the table, wait one grace period,
tell the listeners (queues drop their direct views), and only then unmap what the new table no
longer holds. A mapping that still has views alive refuses to unmap (BufferError); it is kept on
a retired list and retried, and counted as leaked if it still cannot go at `close()`.

With a device IOTLB (VIRTIO_F_IOMMU_PLATFORM acked, `set_iotlb`), readers get an `IotlbTable`
over the region table (`regions`) instead: an UPDATE publishes a new snapshot at once (a burst
that still holds the old one only misses what the new one adds), an INVALIDATE publishes one
without the entries, tells the IOTLB listeners (queues whose rings it touches drop their
direct map), and returns only after a grace period — no burst still translates through what the
guest took back.

Deferred requests (`pyvhost.Request.defer`) use guest memory after their burst, outside every
epoch: they `pin()` the table of their burst. A pinned region is not unmapped; when the last
pin goes, retired regions are retried at once. Grace periods never wait for pins.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, NoReturn

import numpy as np

from pyvhost.fd import OwnedFd
from pyvhost.memory.dirty_log import NO_LOG, DirtyLog
from pyvhost.memory.epoch import EpochDomain, GraceTimeout
from pyvhost.memory.errors import BadRegionError
from pyvhost.memory.iotlb import (BadIotlbEntry, Iotlb, IotlbEntry, IotlbTable, Run,
                                  insert_run, resolve)
from pyvhost.memory.region import MappedRegion, RegionSpec
from pyvhost.memory.table import RegionTable

log = logging.getLogger(__name__)

Listener = Callable[[RegionTable, RegionTable], None]
IotlbListener = Callable[[int, int], None]  # an invalidated IOVA range [start, end)


@dataclass
class GraceStats:
    """How long writers waited for readers; the figures the robustness report quotes."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0
    timeouts: int = 0
    recent: list[float] = field(default_factory=list)

    def record(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        self.recent.append(seconds)
        if len(self.recent) > 100_000:
            del self.recent[:50_000]


class TablePin:
    """Keeps a table's regions mapped until `release()` (idempotent; any thread)."""

    __slots__ = ("_memory", "table", "_released")

    def __init__(self, memory: "GuestMemory", table: RegionTable) -> None:
        self._memory = memory
        self.table = table
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._memory._unpin(self.table)


class GuestMemory:
    def __init__(self, epochs: EpochDomain | None = None, grace_timeout: float = 1.0) -> None:
        self.epochs = epochs or EpochDomain()
        #: The region table the frontend's memory messages built.
        self.regions = RegionTable()
        #: What readers load once per burst: `regions`, or an IOTLB snapshot over it.
        self.table: RegionTable = self.regions
        #: The device IOTLB while VIRTIO_F_IOMMU_PLATFORM is acked, else None.
        self.iotlb: Iotlb | None = None
        self._iotlb_listeners: list[IotlbListener] = []
        self._runs: list[Run] = []  # the IOTLB's runs over `regions` (the writer's copy)
        self.grace = GraceStats()
        self.grace_timeout = grace_timeout
        self.leaked_mappings = 0
        self._listeners: list[Listener] = []
        self._retired: list[MappedRegion] = []
        self._writer = threading.Lock()  # writers serialise; readers never take it
        self._pins = threading.Lock()    # region pin counts and the retired list
        #: The frontend's dirty log (SET_LOG_BASE) and whether the device writes it (LOG_ALL).
        self.log: DirtyLog | None = None
        self.log_all = False
        self._retired_logs: list[DirtyLog] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_iotlb_listener(self, listener: IotlbListener) -> None:
        self._iotlb_listeners.append(listener)

    def remove_iotlb_listener(self, listener: IotlbListener) -> None:
        if listener in self._iotlb_listeners:
            self._iotlb_listeners.remove(listener)

    # -- the device IOTLB --

    def set_iotlb(self, on: bool) -> None:
        """VIRTIO_F_IOMMU_PLATFORM acked (on) or not: from the return on, bursts translate
        IOVAs through the IOTLB (empty at first), or guest-physical addresses as before."""
        with self._writer:
            if on == (self.iotlb is not None):
                return
            self.iotlb = Iotlb() if on else None
            self._publish_locked(self.regions)

    def iotlb_update(self, entry: IotlbEntry) -> bool:
        """IOTLB_MSG UPDATE (raises BadIotlbEntry: refused, nothing changed). No grace period:
        what a burst may use only grows. Returns False if the entry was there already."""
        with self._writer:
            iotlb = self.iotlb
            if iotlb is None:
                raise_not_on()
            entry.check()
            # The frontend's user address must lie in its regions (vhost-user.rst: "must be
            # within vhost memory regions").
            try:
                self.regions.translate_user(entry.uaddr, entry.size)  # type: ignore[arg-type]
            except Exception as exc:
                raise BadIotlbEntry(f"entry IOVA 0x{entry.iova:x}+0x{entry.size:x}: user "
                                    f"address 0x{entry.uaddr:x} is outside every memory "
                                    "region") from exc
            size, evictions = len(iotlb), iotlb.stats.evictions
            changed = iotlb.update(entry)
            iotlb.stats.updates += 1
            if changed:
                plain = len(iotlb) == size + 1 and iotlb.stats.evictions == evictions
                if not (plain and insert_run(self._runs, entry, self.regions)):
                    self._runs = resolve(iotlb.entries(), self.regions)
                new = IotlbTable(self.regions, self._runs)
                new.kernel()
                self.table = new
            return changed

    def iotlb_flush(self) -> None:
        """Forget every IOTLB entry (the device stopped), after a grace period."""
        with self._writer:
            if self.iotlb is not None and len(self.iotlb):
                self.iotlb.clear()
                self._publish_locked(self.regions)

    def iotlb_invalidate(self, iova: int, size: int) -> int:
        """IOTLB_MSG INVALIDATE: returns (the number of entries removed) after the grace
        period. Raises BadIotlbEntry for a range that is not one."""
        with self._writer:
            iotlb = self.iotlb
            if iotlb is None:
                raise_not_on()
            gone = iotlb.invalidate(iova, size)
            iotlb.stats.invalidations += 1
            iotlb.stats.entries_invalidated += len(gone)
            if not gone:
                return 0
            old = self.table
            self._runs = resolve(iotlb.entries(), self.regions)
            new = IotlbTable(self.regions, self._runs)
            new.kernel()
            self.table = new
            end = iova + size
            for listener in list(self._iotlb_listeners):
                listener(iova, end)
            try:
                self.grace.record(self.epochs.synchronize(self.grace_timeout))
                old.release_kernel()
            except GraceTimeout as exc:
                self.grace.timeouts += 1
                log.error("grace period not reached after an IOTLB invalidation: %s", exc)
            return len(gone)

    # -- pins (deferred requests) --

    def pin(self, table: RegionTable) -> TablePin:
        with self._pins:
            for r in table.regions:
                r.pins += 1
        return TablePin(self, table)

    def _unpin(self, table: RegionTable) -> None:
        with self._pins:
            for r in table.regions:
                r.pins -= 1
            if self._retired:
                self._retired = [r for r in self._retired if not r.close()]

    # -- writer operations (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) --

    def set_regions(self, regions: Iterable[tuple[RegionSpec, OwnedFd]]) -> None:
        """Replace the whole table. On any bad region nothing changes and every fd is closed."""
        pending = list(regions)
        mapped = _map_all(pending)
        try:
            new = RegionTable(tuple(mapped), self.regions.log)
        except BadRegionError:
            _close_new(mapped)
            raise
        self._publish(new)

    def add_region(self, spec: RegionSpec, fd: OwnedFd) -> None:
        """ADD_MEM_REG. QEMU sends the same region once per vhost device sharing the
        connection (each queue pair of a multiqueue NIC): an identical region is counted, not
        mapped again, and unmapped only when every ADD has been matched by a REM."""
        with self._writer:
            same = self.regions.find_exact(spec.guest_phys_addr, spec.memory_size,
                                         spec.userspace_addr)
            if same is not None and same.spec == spec:
                same.users += 1
                fd.close()
                return
        region = _map_all([(spec, fd)])[0]
        with self._writer:
            try:
                new = self.regions.with_region(region)
            except BadRegionError:
                _close_new([region])
                raise
            self._publish_locked(new)

    def remove_region(self, spec: RegionSpec) -> None:
        """REM_MEM_REG: the region is matched by GPA, size and user address (the fd is unused)."""
        with self._writer:
            region = self.regions.find_exact(spec.guest_phys_addr, spec.memory_size,
                                           spec.userspace_addr)
            if region is None:
                raise BadRegionError(f"no region matches {spec} for removal")
            if region.users > 1:
                region.users -= 1
                return
            self._publish_locked(self.regions.without_region(region))

    def clear(self) -> None:
        self._publish(RegionTable())

    # -- the dirty log (live migration) --

    def set_log(self, log: DirtyLog | None) -> None:
        """SET_LOG_BASE: from the return on, no burst writes the old log; it is unmapped."""
        with self._writer:
            old, self.log = self.log, log
            completed = self._publish_locked(self.regions.with_log(self._active_log()))
            if old is not None:
                self._retired_logs.append(old)
            if completed:
                self._retired_logs = [g for g in self._retired_logs if not g.close()]

    def set_log_all(self, on: bool) -> None:
        """VHOST_F_LOG_ALL turned on or off (SET_FEATURES): from the return on, every write of
        the device is logged, or none is."""
        with self._writer:
            if on != self.log_all:
                self.log_all = on
                self._publish_locked(self.regions.with_log(self._active_log()))

    def _active_log(self) -> np.ndarray:
        return self.log.kernel if self.log_all and self.log is not None else NO_LOG

    def close(self) -> None:
        """Unmap everything (connection end). Workers must be stopped or idle by now."""
        self.clear()
        self.log_all = False
        if self.log is not None:
            self._retired_logs.append(self.log)
            self.log = None
        self._retired_logs = [g for g in self._retired_logs if not g.close()]
        with self._pins:
            self._retired = [r for r in self._retired if not r.close()]
        if self._retired:
            # A view may live on only in a reference cycle (an exception's traceback holding
            # a frame that held it): collect those before calling the mapping leaked.
            gc.collect()
            with self._pins:
                self._retired = [r for r in self._retired if not r.close()]
        if self._retired:
            self.leaked_mappings += len(self._retired)
            log.error("%d guest mappings still have live views at close: %s",
                      len(self._retired), self._retired)
            self._retired.clear()

    # -- the one path every change takes --

    def _publish(self, new: RegionTable) -> None:
        with self._writer:
            self._publish_locked(new)

    def _publish_locked(self, regions: RegionTable) -> bool:
        """A new region table (or the IOTLB switched on or off): readers get it, or an IOTLB
        snapshot over it (entries resolved again: a region may have gone)."""
        new = regions
        if self.iotlb is not None:
            self._runs = resolve(self.iotlb.entries(), regions)
            new = IotlbTable(regions, self._runs)
        new.kernel()  # built here, not on a worker's first burst
        old, old_regions = self.table, self.regions
        self.regions, self.table = regions, new
        try:
            self.grace.record(self.epochs.synchronize(self.grace_timeout))
            grace_completed = True
        except GraceTimeout as exc:
            # Never block without bound: report, keep the old mappings alive (retired) and go on.
            self.grace.timeouts += 1
            grace_completed = False
            log.error("grace period not reached: %s; old mappings kept until later", exc)
        for listener in list(self._listeners):
            listener(old, new)
        kept = {id(r) for r in new.regions}
        with self._pins:
            self._retired.extend(r for r in old.regions if id(r) not in kept)
        if grace_completed:
            # Every burst that could hold an old table (or its raw host addresses) has ended.
            old.release_kernel()
            if old_regions is not regions:
                old_regions.release_kernel()
            self._retry_retired()
        return grace_completed

    def _retry_retired(self) -> None:
        # close() refuses while numpy views of a region live or deferred requests pin it;
        # those regions wait for next time (or for their last pin).
        with self._pins:
            self._retired = [r for r in self._retired if not r.close()]


def raise_not_on() -> NoReturn:
    raise BadIotlbEntry("IOTLB message without VIRTIO_F_IOMMU_PLATFORM acked")


def _map_all(pending: list[tuple[RegionSpec, OwnedFd]]) -> list[MappedRegion]:
    mapped: list[MappedRegion] = []
    try:
        for spec, fd in pending:
            mapped.append(MappedRegion(spec, fd))
    except BadRegionError:
        _close_new(mapped)
        for _, fd in pending[len(mapped):]:
            fd.close()
        raise
    return mapped


def _close_new(regions: list[MappedRegion]) -> None:
    for r in regions:
        r.close()
