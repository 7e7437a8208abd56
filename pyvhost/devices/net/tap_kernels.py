"""Compiled TAP data paths: guest TX chains written to a TAP, TAP frames read for the guest.

Both run whole bursts, and keep bursting under a poll window (`ring/poll.py`), without the GIL
and without Python per frame; the system calls are libc's, called from the kernel
(`ring/fdcalls.py`). A TAP takes one frame per write and gives one per read (the 12-byte
virtio-net header first: IFF_VNET_HDR, TUNSETVNETHDRSZ 12).

TX (`tap_tx_poll`): pop a burst of TX chains; for each, one write whose iovecs are the
chain's device-readable buffers themselves, translated through the region table (the guest's
header and frame go to the TAP with no copy of ours: the kernel copies them once, into its
skb); once every write of the burst returned, complete the chains (used length 0), publish
them, decide on the interrupt. The writes are io_uring WRITEVs, the burst's in one
io_uring_enter(2) (`ring/uring.py`), when the queue has a ring; else one writev(2) a frame, as
DPDK's TAP PMD makes. A system call costs some 0.2-0.4 us on this machine kind against about
1 us of the TAP's own work per frame: batching them took 64-byte frames from 0.75-0.87 to
1.17-1.24 Mpps in a bare loop (one core, both ways alternated). A write the TAP refuses (a
header it rejects, the link down) is counted (TX_WRITE_ERRORS, the last errno kept) and the
chain completed all the same: a NIC drops what it cannot send.

RX (`tap_rx_poll`): the frames wait in the queue's bounded backlog frame ring
(`frame_kernels`), so RX keeps the semantics the rest of the device has: deliver the backlog
into the guest's buffers (`rx_deliver`, mergeable or not), read(2) up to a burst of TAP frames
into free backlog slots, deliver again; only when the backlog is still full after that (the
guest has no buffers) is up to a burst more read and dropped (counted), so an unread TAP fd
does not keep an interrupt-driven worker awake in a loop. A read the TAP refuses with
anything but EAGAIN is counted (R_READ_ERRORS, the errno in R_LAST_ERRNO).
"""

from __future__ import annotations

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.devices.net import tx_drop as NK
from pyvhost.ring import kernels as K
from pyvhost.ring import uring as U
from pyvhost.ring.barriers import fence_acquire, fence_release
from pyvhost.ring.fdcalls import EAGAIN, EINTR, errno_value, sys_read, sys_write, sys_writev
from pyvhost.ring.hostmem import store_u32
from pyvhost.ring.jit import inlined_kernel, kernel
from pyvhost.ring.poll import read_cycles, window_goes_on

# Linux's UIO_MAXIOV: a chain in more pieces than this is not written (counted oversize).
IOV_MAX = 1024
# Frames per TX burst: one write each (batched in one io_uring_enter, or writev), and the
# kernel runs the TAP's receive path in the writer's context, so a burst takes ~1 us a frame;
# the used ring is published after it. 32 (DPDK's burst) keeps the driver's TX ring from
# waiting on a long burst.
TAP_TX_BURST = 32


@inlined_kernel
def chain_iov(mem, seg_addr, seg_len, seg_flags, start, end, iov, at):
    """iovecs (base, length pairs in iov, from iovec `at` on) for the device-readable bytes of
    segments [start, end). Returns (iovecs, bytes); iovecs -1 when more pieces than iov holds
    past `at`."""
    count = 0
    total = 0
    cap = iov.shape[0] // 2 - at
    iov_base = 2 * at
    for j in range(start, end):
        if seg_flags[j] != 0:
            continue
        addr = seg_addr[j]
        want = seg_len[j]
        while want > 0:
            host, left = K.host_span(mem, K.SPACE_GPA, addr)
            if left <= 0 or count >= cap:  # (pop_chain checked the mapping: not unmapped)
                return -1, total + want
            take = min(left, want)
            iov[iov_base + 2 * count] = host
            iov[iov_base + 2 * count + 1] = take
            count += 1
            total += take
            addr += take
            want -= take
    return count, total


@inlined_kernel
def write_failed(extra):
    """After a write to the TAP returned -1: True to try it again (EINTR); otherwise the
    failure is counted (TX_WRITE_ERRORS, its errno in TX_LAST_ERRNO) and the frame dropped."""
    e = errno_value()
    if e == EINTR:
        return True
    extra[RK.TX_WRITE_ERRORS] += 1
    extra[RK.TX_LAST_ERRNO] = e
    return False


@inlined_kernel
def write_chain(fd, iov_addr, count, extra):
    """One writev(2) of a chain's iovecs; a failure is counted (write_failed)."""
    while sys_writev(fd, iov_addr, count) < 0 and write_failed(extra):
        pass


@inlined_kernel
def uring_flush(ur, sqes, cqes, cq_user, cq_res, extra):
    """Submit the WRITEVs prepared so far with one io_uring_enter(2) and wait for all of them
    (a TAP write completes during the submission itself: the kernel runs the TAP's receive
    path in the caller's context), so that their iovecs may be reused and their chains
    completed. Failed writes are counted as writev's. SQEs the kernel did not take (enter
    failed: short of memory) are withdrawn and written with writev(2) here instead."""
    pending = U.sq_publish(ur)
    if pending == 0:
        return
    U.enter(ur, pending, pending, U.IORING_ENTER_GETEVENTS)
    left = U.sq_unconsumed(ur)
    taken = pending - left
    if left > 0:
        tail = ur[U.UR_SQ_LOCAL_TAIL]
        head = (tail - left) & U.U32
        slot = head
        while slot != tail:
            b = (slot & ur[U.UR_SQ_MASK]) * U.SQE_WORDS
            write_chain(np.int64(sqes[b] >> np.uint64(32)), np.int64(sqes[b + 2]),
                        np.int64(sqes[b + 3] & np.uint64(U.U32)), extra)
            slot = (slot + 1) & U.U32
        # Only this thread submits and the kernel reads the tail in io_uring_enter alone:
        # moving it back withdraws the SQEs.
        ur[U.UR_SQ_LOCAL_TAIL] = head
        store_u32(ur[U.UR_SQ_TAIL], head)
    got = 0
    while got < taken:
        m = U.reap(ur, cqes, cq_user, cq_res, taken - got)
        for j in range(m):
            if cq_res[j] < 0:
                extra[RK.TX_WRITE_ERRORS] += 1
                extra[RK.TX_LAST_ERRNO] = -cq_res[j]
        got += m
        if m == 0:  # not yet posted (a write the kernel finishes later): wait for it
            U.enter(ur, 0, taken - got, U.IORING_ENTER_GETEVENTS)


@inlined_kernel
def tap_tx_burst(mem, q, views, fd, ur, sqes, cqes, max_chains, heads, chain_end, seg_addr,
                 seg_len, seg_flags, iov, cq_user, cq_res, scratch, counters, extra):
    """One TX burst to the TAP (see the module doc): with io_uring when `ur` is a ring (its fd
    >= 0), else one writev(2) a chain. Returns chains done (-1: queue broken)."""
    n = K.pop_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len, seg_flags)
    if n <= 0:
        return n
    uring = ur[U.UR_FD] >= 0
    iov_addr = iov.ctypes.data
    at = 0  # iovecs of this burst's prepared SQEs (io_uring) in iov so far
    start = 0
    for k in range(n):
        end = chain_end[k]
        count, total = chain_iov(mem, seg_addr, seg_len, seg_flags, start, end, iov, at)
        if count < 0 and at > 0 and total > RK.HDR:  # iov is full: send what is prepared
            uring_flush(ur, sqes, cqes, cq_user, cq_res, extra)
            at = 0
            count, total = chain_iov(mem, seg_addr, seg_len, seg_flags, start, end, iov, 0)
        counters[NK.C_BYTES] += max(total - RK.HDR, 0)
        if total <= RK.HDR:
            extra[RK.TX_SHORT] += 1
        elif count < 0:
            extra[RK.TX_OVERSIZE] += 1
        else:
            NK.classify_chain(mem, seg_addr, seg_len, seg_flags, start, end, scratch, counters)
            if not uring:
                write_chain(fd, iov_addr, count, extra)
            else:
                if U.sq_free(ur) <= 0:  # (the ring holds a burst: not expected)
                    uring_flush(ur, sqes, cqes, cq_user, cq_res, extra)
                U.prep(ur, sqes, U.OP_WRITEV, 0, fd, 0, iov_addr + 16 * at, count, 0, k)
                at += count
        start = end
    if uring:
        uring_flush(ur, sqes, cqes, cq_user, cq_res, extra)
    # Every write of the burst has returned: the chains' buffers are the driver's again.
    for k in range(n):
        if not K.add_used(mem, q, views, heads[k], 0):
            return -1
    counters[NK.C_PACKETS] += n
    if not K.publish_used(mem, q, views):
        return -1
    if K.needs_interrupt(mem, q, views):
        counters[NK.C_NOTIFY] += 1
    return n


@kernel
def tap_tx_poll(mem, q, views, fd, ur, sqes, cqes, max_chains, max_cycles, idle_cycles, leave,
                heads, chain_end, seg_addr, seg_len, seg_flags, iov, cq_user, cq_res, scratch,
                counters, extra):
    """tap_tx_burst for up to max_cycles, until the ring stayed empty for idle_cycles, the
    driver wants an interrupt or `leave` is raised (as tx_drop_poll). Returns (chains done,
    interrupt?); chains -1: the queue broke."""
    done = 0
    notify_before = counters[NK.C_NOTIFY]
    start = read_cycles()
    last_work = start
    while True:
        n = tap_tx_burst(mem, q, views, fd, ur, sqes, cqes, max_chains, heads, chain_end,
                         seg_addr, seg_len, seg_flags, iov, cq_user, cq_res, scratch, counters,
                         extra)
        if n < 0:
            return -1, False
        done += n
        if counters[NK.C_NOTIFY] != notify_before:
            break
        go_on, last_work = window_goes_on(leave, n > 0, start, last_work, max_cycles,
                                          idle_cycles)
        if not go_on:
            break
    return done, counters[NK.C_NOTIFY] != notify_before


# ------------------------------------------------------------------------------------ RX --

@inlined_kernel
def fill_from_fd(fd, data, lens, ctl, limit):
    """Producer side of a frame ring: read(2) up to `limit` frames from fd into free slots.
    Returns (frames read, whether the fd may hold more: stopped by the limit or a full ring).
    A frame that fills its slot (maybe cut short) or holds no more than a header is dropped
    and counted (R_OVERSIZE_DROPS)."""
    cap = lens.shape[0]
    slot_size = data.shape[1]
    base = data.ctypes.data
    tail = ctl[RK.R_TAIL]
    head = ctl[RK.R_HEAD]
    fence_acquire()  # slots the consumer released are free only after we saw its head
    got = 0
    more = True
    for _ in range(limit):
        if tail - head >= cap:
            head = ctl[RK.R_HEAD]
            fence_acquire()
            if tail - head >= cap:
                break
        slot = tail & (cap - 1)
        n = sys_read(fd, base + slot * slot_size, slot_size)
        if n < 0:
            e = errno_value()
            if e == EINTR:
                continue
            if e != EAGAIN:
                ctl[RK.R_READ_ERRORS] += 1
                ctl[RK.R_LAST_ERRNO] = e
            more = False
            break
        if n <= RK.HDR or n >= slot_size:
            ctl[RK.R_OVERSIZE_DROPS] += 1
            if n == 0:  # not a frame: nothing more to read now
                more = False
                break
            continue
        lens[slot] = n
        tail += 1
        got += 1
    fence_release()  # slot contents before the tail that publishes them
    ctl[RK.R_TAIL] = tail
    return got, more


@kernel
def drain_fd(fd, scratch, limit):
    """Read and discard up to `limit` frames from fd; returns how many."""
    n = 0
    base = scratch.ctypes.data
    for _ in range(limit):
        r = sys_read(fd, base, scratch.shape[0])
        if r < 0:
            if errno_value() == EINTR:
                continue
            break
        if r == 0:
            break
        n += 1
    return n


@inlined_kernel
def tap_rx_round(mem, q, views, fd, mergeable, max_frames, seg_addr, seg_len, seg_flags,
                 chain_heads, chain_ends, data, lens, ctl, drain, counters):
    """Deliver the backlog, read the TAP into it, deliver again, drop at the source if the
    backlog is still full. Returns (frames delivered, used buffers, interrupt?, frames read);
    frames -1: the queue broke."""
    frames = 0
    buffers = 0
    notify = False
    if ctl[RK.R_TAIL] != ctl[RK.R_HEAD]:
        f, used, nt = RK.rx_deliver(mem, q, views, mergeable, max_frames, seg_addr, seg_len,
                                    seg_flags, chain_heads, chain_ends, data, lens, ctl,
                                    counters)
        if f < 0:
            return -1, 0, False, 0
        frames += f
        buffers += used
        notify = nt
    read, more = fill_from_fd(fd, data, lens, ctl, max_frames)
    if read > 0:
        f, used, nt = RK.rx_deliver(mem, q, views, mergeable, max_frames, seg_addr, seg_len,
                                    seg_flags, chain_heads, chain_ends, data, lens, ctl,
                                    counters)
        if f < 0:
            return -1, 0, False, 0
        frames += f
        buffers += used
        notify = notify or nt
    if more and ctl[RK.R_TAIL] - ctl[RK.R_HEAD] >= lens.shape[0]:
        # The guest has no buffers and the backlog is full: drop at the source.
        ctl[RK.R_FULL_DROPS] += drain_fd(fd, drain, max_frames)
    return frames, buffers, notify, read


@kernel
def tap_rx_poll(mem, q, views, fd, mergeable, max_frames, max_cycles, idle_cycles, leave,
                seg_addr, seg_len, seg_flags, chain_heads, chain_ends, data, lens, ctl, drain,
                counters):
    """tap_rx_round under a poll window: for up to max_cycles, until nothing was read or
    delivered for idle_cycles (0: at once), the driver wants an interrupt or `leave` is raised.
    Returns (used buffers, interrupt?); buffers -1: the queue broke."""
    buffers = 0
    start = read_cycles()
    last_work = start
    while True:
        frames, used, notify, read = tap_rx_round(
            mem, q, views, fd, mergeable, max_frames, seg_addr, seg_len, seg_flags,
            chain_heads, chain_ends, data, lens, ctl, drain, counters)
        if frames < 0:
            return -1, False
        buffers += used
        if notify:
            return buffers, True
        go_on, last_work = window_goes_on(leave, frames > 0 or read > 0, start, last_work,
                                          max_cycles, idle_cycles)
        if not go_on:
            return buffers, False


@inlined_kernel
def ring_to_fd(fd, data, lens, ctl, extra):
    """Consumer side of a frame ring: write each pending frame with one write(2), empty the
    ring. Failed writes are counted in extra (TX_WRITE_ERRORS, TX_LAST_ERRNO). Returns frames
    written."""
    cap = lens.shape[0]
    slot_size = data.shape[1]
    base = data.ctypes.data
    head = ctl[RK.R_HEAD]
    tail = ctl[RK.R_TAIL]
    fence_acquire()
    ok = 0
    while head != tail:
        slot = head & (cap - 1)
        n = min(lens[slot], slot_size)
        while True:
            if sys_write(fd, base + slot * slot_size, n) >= 0:
                ok += 1
                break
            if not write_failed(extra):
                break
        head += 1
    fence_release()
    ctl[RK.R_HEAD] = head
    return ok

