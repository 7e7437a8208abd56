"""The direct map: numpy views of a queue's three rings over mmap'd guest memory ("prefetch").

Built at the start of a processing round only when each ring lies wholly inside one region and
is aligned as the spec requires; otherwise the queue runs the round on the copy path and the
reason is recorded. A map remembers the table and ring-address generation it was built from, so
a map that outlived a change is recognised and rebuilt rather than used.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pyvhost.memory.address import UserAddress
from pyvhost.memory.table import RegionTable
from pyvhost.ring.layout import DESC_DTYPE, avail_ring_size, desc_table_size, used_ring_size


# What kernels get: a plain tuple of integer views (numba types a plain tuple of plain arrays in
# ~0.3 us per call; a NamedTuple or a structured dtype costs it 60+ us, more than a burst).
#   [0] desc   uint64[2*size]: per descriptor, addr then (len | flags << 32 | next << 48)
#   [1] avail  uint16[size + 3]: flags, idx, ring[size], used_event
#   [2] used16 uint16[2 + 4*size + 1]: flags, idx, ..., avail_event
#   [3] used32 uint32[2*size]: the used elements {id, len}
RingViews = tuple


class DirectMap(NamedTuple):
    table: RegionTable
    generation: int
    views: RingViews
    desc_records: np.ndarray  # the same descriptor table as DESC_DTYPE records, for Python


NO_VIEWS: RingViews = (np.zeros(0, np.uint64), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                       np.zeros(0, np.uint32))


def ring_bytes(table: RegionTable, addr: UserAddress, length: int,
                align: int) -> np.ndarray | str:
    seg = table.contiguous_user_range(addr, length)
    if seg is None:
        return "not inside one region" if table.region_at_user(addr) else "not mapped"
    data = seg.region.data
    if data is None:
        return "region closed"
    view = data[seg.offset:seg.offset + length]
    if view.ctypes.data % align:
        return "misaligned in the host mapping"
    return view


def build_direct_map(table: RegionTable, size: int, desc: UserAddress, avail: UserAddress,
                     used: UserAddress, generation: int) -> DirectMap | str:
    """A DirectMap, or the reason the rings cannot be mapped directly."""
    parts = {}
    for name, addr, length, align in (("descriptor table", desc, desc_table_size(size), 16),
                                      ("avail ring", avail, avail_ring_size(size), 2),
                                      ("used ring", used, used_ring_size(size), 4)):
        got = ring_bytes(table, addr, length, align)
        if isinstance(got, str):
            return f"{name} at 0x{addr:x} {got}"
        parts[name] = got
    used_bytes = parts["used ring"]
    desc_bytes = parts["descriptor table"]
    views = (desc_bytes.view(np.uint64), parts["avail ring"].view(np.uint16),
             used_bytes.view(np.uint16), used_bytes[4:4 + 8 * size].view(np.uint32))
    return DirectMap(table, generation, views, desc_bytes.view(DESC_DTYPE))
