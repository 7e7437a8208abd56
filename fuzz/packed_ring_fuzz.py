"""Hostile packed-ring fuzzer: arbitrary descriptor rings, indirect tables, wrap counters and
event areas in guest memory, run through the packed ring primitives on both metadata paths.

One input (bytes, any length) is decoded into a guest memory image: a packed queue of 1..64
entries (any size, not only powers of two) whose descriptor ring starts anywhere in its laps
(next avail and both wrap counters from the input), each descriptor's address (a buffer, an
indirect table, an address straddling two regions, unmapped, at or above 2**63), length, buffer
ID and flags (NEXT, WRITE, INDIRECT and the two ring bits: mostly available to the device,
sometimes not, sometimes garbage), an area of packed indirect tables, and the driver's event
suppression area.

Each input runs on two fresh queues over the same image, one reading its metadata through the
direct map and one on the copy path, with the same calls: pop_burst (the Python tier's
pop_requests for some inputs), completion of what was popped (push_used), the notification
switches, and a second burst. Oracles:

1. every call either succeeds or raises RingError with a code the guest can cause (never
   USED_ID_OUT_OF_RANGE or DEVICE_FAILED: those are the device's own bugs); a broken queue
   stays broken; popped chains have mapped segments and lengths below 2**32;
2. the device wrote nothing outside the fuzzed queue's descriptor ring and device event area;
3. both paths give identical results (chains, segments, errors, queue state, ring bytes);
4. a healthy queue in the same guest memory works after every input.

    python -m fuzz.packed_ring_fuzz --execs 20000
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time

import numpy as np

from pyvhost.memory.address import UserAddress
from pyvhost.memory.errors import AddressNotMappedError
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.ring import kernels as K
from pyvhost.ring.chains import ChainScratch
from pyvhost.ring.errors import RingError, RingErrorCode
from pyvhost.ring.packed_layout import (VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT,
                                        VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
                                        VIRTQ_DESC_F_WRITE, PackedBase)
from pyvhost.ring.virtqueue import Virtqueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.pairing import backend_memory

GPA_R0 = 0x10000          # the fuzz area: ring, event areas, indirect tables, buffers
R0_SIZE = 0x8000
GPA_R1 = GPA_R0 + R0_SIZE  # adjacent in GPA and user space: straddling buffers and rings
R1_SIZE = 0x10000
GPA_R2 = 0x100_0000       # the healthy queue
R2_SIZE = 0x10000
IMG = (GPA_R0, R0_SIZE + 0x1000)

RING_OFF = 0x0000         # image offsets of the fuzzed queue's parts
DRIVER_EVENT_OFF = 0x0800
DEVICE_EVENT_OFF = 0x0804
IND_OFF, IND_LEN = 0x1000, 0x1000
BUF_OFF, BUF_LEN = 0x2000, 0x6000
MAX_SIZE = 64

GUEST_CODES = {int(c) for c in RingErrorCode} - {0, int(RingErrorCode.USED_ID_OUT_OF_RANGE),
                                                 int(RingErrorCode.DEVICE_FAILED)}


class FuzzFailure(AssertionError):
    """An oracle said no; the message says which and how."""


class _Input:
    """Bytes read as a stream of small integers; zeros past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def u32(self) -> int:
        return self.u16() | self.u16() << 16


def _addr(inp: _Input, length: int) -> int:
    sel = inp.byte() % 16
    off = inp.u16()
    if sel < 9:    # a buffer in the fuzz area
        return GPA_R0 + BUF_OFF + off % max(BUF_LEN - min(length, BUF_LEN), 1)
    if sel < 11:   # an indirect table
        return GPA_R0 + IND_OFF + (off % (IND_LEN // 16)) * 16
    if sel == 11:  # straddling R0 | R1
        return GPA_R1 - 1 - off % 64
    if sel == 12:  # past R1's end
        return GPA_R1 + R1_SIZE - off % 32
    if sel == 13:
        return 0x7000_0000_0000 + off
    if sel == 14:
        return (1 << 63) + off
    return (1 << 64) - 1 - off % 16


def _len(inp: _Input) -> int:
    sel = inp.byte() % 8
    if sel < 4:
        return 1 + inp.byte() * 4
    if sel == 4:
        return 16 * (1 + inp.byte() % 8)  # a plausible indirect table length
    if sel == 5:
        return 0
    if sel == 6:
        return inp.u32()
    return 0xFFFF_FFFF - inp.byte()


def _flags(inp: _Input, avail_wrap: int) -> int:
    b = inp.byte()
    kind = inp.byte() % 16
    flags = b & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)
    if kind == 0:
        flags |= VIRTQ_DESC_F_INDIRECT
    if kind < 12:    # available
        ring = VIRTQ_DESC_F_AVAIL if avail_wrap else VIRTQ_DESC_F_USED
    elif kind < 14:  # not (yet) available
        ring = VIRTQ_DESC_F_USED if avail_wrap else VIRTQ_DESC_F_AVAIL
    else:            # garbage: both or neither
        ring = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if kind == 14 else 0
    return flags | ring | (inp.byte() << 8 & 0x7F00 if kind == 15 else 0)


class PackedRingFuzzer:
    """Guest memory made once; `run_one(data)` per input."""

    PATHS = ("direct", "copy")

    def __init__(self) -> None:
        self.ram = GuestRam()
        self.ram.add_region(GPA_R0, R0_SIZE).add_region(GPA_R1, R1_SIZE)
        self.ram.add_region(GPA_R2, R2_SIZE)
        self.memory: GuestMemory = backend_memory(self.ram)
        self.execs = 0
        self.errors: dict[str, int] = {}
        # One healthy queue per path, in R2, kept across inputs (it goes round its ring).
        self.healthy = {path: self._healthy_queue(path) for path in self.PATHS}

    def close(self) -> None:
        for _d, q in self.healthy.values():
            q.drop_views()
        self.memory.close()
        self.ram.close()

    def __enter__(self) -> "PackedRingFuzzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one input --

    def _write_image(self, data: bytes) -> dict:
        inp = _Input(data)
        size = 1 + inp.byte() % MAX_SIZE
        flags = inp.byte()
        avail = inp.byte() % size
        avail_wrap = inp.byte() & 1
        used_lag = inp.byte() % (size + 1)  # used trails avail by this much (same lap or last)
        used = avail - used_lag
        used_wrap = avail_wrap
        if used < 0:
            used += size
            used_wrap ^= 1
        cfg = {"size": size, "event_idx": bool(flags & 1), "indirect": bool(flags & 2),
               "python_tier": bool(flags & 4), "second": bool(flags & 8),
               "notif": flags >> 4 & 3, "max": 1 + inp.byte() % 64,
               "base": PackedBase(avail, avail_wrap, used, used_wrap).encode(),
               "lens": inp.byte() % 3}
        image = bytearray(IMG[1])
        w = avail_wrap
        for k in range(size):
            slot = (avail + k) % size
            if slot == 0 and k:
                w ^= 1
            length = _len(inp)
            struct.pack_into("<QIHH", image, RING_OFF + 16 * slot, _addr(inp, length), length,
                             inp.u16(), _flags(inp, w))
        for j in range(IND_LEN // 16):
            if inp.pos >= len(inp.data):
                break
            length = _len(inp)
            struct.pack_into("<QIHH", image, IND_OFF + 16 * j, _addr(inp, length), length,
                             inp.u16(), inp.byte() & 7)
        struct.pack_into("<HH", image, DRIVER_EVENT_OFF, inp.u16(), inp.byte() % 4)
        self.ram.write(GPA_R0, bytes(image))
        self.ram.write(GPA_R1, bytes(0x1000))
        return cfg

    def _queue(self, path: str, cfg: dict) -> Virtqueue:
        q = Virtqueue(0, path)
        q.set_features(event_idx=cfg["event_idx"], indirect=cfg["indirect"], packed=True)
        q.set_size(cfg["size"])
        user = self.ram.gpa_to_user
        q.set_addresses(UserAddress(user(GPA_R0 + RING_OFF)),
                        UserAddress(user(GPA_R0 + DRIVER_EVENT_OFF)),
                        UserAddress(user(GPA_R0 + DEVICE_EVENT_OFF)))
        q.set_base(cfg["base"])
        q.sync_used_from_ring(self.memory.table)
        return q

    def _run_path(self, path: str, cfg: dict) -> tuple:
        table = self.memory.table
        q = self._queue(path, cfg)
        trace: list = []
        error = 0
        try:
            if cfg["notif"] == 1:
                q.disable_notification(table)
            elif cfg["notif"] == 2:
                trace.append(("enable", q.enable_notification(table)))
            for burst in range(2 if cfg["second"] else 1):
                chains = self._pop(q, table, cfg)
                trace.append(("pop", chains))
                if chains:
                    lens = [self._used_len(cfg, c) for c in chains]
                    trace.append(("push", q.push_used(table, list(zip([h for h, _ in chains],
                                                                       lens)))))
        except RingError as exc:
            error = int(exc.code)
            trace.append(("error", error, exc.info))
            if not q.broken:
                raise FuzzFailure(f"{path}: RingError {exc} but the queue is not broken")
            try:
                q.pop_burst(table)
                raise FuzzFailure(f"{path}: a broken queue popped again")
            except RingError:
                pass
        if error and error not in GUEST_CODES:
            raise FuzzFailure(f"{path}: error code {RingErrorCode(error).name} is the device's "
                              "own bug")
        state = tuple(int(q.q[i]) for i in (K.Q_NEXT_AVAIL, K.Q_AVAIL_WRAP, K.Q_NEXT_USED,
                                             K.Q_USED_WRAP, K.Q_ERROR, K.Q_ERROR_INFO,
                                             K.Q_CHAINS))
        stats = (q.stats.direct_rounds, q.stats.copy_rounds)
        q.drop_views()
        return trace, state, self.ram.read(*IMG), stats

    def _pop(self, q: Virtqueue, table, cfg: dict) -> list:
        if not cfg["python_tier"]:
            return [(c.head, [(s.addr, s.length, s.writable) for s in c.segments])
                    for c in q.pop_burst(table, cfg["max"])]
        s = ChainScratch(cfg["max"], q.size)
        n = s.pop(table.kernel(), q.q, q.round_views(table), cfg["max"])
        if n < 0:
            q._raise_if_broken()
        out, p0 = [], 0
        for k in range(max(n, 0)):
            p1 = int(s.piece_end[k])
            out.append((int(s.heads[k]), [(int(s.piece_gpa[p]), int(s.piece_len[p]),
                                           p >= int(s.first_writable[k]))
                                          for p in range(p0, p1)]))
            p0 = p1
        return out

    @staticmethod
    def _used_len(cfg: dict, chain: tuple) -> int:
        writable = sum(n for _, n, w in chain[1] if w)
        return (0, writable, writable // 2)[cfg["lens"]]

    def _check_chains(self, path: str, trace: list) -> None:
        table = self.memory.table
        for item in trace:
            if item[0] != "pop":
                continue
            for head, segs in item[1]:
                if head < 0 or not 1 <= head >> 16 <= MAX_SIZE:
                    raise FuzzFailure(f"{path}: bad head token {head:#x}")
                total = 0
                for gpa, n, _w in segs:
                    total += n
                    try:
                        table.translate_gpa(gpa, n)
                    except AddressNotMappedError:
                        raise FuzzFailure(f"{path}: segment at {gpa:#x} (+{n}) is not "
                                          "mapped") from None
                if total > 0xFFFF_FFFF:
                    raise FuzzFailure(f"{path}: chain of {total} bytes")

    def run_one(self, data: bytes) -> None:
        cfg = self._write_image(data)
        before = self.ram.read(*IMG)
        results = {}
        for path in self.PATHS:
            self.ram.write(IMG[0], before)
            results[path] = self._run_path(path, cfg)
            self._check_chains(path, results[path][0])
            self._check_writes(path, cfg, before, results[path][2])
        d, c = results["direct"], results["copy"]
        if d[:3] != c[:3]:
            raise FuzzFailure(f"the paths disagree:\n direct {d[:2]}\n copy   {c[:2]}"
                              + ("\n (ring bytes differ)" if d[2] != c[2] else ""))
        if d[3][0] == 0 or c[3][1] == 0:
            raise FuzzFailure(f"a path did not run as asked: direct {d[3]}, copy {c[3]}")
        self._healthy()
        self.execs += 1
        err = [t for t in d[0] if t[0] == "error"]
        name = RingErrorCode(err[0][1]).name if err else "ok"
        self.errors[name] = self.errors.get(name, 0) + 1

    def _check_writes(self, path: str, cfg: dict, before: bytes, after: bytes) -> None:
        ring_end = RING_OFF + 16 * cfg["size"]
        allowed = [(RING_OFF, ring_end), (DEVICE_EVENT_OFF, DEVICE_EVENT_OFF + 4)]
        a = np.frombuffer(before, np.uint8)
        b = np.frombuffer(after, np.uint8)
        for off in np.flatnonzero(a != b).tolist():
            if not any(lo <= off < hi for lo, hi in allowed):
                raise FuzzFailure(f"{path}: the device wrote at image offset {off:#x}")

    def _healthy_queue(self, path: str) -> tuple[MockPackedQueue, Virtqueue]:
        d = MockPackedQueue(self.ram, 7, region=GPA_R2)
        q = Virtqueue(9, path)
        q.set_features(event_idx=False, indirect=True, packed=True)
        q.set_size(7)
        user = d.ring_addresses().user
        q.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                        UserAddress(user.used_ring))
        q.set_base(d.vring_base)
        q.sync_used_from_ring(self.memory.table)
        return d, q

    def _healthy(self) -> None:
        table = self.memory.table
        for path, (d, q) in self.healthy.items():
            ident = d.add_chain([b"healthy"], [8])
            d.publish()
            chains = q.pop_burst(table)
            if len(chains) != 1 or chains[0].read(table) != b"healthy":
                raise FuzzFailure(f"{path}: the healthy queue did not work: {chains}")
            q.push_used(table, [(chains[0].head, 8)])
            if d.used() != [(ident, 8)]:
                raise FuzzFailure(f"{path}: the healthy queue's used descriptor is wrong")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execs", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.monotonic()
    with PackedRingFuzzer() as fz:
        for i in range(args.execs):
            data = rng.randbytes(rng.choice((8, 64, 600, 2000, 4000)))
            try:
                fz.run_one(data)
            except FuzzFailure as exc:
                print(f"input {i} (seed {args.seed}): {exc}\n{data.hex()}", file=sys.stderr)
                return 1
            if args.seconds is not None and time.monotonic() - start > args.seconds:
                break
        print(f"{fz.execs} inputs, both paths agree; outcomes {fz.errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
