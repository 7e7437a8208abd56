"""Split virtqueue layout (virtio 1.x, section 2.7) and the slots of a queue's state array.

Everything here is plain data shared by the device side (ring/), the compiled kernels and the
test-double driver (testing/), so that both sides of a ring agree by construction.
"""

from __future__ import annotations

import numpy as np

# Descriptor flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Ring flags (2.7.6, 2.7.8).
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# Feature bits that change the ring (6).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_IOMMU_PLATFORM = 33   # ACCESS_PLATFORM: addresses are IOVAs (a device IOTLB)
VIRTIO_F_IN_ORDER = 35

# A split ring has at most 32768 entries, and a power of two (2.7).
MAX_QUEUE_SIZE = 32768

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
DESC_SIZE = 16
USED_ELEM_SIZE = 8

# Alignment the spec requires of each part (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def desc_table_size(queue_size: int) -> int:
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size], used_event — all u16."""
    return 2 * (3 + queue_size)


def used_ring_size(queue_size: int) -> int:
    """flags, idx (u16 each), ring[queue_size] of {u32 id, u32 len}, avail_event (u16)."""
    return 4 + USED_ELEM_SIZE * queue_size + 2


# Byte offsets inside the avail ring.
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4


def avail_used_event_offset(queue_size: int) -> int:
    return AVAIL_RING + 2 * queue_size


# Byte offsets inside the used ring.
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4


def used_avail_event_offset(queue_size: int) -> int:
    return USED_RING + USED_ELEM_SIZE * queue_size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's vring_need_event (2.7.10), in 16-bit arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def is_valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and (size & (size - 1)) == 0
