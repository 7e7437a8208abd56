"""A virtio-net device (virtio 1.x section 5.1).

Queues come in pairs: even index = receiveq (device -> driver), odd index = transmitq
(driver -> device) (5.1.2). Every TX chain is counted (one packet; its bytes are the chain
length less the 12-byte virtio_net_hdr that VERSION_1 always puts first, 5.1.6) and completed
with used length 0, since the device wrote nothing. Where the frames go is the TX sink: "drop"
(this module's compiled drop kernel), "tap:NAME" or "pcap:FILE"; where received frames come
from is the RX source: none, "tap:NAME" or "loopback" (`endpoints.py`, which serves both).

Queue 2N (N queue pairs) is the control queue (CTRL_VQ, `net_ctrl.py`): the RX-mode, MAC
table and announce commands a Linux guest sends are acknowledged, and with N > 1 VIRTIO_NET_F_MQ
is offered (it requires CTRL_VQ, 5.1.3.1). The config space is mac, status (link up),
max_virtqueue_pairs and mtu (offered as VIRTIO_NET_F_MTU only when an MTU is given). QEMU and
DPDK virtio-user emulate the control queue themselves and never hand it to a vhost-user
back-end; a front-end that does gets it served here.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from pyvhost.devices.net import tx_drop as NK
from pyvhost.device import Device, Request
from pyvhost.devices.net.ctrl import (VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
                                      VIRTIO_NET_F_GUEST_ANNOUNCE, ControlQueue)
from pyvhost.devices.net.endpoints import Endpoints, NetIo
from pyvhost.memory.table import KernelMemory, RegionTable
from pyvhost.protocol import FrontendRequest, Payload
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.ring.direct_map import NO_VIEWS, RingViews
from pyvhost.ring.jit import overload_entry
from pyvhost.ring.layout import (VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1,
                                 VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC)
from pyvhost.ring.poll import PollWindow, one_pass_window
from pyvhost.ring.split_queue import SplitQueue

# Feature bits (5.1.3).
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1

DEFAULT_MAC = b"\x52\x54\x00\x12\x34\x56"


class TxScratch:
    """Per-queue arrays the compiled TX burst fills (allocated once, reused every burst)."""

    def __init__(self, max_burst: int) -> None:
        self.max_burst = max_burst
        self.heads = np.zeros(max_burst, dtype=np.int64)
        self.chain_end = np.zeros(max_burst, dtype=np.int64)
        self.hosts = np.zeros(max_burst, dtype=np.int64)
        self.frame = np.zeros(NK.HEADER_BYTES, dtype=np.uint8)
        self.resize(1024)

    def resize(self, queue_size: int) -> None:
        segs = self.max_burst * 4 + queue_size
        self.seg_addr = np.zeros(segs, dtype=np.int64)
        self.seg_len = np.zeros(segs, dtype=np.int64)
        self.seg_flags = np.zeros(segs, dtype=np.int64)


class NetDevice(Device):
    name = "net"
    device_id = 1
    # IN_ORDER (2.7.9): every queue uses its buffers in the order they were made available
    # (TX chains are popped and completed in turn, RX frames fill chains in turn, and a frame
    # that does not fit gives its chains back unused), so it is offered: DPDK's virtio PMD
    # then frees TX buffers without reading the used ring entry by entry.
    device_features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_IN_ORDER)
                       | (1 << VIRTIO_RING_F_EVENT_IDX)
                       | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_NET_F_MAC)
                       | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
                       | (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_CTRL_RX)
                       | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR) | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE))
    protocol_features = ProtocolFeature.MQ.mask | ProtocolFeature.CONFIG.mask
    polls_in_kernel = True  # the TX drop sink and the RX generator keep polling (ring/poll.py)

    def __init__(self, queue_pairs: int = 1, sink: str = "drop", mac: bytes = DEFAULT_MAC,
                 max_burst: int = 256, *, mtu: int | None = None, source: str | None = None,
                 endpoints: Endpoints | None = None, rx_backlog: int = 1024,
                 tap_io: str = "auto") -> None:
        super().__init__()
        if queue_pairs < 1 or len(mac) != 6:
            raise ValueError("need at least one queue pair and a 6-byte MAC")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} outside 68..65535")
        self.sink = sink
        self.mac = bytes(mac)
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs + 1  # the control queue is the last one
        self.ctrl_index = 2 * queue_pairs
        self.mtu = mtu
        self.device_features = type(self).device_features | (
            (1 << VIRTIO_NET_F_MQ) if queue_pairs > 1 else 0) | (
            (1 << VIRTIO_NET_F_MTU) if mtu is not None else 0)
        self.ctrl = ControlQueue(queue_pairs, self._set_mac)
        self._initial_mac = self.mac
        self.max_burst = max_burst
        # Per queue: counters of chains processed while enabled, and of those discarded while
        # disabled (tx_drop.C_* slots; only TX rows are used).
        self.counters = np.zeros((self.num_queues, NK.COUNTERS_LEN), dtype=np.int64)
        self.discarded = np.zeros((self.num_queues, NK.COUNTERS_LEN), dtype=np.int64)
        self._scratch = {i: TxScratch(max_burst) for i in range(1, self.num_queues, 2)}
        self._drop_entry: dict[bool, Any] = {}  # compiled tx_drop_poll by views kind (_drop)
        self._one_pass = one_pass_window()  # calls without a window: drain, then return
        # TX sinks other than drop, and RX sources. Raises ValueError on a bad sink or source.
        self.io = NetIo(queue_pairs, sink, source, endpoints=endpoints, mtu=mtu,
                        rx_backlog=rx_backlog, max_burst=max_burst, tap_io=tap_io)
        self.device_features |= self.io.offload_features  # offloads.py: a TAP's, if any

    @property
    def config(self) -> bytes:
        # struct virtio_net_config (5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, self.queue_pairs,
                                      self.mtu or 1500)

    def _set_mac(self, mac: bytes) -> None:
        self.mac = mac  # VIRTIO_NET_CTRL_MAC_ADDR_SET (5.1.6.5.2)

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.ctrl.features = features
        self.io.set_features(features)

    def reset(self) -> None:
        super().reset()
        self.ctrl.reset()
        self.mac = self._initial_mac
        self.io.reset()

    def warm_up(self) -> None:
        """The TX drop burst and the ring calls around it, the frame kernels when a sink or
        source uses them, and the request path the control queue takes."""
        super().warm_up()
        q = SplitQueue(1)
        q.set_size(1)
        table = RegionTable()
        self.process_burst(q, table, table.kernel(), NO_VIEWS)
        if self.io.gathers_tx or self.io.source is not None:
            from pyvhost.devices.net.endpoints import warm_up
            warm_up()

    def extra_wait_fds(self, index: int) -> tuple[int, ...]:
        return self.io.extra_wait_fds(index)  # a TAP or loopback feeding RX ring `index`

    @staticmethod
    def is_tx(index: int) -> bool:
        return index % 2 == 1

    def on_queue_started(self, queue: SplitQueue) -> None:
        if self.is_tx(queue.index):
            self._scratch[queue.index].resize(queue.size)
        self.io.on_queue_started(queue)

    def on_queue_stopped(self, queue: SplitQueue) -> None:
        self.io.on_queue_stopped(queue)

    def uses_burst_kernel(self, index: int) -> bool:
        return index != self.ctrl_index  # the control queue: handle(), one command a request

    def handle(self, queue: int, request: Request) -> int:
        return self.ctrl.serve(request)

    def frontend_message(self, request: FrontendRequest, payload: Payload) -> bool:
        # QEMU sends SEND_RARP after migration (without GUEST_ANNOUNCE) and NET_SET_MTU with
        # host_mtu; the frames and the MTU are the frontend's business here: accepted.
        return request in (FrontendRequest.SEND_RARP, FrontendRequest.NET_SET_MTU)

    def process_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews, window: PollWindow | None = None) -> tuple[int, bool]:
        window = window or self._one_pass
        if not self.is_tx(queue.index):
            mergeable = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
            return self.io.process_rx(queue, mem, views, mergeable, window)
        if self.io.gathers_tx:
            return self.io.process_tx(queue, mem, views, self.counters[queue.index], window)
        return self._drop(queue, mem, views, self.counters[queue.index], window)

    def partner_ring(self, index: int) -> int | None:
        # Loopback alone: TX ring 2k+1 and RX ring 2k in one loop (loop_kernels.loop_pair_poll).
        if self.is_tx(index) and index < self.ctrl_index and self.io.loops_in_pairs:
            return index - 1
        return None

    def process_pair(self, queue: SplitQueue, partner: SplitQueue, table: RegionTable,
                     mem: KernelMemory, views: RingViews, partner_views: RingViews,
                     window: PollWindow) -> tuple[int, bool, int, bool]:
        mergeable = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        return self.io.process_loop_pair(queue, partner, mem, views, partner_views, mergeable,
                                         self.counters[queue.index], window)

    def runs_when_disabled(self, index: int) -> bool:
        return self.is_tx(index)  # a disabled TX ring still consumes and drops (Ring states)

    def discard_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews, window: PollWindow | None = None) -> tuple[int, bool]:
        if not self.is_tx(queue.index):
            return 0, False
        return self._drop(queue, mem, views, self.discarded[queue.index],
                          window or self._one_pass)

    def _drop(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
              counters: np.ndarray, w: PollWindow) -> tuple[int, bool]:
        s = self._scratch[queue.index]
        args = (mem, queue.q, views, s.max_burst, w.cycles, w.idle_cycles, w.leave, s.heads,
                s.chain_end, s.seg_addr, s.seg_len, s.seg_flags, s.hosts, s.frame, counters)
        # Every argument but the views has one type for good (arrays this object or the region
        # table made); the views are either the copy path's NO_VIEWS or a direct map, whose
        # arrays have NO_VIEWS's types too unless numba sees them differently (alignment):
        # one cache entry for each, filled by a first call through numba's dispatcher.
        key = views is NO_VIEWS
        entry = self._drop_entry.get(key)
        if entry is None:
            done, notify = NK.tx_drop_poll(*args)
            self._drop_entry[key] = overload_entry(NK.tx_drop_poll, args) or NK.tx_drop_poll
        else:
            done, notify = entry(*args)
        return max(int(done), 0), bool(notify)

    def stats(self) -> dict[str, Any]:
        tx = self.counters[1::2]
        return {
            "tx_packets": int(tx[:, NK.C_PACKETS].sum()),
            "tx_bytes": int(tx[:, NK.C_BYTES].sum()),
            "tx_discarded": int(self.discarded[1::2, NK.C_PACKETS].sum()),
            "tx_ipv4": int(tx[:, NK.C_IPV4].sum()),
            "tx_ipv6": int(tx[:, NK.C_IPV6].sum()),
            "tx_udp": int(tx[:, NK.C_UDP].sum()),
            "tx_tcp": int(tx[:, NK.C_TCP].sum()),
            **self.io.stats(),  # rx_packets, rx_bytes, rx_dropped, tx_dropped, ...
            **self.ctrl.stats(),
        }
