"""Disconnect leaves nothing behind: fds, guest mappings and threads return to their baseline
after every session — clean ones, ones with rings running at full speed, hostile ones — and
the server itself leaves nothing once stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pyvhost.daemon.backend import BackendOptions
from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import MemoryRegionDesc, MemoryTable, SingleMemRegion
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from test_daemon_bad_input import TIMEOUT, ServerThread, hdr, negotiate, still_serving, transmit

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


# -- a thousand hostile connections ----------------------------------------------------------

def _truncated_header(fe, ram, short_fd):
    fe.send_raw(hdr(R.GET_FEATURES, 0)[:7])


def _fds_on_no_fd_message(fe, ram, short_fd):
    fe.send_raw(hdr(R.GET_QUEUE_NUM, 0), [short_fd] * 2)


def _unknown_request(fe, ram, short_fd):
    fe.send_raw(hdr(99, 0))


def _bad_version(fe, ram, short_fd):
    fe.send_raw(hdr(R.GET_FEATURES, 0, flags=0x2))


def _size_larger_than_payload(fe, ram, short_fd):
    fe.send_raw(hdr(R.SET_FEATURES, 8) + b"\x00\x00\x00")


def _short_memfd_then_vanish(fe, ram, short_fd):
    negotiate(fe)
    table = MemoryTable((MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0),))
    fe.send(R.SET_MEM_TABLE, table, [short_fd], need_reply=True)


def _overlap_then_vanish(fe, ram, short_fd):
    negotiate(fe)
    fd, gpa, size, uaddr, off = ram.region_specs()[0]
    table = MemoryTable((MemoryRegionDesc(gpa, size, uaddr, off),
                         MemoryRegionDesc(gpa + 4096, size, uaddr + (1 << 30), off)))
    fe.send(R.SET_MEM_TABLE, table, [fd, fd], need_reply=True)


def _mapped_then_vanish(fe, ram, short_fd):
    negotiate(fe)
    fe.set_mem_table(ram)  # mappings the daemon must drop when the peer goes


HOSTILE = [_truncated_header, _fds_on_no_fd_message, _unknown_request, _bad_version,
           _size_larger_than_payload, _short_memfd_then_vanish, _overlap_then_vanish,
           _mapped_then_vanish]


def test_thousand_hostile_connections_leave_nothing_behind(tmp_path):
    """Issue: after 1000 bad connections the fd count and mapped memory are back at baseline,
    and a well-behaved frontend still gets served."""
    logging.getLogger("pyvhost").setLevel(logging.CRITICAL)  # 1000 expected error lines
    short = os.memfd_create("short", os.MFD_CLOEXEC)
    os.ftruncate(short, 4096)
    try:
        with GuestRam([(0, 1 << 20)]) as ram:
            daemon = ServerThread(str(tmp_path / "vhost.sock"))
            try:
                idle = snapshot()
                for n in range(1, 1001):
                    with VhostUserFrontend(daemon.path, timeout=TIMEOUT) as fe:
                        HOSTILE[n % len(HOSTILE)](fe, ram, short)
                    wait_session_end(daemon, n)
                assert snapshot() == idle
                assert daemon.server.stats()["leaked_mappings"] == 0
                logging.getLogger("pyvhost").setLevel(logging.NOTSET)
                still_serving(daemon, ram)
            finally:
                daemon.stop()
    finally:
        logging.getLogger("pyvhost").setLevel(logging.NOTSET)
        os.close(short)
