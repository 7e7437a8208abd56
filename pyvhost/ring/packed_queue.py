"""The packed ring's direct map: numpy views of its descriptor ring and both event suppression
areas over mmap'd guest memory, built when each lies wholly inside one region and aligned (the
same rule, invalidation and reuse as the split ring's `direct_map.py`).

Views, as the packed kernels read them (`packed_kernels.py`): the descriptor ring as uint64
pairs (addr, len | id << 32 | flags << 48), the driver's and the device's event areas as
uint16[2] (off_wrap, flags), and an empty uint32 view where split has its used elements — the
same array types as split's, so every kernel compiles once for both layouts.
"""

from __future__ import annotations

import numpy as np

from pyvhost.memory.address import UserAddress
from pyvhost.memory.table import RegionTable
from pyvhost.ring.direct_map import DirectMap, ring_bytes
from pyvhost.ring.packed_layout import (DESC_ALIGN, EVENT_ALIGN, EVENT_AREA_SIZE,
                                        PACKED_DESC_DTYPE, desc_ring_size)

_NO_U32 = np.zeros(0, np.uint32)


def build_packed_direct_map(table: RegionTable, size: int, desc: UserAddress,
                            driver_event: UserAddress, device_event: UserAddress,
                            generation: int) -> DirectMap | str:
    """A DirectMap of a packed ring, or the reason it cannot be mapped directly."""
    parts = []
    for name, addr, length, align in (
            ("descriptor ring", desc, desc_ring_size(size), DESC_ALIGN),
            ("driver event area", driver_event, EVENT_AREA_SIZE, EVENT_ALIGN),
            ("device event area", device_event, EVENT_AREA_SIZE, EVENT_ALIGN)):
        got = ring_bytes(table, addr, length, align)
        if isinstance(got, str):
            return f"{name} at 0x{addr:x} {got}"
        parts.append(got)
    ring, driver, device = parts
    views = (ring.view(np.uint64), driver.view(np.uint16), device.view(np.uint16), _NO_U32)
    return DirectMap(table, generation, views, ring.view(PACKED_DESC_DTYPE))
