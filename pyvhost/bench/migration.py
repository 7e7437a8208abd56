"""Live-migration figures: QEMU's total time and downtime with pyvhost net as the NIC's backend,
alternated with DPDK's C vhost PMD serving the same NIC.

Each sample is one fresh test bed (`pyvhost.testing.migration.MigrationBed`): a namespace with a
bridge, two backends of one kind with identical options, TAPs as their wires, the test guest
booted under TCG on QEMU A, and QEMU B waiting (`-incoming defer`). While traffic flows both
ways — ICMP echo requests from the namespace, 1000-byte payload unique per sequence number,
every reply checked; a TCP stream the guest sends, paced, its MD5 checked — the guest migrates
A -> B over a Unix socket with QEMU's default parameters (128 MiB/s, 300 ms downtime limit;
`--max-bandwidth` throttles it, so the dirty log is read over more rounds).
`--migrations-per-boot N` migrates it back and forth N times per boot (B -> A on fresh QEMUs).

- pyvhost: `pyvhost net --socket-path S --tap NAME` (interrupt-driven, default options);
- DPDK: `dpdk-testpmd --vdev net_vhost0,iface=S --vdev net_tap0,iface=NAME
  --forward-mode=io` (the vhost PMD offers VHOST_F_LOG_ALL and protocol LOG_SHMFD in 22.11;
  both testpmds busy-poll the last CPU).

Figures per migration, as QEMU reports them on the source (`query-migrate`): total-time,
downtime (VM stopped -> destination running), setup-time, RAM transferred, dirty-sync count.
Also measured from outside: the longest gap between echo replies around the switchover (what a
peer sees: downtime, the guest's resume, the bridge relearning the MAC) and how long after
`completed` the bridge forwarded to the destination's TAP. A sample counts only if QEMU says
`completed`, the TCP stream's MD5 matches and no echo reply is wrong or duplicated.

Backends alternate within every round and the order rotates between rounds, so machine noise
hits both alike. Outputs (in --out-dir): `migration.json` (every sample, the machine),
`migration.md` (median [min-max] per backend).

    python -m pyvhost.bench.migration [--rounds N] [--backends pyvhost,dpdk]
        [--migrations-per-boot N] [--max-bandwidth MIB_S] [--out-dir DIR] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from pyvhost.bench.vhost import machine_description
from pyvhost.testing import migration as mig
from pyvhost.testing import testbed as tb

BACKENDS = ("pyvhost", "dpdk")
LABELS = {"pyvhost": "pyvhost net `--tap`", "dpdk": "DPDK 22.11 vhost PMD + tap PMD (testpmd `io`)"}
CHUNK = 16384


@dataclasses.dataclass
class Sample:
    backend: str
    round: int
    migration: int                       # 0 = the first after boot, then back and forth
    status: str | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    transferred_mib: float | None = None
    dirty_syncs: int | None = None
    reply_gap_ms: float | None = None     # longest gap between echo replies around it
    mac_moved_s: float | None = None      # from `completed` to the bridge using the new TAP
    pings_answered: int | None = None
    pings_sent: int | None = None
    pings_bad: int | None = None          # wrong payload or duplicate
    tcp_bytes: int | None = None
    tcp_ok: bool | None = None
    boot_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.status == "completed" and bool(self.tcp_ok)
                and self.pings_bad == 0)


def measure(backend: str, rnd: int, migrations: int, log_dir: Path | None,
            max_bandwidth: int | None = None) -> list[Sample]:
    """One bed: boot, then `migrations` migrations under traffic; a Sample each."""
    samples: list[Sample] = []
    keep = log_dir / f"{backend}-round{rnd}" if log_dir else None
    with mig.MigrationBed(backend, keep_dir=keep) as bed:
        src = bed.boot()
        for n in range(migrations):
            sample = Sample(backend, rnd, n, boot_s=src.boot_seconds)
            samples.append(sample)
            try:
                migrate_once(bed, sample, max_bandwidth)
            except Exception as exc:  # record, keep the other samples going
                sample.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
                break
    return samples


def migrate_once(bed: mig.MigrationBed, sample: Sample, max_bandwidth: int | None = None) -> None:
    src = bed.source
    assert src is not None
    dst = bed.start_destination()
    dst_tap = bed.tap_of(dst)
    with mig.Pinger(bed) as pinger, \
            mig.guest_tcp_sender(src.console, bed, 5001, chunk=CHUNK) as sink:
        time.sleep(2)
        result = bed.migrate(dst, max_bandwidth=max_bandwidth, timeout=300)
        assert isinstance(result, mig.MigrationResult)
        sample.status = result.status
        sample.total_time_ms = result.total_time_ms
        sample.downtime_ms = result.downtime_ms
        sample.setup_time_ms = result.setup_time_ms
        sample.transferred_mib = round(result.ram.get("transferred", 0) / 2**20, 1)
        sample.dirty_syncs = result.ram.get("dirty-sync-count")
        if result.status != "completed":
            raise tb.TestbedError(f"migration {result.status}: {result.error}")
        bed.wait_guest_mac_on(dst_tap, timeout=30)
        sample.mac_moved_s = round(time.monotonic() - result.ended, 3)
        bed.finish_switchover(dst)
        time.sleep(3)
        chunks, guest_md5, nc_status = mig.stop_guest_tcp_sender(dst.console, CHUNK)
        stream = sink.finish()
        report = pinger.stop()
    sample.tcp_bytes = stream["bytes"]
    sample.tcp_ok = (nc_status == 0 and stream["md5"] == guest_md5
                     and stream["bytes"] == chunks * CHUNK)
    sample.pings_answered, sample.pings_sent = report.answered()
    sample.pings_bad = len(report.corrupt) + report.dups
    gap = report.longest_gap(result.started - 1.0, result.ended + 3.0)
    sample.reply_gap_ms = round(gap * 1e3, 1) if gap != float("inf") else None


# -- summary ------------------------------------------------------------------------------------

FIGURES = (("total_time_ms", "total time (ms)"), ("downtime_ms", "downtime (ms)"),
           ("setup_time_ms", "setup (ms)"), ("reply_gap_ms", "longest echo-reply gap (ms)"),
           ("mac_moved_s", "bridge forwards to the new TAP, after `completed` (s)"),
           ("transferred_mib", "RAM sent (MiB)"), ("dirty_syncs", "dirty syncs"))


def stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        mine = [s for s in samples if s.backend == backend]
        if not mine:
            continue
        good = [s for s in mine if s.ok]
        summary[backend] = {key: stats([getattr(s, key) for s in good
                                        if getattr(s, key) is not None])
                            for key, _ in FIGURES}
        summary[backend]["ok"] = len(good)
        summary[backend]["samples"] = len(mine)
    return summary


def _cell(st: dict[str, float] | None) -> str:
    if not st:
        return "—"
    fmt = "{:.0f}" if st["median"] >= 10 else "{:.1f}" if st["median"] >= 1 else "{:.2f}"
    return f"{fmt.format(st['median'])} [{fmt.format(st['min'])}–{fmt.format(st['max'])}]"


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    backends = [b for b in BACKENDS if b in summary]
    lines = ["| median [min–max] | " + " | ".join(LABELS[b] for b in backends) + " |",
             "|---|" + "---:|" * len(backends)]
    for key, label in FIGURES:
        lines.append(f"| {label} | " + " | ".join(_cell(summary[b][key]) for b in backends)
                     + " |")
    lines.append("| migrations completed and checked / run | "
                 + " | ".join(f"{summary[b]['ok']}/{summary[b]['samples']}" for b in backends)
                 + " |")
    m = result["machine"]
    bandwidth = result["settings"].get("max_bandwidth_mib_s")
    lines += ["", f"{result['settings']['rounds']} rounds, max-bandwidth "
              f"{f'{bandwidth:g} MiB/s' if bandwidth else 'QEMU default (128 MiB/s)'}, "
              f"{result['settings']['migrations_per_boot']} migration(s) per boot, backends "
              f"alternated; {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
              f"QEMU {result['qemu']}, DPDK {m['dpdk']}, pyvhost {m['pyvhost_commit']}, "
              f"{m['date']}; load average {m['loadavg_start'][0]:.2f} at start, "
              f"{m['loadavg_end'][0]:.2f} at end."]
    return "\n".join(lines) + "\n"


def _qemu_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([tb.find_qemu(), "--version"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.split("\n")[0].replace("QEMU emulator version ", "")
    return "?"


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every bed cleans up — in this process only.

    pyroute2 opens a netlink socket inside a namespace from a forked child, which inherits the
    handler and is ended with SIGTERM: unwinding there ran the bed's cleanup in the child (it
    removed the parent's namespace and work directory). A forked child dies as by default.
    """
    owner = os.getpid()

    def raise_interrupt(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}: choose from {BACKENDS}")
    tb.find_qemu()
    tb.guest_image_paths()
    if "dpdk" in backends:
        tb.find_testpmd()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description(tb.hugepages_available(256))
    bandwidth = int(args.max_bandwidth * 2**20) if args.max_bandwidth else None
    samples: list[Sample] = []
    started = time.monotonic()
    with _terminate_as_interrupt():
        for rnd in range(args.rounds):
            order = backends[rnd % len(backends):] + backends[:rnd % len(backends)]
            for backend in order:
                try:
                    got = measure(backend, rnd, args.migrations_per_boot,
                                  Path(args.log_dir) if args.log_dir else None,
                                  bandwidth)
                except Exception as exc:
                    traceback.print_exc(file=sys.stderr)
                    got = [Sample(backend, rnd, 0, error=f"{type(exc).__name__}: {exc}")]
                samples += got
                for s in got:
                    print(f"[round {rnd} {backend:7s} #{s.migration}] {s.status}: total "
                          f"{s.total_time_ms} ms, downtime {s.downtime_ms} ms, reply gap "
                          f"{s.reply_gap_ms} ms, tcp {'ok' if s.tcp_ok else s.tcp_ok}, bad "
                          f"pings {s.pings_bad}{'  ' + s.error if s.error else ''}",
                          file=sys.stderr, flush=True)
    machine["loadavg_end"] = list(os.getloadavg())
    result = {
        "settings": {"rounds": args.rounds, "backends": backends,
                     "migrations_per_boot": args.migrations_per_boot,
                     "max_bandwidth_mib_s": args.max_bandwidth,
                     "guest_ram_kib": mig.GUEST_RAM_KIB},
        "machine": machine,
        "qemu": _qemu_version(),
        "summary": summarize(samples),
        "elapsed_s": round(time.monotonic() - started, 1),
        "samples": [dict(dataclasses.asdict(s), ok=s.ok) for s in samples],
    }
    (out_dir / "migration.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out_dir / "migration.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / 'migration.json'}, {out_dir / 'migration.md'}", file=sys.stderr)
    return 0 if all(s.ok for s in samples) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvhost.bench.migration",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; each boots one bed per backend (default 5)")
    parser.add_argument("--backends", default="pyvhost,dpdk",
                        help="comma-separated, from: " + ", ".join(BACKENDS))
    parser.add_argument("--migrations-per-boot", type=int, default=1,
                        help="migrations per boot, back and forth (default 1)")
    parser.add_argument("--max-bandwidth", type=float, default=None, metavar="MIB_S",
                        help="migrate-set-parameters max-bandwidth in MiB/s (default: QEMU's, "
                             "128 MiB/s)")
    parser.add_argument("--out-dir", default="bench-out", help="where the results go")
    parser.add_argument("--log-dir", default=None,
                        help="keep each bed's logs (backends, QEMU stderr, consoles) here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
