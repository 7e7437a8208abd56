"""Compiled virtio-net TX kernels: the drop sink (the seed's xdp1 stand-in).

`tx_drop_poll` pops bursts of TX chains, reads each frame's Ethernet and IP headers through the
region table (buffers are guest-physical), counts them per IP protocol, completes them with used
length 0 (nothing was written), publishes the used index once per burst and decides on the
interrupt — all without the GIL. A call goes on bursting (and polling, for a busy-polling
worker) for a bounded time, and leaves after the current burst when its worker is asked to.
"""

from __future__ import annotations

import numpy as np

from pyvhost.ring import kernels as K
from pyvhost.ring.hostmem import load_u8, prefetch
from pyvhost.ring.jit import inlined_kernel, kernel
from pyvhost.ring.poll import read_cycles, window_goes_on

# Counter slots.
C_PACKETS = 0
C_BYTES = 1
C_IPV4 = 2
C_IPV6 = 3
C_ARP = 4
C_TCP = 5
C_UDP = 6
C_ICMP = 7
C_OTHER = 8
C_SHORT = 9      # frames too short to hold an Ethernet header
C_NOTIFY = 10    # interrupts the kernel asked for
COUNTERS_LEN = 16

VIRTIO_NET_HDR_LEN = 12  # virtio 1.x: struct virtio_net_hdr with num_buffers (5.1.6)
HEADER_BYTES = 64        # enough for virtio-net header + Ethernet + IPv4/IPv6 protocol field
# A first buffer this long holds every header classify_in_place reads (up to the IPv4
# protocol byte behind a VLAN tag), so the frame is classified where it lies.
IN_PLACE_MIN = VIRTIO_NET_HDR_LEN + 18 + 10

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100


@inlined_kernel
def gather_head(mem, seg_addr, seg_len, seg_flags, first, last, out):
    """Copy up to len(out) device-readable bytes of a chain into out; returns bytes copied."""
    got = 0
    for j in range(first, last):
        if seg_flags[j] != 0 or got >= out.shape[0]:
            break
        take = min(seg_len[j], out.shape[0] - got)
        if not K.copy_from_guest(mem, seg_addr[j], out[got:], take):
            return -1
        got += take
    return got


@inlined_kernel
def classify_frame(frame, n, counters):
    """Count one Ethernet frame (frame[0:n], virtio-net header already stripped) by protocol."""
    if n < 14:
        counters[C_SHORT] += 1
        return
    ethertype = (np.int64(frame[12]) << 8) | frame[13]
    l3 = 14
    if ethertype == ETH_P_8021Q and n >= 18:
        ethertype = (np.int64(frame[16]) << 8) | frame[17]
        l3 = 18
    proto = -1
    if ethertype == ETH_P_IP:
        counters[C_IPV4] += 1
        if n > l3 + 9:
            proto = frame[l3 + 9]
    elif ethertype == ETH_P_IPV6:
        counters[C_IPV6] += 1
        if n > l3 + 6:
            proto = frame[l3 + 6]
    elif ethertype == ETH_P_ARP:
        counters[C_ARP] += 1
        return
    count_l4(proto, counters)


@inlined_kernel
def count_l4(proto, counters):
    if proto == 6:
        counters[C_TCP] += 1
    elif proto == 17:
        counters[C_UDP] += 1
    elif proto == 1 or proto == 58:
        counters[C_ICMP] += 1
    else:
        counters[C_OTHER] += 1


@inlined_kernel
def classify_in_place(host, n, counters):
    """classify_frame for a frame lying contiguously at a host address (no copy): the common
    case, one descriptor holding the virtio-net header and the whole frame."""
    ethertype = (np.int64(load_u8(host + 12)) << 8) | load_u8(host + 13)
    l3 = 14
    if ethertype == ETH_P_8021Q:
        ethertype = (np.int64(load_u8(host + 16)) << 8) | load_u8(host + 17)
        l3 = 18
    if ethertype == ETH_P_IP:
        counters[C_IPV4] += 1
        count_l4(np.int64(load_u8(host + l3 + 9)), counters)
    elif ethertype == ETH_P_IPV6:
        counters[C_IPV6] += 1
        count_l4(np.int64(load_u8(host + l3 + 6)), counters)
    elif ethertype == ETH_P_ARP:
        counters[C_ARP] += 1
    else:
        count_l4(-1, counters)


@inlined_kernel
def classify_chain(mem, seg_addr, seg_len, seg_flags, start, end, scratch, counters):
    first = seg_len[start] if seg_flags[start] == 0 else 0
    if first >= IN_PLACE_MIN:
        host, left = K.host_span(mem, K.SPACE_GPA, seg_addr[start])
        if left >= first:
            classify_in_place(host + VIRTIO_NET_HDR_LEN, first - VIRTIO_NET_HDR_LEN, counters)
            return
    got = gather_head(mem, seg_addr, seg_len, seg_flags, start, end, scratch)
    if got > VIRTIO_NET_HDR_LEN:
        classify_frame(scratch[VIRTIO_NET_HDR_LEN:], got - VIRTIO_NET_HDR_LEN, counters)
    else:
        counters[C_SHORT] += 1


@inlined_kernel
def prefetch_headers(mem, seg_addr, seg_flags, chain_end, hosts, n):
    """Start loading the first cache line of every popped frame the fast path did not already
    (hosts[k] == 0). The driver's core has just written them, so each is a cache miss; issued
    together they overlap instead of stalling the classification of each frame in turn (what
    DPDK's rte_prefetch0 does in its bursts)."""
    start = 0
    for k in range(n):
        if hosts[k] == 0 and seg_flags[start] == 0:
            host, left = K.host_span(mem, K.SPACE_GPA, seg_addr[start])
            if left > VIRTIO_NET_HDR_LEN:
                prefetch(host + VIRTIO_NET_HDR_LEN)
        start = chain_end[k]


@inlined_kernel
def tx_drop_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len, seg_flags,
                  hosts, scratch, counters):
    """One burst: pop, classify, complete, publish. Returns chains done (-1: queue broken).

    Frames whose first buffer holds all their headers and that the direct map's fast path
    popped (hosts[k] != 0: DPDK's virtio PMD, Linux with small frames) are classified where
    they lie; any other chain is read through the region table.
    """
    n = K.pop_burst_hosts(mem, q, views, max_chains, IN_PLACE_MIN, VIRTIO_NET_HDR_LEN, heads,
                          chain_end, seg_addr, seg_len, seg_flags, hosts)
    if n <= 0:
        return n
    if hosts[n - 1] == 0:  # some chains took the general path
        prefetch_headers(mem, seg_addr, seg_flags, chain_end, hosts, n)
    start = 0
    for k in range(n):
        end = chain_end[k]
        if hosts[k] != 0:  # one readable buffer of IN_PLACE_MIN bytes or more
            length = seg_len[start] - VIRTIO_NET_HDR_LEN
            classify_in_place(hosts[k] + VIRTIO_NET_HDR_LEN, length, counters)
            counters[C_BYTES] += length
        else:
            total = 0
            for j in range(start, end):
                if seg_flags[j] == 0:
                    total += seg_len[j]
            classify_chain(mem, seg_addr, seg_len, seg_flags, start, end, scratch, counters)
            counters[C_BYTES] += max(total - VIRTIO_NET_HDR_LEN, 0)
        if not K.add_used(mem, q, views, heads[k], 0):
            return -1
        start = end
    counters[C_PACKETS] += n
    if not K.publish_used(mem, q, views):
        return -1
    if K.needs_interrupt(mem, q, views):
        counters[C_NOTIFY] += 1
    return n


@kernel
def tx_drop_poll(mem, q, views, max_chains, max_cycles, idle_cycles, leave, heads, chain_end,
                 seg_addr, seg_len, seg_flags, hosts, scratch, counters):
    """Bursts for up to max_cycles, until the ring stayed empty for idle_cycles (0: at once)
    (`ring/poll.py`).

    Returning to Python costs microseconds per call, so a busy-polling worker keeps polling
    here, without the GIL, while the driver catches up. It leaves after the burst in which the
    driver asked for an interrupt or `leave` was set (a writer waits: one burst at most).
    Returns (chains done, interrupt?); chains done -1: the queue broke.
    """
    done = 0
    notify_before = counters[C_NOTIFY]
    start = read_cycles()
    last_work = start
    while True:
        n = tx_drop_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len,
                          seg_flags, hosts, scratch, counters)
        if n < 0:
            return -1, False
        done += n
        if counters[C_NOTIFY] != notify_before:
            break
        go_on, last_work = window_goes_on(leave, n > 0, start, last_work, max_cycles,
                                          idle_cycles)
        if not go_on:
            break
    return done, counters[C_NOTIFY] != notify_before
