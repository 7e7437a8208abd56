"""Inflight I/O tracking end to end: the device runs in its own process (`pyvhost run
pyvhost.testing.inflight:Parked`), is SIGKILLed with requests in flight (from outside, or by
itself at a chosen point), and a new process serves the same rings: the project's frontend
plays QEMU (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every start, SET_VRING_BASE = used->idx
after the crash). Every request taken and not published is served again, in the order it was
taken, before new ones; none is lost, none is used twice (the driver's used() is strict).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from pyvhost.device import Device, Request
from pyvhost.protocol import InflightDesc
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.inflight import queue_region_size
from pyvhost.ring import packed_inflight as PI
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC
from pyvhost.ring.packed_layout import NEW_RING_BASE, VIRTIO_F_RING_PACKED
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import InflightShm, RequestFailed, VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.session import DeviceSession

SIZE = 32
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
LAYOUTS = ["split", "packed"]
Driver = MockSplitQueue | MockPackedQueue
PROTOCOL = P.REPLY_ACK.mask | P.INFLIGHT_SHMFD.mask
DEADLINE = 20.0


class Backend:
    """One `pyvhost run` process serving Parked at `sock`."""

    def __init__(self, sock: Path, log: Path, *, park: bool) -> None:
        env = dict(os.environ, PYVHOST_TEST_PARK="1" if park else "0", PYVHOST_TEST_LOG=str(log))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvhost", "run", "pyvhost.testing.inflight:Parked",
             "--socket-path", str(sock), "--stats-interval", "0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill(self) -> None:
        """SIGKILL (if it still runs); keeps what it logged. Idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        assert self.proc.stderr is not None
        if not self.proc.stderr.closed:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()

    def wait_killed(self) -> None:
        """The process killed itself (SIGKILL)."""
        self.proc.wait(DEADLINE)
        assert self.proc.returncode == -signal.SIGKILL
        self.kill()


@pytest.fixture
def bed() -> Iterator[tuple[Path, GuestRam]]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d, GuestRam([(0, 4 << 20)]) as ram:
        yield Path(d), ram


def _driver(ram: GuestRam, layout: str) -> Driver:
    return MockSplitQueue(ram, SIZE) if layout == "split" else MockPackedQueue(ram, SIZE)


def _in_flight(area: bytes, driver: Driver) -> int:
    """Requests the area says are in flight (split: heads; packed: head entries)."""
    if isinstance(driver, MockPackedQueue):
        first, stride = PI.B_ENTRY0, PI.ENTRY_SIZE
    else:
        first, stride = 16, 16
    return sum(area[first + stride * i] for i in range(SIZE))


class Run:
    """A frontend connection to a fresh backend process on the same rings and area."""

    def __init__(self, d: Path, ram: GuestRam, driver: Driver,
                 shm: InflightShm | None, *, park: bool) -> None:
        sock = d / "dev.sock"
        sock.unlink(missing_ok=True)
        self.backend = Backend(sock, d / "handled.log", park=park)
        self.fe = VhostUserFrontend(str(sock), connect_timeout=600)
        try:
            packed = isinstance(driver, MockPackedQueue)
            self.fe.negotiate(FEATURES | (packed << VIRTIO_F_RING_PACKED), PROTOCOL)
            self.fe.set_mem_table(ram)
            # QEMU asks for an area only while it holds none, and sends it on every start.
            self.shm = shm if shm is not None else self.fe.get_inflight_fd(1, SIZE)
            assert self.shm is not None
            self.fe.set_inflight_fd(self.shm)
            # QEMU's base after our crash: split, the used index; packed, the start's.
            if isinstance(driver, MockPackedQueue):
                driver.frontend_base = NEW_RING_BASE.encode()
            else:
                driver.initial_avail_idx = driver.used_idx()
            self.fe.setup_queue(0, driver)
            self.fe.enable_queue(0)
        except BaseException:
            self.close()
            raise
        self.driver = driver

    def submit(self, *tags: str) -> list[int]:
        heads = [self.driver.add_indirect_chain([t.encode()], [1]) for t in tags]
        self.driver.publish()
        self.fe.kick(0)
        return heads

    def wait_used(self, count: int) -> list[int]:
        got: list[int] = []
        deadline = time.monotonic() + DEADLINE
        while len(got) < count:
            got.extend(h for h, _ in self.driver.used())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} used")
            time.sleep(0.001)
        return got

    def close(self) -> None:
        self.fe.close()
        self.backend.kill()


def _handled(d: Path) -> list[str]:
    return (d / "handled.log").read_text().split()


def _wait_handled(d: Path, tag: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while tag not in _handled(d):
        assert time.monotonic() < deadline, f"{tag} never handled"
        time.sleep(0.005)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigkill_with_parked_requests_resubmits_them_in_order(bed, layout: str) -> None:
    d, ram = bed
    driver = _driver(ram, layout)
    first = Run(d, ram, driver, None, park=True)
    shm = first.shm
    try:
        heads = first.submit("now:0", "park:1", "now:2", "park:3", "park:4", "now:5")
        used = first.wait_used(3)
        assert sorted(used) == sorted([heads[0], heads[2], heads[5]])
        _wait_handled(d, "park:4")
        first.backend.proc.send_signal(signal.SIGKILL)
        first.backend.wait_killed()
        first.fe.close()
        assert driver.in_flight == 3
        # The area says so: three requests in flight.
        assert _in_flight(shm.read(), driver) == 3

        (d / "handled.log").write_text("")
        second = Run(d, ram, driver, shm, park=False)
        try:
            more = second.submit("now:6", "now:7")
            assert second.wait_used(5) == [heads[1], heads[3], heads[4]] + more
            assert _handled(d) == ["park:1", "park:3", "park:4", "now:6", "now:7"]
            assert driver.in_flight == 0
        finally:
            second.close()
        assert "3 requests in flight resubmitted" in second.backend.stderr
    finally:
        first.close()
        shm.close()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("die", ["die-before", "die-after"])
def test_device_killed_inside_a_request(bed, die: str, layout: str) -> None:
    """Killed in handle() before the request did anything, or after it was completed but
    before pyvhost published it: either way it is served again, after the older parked
    one."""
    d, ram = bed
    driver = _driver(ram, layout)
    first = Run(d, ram, driver, None, park=True)
    shm = first.shm
    try:
        (h0,) = first.submit("now:0")
        assert first.wait_used(1) == [h0]
        (h1,) = first.submit("park:1")
        _wait_handled(d, "park:1")
        (h2,) = first.submit(f"{die}:2")
        first.backend.wait_killed()
        first.fe.close()
        assert driver.used() == []

        (d / "handled.log").write_text("")
        second = Run(d, ram, driver, shm, park=False)
        try:
            assert second.wait_used(2) == [h1, h2]
            assert _handled(d) == ["park:1", f"{die}:2"]
        finally:
            second.close()
    finally:
        first.close()
        shm.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_repeated_sigkills_under_load_lose_and_repeat_nothing(bed, layout: str) -> None:
    """Requests completed at random times in random order while the frontend keeps the ring
    full; the backend is SIGKILLed at random moments three times. At the end every request
    was used exactly once (the driver's used() is strict) and handled at least once, and
    some were handled again after a kill (they were in flight)."""
    d, ram = bed
    rnd = random.Random(12)
    driver = _driver(ram, layout)
    shm: InflightShm | None = None
    sent = used = 0
    try:
        for life in range(4):
            run = Run(d, ram, driver, shm, park=False)
            shm = run.shm
            try:
                until = time.monotonic() + (0.5 + rnd.random() if life < 3 else 0.3)
                while time.monotonic() < until:
                    n = min(driver.num_free, rnd.randint(1, 8))
                    if n:
                        run.submit(*(f"later:{sent + i}" for i in range(n)))
                        sent += n
                    used += len(driver.used())
                    time.sleep(0.0005)
                if life == 3:  # the last one finishes everything
                    deadline = time.monotonic() + DEADLINE
                    while driver.in_flight:
                        used += len(driver.used())
                        assert time.monotonic() < deadline, f"{driver.in_flight} never used"
                        time.sleep(0.001)
            finally:
                run.close()  # SIGKILL, but for the last
            used += len(driver.used())
        assert used == sent and driver.in_flight == 0
        handled = _handled(d)
        assert sorted(set(handled), key=lambda t: int(t.split(":")[1])) == [
            f"later:{i}" for i in range(sent)]
        repeated = len(handled) - sent
        print(f"{sent} requests, {repeated} served again after a kill")
        assert repeated > 0  # the kills did catch requests in flight
    finally:
        if shm is not None:
            shm.close()


def test_get_inflight_fd_area_and_bad_set_inflight_fd(bed) -> None:
    """The area has the spec's size; a SET_INFLIGHT_FD whose numbers do not fit is refused
    (ack 1) and the connection goes on."""
    d, ram = bed
    driver = MockSplitQueue(ram, SIZE)
    run = Run(d, ram, driver, None, park=False)
    try:
        assert run.shm.size == queue_region_size(SIZE) >= 16 + 16 * SIZE
        assert run.shm.read() [8:10] == b"\x01\x00"  # version 1 once the ring started
        bad = [InflightDesc(run.shm.size, 0, 2, SIZE),          # more queues than the device
               InflightDesc(run.shm.size, 0, 1, 48),            # not a power of two
               InflightDesc(run.shm.size * 4, 0, 1, SIZE * 4),  # past the end of the fd
               InflightDesc(run.shm.size, 8, 1, SIZE)]          # offset not 64-aligned
        run.fe.get_vring_base(0)  # stopped: SET_INFLIGHT_FD comes before a start
        for desc in bad:
            with pytest.raises(RequestFailed):
                run.fe.set_inflight_fd(desc, run.shm.fd)
        efd = os.eventfd(0, os.EFD_CLOEXEC)  # not a memory file at all
        try:
            with pytest.raises(RequestFailed):
                run.fe.set_inflight_fd(run.shm.desc, efd)
        finally:
            os.close(efd)
        run.fe.set_inflight_fd(run.shm)
        run.fe.setup_queue(0, driver)
        run.fe.enable_queue(0)
        (h,) = run.submit("now:0")
        assert run.wait_used(1) == [h]
    finally:
        run.close()
        run.shm.close()


def test_get_vring_base_drains_in_flight_requests_first(bed) -> None:
    """A ring stopped by GET_VRING_BASE answers after its deferred requests completed and
    were published: the base is the used index, and the inflight area holds nothing in
    flight, its used_idx that of the ring (a restart would resubmit nothing)."""
    d, ram = bed
    driver = MockSplitQueue(ram, SIZE)
    run = Run(d, ram, driver, None, park=False)
    try:
        run.submit(*(f"later:{i}" for i in range(SIZE)))
        _wait_handled(d, f"later:{SIZE - 1}")  # all taken, most still being completed
        base = run.fe.get_vring_base(0)
        assert base == SIZE == driver.used_idx()
        area = run.shm.read()
        assert not any(area[16 + 16 * i] for i in range(SIZE))
        assert int.from_bytes(area[14:16], "little") == SIZE
        assert sorted(h for h, _ in driver.used()) == list(range(SIZE))
    finally:
        run.close()
        run.shm.close()


class TrackedEcho(Device):
    """Echoes the readable bytes; tracked."""

    device_id = 4
    tracks_inflight = True

    def handle(self, queue: int, request: Request) -> int:
        return request.write(request.read())


def _inflight_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("pyvhost-inflight" in line for line in f)


def test_inflight_areas_are_unmapped_and_closed(tmp_path: Path) -> None:
    """Each SET_INFLIGHT_FD replaces (and unmaps) the last area; a disconnect unmaps the
    area and closes every fd of it; a device that does not track offers nothing."""
    fds_before = len(os.listdir("/proc/self/fd"))
    with DeviceSession(TrackedEcho, tmp_path / "echo.sock", protocol=PROTOCOL) as s:
        shm = s.fe.get_inflight_fd(1, 64)
        assert shm is not None
        try:
            for _ in range(3):
                s.fe.set_inflight_fd(shm)
                assert _inflight_mappings() == 1
            s.start_queue(0)
            assert s.request(0, readable=[b"hello"], writable=[5]) == (5, b"hello")
            assert s.backend.stats()["inflight_resubmitted"] == 0
        finally:
            shm.close()
    assert _inflight_mappings() == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before

    class Untracked(TrackedEcho):
        tracks_inflight = False

    with DeviceSession(Untracked, tmp_path / "plain.sock", protocol=PROTOCOL) as s:
        assert not s.negotiated.has(P.INFLIGHT_SHMFD)


def test_one_region_per_queue(tmp_path: Path) -> None:
    """With several queues each ring tracks into its own region (queue i at i * stride)."""

    class TwoQueues(TrackedEcho):
        num_queues = 2

    stride = queue_region_size(64)
    with DeviceSession(TwoQueues, tmp_path / "two.sock", protocol=PROTOCOL | P.MQ.mask) as s:
        shm = s.fe.get_inflight_fd(2, 64)
        assert shm is not None and shm.size == 2 * stride
        try:
            s.fe.set_inflight_fd(shm)
            s.start_queue(0)
            s.start_queue(1)
            for i in range(3):
                assert s.request(1, readable=[b"q1"], writable=[2]) == (2, b"q1")
            assert s.request(0, readable=[b"q0"], writable=[2]) == (2, b"q0")
            area = shm.read()
            for q, used in ((0, 1), (1, 3)):
                header = area[q * stride:q * stride + 16]
                # version 1, desc_num 64, used_idx = the ring's
                assert (header[8:10], header[10:12], header[14:16]) == (
                    b"\x01\x00", (64).to_bytes(2, "little"), used.to_bytes(2, "little"))
        finally:
            shm.close()


def test_area_that_contradicts_the_ring_refuses_the_start(tmp_path: Path) -> None:
    """An area claiming requests in flight the driver never offered: the ring does not start
    (a refused SET_VRING_KICK); the connection goes on, and starts with a sane area."""
    with DeviceSession(TrackedEcho, tmp_path / "echo.sock", protocol=PROTOCOL) as s:
        shm = s.fe.get_inflight_fd(1, 64)
        assert shm is not None
        try:
            s.fe.set_inflight_fd(shm)
            s.start_queue(0)
            assert s.request(0, readable=[b"x"], writable=[1]) == (1, b"x")
            assert s.fe.get_vring_base(0) == 1
            for head in range(10):  # "in flight", but only one chain was ever offered
                os.pwrite(shm.fd.fileno(), b"\x01", 16 + 16 * head)
            s.fe.set_inflight_fd(shm)
            driver = s.fe.driver(0)
            driver.initial_avail_idx = 1
            with pytest.raises(RequestFailed):
                s.fe.setup_queue(0, driver)
            os.pwrite(shm.fd.fileno(), bytes(16 * 64), 16)
            s.fe.set_inflight_fd(shm)
            s.fe.setup_queue(0, driver)
            s.fe.enable_queue(0)
            assert s.request(0, readable=[b"y"], writable=[1]) == (1, b"y")
            assert s.backend.stats()["inflight_resubmitted"] == 0
        finally:
            shm.close()


def test_area_of_the_frontends_own_at_an_offset(tmp_path: Path) -> None:
    """A frontend may hand over its own memfd with the area at a (64-byte aligned) offset:
    the queue region is tracked there, and nothing before it is touched."""
    stride = queue_region_size(64)
    fd = os.memfd_create("frontend-area", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096 + stride)
        os.pwrite(fd, b"\xaa" * 4096, 0)
        with DeviceSession(TrackedEcho, tmp_path / "echo.sock", protocol=PROTOCOL) as s:
            s.fe.set_inflight_fd(InflightDesc(stride, 4096, 1, 64), fd)
            s.start_queue(0)
            assert s.request(0, readable=[b"z"], writable=[1]) == (1, b"z")
        assert os.pread(fd, 4096, 0) == b"\xaa" * 4096
        header = os.pread(fd, 16, 4096)
        assert header[8:10] == b"\x01\x00" and header[14:16] == b"\x01\x00"
    finally:
        os.close(fd)
