"""Ring benchmark: chains/s of the TX hot path on the direct map vs the copy path.

One queue in memfd guest memory, filled by the test-double driver with 64-byte frames (one
descriptor each: 12-byte virtio-net header + frame). The device side runs the compiled drop
kernel — pop a burst, read each frame's headers, complete it, publish used->idx once, decide on
the interrupt — one kernel call per burst, as a worker would. Refilling is free: the avail ring
keeps its heads, so the driver re-offers them by moving avail->idx on by a whole ring.

Time is the benchmark thread's CPU time (this machine is shared: wall time counts
whatever else ran on the core). Contenders alternate within each repetition, so machine noise hits both alike; the figure is the
median over repetitions. `--log` adds each path with dirty logging on (live migration: a log
memfd, LOG_ALL, the used ring logged), the log consumed between drains as QEMU does, so the
bits have to be set again. Usage:
    python -m pyvhost.bench.ring [--seconds S] [--repeat N] [--log] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import time

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.devices.net import tx_drop as NK
from pyvhost.devices.net.endpoints import FrameRing, _Segments, generated_frame, slot_size
from pyvhost.fd import OwnedFd
from pyvhost.memory.dirty_log import DirtyLog
from pyvhost.ring.layout import AVAIL_IDX
from pyvhost.testing.dirty_log import LogMemfd
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

QUEUE_SIZE = 1024
RK_HDR = bytes(10) + b"\x01\x00"  # the virtio-net header rx_deliver writes: num_buffers 1
FRAME = bytes(12) + b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes([0x45]) + bytes(8) + \
    b"\x11" + bytes(64 - 24)  # virtio-net header + 64-byte UDP frame


class RingBench:
    def __init__(self, mode: str, burst: int, log: bool = False) -> None:
        self.ram = GuestRam([(0, 64 << 20)])
        self.driver = MockSplitQueue(self.ram, QUEUE_SIZE)
        for _ in range(QUEUE_SIZE):
            self.driver.add_chain([FRAME], [])
        self.driver.publish()
        self.memory = backend_memory(self.ram)
        self.queue = device_queue(self.driver, self.memory, metadata_access=mode,
                                  max_burst=max(burst, 1))
        self.burst = burst
        self.counters = np.zeros(NK.COUNTERS_LEN, np.int64)
        self.scratch = np.zeros(NK.HEADER_BYTES, np.uint8)
        self._avail_idx_gpa = self.driver.avail_ring + AVAIL_IDX
        self._avail_idx = self.driver.published_avail
        self.log: LogMemfd | None = None
        if log:
            self._start_log()

    def _start_log(self) -> None:
        self.log = LogMemfd(64 << 20)
        self.memory.set_log(DirtyLog(OwnedFd(os.dup(self.log.fd)), self.log.size, 0))
        self.memory.set_log_all(True)
        self.queue.set_used_log(self.driver.used_ring)

    def refill(self) -> None:
        """Offer the same QUEUE_SIZE chains again: the avail slots still hold their heads."""
        self._avail_idx = (self._avail_idx + QUEUE_SIZE) & 0xFFFF
        self.ram.write(self._avail_idx_gpa, struct.pack("<H", self._avail_idx))

    def drain(self) -> int:
        """Device side until the ring is empty: one kernel call per burst. Returns chains."""
        q = self.queue
        table = self.memory.table
        views = q.round_views(table)
        mem = table.kernel()
        done = 0
        while True:
            n = NK.tx_drop_burst(mem, q.q, views, self.burst, q.heads, q.chain_end, q.seg_addr,
                                 q.seg_len, q.seg_flags, q.hosts, self.scratch, self.counters)
            if n <= 0:
                if n < 0:
                    raise RuntimeError(q.error_text())
                return done
            done += n

    def run_for(self, seconds: float) -> float:
        """Chains per second of device time over about `seconds`."""
        chains, busy = 0, 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.thread_time()
            chains += self.drain()
            busy += time.thread_time() - t0
            self.refill()
            if self.log is not None:
                self.log.consume()  # as QEMU's sync: every bit must be set again
        return chains / busy

    def close(self) -> None:
        assert self.counters[NK.C_UDP] == self.counters[NK.C_PACKETS]  # it really read them
        if self.log is not None:
            assert self.queue.log_pages > 0
        self.queue.drop_views()
        self.memory.close()
        self.ram.close()
        if self.log is not None:
            self.log.close()


class RxRingBench(RingBench):
    """The receive side: the guest posts QUEUE_SIZE one-buffer 1526-byte receive chains (and
    re-posts them by moving avail->idx on); the device delivers a repeating 64-byte frame
    into each (`rx_deliver`: header and frame copied into the buffer, used element, publish,
    interrupt decision), a burst per call, as the gen:SIZE source does."""

    def __init__(self, mode: str, burst: int, log: bool = False) -> None:
        self.ram = GuestRam([(0, 64 << 20)])
        self.driver = MockSplitQueue(self.ram, QUEUE_SIZE)
        self._buffers = [self.driver._in_flight[self.driver.add_chain([], [1526])].writable[0][0]
                         for _ in range(QUEUE_SIZE)]
        self.driver.publish()
        self.memory = backend_memory(self.ram)
        self.queue = device_queue(self.driver, self.memory, metadata_access=mode,
                                  max_burst=max(burst, 1))
        self.burst = burst
        self.frames = FrameRing.repeating(generated_frame(64), burst, slot_size(1500))
        self.segs = _Segments(burst)
        self.segs.resize(QUEUE_SIZE)
        self.counters = np.zeros(RK.RX_COUNTERS_LEN, np.int64)
        self._avail_idx_gpa = self.driver.avail_ring + AVAIL_IDX
        self._avail_idx = self.driver.published_avail
        self.log = None
        if log:
            self._start_log()

    def drain(self) -> int:
        q, s, f = self.queue, self.segs, self.frames
        table = self.memory.table
        views = q.round_views(table)
        mem = table.kernel()
        done = 0
        while True:
            f.ctl[RK.R_TAIL] = f.ctl[RK.R_HEAD] + f.capacity
            n, _, _ = RK.rx_deliver(mem, q.q, views, False, self.burst, s.seg_addr, s.seg_len,
                                    s.seg_flags, s.chain_heads, s.chain_ends, f.data, f.lens,
                                    f.ctl, self.counters)
            if n <= 0:
                if n < 0:
                    raise RuntimeError(q.error_text())
                return done
            done += n

    def close(self) -> None:
        frame = RK_HDR + generated_frame(64)
        assert self.ram.read(self._buffers[0], len(frame)) == frame  # it really delivered
        if self.log is not None:
            assert self.queue.log_pages > 0
        self.queue.drop_views()
        self.memory.close()
        self.ram.close()
        if self.log is not None:
            self.log.close()


def measure(bursts: list[int], seconds: float, repeat: int, log: bool = False,
            rx: bool = False) -> dict:
    modes = ("direct", "copy") + (("direct+log", "copy+log") if log else ())
    kind = RxRingBench if rx else RingBench
    benches = {(m, b): kind(m.split("+")[0], b, log=m.endswith("+log"))
               for b in bursts for m in modes}
    for bench in benches.values():  # compile and warm up, excluded
        bench.run_for(0.05)
    samples: dict[str, list[float]] = {f"{m}/{b}": [] for b in bursts for m in modes}
    for _ in range(repeat):
        for b in bursts:
            for m in modes:
                samples[f"{m}/{b}"].append(benches[(m, b)].run_for(seconds))
    for bench in benches.values():
        bench.close()
    return samples


def report(samples: dict, bursts: list[int]) -> str:
    log = any(k.startswith("direct+log/") for k in samples)
    lines = ["| burst | direct (Mchains/s) | copy (Mchains/s) | direct/copy |"
             + (" direct+log | copy+log | log cost (direct, copy) |" if log else ""),
             "|---:|---:|---:|---:|" + ("---:|---:|---:|" if log else "")]
    for b in bursts:
        d = statistics.median(samples[f"direct/{b}"])
        c = statistics.median(samples[f"copy/{b}"])
        row = f"| {b} | {d / 1e6:.2f} | {c / 1e6:.2f} | {d / c:.2f}x |"
        if log:
            dl = statistics.median(samples[f"direct+log/{b}"])
            cl = statistics.median(samples[f"copy+log/{b}"])
            row += (f" {dl / 1e6:.2f} | {cl / 1e6:.2f} | {1 - dl / d:+.0%}, "
                    f"{1 - cl / c:+.0%} |")
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per sample")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bursts", default="1,32,256")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--log", action="store_true", help="also with dirty logging on")
    ap.add_argument("--rx", action="store_true",
                    help="the receive side (frames delivered into posted buffers), not TX")
    args = ap.parse_args(argv)
    bursts = [int(b) for b in args.bursts.split(",")]
    samples = measure(bursts, args.seconds, args.repeat, args.log, args.rx)
    print(report(samples, bursts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "machine": platform.uname()._asdict(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
