"""Load, churn and leak-check helpers for robustness runs (fuzz/, tests/test_robust_*.py).

- `snapshot()`: what a process holds that a session could leak — open fds, memfd mappings in
  /proc/self/maps, threads — to compare against a baseline.
- `DaemonThread`: a real `Server` on a socket path, in a thread of this process, with
  `wait_idle()` (the last session fully torn down) and `stop()`.
- `SeqSink`: a device whose compiled burst handler checks every TX frame's sequence number and
  payload (for "no loss, no duplicate, no stale read" under memory-map churn) and measures
  data-path stalls.
- `ChurnFrontend`: the frontend side of a churn run (used in a subprocess by fuzz/churn.py):
  full-rate sequence-numbered traffic on one queue while it adds and removes the region holding
  half the packet buffers, replaces the whole table, and moves the rings, timing each request.
- `traffic_frontend()`: a frontend that negotiates and sends at full rate until killed
  (fuzz/disconnect.py SIGKILLs it).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pyvhost.daemon.backend import BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.device import Device

TIMEOUT = 30.0  # a bound against hangs only


# -- what a session could leak ---------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    fds: int
    memfd_maps: int
    threads: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.memfd_maps} memfd mappings, {self.threads} threads"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_maps() -> int:
    """Mappings of memfds (guest RAM regions) in this process."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def snapshot() -> Snapshot:
    return Snapshot(open_fds(), memfd_maps(), threading.active_count())


def fd_table() -> dict[int, str]:
    """fd -> what it refers to (for reporting a leak)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def describe_leak(before: dict[int, str], after: dict[int, str]) -> str:
    new = {fd: t for fd, t in after.items() if before.get(fd) != t}
    gone = {fd: t for fd, t in before.items() if after.get(fd) != t}
    return f"new fds {new}, gone {gone}"


# -- a live daemon in this process ------------------------------------------------------------

def warm_up_net() -> None:
    """Load the net device's burst and the worker's ring calls (as `pyvhost net` does before
    serving): a first burst that loads or compiles them runs inside the worker's epoch, and a
    grace period then waits for it (0.8 s seen)."""
    from pyvhost.devices.net.device import NetDevice
    from pyvhost.memory.table import RegionTable
    from pyvhost.ring import kernels as K
    from pyvhost.ring.direct_map import NO_VIEWS
    from pyvhost.ring.split_queue import SplitQueue
    dev = NetDevice()
    q = SplitQueue(1)
    q.set_size(1)
    dev.on_queue_started(q)
    table = RegionTable()
    dev.process_burst(q, table, table.kernel(), NO_VIEWS)
    K.enable_notification(table.kernel(), q.q, NO_VIEWS)
    K.disable_notification(table.kernel(), q.q, NO_VIEWS)


class DaemonThread:
    """`Server(device_factory, path)` serving in a daemon thread until `stop()` (the net
    device by default, its kernels loaded first)."""

    def __init__(self, path: str, device_factory: Callable[[], Device] | None = None,
                 options: BackendOptions = BackendOptions()) -> None:
        if device_factory is None:
            from pyvhost.devices.net.device import NetDevice
            warm_up_net()
            device_factory = NetDevice
        self.path = path
        self.server = Server(device_factory, path, options=options)
        self.thread = threading.Thread(target=self.server.serve_forever, name="daemon",
                                       daemon=True)
        self.thread.start()
        if not self.server.listening.wait(TIMEOUT):
            raise RuntimeError("daemon did not start listening")

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def wait_idle(self, connections: int, timeout: float = TIMEOUT) -> None:
        """Until `connections` sessions have been accepted and the last one is torn down."""
        end = time.monotonic() + timeout
        while self.server.connections < connections or self.server.current is not None:
            if time.monotonic() > end:
                raise TimeoutError(f"daemon not idle after {connections} connections "
                                   f"(has {self.server.connections}, current "
                                   f"{self.server.current is not None})")
            if not self.alive:
                raise RuntimeError("daemon thread died")
            time.sleep(0.001)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise RuntimeError("daemon did not stop")

    def __enter__(self) -> "DaemonThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CountingHandler(logging.Handler):
    """Counts log records by level instead of printing them (fuzzers make thousands)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: dict[str, int] = {}
        self.samples: dict[str, str] = {}
        self.errors: dict[str, int] = {}  # ERROR messages, digits masked, by count

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1
        if record.levelno >= logging.ERROR:
            key = re.sub(r"0x[0-9a-f]+|\d+", "N", record.getMessage())[:120]
            self.errors[key] = self.errors.get(key, 0) + 1
        if record.levelno >= logging.ERROR and record.exc_info:
            # An internal error (a traceback) is what robustness runs look for.
            self.samples.setdefault(record.getMessage()[:200], self.format(record)[-2000:])


def quiet_pyvhost_logs() -> tuple[CountingHandler, Callable[[], None]]:
    """Route pyvhost's log records to a counter; returns (counter, restore)."""
    logger = logging.getLogger("pyvhost")
    handler = CountingHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    old = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]

    return handler, restore


# -- SeqSink: a device that checks sequence-numbered frames -------------------------------------

# Frame layout after the 12-byte virtio-net header: magic u64, seq u64, seq ^ SEQ_XOR u64, then
# filler bytes (seq + i) & 0xFF for i in 24 .. frame_len(seq) - 1.
NET_HDR = 12
MAGIC = 0x2154534F48565950  # b"PYVHOST!" little-endian
SEQ_XOR = 0x5A5A5A5A5A5A5A5A
MAX_FRAME = 64 + 192
_FILL = bytes(range(256)) * 3

# SeqSink state slots (int64 array).
S_EXPECTED, S_OK, S_LOST, S_DUP, S_STALE, S_BYTES = 0, 1, 2, 3, 4, 5
STATE_LEN = 8


def frame_len(seq: int) -> int:
    return 64 + (seq * 7) % 193


def make_frame(seq: int) -> bytes:
    n = frame_len(seq)
    start = (seq + 24) & 0xFF
    return (MAGIC.to_bytes(8, "little") + seq.to_bytes(8, "little")
            + (seq ^ SEQ_XOR).to_bytes(8, "little") + _FILL[start:start + n - 24])


def _compile_seq_kernel():
    import numpy as np
    from numba import njit

    from pyvhost.ring import kernels as K

    @njit(nogil=True, cache=True)
    def u64(buf, off):
        v = np.int64(0)
        for k in range(8):
            v |= np.int64(buf[off + k]) << (8 * k)
        return v

    @njit(nogil=True, cache=True)
    def check_frame(buf, got, st):
        """One frame: count it as in order, lost-before, duplicate or stale/corrupt."""
        f = NET_HDR
        if got < f + 24:
            st[S_STALE] += 1
            st[S_EXPECTED] += 1
            return
        seq = u64(buf, f + 8)
        if u64(buf, f) != MAGIC or u64(buf, f + 16) != seq ^ SEQ_XOR:
            st[S_STALE] += 1
            st[S_EXPECTED] += 1
            return
        n = 64 + (seq * 7) % 193
        if got != f + n:
            st[S_STALE] += 1
            st[S_EXPECTED] += 1
            return
        for i in range(24, n):
            if buf[f + i] != (seq + i) & 0xFF:
                st[S_STALE] += 1
                st[S_EXPECTED] += 1
                return
        exp = st[S_EXPECTED]
        if seq == exp:
            st[S_OK] += 1
            st[S_EXPECTED] = seq + 1
        elif seq > exp:
            st[S_LOST] += seq - exp
            st[S_OK] += 1
            st[S_EXPECTED] = seq + 1
        else:
            st[S_DUP] += 1
        st[S_BYTES] += n

    @njit(nogil=True, cache=True)
    def seq_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len, seg_flags,
                  buf, st):
        """Pop a burst, check each frame, complete the chains (used len 0), publish once.
        Returns (chains done or -1, interrupt?, chains still pending)."""
        n = K.pop_burst(mem, q, views, max_chains, heads, chain_end, seg_addr, seg_len,
                        seg_flags)
        if n < 0:
            return -1, False, 0
        if n == 0:
            return 0, False, 0
        start = 0
        for k in range(n):
            got = 0
            for j in range(start, chain_end[k]):
                if seg_flags[j] != 0:
                    break
                take = min(seg_len[j], buf.shape[0] - got)
                if take > 0 and not K.copy_from_guest(mem, seg_addr[j], buf[got:], take):
                    got = -1
                    break
                got += take
            check_frame(buf, got, st)
            if not K.add_used(mem, q, views, heads[k], 0):
                return -1, False, 0
            start = chain_end[k]
        if not K.publish_used(mem, q, views):
            return -1, False, 0
        notify = K.needs_interrupt(mem, q, views)
        idx, ok = K.read_avail_idx(mem, q, views)
        pending = (idx - q[K.Q_NEXT_AVAIL]) & 0xFFFF if ok else 0
        return n, notify, pending

    return seq_burst


_SEQ_BURST = None


class SeqSink(Device):
    """TX sink on queue 0 that checks every frame's sequence number and payload (frames from
    `make_frame`, sent in order on one queue), and measures data-path stalls: the longest
    time from a burst that left chains pending to the next burst that made progress."""

    name = "seqsink"
    num_queues = 1
    max_queue_size = 1024

    def __init__(self, max_burst: int = 64) -> None:
        import numpy as np

        from pyvhost.ring.layout import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                                         VIRTIO_RING_F_INDIRECT_DESC)
        global _SEQ_BURST
        super().__init__()
        self.device_features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
                                | (1 << VIRTIO_RING_F_INDIRECT_DESC))
        if _SEQ_BURST is None:
            _SEQ_BURST = _compile_seq_kernel()
        self._burst = _SEQ_BURST
        self.max_burst = max_burst
        self.state = np.zeros(STATE_LEN, np.int64)
        self.state[S_EXPECTED] = 1  # sequence numbers start at 1
        self.heads = np.zeros(max_burst, np.int64)
        self.chain_end = np.zeros(max_burst, np.int64)
        segs = max_burst * 4 + 1024
        self.seg_addr = np.zeros(segs, np.int64)
        self.seg_len = np.zeros(segs, np.int64)
        self.seg_flags = np.zeros(segs, np.int64)
        self.buf = np.zeros(NET_HDR + MAX_FRAME + 64, np.uint8)
        self.bursts = 0
        self.max_stall = 0.0
        self.stalls_over_1ms = 0
        self._pending_since: float | None = None

    def process_burst(self, queue, table, mem, views):
        t0 = time.perf_counter()
        done, notify, pending = self._burst(mem, queue.q, views, self.max_burst, self.heads,
                                            self.chain_end, self.seg_addr, self.seg_len,
                                            self.seg_flags, self.buf, self.state)
        self.bursts += 1
        if done > 0 and self._pending_since is not None:
            stall = t0 - self._pending_since
            if stall > self.max_stall:
                self.max_stall = stall
            if stall > 1e-3:
                self.stalls_over_1ms += 1
            self._pending_since = None
        if pending > 0 and self._pending_since is None:
            self._pending_since = time.perf_counter()
        return max(int(done), 0), bool(notify)

    def warm_up(self) -> None:
        """Load (or compile) the burst kernel and the ring calls the worker makes itself
        before a frontend arrives: a first round that compiles or loads them holds the worker
        inside its epoch (a grace period waits) for up to a second."""
        from pyvhost.ring import kernels as K
        from pyvhost.testing.guest_ram import GuestRam
        from pyvhost.testing.driver import MockSplitQueue
        from pyvhost.testing.pairing import backend_memory, device_queue

        with GuestRam([(0, 1 << 20)]) as ram:
            driver = MockSplitQueue(ram, 8)
            memory = backend_memory(ram)
            for path in ("direct", "copy"):
                q = device_queue(driver, memory, metadata_access=path)
                table = memory.table
                views = q.round_views(table)
                state = self.state.copy()
                self._burst(table.kernel(), q.q, views, 1, self.heads, self.chain_end,
                            self.seg_addr, self.seg_len, self.seg_flags, self.buf, state)
                K.disable_notification(table.kernel(), q.q, views)
                K.enable_notification(table.kernel(), q.q, views)
                del views
                q.drop_views()
                memory.remove_listener(q.on_memory_change)
            memory.close()

    def stats(self):
        st = self.state
        return {"frames_ok": int(st[S_OK]), "frames_lost": int(st[S_LOST]),
                "frames_dup": int(st[S_DUP]), "frames_stale": int(st[S_STALE]),
                "next_expected": int(st[S_EXPECTED]), "bursts": self.bursts,
                "max_stall_s": self.max_stall, "stalls_over_1ms": self.stalls_over_1ms}


# -- the churn frontend (runs in its own process) --------------------------------------------------

MiB = 1 << 20
GPA_A, GPA_B, GPA_R = 0x0, 0x1000_0000, 0x4000_0000
SIZE_A = SIZE_B = 4 * MiB
SIZE_R = MiB
GPA_ALIAS = 0x5000_0000          # the ring region mapped a second time, elsewhere
USER_ALIAS = 0x2000_0000_0000    # ... at this frontend user address
SLOT, SLOTS, SLOT_BASE = 512, 1024, 0x10000
CHURN_OPS = ("vring_addr_alias", "vring_addr_home", "rem_alias", "add_alias", "rem_buffers",
             "add_buffers", "set_mem_table")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    pick = lambda p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    return {"n": len(v), "p50_us": round(pick(0.50) * 1e6, 1),
            "p99_us": round(pick(0.99) * 1e6, 1), "max_us": round(v[-1] * 1e6, 1)}


class ChurnFrontend:
    """Full-rate sequence-numbered TX on queue 0 of a SeqSink daemon while the memory map
    churns. Buffers alternate between region A (always mapped) and region B (removed and
    re-added with *new* memory each cycle, once no chain in flight uses it); the rings live in
    region R, which is also mapped a second time as an alias (same memfd, other GPA and user
    address) so SET_VRING_ADDR can move them between the two under traffic, and the alias
    can be removed and re-added while the rings are at home. SET_MEM_TABLE re-sends the whole
    table with new fds for the same memory. Every request's round trip is timed."""

    def __init__(self, path: str, *, qsize: int = 256, seed: int = 1,
                 timeout: float = TIMEOUT) -> None:
        import random

        from pyvhost.protocol import MemoryRegionDesc
        from pyvhost.protocol import ProtocolFeature as P
        from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
        from pyvhost.testing.driver import MockSplitQueue
        from pyvhost.testing.frontend import VhostUserFrontend
        from pyvhost.testing.guest_ram import GuestRam

        self.rng = random.Random(seed)
        self.timeout = timeout
        self.ram = GuestRam()
        self.ram.add_region(GPA_A, SIZE_A).add_region(GPA_B, SIZE_B).add_region(GPA_R, SIZE_R)
        self.user_b = self.ram.region(GPA_B).userspace_addr
        self.fe = VhostUserFrontend(path, timeout=timeout)
        self.fe.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                          P.REPLY_ACK.mask | P.CONFIGURE_MEM_SLOTS.mask)
        self.fe.set_mem_table(self.ram)
        r = self.ram.region(GPA_R)
        self.alias = MemoryRegionDesc(GPA_ALIAS, SIZE_R, USER_ALIAS, r.mmap_offset)
        self._add_alias()
        self.driver = MockSplitQueue(self.ram, qsize, region=GPA_R, event_idx=True)
        self.fe.setup_queue(0, self.driver, kick=True, call=False)
        self.fe.enable_queue(0)
        import numpy as np
        self._used_idx_np: np.ndarray | None = np.frombuffer(
            self.ram.region(GPA_R).mm, np.uint16, 1, self.driver.used_ring - GPA_R + 2)
        self.seq = 1
        self.free = {GPA_A: list(range(SLOTS)), GPA_B: list(range(SLOTS))}
        self.chain_slot: dict[int, tuple[int, int]] = {}
        self.in_flight_b = 0
        self.b_usable = True
        self.alias_mapped = True
        self.rtts: dict[str, list[float]] = {op: [] for op in CHURN_OPS}
        self.drain_waits: list[float] = []
        self.op_times: list[tuple[float, float]] = []
        self.max_driver_stall = 0.0
        self._last_progress = time.perf_counter()
        self._turn = 0
        self._last_op = ""

    def close(self) -> None:
        self._used_idx_np = None
        self.fe.close()
        self.ram.close()

    # -- traffic -------------------------------------------------------------------------------

    def pump(self) -> None:
        """Reap completions, then fill the ring with new frames; publish and kick once."""
        d = self.driver
        now = time.perf_counter()
        used_idx = self._used_idx_np
        assert used_idx is not None, "pump after close"
        before = int(used_idx[0])
        try:
            done = d.used()
        except Exception as exc:
            raise RuntimeError(f"{exc}; atomic read just before: {before}, just after: "
                               f"{int(used_idx[0])}; {self._diagnose()}") from exc
        if done or not d.in_flight:
            self._last_progress = now
        elif now - self._last_progress > self.max_driver_stall:
            self.max_driver_stall = now - self._last_progress
        for head, _ in done:
            region, slot = self.chain_slot.pop(head)
            self.free[region].append(slot)
            if region == GPA_B:
                self.in_flight_b -= 1
        added = 0
        hdr = bytes(NET_HDR)
        while d.num_free >= 2 and added < 64:
            self._turn += 1
            region = GPA_B if (self._turn & 1 and self.b_usable and self.free[GPA_B]) \
                else GPA_A
            if not self.free[region]:
                break
            slot = self.free[region].pop()
            gpa = region + SLOT_BASE + SLOT * slot
            frame = make_frame(self.seq)
            if self._turn % 3 == 0:  # header and frame in two descriptors
                self.ram.write(gpa, hdr)
                self.ram.write(gpa + 64, frame)
                head = d.add_buffers([(gpa, NET_HDR, False), (gpa + 64, len(frame), False)])
            else:
                self.ram.write(gpa, hdr + frame)
                head = d.add_buffers([(gpa, NET_HDR + len(frame), False)])
            self.chain_slot[head] = (region, slot)
            if region == GPA_B:
                self.in_flight_b += 1
            self.seq += 1
            added += 1
        if added:
            d.publish()
            if d.needs_kick():
                self.fe.kick(0)

    def _diagnose(self) -> str:
        """What the rings hold when the driver sees something impossible (for the report)."""
        import struct as _s
        d = self.driver
        first = d.used_idx()
        time.sleep(0.001)
        second = d.used_idx()
        n = (first - d.last_used) & 0xFFFF
        ids = [_s.unpack("<II", self.ram.read(d.used_ring + 4 + 8 * ((d.last_used + k) % d.size),
                                              8)) for k in range(min(n, d.size))]
        in_flight = set(d._in_flight)
        foreign = [(k, i) for k, (i, _) in enumerate(ids) if i not in in_flight]
        avail_idx = _s.unpack("<H", self.ram.read(d.avail_ring + 2, 2))[0]
        return (f"used idx {first} then {second}, last_used {d.last_used}, in flight "
                f"{len(in_flight)}, published avail {d.published_avail} (ring {avail_idx}), "
                f"next avail {d.next_avail}, seq {self.seq}, ops so far "
                f"{sum(map(len, self.rtts.values()))}, last op {self._last_op}, used ids not in "
                f"flight (position, id): {foreign[:20]}, first ids {ids[:8]}")

    # -- churn operations ----------------------------------------------------------------------

    def _timed(self, op: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        self.rtts[op].append(t1 - t0)
        self.op_times.append((t0, t1))  # CLOCK_MONOTONIC: comparable with the daemon's

    def _add_alias(self) -> None:
        from pyvhost.protocol import FrontendRequest as R
        from pyvhost.protocol import SingleMemRegion
        self.fe.request(R.ADD_MEM_REG, SingleMemRegion(self.alias),
                        [self.ram.region(GPA_R).fd], need_reply=True)

    def _alias_addrs(self):
        from pyvhost.testing.driver import RingAddresses
        d = self.driver
        return RingAddresses(*(USER_ALIAS + (g - GPA_R)
                               for g in (d.desc_table, d.avail_ring, d.used_ring)))

    def op(self, name: str) -> None:
        from pyvhost.protocol import FrontendRequest as R
        from pyvhost.protocol import MemoryRegionDesc, MemoryTable, SingleMemRegion
        fe = self.fe
        self._last_op = name
        if name == "vring_addr_alias":
            self._timed(name, lambda: fe.set_vring_addr(0, self._alias_addrs()))
        elif name == "vring_addr_home":
            self._timed(name, lambda: fe.set_vring_addr(0))
        elif name == "rem_alias":
            self._timed(name, lambda: fe.request(R.REM_MEM_REG, SingleMemRegion(self.alias),
                                                 need_reply=True))
            self.alias_mapped = False
        elif name == "add_alias":
            self._timed(name, self._add_alias)
            self.alias_mapped = True
        elif name == "rem_buffers":
            # Stop using B and let the chains in flight there complete (A keeps flowing).
            self.b_usable = False
            t0 = time.perf_counter()
            while self.in_flight_b:
                if time.perf_counter() - t0 > self.timeout:
                    raise TimeoutError(f"{self.in_flight_b} chains in region B never completed")
                self.pump()
            self.drain_waits.append(time.perf_counter() - t0)
            self._timed(name, lambda: fe.rem_mem_reg(self.ram, GPA_B))
            # New, zeroed memory at the same addresses: a stale mapping would show old frames.
            self.ram.remove_region(GPA_B)
            self.ram.add_region(GPA_B, SIZE_B, userspace_addr=self.user_b)
        elif name == "add_buffers":
            self._timed(name, lambda: fe.add_mem_reg(self.ram, GPA_B))
            self.b_usable = True
        elif name == "set_mem_table":
            regions, fds = [], []
            for fd, gpa, size, uaddr, off in self.ram.region_specs(owned=True):
                regions.append(MemoryRegionDesc(gpa, size, uaddr, off))
                fds.append(fd)
            if self.alias_mapped:
                regions.append(self.alias)
                fds.append(self.ram.reopen_region(GPA_R))
            try:
                self._timed(name, lambda: fe.request(R.SET_MEM_TABLE, MemoryTable(
                    tuple(regions)), fds, need_reply=True))
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            raise ValueError(name)

    trace = False

    def run(self, ops: int, pumps_per_op: int = 3) -> dict:
        start = time.perf_counter()
        for n in range(ops):
            for _ in range(pumps_per_op):
                self.pump()
            self.op(CHURN_OPS[n % len(CHURN_OPS)])
        # Drain: every frame sent must come back.
        t0 = time.perf_counter()
        while self.driver.in_flight:
            if time.perf_counter() - t0 > self.timeout:
                raise TimeoutError(f"{self.driver.in_flight} chains never completed")
            time.sleep(0.0005)
            self.pump_reap_only()
        elapsed = time.perf_counter() - start
        base = self.fe.get_vring_base(0)
        sent = self.seq - 1
        all_rtts = [x for v in self.rtts.values() for x in v]
        return {"frames_sent": sent, "vring_base": base,
                "vring_base_matches": base == sent & 0xFFFF, "ops": sum(map(len,
                                                                              self.rtts.values())),
                "seconds": round(elapsed, 2), "frames_per_s": round(sent / elapsed),
                "rtt_all": percentiles(all_rtts),
                "rtt_by_op": {k: percentiles(v) for k, v in self.rtts.items()},
                "buffer_drain_wait": percentiles(self.drain_waits),
                "max_driver_stall_us": round(self.max_driver_stall * 1e6, 1),
                "op_times": self.op_times if self.trace else None}

    def pump_reap_only(self) -> None:
        for head, _ in self.driver.used():
            region, slot = self.chain_slot.pop(head)
            self.free[region].append(slot)
            if region == GPA_B:
                self.in_flight_b -= 1


# -- a frontend that only sends (fuzz/disconnect.py kills it) -------------------------------------

def traffic_frontend(path: str, ready, seed: int = 0) -> None:
    """Negotiate with a net daemon, map memory, start TX queue 1, signal `ready` (a
    multiprocessing connection) once frames flow, and send at full rate until killed."""
    from pyvhost.protocol import ProtocolFeature as P
    from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
    from pyvhost.testing.driver import MockSplitQueue
    from pyvhost.testing.frontend import VhostUserFrontend
    from pyvhost.testing.guest_ram import GuestRam

    frame = bytes(12) + b"\x02" * 12 + b"\x08\x00" + bytes([0x45]) + bytes(8) + b"\x11" + \
        bytes(30)
    ram = GuestRam([(0, 4 * MiB), (1 << 30, MiB)])
    fe = VhostUserFrontend(path, timeout=TIMEOUT)
    fe.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                 P.REPLY_ACK.mask | P.CONFIGURE_MEM_SLOTS.mask | P.MQ.mask)
    fe.set_mem_table(ram)
    fe.setup_queue(1, MockSplitQueue(ram, 256, event_idx=True))
    fe.enable_queue(1)
    fe.send_frames(1, [frame] * 64)
    fe.wait_tx_done(1)
    ready.send(True)
    while True:
        fe.send_frames(1, [frame] * 64)


def main(argv: list[str] | None = None) -> int:
    """`python -m pyvhost.testing.churn frontend --path P --ops N`: run a ChurnFrontend and
    print its figures as JSON (fuzz/churn.py runs this in a subprocess)."""
    import argparse
    import json
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("frontend",))
    ap.add_argument("--path", required=True)
    ap.add_argument("--ops", type=int, default=700)
    ap.add_argument("--qsize", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pumps-per-op", type=int, default=3)
    ap.add_argument("--trace", action="store_true", help="report each request's send/reply time")
    args = ap.parse_args(argv)
    fe = ChurnFrontend(args.path, qsize=args.qsize, seed=args.seed)
    fe.trace = args.trace
    try:
        result = fe.run(args.ops, args.pumps_per_op)
    finally:
        fe.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def clean_session(path: str, frames: int = 32, timeout: float = TIMEOUT) -> None:
    """A well-behaved net session: negotiate, map memory, send `frames` on TX queue 1, wait
    for them all to complete, stop the ring, close."""
    from pyvhost.protocol import ProtocolFeature as P
    from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
    from pyvhost.testing.driver import MockSplitQueue
    from pyvhost.testing.frontend import VhostUserFrontend
    from pyvhost.testing.guest_ram import GuestRam

    with GuestRam([(0, 2 * MiB)]) as ram, VhostUserFrontend(path, timeout=timeout) as fe:
        fe.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                     P.REPLY_ACK.mask | P.MQ.mask)
        fe.set_mem_table(ram)
        fe.setup_queue(1, MockSplitQueue(ram, 64, event_idx=True))
        fe.enable_queue(1)
        fe.send_frames(1, [bytes(60)] * frames)
        fe.wait_tx_done(1)
        base = fe.get_vring_base(1)
        if base != frames:
            raise AssertionError(f"GET_VRING_BASE {base} after {frames} frames")
