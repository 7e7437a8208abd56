"""Worker threads: each runs the bursts of a fixed group of rings.

Theory of operation. A worker loops over its rings. For each ring it enters its epoch, reads
the ring's `running` flag (after entering: a protocol thread that clears the flag and then
waits a grace period is then sure no burst is still using the ring), loads the memory table
once, picks this round's metadata path (`round_views`), lets the device run one burst (which
says whether the driver wants an interrupt; the worker then signals the call fd), and leaves
the epoch. Nothing read inside the
epoch survives it (the round is a function; its locals die on return), except what a deferred
request pins (`GuestMemory.pin`) until it completes.

A ring runs either the device's compiled `process_burst` or its `RequestRunner` (one
`Device.handle()` call per request, deferred completions published in the ring's next round;
completing one wakes the worker). An exception out of either breaks that ring only (the
queue's DEVICE_FAILED state, reported like a ring the guest broke); the loop goes on.

Two modes:
- busy-poll: kick notifications are switched off once per ring start (VRING_USED_F_NO_NOTIFY,
  or an avail_event left behind with EVENT_IDX) and the worker never sleeps while any of its
  rings runs; a device that polls in its kernels (`Device.polls_in_kernel`) keeps bursting and
  polling its ring in compiled code for a `PollWindow` (100 us; polling an empty ring only
  while no other ring of the worker had work in the last pass), leaving early when a writer
  waits for a grace period (`WorkerEpoch.leave_request`), when the driver wants an interrupt,
  or when `sync()`/`stop()` ask; a few passes in a row that found no work are followed by
  short spins in compiled code with the GIL released, outside every epoch (`idle_spin`), so
  the protocol thread can take the GIL;
- interrupt-driven (default): while a ring has work, kicks stay off; when a round finds
  nothing, kicks are switched back on, and if the ring re-check shows new buffers it goes on
  (virtio 1.x 2.7.10), else the worker sleeps in poll() on the kick eventfds of its running
  rings, the device's `extra_wait_fds` for them, and its own wake-up eventfd, which the
  protocol thread signals after any change.

Changing the fds a worker polls is made safe by `sync()`: the protocol thread swaps the fd,
calls `sync()` (which returns once the worker has passed the top of its loop, where it reads
the ring set afresh), and only then closes the old fd.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Callable, Sequence

from pyvhost.daemon.eventfd import EventFd
from pyvhost.daemon.vring import Vring
from pyvhost.device import Device
from pyvhost.memory.epoch import WorkerEpoch
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.ring import kernels as K
from pyvhost.ring.direct_map import NO_VIEWS, RingViews
from pyvhost.ring.jit import kernel
from pyvhost.ring.poll import IDLE_POLL_S, PollWindow, cpu_relax

log = logging.getLogger(__name__)

# A running ring without a kick fd (NOFD) is polled this often while the worker would sleep.
NOFD_POLL_MS = 1
# After this many busy-poll passes in a row that found no work: spin IDLE_SPIN_S with the GIL
# released. Under traffic a pass rarely comes up empty twice running, and spinning after the
# first empty one left a 256-entry ring full (the driver refused frames) for 20 us of every
# ~50 us: measured against testpmd txonly, 5.4 Mpps of 64-byte frames.
IDLE_PASSES_BEFORE_SPIN = 4
IDLE_SPIN_S = 20e-6
# The poll window of a ring that was the only one of its worker with work in the last pass
# (others get ring/poll.py's POLL_WINDOW_S, 100 us). Why longer: each return to Python costs
# a round (epoch, views, the device's call) of several microseconds; with a TAP sink, where
# the kernel's write path takes most of the core, the worker spent about 5% of its time
# outside the device's kernel at 100 us windows. The price: a ring that gets work while
# another is alone waits up to this long, once (from the next pass on neither is alone);
# a grace period still waits one burst at most (`leave`).
ALONE_WINDOW_S = 1e-3
# Interrupt mode: how long a ring that alone had work keeps polling its empty ring (in the
# device's kernel) before the worker re-enables kicks and sleeps; poll mode uses
# ring/poll.py's IDLE_POLL_S. Why: a driver that answers quickly (a block driver resubmitting
# what completed, a request-response exchange) would otherwise meet a worker that has just
# gone back to Python (a round of several microseconds) or to sleep (a kick: a system call
# for the driver, a wake-up for the worker). QEMU's iothreads poll the same way, adaptively up
# to 32 us. Measured with pyvhost's blk front-end keeping 32 4 KiB reads of a null disk in
# flight: without it a Python round every ~32 requests (72,000 rounds/s) and 2.5 M reads/s;
# with it ~1,000 rounds/s and 4.0-4.2 M reads/s.
INTERRUPT_IDLE_POLL_S = 20e-6


@kernel
def _spin(iterations):
    for _ in range(iterations):
        cpu_relax()


_spin_per_s = 0.0


def idle_spin(seconds: float = IDLE_SPIN_S) -> None:
    """Spin for about `seconds` in compiled code without the GIL.

    Why: a busy-polling worker with nothing to do runs Python with only sub-microsecond
    breaks (the empty burst calls), and CPython hands the GIL to a waiting thread only if it
    wakes up inside such a break, or after the switch interval (5 ms) without any. The
    protocol thread then waited up to milliseconds for the GIL after every blocking call —
    after poll() said a message came, after each sleep of a grace period (which also waited
    for the worker to leave a burst) — while changing the memory map. sys.setswitchinterval
    does not help: every voluntary release restarts the waiter's timeout. Spinning outside
    the epoch keeps the grace period from waiting on it.
    """
    global _spin_per_s
    if not _spin_per_s:
        _spin(10)  # compiled or loaded
        t0 = time.perf_counter()
        _spin(20_000)
        _spin_per_s = 20_000 / max(time.perf_counter() - t0, 1e-6)
    _spin(max(1, int(seconds * _spin_per_s)))


class Worker:
    def __init__(self, name: str, memory: GuestMemory, device: Device, vrings: Sequence[Vring],
                 *, poll_mode: bool, on_broken: Callable[[Vring], None],
                 on_miss: Callable[[Vring], None] | None = None) -> None:
        self.name = name
        self.memory = memory
        self.device = device
        self.vrings = tuple(vrings)
        # Ring index -> the ring of this worker that Device.process_pair serves with it.
        mine = {vr.index: vr for vr in self.vrings}
        self._partners = {vr.index: mine[p] for vr in self.vrings
                          if (p := device.partner_ring(vr.index)) is not None and p in mine
                          and p != vr.index}
        self.poll_mode = poll_mode
        self._on_broken = on_broken
        #: Device IOTLB: called (this thread, outside the epoch) when a round met a miss.
        self._on_miss = on_miss
        self._wake = EventFd.create(f"{name}-wake")
        self._stop = False
        self._cond = threading.Condition()
        self._gen = 0
        self._seen = 0
        self.rounds = 0
        self.sleeps = 0
        # Registered here, before any ring can start, so no grace period can miss this worker.
        self._epoch: WorkerEpoch = memory.epochs.register(name)
        # Devices that poll in their kernels (Device.polls_in_kernel) keep going within this
        # window and leave it when a writer raises the epoch's leave_request.
        self._window = PollWindow(self._epoch.leave_request, idle=True, seconds=ALONE_WINDOW_S,
                                  idle_seconds=IDLE_POLL_S if poll_mode else INTERRUPT_IDLE_POLL_S)
        self._drain_window = PollWindow(self._epoch.leave_request, idle=False)
        if poll_mode:
            idle_spin()  # load (or compile) and calibrate it now, not in the first idle pass
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- control (protocol thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def ring_starting(self, vr: Vring) -> None:
        """Before `vr.running` is set: reset the worker-private notification mirror."""
        # Poll mode switches kicks off on the first round; interrupt mode must (re)arm them on
        # the first idle round, or an EVENT_IDX driver may never kick (avail_event unset).
        vr.notify_off = not self.poll_mode

    def wake(self) -> None:
        self._wake.signal()

    def sync(self, timeout: float = 2.0) -> bool:
        """Return once the worker has re-read its rings' fds since this call (True), or
        False on timeout. Immediate when the thread is not running."""
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return True
        with self._cond:
            self._gen += 1
            target = self._gen
        self._epoch.leave_request[0] = 1  # out of a polling burst loop, if it is in one
        self._wake.signal()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._seen >= target or not self._thread.is_alive(), timeout)
        if not ok:
            log.error("%s: did not come round within %.1fs", self.name, timeout)
        return ok

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._epoch.leave_request[0] = 1
        self._wake.signal()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: did not stop within %.1fs", self.name, timeout)
                return  # keep the wake fd: the thread may still poll it
        self.memory.epochs.unregister(self._epoch)
        self._wake.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop (worker thread) -------------------------------------------------------------

    def _run(self) -> None:
        idle_passes = 0
        # Rings that had work in the last pass. A ring may poll on while empty (its device
        # keeping polling in its kernel) only when no other ring of this worker had work:
        # otherwise an idle TX ring would hold up a busy RX ring for a whole window each pass.
        worked: set[int] = set()
        try:
            while not self._stop:
                self._ack()
                busy = running = False
                last, worked = worked, set()
                for vr in self.vrings:
                    if vr.running:
                        running = True
                        alone = not last or last == {vr.index}
                        if self._round(vr, self._window if alone else self._drain_window):
                            busy = True
                            worked.add(vr.index)
                if busy:
                    idle_passes = 0
                    continue
                if self.poll_mode and running:
                    idle_passes += 1
                    if idle_passes >= IDLE_PASSES_BEFORE_SPIN:
                        idle_spin()
                    continue
                self._idle_wait()
        except Exception:  # a bug here must not pass silently
            log.exception("%s: worker crashed; its rings stop", self.name)
            for vr in self.vrings:
                vr.running = False
        finally:
            with self._cond:
                self._seen = self._gen
                self._cond.notify_all()

    def _ack(self) -> None:
        if self._seen != self._gen:
            with self._cond:
                self._seen = self._gen
                self._cond.notify_all()

    def _round(self, vr: Vring, window: PollWindow) -> bool:
        """One burst on one ring (more while `window` lets the device go on polling); True if
        it did work or more is pending."""
        epoch = self._epoch
        epoch.enter()
        partner = None
        try:
            if not vr.running:
                return False
            self.rounds += 1
            queue = vr.queue
            table = self.memory.table
            views = queue.round_views(table)
            partner, p_views = self._partner(vr, table)
            if queue.ring_missing:  # device IOTLB: the rings do not translate (yet)
                if not queue.broken:
                    return False  # retried on the UPDATE (wake) or the next kick
                done, notify = 0, False
            else:
                mem = table.kernel()
                if self.poll_mode and not vr.notify_off:
                    K.disable_notification(mem, queue.q, views)
                    vr.notify_off = True
                try:
                    if partner is not None:
                        done, notify = self._pair_burst(vr, partner, table, mem, views,
                                                        p_views, window)
                    else:
                        done, notify = self._burst(vr, table, mem, views, window)
                except Exception as exc:  # the device's code: break this ring only
                    for broken in (queue,) if partner is None else (queue, partner.queue):
                        if not broken.broken:  # (a RingError of the Python queue API: broken)
                            broken.fail_device(f"{type(self.device).__name__} raised "
                                               f"{type(exc).__name__}: {exc}", exc)
                    done, notify = 0, False
            if queue.broken:
                vr.running = False
            elif done > 0:
                if notify and vr.call is not None:
                    vr.call.signal()
                if not vr.notify_off:
                    K.disable_notification(mem, queue.q, views)
                    vr.notify_off = True
                return True
            elif not self.poll_mode and vr.notify_off:
                vr.notify_off = False
                # True: buffers arrived while kicks were off, so go on (2.7.10) — unless the
                # round stopped at an IOTLB miss: then sleep until the UPDATE (wake) or a kick.
                more = bool(K.enable_notification(mem, queue.q, views))
                return more and queue.q[K.Q_MISSES] == vr.misses_seen
            else:
                return False
        finally:
            epoch.leave()
            for ring in (vr,) if partner is None else (vr, partner):
                if ring.queue.q[K.Q_MISSES] != ring.misses_seen and self._on_miss is not None:
                    ring.misses_seen = int(ring.queue.q[K.Q_MISSES])
                    self._on_miss(ring)  # outside the epoch: it sends on a socket
            if partner is not None and partner.queue.broken:
                self._on_broken(partner)  # outside the epoch: it logs and signals
        self._on_broken(vr)
        return False

    def _partner(self, vr: Vring, table) -> tuple[Vring | None, RingViews]:
        """The ring to serve with vr in one process_pair call this round and its views, if
        any: both rings process through the device's kernels and the partner's translates.
        (In the epoch: the partner's `running`, read here, then holds for the round.)"""
        partner = self._partners.get(vr.index)
        if partner is None or not (vr.process and vr.runner is None and partner.running
                                   and partner.process and partner.runner is None):
            return None, NO_VIEWS
        p_views = partner.queue.round_views(table)
        if partner.queue.ring_missing:
            return None, NO_VIEWS
        return partner, p_views

    def _pair_burst(self, vr: Vring, partner: Vring, table, mem, views, p_views,
                    window: PollWindow) -> tuple[int, bool]:
        """Device.process_pair on vr and its partner. Returns vr's (done, notify) and settles
        the partner's: its interrupt signalled, a ring it broke stopped."""
        p_queue = partner.queue
        if self.poll_mode and not partner.notify_off:
            K.disable_notification(mem, p_queue.q, p_views)
            partner.notify_off = True
        done, notify, p_done, p_notify = self.device.process_pair(
            vr.queue, p_queue, table, mem, views, p_views, window)
        if p_queue.broken:
            partner.running = False  # reported by _round once out of the epoch
        elif p_done > 0 and p_notify and partner.call is not None:
            partner.call.signal()
        return done, notify

    def _burst(self, vr: Vring, table, mem, views, window: PollWindow) -> tuple[int, bool]:
        queue = vr.queue
        if vr.runner is not None:
            if vr.process:
                return vr.runner.serve(table, mem, views)
            return self.device.discard_burst(queue, table, mem, views)
        burst = self.device.process_burst if vr.process else self.device.discard_burst
        if self.device.polls_in_kernel:
            # Such a device's bursts take `window=` (Device.polls_in_kernel).
            polling: Callable[..., tuple[int, bool]] = burst
            return polling(queue, table, mem, views, window=window)
        return burst(queue, table, mem, views)

    def _idle_wait(self) -> None:
        poller = select.poll()
        wake = self._wake.fileno()
        poller.register(wake, select.POLLIN)
        kicks: dict[int, EventFd] = {}
        timeout = None
        for vr in self.vrings:
            if not vr.running:
                continue
            if vr.kick is None:
                timeout = NOFD_POLL_MS
            else:
                kicks[vr.kick.fileno()] = vr.kick
                poller.register(vr.kick.fileno(), select.POLLIN)
            # Work from outside the guest (e.g. a TAP with frames for an RX ring): the device
            # consumes what made these readable in its next burst on the ring.
            for fd in self.device.extra_wait_fds(vr.index):
                poller.register(fd, select.POLLIN)
        self.sleeps += 1
        for fd, _ in poller.poll(timeout):
            if fd == wake:
                self._wake.drain()
            elif fd in kicks:
                kicks[fd].drain()


def group_rings(vrings: Sequence[Vring], workers: int) -> list[list[Vring]]:
    """Rings to workers, round robin by index (queue pairs land on different workers)."""
    groups: list[list[Vring]] = [[] for _ in range(max(1, workers))]
    for vr in vrings:
        groups[vr.index % len(groups)].append(vr)
    return groups
