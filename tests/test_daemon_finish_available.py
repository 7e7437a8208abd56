"""Chains a driver made available before SET_VRING_ENABLE 0 or GET_VRING_BASE are consumed as
the ring was running them, before the request takes effect (issue #15, `_finish_available`).

The worker has not reached them yet: here, deterministically, because the driver published
them without kicking a sleeping interrupt-mode worker (with DPDK virtio-user it was a wake-up
that had not happened yet when the request came: one connection in five to eight ended a
32-frame burst short in tx_packets). Before the fix, disabling switched the ring to discarding
at once (the chains were counted as tx_discarded), and stopping left them in the ring.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Iterator

import pytest

from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import VIRTIO_F_VERSION_1
from pyvhost.testing.churn import DaemonThread
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

TX = 1
FRAME = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00" + bytes(50)


@pytest.fixture
def session() -> Iterator[tuple[DaemonThread, VhostUserFrontend, MockSplitQueue]]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d, \
            DaemonThread(os.path.join(d, "net.sock")) as daemon, \
            GuestRam([(0, 4 << 20)]) as ram, VhostUserFrontend(daemon.path) as fe:
        fe.negotiate(1 << VIRTIO_F_VERSION_1, P.REPLY_ACK.mask | P.MQ.mask)
        fe.set_mem_table(ram)
        tx = MockSplitQueue(ram, 64)
        fe.setup_queue(TX, tx)
        fe.enable_queue(TX)
        fe.send_frames(TX, [FRAME[12:]] * 100)  # kicks: the worker runs, then goes to sleep
        fe.wait_tx_done(TX)
        backend = daemon.server.current
        assert backend is not None
        deadline = time.monotonic() + 10
        while backend.workers[0].sleeps == 0:
            assert time.monotonic() < deadline, "the worker did not go to sleep"
            time.sleep(0.01)
        time.sleep(0.05)
        for _ in range(20):  # published, not kicked: the sleeping worker has not seen them
            tx.add_chain([FRAME], [])
        tx.publish()
        yield daemon, fe, tx


def test_disable_processes_what_came_while_enabled(session):
    daemon, fe, tx = session
    fe.enable_queue(TX, False)
    assert fe.get_vring_base(TX) == 120
    stats = daemon.server.stats()
    assert (stats["tx_packets"], stats["tx_discarded"]) == (120, 0)
    assert tx.used_idx() == 120


def test_get_vring_base_consumes_what_came_before_it(session):
    daemon, fe, tx = session
    assert fe.get_vring_base(TX) == 120
    stats = daemon.server.stats()
    assert (stats["tx_packets"], stats["tx_discarded"]) == (120, 0)
