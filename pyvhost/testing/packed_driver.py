"""The driver side of a packed virtqueue (virtio 1.1 2.7 / 1.2+ 2.8), for tests and benchmarks.

`MockPackedQueue` lays out a packed ring (descriptor ring, driver and device event suppression
areas) in a `GuestRam` and plays the guest driver as Linux's virtio_ring does: it writes a
chain's descriptors with the buffer ID in each, the head's flags last (at publish(), heads in
reverse order so the device sees a batch at once), reads used descriptors back in ring order,
skipping each by the slots its chain took, and applies event suppression both ways (2.8.10).
Its API is `MockSplitQueue`'s, so the test front-end drives either layout.

Queue sizes need not be powers of two. `write_raw_desc` and friends bypass all bookkeeping so a
test can hand the device garbage.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Sequence

from pyvhost.ring.packed_layout import (DESC_ALIGN, DESC_SIZE, EVENT_ALIGN, EVENT_AREA_SIZE,
                                        EVENT_FLAGS, EVENT_OFF_WRAP, RING_EVENT_FLAGS_DESC,
                                        RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                                        VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                        VIRTQ_DESC_F_WRITE, PackedBase, avail_flags,
                                        desc_ring_size, is_used, is_valid_queue_size)
from pyvhost.ring.layout import vring_need_event
from pyvhost.testing.driver import (QueueAddresses, RingAddresses, RingFullError, UsedRingError,
                                    _BufferPool, _Chain, _check_chain, _place)
from pyvhost.testing.guest_ram import GuestRam

_DESC = struct.Struct("<QIHH")  # struct pvirtq_desc: addr, len, id, flags
_HEAD_BODY = struct.Struct("<QIH")
_U16 = struct.Struct("<H")


class MockPackedQueue:
    """One packed virtqueue, driver side."""

    def __init__(self, ram: GuestRam, size: int, *, desc: "int | None" = None,
                 driver_event: "int | None" = None, device_event: "int | None" = None,
                 event_idx: bool = False, region: "int | None" = None,
                 base_form: str = "qemu") -> None:
        """base_form: how setup sends SET_VRING_BASE: "qemu" (both halves, 0x80008000 for a
        new ring) or "virtio-user" (the low half only, 0x8000)."""
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not in 1..32768 (packed)")
        self.ram, self.size, self.event_idx = ram, size, event_idx
        self.packed = True
        self.base_form = base_form
        self.desc_ring = _place(ram, desc, desc_ring_size(size), DESC_ALIGN, region)
        self.driver_event = _place(ram, driver_event, EVENT_AREA_SIZE, EVENT_ALIGN, region)
        self.device_event = _place(ram, device_event, EVENT_AREA_SIZE, EVENT_ALIGN, region)
        self.next_avail = 0       # where the next chain goes
        self.avail_wrap = 1
        self.last_used = 0        # where the next used descriptor is expected
        self.used_wrap = 1
        self._kick_old = (0, 1)   # next_avail, avail_wrap at the last needs_kick()
        self._added = 0           # descriptors added since the last needs_kick()
        self._free_slots = size
        self._free_ids: deque[int] = deque(range(size))
        self._in_flight: dict[int, _Chain] = {}
        self._slots: dict[int, int] = {}
        self._completed: dict[int, _Chain] = {}
        self._unpublished: list[tuple[int, int]] = []  # (slot, head flags)
        self._pool = _BufferPool(ram, region)
        for gpa, n in ((self.desc_ring, desc_ring_size(size)),
                       (self.driver_event, EVENT_AREA_SIZE), (self.device_event, EVENT_AREA_SIZE)):
            ram.write(gpa, bytes(n))

    # -- addresses and base --------------------------------------------------------------------

    def ring_addresses(self) -> QueueAddresses:
        """As a split queue's, in SET_VRING_ADDR's slots: descriptor ring, driver event area
        (avail), device event area (used)."""
        gpa = RingAddresses(self.desc_ring, self.driver_event, self.device_event)
        user = RingAddresses(*(self.ram.gpa_to_user(a) for a in gpa))
        return QueueAddresses(user, gpa)

    #: What SET_VRING_BASE sends instead of where the ring stands, if set: QEMU 7.2 after
    #: a back-end crash sends the ring's base at its start (it restores nothing for packed).
    frontend_base: "int | None" = None

    @property
    def vring_base(self) -> int:
        if self.frontend_base is not None:
            return self.frontend_base
        b = PackedBase(self.next_avail, self.avail_wrap, self.last_used, self.used_wrap)
        if self.base_form == "virtio-user":
            return b.encode() & 0xFFFF
        return b.encode()

    # -- supplying buffers ---------------------------------------------------------------------

    def add_chain(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        return self._add_pooled(readable, writable, indirect=False)

    def add_indirect_chain(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        return self._add_pooled(readable, writable, indirect=True)

    def add_chains_and_publish(self, chains: "Sequence[tuple[Sequence[bytes], Sequence[int]]]",
                               *, indirect: bool = False) -> list[int]:
        ids = [self._add_pooled(r, w, indirect=indirect) for r, w in chains]
        self.publish()
        return ids

    def add_buffers(self, buffers: "Sequence[tuple[int, int, bool]]", *,
                    indirect: bool = False) -> int:
        """Offer a chain of caller-placed buffers `(gpa, len, device_writable)`. Returns its
        buffer ID. Not visible to the device until publish()."""
        _check_chain(buffers, self.size)
        slots = 1 if indirect else len(buffers)
        if slots > self._free_slots or not self._free_ids:
            raise RingFullError(f"{self._free_slots} free descriptors, chain needs {slots}")
        ident = self._free_ids.popleft()
        blocks: list[tuple[int, int]] = []
        if indirect:
            table, cls = self._pool.get(DESC_SIZE * len(buffers))
            self.ram.write(table, b"".join(
                _DESC.pack(g, n, 0, VIRTQ_DESC_F_WRITE if w else 0) for g, n, w in buffers))
            blocks.append((table, cls))
            entries = [(table, DESC_SIZE * len(buffers), VIRTQ_DESC_F_INDIRECT)]
        else:
            entries = [(g, n, (VIRTQ_DESC_F_WRITE if w else 0)
                        | (VIRTQ_DESC_F_NEXT if k < len(buffers) - 1 else 0))
                       for k, (g, n, w) in enumerate(buffers)]
        head = self.next_avail
        head_flags = 0
        for k, (g, n, f) in enumerate(entries):
            flags = f | avail_flags(self.avail_wrap)
            if k == 0:
                head_flags = flags
                # addr, len, id now; the flags (which make it available) at publish().
                self.ram.write(self.desc_ring + DESC_SIZE * head, _HEAD_BODY.pack(g, n, ident))
            else:
                self.write_raw_desc(self.next_avail, g, n, ident, flags)
            self._advance()
        self._unpublished.append((head, head_flags))
        self._in_flight[ident] = _Chain([], [(g, n) for g, n, w in buffers if w], blocks)
        self._slots[ident] = len(entries)
        self._free_slots -= len(entries)
        self._added += len(entries)
        return ident

    def _old_flags(self, slot: int) -> int:
        return self.ram.read_u16(self.desc_ring + DESC_SIZE * slot + 14)

    def _advance(self) -> None:
        self.next_avail += 1
        if self.next_avail >= self.size:
            self.next_avail -= self.size
            self.avail_wrap ^= 1

    def publish(self) -> None:
        """Make the added chains available: their heads' flags, the first chain's last."""
        for slot, flags in reversed(self._unpublished):
            self._w16(self.desc_ring + DESC_SIZE * slot + 14, flags)
        self._unpublished.clear()

    def needs_kick(self) -> bool:
        """Whether the chains published since the last call need a notification (2.8.10,
        as Linux's virtqueue_kick_prepare_packed)."""
        old, _old_wrap = self._kick_old
        new = self.next_avail
        added, self._added = self._added, 0
        self._kick_old = (self.next_avail, self.avail_wrap)
        flags = self.ram.read_u16(self.device_event + EVENT_FLAGS)
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE and added > 0
        off_wrap = self.ram.read_u16(self.device_event + EVENT_OFF_WRAP)
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        old = new - added  # as Linux: may be negative across the wrap; need_event is mod 2^16
        return vring_need_event(event & 0xFFFF, new & 0xFFFF, old & 0xFFFF)

    def _add_pooled(self, readable: Sequence[bytes], writable: Sequence[int], *,
                    indirect: bool) -> int:
        _check_chain([(0, len(d), False) for d in readable] + [(0, n, True) for n in writable],
                     self.size)
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
        try:
            ident = self.add_buffers(buffers, indirect=indirect)
        except RingFullError:
            self._pool.put(blocks)
            raise
        self._in_flight[ident].blocks.extend(blocks)
        return ident

    # -- receiving used buffers ----------------------------------------------------------------

    def has_used(self) -> bool:
        return is_used(self._old_flags(self.last_used), self.used_wrap)

    def used(self, *, strict: bool = True) -> list[tuple[int, int]]:
        """New used descriptors `(id, len)` since the last call, in ring order."""
        for chain in self._completed.values():
            self._pool.put(chain.blocks)
        self._completed.clear()
        out = []
        while self.has_used():
            addr_len_id = self.ram.read(self.desc_ring + DESC_SIZE * self.last_used, DESC_SIZE)
            _addr, length, ident, _flags = _DESC.unpack(addr_len_id)
            if ident not in self._in_flight:
                if strict:
                    raise UsedRingError(f"used id {ident} is not an in-flight buffer")
                break  # nothing to skip by: the ring is lost
            chain = self._in_flight.pop(ident)
            slots = self._slots.pop(ident)
            self.last_used += slots
            if self.last_used >= self.size:
                self.last_used -= self.size
                self.used_wrap ^= 1
            self._free_slots += slots
            self._free_ids.append(ident)
            chain.used_len = length
            self._completed[ident] = chain
            capacity = sum(k for _, k in chain.writable)
            if strict and length > capacity:
                raise UsedRingError(f"used len {length} of buffer {ident} exceeds its "
                                    f"{capacity} writable bytes")
            out.append((ident, length))
        return out

    def written_data(self, head: int, n: "int | None" = None) -> bytes:
        chain = self._completed[head]
        n = chain.used_len if n is None else n
        parts = []
        for gpa, k in chain.writable:
            if n <= 0:
                break
            parts.append(self.ram.read(gpa, min(k, n)))
            n -= k
        if n > 0:
            raise ValueError(f"buffer {head} has fewer writable bytes than asked for")
        return b"".join(parts)

    # -- event suppression, driver side -------------------------------------------------------

    def set_no_interrupt(self, on: bool) -> None:
        self._w16(self.driver_event + EVENT_FLAGS,
                  RING_EVENT_FLAGS_DISABLE if on else RING_EVENT_FLAGS_ENABLE)

    def set_used_event(self, off: int, wrap: int) -> None:
        """Interrupt when the device writes the used descriptor at (off, wrap) (EVENT_IDX)."""
        self._w16(self.driver_event + EVENT_OFF_WRAP, off | wrap << 15)
        self._w16(self.driver_event + EVENT_FLAGS, RING_EVENT_FLAGS_DESC)

    def device_event_flags(self) -> int:
        return self.ram.read_u16(self.device_event + EVENT_FLAGS)

    def device_event_off_wrap(self) -> int:
        return self.ram.read_u16(self.device_event + EVENT_OFF_WRAP)

    @property
    def num_free(self) -> int:
        return min(self._free_slots, len(self._free_ids))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- raw access for hostile tests: no checks, no bookkeeping -------------------------------

    def write_raw_desc(self, i: int, addr: int, length: int, ident: int, flags: int) -> None:
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor {i} is outside a ring of {self.size}")
        self.ram.write(self.desc_ring + DESC_SIZE * i, _DESC.pack(addr, length, ident, flags))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring descriptor i."""
        return _DESC.unpack(self.ram.read(self.desc_ring + DESC_SIZE * i, DESC_SIZE))

    def add_raw(self, entries: "Sequence[tuple[int, int, int, int]]") -> None:
        """Write (addr, len, id, flags-without-ring-bits) descriptors at next_avail as
        available (all flags at once), with no bookkeeping. Collect with used(strict=False)."""
        for addr, length, ident, flags in entries:
            self.write_raw_desc(self.next_avail, addr, length, ident,
                                flags | avail_flags(self.avail_wrap))
            self._advance()

    def write_raw_indirect_table(self, gpa: int,
                                 entries: "Sequence[tuple[int, int, int, int]]") -> None:
        """(addr, len, id, flags) entries as a packed indirect table at gpa."""
        self.ram.write(gpa, b"".join(_DESC.pack(*e) for e in entries))

    def _w16(self, gpa: int, value: int) -> None:
        self.ram.write(gpa, _U16.pack(value))
