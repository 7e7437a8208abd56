"""Disconnect leaves nothing behind: fds, guest mappings and threads return to their baseline
after every session — clean ones, ones with rings running at full speed, hostile ones — and
the server itself leaves nothing once stopped.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyvhost.daemon.backend import BackendOptions
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import MemoryRegionDesc, SingleMemRegion
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from test_daemon_bad_input import TIMEOUT, ServerThread, hdr, negotiate, transmit

RAM_NAME = "pyvhost-guest-ram"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def guest_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(RAM_NAME in line for line in f)


def snapshot() -> tuple[int, int, int]:
    return open_fds(), guest_mappings(), threading.active_count()


def wait_session_end(daemon: ServerThread, n: int) -> None:
    end = time.monotonic() + TIMEOUT
    while daemon.server.connections < n or daemon.server.current is not None:
        assert time.monotonic() < end, "session did not end"
        time.sleep(0.005)


def running_session(daemon: ServerThread, ram: GuestRam) -> None:
    with VhostUserFrontend(daemon.path, timeout=TIMEOUT) as fe:
        negotiate(fe)
        fe.set_mem_table(ram)
        fd, gpa, size, uaddr, off = ram.region_specs()[1]
        region = SingleMemRegion(MemoryRegionDesc(gpa, size, uaddr, off))
        fe.request(R.REM_MEM_REG, region, need_reply=True)
        fe.request(R.ADD_MEM_REG, region, [fd], need_reply=True)
        fe.setup_queue(0, MockSplitQueue(ram, 64))
        transmit(fe, ram, n=200)
        # Leave with the ring started and buffers still queued: the daemon must tear down
        # a running ring, not just an idle one.
        fe.driver(1).add_chain([bytes(72)], [])
        fe.driver(1).publish()


def hostile_session(daemon: ServerThread, ram: GuestRam) -> None:
    stray = os.memfd_create("stray", os.MFD_CLOEXEC)
    try:
        with VhostUserFrontend(daemon.path, timeout=TIMEOUT) as fe:
            negotiate(fe)
            fe.set_mem_table(ram)
            fe.send_raw(hdr(R.GET_QUEUE_NUM, 0), [stray] * 3)  # fds on a no-fd message
            fe.wait_closed()
    finally:
        os.close(stray)


@pytest.mark.parametrize("options", [BackendOptions(), BackendOptions(poll=True),
                                     BackendOptions(metadata_access="copy", workers=2)],
                         ids=["interrupt", "poll", "copy-2workers"])
def test_sessions_leave_no_fds_mappings_or_threads(tmp_path, options):
    with GuestRam([(0, 1 << 20), (1 << 30, 1 << 16)]) as ram:
        before_server = snapshot()
        daemon = ServerThread(str(tmp_path / "vhost.sock"), options)
        try:
            idle = snapshot()
            sessions = [running_session, hostile_session, running_session]
            for n, session in enumerate(sessions, start=1):
                session(daemon, ram)
                wait_session_end(daemon, n)
                assert snapshot() == idle, f"after session {n} ({session.__name__})"
            stats = daemon.server.stats()
            assert stats["leaked_mappings"] == 0
            # 200 per running session, plus the one left queued if a poller caught it.
            assert 400 <= stats["tx_packets"] <= 402
        finally:
            daemon.stop()
        assert snapshot() == before_server
