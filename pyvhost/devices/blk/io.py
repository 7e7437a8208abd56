"""How virtio-blk I/O is done: the image (a raw file or a block device) and the threads that
move its bytes straight between the image and guest memory.

`BlkImage` owns the image's fd and does one operation at a time on behalf of any thread:
`read`/`write` take the request's host iovecs, `(address, length)` pieces of guest memory
(`Request.readable_iovecs`/`writable_iovecs`), and hand them to preadv(2)/pwritev2(2)
through ctypes, which drops the GIL for the system call: no copy through Python;
`read_cached` reads only what the page cache holds (RWF_NOWAIT), for the device to answer
cached reads without a thread hop. `flush` is
fdatasync(2); `discard` is fallocate(2) PUNCH_HOLE|KEEP_SIZE on a file, BLKDISCARD on a block
device, and `write_zeroes` fallocate(2) (PUNCH_HOLE or ZERO_RANGE, with fallbacks). Every operation checks its byte range against the image once more (the
device validated it already): nothing is ever read or written outside [0, capacity).

With O_DIRECT (`direct=True`) the kernel wants the file offset, the length and every buffer
address aligned to the image's direct-I/O alignment (its logical block size, probed at open).
Offsets and lengths are the device's to check (it advertises that alignment as blk_size);
guest buffers that are not aligned go through a bounce buffer, a fixed-size page-aligned
block per operation in flight, so a request of any size costs bounded memory.

`IoThreads` is the device's small pool: N daemon threads that run submitted jobs (one job
per deferred request). A ring never holds more requests than its size, so neither does the
pool's queue.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import queue
import stat
import struct
import threading
from typing import Callable, Sequence

log = logging.getLogger(__name__)

__all__ = ["BlkImage", "Iovec", "IoThreads", "SECTOR_SIZE", "slice_iovecs"]

SECTOR_SIZE = 512

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Block device ioctls (linux/fs.h).
BLKSSZGET = 0x1268                 # logical block size (int)
BLKPBSZGET = 0x127B                # physical block size (unsigned int)
BLKGETSIZE64 = 0x80081272          # size in bytes (u64)
BLKDISCARD = 0x1277                # discard a byte range (u64 start, u64 length)

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
BOUNCE_SIZE = 1 << 20              # bytes of one bounce buffer (a multiple of any alignment)
ZERO_CHUNK = 1 << 20               # zeroes written per call when fallocate cannot zero

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_preadv = _libc.preadv
_preadv.argtypes = [ctypes.c_int, ctypes.POINTER(Iovec), ctypes.c_int, ctypes.c_longlong]
_preadv.restype = ctypes.c_ssize_t
_preadv2 = _libc.preadv2
_preadv2.argtypes = [ctypes.c_int, ctypes.POINTER(Iovec), ctypes.c_int, ctypes.c_longlong,
                     ctypes.c_int]
_preadv2.restype = ctypes.c_ssize_t
_pwritev2 = _libc.pwritev2
_pwritev2.argtypes = [ctypes.c_int, ctypes.POINTER(Iovec), ctypes.c_int, ctypes.c_longlong,
                      ctypes.c_int]
_pwritev2.restype = ctypes.c_ssize_t
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

IovecList = Sequence[tuple[int, int]]

# File systems whose files live in memory (linux/magic.h): their I/O never waits for a device.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
HUGETLBFS_MAGIC = 0x958458F6
_MEMORY_FILE_SYSTEMS = (TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC)
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def _in_memory_without_nowait(fd: int) -> bool:
    """True if `fd`'s file lives in memory (tmpfs, ramfs, hugetlbfs) and its file system
    refuses non-blocking reads (RWF_NOWAIT: EOPNOTSUPP, as tmpfs does on Linux 6.x).

    Why it matters: io_uring tries every buffered read and write non-blocking first and
    hands those the file system refuses to its worker threads, a thread hop and two context
    switches per request; on tmpfs that is every request (measured with host fio on a file
    in /dev/shm, one CPU, 4 KiB random reads: io_uring at QD 32 256 k/s, one pread at a
    time 545 k/s). Such a file's I/O is a memory copy that cannot wait for a device (swap
    aside), so the compiled path does it synchronously instead (`uring_kernels`)."""
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first word
    if _fstatfs(fd, buf) != 0:
        return False
    (f_type,) = struct.unpack_from("q", buf.raw)
    if f_type & 0xFFFFFFFF not in _MEMORY_FILE_SYSTEMS:
        return False
    try:
        os.preadv(fd, [bytearray(SECTOR_SIZE)], 0, os.RWF_NOWAIT)
    except OSError as e:
        return e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)
    return False


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def slice_iovecs(iovecs: IovecList, start: int, size: int) -> list[tuple[int, int]]:
    """The pieces of `iovecs` covering bytes [start, start+size) of their concatenation."""
    out: list[tuple[int, int]] = []
    for addr, ln in iovecs:
        if size <= 0:
            break
        if start >= ln:
            start -= ln
            continue
        take = min(ln - start, size)
        out.append((addr + start, take))
        start = 0
        size -= take
    return out


class _Bounce:
    """A page-aligned buffer of BOUNCE_SIZE bytes (anonymous mmap) and its address."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, BOUNCE_SIZE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(self._anchor)

    def close(self) -> None:
        del self._anchor  # the export: mmap.close() refuses while it lives
        self.map.close()


class BlkImage:
    """An open image: a raw file or a block device. Thread-safe (positioned I/O only)."""

    def __init__(self, fd: int, path: str, size: int, *, readonly: bool, direct: bool,
                 align: int, physical_block: int, block_device: bool,
                 null: bool = False) -> None:
        self.fd = fd
        self.path = path
        #: Bytes of the image; the disk is `capacity` 512-byte sectors (a partial tail sector
        #: is not part of it).
        self.size = size
        self.capacity = size // SECTOR_SIZE
        self.readonly = readonly
        self.direct = direct
        #: Alignment of offsets, lengths and buffers for O_DIRECT (SECTOR_SIZE without it).
        self.align = align
        self.physical_block = physical_block
        self.block_device = block_device
        #: No storage (`null`): reads leave the guest's buffers as they are, writes, flushes,
        #: discards and zeroing succeed without I/O (as qemu-storage-daemon's null-co).
        self.null = null
        #: A file in memory whose file system cannot do non-blocking I/O: the compiled path
        #: reads and writes it synchronously (`_in_memory_without_nowait`).
        self.sync_io = False
        self._bounces: list[_Bounce] = []
        self._nowait = True
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False,
             direct: bool = False) -> "BlkImage":
        """Open `path` (OSError if it cannot be; ValueError if it is neither a regular file nor
        a block device, or O_DIRECT I/O does not work on it)."""
        path = os.fspath(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                (size,) = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))
                (logical,) = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))
                (physical,) = struct.unpack("I", fcntl.ioctl(fd, BLKPBSZGET, bytes(4)))
                block_device = True
            elif stat.S_ISREG(st.st_mode):
                size, logical, physical = st.st_size, SECTOR_SIZE, st.st_blksize
                block_device = False
            else:
                raise ValueError(f"{path}: not a regular file or a block device")
            align = SECTOR_SIZE
            if direct:
                align = max(logical, SECTOR_SIZE) if block_device else _probe_direct(fd, size)
            physical = max(physical or SECTOR_SIZE, align)
            if physical & (physical - 1) or physical > 1 << 16:
                physical = align
            image = cls(fd, path, size, readonly=readonly, direct=direct, align=align,
                        physical_block=physical, block_device=block_device)
            image.sync_io = not direct and not block_device and _in_memory_without_nowait(fd)
            return image
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open_null(cls, size: int, *, readonly: bool = False) -> "BlkImage":
        """A null disk of `size` bytes: every range check as for a file, no I/O at all (what
        the benchmark measures the device's own overhead with)."""
        if size < SECTOR_SIZE:
            raise ValueError(f"null disk of {size} bytes: at least one sector ({SECTOR_SIZE})")
        return cls(-1, f"null:{size}", size, readonly=readonly, direct=False,
                   align=SECTOR_SIZE, physical_block=SECTOR_SIZE, block_device=False, null=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
        with self._lock:
            bounces, self._bounces = self._bounces, []
        for b in bounces:
            b.close()

    def __enter__(self) -> "BlkImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BlkImage({self.path!r}, {self.capacity} sectors, "
                f"{'ro' if self.readonly else 'rw'}{', direct' if self.direct else ''})")

    # -- operations (any thread) ---------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        """ValueError unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.capacity * SECTOR_SIZE:
            raise ValueError(f"range {offset}+{length} outside the image "
                             f"({self.capacity * SECTOR_SIZE} bytes)")

    def read(self, iovecs: IovecList, offset: int) -> None:
        """Fill `iovecs` (host addresses) from the image at byte `offset`."""
        length = sum(n for _, n in iovecs)
        self.check_range(offset, length)
        if self.null:
            return
        if self.direct and not self._aligned(iovecs):
            self._bounced(False, iovecs, offset, length, 0)
        else:
            self._transfer(False, iovecs, offset, 0)

    def read_cached(self, iovecs: IovecList, offset: int) -> int:
        """Read what the page cache holds, never waiting for the disk (preadv2 RWF_NOWAIT):
        the bytes read from the start of `iovecs` (0 when nothing was cached, or with
        O_DIRECT). The caller reads the rest with `read` (which also reports errors)."""
        if self.direct or not self._nowait:
            return 0
        length = sum(n for _, n in iovecs)
        self.check_range(offset, length)
        if self.null:
            return length
        pending = [(a, n) for a, n in iovecs if n > 0][:IOV_MAX]
        arr = (Iovec * len(pending))(*[Iovec(a, n) for a, n in pending])
        r = _preadv2(self.fd, arr, len(pending), offset, os.RWF_NOWAIT)
        if r < 0:
            if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                self._nowait = False  # this kernel or file system cannot: stop asking
            return 0
        return r

    def write(self, iovecs: IovecList, offset: int, *, dsync: bool = False) -> None:
        """Write `iovecs` to the image at `offset`; `dsync`: stable when this returns."""
        self._writable()
        length = sum(n for _, n in iovecs)
        self.check_range(offset, length)
        if self.null:
            return
        flags = os.RWF_DSYNC if dsync else 0
        if self.direct and not self._aligned(iovecs):
            self._bounced(True, iovecs, offset, length, flags)
        else:
            self._transfer(True, iovecs, offset, flags)

    def flush(self) -> None:
        """Make every completed write stable (fdatasync)."""
        if not self.null:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> bool:
        """Deallocate [offset, offset+length) (later reads return zeroes where the file system
        or device did). False if the image cannot deallocate (discard is a hint: not an error)."""
        self._writable()
        self.check_range(offset, length)
        if length == 0 or self.null:
            return True
        try:
            if self.block_device:  # a device's own discard (PUNCH_HOLE would also zero)
                arg = (ctypes.c_uint64 * 2)(offset, length)
                while _ioctl(self.fd, BLKDISCARD, ctypes.addressof(arg)) != 0:
                    if ctypes.get_errno() != errno.EINTR:
                        raise _oserror(f"BLKDISCARD {offset}+{length}")
            else:
                self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _NOT_SUPPORTED:
                return False
            raise
        return True

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, dsync: bool = False) -> str:
        """Zero [offset, offset+length): by deallocating it when `unmap` allows (PUNCH_HOLE),
        else ZERO_RANGE, else punch + allocate, else writing zeroes. Returns how it was done."""
        self._writable()
        self.check_range(offset, length)
        if length == 0 or self.null:
            return "nothing"
        how = self._zero(offset, length, unmap)
        if dsync:
            self.flush()
        return how

    # -- internals -----------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")

    def _aligned(self, iovecs: IovecList) -> bool:
        mask = self.align - 1
        return all(not (a & mask or n & mask) for a, n in iovecs)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        while _fallocate(self.fd, mode, offset, length) != 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _oserror(f"fallocate(mode {mode:#x}, {offset}, {length})")

    def _zero(self, offset: int, length: int, unmap: bool) -> str:
        attempts = ([("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)] if unmap else [])
        attempts.append(("zero-range", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        for how, mode in attempts:
            try:
                self._fallocate(mode, offset, length)
                return how
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
        if not self.block_device:  # a hole, then allocated again: zeroes that stay allocated
            try:
                self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                self._fallocate(FALLOC_FL_KEEP_SIZE, offset, length)
                return "punch+allocate"
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
        bounce = self._get_bounce()
        try:
            ctypes.memset(bounce.addr, 0, min(ZERO_CHUNK, BOUNCE_SIZE))
            pos = 0
            while pos < length:
                n = min(length - pos, ZERO_CHUNK, BOUNCE_SIZE)
                self._transfer(True, [(bounce.addr, n)], offset + pos, 0)
                pos += n
        finally:
            self._put_bounce(bounce)
        return "written"

    def _transfer(self, write: bool, iovecs: IovecList, offset: int, flags: int) -> None:
        """preadv/pwritev2 over `iovecs` (IOV_MAX at a time), until every byte is moved."""
        pending = [(a, n) for a, n in iovecs if n > 0]
        i = 0
        while i < len(pending):
            batch = pending[i:i + IOV_MAX]
            arr = (Iovec * len(batch))(*[Iovec(a, n) for a, n in batch])
            if write:
                r = _pwritev2(self.fd, arr, len(batch), offset, flags)
            else:
                r = _preadv(self.fd, arr, len(batch), offset)
            if r < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                raise _oserror(f"{'pwritev2' if write else 'preadv'} at {offset}")
            if r == 0:
                raise OSError(errno.EIO, f"{'write' if write else 'read'} at {offset}: "
                              "end of the image (did it shrink?)")
            offset += r
            while r > 0:  # drop what was moved; a short transfer resumes mid-piece
                a, n = pending[i]
                if n <= r:
                    r -= n
                    i += 1
                else:
                    pending[i] = (a + r, n - r)
                    r = 0

    def _bounced(self, write: bool, iovecs: IovecList, offset: int, length: int,
                 flags: int) -> None:
        """O_DIRECT with unaligned guest buffers: through a bounce buffer, a chunk at a time."""
        bounce = self._get_bounce()
        try:
            pos = 0
            while pos < length:
                n = min(length - pos, BOUNCE_SIZE)
                pieces = slice_iovecs(iovecs, pos, n)
                if write:
                    at = bounce.addr
                    for a, k in pieces:
                        ctypes.memmove(at, a, k)
                        at += k
                    self._transfer(True, [(bounce.addr, n)], offset + pos, flags)
                else:
                    self._transfer(False, [(bounce.addr, n)], offset + pos, 0)
                    at = bounce.addr
                    for a, k in pieces:
                        ctypes.memmove(a, at, k)
                        at += k
                pos += n
        finally:
            self._put_bounce(bounce)

    def _get_bounce(self) -> _Bounce:
        with self._lock:
            if self._bounces:
                return self._bounces.pop()
        return _Bounce()

    def _put_bounce(self, bounce: _Bounce) -> None:
        with self._lock:
            if not self.closed:
                self._bounces.append(bounce)
                return
        bounce.close()


def _probe_direct(fd: int, size: int) -> int:
    """The smallest alignment (512 or 4096) at which O_DIRECT reads of this file work."""
    buf = mmap.mmap(-1, 3 * mmap.PAGESIZE)
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        base = ctypes.addressof(anchor)
        for align in (SECTOR_SIZE, 4096):
            addr = base + mmap.PAGESIZE + (align if align < mmap.PAGESIZE else 0)
            offset = align if size >= 2 * align else 0
            r = _preadv(fd, (Iovec * 1)(Iovec(addr, align)), 1, offset)
            if r >= 0:
                return align
            if ctypes.get_errno() != errno.EINVAL:
                raise _oserror("O_DIRECT probe read")
        raise ValueError("O_DIRECT reads fail (EINVAL) at 512 and 4096-byte alignment")
    finally:
        del anchor
        buf.close()


class IoThreads:
    """N daemon threads running submitted jobs; started and stopped by the device as its
    rings start and stop. A job that raises is logged (jobs complete their own requests)."""

    def __init__(self, count: int, name: str = "blk") -> None:
        if count < 1:
            raise ValueError("at least one I/O thread")
        self.count = count
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            # A queue per start: a thread still busy from before a stop() keeps its own.
            self._jobs = queue.SimpleQueue()
            self._threads = [threading.Thread(target=self._run, args=(self._jobs,),
                                              name=f"{self.name}-io{k}", daemon=True)
                             for k in range(self.count)]
            for t in self._threads:
                t.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._threads:
                raise RuntimeError("I/O threads not started")
            self._jobs.put(job)

    def stop(self, timeout: float = 10.0) -> bool:
        """Let the queued jobs finish, end the threads; False if one did not end in time."""
        with self._lock:
            threads, self._threads = self._threads, []
            jobs = self._jobs
        for _ in threads:
            jobs.put(None)
        ok = True
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                log.error("%s still busy %.0f s after stop; left running", t.name, timeout)
                ok = False
        return ok

    def _run(self, jobs: "queue.SimpleQueue[Callable[[], None] | None]") -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # the job's own bug: logged, the thread goes on
                log.exception("%s: I/O job failed", threading.current_thread().name)
            finally:
                job = None  # drop its references (guest-memory addresses, pending) now
