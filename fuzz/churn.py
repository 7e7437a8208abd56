"""Memory-map churn under full traffic, against a live daemon.

The daemon (`Server` with a `SeqSink` device, in a thread of this process) serves a frontend
running in a subprocess (`python -m pyvhost.testing.churn frontend`, a `ChurnFrontend`): it
sends sequence-numbered frames at full rate on one queue while it cycles through seven
memory-map changes — move the rings to the alias mapping of their region and back
(SET_VRING_ADDR), remove and re-add the alias (REM/ADD_MEM_REG), remove the region holding
half the packet buffers and add new memory in its place (REM/ADD_MEM_REG), and replace the
whole table with new fds for the same memory (SET_MEM_TABLE) — timing each request's round
trip.

Checked afterwards: every frame sent was seen exactly once, in order, with its payload intact
(0 lost, 0 duplicates, 0 stale or corrupt reads), GET_VRING_BASE agrees, no queue broke, no
grace period timed out, no mapping leaked, no internal error was logged, fds / memfd mappings
/ threads are back at their baseline, and the direct map was rebuilt after every change (no
round ran on the copy path). Reported: round trips (p50/p99/max, by operation), the daemon's
grace periods, direct vs copy rounds, invalidations, the longest data-path stall seen by the
device and by the driver.

    python -m fuzz.churn --ops 10000 [--poll] [--stress 2] [--switch-interval 0.0005]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyvhost.daemon.backend import BackendOptions
from pyvhost.testing.churn import (DaemonThread, SeqSink, percentiles, quiet_pyvhost_logs,
                                   snapshot)


@dataclass
class RunResult:
    failures: list[str]
    report: dict


def _stress(n: int, seconds: float) -> list[subprocess.Popen]:
    """n CPU hogs at normal priority for at most `seconds` (heavy contention on 2 cores)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


class Tracer:
    """Diagnosis only: timestamps (CLOCK_MONOTONIC, shared with the frontend process) of each
    request's path through the daemon — protocol thread woken, bytes received, handler start
    and end, grace periods inside it, reply sent — by wrapping the daemon's methods."""

    def __init__(self) -> None:
        from pyvhost.daemon import backend, unix_socket
        from pyvhost.memory import epoch
        self.records: list[dict] = []
        self._cur: dict = {}
        self._undo = []
        tr = self

        def wrap(cls, name, before=None, after=None):
            orig = getattr(cls, name)

            def wrapper(*a, **k):
                if before:
                    before()
                try:
                    return orig(*a, **k)
                finally:
                    if after:
                        after()
            setattr(cls, name, wrapper)
            self._undo.append((cls, name, orig))

        now = time.perf_counter
        wrap(unix_socket.Connection, "wait_readable", after=lambda: tr._new(now()))
        wrap(unix_socket.Connection, "recv_message_bytes",
             after=lambda: tr._cur.__setitem__("recv", now()))
        wrap(backend.Backend, "receive", before=lambda: tr._cur.__setitem__("start", now()),
             after=lambda: tr._cur.__setitem__("end", now()))
        wrap(unix_socket.Connection, "send", after=lambda: tr._cur.__setitem__("sent", now()))
        orig_sync = epoch.EpochDomain.synchronize

        def sync(self_, timeout: float = 1.0) -> float:
            waited = orig_sync(self_, timeout)
            tr._cur["grace"] = tr._cur.get("grace", 0.0) + waited
            return waited
        epoch.EpochDomain.synchronize = sync
        self._undo.append((epoch.EpochDomain, "synchronize", orig_sync))

    def _new(self, t: float) -> None:
        self._cur = {"wake": t}
        self.records.append(self._cur)

    def restore(self) -> None:
        for cls, name, orig in reversed(self._undo):
            setattr(cls, name, orig)

    def breakdown(self, op_times: list[tuple[float, float]]) -> dict:
        """Per request: frontend send -> daemon woken -> received -> handler start -> handler
        end (grace periods inside) -> reply sent -> frontend has the reply."""
        recs = [r for r in self.records if "sent" in r and "start" in r]
        phases: dict[str, list[float]] = {k: [] for k in (
            "send_to_wake", "wake_to_received", "received_to_handler", "handler_excl_grace",
            "grace", "handler_to_sent", "sent_to_frontend")}
        j = 0
        for t0, t1 in op_times:
            while j < len(recs) and recs[j]["wake"] < t0:
                j += 1
            if j == len(recs) or recs[j]["sent"] > t1:
                continue
            r = recs[j]
            g = r.get("grace", 0.0)
            phases["send_to_wake"].append(r["wake"] - t0)
            phases["wake_to_received"].append(r["recv"] - r["wake"])
            phases["received_to_handler"].append(r["start"] - r["recv"])
            phases["handler_excl_grace"].append(r["end"] - r["start"] - g)
            phases["grace"].append(g)
            phases["handler_to_sent"].append(r["sent"] - r["end"])
            phases["sent_to_frontend"].append(t1 - r["sent"])
        return {k: percentiles(v) for k, v in phases.items()}


def run(ops: int, *, poll: bool = False, qsize: int = 256, seed: int = 1, stress: int = 0,
        switch_interval: float | None = None, timeout: float = 3600.0,
        trace: bool = False) -> RunResult:
    failures: list[str] = []
    counter, restore = quiet_pyvhost_logs()
    old_switch = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    tmp = tempfile.mkdtemp(prefix="pyvhost-churn-")
    path = os.path.join(tmp, "vhost.sock")
    devices: list[SeqSink] = []

    def factory() -> SeqSink:
        devices.append(SeqSink())
        return devices[-1]

    hogs: list[subprocess.Popen] = []
    try:
        SeqSink().warm_up()
        tracer = Tracer() if trace else None
        daemon = DaemonThread(path, factory, BackendOptions(poll=poll))
        try:
            baseline = snapshot()
            hogs = _stress(stress, timeout)
            # Its output goes to files, not pipes: with --trace it prints more than a pipe
            # holds, and this loop does not read until the frontend has exited.
            out_file = open(os.path.join(tmp, "frontend.out"), "w+")
            err_file = open(os.path.join(tmp, "frontend.err"), "w+")
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyvhost.testing.churn", "frontend", "--path", path,
                 "--ops", str(ops), "--qsize", str(qsize), "--seed", str(seed)]
                + (["--trace"] if trace else []),
                stdout=out_file, stderr=err_file, text=True)
            backend = None
            t0 = time.monotonic()
            while proc.poll() is None:
                if backend is None:
                    backend = daemon.server.current
                if time.monotonic() - t0 > timeout:
                    proc.kill()
                    failures.append("frontend did not finish in time")
                    break
                time.sleep(0.01)
            proc.wait()
            with out_file, err_file:
                out_file.seek(0)
                err_file.seek(0)
                out, err = out_file.read(), err_file.read()
            for h in hogs:
                h.kill()
                h.wait()
            hogs = []
            if proc.returncode != 0:
                failures.append(f"frontend exited {proc.returncode}: {err[-3000:]}")
            daemon.wait_idle(1)
            after = snapshot()
            if after != baseline:
                failures.append(f"after the session: {after} (baseline {baseline})")
            fe = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {}
            # ChurnFrontend prints nothing on failure; its stderr is in failures.
            dev = devices[-1].stats() if devices else {}  # [0] may be the warm-up device
            if tracer is not None and fe.get("op_times"):
                fe["phases"] = tracer.breakdown(fe.pop("op_times"))
            fe.pop("op_times", None)
            report: dict = {"ops": ops, "poll": poll, "queue_size": qsize, "stress": stress,
                            "switch_interval_s": sys.getswitchinterval(), "frontend": fe,
                            "device": dev}
            if backend is not None:
                qs = backend.vrings[0].queue.stats
                g = backend.memory.grace
                total = qs.direct_rounds + qs.copy_rounds
                report["daemon"] = {
                    "direct_rounds": qs.direct_rounds, "copy_rounds": qs.copy_rounds,
                    "direct_share": round(qs.direct_rounds / max(total, 1), 6),
                    "copy_reasons": dict(qs.copy_reasons), "invalidations": qs.invalidations,
                    "grace": {**percentiles(g.recent), "count": g.count,
                              "timeouts": g.timeouts,
                              "slowest_at": sorted(range(len(g.recent)),
                                                   key=g.recent.__getitem__)[-3:]},
                    **{k: v for k, v in backend.stats().items()
                       if k in ("queues_broken", "leaked_mappings", "requests",
                                "requests_refused")}}
                d = report["daemon"]
                if d["copy_rounds"]:
                    failures.append(f"{d['copy_rounds']} rounds on the copy path: "
                                    f"{d['copy_reasons']}")
                for key in ("queues_broken", "leaked_mappings", "requests_refused"):
                    if d[key]:
                        failures.append(f"daemon {key} = {d[key]}")
                if g.timeouts:
                    failures.append(f"{g.timeouts} grace periods timed out")
            else:
                failures.append("no session seen")
            if fe:
                sent = fe["frames_sent"]
                if not fe["vring_base_matches"]:
                    failures.append(f"GET_VRING_BASE {fe['vring_base']} != {sent} mod 2**16")
                if dev.get("frames_ok") != sent or dev.get("next_expected") != sent + 1:
                    failures.append(f"{sent} frames sent, device saw {dev}")
                for key in ("frames_lost", "frames_dup", "frames_stale"):
                    if dev.get(key):
                        failures.append(f"{key} = {dev[key]}")
            for msg, tb in counter.samples.items():
                failures.append(f"internal error logged: {msg}\n{tb}")
            report["daemon_errors_logged"] = dict(counter.errors)
            if counter.errors:
                failures.append(f"errors logged: {counter.errors}")
        finally:
            daemon.stop()
            if tracer is not None:
                tracer.restore()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        sys.setswitchinterval(old_switch)
        restore()
        shutil.rmtree(tmp, ignore_errors=True)
    return RunResult(failures, report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=700)
    ap.add_argument("--poll", action="store_true", help="busy-polling worker")
    ap.add_argument("--qsize", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stress", type=int, default=0, help="CPU hogs running meanwhile")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval for the daemon")
    ap.add_argument("--trace", action="store_true",
                    help="break each request's round trip down into phases (diagnosis)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    res = run(args.ops, poll=args.poll, qsize=args.qsize, seed=args.seed, stress=args.stress,
              switch_interval=args.switch_interval, trace=args.trace)
    report = {"seconds": round(time.monotonic() - t0, 1), "failures": res.failures,
              **res.report}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
