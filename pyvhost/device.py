"""The device API: what a device author writes to serve a virtio device over vhost-user.

A device is a plain object; the daemon owns the connection, guest memory, rings and threads.
Subclass `Device`, set the class attributes, and implement `process_burst`:

    class Sink(Device):
        name = "sink"
        device_features = 1 << VIRTIO_F_VERSION_1
        num_queues = 1

        def process_burst(self, queue, table, mem, views):
            chains = queue.pop_burst(table)            # Python API (slow, simple), or
            ...                                        # compiled kernels on (mem, q, views)
            notify = queue.push_used(table, [(c.head, 0) for c in chains]) if chains else False
            return len(chains), notify

Contract of `process_burst(queue, table, mem, views) -> (done, notify)`:
- It is called by a worker thread inside an epoch (`WorkerEpoch.enter/leave`), only while the
  ring is started and enabled; `table` is the memory snapshot for this burst, `mem` its kernel
  form (`KernelMemory`), `views` the ring views `queue.round_views(table)` chose this round.
  Nothing derived from them may be kept after returning (it would pin unmapped memory).
- It processes a bounded amount of work (one burst, or a few: the bound is how long a memory
  change may have to wait), adds and *publishes* used elements (used->idx), and returns the
  number of chains it completed and whether the driver wants an interrupt now. Whoever
  publishes decides (`kernels.needs_interrupt` right after publishing; it updates the
  event-index state, so asking twice would lose interrupts); the worker signals the call fd.
- Bad guest input breaks the queue (`queue.broken`); the daemon stops and reports it.

A device whose compiled kernels can keep polling a ring sets `polls_in_kernel`; the worker
then passes `window=` (a `ring.poll.PollWindow`) to process_burst and discard_burst, and the
call may go on bursting, and polling an empty ring when the window says so, for the window's
cycles, returning after any burst when `window.leave[0]` is set (a grace period waits) or the
driver wants an interrupt. Called without a window, it drains what is there and returns.

A ring that is started but disabled runs `discard_burst` instead, only if
`runs_when_disabled(index)` says so (a net TX ring must consume and drop, vhost-user "Ring
states"); by default a disabled ring is not touched at all.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from pyvhost.memory.table import KernelMemory, RegionTable
from pyvhost.ring.direct_map import RingViews
from pyvhost.ring.layout import MAX_QUEUE_SIZE, VIRTIO_F_VERSION_1
from pyvhost.ring.split_queue import SplitQueue


class ConfigError(ValueError):
    """A GET_CONFIG/SET_CONFIG the device refuses (range outside its space, read-only field)."""


class Device:
    """Base class of vhost-user devices. One instance serves one frontend connection."""

    #: Short name for logs and statistics.
    name: ClassVar[str] = "device"
    #: Virtio feature bits offered to the driver (the daemon adds its own transport bits).
    device_features: int = 1 << VIRTIO_F_VERSION_1
    #: Protocol feature bits (a mask of `ProtocolFeature`) this device needs offered besides
    #: the daemon's baseline, e.g. CONFIG for a device with config space, MQ for many queues.
    protocol_features: int = 0
    #: Queues the device has (GET_QUEUE_NUM); queue indices are 0 .. num_queues - 1.
    num_queues: int = 1
    #: Largest queue size the device accepts (a power of two).
    max_queue_size: int = MAX_QUEUE_SIZE
    #: process_burst/discard_burst take `window=` and may keep polling (see above).
    polls_in_kernel: ClassVar[bool] = False

    def __init__(self) -> None:
        #: Virtio features the frontend acknowledged (SET_FEATURES), transport bits included.
        self.features = 0

    # -- configuration ------------------------------------------------------------------------

    @property
    def config(self) -> bytes:
        """The virtio device config space (virtio 1.x section 5.x of the device type)."""
        return b""

    def get_config(self, offset: int, size: int) -> bytes:
        space = self.config
        if offset < 0 or size < 0 or offset + size > len(space):
            raise ConfigError(f"config range {offset}+{size} outside the {len(space)}-byte space")
        return space[offset:offset + size]

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        """A driver write to config space; refused unless a device makes fields writable."""
        raise ConfigError(f"{self.name} config space is read-only ({len(data)} bytes at {offset})")

    def set_features(self, features: int) -> None:
        self.features = features

    # -- rings -------------------------------------------------------------------------------

    def process_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews) -> tuple[int, bool]:
        raise NotImplementedError

    def runs_when_disabled(self, index: int) -> bool:
        return False

    def discard_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews) -> tuple[int, bool]:
        """Consume a burst without side effects (started but disabled ring)."""
        return 0, False

    def extra_wait_fds(self, index: int) -> Sequence[int]:
        """Fds whose readability means ring `index` has work that does not come from the
        driver (e.g. a TAP holding frames for an RX ring). A worker going idle polls them
        beside the kick fds, then runs the ring; the next burst must consume what made them
        readable (read the TAP, drain the eventfd), or the worker wakes again at once. They
        must stay open while the ring can run."""
        return ()

    def on_queue_started(self, queue: SplitQueue) -> None:
        """The ring is about to run (protocol thread; no worker runs it yet)."""

    def on_queue_stopped(self, queue: SplitQueue) -> None:
        """The ring stopped; no worker runs it any more (protocol thread)."""

    def reset(self) -> None:
        """Back to the state of a new device (RESET_DEVICE, status 0, disconnect)."""
        self.features = 0

    def stats(self) -> dict[str, Any]:
        """Counters for the statistics line and --stats-json (plain JSON values)."""
        return {}
