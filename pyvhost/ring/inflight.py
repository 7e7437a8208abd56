"""Inflight I/O tracking on a split ring (vhost-user "Inflight I/O tracking", split layout), so a
device killed mid-burst can be restarted without losing or repeating a request.

The frontend keeps a shared memory area for the device (GET_/SET_INFLIGHT_FD,
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) that outlives the device process; one *queue region*
per queue, `queue_region_size(queue_size)` bytes each, laid out as the spec's
`QueueRegionSplit` (libvhost-user's VuVirtqInflight, DPDK's rte_vhost_inflight_info_split):

    off  0  u64 features            0
    off  8  u16 version             1 once initialised (0: a fresh area, after a VM reset)
    off 10  u16 desc_num            the queue size
    off 12  u16 last_batch_head     head of the list of the last published batch
    off 14  u16 used_idx            used->idx once the last batch was published and cleared
    off 16  desc[desc_num], 16 bytes each, indexed by head descriptor:
              u8 inflight @0, u8 padding[5] @1, u16 next @6, u64 counter @8

The algorithm (the order is what makes a kill at any instruction recoverable):
  pop of head i          desc[i].counter = counter++; desc[i].inflight = 1
                         (`inflight_mark`, in pop order, before any side effect of the request)
  publish of a batch     for each used head i: desc[i].next = last_batch_head;
                         last_batch_head = i (`inflight_begin_batch`); used->idx += batch
                         (the ring's publish_used); then desc[i].inflight = 0 for each, and
                         used_idx = used->idx (`inflight_end_batch`)
  start after a restart  if used_idx != used->idx the last batch was published but not
                         cleared: walk (used->idx - used_idx) heads from last_batch_head and
                         clear them; then every head still inflight is resubmitted, smallest
                         counter first, before any new avail entry; next avail =
                         used->idx + heads in flight (every avail entry taken is either used
                         or in flight, because heads are marked in pop order)

A frontend that restarts a crashed device sends SET_VRING_BASE = used->idx (QEMU: the failed
GET_VRING_BASE restores last_avail from the used index); the in-flight heads then sit between
used->idx and the real next avail, which only this area knows.

A packed ring's region has another layout and algorithm (ring/packed_inflight.py); the
primitives below branch to it, so a data path tracks either layout with the same calls.

What a device gets: `SplitQueue.inflight` is an `InflightRing`; its `views` is a plain tuple
`(flags u8[], words u16[], counters i64[], state i64[], resubmit i64[], ids i32[])` that
compiled code passes to the kernels below (all arrays empty when the queue is not tracked: every kernel is
then a no-op, so a data path may call them unconditionally). The Python request tier
(`pyvhost.RequestRunner`) calls them itself; a compiled data path (`Device.process_burst`) that
sets `Device.tracks_inflight` must:

  - pop with `pop_burst_inflight` (pop_burst's contract plus resubmission and marking), or
    mark every chain it pops itself, in pop order, with `inflight_mark`, and drain the
    resubmit list first with `inflight_resubmit_pending` / `inflight_walk_resubmit` /
    `inflight_take_resubmit`;
  - publish with `push_used_burst_inflight` (push_used_burst's contract), or add its used
    elements with `kernels.add_used` and publish them with `publish_used_inflight` (instead
    of `kernels.publish_used`), or bracket its own publish with `inflight_begin_batch` and
    `inflight_end_batch`.

`ring.chains.pop_requests` takes the views too (after `views`) and resubmits and marks itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyvhost.ring import kernels as K
from pyvhost.ring import packed_inflight as PI
from pyvhost.ring.barriers import fence_release
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.jit import inlined_kernel, kernel
from pyvhost.ring.layout import is_valid_queue_size
from pyvhost.ring.packed_layout import PackedBase

INFLIGHT_VERSION = 1
HEADER_SIZE = 16
DESC_STATE_SIZE = 16
REGION_ALIGN = 64           # libvhost-user INFLIGHT_ALIGNMENT; DPDK aligns to 64 too

# Indices into the three views of one queue region.
W_VERSION = 4               # u16 words
W_DESC_NUM = 5
W_LAST_BATCH_HEAD = 6
W_USED_IDX = 7
W_NEXT0 = 11                # desc[i].next is words[W_NEXT0 + 8 * i]
B_INFLIGHT0 = 16            # desc[i].inflight is flags[B_INFLIGHT0 + 16 * i]
C_COUNTER0 = 3              # desc[i].counter is counters[C_COUNTER0 + 2 * i]

# The process-local state array (packed_inflight.py uses the same slots).
S_DESC_NUM = PI.S_DESC_NUM      # the queue size the region was set up for (bounds every head)
S_COUNTER = PI.S_COUNTER        # the counter the next popped head gets
S_RESUBMIT_POS = PI.S_RESUBMIT_POS  # resubmit[POS:END] are still to be popped
S_RESUBMIT_END = PI.S_RESUBMIT_END
S_PACKED = PI.S_PACKED          # 1: the region has the packed layout
STATE_LEN = 5

InflightViews = tuple  # (flags, words, counters, state, resubmit, ids): see the docstring

NO_INFLIGHT: InflightViews = (np.zeros(0, np.uint8), np.zeros(0, np.uint16),
                              np.zeros(0, np.int64), np.zeros(STATE_LEN, np.int64),
                              np.zeros(0, np.int64), np.zeros(0, np.int32))


def queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's region: header and descriptor states, 64-byte aligned (the stride
    libvhost-user and DPDK use, so an area can move between backends)."""
    if packed:
        return PI.queue_region_size(queue_size)
    raw = HEADER_SIZE + DESC_STATE_SIZE * queue_size
    return (raw + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


class InflightError(ValueError):
    """An inflight area (or a queue region in it) that cannot be what the frontend says."""


@dataclass(frozen=True)
class InflightRecovery:
    """What `InflightRing.recover` found at a ring start."""

    fresh: bool             # version 0: initialised, nothing to recover
    cleared: int            # heads of a published but uncleared last batch, cleared now
    resubmit: list[int]     # heads (packed: head entries) to serve again, in counter order
    next_avail: int         # where the ring resumes taking new avail entries (split)
    base: PackedBase | None = None  # packed: where the ring resumes, avail and used
    rolled_back: int = 0    # packed: heads of an unpublished batch, in flight again

    def describe(self) -> str:
        where = self.base.describe() if self.base is not None else f"next avail {self.next_avail}"
        if self.fresh:
            return f"inflight region initialised ({where})"
        parts = [f"{len(self.resubmit)} requests in flight resubmitted"]
        if self.resubmit:
            shown = ", ".join(map(str, self.resubmit[:8]))
            kind = "head entries" if self.base is not None else "heads"
            parts[0] += f" ({kind} {shown}{', ...' if len(self.resubmit) > 8 else ''})"
        if self.cleared:
            parts.append(f"{self.cleared} heads of the last published batch cleared")
        if self.rolled_back:
            parts.append(f"{self.rolled_back} heads of an unpublished batch taken back")
        parts.append(where)
        return "; ".join(parts)


class InflightRing:
    """One queue's inflight tracking: views of its queue region (or none) and local state."""

    def __init__(self) -> None:
        self.views: InflightViews = NO_INFLIGHT

    @property
    def enabled(self) -> bool:
        return self.views[0].shape[0] != 0

    @property
    def packed(self) -> bool:
        """The region attached has the packed layout."""
        return bool(self.views[3][S_PACKED])

    def attach(self, region: np.ndarray, queue_size: int, packed: bool = False) -> None:
        """Track into `region` (a writable uint8 view of one queue region, 8-byte aligned,
        queue_region_size(queue_size, packed) bytes). The ring is stopped (no worker runs
        it)."""
        if packed:
            if not PI.is_valid_queue_size(queue_size):
                raise InflightError(f"queue size {queue_size} is not in 1..32768")
        elif not is_valid_queue_size(queue_size):
            raise InflightError(f"queue size {queue_size} is not a power of two <= 32768")
        size = queue_region_size(queue_size, packed)
        if region.dtype != np.uint8 or region.shape[0] != size or region.ctypes.data % 8:
            raise InflightError(f"queue region of {region.shape[0]} bytes at an address "
                                f"{region.ctypes.data % 8} past 8-byte alignment; needs {size}")
        state = np.zeros(STATE_LEN, np.int64)
        state[S_DESC_NUM] = queue_size
        state[S_PACKED] = packed
        ids = PI.new_ids() if packed else NO_INFLIGHT[5]
        self.views = (region, region.view(np.uint16), region.view(np.int64), state,
                      np.zeros(queue_size, np.int64), ids)

    def detach(self) -> None:
        """Stop tracking and drop every view of the region (it may then be unmapped)."""
        self.views = NO_INFLIGHT

    def forget_resubmissions(self) -> None:
        """Drop the resubmit list (a region found inconsistent with its ring)."""
        state = self.views[3]
        state[S_RESUBMIT_POS] = state[S_RESUBMIT_END] = 0

    @property
    def resubmit_pending(self) -> int:
        state = self.views[3]
        return int(state[S_RESUBMIT_END] - state[S_RESUBMIT_POS])

    def recover(self, used_idx: int, queue_size: int) -> InflightRecovery:
        """At ring start (ring stopped): initialise a fresh region, or bring a used one up to
        date with the ring's used->idx and queue its in-flight heads for resubmission.

        Raises InflightError when the region cannot belong to this ring (another queue size,
        a last batch that does not fit): the ring must not start on it.
        """
        flags, words, counters, state, resubmit, _ids = self.views
        if not self.enabled:
            raise InflightError("no inflight region attached")
        if self.packed:
            raise InflightError("the region has the packed layout (recover_packed)")
        if int(state[S_DESC_NUM]) != queue_size:
            raise InflightError(f"region set up for {int(state[S_DESC_NUM])} entries, the queue "
                                f"has {queue_size}")
        state[S_RESUBMIT_POS] = state[S_RESUBMIT_END] = 0
        inflight = flags[B_INFLIGHT0:B_INFLIGHT0 + DESC_STATE_SIZE * queue_size:DESC_STATE_SIZE]
        if int(words[W_VERSION]) == 0:
            # Fresh (zeroed by whoever allocated it). used_idx starts at the ring's used->idx,
            # not 0: a ring that already moved (e.g. after migration) would otherwise look
            # like a published but uncleared batch (spdk/spdk#3766).
            inflight[:] = 0
            words[W_DESC_NUM] = queue_size
            words[W_LAST_BATCH_HEAD] = 0
            words[W_USED_IDX] = used_idx
            state[S_COUNTER] = 0
            words[W_VERSION] = INFLIGHT_VERSION  # last: a kill before leaves it fresh
            return InflightRecovery(True, 0, [], used_idx)
        if int(words[W_VERSION]) != INFLIGHT_VERSION:
            raise InflightError(f"region version {int(words[W_VERSION])} is not "
                                f"{INFLIGHT_VERSION}")
        if int(words[W_DESC_NUM]) != queue_size:
            raise InflightError(f"region holds {int(words[W_DESC_NUM])} descriptor states, "
                                f"the queue has {queue_size} entries")
        cleared = 0
        batch = (used_idx - int(words[W_USED_IDX])) & 0xFFFF
        if batch:
            # The last batch was published (used->idx moved) but not cleared.
            if batch > queue_size:
                raise InflightError(f"used index {used_idx} is {batch} past the region's "
                                    f"{int(words[W_USED_IDX])}: more than a batch can hold")
            head = int(words[W_LAST_BATCH_HEAD])
            for _ in range(batch):
                if head >= queue_size:
                    raise InflightError(f"last batch lists head {head} >= {queue_size}")
                inflight[head] = 0
                head = int(words[W_NEXT0 + 8 * head])
            cleared = batch
            words[W_USED_IDX] = used_idx
        heads = np.flatnonzero(inflight)
        heads = PI.queue_resubmissions(
            heads, counters[C_COUNTER0:C_COUNTER0 + 2 * queue_size:2][heads], state, resubmit)
        return InflightRecovery(False, cleared, heads.tolist(),
                                (used_idx + heads.shape[0]) & 0xFFFF)


    def recover_packed(self, base: PackedBase, queue_size: int,
                       ring: PI.RingFlags) -> InflightRecovery:
        """`recover` for a packed ring (ring/packed_inflight.py): `base` is where the frontend
        says the ring stands (used for a fresh region only: after our crash it knows no
        better than the region); `ring` reads and mends the ring's descriptor flags."""
        if not self.enabled or not self.packed:
            raise InflightError("no packed inflight region attached")
        if int(self.views[3][S_DESC_NUM]) != queue_size:
            raise InflightError(f"region set up for {int(self.views[3][S_DESC_NUM])} entries, "
                                f"the queue has {queue_size}")
        try:
            r = PI.recover(self.views, base, queue_size, ring)
        except PI.PackedInflightError as exc:
            raise InflightError(str(exc)) from exc
        return InflightRecovery(r.fresh, r.cleared, r.resubmit, r.base.avail, r.base,
                                r.rolled_back)

# ------------------------------------------------------------------ compiled primitives --

@inlined_kernel
def inflight_mark(mem, q, views, iv, head):
    """A chain was popped (`head`: pop_chain's head or token): record it in flight (counter,
    then the flag; packed: its descriptors copied too). Call in pop order, right after the
    pop, before the request has any effect. No-op when not tracked. False: the queue broke
    (packed only: see packed_inflight.mark)."""
    flags, words, counters, state, resubmit, ids = iv
    if flags.shape[0] == 0 or head < 0:
        return True
    if state[S_PACKED]:
        return PI.mark(mem, q, views, iv, head)
    if head >= state[S_DESC_NUM]:
        return True
    c = state[S_COUNTER]
    state[S_COUNTER] = c + 1
    counters[C_COUNTER0 + 2 * head] = c
    fence_release()
    flags[B_INFLIGHT0 + DESC_STATE_SIZE * head] = 1
    return True


@inlined_kernel
def inflight_begin_batch(q, iv, heads, n):
    """Before the ring publishes the used elements of heads[0:n]: split, link them into the
    batch list from last_batch_head (spec: desc[i].next = last_batch_head; last_batch_head =
    i); packed, see packed_inflight.begin_batch."""
    flags, words, counters, state, resubmit, ids = iv
    if flags.shape[0] == 0:
        return
    if state[S_PACKED]:
        PI.begin_batch(q, iv, heads, n)
        return
    size = state[S_DESC_NUM]
    for k in range(n):
        h = np.int64(heads[k])
        if h < 0 or h >= size:
            continue  # add_used refuses it and breaks the queue
        words[W_NEXT0 + 8 * h] = words[W_LAST_BATCH_HEAD]
        words[W_LAST_BATCH_HEAD] = h
    fence_release()  # the list is complete before used->idx moves


@inlined_kernel
def inflight_end_batch(q, iv, heads, n):
    """After the ring published heads[0:n] (split: used->idx = q's next used): clear their
    flags, then record used_idx (a kill in between is repaired by walking the batch list at
    the next start)."""
    flags, words, counters, state, resubmit, ids = iv
    if flags.shape[0] == 0:
        return
    if state[S_PACKED]:
        PI.end_batch(iv, heads, n)
        return
    size = state[S_DESC_NUM]
    fence_release()  # used->idx is stored before any flag is cleared
    for k in range(n):
        h = np.int64(heads[k])
        if 0 <= h < size:
            flags[B_INFLIGHT0 + DESC_STATE_SIZE * h] = 0
    fence_release()
    words[W_USED_IDX] = q[K.Q_NEXT_USED]


@inlined_kernel
def inflight_resubmit_pending(iv):
    """Heads still to be resubmitted (served before any new avail entry)."""
    state = iv[3]
    return state[S_RESUBMIT_END] - state[S_RESUBMIT_POS]


@inlined_kernel
def inflight_walk_resubmit(mem, q, views, iv, seg_addr, seg_len, seg_flags, pos):
    """The next chain to resubmit (check `inflight_resubmit_pending` first) into the segment
    arrays from pos, as pop_chain would: (head or token, new pos, total); -1 broken, -2 the
    segments are full. Split walks the descriptor table again; packed, the region's copy."""
    head = iv[4][iv[3][S_RESUBMIT_POS]]
    if iv[3][S_PACKED]:
        return PI.walk_saved(mem, q, iv, head, seg_addr, seg_len, seg_flags, pos)
    return K.walk_chain(mem, q, views, head, seg_addr, seg_len, seg_flags, pos)


@inlined_kernel
def inflight_take_resubmit(iv):
    """The chain `inflight_walk_resubmit` gave is being served (it stays in flight, its
    counter unchanged)."""
    iv[3][S_RESUBMIT_POS] += 1


@kernel
def pop_burst_inflight(mem, q, views, iv, max_chains, heads, chain_end, seg_addr, seg_len,
                       seg_flags):
    """`kernels.pop_burst` for a tracked ring: the heads to resubmit first (their chains walked
    again), then avail entries, each marked in flight as it is taken. Same returns."""
    if q[K.Q_ERROR] != 0:
        return -1
    n = K.avail_count(mem, q, views)
    if n < 0:
        return -1
    n = min(n + inflight_resubmit_pending(iv), max_chains, heads.shape[0], chain_end.shape[0])
    pos = 0
    k = 0
    while k < n:
        resubmitted = inflight_resubmit_pending(iv) > 0
        if resubmitted:
            head, pos2, _ = inflight_walk_resubmit(mem, q, views, iv, seg_addr, seg_len,
                                                   seg_flags, pos)
        else:
            head, pos2, _ = K.pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, pos)
        if head == -1:
            return -1
        if head == -3:  # an IOTLB miss: the burst ends before this chain
            return k
        if head == -2:
            if k == 0:
                K.fail(q, E.CHAIN_TOO_LONG, -1)
                return -1
            return k
        if resubmitted:
            inflight_take_resubmit(iv)
        elif not inflight_mark(mem, q, views, iv, head):
            return -1
        heads[k] = head
        chain_end[k] = pos2
        pos = pos2
        k += 1
    return k


@kernel
def push_used_burst_inflight(mem, q, views, iv, heads, lens, n):
    """`kernels.push_used_burst` for a tracked ring: add n used elements, link them as the
    last batch, publish, clear their flags and record used_idx; whether to interrupt (-1:
    broken)."""
    for k in range(n):
        if not K.add_used(mem, q, views, np.int64(heads[k]), np.int64(lens[k])):
            return -1
    if n == 0:
        return 0
    inflight_begin_batch(q, iv, heads, n)
    if not K.publish_used(mem, q, views):
        return -1
    inflight_end_batch(q, iv, heads, n)
    return 1 if K.needs_interrupt(mem, q, views) else 0


@kernel
def publish_used_inflight(mem, q, views, iv, heads, n):
    """`kernels.publish_used` for a tracked ring whose data path added the used elements of
    heads[0:n] itself (`kernels.add_used`): link them as the last batch, publish, clear their
    flags and record used_idx. False: the queue broke."""
    inflight_begin_batch(q, iv, heads, n)
    if not K.publish_used(mem, q, views):
        return False
    inflight_end_batch(q, iv, heads, n)
    return True


@kernel
def mark_burst(mem, q, views, iv, heads, n):
    """`inflight_mark` for heads[0:n], in order (a data path that popped with its own pop,
    right after it). False: the queue broke."""
    for k in range(n):
        if not inflight_mark(mem, q, views, iv, np.int64(heads[k])):
            return False
    return True
