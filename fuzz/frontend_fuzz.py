"""Hostile-frontend fuzzer at the socket: a live daemon (`Server` with the net device, in a
thread of this process) is fed mutated vhost-user message sequences, fds included.

A case is one connection: a valid session (negotiation, memory table, a TX ring started with
kick and call eventfds, then random further requests: ADD/REM_MEM_REG, GET_VRING_BASE,
RESET_DEVICE, SET_STATUS, config, ...) with 0..5 mutations: steps dropped, duplicated, swapped
or cut short; payload fields set to boundary values or off-by-one addresses and sizes; bytes
flipped; header ids, flags and sizes changed; fds removed, added, duplicated or replaced by the
wrong kind (eventfd for memory, memfd of the wrong size or empty, pipe, /dev/null, directory,
socket), messages split across two sendmsg calls with the fds on either part, random garbage;
and sometimes garbage written into the ring the daemon will run. The harness reads whatever
comes back (closing any fd), half-closes, and waits for the daemon to close its end.

Checked: the daemon thread never dies and never logs an internal error (a traceback); each
connection ends within a bound (no hang); every `--check-every` cases, once the daemon is
idle, this process's fd count, memfd mappings and thread count equal the baseline; at the
end a well-behaved `VhostUserFrontend` session negotiates, maps memory and gets its packets
counted.

    python -m fuzz.frontend_fuzz --cases 100000 --json out.json
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvhost.protocol import FrontendRequest as R
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.protocol.codec import HEADER
from pyvhost.protocol.constants import NEED_REPLY, VERSION
from pyvhost.ring.layout import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                                 VIRTIO_RING_F_INDIRECT_DESC)
from pyvhost.testing.churn import (DaemonThread, describe_leak, fd_table, quiet_pyvhost_logs,
                                   snapshot)
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << 30))
PROTOCOL = (P.MQ.mask | P.REPLY_ACK.mask | P.CONFIG.mask | P.STATUS.mask
            | P.CONFIGURE_MEM_SLOTS.mask | P.RESET_DEVICE.mask | P.BACKEND_REQ.mask)
MiB = 1 << 20
QSIZE = 64
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x400, 0x600  # the TX ring, in region 0
INTERESTING = (0, 1, 2, 7, 8, 63, 64, 65, 255, 256, 4095, 4096, 0x7FFF, 0x8000, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 4096, (1 << 64) - 1)


@dataclass
class Step:
    request: int
    payload: bytes = b""
    fds: list[str] = field(default_factory=list)
    flags: int = VERSION
    split: int = 0          # send in two sendmsg calls, split at this byte (0: one call)
    fds_on_second: bool = False

    def encode(self, size: int | None = None) -> bytes:
        n = len(self.payload) if size is None else size
        return HEADER.pack(self.request & 0xFFFFFFFF, self.flags & 0xFFFFFFFF, n) + self.payload


def _q(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


class FdPool:
    """The fds cases send (sendmsg copies them; the pool keeps its own until close)."""

    def __init__(self, ram: GuestRam) -> None:
        self.fds: dict[str, int] = {}
        specs = ram.region_specs()
        self.fds["region0"] = os.dup(specs[0][0])
        self.fds["region1"] = os.dup(specs[1][0])
        for name, size in (("short", 4096), ("empty", 0), ("big", 64 * MiB)):
            fd = os.memfd_create(f"fuzz-{name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.fds[name] = fd
        self.fds["event"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds["event2"] = os.eventfd(0, os.EFD_CLOEXEC)  # blocking: the daemon must cope
        r, w = os.pipe2(os.O_CLOEXEC)
        self.fds["pipe_r"], self.fds["pipe_w"] = r, w
        self.fds["devnull"] = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.fds["dir"] = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_CLOEXEC)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._pair = (a, b)
        self.fds["socket"] = a.fileno()
        self.names = sorted(self.fds)

    def close(self) -> None:
        for name, fd in self.fds.items():
            if name != "socket":
                os.close(fd)
        for s in self._pair:
            s.close()


class FrontendFuzzer:
    def __init__(self, path: str, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.ram = GuestRam([(0, 2 * MiB), (1 << 30, MiB)])
        self.pool = FdPool(self.ram)
        self.daemon = DaemonThread(path)
        self.cases = 0
        self.hangs = 0
        self.mutations: dict[str, int] = {}
        self.replies = 0
        self.closed_by_daemon_early = 0
        self.scribbles = 0
        self.last_steps: list[Step] = []

    def close(self) -> None:
        self.daemon.stop()
        self.pool.close()
        self.ram.close()

    # -- the valid session and its mutations ---------------------------------------------------

    def _region(self, i: int) -> tuple[bytes, str]:
        fd, gpa, size, uaddr, off = self.ram.region_specs()[i]
        return _q(gpa, size, uaddr, off), f"region{i}"

    def valid_steps(self) -> list[Step]:
        rng = self.rng
        ack = NEED_REPLY | VERSION
        u = self.ram.gpa_to_user
        r0, f0 = self._region(0)
        r1, f1 = self._region(1)
        steps = [Step(R.GET_FEATURES), Step(R.GET_PROTOCOL_FEATURES),
                 Step(R.SET_PROTOCOL_FEATURES, _q(PROTOCOL), flags=ack),
                 Step(R.GET_QUEUE_NUM), Step(R.SET_OWNER, flags=ack),
                 Step(R.SET_FEATURES, _q(FEATURES), flags=ack),
                 Step(R.SET_MEM_TABLE, struct.pack("<II", 2, 0) + r0 + r1, [f0, f1], ack),
                 Step(R.SET_VRING_NUM, struct.pack("<II", 1, QSIZE), flags=ack),
                 Step(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, u(DESC_GPA), u(USED_GPA),
                                                    u(AVAIL_GPA), 0), flags=ack),
                 Step(R.SET_VRING_BASE, struct.pack("<II", 1, 0), flags=ack),
                 Step(R.SET_VRING_CALL, _q(1), ["event"], ack),
                 Step(R.SET_VRING_KICK, _q(1), ["event2"], ack),
                 Step(R.SET_VRING_ENABLE, struct.pack("<II", 1, 1), flags=ack)]
        menu = [
            lambda: Step(R.ADD_MEM_REG, _q(0) + r1, [f1], ack),
            lambda: Step(R.REM_MEM_REG, _q(0) + r1, [], ack),
            lambda: Step(R.ADD_MEM_REG, _q(0) + _q(2 << 30, MiB, 0x6000_0000_0000, 0),
                         ["big"], ack),
            lambda: Step(R.GET_VRING_BASE, struct.pack("<II", 1, 0)),
            lambda: Step(R.RESET_DEVICE, flags=ack),
            lambda: Step(R.SET_STATUS, _q(rng.choice((0, 1, 3, 7, 15, 0x4F))), flags=ack),
            lambda: Step(R.GET_STATUS),
            lambda: Step(R.GET_CONFIG, struct.pack("<III", 0, 10, 0) + bytes(10)),
            lambda: Step(R.SET_CONFIG, struct.pack("<III", 0, 6, 0) + bytes(6), flags=ack),
            lambda: Step(R.VRING_KICK, struct.pack("<II", 1, 0), flags=ack),
            lambda: Step(R.GET_MAX_MEM_SLOTS),
            lambda: Step(R.SET_BACKEND_REQ_FD, b"", ["socket"], ack),
            lambda: Step(R.SET_VRING_ERR, _q(1), ["event"], ack),
            lambda: Step(R.SET_VRING_KICK, _q(1 | 0x100), [], ack),
            lambda: Step(R.SET_VRING_CALL, _q(1 | 0x100), [], ack),
            lambda: Step(R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + r0, [f0], ack),
            lambda: Step(R.SET_VRING_NUM, struct.pack("<II", 0, QSIZE), flags=ack),
            lambda: Step(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, u(DESC_GPA) + 0x1000,
                                                       u(USED_GPA) + 0x1000,
                                                       u(AVAIL_GPA) + 0x1000, 0), flags=ack),
            lambda: Step(R.SET_VRING_ENABLE, struct.pack("<II", 1, 0), flags=ack),
            lambda: Step(R.SET_LOG_BASE, _q(4096, 0), ["short"], ack),
            lambda: Step(R.GET_INFLIGHT_FD, _q(0, 0) + struct.pack("<HH", 2, 64) + bytes(4)),
        ]
        for _ in range(rng.randrange(0, 8)):
            steps.append(rng.choice(menu)())
        return steps

    def mutate(self, steps: list[Step]) -> list[Step]:
        rng = self.rng
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4, 5))):
            if not steps:
                break
            kind = rng.randrange(13)
            i = rng.randrange(len(steps))
            s = steps[i]
            name = ("drop", "dup", "swap", "cut", "field", "flip", "size", "request", "flags",
                    "fds", "split", "garbage", "fd-dups")[kind]
            self.mutations[name] = self.mutations.get(name, 0) + 1
            if kind == 0:
                del steps[i]
            elif kind == 1:
                steps.insert(i, Step(s.request, s.payload, list(s.fds), s.flags))
            elif kind == 2:
                j = rng.randrange(len(steps))
                steps[i], steps[j] = steps[j], steps[i]
            elif kind == 3:
                del steps[i:]
            elif kind == 4 and len(s.payload) >= 8:
                off = rng.randrange(0, len(s.payload) - 3) & ~3
                width = 8 if off + 8 <= len(s.payload) and rng.random() < 0.6 else 4
                old = int.from_bytes(s.payload[off:off + width], "little")
                value = rng.choice(INTERESTING) if rng.random() < 0.6 else \
                    old + rng.choice((-4096, -16, -1, 1, 2, 16, 4096, MiB, 1 << 30))
                value &= (1 << (8 * width)) - 1
                s.payload = s.payload[:off] + value.to_bytes(width, "little") + \
                    s.payload[off + width:]
            elif kind == 5 and s.payload:
                b = bytearray(s.payload)
                for _ in range(rng.randrange(1, 4)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                s.payload = bytes(b)
            elif kind == 6:
                n = len(s.payload)
                s.payload = s.payload[:max(0, n + rng.choice((-8, -4, -1)))] \
                    if rng.random() < 0.5 else s.payload + rng.randbytes(rng.choice((1, 4, 8)))
            elif kind == 7:
                s.request = rng.choice(list(R)) if rng.random() < 0.8 else rng.randrange(1 << 32)
            elif kind == 8:
                s.flags = rng.choice((0, 1, 2, 3, VERSION | 0x4, VERSION | 0x10,
                                      rng.randrange(1 << 32)))
            elif kind == 9:
                s.fds = [rng.choice(self.pool.names) for _ in range(rng.choice((0, 1, 1, 2, 3,
                                                                                8, 9)))]
            elif kind == 10:
                s.split = rng.randrange(1, HEADER.size + len(s.payload) + 1)
                s.fds_on_second = rng.random() < 0.5
            elif kind == 11:
                steps.insert(i, Step(rng.randrange(1 << 32), rng.randbytes(rng.randrange(64))))
            elif kind == 12 and s.fds:
                s.fds = [s.fds[0]] * rng.choice((len(s.fds), len(s.fds) + 1))
        return steps

    def scribble_ring(self) -> None:
        """Garbage in the TX ring's memory: the daemon's worker must break only that queue."""
        self.scribbles += 1
        rng = self.rng
        for gpa, n in ((DESC_GPA, 16 * QSIZE), (AVAIL_GPA, 4 + 2 * QSIZE)):
            self.ram.write(gpa, rng.randbytes(n))

    def clean_ring(self) -> None:
        self.ram.write(DESC_GPA, bytes(0x800))

    # -- one case --------------------------------------------------------------------------------

    def run_case(self) -> None:
        self.cases += 1
        steps = self.mutate(self.valid_steps())
        self.last_steps = steps
        if self.rng.random() < 0.1:
            self.scribble_ring()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(10.0)
        try:
            sock.connect(self.daemon.path)
            for step in steps:
                if not self._send(sock, step):
                    self.closed_by_daemon_early += 1
                    break
                self._drain(sock, 0.0)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if not self._drain(sock, 10.0):
                self.hangs += 1
        finally:
            sock.close()
            self.clean_ring()

    def _send(self, sock: socket.socket, step: Step) -> bool:
        data = step.encode()
        fds = [self.pool.fds[n] for n in step.fds]
        parts = [(data, fds)] if not step.split or step.split >= len(data) else (
            [(data[:step.split], [] if step.fds_on_second else fds),
             (data[step.split:], fds if step.fds_on_second else [])])
        try:
            for chunk, chunk_fds in parts:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk_fds))] \
                    if chunk_fds else []
                sent = sock.sendmsg([chunk], anc)
                if sent < len(chunk):
                    sock.sendall(chunk[sent:])
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                return False
            raise
        return True

    def _drain(self, sock: socket.socket, timeout: float) -> bool:
        """Read (and drop) what the daemon sent; True once it closed (or nothing is pending
        when timeout is 0), False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                return timeout == 0.0
            try:
                data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
            except (ConnectionResetError, BrokenPipeError):
                return True
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % 4])
                    for fd in a:
                        os.close(fd)
            if not data:
                return True
            self.replies += 1

    # -- invariants --------------------------------------------------------------------------

    def wait_idle(self) -> None:
        self.daemon.wait_idle(self.cases)

    def well_behaved_session(self, frames: int = 32) -> int:
        """A clean session after the storm: returns the packets the daemon counted."""
        before = self.daemon.server.stats().get("tx_packets", 0)
        with GuestRam([(0, 2 * MiB)]) as ram, \
                VhostUserFrontend(self.daemon.path, timeout=30.0) as fe:
            fe.negotiate(FEATURES, PROTOCOL)
            fe.set_mem_table(ram)
            fe.setup_queue(1, MockSplitQueue(ram, 64, event_idx=True))
            fe.enable_queue(1)
            fe.send_frames(1, [bytes(60)] * frames)
            fe.wait_tx_done(1)
            assert fe.get_vring_base(1) == frames
        self.cases += 1  # a connection the daemon counts too
        self.wait_idle()
        return self.daemon.server.stats()["tx_packets"] - before


def describe_steps(steps: list[Step]) -> str:
    def name(req: int) -> str:
        try:
            return R(req).name
        except ValueError:
            return str(req)
    return "; ".join(f"{name(s.request)} flags={s.flags:#x} payload={s.payload.hex()} "
                     f"fds={s.fds}" + (f" split={s.split}/{s.fds_on_second}" if s.split else "")
                     for s in steps)


@dataclass
class RunResult:
    cases: int
    seconds: float
    failures: list[str]
    report: dict


def run(cases: int, seed: int = 1, check_every: int = 1000, progress: float = 0.0,
        seconds: float | None = None) -> RunResult:
    failures: list[str] = []
    counter, restore = quiet_pyvhost_logs()
    start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="pyvhost-ffuzz-")
    path = os.path.join(tmp, "vhost.sock")
    baseline = after = None
    checks = 0
    try:
        fz = FrontendFuzzer(path, seed)
        try:
            # Warm-up: the first bursts of a process load (or, after a source change, compile)
            # the kernels inside a worker's epoch, which can outlast a grace period's bound.
            fz.well_behaved_session()
            baseline = snapshot()
            fds0 = fd_table()
            last = start
            while fz.cases < cases:
                fz.run_case()
                if not fz.daemon.alive:
                    failures.append(f"daemon thread died at case {fz.cases}")
                    break
                now = time.monotonic()
                if fz.cases % check_every == 0 or fz.cases >= cases:
                    fz.wait_idle()
                    checks += 1
                    snap = snapshot()
                    if snap != baseline:
                        fds1 = fd_table()
                        failures.append(f"after {fz.cases} cases: {snap} (baseline {baseline}): "
                                        f"{describe_leak(fds0, fds1)}; last case: "
                                        f"{describe_steps(fz.last_steps)}")
                        baseline, fds0 = snap, fds1  # report each new leak once
                if progress and now - last > progress:
                    last = now
                    print(f"[frontend_fuzz] {fz.cases} cases, {fz.cases / (now - start):.0f}/s, "
                          f"{fz.hangs} hangs, {len(failures)} failures", file=sys.stderr,
                          flush=True)
                if seconds is not None and now - start > seconds:
                    break
            fz.wait_idle()
            after = snapshot()
            counted = fz.well_behaved_session()
            if counted != 32:
                failures.append(f"well-behaved session: {counted} packets counted, not 32")
            if fz.hangs:
                failures.append(f"{fz.hangs} connections not closed within 10 s")
            for msg, tb in counter.samples.items():
                failures.append(f"internal error logged: {msg}\n{tb}")
            report = {"cases": fz.cases - 1, "replies_read": fz.replies,
                      "closed_by_daemon_mid_sequence": fz.closed_by_daemon_early,
                      "ring_scribbles": fz.scribbles, "mutations": dict(sorted(
                          fz.mutations.items())), "leak_checks": checks,
                      "baseline": str(baseline), "after": str(after),
                      "daemon_stats": {k: v for k, v in fz.daemon.server.stats().items()
                                       if k in ("connections", "requests", "requests_refused",
                                                "queues_broken", "leaked_mappings",
                                                "grace_timeouts", "tx_packets")},
                      "log_records": dict(sorted(counter.counts.items()))}
        finally:
            fz.close()
    finally:
        restore()
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return RunResult(report["cases"], time.monotonic() - start, failures, report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = run(args.cases, args.seed, args.check_every, progress=15.0, seconds=args.seconds)
    report = {"seed": args.seed, "cases": res.cases, "seconds": round(res.seconds, 1),
              "cases_per_s": round(res.cases / res.seconds, 1), "failures": res.failures,
              **res.report}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
