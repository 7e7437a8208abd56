"""Python-tier benchmark: requests/s of a `Device.handle()` that writes 16 bytes.

One queue of 1024 chains in memfd guest memory, each one writable 16-byte buffer, filled by the
test-double driver. The device side is what a worker runs for a ring served through `handle()`:
`RequestRunner.serve` pops a burst (compiled: `ring.chains.pop_requests`), builds a `Request`
per chain, calls the device's `handle()` (which writes 16 bytes with `request.write`), and
publishes the used elements once per burst with the interrupt decision. Refilling is free: the
avail slots keep their heads, so the driver re-offers them by moving avail->idx on by a ring.

Time is the benchmark thread's CPU time (this machine is shared: wall time counts
whatever else ran on the core). Both metadata paths, alternated within each repetition; the figure is the median. It also
splits one burst's time into its parts (where the time goes). Usage:
    python -m pyvhost.bench.requests [--seconds S] [--repeat N] [--burst B] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from pyvhost.bench.ring import QUEUE_SIZE, RingBench
from pyvhost.device import Device, Request, RequestRunner, _Pieces
from pyvhost.ring.layout import AVAIL_IDX
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

PAYLOAD = b"0123456789abcdef"


class Write16(Device):
    def handle(self, queue: int, request: Request) -> int:
        return request.write(PAYLOAD)


class RequestBench(RingBench):
    """The ring benchmark's queue and refill (bench/ring.py), served by a RequestRunner."""

    def __init__(self, mode: str, burst: int) -> None:
        self.ram = GuestRam([(0, 64 << 20)])
        self.driver = MockSplitQueue(self.ram, QUEUE_SIZE)
        heads = [self.driver.add_chain([], [len(PAYLOAD)]) for _ in range(QUEUE_SIZE)]
        self.driver.publish()
        # Where the device's bytes land, to check that it really wrote them.
        self._buffers = [self.driver._in_flight[h].writable[0][0] for h in heads]
        self.memory = backend_memory(self.ram)
        self.queue = device_queue(self.driver, self.memory, metadata_access=mode,
                                  max_burst=burst)
        self.device = Write16()
        self.runner = RequestRunner(self.device, self.queue, self.memory.pin, lambda: None)
        self.runner.resize(QUEUE_SIZE)
        self._avail_idx_gpa = self.driver.avail_ring + AVAIL_IDX
        self._avail_idx = self.driver.published_avail
        self.log = None

    def drain(self) -> int:
        """Serve until the ring is empty, one serve() per burst, as a worker's rounds do."""
        q = self.queue
        table = self.memory.table
        done = 0
        while True:
            views = q.round_views(table)
            n, _ = self.runner.serve(table, table.kernel(), views)
            if q.broken:
                raise RuntimeError(q.error_text())
            if n == 0:
                return done
            done += n

    def close(self) -> None:
        assert all(self.ram.read(gpa, len(PAYLOAD)) == PAYLOAD for gpa in self._buffers)
        self.queue.drop_views()
        self.memory.close()
        self.ram.close()


def breakdown(mode: str, burst: int, rounds: int = 200) -> dict[str, float]:
    """Nanoseconds per request of each part of serve(), measured apart on the same ring."""
    b = RequestBench(mode, burst)
    q, s = b.queue, b.runner.scratch
    table = b.memory.table
    mem = table.kernel()
    views = q.round_views(table)
    parts = {"pop (compiled)": 0.0, "tolist + Request objects": 0.0, "handle() + write": 0.0,
             "publish + interrupt decision": 0.0}
    count = 0
    for _ in range(rounds):
        t0 = time.thread_time()
        n = s.pop(mem, q.q, views, burst)
        t1 = time.thread_time()
        last = int(s.piece_end[n - 1])
        pieces = _Pieces(s.piece_region[:last].tolist(), s.piece_offset[:last].tolist(),
                         s.piece_host[:last].tolist(), s.piece_gpa[:last].tolist(),
                         s.piece_len[:last].tolist(), table.memoryviews(), b.runner)
        heads = s.heads[:n].tolist()
        ends = s.piece_end[:n].tolist()
        firsts = s.first_writable[:n].tolist()
        rsizes = s.readable[:n].tolist()
        wsizes = s.writable[:n].tolist()
        reqs = []
        p0 = 0
        for k in range(n):
            reqs.append(Request(0, heads[k], rsizes[k], wsizes[k], pieces, p0, firsts[k],
                                ends[k]))
            p0 = ends[k]
        t2 = time.thread_time()
        used = [b.device.handle(0, r) for r in reqs]
        t3 = time.thread_time()
        b.runner._publish(mem, views, heads, used)
        t4 = time.thread_time()
        parts["pop (compiled)"] += t1 - t0
        parts["tolist + Request objects"] += t2 - t1
        parts["handle() + write"] += t3 - t2
        parts["publish + interrupt decision"] += t4 - t3
        count += n
        for r in reqs:
            r._close()
        if q.next_avail == b._avail_idx:
            b.refill()
    del pieces, reqs, views  # they hold views of guest memory: the mapping could not go
    b.close()
    return {k: v / count * 1e9 for k, v in parts.items()}


def measure(burst: int, seconds: float, repeat: int) -> dict[str, list[float]]:
    modes = ("direct", "copy")
    benches = {m: RequestBench(m, burst) for m in modes}
    for bench in benches.values():  # compile and warm up, excluded
        bench.run_for(0.05)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeat):
        for m in modes:
            samples[m].append(benches[m].run_for(seconds))
    for bench in benches.values():
        bench.close()
    return samples


def report(samples: dict[str, list[float]], parts: dict[str, dict[str, float]],
           burst: int) -> str:
    lines = [f"Python tier, handle() writing 16 bytes, burst {burst}, one thread:", "",
             "| metadata path | requests/s (median) | min | max |", "|---|---:|---:|---:|"]
    for m, xs in samples.items():
        lines.append(f"| {m} | {statistics.median(xs) / 1e6:.3f} M | {min(xs) / 1e6:.3f} M | "
                     f"{max(xs) / 1e6:.3f} M |")
    lines += ["", "Where the time goes (ns per request):", "",
              "| part | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    names = list(next(iter(parts.values())))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{parts[m][name]:.0f}" for m in parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per sample")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args(argv)
    samples = measure(args.burst, args.seconds, args.repeat)
    parts = {m: breakdown(m, args.burst) for m in ("direct", "copy")}
    print(report(samples, parts, args.burst))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "breakdown": parts, "burst": args.burst,
                       "machine": platform.uname()._asdict(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
