"""A device kernel given a PollWindow keeps bursting and polling its ring in compiled code
(ring/poll.py), and still leaves within one burst when its worker is asked to: by a writer's
grace period (EpochDomain.synchronize), by sync() and by stop(). Checked with windows far
longer than any test waits, so only the leave request can end them."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pyvhost.daemon import worker as W
from pyvhost.daemon.vring import Vring
from pyvhost.devices.net.device import NetDevice
from pyvhost.memory.epoch import EpochDomain
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.ring.poll import POLL_WINDOW_S, PollWindow, cycles_per_second, one_pass_window
from pyvhost.ring.split_queue import SplitQueue
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

UDP_FRAME = (b"\0" * 12 + b"\x52\x54\x00\x00\x00\x02" + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00"
             + bytes([0x45] + [0] * 8 + [17]) + b"\0" * 30)
LONG = 3600.0  # a window no test could wait out


@dataclass
class DropRing:
    """A NetDevice (drop sink) serving TX ring 1, fed by a test-double driver."""

    driver: MockSplitQueue
    queue: SplitQueue
    dev: NetDevice
    memory: GuestMemory

    def burst(self, window: PollWindow | None = None, views=None) -> tuple[int, bool]:
        table = self.memory.table
        if views is None:
            views = self.queue.round_views(table)
        return self.dev.process_burst(self.queue, table, table.kernel(), views, window=window)

    def offer(self, n: int) -> None:
        self.driver.add_chains_and_publish([([UDP_FRAME], [])] * n)

    def wait_for_packets(self, n: int) -> int:
        deadline = time.monotonic() + 10
        while self.dev.stats()["tx_packets"] < n and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.dev.stats()["tx_packets"]


@contextmanager
def drop_ring() -> Iterator[DropRing]:
    with GuestRam([(0, 1 << 20)]) as ram:
        memory = backend_memory(ram)
        driver = MockSplitQueue(ram, 256)
        queue = device_queue(driver, memory, index=1)
        dev = NetDevice()
        dev.on_queue_started(queue)
        try:
            yield DropRing(driver, queue, dev, memory)
        finally:
            queue.drop_views()
            memory.close()


def test_an_empty_ring_is_polled_for_the_idle_budget_then_left():
    """With the default budgets a call on an empty ring polls ~IDLE_POLL_S, not the window."""
    with drop_ring() as r:
        window = PollWindow(np.zeros(1, dtype=np.int64), idle=True, seconds=LONG)
        assert 0 < window.idle_cycles < window.cycles
        r.burst()  # compiled
        t0 = time.monotonic()
        assert r.burst(window) == (0, False)
        assert time.monotonic() - t0 < 10


def test_cycle_counter_rate_is_plausible():
    assert 1e8 < cycles_per_second() < 1e10


def test_one_pass_window_drains_and_returns():
    with drop_ring() as r:
        r.offer(100)
        done, _ = r.burst(one_pass_window())
        assert done == 100 and r.dev.stats()["tx_udp"] == 100


def test_polling_kernel_consumes_what_arrives_and_leaves_when_asked():
    """A kernel polling an empty ring (window of an hour) takes chains the driver adds while
    it polls, and returns soon after another thread raises leave_request. (The driver wants no
    interrupts: one would end the loop too, so that the worker can signal it.)"""
    with drop_ring() as r:
        r.driver.set_no_interrupt(True)
        leave = np.zeros(1, dtype=np.int64)
        window = PollWindow(leave, idle=True, seconds=LONG, idle_seconds=LONG)
        views = r.queue.round_views(r.memory.table)
        result: list[tuple[int, bool]] = []
        t = threading.Thread(target=lambda: result.append(r.burst(window, views)))
        t.start()
        try:
            time.sleep(0.05)
            assert t.is_alive()  # still polling the empty ring
            r.offer(50)
            assert r.wait_for_packets(50) == 50 and t.is_alive()
        finally:
            leave[0] = 1
            t.join(10)
        assert not t.is_alive() and result == [(50, False)]
        assert r.driver.used_idx() == 50
        del views


def test_interrupt_request_ends_a_polling_burst_loop():
    with drop_ring() as r:
        r.offer(10)
        window = PollWindow(np.zeros(1, dtype=np.int64), idle=True, seconds=LONG)
        assert r.burst(window) == (10, True)


def test_grace_period_ends_a_polling_burst_loop():
    """synchronize() raises the flag of a worker inside its epoch and waits for it to leave."""
    domain = EpochDomain()
    epoch = domain.register("w")
    with drop_ring() as r:
        window = PollWindow(epoch.leave_request, idle=True, seconds=LONG,
                            idle_seconds=LONG)
        views = r.queue.round_views(r.memory.table)
        entered = threading.Event()

        def worker() -> None:
            epoch.enter()
            entered.set()
            try:
                r.burst(window, views)
            finally:
                epoch.leave()

        t = threading.Thread(target=worker)
        t.start()
        entered.wait(10)
        time.sleep(0.02)
        waited = domain.synchronize(timeout=10)
        t.join(10)
        assert not t.is_alive() and not epoch.inside and waited < 10
        assert epoch.leave_request[0] == 1  # lowered only by the next enter()
        epoch.enter()
        assert epoch.leave_request[0] == 0
        epoch.leave()
        del views


def test_busy_poll_worker_with_long_window_serves_sync_grace_and_stop(monkeypatch):
    """A busy-polling worker whose device polls in its kernel: frames are consumed, a grace
    period completes, sync() comes round and stop() returns, each well inside the window."""
    monkeypatch.setattr(W, "PollWindow", lambda leave, idle, seconds=0.0, idle_seconds=0.0:
                        PollWindow(leave, idle=idle, seconds=LONG, idle_seconds=LONG))
    with drop_ring() as r:
        vr = Vring(1, r.queue)
        vr.running = vr.process = True
        worker = W.Worker("w", r.memory, r.dev, [vr], poll_mode=True, on_broken=lambda v: None)
        worker.start()
        try:
            r.offer(64)
            assert r.wait_for_packets(64) == 64
            assert r.memory.epochs.synchronize(timeout=10) < 10
            assert worker.sync(timeout=10)
            r.offer(64)
            assert r.wait_for_packets(128) == 128  # it went back to polling
        finally:
            vr.running = False
            t0 = time.monotonic()
            worker.stop(timeout=10)
            stopped_in = time.monotonic() - t0
        assert not worker.alive and stopped_in < 10


class _WindowSpy(NetDevice):
    """Records the window each call got; ring 0 reports work while `busy_rx` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_rx = True
        self.calls: list[tuple[int, bool]] = []
        self.cycles: list[tuple[int, int]] = []
        self.idle_cycles: list[tuple[int, int]] = []

    def process_burst(self, queue, table, mem, views, window=None):
        self.calls.append((queue.index, window.idle))
        self.cycles.append((queue.index, window.cycles))
        self.idle_cycles.append((queue.index, window.idle_cycles))
        time.sleep(0.0002)
        return (1 if queue.index == 0 and self.busy_rx else 0), False


@contextmanager
def _spy_worker(poll_mode: bool) -> Iterator[_WindowSpy]:
    """A worker (busy-polling or not) serving two rings, 0 and 1, of a _WindowSpy; stopped and
    cleaned up on exit."""
    with GuestRam([(0, 1 << 20)]) as ram:
        memory = backend_memory(ram)
        dev = _WindowSpy()
        vrings = []
        for index in (0, 1):
            queue = device_queue(MockSplitQueue(ram, 8), memory, index=index)
            vr = Vring(index, queue)
            vr.running = vr.process = True
            vrings.append(vr)
        worker = W.Worker("w", memory, dev, vrings, poll_mode=poll_mode,
                          on_broken=lambda v: None)
        worker.start()
        try:
            yield dev
        finally:
            for vr in vrings:
                vr.running = False
            worker.stop()
            for vr in vrings:
                vr.queue.drop_views()
            memory.close()


def _wait_calls(dev: _WindowSpy, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(dev.calls) < n and time.monotonic() < deadline:
        time.sleep(0.001)


def test_an_idle_ring_polls_on_only_while_the_workers_other_rings_are_idle():
    """A busy RX ring beside an idle TX ring: the TX ring's window ends at the first empty
    look (else each pass would hold the RX ring up for a whole window); once the RX ring is
    idle too, the TX ring may poll on."""
    with _spy_worker(poll_mode=True) as dev:
        _wait_calls(dev, 40)
        busy_phase = list(dev.calls)
        dev.busy_rx = False
        time.sleep(0.05)
        n = len(dev.calls)
        _wait_calls(dev, n + 40)
        idle_phase = dev.calls[n:]
    tx_busy = [idle for index, idle in busy_phase[2:] if index == 1]
    tx_idle = [idle for index, idle in idle_phase if index == 1]
    assert tx_busy and not any(tx_busy)
    assert tx_idle and all(tx_idle)
    # The ring that alone had work polls for the long window, the other for the short one.
    rate = cycles_per_second()
    busy_cycles = dev.cycles[2:len(busy_phase)]
    assert {c for i, c in busy_cycles if i == 0} == {int(W.ALONE_WINDOW_S * rate)}
    assert {c for i, c in busy_cycles if i == 1} == {int(POLL_WINDOW_S * rate)}


def test_in_interrupt_mode_a_ring_alone_polls_briefly_before_the_worker_sleeps():
    """Interrupt mode: the ring that alone had work keeps polling its empty ring for
    INTERRUPT_IDLE_POLL_S (a quick driver's next request is met there, not after a kick and
    a wake-up); a ring beside it returns at its first empty look."""
    with _spy_worker(poll_mode=False) as dev:
        _wait_calls(dev, 40)
    rate = cycles_per_second()
    seen = dev.idle_cycles[2:40]
    assert {c for i, c in seen if i == 0} == {int(W.INTERRUPT_IDLE_POLL_S * rate)}
    assert {c for i, c in seen if i == 1} == {0}
