"""VIRTIO_F_IN_ORDER (virtio 1.x 2.7.9): the net device offers it and then uses every queue's
buffers in the order they were made available.

Through the real daemon and the Python front-end: TX chains come back in ring order (and the
used ring says so entry by entry), RX frames fill mergeable buffers in ring order, a frame that
has to wait gives its buffers back untouched, and a receive buffer without a writable byte amid
a frame's buffers — which could only be returned out of order — stops that queue with its own
error while the other queue and the daemon go on. Without IN_ORDER the same buffer is returned
with length 0 as before.
"""

from __future__ import annotations

import time

import pytest

from pyvhost.devices.net.device import NetDevice
from pyvhost.ring.layout import VIRTIO_F_IN_ORDER
from test_net_rx import BASE, EVENT_IDX, MRG, _compiled, frame, make, wait_until  # noqa: F401

IN_ORDER = 1 << VIRTIO_F_IN_ORDER


def test_the_net_device_offers_in_order():
    assert NetDevice().device_features & IN_ORDER


@pytest.mark.parametrize("features", [BASE | MRG | IN_ORDER, BASE | MRG | EVENT_IDX | IN_ORDER],
                         ids=["in_order", "in_order+event_idx"])
def test_tx_and_rx_buffers_are_used_in_ring_order(make, features):
    d = make(features)
    assert d.features & IN_ORDER
    rx, tx = d.fe.driver(0), d.fe.driver(1)
    rx_heads = [rx.add_chain([], [256]) for _ in range(60)]  # 1526-byte frames need 6 each
    rx.publish()
    d.fe.kick(0)
    frames = [frame(i, 1514) for i in range(10)]
    tx_heads = [tx.add_chain([bytes(12) + f], []) for f in frames]  # virtio-net header first
    tx.publish()
    d.fe.kick(1)
    used_tx: list[int] = []
    wait_until(lambda: used_tx.extend(h for h, _ in tx.used()) or len(used_tx) == 10,
               "10 TX chains back")
    assert used_tx == tx_heads
    got: list[tuple[int, int]] = []
    wait_until(lambda: got.extend(rx.used()) or len(got) == 60, "60 RX buffers used")
    assert [h for h, _ in got] == rx_heads
    assert all(n == 256 for _, n in got[:5]) and got[5][1] == 1526 - 5 * 256
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"], s["queues_broken"]) == (10, 10, 0)


def test_a_frame_that_must_wait_gives_its_buffers_back_in_order(make):
    d = make(BASE | MRG | EVENT_IDX | IN_ORDER)
    d.send([frame(1, 1514)])
    d.fe.post_rx_buffers(0, 3, 256)  # 3 of the 7 buffers it needs
    wait_until(lambda: d.stats()["rx_backlog_waits"] >= 1, "the frame to wait")
    d.fe.post_rx_buffers(0, 4, 256)
    assert d.receive(1) == [frame(1, 1514)]
    assert d.close()["queues_broken"] == 0


def _read_only_buffer_amid_a_frame(d) -> list[int]:
    """RX heads: a good buffer, a read-only one, ten good ones; then a frame needing six."""
    rx = d.fe.driver(0)
    heads = [rx.add_chain([], [256]), rx.add_chain([b"\0" * 64], [])]  # no writable byte
    heads += [rx.add_chain([], [256]) for _ in range(10)]
    rx.publish()
    d.fe.kick(0)
    d.send([frame(2, 1514)])  # 1526 bytes with the header: six buffers
    return heads


def test_with_in_order_a_read_only_receive_buffer_amid_a_frame_stops_that_queue(make):
    d = make(BASE | MRG | IN_ORDER)
    _read_only_buffer_amid_a_frame(d)
    wait_until(lambda: d.stats()["queues_broken"] == 1, "the RX queue to break")
    assert d.fe.driver(0).used() == []  # nothing written out of order
    d.send([frame(3, 100)])  # the TX queue still serves
    s = d.close()
    assert (s["tx_packets"], s["rx_packets"], s["queues_broken"]) == (2, 0, 1)


def test_without_in_order_the_read_only_buffer_is_returned_first_with_length_0(make):
    d = make(BASE | MRG)
    assert not d.features & IN_ORDER
    heads = _read_only_buffer_amid_a_frame(d)
    got: list[tuple[int, int]] = []
    wait_until(lambda: got.extend(d.fe.driver(0).used()) or len(got) >= 7, "7 used buffers")
    time.sleep(0.05)
    got += d.fe.driver(0).used()
    # The read-only buffer first with length 0, then the frame's six in ring order.
    assert got == [(heads[1], 0), (heads[0], 256)] + [(h, 256) for h in heads[2:6]] + [
        (heads[6], 1526 - 5 * 256)]
    s = d.close()
    assert (s["rx_packets"], s["rx_bad_buffers"], s["queues_broken"]) == (1, 1, 0)
