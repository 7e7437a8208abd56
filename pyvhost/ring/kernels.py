"""Compiled split-ring primitives: the device side of virtio 1.x 2.7, for both metadata paths.

Every metadata accessor has the seed's shape: `if direct: plain load/store on the view, else:
translate the ring address through the region table, bounds-check, and copy byte by byte`.
The queue's flags slot says which path a round runs on, so both paths share one algorithm and
give identical results by construction.

Guest-controlled values are checked here by hand — numba does no bounds checking: every index
read from guest memory is compared with its table size before use, every address is translated
and its whole length checked against the regions. Integer discipline: all arithmetic is in
int64 (guest addresses at or above 2**63 are treated as unmapped), because numba turns mixed uint64/int64
arithmetic into floats.

Arguments shared by all kernels:
  mem    KernelMemory (pyvhost.memory.table): int64 arrays of region starts, sizes and host
         addresses, GPA order. The copy path reads and writes through the host addresses,
         which stay valid for the burst because unmapping waits for the grace period.
  q      int64[QSTATE_LEN] queue state (slots below); the kernels update it in place.
  views  (desc u64[2n], avail u16[n+3], used16 u16[2+4n+1], used32 u32[2n]): the direct map,
         plain integer views (see direct_map.py), zero-length on the copy path.
"""

from __future__ import annotations

import numpy as np

from pyvhost.memory.dirty_log import PAGE_SHIFT
from pyvhost.memory.table import (KM_BY_USER, KM_GPA_START, KM_HOST, KM_IOTLB, KM_LOG,
                                  KM_PERM, KM_RUN_GPA, KM_SIZE, KM_USER_START)
from pyvhost.ring.barriers import fence_acquire, fence_release, fence_seq_cst
from pyvhost.ring.hostmem import (atomic_or_u8, atomic_or_u64, load_u8, load_u16, load_u32,
                                  load_u64, popcount, prefetch, store_u8,
                                  store_u16, store_u32)
from pyvhost.ring.jit import inlined_kernel, kernel
from pyvhost.ring.errors import RingErrorCode as E

# -- queue state slots --
Q_SIZE = 0
Q_NEXT_AVAIL = 1        # free-running u16 (0..65535)
Q_NEXT_USED = 2         # free-running u16
Q_SIGNALLED_USED = 3    # used idx at the last interrupt decision (event idx)
Q_SIGNALLED_VALID = 4
Q_DESC = 5              # ring addresses: frontend user addresses
Q_AVAIL = 6
Q_USED = 7
Q_FLAGS = 8
Q_ERROR = 9
Q_ERROR_INFO = 10
Q_CHAINS = 11           # chains consumed (counter)
Q_NOTIFY_OFF = 12       # 1 while we asked the driver not to kick
Q_LOG_USED = 13         # GPA of the used ring for the dirty log (SET_VRING_ADDR log_guest_addr)
Q_LOG_PAGES = 14        # page bits this queue set in the dirty log (counter)
Q_LOG_DROPPED = 15      # pages written beyond the end of the log (counted, not logged)
Q_LOG_N = 16            # entries waiting in the log cache
Q_LOG_USED_LO = 17      # used-ring bytes [lo, hi) written since the last flush (offsets from
Q_LOG_USED_HI = 18      # the ring's start; hi <= lo: none), logged at Q_LOG_USED
Q_LOG_USED_FROM = 19    # used index from which used elements are not logged yet (free-running)
Q_LOG_CACHE = 20        # the log cache: (64-page word, page bits) pairs
LOG_CACHE_ENTRIES = 64  # a burst of 256 RX frames in packed 1.5 KiB buffers spans ~2 words
# Packed rings only (F_PACKED; packed_kernels.py says what they hold).
Q_AVAIL_WRAP = Q_LOG_CACHE + 2 * LOG_CACHE_ENTRIES
Q_USED_WRAP = Q_AVAIL_WRAP + 1
Q_BATCH_SLOT = Q_AVAIL_WRAP + 2
Q_BATCH_WORD = Q_AVAIL_WRAP + 3
# Device IOTLB (memory/iotlb.py): the last miss a kernel met, for the worker to report.
Q_MISS_ADDR = Q_AVAIL_WRAP + 4             # the IOVA not in the IOTLB
Q_MISS_PERM = Q_MISS_ADDR + 1              # the access wanted: 1 read, 2 write
Q_MISSES = Q_MISS_ADDR + 2                 # misses met (counter; every retry counts)
Q_IOTLB_HITS = Q_MISS_ADDR + 3             # buffers translated through the IOTLB (counter)
QSTATE_LEN = Q_MISS_ADDR + 4
# A packed queue's state array goes on with one slot per ring entry (qstate_len).
Q_CHAIN_SLOTS = QSTATE_LEN

F_EVENT_IDX = 1
F_INDIRECT = 2
F_DIRECT = 4
F_IN_ORDER = 8          # VIRTIO_F_IN_ORDER negotiated: buffers must be used in ring order (2.7.9)
F_LOG_USED = 16         # VHOST_VRING_F_LOG: log used-ring writes at Q_LOG_USED (while logging)
F_PACKED = 32           # VIRTIO_F_RING_PACKED: the primitives branch to packed_kernels


def qstate_len(size: int) -> int:
    """Length of a queue state array for a ring of `size` entries (either layout)."""
    return QSTATE_LEN + size

SPACE_GPA = 0
SPACE_USER = 1

ADDR_MAX = (1 << 63) - 1  # larger guest addresses are rejected as unmapped
U32_MAX = 0xFFFFFFFF

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1


# ---------------------------------------------------------------- translation (copy path) --

@inlined_kernel
def region_index(mem, space, addr):
    """Index of the region holding `addr` in `space`, or -1. Binary search."""
    if space == SPACE_GPA:
        starts = mem[KM_GPA_START]
        lo, hi = 0, starts.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if starts[mid] <= addr:
                lo = mid + 1
            else:
                hi = mid
        i = lo - 1
    else:
        order = mem[KM_BY_USER]
        starts = mem[KM_USER_START]
        lo, hi = 0, order.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if starts[order[mid]] <= addr:
                lo = mid + 1
            else:
                hi = mid
        i = order[lo - 1] if lo > 0 else -1
    if i < 0:
        return -1
    if addr - region_start(mem, space, i) < mem[KM_SIZE][i]:
        return i
    return -1


@inlined_kernel
def region_start(mem, space, i):
    return mem[KM_GPA_START][i] if space == SPACE_GPA else mem[KM_USER_START][i]


@inlined_kernel
def is_mapped(mem, space, addr, length):
    """True if all of [addr, addr+length) lies in regions (possibly several adjacent ones)."""
    if addr < 0 or length < 0 or addr > ADDR_MAX - length:
        return False
    cur = addr
    end = addr + length
    while cur < end:
        i = region_index(mem, space, cur)
        if i < 0:
            return False
        cur += mem[KM_SIZE][i] - (cur - region_start(mem, space, i))
    return True


@inlined_kernel
def buffer_access(mem, q, addr, length, write):
    """May the device read (write) the buffer [addr, addr+length)? 0: yes. -1: no, the queue
    is broken (q says why). 1 (device IOTLB only): an IOTLB miss at q[Q_MISS_ADDR] — nothing
    may be consumed; the worker asks the frontend and the burst is retried.

    Without an IOTLB, "mapped" is "inside the regions". With one, every byte must lie in an
    IOTLB run that grants the access: a run without it is a fault (a device write to a
    read-only IOVA breaks the queue), no run at all is a miss.
    """
    if mem[KM_IOTLB].shape[0] == 0:
        if is_mapped(mem, SPACE_GPA, addr, length):
            return 0
        fail(q, E.ADDR_UNMAPPED, addr if addr >= 0 else ADDR_MAX)
        return -1
    if addr < 0 or length < 0 or addr > ADDR_MAX - length:
        fail(q, E.ADDR_UNMAPPED, addr if addr >= 0 else ADDR_MAX)
        return -1
    need = 2 if write else 1
    cur = addr
    end = addr + length
    while cur < end:
        i = region_index(mem, SPACE_GPA, cur)
        if i < 0:
            q[Q_MISS_ADDR] = cur
            q[Q_MISS_PERM] = need
            q[Q_MISSES] += 1
            return 1
        if not (mem[KM_PERM][i] & need):
            fail(q, E.IOVA_NOT_WRITABLE if write else E.IOVA_NOT_READABLE, cur)
            return -1
        cur = mem[KM_GPA_START][i] + mem[KM_SIZE][i]
    q[Q_IOTLB_HITS] += 1
    return 0


@inlined_kernel
def host_span(mem, space, addr):
    """(host address of addr, bytes left in its region), or (0, 0) if unmapped."""
    i = region_index(mem, space, addr)
    if i < 0:
        return 0, 0
    off = addr - region_start(mem, space, i)
    return mem[KM_HOST][i] + off, mem[KM_SIZE][i] - off


@kernel
def load_bytes(mem, space, addr, n):
    """Little-endian load of n (<= 8) bytes, copied one at a time. Returns (value, ok).

    A naturally aligned 2- or 4-byte field inside one region (every ring field, 2.7) is read
    with one access instead, so a concurrent driver update is never seen torn.
    """
    host, left = host_span(mem, space, addr)
    if left >= n and host % n == 0:
        if n == 2:
            return np.int64(load_u16(host)), True
        if n == 4:
            return np.int64(load_u32(host)), True
    value = np.int64(0)
    k = 0
    while k < n:
        host, left = host_span(mem, space, addr + k)
        if left == 0:
            return 0, False
        while k < n and left > 0:
            value |= np.int64(load_u8(host)) << (8 * k)
            host += 1
            k += 1
            left -= 1
    return value, True


@kernel
def store_bytes(mem, space, addr, n, value):
    """Little-endian store of n (<= 4) bytes, one at a time. Returns ok.

    Aligned 2- and 4-byte ring fields in one region are written with one access (see
    load_bytes): a driver polling used->idx must never see it half written.
    """
    host, left = host_span(mem, space, addr)
    if left >= n and host % n == 0:
        if n == 2:
            store_u16(host, value & 0xFFFF)
            return True
        if n == 4:
            store_u32(host, value & 0xFFFFFFFF)
            return True
    k = 0
    while k < n:
        host, left = host_span(mem, space, addr + k)
        if left == 0:
            return False
        while k < n and left > 0:
            store_u8(host, (value >> (8 * k)) & 0xFF)
            host += 1
            k += 1
            left -= 1
    return True


@kernel
def copy_from_guest(mem, addr, out, n):
    """Copy n bytes at GPA addr into out[0:n]; False if any byte is unmapped."""
    done = 0
    while done < n:
        host, left = host_span(mem, SPACE_GPA, addr + done)
        if left == 0:
            return False
        take = min(n - done, left)
        for k in range(take):
            out[done + k] = load_u8(host + k)
        done += take
    return True


@kernel
def copy_to_guest(mem, addr, src, src_off, n):
    """Copy src[src_off:src_off+n] to GPA addr; False if any byte is unmapped."""
    done = 0
    while done < n:
        host, left = host_span(mem, SPACE_GPA, addr + done)
        if left == 0:
            return False
        take = min(n - done, left)
        for k in range(take):
            store_u8(host + k, src[src_off + done + k])
        done += take
    return True


def _fail(q, code, info):
    q[Q_ERROR] = code
    q[Q_ERROR_INFO] = info


fail = kernel(_fail)


# ------------------------------------------------------------------------- dirty log --

# The cache holds what the device wrote since the last flush as (word, bits) pairs: `word` is
# the index of a 64-bit word of the log (64 pages, 256 KiB of guest memory) and `bits` the pages
# of it written, so the frames of a burst — packed buffers, mostly in one or two words — cost
# an OR into the last entry each, and a flush sets each word's bits with one atomic OR.
# Used-ring writes are kept apart, or they would interleave with the buffers' words and defeat
# the merging: used elements are logged at the flush as the slots from Q_LOG_USED_FROM to
# next_used (nothing per element), the ring's other fields as one pending byte range.

@inlined_kernel
def log_write(mem, q, addr, length):
    """The device wrote [addr, addr+length), a device address (guest-physical, or an IOVA
    with a device IOTLB, translated here: the log is kept in guest-physical pages)."""
    if mem[KM_LOG].shape[0] == 0 or length <= 0:
        return
    if mem[KM_IOTLB].shape[0] == 0:
        log_write_gpa(mem, q, addr, length)
        return
    cur = addr
    end = addr + length
    while cur < end:
        i = region_index(mem, SPACE_GPA, cur)
        if i < 0:  # not reached: the write went through this very run
            return
        off = cur - mem[KM_GPA_START][i]
        take = min(end - cur, mem[KM_SIZE][i] - off)
        log_write_gpa(mem, q, mem[KM_RUN_GPA][i] + off, take)
        cur += take


@inlined_kernel
def log_write_gpa(mem, q, gpa, length):
    """The device wrote [gpa, gpa+length): remember its pages for the dirty log (nothing
    unless logging). Bits are set by log_flush, after a fence, never before the data."""
    if mem[KM_LOG].shape[0] == 0 or length <= 0:
        return
    log_cache_range(mem, q, gpa, length)


@inlined_kernel
def log_cache_range(mem, q, gpa, length):
    """Add the pages of [gpa, gpa+length) (length > 0) to the cache, a word at a time."""
    page = gpa >> PAGE_SHIFT
    last = (gpa + length - 1) >> PAGE_SHIFT
    while page <= last:
        word = page >> 6
        top = min(last, page | 63)  # the last page of this range in this word
        # Bits (page & 63) .. (top & 63); 2 << 63 is 0 in int64, so a whole word is -1.
        bits = ((np.int64(2) << (top - page)) - 1) << (page & 63)
        n = q[Q_LOG_N]
        if n > 0 and q[Q_LOG_CACHE + 2 * n - 2] == word:
            q[Q_LOG_CACHE + 2 * n - 1] |= bits
        else:
            if n == LOG_CACHE_ENTRIES:
                log_set_bits(mem, q)
                n = 0
            q[Q_LOG_CACHE + 2 * n] = word
            q[Q_LOG_CACHE + 2 * n + 1] = bits
            q[Q_LOG_N] = n + 1
        page = top + 1


@inlined_kernel
def log_set_bits(mem, q):
    """Set the bits of the cached words in the log, and empty the cache."""
    n = q[Q_LOG_N]
    if n == 0:
        return
    q[Q_LOG_N] = 0
    log = mem[KM_LOG]
    if log.shape[0] == 0:  # logging stopped since they were cached: nothing to tell
        return
    base = log[0]
    size = log[1]
    # The data stores must be visible before we look at a bit: a bit seen set may be
    # cleared by the frontend right after, and its page copied without our data.
    fence_seq_cst()
    for k in range(n):
        word = q[Q_LOG_CACHE + 2 * k]
        bits = q[Q_LOG_CACHE + 2 * k + 1]
        at = word << 3  # byte offset of the word in the log
        if base & 7 == 0 and at <= size - 8:
            q[Q_LOG_PAGES] += popcount(bits)
            # A bit already set needs no locked write (the frontend clears whole words).
            if (np.int64(load_u64(base + at)) & bits) != bits:
                atomic_or_u64(base + at, bits)
            continue
        for b in range(8):  # the log's tail, or a log not 8-byte aligned: byte by byte
            mask = (bits >> (8 * b)) & 0xFF
            if mask == 0:
                continue
            if at + b >= size:
                q[Q_LOG_DROPPED] += popcount(mask)
                continue
            q[Q_LOG_PAGES] += popcount(mask)
            if (load_u8(base + at + b) & mask) != mask:
                atomic_or_u8(base + at + b, mask)


@inlined_kernel
def log_flush(mem, q):
    """Set the bits of every page written since the last flush (before used->idx is
    published, and before any entry point returns with pages cached)."""
    log_used_elems(mem, q)
    lo = q[Q_LOG_USED_LO]
    hi = q[Q_LOG_USED_HI]
    if hi > lo:
        q[Q_LOG_USED_HI] = lo
        if mem[KM_LOG].shape[0] != 0:
            log_write(mem, q, q[Q_LOG_USED] + lo, hi - lo)  # an IOVA with a device IOTLB
    log_set_bits(mem, q)


@inlined_kernel
def log_used_elems(mem, q):
    """The used elements written since the last flush — slots Q_LOG_USED_FROM .. next_used,
    adjacent but for the ring's wrap — as used-ring ranges (nothing when not logging). A
    split ring's: packed used descriptors are logged as they are written (log_desc)."""
    first = q[Q_LOG_USED_FROM]
    end = q[Q_NEXT_USED]
    q[Q_LOG_USED_FROM] = end
    n = (end - first) & 0xFFFF
    size = q[Q_SIZE]
    if n == 0 or size <= 0 or q[Q_FLAGS] & F_PACKED:
        return
    n = min(n, size)  # never more than the whole ring (Python moved next_used: start, reset)
    slot = first & (size - 1)
    head = min(n, size - slot)
    log_used(mem, q, 4 + 8 * slot, 8 * head)
    if n > head:  # wrapped to slot 0
        log_used(mem, q, 4, 8 * (n - head))


@inlined_kernel
def log_used(mem, q, offset, length):
    """A used-ring write at `offset`, logged at the ring's log_guest_addr (VHOST_VRING_F_LOG).
    Writes that touch or overlap the pending range extend it; any other (the ring wrapped,
    or used->idx after the elements) sends the range to the cache and starts a new one."""
    if not (q[Q_FLAGS] & F_LOG_USED) or mem[KM_LOG].shape[0] == 0:
        return
    end = offset + length
    lo = q[Q_LOG_USED_LO]
    hi = q[Q_LOG_USED_HI]
    if hi > lo and offset <= hi and end >= lo:
        q[Q_LOG_USED_LO] = min(lo, offset)
        q[Q_LOG_USED_HI] = max(hi, end)
        return
    if hi > lo:
        log_write(mem, q, q[Q_LOG_USED] + lo, hi - lo)
    q[Q_LOG_USED_LO] = offset
    q[Q_LOG_USED_HI] = end


@kernel
def log_ranges(mem, q, gpas, lens, n):
    """log_write_gpa for n guest-physical ranges the device wrote from Python
    (pyvhost.Request), then log_flush. Called where the queue's kernels run (its worker, or the
    protocol thread with the ring stopped): the cache in q is theirs."""
    for k in range(n):
        log_write_gpa(mem, q, gpas[k], lens[k])
    log_flush(mem, q)


@kernel
def flush_log(mem, q):
    """log_flush as an entry point (Python callers)."""
    log_flush(mem, q)


# ------------------------------------------------------------- metadata accessors (both) --

@inlined_kernel
def read_avail_idx(mem, q, views):
    if q[Q_FLAGS] & F_DIRECT:
        return np.int64(views[1][1]), True
    return load_bytes(mem, SPACE_USER, q[Q_AVAIL] + 2, 2)


@inlined_kernel
def read_avail_flags(mem, q, views):
    if q[Q_FLAGS] & F_DIRECT:
        return np.int64(views[1][0]), True
    return load_bytes(mem, SPACE_USER, q[Q_AVAIL], 2)


@inlined_kernel
def read_avail_slot(mem, q, views, slot):
    if q[Q_FLAGS] & F_DIRECT:
        return np.int64(views[1][2 + slot]), True
    return load_bytes(mem, SPACE_USER, q[Q_AVAIL] + 4 + 2 * slot, 2)


@inlined_kernel
def read_used_event(mem, q, views):
    size = q[Q_SIZE]
    if q[Q_FLAGS] & F_DIRECT:
        return np.int64(views[1][2 + size]), True
    return load_bytes(mem, SPACE_USER, q[Q_AVAIL] + 4 + 2 * size, 2)


@inlined_kernel
def read_ring_desc(mem, q, views, i):
    """Descriptor i of the queue's own table: (addr, len, flags, next, ok)."""
    if q[Q_FLAGS] & F_DIRECT:
        addr = views[0][2 * i]
        # len | flags << 32 | next << 48, as little-endian u32, u16, u16 make it.
        word = views[0][2 * i + 1]
        length = np.int64(word & np.uint64(0xFFFFFFFF))
        flags = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
        nxt = np.int64(word >> np.uint64(48))
        if addr > np.uint64(ADDR_MAX):
            return -1, length, flags, nxt, True  # -1: caught as unmapped by the caller
        return np.int64(addr), length, flags, nxt, True
    return read_table_desc(mem, SPACE_USER, q[Q_DESC], i)


@kernel
def read_table_desc(mem, space, table, i):
    """Descriptor i of a table at `table` in `space`, by translated copy."""
    base = table + 16 * i
    lo, ok0 = load_bytes(mem, space, base, 4)
    hi, ok1 = load_bytes(mem, space, base + 4, 4)
    ln, ok2 = load_bytes(mem, space, base + 8, 4)
    fl, ok3 = load_bytes(mem, space, base + 12, 2)
    nx, ok4 = load_bytes(mem, space, base + 14, 2)
    if not (ok0 and ok1 and ok2 and ok3 and ok4):
        return 0, 0, 0, 0, False
    if hi >= 0x80000000:
        return -1, ln, fl, nx, True
    return (hi << 32) | lo, ln, fl, nx, True


@inlined_kernel
def write_used_elem(mem, q, views, slot, head, length):
    # Logged by the next log_flush (log_used_elems), after the store, before used->idx.
    if q[Q_FLAGS] & F_DIRECT:
        views[3][2 * slot] = head
        views[3][2 * slot + 1] = length
        return True
    base = q[Q_USED] + 4 + 8 * slot
    return store_bytes(mem, SPACE_USER, base, 4, head) and \
        store_bytes(mem, SPACE_USER, base + 4, 4, length)


@inlined_kernel
def write_used_idx(mem, q, views, idx):
    if q[Q_FLAGS] & F_DIRECT:
        views[2][1] = idx
        ok = True
    else:
        ok = store_bytes(mem, SPACE_USER, q[Q_USED] + 2, 2, idx)
    log_used(mem, q, 2, 2)
    log_flush(mem, q)
    return ok


@inlined_kernel
def write_used_flags(mem, q, views, flags):
    if q[Q_FLAGS] & F_DIRECT:
        views[2][0] = flags
        ok = True
    else:
        ok = store_bytes(mem, SPACE_USER, q[Q_USED], 2, flags)
    log_used(mem, q, 0, 2)
    log_flush(mem, q)
    return ok


@inlined_kernel
def write_avail_event(mem, q, views, idx):
    size = q[Q_SIZE]
    if q[Q_FLAGS] & F_DIRECT:
        views[2][2 + 4 * size] = idx
        ok = True
    else:
        ok = store_bytes(mem, SPACE_USER, q[Q_USED] + 4 + 8 * size, 2, idx)
    log_used(mem, q, 4 + 8 * size, 2)
    log_flush(mem, q)
    return ok


# ------------------------------------------------------------------------ the algorithm --

@inlined_kernel
def avail_count(mem, q, views):
    """Chains the driver has made available past next_avail; -1 (queue broken) on bad input."""
    if q[Q_FLAGS] & F_PACKED:
        return P.avail_count(mem, q, views)
    idx, ok = read_avail_idx(mem, q, views)
    if not ok:
        fail(q, E.RING_UNMAPPED, q[Q_AVAIL])
        return -1
    n = (idx - q[Q_NEXT_AVAIL]) & 0xFFFF
    if n > q[Q_SIZE]:
        fail(q, E.AVAIL_IDX_JUMP, idx)
        return -1
    # Read the ring entries only after avail->idx (2.7.13.3.1 on the driver side pairs with it).
    fence_acquire()
    return n


@inlined_kernel
def pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, seg_pos):
    """Walk the chain at avail slot next_avail into the segment arrays from seg_pos.

    Returns (head, new_seg_pos, total_len). head == -1: the queue is broken (q[Q_ERROR] set);
    head == -2: the segment arrays are full (nothing consumed, try again with room);
    head == -3: an IOTLB miss (nothing consumed; retry once the frontend sent the entry).
    """
    if q[Q_FLAGS] & F_PACKED:
        return P.pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, seg_pos)
    size = q[Q_SIZE]
    slot = q[Q_NEXT_AVAIL] & (size - 1)
    head, ok = read_avail_slot(mem, q, views, slot)
    if not ok:
        fail(q, E.RING_UNMAPPED, q[Q_AVAIL])
        return -1, seg_pos, 0
    if head >= size:
        fail(q, E.HEAD_OUT_OF_RANGE, head)
        return -1, seg_pos, 0
    head, pos, total = walk_chain(mem, q, views, head, seg_addr, seg_len, seg_flags, seg_pos)
    if head >= 0:
        q[Q_NEXT_AVAIL] = (q[Q_NEXT_AVAIL] + 1) & 0xFFFF
        q[Q_CHAINS] += 1
    return head, pos, total


@inlined_kernel
def walk_chain(mem, q, views, head, seg_addr, seg_len, seg_flags, seg_pos):
    """Walk the chain whose head descriptor is `head` (0 <= head < size, checked by the caller)
    into the segment arrays from seg_pos, checking every descriptor; pop_chain's returns.
    The avail ring is not touched (inflight resubmission walks heads it took earlier)."""
    size = q[Q_SIZE]
    cap = seg_addr.shape[0]
    pos = seg_pos
    total = 0
    seen_write = False
    indirect = False
    table = 0
    table_len = size
    i = head
    walked = 0
    while True:
        if indirect:
            addr, length, flags, nxt, ok = read_table_desc(mem, SPACE_GPA, table, i)
            if not ok:
                fail(q, E.ADDR_UNMAPPED, table)
                return -1, seg_pos, 0
        else:
            addr, length, flags, nxt, ok = read_ring_desc(mem, q, views, i)
            if not ok:
                fail(q, E.RING_UNMAPPED, q[Q_DESC])
                return -1, seg_pos, 0
        walked += 1
        if walked > table_len:
            fail(q, E.CHAIN_TOO_LONG, head)
            return -1, seg_pos, 0
        if flags & VIRTQ_DESC_F_INDIRECT:
            if indirect:
                fail(q, E.NESTED_INDIRECT, i)
                return -1, seg_pos, 0
            if not (q[Q_FLAGS] & F_INDIRECT):
                fail(q, E.INDIRECT_NOT_NEGOTIATED, i)
                return -1, seg_pos, 0
            if flags & VIRTQ_DESC_F_NEXT:
                fail(q, E.INDIRECT_WITH_NEXT, i)
                return -1, seg_pos, 0
            if length == 0 or length % 16 != 0:
                fail(q, E.INDIRECT_BAD_LEN, length)
                return -1, seg_pos, 0
            access = buffer_access(mem, q, addr, length, False)
            if access != 0:
                return (-3 if access == 1 else -1), seg_pos, 0
            indirect = True
            table = addr
            table_len = length // 16
            i = 0
            walked = 0
            continue
        if flags & VIRTQ_DESC_F_WRITE:
            seen_write = True
        elif seen_write:
            fail(q, E.READ_AFTER_WRITE, head)
            return -1, seg_pos, 0
        access = buffer_access(mem, q, addr, length, (flags & VIRTQ_DESC_F_WRITE) != 0)
        if access != 0:
            return (-3 if access == 1 else -1), seg_pos, 0
        total += length
        if total > U32_MAX:
            fail(q, E.LEN_OVERFLOW, head)
            return -1, seg_pos, 0
        if pos >= cap:
            return -2, seg_pos, 0
        seg_addr[pos] = addr
        seg_len[pos] = length
        seg_flags[pos] = flags & VIRTQ_DESC_F_WRITE
        pos += 1
        if not (flags & VIRTQ_DESC_F_NEXT):
            break
        if nxt >= table_len:
            fail(q, E.NEXT_OUT_OF_RANGE, nxt)
            return -1, seg_pos, 0
        i = nxt
    return head, pos, total


@inlined_kernel
def pop_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len, seg_flags):
    """Pop up to max_chains chains. Chain k's segments are [chain_end[k-1], chain_end[k]).

    Returns the number popped, or -1 if the queue broke (chains popped before that are lost to
    the device; a broken queue needs a reset anyway).
    """
    if q[Q_ERROR] != 0:
        return -1
    n = avail_count(mem, q, views)
    if n < 0:
        return -1
    return pop_chains(mem, q, views, min(n, max_chains), 0, heads, chain_end, seg_addr, seg_len,
                      seg_flags)


@inlined_kernel
def pop_burst_hosts(mem, q, views, max_chains, min_len, first_read, heads, chain_end, seg_addr,
                    seg_len, seg_flags, hosts):
    """pop_burst, and the host address of every chain the direct map's fast path took
    (`pop_simple_direct`: one readable buffer of min_len bytes or more) in hosts[k], else 0.
    The chains and segments are the same as pop_burst's on either path."""
    if q[Q_ERROR] != 0:
        return -1
    if q[Q_FLAGS] & F_PACKED and q[Q_FLAGS] & F_DIRECT:
        # A packed ring's fast path tests each descriptor's flags itself: the ring is scanned
        # (avail_count) only for the chains it leaves.
        n = min(max_chains, hosts.shape[0])
        done = pop_simple_direct(mem, q, views, n, min_len, first_read, heads, chain_end,
                                 seg_addr, seg_len, seg_flags, hosts)
        if done == n:
            return done
        more = avail_count(mem, q, views)
        if more < 0:
            return -1
        n = min(n, done + more)
    else:
        n = avail_count(mem, q, views)
        if n < 0:
            return -1
        n = min(n, max_chains, hosts.shape[0])
        done = 0
        if q[Q_FLAGS] & F_DIRECT:
            done = pop_simple_direct(mem, q, views, n, min_len, first_read, heads, chain_end,
                                     seg_addr, seg_len, seg_flags, hosts)
    popped = pop_chains(mem, q, views, n, done, heads, chain_end, seg_addr, seg_len, seg_flags)
    if popped > done:
        hosts[done:popped] = 0
    return popped


@inlined_kernel
def pop_chains(mem, q, views, n, k, heads, chain_end, seg_addr, seg_len, seg_flags):
    """Pop chains k .. n-1 of a burst (0 .. k-1 are popped; their segments end at
    chain_end[k-1]). n <= avail_count(). Returns the chains popped in all, or -1 (broken)."""
    n = min(n, heads.shape[0], chain_end.shape[0])
    pos = chain_end[k - 1] if k > 0 else 0
    while k < n:
        head, pos2, _ = pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, pos)
        if head == -1:
            return -1
        if head == -3:  # an IOTLB miss: the burst ends before this chain
            return k
        if head == -2:
            if k == 0:
                fail(q, E.CHAIN_TOO_LONG, -1)
                return -1
            return k
        heads[k] = head
        chain_end[k] = pos2
        pos = pos2
        k += 1
    return k


@inlined_kernel
def pop_simple_direct(mem, q, views, n, min_len, first_read, heads, chain_end, seg_addr,
                      seg_len, seg_flags, hosts):
    """The direct map's fast path: pop up to n chains that are each one device-readable
    descriptor of min_len bytes or more inside one region, recording them as pop_chain does
    plus the buffer's host address, and start loading the cache line at offset first_read
    (< min_len) of it: the driver's core has just written it, and a burst's misses overlap
    instead of adding up.

    It stops, consuming nothing more, at the first chain that is anything else — more than one
    descriptor, writable, indirect, short, unmapped, a head out of range — which the caller
    then pops with pop_chain, whose checks report whatever is wrong with it: both paths accept
    exactly the same chains. The caller has F_DIRECT set and n <= avail_count() (after its
    acquire fence). Returns the number popped; q's next_avail and chain count follow.
    """
    if q[Q_FLAGS] & F_PACKED:
        return P.pop_simple_direct(mem, q, views, n, min_len, first_read, heads, chain_end,
                                   seg_addr, seg_len, seg_flags, hosts)
    n = min(n, heads.shape[0], chain_end.shape[0], seg_addr.shape[0], seg_len.shape[0],
            seg_flags.shape[0], hosts.shape[0])
    if mem[KM_GPA_START].shape[0] == 0:
        return 0
    size = q[Q_SIZE]
    next_avail = q[Q_NEXT_AVAIL]
    r = 0  # the region of the last buffer: consecutive buffers mostly share one
    k = 0
    while k < n:
        head, _ok = read_avail_slot(mem, q, views, next_avail & (size - 1))
        if head >= size:
            break
        host, addr, length, r = lone_desc_direct(mem, q, views, head, 0, min_len, r)
        if host == 0:
            break
        prefetch(host + first_read)
        heads[k] = head
        chain_end[k] = k + 1
        seg_addr[k] = addr
        seg_len[k] = length
        seg_flags[k] = 0
        hosts[k] = host
        next_avail = (next_avail + 1) & 0xFFFF
        k += 1
    q[Q_NEXT_AVAIL] = next_avail
    q[Q_CHAINS] += k
    return k


@inlined_kernel
def lone_desc_direct(mem, q, views, head, flags_wanted, min_len, r):
    """Descriptor `head` (< queue size) of the direct map, if it is a chain of its own whose
    flags are exactly flags_wanted (0: readable, VIRTQ_DESC_F_WRITE: writable) and whose
    min_len or more bytes lie inside one region (region r is tried first, then the search).
    Returns (host address, GPA, length, region), or host 0 when it is anything else."""
    gpa_start = mem[KM_GPA_START]
    region_size = mem[KM_SIZE]
    addr, length, flags, _nxt, _ok = read_ring_desc(mem, q, views, head)
    if flags != flags_wanted or addr < 0 or length < min_len:
        return 0, 0, 0, r
    off = addr - gpa_start[r]
    if off < 0 or off >= region_size[r] or length > region_size[r] - off:
        r2 = region_index(mem, SPACE_GPA, addr)
        if r2 < 0:
            return 0, 0, 0, r
        off = addr - gpa_start[r2]
        if length > region_size[r2] - off:
            return 0, 0, 0, r
        r = r2
    if mem[KM_IOTLB].shape[0] != 0:  # an IOTLB run: it must grant the access
        if not (mem[KM_PERM][r] & (2 if flags_wanted & VIRTQ_DESC_F_WRITE else 1)):
            return 0, 0, 0, r
        q[Q_IOTLB_HITS] += 1
    return mem[KM_HOST][r] + off, addr, length, r


@inlined_kernel
def pop_lone_writable_direct(mem, q, views, min_len):
    """The receive side of the direct map's fast path: the next chain, if it is one writable
    descriptor of min_len bytes or more inside one region, is popped (as pop_chain would pop
    it). Returns (head, host address), or head -1 having consumed nothing (take pop_chain,
    whose checks report whatever is wrong). The caller has F_DIRECT set and avail_count() > 0.
    Returns (head, host address, guest-physical address).
    """
    if q[Q_FLAGS] & F_PACKED:
        return P.pop_lone_writable_direct(mem, q, views, min_len)
    if mem[KM_GPA_START].shape[0] == 0:
        return -1, 0, 0
    size = q[Q_SIZE]
    head, _ok = read_avail_slot(mem, q, views, q[Q_NEXT_AVAIL] & (size - 1))
    if head >= size:
        return -1, 0, 0
    host, addr, _length, _r = lone_desc_direct(mem, q, views, head, VIRTQ_DESC_F_WRITE,
                                               min_len, 0)
    if host == 0:
        return -1, 0, 0
    q[Q_NEXT_AVAIL] = (q[Q_NEXT_AVAIL] + 1) & 0xFFFF
    q[Q_CHAINS] += 1
    return head, host, addr


@inlined_kernel
def rearm_past_avail(mem, q, views):
    """The chains available are too few for what the device must place (popped ones given
    back with `rewind`): with EVENT_IDX, ask for a kick at the driver's next refill beyond the
    avail index seen now, then look once more (the refill may have come before the event was
    visible). Setting avail_event to next_avail instead would miss that kick when buffers were
    available but too few (as Linux vhost_enable_notify). Returns the chains available, or -1
    if the queue broke."""
    if q[Q_FLAGS] & F_PACKED:
        return P.rearm_past_avail(mem, q, views)
    if not (q[Q_FLAGS] & F_EVENT_IDX):
        return 0
    idx, ok = read_avail_idx(mem, q, views)
    if not ok:
        return 0
    write_avail_event(mem, q, views, idx)
    fence_seq_cst()
    return avail_count(mem, q, views)


@kernel
def rewind(q, n):
    """Give back the last n popped chains: the driver cannot tell, since the device only read
    them (virtqueue "unpop", as libvhost-user's vu_queue_rewind)."""
    if q[Q_FLAGS] & F_PACKED:
        P.rewind(q, n)
        return
    q[Q_NEXT_AVAIL] = (q[Q_NEXT_AVAIL] - n) & 0xFFFF
    q[Q_CHAINS] -= n


@inlined_kernel
def add_used(mem, q, views, head, length):
    """Write one used element at next_used (not yet published)."""
    if q[Q_FLAGS] & F_PACKED:
        return P.add_used(mem, q, views, head, length)
    size = q[Q_SIZE]
    if head < 0 or head >= size:
        fail(q, E.USED_ID_OUT_OF_RANGE, head)
        return False
    if not write_used_elem(mem, q, views, q[Q_NEXT_USED] & (size - 1), head, length):
        fail(q, E.RING_UNMAPPED, q[Q_USED])
        return False
    q[Q_NEXT_USED] = (q[Q_NEXT_USED] + 1) & 0xFFFF
    return True


@inlined_kernel
def publish_used(mem, q, views):
    """Make the written used elements visible: used->idx after the elements (2.7.8). While
    logging, the bits of every page written so far are set first (DPDK syncs its log cache
    there too), and used->idx's own after it."""
    if q[Q_FLAGS] & F_PACKED:
        return P.publish_used(mem, q, views)
    log_flush(mem, q)
    fence_release()
    if not write_used_idx(mem, q, views, q[Q_NEXT_USED]):
        fail(q, E.RING_UNMAPPED, q[Q_USED])
        return False
    return True


@inlined_kernel
def needs_interrupt(mem, q, views):
    """Should the device notify the driver now? (2.7.10, vring_need_event; Linux vhost_notify)."""
    if q[Q_FLAGS] & F_PACKED:
        return P.needs_interrupt(mem, q, views)
    # used->idx must be globally visible before we read the driver's suppression state,
    # or both sides can decide the other will act (a lost interrupt).
    fence_seq_cst()
    if not (q[Q_FLAGS] & F_EVENT_IDX):
        flags, ok = read_avail_flags(mem, q, views)
        return ok and not (flags & VRING_AVAIL_F_NO_INTERRUPT)
    old = q[Q_SIGNALLED_USED]
    valid = q[Q_SIGNALLED_VALID]
    new = q[Q_NEXT_USED]
    q[Q_SIGNALLED_USED] = new
    q[Q_SIGNALLED_VALID] = 1
    event, ok = read_used_event(mem, q, views)
    if not ok:
        return False
    if not valid:
        return True
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@kernel
def disable_notification(mem, q, views):
    """Ask the driver not to kick (we are polling). With event idx: leave avail_event behind."""
    if q[Q_FLAGS] & F_PACKED:
        P.disable_notification(mem, q, views)
        return
    q[Q_NOTIFY_OFF] = 1
    if not (q[Q_FLAGS] & F_EVENT_IDX):
        write_used_flags(mem, q, views, VRING_USED_F_NO_NOTIFY)


@kernel
def enable_notification(mem, q, views):
    """Ask for kicks again; True if buffers arrived meanwhile (then keep polling: 2.7.10)."""
    if q[Q_FLAGS] & F_PACKED:
        return P.enable_notification(mem, q, views)
    q[Q_NOTIFY_OFF] = 0
    if q[Q_FLAGS] & F_EVENT_IDX:
        write_avail_event(mem, q, views, q[Q_NEXT_AVAIL])
    else:
        write_used_flags(mem, q, views, 0)
    # The flag/event store must be visible before we look at avail->idx again.
    fence_seq_cst()
    idx, ok = read_avail_idx(mem, q, views)
    return ok and idx != q[Q_NEXT_AVAIL]


@inlined_kernel
def push_used_burst(mem, q, views, heads, lens, n):
    """Add n used elements, publish once, and return whether to interrupt (-1: broken)."""
    for k in range(n):
        if not add_used(mem, q, views, np.int64(heads[k]), np.int64(lens[k])):
            return -1
    if n == 0:
        return 0
    if not publish_used(mem, q, views):
        return -1
    return 1 if needs_interrupt(mem, q, views) else 0


# The packed ring's primitives, which those above branch to (they use this module's helpers).
from pyvhost.ring import packed_kernels as P  # noqa: E402
