"""A restarted backend resumes rings the frontend kept (issue #15): at ring start, a base
(SET_VRING_BASE) that disagrees with the ring's own indices resumes from used->idx.

The frontend is `VhostUserFrontend` with `MockSplitQueue` rings in memfd RAM, the daemon the
real `Server` in a thread. A first connection moves 1000 frames through a 64-entry TX ring, so
both ring indices stand at 1000; with no backend, the driver then makes 40 more frames
available (avail 1040, 40 chains in flight). A second connection starts the same ring with the
base DPDK virtio-user sends after reconnecting in server mode, 0, or another one. Before the
fix the queue started at 0, found 1040 available (more than the ring holds) and broke: "avail
index moved too far (to 1040); queue stopped, device needs reset".
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import time
from typing import Iterator

import pytest

from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import USED_IDX, VIRTIO_F_VERSION_1
from pyvhost.testing.churn import DaemonThread
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

TX = 1
SIZE = 64
SENT_BEFORE = 1000
IN_FLIGHT = 40
FEATURES = 1 << VIRTIO_F_VERSION_1
PROTOCOL = P.REPLY_ACK.mask | P.MQ.mask | P.CONFIGURE_MEM_SLOTS.mask
RESYNCED = "resynchronised next avail to the used index"


def _frame(i: int) -> bytes:
    eth = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00"
    return eth + struct.pack("!I", i) + bytes(46)


@pytest.fixture
def daemon() -> Iterator[DaemonThread]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # short: sun_path holds 108 bytes
        with DaemonThread(os.path.join(d, "net.sock")) as dt:
            yield dt


@pytest.fixture
def kept_ring(daemon: DaemonThread) -> Iterator[tuple[GuestRam, MockSplitQueue]]:
    """RAM and a TX ring after a first connection: used = 1000, avail = 1040 (40 in flight)."""
    with GuestRam([(0, 4 << 20)]) as ram:
        tx = MockSplitQueue(ram, SIZE)
        with _connect(daemon, ram) as fe:
            fe.setup_queue(TX, tx)
            fe.enable_queue(TX)
            fe.send_frames(TX, [_frame(i) for i in range(SENT_BEFORE)])
            fe.wait_tx_done(TX)
        daemon.wait_idle(1)
        for i in range(IN_FLIGHT):  # the driver goes on while no backend serves it
            tx.add_chain([bytes(12) + _frame(SENT_BEFORE + i)], [])
        tx.publish()
        assert (tx.used_idx(), tx.published_avail, tx.in_flight) == (1000, 1040, 40)
        yield ram, tx


def _connect(daemon: DaemonThread, ram: GuestRam) -> VhostUserFrontend:
    fe = VhostUserFrontend(daemon.path)
    fe.negotiate(FEATURES, PROTOCOL)
    fe.set_mem_table(ram)
    return fe


def _start(fe: VhostUserFrontend, tx: MockSplitQueue, base: int) -> None:
    """SET_VRING_NUM/ADDR/BASE base/CALL/KICK (the ring starts), then enable."""
    tx.initial_avail_idx = base  # what setup_queue sends as SET_VRING_BASE
    fe.setup_queue(TX, tx)
    fe.enable_queue(TX)


def _consumed(stats: dict) -> int:
    # Chains that reach the TX ring before SET_VRING_ENABLE 1 are consumed as discarded.
    return stats["tx_packets"] + stats["tx_discarded"]


@pytest.mark.parametrize("base", [0, 990, 1020, 1040])
def test_a_base_that_disagrees_with_a_kept_ring_resumes_from_used_idx(daemon, kept_ring, caplog,
                                                                      base):
    """0: virtio-user in server mode after the backend was killed (more than a ring available
    from it); 990: behind used->idx (chains the driver has back would be completed again);
    1020 and 1040: ahead of it, on the ring's first start in the connection (chains an earlier
    backend took and will never complete: they are processed again, as DPDK does)."""
    ram, tx = kept_ring
    caplog.set_level(logging.INFO, logger="pyvhost")
    with _connect(daemon, ram) as fe:
        _start(fe, tx, base)
        fe.wait_tx_done(TX)  # strict: every used id is a chain in flight, each once
        assert fe.get_vring_base(TX) == 1040
    daemon.wait_idle(2)
    stats = daemon.server.stats()
    assert _consumed(stats) == SENT_BEFORE + IN_FLIGHT
    assert stats["queues_broken"] == 0
    assert tx.used_idx() == 1040 and tx.in_flight == 0
    lines = [r.getMessage() for r in caplog.records if RESYNCED in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{daemon.path}"), lines
    assert (f"queue 1: base {base} disagrees with the ring (avail idx 1040, used idx 1000)"
            in lines[0])
    assert "the 40 chains it has in flight are processed again" in lines[0]


def test_the_base_of_a_clean_stop_is_kept(daemon, kept_ring, caplog):
    """base == used->idx (QEMU after GET_VRING_BASE, or after a backend that died: it then
    resets last_avail to used->idx itself): nothing to resynchronise, nothing logged."""
    ram, tx = kept_ring
    caplog.set_level(logging.INFO, logger="pyvhost")
    with _connect(daemon, ram) as fe:
        _start(fe, tx, 1000)
        fe.wait_tx_done(TX)
        assert fe.get_vring_base(TX) == 1040
    assert not [r for r in caplog.records if "disagrees with the ring" in r.getMessage()]


def test_a_restart_in_the_same_connection_keeps_a_base_ahead_of_used(daemon, kept_ring,
                                                                     caplog):
    """Within one connection, chains between used->idx and the base may be the backend's own
    (deferred requests still in flight): a consistent base is honoured on a later start."""
    ram, tx = kept_ring
    caplog.set_level(logging.INFO, logger="pyvhost")
    with _connect(daemon, ram) as fe:
        _start(fe, tx, 1000)
        fe.wait_tx_done(TX)
        assert fe.get_vring_base(TX) == 1040  # stopped; used 1040
        for i in range(20):
            tx.add_chain([bytes(12) + _frame(2000 + i)], [])
        tx.publish()  # avail 1060
        _start(fe, tx, 1050)  # restart: 10 "in flight", 10 available
        assert fe.get_vring_base(TX) == 1060
        assert tx.used_idx() == 1050  # the 10 chains from 1050 on; 1040..1049 left alone
    assert not [r for r in caplog.records if "disagrees with the ring" in r.getMessage()]


def test_a_ring_whose_own_indices_disagree_is_not_resynchronised(daemon, kept_ring, caplog):
    """used->idx more than a ring behind avail->idx: the used index is not trusted either.
    The base is kept, an error says why, and the first burst breaks the ring (device needs
    reset) instead of processing what the indices do not describe."""
    ram, tx = kept_ring
    ram.write(tx.used_ring + USED_IDX, struct.pack("<H", 500))  # 540 "in flight" in a 64-ring
    caplog.set_level(logging.INFO, logger="pyvhost")
    with _connect(daemon, ram) as fe:
        _start(fe, tx, 0)
        deadline = time.monotonic() + 10
        while daemon.server.stats()["queues_broken"] == 0:
            assert time.monotonic() < deadline, "the ring did not break"
            time.sleep(0.01)
        assert fe.get_vring_base(TX) == 0
    daemon.wait_idle(2)
    assert daemon.server.stats()["queues_broken"] == 1
    assert tx.used_idx() == 500  # nothing completed
    messages = [r.getMessage() for r in caplog.records]
    assert any("base 0 disagrees with the ring (avail idx 1040, used idx 500), and used to "
               "avail is more than the ring holds: not resynchronised" in m for m in messages)
    assert any("avail index moved too far (to 1040)" in m for m in messages)
