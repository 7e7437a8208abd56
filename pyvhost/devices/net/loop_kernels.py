"""Compiled loopback (`--source loopback`): what the guest transmits on TX ring 2k+1 comes back
on RX ring 2k, through RX backlog k, with no Python per burst on either side.

The two rings may be served by different workers, so the backlog frame ring (`frame_kernels`,
single producer, single consumer) stays the only thing they share:
- TX (`loop_tx_poll`): `tx_gather` bursts copy each TX chain's header + frame straight into
  the free slots of the RX backlog (one copy; a frame that finds the backlog full is dropped
  and counted there, R_FULL_DROPS) and complete the chains; after the last burst of the call,
  if frames were queued, one write(2) to the wake-up eventfd the RX ring's worker sleeps on.
- RX (`loop_rx_poll`): read (clear) that eventfd, then `rx_deliver` the backlog into the
  guest's buffers, burst after burst under the poll window.

When one worker serves both rings (`Device.partner_ring`), `loop_pair_poll` runs them in one
loop instead: a TX burst into the backlog, then at once a delivery of it, and again. Frames
then cross in one burst's time rather than one worker pass's (two returns to Python, and a TX
window that first polls its ring dry), which is what a closed loop's rate is made of: measured
against virtio-user in io forwarding, the two kernels apart reached 0.4-0.8x DPDK's vhost PMD.
"""

from __future__ import annotations

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.ring.fdcalls import sys_read, sys_write
from pyvhost.ring.jit import kernel
from pyvhost.ring.poll import read_cycles, window_goes_on

# Chains per TX burst of loop_pair_poll (DPDK's burst). Each burst prefetches the lines of its
# frames before copying them, and of the RX buffers before filling them: 32 frames ask for
# about 64 lines at once, what a core can have in flight; 256 asked for far more (the rest of
# the hints are dropped), and a frame waited for a longer burst before crossing.
PAIR_BURST = 32


@kernel
def loop_tx_poll(mem, q, views, wake_fd, max_chains, max_cycles, idle_cycles, leave, heads,
                 chain_end, seg_addr, seg_len, seg_flags, hosts, data, lens, ctl, counters,
                 extra, one):
    """TX chains into the RX backlog (data, lens, ctl) for up to max_cycles, until the ring
    stayed empty for idle_cycles, the driver wants an interrupt or `leave` is raised; then
    signal wake_fd (an eventfd; `one` holds the uint64 1 it adds) if frames were queued.
    Returns (chains done, interrupt?); chains -1: the queue broke."""
    done = 0
    notify = False
    queued_before = ctl[RK.R_TAIL]
    start = read_cycles()
    last_work = start
    while True:
        n, notify = RK.tx_gather(mem, q, views, max_chains, heads, chain_end, seg_addr,
                                 seg_len, seg_flags, hosts, data, lens, ctl, counters, extra)
        if n < 0:
            return -1, False
        done += n
        if notify:
            break
        go_on, last_work = window_goes_on(leave, n > 0, start, last_work, max_cycles,
                                          idle_cycles)
        if not go_on:
            break
    if ctl[RK.R_TAIL] != queued_before:
        sys_write(wake_fd, one.ctypes.data, 8)  # EAGAIN (counter full) still wakes: ignored
    return done, notify


@kernel
def loop_rx_poll(mem, q, views, wake_fd, mergeable, max_frames, max_cycles, idle_cycles, leave,
                 seg_addr, seg_len, seg_flags, chain_heads, chain_ends, data, lens, ctl,
                 counters, scratch):
    """Clear the wake-up eventfd, then deliver the backlog under the poll window. Returns
    (used buffers, interrupt?); buffers -1: the queue broke."""
    sys_read(wake_fd, scratch.ctypes.data, 8)  # EAGAIN when nothing signalled: fine
    buffers = 0
    start = read_cycles()
    last_work = start
    while True:
        frames = 0
        if ctl[RK.R_TAIL] != ctl[RK.R_HEAD]:
            frames, used, notify = RK.rx_deliver(mem, q, views, mergeable, max_frames, seg_addr,
                                                 seg_len, seg_flags, chain_heads, chain_ends,
                                                 data, lens, ctl, counters)
            if frames < 0:
                return -1, False
            buffers += used
            if notify:
                return buffers, True
        go_on, last_work = window_goes_on(leave, frames > 0, start, last_work, max_cycles,
                                          idle_cycles)
        if not go_on:
            return buffers, False


@kernel
def loop_pair_poll(mem, txq, tx_views, rxq, rx_views, wake_fd, mergeable, max_chains,
                   max_cycles, idle_cycles, leave, tx_heads, tx_end, tx_addr, tx_len, tx_flags,
                   tx_hosts, rx_addr, rx_len, rx_flags, chain_heads, chain_ends, data, lens, ctl,
                   tx_counters, extra, rx_counters, one):
    """TX ring txq looped into RX ring rxq by one thread: a `tx_gather` burst into the backlog,
    then `rx_deliver` of the backlog, under the poll window (as loop_tx_poll). Returns (TX
    chains, TX interrupt?, RX buffers, RX interrupt?); a count of -1: that queue broke (the
    other's figures stand). Frames the RX ring had no buffers for stay in the backlog, and
    wake_fd is signalled so that the RX ring's own round delivers them."""
    chains = 0
    buffers = 0
    tx_notify = False
    rx_notify = False
    cap = lens.shape[0]
    start = read_cycles()
    last_work = start
    while True:
        n, tx_notify = RK.tx_gather(mem, txq, tx_views, max_chains, tx_heads, tx_end, tx_addr,
                                    tx_len, tx_flags, tx_hosts, data, lens, ctl, tx_counters,
                                    extra)
        if n < 0:
            return -1, False, buffers, rx_notify
        chains += n
        frames = 0
        if ctl[RK.R_TAIL] != ctl[RK.R_HEAD]:
            frames, used, notify = RK.rx_deliver(mem, rxq, rx_views, mergeable, max_chains,
                                                 rx_addr, rx_len, rx_flags, chain_heads,
                                                 chain_ends, data, lens, ctl, rx_counters)
            if frames < 0:
                return chains, tx_notify, -1, False
            buffers += used
            rx_notify = rx_notify or notify
        tail = ctl[RK.R_TAIL]
        if tail == ctl[RK.R_HEAD] and tail & (cap - 1) != 0:
            # Empty: the next burst starts again at slot 0 (both positions move to the next
            # multiple of the capacity; this thread is the ring's only producer and consumer).
            # Frames then cross through the same few slots, which stay in this core's cache,
            # as DPDK's mbufs do (its mempool cache is LIFO). Walking the whole backlog instead
            # (1024 slots of 2 KiB, more than the L2) ran the 1518-byte loopback at 3-4.7 Mpps
            # where a 64-frame backlog ran at 7-9 (docs/benchmark.md).
            tail = (tail + cap - 1) & ~(cap - 1)
            ctl[RK.R_TAIL] = tail
            ctl[RK.R_HEAD] = tail
        if tx_notify or rx_notify:
            break
        go_on, last_work = window_goes_on(leave, n > 0 or frames > 0, start, last_work,
                                          max_cycles, idle_cycles)
        if not go_on:
            break
    if ctl[RK.R_TAIL] != ctl[RK.R_HEAD]:
        sys_write(wake_fd, one.ctypes.data, 8)
    return chains, tx_notify, buffers, rx_notify


def eventfd_one() -> np.ndarray:
    """The 8 bytes an eventfd write adds 1 with."""
    return np.ones(1, dtype=np.uint64)

