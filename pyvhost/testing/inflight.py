"""A device for crash tests of inflight I/O tracking, served in its own process
(`pyvhost run pyvhost.testing.inflight:Parked`) so that a test can SIGKILL it, or let it
SIGKILL itself at a chosen point.

Each request's readable bytes are a tag `KIND:N`; the device appends the tag to the file named
by $PYVHOST_TEST_LOG (one write per request, so a kill never tears a line), writes one byte
(0x01) into the writable buffer and completes with used length 1, according to KIND:

    now         at once (returned from handle())
    park        deferred and never completed while $PYVHOST_TEST_PARK is 1 (in flight when
                the process is killed); at once otherwise
    later       deferred, completed 0-3 ms later from another thread, in random order
    die-before  while $PYVHOST_TEST_PARK is 1, the process kills itself in handle(), before
                the request has any effect; at once otherwise
    die-after   while $PYVHOST_TEST_PARK is 1, completed (handed to pyvhost, not yet
                published: the worker publishes in its next round), then the process kills
                itself; at once otherwise
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from pyvhost.device import Device, Pending, Request


class Parked(Device):
    name = "parked"
    device_id = 4
    num_queues = 1
    tracks_inflight = True

    def __init__(self) -> None:
        super().__init__()
        self.park = os.environ.get("PYVHOST_TEST_PARK") == "1"
        self.log_fd = os.open(os.environ["PYVHOST_TEST_LOG"],
                              os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.parked: list[Pending] = []
        self._later: list[Pending] = []
        self._lock = threading.Lock()
        self._completer = threading.Thread(target=self._complete_later, daemon=True,
                                           name="parked-completer")
        self._completer.start()

    def handle(self, queue: int, request: Request) -> int | None:
        tag = request.read().decode()
        os.write(self.log_fd, f"{tag}\n".encode())
        kind = tag.partition(":")[0]
        request.write(b"\x01")
        if kind == "later":
            with self._lock:
                self._later.append(request.defer())
            return None
        if not self.park or kind == "now":
            return 1
        if kind == "die-before":
            os.kill(os.getpid(), signal.SIGKILL)
        pending = request.defer()
        if kind == "die-after":
            pending.complete(1)
            os.kill(os.getpid(), signal.SIGKILL)
        self.parked.append(pending)
        return None

    def _complete_later(self) -> None:
        rnd = random.Random()
        while True:  # a daemon thread: the process ends with a kill or at exit
            time.sleep(rnd.random() * 0.003)
            with self._lock:
                if not self._later:
                    continue
                k = rnd.randrange(len(self._later))
                pending = self._later.pop(k)
            pending.complete(1)
