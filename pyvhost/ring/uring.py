"""Raw io_uring (Linux 5.1+) for compiled kernels: no liburing, no Python per I/O.

Python sets a ring up once (`Uring.open`: io_uring_setup(2) and the three mmaps of the
submission queue, the completion queue and the SQE array, all through the C library's
`syscall`), and hands compiled code plain numpy arrays:

    ur    int64[UR_LEN]   the ring's fd and the host addresses of its shared indices (slots below)
    sqes  uint64[8*n]     the SQE array, eight words an entry (struct io_uring_sqe, 64 bytes)
    cqes  int64[2*m]      the CQE array, two words an entry (u64 user_data; s32 res, u32 flags)

Kernels fill SQEs (`prep`), publish the tail once (`sq_publish`), make one io_uring_enter(2)
(`enter`, the `syscall` intrinsic: the object code names the C symbol, which the JIT linker
resolves in the running process, so numba's cache keeps working) and reap completions from the
mapped CQ without a system call (`reap`).

Memory ordering (the kernel is the other side of both queues; `ring/barriers.py` fences and
`ring/hostmem.py` single-access loads and stores, as the virtqueue's):
- SQ: the SQEs are written, then a release fence, then the tail is stored; the kernel's head
  is loaded with an acquire fence after it before its slots are reused.
- CQ: the tail is loaded, an acquire fence, then the CQEs are read; a release fence, then the
  head is stored (the kernel may overwrite the entries after it).
`IORING_FEAT_SUBMIT_STABLE` (5.5+, required): whatever an SQE points to (iovec arrays) is
consumed during io_uring_enter, so a burst may reuse its iovec scratch once enter returned.

Interrupt mode: an eventfd registered with the ring (IORING_REGISTER_EVENTFD) becomes readable
when a completion is posted, unless the CQ flag IORING_CQ_EVENTFD_DISABLED is set: a kernel that
keeps reaping disables it, one that may let its thread sleep enables it and looks at the CQ once
more (`arm_eventfd`), so a completion posted in between is never missed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.ring.barriers import fence_acquire, fence_release, fence_seq_cst
from pyvhost.ring.fdcalls import errno_value, sys_read
from pyvhost.ring.hostmem import load_u32, store_u32
from pyvhost.ring.jit import inlined_kernel, intrinsic, kernel

__all__ = ["Uring", "UringUnavailable", "available"]

# System call numbers (x86-64 and arm64 share the io_uring ones).
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

# Opcodes (enum io_uring_op).
OP_NOP = 0
OP_READV = 1
OP_WRITEV = 2
OP_FSYNC = 3
OP_FALLOCATE = 17
OP_READ = 22
OP_WRITE = 23

# SQE flags.
IOSQE_IO_LINK = 1 << 2
# fsync_flags.
IORING_FSYNC_DATASYNC = 1
# io_uring_enter flags.
IORING_ENTER_GETEVENTS = 1
# Setup flags.
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_SUBMIT_ALL = 1 << 7
# Features.
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_SUBMIT_STABLE = 1 << 2
# SQ ring flags; CQ ring flags.
IORING_SQ_CQ_OVERFLOW = 1 << 1
IORING_CQ_EVENTFD_DISABLED = 1 << 0
# mmap offsets.
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
# io_uring_register opcodes.
IORING_REGISTER_EVENTFD = 4
IORING_UNREGISTER_EVENTFD = 5

EINTR = errno.EINTR
EAGAIN = errno.EAGAIN
EBUSY = errno.EBUSY

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle,
# features, wq_fd, resv[3], then io_sqring_offsets (head, tail, ring_mask, ring_entries,
# flags, dropped, array, resv1, u64 user_addr) and io_cqring_offsets (head, tail, ring_mask,
# ring_entries, overflow, cqes, flags, resv1, u64 user_addr): 120 bytes.
PARAMS = struct.Struct("<10I" "7IIQ" "8IQ")
assert PARAMS.size == 120
SQE_WORDS = 8
CQE_WORDS = 2

# Slots of `ur`.
UR_FD = 0
UR_SQ_HEAD = 1        # host addresses of the shared u32 fields
UR_SQ_TAIL = 2
UR_SQ_FLAGS = 3
UR_CQ_HEAD = 4
UR_CQ_TAIL = 5
UR_CQ_FLAGS = 6
UR_SQ_MASK = 7        # values
UR_SQ_ENTRIES = 8
UR_CQ_MASK = 9
UR_CQ_ENTRIES = 10
UR_SQ_LOCAL_TAIL = 11  # SQEs prepared (free-running u32), published by sq_publish
UR_CQ_LOCAL_HEAD = 12  # CQEs consumed (free-running u32), stored by reap
UR_SUBMITTED = 13     # counters
UR_ENTERS = 14
UR_COMPLETED = 15
UR_EVENTFD_ARMED = 16  # 1 while the eventfd is enabled (a kernel may sleep on it)
UR_LEN = 24

U32 = 0xFFFFFFFF


class UringUnavailable(OSError):
    """io_uring cannot be used here (an old kernel, io_uring_disabled, a seccomp filter)."""


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _sys(nr: int, *args: int) -> int:
    r = _syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(r)


class Uring:
    """One io_uring instance: its fd, its mappings, and the arrays kernels use. Not
    thread-safe: one thread at a time submits and reaps (a queue's worker; the protocol
    thread once the worker let go of the queue)."""

    def __init__(self, entries: int, cq_entries: int | None = None) -> None:
        params = bytearray(PARAMS.size)
        flags = IORING_SETUP_SUBMIT_ALL
        if cq_entries is not None:
            flags |= IORING_SETUP_CQSIZE
            struct.pack_into("<I", params, 4, cq_entries)
        struct.pack_into("<I", params, 8, flags)
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        try:
            self.fd = _sys(SYS_IO_URING_SETUP, entries, ctypes.addressof(buf))
        except OSError as exc:
            raise UringUnavailable(exc.errno, f"io_uring_setup: {exc.strerror}") from None
        finally:
            del buf
        self._maps: list[mmap.mmap] = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    def _map(self, params: bytearray) -> None:
        p = PARAMS.unpack(params)
        self.sq_entries, self.cq_entries, _flags = p[0], p[1], p[2]
        self.features = p[5]
        sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cq_cqes, cq_flags = p[19:26]
        if not self.features & IORING_FEAT_SUBMIT_STABLE or not self.features & \
                IORING_FEAT_SINGLE_MMAP:
            raise UringUnavailable(errno.ENOSYS, f"io_uring features {self.features:#x} lack "
                                   "SINGLE_MMAP or SUBMIT_STABLE (Linux 5.5+ needed)")
        size = max(sq_array + 4 * self.sq_entries, cq_cqes + 16 * self.cq_entries)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        rings = mmap.mmap(self.fd, size, flags, prot, offset=IORING_OFF_SQ_RING)
        self._maps.append(rings)
        sqe_map = mmap.mmap(self.fd, 64 * self.sq_entries, flags, prot, offset=IORING_OFF_SQES)
        self._maps.append(sqe_map)
        self._rings = np.frombuffer(rings, dtype=np.uint8)
        base = self._rings.ctypes.data
        # The SQ's index array maps ring slots to SQE slots: the identity, set once.
        self._rings[sq_array:sq_array + 4 * self.sq_entries].view(np.uint32)[:] = \
            np.arange(self.sq_entries, dtype=np.uint32)
        #: The SQE array (8 words an entry) and the CQE array (2 words an entry).
        self.sqes = np.frombuffer(sqe_map, dtype=np.uint64)
        self.cqes = self._rings[cq_cqes:cq_cqes + 16 * self.cq_entries].view(np.int64)
        ur = np.zeros(UR_LEN, dtype=np.int64)
        ur[UR_FD] = self.fd
        ur[UR_SQ_HEAD] = base + sq_head
        ur[UR_SQ_TAIL] = base + sq_tail
        ur[UR_SQ_FLAGS] = base + sq_flags
        ur[UR_CQ_HEAD] = base + cq_head
        ur[UR_CQ_TAIL] = base + cq_tail
        ur[UR_CQ_FLAGS] = base + cq_flags
        r32 = self._rings.view(np.uint32) if len(self._rings) % 4 == 0 else None
        assert r32 is not None
        ur[UR_SQ_MASK] = int(r32[sq_mask // 4])
        ur[UR_SQ_ENTRIES] = self.sq_entries
        ur[UR_CQ_MASK] = int(r32[cq_mask // 4])
        ur[UR_CQ_ENTRIES] = self.cq_entries
        ur[UR_SQ_LOCAL_TAIL] = int(r32[sq_tail // 4])
        ur[UR_CQ_LOCAL_HEAD] = int(r32[cq_head // 4])
        #: The state compiled code gets (slots UR_*).
        self.ur = ur
        self.eventfd = -1

    def register_eventfd(self, fd: int) -> None:
        """Have completions signal `fd` (an eventfd). It starts disabled (the CQ flag):
        kernels enable it with `arm_eventfd` before their thread may sleep on it."""
        disarm_eventfd(self.ur)
        arg = ctypes.c_int32(fd)
        _sys(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD,
             ctypes.addressof(arg), 1)
        self.eventfd = fd

    @property
    def in_kernel(self) -> int:
        """SQEs prepared but not yet consumed by the kernel (0 between bursts)."""
        return int((self.ur[UR_SQ_LOCAL_TAIL] - load_u32_py(self.ur[UR_SQ_HEAD])) & U32)

    def close(self) -> None:
        """Unmap and close (the kernel cancels or finishes what is still in flight; callers
        drain first, since guest memory may be the target)."""
        fd, self.fd = getattr(self, "fd", -1), -1
        self.sqes = self.cqes = np.zeros(0, np.int64)  # type: ignore[assignment]
        self._rings = np.zeros(0, np.uint8)
        for m in getattr(self, "_maps", []):
            try:
                m.close()
            except BufferError:  # a view someone kept: dropped with it
                pass
        self._maps = []
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Uring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_u32_py(addr: int) -> int:
    return ctypes.c_uint32.from_address(int(addr)).value


_available: bool | None = None
_available_why = ""
_available_lock = threading.Lock()


def available() -> tuple[bool, str]:
    """Whether this process can set up an io_uring (probed once): (yes, why not)."""
    global _available, _available_why
    with _available_lock:
        if _available is None:
            try:
                Uring(2).close()
                _available = True
            except OSError as exc:
                _available, _available_why = False, str(exc)
        return _available, _available_why


# ------------------------------------------------------------------- compiled side --

@intrinsic
def syscall6(typingctx, nr, a0, a1, a2, a3, a4, a5):
    """The C library's syscall(nr, a0..a5) (all int64): the result, or -1 with errno set."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64], var_arg=True)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "syscall")
        return builder.call(fn, list(args))
    return types.int64(types.int64, types.int64, types.int64, types.int64, types.int64,
                       types.int64, types.int64), codegen


@inlined_kernel
def sq_free(ur):
    """SQEs that may be prepared now."""
    head = np.int64(load_u32(ur[UR_SQ_HEAD]))
    fence_acquire()
    return ur[UR_SQ_ENTRIES] - ((ur[UR_SQ_LOCAL_TAIL] - head) & U32)


@inlined_kernel
def prep(ur, sqes, opcode, sqe_flags, fd, off, addr, length, op_flags, user_data):
    """Fill the next SQE (the caller checked sq_free): opcode, flags, fd, off, addr, len,
    the op's flags word (rw_flags, fsync_flags...) and user_data; the rest zero."""
    slot = ur[UR_SQ_LOCAL_TAIL] & ur[UR_SQ_MASK]
    b = slot * SQE_WORDS
    sqes[b] = np.uint64((opcode & 0xFF) | ((sqe_flags & 0xFF) << 8) | ((fd & U32) << 32))
    sqes[b + 1] = np.uint64(off)
    sqes[b + 2] = np.uint64(addr)
    sqes[b + 3] = np.uint64((length & U32) | ((op_flags & U32) << 32))
    sqes[b + 4] = np.uint64(user_data)
    sqes[b + 5] = np.uint64(0)
    sqes[b + 6] = np.uint64(0)
    sqes[b + 7] = np.uint64(0)
    ur[UR_SQ_LOCAL_TAIL] = (ur[UR_SQ_LOCAL_TAIL] + 1) & U32


@inlined_kernel
def sq_unconsumed(ur):
    """SQEs prepared that the kernel has not consumed yet (published or not)."""
    head = np.int64(load_u32(ur[UR_SQ_HEAD]))
    return (ur[UR_SQ_LOCAL_TAIL] - head) & U32


@inlined_kernel
def sq_publish(ur):
    """Make the prepared SQEs visible to the kernel; returns how many are pending."""
    fence_release()
    store_u32(ur[UR_SQ_TAIL], ur[UR_SQ_LOCAL_TAIL])
    return sq_unconsumed(ur)


@kernel
def enter(ur, to_submit, min_complete, flags):
    """io_uring_enter(2), retried on EINTR: SQEs the kernel consumed, or -errno (EAGAIN and
    EBUSY: the kernel is short of memory or the CQ is full; reap and come again)."""
    while True:
        r = syscall6(SYS_IO_URING_ENTER, ur[UR_FD], to_submit, min_complete, flags, 0, 0)
        ur[UR_ENTERS] += 1
        if r >= 0:
            ur[UR_SUBMITTED] += r
            return r
        e = errno_value()
        if e != EINTR:
            return -e


@kernel
def submit(ur, wait_for):
    """Publish the prepared SQEs and submit them with one io_uring_enter (also when there
    are none but `wait_for` > 0 completions are awaited). Returns what enter returned."""
    pending = sq_publish(ur)
    if pending == 0 and wait_for <= 0:
        return 0
    return enter(ur, pending, wait_for, IORING_ENTER_GETEVENTS if wait_for > 0 else 0)


@inlined_kernel
def cq_ready(ur):
    """Completions posted and not yet consumed."""
    tail = np.int64(load_u32(ur[UR_CQ_TAIL]))
    fence_acquire()
    return (tail - ur[UR_CQ_LOCAL_HEAD]) & U32


@inlined_kernel
def reap(ur, cqes, out_user, out_res, max_n):
    """Consume up to max_n completions into out_user/out_res; returns how many."""
    n = min(cq_ready(ur), max_n, out_user.shape[0], out_res.shape[0])
    head = ur[UR_CQ_LOCAL_HEAD]
    mask = ur[UR_CQ_MASK]
    for k in range(n):
        b = ((head + k) & mask) * CQE_WORDS
        out_user[k] = cqes[b]
        res = cqes[b + 1] & U32
        out_res[k] = res - (1 << 32) if res >= 1 << 31 else res
    if n > 0:
        head = (head + n) & U32
        ur[UR_CQ_LOCAL_HEAD] = head
        fence_release()  # the entries are read before the kernel may overwrite them
        store_u32(ur[UR_CQ_HEAD], head)
        ur[UR_COMPLETED] += n
    return n


@inlined_kernel
def disarm_eventfd(ur):
    """Stop completions from signalling the eventfd (a kernel that keeps reaping)."""
    if ur[UR_CQ_FLAGS] != 0:
        flags = np.int64(load_u32(ur[UR_CQ_FLAGS]))
        store_u32(ur[UR_CQ_FLAGS], flags | IORING_CQ_EVENTFD_DISABLED)
    ur[UR_EVENTFD_ARMED] = 0


@inlined_kernel
def arm_eventfd(ur):
    """Let completions signal the eventfd (the caller's thread may sleep on it), then look at
    the CQ once more: True if completions are waiting already (then do not sleep: nothing
    signalled them)."""
    flags = np.int64(load_u32(ur[UR_CQ_FLAGS]))
    store_u32(ur[UR_CQ_FLAGS], flags & ~IORING_CQ_EVENTFD_DISABLED)
    ur[UR_EVENTFD_ARMED] = 1
    fence_seq_cst()  # the flag store before the tail load (the kernel: post, then check)
    return cq_ready(ur) > 0


@kernel
def arm(ur):
    """arm_eventfd as an entry point (the thread about to sleep, from Python)."""
    return arm_eventfd(ur)


@inlined_kernel
def drain_eventfd(fd, scratch):
    """Read (reset) an eventfd opened non-blocking; scratch is an int64[1] to read into."""
    sys_read(fd, scratch.ctypes.data, 8)


@kernel
def nop_burst(ur, sqes, cqes, n, out_user, out_res):
    """Submit n NOPs (user_data 1..n) with one enter waiting for all, reap them: the
    binding's self-test and warm-up. Returns completions reaped, or -errno."""
    n = min(n, sq_free(ur))
    for k in range(n):
        prep(ur, sqes, OP_NOP, 0, -1, 0, 0, 0, 0, k + 1)
    r = submit(ur, n)
    if r < 0:
        return r
    got = 0
    while got < n:
        m = reap(ur, cqes, out_user[got:], out_res[got:], n - got)
        if m == 0:
            r = enter(ur, 0, n - got, IORING_ENTER_GETEVENTS)
            if r < 0:
                return r
        got += m
    return got
