"""The direct map: numpy views of a queue's three rings over mmap'd guest memory ("prefetch").

Built at the start of a processing round only when each ring lies wholly inside one region and
is aligned as the spec requires; otherwise the queue runs the round on the copy path and the
reason is recorded. A map remembers the table and ring-address generation it was built from, so
a map that outlived a change is recognised and rebuilt rather than used.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pyvhost.memory.table import RegionTable
from pyvhost.ring.layout import DESC_DTYPE, avail_ring_size, desc_table_size, used_ring_size


class RingViews(NamedTuple):
    desc: np.ndarray    # DESC_DTYPE[size]
    avail: np.ndarray   # uint16[size + 3]: flags, idx, ring[size], used_event
    used16: np.ndarray  # uint16[2 + 4*size + 1]: flags, idx, ..., avail_event
    used32: np.ndarray  # uint32[2*size]: the used elements {id, len}


class DirectMap(NamedTuple):
    table: RegionTable
    generation: int
    views: RingViews


NO_VIEWS = RingViews(np.zeros(0, DESC_DTYPE), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                     np.zeros(0, np.uint32))


def _ring_bytes(table: RegionTable, addr: int, length: int, align: int) -> np.ndarray | str:
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


def build_direct_map(table: RegionTable, size: int, desc: int, avail: int, used: int,
                     generation: int) -> DirectMap | str:
    """A DirectMap, or the reason the rings cannot be mapped directly."""
    parts = {}
    for name, addr, length, align in (("descriptor table", desc, desc_table_size(size), 16),
                                      ("avail ring", avail, avail_ring_size(size), 2),
                                      ("used ring", used, used_ring_size(size), 4)):
        got = _ring_bytes(table, addr, length, align)
        if isinstance(got, str):
            return f"{name} at 0x{addr:x} {got}"
        parts[name] = got
    used_bytes = parts["used ring"]
    views = RingViews(parts["descriptor table"].view(DESC_DTYPE),
                      parts["avail ring"].view(np.uint16),
                      used_bytes.view(np.uint16),
                      used_bytes[4:4 + 8 * size].view(np.uint32))
    return DirectMap(table, generation, views)
