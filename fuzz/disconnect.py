"""Frontends killed mid-traffic: a subprocess frontend (forked from a preloaded forkserver)
negotiates with a live net daemon, maps memory, starts a TX ring and sends at full rate; the
harness SIGKILLs it — mostly once frames flow, after a random delay, sometimes while it is
still negotiating — and starts the next one.

Checked: each frontend that got as far as sending had its session served (its first frames
completed), so the daemon served the next connection every time; the daemon thread never
died and logged no internal error; every `--check-every` kills and at the end a clean session
is served and this process's fd count, memfd mappings and thread count equal the baseline.

    python -m fuzz.disconnect --kills 1000 [--poll]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyvhost.daemon.backend import BackendOptions
from pyvhost.testing.churn import (TIMEOUT, DaemonThread, clean_session, quiet_pyvhost_logs,
                                   snapshot, traffic_frontend)


@dataclass
class RunResult:
    failures: list[str]
    report: dict


def _noop() -> None:
    pass


def run(kills: int, *, poll: bool = False, seed: int = 1, max_delay: float = 0.05,
        early_share: float = 0.15, check_every: int = 100, progress: float = 0.0) -> RunResult:
    failures: list[str] = []
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pyvhost.testing.churn", "pyvhost.testing.frontend"])
    counter, restore = quiet_pyvhost_logs()
    tmp = tempfile.mkdtemp(prefix="pyvhost-disc-")
    path = os.path.join(tmp, "vhost.sock")
    killed_early = killed_sending = 0
    checks = 0
    start = last = time.monotonic()
    daemon = DaemonThread(path, options=BackendOptions(poll=poll))
    try:
        p = ctx.Process(target=_noop)  # starts the forkserver (its fds are made now)
        p.start()
        p.join()
        p.close()
        clean_session(path)  # warm-up: kernels loaded before any burst counts
        daemon.wait_idle(1)
        baseline = snapshot()
        for i in range(kills):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=traffic_frontend, args=(path, send, i), daemon=True)
            proc.start()
            send.close()
            try:
                if rng.random() < early_share:
                    time.sleep(rng.uniform(0, 0.03))
                    killed_early += 1
                else:
                    if not recv.poll(TIMEOUT):
                        failures.append(f"kill {i}: frontend never got its frames through "
                                        f"(exit code {proc.exitcode})")
                        break
                    recv.recv()
                    time.sleep(rng.uniform(0, max_delay))
                    killed_sending += 1
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(TIMEOUT)
            finally:
                proc.close()
                recv.close()
            if not daemon.alive:
                failures.append(f"daemon thread died after kill {i}")
                break
            if (i + 1) % check_every == 0 or i + 1 == kills:
                clean_session(path)  # served only after every earlier connection ended
                deadline = time.monotonic() + TIMEOUT
                while daemon.server.current is not None and time.monotonic() < deadline:
                    time.sleep(0.001)
                checks += 1
                snap = snapshot()
                if snap != baseline:
                    failures.append(f"after {i + 1} kills: {snap} (baseline {baseline})")
                    baseline = snap
            now = time.monotonic()
            if progress and now - last > progress:
                last = now
                print(f"[disconnect] {i + 1} kills, {len(failures)} failures", file=sys.stderr,
                      flush=True)
        for msg, tb in counter.samples.items():
            failures.append(f"internal error logged: {msg}\n{tb}")
        stats = daemon.server.stats()
        report = {"kills": killed_early + killed_sending, "killed_while_sending": killed_sending,
                  "killed_early": killed_early, "leak_checks": checks,
                  "baseline": str(baseline), "after": str(snapshot()), "poll": poll,
                  "daemon_stats": {k: stats.get(k) for k in (
                      "connections", "tx_packets", "queues_broken", "leaked_mappings",
                      "grace_timeouts", "grace_max_s")},
                  "daemon_errors_logged": dict(counter.errors),
                  "seconds": round(time.monotonic() - start, 1)}
        if stats.get("leaked_mappings"):
            failures.append(f"leaked mappings: {stats['leaked_mappings']}")
    finally:
        daemon.stop()
        restore()
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return RunResult(failures, report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--poll", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = run(args.kills, poll=args.poll, seed=args.seed, check_every=args.check_every,
              progress=15.0)
    report = {"failures": res.failures, **res.report}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
