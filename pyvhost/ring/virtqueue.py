"""A virtqueue of either layout, device side: split (virtio 1.x 2.7) or packed (2.8), as the
features negotiated say (VIRTIO_F_RING_PACKED).

What the daemon and the devices use: the layout-specific parts of a queue's life cycle (valid
sizes, part alignments and lengths, the ring base of GET/SET_VRING_BASE, the start, the direct
map, what "consumed up to here" means) are asked of the queue, never spelled out by its user.
The compiled primitives (`kernels.py`) branch on the queue's F_PACKED flag themselves, so a
device's kernels run on both layouts unchanged.
"""

from __future__ import annotations

import numpy as np

from pyvhost.memory import access
from pyvhost.memory.address import UserAddress
from pyvhost.memory.table import RegionTable
from pyvhost.ring import kernels as K
from pyvhost.ring import packed_kernels as PK
from pyvhost.ring import packed_layout as PL
from pyvhost.ring.direct_map import NO_VIEWS, DirectMap
from pyvhost.ring.layout import (AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN, avail_ring_size,
                                 desc_table_size, is_valid_queue_size, used_ring_size)
from pyvhost.ring.packed_queue import build_packed_direct_map
from pyvhost.ring.split_queue import RingResync, SplitQueue, load_ring_u16

# Feature flags set_features owns: kept across a queue reset (features outlive it).
_FEATURE_FLAGS = K.F_EVENT_IDX | K.F_INDIRECT | K.F_IN_ORDER | K.F_PACKED


class Virtqueue(SplitQueue):
    """SplitQueue's state and API, on either ring layout."""

    @property
    def packed(self) -> bool:
        return bool(self.q[K.Q_FLAGS] & K.F_PACKED)

    # -- configuration (protocol thread; ring stopped or paused) --

    def set_features(self, *, event_idx: bool, indirect: bool, in_order: bool = False,
                     packed: bool = False) -> None:
        was = self.packed
        super().set_features(event_idx=event_idx, indirect=indirect, in_order=in_order)
        if packed:
            self.q[K.Q_FLAGS] |= K.F_PACKED
        else:
            self.q[K.Q_FLAGS] &= ~K.F_PACKED
        if packed != was:
            self._reset_positions()
            self.invalidate("ring layout changed")

    def valid_size(self, size: int) -> bool:
        return PL.is_valid_queue_size(size) if self.packed else is_valid_queue_size(size)

    def set_size(self, size: int) -> None:
        if not self.valid_size(size):
            raise ValueError(f"queue {self.index}: size {size} is not "
                             + ("in 1..32768" if self.packed else "a power of two <= 32768"))
        need = K.qstate_len(size)
        if self.q.shape[0] < need:
            grown = np.zeros(need, dtype=np.int64)
            grown[:K.QSTATE_LEN] = self.q[:K.QSTATE_LEN]
            self.q = grown
        self.q[K.Q_SIZE] = size
        self._alloc_scratch(self.max_burst)
        self.invalidate("size changed")

    def ring_parts(self, size: int, desc: int, avail: int, used: int
                   ) -> list[tuple[str, int, int, int]]:
        """(name, user address, length, alignment) of the ring's parts."""
        if self.packed:
            return [("descriptor ring", desc, PL.desc_ring_size(size), PL.DESC_ALIGN),
                    ("driver event area", avail, PL.EVENT_AREA_SIZE, PL.EVENT_ALIGN),
                    ("device event area", used, PL.EVENT_AREA_SIZE, PL.EVENT_ALIGN)]
        return [("descriptor table", desc, desc_table_size(size), DESC_ALIGN),
                ("avail ring", avail, avail_ring_size(size), AVAIL_ALIGN),
                ("used ring", used, used_ring_size(size), USED_ALIGN)]

    def set_addresses(self, desc: UserAddress, avail: UserAddress, used: UserAddress) -> None:
        for name, addr, _length, align in self.ring_parts(1, desc, avail, used):
            if not 0 <= addr <= K.ADDR_MAX or addr % align:
                raise ValueError(f"queue {self.index}: {name} address 0x{addr:x} is not "
                                 f"{align}-byte aligned or out of range")
        self.q[K.Q_DESC], self.q[K.Q_AVAIL], self.q[K.Q_USED] = desc, avail, used
        self.addresses_set = True
        self.invalidate("ring addresses changed")

    # -- the ring base (SET/GET_VRING_BASE) --

    def _reset_positions(self) -> None:
        self.q[K.Q_NEXT_AVAIL] = self.q[K.Q_NEXT_USED] = 0
        self.q[K.Q_AVAIL_WRAP] = self.q[K.Q_USED_WRAP] = 1
        self.q[K.Q_BATCH_SLOT] = -1
        self.q[K.Q_SIGNALLED_VALID] = 0

    @property
    def packed_base(self) -> PL.PackedBase:
        q = self.q
        return PL.PackedBase(int(q[K.Q_NEXT_AVAIL]), int(q[K.Q_AVAIL_WRAP]),
                             int(q[K.Q_NEXT_USED]), int(q[K.Q_USED_WRAP]))

    @property
    def base(self) -> int:
        """GET_VRING_BASE's value: split, the next avail index; packed, all 32 bits."""
        return self.packed_base.encode() if self.packed else self.next_avail

    def set_base(self, num: int) -> None:
        """SET_VRING_BASE. Raises ValueError for a value the layout cannot mean."""
        if not self.packed:
            if num > 0xFFFF:
                raise ValueError(f"queue {self.index}: base {num:#x} is not a split ring index")
            self.set_next_avail(num)
            return
        if not 0 <= num <= 0xFFFFFFFF:
            raise ValueError(f"queue {self.index}: base {num:#x} is not 32 bits")
        self.set_packed_base(PL.PackedBase.decode(num))

    def set_packed_base(self, b: PL.PackedBase) -> None:
        """Packed: both positions (SET_VRING_BASE's 32 bits say "used = avail" with a high
        half of 0, so a used position 0 in wrap 0 cannot travel through them)."""
        size = self.size
        if size and (b.avail >= size or b.used >= size):
            raise ValueError(f"queue {self.index}: packed base {b.encode():#x} (avail "
                             f"{b.avail}, used {b.used}) outside a ring of {size}")
        q = self.q
        q[K.Q_NEXT_AVAIL], q[K.Q_AVAIL_WRAP] = b.avail, b.avail_wrap
        q[K.Q_NEXT_USED], q[K.Q_USED_WRAP] = b.used, b.used_wrap
        q[K.Q_BATCH_SLOT] = -1

    def sync_used_from_ring(self, table: RegionTable) -> RingResync | None:
        if not self.packed:
            return super().sync_used_from_ring(table)
        # A packed ring keeps no indices in guest memory: the base is all there is (both
        # halves from QEMU; virtio-user's used = avail, as DPDK's vhost library takes it).
        self._started = True
        q = self.q
        if q[K.Q_NEXT_AVAIL] >= self.size or q[K.Q_NEXT_USED] >= self.size:
            raise ValueError(f"queue {self.index}: base {self.base:#x} outside a ring of "
                             f"{self.size}")
        q[K.Q_SIGNALLED_VALID] = 0
        q[K.Q_BATCH_SLOT] = -1
        return None

    def descriptor_flags(self, table: RegionTable) -> "DescriptorFlags":
        """Packed: the ring's descriptor flags, for inflight recovery (was a batch published?
        take back used descriptors that were not)."""
        if not self.packed:
            raise ValueError(f"queue {self.index}: not a packed ring")
        return DescriptorFlags(table, int(self.q[K.Q_DESC]), self.size)

    def reset(self) -> None:
        features = int(self.q[K.Q_FLAGS]) & _FEATURE_FLAGS
        super().reset()
        self.q[K.Q_FLAGS] |= features
        self._reset_positions()

    # -- what the driver made available (protocol thread, ring running or not) --

    def avail_target(self, table: RegionTable) -> int | None:
        """Where the chains available now end, for `pending(target)`; None if the ring is
        not mapped (or not a ring)."""
        if not self.packed:
            return self.avail_idx(table)
        q = self.q.copy()  # the copy path: the worker's direct map is not ours to use
        q[K.Q_FLAGS] &= ~K.F_DIRECT
        pos = int(PK.avail_position(table.kernel(), q, NO_VIEWS))
        return None if pos < 0 else pos

    def pending(self, target: int) -> int:
        """Ring entries between next avail and `target` (chains for split, descriptors for
        packed); more than the size: the target is not ahead (nothing to wait for)."""
        if not self.packed:
            return (target - self.next_avail) & 0xFFFF
        size = self.size
        here = self.packed_base.linear(size)[0]
        return (target - here) % (2 * size)

    def ring_ranges(self) -> list[tuple[str, int, int, int]]:
        """The packed ring's three areas (device IOTLB: what must translate, with the access
        the device needs; it writes used descriptors into the descriptor ring)."""
        if not self.packed:
            return super().ring_ranges()
        size = max(self.size, 1)
        return [("descriptor ring", int(self.q[K.Q_DESC]), PL.desc_ring_size(size), 3),
                ("driver event area", int(self.q[K.Q_AVAIL]), PL.EVENT_AREA_SIZE, 1),
                ("device event area", int(self.q[K.Q_USED]), PL.EVENT_AREA_SIZE, 2)]

    # -- the direct map --

    def _build_direct(self, table: RegionTable) -> DirectMap | str:
        if not self.packed:
            return super()._build_direct(table)
        return build_packed_direct_map(table, self.size, UserAddress(int(self.q[K.Q_DESC])),
                                       UserAddress(int(self.q[K.Q_AVAIL])),
                                       UserAddress(int(self.q[K.Q_USED])), self._generation)


class DescriptorFlags:
    """The flags of a packed ring's descriptors, each one 16-bit load or store (the driver
    may be storing them: never torn). Raises AddressNotMappedError (ValueError for a slot
    outside the ring). Stores are not logged: they only redo, at a restart, what the dead
    device wrote (and logged) in the same ring slots."""

    def __init__(self, table: RegionTable, desc: int, size: int) -> None:
        self.table, self.desc, self.size = table, desc, size

    def _addr(self, slot: int) -> int:
        if not 0 <= slot < self.size:
            raise ValueError(f"no packed descriptor {slot} in a ring of {self.size}")
        return self.desc + PL.DESC_SIZE * slot + PL.DESC_FLAGS_OFFSET

    def read(self, slot: int) -> int:
        return load_ring_u16(self.table, self._addr(slot))

    def write(self, slot: int, flags: int) -> None:
        access.write_user_u16(self.table, UserAddress(self._addr(slot)), flags)
