"""RX into the guest, through the real daemon and the Python front-end: the loopback source.

What the front-end transmits on TX queue 2k+1 comes back on RX queue 2k. The tests check that
frames arrive whole and in order in mergeable buffers (one or many per frame) and in
non-mergeable ones, that the bounded backlog keeps the first frames and counts the rest as
dropped while the guest has no buffers, that waiting frames go in when the guest refills
(its kick), including the EVENT_IDX case where buffers are available but too few, and that it
all works when the TX and RX rings are on different workers and on the copy path.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable

import pytest

from pyvhost.daemon.backend import BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.devices.net.device import VIRTIO_NET_F_MRG_RXBUF, NetDevice
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                                 VIRTIO_RING_F_INDIRECT_DESC)
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

MiB = 1 << 20
DEADLINE = 15.0
HDR = 12
PROTOCOL = P.REPLY_ACK.mask | P.MQ.mask | P.CONFIG.mask | P.CONFIGURE_MEM_SLOTS.mask
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
BASE = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile the RX/TX kernels before any daemon runs (a first burst would take seconds)."""
    from pyvhost.devices.net.endpoints import warm_up
    warm_up()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def frame(i: int, size: int) -> bytes:
    """An Ethernet frame of `size` bytes numbered i (IPv4/UDP-looking, payload a pattern)."""
    head = (b"\x52\x54\x00\x00\x00\x02" + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00"
            + struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, i & 0xFFFF, 0, 64, 17, 0,
                          b"\xc0\x00\x02\x01", b"\xc0\x00\x02\x02") + struct.pack("!I", i))
    body = bytes((i + k) & 0xFF for k in range(max(0, size - len(head))))
    return (head + body)[:size]


class Daemon:
    """NetDevice(**device) served on a thread; a front-end with RAM, RX ring 0, TX ring 1."""

    def __init__(self, path: str, features: int, *, rx_size: int = 256, tx_size: int = 256,
                 options: BackendOptions = BackendOptions(), **device) -> None:
        device.setdefault("source", "loopback")
        self.server = Server(lambda: NetDevice(1, **device), path, options=options,
                             max_connections=1)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.ram = GuestRam([(0, 16 * MiB)])
        self.fe = VhostUserFrontend(path)
        self.features = self.fe.negotiate(features, PROTOCOL).features
        event_idx = bool(self.features & EVENT_IDX)
        self.fe.set_mem_table(self.ram)
        self.fe.setup_queue(0, MockSplitQueue(self.ram, rx_size, event_idx=event_idx))
        self.fe.setup_queue(1, MockSplitQueue(self.ram, tx_size, event_idx=event_idx))
        self.fe.enable_queue(0)
        self.fe.enable_queue(1)
        self.received: list[bytes] = []

    def stats(self) -> dict:
        return self.server.stats()

    def send(self, frames: list[bytes]) -> None:
        self.fe.send_frames(1, frames)
        self.fe.wait_tx_done(1)

    def receive(self, n: int, what: str = "frames") -> list[bytes]:
        """Collect until n frames have arrived in total; returns everything so far."""
        def got() -> bool:
            self.received += self.fe.received_frames(0)
            return len(self.received) >= n
        wait_until(got, f"{n} {what} (have {len(self.received)})")
        return self.received

    def receive_refilling(self, n: int) -> list[bytes]:
        """Collect n frames from RX ring 0, giving back a 2048-byte buffer for each one used."""
        received: list[bytes] = []
        deadline = time.monotonic() + DEADLINE
        while len(received) < n:
            assert time.monotonic() < deadline, f"{len(received)} of {n} frames"
            received += self.fe.received_frames(0)
            drv = self.fe.driver(0)
            if drv.num_free:
                self.fe.post_rx_buffers(0, drv.num_free, 2048)
            time.sleep(0.001)
        return received

    def close(self) -> dict:
        self.fe.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        self.ram.close()
        return self.server.stats()


@pytest.fixture
def make(tmp_path):
    made: list[Daemon] = []

    def _make(features: int, **kw) -> Daemon:
        d = Daemon(str(tmp_path / f"net{len(made)}.sock"), features, **kw)
        made.append(d)
        return d

    yield _make
    for d in made:
        if not d.fe.closed:
            d.close()


@pytest.mark.parametrize("features", [BASE | MRG, BASE | MRG | EVENT_IDX],
                         ids=["mergeable", "mergeable+event_idx"])
def test_loopback_mergeable_one_buffer_per_frame(make, features):
    d = make(features)
    d.fe.post_rx_buffers(0, 200, 2048)
    frames = [frame(i, size) for i, size in enumerate([60, 64, 1514, 100, 1000] * 30)]
    d.send(frames)
    assert d.receive(len(frames)) == frames
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"]) == (150, 150)
    assert s["rx_bytes"] == sum(map(len, frames)) == s["tx_bytes"]
    assert (s["rx_dropped"], s["queues_broken"]) == (0, 0)


@pytest.mark.parametrize("features", [BASE | MRG, BASE | MRG | EVENT_IDX],
                         ids=["mergeable", "mergeable+event_idx"])
def test_loopback_frames_spanning_many_small_buffers(make, features):
    d = make(features)
    d.fe.post_rx_buffers(0, 250, 256)
    frames = [frame(i, 1514) for i in range(30)]  # 1526 bytes with the header: 6 buffers
    d.send(frames)
    assert d.receive(30) == frames
    s = d.close()
    assert s["rx_packets"] == 30 and s["rx_dropped"] == 0


def test_refill_with_too_few_buffers_then_enough_event_idx(make):
    """A frame needs 7 buffers; 3 are there (too few: it waits), then 4 more come: the second
    refill must be kicked (avail_event past the buffers already seen) and the frame delivered."""
    d = make(BASE | MRG | EVENT_IDX)
    f = frame(7, 1514)
    d.send([f])
    d.fe.post_rx_buffers(0, 3, 256)
    wait_until(lambda: d.stats()["rx_backlog_waits"] >= 1, "the frame to wait for buffers")
    time.sleep(0.05)
    assert d.fe.received_frames(0) == []
    d.fe.post_rx_buffers(0, 4, 256)
    assert d.receive(1) == [f]


def test_non_mergeable_buffers_and_a_frame_too_big_for_them(make):
    d = make(BASE)
    assert not d.features & MRG
    d.fe.post_rx_buffers(0, 100, 1024)
    frames = [frame(0, 100), frame(1, 1514), frame(2, 1000), frame(3, 1012), frame(4, 1013)]
    d.send(frames)
    # 1514 + 12 and 1013 + 12 exceed 1024: dropped, the buffers reused for the next frames.
    assert d.receive(3) == [frames[0], frames[2], frames[3]]
    time.sleep(0.05)
    assert d.fe.received_frames(0) == []
    s = d.close()
    assert (s["rx_packets"], s["rx_dropped"]) == (3, 2)


def test_bounded_backlog_keeps_the_first_frames_and_counts_the_rest(make):
    d = make(BASE | MRG | EVENT_IDX, rx_backlog=8)
    frames = [frame(i, 200) for i in range(20)]
    d.send(frames)  # the guest has no RX buffers yet
    wait_until(lambda: d.stats()["rx_dropped"] == 12, "12 drops")
    d.fe.post_rx_buffers(0, 32, 2048)  # the refill kicks: the 8 waiting frames go in
    assert d.receive(8) == frames[:8]
    for k in range(8, 20, 4):  # with buffers, bursts that fit the backlog lose nothing
        d.send(frames[k:k + 4])
        assert d.receive(k + 4) == frames[:8] + frames[8:k + 4]
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"], s["rx_dropped"]) == (32, 20, 12)


def test_indirect_rx_chains_and_two_writable_buffers_per_chain(make):
    d = make(BASE | MRG)
    drv = d.fe.driver(0)
    for _ in range(20):
        drv.add_indirect_chain([], [10, 600])  # header split over two descriptors
    for _ in range(20):
        drv.add_chain([], [1000, 1000])
    drv.publish()
    d.fe.kick(0)
    frames = [frame(i, 1514) for i in range(12)]
    d.send(frames)
    assert d.receive(12) == frames


@pytest.mark.parametrize("metadata_access,poll", [("direct", False), ("copy", False),
                                                   ("auto", True)])
def test_two_workers_many_frames_in_order(make, metadata_access, poll):
    """TX and RX rings on different workers: the loopback eventfd wakes the RX worker (or it
    busy-polls)."""
    d = make(BASE | MRG | EVENT_IDX, rx_backlog=4096,
             options=BackendOptions(workers=2, metadata_access=metadata_access, poll=poll))
    frames = [frame(i, 64 + i % 1400) for i in range(3000)]
    stop = threading.Event()

    def refill() -> None:  # a guest that keeps its RX ring stocked
        drv = d.fe.driver(0)
        while not stop.is_set():
            if drv.num_free:
                d.fe.post_rx_buffers(0, drv.num_free, 2048)
            time.sleep(0.001)

    d.fe.post_rx_buffers(0, 256, 2048)
    d.send(frames)
    received = d.receive_refilling(len(frames))
    stop.set()
    assert received == frames
    s = d.close()
    assert s["rx_dropped"] == 0 and s["rx_packets"] == 3000
    if metadata_access == "copy":
        assert s["direct_rounds"] == 0


@pytest.mark.parametrize("metadata_access,poll", [("direct", False), ("copy", False),
                                                   ("direct", True)])
def test_one_worker_loops_both_rings_in_one_kernel(make, monkeypatch, metadata_access, poll):
    """One worker serves TX ring 1 and RX ring 0: NetDevice.process_pair runs both in one
    compiled loop (loop_kernels.loop_pair_poll); every frame arrives once, in order."""
    pair_calls = []
    real = NetDevice.process_pair

    def counting(self, *args, **kw):
        pair_calls.append(1)
        return real(self, *args, **kw)

    monkeypatch.setattr(NetDevice, "process_pair", counting)
    d = make(BASE | MRG | EVENT_IDX, rx_backlog=4096,
             options=BackendOptions(workers=1, metadata_access=metadata_access, poll=poll))
    frames = [frame(i, 64 + i % 1400) for i in range(3000)]
    d.fe.post_rx_buffers(0, 256, 2048)
    d.send(frames)
    received = d.receive_refilling(len(frames))
    assert received == frames
    s = d.close()
    assert s["rx_dropped"] == 0 and s["rx_packets"] == s["tx_packets"] == 3000
    assert pair_calls, "the worker never ran the pair kernel"


def test_pair_kernel_a_broken_rx_ring_stops_alone(make):
    """An RX buffer outside guest memory breaks RX ring 0 inside the pair kernel: that ring
    stops (reported), TX ring 1 goes on consuming and counting what the guest sends."""
    d = make(BASE | MRG, options=BackendOptions(workers=1))
    drv = d.fe.driver(0)
    drv.write_raw_desc(0, 1 << 40, 2048, 2, 0)  # device-writable, far outside the RAM
    drv.add_raw_head(0)
    drv.publish()
    d.fe.kick(0)
    d.send([frame(i, 64) for i in range(8)])
    wait_until(lambda: d.stats()["queues_broken"] == 1, "RX ring 0 to break")
    d.send([frame(i, 64) for i in range(8, 40)])
    s = d.close()
    assert s["tx_packets"] == 40 and s["rx_packets"] == 0


def test_no_source_delivers_nothing_and_drop_sink_still_counts(make):
    d = make(BASE | MRG, source=None)
    d.fe.post_rx_buffers(0, 10, 2048)
    d.send([frame(0, 64)] * 5)
    time.sleep(0.1)
    assert d.fe.received_frames(0) == []
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"]) == (5, 0)


def test_bad_endpoints_are_refused():
    with pytest.raises(ValueError):
        NetDevice(1, sink="nowhere")
    with pytest.raises(ValueError):
        NetDevice(1, sink="tap:")
    with pytest.raises(ValueError):
        NetDevice(1, source="pcap:x.pcap")
    with pytest.raises(ValueError):
        NetDevice(1, source="loopback:x")
    assert os.path.exists("/dev/net/tun")
