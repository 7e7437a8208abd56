"""Inflight I/O tracking on a packed ring (vhost-user "Inflight I/O tracking", packed layout).

Why packed needs more than split's per-head flag: a packed ring has no descriptor table. The
device writes each used descriptor at its next used slot, over whatever the driver had made
available there, so a request completed out of order overwrites the descriptors of an older one
still in flight; and the frontend cannot say where the ring stands after a crash (QEMU 7.2
restores nothing for packed: its SET_VRING_BASE after our restart is the ring's base at its
start). The region therefore keeps a copy of every in-flight chain's descriptors and the ring's
used position, and the next avail position follows from them.

The queue region is the spec's `QueueRegionPacked` (DPDK's rte_vhost_inflight_info_packed):

    off  0  u64 features               0
    off  8  u16 version                1 once initialised (0: fresh)
    off 10  u16 desc_num               the queue size
    off 12  u16 free_head              first free entry (desc_num: none)
    off 14  u16 old_free_head          not used (the free list is rebuilt at every start)
    off 16  u16 used_idx               the used position after the batch being published
    off 18  u16 old_used_idx           the used position after the last batch completed
    off 20  u8  used_wrap_counter      their wrap counters
    off 21  u8  old_used_wrap_counter
    off 32  desc[desc_num], 32 bytes each (`DescStatePacked`):
              u8 inflight @0, u16 next @2, u16 last @4, u16 num @6, u64 counter @8,
              u16 id @16, u16 flags @18, u32 len @20, u64 addr @24

Entries hold copies of ring descriptors; a popped chain of n ring slots takes n free entries,
linked through `next` (the free list's own links), the first one its *head entry*: `num` = n,
`last` its last entry, `counter` its pop order and `inflight` its state, one of

    0 free   1 in flight   2 completing (in the batch being published)

(the spec's flag, with the third state this algorithm needs). What is written, in order (a kill
at any instruction is recoverable):

  pop of a chain     copy its descriptors into free entries; num, last, counter; then (release)
                     inflight = 1; free_head moves past them (`mark`)
  publish a batch    used descriptors written (not yet visible: the batch's first flags are
                     stored last); each head entry of the batch inflight = 2; used_idx /
                     used_wrap_counter = the used position after the batch (`begin_batch`);
                     the first descriptor's flags (the ring's publish); each head inflight = 0
                     and its entries back on the free list; old_used_* = used_* (`end_batch`)
  start              if used_* != old_used_* a batch was interrupted: published if the ring
                     descriptor at old_used_idx shows the USED bit of old_used_wrap_counter
                     (before the publish the driver's own descriptor is there, with the other
                     USED bit; after, ours, or the driver's next lap's, both with this bit):
                     then its heads (inflight 2) are done, else they are in flight again and
                     the used position rolls back. Every chain still in flight is resubmitted,
                     smallest counter first, from its copied descriptors, before any new one;
                     the ring resumes taking descriptors at the used position plus the slots
                     of every chain in flight (each chain popped is used or in flight).
                     Used descriptors the dead device wrote past the used position and never
                     published (a batch is made visible by its first descriptor's flags; the
                     others carry theirs already) would look used to the driver once the ring
                     gets there: their flags are set back to "available in this lap", what
                     the driver had written there (those slots belong to chains in flight,
                     served again from the copies; nobody reads them as descriptors again).

The free list is rebuilt at every start from what is in flight, so a kill while it was being
relinked costs nothing. Everything read back from the region is bounds-checked (the frontend
shares it). Buffer IDs map to head entries through a process-local table (`ids`), so the
device's tokens (id | slots << 16, packed_kernels.py) find their entries at completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pyvhost.ring import kernels as K
from pyvhost.ring import packed_kernels as PK
from pyvhost.ring.barriers import fence_release
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.jit import inlined_kernel
from pyvhost.ring.packed_layout import PackedBase, avail_flags, is_used, is_valid_queue_size

HEADER_SIZE = 32
ENTRY_SIZE = 32
REGION_ALIGN = 64

# Header fields: u16 words and bytes.
W_VERSION = 4
W_DESC_NUM = 5
W_FREE_HEAD = 6
W_USED_IDX = 8
W_OLD_USED_IDX = 9
B_USED_WRAP = 20
B_OLD_USED_WRAP = 21

# Entry e: its inflight byte, its u16 words from EW0 + EWS * e, its u64s from EQ0 + EQS * e.
B_ENTRY0 = HEADER_SIZE
EW0, EWS = HEADER_SIZE // 2, ENTRY_SIZE // 2
EQ0, EQS = HEADER_SIZE // 8, ENTRY_SIZE // 8
EW_NEXT, EW_LAST, EW_NUM, EW_ID, EW_FLAGS, EW_LEN_LO, EW_LEN_HI = 1, 2, 3, 8, 9, 10, 11
EQ_COUNTER, EQ_ADDR = 1, 3

FREE, IN_FLIGHT, COMPLETING = 0, 1, 2

# The process-local state array's slots (shared with ring/inflight.py's split tracking).
S_DESC_NUM = 0
S_COUNTER = 1
S_RESUBMIT_POS = 2
S_RESUBMIT_END = 3
S_PACKED = 4

NO_ID = -1
ID_SPACE = 1 << 16  # buffer IDs are 16-bit


def queue_region_size(queue_size: int) -> int:
    """Bytes of one packed queue region, 64-byte aligned as DPDK's."""
    raw = HEADER_SIZE + ENTRY_SIZE * queue_size
    return (raw + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


class PackedInflightError(ValueError):
    """A packed queue region that cannot belong to the ring (InflightError's base)."""


@dataclass(frozen=True)
class PackedRecovery:
    fresh: bool
    cleared: int            # heads of a published, interrupted batch, completed now
    rolled_back: int        # heads of an unpublished, interrupted batch, in flight again
    resubmit: list[int]     # head entries to serve again, in counter order
    base: PackedBase        # where the ring resumes (avail and used positions)


def _advance(pos: int, wrap: int, by: int, size: int) -> tuple[int, int]:
    pos += by
    while pos >= size:
        pos -= size
        wrap ^= 1
    return pos, wrap


class RingFlags(Protocol):
    """The flags of the ring's descriptors, as recovery reads and mends them."""

    def read(self, slot: int) -> int: ...

    def write(self, slot: int, flags: int) -> None: ...


def recover(views: tuple, base: PackedBase, queue_size: int, ring: RingFlags) -> PackedRecovery:
    """At ring start: initialise a fresh region at the frontend's base, or repair an
    interrupted batch, rebuild the free list and the id table, queue every chain in flight
    for resubmission and take back unpublished used descriptors. Raises PackedInflightError
    for a region that is not this ring's, or not consistent."""
    flags, words, counters, state, resubmit, ids = views
    size = queue_size
    state[S_RESUBMIT_POS] = state[S_RESUBMIT_END] = 0
    ids[:] = NO_ID
    entry_state = flags[B_ENTRY0:B_ENTRY0 + ENTRY_SIZE * size:ENTRY_SIZE]
    ew = words[EW0:EW0 + EWS * size].reshape(size, EWS)
    if int(words[W_VERSION]) == 0:
        entry_state[:] = FREE
        words[W_DESC_NUM] = size
        words[W_USED_IDX] = words[W_OLD_USED_IDX] = base.used
        flags[B_USED_WRAP] = flags[B_OLD_USED_WRAP] = base.used_wrap
        ew[:, EW_NEXT] = np.arange(1, size + 1)
        words[W_FREE_HEAD] = 0
        state[S_COUNTER] = 0
        words[W_VERSION] = 1  # last: a kill before leaves it fresh
        return PackedRecovery(True, 0, 0, [], base)
    if int(words[W_VERSION]) != 1:
        raise PackedInflightError(f"region version {int(words[W_VERSION])} is not 1")
    if int(words[W_DESC_NUM]) != size:
        raise PackedInflightError(f"region holds {int(words[W_DESC_NUM])} entries, the queue "
                                  f"has {size}")
    used = (int(words[W_USED_IDX]), int(flags[B_USED_WRAP]))
    old = (int(words[W_OLD_USED_IDX]), int(flags[B_OLD_USED_WRAP]))
    for name, (idx, wrap) in (("used", used), ("old used", old)):
        if idx >= size or wrap > 1:
            raise PackedInflightError(f"{name} position {idx} (wrap {wrap}) outside a ring of "
                                      f"{size}")
    if np.any(entry_state > COMPLETING):
        bad = int(np.flatnonzero(entry_state > COMPLETING)[0])
        raise PackedInflightError(f"entry {bad} in state {int(entry_state[bad])}")
    completing = entry_state == COMPLETING
    cleared = rolled_back = 0
    if used != old and ((ring.read(old[0]) >> 15) & 1) == old[1]:
        # The interrupted batch was published: its heads are done.
        cleared = int(completing.sum())
        entry_state[completing] = FREE
    else:
        # Not published (or killed before used_idx moved): in flight again, from old_used.
        rolled_back = int(completing.sum())
        entry_state[completing] = IN_FLIGHT
        used = old
    words[W_USED_IDX] = words[W_OLD_USED_IDX] = used[0]
    flags[B_USED_WRAP] = flags[B_OLD_USED_WRAP] = used[1]

    heads = np.flatnonzero(entry_state == IN_FLIGHT)
    owner = np.full(size, -1, np.int64)
    slots = 0
    for h in heads.tolist():
        num = int(ew[h, EW_NUM])
        if not 1 <= num <= size:
            raise PackedInflightError(f"entry {h} holds a chain of {num} descriptors")
        e = h
        for k in range(num):
            if e >= size or owner[e] >= 0 or (k and entry_state[e] != FREE):
                raise PackedInflightError(f"chain of entry {h} runs into entry {e}, which is "
                                          "not free")
            owner[e] = h
            last = e
            e = int(ew[e, EW_NEXT])
        if int(ew[h, EW_LAST]) != last:
            raise PackedInflightError(f"chain of entry {h} ends at {last}, not at its last "
                                      f"({int(ew[h, EW_LAST])})")
        ident = int(ew[last, EW_ID])
        if ids[ident] != NO_ID:
            raise PackedInflightError(f"buffer id {ident} in flight twice (entries "
                                      f"{int(ids[ident])} and {h})")
        ids[ident] = h
        slots += num
    if slots > size:
        raise PackedInflightError(f"{slots} descriptors in flight, more than the ring holds")
    free = np.flatnonzero(owner < 0)
    ew[free, EW_NEXT] = np.append(free[1:], size)
    words[W_FREE_HEAD] = free[0] if free.shape[0] else size

    heads = queue_resubmissions(heads, counters[EQ0 + EQ_COUNTER:EQ0 + EQS * size:EQS][heads],
                                state, resubmit)
    avail = _advance(used[0], used[1], slots, size)
    _take_back_unpublished(ring, used, slots, size)
    return PackedRecovery(False, cleared, rolled_back, heads.tolist(),
                          PackedBase(avail[0], avail[1], used[0], used[1]))


def queue_resubmissions(heads: np.ndarray, order: np.ndarray, state: np.ndarray,
                        resubmit: np.ndarray) -> np.ndarray:
    """Queue `heads` (with their counters `order`) for resubmission, smallest counter first,
    and set the counter the next pop gets; returns them in that order. Counters are u64 in
    the region (read and stored through int64 views): compared unsigned, ties (never made)
    by head. Both layouts' recovery ends with this."""
    heads = heads[np.lexsort((heads, order.view(np.uint64)))]
    n = heads.shape[0]
    resubmit[:n] = heads
    state[S_RESUBMIT_END] = n
    following = (int(order.view(np.uint64).max()) + 1) % (1 << 64) if n else 0
    state[S_COUNTER] = following - (1 << 64) if following >= 1 << 63 else following
    return heads


def _take_back_unpublished(ring: RingFlags, used: tuple[int, int], slots: int,
                           size: int) -> None:
    """Slots past the used position up to the next avail one that look used in their lap
    were written by the dead device and never published: make them available-looking again."""
    pos, wrap = used
    for _ in range(slots - 1):
        pos, wrap = _advance(pos, wrap, 1, size)
        flags = ring.read(pos)
        if is_used(flags, wrap):
            ring.write(pos, avail_flags(wrap))


def new_ids() -> np.ndarray:
    return np.full(ID_SPACE, NO_ID, np.int32)


# ------------------------------------------------------------------ compiled primitives --

@inlined_kernel
def mark(mem, q, views, iv, token):
    """The chain `token` was just popped (its slots end at next_avail): copy its descriptors
    into free entries and record it in flight. False: the queue broke (a buffer id already in
    flight, or more descriptors in flight than the ring holds: a driver that made descriptors
    available twice)."""
    flags, words, counters, state, resubmit, ids = iv
    size = state[S_DESC_NUM]
    ident = token & 0xFFFF
    slots = token >> 16
    if ids[ident] != NO_ID:
        K.fail(q, E.HEAD_IN_FLIGHT, ident)
        return False
    i = q[K.Q_NEXT_AVAIL] - slots
    if i < 0:
        i += q[K.Q_SIZE]
    head = np.int64(words[W_FREE_HEAD])
    e = head
    last = head
    for _ in range(slots):
        if e >= size:
            K.fail(q, E.HEAD_IN_FLIGHT, ident)
            return False
        addr, length, did, dflags, ok = PK.read_desc(mem, q, views, i)
        if not ok:
            K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
            return False
        w = EW0 + EWS * e
        words[w + EW_ID] = did
        words[w + EW_FLAGS] = dflags
        words[w + EW_LEN_LO] = length & 0xFFFF
        words[w + EW_LEN_HI] = (length >> 16) & 0xFFFF
        counters[EQ0 + EQS * e + EQ_ADDR] = addr
        last = e
        e = np.int64(words[w + EW_NEXT])
        i += 1
        if i >= q[K.Q_SIZE]:
            i = 0
    hw = EW0 + EWS * head
    words[hw + EW_NUM] = slots
    words[hw + EW_LAST] = last
    c = state[S_COUNTER]
    state[S_COUNTER] = c + 1
    counters[EQ0 + EQS * head + EQ_COUNTER] = c
    fence_release()
    flags[B_ENTRY0 + ENTRY_SIZE * head] = IN_FLIGHT
    words[W_FREE_HEAD] = e
    ids[ident] = head
    return True


@inlined_kernel
def begin_batch(q, iv, heads, n):
    """Before the ring publishes the used descriptors of heads[0:n] (tokens; add_used has
    advanced next_used past them): their entries are completing, and used_idx says where
    the batch ends."""
    flags, words, counters, state, resubmit, ids = iv
    for k in range(n):
        e = ids[np.int64(heads[k]) & 0xFFFF]
        if e != NO_ID:
            flags[B_ENTRY0 + ENTRY_SIZE * e] = COMPLETING
    words[W_USED_IDX] = q[K.Q_NEXT_USED]
    flags[B_USED_WRAP] = q[K.Q_USED_WRAP]
    fence_release()  # all of it before the batch's first flags


@inlined_kernel
def end_batch(iv, heads, n):
    """After the ring published heads[0:n]: free their entries, then old_used = used."""
    flags, words, counters, state, resubmit, ids = iv
    size = state[S_DESC_NUM]
    fence_release()
    for k in range(n):
        ident = np.int64(heads[k]) & 0xFFFF
        e = np.int64(ids[ident])
        if e == NO_ID:
            continue
        ids[ident] = NO_ID
        flags[B_ENTRY0 + ENTRY_SIZE * e] = FREE
        last = np.int64(words[EW0 + EWS * e + EW_LAST])
        if last < size:  # ours; the frontend shares the region, so checked anyway
            words[EW0 + EWS * last + EW_NEXT] = words[W_FREE_HEAD]
            words[W_FREE_HEAD] = e
    fence_release()
    words[W_OLD_USED_IDX] = words[W_USED_IDX]
    flags[B_OLD_USED_WRAP] = flags[B_USED_WRAP]


@inlined_kernel
def walk_saved(mem, q, iv, head, seg_addr, seg_len, seg_flags, pos):
    """The chain of head entry `head`, from its copied descriptors, into the segment arrays
    from pos, checked as a pop checks the ring's (pop_chain's returns; token = its buffer id |
    slots << 16)."""
    flags, words, counters, state, resubmit, ids = iv
    size = state[S_DESC_NUM]
    num = np.int64(words[EW0 + EWS * head + EW_NUM])
    total = 0
    seen_write = False
    ident = np.int64(0)
    e = head
    p = pos
    for k in range(num):
        if e >= size:  # recover() checked every link: only a frontend writing the region
            K.fail(q, E.DEVICE_FAILED, head)
            return -1, pos, 0
        w = EW0 + EWS * e
        ident = np.int64(words[w + EW_ID])
        dflags = np.int64(words[w + EW_FLAGS])
        length = np.int64(words[w + EW_LEN_LO]) | (np.int64(words[w + EW_LEN_HI]) << 16)
        addr = counters[EQ0 + EQS * e + EQ_ADDR]
        p, total, seen_write = PK.take_desc(mem, q, head, addr, length, ident, dflags, k == 0,
                                            seen_write, total, seg_addr, seg_len, seg_flags, p)
        if p < 0:
            return p, pos, 0
        if (k < num - 1) != bool(dflags & PK.F_NEXT):
            K.fail(q, E.DEVICE_FAILED, head)
            return -1, pos, 0
        e = np.int64(words[w + EW_NEXT])
    return ident | (num << 16), p, total

