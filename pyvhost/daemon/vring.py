"""One virtqueue's connection-level state: its ring, its eventfds, and where it is in the
vhost-user ring life cycle ("Ring states" in the spec):

    stopped ──kick fd / NOFD──▶ started ──GET_VRING_BASE / reset / disconnect──▶ stopped
    disabled ◀──SET_VRING_ENABLE──▶ enabled          (independent of started/stopped)

`running` is the one flag the worker reads, once per round *inside* its epoch. Only the
protocol thread sets it (from the state above); it clears it and then waits one grace period,
after which no worker touches the ring (see `Backend._stop_worker_use`). A worker that finds
the queue broken clears it too, and never sets it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvhost.daemon.eventfd import EventFd
from pyvhost.device import RequestRunner
from pyvhost.ring.virtqueue import Virtqueue


@dataclass(eq=False)
class Vring:
    index: int
    queue: Virtqueue
    kick: EventFd | None = None
    call: EventFd | None = None
    err: EventFd | None = None
    kick_polling: bool = False  # SET_VRING_KICK with NOFD: no kicks, poll the ring
    started: bool = False
    enabled: bool = False
    #: What the worker reads: started, not broken, and enabled or device-runs-when-disabled.
    running: bool = False
    #: The worker calls process_burst when True, discard_burst when False.
    process: bool = False
    #: Worker-private: whether we asked the driver not to kick (a Python mirror of the ring).
    notify_off: bool = False
    broken_reported: bool = False
    #: Worker-private: the queue's miss counter (kernels' Q_MISSES) last looked at.
    misses_seen: int = 0
    #: Serves the ring through Device.handle() (None: the device's process_burst does).
    runner: RequestRunner | None = None
