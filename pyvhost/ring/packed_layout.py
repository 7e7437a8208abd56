"""Packed virtqueue layout (virtio 1.1 section 2.7, 1.2+ section 2.8, "packed-ring.tex"), and
the 32-bit ring base vhost-user sends and expects for it.

Plain data shared by the device side (ring/), the compiled kernels and the test-double driver
(testing/), so that both sides of a packed ring agree by construction.

A packed ring has one descriptor ring (16 bytes a descriptor, the driver makes descriptors
available in it and the device writes used descriptors over them, in ring order) and two
4-byte event suppression areas. vhost-user's SET_VRING_ADDR carries them where a split ring
has its three parts: `desc_user_addr` the descriptor ring, `avail_user_addr` the driver event
suppression area, `used_user_addr` the device event suppression area (DPDK
vring_translate_packed, QEMU virtio_queue_set_rings).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# The ring feature bit (6).
VIRTIO_F_RING_PACKED = 34

# Descriptor flags (2.8.1): NEXT, WRITE and INDIRECT as for split, plus the two ring bits.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15

# Event suppression (2.8.10): struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2      # only with VIRTIO_F_EVENT_IDX: notify at off_wrap
EVENT_OFF_WRAP = 0
EVENT_FLAGS = 2
EVENT_AREA_SIZE = 4

# struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
DESC_SIZE = 16
DESC_FLAGS_OFFSET = 14
DESC_ID_OFFSET = 12

# Alignment of each part (2.8.10.1 "Structure Size and Alignment").
DESC_ALIGN = 16
EVENT_ALIGN = 4

# At most 2^15 entries, and "The Queue Size value does not have to be a power of 2".
MAX_QUEUE_SIZE = 32768


def is_valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE


def desc_ring_size(queue_size: int) -> int:
    return DESC_SIZE * queue_size


def avail_flags(wrap: int) -> int:
    """The flags a driver with wrap counter `wrap` sets to make a descriptor available."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_flags(wrap: int) -> int:
    """The flags a device with wrap counter `wrap` sets in a used descriptor."""
    return VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0


def is_avail(flags: int, wrap: int) -> bool:
    """Available to a device expecting the driver's wrap counter `wrap` (2.8.1)."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) != bool(flags & VIRTQ_DESC_F_USED)


def is_used(flags: int, wrap: int) -> bool:
    """Used, as a driver expecting the device's wrap counter `wrap` sees it."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) == bool(flags & VIRTQ_DESC_F_USED)


class PackedBase(NamedTuple):
    """Where a packed ring stands: next available descriptor and the driver's wrap counter the
    device expects there; next used descriptor and the device's wrap counter."""

    avail: int
    avail_wrap: int
    used: int
    used_wrap: int

    def encode(self) -> int:
        """The 32-bit GET_VRING_BASE form (vhost-user.rst "Vring descriptor indices for packed
        virtqueues"): bits 0-14 avail, 15 avail wrap, 16-30 used, 31 used wrap."""
        return self.avail | self.avail_wrap << 15 | self.used << 16 | self.used_wrap << 31

    @classmethod
    def decode(cls, num: int) -> "PackedBase":
        """SET_VRING_BASE's value. QEMU sends both halves (0x80008000 for a new ring); DPDK's
        virtio-user sends the low half only (avail | wrap << 15), meaning used = avail, which
        is also what DPDK's vhost library assumes: a high half of 0 is read that way."""
        avail, avail_wrap = num & 0x7FFF, num >> 15 & 1
        high = num >> 16 & 0xFFFF
        if high == 0:
            return cls(avail, avail_wrap, avail, avail_wrap)
        return cls(avail, avail_wrap, high & 0x7FFF, high >> 15 & 1)

    def describe(self) -> str:
        return (f"next avail {self.avail} (wrap {self.avail_wrap}), next used {self.used} "
                f"(wrap {self.used_wrap})")

    def linear(self, size: int) -> tuple[int, int]:
        """avail and used as positions modulo 2 * size (the wrap counter starts at 1, so a
        position in the first lap has wrap 1): distances are then plain subtraction."""
        return (self.avail + (0 if self.avail_wrap else size),
                self.used + (0 if self.used_wrap else size))


NEW_RING_BASE = PackedBase(0, 1, 0, 1)
