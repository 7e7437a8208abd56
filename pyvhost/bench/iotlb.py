"""Device IOTLB benchmark: TX and RX chains/s through the IOTLB, on the direct map and the copy
path, against the same hot paths without an IOTLB — all in one run, alternated.

The set-up is `pyvhost.bench.ring`'s (one 1024-entry queue in memfd guest memory, the compiled
TX drop kernel or RX delivery kernel, one kernel call per burst, the thread's CPU time). For the
IOTLB contenders the driver sees guest memory through a vIOMMU: guest-physical A is IOVA
A + 4 GiB in every descriptor and ring address, and the device's IOTLB gets one 4 KiB UPDATE per
page the rings and buffers use (what QEMU sends, through `GuestMemory.iotlb_update`, the
daemon's UPDATE handler). Adjacent pages join into runs, so the rings get a direct map through
the IOTLB (`iotlb-direct`) unless `--metadata-access copy` semantics are asked (`iotlb-copy`).
Targets (issue #13): iotlb-direct >= 1.23x iotlb-copy, and >= 0.9x direct without an IOTLB.
Usage:
    python -m pyvhost.bench.iotlb [--seconds S] [--repeat N] [--bursts 32,256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from pyvhost.bench.ring import FRAME, QUEUE_SIZE, RingBench, RxRingBench
from pyvhost.devices.net import frame_kernels as RK
from pyvhost.devices.net import tx_drop as NK
from pyvhost.devices.net.endpoints import FrameRing, _Segments, generated_frame, slot_size
from pyvhost.memory.address import UserAddress
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.iotlb import IotlbEntry
from pyvhost.ring import kernels as K
from pyvhost.ring.layout import AVAIL_IDX, avail_ring_size, desc_table_size, used_ring_size
from pyvhost.ring.split_queue import SplitQueue
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory

IOVA_OFFSET = 1 << 32
PAGE = 4096
MODES = ("direct", "copy", "iotlb-direct", "iotlb-copy")


def iotlb_queue(driver: MockSplitQueue, memory: GuestMemory, ram: GuestRam, pages: set[int],
                metadata_access: str, max_burst: int) -> SplitQueue:
    """A device queue behind a vIOMMU: the IOTLB on, one UPDATE per page in `pages` (GPAs),
    ring addresses as IOVAs, started as the daemon starts it (used index read lazily)."""
    memory.set_iotlb(True)
    for gpa in sorted(pages):
        memory.iotlb_update(IotlbEntry(gpa + IOVA_OFFSET, PAGE, ram.gpa_to_user(gpa), 3))
    queue = SplitQueue(0, metadata_access, max_burst=max_burst)
    queue.set_size(driver.size)
    a = driver.iova_addresses()
    queue.set_addresses(UserAddress(a.desc_table), UserAddress(a.avail_ring),
                        UserAddress(a.used_ring))
    queue.set_features(event_idx=driver.event_idx, indirect=True)
    queue.set_next_avail(driver.initial_avail_idx)
    queue.start_lazily()
    memory.add_listener(queue.on_memory_change)
    memory.add_iotlb_listener(queue.on_iotlb_invalidate)
    queue.round_views(memory.table)
    assert not queue.ring_missing, "the rings are not in the IOTLB"
    return queue


def _ring_pages(driver: MockSplitQueue, n_bytes: tuple[int, int, int]) -> set[int]:
    pages: set[int] = set()
    for gpa, n in zip((driver.desc_table, driver.avail_ring, driver.used_ring), n_bytes):
        pages.update(range(gpa & ~(PAGE - 1), gpa + n, PAGE))
    return pages


def _buffer_pages(buffers: list[tuple[int, int]]) -> set[int]:
    pages: set[int] = set()
    for gpa, n in buffers:
        pages.update(range(gpa & ~(PAGE - 1), gpa + n, PAGE))
    return pages


class IotlbTxBench(RingBench):
    """RingBench (TX drop) with the driver behind a vIOMMU."""

    def __init__(self, mode: str, burst: int) -> None:
        access = mode.split("-")[1]
        self.ram = GuestRam([(0, 64 << 20)])
        self.driver = MockSplitQueue(self.ram, QUEUE_SIZE, iova_offset=IOVA_OFFSET)
        bufs = []
        for _ in range(QUEUE_SIZE):
            head = self.driver.add_chain([FRAME], [])
            gpa, cls = self.driver._in_flight[head].blocks[0]
            bufs.append((gpa, len(FRAME)))
        self.driver.publish()
        self.memory = backend_memory(self.ram)
        pages = _ring_pages(self.driver, (desc_table_size(QUEUE_SIZE),
                                          avail_ring_size(QUEUE_SIZE),
                                          used_ring_size(QUEUE_SIZE))) | _buffer_pages(bufs)
        self.queue = iotlb_queue(self.driver, self.memory, self.ram, pages, access,
                                 max(burst, 1))
        self.burst = burst
        self.counters = np.zeros(NK.COUNTERS_LEN, np.int64)
        self.scratch = np.zeros(NK.HEADER_BYTES, np.uint8)
        self._avail_idx_gpa = self.driver.avail_ring + AVAIL_IDX
        self._avail_idx = self.driver.published_avail
        self.log = None


class IotlbRxBench(RxRingBench):
    """RxRingBench (RX delivery) with the driver behind a vIOMMU."""

    def __init__(self, mode: str, burst: int) -> None:
        access = mode.split("-")[1]
        self.ram = GuestRam([(0, 64 << 20)])
        self.driver = MockSplitQueue(self.ram, QUEUE_SIZE, iova_offset=IOVA_OFFSET)
        self._buffers = [self.driver._in_flight[self.driver.add_chain([], [1526])].writable[0][0]
                         for _ in range(QUEUE_SIZE)]
        self.driver.publish()
        self.memory = backend_memory(self.ram)
        pages = _ring_pages(self.driver, (desc_table_size(QUEUE_SIZE),
                                          avail_ring_size(QUEUE_SIZE),
                                          used_ring_size(QUEUE_SIZE)))
        pages |= _buffer_pages([(g, 1526) for g in self._buffers])
        self.queue = iotlb_queue(self.driver, self.memory, self.ram, pages, access,
                                 max(burst, 1))
        self.burst = burst
        self.frames = FrameRing.repeating(generated_frame(64), burst, slot_size(1500))
        self.segs = _Segments(burst)
        self.segs.resize(QUEUE_SIZE)
        self.counters = np.zeros(RK.RX_COUNTERS_LEN, np.int64)
        self._avail_idx_gpa = self.driver.avail_ring + AVAIL_IDX
        self._avail_idx = self.driver.published_avail
        self.log = None


def _bench(mode: str, burst: int, rx: bool) -> RingBench:
    if mode.startswith("iotlb-"):
        return IotlbRxBench(mode, burst) if rx else IotlbTxBench(mode, burst)
    return RxRingBench(mode, burst) if rx else RingBench(mode, burst)


def measure(bursts: list[int], seconds: float, repeat: int) -> dict[str, list[float]]:
    benches = {(side, m, b): _bench(m, b, side == "rx")
               for side in ("tx", "rx") for b in bursts for m in MODES}
    for bench in benches.values():  # compile and warm up, excluded
        bench.run_for(0.05)
    samples: dict[str, list[float]] = {f"{s}/{m}/{b}": [] for s, m, b in benches}
    for _ in range(repeat):
        for (side, m, b), bench in benches.items():
            samples[f"{side}/{m}/{b}"].append(bench.run_for(seconds))
    for (side, m, b), bench in benches.items():
        if m.startswith("iotlb-"):
            s = bench.queue.stats
            want = "direct" if m == "iotlb-direct" else "copy"
            assert getattr(s, f"{want}_rounds") > 0 and bench.queue.q[K.Q_IOTLB_HITS] > 0
        bench.close()
    return samples


def report(samples: dict[str, list[float]], bursts: list[int]) -> str:
    lines = ["| side | burst | direct | copy | IOTLB direct | IOTLB copy | IOTLB direct / "
             "IOTLB copy (target >= 1.23) | IOTLB direct / direct (target >= 0.9) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for side in ("tx", "rx"):
        for b in bursts:
            m = {mode: statistics.median(samples[f"{side}/{mode}/{b}"]) for mode in MODES}
            lines.append(
                f"| {side.upper()} | {b} | {m['direct'] / 1e6:.2f} | {m['copy'] / 1e6:.2f} | "
                f"{m['iotlb-direct'] / 1e6:.2f} | {m['iotlb-copy'] / 1e6:.2f} | "
                f"{m['iotlb-direct'] / m['iotlb-copy']:.2f}x | "
                f"{m['iotlb-direct'] / m['direct']:.2f}x |")
    return "\n".join(lines) + "\n(Mchains/s: median over repetitions, device thread CPU time)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="per sample")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bursts", default="32,256")
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
