"""virtio-blk, the block device (virtio 1.x 5.2): requests, features and config space.

Two data paths, the same answers to every request (tests/test_blk.py runs on both):
- "uring" (default where io_uring works): the rings run in compiled code
  (`process_burst`, `uring_kernels.py`, one io_uring per queue, `uring_io.py`), reading and
  writing straight between the image and guest memory, one io_uring_enter per burst;
  With O_DIRECT (`--direct`) a request whose guest buffers are not aligned (rare: Linux
  aligns them to pages) is bounced synchronously in the kernel (`bounced_rw`);
- "threads" (`--io threads`, or a host where io_uring is disabled): `handle()` below, with the
  I/O done by a thread pool.

A request is one chain: the device-readable header `struct virtio_blk_outhdr {le32 type;
le32 ioprio; le64 sector}` (sector in 512-byte units, always), then the data (readable for OUT,
DISCARD and WRITE_ZEROES, writable for IN and GET_ID), then one device-writable status byte,
the chain's last writable byte. On the threads path, `handle()` parses and checks everything
the guest controls —
header present, status byte present, data a multiple of 512 bytes and inside the disk,
segment lists bounded, flags known — answers what needs no I/O at once, and defers the rest
to the device's I/O threads (`io.py`), which move the data straight between the image and the
guest's buffers (their host iovecs) and complete the request. A read the host's page cache
holds whole (up to 256 KiB) is done in `handle()` itself (preadv2 RWF_NOWAIT never waits for
the disk): no thread hop; what it does not hold goes to the threads.

| type | | done by |
|---|---|---|
| IN 0 / OUT 1 | read / write `data` at `sector` | preadv(2) (RWF_NOWAIT first) / pwritev2 (RWF_DSYNC when write-through) |
| FLUSH 4 | every completed write stable | fdatasync |
| GET_ID 8 | the serial, 20 bytes, zero padded | at once |
| DISCARD 11 | segments `{le64 sector; le32 num_sectors; le32 flags}` | fallocate PUNCH_HOLE |
| WRITE_ZEROES 13 | same segments; flag bit 0 UNMAP allows deallocation | fallocate ZERO_RANGE / PUNCH_HOLE |
| anything else | | VIRTIO_BLK_S_UNSUPP |

Used length: the bytes the device wrote into the writable part: data + status for IN and
GET_ID (the whole writable part), 1 (the status byte) for the others. A chain with no
writable byte cannot be answered: it completes with used length 0 and is counted
(`blk_bad_requests`).

Durability is truthful: writes go to the host's page cache (or the device, with --direct)
and are stable after a FLUSH, so the device offers FLUSH and CONFIG_WCE with `writeback` = 1.
A driver that turns `writeback` to 0 (Linux: `echo "write through" > .../cache_type`), or
that did not negotiate FLUSH (it could never ask), gets write-through: each write is stable
when it completes (RWF_DSYNC), as are discards and zeroed ranges.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any, Callable

from pyvhost.device import ConfigError, Device, Pending, Request
from pyvhost.devices.blk import uring_kernels as BK
from pyvhost.devices.blk.io import SECTOR_SIZE, BlkImage, IoThreads, slice_iovecs
from pyvhost.devices.blk.uring_io import UringQueue
from pyvhost.devices.blk.uring_io import warm_up as uring_warm_up
from pyvhost.memory.table import KernelMemory, RegionTable
from pyvhost.protocol import ProtocolFeature
from pyvhost.ring import uring as U
from pyvhost.ring.direct_map import RingViews
from pyvhost.ring.layout import VIRTIO_F_VERSION_1
from pyvhost.ring.poll import PollWindow, one_pass_window
from pyvhost.ring.split_queue import SplitQueue

log = logging.getLogger(__name__)

__all__ = ["BlkDevice"]

VIRTIO_ID_BLOCK = 2

# Request types (5.2.6).
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
T_DISCARD, T_WRITE_ZEROES = 11, 13
# Status values.
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

# Feature bits (5.2.3).
F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE = 1, 2, 4, 5, 6
F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = 9, 10, 11, 12, 13, 14

HEADER = struct.Struct("<IIQ")            # virtio_blk_outhdr: type, ioprio (reserved), sector
SEGMENT = struct.Struct("<QII")           # virtio_blk_discard_write_zeroes: sector, count, flags
SEGMENT_FLAG_UNMAP = 1
ID_BYTES = 20
# virtio_blk_config (5.2.4) through the zoned fields: 96 bytes.
CONFIG = struct.Struct(
    "<Q"         # 0  capacity (512-byte sectors)
    "I"          # 8  size_max
    "I"          # 12 seg_max
    "HBB"        # 16 geometry: cylinders, heads, sectors
    "I"          # 20 blk_size
    "BBHI"       # 24 topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"         # 32 writeback, unused0
    "H"          # 34 num_queues
    "III"        # 36 max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"         # 48 max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"        # 56 write_zeroes_may_unmap, unused1[3]
    "III"        # 60 max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
    "IIIIIB3x")  # 72 zoned: zone_sectors, max_open, max_active, max_append, write_granularity, model
WRITEBACK_OFFSET = 32
assert CONFIG.size == 96

# Limits the device advertises (and enforces).
MAX_DISCARD_SECTORS = 1 << 22           # 2 GiB a segment
MAX_DISCARD_SEG = 256                   # Linux's own cap (MAX_DISCARD_SEGMENTS)
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 256
MAX_SEG = 126                           # data segments a request (as qemu-storage-daemon)
INLINE_READ_MAX = 256 * 1024           # a read of the page cache done in handle(): ~20 us max
INVALID_LOGGED = 10                     # guest errors logged per device, then only counted

DEFAULT_QUEUES = 4
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_IO_THREADS = 4


IO_MODES = ("auto", "uring", "threads")


def choose_io(io: str, image: BlkImage) -> str:
    """The data path: "uring" (compiled, io_uring) when asked or by default where io_uring
    works, else "threads" (handle() and I/O threads); ValueError if "uring" cannot be had."""
    if io not in IO_MODES:
        raise ValueError(f"io {io!r}: one of {', '.join(IO_MODES)}")
    if io == "threads":
        return io
    ok, why = U.available()
    if not ok:
        if io == "uring":
            raise ValueError(f"io_uring is not available here: {why}")
        log.warning("blk: io_uring is not available here (%s): I/O threads serve the disk", why)
        return "threads"
    return "uring"


class BlkDevice(Device):
    """A virtio-blk device serving `image` (one instance a connection; the image is shared)."""

    name = "blk"
    device_id = VIRTIO_ID_BLOCK
    # Requests in flight survive a crash of this process (the frontend keeps the record and a
    # restarted device resubmits them); every virtio-blk request is safe to repeat. The
    # io_uring path marks and clears them itself (ring/inflight.py primitives).
    tracks_inflight = True
    polls_in_kernel = True  # process_burst takes window= (the io_uring path)

    def __init__(self, image: BlkImage, *, queues: int = DEFAULT_QUEUES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, serial: str | bytes = "",
                 io_threads: int = DEFAULT_IO_THREADS, io: str = "auto") -> None:
        super().__init__()
        if not 1 <= queues <= 0xFFFF:
            raise ValueError(f"queues {queues}: outside 1..65535")
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue size {queue_size}: not a power of two in 2..32768")
        self.serial = serial_bytes(serial)
        self.image = image
        self.num_queues = queues
        self.max_queue_size = queue_size
        self.seg_max = max(1, min(queue_size - 2, MAX_SEG))
        self.blk_size = image.align            # 512, or O_DIRECT's alignment
        self.readonly = image.readonly
        features = ((1 << VIRTIO_F_VERSION_1) | (1 << F_SEG_MAX) | (1 << F_BLK_SIZE)
                    | (1 << F_TOPOLOGY) | (1 << F_FLUSH) | (1 << F_CONFIG_WCE) | (1 << F_MQ))
        if self.readonly:
            features |= 1 << F_RO
        else:
            features |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
        self.device_features = features
        self.protocol_features = ProtocolFeature.CONFIG.mask | ProtocolFeature.MQ.mask
        self.writeback = 1
        self.io = IoThreads(io_threads, f"blk{id(self) & 0xFFFF:04x}")
        self._queues_started: set[int] = set()
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("blk_reads", "blk_reads_inline", "blk_read_bytes", "blk_writes", "blk_write_bytes", "blk_flushes",
             "blk_discards", "blk_write_zeroes", "blk_get_id", "blk_unsupported",
             "blk_io_errors", "blk_invalid", "blk_bad_requests"), 0)
        #: "uring": the rings run the compiled io_uring path (process_burst); "threads":
        #: handle() and the I/O threads.
        self.io_mode = choose_io(io, image)
        self._urings: dict[int, UringQueue] = {}
        self._one_pass = one_pass_window()
        self._uring_totals: dict[str, int] = {}

    # -- configuration -------------------------------------------------------------------------

    @property
    def config(self) -> bytes:
        phys_exp = max(0, (self.image.physical_block // self.blk_size).bit_length() - 1)
        return CONFIG.pack(
            self.image.capacity, 0, self.seg_max, 0, 0, 0, self.blk_size,
            phys_exp, 0, 1 << phys_exp, 0,
            self.writeback, 0, self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, self.blk_size // SECTOR_SIZE,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1,
            0, 0, 0,
            0, 0, 0, 0, 0, 0)

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        """Only `writeback` (one byte at offset 32, 0 or 1) is writable."""
        if offset != WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            raise ConfigError(f"blk config: only writeback (1 byte, 0 or 1, at offset "
                              f"{WRITEBACK_OFFSET}) is writable, not {data.hex()} at {offset}")
        if data[0] == 0 and self.writeback and not self.readonly:
            self.image.flush()  # what was written back-cached becomes stable too
        self.writeback = data[0]
        self._write_through_changed()
        log.info("blk: write cache %s by the driver", "on" if data[0] else "off")

    def set_features(self, features: int) -> None:
        super().set_features(features)
        if features >> F_CONFIG_WCE & 1 and not features >> F_FLUSH & 1:
            self.writeback = 0  # 5.2.5.1: CONFIG_WCE without FLUSH starts write-through
        self._write_through_changed()

    @property
    def write_through(self) -> bool:
        """Writes must be stable when they complete: the driver cannot FLUSH, or asked so."""
        f = self.features
        return not f >> F_FLUSH & 1 or (bool(f >> F_CONFIG_WCE & 1) and self.writeback == 0)

    # -- life cycle ----------------------------------------------------------------------------

    def on_queue_started(self, queue: Any) -> None:
        self._queues_started.add(queue.index)
        if self.io_mode == "uring":
            self._close_uring(queue.index)
            self._urings[queue.index] = UringQueue(
                queue.index, queue.size, queue.max_burst, self._uring_settings(), self.serial,
                self.pin_table)
        else:
            self.io.start()

    def on_queue_stopped(self, queue: Any) -> None:
        # Its deferred requests are complete (the framework drained them before this).
        self._queues_started.discard(queue.index)
        self._close_uring(queue.index)
        if not self._queues_started:
            self.io.stop()

    def _close_uring(self, index: int) -> None:
        uq = self._urings.pop(index, None)
        if uq is not None:
            with self._lock:
                for k, v in uq.counters().items():
                    self._uring_totals[k] = self._uring_totals.get(k, 0) + v
            uq.close()

    def _uring_settings(self) -> dict[int, int]:
        image = self.image
        return {BK.ST_FD: -1 if image.null else image.fd, BK.ST_CAPACITY: image.capacity,
                BK.ST_BLK_SIZE: self.blk_size, BK.ST_READONLY: int(self.readonly),
                BK.ST_DSYNC: int(self.write_through), BK.ST_BLOCKDEV: int(image.block_device),
                BK.ST_MAX_DISCARD_SEG: MAX_DISCARD_SEG,
                BK.ST_MAX_DISCARD_SECTORS: MAX_DISCARD_SECTORS,
                BK.ST_MAX_WZ_SEG: MAX_WRITE_ZEROES_SEG,
                BK.ST_MAX_WZ_SECTORS: MAX_WRITE_ZEROES_SECTORS,
                BK.ST_DIRECT: image.align if image.direct else 0,
                BK.ST_SYNC_IO: int(image.sync_io)}

    def _write_through_changed(self) -> None:
        """The compiled path reads it per request, as handle() does."""
        for uq in list(self._urings.values()):
            uq.st[BK.ST_DSYNC] = int(self.write_through)

    # -- the compiled io_uring path (io_mode "uring") ------------------------------------------

    def uses_burst_kernel(self, index: int) -> bool:
        return self.io_mode == "uring"

    def process_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                      views: RingViews, window: PollWindow | None = None) -> tuple[int, bool]:
        uq = self._urings[queue.index]
        return uq.burst(queue, table, mem, views, window or self._one_pass)

    def extra_wait_fds(self, index: int) -> tuple[int, ...]:
        # Called by the worker just before it sleeps: the eventfd is armed now (uring_io.py).
        uq = self._urings.get(index)
        return (uq.arm(),) if uq is not None else ()

    def drain_burst(self, queue: SplitQueue, table: RegionTable, mem: KernelMemory,
                    views: RingViews, timeout: float) -> tuple[int, bool]:
        uq = self._urings.get(queue.index)
        if uq is None:
            return 0, False
        return uq.drain(queue, mem, views, timeout)

    def warm_up(self) -> None:
        super().warm_up()
        if self.io_mode == "uring":
            uring_warm_up()

    def reset(self) -> None:
        super().reset()
        self.writeback = 1
        self._write_through_changed()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self.counters)
            for k, v in self._uring_totals.items():
                out[k] = out.get(k, 0) + v
        for uq in list(self._urings.values()):
            for k, v in uq.counters().items():
                out[k] = out.get(k, 0) + v
        out["blk_io_mode_uring"] = int(self.io_mode == "uring")
        return out

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] += v

    # -- requests ------------------------------------------------------------------------------

    def handle(self, queue: int, request: Request) -> int | None:
        ws = request.writable_size
        if ws == 0:  # no status byte: nothing can say what happened
            self._invalid(request, "no device-writable status byte", bad=True)
            return 0
        if request.readable_size < HEADER.size:
            return self._reject(request, 1, f"header of {request.readable_size} bytes")
        rtype, _, sector = request.read_struct(HEADER)
        if rtype == T_IN:
            return self._in(request, sector)
        if rtype == T_OUT:
            return self._out(request, sector)
        if rtype == T_FLUSH:
            if self.readonly:
                self._count(blk_flushes=1)
                return self._status(request, S_OK, 1)
            return self._defer(request, 1, self._do_flush)
        if rtype == T_GET_ID:
            if ws - 1 < ID_BYTES:
                return self._reject(request, ws, f"GET_ID buffer of {ws - 1} bytes")
            request.write(self.serial)
            self._count(blk_get_id=1)
            return self._status(request, S_OK, ws)
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard_or_zero(request, rtype)
        self._count(blk_unsupported=1)
        return self._status(request, S_UNSUPP, 1)

    def _in(self, request: Request, sector: int) -> int | None:
        used = request.writable_size
        length = used - 1
        why = self._range_error(sector, length)
        if why:
            return self._reject(request, used, f"IN: {why}")
        if length == 0:
            return self._status(request, S_OK, used)
        iov = request.writable_iovecs(0, length)
        offset = sector * SECTOR_SIZE
        done = self.image.read_cached(iov, offset) if length <= INLINE_READ_MAX else 0
        if done == length:  # all in the host's page cache: answered now, no thread hop
            self._count(blk_reads=1, blk_read_bytes=length, blk_reads_inline=1)
            return self._status(request, S_OK, used)
        if done:
            iov = slice_iovecs(iov, done, length - done)

        def read() -> None:
            self.image.read(iov, offset + done)
            self._count(blk_reads=1, blk_read_bytes=length)

        return self._defer(request, used, read)

    def _out(self, request: Request, sector: int) -> int | None:
        length = request.readable_size - HEADER.size
        why = self._range_error(sector, length)
        if why:
            return self._reject(request, 1, f"OUT: {why}")
        if self.readonly:
            return self._reject(request, 1, "OUT on a read-only disk", log_it=False)
        if length == 0:
            return self._status(request, S_OK, 1)
        iov = request.readable_iovecs(HEADER.size, length)
        offset = sector * SECTOR_SIZE
        dsync = self.write_through

        def write() -> None:
            self.image.write(iov, offset, dsync=dsync)
            self._count(blk_writes=1, blk_write_bytes=length)

        return self._defer(request, 1, write)

    def _discard_or_zero(self, request: Request, rtype: int) -> int | None:
        zero = rtype == T_WRITE_ZEROES
        what = "WRITE_ZEROES" if zero else "DISCARD"
        if self.readonly:
            return self._reject(request, 1, f"{what} on a read-only disk", log_it=False)
        size = request.readable_size - HEADER.size
        max_seg = MAX_WRITE_ZEROES_SEG if zero else MAX_DISCARD_SEG
        max_sectors = MAX_WRITE_ZEROES_SECTORS if zero else MAX_DISCARD_SECTORS
        if size <= 0 or size % SEGMENT.size:
            return self._reject(request, 1, f"{what}: {size} bytes of segments")
        count = size // SEGMENT.size
        if count > max_seg:  # checked before reading any: the list's size is the guest's
            return self._reject(request, 1, f"{what}: {count} segments (max {max_seg})")
        raw = request.read(size, HEADER.size)
        segments = [SEGMENT.unpack_from(raw, k * SEGMENT.size) for k in range(count)]
        ranges = []
        for sector, num, flags in segments:
            if flags & ~SEGMENT_FLAG_UNMAP or (flags and not zero):
                self._count(blk_unsupported=1)
                return self._status(request, S_UNSUPP, 1)
            if num > max_sectors:
                return self._reject(request, 1, f"{what}: {num} sectors (max {max_sectors})")
            why = self._range_error(sector, num * SECTOR_SIZE)
            if why:
                return self._reject(request, 1, f"{what}: {why}")
            ranges.append((sector * SECTOR_SIZE, num * SECTOR_SIZE, bool(flags)))
        dsync = self.write_through

        def run() -> None:
            for offset, length, unmap in ranges:
                if zero:
                    self.image.write_zeroes(offset, length, unmap=unmap, dsync=dsync)
                else:
                    self.image.discard(offset, length)
            self._count(**{"blk_write_zeroes" if zero else "blk_discards": 1})

        return self._defer(request, 1, run)

    def _range_error(self, sector: int, length: int) -> str:
        """Why [sector*512, +length) is not a valid data range, or ""."""
        if length % SECTOR_SIZE:
            return f"data length {length} not a multiple of {SECTOR_SIZE}"
        end = sector + length // SECTOR_SIZE
        if end > self.image.capacity:
            return (f"sectors {sector}..{end} past the capacity "
                    f"({self.image.capacity} sectors)")
        if self.blk_size > SECTOR_SIZE and (sector * SECTOR_SIZE % self.blk_size
                                            or length % self.blk_size):
            return f"sector {sector} + {length} bytes not aligned to {self.blk_size}"
        return ""

    # -- answering -----------------------------------------------------------------------------

    @staticmethod
    def _status(request: Request, status: int, used: int) -> int:
        request.write(bytes((status,)), request.writable_size - 1)
        return used

    def _reject(self, request: Request, used: int, why: str, log_it: bool = True) -> int:
        """IOERR for a request the device will not do (bad range, bad list, read-only)."""
        if log_it:
            self._invalid(request, why)
        self._count(blk_io_errors=1)
        return self._status(request, S_IOERR, used)

    def _invalid(self, request: Request, why: str, bad: bool = False) -> None:
        with self._lock:
            self.counters["blk_bad_requests" if bad else "blk_invalid"] += 1
            n = self.counters["blk_bad_requests"] + self.counters["blk_invalid"]
        if n <= INVALID_LOGGED:
            log.warning("blk: queue %d head %d: %s%s", request.queue, request.head, why,
                        " (further invalid requests are only counted)"
                        if n == INVALID_LOGGED else "")

    def _defer(self, request: Request, used: int, work: Callable[[], None]) -> int | None:
        pending = request.defer()

        def job() -> None:
            self._run(pending, used, work)

        try:
            self.io.submit(job)
        except RuntimeError:  # no I/O thread (not reached: they run while a ring does)
            log.error("blk: no I/O thread; queue %d head %d served inline", request.queue,
                      request.head)
            job()
        return None

    def _run(self, pending: Pending, used: int, work: Callable[[], None]) -> None:
        """In an I/O thread: do the work, write the status byte, complete (always once)."""
        status = S_OK
        try:
            work()
        except Exception as exc:
            status = S_IOERR
            self._count(blk_io_errors=1)
            log.error("blk: queue %d head %d: I/O failed: %s", pending.request.queue,
                      pending.request.head, exc)
        try:
            self._status(pending.request, status, used)
        finally:
            pending.complete(used)

    def _do_flush(self) -> None:
        self.image.flush()
        self._count(blk_flushes=1)


def serial_bytes(serial: str | bytes) -> bytes:
    """The GET_ID answer: up to 20 ASCII bytes, zero padded (ValueError otherwise)."""
    raw = serial.encode("ascii") if isinstance(serial, str) else bytes(serial)
    if len(raw) > ID_BYTES:
        raise ValueError(f"serial {serial!r}: longer than {ID_BYTES} bytes")
    return raw.ljust(ID_BYTES, b"\0")
