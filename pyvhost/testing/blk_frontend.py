"""A vhost-user-blk front-end whose request loop is compiled: the same driver for every back-end.

`pyvhost bench blk` measures back-ends (pyvhost, qemu-storage-daemon) with this, so it must not
be the bottleneck and must treat them alike. Set-up is Python and reuses the test front-end
(`VhostUserFrontend`: negotiation, GET_CONFIG, SET_MEM_TABLE, the ring messages) over a
`GuestRam` of memfd "guest RAM" with the queue laid out by `MockSplitQueue`; from then on the
compiled loop (numba, nogil) plays the guest's virtio-blk driver on that queue alone:

- QD request slots, each a fixed chain like Linux's: one descriptor in the ring pointing to an
  indirect table [16-byte header (device-readable), 4 KiB data (device-writable for reads,
  readable for writes), 1-byte status (writable)] — or, with `indirect=False`, those three
  as a direct chain of ring descriptors;
- every completion is reaped from the used ring by polling used->idx, its status byte checked
  (anything but OK counts as an error) and its slot resubmitted at once with a new random 4 KiB
  aligned sector (xorshift64*): QD requests stay in flight;
- the avail index is published once per reaped batch and the kick eventfd written only when
  the ring asks for it (EVENT_IDX's avail_event, or VRING_USED_F_NO_NOTIFY);
- by default nothing sleeps: interrupts are suppressed (used_event kept half the index space
  ahead, or VRING_AVAIL_F_NO_INTERRUPT) and the used ring polled — a call eventfd is still
  passed, as libvhost-user wants one; with `interrupts=True` an empty look at the used ring
  asks for a notification, looks again, and sleeps in poll(2) on the call eventfd, as a guest
  driver waiting for its interrupt;
- each request's latency (submit to reap, CLOCK_MONOTONIC) is recorded, up to a cap.

Guest-controlled values from the device side are checked like any driver would: a used id that
is not an in-flight head, or used->idx moving by more than is in flight, stops the loop with an
error code rather than corrupting the bookkeeping.

    with BlkBenchFrontend(socket_path) as fe:
        fe.start(op=READ, qd=32)
        fe.run(1.0)                  # warm-up
        r = fe.run(5.0)              # r.completed, r.errors, r.seconds, latencies
        fe.drain()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import types

from pyvhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from pyvhost.ring.barriers import fence_acquire, fence_release, fence_seq_cst
from pyvhost.ring.fdcalls import sys_read, sys_write
from pyvhost.ring.hostmem import load_u16, store_u16
from pyvhost.ring.jit import kernel
from pyvhost.ring.layout import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
)
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

__all__ = ["READ", "WRITE", "BlkBenchFrontend", "BlkFrontendError", "RunResult"]

READ = 0   # VIRTIO_BLK_T_IN
WRITE = 1  # VIRTIO_BLK_T_OUT
BLOCK = 4096
SECTOR = 512
HEADER_LEN = 16

VIRTIO_F_VERSION_1 = 32
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
FEATURES_WANTED = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
                   | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_BLK_F_SEG_MAX
                   | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_RO)
PROTOCOL_WANTED = (ProtocolFeature.CONFIG.mask | ProtocolFeature.MQ.mask
                   | ProtocolFeature.REPLY_ACK.mask)
CONFIG_BASE_LEN = 36  # virtio_blk_config up to num_queues (capacity .. topology, wce, nq)

LATENCY_CAP = 1 << 21  # latencies kept per run (8 bytes each); the count goes on past it

# Loop state, int64 slots of `state`.
S_NEXT_AVAIL = 0     # free-running avail index we publish next
S_LAST_USED = 1      # used index reaped up to
S_IN_FLIGHT = 2
S_RNG = 3            # xorshift64* state
S_ERROR = 4          # 0, or an E_* code: the loop stopped
S_ERROR_ARG = 5
S_KICKS = 6
S_LEN = 8

E_NONE = 0
E_STALL = 1          # nothing completed for `stall_ns`
E_USED_TOO_FAR = 2   # used->idx moved past what is in flight
E_BAD_ID = 3         # a used id that is not an in-flight head
E_KICK = 4           # writing the kick eventfd failed
ERROR_NAMES = {E_STALL: "no completion for the stall timeout",
               E_USED_TOO_FAR: "used->idx moved past the requests in flight",
               E_BAD_ID: "used element names a head that is not in flight",
               E_KICK: "writing the kick eventfd failed"}

# libc by symbol name, as ring/fdcalls.py's read and write (resolved in-process when the kernel
# is loaded, so it caches, unlike a ctypes function pointer); pointers are passed as int64, the
# same register in the C ABI.
_clock_gettime: Any = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.int64))
_poll: Any = types.ExternalFunction("poll", types.int32(types.int64, types.uint64, types.int32))
POLLIN = 1
SLEEP_MS = 10  # longest sleep on the call eventfd before the loop looks at the clock again
CLOCK_MONOTONIC = 1


class BlkFrontendError(Exception):
    """The back-end misbehaved (a bad used element, a stall) or refused the set-up."""


@kernel
def _now_ns(ts):
    _clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@kernel
def _submit(slot, op, nblocks, state, head_of, hdr, status, avail, qmask, submit_ns, now):
    """Put slot's request in the next avail slot (not yet published): header, status, ring."""
    x = np.uint64(state[S_RNG])
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[S_RNG] = np.int64(x)
    r = x * np.uint64(0x2545F4914F6CDD1D)
    block = np.int64((r >> np.uint64(11)) % np.uint64(nblocks))
    hdr[2 * slot] = op                       # type (le32) + reserved (le32) = 0
    hdr[2 * slot + 1] = block * (BLOCK // SECTOR)
    status[slot] = 0xFF                      # a device that writes no status is seen
    i = state[S_NEXT_AVAIL]
    avail[2 + (i & qmask)] = head_of[slot]
    state[S_NEXT_AVAIL] = (i + 1) & 0xFFFF
    state[S_IN_FLIGHT] += 1
    submit_ns[slot] = now


@kernel
def _publish(state, old, avail_addr, used_addr, avail_event_addr, event_idx, kick_fd, one):
    """Publish avail->idx and kick when the device asked for it (2.7.13.3-4)."""
    new = state[S_NEXT_AVAIL]
    fence_release()
    store_u16(avail_addr + 2, new)
    fence_seq_cst()  # the store above before reading the device's suppression fields
    if event_idx:
        ev = np.int64(load_u16(avail_event_addr))
        kick = ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    else:
        kick = (np.int64(load_u16(used_addr)) & VRING_USED_F_NO_NOTIFY) == 0
    if kick:
        state[S_KICKS] += 1
        if sys_write(kick_fd, one.ctypes.data, 8) != 8:
            state[S_ERROR] = E_KICK
            return False
    return True


@kernel
def _interrupts(on, avail, used_event_index, event_idx, last):
    """Ask for a used-buffer notification after `last` (on), or for none (2.7.7, 2.7.10)."""
    if event_idx:
        avail[used_event_index] = last if on else (last + 0x8000) & 0xFFFF
    else:
        avail[0] = 0 if on else VRING_AVAIL_F_NO_INTERRUPT


@kernel
def run_loop(state, params, head_of, slot_of, in_flight, submit_ns, hdr, status, avail, used32,
             lat, ts, one, pfd, evbuf, results):
    """Keep params' QD requests in flight until `duration_ns` has passed (or, with
    `drain`, until none is in flight), reaping by polling used->idx; with `interrupts`, an
    empty look at the used ring sleeps on the call eventfd instead (notifications asked for
    only then, as a guest driver re-enables its callback before it waits).

    params: [op, qd, nblocks, duration_ns, stall_ns, drain, qsize, avail_addr, used_addr,
    avail_event_addr, used_event index in `avail`, event_idx, kick_fd, latency_cap, call_fd,
    interrupts].
    results (int64, added to): [completed, errors (status != OK), lat_count, lat_sum_ns,
    polls, empty_polls, sleeps]."""
    op, qd, nblocks, duration_ns, stall_ns, drain = (params[0], params[1], params[2], params[3],
                                                    params[4], params[5])
    qsize, avail_addr, used_addr, avail_event_addr = params[6], params[7], params[8], params[9]
    used_event_index, event_idx, kick_fd, lat_cap = params[10], params[11], params[12], params[13]
    call_fd, interrupts = params[14], params[15]
    qmask = qsize - 1
    start = _now_ns(ts)
    end = start + duration_ns
    last_progress = start
    old = state[S_NEXT_AVAIL]
    # Fill up to QD (the first call, or after a drain).
    if not drain:
        for slot in range(qd):
            if in_flight[slot] == 0:
                in_flight[slot] = 1
                _submit(slot, op, nblocks, state, head_of, hdr, status, avail, qmask, submit_ns,
                        start)
        if state[S_NEXT_AVAIL] != old:
            if not _publish(state, old, avail_addr, used_addr, avail_event_addr, event_idx,
                            kick_fd, one):
                return
    while True:
        if drain and state[S_IN_FLIGHT] == 0:
            return
        now = _now_ns(ts)
        if not drain and now >= end:
            return
        uidx = np.int64(load_u16(used_addr + 2))
        last = state[S_LAST_USED]
        n = (uidx - last) & 0xFFFF
        results[4] += 1
        if n == 0:
            results[5] += 1
            if now - last_progress > stall_ns:
                state[S_ERROR] = E_STALL
                return
            if interrupts:
                _interrupts(True, avail, used_event_index, event_idx, last)
                fence_seq_cst()  # the request before the re-check (else a lost wake-up)
                if np.int64(load_u16(used_addr + 2)) == uidx:
                    pfd[0] = call_fd
                    pfd[1] = POLLIN
                    _poll(pfd.ctypes.data, 1, SLEEP_MS)
                    sys_read(call_fd, evbuf.ctypes.data, 8)  # non-blocking: resets the count
                    results[6] += 1
                _interrupts(False, avail, used_event_index, event_idx, last)
            continue
        if n > state[S_IN_FLIGHT]:
            state[S_ERROR] = E_USED_TOO_FAR
            state[S_ERROR_ARG] = n
            return
        fence_acquire()  # the used elements and the buffers after used->idx
        last_progress = now
        old = state[S_NEXT_AVAIL]
        for k in range(n):
            e = (last + k) & qmask
            head = np.int64(used32[1 + 2 * e])
            slot = slot_of[head] if 0 <= head < qsize else -1
            if slot < 0 or in_flight[slot] == 0:
                state[S_ERROR] = E_BAD_ID
                state[S_ERROR_ARG] = head
                return
            in_flight[slot] = 0
            state[S_IN_FLIGHT] -= 1
            results[0] += 1
            if status[slot] != 0:
                results[1] += 1
            dt = now - submit_ns[slot]
            c = results[2]
            if c < lat_cap:
                lat[c] = dt
            results[2] = c + 1
            results[3] += dt
            if not drain:
                in_flight[slot] = 1
                _submit(slot, op, nblocks, state, head_of, hdr, status, avail, qmask, submit_ns,
                        now)
        state[S_LAST_USED] = uidx
        _interrupts(False, avail, used_event_index, event_idx, uidx)  # awake: none wanted
        if state[S_NEXT_AVAIL] != old:
            if not _publish(state, old, avail_addr, used_addr, avail_event_addr, event_idx,
                            kick_fd, one):
                return


@dataclass
class RunResult:
    completed: int
    errors: int             # requests whose status byte was not OK
    seconds: float
    latencies_ns: np.ndarray  # up to LATENCY_CAP of them, in completion order
    latency_mean_ns: float | None
    kicks: int
    sleeps: int             # waits on the call eventfd (interrupt mode)

    @property
    def iops(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


class BlkBenchFrontend:
    """One connection to a vhost-user-blk back-end, one request queue driven by `run_loop`."""

    def __init__(self, socket_path: str, *, queue_size: int = 256, max_qd: int = 128,
                 indirect: bool = True, interrupts: bool = False,
                 connect_timeout: float = 30.0, timeout: float = 10.0) -> None:
        if max_qd > (queue_size if indirect else queue_size // 3):
            raise ValueError(f"queue size {queue_size} cannot hold {max_qd} requests")
        self.queue_size, self.max_qd, self.indirect = queue_size, max_qd, indirect
        self.interrupts = interrupts
        self._fe = VhostUserFrontend(socket_path, connect_timeout=connect_timeout,
                                     timeout=timeout)
        self._ram: GuestRam | None = None
        self._views: list[np.ndarray] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- set-up --------------------------------------------------------------------------------

    def _setup(self) -> None:
        fe = self._fe
        neg = fe.negotiate(FEATURES_WANTED, PROTOCOL_WANTED)
        if not neg.features >> VIRTIO_F_VERSION_1 & 1:
            raise BlkFrontendError("back-end does not offer VIRTIO_F_VERSION_1")
        if self.indirect and not neg.features >> VIRTIO_RING_F_INDIRECT_DESC & 1:
            raise BlkFrontendError("back-end does not offer VIRTIO_RING_F_INDIRECT_DESC")
        self.features = neg.features
        self.read_only = bool(neg.features >> VIRTIO_BLK_F_RO & 1)
        self.event_idx = bool(neg.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        if not neg.has(ProtocolFeature.CONFIG):
            raise BlkFrontendError("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        config = fe.get_config(0, CONFIG_BASE_LEN)
        self.capacity_sectors = int.from_bytes(config[:8], "little")
        self.nblocks = self.capacity_sectors * SECTOR // BLOCK
        if self.nblocks < 1:
            raise BlkFrontendError(f"capacity {self.capacity_sectors} sectors < one 4 KiB block")
        q, qd = self.queue_size, self.max_qd
        ram_size = 1 << 22
        while ram_size < 64 * 1024 + qd * (BLOCK + 64 + 48):
            ram_size *= 2
        self._ram = ram = GuestRam([(0, ram_size)])
        self._driver = driver = MockSplitQueue(ram, q, event_idx=self.event_idx)
        data = ram.alloc(qd * BLOCK, BLOCK)
        tables = ram.alloc(qd * 48, 16)
        headers = ram.alloc(qd * HEADER_LEN, 16)
        statuses = ram.alloc(qd, 8)
        fe.set_mem_table(ram)
        fe.setup_queue(0, driver, kick=True, call=True)
        if neg.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            fe.enable_queue(0)  # rings start disabled once protocol features are on
        self.kick_fd, self.call_fd = fe.queue_fds(0)

        (region,) = ram.regions
        mem = np.frombuffer(region.mm, np.uint8)  # mmap_offset 0: file offset == GPA
        self._views.append(mem)
        addrs = driver.ring_addresses().gpa
        self._desc = mem[addrs.desc_table:addrs.desc_table + 16 * q].view(
            np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")]))
        self._avail = mem[addrs.avail_ring:addrs.avail_ring + 6 + 2 * q].view(np.uint16)
        self._used32 = mem[addrs.used_ring:addrs.used_ring + 4 + 8 * q].view(np.uint32)
        used_all = mem[addrs.used_ring:addrs.used_ring + 6 + 8 * q]
        self._hdr = mem[headers:headers + qd * HEADER_LEN].view(np.uint64)
        self._status = mem[statuses:statuses + qd]
        self._data = mem[data:data + qd * BLOCK]
        self._tables = mem[tables:tables + qd * 48].view(self._desc.dtype)
        self._views += [self._desc, self._avail, self._used32, self._hdr, self._status,
                        self._data, self._tables]
        self._gpa = {"data": data, "tables": tables, "headers": headers, "statuses": statuses}
        self._avail_addr = self._avail.ctypes.data
        self._used_addr = used_all.ctypes.data
        self._avail_event_addr = used_all.ctypes.data + 4 + 8 * q
        self._used_event_index = 2 + q
        del used_all

        self._head_of = np.zeros(qd, np.int64)
        self._slot_of = np.full(q, -1, np.int64)
        for s in range(qd):
            head = s if self.indirect else 3 * s
            self._head_of[s], self._slot_of[head] = head, s
        self._in_flight = np.zeros(qd, np.int64)
        self._submit_ns = np.zeros(qd, np.int64)
        self._state = np.zeros(S_LEN, np.int64)
        self._state[S_RNG] = 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF
        self._lat = np.zeros(LATENCY_CAP, np.int64)
        self._ts = np.zeros(2, np.int64)
        self._one = np.ones(1, np.uint64)
        self._pfd = np.zeros(2, np.int32)  # struct pollfd: fd, events | revents << 16
        self._evbuf = np.zeros(1, np.uint64)
        _interrupts(False, self._avail, self._used_event_index, self.event_idx, 0)
        self._op: int | None = None
        self._qd = 0
        self._data[:] = np.frombuffer(os.urandom(len(self._data)), np.uint8)

    def _chains(self, op: int) -> None:
        """Lay out every slot's descriptors for `op` (no request is in flight)."""
        g = self._gpa
        data_flags = VIRTQ_DESC_F_WRITE if op == READ else 0
        for s in range(self.max_qd):
            parts = [(g["headers"] + s * HEADER_LEN, HEADER_LEN, 0),
                     (g["data"] + s * BLOCK, BLOCK, data_flags),
                     (g["statuses"] + s, 1, VIRTQ_DESC_F_WRITE)]
            if self.indirect:
                table, first = self._tables, 3 * s
                self._desc[s] = (g["tables"] + 48 * s, 48, VIRTQ_DESC_F_INDIRECT, 0)
            else:
                table, first = self._desc, 3 * s
            for k, (addr, ln, flags) in enumerate(parts):
                # An indirect table numbers its own entries from 0.
                nxt = k + 1 if self.indirect else first + k + 1
                more = VIRTQ_DESC_F_NEXT if k < 2 else 0
                table[first + k] = (addr, ln, flags | more, nxt if k < 2 else 0)

    # -- running -------------------------------------------------------------------------------

    def start(self, op: int, qd: int) -> None:
        """Choose the workload; requests go out with the next run()."""
        if op not in (READ, WRITE):
            raise ValueError(f"op {op}")
        if not 1 <= qd <= self.max_qd:
            raise ValueError(f"qd {qd} outside 1..{self.max_qd}")
        if op == WRITE and self.read_only:
            raise BlkFrontendError("the back-end offers a read-only disk (VIRTIO_BLK_F_RO)")
        if self._state[S_IN_FLIGHT]:
            self.drain()
        if op != self._op:
            self._chains(op)
        self._op, self._qd = op, qd

    def run(self, seconds: float, *, stall: float = 5.0) -> RunResult:
        """Keep QD requests in flight for `seconds`; what completed in that time."""
        if self._op is None:
            raise BlkFrontendError("start() first")
        return self._run(seconds, stall, drain=False)

    def drain(self, *, stall: float = 5.0) -> RunResult:
        """Wait for every request in flight; submits nothing new."""
        return self._run(0.0, stall, drain=True)

    def _run(self, seconds: float, stall: float, drain: bool) -> RunResult:
        params = np.array([self._op or 0, self._qd, self.nblocks, int(seconds * 1e9),
                           int(stall * 1e9), int(drain), self.queue_size, self._avail_addr,
                           self._used_addr, self._avail_event_addr, self._used_event_index,
                           int(self.event_idx), self.kick_fd, LATENCY_CAP, self.call_fd,
                           int(self.interrupts)], np.int64)
        results = np.zeros(7, np.int64)
        kicks0 = int(self._state[S_KICKS])
        t0 = _now_ns(self._ts)
        run_loop(self._state, params, self._head_of, self._slot_of, self._in_flight,
                 self._submit_ns, self._hdr, self._status, self._avail, self._used32, self._lat,
                 self._ts, self._one, self._pfd, self._evbuf, results)
        t1 = _now_ns(self._ts)
        err = int(self._state[S_ERROR])
        if err:
            arg = int(self._state[S_ERROR_ARG])
            raise BlkFrontendError(f"{ERROR_NAMES.get(err, err)} ({arg}; "
                                   f"{int(self._state[S_IN_FLIGHT])} in flight)")
        n_lat = min(int(results[2]), LATENCY_CAP)
        return RunResult(completed=int(results[0]), errors=int(results[1]),
                         seconds=(t1 - t0) / 1e9, latencies_ns=self._lat[:n_lat].copy(),
                         latency_mean_ns=(results[3] / results[2]) if results[2] else None,
                         kicks=int(self._state[S_KICKS]) - kicks0, sleeps=int(results[6]))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (the back-end stops the ring), then the guest RAM."""
        self._fe.close()
        for name in ("_desc", "_avail", "_used32", "_hdr", "_status", "_data", "_tables"):
            self.__dict__.pop(name, None)
        self._views.clear()
        if self._ram is not None:
            self._ram.close()
            self._ram = None

    def __enter__(self) -> BlkBenchFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
