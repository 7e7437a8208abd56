"""virtio-blk's compiled io_uring path: the raw binding, I/O that stays in flight across bursts
(completions waking a sleeping worker through the registered eventfd, stopping rings draining
it, memory-map changes under it), host errors, and guest misbehaviour only this path can meet.
The request semantics are tested on both paths by tests/test_blk.py."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyvhost.devices.blk import BlkDevice, BlkImage
from pyvhost.devices.blk import device as B
from pyvhost.ring import uring as U
from pyvhost.ring.errors import RingErrorCode
from pyvhost.ring.layout import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                                 VIRTIO_RING_F_INDIRECT_DESC)
from pyvhost.testing.session import DeviceSession

SECTOR = 512
ALL = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
       | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << B.F_SEG_MAX) | (1 << B.F_BLK_SIZE)
       | (1 << B.F_FLUSH) | (1 << B.F_CONFIG_WCE) | (1 << B.F_MQ) | (1 << B.F_DISCARD)
       | (1 << B.F_WRITE_ZEROES))


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def make_image(path: Path, sectors: int) -> bytes:
    data = random.Random(1).randbytes(sectors * SECTOR)
    path.write_bytes(data)
    return data

pytestmark = pytest.mark.skipif(not U.available()[0], reason="io_uring is disabled here")


def test_binding_nops_readv_and_the_eventfd(tmp_path):
    data = make_image(tmp_path / "f.raw", 16)
    with U.Uring(8) as ring:
        assert ring.sq_entries == 8 and ring.features & U.IORING_FEAT_SUBMIT_STABLE
        user = np.zeros(16, np.int64)
        res = np.zeros(16, np.int64)
        for n in (5, 8, 3):  # the indices wrap past the ring's size
            assert U.nop_burst(ring.ur, ring.sqes, ring.cqes, n, user, res) == n
            assert list(user[:n]) == list(range(1, n + 1)) and not res[:n].any()
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            ring.register_eventfd(efd)  # registered disarmed: completions do not signal
            U.nop_burst(ring.ur, ring.sqes, ring.cqes, 2, user, res)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(efd)
            assert not U.arm(ring.ur)  # nothing waiting in the CQ
            U.nop_burst(ring.ur, ring.sqes, ring.cqes, 2, user, res)
            assert os.eventfd_read(efd) >= 1
        finally:
            os.close(efd)
        assert ring.in_kernel == 0
        assert ring.ur[U.UR_SUBMITTED] == 20 and ring.ur[U.UR_COMPLETED] == 20
    assert U.available() == (True, "")
    assert data


class PipeDisk:
    """A "disk" whose reads wait until the test writes into a pipe: I/O in flight for as long
    as the test wants (io_uring waits on the pipe; nothing in Python)."""

    def __init__(self, sectors: int = 2048) -> None:
        self.r, self.w = os.pipe()
        self.image = BlkImage(self.r, "pipe", sectors * SECTOR, readonly=False, direct=False,
                              align=SECTOR, physical_block=SECTOR, block_device=False)

    def feed(self, data: bytes) -> None:
        os.write(self.w, data)

    def close(self) -> None:
        self.image.close()
        os.close(self.w)


def session(tmp_path: Path, image: BlkImage, **kw) -> DeviceSession:
    return DeviceSession(lambda: BlkDevice(image, io="uring", **kw), tmp_path / "blk.sock",
                         features=ALL)


def submit_reads(s: DeviceSession, n: int, size: int = SECTOR) -> list[int]:
    d = s.fe.driver(0)
    heads = [d.add_chain([hdr(B.T_IN, 0)], [size, 1]) for _ in range(n)]
    d.publish()
    s.fe.kick(0)
    return heads


def wait_in_flight(s: DeviceSession, n: int) -> None:
    deadline = time.monotonic() + 30
    while s.device.stats()["blk_uring_requests"] < n:
        assert time.monotonic() < deadline, s.device.stats()
        time.sleep(0.002)


def test_a_completion_wakes_the_sleeping_worker(tmp_path):
    disk = PipeDisk()
    try:
        with session(tmp_path, disk.image) as s:
            s.start_queue(0)
            (head,) = submit_reads(s, 1)
            wait_in_flight(s, 1)
            time.sleep(0.2)  # the worker sleeps (on the kick fd and the ring's eventfd)
            assert s.fe.driver(0).used_idx() == 0
            sleeps = s.backend.workers[0].sleeps
            disk.feed(b"\x5a" * SECTOR)
            assert s.wait_used(0, 1, timeout=10) == [(head, SECTOR + 1)]
            assert s.fe.driver(0).written_data(head, SECTOR + 1) == b"\x5a" * SECTOR + b"\0"
            assert s.backend.workers[0].sleeps > sleeps - 1
            assert s.device.stats()["blk_reads"] == 1
    finally:
        disk.close()


@pytest.mark.parametrize("stop", ["get_vring_base", "reset_device", "status_0"])
def test_stopping_a_ring_drains_its_io_first(tmp_path, stop):
    """GET_VRING_BASE (and the other stops) answers only once the I/O in flight is done and
    published: the index is exact and the guest memory no longer a target."""
    disk = PipeDisk()
    try:
        with session(tmp_path, disk.image) as s:
            s.start_queue(0, size=64)
            heads = submit_reads(s, 6)
            wait_in_flight(s, 6)
            feeder = threading.Timer(0.5, disk.feed, args=(b"\x11" * (6 * SECTOR),))
            feeder.start()
            t0 = time.monotonic()
            if stop == "get_vring_base":
                assert s.fe.get_vring_base(0) == 6
            elif stop == "reset_device":
                s.fe.reset_device()
            else:
                s.fe.set_status(0)
            assert time.monotonic() - t0 >= 0.4  # it waited for the pipe
            feeder.join()
            d = s.fe.driver(0)
            assert d.used_idx() == 6
            assert sorted(h for h, _ in d.used()) == sorted(heads)
            stats = s.device.stats()
            assert stats["blk_reads"] == 6 and stats["blk_io_errors"] == 0
    finally:
        disk.close()


def test_memory_map_changes_under_pending_io(tmp_path):
    """SET_MEM_TABLE (new mappings of the same memory) while a read is in flight: the old
    mappings stay until it completes, its data and status land, nothing leaks."""
    disk = PipeDisk()
    try:
        with session(tmp_path, disk.image) as s:
            s.start_queue(0)
            (head,) = submit_reads(s, 1, 4096)
            wait_in_flight(s, 1)
            s.fe.set_mem_table(s.ram)  # every region mapped anew, the old ones retired
            memory = s.backend.memory
            assert memory._retired  # pinned by the read in flight: not unmapped
            disk.feed(b"\xa7" * 4096)
            assert s.wait_used(0, 1, timeout=10) == [(head, 4097)]
            assert s.fe.driver(0).written_data(head, 4097) == b"\xa7" * 4096 + b"\0"
            deadline = time.monotonic() + 10
            while memory._retired:  # unpinned at the next burst, then unmapped
                s.fe.kick(0)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # And the ring goes on with the new mappings.
            data = random.Random(5).randbytes(SECTOR)
            d = s.fe.driver(0)
            h = d.add_chain([hdr(B.T_IN, 0)], [SECTOR, 1])
            d.publish()
            s.fe.kick(0)
            disk.feed(data)
            assert s.wait_used(0, 1, timeout=10) == [(h, SECTOR + 1)]
            assert d.written_data(h, SECTOR) == data
        assert memory.leaked_mappings == 0 and not memory._retired
    finally:
        disk.close()


def test_a_head_made_available_twice_breaks_only_its_queue(tmp_path):
    disk = PipeDisk()
    try:
        with session(tmp_path, disk.image, queues=2) as s:
            s.start_queue(0)
            s.start_queue(1)
            (head,) = submit_reads(s, 1)
            wait_in_flight(s, 1)
            d = s.fe.driver(0)
            # The same head again, while it is still in flight (a driver's bug or an attack).
            d._w16(d._avail_slot_gpa(d.next_avail), head)
            d.next_avail = (d.next_avail + 1) & 0xFFFF
            d.publish()
            s.fe.kick(0)
            deadline = time.monotonic() + 10
            while not s.backend.queues_broken:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            err = s.backend.vrings[0].queue.error
            assert err is not None and err.code == RingErrorCode.HEAD_IN_FLIGHT
            # Queue 1 serves on; the I/O in flight on queue 0 still finishes at the stop.
            used, out = s.request(1, [hdr(B.T_GET_ID)], [20, 1])
            assert used == 21 and out[-1] == B.S_OK
            threading.Timer(0.2, disk.feed, args=(b"\0" * SECTOR,)).start()
            s.fe.reset_device()
    finally:
        disk.close()


def test_host_errors_become_ioerr(tmp_path):
    """A read past the end of a shrunk file (short), a write to an fd opened read-only
    (EBADF), a discard it cannot do: statuses, not crashes; the queue goes on."""
    path = tmp_path / "disk.raw"
    make_image(path, 256)
    image = BlkImage.open(path)
    ro = os.open(path, os.O_RDONLY)
    bad = BlkImage(ro, str(path), 256 * SECTOR, readonly=False, direct=False, align=SECTOR,
                   physical_block=SECTOR, block_device=False)
    try:
        os.truncate(path, 100 * SECTOR)
        for img, checks in ((image, "short"), (bad, "ebadf")):
            with session(tmp_path, img) as s:
                s.start_queue(0)
                if checks == "short":
                    assert s.request(0, [hdr(B.T_IN, 200)], [SECTOR, 1])[1][-1] == B.S_IOERR
                    assert s.request(0, [hdr(B.T_IN, 0)], [SECTOR, 1])[1][-1] == B.S_OK
                else:
                    out = s.request(0, [hdr(B.T_OUT, 0), b"x" * SECTOR], [1])[1]
                    assert out == bytes([B.S_IOERR])
                    out = s.request(0, [hdr(B.T_WRITE_ZEROES), seg(0, 8)], [1])[1]
                    assert out == bytes([B.S_IOERR])
                assert s.backend.queues_broken == 0
                assert s.device.stats()["blk_io_errors"] >= 1
    finally:
        image.close()
        bad.close()


def test_cli_null_disk_on_the_uring_path(tmp_path):
    """`pyvhost blk --null 1G --io uring`: a null disk served by the compiled path."""
    import subprocess
    import sys
    from pyvhost.testing.frontend import VhostUserFrontend
    from pyvhost.testing.guest_ram import GuestRam
    from pyvhost.testing.driver import MockSplitQueue
    from pyvhost.protocol import ProtocolFeature as P
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvhost", "blk", "--socket-path", str(sock),
                             "--null", "1G", "--io", "uring", "--max-connections", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with GuestRam([(0, 1 << 20)]) as ram, \
                VhostUserFrontend(str(sock), connect_timeout=600, timeout=120) as fe:
            fe.negotiate(ALL, P.REPLY_ACK.mask | P.CONFIG.mask | P.MQ.mask)
            assert fe.get_config(0, 8) == struct.pack("<Q", (1 << 30) // SECTOR)
            fe.set_mem_table(ram)
            d = MockSplitQueue(ram, 64, event_idx=True)
            fe.setup_queue(0, d)
            fe.enable_queue(0)
            heads = [d.add_indirect_chain([hdr(B.T_IN, 8 * k)], [4096, 1]) for k in range(32)]
            heads += [d.add_indirect_chain([hdr(B.T_OUT, 8 * k), b"w" * 4096], [1]) for k in range(16)]
            heads.append(d.add_chain([hdr(B.T_IN, (1 << 30) // SECTOR)], [SECTOR, 1]))
            d.publish()
            fe.kick(0)
            deadline = time.monotonic() + 30
            used: list = []
            while len(used) < len(heads) and time.monotonic() < deadline:
                used += d.used()
                time.sleep(0.005)
            lens = dict(used)
            assert sorted(lens) == sorted(heads)
            assert all(d.written_data(h, lens[h])[-1] == B.S_OK for h in heads[:-1])
            assert d.written_data(heads[-1], SECTOR + 1)[-1] == B.S_IOERR
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert not sock.exists()


def test_a_file_in_tmpfs_is_read_and_written_synchronously(tmp_path):
    """A file in tmpfs, whose reads io_uring hands to its worker threads (tmpfs refuses
    RWF_NOWAIT), is read and written by the compiled path itself; a file on a disk's file
    system, or opened O_DIRECT, goes through io_uring."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("no /dev/shm here: the test bed mounts tmpfs there")
    path = shm / f"pyvhost-test-{os.getpid()}.raw"
    try:
        data = make_image(path, 64)
        with BlkImage.open(path) as image:
            if not image.sync_io:
                # A kernel whose tmpfs takes RWF_NOWAIT: io_uring does the reads inline then.
                try:
                    os.preadv(image.fd, [bytearray(SECTOR)], 0, os.RWF_NOWAIT)
                except OSError as e:
                    pytest.fail(f"tmpfs refuses RWF_NOWAIT ({e}) but sync_io is off")
                return
            with session(tmp_path, image) as s:
                s.start_queue(0)
                out = s.request(0, [hdr(B.T_IN, 3)], [2 * SECTOR, 1])[1]
                assert out == data[3 * SECTOR:5 * SECTOR] + bytes([B.S_OK])
                new = random.Random(4).randbytes(SECTOR)
                assert s.request(0, [hdr(B.T_OUT, 7), new], [1])[1] == bytes([B.S_OK])
                stats = s.device.stats()
                assert stats["blk_sync_io"] == 2 and stats["blk_uring_requests"] == 0
                assert stats["blk_reads"] == stats["blk_writes"] == 1
        assert path.read_bytes()[7 * SECTOR:8 * SECTOR] == new
    finally:
        path.unlink(missing_ok=True)
    disk = tmp_path / "disk.raw"
    make_image(disk, 64)
    with BlkImage.open(disk) as image:
        assert not image.sync_io
