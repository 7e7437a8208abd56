"""Polling a ring from compiled code: how long a burst loop may go on, and what ends it early.

Why: a busy-polling worker that comes back to Python after every burst pays microseconds of
interpreter per round (epoch, table, views, the device call) while the driver keeps filling the
ring; measured against testpmd txonly that was ~75,000 rounds/s and the ring was full (frames
refused) for part of each. A device kernel given a `PollWindow` instead keeps bursting, and
keeps looking at an empty ring with the CPU's spin-wait hint, all without the GIL, until:
- the window's cycles are used up (other rings of the same worker get their turn), or its ring
  stayed empty for `idle_cycles` (0: at the first empty look),
- the driver wants an interrupt (the worker signals it in Python),
- the ring broke, or
- `leave[0]` is set: a writer that changed the memory map is waiting for this worker to leave
  its epoch (`WorkerEpoch.leave_request`), or the worker is asked to stop or come round (`sync`).
The kernel checks `leave` after every burst, so a grace period still waits at most one burst.
"""

from __future__ import annotations

import platform
import time

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.ring.barriers import fence_acquire
from pyvhost.ring.jit import inlined_kernel, intrinsic, kernel

# How long one call may run while its ring has work or is being polled. Other rings of the
# worker wait this long at most; it does not bound a grace period (`leave` does).
POLL_WINDOW_S = 100e-6
# How long a call polls an empty ring (since its last work) before it returns: a gap in the
# driver's traffic, not a pause. Longer would hold up the worker's other rings (an RX
# generator whose guest is out of buffers finds no work one pass, has some the next).
IDLE_POLL_S = 10e-6


@intrinsic
def cpu_relax(typingctx):
    """x86 `pause` (the spin-wait hint); a call LLVM cannot remove, unlike an empty loop."""
    def codegen(context, builder, signature, args):
        if platform.machine() in ("x86_64", "AMD64", "i686"):
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def read_cycles(typingctx):
    """The CPU's cycle counter (x86: rdtsc, constant rate): a clock costing ~20 cycles."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), []), "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@inlined_kernel
def asked_to_leave(leave):
    # The acquire fence keeps LLVM from reading the flag once, before the loop: the writer
    # is another thread and numba's loads are plain loads.
    fence_acquire()
    return leave[0] != 0


@inlined_kernel
def window_goes_on(leave, worked, start, last_work, max_cycles, idle_cycles):
    """After a burst of a polling loop that began at cycle `start`: (go on?, last_work).

    Stop when `leave` is raised, when the ring has stayed empty for idle_cycles since the last
    burst that did work (else spin once with the pause hint before looking again), or when
    the window's max_cycles are used up. `worked`: this burst did work."""
    if asked_to_leave(leave):
        return False, last_work
    now = read_cycles()
    if worked:
        last_work = now
    elif now - last_work >= idle_cycles:
        return False, last_work
    else:
        cpu_relax()
    return now - start < max_cycles, last_work


@kernel
def _cycles_now():
    return read_cycles()


_cycles_per_s = 0.0


def cycles_per_second() -> float:
    """The cycle counter's rate, measured once per process (~2 ms)."""
    global _cycles_per_s
    if not _cycles_per_s:
        _cycles_now()  # compiled or loaded
        t0, c0 = time.perf_counter(), _cycles_now()
        while time.perf_counter() - t0 < 2e-3:
            pass
        t1, c1 = time.perf_counter(), _cycles_now()
        _cycles_per_s = max(c1 - c0, 1) / max(t1 - t0, 1e-9)
    return _cycles_per_s


class PollWindow:
    """What a worker hands a device kernel that can keep polling (see the module docstring).

    `leave` is the worker's `WorkerEpoch.leave_request` (int64[1]); `cycles` bounds one call;
    `idle_cycles` how long it polls an empty ring (`idle_seconds`: a worker in interrupt mode
    gives a shorter time than a busy-polling one, then re-enables kicks and sleeps). With
    `idle` False (other rings of the worker have work) that is 0: the kernel returns as soon
    as the ring is empty, so the worker can move on.
    """

    __slots__ = ("leave", "cycles", "idle", "idle_cycles")

    def __init__(self, leave: np.ndarray, *, idle: bool, seconds: float = POLL_WINDOW_S,
                 idle_seconds: float = IDLE_POLL_S) -> None:
        self.leave = leave
        self.idle = idle
        rate = cycles_per_second()
        self.cycles = max(int(seconds * rate), 1)
        self.idle_cycles = int(min(idle_seconds, seconds) * rate) if idle else 0


def one_pass_window() -> PollWindow:
    """For callers outside a worker (tests, warm-up): drain what is there, then return."""
    return PollWindow(np.zeros(1, dtype=np.int64), idle=False)
