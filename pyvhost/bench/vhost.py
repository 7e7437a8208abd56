"""pyvhost bench: packets/s of pyvhost net against DPDK's C vhost backend, real frontend.

The seed's TX table, reproduced side by side with a C peer. DPDK testpmd with a virtio-user
port in txonly mode generates on one core; the backend under test receives on the other:

- before: `pyvhost net --poll --metadata-access copy`
- after:  `pyvhost net --poll --metadata-access direct`
- C peer: `dpdk-testpmd --vdev net_vhost0,iface=SOCK --forward-mode=rxonly` (DPDK's vhost PMD)

The RX direction: the backend generates into virtio-user rxonly — the vhost PMD in txonly
mode, pyvhost with `--source gen:SIZE` (copy and direct) — and the figure is what the backend
delivered into the ring.

Method. Each sample is one fresh backend process and one fresh generator. Contenders alternate
within every repetition (and the order rotates between repetitions), so machine noise hits
them alike. After the generator reports forwarding, a warm-up is skipped, then the backend's
*own* received count is sampled over a fixed window:
- pyvhost: its periodic statistics lines (`--stats-interval`, `--stats-format json`; each
  is its own delta-count / delta-t); the lines whose interval lies inside the window are
  combined, weighted by their length;
- DPDK: `show port stats all` (interactive testpmd) at the window's start and then every
  interval; the figure is delta(rx_packets) / delta(t) from the first to the last reading.
After the window the generator stops forwarding (ports stay up, the backend drains), and the
backend's final total must equal what the generator sent (`counts_match` in the JSON).

Outputs (in --out-dir): `vhost.json` (every sample, every interval, the machine), `vhost.md`
(the table: median [min-max] Mpps, ratios), `vhost.png` (bar chart).

    pyvhost bench [--quick] [--repeat N] [--sizes 64,1518] [--no-huge] [--out-dir DIR]
    python -m pyvhost.bench ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pyvhost.bench.options import (ALL_CONTENDERS, DPDK_VHOST, DPDK_VHOST_PACKED, LOGGING_OF,
                                   PACKED_OF, PYVHOST_COPY, PYVHOST_COPY_LOG,
                                   PYVHOST_COPY_PACKED, PYVHOST_DIRECT, PYVHOST_DIRECT_LOG,
                                   PYVHOST_DIRECT_PACKED, TX_CONTENDERS, add_arguments)
from pyvhost.testing import testbed as tb

# -- contenders ---------------------------------------------------------------------------------


ROW_LABELS = {
    ("loop", PYVHOST_COPY): "before: pyvhost `--metadata-access copy --source loopback`",
    ("loop", PYVHOST_DIRECT): "after: pyvhost `--metadata-access direct --source loopback`",
    ("loop", DPDK_VHOST): "C peer: DPDK vhost PMD (`io`)",
    ("tx", PYVHOST_COPY): "before: pyvhost `--metadata-access copy`",
    ("tx", PYVHOST_DIRECT): "after: pyvhost `--metadata-access direct`",
    ("tx", DPDK_VHOST): "C peer: DPDK vhost PMD (`rxonly`)",
    ("rx", PYVHOST_COPY): "before: pyvhost `--metadata-access copy --source gen:SIZE`",
    ("rx", PYVHOST_DIRECT): "after: pyvhost `--metadata-access direct --source gen:SIZE`",
    ("rx", DPDK_VHOST): "C peer: DPDK vhost PMD (`txonly`)",
    ("tap-tx", PYVHOST_COPY): "before: pyvhost `--metadata-access copy --sink tap:NAME`",
    ("tap-tx", PYVHOST_DIRECT): "after: pyvhost `--metadata-access direct --sink tap:NAME`",
    ("tap-tx", DPDK_VHOST): "C peer: DPDK vhost PMD + TAP PMD (`io`)",
    ("tap-rx", PYVHOST_COPY): "before: pyvhost `--metadata-access copy --source tap:NAME`",
    ("tap-rx", PYVHOST_DIRECT): "after: pyvhost `--metadata-access direct --source tap:NAME`",
    ("tap-rx", DPDK_VHOST): "C peer: DPDK vhost PMD + TAP PMD (`io`)",
}
for (_direction, _contender), _label in list(ROW_LABELS.items()):
    for _logged, _plain in LOGGING_OF.items():
        if _contender == _plain:
            ROW_LABELS[(_direction, _logged)] = (
                _label.split(": ", 1)[1].replace("`--metadata", "`--bench-log-all --metadata")
                + " — dirty logging on †")
    for _packed, _split in PACKED_OF.items():
        if _contender == _split:
            ROW_LABELS[(_direction, _packed)] = (
                _label.split(": ", 1)[1] + " — packed ring (`packed_vq=1`)")
SHORT_LABELS = {PYVHOST_COPY: "pyvhost copy", PYVHOST_DIRECT: "pyvhost direct",
                DPDK_VHOST: "DPDK vhost PMD", PYVHOST_COPY_LOG: "copy + log",
                PYVHOST_DIRECT_LOG: "direct + log", PYVHOST_COPY_PACKED: "copy packed",
                PYVHOST_DIRECT_PACKED: "direct packed", DPDK_VHOST_PACKED: "DPDK packed"}
LOOP_BURSTS = 64  # testpmd `start tx_first N`: bursts of 32 sent before forwarding

RX_RING_SLACK = 256  # testpmd's default ring size (see measure_rx_dpdk)
GENERATOR_BOUND = 0.02  # the backend took all but this share of what was offered


@dataclasses.dataclass
class Settings:
    sizes: list[int]
    repeat: int
    warmup: float
    window: float
    interval: float
    hugepages: bool
    backend_cpu: int
    generator_cpu: int
    memory_mib: int
    rx: bool
    contenders: list[str]
    loopback: bool = False  # pyvhost has --source loopback and it was not switched off
    loop_sizes: list[int] = dataclasses.field(default_factory=list)
    drain: float = 0.5
    tap: bool = False  # the TAP rows (bench/tap.py)
    tap_sizes: list[int] = dataclasses.field(default_factory=list)
    only: list[str] = dataclasses.field(default_factory=list)  # directions to run ([]: all)


@dataclasses.dataclass
class Sample:
    """One measurement: one backend process, one generator, one window."""

    direction: str          # "tx": virtio-user -> backend; "rx": backend -> virtio-user;
                            # "loop": the backend sends what it receives back (io + tx_first)
    contender: str
    packet_size: int
    repetition: int
    pps: float | None = None            # the figure: backend's own count / window
    window_s: float | None = None       # the time the figure covers
    intervals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    generator_sent: int | None = None   # TX: what virtio-user sent; RX: what the backend
                                        # delivered into the ring (whole run)
    refused: int | None = None          # what the sending side offered but found no ring
                                        # room for (testpmd TX-dropped, whole run)
    backend_total: int | None = None    # TX: the backend's final count; RX: what virtio-user
                                        # received (whole run)
    counts_match: bool | None = None    # backend_total == generator_sent (RX: see RX_RING_SLACK)
    limited_by: str | None = None       # "backend", or the other side when it set the pace
    backend_cpu_share: float | None = None    # CPU time / wall time of the backend, window
    generator_cpu_share: float | None = None
    rounds_per_s: float | None = None   # pyvhost only: worker rounds per second, window
    started: str = ""
    seconds: float | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    log_pages: int | None = None        # pyvhost: dirty-log bits its rings set (whole run)

    @property
    def mpps(self) -> float | None:
        return None if self.pps is None else self.pps / 1e6


# -- machine ------------------------------------------------------------------------------------


def machine_description(hugepages: bool) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    meminfo = {}
    with contextlib.suppress(OSError, ValueError):
        meminfo = tb._meminfo()
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "dpdk": _dpdk_version(),
        "pyvhost_commit": _git_commit(),
        "pyvhost_changes": _git_changes(),
        "pyvhost_path": str(Path(tb.__file__).resolve().parents[1]),
        "hugepages": hugepages,
        "hugepages_total": meminfo.get("HugePages_Total"),
        "hugepages_free": meminfo.get("HugePages_Free"),
        "hugepage_kib": meminfo.get("Hugepagesize"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def _dpdk_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpdk"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def _git_commit() -> str | None:
    """The commit of the pyvhost tree that runs, '-dirty' if it has changes (listed by
    `_git_changes`); None outside a git checkout (e.g. a `git archive` snapshot)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(tb.REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _git_changes() -> list[str]:
    """Uncommitted changes to the package (what else ran besides the commit)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(tb.REPO_ROOT), "status", "--porcelain", "--",
                              "pyvhost"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines()]
    return []


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _share(before: float | None, after: float | None, wall: float) -> float | None:
    if before is None or after is None or wall <= 0:
        return None
    return round((after - before) / wall, 3)


def _pyvhost_rx_sources() -> list[str]:
    """The RX source kinds `pyvhost net --source` accepts (e.g. tap, loopback), [] if none."""
    from pyvhost.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "net" in action.choices:
            for opt in action.choices["net"]._actions:
                if "--source" in opt.option_strings:
                    spec = "|".join(opt.choices or []) or opt.metavar or "?"
                    return [kind.split(":")[0] for kind in spec.split("|")]
    return []


# -- pyvhost as a backend process ------------------------------------------------------------

def parse_stats_line(line: str) -> dict[str, float] | None:
    """One statistics line of `pyvhost net --stats-format json` (pyvhost.cli.format_rates_json)
    as this harness uses it: Mpps and Gbit/s sent by the guest ("mpps", "gbps"), rounds/s on
    the direct map and the copy path, and Mpps delivered to the guest ("rx", when the device
    counts it); None for any other line (a log line)."""
    if not line.startswith("{"):
        return None
    try:
        rates = json.loads(line)["rates"]
    except (ValueError, KeyError, TypeError):
        return None
    values = {"mpps": rates.get("tx_packets", 0.0) / 1e6,
              "gbps": rates.get("tx_bytes", 0.0) * 8 / 1e9,
              "direct": rates.get("direct_rounds", 0.0), "copy": rates.get("copy_rounds", 0.0)}
    if "rx_packets" in rates:
        values["rx"] = rates["rx_packets"] / 1e6
    return values


class PyvhostProcess:
    """`pyvhost net --poll` pinned to one CPU; its statistics lines timestamped as they come."""

    def __init__(self, socket_path: Path, stats_json: Path, metadata_access: str, cpu: int,
                 interval: float, extra_args: Sequence[str] = (),
                 netns: str | None = None) -> None:
        self.socket_path = socket_path
        self.stats_json = stats_json
        # In a network namespace (`ip netns exec` execs: the pid stays pyvhost's).
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.argv = [*prefix, "taskset", "-c", str(cpu), sys.executable, "-m", "pyvhost", "net",
                     "--socket-path", str(socket_path), "--poll",
                     "--metadata-access", metadata_access, "--stats-json", str(stats_json),
                     "--stats-interval", str(interval), "--stats-format", "json",
                     "--log-level", "WARNING", *extra_args]
        self.rates: list[tuple[float, dict[str, float]]] = []  # (arrival, parsed line)
        self.log: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> "PyvhostProcess":
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="pyvhost-stats", daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + 120
            while not self.socket_path.exists():
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise tb.TestbedError(
                        f"pyvhost did not listen (exit code {self._proc.poll()}):\n{self.tail()}")
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

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            now = time.monotonic()
            line = line.rstrip("\n")
            values = parse_stats_line(line)
            if values is not None:
                self.rates.append((now, values))
            else:
                self.log.append(line)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log[-lines:])

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        """SIGINT; the final statistics it wrote."""
        self.close(timeout)
        if self._proc is not None and self._proc.returncode != 0:
            raise tb.TestbedError(f"pyvhost exited {self._proc.returncode}:\n{self.tail()}")
        try:
            return json.loads(self.stats_json.read_text())
        except (OSError, ValueError) as exc:
            raise tb.TestbedError(f"pyvhost wrote no statistics ({exc}):\n{self.tail()}") from exc

    def close(self, timeout: float = 20.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        self.socket_path.unlink(missing_ok=True)

    def window_rate(self, t0: float, t1: float, interval: float, key: str = "mpps"
                    ) -> tuple[float | None, float, list[dict], float | None]:
        """(pps, seconds covered, intervals, rounds/s) from the lines whose interval lies in
        [t0, t1]. A line's interval ends at its arrival and began at the previous line's.
        `key`: "mpps" (TX rate) or "rx" (RX rate)."""
        picked = []
        prev = None
        slack = min(0.1, interval / 4)
        for arrival, values in list(self.rates):
            begin = prev if prev is not None else arrival - interval
            prev = arrival
            if key in values and begin >= t0 - slack and arrival <= t1 + slack:
                picked.append((arrival, arrival - begin, values))
        intervals = [{"t": round(a - t0, 3), "dt": round(dt, 3), "pps": v[key] * 1e6,
                      "rounds_per_s": v["direct"] + v["copy"]} for a, dt, v in picked]
        covered = sum(dt for _, dt, _ in picked)
        if not picked or covered <= 0:
            return None, 0.0, intervals, None
        pps = sum(v[key] * 1e6 * dt for _, dt, v in picked) / covered
        rounds = sum((v["direct"] + v["copy"]) * dt for _, dt, v in picked) / covered
        return pps, covered, intervals, rounds


# -- one measurement ----------------------------------------------------------------------------


def _frontend(sock: Path, sample: "Sample") -> str:
    """The virtio-user vdev of a sample's generator or sink: packed rings for the packed
    contenders (`packed_vq=1`, in_order as by default)."""
    return tb.virtio_user_vdev(sock, **({"packed_vq": 1} if sample.contender in PACKED_OF
                                        else {}))


def _lcores(cpu: int) -> str:
    return tb.testpmd_lcores(cpu, [cpu])  # main lcore (sleeps) and forwarding lcore on one CPU


def _testpmd(settings: Settings, vdev: str | Sequence[str], mode: str, cpu: int, name: str,
             app_args: Sequence[str] = (), interactive: bool = True,
             netns: str | None = None) -> tb.Testpmd:
    vdevs = [vdev] if isinstance(vdev, str) else list(vdev)
    return tb.Testpmd(vdevs, forward_mode=mode, app_args=list(app_args), lcores=_lcores(cpu),
                      memory_mib=settings.memory_mib, hugepages=settings.hugepages,
                      interactive=interactive, name=name, netns=netns)


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


@dataclasses.dataclass
class Window:
    t0: float                          # window start (monotonic)
    t1: float                          # window end
    readings: list[tuple[float, int]]  # (time, counter) when a counter was read
    cpu_shares: list[float | None]     # CPU time / wall time of each pid over the window


def _measure_window(settings: Settings, forwarding_since: float, pids: Sequence[int],
                    read: Callable[[], int] | None) -> Window:
    """Skip the warm-up, then (if `read`) read a counter at the window start and every
    interval up to its end; a reading's time is the midpoint of the command's round trip.
    Also the CPU share each of `pids` got over the window (1.0 = a whole core)."""
    _sleep_until(forwarding_since + settings.warmup)
    t0 = time.monotonic()
    cpu0 = [_cpu_seconds(pid) for pid in pids]
    readings: list[tuple[float, int]] = []
    steps = max(1, round(settings.window / settings.interval))
    for k in range(steps + 1):
        _sleep_until(t0 + k * settings.interval)
        if read is not None:
            before = time.monotonic()
            value = read()
            readings.append(((before + time.monotonic()) / 2, value))
    t1 = time.monotonic()
    shares = [_share(a, _cpu_seconds(pid), t1 - t0) for a, pid in zip(cpu0, pids)]
    if readings:
        t0, t1 = readings[0][0], readings[-1][0]
    return Window(t0, t1, readings, shares)


def _counter_rate(sample: Sample, w: Window) -> None:
    (ta, ca), (tb_, cb) = w.readings[0], w.readings[-1]
    sample.pps = (cb - ca) / (tb_ - ta)
    sample.window_s = round(tb_ - ta, 3)
    sample.intervals = [{"t": round(t2 - ta, 3), "dt": round(t2 - t1, 3),
                         "pps": (c2 - c1) / (t2 - t1)}
                        for (t1, c1), (t2, c2) in zip(w.readings, w.readings[1:])]
    sample.backend_cpu_share, sample.generator_cpu_share = w.cpu_shares


class _Phases:
    """Wall time of each phase of a sample (in the JSON, to tell a slow start from a slow stop)."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample
        self._last = time.monotonic()

    def mark(self, name: str) -> float:
        now = time.monotonic()
        self.sample.phases[name] = round(now - self._last, 3)
        self._last = now
        return now


def measure_tx_pyvhost(settings: Settings, size: int, mode: str, tmp: Path, sample: Sample) -> None:
    sock, stats = tmp / f"{sample.contender}-{size}.sock", tmp / f"{sample.contender}-{size}.json"
    phase = _Phases(sample)
    with PyvhostProcess(sock, stats, mode, settings.backend_cpu, settings.interval,
                        _log_args(sample)) as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "txonly", settings.generator_cpu,
                      "bench-gen", [f"--txpkts={size}"]) as gen:
            since = phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, gen.pid], None)
            phase.mark("warmup_and_window")
            sent = gen.stop_forwarding()[0]
            time.sleep(settings.drain)  # ports stay up: the backend drains the ring
            gen.stop()
            phase.mark("generator_stop")
        final = backend.stop()
        phase.mark("backend_stop")
    sample.pps, covered, sample.intervals, sample.rounds_per_s = backend.window_rate(
        w.t0, w.t1, settings.interval)
    sample.window_s = round(covered, 3)
    sample.backend_cpu_share, sample.generator_cpu_share = w.cpu_shares
    sample.generator_sent, sample.refused = sent.tx_packets, sent.tx_dropped
    sample.backend_total = int(final.get("tx_packets", -1))
    sample.counts_match = sample.backend_total == sent.tx_packets
    _check_pyvhost_run(final, mode, backend, sample)
    if sample.pps is None:
        raise tb.TestbedError(f"no pyvhost statistics line inside the window:\n{backend.tail()}")


def measure_tx_dpdk(settings: Settings, size: int, tmp: Path, sample: Sample) -> None:
    sock = tmp / f"dpdk-vhost-{size}.sock"
    phase = _Phases(sample)
    with _testpmd(settings, tb.vhost_pmd_vdev(sock), "rxonly", settings.backend_cpu,
                  "bench-vhost") as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "txonly", settings.generator_cpu,
                      "bench-gen", [f"--txpkts={size}"]) as gen:
            since = phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, gen.pid],
                                lambda: backend.port_stats()[0].rx_packets)
            phase.mark("warmup_and_window")
            sent = gen.stop_forwarding()[0]
            time.sleep(settings.drain)  # ports stay up: the backend drains the ring
            total = backend.port_stats()[0].rx_packets
            gen.stop()
            phase.mark("generator_stop")
        backend.stop()
        phase.mark("backend_stop")
    _counter_rate(sample, w)
    sample.generator_sent, sample.refused = sent.tx_packets, sent.tx_dropped
    sample.backend_total = total
    sample.counts_match = total == sent.tx_packets


def measure_rx_pyvhost(settings: Settings, size: int, mode: str, tmp: Path,
                       sample: Sample) -> None:
    """pyvhost --source gen:SIZE generates into virtio-user (rxonly); the figure is what pyvhost
    delivered into the ring (its own rx rate)."""
    sock, stats = tmp / f"rx-{sample.contender}-{size}.sock", tmp / f"rx-{sample.contender}-{size}.json"
    phase = _Phases(sample)
    with PyvhostProcess(sock, stats, mode, settings.backend_cpu, settings.interval,
                        ["--source", f"gen:{size}", *_log_args(sample)]) as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "rxonly", settings.generator_cpu,
                      "bench-sink") as sink:
            since = phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, sink.pid], None)
            phase.mark("warmup_and_window")
            sink.stop_forwarding()  # no more buffers: the generator stops when the ring is full
            time.sleep(settings.drain)
            received = sink.port_stats()[0].rx_packets
            sink.stop()
            phase.mark("generator_stop")
        final = backend.stop()
        phase.mark("backend_stop")
    _pyvhost_rx_figures(settings, sample, backend, w, final, received, mode)


def _pyvhost_rx_figures(settings: Settings, sample: Sample, backend: PyvhostProcess, w: Window,
                        final: dict[str, Any], received: int, mode: str) -> None:
    """A sample's figures when pyvhost delivers into virtio-user's RX ring (RX, loopback):
    its own RX rate over the window; its total against what virtio-user received."""
    sample.pps, covered, sample.intervals, sample.rounds_per_s = backend.window_rate(
        w.t0, w.t1, settings.interval, key="rx")
    sample.window_s = round(covered, 3)
    sample.backend_cpu_share, sample.generator_cpu_share = w.cpu_shares
    sample.generator_sent, sample.backend_total = int(final.get("rx_packets", -1)), received
    # Frames pyvhost put in the RX ring after virtio-user stopped reading stay unread.
    sample.counts_match = 0 <= sample.generator_sent - received <= RX_RING_SLACK
    _check_pyvhost_run(final, mode, backend, sample)
    if sample.pps is None:
        raise tb.TestbedError(f"no pyvhost RX rate inside the window:\n{backend.tail()}")


def _log_args(sample: Sample) -> list[str]:
    """The backend options of a contender with dirty logging on."""
    return ["--bench-log-all"] if sample.contender in LOGGING_OF else []


def _check_pyvhost_run(final: dict[str, Any], mode: str, backend: PyvhostProcess,
                       sample: Sample) -> None:
    """No queue broke, the rounds ran on the metadata path asked for, and the dirty log was
    written exactly when asked for."""
    sample.log_pages = int(final.get("log_pages", 0))
    if sample.contender in LOGGING_OF:
        if not (final.get("log_simulated") and sample.log_pages):
            raise tb.TestbedError(f"pyvhost --bench-log-all logged nothing: {final}")
    elif sample.log_pages:
        raise tb.TestbedError(f"pyvhost logged pages without --bench-log-all: {final}")
    if final.get("queues_broken"):
        raise tb.TestbedError(f"pyvhost broke {final['queues_broken']} queue(s):\n{backend.tail()}")
    direct, copy = final.get("direct_rounds", 0), final.get("copy_rounds", 0)
    if (mode == "direct" and (direct == 0 or copy > direct)) or (mode == "copy" and direct != 0):
        raise tb.TestbedError(f"pyvhost {mode}: {direct} direct and {copy} copy rounds")


def measure_rx_dpdk(settings: Settings, size: int, tmp: Path, sample: Sample) -> None:
    """The vhost PMD generates (txonly) into virtio-user (rxonly); the figure is what the
    vhost PMD itself delivered into the ring (its tx_packets)."""
    sock = tmp / f"dpdk-vhost-rx-{size}.sock"
    phase = _Phases(sample)
    with _testpmd(settings, tb.vhost_pmd_vdev(sock), "txonly", settings.backend_cpu,
                  "bench-vhost", [f"--txpkts={size}"]) as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "rxonly", settings.generator_cpu,
                      "bench-sink") as sink:
            since = phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, sink.pid],
                                lambda: backend.port_stats()[0].tx_packets)
            phase.mark("warmup_and_window")
            sample.refused = backend.stop_forwarding()[0].tx_dropped
            delivered = backend.port_stats()[0].tx_packets
            time.sleep(settings.drain)  # the sink drains the ring
            received = sink.port_stats()[0].rx_packets
            sink.stop()
            phase.mark("generator_stop")
        backend.stop()
        phase.mark("backend_stop")
    _counter_rate(sample, w)
    # Roles swap here: the backend sends, virtio-user counts what it received. DPDK 22.11's
    # virtio-user RX leaves the last packets unreported however long it keeps polling (seen:
    # 32 and 256, at most a ring's worth; not ours to fix), so a ring's worth may be missing.
    sample.generator_sent, sample.backend_total = delivered, received
    sample.counts_match = 0 <= delivered - received <= RX_RING_SLACK


def _start_looping(gen: tb.Testpmd) -> float:
    """Restart the io-mode generator with LOOP_BURSTS bursts sent first: from then on the same
    frames go round (virtio-user forwards what it receives back out). Returns the start time."""
    gen.stop_forwarding()
    gen.command(f"start tx_first {LOOP_BURSTS}", tb.Testpmd.READY)
    return time.monotonic()


def measure_loop_pyvhost(settings: Settings, size: int, mode: str, tmp: Path,
                         sample: Sample) -> None:
    """pyvhost --source loopback: what virtio-user transmits comes back on its RX ring.
    The figure: frames pyvhost delivered into the RX ring per second (its rx rate)."""
    sock, stats = (tmp / f"loop-{sample.contender}-{size}.sock",
                   tmp / f"loop-{sample.contender}-{size}.json")
    phase = _Phases(sample)
    with PyvhostProcess(sock, stats, mode, settings.backend_cpu, settings.interval,
                        ["--source", "loopback", *_log_args(sample)]) as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "io", settings.generator_cpu,
                      "bench-loop", [f"--txpkts={size}"]) as gen:
            since = _start_looping(gen)
            phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, gen.pid], None)
            phase.mark("warmup_and_window")
            sample.refused = gen.stop_forwarding()[0].tx_dropped
            received = gen.port_stats()[0].rx_packets
            gen.stop()
            phase.mark("generator_stop")
        final = backend.stop()
        phase.mark("backend_stop")
    _pyvhost_rx_figures(settings, sample, backend, w, final, received, mode)


def measure_loop_dpdk(settings: Settings, size: int, tmp: Path, sample: Sample) -> None:
    """DPDK's vhost PMD in io mode: what virtio-user transmits it sends straight back. The
    figure: frames the vhost PMD delivered into virtio-user's RX ring per second."""
    sock = tmp / f"loop-dpdk-{size}.sock"
    phase = _Phases(sample)
    with _testpmd(settings, tb.vhost_pmd_vdev(sock), "io", settings.backend_cpu,
                  "bench-vhost") as backend:
        phase.mark("backend_start")
        with _testpmd(settings, _frontend(sock, sample), "io", settings.generator_cpu,
                      "bench-loop", [f"--txpkts={size}"]) as gen:
            since = _start_looping(gen)
            phase.mark("generator_start")
            w = _measure_window(settings, since, [backend.pid, gen.pid],
                                lambda: backend.port_stats()[0].tx_packets)
            phase.mark("warmup_and_window")
            sample.refused = gen.stop_forwarding()[0].tx_dropped
            time.sleep(settings.drain)
            received = gen.port_stats()[0].rx_packets
            delivered = backend.port_stats()[0].tx_packets
            gen.stop()
            phase.mark("generator_stop")
        backend.stop()
        phase.mark("backend_stop")
    _counter_rate(sample, w)
    sample.generator_sent, sample.backend_total = delivered, received
    sample.counts_match = 0 <= delivered - received <= RX_RING_SLACK


_PYVHOST_MODES = {PYVHOST_COPY: "copy", PYVHOST_DIRECT: "direct",  # --metadata-access
                  PYVHOST_COPY_LOG: "copy", PYVHOST_DIRECT_LOG: "direct",
                  PYVHOST_COPY_PACKED: "copy", PYVHOST_DIRECT_PACKED: "direct"}
_MEASURE_PYVHOST = {"tx": measure_tx_pyvhost, "rx": measure_rx_pyvhost,
                    "loop": measure_loop_pyvhost}
_MEASURE_DPDK = {"tx": measure_tx_dpdk, "rx": measure_rx_dpdk, "loop": measure_loop_dpdk}


def run_sample(settings: Settings, sample: Sample, tmp: Path) -> Sample:
    started = time.monotonic()
    sample.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    try:
        mode = _PYVHOST_MODES.get(sample.contender)
        if sample.direction in ("tap-tx", "tap-rx"):
            from pyvhost.bench import tap
            measure = tap.measure_tap_tx if sample.direction == "tap-tx" else tap.measure_tap_rx
            measure(settings, sample.packet_size, sample.contender, tmp, sample)
        elif mode is not None and sample.direction in _MEASURE_PYVHOST:
            _MEASURE_PYVHOST[sample.direction](settings, sample.packet_size, mode, tmp, sample)
        elif sample.contender in (DPDK_VHOST, DPDK_VHOST_PACKED) and \
                sample.direction in _MEASURE_DPDK:
            _MEASURE_DPDK[sample.direction](settings, sample.packet_size, tmp, sample)
        else:
            raise ValueError(f"no measurement for {sample.direction} {sample.contender}")
    except (tb.TestbedError, OSError, ValueError, subprocess.SubprocessError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[-4000:]
    sample.limited_by = _limited_by(sample)
    sample.seconds = round(time.monotonic() - started, 2)
    return sample


def _limited_by(sample: Sample) -> str | None:
    """Which side set the pace. When the receiving side keeps up, the sender almost never finds
    the ring full (few refused): then the sender is the limit. TX: the sender is virtio-user
    (the figure is then a lower bound of the backend); RX: the sender is the backend (what we
    measure) unless the ring was often full, which makes virtio-user's RX the limit."""
    if sample.error or sample.generator_sent is None or sample.refused is None:
        return None
    if sample.direction == "loop":
        return None  # a closed loop: a fixed population of frames, paced by the round trip
    offered = sample.generator_sent + sample.refused
    sender_bound = offered == 0 or sample.refused / offered <= GENERATOR_BOUND
    if sample.direction in ("tx", "tap-tx"):
        return "generator" if sender_bound else "backend"
    if sample.direction == "tap-rx":  # refused: what the TAP dropped, the backend not reading
        return "generator" if sender_bound else "backend"
    return "backend" if sender_bound else "sink"


def plan(settings: Settings) -> list[Sample]:
    """Every sample in run order: contenders alternate inside a repetition, and their order
    rotates from one repetition to the next."""
    samples = []
    tx = [c for c in ALL_CONTENDERS if c in settings.contenders]
    for rep in range(settings.repeat):
        for size in settings.sizes:
            shift = rep % len(tx) if tx else 0
            for contender in tx[shift:] + tx[:shift]:
                samples.append(Sample("tx", contender, size, rep))
            if settings.rx:
                for contender in tx[shift:] + tx[:shift]:
                    samples.append(Sample("rx", contender, size, rep))
            if settings.loopback and (size in settings.loop_sizes):
                for contender in tx[shift:] + tx[:shift]:
                    samples.append(Sample("loop", contender, size, rep))
            for direction in ("tap-tx", "tap-rx") if size in settings.tap_sizes else ():
                for contender in tx[shift:] + tx[:shift]:
                    samples.append(Sample(direction, contender, size, rep))
    if settings.only:
        samples = [s for s in samples if s.direction in settings.only]
    return samples


# -- results ------------------------------------------------------------------------------------


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, dict[str, Any]]]:
    """{direction: {contender: {size: {median, min, max, n, limited_by[, per_cpu_median]}}}} in
    Mpps, over the samples that succeeded. per_cpu_median: the median of Mpps per second of CPU
    time the backend got (pps / backend_cpu_share; when every sample has a share): a polling
    backend uses all it gets, so this is its rate had it had a whole core."""
    cells: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        if s.error is None and s.pps is not None:
            cells.setdefault((s.direction, s.contender, str(s.packet_size)), []).append(s)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (direction, contender, size), group in cells.items():
        values = [s.pps / 1e6 for s in group if s.pps is not None]
        limits: dict[str, int] = {}
        for s in group:
            limits[s.limited_by or "?"] = limits.get(s.limited_by or "?", 0) + 1
        cell = out.setdefault(direction, {}).setdefault(contender, {})[size] = {
            "median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "limited_by": limits}
        per_cpu = [s.pps / 1e6 / s.backend_cpu_share for s in group
                   if s.pps is not None and s.backend_cpu_share]
        if len(per_cpu) == len(group):
            cell["per_cpu_median"] = statistics.median(per_cpu)
    return out


def ratios(summary: dict, sizes: Sequence[int], direction: str = "tx"
           ) -> dict[str, dict[str, float | None]]:
    """Ratios of medians: after/before (direct/copy) and pyvhost direct / the C peer; and of
    best runs, pyvhost direct / the C peer ("direct/dpdk best"). Other work on a shared machine
    only ever slows a run down (the generator has fast and slow runs here, whatever the
    backend), so each contender's best run is the closest to what it can do, and a median of a
    few runs depends on how many fast runs each contender drew."""
    cells = summary.get(direction, {})

    def ratio(a: str, b: str, size: int, stat: str = "median") -> float | None:
        x, y = cells.get(a, {}).get(str(size)), cells.get(b, {}).get(str(size))
        return x[stat] / y[stat] if x and y and stat in x and y.get(stat, 0) > 0 else None

    return {"direct/copy": {str(s): ratio(PYVHOST_DIRECT, PYVHOST_COPY, s) for s in sizes},
            "direct/dpdk": {str(s): ratio(PYVHOST_DIRECT, DPDK_VHOST, s) for s in sizes},
            "direct/dpdk best": {str(s): ratio(PYVHOST_DIRECT, DPDK_VHOST, s, "max")
                                 for s in sizes},
            "direct log on/off": {str(s): ratio(PYVHOST_DIRECT_LOG, PYVHOST_DIRECT, s)
                                  for s in sizes},
            "direct log on/off per cpu": {
                str(s): ratio(PYVHOST_DIRECT_LOG, PYVHOST_DIRECT, s, "per_cpu_median")
                for s in sizes},
            "copy log on/off": {str(s): ratio(PYVHOST_COPY_LOG, PYVHOST_COPY, s) for s in sizes},
            "copy log on/off per cpu": {
                str(s): ratio(PYVHOST_COPY_LOG, PYVHOST_COPY, s, "per_cpu_median")
                for s in sizes},
            "packed direct/copy": {str(s): ratio(PYVHOST_DIRECT_PACKED, PYVHOST_COPY_PACKED, s)
                                   for s in sizes},
            "packed direct/dpdk": {str(s): ratio(PYVHOST_DIRECT_PACKED, DPDK_VHOST_PACKED, s)
                                   for s in sizes},
            "packed direct/dpdk best": {
                str(s): ratio(PYVHOST_DIRECT_PACKED, DPDK_VHOST_PACKED, s, "max")
                for s in sizes},
            "direct packed/split": {str(s): ratio(PYVHOST_DIRECT_PACKED, PYVHOST_DIRECT, s)
                                    for s in sizes},
            "dpdk packed/split": {str(s): ratio(DPDK_VHOST_PACKED, DPDK_VHOST, s)
                                  for s in sizes}}


_MARKS = {"generator": "‡", "sink": "§"}


def _cell(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    limits = stats.get("limited_by", {})
    other = max((k for k in limits if k in _MARKS), key=limits.get, default=None)
    mark = f" {_MARKS[other]}" if other and limits[other] * 2 > stats["n"] else ""
    return f"{stats['median']:.2f} [{stats['min']:.2f}–{stats['max']:.2f}]{mark}"


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _direction_rows(direction: str, sizes: Sequence[int], summary: dict, rat: dict,
                    contenders: Sequence[str]) -> list[str]:
    """One direction's table rows: a row per contender, then the two ratios."""
    rows = []
    for contender in ALL_CONTENDERS:
        if contender in contenders:
            cells = summary.get(direction, {}).get(contender, {})
            rows.append(f"| {ROW_LABELS[(direction, contender)]} | "
                        + " | ".join(_cell(cells.get(str(n))) for n in sizes) + " |")
    for label, key in (("after / before (direct / copy)", "direct/copy"),
                       ("pyvhost direct / DPDK vhost PMD", "direct/dpdk"),
                       ("pyvhost direct / DPDK vhost PMD, best runs", "direct/dpdk best"),
                       ("dirty logging on / off (direct)", "direct log on/off"),
                       ("dirty logging on / off (direct), per backend CPU-second",
                        "direct log on/off per cpu"),
                       ("dirty logging on / off (copy)", "copy log on/off"),
                       ("dirty logging on / off (copy), per backend CPU-second",
                        "copy log on/off per cpu"),
                       ("packed: pyvhost direct / copy", "packed direct/copy"),
                       ("packed: pyvhost direct / DPDK vhost PMD", "packed direct/dpdk"),
                       ("packed: pyvhost direct / DPDK vhost PMD, best runs",
                        "packed direct/dpdk best"),
                       ("pyvhost direct: packed / split", "direct packed/split"),
                       ("DPDK vhost PMD: packed / split", "dpdk packed/split")):
        if key in rat and (key in ("direct/copy", "direct/dpdk")  # always shown
                           or any(v is not None for v in rat[key].values())):
            rows.append(f"| {label} | " + " | ".join(_ratio_cell(rat[key][str(n)])
                                                       for n in sizes) + " |")
    return rows


def markdown(result: dict[str, Any]) -> str:
    sizes = result["settings"]["sizes"]
    summary, rat, m = result["summary"], result["ratios"], result["machine"]
    s = result["settings"]
    head = "| backend | " + " | ".join(f"{n} B" for n in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpus']} CPUs), kernel {m['kernel']}, "
        f"DPDK {m['dpdk'] or '?'}, {'hugepages' if m['hugepages'] else '--no-huge'}; "
        f"load average at start {m['loadavg_start'][0]:.2f}; pyvhost {m['pyvhost_commit']}. "
        f"Generator on CPU {s['generator_cpu']}, backend on CPU {s['backend_cpu']}; "
        f"{s['repeat']} repetition(s), {s['warmup']:g} s warm-up, {s['window']:g} s window.",
        "",
        "**TX** (testpmd virtio-user `txonly` → backend): Mpps the backend itself received, "
        "median [min–max]",
        "",
        head, rule,
    ]
    lines += _direction_rows("tx", sizes, summary, rat, s["contenders"])
    if s["rx"]:
        lines += ["", "**RX** (backend generates → testpmd virtio-user `rxonly`): Mpps the "
                  "backend delivered into the ring, median [min–max]", "", head, rule]
        lines += _direction_rows("rx", sizes, summary,
                                 result.get("rx_ratios") or ratios(summary, sizes, "rx"),
                                 s["contenders"])
    if s.get("loopback"):
        loop_sizes = s["loop_sizes"]
        lhead = "| backend | " + " | ".join(f"{n} B" for n in loop_sizes) + " |"
        lines += ["", f"**Loopback** (testpmd virtio-user `io`, `start tx_first {LOOP_BURSTS}`;"
                  " the backend sends every frame it receives back): Mpps the backend "
                  "delivered into virtio-user's RX ring, median [min–max]", "", lhead,
                  "|---|" + "---:|" * len(loop_sizes)]
        lines += _direction_rows("loop", loop_sizes, summary,
                                 result.get("loop_ratios") or ratios(summary, loop_sizes, "loop"),
                                 s["contenders"])
    for direction, title in (
            ("tap-tx", "**TAP TX** (testpmd virtio-user `txonly` → backend → TAP in a network "
                       "namespace): Mpps the TAP counted, median [min–max]"),
            ("tap-rx", "**TAP RX** (testpmd AF_PACKET `txonly` on the TAP in its namespace → "
                       "backend → testpmd virtio-user `rxonly`): Mpps the backend delivered "
                       "into the ring, median [min–max]")):
        if s.get("tap"):
            tsizes = s["tap_sizes"]
            lines += ["", title, "", "| backend | " + " | ".join(f"{n} B" for n in tsizes) + " |",
                      "|---|" + "---:|" * len(tsizes)]
            lines += _direction_rows(direction, tsizes, summary,
                                     result.get(f"{direction}_ratios")
                                     or ratios(summary, tsizes, direction), s["contenders"])
    text = "\n".join(lines)
    if "‡" in text:
        lines += ["", "‡ generator-bound: the backend took at least "
                  f"{100 - 100 * GENERATOR_BOUND:g}% of what virtio-user offered, so this is a "
                  "lower bound of what the backend can take."]
    if "†" in text:
        lines += ["", "† dirty logging on: `pyvhost net --bench-log-all` logs every page it "
                  "writes (frames, used-ring entries and indices) in a dirty log as during a "
                  "live migration (LOG_ALL, used rings logged), and a thread clears the log "
                  "every 10 ms as QEMU's dirty sync does, so the bits must be set again. "
                  "DPDK virtio-user cannot negotiate LOG_ALL, so the backend turns it on "
                  "itself; the kernels take exactly the migration's path. Alternated with "
                  "the same backend without it."]
    if "§" in text:
        lines += ["", "§ sink-bound: the ring was often full, so virtio-user's RX set the pace, "
                  "not the backend."]
    shares = [x["backend_cpu_share"] for x in result["samples"]
              if x["backend_cpu_share"] is not None and not x["error"]]
    if shares:
        lines += ["", f"CPU share the backend process got during its windows: median "
                  f"{statistics.median(shares):.2f}, min {min(shares):.2f} (1.00 = its whole "
                  "core; less means other work ran on it)."]
    bad = [x for x in result["samples"] if x["error"]]
    mismatched = [x for x in result["samples"] if x["counts_match"] is False]
    if bad:
        lines += ["", f"{len(bad)} sample(s) failed (see `error` in the JSON)."]
    if mismatched:
        lines += ["", f"{len(mismatched)} sample(s) where the final counts did not match."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["settings"]["sizes"]
    panels = [("tx", n) for n in sizes]
    if result["settings"]["rx"]:
        panels += [("rx", n) for n in sizes]
    if result["settings"].get("loopback"):
        panels += [("loop", n) for n in result["settings"]["loop_sizes"]]
    if result["settings"].get("tap"):
        panels += [(d, n) for d in ("tap-tx", "tap-rx")
                   for n in result["settings"]["tap_sizes"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8), squeeze=False)
    colors = {PYVHOST_COPY: "#9e9e9e", PYVHOST_DIRECT: "#1f77b4", DPDK_VHOST: "#d62728",
              PYVHOST_COPY_LOG: "#cfcfcf", PYVHOST_DIRECT_LOG: "#8fbbd9",
              PYVHOST_COPY_PACKED: "#6e6e6e", PYVHOST_DIRECT_PACKED: "#0b4f80",
              DPDK_VHOST_PACKED: "#8c1a1b"}
    for ax, (direction, size) in zip(axes[0], panels):
        contenders = [c for c in ALL_CONTENDERS if c in result["settings"]["contenders"]]
        names, heights, lows, highs = [], [], [], []
        for c in contenders:
            stats = result["summary"].get(direction, {}).get(c, {}).get(str(size))
            names.append(SHORT_LABELS[c])
            heights.append(stats["median"] if stats else 0.0)
            lows.append(stats["median"] - stats["min"] if stats else 0.0)
            highs.append(stats["max"] - stats["median"] if stats else 0.0)
        x = range(len(names))
        ax.bar(x, heights, yerr=[lows, highs], capsize=4,
               color=[colors[c] for c in contenders])
        for i, c in enumerate(contenders):
            pts = [s["pps"] / 1e6 for s in result["samples"]
                   if s["direction"] == direction and s["contender"] == c
                   and s["packet_size"] == size and s["pps"] is not None and not s["error"]]
            ax.plot([i] * len(pts), pts, "k.", markersize=3)
            if heights[i] == 0.0:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{direction.upper()} {size} B", fontsize=10)
        ax.set_ylabel("Mpps (backend's count)")
    fig.suptitle(f"pyvhost vs DPDK vhost PMD — {result['machine']['date'][:10]}, "
                 f"{result['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick

    def pick(value: float | None, full: float, fast: float) -> float:
        return value if value is not None else (fast if quick else full)

    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(ALL_CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders: {', '.join(sorted(unknown))}")
    if getattr(args, "dirty_log", False):
        contenders += [logged for logged, plain in LOGGING_OF.items()
                       if plain in contenders and logged not in contenders]
    if getattr(args, "packed", False):
        contenders += [packed for packed, split in PACKED_OF.items()
                       if split in contenders and packed not in contenders]
    hugepages = (not args.no_huge) and tb.hugepages_available(2 * args.memory_mib)
    interval = pick(args.interval, 1.0, 0.5)
    sizes = [int(n) for n in args.sizes.split(",") if n]
    loopback = not args.no_loopback and "loopback" in _pyvhost_rx_sources()
    loop_sizes = sizes[:1] if quick else sizes  # --quick: the loopback at the first size only
    window = max(pick(args.window, 5.0, 1.0), interval)
    return Settings(sizes=sizes,
                    repeat=int(pick(args.repeat, 5, 1)), warmup=pick(args.warmup, 1.0, 0.5),
                    window=window, interval=interval, hugepages=hugepages,
                    backend_cpu=args.backend_cpu, generator_cpu=args.generator_cpu,
                    memory_mib=args.memory_mib, rx=not args.no_rx, contenders=contenders,
                    drain=0.3 if quick else 0.5, loopback=loopback, loop_sizes=loop_sizes,
                    tap=not args.no_tap, tap_sizes=[] if args.no_tap else loop_sizes,
                    only=[d for d in (args.only or "").split(",") if d])


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every context manager cleans up."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def compile_kernels(timeout: float = 900.0) -> None:
    """Compile (or load) pyvhost net's kernels once, before any sample. Why: the cache is keyed
    by the package's source, so after any edit the first `pyvhost net` compiles for 2-3 min
    and that sample failed on its 120 s wait for the socket."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pyvhost", "net", "--source", "loopback",
                           "--compile-only", "--log-level", "WARNING"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"pyvhost net --compile-only failed:\n{done.stderr[-2000:]}")
    print(f"pyvhost bench: kernels compiled or loaded in {time.monotonic() - t0:.1f} s",
          file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    tb.find_testpmd()
    if shutil.which("taskset") is None:
        raise SystemExit("taskset not found (util-linux)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description(settings.hugepages)
    load = machine["loadavg_start"][0]
    if load > args.load_threshold:
        print(f"WARNING: load average {load:.2f} > {args.load_threshold}: other work is "
              f"running on this machine; the figures will be low and noisy.", file=sys.stderr)
    samples = plan(settings)
    if any(s.contender.startswith("pyvhost") for s in samples):
        compile_kernels()
    print(f"pyvhost bench: {len(samples)} samples, "
          f"{'hugepages' if settings.hugepages else '--no-huge'}, generator CPU "
          f"{settings.generator_cpu}, backend CPU {settings.backend_cpu}", file=sys.stderr)
    started = time.monotonic()
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="pyvhost-bench-") as tmp:
        for i, sample in enumerate(samples, 1):
            run_sample(settings, sample, Path(tmp))
            shown = f"{sample.mpps:7.3f} Mpps" if sample.mpps is not None else "  failed"
            print(f"[{i}/{len(samples)}] {sample.direction} {sample.contender:15s} "
                  f"{sample.packet_size:5d} B rep {sample.repetition}: {shown}"
                  f"{'' if sample.counts_match in (True, None) else ' (counts differ)'}"
                  f"{'  ' + sample.error.splitlines()[0] if sample.error else ''}",
                  file=sys.stderr, flush=True)
    machine["loadavg_end"] = list(os.getloadavg())
    summary = summarize(samples)
    result = {
        "settings": dataclasses.asdict(settings),
        "machine": machine,
        "summary": summary,
        "ratios": ratios(summary, settings.sizes),
        "rx_ratios": ratios(summary, settings.sizes, "rx"),
        "loop_ratios": ratios(summary, settings.loop_sizes, "loop"),
        "tap-tx_ratios": ratios(summary, settings.tap_sizes, "tap-tx"),
        "tap-rx_ratios": ratios(summary, settings.tap_sizes, "tap-rx"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "samples": [dict(dataclasses.asdict(s), mpps=s.mpps) for s in samples],
    }
    paths = {k: out_dir / f"vhost.{k}" for k in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    paths["md"].write_text(table)
    plot(result, paths["png"])
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    failed = [s for s in samples if s.error or s.counts_match is False]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvhost bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
