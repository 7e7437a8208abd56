"""Ring benchmark: chains/s of the TX hot path on the direct map vs the copy path.

One queue in memfd guest memory, filled by the test-double driver with 64-byte frames (one
descriptor each: 12-byte virtio-net header + frame). The device side runs the compiled drop
kernel — pop a burst, read each frame's headers, complete it, publish used->idx once, decide on
the interrupt — one kernel call per burst, as a worker would. Refilling is free: the avail ring
keeps its heads, so the driver re-offers them by moving avail->idx on by a whole ring.

Contenders alternate within each repetition, so machine noise hits both alike; the figure is the
median over repetitions. Usage: python -m pyvhost.bench.ring [--seconds S] [--repeat N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import struct
import time

import numpy as np

from pyvhost.devices.net import tx_drop as NK
from pyvhost.ring.layout import AVAIL_IDX
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

QUEUE_SIZE = 1024
FRAME = bytes(12) + b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes([0x45]) + bytes(8) + \
    b"\x11" + bytes(64 - 24)  # virtio-net header + 64-byte UDP frame


class RingBench:
    def __init__(self, mode: str, burst: int) -> None:
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
            t0 = time.perf_counter()
            chains += self.drain()
            busy += time.perf_counter() - t0
            self.refill()
        return chains / busy

    def close(self) -> None:
        assert self.counters[NK.C_UDP] == self.counters[NK.C_PACKETS]  # it really read them
        self.memory.close()
        self.ram.close()


def measure(bursts: list[int], seconds: float, repeat: int) -> dict:
    modes = ("direct", "copy")
    benches = {(m, b): RingBench(m, b) for b in bursts for m in modes}
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
    lines = ["| burst | direct (Mchains/s) | copy (Mchains/s) | direct/copy |",
             "|---:|---:|---:|---:|"]
    for b in bursts:
        d = statistics.median(samples[f"direct/{b}"])
        c = statistics.median(samples[f"copy/{b}"])
        lines.append(f"| {b} | {d / 1e6:.2f} | {c / 1e6:.2f} | {d / c:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per sample")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bursts", default="1,32,256")
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args(argv)
    bursts = [int(b) for b in args.bursts.split(",")]
    samples = measure(bursts, args.seconds, args.repeat)
    print(report(samples, bursts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "machine": platform.uname()._asdict(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
