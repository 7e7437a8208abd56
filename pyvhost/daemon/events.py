"""The connection's event thread: calls a device's watched-fd callbacks (`Device.watch`).

Why a thread of its own: a worker busy-polling its rings never sleeps in poll(), and a
callback (reaping an io_uring, a timer) must not wait for a ring's burst nor hold one up.
Callbacks complete deferred requests through `Pending.complete()`, which hands the used
element to the ring's worker. A callback that raises is logged and its fd unwatched; the
rings go on.
"""

from __future__ import annotations

import logging
import select
import threading

from pyvhost.daemon.eventfd import EventFd
from pyvhost.device import Device

log = logging.getLogger(__name__)


class DeviceEvents:
    def __init__(self, name: str, device: Device) -> None:
        self.name = name
        self.device = device
        self._wake = EventFd.create(f"{name}-events")
        self._stop = False
        self._thread: threading.Thread | None = None
        self.callback_errors = 0
        device._watch_changed = self._changed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-events",
                                            daemon=True)
            self._thread.start()

    def _changed(self) -> None:
        self._wake.signal()

    def stop(self, timeout: float = 5.0) -> None:
        self.device._watch_changed = None
        self._stop = True
        self._wake.signal()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: event thread did not stop within %.1fs", self.name, timeout)
                return  # keep the wake fd: the thread may still poll it
        self._wake.close()

    def _run(self) -> None:
        wake = self._wake.fileno()
        while not self._stop:
            watches = self.device.watched
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in watches:
                poller.register(fd, select.POLLIN)
            for fd, events in poller.poll():
                if fd == wake:
                    self._wake.drain()
                    continue
                callback = watches.get(fd)
                if callback is None or self._stop:
                    continue
                if events & select.POLLNVAL:
                    log.error("%s: watched fd %d is not open; unwatched", self.name, fd)
                    self.device.unwatch(fd)
                    continue
                try:
                    callback(fd)
                except Exception:
                    self.callback_errors += 1
                    log.exception("%s: callback for fd %d raised; fd unwatched", self.name, fd)
                    self.device.unwatch(fd)
