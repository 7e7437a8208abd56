"""Compiled packed-ring primitives: the device side of virtio 1.1's packed virtqueue (2.8 in
1.2+), for both metadata paths.

The ring primitives of `kernels.py` (avail_count, pop_chain, add_used, publish_used,
needs_interrupt, the notification switches, rewind and the direct map's fast paths) branch
here when the queue's flags say F_PACKED, so every device — net's compiled kernels, the Python
request tier — runs on either layout unchanged. The accessors have the same shape as split's:
a plain load/store on the direct map's views, else a translated, bounds-checked copy.

State, in the queue's `q` (kernels.py slots):
  Q_NEXT_AVAIL, Q_AVAIL_WRAP  the next descriptor the device looks at, and the driver wrap
                              counter it must show to be available (both start at 0, 1)
  Q_NEXT_USED, Q_USED_WRAP    where the next used descriptor goes, and the device's counter
  Q_BATCH_SLOT, Q_BATCH_WORD  the first used descriptor of the batch not yet published: its
                              flags are stored last, by publish_used, so the driver sees the
                              whole batch at once (as DPDK's flush_shadow_packed)
  Q_CHAIN_SLOTS + i           ring slots of the chain that ended at slot i (for rewind)
Positions are in 0 .. size-1; wrapping compares and subtracts (never masks), since a packed
queue's size need not be a power of two.

The "head" a pop returns, and add_used takes back, is a token: the chain's buffer ID (its last
descriptor's id field, 2.8.6) | the ring slots it took << 16 (used descriptors advance the
driver's used position by the chain's slots: Linux virtqueue_get_buf_ctx_packed). Both are
checked again when the token comes back.

Direct map views (`packed_queue.build_packed_direct_map`): views[0] the descriptor ring as
uint64 pairs (addr, len | id << 32 | flags << 48), views[1] the driver event suppression area
and views[2] the device's, each uint16[2] (off_wrap, flags); views[3] is empty.

Every guest-controlled value is checked: a chain is at most a ring of descriptors, all of them
available; an indirect table's length is a non-zero multiple of 16 and mapped, it takes the
chain alone (no NEXT into or out of it); buffers are mapped; lengths fit in 32 bits.
"""

from __future__ import annotations

import numpy as np

from pyvhost.memory.table import KM_GPA_START, KM_HOST, KM_LOG, KM_SIZE, KM_USER_START
from pyvhost.ring import kernels as K
from pyvhost.ring.barriers import fence_acquire, fence_release, fence_seq_cst
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.hostmem import prefetch
from pyvhost.ring.jit import inlined_kernel, kernel

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
# avail_count looks at most this many chains ahead: callers use it as a bound for a burst
# (and call it again when it is used up); scanning a whole full ring per burst costs more.
COUNT_MAX = 128


# ------------------------------------------------------------------------ accessors --

@inlined_kernel
def desc_available(flags, wrap):
    return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) != wrap


@inlined_kernel
def read_flags(mem, q, views, i):
    """Flags of ring descriptor i (< size): (flags, ok). One load."""
    if q[K.Q_FLAGS] & K.F_DIRECT:
        return np.int64(views[0][2 * i + 1] >> np.uint64(48)), True
    return K.load_bytes(mem, K.SPACE_USER, q[K.Q_DESC] + 16 * i + 14, 2)


@inlined_kernel
def read_desc(mem, q, views, i):
    """Ring descriptor i: (addr, len, id, flags, ok), the flags loaded first and the rest
    after an acquire fence (the driver stores them before the flags). addr -1: at or above
    2**63 (the callers report it as unmapped)."""
    if q[K.Q_FLAGS] & K.F_DIRECT:
        word = views[0][2 * i + 1]  # len | id << 32 | flags << 48: one load
        fence_acquire()
        addr = views[0][2 * i]
        length = np.int64(word & np.uint64(0xFFFFFFFF))
        ident = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
        flags = np.int64(word >> np.uint64(48))
        if addr > np.uint64(K.ADDR_MAX):
            return -1, length, ident, flags, True
        return np.int64(addr), length, ident, flags, True
    base = q[K.Q_DESC] + 16 * i
    fl, ok3 = K.load_bytes(mem, K.SPACE_USER, base + 14, 2)
    fence_acquire()
    lo, ok0 = K.load_bytes(mem, K.SPACE_USER, base, 4)
    hi, ok1 = K.load_bytes(mem, K.SPACE_USER, base + 4, 4)
    ln, ok2 = K.load_bytes(mem, K.SPACE_USER, base + 8, 4)
    ident, ok4 = K.load_bytes(mem, K.SPACE_USER, base + 12, 2)
    if not (ok0 and ok1 and ok2 and ok3 and ok4):
        return 0, 0, 0, 0, False
    if hi >= 0x80000000:
        return -1, ln, ident, fl, True
    return (hi << 32) | lo, ln, ident, fl, True


@inlined_kernel
def log_desc(mem, q, slot):
    """A used descriptor written at `slot`: log it at the descriptor ring's guest-physical
    address (while the frontend asked for used-ring logging). vhost-user gives one log
    address per ring, the device area's for packed (QEMU's used_phys), so the ring's own is
    found through the region table."""
    if not (q[K.Q_FLAGS] & K.F_LOG_USED) or mem[KM_LOG].shape[0] == 0:
        return
    addr = q[K.Q_DESC] + 16 * slot
    i = K.region_index(mem, K.SPACE_USER, addr)
    if i >= 0:
        K.log_write(mem, q, mem[KM_GPA_START][i] + (addr - mem[KM_USER_START][i]), 16)


@inlined_kernel
def store_used(mem, q, views, slot, ident, length, flags):
    """Write a used descriptor: id and len, then (release) flags. Direct map: one 8-byte
    store of len | id << 32 | flags << 48, which the driver sees whole."""
    if q[K.Q_FLAGS] & K.F_DIRECT:
        views[0][2 * slot + 1] = np.uint64((length & 0xFFFFFFFF) | (ident << 32) | (flags << 48))
        return True
    base = q[K.Q_DESC] + 16 * slot
    if not (K.store_bytes(mem, K.SPACE_USER, base + 8, 4, length)
            and K.store_bytes(mem, K.SPACE_USER, base + 12, 2, ident)):
        return False
    fence_release()
    return K.store_bytes(mem, K.SPACE_USER, base + 14, 2, flags)


@inlined_kernel
def read_driver_event(mem, q, views, offset):
    """The driver event suppression area's off_wrap (offset 0) or flags (2)."""
    if q[K.Q_FLAGS] & K.F_DIRECT:
        return np.int64(views[1][offset >> 1]), True
    return K.load_bytes(mem, K.SPACE_USER, q[K.Q_AVAIL] + offset, 2)


@inlined_kernel
def write_device_event(mem, q, views, offset, value):
    """The device event suppression area's off_wrap (offset 0) or flags (2); logged."""
    if q[K.Q_FLAGS] & K.F_DIRECT:
        views[2][offset >> 1] = value
        ok = True
    else:
        ok = K.store_bytes(mem, K.SPACE_USER, q[K.Q_USED] + offset, 2, value)
    K.log_used(mem, q, offset, 2)
    K.log_flush(mem, q)
    return ok


@inlined_kernel
def step(i, wrap, size):
    i += 1
    if i >= size:
        return i - size, wrap ^ 1
    return i, wrap


# ------------------------------------------------------------------------ the algorithm --

@inlined_kernel
def avail_end(mem, q, views, max_chains):
    """Scan from next_avail over available descriptors: (complete chains seen (at most
    max_chains), slot and wrap just past the last of them, ok). A chain whose head is
    available is complete (the driver makes the head available last, 2.8.21.1); a run of
    NEXT descriptors that fills the whole ring is not a chain: -1 (caller breaks the queue)."""
    size = q[K.Q_SIZE]
    i = q[K.Q_NEXT_AVAIL]
    w = q[K.Q_AVAIL_WRAP]
    end_i = i
    end_w = w
    n = 0
    walked = 0
    while walked < size and n < max_chains:
        fl, ok = read_flags(mem, q, views, i)
        if not ok:
            return -2, end_i, end_w
        if not desc_available(fl, w):
            break
        walked += 1
        i, w = step(i, w, size)
        if not (fl & F_NEXT):
            n += 1
            end_i = i
            end_w = w
    if walked == size and n == 0:
        return -1, end_i, end_w
    return n, end_i, end_w


@inlined_kernel
def avail_count(mem, q, views):
    n, _i, _w = avail_end(mem, q, views, COUNT_MAX)
    if n == -2:
        K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
        return -1
    if n == -1:
        K.fail(q, E.CHAIN_TOO_LONG, q[K.Q_NEXT_AVAIL])
        return -1
    fence_acquire()
    return n


@inlined_kernel
def finish_pop(q, i, w, slots):
    """Advance next_avail past a chain of `slots` ring slots that ended just before (i, w)."""
    size = q[K.Q_SIZE]
    last = i - 1 if i > 0 else size - 1
    if K.Q_CHAIN_SLOTS + last < q.shape[0]:
        q[K.Q_CHAIN_SLOTS + last] = slots
    q[K.Q_NEXT_AVAIL] = i
    q[K.Q_AVAIL_WRAP] = w
    q[K.Q_CHAINS] += 1


@inlined_kernel
def take_desc(mem, q, where, addr, length, ident, flags, first, seen_write, total, seg_addr,
              seg_len, seg_flags, pos):
    """One descriptor of a chain (read from the ring, or the inflight region's copy of it),
    checked, into the segment arrays from pos; an indirect one (`first` in its chain, and
    alone: no NEXT) expands its table. (pos, total, seen_write); pos -1: the queue broke (q
    says why, `where` the slot it names), -2: the segment arrays are full."""
    cap = seg_addr.shape[0]
    if flags & F_INDIRECT:
        # Alone in its chain: no NEXT out of it, nor into it (2.8.7.1, driver MUST NOT).
        if not first or flags & F_NEXT:
            K.fail(q, E.INDIRECT_WITH_NEXT, where)
            return -1, total, seen_write
        if not (q[K.Q_FLAGS] & K.F_INDIRECT):
            K.fail(q, E.INDIRECT_NOT_NEGOTIATED, where)
            return -1, total, seen_write
        if length == 0 or length % 16 != 0:
            K.fail(q, E.INDIRECT_BAD_LEN, length)
            return -1, total, seen_write
        if not K.is_mapped(mem, K.SPACE_GPA, addr, length):
            K.fail(q, E.ADDR_UNMAPPED, addr if addr >= 0 else K.ADDR_MAX)
            return -1, total, seen_write
        pos, total = pop_indirect(mem, q, addr, length // 16, seg_addr, seg_len, seg_flags,
                                  pos, cap)
        return pos, total, seen_write
    if flags & F_WRITE:
        seen_write = True
    elif seen_write:
        K.fail(q, E.READ_AFTER_WRITE, ident)
        return -1, total, seen_write
    if not K.is_mapped(mem, K.SPACE_GPA, addr, length):
        K.fail(q, E.ADDR_UNMAPPED, addr if addr >= 0 else K.ADDR_MAX)
        return -1, total, seen_write
    total += length
    if total > K.U32_MAX:
        K.fail(q, E.LEN_OVERFLOW, ident)
        return -1, total, seen_write
    if pos >= cap:
        return -2, total, seen_write
    seg_addr[pos] = addr
    seg_len[pos] = length
    seg_flags[pos] = flags & F_WRITE
    return pos + 1, total, seen_write


@inlined_kernel
def pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, seg_pos):
    """Walk the chain at next_avail into the segment arrays from seg_pos (kernels.pop_chain's
    contract: (token, new_seg_pos, total_len); token -1: broken, -2: segment arrays full,
    nothing consumed). The caller knows the head is available (avail_count)."""
    size = q[K.Q_SIZE]
    if K.Q_CHAIN_SLOTS + size > q.shape[0]:  # a queue state array without room (our bug)
        K.fail(q, E.DEVICE_FAILED, 0)
        return -1, seg_pos, 0
    i = q[K.Q_NEXT_AVAIL]
    w = q[K.Q_AVAIL_WRAP]
    pos = seg_pos
    total = 0
    seen_write = False
    slots = 0
    ident = 0
    while True:
        addr, length, ident, flags, ok = read_desc(mem, q, views, i)
        if not ok:
            K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
            return -1, seg_pos, 0
        if not desc_available(flags, w):
            K.fail(q, E.PACKED_NOT_AVAIL, i)
            return -1, seg_pos, 0
        slots += 1
        if slots > size:
            K.fail(q, E.CHAIN_TOO_LONG, q[K.Q_NEXT_AVAIL])
            return -1, seg_pos, 0
        pos, total, seen_write = take_desc(mem, q, i, addr, length, ident, flags, slots == 1,
                                           seen_write, total, seg_addr, seg_len, seg_flags,
                                           pos)
        if pos < 0:
            return pos, seg_pos, 0
        i, w = step(i, w, size)
        if not (flags & F_NEXT):
            break
    finish_pop(q, i, w, slots)
    return ident | (slots << 16), pos, total


@inlined_kernel
def pop_indirect(mem, q, table, n, seg_addr, seg_len, seg_flags, pos, cap):
    """The entries of a packed indirect table (consecutive descriptors, WRITE the only flag
    that counts, 2.8.7): (new pos, total), or pos -1 (broken) / -2 (segments full)."""
    total = 0
    seen_write = False
    for j in range(n):
        # read_table_desc reads split's layout: its flags are packed's id, its next the flags.
        addr, length, _ident, flags, ok = K.read_table_desc(mem, K.SPACE_GPA, table, j)
        if not ok:
            K.fail(q, E.ADDR_UNMAPPED, table)
            return -1, 0
        if flags & F_INDIRECT:
            K.fail(q, E.NESTED_INDIRECT, j)
            return -1, 0
        if flags & F_WRITE:
            seen_write = True
        elif seen_write:
            K.fail(q, E.READ_AFTER_WRITE, j)
            return -1, 0
        if not K.is_mapped(mem, K.SPACE_GPA, addr, length):
            K.fail(q, E.ADDR_UNMAPPED, addr if addr >= 0 else K.ADDR_MAX)
            return -1, 0
        total += length
        if total > K.U32_MAX:
            K.fail(q, E.LEN_OVERFLOW, j)
            return -1, 0
        if pos >= cap:
            return -2, 0
        seg_addr[pos] = addr
        seg_len[pos] = length
        seg_flags[pos] = flags & F_WRITE
        pos += 1
    return pos, total


@inlined_kernel
def lone_desc_direct(mem, q, views, i, wrap, flags_wanted, min_len, r):
    """Ring descriptor i, if it is available, a chain of its own whose flags (ring bits
    aside) are exactly flags_wanted, and its min_len or more bytes lie inside one region
    (region r tried first). Returns (host, GPA, length, id, region); host 0: anything else."""
    word = views[0][2 * i + 1]
    flags = np.int64(word >> np.uint64(48))
    if not desc_available(flags, wrap) or (flags & 0x7F) != flags_wanted:
        return 0, 0, 0, 0, r
    fence_acquire()
    raw = views[0][2 * i]
    length = np.int64(word & np.uint64(0xFFFFFFFF))
    if raw > np.uint64(K.ADDR_MAX) or length < min_len:
        return 0, 0, 0, 0, r
    addr = np.int64(raw)
    gpa_start = mem[KM_GPA_START]
    region_size = mem[KM_SIZE]
    off = addr - gpa_start[r]
    if off < 0 or off >= region_size[r] or length > region_size[r] - off:
        r2 = K.region_index(mem, K.SPACE_GPA, addr)
        if r2 < 0:
            return 0, 0, 0, 0, r
        off = addr - gpa_start[r2]
        if length > region_size[r2] - off:
            return 0, 0, 0, 0, r
        r = r2
    ident = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
    return mem[KM_HOST][r] + off, addr, length, ident, r


@inlined_kernel
def pop_simple_direct(mem, q, views, n, min_len, first_read, heads, chain_end, seg_addr,
                      seg_len, seg_flags, hosts):
    """kernels.pop_simple_direct for a packed ring: chains of one readable descriptor of
    min_len bytes or more inside one region, stopping (consuming nothing more) at anything
    else, which pop_chain then takes and checks."""
    n = min(n, heads.shape[0], chain_end.shape[0], seg_addr.shape[0], seg_len.shape[0],
            seg_flags.shape[0], hosts.shape[0])
    size = q[K.Q_SIZE]
    if mem[KM_GPA_START].shape[0] == 0 or K.Q_CHAIN_SLOTS + size > q.shape[0]:
        return 0
    i = q[K.Q_NEXT_AVAIL]
    w = q[K.Q_AVAIL_WRAP]
    r = 0
    k = 0
    while k < n:
        host, addr, length, ident, r = lone_desc_direct(mem, q, views, i, w, 0, min_len, r)
        if host == 0:
            break
        prefetch(host + first_read)
        heads[k] = ident | (1 << 16)
        chain_end[k] = k + 1
        seg_addr[k] = addr
        seg_len[k] = length
        seg_flags[k] = 0
        hosts[k] = host
        q[K.Q_CHAIN_SLOTS + i] = 1
        i, w = step(i, w, size)
        k += 1
    q[K.Q_NEXT_AVAIL] = i
    q[K.Q_AVAIL_WRAP] = w
    q[K.Q_CHAINS] += k
    return k


@inlined_kernel
def pop_lone_writable_direct(mem, q, views, min_len):
    """kernels.pop_lone_writable_direct for a packed ring: (token, host, GPA), or token -1
    having consumed nothing."""
    size = q[K.Q_SIZE]
    if mem[KM_GPA_START].shape[0] == 0 or K.Q_CHAIN_SLOTS + size > q.shape[0]:
        return -1, 0, 0
    i = q[K.Q_NEXT_AVAIL]
    w = q[K.Q_AVAIL_WRAP]
    host, addr, _length, ident, _r = lone_desc_direct(mem, q, views, i, w, F_WRITE, min_len, 0)
    if host == 0:
        return -1, 0, 0
    q[K.Q_CHAIN_SLOTS + i] = 1
    i, w = step(i, w, size)
    q[K.Q_NEXT_AVAIL] = i
    q[K.Q_AVAIL_WRAP] = w
    q[K.Q_CHAINS] += 1
    return ident | (1 << 16), host, addr


@inlined_kernel
def rewind(q, n):
    """Give back the last n popped chains (kernels.rewind), by the slots each took."""
    size = q[K.Q_SIZE]
    i = q[K.Q_NEXT_AVAIL]
    w = q[K.Q_AVAIL_WRAP]
    for _ in range(n):
        last = i - 1 if i > 0 else size - 1
        slots = q[K.Q_CHAIN_SLOTS + last] if K.Q_CHAIN_SLOTS + last < q.shape[0] else 1
        i -= slots
        if i < 0:
            i += size
            w ^= 1
    q[K.Q_NEXT_AVAIL] = i
    q[K.Q_AVAIL_WRAP] = w
    q[K.Q_CHAINS] -= n


@inlined_kernel
def add_used(mem, q, views, token, length):
    """Write the used descriptor of a popped chain (token from pop_chain) at next_used and
    advance it by the chain's slots. The batch's first descriptor gets its flags at
    publish_used; the others are written whole now (the driver reads used descriptors in
    ring order, so it sees none of them before the first)."""
    size = q[K.Q_SIZE]
    ident = token & 0xFFFF
    slots = token >> 16
    if token < 0 or slots < 1 or slots > size:
        K.fail(q, E.USED_ID_OUT_OF_RANGE, token)
        return False
    slot = q[K.Q_NEXT_USED]
    wrap = q[K.Q_USED_WRAP]
    flags = F_AVAIL | F_USED if wrap else 0
    if q[K.Q_BATCH_SLOT] < 0:
        q[K.Q_BATCH_SLOT] = slot
        q[K.Q_BATCH_WORD] = (length & 0xFFFFFFFF) | (ident << 32) | (flags << 48)
        if not (q[K.Q_FLAGS] & K.F_DIRECT):
            # id and len now, flags at publish
            base = q[K.Q_DESC] + 16 * slot
            if not (K.store_bytes(mem, K.SPACE_USER, base + 8, 4, length)
                    and K.store_bytes(mem, K.SPACE_USER, base + 12, 2, ident)):
                q[K.Q_BATCH_SLOT] = -1
                K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
                return False
    else:
        log_desc(mem, q, slot)
        if not store_used(mem, q, views, slot, ident, length, flags):
            K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
            return False
    slot += slots
    if slot >= size:
        slot -= size
        q[K.Q_USED_WRAP] = wrap ^ 1
    q[K.Q_NEXT_USED] = slot
    return True


@inlined_kernel
def publish_used(mem, q, views):
    """Publish the batch: the pages of everything written so far are logged, then (release)
    the first descriptor's flags are stored, and logged."""
    slot = q[K.Q_BATCH_SLOT]
    if slot < 0:
        K.log_flush(mem, q)
        return True
    K.log_flush(mem, q)
    fence_release()
    q[K.Q_BATCH_SLOT] = -1
    word = q[K.Q_BATCH_WORD]
    if q[K.Q_FLAGS] & K.F_DIRECT:
        views[0][2 * slot + 1] = np.uint64(word)
        ok = True
    else:
        ok = K.store_bytes(mem, K.SPACE_USER, q[K.Q_DESC] + 16 * slot + 14, 2,
                           (word >> 48) & 0xFFFF)
    log_desc(mem, q, slot)
    K.log_flush(mem, q)
    if not ok:
        K.fail(q, E.RING_UNMAPPED, q[K.Q_DESC])
    return ok


@inlined_kernel
def needs_interrupt(mem, q, views):
    """Should the device notify the driver now? (2.8.10; DPDK vhost_vring_call_packed)."""
    fence_seq_cst()  # used descriptors visible before the driver's suppression is read
    size = q[K.Q_SIZE]
    old = q[K.Q_SIGNALLED_USED]
    valid = q[K.Q_SIGNALLED_VALID]
    new = q[K.Q_NEXT_USED]
    q[K.Q_SIGNALLED_USED] = new
    q[K.Q_SIGNALLED_VALID] = 1
    flags, ok = read_driver_event(mem, q, views, 2)
    if not ok:
        return False
    if flags != EVENT_DESC or not (q[K.Q_FLAGS] & K.F_EVENT_IDX):
        return flags != EVENT_DISABLE
    if not valid:
        return True
    fence_acquire()
    off_wrap, ok = read_driver_event(mem, q, views, 0)
    if not ok:
        return False
    off = off_wrap & 0x7FFF
    if new <= old:
        old -= size
    if q[K.Q_USED_WRAP] != off_wrap >> 15:
        off -= size
    return ((new - off - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@inlined_kernel
def disable_notification(mem, q, views):
    q[K.Q_NOTIFY_OFF] = 1
    write_device_event(mem, q, views, 2, EVENT_DISABLE)


@inlined_kernel
def head_available(mem, q, views):
    fl, ok = read_flags(mem, q, views, q[K.Q_NEXT_AVAIL])
    return ok and desc_available(fl, q[K.Q_AVAIL_WRAP])


@inlined_kernel
def enable_notification(mem, q, views):
    """Ask for kicks again (with EVENT_IDX: at the next descriptor, 2.8.10); True if
    buffers arrived meanwhile."""
    q[K.Q_NOTIFY_OFF] = 0
    if q[K.Q_FLAGS] & K.F_EVENT_IDX:
        write_device_event(mem, q, views, 0, q[K.Q_NEXT_AVAIL] | (q[K.Q_AVAIL_WRAP] << 15))
        fence_release()
        write_device_event(mem, q, views, 2, EVENT_DESC)
    else:
        write_device_event(mem, q, views, 2, EVENT_ENABLE)
    fence_seq_cst()
    return head_available(mem, q, views)


@inlined_kernel
def rearm_past_avail(mem, q, views):
    """kernels.rearm_past_avail: with EVENT_IDX, ask for a kick when the driver makes the
    descriptor past the ones available now available, then look once more."""
    if not (q[K.Q_FLAGS] & K.F_EVENT_IDX):
        return 0
    n, i, w = avail_end(mem, q, views, q[K.Q_SIZE])
    if n < 0:
        return avail_count(mem, q, views)  # reports it
    # (i, w): the head of the driver's next chain (a partial chain's, if it is writing one).
    write_device_event(mem, q, views, 0, i | (w << 15))
    fence_release()
    write_device_event(mem, q, views, 2, EVENT_DESC)
    fence_seq_cst()
    return avail_count(mem, q, views)


@kernel
def avail_position(mem, q, views):
    """For the protocol thread: the position (modulo 2 * size, see PackedBase.linear) just
    past the chains available now, or -1 if the ring is not mapped or not a ring."""
    n, i, w = avail_end(mem, q, views, q[K.Q_SIZE])
    if n < 0:
        return -1
    return i + (0 if w else q[K.Q_SIZE])
