"""The device API: what a device author writes to serve a virtio device over vhost-user.

A device is a plain object; pyvhost owns the connection, guest memory, the rings, the
threads, popping chains, batching used elements, notification suppression and interrupts.
The smallest device is a class with a `handle()`:

    import pyvhost

    class Pattern(pyvhost.Device):
        device_id = 4                    # virtio device ID (4 = entropy source)
        num_queues = 1

        def handle(self, queue: int, request: pyvhost.Request) -> int:
            n = request.writable_size
            request.write(b"PYVHOST!" * (n // 8) + b"PYVHOST!"[: n % 8])
            return n                     # the used length: bytes written for the driver

`pyvhost run MODULE:Pattern --socket-path PATH` serves it (see docs/devices.md).

Three tiers, each for what it needs:
1. `handle(queue, request) -> used_len`: one request (descriptor chain) at a time, in Python,
   inside the worker's burst. It must be quick: a memory-map change waits for the burst.
2. Deferred completion: `pending = request.defer()` inside `handle()`, then
   `pending.complete(used_len)` later, from any thread (an I/O thread, a watched fd's
   callback). The request's guest memory stays mapped until then, however the memory table
   changes meanwhile; grace periods never wait for it. A ring that stops (GET_VRING_BASE,
   reset, disconnect) first waits for its deferred requests to complete.
3. `process_burst(queue, table, mem, views) -> (done, notify)`: a whole burst in compiled code
   on the ring itself (net's data path). A device that overrides it for some rings says which
   in `uses_burst_kernel(index)`; the others go through `handle()`.

Which thread calls what: `handle()`, `process_burst()` and `discard_burst()` run in a worker
thread (one per `--workers`; a ring always on the same worker); `on_queue_started/stopped`,
`set_features`, `get_config/set_config`, `reset`, `frontend_message` in the connection's
protocol thread; watched-fd callbacks in the connection's event thread; `stats()` from any.

An exception raised by `handle()` (or a bad chain from the guest) breaks only that queue: it
stops, the device status gets NEEDS_RESET, the queue's error eventfd is signalled and the
error is logged; the worker and every other queue go on.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from pyvhost.memory.guest_memory import TablePin
from pyvhost.memory.table import KM_LOG, KernelMemory, RegionTable
from pyvhost.ring import kernels as K
from pyvhost.ring.chains import ChainScratch
from pyvhost.ring.direct_map import RingViews
from pyvhost.ring.inflight import push_used_burst_inflight
from pyvhost.ring.layout import MAX_QUEUE_SIZE, VIRTIO_F_VERSION_1
from pyvhost.ring.poll import PollWindow
from pyvhost.ring.split_queue import SplitQueue

if TYPE_CHECKING:
    from pyvhost.protocol import FrontendRequest, Payload

__all__ = ["ConfigError", "Device", "Pending", "Request", "RequestError"]

log = logging.getLogger(__name__)



class ConfigError(ValueError):
    """A GET_CONFIG/SET_CONFIG the device refuses (range outside its space, read-only field)."""


class RequestError(Exception):
    """A device used a request wrongly (wrote past its buffers, used it after completing it).
    Raised inside `handle()` it breaks the queue like any other exception."""


# Request states.
_OPEN, _DEFERRED, _CLOSED = 0, 1, 2


class _Pieces:
    """A burst's chains as pieces (ring/chains.py), as Python lists, shared by its requests:
    piece p lies in region `regions[p]` at `offsets[p]` (host address `hosts[p]`, guest-physical
    `gpas[p]`), `lens[p]` bytes; `views` are the burst table's region memoryviews."""

    __slots__ = ("regions", "offsets", "hosts", "gpas", "lens", "views", "runner")

    def __init__(self, regions: list[int], offsets: list[int], hosts: list[int],
                 gpas: list[int], lens: list[int], views: list[memoryview],
                 runner: "RequestRunner | None") -> None:
        self.regions = regions
        self.offsets = offsets
        self.hosts = hosts
        self.gpas = gpas
        self.lens = lens
        self.views = views
        self.runner = runner

    def slice(self, a: int, b: int) -> "_Pieces":
        return _Pieces(self.regions[a:b], self.offsets[a:b], self.hosts[a:b], self.gpas[a:b],
                       self.lens[a:b], self.views, self.runner)


class Request:
    """One descriptor chain, as the device sees it: device-readable bytes, then device-writable
    buffers (virtio 1.x 2.7.4). Sizes are the guest's, already checked; every read and write
    is bounds-checked against them. Valid inside `handle()`, or until `complete()` once
    deferred; any later use raises RequestError. Nothing of guest memory outlives it: the
    memoryviews it handed out are released when it ends."""

    __slots__ = ("queue", "head", "readable_size", "writable_size", "_b", "_p0", "_pw", "_p1",
                 "_state", "_views", "_written", "_exposed")

    def __init__(self, queue: int, head: int, readable_size: int, writable_size: int,
                 pieces: _Pieces, p0: int, pw: int, p1: int) -> None:
        #: The queue index and the chain's head descriptor index.
        self.queue = queue
        self.head = head
        #: Bytes in the device-readable buffers, and in the device-writable ones.
        self.readable_size = readable_size
        self.writable_size = writable_size
        self._b = pieces
        self._p0 = p0   # pieces [p0, pw) are readable, [pw, p1) writable
        self._pw = pw
        self._p1 = p1
        self._state = _OPEN
        self._views: list[memoryview] | None = None
        self._written = 0        # writable bytes [0, _written) may hold what write() stored
        self._exposed = False    # writable buffers handed out (views, iovecs): all may change

    def __repr__(self) -> str:
        return (f"Request(queue={self.queue}, head={self.head}, readable={self.readable_size}, "
                f"writable={self.writable_size})")

    # -- reading the driver's bytes --

    def read(self, size: int = -1, offset: int = 0) -> bytes:
        """`size` device-readable bytes from `offset` (all of them by default)."""
        if self._state == _CLOSED:
            raise RequestError(f"{self!r} was already completed")
        if size < 0:
            size = self.readable_size - offset
        if offset < 0 or offset + size > self.readable_size:
            _range_error("read", offset, size, self.readable_size)
        b, p0 = self._b, self._p0
        if p0 + 1 == self._pw:  # one buffer: the common case
            off = b.offsets[p0] + offset
            return bytes(b.views[b.regions[p0]][off:off + size])
        return b"".join(bytes(b.views[b.regions[p]][o:o + n])
                        for p, o, n in self._pieces(p0, self._pw, offset, size))

    def read_struct(self, fmt: struct.Struct | str, offset: int = 0) -> tuple[Any, ...]:
        """Unpack a struct (little-endian unless `fmt` says otherwise) from the readable bytes."""
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(
            fmt if fmt[:1] in "<>!=@" else "<" + fmt)
        return s.unpack(self.read(s.size, offset))

    # -- writing for the driver --

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write `data` into the device-writable buffers at `offset`, in order across buffers.
        Returns len(data). Writing past the writable bytes raises RequestError."""
        if self._state == _CLOSED:
            raise RequestError(f"{self!r} was already completed")
        n = len(data)
        if offset < 0 or offset + n > self.writable_size:
            _range_error("write", offset, n, self.writable_size)
        if offset + n > self._written:
            self._written = offset + n
        b, pw = self._b, self._pw
        if pw + 1 == self._p1:  # one buffer: the common case
            off = b.offsets[pw] + offset
            b.views[b.regions[pw]][off:off + n] = data
            return n
        src = memoryview(data).cast("B")
        pos = 0
        for p, o, take in self._pieces(pw, self._p1, offset, n):
            b.views[b.regions[p]][o:o + take] = src[pos:pos + take]
            pos += take
        return n

    # -- zero-copy access (I/O straight into and out of guest memory) --

    def readable_iovecs(self, offset: int = 0, size: int = -1) -> list[tuple[int, int]]:
        """(host address, length) pieces of the readable bytes [offset, offset+size): for
        preadv/pwritev or io_uring. Valid while the request is (the table is pinned)."""
        return self._iovecs(self._p0, self._pw, offset, size, self.readable_size)

    def writable_iovecs(self, offset: int = 0, size: int = -1) -> list[tuple[int, int]]:
        """(host address, length) pieces of the writable bytes [offset, offset+size); e.g.
        a block device's data buffers are `writable_iovecs(0, writable_size - 1)` and its
        status byte `write(bytes([status]), writable_size - 1)`."""
        self._exposed = True
        return self._iovecs(self._pw, self._p1, offset, size, self.writable_size)

    def readable_views(self) -> list[memoryview]:
        """The readable buffers as read-only memoryviews (released when the request ends)."""
        return [v.toreadonly() for v in self._buffer_views(self._p0, self._pw)]

    def writable_views(self) -> list[memoryview]:
        """The writable buffers as memoryviews (released when the request ends)."""
        self._exposed = True
        return self._buffer_views(self._pw, self._p1)

    def _iovecs(self, a: int, z: int, offset: int, size: int, limit: int
                ) -> list[tuple[int, int]]:
        if self._state == _CLOSED:
            raise RequestError(f"{self!r} was already completed")
        if size < 0:
            size = limit - offset
        if offset < 0 or offset + size > limit:
            _range_error("iovecs", offset, size, limit)
        b = self._b
        return [(b.hosts[p] + o - b.offsets[p], n) for p, o, n in self._pieces(a, z, offset, size)]

    def _buffer_views(self, a: int, z: int) -> list[memoryview]:
        if self._state == _CLOSED:
            raise RequestError(f"{self!r} was already completed")
        b = self._b
        views = [b.views[b.regions[p]][b.offsets[p]:b.offsets[p] + b.lens[p]]
                 for p in range(a, z)]
        if self._views is None:
            self._views = []
        self._views.extend(views)
        return views

    # -- deferred completion --

    def defer(self) -> "Pending":
        """Complete this request later (from any thread) instead of by returning from
        `handle()`: returns the handle to complete it with. Its guest memory stays mapped
        until then."""
        if self._state != _OPEN:
            raise RequestError(f"{self!r} cannot be deferred now (deferred or completed)")
        runner = self._b.runner
        if runner is None:
            raise RequestError("this request is not served by a ring (cannot defer)")
        return runner.defer(self)

    # -- internals --

    def _pieces(self, a: int, z: int, offset: int, size: int
                ) -> Iterator[tuple[int, int, int]]:
        """(piece, offset in its region, length) covering [offset, offset+size) of pieces
        a..z."""
        b = self._b
        for p in range(a, z):
            if size <= 0:
                return
            ln = b.lens[p]
            if offset >= ln:
                offset -= ln
                continue
            take = min(ln - offset, size)
            yield p, b.offsets[p] + offset, take
            offset = 0
            size -= take

    def _dirty(self, used: int) -> list[tuple[int, int]]:
        """Guest-physical ranges the device may have written: the writable bytes up to the
        used length or the last byte write() stored, all of them once buffers were handed out
        (for the dirty log, which must over-approximate, never miss)."""
        end = self.writable_size if self._exposed else max(used, self._written)
        b = self._b
        return [(b.gpas[p] + o - b.offsets[p], n) for p, o, n in
                self._pieces(self._pw, self._p1, 0, end)]

    def _detach(self) -> None:
        """Own copies of the burst's pieces (its lists are the next burst's no longer, but
        keeping only this chain's pieces lets the rest go)."""
        p0 = self._p0
        self._b = self._b.slice(p0, self._p1)
        self._pw -= p0
        self._p1 -= p0
        self._p0 = 0

    def _close(self) -> None:
        self._state = _CLOSED
        self._b = _NO_PIECES  # drops the region memoryviews: the mapping may go
        if self._views is not None:
            for v in self._views:
                v.release()
            self._views = None


_NO_PIECES = _Pieces([], [], [], [], [], [], None)


def _range_error(what: str, offset: int, size: int, limit: int) -> None:
    raise RequestError(f"{what} of {size} bytes at offset {offset} outside the "
                       f"{limit} bytes the driver gave")


class Pending:
    """A deferred request. `complete(used_len)` may be called once, from any thread."""

    __slots__ = ("request", "_runner", "_pin", "_generation", "dirty")

    def __init__(self, request: Request, runner: "RequestRunner", pin: TablePin,
                 generation: int) -> None:
        self.request = request
        self._runner = runner
        self._pin = pin
        self._generation = generation  # the runner's: a ring that stopped since drops it
        self.dirty: list[tuple[int, int]] = []  # set at completion, logged when published

    def complete(self, used_len: int) -> None:
        """The device is done with the request: `used_len` bytes were written for the driver.
        pyvhost publishes the used element and interrupts the driver as it asks."""
        self._runner.complete(self, used_len)

    def __repr__(self) -> str:
        return f"Pending({self.request!r})"


# A watched fd's callback: called with the fd when it is readable (the connection's event thread).
FdCallback = Callable[[int], None]


class Device:
    """Base class of vhost-user devices. One instance serves one frontend connection."""

    #: Short name for logs, statistics and --print-capabilities ("type" in vhost-user.json).
    name: ClassVar[str] = "device"
    #: Virtio device ID (virtio 1.x 5: 1 net, 2 block, 4 entropy, ...).
    device_id: ClassVar[int] = 0
    #: Virtio feature bits offered to the driver (pyvhost adds its transport bits).
    device_features: int = 1 << VIRTIO_F_VERSION_1
    #: Protocol feature bits (a mask of `ProtocolFeature`) this device needs offered besides
    #: pyvhost's baseline, e.g. MQ for a device with several queues.
    protocol_features: int = 0
    #: Queues the device has (GET_QUEUE_NUM); queue indices are 0 .. num_queues - 1.
    num_queues: int = 1
    #: Largest queue size the device accepts (a power of two).
    max_queue_size: int = MAX_QUEUE_SIZE
    #: process_burst/discard_burst take `window=` and may keep polling (ring/poll.py).
    polls_in_kernel: ClassVar[bool] = False
    #: Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the frontend keeps a record
    #: of the requests in flight that outlives this process, and a restarted device serves them
    #: again, in order, before new ones (vhost-user-blk: no write lost across a crash). Requests
    #: must then be safe to repeat. Rings served through `handle()` are tracked by pyvhost; a
    #: `process_burst` data path calls the ring/inflight.py primitives itself.
    tracks_inflight: bool = False

    def __init__(self) -> None:
        #: Virtio features the frontend acknowledged (SET_FEATURES), transport bits included.
        self.features = 0
        self._watches: dict[int, FdCallback] = {}
        self._watch_changed: Callable[[], None] | None = None
        self._pin_table: Callable[[RegionTable], TablePin] | None = None  # the daemon's

    # -- tier 1 and 2: one request at a time ---------------------------------------------------

    def handle(self, queue: int, request: Request) -> int | None:
        """Serve one request; return the used length (bytes written for the driver), or
        anything after `request.defer()` (the used length then comes with `complete()`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither handle() nor "
                                  "process_burst()")

    # -- tier 3: compiled bursts on the ring ---------------------------------------------------

    def uses_burst_kernel(self, index: int) -> bool:
        """Whether ring `index` runs `process_burst` (else `handle()` per request)."""
        return type(self).process_burst is not Device.process_burst

    def process_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews) -> tuple[int, bool]:
        """Run one bounded burst on the ring: pop, process, add used elements and publish
        them; return (chains completed, whether the driver wants an interrupt now), which
        `ring.kernels.needs_interrupt` decides right after publishing (asking twice would
        lose interrupts). Inside the worker's epoch: keep nothing derived from table, mem or
        views. Bad guest input breaks the queue (`queue.broken`)."""
        raise NotImplementedError

    def partner_ring(self, index: int) -> int | None:
        """A ring whose bursts `process_pair` can run in one compiled loop with ring `index`'s
        (net's loopback: TX ring 2k+1 with RX ring 2k), or None. A worker that serves both
        rings, both processing, calls `process_pair` in ring `index`'s rounds; else each ring
        keeps its own `process_burst`."""
        return None

    def process_pair(self, queue: SplitQueue, partner: SplitQueue, table: RegionTable,
                     mem: KernelMemory, views: RingViews, partner_views: RingViews,
                     window: PollWindow) -> tuple[int, bool, int, bool]:
        """`process_burst` on `queue` and its `partner_ring` together, under the poll window
        (a device with partner rings polls in its kernels). Returns (chains completed, wants
        an interrupt?) for the ring, then for the partner."""
        raise NotImplementedError

    def drain_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                    views: RingViews, timeout: float) -> tuple[int, bool]:
        """The ring stops (GET_VRING_BASE, reset, disconnect) and no worker runs it any more:
        finish what its bursts left in flight (I/O still running on guest memory), waiting up
        to `timeout`, and publish it, so the index the frontend gets is exact. Returns
        (chains completed, whether the driver wants an interrupt). Protocol thread."""
        return 0, False

    def pin_table(self, table: RegionTable) -> TablePin:
        """Keep `table`'s guest memory mapped until the pin is released (any thread), however
        the memory map changes meanwhile: for a burst kernel whose work (I/O on guest
        buffers) goes on after it returns. Grace periods never wait for pins."""
        if self._pin_table is None:
            raise RuntimeError(f"{type(self).__name__} is not served by a daemon (no pins)")
        return self._pin_table(table)

    def runs_when_disabled(self, index: int) -> bool:
        """A started but disabled ring runs `discard_burst` when this says so (a net TX ring
        must consume and drop, vhost-user "Ring states"); by default it is not touched."""
        return False

    def discard_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews) -> tuple[int, bool]:
        """Consume a burst without side effects (started but disabled ring)."""
        return 0, False

    # -- configuration -------------------------------------------------------------------------

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

    def frontend_message(self, request: "FrontendRequest", payload: "Payload") -> bool:
        """A device-specific vhost-user request (e.g. SEND_RARP, NET_SET_MTU): True if the
        device accepts it; the default refuses every one."""
        return False

    # -- life cycle and other hooks ------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels this device runs, before a
        frontend arrives: a burst that compiles holds its worker for seconds."""
        warm_up_request_kernels()

    def extra_wait_fds(self, index: int) -> Sequence[int]:
        """Fds whose readability means ring `index` has work that does not come from the
        driver (e.g. a TAP holding frames for an RX ring). An idle worker polls them beside
        the kick fds, then runs the ring; the next burst must consume what made them readable.
        They must stay open while the ring can run."""
        return ()

    def watch(self, fd: int, callback: FdCallback) -> None:
        """Call `callback(fd)` in the connection's event thread whenever `fd` is readable (an
        io_uring or timer eventfd...); the callback must consume what made it readable."""
        self._watches[fd] = callback
        if self._watch_changed is not None:
            self._watch_changed()

    def unwatch(self, fd: int) -> None:
        if self._watches.pop(fd, None) is not None and self._watch_changed is not None:
            self._watch_changed()

    @property
    def watched(self) -> dict[int, FdCallback]:
        return dict(self._watches)

    def on_queue_started(self, queue: SplitQueue) -> None:
        """The ring is about to run (protocol thread; no worker runs it yet)."""

    def on_queue_stopped(self, queue: SplitQueue) -> None:
        """The ring stopped; no worker runs it any more and its deferred requests are done."""

    def reset(self) -> None:
        """Back to the state of a new device (RESET_DEVICE, status 0, disconnect)."""
        self.features = 0

    def stats(self) -> dict[str, Any]:
        """Counters for the statistics line and --stats-json (plain JSON values)."""
        return {}


class RequestRunner:
    """Serves one ring through `Device.handle()`: pops a burst into `Request`s, calls the
    device, publishes what it completed at once, and what it completes later (deferred) in
    the ring's next round on its worker, the only thread that writes the used ring while the
    ring runs."""

    def __init__(self, device: Device, queue: SplitQueue, pin: Callable[[RegionTable], TablePin],
                 wake: Callable[[], None]) -> None:
        self.device = device
        self.queue = queue
        self._pin = pin
        self._wake = wake
        self.scratch = ChainScratch(queue.max_burst, max(queue.size, 1))
        self._inbox: collections.deque[tuple[int, int, Pending]] = collections.deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.in_flight = 0        # deferred, not yet completed
        self.generation = 0       # bumped when the ring stops: later completions are stale
        self.requests = 0
        self.deferred = 0
        self.stale = 0

    def resize(self, queue_size: int) -> None:
        self.scratch = ChainScratch(self.queue.max_burst, max(queue_size, 1))

    # -- worker thread --

    def serve(self, table: RegionTable, mem: KernelMemory, views: RingViews) -> tuple[int, bool]:
        queue = self.queue
        q = queue.q
        self._table_of_burst = table
        done, notify = self._flush(mem, views) if self._inbox else (0, False)
        s = self.scratch
        n = s.pop(mem, q, views, queue.max_burst, queue.inflight.views)
        if n <= 0:
            return done, notify
        self.requests += n
        last = int(s.piece_end[n - 1])
        pieces = _Pieces(s.piece_region[:last].tolist(), s.piece_offset[:last].tolist(),
                         s.piece_host[:last].tolist(), s.piece_gpa[:last].tolist(),
                         s.piece_len[:last].tolist(), table.memoryviews(), self)
        heads = s.heads[:n].tolist()
        ends = s.piece_end[:n].tolist()
        firsts = s.first_writable[:n].tolist()
        rsizes = s.readable[:n].tolist()
        wsizes = s.writable[:n].tolist()
        handle = self.device.handle
        index = queue.index
        used_heads: list[int] = []
        used_lens: list[int] = []
        dirty: list[tuple[int, int]] | None = [] if table.logging else None
        failure = None
        p0 = 0
        for k in range(n):
            p1 = ends[k]
            req = Request(index, heads[k], rsizes[k], wsizes[k], pieces, p0, firsts[k], p1)
            p0 = p1
            try:
                used = handle(index, req)
                if req._state != _OPEN:  # deferred (and maybe completed already)
                    continue
                if type(used) is not int or not 0 <= used <= req.writable_size:
                    raise RequestError(f"handle() returned used length {used!r}; it must be "
                                       f"an int in 0..{req.writable_size} (the writable bytes)")
            except Exception as exc:  # the device's fault: this queue only
                failure = exc
                if req._state == _OPEN:
                    req._close()
                break
            if dirty is not None:
                dirty.extend(req._dirty(used))
            req._close()
            used_heads.append(req.head)
            used_lens.append(used)
        if used_heads:
            if dirty:
                self._log(mem, dirty)
            notify = self._publish(mem, views, used_heads, used_lens) or notify
        if failure is not None:
            queue.fail_device(f"{type(self.device).__name__}.handle() raised "
                              f"{type(failure).__name__}: {failure}", failure)
            # The traceback holds this frame, whose locals hold the burst's memoryviews of
            # guest memory: break the cycle, or the mapping lives until a gc pass.
            failure.__traceback__ = None
            failure = None
        return done + n, notify

    def _publish(self, mem: KernelMemory, views: RingViews, heads: list[int],
                 lens: list[int]) -> bool:
        n = len(heads)
        r = push_used_burst_inflight(mem, self.queue.q, views, self.queue.inflight.views,
                                     np.array(heads, dtype=np.int64),
                                     np.array(lens, dtype=np.int64), n)
        return bool(r == 1)

    def _log(self, mem: KernelMemory, dirty: list[tuple[int, int]]) -> None:
        """Dirty-log what Python wrote into guest buffers (before used->idx is published)."""
        n = len(dirty)
        K.log_ranges(mem, self.queue.q, np.fromiter((g for g, _ in dirty), np.int64, n),
                     np.fromiter((ln for _, ln in dirty), np.int64, n), n)

    def _flush(self, mem: KernelMemory, views: RingViews) -> tuple[int, bool]:
        """Publish the deferred requests completed since the last round."""
        items = []
        inbox = self._inbox
        while inbox:
            items.append(inbox.popleft())
        if not items:
            return 0, False
        if mem[KM_LOG].shape[0]:
            self._log(mem, [r for _, _, pending in items for r in pending.dirty])
        notify = self._publish(mem, views, [h for h, _, _ in items], [ln for _, ln, _ in items])
        for _, _, pending in items:
            pending._pin.release()
        with self._lock:
            self.in_flight -= len(items)
            if self.in_flight == 0:
                self._idle.notify_all()
        return len(items), notify

    def defer(self, request: Request) -> Pending:
        if self.queue.q[K.Q_FLAGS] & K.F_IN_ORDER:
            raise RequestError("defer() with VIRTIO_F_IN_ORDER negotiated: deferred requests "
                               "may complete out of order (do not offer IN_ORDER)")
        request._detach()
        request._state = _DEFERRED
        with self._lock:
            self.in_flight += 1
        self.deferred += 1
        return Pending(request, self, self._pin(self._table_of_burst), self.generation)

    # The table of the burst in progress (set by the worker before serve, read by defer).
    _table_of_burst: RegionTable

    # -- any thread --

    def complete(self, pending: Pending, used_len: int) -> None:
        req = pending.request
        if req._state != _DEFERRED:
            raise RequestError(f"{req!r} completed twice")
        if type(used_len) is not int or not 0 <= used_len <= req.writable_size:
            raise RequestError(f"used length {used_len!r} outside 0..{req.writable_size}")
        pending.dirty = req._dirty(used_len)
        req._close()
        with self._lock:
            if pending._generation != self.generation:  # the ring stopped without it: drop it
                self.stale += 1
                stale = True
            else:
                stale = False
                self._inbox.append((req.head, used_len, pending))
                self._idle.notify_all()
        if stale:
            pending._pin.release()
            log.error("queue %d: request at head %d completed after its ring stopped; dropped",
                      self.queue.index, req.head)
            return
        self._wake()

    # -- protocol thread, ring stopped (no worker runs it) --

    def drain(self, table: RegionTable, mem: KernelMemory, views: RingViews,
              timeout: float) -> tuple[int, bool]:
        """Wait (bounded) for the deferred requests to complete, publish them; requests still
        in flight after `timeout` are abandoned (their completion is dropped)."""
        with self._lock:
            if not self._idle.wait_for(lambda: self.in_flight == len(self._inbox), timeout):
                log.error("queue %d: %d deferred requests did not complete within %.1fs; "
                          "abandoned", self.queue.index, self.in_flight - len(self._inbox),
                          timeout)
        done, notify = self._flush(mem, views) if self._inbox else (0, False)
        with self._lock:
            self.generation += 1
            self.in_flight = 0
        return done, notify

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "deferred": self.deferred,
                "in_flight": self.in_flight}


def warm_up_request_kernels() -> None:
    """Compile the kernels `RequestRunner` calls (pop into pieces, publish, notifications)."""
    from pyvhost.ring.direct_map import NO_VIEWS
    mem = RegionTable().kernel()
    q = SplitQueue(0)
    q.set_size(1)
    ChainScratch(1, 1).pop(mem, q.q, NO_VIEWS, 1)
    q.q[:] = 0
    q.set_size(1)
    empty = np.zeros(1, dtype=np.int64)
    push_used_burst_inflight(mem, q.q, NO_VIEWS, q.inflight.views, empty, empty, 0)
    K.log_ranges(mem, q.q, empty, empty, 0)
    K.flush_log(mem, q.q)  # the backend's, when a ring stops
    K.enable_notification(mem, q.q, NO_VIEWS)
    K.disable_notification(mem, q.q, NO_VIEWS)
