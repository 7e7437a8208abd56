"""A split virtqueue, device side: state, the per-round choice of metadata path, and a Python API.

Hot paths call the compiled kernels directly with `round_views()`'s result; this class keeps
what is not per-packet: addresses, size, features, the direct map and its invalidation, the
error state, and the statistics the CLI prints.

Theory of a round (one burst): the worker enters its epoch, loads `memory.table`, calls
`round_views(table)` — which reuses the direct map if it was built for this very table and
ring-address generation, else tries to build one, else selects the copy path — runs kernels,
and leaves its epoch. Writers (memory changes, SET_VRING_ADDR, reset) call `invalidate()` and
then wait for the grace period before replying to the frontend.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pyvhost.memory import access
from pyvhost.memory.address import GuestAddress, UserAddress
from pyvhost.memory.table import RegionTable
from pyvhost.ring import kernels as K
from pyvhost.ring.direct_map import NO_VIEWS, DirectMap, RingViews, build_direct_map
from pyvhost.ring.errors import RingError, RingErrorCode, describe
from pyvhost.ring.inflight import InflightRing
from pyvhost.ring.layout import (AVAIL_ALIGN, AVAIL_IDX, DESC_ALIGN, USED_ALIGN, USED_IDX,
                                 avail_ring_size, desc_table_size, is_valid_queue_size,
                                 used_ring_size)

log = logging.getLogger(__name__)

METADATA_ACCESS_MODES = ("auto", "direct", "copy")


class Segment(NamedTuple):
    addr: GuestAddress
    length: int
    writable: bool


@dataclass
class DescriptorChain:
    """A popped chain: its head index and its buffers as guest-physical segments, in order."""

    head: int
    segments: list[Segment]

    @property
    def readable(self) -> list[Segment]:
        return [s for s in self.segments if not s.writable]

    @property
    def writable(self) -> list[Segment]:
        return [s for s in self.segments if s.writable]

    def read(self, table: RegionTable) -> bytes:
        """All device-readable bytes, in order."""
        return b"".join(access.read_gpa(table, s.addr, s.length) for s in self.readable)

    def write(self, table: RegionTable, data: bytes) -> int:
        """Scatter data over the writable buffers; returns the bytes written (dirty-logged
        while logging)."""
        pos = 0
        written: list[tuple[int, int]] = []
        for s in self.writable:
            if pos >= len(data):
                break
            piece = data[pos:pos + s.length]
            access.write_gpa(table, s.addr, piece)
            written.append((s.addr, len(piece)))
            pos += len(piece)
        if table.logging and written:
            # Guest-physical for the log (a device IOTLB's IOVAs translated; written above).
            written = [(g, ln) for a, ln in written if (g := table.gpa_of(a)) is not None]
            n = len(written)
            # A private cache (flushed before the call returns): this may run in any thread.
            K.log_ranges(table.kernel(), np.zeros(K.QSTATE_LEN, np.int64),
                         np.array([g for g, _ in written], np.int64),
                         np.array([ln for _, ln in written], np.int64), n)
        return pos


class RingResync(NamedTuple):
    """A base (SET_VRING_BASE) that disagreed with the ring at start (`sync_used_from_ring`)."""

    base: int      # the next avail index the frontend gave
    avail: int     # avail->idx in guest memory
    used: int      # used->idx in guest memory
    resumed: bool  # True: next avail is now `used`; False: the ring's own indices disagree

    def describe(self) -> str:
        found = f"base {self.base} disagrees with the ring (avail idx {self.avail}, used idx " \
                f"{self.used})"
        if self.resumed:
            return (f"{found}: resynchronised next avail to the used index {self.used} "
                    f"(a frontend that kept its rings across a backend restart; the "
                    f"{(self.avail - self.used) & 0xFFFF} chains it has in flight are "
                    "processed again)")
        return f"{found}, and used to avail is more than the ring holds: not resynchronised"


def load_ring_u16(table: RegionTable, addr: int) -> int:
    """A ring index in guest memory, read with one 16-bit load (the driver may be storing it:
    a memcpy of 2 bytes can read it torn, see docs/robustness.md bug 3)."""
    seg = table.contiguous_user_range(UserAddress(addr), 2)
    if seg is None:
        return access.read_user_u16(table, UserAddress(addr))  # raises AddressNotMappedError
    data = seg.region.mapped_data()
    return int(data[seg.offset:seg.offset + 2].view(np.uint16)[0])


@dataclass
class QueueStats:
    direct_rounds: int = 0
    copy_rounds: int = 0
    invalidations: int = 0
    copy_reasons: dict[str, int] = field(default_factory=dict)
    #: Device IOTLB: rounds skipped because a ring part was not in the IOTLB (a miss),
    #: and direct maps dropped because an invalidation touched the rings.
    ring_misses: int = 0
    iotlb_ring_invalidations: int = 0


class SplitQueue:
    def __init__(self, index: int, metadata_access: str = "auto", max_burst: int = 256) -> None:
        if metadata_access not in METADATA_ACCESS_MODES:
            raise ValueError(f"metadata access must be one of {METADATA_ACCESS_MODES}")
        self.index = index
        self.metadata_access = metadata_access
        self.q = np.zeros(K.QSTATE_LEN, dtype=np.int64)
        self.stats = QueueStats()
        self._direct: DirectMap | None = None
        self._generation = 0
        self._last_reason = ""
        self._last_copy_table: RegionTable | None = None
        self.addresses_set = False
        self._started = False  # sync_used_from_ring has run (the ring started) on this queue
        #: Device IOTLB: the ring started but its used index is read once its rings translate
        #: (on a worker, in round_views); until then rounds are skipped (`ring_missing`).
        self._sync_pending = False
        self._rings_ok_table: RegionTable | None = None
        #: Set by round_views: this round's rings are not (all) in the IOTLB; q's miss slots
        #: say where. The worker reports the miss and skips the round.
        self.ring_missing = False
        #: What the device's own code raised when it broke the queue (DEVICE_FAILED).
        self.device_error = ""
        self.max_burst = max_burst
        #: Inflight I/O tracking (ring/inflight.py): off until SET_INFLIGHT_FD gives a region.
        self.inflight = InflightRing()
        self._alloc_scratch(max_burst)

    def _alloc_scratch(self, burst: int) -> None:
        self.heads = np.zeros(burst, dtype=np.int64)
        self.chain_end = np.zeros(burst, dtype=np.int64)
        self.lens = np.zeros(burst, dtype=np.int64)
        self.hosts = np.zeros(burst, dtype=np.int64)  # pop_burst_hosts
        segs = burst * 4 + max(self.size, 1024)
        self.seg_addr = np.zeros(segs, dtype=np.int64)
        self.seg_len = np.zeros(segs, dtype=np.int64)
        self.seg_flags = np.zeros(segs, dtype=np.int64)

    # -- configuration (protocol thread; the ring is stopped or the caller waits a grace period)

    @property
    def size(self) -> int:
        return int(self.q[K.Q_SIZE])

    def set_size(self, size: int) -> None:
        if not is_valid_queue_size(size):
            raise ValueError(f"queue {self.index}: size {size} is not a power of two <= 32768")
        self.q[K.Q_SIZE] = size
        self._alloc_scratch(self.max_burst)
        self.invalidate("size changed")

    def set_addresses(self, desc: UserAddress, avail: UserAddress, used: UserAddress) -> None:
        for name, addr, align in (("descriptor table", desc, DESC_ALIGN),
                                  ("avail ring", avail, AVAIL_ALIGN), ("used ring", used, USED_ALIGN)):
            if not 0 <= addr <= K.ADDR_MAX or addr % align:
                raise ValueError(f"queue {self.index}: {name} address 0x{addr:x} is not "
                                 f"{align}-byte aligned or out of range")
        self.q[K.Q_DESC], self.q[K.Q_AVAIL], self.q[K.Q_USED] = desc, avail, used
        self.addresses_set = True
        self.invalidate("ring addresses changed")

    def set_used_log(self, log_guest_addr: int | None) -> None:
        """VHOST_VRING_F_LOG: while logging, used-ring writes are logged at this GPA (the used
        ring's guest-physical address); None: not logged."""
        if log_guest_addr is None:
            self.q[K.Q_FLAGS] &= ~K.F_LOG_USED
            self.q[K.Q_LOG_USED] = 0
        else:
            if not 0 <= log_guest_addr <= K.ADDR_MAX:
                raise ValueError(f"queue {self.index}: log address 0x{log_guest_addr:x} out "
                                 "of range")
            self.q[K.Q_LOG_USED] = log_guest_addr
            self.q[K.Q_FLAGS] |= K.F_LOG_USED

    @property
    def log_pages(self) -> int:
        """Dirty-log bits this queue's kernels set."""
        return int(self.q[K.Q_LOG_PAGES])

    def set_features(self, *, event_idx: bool, indirect: bool, in_order: bool = False) -> None:
        flags = int(self.q[K.Q_FLAGS]) & ~(K.F_EVENT_IDX | K.F_INDIRECT | K.F_IN_ORDER)
        self.q[K.Q_FLAGS] = flags | (K.F_EVENT_IDX if event_idx else 0) | (
            K.F_INDIRECT if indirect else 0) | (K.F_IN_ORDER if in_order else 0)

    @property
    def next_avail(self) -> int:
        return int(self.q[K.Q_NEXT_AVAIL])

    @property
    def next_used(self) -> int:
        return int(self.q[K.Q_NEXT_USED])

    def set_next_avail(self, idx: int) -> None:
        """SET_VRING_BASE: where the device resumes in the avail ring."""
        self.q[K.Q_NEXT_AVAIL] = idx & 0xFFFF

    def sync_used_from_ring(self, table: RegionTable) -> RingResync | None:
        """At ring start, continue from the used->idx the guest memory holds (as Linux vhost),
        and check the base (next avail, from SET_VRING_BASE) against the ring.

        A frontend that kept its rings across a backend restart (DPDK virtio-user in server
        mode, after the backend was killed) sends a base that says nothing about them — 0 —
        while its avail and used indices stand wherever the last backend left them. Resuming
        from such a base makes the first burst see the avail index "move too far" and break
        the ring, or re-complete chains the driver already has back. The base disagrees with
        the ring when, seen from it, more than a ring's worth of chains is available or in
        flight (it is not within used <= base <= avail, modulo 2^16: what QEMU's virtio_load
        checks), or — at the ring's first start in this connection — when it is not used->idx
        at all: chains between used->idx and such a base were taken by an earlier backend
        that will never complete them (a base of 0 lands there when used->idx is within a
        ring of wrapping). Later starts in the same connection keep such a base: the chains
        in flight may be this backend's own (deferred requests).

        When the base disagrees and the ring's own indices agree (at most a ring's worth from
        used->idx to avail->idx), next avail resumes from used->idx, what the device had
        completed: chains the last backend had taken but not completed are processed again
        (TX frames resent), as DPDK's vhost library does (translate_ring_addresses sets
        last_avail_idx = used->idx). Only guest memory's used->idx, checked against avail->idx,
        is used. A ring whose own indices disagree keeps its base: its first burst reports the
        ring broken.

        Returns what was found when the base disagreed with the ring (None: it agreed).
        """
        first = not self._started
        self._started = True
        used = load_ring_u16(table, int(self.q[K.Q_USED]) + USED_IDX)
        self.q[K.Q_NEXT_USED] = used
        self.q[K.Q_LOG_USED_FROM] = used  # elements from here on are this device's writes
        self.q[K.Q_SIGNALLED_VALID] = 0
        size, base = self.size, self.next_avail
        avail = self.avail_idx(table)
        if (avail - base) & 0xFFFF <= size and (base - used) & 0xFFFF <= size and (
                base == used or not first):
            return None
        resumed = (avail - used) & 0xFFFF <= size
        if resumed:
            self.q[K.Q_NEXT_AVAIL] = used
        return RingResync(base, avail, used, resumed)

    def start_lazily(self) -> None:
        """Ring start with a device IOTLB: the rings are IOVAs that may not be translated yet
        (QEMU sends entries on demand); sync_used_from_ring runs at the first round whose
        rings translate."""
        self._sync_pending = True
        self._rings_ok_table = None

    def avail_idx(self, table: RegionTable) -> int:
        """avail->idx as the driver last published it (one load; raises AddressNotMappedError
        if the ring is not mapped)."""
        return load_ring_u16(table, int(self.q[K.Q_AVAIL]) + AVAIL_IDX)

    def reset(self) -> None:
        size, pages, dropped = self.size, self.q[K.Q_LOG_PAGES], self.q[K.Q_LOG_DROPPED]
        self.q[:] = 0
        self.q[K.Q_SIZE] = size
        self.q[K.Q_LOG_PAGES], self.q[K.Q_LOG_DROPPED] = pages, dropped  # counters
        self.addresses_set = False
        self.device_error = ""
        self._sync_pending = False
        self.invalidate("queue reset")

    # -- invalidation and the per-round choice of path --

    def invalidate(self, reason: str) -> None:
        """Drop the direct map (memory or ring addresses changed). Readers rebuild on next round."""
        self._generation += 1
        if self._direct is not None:
            self.stats.invalidations += 1
            log.debug("queue %d: direct map dropped (%s)", self.index, reason)
        self._direct = None
        self._last_copy_table = None
        self._rings_ok_table = None

    def ring_ranges(self) -> list[tuple[str, int, int, int]]:
        """(name, address, length, access needed: 1 read, 2 write) of the three ring parts."""
        size = max(self.size, 1)
        return [("descriptor table", int(self.q[K.Q_DESC]), desc_table_size(size), 1),
                ("avail ring", int(self.q[K.Q_AVAIL]), avail_ring_size(size), 1),
                ("used ring", int(self.q[K.Q_USED]), used_ring_size(size), 2)]

    def on_iotlb_invalidate(self, start: int, end: int) -> None:
        """IOTLB entries in [start, end) were taken back (before the writer's grace period):
        a queue whose rings they overlap drops its direct map; the next round translates the
        rings again (a miss, if they are gone) instead of reading a mapping the guest revoked."""
        if not self.addresses_set:
            return
        for _name, addr, length, _perm in self.ring_ranges():
            if addr < end and start < addr + length:
                self.stats.iotlb_ring_invalidations += 1
                self.invalidate("IOTLB invalidation over the rings")
                return

    def on_memory_change(self, old: RegionTable, new: RegionTable) -> None:
        self.invalidate("memory table changed")

    def round_views(self, table: RegionTable) -> RingViews:
        """Views for this round; sets the queue's path flag. Call inside the worker's epoch.

        With a device IOTLB the rings must translate first (`ring_missing` otherwise); a direct
        map stays valid across IOTLB snapshots over the same regions until an invalidation
        touches the rings (`on_iotlb_invalidate` bumps the generation)."""
        d = self._direct
        if d is not None and d.table.base is table.base and d.generation == self._generation:
            self.ring_missing = False
            self.stats.direct_rounds += 1
            return d.views
        if table.iotlb and not self._rings_translate(table):
            self.q[K.Q_FLAGS] &= ~K.F_DIRECT
            return NO_VIEWS
        if self.metadata_access != "copy" and self.addresses_set:
            if self._last_copy_table is not table:  # don't retry a failed build every round
                built = self._build_direct(table)
                if isinstance(built, DirectMap):
                    self._direct = built
                    self.q[K.Q_FLAGS] |= K.F_DIRECT
                    self.stats.direct_rounds += 1
                    return built.views
                self._note_copy_reason(built, table)
        self.q[K.Q_FLAGS] &= ~K.F_DIRECT
        self.stats.copy_rounds += 1
        return NO_VIEWS

    def _build_direct(self, table: RegionTable) -> DirectMap | str:
        return build_direct_map(table, self.size, UserAddress(int(self.q[K.Q_DESC])),
                                UserAddress(int(self.q[K.Q_AVAIL])),
                                UserAddress(int(self.q[K.Q_USED])), self._generation)

    def _rings_translate(self, table: RegionTable) -> bool:
        """Device IOTLB: are the three ring parts in `table`'s IOTLB with the access the device
        needs? No: a miss is recorded in q (the worker asks the frontend), or the queue breaks
        on a permission the IOMMU does not grant. Yes: a ring that started meanwhile reads its
        used index now."""
        if self._rings_ok_table is table:
            self.ring_missing = False
            return True
        self.ring_missing = True
        if not self.addresses_set or self.broken:
            return False
        from pyvhost.memory.iotlb import IotlbTable
        assert isinstance(table, IotlbTable)
        for name, addr, length, perm in self.ring_ranges():
            status, where = table.check_range(addr, length, perm)
            if status == 1:
                self.q[K.Q_MISS_ADDR] = where
                self.q[K.Q_MISS_PERM] = perm
                self.q[K.Q_MISSES] += 1
                self.stats.ring_misses += 1
                return False
            if status == 2:
                self.q[K.Q_ERROR_INFO] = where
                self.q[K.Q_ERROR] = (RingErrorCode.IOVA_NOT_WRITABLE if perm == 2
                                     else RingErrorCode.IOVA_NOT_READABLE)
                log.error("queue %d: %s at IOVA 0x%x: %s", self.index, name, addr,
                          self.error_text())
                return False
        self._rings_ok_table = table
        self.ring_missing = False
        if self._sync_pending:
            self._sync_pending = False
            resync = self.sync_used_from_ring(table)
            log.info("queue %d: rings translate through the IOTLB; next avail %d, used %d",
                     self.index, self.next_avail, self.next_used)
            if resync is not None:
                (log.warning if resync.resumed else log.error)(
                    "queue %d: %s", self.index, resync.describe())
        return True

    def _note_copy_reason(self, reason: str, table: RegionTable) -> None:
        self._last_copy_table = table
        self.stats.copy_reasons[reason] = self.stats.copy_reasons.get(reason, 0) + 1
        if reason != self._last_reason:
            log.debug("queue %d: copy path: %s", self.index, reason)
            self._last_reason = reason

    def drop_views(self) -> None:
        """Release every reference to guest memory this queue holds (stop/disconnect)."""
        self.invalidate("queue stopped")

    # -- errors --

    @property
    def broken(self) -> bool:
        return self.q[K.Q_ERROR] != 0

    @property
    def error(self) -> RingError | None:
        if not self.broken:
            return None
        return RingError(self.index, int(self.q[K.Q_ERROR]), int(self.q[K.Q_ERROR_INFO]))

    def error_text(self) -> str:
        if not self.broken:
            return ""
        if self.q[K.Q_ERROR] == RingErrorCode.DEVICE_FAILED and self.device_error:
            return self.device_error
        return describe(int(self.q[K.Q_ERROR]), int(self.q[K.Q_ERROR_INFO]))

    def fail_device(self, text: str, exc: BaseException | None = None) -> None:
        """Break the queue because the device's code failed on it (not the guest's input);
        a queue the guest already broke keeps the guest's reason."""
        if exc is not None:
            # Logged as text: a log record holding the exception would hold its traceback's
            # frames, and through them views of guest memory, for as long as it is kept.
            trace = "".join(traceback.format_exception(exc)).rstrip()
            log.error("queue %d: %s\n%s", self.index, text, trace)
        if not self.broken:
            self.device_error = text
            self.q[K.Q_ERROR_INFO] = 0
            self.q[K.Q_ERROR] = RingErrorCode.DEVICE_FAILED

    def _raise_if_broken(self) -> None:
        if self.broken:
            raise self.error  # type: ignore[misc]

    # -- Python API (slow path; devices written in Python, tests) --

    def pop_descriptor_chain(self, table: RegionTable) -> DescriptorChain | None:
        views = self.round_views(table)
        mem = table.kernel()
        self._raise_if_broken()
        n = K.avail_count(mem, self.q, views)
        self._raise_if_broken()
        if n == 0:
            return None
        head, end, _ = K.pop_chain(mem, self.q, views, self.seg_addr, self.seg_len,
                                   self.seg_flags, 0)
        self._raise_if_broken()
        if head < 0:  # an IOTLB miss (q's miss slots say where): nothing popped
            return None
        return DescriptorChain(int(head), [
            Segment(GuestAddress(int(self.seg_addr[k])), int(self.seg_len[k]),
                    bool(self.seg_flags[k])) for k in range(end)])

    def pop_burst(self, table: RegionTable, max_chains: int | None = None) -> list[DescriptorChain]:
        views = self.round_views(table)
        n = K.pop_burst(table.kernel(), self.q, views, max_chains or self.max_burst, self.heads,
                        self.chain_end, self.seg_addr, self.seg_len, self.seg_flags)
        self._raise_if_broken()
        chains, start = [], 0
        for k in range(n):
            end = int(self.chain_end[k])
            chains.append(DescriptorChain(int(self.heads[k]), [
                Segment(GuestAddress(int(self.seg_addr[j])), int(self.seg_len[j]),
                        bool(self.seg_flags[j])) for j in range(start, end)]))
            start = end
        return chains

    def add_used(self, table: RegionTable, head: int, length: int) -> None:
        """Write one used element and publish it (used->idx)."""
        views = self.round_views(table)
        mem = table.kernel()
        if not (K.add_used(mem, self.q, views, head, length) and K.publish_used(mem, self.q, views)):
            self._raise_if_broken()

    def push_used(self, table: RegionTable, used: list[tuple[int, int]]) -> bool:
        """Add a batch of used elements, publish once; returns whether to interrupt the driver."""
        views = self.round_views(table)
        n = len(used)
        heads = np.fromiter((h for h, _ in used), dtype=np.int64, count=n)
        lens = np.fromiter((ln for _, ln in used), dtype=np.int64, count=n)
        r = K.push_used_burst(table.kernel(), self.q, views, heads, lens, n)
        self._raise_if_broken()
        return r == 1

    def needs_interrupt(self, table: RegionTable) -> bool:
        return bool(K.needs_interrupt(table.kernel(), self.q, self.round_views(table)))

    def enable_notification(self, table: RegionTable) -> bool:
        return bool(K.enable_notification(table.kernel(), self.q, self.round_views(table)))

    def disable_notification(self, table: RegionTable) -> None:
        K.disable_notification(table.kernel(), self.q, self.round_views(table))
