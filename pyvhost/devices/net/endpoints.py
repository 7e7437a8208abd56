"""Where a NetDevice's frames go and come from: TX sinks other than drop, and RX sources.

    TX sinks:   drop (device.py's compiled drop kernel), tap:NAME, pcap:FILE
    RX sources: tap:NAME (frames the host sends through the TAP), loopback (what the guest
                transmits comes back to it), gen:SIZE (a traffic generator: the guest
                receives SIZE-byte UDP frames as fast as it posts buffers)

Queue pair k (RX ring 2k, TX ring 2k+1) has:
- TX to a TAP alone: `tap_kernels.tap_tx_poll` (compiled) pops bursts of TX chains and writes
  each chain's buffers to TAP fd k straight from guest memory: a burst's writes in one
  io_uring_enter(2) through the TX ring's own io_uring (`tap_io` "uring"; "auto" picks it
  where the host allows io_uring), or one writev(2) a frame ("writev");
- TX looped back alone: `loop_kernels.loop_tx_poll` (compiled) copies each TX chain straight
  into RX backlog k and signals the RX side's wake-up eventfd once per call; when one worker
  serves both rings of the pair, `loop_kernels.loop_pair_poll` copies and delivers in one
  loop instead (`process_loop_pair`, called through `NetDevice.process_pair`);
- TX to other sinks: a TX *scratch* frame ring: `tx_gather` (compiled) pops a burst of TX
  chains, copies header + frame into slots and completes the chains; then the sink takes the
  slots: one pcap write per burst, a copy into RX backlog k (loopback), and/or one write(2)
  per frame to TAP fd k from compiled code (`ring_to_fd`);
- an RX *backlog* frame ring (bounded, `rx_backlog` frames): frames wait there until the guest
  has buffers; a frame arriving at a full backlog is dropped and counted (rx_dropped).

The backlog is the only queue between a TX ring and the RX ring it loops back to (they may be
served by different workers), so a TX burst larger than the free backlog overflows it even if
the guest has buffers; the default (1024 frames) holds four full bursts.

RX runs in the worker that serves RX ring 2k, in `process_rx`; from a TAP, all of it compiled
(`tap_kernels.tap_rx_poll`, no Python per frame): deliver the backlog into the guest's buffers
(`rx_deliver`), read(2) the TAP (non-blocking) into the backlog, deliver again; only when the backlog is still full after that (the guest has no buffers) are
further TAP frames read and dropped, at most a burst per call, so the TAP fd does not stay
readable and wake the worker in a loop. No frame is lost or reordered while the guest has
buffers. The worker's idle poll waits on `extra_wait_fds(2k)`: TAP fd k, or for loopback an
eventfd the TX side signals after queueing frames (the two rings may be on different workers).
Loopback's RX side (`loop_kernels.loop_rx_poll`) clears that eventfd and delivers the backlog,
compiled too. When the guest refills its RX ring it kicks, the worker runs `process_rx`, and waiting frames
go in.

The generator (`gen:SIZE`, the counterpart of DPDK testpmd's txonly for benchmarks) is an RX
backlog whose every slot holds the same frame (`generated_frame`) and that never runs dry:
before each delivery its tail is set a whole ring ahead of its head. Delivery only rewrites
the slot's virtio-net header, so the frame bytes stay valid; each frame costs one copy into
the guest, as DPDK's txonly mbufs do. It needs no wake-up fd: the guest's kick for new
buffers is the only thing it waits for.

TAPs, pcap files and the loopback wake-up eventfds belong to an `Endpoints` object that
outlives connections (the CLI opens them once; each connection's device uses them).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.devices.net import loop_kernels as LK
from pyvhost.devices.net import offloads as OFF
from pyvhost.devices.net import tap_kernels as TK
from pyvhost.devices.net import tx_drop as NK
from pyvhost.devices.net.pcap import PcapWriter
from pyvhost.devices.net.tap import Tap
from pyvhost.fd import OwnedFd
from pyvhost.memory.table import KernelMemory
from pyvhost.ring import uring as U
from pyvhost.ring.direct_map import NO_VIEWS, RingViews
from pyvhost.ring.jit import overload_entry
from pyvhost.ring.poll import PollWindow, one_pass_window
from pyvhost.ring.split_queue import SplitQueue

log = logging.getLogger(__name__)

SINK_KINDS = ("drop", "tap", "pcap")
SOURCE_KINDS = ("tap", "loopback", "gen")
DEFAULT_MTU = 1500
DEFAULT_RX_BACKLOG = 1024
# Ethernet header + one VLAN tag on top of the MTU (802.1Q).
L2_OVERHEAD = 18
# gen:SIZE: Ethernet + IPv4 + UDP headers, the smallest frame it makes.
GEN_MIN_SIZE = 14 + 20 + 8
TAP_IO_MODES = ("auto", "uring", "writev")
# SQEs of a TX ring's io_uring: a TAP TX burst's writes (TAP_TX_BURST) with room to spare.
TAP_URING_ENTRIES = 64


@dataclass(frozen=True)
class Endpoint:
    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


_ARG_NAMES = {"tap": "NAME", "pcap": "FILE", "gen": "SIZE"}


def parse_endpoint(spec: str, kinds: tuple[str, ...]) -> Endpoint:
    """'drop', 'loopback', 'tap:NAME', 'pcap:FILE' or 'gen:SIZE' (as allowed by `kinds`)."""
    kind, sep, arg = spec.partition(":")
    if kind not in kinds:
        raise ValueError(f"unknown {spec!r} (have: {', '.join(kinds)})")
    needs_arg = kind in _ARG_NAMES
    if needs_arg and not arg:
        what = "a size" if kind == "gen" else "a name"
        raise ValueError(f"{kind} needs {what}: {kind}:{_ARG_NAMES[kind]}")
    if kind == "gen" and not (arg.isdigit() and int(arg) >= GEN_MIN_SIZE):
        raise ValueError(f"{spec!r}: SIZE must be a whole number of bytes, at least "
                         f"{GEN_MIN_SIZE} (Ethernet + IPv4 + UDP headers)")
    if not needs_arg and sep:
        raise ValueError(f"{kind} takes no argument ({spec!r})")
    return Endpoint(kind, arg if needs_arg else None)


def generated_frame(size: int, mac: bytes = b"\xff" * 6) -> bytes:
    """The frame gen:SIZE sends: Ethernet to `mac` (broadcast by default) from a locally
    administered address, IPv4 198.18.0.1 -> 198.18.0.2 (RFC 2544's benchmark range) with a
    valid header checksum, UDP to the discard port 9 (no checksum, allowed over IPv4), and a
    payload of bytes counting up: `size` bytes in all (no FCS, as DPDK's txonly)."""
    if size < GEN_MIN_SIZE:
        raise ValueError(f"a generated frame needs at least {GEN_MIN_SIZE} bytes, not {size}")
    ip_len = size - 14
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0x4000, 64, 17, 0,
                               bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2))))
    ip[10:12] = struct.pack("!H", _ip_checksum(bytes(ip)))
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    payload = bytes(i & 0xFF for i in range(ip_len - 28))
    return bytes(mac) + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(ip) + udp + payload


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def slot_size(mtu: int) -> int:
    """Bytes of one frame-ring slot: virtio-net header + the largest frame, in an odd number
    of 64-byte lines. Why odd: a small frame touches only its slot's first lines, and with a
    stride of an even number of lines (1536 bytes for MTU 1500: 24) those fall in an eighth
    of the CPU cache's sets, so a ring of 1024 slots evicts itself; an odd stride spreads
    them over every set."""
    lines = (RK.HDR + mtu + L2_OVERHEAD + 63) // 64
    return (lines | 1) * 64


class FrameRing:
    """A bounded SPSC ring of frames (see frame_kernels), with the Python-side producer and
    consumer that talk to fds."""

    def __init__(self, capacity: int, slot: int) -> None:
        self.data, self.lens, self.ctl = RK.new_ring(capacity, slot)
        self.capacity = len(self.lens)
        self.slot = slot
        self._views = [memoryview(self.data[i]) for i in range(self.capacity)]

    @property
    def pending(self) -> int:
        return int(self.ctl[RK.R_TAIL] - self.ctl[RK.R_HEAD])

    @property
    def full(self) -> bool:
        return self.pending >= self.capacity

    @property
    def dropped(self) -> int:
        return int(self.ctl[RK.R_FULL_DROPS] + self.ctl[RK.R_OVERSIZE_DROPS])

    @classmethod
    def repeating(cls, frame: bytes, capacity: int, slot: int) -> "FrameRing":
        """A ring whose every slot holds `frame` behind a zero virtio-net header; the generator
        source (`rx_generate_poll`) makes it full again without writing a byte."""
        ring = cls(capacity, slot)
        ring.data[:, RK.HDR:RK.HDR + len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        ring.lens[:] = RK.HDR + len(frame)
        return ring

    def clear(self) -> None:
        """Forget pending frames (consumer side: only the consumer, or with both stopped)."""
        self.ctl[RK.R_HEAD] = self.ctl[RK.R_TAIL]


# Frames a TAP may hold when a receive ring starts (its queue is 1000 frames by default).
STALE_DRAIN_LIMIT = 4096


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.error("%s", message)


class Endpoints:
    """TAPs, pcap files and loopback wake-up eventfds, shared by the devices of successive
    connections of one daemon. `close()` when the daemon exits."""

    def __init__(self) -> None:
        self.taps: dict[str, Tap] = {}
        self.pcaps: dict[str, PcapWriter] = {}
        self._wakes: dict[int, OwnedFd] = {}

    def open(self, sink: Endpoint, source: Endpoint | None, queue_pairs: int,
             mtu: int | None) -> None:
        """Open what `sink` and `source` name now, so that errors show at start-up."""
        for ep in (sink, source):
            if ep is not None and ep.kind == "tap":
                self.tap(ep.arg, queue_pairs, mtu)  # type: ignore[arg-type]
            elif ep is not None and ep.kind == "pcap":
                self.pcap(ep.arg)  # type: ignore[arg-type]

    def tap(self, name: str, queues: int, mtu: int | None) -> Tap:
        tap = self.taps.get(name)
        if tap is None:
            tap = self.taps[name] = Tap(name, queues, mtu)
        elif tap.queues < queues:
            raise ValueError(f"TAP {name} is open with {tap.queues} queues, {queues} needed")
        return tap

    def pcap(self, path: str) -> PcapWriter:
        writer = self.pcaps.get(path)
        if writer is None:
            writer = self.pcaps[path] = PcapWriter(path)
        return writer

    def wake_fd(self, pair: int) -> int:
        fd = self._wakes.get(pair)
        if fd is None:
            fd = self._wakes[pair] = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        return fd.fileno()

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()
        for writer in self.pcaps.values():
            writer.close()
        for fd in self._wakes.values():
            fd.close()
        self.taps.clear()
        self.pcaps.clear()
        self._wakes.clear()


class _Segments:
    """Scratch arrays a burst fills (allocated per queue size, reused every burst)."""

    def __init__(self, max_burst: int) -> None:
        self.max_burst = max_burst
        self.resize(256)

    def resize(self, queue_size: int) -> None:
        segs = self.max_burst * 4 + max(queue_size, 1024)
        self.seg_addr = np.zeros(segs, dtype=np.int64)
        self.seg_len = np.zeros(segs, dtype=np.int64)
        self.seg_flags = np.zeros(segs, dtype=np.int64)
        self.chain_heads = np.zeros(max(queue_size, self.max_burst), dtype=np.int64)
        self.chain_ends = np.zeros(max(queue_size, self.max_burst), dtype=np.int64)
        self.hosts = np.zeros(max(queue_size, self.max_burst), dtype=np.int64)  # tx_gather's
        self.iov = np.zeros(2 * TK.IOV_MAX, dtype=np.int64)   # struct iovec[IOV_MAX]
        self.frame = np.zeros(NK.HEADER_BYTES, dtype=np.uint8)  # headers to classify


class _TapWrites:
    """How one TX ring writes to its TAP: its own io_uring (set up when the ring starts, closed
    when it stops: one worker at a time serves a ring), or, with `uring` None, writev(2), for
    which the kernel gets placeholder arrays whose fd is -1."""

    def __init__(self, uring: U.Uring | None = None) -> None:
        self.uring = uring
        if uring is None:
            self.ur = np.full(U.UR_LEN, -1, dtype=np.int64)
            self.sqes = np.zeros(U.SQE_WORDS, dtype=np.uint64)
            self.cqes = np.zeros(U.CQE_WORDS, dtype=np.int64)
        else:
            self.ur, self.sqes, self.cqes = uring.ur, uring.sqes, uring.cqes
        self.cq_user = np.zeros(TAP_URING_ENTRIES, dtype=np.int64)
        self.cq_res = np.zeros(TAP_URING_ENTRIES, dtype=np.int64)

    def close(self) -> None:
        if self.uring is not None:
            self.uring.close()


def resolve_tap_io(mode: str) -> str:
    """"uring" or "writev" for a `tap_io` setting; ValueError if "uring" cannot be had."""
    if mode not in TAP_IO_MODES:
        raise ValueError(f"TAP I/O {mode!r}: not one of {', '.join(TAP_IO_MODES)}")
    if mode == "writev":
        return mode
    ok, why = U.available()
    if ok:
        return "uring"
    if mode == "uring":
        raise ValueError(f"TAP I/O uring: io_uring is not available here ({why})")
    log.info("io_uring not available (%s): TAP writes use writev(2)", why)
    return "writev"


class NetIo:
    """The TX sink and RX source of one NetDevice (see the module doc)."""

    def __init__(self, queue_pairs: int, sink: str | Endpoint = "drop",
                 source: str | Endpoint | None = None, *, endpoints: Endpoints | None = None,
                 mtu: int | None = None, rx_backlog: int = DEFAULT_RX_BACKLOG,
                 max_burst: int = 256, tap_io: str = "auto") -> None:
        self.sink = sink if isinstance(sink, Endpoint) else parse_endpoint(sink, SINK_KINDS)
        self.source = source if source is None or isinstance(source, Endpoint) else \
            parse_endpoint(source, SOURCE_KINDS)
        if rx_backlog < 1:
            raise ValueError("the RX backlog needs room for at least one frame")
        self.queue_pairs = queue_pairs
        self.max_burst = max_burst
        self.owns_endpoints = endpoints is None
        self.endpoints = endpoints or Endpoints()
        self.slot = slot_size(mtu or DEFAULT_MTU)
        self.tap: Tap | None = None
        self.pcap: PcapWriter | None = None
        if self.sink.kind == "tap":
            self.tap = self.endpoints.tap(self.sink.arg, queue_pairs, mtu)  # type: ignore[arg-type]
        elif self.sink.kind == "pcap":
            self.pcap = self.endpoints.pcap(self.sink.arg)  # type: ignore[arg-type]
        self.rx_tap: Tap | None = None
        if self.source is not None and self.source.kind == "tap":
            self.rx_tap = self.endpoints.tap(self.source.arg, queue_pairs, mtu)  # type: ignore[arg-type]
        self.loopback = self.source is not None and self.source.kind == "loopback"
        self.generator = self.source is not None and self.source.kind == "gen"
        # TX: the drop sink without loopback keeps device.py's own kernel.
        self.gathers_tx = self.sink.kind != "drop" or self.loopback
        # Frames are gathered into a scratch ring for a pcap file, or for loopback and a TAP
        # both; a TAP alone takes them straight from guest memory (tap_kernels.tap_tx_poll),
        # loopback alone straight into the RX backlog (loop_kernels.loop_tx_poll).
        self.tx_ring = [FrameRing(max_burst, self.slot) for _ in range(queue_pairs)] \
            if self.pcap is not None or (self.loopback and self.tap is not None) else []
        # Loopback alone runs a queue pair's two rings in one loop when one worker serves both.
        self.loops_in_pairs = self.loopback and not self.tx_ring
        self.tx_segs = [_Segments(max_burst) for _ in range(queue_pairs)]
        # TAP writes straight from guest memory: io_uring or writev (per TX ring, _TapWrites).
        self.tap_io = resolve_tap_io(tap_io) if self.tap is not None and not self.tx_ring \
            else "writev"
        self.tap_writes = [_TapWrites() for _ in range(queue_pairs)]
        self._tap_uring_writes = 0  # WRITEVs submitted through rings since closed
        self.tx_extra = np.zeros((queue_pairs, RK.TX_EXTRA_LEN), dtype=np.int64)
        self.pcap_out = np.zeros(max_burst * (RK.PCAP_RECORD_HDR + self.slot), dtype=np.uint8) \
            if self.pcap is not None else np.zeros(0, dtype=np.uint8)
        # RX
        if self.generator:
            frame = generated_frame(int(self.source.arg))  # type: ignore[union-attr, arg-type]
            largest = (mtu or DEFAULT_MTU) + L2_OVERHEAD
            if len(frame) > largest:
                raise ValueError(f"gen:{len(frame)}: larger than the MTU allows "
                                 f"({largest} bytes at most)")
            self.rx_ring = [FrameRing.repeating(frame, max_burst, self.slot)
                            for _ in range(queue_pairs)]
        else:
            self.rx_ring = [FrameRing(rx_backlog, self.slot) for _ in range(queue_pairs)] \
                if self.source is not None else []
        self.rx_backlog = rx_backlog
        # Offloads (offloads.py): TX ones when the TAP takes frames straight from guest memory,
        # RX ones with a TAP source; none enabled until the driver negotiates them.
        self.offload_features = OFF.offered(self.tap if not self.tx_ring else None, self.rx_tap)
        self._tun_flags = 0
        if self.rx_tap is not None:
            self.rx_tap.set_offload(0)  # whatever a previous connection enabled
        self.rx_segs = [_Segments(max_burst) for _ in range(queue_pairs)]
        self.rx_counters = np.zeros((queue_pairs, RK.RX_COUNTERS_LEN), dtype=np.int64)
        self._wake = [self.endpoints.wake_fd(k) for k in range(queue_pairs)] \
            if self.loopback else []
        self._one = LK.eventfd_one()
        self._eventfd_scratch = np.zeros(1, dtype=np.uint64)
        self._drain_buf = np.zeros(RK.HDR + 65536, dtype=np.uint8)
        self.rx_stale = 0
        # Compiled entry points by (kernel, views kind), as NetDevice._drop keeps its own.
        self._entries: dict[tuple[str, bool], Any] = {}
        self._one_pass = one_pass_window()
        self._rx_errors_seen = 0  # RX read errors already logged
        self._tx_errors_seen = [0] * queue_pairs  # TX write errors per pair already seen

    # -- rings ---------------------------------------------------------------------------------

    def on_queue_started(self, queue: SplitQueue) -> None:
        pair = queue.index // 2
        if pair < self.queue_pairs:
            (self.tx_segs if queue.index % 2 else self.rx_segs)[pair].resize(queue.size)
            if queue.index % 2 and self.tap_io == "uring":
                self._set_tap_writes(pair, self._tap_uring(pair))
            if not queue.index % 2 and self.rx_tap is not None:
                # Frames the host sent into the TAP while no guest ring was there (before the
                # VM started, or while it migrated here) are stale: drop them, as DPDK's TAP
                # PMD does, rather than hand a guest seconds-old ARPs and MLD reports.
                self.rx_stale += int(TK.drain_fd(self.rx_tap.fds[pair], self._drain_buf,
                                                 STALE_DRAIN_LIMIT))

    def on_queue_stopped(self, queue: SplitQueue) -> None:
        pair = queue.index // 2
        if queue.index % 2 and pair < self.queue_pairs:
            self._set_tap_writes(pair, None)

    def _tap_uring(self, pair: int) -> U.Uring | None:
        try:
            return U.Uring(TAP_URING_ENTRIES)
        except OSError as exc:  # e.g. RLIMIT_MEMLOCK on an old kernel: this ring writes(2)
            _log_once(f"TX ring {2 * pair + 1}: no io_uring ({exc}); TAP writes use writev(2)")
            return None

    def _set_tap_writes(self, pair: int, uring: U.Uring | None) -> None:
        old, self.tap_writes[pair] = self.tap_writes[pair], _TapWrites(uring)
        if old.uring is not None:
            self._tap_uring_writes += int(old.ur[U.UR_SUBMITTED])
        old.close()

    def set_features(self, features: int) -> None:
        """The driver's features (rings paused or not yet started): enable the offloads it
        negotiated on the TAP source, keep the TAP's headers for it, and give the RX backlog
        64 KiB slots when GSO frames may come."""
        if self.rx_tap is None:
            return
        flags = OFF.tun_flags(features & self.offload_features)
        if flags != self._tun_flags:
            self.rx_tap.set_offload(flags)
            self._tun_flags = flags
        gso = bool(features & self.offload_features & OFF.GSO_GUEST_MASK)
        slot = slot_size(OFF.GSO_FRAME_MAX - L2_OVERHEAD) if gso else self.slot
        for pair, ring in enumerate(self.rx_ring):
            if ring.slot != slot:
                self.rx_ring[pair] = ring = FrameRing(
                    min(self.rx_backlog, 256) if gso else self.rx_backlog, slot)
            ring.ctl[RK.R_KEEP_HDR] = 1 if flags else 0

    def extra_wait_fds(self, index: int) -> tuple[int, ...]:
        if index % 2 or index // 2 >= self.queue_pairs:
            return ()
        if self.rx_tap is not None:
            return (self.rx_tap.fds[index // 2],)
        if self.loopback:
            return (self._wake[index // 2],)
        return ()

    def reset(self) -> None:
        """Device reset (every ring stopped): pending frames are forgotten."""
        for ring in self.rx_ring + self.tx_ring:
            ring.clear()

    def _call(self, name: str, dispatcher: Any, views: RingViews, args: tuple) -> Any:
        """dispatcher(*args) through its compiled entry point once known (skips numba's
        typing of every argument on every call; see ring/jit.overload_entry)."""
        key = (name, views is NO_VIEWS)
        entry = self._entries.get(key)
        if entry is None:
            result = dispatcher(*args)
            self._entries[key] = overload_entry(dispatcher, args) or dispatcher
            return result
        return entry(*args)

    def process_tx(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
                   counters: np.ndarray, window: PollWindow | None = None) -> tuple[int, bool]:
        pair = queue.index // 2
        s, extra = self.tx_segs[pair], self.tx_extra[pair]
        w = window or self._one_pass
        if not self.tx_ring and self.loopback:  # straight into RX backlog k, all compiled
            rx = self.rx_ring[pair]
            done, notify = self._call("loop_tx", LK.loop_tx_poll, views, (
                mem, queue.q, views, self._wake[pair], self.max_burst, w.cycles, w.idle_cycles,
                w.leave, s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags,
                s.hosts, rx.data, rx.lens, rx.ctl, counters, extra, self._one))
            return max(int(done), 0), bool(notify)
        if not self.tx_ring:  # a TAP is the only sink: straight from guest memory
            assert self.tap is not None
            tw = self.tap_writes[pair]
            done, notify = self._call("tap_tx", TK.tap_tx_poll, views, (
                mem, queue.q, views, self.tap.fds[pair], tw.ur, tw.sqes, tw.cqes,
                min(self.max_burst, TK.TAP_TX_BURST), w.cycles, w.idle_cycles, w.leave,
                s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags, s.iov,
                tw.cq_user, tw.cq_res, s.frame, counters, extra))
            self._check_tx_errors(pair)
            return max(int(done), 0), bool(notify)
        ring = self.tx_ring[pair]
        done, notify = RK.tx_gather(mem, queue.q, views, self.max_burst, s.chain_heads,
                                    s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags, s.hosts,
                                    ring.data, ring.lens, ring.ctl, counters, extra)
        if done <= 0:
            return 0, False
        if ring.pending:
            if self.loopback:
                rx = self.rx_ring[pair]
                RK.ring_copy(ring.data, ring.lens, ring.ctl, rx.data, rx.lens, rx.ctl)
                os.eventfd_write(self._wake[pair], 1)
            if self.pcap is not None:
                self.pcap.write_ring(ring.data, ring.lens, ring.ctl, self.pcap_out)
            if self.tap is not None:
                TK.ring_to_fd(self.tap.fds[pair], ring.data, ring.lens, ring.ctl, extra)
                self._check_tx_errors(pair)
            ring.clear()
        return int(done), bool(notify)

    def process_loop_pair(self, txq: SplitQueue, rxq: SplitQueue, mem: KernelMemory,
                          tx_views: RingViews, rx_views: RingViews, mergeable: bool,
                          counters: np.ndarray, w: PollWindow) -> tuple[int, bool, int, bool]:
        """TX ring 2k+1 looped into RX ring 2k in one compiled loop (`loops_in_pairs`; the
        worker serves both). Returns (TX chains, TX interrupt?, RX buffers, RX interrupt?)."""
        pair = txq.index // 2
        tx, rx, ring = self.tx_segs[pair], self.rx_segs[pair], self.rx_ring[pair]
        # One compiled entry per views kind of each ring (_call keys on the TX ring's).
        name = "loop_pair/rx copy" if rx_views is NO_VIEWS else "loop_pair/rx direct"
        chains, tx_notify, buffers, rx_notify = self._call(name, LK.loop_pair_poll, tx_views, (
            mem, txq.q, tx_views, rxq.q, rx_views, self._wake[pair], mergeable,
            min(self.max_burst, LK.PAIR_BURST), w.cycles, w.idle_cycles, w.leave,
            tx.chain_heads, tx.chain_ends, tx.seg_addr, tx.seg_len, tx.seg_flags, tx.hosts,
            rx.seg_addr, rx.seg_len, rx.seg_flags, rx.chain_heads, rx.chain_ends, ring.data,
            ring.lens, ring.ctl, counters, self.tx_extra[pair], self.rx_counters[pair],
            self._one))
        return max(int(chains), 0), bool(tx_notify), max(int(buffers), 0), bool(rx_notify)

    def _check_tx_errors(self, pair: int) -> None:
        # One scalar read: this runs after every TAP TX call (a numpy sum here was ~2% of a
        # core at 0.6 Mpps).
        failed = int(self.tx_extra[pair, RK.TX_WRITE_ERRORS])
        if failed != self._tx_errors_seen[pair]:
            self._tx_errors_seen[pair] = failed
            err = int(self.tx_extra[pair, RK.TX_LAST_ERRNO])
            _log_once(f"write to TAP {self.sink.arg} failed: {os.strerror(err)} (errno {err}); "
                      "such frames are dropped and counted (tx_dropped)")

    def _check_rx_errors(self, ring: FrameRing) -> None:
        failed = int(ring.ctl[RK.R_READ_ERRORS])
        if failed > self._rx_errors_seen:
            self._rx_errors_seen = failed
            err = int(ring.ctl[RK.R_LAST_ERRNO])
            _log_once(f"read from TAP {self.source.arg} failed: "  # type: ignore[union-attr]
                      f"{os.strerror(err)} (errno {err})")

    def process_rx(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
                   mergeable: bool, window: PollWindow) -> tuple[int, bool]:
        if self.source is None:
            return 0, False
        pair = queue.index // 2
        if self.loopback:
            ring, s = self.rx_ring[pair], self.rx_segs[pair]
            buffers, notify = self._call("loop_rx", LK.loop_rx_poll, views, (
                mem, queue.q, views, self._wake[pair], mergeable, self.max_burst, window.cycles,
                window.idle_cycles, window.leave, s.seg_addr, s.seg_len, s.seg_flags,
                s.chain_heads, s.chain_ends, ring.data, ring.lens, ring.ctl,
                self.rx_counters[pair], self._eventfd_scratch))
            return max(int(buffers), 0), bool(notify)
        if self.generator:
            return self._generate(queue, mem, views, mergeable, pair, window)
        if self.rx_tap is not None:
            ring, s = self.rx_ring[pair], self.rx_segs[pair]
            buffers, notify = self._call("tap_rx", TK.tap_rx_poll, views, (
                mem, queue.q, views, self.rx_tap.fds[pair], mergeable, self.max_burst,
                window.cycles, window.idle_cycles, window.leave, s.seg_addr, s.seg_len,
                s.seg_flags, s.chain_heads, s.chain_ends, ring.data, ring.lens, ring.ctl,
                self._drain_buf, self.rx_counters[pair]))
            self._check_rx_errors(ring)
            return max(int(buffers), 0), bool(notify)
        buffers, notify = self._deliver(queue, mem, views, mergeable, pair)
        return max(buffers, 0), notify

    def _generate(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
                  mergeable: bool, pair: int, window: PollWindow) -> tuple[int, bool]:
        """gen:SIZE: whole bursts of the same frame while the guest has buffers for them, for
        as long as the poll window lets the refill-and-deliver loop (compiled) go on."""
        ring, s = self.rx_ring[pair], self.rx_segs[pair]
        buffers, notify = RK.rx_generate_poll(
            mem, queue.q, views, mergeable, self.max_burst, window.cycles, window.idle_cycles,
            window.leave, s.seg_addr, s.seg_len, s.seg_flags, s.chain_heads, s.chain_ends,
            ring.data, ring.lens, ring.ctl, self.rx_counters[pair])
        return max(int(buffers), 0), bool(notify)

    def _deliver(self, queue: SplitQueue, mem: KernelMemory, views: RingViews,
                 mergeable: bool, pair: int) -> tuple[int, bool]:
        ring, s = self.rx_ring[pair], self.rx_segs[pair]
        if not ring.pending:
            return 0, False
        frames, buffers, notify = RK.rx_deliver(
            mem, queue.q, views, mergeable, self.max_burst, s.seg_addr, s.seg_len, s.seg_flags,
            s.chain_heads, s.chain_ends, ring.data, ring.lens, ring.ctl, self.rx_counters[pair])
        if frames < 0:
            return -1, False
        return int(buffers), bool(notify)

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        rx = self.rx_counters
        return {
            "rx_packets": int(rx[:, RK.RX_PACKETS].sum()),
            "rx_bytes": int(rx[:, RK.RX_BYTES].sum()),
            "rx_dropped": int(rx[:, RK.RX_TOO_BIG].sum()) + sum(r.dropped for r in self.rx_ring),
            "rx_backlog_waits": int(rx[:, RK.RX_WAITS].sum()),
            "rx_bad_buffers": int(rx[:, RK.RX_BAD_BUFFERS].sum()),
            "rx_stale_dropped": self.rx_stale,
            "tx_dropped": int(self.tx_extra[:, [RK.TX_OVERSIZE, RK.TX_SHORT,
                                                RK.TX_WRITE_ERRORS]].sum()),
            "tx_write_errors": int(self.tx_extra[:, RK.TX_WRITE_ERRORS].sum()),
            # Frames written to the TAP through io_uring (the others: writev(2), or none).
            "tx_tap_uring_writes": self._tap_uring_writes + sum(
                int(t.ur[U.UR_SUBMITTED]) for t in self.tap_writes if t.uring is not None),
            "rx_read_errors": sum(int(r.ctl[RK.R_READ_ERRORS]) for r in self.rx_ring),
        }

    def close(self) -> None:
        """Close the TX rings' io_urings, and the endpoints if this object opened them itself
        (no `endpoints` given)."""
        for pair in range(self.queue_pairs):
            self._set_tap_writes(pair, None)
        if self.owns_endpoints:
            self.endpoints.close()


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels of this module before a front-end
    arrives: a first burst that compiles would hold a worker for seconds."""
    from pyvhost.memory.table import RegionTable
    from pyvhost.ring import kernels as K
    from pyvhost.ring.direct_map import NO_VIEWS

    mem = RegionTable().kernel()
    q = SplitQueue(0)
    q.set_size(1)
    ring, other, s = FrameRing(1, 64), FrameRing(1, 64), _Segments(1)
    s.resize(1)
    ring.lens[0], ring.ctl[RK.R_TAIL] = RK.HDR + 14, 1
    counters = np.zeros(max(RK.RX_COUNTERS_LEN, 16), dtype=np.int64)
    extra = np.zeros(RK.TX_EXTRA_LEN, dtype=np.int64)
    RK.ring_copy(ring.data, ring.lens, ring.ctl, other.data, other.lens, other.ctl)
    RK.ring_to_pcap(other.data, other.lens, other.ctl, np.zeros(128, np.uint8), 0, 0, 65535)
    RK.rx_deliver(mem, q.q, NO_VIEWS, True, 1, s.seg_addr, s.seg_len, s.seg_flags,
                  s.chain_heads, s.chain_ends, ring.data, ring.lens, ring.ctl, counters)
    w = one_pass_window()  # the generator's loop, as NetIo._generate calls it
    RK.rx_generate_poll(mem, q.q, NO_VIEWS, True, 1, w.cycles, w.idle_cycles, w.leave,
                        s.seg_addr, s.seg_len, s.seg_flags, s.chain_heads, s.chain_ends,
                        ring.data, ring.lens, ring.ctl, counters)
    q.q[:] = 0
    q.set_size(1)
    RK.tx_gather(mem, q.q, NO_VIEWS, 1, s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len,
                 s.seg_flags, s.hosts, ring.data, ring.lens, ring.ctl, counters, extra)
    # The TAP kernels, as NetIo calls them (fd -1: any call fails at once, EBADF).
    tw = _TapWrites()
    TK.tap_tx_poll(mem, q.q, NO_VIEWS, -1, tw.ur, tw.sqes, tw.cqes, 1, w.cycles, w.idle_cycles,
                   w.leave, s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags,
                   s.iov, tw.cq_user, tw.cq_res, s.frame, counters, extra)
    TK.tap_rx_poll(mem, q.q, NO_VIEWS, -1, True, 1, w.cycles, w.idle_cycles, w.leave,
                   s.seg_addr, s.seg_len, s.seg_flags, s.chain_heads, s.chain_ends, other.data,
                   other.lens, other.ctl, np.zeros(64, dtype=np.uint8), counters)
    TK.ring_to_fd(-1, other.data, other.lens, other.ctl, extra)
    # Loopback's kernels (fd -1: the eventfd calls fail at once).
    LK.loop_tx_poll(mem, q.q, NO_VIEWS, -1, 1, w.cycles, w.idle_cycles, w.leave,
                    s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags, s.hosts,
                    other.data, other.lens, other.ctl, counters, extra,
                    LK.eventfd_one())
    LK.loop_rx_poll(mem, q.q, NO_VIEWS, -1, True, 1, w.cycles, w.idle_cycles, w.leave,
                    s.seg_addr, s.seg_len, s.seg_flags, s.chain_heads, s.chain_ends, other.data,
                    other.lens, other.ctl, counters, np.zeros(1, dtype=np.uint64))
    LK.loop_pair_poll(mem, q.q, NO_VIEWS, q.q, NO_VIEWS, -1, True, 1, w.cycles, w.idle_cycles,
                      w.leave, s.chain_heads, s.chain_ends, s.seg_addr, s.seg_len, s.seg_flags,
                      s.hosts, s.seg_addr, s.seg_len,
                      s.seg_flags, s.chain_heads, s.chain_ends, other.data, other.lens,
                      other.ctl, counters, extra, counters, LK.eventfd_one())
    TK.drain_fd(-1, np.zeros(64, dtype=np.uint8), 1)
    # What a worker calls around every ring's bursts, and the drop kernel a started but not yet
    # enabled TX ring runs (Device.discard_burst).
    K.enable_notification(mem, q.q, NO_VIEWS)
    K.disable_notification(mem, q.q, NO_VIEWS)
    from pyvhost.devices.net.device import NetDevice
    tx = SplitQueue(1)
    tx.set_size(1)
    NetDevice().discard_burst(tx, RegionTable(), mem, NO_VIEWS)
    # The control queue's Python API calls.
    ctrl = SplitQueue(2)
    ctrl.set_size(1)
    K.avail_count(mem, ctrl.q, NO_VIEWS)
    K.pop_chain(mem, ctrl.q, NO_VIEWS, s.seg_addr, s.seg_len, s.seg_flags, 0)
    K.push_used_burst(mem, ctrl.q, NO_VIEWS, s.chain_heads, s.chain_ends, 0)
