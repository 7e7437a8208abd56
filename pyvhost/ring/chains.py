"""Popped chains as host pieces: what the Python device tier (`pyvhost.Request`) reads and writes.

`pop_requests` pops a burst of chains and translates every buffer into *pieces*: region index
(in the table's GPA order; with a device IOTLB, the IOTLB run's index), offset in it, host address, guest-physical address and
length, each piece inside one region (a buffer that spans regions
becomes several pieces). Per chain k it records where its pieces end (`piece_end[k]`; chain k
has pieces [piece_end[k-1], piece_end[k])), its first writable piece, and its readable and
writable byte counts. Python then reads and writes guest buffers at those host addresses with
no translation per access.

Why the host addresses stay valid: for a request handled inside the burst, the worker's epoch
keeps the table mapped (a writer waits for the grace period before unmapping); for a deferred
request, the table is pinned (`RegionTable.pin`) until the request completes.

Every guest-controlled value is checked by `pop_chain` (ring/kernels.py) before it lands here;
this kernel adds only the translation, which cannot fail for a chain pop_chain accepted in the
same table, and a bound on pieces: a chain whose pieces do not fit the arrays is given back
(and the burst ends there), or breaks the queue if it is alone (it could never be served).
"""

from __future__ import annotations

import numpy as np

from pyvhost.memory.table import KM_GPA_START, KM_HOST, KM_IOTLB, KM_RUN_GPA, KM_SIZE
from pyvhost.ring import kernels as K
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.inflight import (NO_INFLIGHT, InflightViews, inflight_mark,
                                   inflight_resubmit_pending, inflight_take_resubmit,
                                   inflight_walk_resubmit)
from pyvhost.ring.jit import inlined_kernel


class ChainScratch:
    """Arrays one queue's `pop_requests` fills, allocated once per queue size and reused."""

    def __init__(self, max_chains: int, queue_size: int) -> None:
        self.max_chains = max_chains
        self.heads = np.zeros(max_chains, dtype=np.int64)
        self.piece_end = np.zeros(max_chains, dtype=np.int64)
        self.first_writable = np.zeros(max_chains, dtype=np.int64)
        self.readable = np.zeros(max_chains, dtype=np.int64)
        self.writable = np.zeros(max_chains, dtype=np.int64)
        # One chain's buffers (pop_chain walks one chain at a time into these): a chain has at
        # most queue_size descriptors, or one indirect table's worth.
        segs = max(queue_size, 1) + 4096
        self.seg_addr = np.zeros(segs, dtype=np.int64)
        self.seg_len = np.zeros(segs, dtype=np.int64)
        self.seg_flags = np.zeros(segs, dtype=np.int64)
        pieces = 2 * segs + 4 * max_chains
        self.piece_region = np.zeros(pieces, dtype=np.int64)
        self.piece_offset = np.zeros(pieces, dtype=np.int64)
        self.piece_host = np.zeros(pieces, dtype=np.int64)
        self.piece_gpa = np.zeros(pieces, dtype=np.int64)
        self.piece_len = np.zeros(pieces, dtype=np.int64)

    def pop(self, mem: tuple, q: np.ndarray, views: tuple, max_chains: int,
            iv: InflightViews = NO_INFLIGHT) -> int:
        return int(pop_requests(mem, q, views, iv, min(max_chains, self.max_chains), self.heads,
                                self.piece_end, self.first_writable, self.readable,
                                self.writable, self.seg_addr, self.seg_len, self.seg_flags,
                                self.piece_region, self.piece_offset, self.piece_host,
                                self.piece_gpa, self.piece_len))


@inlined_kernel  # into blk's burst, called a chain at a time: ~130 words of arguments each
def pop_requests(mem, q, views, iv, max_chains, heads, piece_end, first_writable, readable,
                 writable, seg_addr, seg_len, seg_flags, piece_region, piece_offset, piece_host,
                 piece_gpa, piece_len):
    """Pop up to max_chains chains into host pieces. Returns the chains popped, or -1 if the
    queue broke (q[Q_ERROR] says why). On a ring with inflight tracking (`iv`, ring/inflight.py)
    the heads to resubmit come first, and every chain taken from the avail ring is marked in
    flight as it is accepted. An IOTLB miss ends the burst before its chain."""
    if q[K.Q_ERROR] != 0:
        return -1
    n = K.avail_count(mem, q, views)
    if n < 0:
        return -1
    n = min(n + inflight_resubmit_pending(iv), max_chains, heads.shape[0])
    cap = piece_host.shape[0]
    iotlb = mem[KM_IOTLB].shape[0] != 0
    pos = 0
    for k in range(n):
        resubmitted = inflight_resubmit_pending(iv) > 0
        if resubmitted:
            head, nseg, _ = inflight_walk_resubmit(mem, q, views, iv, seg_addr, seg_len,
                                                   seg_flags, 0)
        else:
            head, nseg, _ = K.pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, 0)
        if head == -1:
            return -1
        if head == -3:
            return k
        if head == -2:
            K.fail(q, E.CHAIN_TOO_LONG, -1)
            return -1
        first_w = -1
        rbytes = 0
        wbytes = 0
        fits = True
        for s in range(nseg):
            addr = seg_addr[s]
            left = seg_len[s]
            if seg_flags[s]:
                if first_w < 0:
                    first_w = pos
                wbytes += left
            else:
                rbytes += left
            while left > 0:
                i = K.region_index(mem, K.SPACE_GPA, addr)
                if i < 0:  # pop_chain checked it in this very table: not reached
                    K.fail(q, E.ADDR_UNMAPPED, addr)
                    return -1
                off = addr - mem[KM_GPA_START][i]
                span = mem[KM_SIZE][i] - off
                if pos >= cap:
                    fits = False
                    break
                take = min(left, span)
                piece_region[pos] = i
                piece_offset[pos] = off
                piece_host[pos] = mem[KM_HOST][i] + off
                # Guest-physical (the dirty log's pages), also through an IOTLB run.
                piece_gpa[pos] = mem[KM_RUN_GPA][i] + off if iotlb else addr
                piece_len[pos] = take
                pos += 1
                addr += take
                left -= take
            if not fits:
                break
        if not fits:
            if k == 0:
                K.fail(q, E.CHAIN_TOO_LONG, head)
                return -1
            if not resubmitted:  # a resubmitted head is simply taken next time
                K.rewind(q, 1)
            return k
        if resubmitted:
            inflight_take_resubmit(iv)
        elif not inflight_mark(mem, q, views, iv, head):
            return -1
        heads[k] = head
        piece_end[k] = pos
        first_writable[k] = first_w if first_w >= 0 else pos
        readable[k] = rbytes
        writable[k] = wbytes
    return n
