"""A busy-polling worker with nothing to do hands the GIL over (found while measuring the
memory-churn round trips, docs/robustness.md): it spins in compiled code without the GIL,
outside its epoch, so the protocol thread neither waits for the GIL nor for a grace period."""

from __future__ import annotations

import threading
import time

from pyvhost.daemon import worker as W
from pyvhost.daemon.backend import BackendOptions
from pyvhost.devices.net.device import NetDevice
from pyvhost.daemon.vring import Vring
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue


def test_idle_spin_releases_the_gil():
    W.idle_spin()  # loaded and calibrated
    progress = []
    done = threading.Event()

    def other():
        while not done.is_set():
            progress.append(1)

    t = threading.Thread(target=other)
    t.start()
    try:
        time.sleep(0.01)
        before = len(progress)
        W.idle_spin(0.05)  # 50 ms in compiled code: the other thread must run meanwhile
        during = len(progress) - before
    finally:
        done.set()
        t.join()
    assert during > 0


def test_poll_worker_spins_outside_its_epoch_when_idle(monkeypatch):
    seen: list[bool] = []
    worker = None

    def spy(seconds: float = W.IDLE_SPIN_S) -> None:
        seen.append(worker._epoch.inside)
        time.sleep(0.0005)

    with GuestRam([(0, 1 << 20)]) as ram:
        memory = backend_memory(ram)
        device = NetDevice()
        queue = device_queue(MockSplitQueue(ram, 8), memory, index=1)
        device.on_queue_started(queue)
        vr = Vring(1, queue)
        vr.running = vr.process = True  # a started, enabled ring with nothing in it
        worker = W.Worker("w", memory, device, [vr], poll_mode=True, on_broken=lambda v: None)
        monkeypatch.setattr(W, "idle_spin", spy)
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while len(seen) < 5 and time.monotonic() < deadline and worker.alive:
                time.sleep(0.001)
        finally:
            vr.running = False
            worker.stop()
            queue.drop_views()
            memory.close()
    assert len(seen) >= 5 and not any(seen)
    assert BackendOptions().poll is False  # interrupt mode (the default) never spins
