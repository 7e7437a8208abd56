"""pyvhost bench blk: 4 KiB random I/O per second of pyvhost blk against qemu-storage-daemon.

One front-end drives every back-end: `pyvhost.testing.blk_frontend.BlkBenchFrontend`, a
compiled (numba, nogil) virtio-blk driver over vhost-user that keeps QD requests in flight on
one queue (Linux-shaped requests: an indirect table of header, 4 KiB data, status), polling the
used ring. The back-ends, each its own process pinned to one CPU (the front-end on another):

- pyvhost: `pyvhost blk --queues 1 --file F [--direct]` (`--null SIZE` for the null device
  when this pyvhost has it; extra arguments, e.g. `--poll`, with --pyvhost-args);
- C peer: `qemu-storage-daemon --blockdev ... --object iothread,id=iot0 --export
  type=vhost-user-blk,...,writable=on,num-queues=1,iothread=iot0`;
- ceiling: host `fio --ioengine=io_uring --bs=4k` on the same file (no vhost-user at all).

Backings: `null` (qsd `null-co`, pyvhost `--null`: no I/O, reads leave the buffer as it is),
`pagecache` (a file on tmpfs, filled first: every read and write is a page-cache copy; qsd
`aio=io_uring,cache.direct=off`), `direct` (a file on disk, filled first, opened O_DIRECT; qsd
`aio=io_uring,cache.direct=on`, pyvhost `--direct`, fio `--direct=1`).

Method. Each repetition starts, per backing, one fresh back-end process per contender (their
order rotates between repetitions) and runs every workload on one connection: 4 KiB randread
and randwrite at each QD, a warm-up then a measured window each. Figures: IOPS = requests
completed in the window / its length; latency percentiles of those requests (submit to reap;
at QD 1 the round trip through the back-end); the back-end's CPU-seconds (all its threads,
/proc/PID/stat) per million I/Os over the window. Every status byte is checked (`errors`).

Outputs (in --out-dir): `blk.json` (every sample, the machine), `blk.md` (tables), `blk.png`.

    pyvhost bench blk [--quick] [--repeat N] [--qd 1,8,32,128] [--backings null,pagecache,direct]
    python -m pyvhost.bench.blk ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from pyvhost.bench.options import (BLK_BACKINGS, BLK_CONTENDERS, BLK_WORKLOADS, FIO, PYVHOST,
                                   PYVHOST_THREADS, QSD, add_blk_arguments)
from pyvhost.bench.vhost import (_cpu_seconds, _git_changes, _git_commit,
                                  _terminate_as_interrupt)
from pyvhost.testing import testbed as tb
from pyvhost.testing.blk_frontend import READ, WRITE, BlkBenchFrontend

OPS = {"randread": READ, "randwrite": WRITE}
LABELS = {PYVHOST: "pyvhost blk", PYVHOST_THREADS: "pyvhost blk `--io threads`",
          QSD: "qemu-storage-daemon", FIO: "host fio (no vhost-user)"}
COLORS = {PYVHOST: "#1f77b4", PYVHOST_THREADS: "#9ecae1", QSD: "#d62728", FIO: "#7f7f7f"}
PYVHOSTS = (PYVHOST, PYVHOST_THREADS)
FILL_CHUNK = 1 << 20


@dataclasses.dataclass
class Settings:
    repeat: int
    warmup: float
    window: float
    qds: list[int]
    workloads: list[str]
    backings: list[str]
    contenders: list[str]
    size_mib: int
    cache_dir: str
    disk_dir: str
    backend_cpu: int
    frontend_cpu: int
    queue_size: int
    indirect: bool
    pyvhost_args: list[str]
    null_available: bool        # this pyvhost's `blk` has --null
    qsd_iothread: bool = True
    io_option: bool = False     # this pyvhost's `blk` has --io (uring|threads)
    interrupts: bool = False    # the front-end sleeps on the call eventfd instead of polling


@dataclasses.dataclass
class Sample:
    """One workload on one back-end process: `window_s` of QD requests in flight."""

    backing: str
    contender: str
    workload: str
    qd: int
    repetition: int
    iops: float | None = None
    completed: int | None = None
    errors: int | None = None               # requests completed with a status other than OK
    window_s: float | None = None
    lat_p50_us: float | None = None
    lat_p99_us: float | None = None
    lat_mean_us: float | None = None
    backend_cpu_s: float | None = None      # over the window, all threads
    cpu_s_per_mio: float | None = None      # backend CPU-seconds per million I/Os
    backend_cpu_share: float | None = None  # CPU time / window (1.0 = a whole core)
    frontend_cpu_share: float | None = None  # the polling front-end's: < 1 = preempted
    kicks_per_io: float | None = None
    sleeps_per_io: float | None = None      # front-end waits on the call eventfd (--interrupts)
    started: str = ""
    error: str | None = None


# -- machine ------------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "qsd": _version(["qemu-storage-daemon", "--version"]),
        "fio": _version(["fio", "--version"]),
        "pyvhost_commit": _git_commit(),
        "pyvhost_changes": _git_changes(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def _version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout:
            return out.stdout.splitlines()[0].strip()
    return None


def pyvhost_blk_options() -> set[str]:
    """The option strings `pyvhost blk` of this tree accepts (--null, --io... came over time)."""
    from pyvhost.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "blk" in action.choices:
            return {o for opt in action.choices["blk"]._actions for o in opt.option_strings}
    return set()


# -- backing files ------------------------------------------------------------------------------


def fill_file(path: Path, size: int, *, direct_io: bool) -> None:
    """Write `size` bytes of (repeated) random data, so every block is allocated and real:
    reads of holes or unwritten extents would never reach the storage."""
    chunk = os.urandom(FILL_CHUNK)
    with open(path, "wb") as f:
        for _ in range(size // FILL_CHUNK):
            f.write(chunk)
        f.flush()
        if direct_io:
            os.fsync(f.fileno())


@dataclasses.dataclass
class Backings:
    pagecache: Path | None
    direct: Path | None
    size: int

    def file(self, backing: str) -> Path | None:
        return {"pagecache": self.pagecache, "direct": self.direct}.get(backing)


@contextlib.contextmanager
def backing_files(settings: Settings) -> Iterator[Backings]:
    size = settings.size_mib << 20
    made: list[Path] = []
    try:
        paths: dict[str, Path | None] = {"pagecache": None, "direct": None}
        for backing, where in (("pagecache", settings.cache_dir), ("direct", settings.disk_dir)):
            if backing in settings.backings:
                fd, name = tempfile.mkstemp(prefix=f"pyvhost-bench-blk-{backing}-",
                                            suffix=".img", dir=where)
                os.close(fd)
                path = Path(name)
                made.append(path)
                fill_file(path, size, direct_io=backing == "direct")
                paths[backing] = path
        yield Backings(paths["pagecache"], paths["direct"], size)
    finally:
        for path in made:
            path.unlink(missing_ok=True)


# -- back-end processes -------------------------------------------------------------------------


def pyvhost_argv(settings: Settings, backing: str, file: Path | None, size: int,
                 sock: Path, threads: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "pyvhost", "blk", "--socket-path", str(sock), "--queues", "1",
            "--queue-size", str(max(settings.queue_size, 256)), "--log-level", "WARNING"]
    if backing == "null":
        argv += ["--null", str(size)]
    else:
        assert file is not None
        argv += ["--file", str(file)]
        if backing == "direct":
            argv.append("--direct")
    if threads:
        argv += ["--io", "threads"]
    return argv + settings.pyvhost_args


def qsd_argv(settings: Settings, backing: str, file: Path | None, size: int,
             sock: Path) -> list[str]:
    if backing == "null":
        blockdev = f"driver=null-co,node-name=disk,size={size},read-zeroes=off"
    else:
        direct = "on" if backing == "direct" else "off"
        blockdev = (f"driver=file,node-name=disk,filename={file},aio=io_uring,"
                    f"cache.direct={direct}")
    export = (f"type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={sock},"
              f"writable=on,num-queues=1")
    argv = ["qemu-storage-daemon", "--blockdev", blockdev]
    if settings.qsd_iothread:
        argv += ["--object", "iothread,id=iot0"]
        export += ",iothread=iot0"
    return argv + ["--export", export]


class Backend:
    """A back-end process pinned to one CPU, listening at `sock`."""

    def __init__(self, argv: list[str], sock: Path, cpu: int, log: Path,
                 start_timeout: float) -> None:
        self.argv = ["taskset", "-c", str(cpu), *argv]
        self.sock, self.log_path, self.start_timeout = sock, log, start_timeout
        self._proc: subprocess.Popen | None = None
        self._log: IO[str] | None = None

    def __enter__(self) -> "Backend":
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + self.start_timeout
            while not self.sock.exists():
                if self._proc.poll() is not None:
                    raise tb.TestbedError(f"{self.argv[3]} exited {self._proc.returncode}:\n"
                                          f"{self.tail()}")
                if time.monotonic() > deadline:
                    raise tb.TestbedError(f"{self.sock} did not appear within "
                                          f"{self.start_timeout} s:\n{self.tail()}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self, timeout: float = 20.0) -> None:
        tb._kill_and_reap(self._proc, signal.SIGINT, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.sock.unlink(missing_ok=True)


# -- measuring ----------------------------------------------------------------------------------


def _percentile_us(lat_ns: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(lat_ns, q)) / 1e3, 2) if len(lat_ns) else None


WARM_UP_TIMEOUT = 1800.0  # a cold numba cache on a loaded 2-CPU machine took over 10 minutes


def warm_up_pyvhost(settings: Settings, tmp: Path) -> float:
    """Start `pyvhost blk` once until it listens, so that its kernels are compiled (numba's
    cache) before any sample: a cold cache would otherwise land in the first sample's start
    and could outlast its timeout. Returns the seconds it took."""
    started = time.monotonic()
    print("pyvhost bench blk: warming pyvhost blk up (a cold numba cache compiles once)...",
          file=sys.stderr, flush=True)
    sock = tmp / "warm-up.sock"
    size = 1 << 20
    if settings.null_available:
        argv = pyvhost_argv(settings, "null", None, size, sock)
        with Backend(argv, sock, settings.backend_cpu, tmp / "warm-up.log", WARM_UP_TIMEOUT):
            pass
    else:
        image = tmp / "warm-up.img"
        image.write_bytes(bytes(size))
        argv = pyvhost_argv(settings, "pagecache", image, size, sock)
        with Backend(argv, sock, settings.backend_cpu, tmp / "warm-up.log", WARM_UP_TIMEOUT):
            pass
    return round(time.monotonic() - started, 1)


def backend_argv(settings: Settings, contender: str, backing: str, file: Path | None,
                 size: int, sock: Path) -> list[str]:
    if contender in PYVHOSTS:
        return pyvhost_argv(settings, backing, file, size, sock,
                            threads=contender == PYVHOST_THREADS)
    return qsd_argv(settings, backing, file, size, sock)


def measure_backend(settings: Settings, backing: str, contender: str, files: Backings,
                    tmp: Path, samples: Sequence[Sample]) -> None:
    """One back-end process; every workload of `samples` on one connection, in turn."""
    sock = tmp / f"{contender}-{backing}.sock"
    log = tmp / f"{contender}-{backing}.log"
    file = files.file(backing)
    argv = backend_argv(settings, contender, backing, file, files.size, sock)
    with Backend(argv, sock, settings.backend_cpu, log, start_timeout=600) as backend, \
            BlkBenchFrontend(str(sock), queue_size=settings.queue_size, max_qd=max(settings.qds),
                             indirect=settings.indirect, interrupts=settings.interrupts) as fe:
        for sample in samples:
            sample.started = _now()
            try:
                fe.start(OPS[sample.workload], sample.qd)
                warm = fe.run(settings.warmup)
                cpu0, own0 = _cpu_seconds(backend.pid), time.thread_time()
                r = fe.run(settings.window)
                cpu1, own1 = _cpu_seconds(backend.pid), time.thread_time()
            except Exception as exc:
                sample.error = f"{type(exc).__name__}: {exc}\n{backend.tail()}"
                if not backend.alive():
                    raise
                continue
            sample.completed, sample.window_s = r.completed, round(r.seconds, 4)
            sample.errors = r.errors + warm.errors
            sample.iops = r.iops
            sample.lat_p50_us = _percentile_us(r.latencies_ns, 50)
            sample.lat_p99_us = _percentile_us(r.latencies_ns, 99)
            sample.lat_mean_us = (round(r.latency_mean_ns / 1e3, 2)
                                  if r.latency_mean_ns is not None else None)
            sample.kicks_per_io = round(r.kicks / r.completed, 4) if r.completed else None
            sample.sleeps_per_io = round(r.sleeps / r.completed, 4) if r.completed else None
            sample.frontend_cpu_share = round((own1 - own0) / r.seconds, 3)
            if cpu0 is not None and cpu1 is not None:
                sample.backend_cpu_s = round(cpu1 - cpu0, 3)
                sample.backend_cpu_share = round((cpu1 - cpu0) / r.seconds, 3)
                if r.completed:
                    sample.cpu_s_per_mio = round((cpu1 - cpu0) / r.completed * 1e6, 3)
        fe.drain()


def fio_argv(settings: Settings, sample: Sample, file: Path) -> list[str]:
    return ["taskset", "-c", str(settings.backend_cpu), "fio", "--name=ceiling",
            f"--filename={file}", "--ioengine=io_uring", f"--rw={sample.workload}", "--bs=4k",
            f"--iodepth={sample.qd}", f"--direct={int(sample.backing == 'direct')}",
            "--time_based", f"--ramp_time={settings.warmup:g}", f"--runtime={settings.window:g}",
            "--norandommap", "--randrepeat=0", "--output-format=json"]


def measure_fio(settings: Settings, sample: Sample, file: Path) -> None:
    """Host fio on the back-ends' file, on the back-end CPU: what the storage gives with no
    vhost-user in between (fio's CPU is its own submission and completion work)."""
    sample.started = _now()
    argv = fio_argv(settings, sample, file)
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=settings.warmup + settings.window + 120)
    if out.returncode != 0:
        raise tb.TestbedError(f"fio exited {out.returncode}: {out.stderr[-2000:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read" if sample.workload == "randread" else "write"]
    runtime_s = side["runtime"] / 1e3
    sample.iops, sample.completed = side["iops"], side["total_ios"]
    sample.window_s = runtime_s
    sample.errors = job.get("error", 0)
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    sample.lat_p50_us = round(pct["50.000000"] / 1e3, 2) if "50.000000" in pct else None
    sample.lat_p99_us = round(pct["99.000000"] / 1e3, 2) if "99.000000" in pct else None
    lat = side.get("lat_ns", {})
    sample.lat_mean_us = round(lat["mean"] / 1e3, 2) if "mean" in lat else None
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_s
    sample.backend_cpu_s = round(cpu_s, 3)
    sample.backend_cpu_share = round(cpu_s / runtime_s, 3) if runtime_s else None
    if sample.completed:
        sample.cpu_s_per_mio = round(cpu_s / sample.completed * 1e6, 3)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- plan ---------------------------------------------------------------------------------------


def plan(settings: Settings) -> list[list[Sample]]:
    """Groups of samples in run order, one group per back-end process (fio: per sample).
    Per repetition and backing, the contenders alternate; their order rotates from one
    repetition to the next."""
    groups: list[list[Sample]] = []
    for rep in range(settings.repeat):
        for backing in settings.backings:
            contenders = [c for c in BLK_CONTENDERS if c in settings.contenders
                          and not (c == FIO and backing == "null")]
            shift = rep % len(contenders) if contenders else 0
            for contender in contenders[shift:] + contenders[:shift]:
                group = [Sample(backing, contender, w, qd, rep)
                         for w in settings.workloads for qd in settings.qds]
                if contender == FIO:
                    groups += [[s] for s in group]
                else:
                    groups.append(group)
    return groups


def available(settings: Settings, backing: str, contender: str) -> str | None:
    """Why a cell is not measured (None: it is)."""
    if contender == PYVHOST_THREADS and not settings.io_option:
        return "not available: this pyvhost's `blk` has one data path (no --io)"
    if contender in PYVHOSTS and backing == "null" and not settings.null_available:
        return "not available: this pyvhost's `blk` has no --null"
    if contender == FIO and backing == "null":
        return "no storage to measure"
    return None


# -- results ------------------------------------------------------------------------------------


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """{backing: {workload: {contender: {qd: {median, min, max, n, lat_p50_us, lat_p99_us,
    cpu_s_per_mio, errors}}}}}, IOPS over the samples that succeeded; latency and CPU
    figures are medians over the repetitions."""
    cells: dict[tuple[str, str, str, int], list[Sample]] = {}
    for s in samples:
        if s.error is None and s.iops is not None:
            cells.setdefault((s.backing, s.workload, s.contender, s.qd), []).append(s)
    out: dict[str, Any] = {}
    for (backing, workload, contender, qd), group in cells.items():
        iops = [s.iops for s in group if s.iops is not None]

        def med(field: str) -> float | None:
            values = [getattr(s, field) for s in group if getattr(s, field) is not None]
            return round(statistics.median(values), 3) if values else None

        out.setdefault(backing, {}).setdefault(workload, {}).setdefault(contender, {})[
            str(qd)] = {"median": statistics.median(iops), "min": min(iops), "max": max(iops),
                        "n": len(iops), "lat_p50_us": med("lat_p50_us"),
                        "lat_p99_us": med("lat_p99_us"), "cpu_s_per_mio": med("cpu_s_per_mio"),
                        "backend_cpu_share": med("backend_cpu_share"),
                        "errors": sum(s.errors or 0 for s in group)}
    return out


def ratios(summary: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """pyvhost / qsd (and pyvhost / its threads path), medians and best runs, per backing,
    workload and QD."""
    out: dict[str, Any] = {}
    pairs = (("pyvhost/qsd", PYVHOST, QSD, "median"), ("pyvhost/qsd best", PYVHOST, QSD, "max"),
             ("pyvhost/threads", PYVHOST, PYVHOST_THREADS, "median"))
    for backing in settings.backings:
        for workload in settings.workloads:
            cells = summary.get(backing, {}).get(workload, {})
            for key, x, y, stat in pairs:
                row = {}
                for qd in settings.qds:
                    a = cells.get(x, {}).get(str(qd))
                    b = cells.get(y, {}).get(str(qd))
                    row[str(qd)] = (round(a[stat] / b[stat], 3)
                                    if a and b and b[stat] > 0 else None)
                out.setdefault(backing, {}).setdefault(workload, {})[key] = row
    return out


BACKING_TITLES = {
    "null": "null device (qsd `null-co`, pyvhost `--null`: reads leave the buffer as it is): the "
            "vhost-user path alone",
    "pagecache": "page cache (a file on tmpfs; qsd `aio=io_uring,cache.direct=off`)",
    "direct": "O_DIRECT (a file on disk; qsd `aio=io_uring,cache.direct=on`, pyvhost "
              "`--direct`, fio `--direct=1`)",
}


def _k(value: float) -> str:
    return f"{value / 1e3:.1f}"


def _iops_cell(stats: dict | None, why: str | None) -> str:
    if why:
        return "n/a"
    if not stats:
        return "failed"
    mark = " (errors)" if stats.get("errors") else ""
    return f"{_k(stats['median'])} [{_k(stats['min'])}–{_k(stats['max'])}]{mark}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}×" if value < 0.1 else f"{value:.2f}×"


def markdown(result: dict[str, Any]) -> str:
    s, m, summary, rat = result["settings"], result["machine"], result["summary"], result["ratios"]
    settings = Settings(**s)
    qds = s["qds"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpus']} CPUs), kernel {m['kernel']}, "
        f"{m['qsd'] or 'qemu-storage-daemon ?'}, {m['fio'] or 'fio ?'}; load average at "
        f"start {m['loadavg_start'][0]:.2f}; pyvhost {m['pyvhost_commit']}. Front-end "
        f"(pyvhost.testing.blk_frontend, compiled) on CPU {s['frontend_cpu']}, back-end on "
        f"CPU {s['backend_cpu']}; 4 KiB random I/O over {s['size_mib']} MiB, one queue of "
        f"{s['queue_size']}, {'indirect' if s['indirect'] else 'direct'} chains, "
        f"{'interrupts' if s.get('interrupts') else 'used ring polled'}; "
        f"{s['repeat']} repetition(s), {s['warmup']:g} s warm-up, {s['window']:g} s window.",
        "",
    ]
    head = ("| backend | " + " | ".join(f"QD {q}" for q in qds)
            + " | QD 1 latency p50 [p99] µs | CPU-s / M I/O at QD " + ", ".join(map(str, qds))
            + " |")
    rule = "|---|" + "---:|" * len(qds) + "---:|---:|"
    for backing in s["backings"]:
        lines += [f"**{BACKING_TITLES[backing]}** — kIOPS, median [min–max]", "", head, rule]
        for workload in s["workloads"]:
            cells = summary.get(backing, {}).get(workload, {})
            for contender in BLK_CONTENDERS:
                if contender not in s["contenders"]:
                    continue
                why = available(settings, backing, contender)
                if contender == FIO and why:
                    continue
                c = cells.get(contender, {})
                qd1 = c.get("1", {}) if not why else {}
                lat = (f"{_num(qd1.get('lat_p50_us'))} [{_num(qd1.get('lat_p99_us'))}]"
                       if qd1 else "n/a")
                cpu = ", ".join(_num(c.get(str(q), {}).get("cpu_s_per_mio"), "{:.2f}")
                                for q in qds) if not why else "n/a"
                lines.append(f"| {LABELS[contender]} {workload} | "
                             + " | ".join(_iops_cell(c.get(str(q)), why) for q in qds)
                             + f" | {lat} | {cpu} |")
            r = rat.get(backing, {}).get(workload, {})
            for key, label in (("pyvhost/qsd", "pyvhost / qsd"),
                               ("pyvhost/qsd best", "pyvhost / qsd, best runs"),
                               ("pyvhost/threads", "pyvhost / its `--io threads`")):
                if key == "pyvhost/threads" and PYVHOST_THREADS not in s["contenders"]:
                    continue
                row = r.get(key, {})
                lines.append(f"| {label} {workload} | "
                             + " | ".join(_ratio(row.get(str(q))) for q in qds)
                             + " | | |")
        for contender in (PYVHOST, PYVHOST_THREADS, QSD):
            why = available(settings, backing, contender)
            if why and contender in s["contenders"]:
                lines += ["", f"{LABELS[contender]}: {why}."]
        lines.append("")
    for who in ("frontend", "backend"):
        shares = [x[f"{who}_cpu_share"] for x in result["samples"]
                  if x.get(f"{who}_cpu_share") is not None and x["contender"] != FIO]
        if shares:
            what = ("its CPU (it polls: 1.00 unless other work ran on its core)"
                    if who == "frontend" else "a CPU (all threads; it sleeps when idle)")
            lines.append(f"CPU share of the {who.replace('end', '-end')} during the windows: "
                         f"median {statistics.median(shares):.2f}, min {min(shares):.2f} of "
                         f"{what}.")
            lines.append("")
    errors = sum(x["errors"] or 0 for x in result["samples"])
    failed = [x for x in result["samples"]
              if x["error"] and not available(settings, x["backing"], x["contender"])]
    if errors:
        lines += [f"{errors} request(s) completed with a status other than OK.", ""]
    if failed:
        lines += [f"{len(failed)} sample(s) failed (see `error` in the JSON).", ""]
    lines.append("Command lines: " + "; ".join(f"`{c}`" for c in result["command_lines"]))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    rows, cols = s["workloads"], s["backings"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 3.2 * len(rows)),
                             squeeze=False)
    qds = s["qds"]
    handles: dict[str, Any] = {}
    for i, workload in enumerate(rows):
        for j, backing in enumerate(cols):
            ax = axes[i][j]
            cells = result["summary"].get(backing, {}).get(workload, {})
            for contender in BLK_CONTENDERS:
                c = cells.get(contender)
                if not c:
                    continue
                xs = [q for q in qds if str(q) in c]
                med = [c[str(q)]["median"] / 1e3 for q in xs]
                lo = [(c[str(q)]["median"] - c[str(q)]["min"]) / 1e3 for q in xs]
                hi = [(c[str(q)]["max"] - c[str(q)]["median"]) / 1e3 for q in xs]
                handles[contender] = ax.errorbar(
                    xs, med, yerr=[lo, hi], marker="o", capsize=3, color=COLORS[contender],
                    label=LABELS[contender], linestyle="--" if contender == FIO else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(qds, [str(q) for q in qds])
            ax.set_xlabel("queue depth")
            ax.set_ylabel("kIOPS (4 KiB), log")
            ax.set_title(f"{backing} {workload}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    order = [c for c in BLK_CONTENDERS if c in handles]
    fig.legend([handles[c] for c in order], [LABELS[c] for c in order], loc="lower center",
               ncol=len(order), fontsize=8)
    fig.suptitle(f"pyvhost blk vs qemu-storage-daemon — {result['machine']['date'][:10]}, "
                 f"pyvhost {result['machine']['pyvhost_commit']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def _csv(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    unknown = set(items) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(sorted(unknown))} "
                         f"(choose from {','.join(allowed)})")
    return items


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick

    def pick(value: float | None, full: float, fast: float) -> float:
        return value if value is not None else (fast if quick else full)

    blk_options = pyvhost_blk_options()
    qds = sorted({int(q) for q in args.qd.split(",") if q})
    if not qds or qds[0] < 1 or qds[-1] > args.queue_size:
        raise SystemExit(f"--qd {args.qd}: each QD must be in 1..{args.queue_size}")
    return Settings(
        repeat=int(pick(args.repeat, 3, 1)), warmup=pick(args.warmup, 1.0, 0.2),
        window=pick(args.window, 3.0, 0.5), qds=qds,
        workloads=_csv(args.workloads, BLK_WORKLOADS, "workloads"),
        backings=_csv(args.backings, BLK_BACKINGS, "backings"),
        contenders=_csv(args.contenders, BLK_CONTENDERS, "contenders"),
        size_mib=int(pick(args.size_mib, 1024, 64)), cache_dir=args.cache_dir,
        disk_dir=args.disk_dir, backend_cpu=args.backend_cpu, frontend_cpu=args.frontend_cpu,
        queue_size=args.queue_size, indirect=args.chains == "indirect",
        pyvhost_args=shlex.split(args.pyvhost_args), null_available="--null" in blk_options,
        qsd_iothread=not args.qsd_main_loop, io_option="--io" in blk_options,
        interrupts=args.interrupts)


def command_lines(settings: Settings) -> list[str]:
    """Example back-end command lines (file names as placeholders), for the report."""
    files = Backings(Path("PAGECACHE.img"), Path("DIRECT.img"), settings.size_mib << 20)
    sock = Path("SOCK")
    out = []
    for backing in settings.backings:
        for contender in (PYVHOST, PYVHOST_THREADS, QSD):
            if contender in settings.contenders and not available(settings, backing, contender):
                argv = backend_argv(settings, contender, backing, files.file(backing),
                                    files.size, sock)
                if contender in PYVHOSTS:
                    argv = ["pyvhost", *argv[3:]]
                out.append(shlex.join(argv))
    return out


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    for tool in ("taskset", "qemu-storage-daemon") + (("fio",) if FIO in settings.contenders
                                                      else ()):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (scripts/setup.sh installs it)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    if machine["loadavg_start"][0] > args.load_threshold:
        print(f"WARNING: load average {machine['loadavg_start'][0]:.2f} > "
              f"{args.load_threshold}: other work is running on this machine; the figures "
              "will be low and noisy.", file=sys.stderr)
    groups = plan(settings)
    n = sum(len(g) for g in groups)
    print(f"pyvhost bench blk: {n} samples in {len(groups)} back-end runs, front-end CPU "
          f"{settings.frontend_cpu}, back-end CPU {settings.backend_cpu}", file=sys.stderr)
    started = time.monotonic()
    affinity = os.sched_getaffinity(0)
    done = 0
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="pyvhost-bench-blk-") \
            as tmp, backing_files(settings) as files:
        warm_up_s = warm_up_pyvhost(settings, Path(tmp)) if any(
            c in settings.contenders for c in PYVHOSTS) else None
        os.sched_setaffinity(0, {settings.frontend_cpu})  # this thread runs the front-end
        try:
            for group in groups:
                first = group[0]
                why = available(settings, first.backing, first.contender)
                if why:
                    for sample in group:
                        sample.error = why
                    done += len(group)
                    continue
                try:
                    if first.contender == FIO:
                        file = files.file(first.backing)
                        assert file is not None
                        measure_fio(settings, first, file)
                    else:
                        measure_backend(settings, first.backing, first.contender, files,
                                        Path(tmp), group)
                except (OSError, tb.TestbedError, subprocess.SubprocessError, ValueError,
                        RuntimeError) as exc:
                    for sample in group:
                        if sample.iops is None and sample.error is None:
                            sample.error = f"{type(exc).__name__}: {exc}"
                for sample in group:
                    done += 1
                    shown = (f"{sample.iops / 1e3:8.1f} kIOPS" if sample.iops is not None
                             else "  failed")
                    extra = (f" p50 {sample.lat_p50_us} us" if sample.qd == 1
                             and sample.lat_p50_us is not None else "")
                    print(f"[{done}/{n}] {sample.backing:9s} {sample.contender:7s} "
                          f"{sample.workload:9s} QD{sample.qd:<3d} rep {sample.repetition}: "
                          f"{shown}{extra}"
                          f"{'  ' + sample.error.splitlines()[0] if sample.error else ''}",
                          file=sys.stderr, flush=True)
        finally:
            os.sched_setaffinity(0, affinity)
    machine["loadavg_end"] = list(os.getloadavg())
    samples = [s for g in groups for s in g]
    summary = summarize(samples)
    result = {
        "settings": dataclasses.asdict(settings),
        "machine": machine,
        "command_lines": command_lines(settings),
        "summary": summary,
        "ratios": ratios(summary, settings),
        "elapsed_s": round(time.monotonic() - started, 1),
        "pyvhost_warm_up_s": warm_up_s,
        "samples": [dataclasses.asdict(s) for s in samples],
    }
    paths = {k: out_dir / f"blk.{k}" for k in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    paths["md"].write_text(table)
    plot(result, paths["png"])
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    failed = [s for s in samples if (s.error and not available(settings, s.backing, s.contender))
              or s.errors]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvhost bench blk",
                                     description=__doc__.splitlines()[0])
    add_blk_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
