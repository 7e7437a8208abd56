"""The driver side of a split virtqueue (virtio 1.x 2.7), for tests, demos and benchmarks.

`MockSplitQueue` lays out a queue's three parts in a `GuestRam` and plays the guest driver:
it offers descriptor chains (2.7.13), reads used elements back (2.7.14) and applies both
notification-suppression schemes (2.7.7, 2.7.10). Ring indices are free-running 16-bit values,
as in the spec; `initial_avail_idx` starts them anywhere so tests can cross 65535 -> 0.

Buffers come from a small pool in the same RAM and are recycled when their chain comes back.
The `write_raw_*` helpers bypass all bookkeeping so a test can hand the device garbage.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from pyvhost.ring.layout import (
    AVAIL_ALIGN,
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_ALIGN,
    DESC_SIZE,
    USED_ALIGN,
    USED_ELEM_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    avail_used_event_offset,
    desc_table_size,
    is_valid_queue_size,
    used_avail_event_offset,
    used_ring_size,
    vring_need_event,
)
from pyvhost.testing.guest_ram import GuestRam

_DESC = struct.Struct("<QIHH")  # struct virtq_desc (2.7.5)
_USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem (2.7.8)
_U16 = struct.Struct("<H")

# Drivers MUST NOT add a chain longer than 2^32 bytes in total (2.7.5.2).
MAX_CHAIN_BYTES = 1 << 32
# Smallest pool buffer; buffers are rounded up to a power of two so they can be recycled by size.
_MIN_BUFFER = 64


class RingFullError(Exception):
    """Not enough free descriptors for the chain; collect used() elements first."""


class UsedRingError(Exception):
    """The device broke the used-ring contract (2.7.8): unknown id, len too large, idx too far."""


class RingAddresses(NamedTuple):
    desc_table: int
    avail_ring: int
    used_ring: int


class QueueAddresses(NamedTuple):
    user: RingAddresses  # what a frontend sends in SET_VRING_ADDR
    gpa: RingAddresses


@dataclass(slots=True)
class _Chain:
    descs: list[int]  # descriptor-table entries the chain holds
    writable: list[tuple[int, int]]  # (gpa, len) of its device-writable buffers, in order
    blocks: list[tuple[int, int]] = field(default_factory=list)  # pool blocks to recycle
    used_len: int = 0


class _BufferPool:
    """Chain buffers and indirect tables, recycled per power-of-two size class."""

    def __init__(self, ram: GuestRam, region: "int | None") -> None:
        self._ram, self._region = ram, region
        self._free: dict[int, list[int]] = {}

    def get(self, n: int) -> tuple[int, int]:
        """(gpa, size class) of a block of at least n bytes, 16-aligned (fit for a desc table)."""
        cls = max(_MIN_BUFFER, 1 << (n - 1).bit_length()) if n > 1 else _MIN_BUFFER
        free = self._free.get(cls)
        gpa = free.pop() if free else self._ram.alloc(cls, DESC_ALIGN, region=self._region)
        return gpa, cls

    def put(self, blocks: "list[tuple[int, int]]") -> None:
        for gpa, cls in blocks:
            self._free.setdefault(cls, []).append(gpa)


class MockSplitQueue:
    """One split virtqueue, driver side."""

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        desc: "int | None" = None,
        avail: "int | None" = None,
        used: "int | None" = None,
        event_idx: bool = False,
        initial_avail_idx: int = 0,
        region: "int | None" = None,
        iova_offset: int = 0,
    ) -> None:
        """desc/avail/used: GPAs to place the parts at (reserved by the caller, e.g. with
        ram.alloc), else they are allocated tightly in `region` (a region's GPA; default any).
        iova_offset: behind a vIOMMU (VIRTIO_F_IOMMU_PLATFORM), the device sees guest-physical
        address A as IOVA A + iova_offset (in descriptors; `iova_addresses()` for the rings)."""
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two in 1..32768 (2.7)")
        self.ram, self.size, self.event_idx = ram, size, event_idx
        self.iova_offset = iova_offset
        self.desc_table = _place(ram, desc, desc_table_size(size), DESC_ALIGN, region)
        self.avail_ring = _place(ram, avail, avail_ring_size(size), AVAIL_ALIGN, region)
        self.used_ring = _place(ram, used, used_ring_size(size), USED_ALIGN, region)
        self.initial_avail_idx = initial_avail_idx & 0xFFFF
        self.next_avail = self.initial_avail_idx  # avail->idx once everything added is published
        self.published_avail = self.initial_avail_idx  # last value written to avail->idx
        self.last_used = self.initial_avail_idx  # used->idx up to which used() has consumed
        self._kick_old = self.initial_avail_idx  # avail->idx at the last needs_kick()
        self._free = deque(range(size))
        self._in_flight: dict[int, _Chain] = {}
        self._completed: dict[int, _Chain] = {}
        self._pool = _BufferPool(ram, region)
        self._init_rings()

    def _init_rings(self) -> None:
        # Memory may be reused: clear all three parts. Used flags MUST start at 0 (2.7.10.1).
        for gpa, n in ((self.desc_table, desc_table_size(self.size)),
                       (self.avail_ring, avail_ring_size(self.size)),
                       (self.used_ring, used_ring_size(self.size))):
            self.ram.write(gpa, bytes(n))
        start = self.initial_avail_idx
        # A queue started at `start` looks like one that has already passed `start` buffers
        # through: both idx fields at `start`, and both event indices too ("notify when idx
        # passes start"), as a fresh ring's zeros are, so the first buffer each way is notified.
        self._w16(self.avail_ring + AVAIL_IDX, start)
        self._w16(self.used_ring + USED_IDX, start)
        self._w16(self.avail_ring + avail_used_event_offset(self.size), start)
        self._w16(self.used_ring + used_avail_event_offset(self.size), start)

    # -- addresses -----------------------------------------------------------------------------

    def ring_addresses(self) -> QueueAddresses:
        gpa = RingAddresses(self.desc_table, self.avail_ring, self.used_ring)
        user = RingAddresses(*(self.ram.gpa_to_user(a) for a in gpa))
        return QueueAddresses(user, gpa)

    def iova_addresses(self) -> RingAddresses:
        """The ring addresses as the device sees them behind a vIOMMU (SET_VRING_ADDR then)."""
        return RingAddresses(self.desc_table + self.iova_offset,
                             self.avail_ring + self.iova_offset,
                             self.used_ring + self.iova_offset)

    # -- supplying buffers (2.7.13) ------------------------------------------------------------

    def add_chain(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """Offer a chain of pool buffers: `readable` data, then buffers of `writable` lengths
        (the device-writable ones MUST follow the readable ones, 2.7.4.2). Returns its head.
        Not visible to the device until publish()."""
        return self._add_pooled(readable, writable, indirect=False)

    def add_indirect_chain(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """As add_chain, but through an indirect table (2.7.5.3): one descriptor in the ring."""
        return self._add_pooled(readable, writable, indirect=True)

    def add_chains_and_publish(
        self, chains: "Sequence[tuple[Sequence[bytes], Sequence[int]]]", *, indirect: bool = False
    ) -> list[int]:
        heads = [self._add_pooled(r, w, indirect=indirect) for r, w in chains]
        self.publish()
        return heads

    def add_buffers(
        self, buffers: "Sequence[tuple[int, int, bool]]", *, indirect: bool = False
    ) -> int:
        """Offer a chain of caller-placed buffers `(gpa, len, device_writable)`, in chain order
        (e.g. a buffer straddling two regions). Returns the head. Order is not checked."""
        _check_chain(buffers, self.size)
        if (1 if indirect else len(buffers)) > len(self._free):
            raise RingFullError(f"{len(self._free)} free descriptors, chain needs more")
        chain = self._build_indirect(buffers) if indirect else self._build_direct(buffers)
        head = chain.descs[0]
        self._in_flight[head] = chain
        # 2.7.13.2: the head goes in the next avail ring slot (idx modulo the queue size).
        self._w16(self._avail_slot_gpa(self.next_avail), head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Expose everything added so far: write avail->idx (2.7.13.3). The spec asks for a
        release barrier before this store; a plain store stands in for it, since CPython makes
        the descriptor and ring stores first, in program order, and x86-64 keeps stores in order."""
        self._w16(self.avail_ring + AVAIL_IDX, self.next_avail)
        self.published_avail = self.next_avail

    def needs_kick(self) -> bool:
        """Whether the buffers published since the previous call need an available-buffer
        notification (2.7.10 driver side, as Linux's virtqueue_kick_prepare). Consumes them."""
        old, new = self._kick_old, self.published_avail
        self._kick_old = new
        if self.event_idx:
            # Kick iff avail->idx passed avail_event in this batch (VIRTIO_F_EVENT_IDX).
            return vring_need_event(self.avail_event(), new, old)
        return not self.used_flags() & VRING_USED_F_NO_NOTIFY

    def _add_pooled(
        self, readable: Sequence[bytes], writable: Sequence[int], *, indirect: bool
    ) -> int:
        _check_chain([(0, len(d), False) for d in readable] + [(0, n, True) for n in writable],
                     self.size)
        if (1 if indirect else len(readable) + len(writable)) > len(self._free):
            raise RingFullError(f"{len(self._free)} free descriptors, chain needs more")
        buffers, blocks = [], []
        for data in readable:
            gpa, cls = self._pool.get(len(data))
            self.ram.write(gpa, data)
            buffers.append((gpa, len(data), False))
            blocks.append((gpa, cls))
        for n in writable:
            gpa, cls = self._pool.get(n)
            buffers.append((gpa, n, True))
            blocks.append((gpa, cls))
        head = self.add_buffers(buffers, indirect=indirect)
        self._in_flight[head].blocks.extend(blocks)
        return head

    def _build_direct(self, buffers: "Sequence[tuple[int, int, bool]]") -> _Chain:
        descs = [self._free.popleft() for _ in buffers]
        for i, (gpa, n, w) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0)
            self.write_raw_desc(descs[i], gpa + self.iova_offset, n, flags,
                                0 if last else descs[i + 1])
        return _Chain(descs, [(g, n) for g, n, w in buffers if w])

    def _build_indirect(self, buffers: "Sequence[tuple[int, int, bool]]") -> _Chain:
        # The table's entries chain by index within the table (2.7.5.3); the descriptor that
        # points at it has INDIRECT only: not NEXT, and WRITE would be ignored (2.7.5.3.1/2).
        table, cls = self._pool.get(DESC_SIZE * len(buffers))
        entries = []
        for i, (gpa, n, w) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0)
            entries.append((gpa + self.iova_offset, n, flags, 0 if last else i + 1))
        self.write_raw_indirect_table(table, entries)
        head = self._free.popleft()
        self.write_raw_desc(head, table + self.iova_offset, DESC_SIZE * len(buffers),
                            VIRTQ_DESC_F_INDIRECT, 0)
        return _Chain([head], [(g, n) for g, n, w in buffers if w], [(table, cls)])

    # -- receiving used buffers (2.7.14) -------------------------------------------------------

    def used(self, *, strict: bool = True) -> list[tuple[int, int]]:
        """New used elements `(id, len)` since the last call; their descriptors become free.

        Their writable buffers stay readable with written_data() until the next call. strict:
        raise UsedRingError when the device returns what it was never given.
        """
        self._recycle_completed()
        used_idx = self.used_idx()
        pending = (used_idx - self.last_used) & 0xFFFF
        if strict and pending > len(self._in_flight):
            raise UsedRingError(
                f"used->idx {used_idx} is {pending} past {self.last_used}, "
                f"but only {len(self._in_flight)} chains are in flight")
        out = []
        for _ in range(pending):
            slot = self.used_ring + USED_RING + USED_ELEM_SIZE * (self.last_used % self.size)
            elem = _USED_ELEM.unpack(self.ram.read(slot, USED_ELEM_SIZE))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._complete(*elem, strict=strict)
            out.append(elem)
        return out

    def written_data(self, head: int, n: "int | None" = None) -> bytes:
        """The first n bytes (default: the used len) the device wrote into a chain returned by
        the last used() call, gathered across its writable buffers in order."""
        chain = self._completed[head]
        n = chain.used_len if n is None else n
        parts = []
        for gpa, k in chain.writable:
            if n <= 0:
                break
            parts.append(self.ram.read(gpa, min(k, n)))
            n -= k
        if n > 0:
            raise ValueError(f"chain {head} has fewer writable bytes than asked for")
        return b"".join(parts)

    def _complete(self, head: int, length: int, *, strict: bool) -> None:
        chain = self._in_flight.pop(head, None)
        if chain is None:
            if strict:
                raise UsedRingError(f"used id {head} is not the head of an in-flight chain")
            return
        self._free.extend(chain.descs)
        chain.used_len = length
        self._completed[head] = chain
        capacity = sum(k for _, k in chain.writable)
        if strict and length > capacity:
            raise UsedRingError(f"used len {length} of chain {head} exceeds its {capacity} "
                                "writable bytes")

    def _recycle_completed(self) -> None:
        for chain in self._completed.values():
            self._pool.put(chain.blocks)
        self._completed.clear()

    # -- notification suppression, driver side (2.7.7) and device fields (2.7.10) -------------

    def set_no_interrupt(self, on: bool) -> None:
        """avail->flags NO_INTERRUPT. With EVENT_IDX the driver MUST keep it 0 and the device
        MUST ignore it (2.7.7), so setting it then is a way to test that the device does."""
        self._w16(self.avail_ring + AVAIL_FLAGS, VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, idx: int) -> None:
        """avail->used_event: interrupt when used->idx reaches idx + 1 (2.7.7, EVENT_IDX)."""
        self._w16(self.avail_ring + avail_used_event_offset(self.size), idx & 0xFFFF)

    def used_flags(self) -> int:
        return self._r16(self.used_ring + USED_FLAGS)

    def used_idx(self) -> int:
        return self._r16(self.used_ring + USED_IDX)

    def avail_event(self) -> int:
        return self._r16(self.used_ring + used_avail_event_offset(self.size))

    def has_used(self) -> bool:
        """Whether the device has used elements that used() has not collected."""
        return self.used_idx() != self.last_used

    @property
    def vring_base(self) -> int:
        """What a front-end sends in SET_VRING_BASE for this ring."""
        return self.initial_avail_idx

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- raw access for hostile tests: no checks, no bookkeeping -------------------------------

    def write_raw_desc(self, i: int, addr: int, length: int, flags: int, next: int) -> None:
        """Descriptor table entry i (0 <= i < size)."""
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor {i} is outside a table of {self.size}")
        self.ram.write(self.desc_table + DESC_SIZE * i, _DESC.pack(addr, length, flags, next))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor table entry i."""
        return _DESC.unpack(self.ram.read(self.desc_table + DESC_SIZE * i, DESC_SIZE))

    def add_raw_head(self, head: int) -> None:
        """Put `head` in the next avail slot, as add_buffers does, but without a chain behind it
        (build one with write_raw_desc); publish() exposes it. Collect with used(strict=False)."""
        self.write_raw_avail_slot(self.next_avail, head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF

    def write_raw_avail_idx(self, value: int) -> None:
        self._w16(self.avail_ring + AVAIL_IDX, value & 0xFFFF)

    def write_raw_avail_slot(self, slot: int, head: int) -> None:
        """avail->ring[slot % size] = head (slot may be a free-running idx value)."""
        self._w16(self._avail_slot_gpa(slot), head & 0xFFFF)

    def write_raw_indirect_table(
        self, gpa: int, entries: "Sequence[tuple[int, int, int, int]]"
    ) -> None:
        """Write (addr, len, flags, next) entries as a descriptor table at gpa."""
        self.ram.write(gpa, b"".join(_DESC.pack(*e) for e in entries))

    # -- helpers -------------------------------------------------------------------------------

    def _avail_slot_gpa(self, idx: int) -> int:
        return self.avail_ring + AVAIL_RING + 2 * (idx % self.size)

    def _w16(self, gpa: int, value: int) -> None:
        self.ram.write(gpa, _U16.pack(value))

    def _r16(self, gpa: int) -> int:
        # One load: the device moves these indices concurrently (GuestRam.read_u16).
        return self.ram.read_u16(gpa)


def _place(ram: GuestRam, gpa: "int | None", n: int, align: int, region: "int | None") -> int:
    """Allocate a queue part, or check a caller's placement against the spec's alignment."""
    if gpa is None:
        return ram.alloc(n, align, region=region)
    if gpa % align:
        raise ValueError(f"GPA {gpa:#x} violates the {align}-byte alignment of this part (2.7)")
    return gpa


def _check_chain(buffers: "Sequence[tuple[int, int, bool]]", queue_size: int) -> None:
    if not buffers:
        raise ValueError("a chain needs at least one buffer")
    if len(buffers) > queue_size:  # 2.7.5.3.1, for direct and indirect chains alike
        raise ValueError(f"chain of {len(buffers)} is longer than the queue size {queue_size}")
    if sum(n for _, n, _ in buffers) > MAX_CHAIN_BYTES:
        raise ValueError("chain longer than 2^32 bytes (2.7.5.2)")
