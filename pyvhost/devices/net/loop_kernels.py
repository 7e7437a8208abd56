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
"""

from __future__ import annotations

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.ring.fdcalls import sys_read, sys_write
from pyvhost.ring.jit import kernel
from pyvhost.ring.poll import read_cycles, window_goes_on


@kernel
def loop_tx_poll(mem, q, views, wake_fd, max_chains, max_cycles, idle_cycles, leave, seg_addr,
                 seg_len, seg_flags, data, lens, ctl, counters, extra, one):
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
        n, notify = RK.tx_gather(mem, q, views, max_chains, seg_addr, seg_len, seg_flags, data,
                                 lens, ctl, counters, extra)
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


def eventfd_one() -> np.ndarray:
    """The 8 bytes an eventfd write adds 1 with."""
    return np.ones(1, dtype=np.uint64)

