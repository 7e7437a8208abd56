"""Compiled kernels for the virtio-net data paths other than the drop sink: moving frames
between guest buffers and *frame rings*, and from frame rings to a pcap byte stream.

A frame ring is a bounded single-producer single-consumer queue of frames in numpy arrays:

    data  uint8[cap, slot]   slot i holds a 12-byte virtio-net header, then the frame
    lens  int64[cap]         bytes used in slot i (header included)
    ctl   int64[RING_CTL_LEN] free-running head (consumer) and tail (producer) counts, and
                              the producer's drop counters

`cap` is a power of two. The producer fills slot `tail % cap`, then publishes it by storing
tail (after a release fence); the consumer reads tail (then an acquire fence), uses slots up to
it and publishes head the same way. Producer and consumer may be different worker threads (a
TX ring looping back into an RX ring served by another worker), so each index is written by
one side only. The 12-byte slot header is the layout a TAP with IFF_VNET_HDR reads and writes
(TUNSETVNETHDRSZ 12), so TAP frames go in and out of slots without moving.

Kernels:
- `tx_gather`: pop TX chains, copy each chain's device-readable bytes (header + frame) into
  the next slot, complete the chains (used length 0: nothing written), publish, decide on the
  interrupt. The chains are done once their bytes are copied; the sink then works on slots.
- `rx_deliver`: write pending frames into the RX queue's buffers, mergeable (a frame spans as
  many chains as it needs, num_buffers says how many, 5.1.6.4) or not (one chain per frame; a
  frame larger than the chain is dropped, counted, and the chain reused), header flags and GSO
  fields zero (no offloads offered), publish once, decide on the interrupt. A frame that does
  not fit in the buffers available now waits: the chains popped for it are given back
  (next_avail rewound; they were only read) and, with EVENT_IDX, avail_event is set to the
  avail index seen, so the driver's next refill kicks (as Linux vhost_enable_notify does;
  leaving it at next_avail would miss that kick when buffers were available but too few).
- `ring_copy`: move frames from one ring to another (loopback: TX scratch -> RX backlog),
  counting drops when the destination is full.
- `ring_to_pcap`: pcap records (16-byte header + frame, header stripped) for the frames of a
  ring into one byte buffer, so a burst is written to the file with one write.

Guest data is copied with memcpy (an LLVM intrinsic) between host addresses that the region
table translated and bounds-checked; ring metadata goes through the kernels of `ring/`.
"""

from __future__ import annotations

import mmap

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.devices.net import tx_drop as NK
from pyvhost.ring import kernels as K
from pyvhost.ring.barriers import fence_acquire, fence_release, fence_streaming_stores
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.hostmem import (load_u16_unaligned, load_u64_unaligned, prefetch,
                                  prefetch_write, store_line_streaming, store_u16_unaligned,
                                  store_u64_unaligned)
from pyvhost.ring.jit import inlined_kernel, intrinsic, kernel
from pyvhost.ring.poll import read_cycles, window_goes_on

HDR = 12                # struct virtio_net_hdr_mrg_rxbuf (VERSION_1 always has num_buffers)
NUM_BUFFERS_OFF = 10
# Frames of at most this many bytes (header excluded) go into a one-buffer RX chain with
# non-temporal stores (copy_streaming). Measured in the loopback, per size (docs/benchmark.md):
# 64 and 128 bytes faster with them with the vCPUs close and far; 256 slower when close
# (9-10 vs 14-16 Mpps), 1518 slower (3.6 vs 4.5).
STREAM_MAX = 128

# Frame ring control slots.
R_HEAD = 0              # frames consumed (consumer writes)
R_TAIL = 1              # frames produced (producer writes)
R_FULL_DROPS = 2        # frames the producer dropped: ring full (producer writes)
R_OVERSIZE_DROPS = 3    # frames the producer dropped: larger than a slot (producer writes)
R_READ_ERRORS = 4       # reads from an fd that failed other than EAGAIN (producer writes)
R_LAST_ERRNO = 5        # the errno of the last of them
R_KEEP_HDR = 6          # 1: slots hold a virtio-net header to pass on (offloads negotiated)
RING_CTL_LEN = 8

# RX counters (one row per RX queue; written by the RX worker only).
RX_PACKETS = 0
RX_BYTES = 1            # frame bytes, header excluded
RX_BUFFERS = 2          # used elements written
RX_TOO_BIG = 3          # frames dropped: larger than every buffer the driver can offer
RX_BAD_BUFFERS = 4      # RX chains without device-writable bytes, returned with length 0
RX_NOTIFY = 5
RX_WAITS = 6            # times a frame waited for buffers
RX_COUNTERS_LEN = 8

# TX sink counters beyond tx_drop' per-protocol ones (one row per TX queue).
TX_OVERSIZE = 0         # frames larger than a slot: completed, not forwarded
TX_SHORT = 1            # chains without a whole virtio-net header: completed, not forwarded
TX_WRITE_ERRORS = 2     # frames a sink failed to write (e.g. TAP write error)
TX_LAST_ERRNO = 3       # the errno of the last of them
TX_EXTRA_LEN = 4

PCAP_RECORD_HDR = 16


# ------------------------------------------------------------------------ memcpy intrinsics --

@intrinsic
def host_to_array(typingctx, arr, off, host, n):
    """arr[off:off+n] = n bytes at host address `host` (caller checked both ranges)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        dst = builder.gep(ary.data, [args[1]])
        src = builder.inttoptr(args[2], ir.IntType(8).as_pointer())
        cgutils.raw_memcpy(builder, dst, src, args[3], 1)
        return context.get_dummy_value()
    return types.void(arr, types.int64, types.int64, types.int64), codegen


@intrinsic
def array_to_host(typingctx, host, arr, off, n):
    """n bytes at host address `host` = arr[off:off+n] (caller checked both ranges)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[1])(context, builder, args[1])
        src = builder.gep(ary.data, [args[2]])
        dst = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        cgutils.raw_memcpy(builder, dst, src, args[3], 1)
        return context.get_dummy_value()
    return types.void(types.int64, arr, types.int64, types.int64), codegen


@intrinsic
def array_copy(typingctx, dst, dst_off, src, src_off, n):
    """dst[dst_off:dst_off+n] = src[src_off:src_off+n], no overlap (caller checked ranges)."""
    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        cgutils.raw_memcpy(builder, builder.gep(d.data, [args[1]]),
                           builder.gep(s.data, [args[3]]), args[4], 1)
        return context.get_dummy_value()
    return types.void(dst, types.int64, src, types.int64, types.int64), codegen


@kernel
def put_u32(out, pos, v):
    out[pos] = v & 0xFF
    out[pos + 1] = (v >> 8) & 0xFF
    out[pos + 2] = (v >> 16) & 0xFF
    out[pos + 3] = (v >> 24) & 0xFF


@kernel
def guest_to_array(mem, addr, out, off, n):
    """Copy n bytes at GPA addr into out[off:off+n]; False if any byte is unmapped."""
    done = 0
    while done < n:
        host, left = K.host_span(mem, K.SPACE_GPA, addr + done)
        if left <= 0:
            return False
        take = min(n - done, left)
        host_to_array(out, off + done, host, take)
        done += take
    return True


@inlined_kernel
def array_to_guest(mem, addr, src, off, n):
    """Copy src[off:off+n] to GPA addr; False if any byte is unmapped."""
    done = 0
    while done < n:
        host, left = K.host_span(mem, K.SPACE_GPA, addr + done)
        if left <= 0:
            return False
        take = min(n - done, left)
        array_to_host(host, src, off + done, take)
        done += take
    return True


# ------------------------------------------------------------------------------------ TX --

@inlined_kernel
def tx_gather(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len, seg_flags, hosts,
              data, lens, ctl, counters, extra):
    """Pop up to max_chains TX chains into ring slots (see module doc).

    heads, chain_end, hosts: scratch of max_chains or more. The burst is popped first
    (`pop_burst_hosts`: a chain of one readable buffer in one region, what DPDK's and Linux's
    drivers send, comes with its host address and its first cache line already loading), then
    copied: the driver's core has just written every frame, and the misses of a whole burst
    overlap instead of stalling each copy in turn. counters: tx_drop' per-queue TX counters
    (packets, bytes, per protocol); extra: the TX_* counters. Returns (chains completed,
    interrupt?); chains -1: the queue broke.
    """
    cap = lens.shape[0]
    slot_size = data.shape[1]
    tail = ctl[R_TAIL]
    head = ctl[R_HEAD]
    fence_acquire()  # slots the consumer released are free only after we saw its head
    n = K.pop_burst_hosts(mem, q, views, min(max_chains, heads.shape[0]), 1, 0, heads,
                          chain_end, seg_addr, seg_len, seg_flags, hosts)
    if n <= 0:
        return n, False
    if hosts[n - 1] == 0:  # some chains took the general path: start loading them too
        NK.prefetch_headers(mem, seg_addr, seg_flags, chain_end, hosts, n)
    for k in range(n):  # and the last line of each lone buffer (the fast path took the first)
        if hosts[k] != 0:
            prefetch(hosts[k] + min(seg_len[chain_end[k] - 1], slot_size) - 1)
    start = 0
    for k in range(n):
        end = chain_end[k]
        readable = 0
        for j in range(start, end):
            if seg_flags[j] == 0:
                readable += seg_len[j]
        counters[NK.C_PACKETS] += 1
        counters[NK.C_BYTES] += max(readable - HDR, 0)
        if readable <= HDR:
            extra[TX_SHORT] += 1
        elif readable > slot_size:
            extra[TX_OVERSIZE] += 1
        else:
            if tail - head >= cap:
                head = ctl[R_HEAD]
                fence_acquire()
            if tail - head >= cap:
                ctl[R_FULL_DROPS] += 1
            else:
                slot = tail & (cap - 1)
                buf = data[slot]
                if hosts[k] != 0:  # the fast path's lone buffer (in one region, readable)
                    host_to_array(buf, 0, hosts[k], readable)
                else:
                    pos = 0
                    for j in range(start, end):
                        if seg_flags[j] == 0:
                            if not guest_to_array(mem, seg_addr[j], buf, pos, seg_len[j]):
                                K.fail(q, E.ADDR_UNMAPPED, seg_addr[j])
                                return -1, False
                            pos += seg_len[j]
                lens[slot] = readable
                NK.classify_frame(buf[HDR:], readable - HDR, counters)
                tail += 1
        if not K.add_used(mem, q, views, heads[k], 0):
            return -1, False
        start = end
    fence_release()  # slot contents before the tail that publishes them
    ctl[R_TAIL] = tail
    if not K.publish_used(mem, q, views):
        return -1, False
    notify = K.needs_interrupt(mem, q, views)
    if notify:
        counters[NK.C_NOTIFY] += 1
    return n, notify


# ------------------------------------------------------------------------------------ RX --

@inlined_kernel
def _pop_lone_burst(mem, q, views, n, head, lens, heads, hosts, gpas):
    """The direct map's receive fast path, for a whole burst: pop the next chains, up to n,
    while each is one writable buffer inside one region that holds its frame (frame ring
    slots head, head+1, ...); their heads, host and guest addresses go to heads, hosts,
    gpas, and the lines the frames will fill are asked for at once: for write where the
    copy will store into the cache, for read (the header) where it may only compare.
    Returns the chains popped.

    Why a burst: the driver refills the ring right behind the entries we consume, in the
    same cache lines; each is read once here (not once to prefetch, again to pop), and
    the misses of the whole burst overlap instead of stalling each copy in turn."""
    cap = lens.shape[0]
    for i in range(n):
        total = lens[(head + i) & (cap - 1)]
        h, host, gpa = K.pop_lone_writable_direct(mem, q, views, total)
        if h < 0:
            return i
        heads[i] = h
        hosts[i] = host
        gpas[i] = gpa
        prefetch(host)
        if total - HDR > STREAM_MAX:
            prefetch_write(host + HDR)
            prefetch_write(host + total - 1)
    return n


@inlined_kernel
def _deliver_lone_burst(mem, q, views, n, head, data, lens, ctl, heads, hosts, gpas,
                        counters):
    """Copy the frames of slots head .. head+n-1 into the buffers `_pop_lone_burst` popped,
    then write their headers and used elements. False: the queue broke.

    All the frames first, as DPDK's batched copies: their stores follow one another instead
    of waiting behind each frame's header and used element. A small frame (STREAM_MAX) is
    written with non-temporal stores (`copy_streaming`)."""
    cap = lens.shape[0]
    streamed = False
    for i in range(n):
        slot = (head + i) & (cap - 1)
        size = lens[slot] - HDR
        if size <= STREAM_MAX:
            copy_streaming(hosts[i] + HDR, data[slot], HDR, size)
            streamed = True
        else:
            array_to_host(hosts[i] + HDR, data[slot], HDR, size)
    if streamed:
        fence_streaming_stores()  # before the used index that hands the buffers over
    for i in range(n):
        slot = (head + i) & (cap - 1)
        total = lens[slot]
        if not _finish_lone_buffer(mem, q, views, heads[i], hosts[i], gpas[i], data[slot],
                                   total, ctl):
            return False
        counters[RX_PACKETS] += 1
        counters[RX_BYTES] += total - HDR
    return True


@inlined_kernel
def copy_streaming(host, buf, off, n):
    """buf[off:off+n] to host address `host`: the whole cache lines of the destination with
    non-temporal stores, the partial ones at either end as usual.

    Why: a driver that recycles its receive buffers has read the last frame in each (DPDK
    counts multicast from the destination MAC), so its core holds a copy of the line. An
    ordinary store must first take the line from that core, and those upgrades did not
    overlap: while the host kept the two vCPUs far apart (a one-way handoff of about 160 ns
    instead of 31) the 64-byte loopback spent about 330 cycles a frame on its RX copies and
    ran at 5-6 Mpps. A streaming store needs no line: those copies took 80-100 cycles and the
    loop 7-8 Mpps; with the vCPUs close, 40 instead of 90 cycles (docs/benchmark.md). Only
    for small frames (STREAM_MAX): the lines go to memory, not to our cache or the driver's,
    and whoever reads a large frame whole then fetches it from there (the 1518-byte loopback
    ran at 3.6 instead of 4.5 Mpps)."""
    end = host + n
    line = (host + 63) & ~63
    if line + 64 > end:
        array_to_host(host, buf, off, n)
        return
    if line > host:
        array_to_host(host, buf, off, line - host)
    src = buf.ctypes.data + off - host
    while line + 64 <= end:
        store_line_streaming(line, src + line)
        line += 64
    if line < end:
        array_to_host(line, buf, off + (line - host), end - line)


@inlined_kernel
def write_rx_header(host, buf, ctl):
    """The virtio-net header of a one-buffer frame at host, from its slot `buf`: without
    offloads flags and GSO fields are zero (5.1.6.4.1); with them (a TAP source, GUEST_CSUM
    negotiated) they are the TAP's, for the driver to act on; num_buffers 1.

    Each field is stored only where the buffer does not hold it already (as DPDK's
    ASSIGN_UNLESS_EQUAL). A driver that recycles its buffers (DPDK's virtio-user: the header
    sits in the line before the frame, which its RX reads and its TX clears only where not
    zero) leaves them holding the header we wrote last time, so the line stays shared by
    both cores; a store would take it from the driver's core, one more cross-core transfer
    a frame (docs/benchmark.md, the slow mode)."""
    flags = np.uint64(0)
    gso = np.uint16(0)
    if ctl[R_KEEP_HDR] != 0:
        flags = load_u64_unaligned(buf.ctypes.data)
        gso = load_u16_unaligned(buf.ctypes.data + 8)
    if load_u64_unaligned(host) != flags:
        store_u64_unaligned(host, flags)
    if load_u16_unaligned(host + 8) != gso:
        store_u16_unaligned(host + 8, gso)
    if load_u16_unaligned(host + NUM_BUFFERS_OFF) != 1:
        store_u16_unaligned(host + NUM_BUFFERS_OFF, 1)


@inlined_kernel
def _fill_lone_buffer(mem, q, views, chain_head, host, gpa, buf, total, ctl):
    """A frame (slot `buf`, `total` bytes with its header) into the one writable buffer of
    chain `chain_head` at host/gpa, and its used element. False: the queue broke."""
    array_to_host(host + HDR, buf, HDR, total - HDR)
    return _finish_lone_buffer(mem, q, views, chain_head, host, gpa, buf, total, ctl)


@inlined_kernel
def _finish_lone_buffer(mem, q, views, chain_head, host, gpa, buf, total, ctl):
    """After its frame was copied: the header of a one-buffer frame, its pages logged, its
    used element. False: the queue broke."""
    write_rx_header(host, buf, ctl)
    K.log_write(mem, q, gpa, total)
    return K.add_used(mem, q, views, chain_head, total)


@inlined_kernel
def rx_deliver(mem, q, views, mergeable, max_frames, seg_addr, seg_len, seg_flags,
               chain_heads, chain_ends, data, lens, ctl, counters):
    """Deliver up to max_frames pending frames of the ring into RX buffers (see module doc).

    chain_heads/chain_ends: scratch, at least the queue size. Returns (frames, used buffers,
    interrupt?); frames -1: the queue broke.
    """
    if q[K.Q_ERROR] != 0:
        return -1, 0, False
    cap = lens.shape[0]
    size = q[K.Q_SIZE]
    head = ctl[R_HEAD]
    tail = ctl[R_TAIL]
    fence_acquire()  # slot contents after the tail that published them
    frames = 0
    buffers = 0
    avail = 0
    seg_cap = seg_addr.shape[0]
    if head != tail and (q[K.Q_FLAGS] & K.F_DIRECT):
        avail = K.avail_count(mem, q, views)
        if avail < 0:
            return -1, 0, False
        fast = _pop_lone_burst(mem, q, views, min(avail, tail - head, max_frames, seg_cap,
                                                  chain_heads.shape[0]),
                               head, lens, chain_heads, seg_addr, seg_len)
        if fast > 0:
            if not _deliver_lone_burst(mem, q, views, fast, head, data, lens, ctl,
                                       chain_heads, seg_addr, seg_len, counters):
                return -1, 0, False
            avail -= fast
            head += fast
            frames += fast
            buffers += fast
    while head != tail and frames < max_frames:
        slot = head & (cap - 1)
        buf = data[slot]
        total = lens[slot]
        # Collect chains until their writable bytes hold header + frame.
        nchains = 0
        nbad = 0
        room = 0
        pos = 0
        never = False  # the frame can never be delivered: drop it
        fast_host = 0  # the direct map's fast path took one buffer that holds the frame
        fast_gpa = 0
        while room < total:
            if avail == 0:
                avail = K.avail_count(mem, q, views)
                if avail < 0:
                    return -1, 0, False
                if avail == 0 and mergeable:
                    avail = K.rearm_past_avail(mem, q, views)
                    if avail < 0:
                        return -1, 0, False
                if avail == 0:
                    # Every chain of the ring is not enough: it cannot grow.
                    never = nchains + nbad >= size
                    break
            if pos >= seg_cap or nchains + nbad >= chain_heads.shape[0]:
                never = True  # more segments or chains than our scratch (and the ring) holds
                break
            if nchains + nbad == 0 and (q[K.Q_FLAGS] & K.F_DIRECT):
                h, fast_host, fast_gpa = K.pop_lone_writable_direct(mem, q, views, total)
                if h >= 0:  # exactly what pop_chain would pop, written below as it would be
                    avail -= 1
                    chain_heads[0] = h
                    nchains = 1
                    room = total
                    break
            h, end, _t = K.pop_chain(mem, q, views, seg_addr, seg_len, seg_flags, pos)
            if h == -1:
                return -1, 0, False
            if h == -3:  # an IOTLB miss: the frame waits (its chains given back below)
                break
            if h == -2:  # segments full; nothing consumed
                if nchains + nbad == 0:
                    K.fail(q, E.CHAIN_TOO_LONG, -1)
                    return -1, 0, False
                never = True
                break
            avail -= 1
            w = 0
            for j in range(pos, end):
                if seg_flags[j] != 0:
                    w += seg_len[j]
            if w == 0:
                if nchains > 0 and (q[K.Q_FLAGS] & K.F_IN_ORDER):
                    # Returning it before this frame's buffers would use buffers out of ring
                    # order (2.7.9), after them would make it part of the frame: a driver that
                    # posts a read-only receive buffer has broken 5.1.6.3 anyway.
                    K.fail(q, E.RX_NOT_WRITABLE, h)
                    return -1, 0, False
                # No writable byte: not a receive buffer. It is returned with length 0 before
                # this frame's buffers (never counted in its num_buffers).
                chain_heads[chain_heads.shape[0] - 1 - nbad] = h
                nbad += 1
                continue
            chain_heads[nchains] = h
            chain_ends[nchains] = end
            nchains += 1
            pos = end
            room += w
            if not mergeable:
                # One chain per frame (5.1.6.3.1 asks drivers for 1526-byte buffers).
                never = room < total
                break
        if room < total:
            popped = nchains + nbad
            K.rewind(q, popped)
            avail += popped
            if never:
                counters[RX_TOO_BIG] += 1
                head += 1
                continue
            counters[RX_WAITS] += 1
            break
        # Header (the fast path's: _fill_lone_buffer).
        if fast_host == 0:
            if ctl[R_KEEP_HDR] == 0:
                for b in range(NUM_BUFFERS_OFF):
                    buf[b] = 0
            buf[NUM_BUFFERS_OFF] = nchains & 0xFF
            buf[NUM_BUFFERS_OFF + 1] = (nchains >> 8) & 0xFF
        for b in range(nbad):
            if not K.add_used(mem, q, views, chain_heads[chain_heads.shape[0] - 1 - b], 0):
                return -1, 0, False
            counters[RX_BAD_BUFFERS] += 1
        buffers += nbad
        sent = 0
        start = 0
        if fast_host != 0:
            if not _fill_lone_buffer(mem, q, views, chain_heads[0], fast_host, fast_gpa, buf,
                                     total, ctl):
                return -1, 0, False
            nchains = 0  # done: skip the general copy below
            buffers += 1
            sent = total
        for c in range(nchains):
            wrote = 0
            for j in range(start, chain_ends[c]):
                if seg_flags[j] == 0 or sent >= total:
                    continue
                take = min(seg_len[j], total - sent)
                if not array_to_guest(mem, seg_addr[j], buf, sent, take):
                    K.fail(q, E.ADDR_UNMAPPED, seg_addr[j])
                    return -1, 0, False
                K.log_write(mem, q, seg_addr[j], take)
                sent += take
                wrote += take
            if not K.add_used(mem, q, views, chain_heads[c], wrote):
                return -1, 0, False
            start = chain_ends[c]
        buffers += nchains
        frames += 1
        counters[RX_PACKETS] += 1
        counters[RX_BYTES] += total - HDR
        head += 1
    fence_release()  # done reading the slots before the producer may reuse them
    ctl[R_HEAD] = head
    counters[RX_BUFFERS] += buffers
    if buffers == 0:
        return frames, 0, False
    if not K.publish_used(mem, q, views):
        return -1, 0, False
    notify = K.needs_interrupt(mem, q, views)
    if notify:
        counters[RX_NOTIFY] += 1
    return frames, buffers, notify


# ---------------------------------------------------------------------------- ring to ring --

@kernel
def ring_copy(src_data, src_lens, src_ctl, dst_data, dst_lens, dst_ctl):
    """Copy every frame of src into dst (loopback); frames dst has no room for are dropped
    and counted in dst's producer counters. src is left as it is (the caller empties it).
    Returns frames copied."""
    s_cap = src_lens.shape[0]
    d_cap = dst_lens.shape[0]
    d_slot = dst_data.shape[1]
    s_head = src_ctl[R_HEAD]
    s_tail = src_ctl[R_TAIL]
    d_tail = dst_ctl[R_TAIL]
    d_head = dst_ctl[R_HEAD]
    fence_acquire()
    moved = 0
    while s_head != s_tail:
        s = s_head & (s_cap - 1)
        n = src_lens[s]
        if n > d_slot:
            dst_ctl[R_OVERSIZE_DROPS] += 1
        else:
            if d_tail - d_head >= d_cap:
                d_head = dst_ctl[R_HEAD]
                fence_acquire()
            if d_tail - d_head >= d_cap:
                dst_ctl[R_FULL_DROPS] += 1
            else:
                d = d_tail & (d_cap - 1)
                array_copy(dst_data[d], 0, src_data[s], 0, n)
                dst_lens[d] = n
                d_tail += 1
                moved += 1
        s_head += 1
    fence_release()  # slot contents before the tail that publishes them
    dst_ctl[R_TAIL] = d_tail
    return moved


@kernel
def ring_to_pcap(data, lens, ctl, out, ts_sec, ts_usec, snaplen):
    """pcap records for the ring's frames (header stripped, cut at snaplen) into out, as many
    as fit; those frames leave the ring. Returns bytes written to out."""
    cap = lens.shape[0]
    head = ctl[R_HEAD]
    tail = ctl[R_TAIL]
    fence_acquire()
    pos = 0
    while head != tail:
        s = head & (cap - 1)
        orig = lens[s] - HDR
        incl = min(orig, snaplen)
        if pos + PCAP_RECORD_HDR + incl > out.shape[0]:
            break
        put_u32(out, pos, ts_sec)
        put_u32(out, pos + 4, ts_usec)
        put_u32(out, pos + 8, incl)
        put_u32(out, pos + 12, orig)
        pos += PCAP_RECORD_HDR
        array_copy(out, pos, data[s], HDR, incl)
        pos += incl
        head += 1
    fence_release()
    ctl[R_HEAD] = head
    return pos


HUGE_PAGE = 2 << 20


def huge_page_zeros(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed uint8 array in anonymous memory that asks for transparent huge pages.

    Why: a frame ring's slots are touched a line or two at a time all over it (1.6 MB for
    1024 slots); in 4 KiB pages, placed wherever the kernel had them, how those lines fall
    on the cache's sets changes from one process to the next, while one huge page is one
    physically contiguous block, the same every time (and one TLB entry). (Tried against
    the 64-byte loopback's two speeds, about 8 or 3.5 Mpps: they stayed,
    so they come from elsewhere; docs/benchmark.md.)"""
    nbytes = max(shape[0] * shape[1], 1)
    area = mmap.mmap(-1, (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE,
                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP off in this kernel: 4 KiB pages, as np.zeros would give
            pass
    return np.frombuffer(area, dtype=np.uint8, count=nbytes).reshape(shape)


def new_ring(capacity: int, slot_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, lens, ctl) of an empty frame ring; capacity is rounded up to a power of two."""
    cap = 1 << max(0, (capacity - 1).bit_length())
    return (huge_page_zeros((cap, slot_size)), np.zeros(cap, dtype=np.int64),
            np.zeros(RING_CTL_LEN, dtype=np.int64))


@kernel
def rx_generate_poll(mem, q, views, mergeable, max_frames, max_cycles, idle_cycles, leave,
                     seg_addr, seg_len, seg_flags, chain_heads, chain_ends, data, lens, ctl,
                     counters):
    """The gen:SIZE source under a poll window (`ring/poll.py`): make the repeating ring full
    again (every slot holds the same frame, so that is one store) and deliver, burst after
    burst, for up to max_cycles; while the guest has no buffers, look again for up to
    idle_cycles (0: return at once). Leaves after the burst that wants an interrupt or when
    `leave` is raised. Returns (used buffers, interrupt?); buffers -1: the queue broke.
    """
    buffers = 0
    start = read_cycles()
    last_work = start
    while True:
        ctl[R_TAIL] = ctl[R_HEAD] + lens.shape[0]
        frames, used, notify = rx_deliver(mem, q, views, mergeable, max_frames, seg_addr,
                                          seg_len, seg_flags, chain_heads, chain_ends, data,
                                          lens, ctl, counters)
        if frames < 0:
            return -1, False
        buffers += used
        if notify:
            return buffers, True
        go_on, last_work = window_goes_on(leave, frames > 0, start, last_work, max_cycles,
                                          idle_cycles)
        if not go_on:
            return buffers, False
