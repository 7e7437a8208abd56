"""The public device API (`pyvhost.Device`, `pyvhost.Request`) through the real daemon.

Each test serves a small device written as a user would, with `DeviceSession` (socket, codec,
backend, worker, guest memory in memfds), and checks what the driver side sees.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

import pyvhost
from pyvhost.daemon.backend import STATUS_DEVICE_NEEDS_RESET
from pyvhost.devices.rng import RngDevice
from pyvhost.ring.kernels import Q_ERROR
from pyvhost.ring.errors import RingErrorCode
from pyvhost.testing.session import DeviceSession


class Pattern(pyvhost.Device):
    device_id = 4
    num_queues = 1

    def handle(self, queue: int, request: pyvhost.Request) -> int:
        n = request.writable_size
        request.write(b"PYVHOST!" * (n // 8) + b"PYVHOST!"[: n % 8])
        return n


class Echo(pyvhost.Device):
    """Writes back what it reads, reversed; two queues; raises on b"boom"."""

    num_queues = 2

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, int]] = []

    def handle(self, queue: int, request: pyvhost.Request) -> int:
        data = request.read()
        if data == b"boom":
            raise RuntimeError("the device cannot take a boom")
        self.seen.append((queue, request.readable_size, request.writable_size))
        return request.write(data[::-1])


@pytest.fixture
def sock(tmp_path):
    return tmp_path / "dev.sock"


def test_ten_line_device_fills_the_buffers_in_order(sock):
    with DeviceSession(Pattern, sock) as s:
        s.start_queue(0)
        assert s.request(0, writable=[20]) == (20, b"PYVHOST!PYVHOST!PYVH")
        # A chain of several buffers is filled across them in order.
        length, data = s.request(0, writable=[3, 5, 9])
        assert (length, data) == (17, b"PYVHOST!PYVHOST!P")
        assert s.backend.stats()["device_requests"] == 2


def test_many_chains_in_one_burst(sock):
    with DeviceSession(Pattern, sock) as s:
        s.start_queue(0, size=256)
        heads = [s.submit(0, writable=[8 + k], kick=False) for k in range(200)]
        s.fe.kick(0)
        used = s.wait_used(0, 200)
        assert [h for h, _ in used] == heads
        assert [n for _, n in used] == [8 + k for k in range(200)]


def test_read_write_struct_and_offsets(sock):
    class Adder(pyvhost.Device):
        def handle(self, queue, request):
            a, b = request.read_struct("II")
            (c,) = request.read_struct(struct.Struct("<H"), 8)
            request.write(struct.pack("<I", a + b + c), offset=1)
            request.write(b"\x7f")  # a trailing status byte could go anywhere: offset 0 here
            return 5

    with DeviceSession(Adder, sock) as s:
        s.start_queue(0)
        payload = struct.pack("<IIH", 40, 2, 100)
        # The readable bytes are split over two buffers, across the struct fields.
        assert s.request(0, readable=[payload[:3], payload[3:]], writable=[2, 3]) == (
            5, b"\x7f" + struct.pack("<I", 142))


def test_echo_reads_all_readable_bytes(sock):
    with DeviceSession(Echo, sock) as s:
        s.start_queue(0)
        assert s.request(0, readable=[b"abc", b"defg"], writable=[4, 10]) == (7, b"gfedcba")
        assert s.device.seen == [(0, 7, 14)]


def test_writing_past_the_buffers_breaks_only_that_queue(sock):
    class Overflow(pyvhost.Device):
        num_queues = 2

        def handle(self, queue, request):
            if queue == 0:
                request.write(b"x" * (request.writable_size + 1))
            return request.write(b"ok")

    with DeviceSession(Overflow, sock) as s:
        s.start_queue(0)
        s.start_queue(1)
        s.submit(0, writable=[4])
        _wait(lambda: s.backend.queues_broken == 1)
        assert "write of 5 bytes at offset 0 outside the 4 bytes" in \
            s.backend.vrings[0].queue.error_text()
        assert s.request(1, writable=[2]) == (2, b"ok")  # the same worker serves on


def test_exception_in_handle_breaks_only_that_queue(sock):
    with DeviceSession(Echo, sock) as s:
        s.start_queue(0)
        s.start_queue(1)
        assert s.request(0, readable=[b"hi"], writable=[2]) == (2, b"ih")
        s.submit(0, readable=[b"boom"], writable=[4])
        _wait(lambda: s.backend.queues_broken == 1)
        vr = s.backend.vrings[0]
        assert not vr.running
        assert vr.queue.q[Q_ERROR] == RingErrorCode.DEVICE_FAILED
        assert "RuntimeError: the device cannot take a boom" in vr.queue.error_text()
        assert s.fe.get_status() & STATUS_DEVICE_NEEDS_RESET
        # Queue 1 is on the same worker (one worker): it goes on serving.
        assert s.request(1, readable=[b"xyz"], writable=[3]) == (3, b"zyx")
        assert all(w.alive for w in s.backend.workers)


def test_a_bad_used_length_breaks_the_queue(sock):
    class Liar(pyvhost.Device):
        def handle(self, queue, request):
            return request.writable_size + 1

    with DeviceSession(Liar, sock) as s:
        s.start_queue(0)
        s.submit(0, writable=[8])
        _wait(lambda: s.backend.queues_broken == 1)
        assert "returned used length 9" in s.backend.vrings[0].queue.error_text()


@pytest.mark.parametrize("hostile", ["loop", "head_out_of_range", "unmapped"])
def test_hostile_chains_break_only_their_queue(sock, hostile):
    with DeviceSession(Echo, sock) as s:
        bad = s.start_queue(0)
        s.start_queue(1)
        if hostile == "loop":
            bad.write_raw_desc(0, s.ram.alloc(16), 16, 1, 1)   # 0 -> 1
            bad.write_raw_desc(1, s.ram.alloc(16), 16, 1, 0)   # 1 -> 0
            bad.add_raw_head(0)
        elif hostile == "head_out_of_range":
            bad.add_raw_head(bad.size + 5)
        else:
            bad.write_raw_desc(0, 1 << 40, 16, 0, 0)
            bad.add_raw_head(0)
        bad.publish()
        s.fe.kick(0)
        _wait(lambda: s.backend.queues_broken == 1)
        expected = {"loop": RingErrorCode.CHAIN_TOO_LONG,
                    "head_out_of_range": RingErrorCode.HEAD_OUT_OF_RANGE,
                    "unmapped": RingErrorCode.ADDR_UNMAPPED}[hostile]
        assert s.backend.vrings[0].queue.q[Q_ERROR] == expected
        assert s.request(1, readable=[b"ab"], writable=[2]) == (2, b"ba")


def test_python_queue_api_ring_error_breaks_only_its_ring(sock):
    """A compiled-tier device calling the Python queue API on a hostile ring: the RingError it
    raises stopped the worker and every ring on it, before the worker caught it."""
    from pyvhost.ring.split_queue import SplitQueue

    class Mixed(pyvhost.Device):
        num_queues = 2

        def process_burst(self, queue: SplitQueue, table, mem, views):
            chains = queue.pop_burst(table)  # raises RingError on queue 0's loop
            used = [(c.head, c.write(table, b"ok")) for c in chains]
            return len(used), (queue.push_used(table, used) if used else False)

    with DeviceSession(Mixed, sock) as s:
        bad = s.start_queue(0)
        s.start_queue(1)
        bad.write_raw_desc(0, s.ram.alloc(16), 16, 1, 0)   # 0 -> 0
        bad.add_raw_head(0)
        bad.publish()
        s.fe.kick(0)
        # The Python queue API's kernels are not among those the Server warms up: on a cold
        # numba cache the worker compiles them inside this burst (a minute and more on a
        # loaded 2-core machine), so this waits as long as a cold warm-up may take.
        _wait(lambda: s.backend.queues_broken == 1, timeout=600)
        assert "longer than its table" in s.backend.vrings[0].queue.error_text()
        assert s.request(1, writable=[2]) == (2, b"ok")
        assert all(w.alive for w in s.backend.workers)


# -- deferred completion ---------------------------------------------------------------------

class Later(pyvhost.Device):
    """Defers every request; a test thread completes them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[pyvhost.Pending] = []
        self.cond = threading.Condition()

    def handle(self, queue, request):
        with self.cond:
            self.pending.append(request.defer())
            self.cond.notify_all()
        return None

    def take(self, n: int, timeout: float = 10.0) -> list[pyvhost.Pending]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.pending) >= n, timeout)
            out, self.pending = self.pending[:n], self.pending[n:]
        return out


def test_deferred_requests_complete_from_another_thread(sock):
    with DeviceSession(Later, sock) as s:
        s.start_queue(0)
        heads = [s.submit(0, writable=[8]) for _ in range(3)]
        pend = s.device.take(3)
        assert s.fe.driver(0).used_idx() == 0  # nothing completed yet

        def finish():
            for k, p in enumerate(reversed(pend)):  # out of order is allowed (not IN_ORDER)
                p.request.write(b"done%d" % k)
                p.complete(5)

        t = threading.Thread(target=finish)
        t.start()
        t.join()
        used = s.wait_used(0, 3)
        assert [h for h, _ in used] == heads[::-1]
        assert s.fe.driver(0).written_data(heads[0], 5) == b"done2"
        with pytest.raises(pyvhost.RequestError):
            pend[0].complete(5)  # only once
        with pytest.raises(pyvhost.RequestError):
            pend[0].request.write(b"late")  # nothing of guest memory outlives the request


def test_deferred_memory_stays_mapped_across_a_memory_change(sock):
    """The guest's memory map changes while a request is deferred: the change does not wait
    for the request, and the request's buffers stay mapped (pinned) until it completes."""
    with DeviceSession(Later, sock) as s:
        s.start_queue(0)
        head = s.submit(0, writable=[16])
        (p,) = s.device.take(1)
        old_region = s.backend.memory.table.regions[0]
        t0 = time.monotonic()
        s.fe.set_mem_table(s.ram)  # a new table: the old mapping is retired, not unmapped
        assert time.monotonic() - t0 < 5.0
        assert old_region.pins == 1 and not old_region.closed
        p.request.write(b"still mapped, ok")
        p.complete(16)
        ((got, n),) = s.wait_used(0)
        assert (got, n) == (head, 16)
        assert s.fe.driver(0).written_data(head) == b"still mapped, ok"
        _wait(lambda: old_region.closed)  # unmapped once the last pin went
        assert s.backend.memory.leaked_mappings == 0


def test_get_vring_base_waits_for_deferred_requests(sock):
    with DeviceSession(Later, sock) as s:
        s.start_queue(0)
        heads = [s.submit(0, writable=[4]) for _ in range(2)]
        pend = s.device.take(2)

        def finish_soon():
            time.sleep(0.3)
            for p in pend:
                p.complete(p.request.write(b"bye!"))

        t = threading.Thread(target=finish_soon)
        t.start()
        assert s.fe.get_vring_base(0) == 2   # answered after both were published
        t.join()
        used = s.fe.driver(0).used()
        assert sorted(h for h, _ in used) == sorted(heads)


def test_watched_fd_callback_completes_requests(sock):
    class Timer(pyvhost.Device):
        """Completes its requests when its eventfd fires, in the event thread."""

        def __init__(self) -> None:
            super().__init__()
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.waiting: list[pyvhost.Pending] = []
            self.lock = threading.Lock()
            self.watch(self.fd, self.fire)

        def handle(self, queue, request):
            with self.lock:
                self.waiting.append(request.defer())

        def fire(self, fd):
            os.eventfd_read(fd)
            with self.lock:
                done, self.waiting = self.waiting, []
            for p in done:
                p.complete(p.request.write(b"tick"))

        def reset(self) -> None:
            super().reset()

    with DeviceSession(Timer, sock) as s:
        s.start_queue(0)
        head = s.submit(0, writable=[4])
        _wait(lambda: s.backend.stats()["device_deferred"] == 1)
        os.eventfd_write(s.device.fd, 1)
        ((got, n),) = s.wait_used(0)
        assert (got, n) == (head, 4)
        assert s.fe.driver(0).written_data(head) == b"tick"


def test_rng_device_serves_random_bytes(sock):
    with DeviceSession(RngDevice, sock) as s:
        s.start_queue(0)
        n1, a = s.request(0, writable=[64])
        n2, b = s.request(0, writable=[32, 32])
        assert n1 == n2 == 64 and a != b and len(set(a)) > 16
        # A huge buffer gets at most MAX_BYTES_PER_REQUEST, as the spec allows.
        n3, _ = s.request(0, writable=[1 << 20])
        assert n3 == 64 * 1024
        assert s.backend.stats()["rng_bytes"] == 64 + 64 + 64 * 1024


def test_device_api_is_exported():
    assert set(pyvhost.__all__) >= {"Device", "Request", "Pending", "RequestError",
                                    "ConfigError"}
    assert pyvhost.Device is pyvhost.device.Device


def _wait(cond, timeout: float = 60.0) -> None:  # a bound against hangs (a cold numba cache)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_abandoned_deferred_requests_release_their_memory(sock):
    """A device that never completes: the stopping ring waits drain_timeout, abandons the
    requests, and their late completion is dropped; the mapping goes when the last pin does,
    nothing leaks, the daemon serves the next connection."""
    from pyvhost.daemon.backend import BackendOptions

    with DeviceSession(Later, sock, options=BackendOptions(drain_timeout=0.2)) as s:
        s.start_queue(0)
        s.submit(0, writable=[8])
        (p,) = s.device.take(1)
        region = s.backend.memory.table.regions[0]
        assert s.fe.get_vring_base(0) == 1       # answered after 0.2 s, the request abandoned
        assert region.pins == 1 and not region.closed
        p.complete(0)                            # too late: dropped, its pin released
        assert region.pins == 0
        assert s.fe.driver(0).used_idx() == 0    # nothing written into the stopped ring
        backend = s.backend
    assert backend.memory.leaked_mappings == 0
    assert region.closed
