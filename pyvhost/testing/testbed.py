"""Test-bed helpers: real vhost-user frontends (DPDK testpmd, QEMU) and network namespaces.

Used by the interop tests and the benchmarks. Everything started here is a
context manager that kills and reaps its processes and removes what it created
(DPDK runtime folders, server sockets, namespaces) on exit, also on failure.

Machine preparation (packages, hugepages, the guest kernel and initramfs) is
done by scripts/setup.sh; the helpers only look for what it leaves behind.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("PYVHOST_GUEST_DIR", REPO_ROOT / ".cache" / "guest"))
HUGEPAGE_MOUNT = Path("/dev/hugepages")
DPDK_RUNTIME_DIR = Path("/var/run/dpdk")

_instance_counter = itertools.count()


class TestbedError(RuntimeError):
    """A frontend failed to start, stop or answer; the message carries its log."""

    __test__ = False  # not a pytest test class despite the name


def unique_name(kind: str) -> str:
    """A name no other instance in this or a parallel process uses (pid + counter + random)."""
    return f"pyvhost-{kind}-{os.getpid()}-{next(_instance_counter)}-{secrets.token_hex(2)}"


def _log_tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _kill_and_reap(proc: subprocess.Popen | None, term_signal: int, grace: float) -> None:
    """Ask politely, then SIGKILL; always reap so no zombie is left."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    try:
        proc.send_signal(term_signal)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        proc.wait()


class _OutputCollector:
    """Reads a child's output stream on a thread; lets callers wait for a pattern."""

    def __init__(self, stream, name: str, transform=None, tee_path: Path | None = None):
        self._stream = stream
        self._transform = transform or (lambda s: s)
        self._chunks: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._tee = open(tee_path, "w") if tee_path else None
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        read = getattr(self._stream, "read1", self._stream.read)
        try:
            while data := read(65536):
                text = self._transform(data.decode("utf-8", errors="replace"))
                if self._tee:
                    self._tee.write(text)
                    self._tee.flush()
                with self._cond:
                    self._chunks.append(text)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            if len(self._chunks) > 1:
                self._chunks[:] = ["".join(self._chunks)]
            return self._chunks[0] if self._chunks else ""

    def wait_for(self, pattern: re.Pattern, start: int, deadline: float) -> re.Match | None:
        """First match of `pattern` in the text from offset `start`, or None on EOF/deadline."""
        while True:
            match = pattern.search(self.text, start)
            if match:
                return match
            with self._cond:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return pattern.search(self.text, start)
                self._cond.wait(min(remaining, 0.5))

    def close(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        if self._tee:
            self._tee.close()
            self._tee = None


# --------------------------------------------------------------------------- DPDK testpmd


def find_testpmd() -> str:
    """Path of dpdk-testpmd (override with $PYVHOST_TESTPMD)."""
    override = os.environ.get("PYVHOST_TESTPMD")
    path = override or shutil.which("dpdk-testpmd") or shutil.which("testpmd")
    if not path:
        raise FileNotFoundError("dpdk-testpmd not found: run scripts/setup.sh (Debian package dpdk-dev)")
    return path


def _meminfo() -> dict[str, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])
    return info


def _hugetlbfs_mounted() -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "hugetlbfs":
            return True
    return False


def hugepages_available(memory_mib: int = 512) -> bool:
    """True when enough free 2 MiB hugepages and a hugetlbfs mount exist for one instance.

    $PYVHOST_NO_HUGE=1 forces False (to measure or test the fallback).
    """
    if os.environ.get("PYVHOST_NO_HUGE") == "1":
        return False
    info = _meminfo()
    free_kib = info.get("HugePages_Free", 0) * info.get("Hugepagesize", 0)
    return free_kib >= memory_mib * 1024 and _hugetlbfs_mounted()


def testpmd_lcores(main_cpu: int, forward_cpus: Sequence[int]) -> str:
    """--lcores map: lcore 0 (main, mostly sleeping) and one forwarding lcore per CPU given."""
    cpus = [main_cpu, *forward_cpus]
    return ",".join(f"{lcore}@{cpu}" for lcore, cpu in enumerate(cpus))


def testpmd_eal_args(
    file_prefix: str,
    *,
    vdevs: Iterable[str] = (),
    lcores: str | None = None,
    memory_mib: int = 512,
    hugepages: bool | None = None,
) -> list[str]:
    """EAL arguments for one testpmd instance, with hugepages or the --no-huge fallback.

    With hugepages, --in-memory backs memory with hugetlb memfds instead of files
    in /dev/hugepages, so an instance killed with SIGKILL leaks no hugepages.
    --in-memory is refused together with --no-huge (which implies legacy memory),
    so the fallback relies on the unique --file-prefix alone.
    """
    if hugepages is None:
        hugepages = hugepages_available(memory_mib)
    args = ["--no-pci", "--single-file-segments", f"--file-prefix={file_prefix}",
            "--no-telemetry", "-m", str(memory_mib)]
    args.append("--in-memory" if hugepages else "--no-huge")
    if lcores:
        args += ["--lcores", lcores]
    for vdev in vdevs:
        args += ["--vdev", vdev]
    return args


# Their names start with "test": keep pytest from collecting them where imported.
testpmd_lcores.__test__ = False  # type: ignore[attr-defined]
testpmd_eal_args.__test__ = False  # type: ignore[attr-defined]


@dataclasses.dataclass
class PortStats:
    """A 'Forward statistics' block testpmd prints when it stops (counts since forwarding started)."""

    port: int | None  # None for the 'Accumulated ... all ports' block
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. Bad-ipcsum in csum mode


@dataclasses.dataclass
class NicStats:
    """A periodic 'NIC statistics' block (--stats-period): counts since the port started.

    The last one is up to one period older than the stop, so its byte counts are
    exact only for a port that was idle in its final period (e.g. a receiver whose
    generator was stopped first, see Testpmd.wait_until_idle).
    """

    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    tx_pps: int = 0


@dataclasses.dataclass
class TestpmdResult:
    __test__ = False

    returncode: int
    ports: dict[int, PortStats]
    total: PortStats | None
    nic_samples: dict[int, list[NicStats]]  # every periodic sample, oldest first
    log: str

    @property
    def last_nic(self) -> dict[int, NicStats]:
        return {port: samples[-1] for port, samples in self.nic_samples.items() if samples}


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FORWARD_BLOCK = re.compile(
    r"-+ Forward statistics for port (\d+)\s+-+\n(.*?)\n\s*-{20,}", re.S)
_ACCUMULATED_BLOCK = re.compile(
    r"\++ Accumulated forward statistics for all ports\++\n(.*?)\n\s*\+{20,}", re.S)
_NIC_BLOCK = re.compile(r"#+ NIC statistics for port (\d+)\s+#+\n(.*?)\n\s*#{20,}", re.S)
_KEY_VALUE = re.compile(r"([A-Za-z][\w-]*):\s+(\d+)")


def _key_values(block: str) -> dict[str, int]:
    return {key.lower().replace("-", "_").replace(" ", "_"): int(value)
            for key, value in _KEY_VALUE.findall(block)}


def _port_stats(port: int | None, block: str) -> PortStats:
    values = _key_values(block)
    known = {f.name for f in dataclasses.fields(PortStats)} - {"port", "extra"}
    counters: dict[str, Any] = {k: v for k, v in values.items() if k in known}
    stats = PortStats(port, **counters)
    stats.extra = {k: v for k, v in values.items() if k not in known}
    return stats


def parse_testpmd_output(log: str, returncode: int = 0) -> TestpmdResult:
    """Final forward statistics and all periodic NIC samples found in a testpmd log."""
    ports = {int(m[1]): _port_stats(int(m[1]), m[2]) for m in _FORWARD_BLOCK.finditer(log)}
    accumulated = list(_ACCUMULATED_BLOCK.finditer(log))
    total = _port_stats(None, accumulated[-1][1]) if accumulated else None
    nic_samples: dict[int, list[NicStats]] = {}
    known = {f.name for f in dataclasses.fields(NicStats)} - {"port"}
    for match in _NIC_BLOCK.finditer(log):
        port = int(match[1])
        values = _key_values(match[2])
        nic_samples.setdefault(port, []).append(
            NicStats(port, **{k: v for k, v in values.items() if k in known}))
    return TestpmdResult(returncode, ports, total, nic_samples, log)


def _server_socket_paths(vdevs: Iterable[str]) -> list[Path]:
    """Sockets a vdev creates as the listening side (so this instance must remove them)."""
    paths = []
    for vdev in vdevs:
        name, _, params = vdev.partition(",")
        kv = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if name.startswith("net_vhost") and kv.get("client", "0") == "0" and "iface" in kv:
            paths.append(Path(kv["iface"]))
        elif name.startswith("net_virtio_user") and kv.get("server", "0") == "1" and "path" in kv:
            paths.append(Path(kv["path"]))
    return paths


class Testpmd:
    """One dpdk-testpmd process, forwarding from start until stop().

        with Testpmd(["net_vhost0,iface=/tmp/s.sock"], forward_mode="rxonly") as rx:
            ...
            result = rx.stop()          # SIGINT; parses the final statistics
            result.ports[0].rx_packets

    Non-interactive (default): stdin is closed; `--stats-period` keeps testpmd
    running (without it testpmd exits at once on EOF) and prints periodic NIC
    samples. Interactive (`interactive=True`): commands go to its stdin, so a
    generator can stop forwarding while its ports stay up (`stop_forwarding()`)
    and exact NIC counters can be read on demand (`port_stats()`).

    Why interactive matters for generators: SIGINT makes testpmd stop forwarding
    and then close its ports at once; closing sends GET_VRING_BASE, which stops
    the backend's rings with up to a ring's worth (here 32 or 256) of packets
    still queued, counted as sent but never received.
    """

    __test__ = False
    READY = re.compile(r"packet forwarding - ports=(\d+)")

    def __init__(
        self,
        vdevs: Sequence[str],
        *,
        forward_mode: str = "io",
        app_args: Sequence[str] = (),
        lcores: str | None = None,
        memory_mib: int = 512,
        hugepages: bool | None = None,
        total_mbufs: int = 16384,
        stats_period: int = 1,
        interactive: bool = False,
        name: str = "testpmd",
        log_path: Path | None = None,
        start_timeout: float = 60.0,
        netns: str | None = None,
    ):
        self.vdevs = list(vdevs)
        self.hugepages = hugepages_available(memory_mib) if hugepages is None else hugepages
        self.file_prefix = unique_name(name)
        last_cpu = (os.cpu_count() or 1) - 1
        lcores = lcores or testpmd_lcores(last_cpu, [last_cpu])
        eal = testpmd_eal_args(self.file_prefix, vdevs=self.vdevs, lcores=lcores,
                               memory_mib=memory_mib, hugepages=self.hugepages)
        # A fixed, small mbuf pool: the default (sized for 32 ports) does not fit
        # in --no-huge -m 512, and one size for both modes keeps runs comparable.
        app = [f"--forward-mode={forward_mode}", f"--total-num-mbufs={total_mbufs}"]
        # Interactive mode ignores --stats-period; it needs --auto-start to forward.
        app += ["-i", "--auto-start"] if interactive else [f"--stats-period={stats_period}"]
        app += app_args
        self.interactive = interactive
        # testpmd's stdout is a pipe here, so stdio would buffer it by blocks and
        # interactive output would sit unseen behind the prompt: force line buffering.
        self.argv = ["stdbuf", "-oL", "-eL", find_testpmd(), *eal, "--", *app]
        if netns is not None:  # its TAP and AF_PACKET ports live in that network namespace
            self.argv = ["ip", "netns", "exec", netns, *self.argv]
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.result: TestpmdResult | None = None
        self._proc: subprocess.Popen | None = None
        self._output: _OutputCollector | None = None

    # -- lifecycle

    def __enter__(self) -> "Testpmd":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start testpmd and return once it reports forwarding; raise with its log if not."""
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if self.interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            # Keep Python's SIG_IGN for SIGPIPE: virtio-user writes to the vhost-user
            # socket while closing, and with the default action it dies silently
            # (-13, no final statistics) whenever the backend went away first.
            restore_signals=False)
        self._output = _OutputCollector(
            self._proc.stdout, f"{self.file_prefix}-out",
            transform=lambda s: _ANSI_ESCAPE.sub("", s), tee_path=self.log_path)
        deadline = time.monotonic() + self.start_timeout
        ready = self._output.wait_for(self.READY, 0, deadline)
        if not ready:
            raise TestbedError(self._failure("did not start forwarding"))
        # A vdev that fails to probe (e.g. virtio-user finding no backend) does
        # not stop testpmd: it forwards on the remaining ports, possibly none.
        if int(ready[1]) != len(self.vdevs):
            raise TestbedError(self._failure(
                f"forwards on {ready[1]} ports, expected {len(self.vdevs)} (a vdev failed to probe)"))

    def stop(self, timeout: float = 30.0) -> TestpmdResult:
        """SIGINT (testpmd stops forwarding, prints final statistics, exits); parse them."""
        if self.result is not None:
            return self.result
        assert self._proc is not None and self._output is not None, "not started"
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise TestbedError(self._failure(f"did not exit {timeout}s after SIGINT"))
        self._output.close()
        self.result = parse_testpmd_output(self.log, self._proc.returncode)
        if self._proc.returncode != 0 or not self.result.ports:
            raise TestbedError(self._failure(f"exited {self._proc.returncode} without final statistics"))
        return self.result

    def close(self) -> None:
        """Kill and reap (if still running); remove the runtime folder and server sockets."""
        if self._proc and self._proc.stdin:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        _kill_and_reap(self._proc, signal.SIGKILL, 0)
        if self._output:
            self._output.close()
        shutil.rmtree(DPDK_RUNTIME_DIR / self.file_prefix, ignore_errors=True)
        for path in _server_socket_paths(self.vdevs):
            path.unlink(missing_ok=True)

    # -- observation

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def log(self) -> str:
        return self._output.text if self._output else ""

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait until `pattern` appears in the log (from offset `start`); raise on exit/timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        assert self._output is not None, "not started"
        match = self._output.wait_for(regex, start, time.monotonic() + timeout)
        if not match:
            raise TestbedError(self._failure(f"no {regex.pattern!r} within {timeout}s"))
        return match

    # -- interactive commands

    def command(self, line: str, until: str | re.Pattern, timeout: float = 30.0) -> str:
        """Send one command line (interactive mode); return the output up to `until`."""
        if not self.interactive:
            raise TestbedError("commands need Testpmd(interactive=True)")
        start = len(self.log)
        assert self._proc is not None and self._proc.stdin is not None, "not started"
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError as exc:
            raise TestbedError(self._failure(f"cannot send {line!r}: {exc}")) from exc
        match = self.wait_for(until, timeout, start)
        return self.log[start:match.end()]

    def stop_forwarding(self, timeout: float = 30.0) -> dict[int, PortStats]:
        """'stop': forwarding ends, ports stay up; returns the forward statistics."""
        output = self.command("stop", _ACCUMULATED_BLOCK, timeout)
        return parse_testpmd_output(output).ports

    def port_stats(self, nb_ports: int | None = None, timeout: float = 30.0) -> dict[int, NicStats]:
        """'show port stats all': exact counters (with bytes) of every port, now."""
        nb_ports = len(self.vdevs) if nb_ports is None else nb_ports
        last = re.compile(rf"NIC statistics for port {nb_ports - 1}\s.*?\n\s*#{{20,}}", re.S)
        output = self.command("show port stats all", last, timeout)
        return parse_testpmd_output(output).last_nic

    # -- periodic samples (non-interactive)

    def nic_samples(self, port: int = 0) -> list[NicStats]:
        return parse_testpmd_output(self.log).nic_samples.get(port, [])

    def wait_until_idle(self, port: int = 0, timeout: float = 30.0) -> NicStats:
        """Wait for two consecutive periodic samples with equal RX and TX counts.

        Call on a receiver after stopping its generator: then the last sample's
        byte counts are final, which the SIGINT statistics do not include.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.nic_samples(port)
            if len(samples) >= 2:
                a, b = samples[-2], samples[-1]
                if (a.rx_packets, a.tx_packets) == (b.rx_packets, b.tx_packets):
                    return b
            time.sleep(0.2)
            if not self.running():
                break
        raise TestbedError(self._failure(f"port {port} did not go idle within {timeout}s"))

    def _failure(self, what: str) -> str:
        state = "running" if self.running() else f"exit code {self._proc.returncode if self._proc else None}"
        return (f"testpmd {self.file_prefix} {what} ({state})\n"
                f"command: {' '.join(self.argv)}\n--- log tail ---\n{_log_tail(self.log)}")


def vhost_pmd_vdev(socket_path: Path | str, index: int = 0, **params: object) -> str:
    """--vdev for DPDK's own C vhost-user backend (server unless client=1)."""
    extra = "".join(f",{k}={v}" for k, v in params.items())
    return f"net_vhost{index},iface={socket_path}{extra}"


def virtio_user_vdev(socket_path: Path | str, index: int = 0, **params: object) -> str:
    """--vdev for DPDK's virtio-user frontend (client unless server=1)."""
    extra = "".join(f",{k}={v}" for k, v in params.items())
    return f"net_virtio_user{index},path={socket_path}{extra}"


def wait_for_socket(path: Path | str, timeout: float = 30.0) -> None:
    """Wait until a listening socket file appears (a server started elsewhere)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TestbedError(f"socket {path} did not appear within {timeout}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- QEMU guest


def find_qemu() -> str:
    path = os.environ.get("PYVHOST_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise FileNotFoundError("qemu-system-x86_64 not found: run scripts/setup.sh")
    return path


def guest_image_paths() -> tuple[Path, Path]:
    kernel, initrd = GUEST_DIR / "vmlinuz", GUEST_DIR / "initramfs.cpio.gz"
    if not (kernel.exists() and initrd.exists()):
        raise FileNotFoundError(f"guest not built in {GUEST_DIR}: run scripts/build-guest.sh")
    return kernel, initrd


def vhost_user_net_args(socket_path: Path | str, index: int = 0, mac: str | None = None,
                        server: bool = False, **device_props: object) -> list[str]:
    """QEMU arguments for a virtio-net-pci device backed by a vhost-user socket.

    vectors=0: QEMU 7.2 under TCG crashes on vhost-user virtio-net-pci with MSI-X.
    romfile='': no iPXE option ROM is needed for a -kernel boot.
    device_props are added to -device (e.g. packed="on": the guest is offered packed rings).
    """
    chardev = f"socket,id=vhu{index},path={socket_path}" + (",server=on,wait=off" if server else "")
    device = f"virtio-net-pci,netdev=net{index},vectors=0,romfile="
    if mac:
        device += f",mac={mac}"
    device += "".join(f",{k}={v}" for k, v in device_props.items())
    return ["-chardev", chardev, "-netdev", f"vhost-user,id=net{index},chardev=vhu{index}",
            "-device", device]


def vhost_user_rng_args(socket_path: Path | str, index: int = 0, server: bool = False,
                        **device_props: object) -> list[str]:
    """QEMU arguments for a virtio-rng device (virtio ID 4) backed by a vhost-user socket.

    The guest's virtio_rng driver binds it and /dev/hwrng reads from it. QEMU 7.2 sets up
    the vhost-user device while it realizes it, so it needs the backend before the guest
    starts: as a client (default) it connects to a listening backend (start that first,
    `wait_for_socket`); with `server=True` it listens and waits (no `wait=off`) until a
    `--client` backend connects, so start that backend before QEMU too (it retries).
    `device_props` are added to -device (e.g. vectors=0, event_idx="off"). MSI-X works here
    under TCG (unlike virtio-net, trap 8), so QEMU's default vectors are kept. QEMU 7.2
    acknowledges the guest's features (VERSION_1, and EVENT_IDX and INDIRECT_DESC unless
    turned off here) with SET_FEATURES without asking the backend what it offers.
    """
    chardev = f"socket,id=rng{index},path={socket_path}" + (",server=on" if server else "")
    device = f"vhost-user-rng-pci,chardev=rng{index}"
    device += "".join(f",{k}={v}" for k, v in device_props.items())
    return ["-chardev", chardev, "-device", device]


def pyvhost_command() -> list[str]:
    """How to run the pyvhost CLI: the venv's console script, else `python -m pyvhost`."""
    script = Path(sys.executable).parent / "pyvhost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pyvhost"]


class PyvhostDaemon:
    """One `pyvhost SUBCOMMAND ...` process (e.g. `rng`, `run MODULE:CLASS`, `net`).

        with PyvhostDaemon(["rng", "--socket-path", sock, "--stats-json", stats]) as d:
            d.wait_listening()                 # server mode: the socket file exists
            ...
        d.returncode, d.log                    # after exit: SIGTERM was sent, it was reaped

    stderr and stdout go to one collector (`log`). `stop()` sends SIGTERM (the daemon
    writes --stats-json and exits), waits, then SIGKILLs; a socket it listened on is
    removed if still there. `env` entries are added to the environment (None removes one).
    `netns`: run it inside that network namespace (`ip netns exec`, which execs: the pid is
    the daemon's), e.g. so that the TAP it creates lives there.
    """

    def __init__(self, args: Sequence[str], *, cwd: Path | str | None = None,
                 env: dict[str, str | None] | None = None, name: str = "pyvhost",
                 log_path: Path | None = None, netns: str | None = None):
        self.args = [str(a) for a in args]
        self.argv = [*(["ip", "netns", "exec", netns] if netns else []), *pyvhost_command(),
                     *self.args]
        self.cwd = cwd
        self.env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.name = unique_name(name)
        self.log_path = log_path
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._output: _OutputCollector | None = None

    @property
    def socket_path(self) -> Path | None:
        if "--socket-path" in self.args:
            return Path(self.args[self.args.index("--socket-path") + 1])
        return None

    @property
    def client(self) -> bool:
        return "--client" in self.args

    def __enter__(self) -> "PyvhostDaemon":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._output = _OutputCollector(self._proc.stdout, f"{self.name}-out",
                                        tee_path=self.log_path)

    def wait_listening(self, timeout: float = 120.0) -> None:
        """Wait for the listening socket (server mode); raise with the log if it exits first."""
        path = self.socket_path
        assert path is not None and not self.client, "only a listening daemon has a socket to wait for"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.running():
                raise TestbedError(self._failure("exited before listening"))
            if time.monotonic() > deadline:
                raise TestbedError(self._failure(f"no socket {path} within {timeout}s"))
            time.sleep(0.05)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def log(self) -> str:
        return self._output.text if self._output else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout` s (then SIGKILL); returns the exit code."""
        _kill_and_reap(self._proc, signal.SIGTERM, timeout)
        if self._proc is not None:
            self.returncode = self._proc.returncode
        if self._output:
            self._output.close()
        if not self.client and self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        return self.returncode

    def close(self) -> None:
        self.stop()

    def _failure(self, what: str) -> str:
        state = "running" if self.running() else f"exit code {self._proc.returncode if self._proc else None}"
        return (f"{self.name} {what} ({state})\ncommand: {' '.join(self.argv)}\n"
                f"--- log tail ---\n{_log_tail(self.log)}")


class CommandResult(NamedTuple):
    output: str
    status: int


class GuestTimeout(TestbedError):
    def __init__(self, message: str, partial_output: str):
        super().__init__(message)
        self.partial_output = partial_output


class GuestVM:
    """The test guest under QEMU TCG, driven through its serial console.

        with GuestVM(vhost_user_net_args(sock)) as vm:
            out, status = vm.run("ip -o link")
            random = vm.read_bytes("/dev/hwrng", 1024)   # with vhost_user_rng_args(...)

    Guest RAM is a shared memfd (vhost-user backends must map it). The console is
    QEMU's stdio on pipes; QEMU's own messages go to stderr, kept apart so they
    never mix with command output.
    """

    READY = re.compile(r"pyvhost-guest: ready")
    INLINE_LIMIT = 600  # chars of base64 per console line (busybox line editing caps lines at 1 KiB)

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        memory_mib: int = 512,
        cpus: int = 1,
        kernel_cmdline: str = "",
        boot_timeout: float = 180.0,
        name: str = "guest",
        log_path: Path | None = None,
    ):
        kernel, initrd = guest_image_paths()
        self.name = unique_name(name)
        self.argv = [
            find_qemu(), "-accel", "tcg", "-nodefaults", "-no-reboot",
            "-name", self.name, "-smp", str(cpus), "-m", f"{memory_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 {kernel_cmdline}".strip(),
            "-display", "none", "-monitor", "none", "-serial", "stdio",
            *extra_args,
        ]
        self.boot_timeout = boot_timeout
        self.log_path = log_path
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._console: _OutputCollector | None = None
        self._stderr: _OutputCollector | None = None
        self._write_lock = threading.Lock()

    def __enter__(self) -> "GuestVM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Boot and return once the guest shell answers; raise with the console log if not."""
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)
        self._console = _OutputCollector(self._proc.stdout, f"{self.name}-console",
                                         tee_path=self.log_path)
        self._stderr = _OutputCollector(self._proc.stderr, f"{self.name}-stderr")
        # Typing before the shell runs loses characters (the UART FIFO is reset
        # while the kernel boots), so wait for init's ready line first.
        if not self._console.wait_for(self.READY, 0, started + self.boot_timeout):
            raise TestbedError(self._failure("did not boot"))
        self.run("true", timeout=max(30.0, started + self.boot_timeout - time.monotonic()))
        self.boot_seconds = time.monotonic() - started

    def close(self) -> None:
        """Stop QEMU (SIGTERM lets it close vhost-user connections cleanly, then SIGKILL)."""
        if self._proc and self._proc.stdin:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        _kill_and_reap(self._proc, signal.SIGTERM, 10.0)
        for collector in (self._console, self._stderr):
            if collector:
                collector.close()

    @property
    def console_log(self) -> str:
        return self._console.text if self._console else ""

    @property
    def qemu_stderr(self) -> str:
        return self._stderr.text if self._stderr else ""

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run(self, command: str, timeout: float = 30.0, check: bool = False) -> CommandResult:
        """Run a shell command in the guest; return its output (stdout+stderr) and exit status.

        The command travels base64-encoded (no quoting issues) and runs in a subshell
        with stdin from /dev/null, so it cannot eat later console input or exit the
        console shell. Its output lies between two markers that the echoed command
        line cannot contain (printf assembles them). On timeout, Ctrl-C is sent.
        """
        encoded = base64.b64encode(command.encode()).decode()
        if len(encoded) > self.INLINE_LIMIT:
            return self._run_long(encoded, timeout, check)
        return self._run_script(f'eval "$(echo {encoded} | base64 -d)"', timeout, command, check)

    def read_bytes(self, path: str, count: int, block_size: int = 64,
                   timeout: float = 30.0) -> bytes:
        """Read up to `count` bytes (count/block_size reads of block_size) of a guest file or
        device (e.g. /dev/hwrng) with busybox dd, and return them (via od's hex dump).

        Raises TestbedError if dd fails. A short read returns fewer bytes.
        """
        if count % block_size:
            raise ValueError(f"count {count} is not a multiple of block_size {block_size}")
        # od -v: no '*' for repeated lines (a patterned source repeats them).
        result = self.run(f"set -o pipefail; dd if={path} bs={block_size} count={count // block_size}"
                          " 2>/tmp/.dd.err | od -An -tx1 -v || { cat /tmp/.dd.err; exit 1; }",
                          timeout=timeout)
        if result.status != 0 or not re.fullmatch(r"[0-9a-f\s]*", result.output):
            raise TestbedError(f"guest: reading {path} failed (exit {result.status}):\n{result.output}")
        return bytes.fromhex("".join(result.output.split()))

    def _run_long(self, encoded: str, timeout: float, check: bool) -> CommandResult:
        """Commands too long for one console line: append to a file in chunks, then source it."""
        path = f"/tmp/.pyvhost-cmd-{secrets.token_hex(4)}"
        for i in range(0, len(encoded), self.INLINE_LIMIT):
            self._run_script(f"printf %s {encoded[i:i + self.INLINE_LIMIT]} >>{path}.b64",
                             30.0, "(upload)", check=True)
        script = f"base64 -d {path}.b64 >{path}; rm -f {path}.b64; . {path}; _s=$?; rm -f {path}; exit $_s"
        return self._run_script(script, timeout, "(long command)", check)

    def _run_script(self, script: str, timeout: float, shown: str, check: bool) -> CommandResult:
        if not self.running():
            raise TestbedError(self._failure("is not running"))
        token = secrets.token_hex(6)
        begin = re.compile(rf"pyvhost:{token}:begin\r?\n")
        end = re.compile(rf"\r?\npyvhost:{token}:end:(\d+)\r?\n")
        line = (f"printf '\\npyvhost:%s:begin\\n' {token}; ({script}) </dev/null 2>&1; "
                f"printf '\\npyvhost:%s:end:%d\\n' {token} $?\n")
        assert self._console is not None
        start = len(self.console_log)
        self._write(line.encode())
        deadline = time.monotonic() + timeout
        opened = self._console.wait_for(begin, start, deadline)
        closed = self._console.wait_for(end, opened.end(), deadline) if opened else None
        if not opened or not closed:
            partial = self.console_log[opened.end():] if opened else ""
            self._interrupt(end, start)
            raise GuestTimeout(self._failure(f"command {shown!r} did not finish in {timeout}s"),
                               partial.replace("\r\n", "\n"))
        output = self.console_log[opened.end():closed.start()].replace("\r\n", "\n")
        result = CommandResult(output, int(closed[1]))
        if check and result.status != 0:
            raise TestbedError(f"guest command {shown!r} exited {result.status}:\n{output}")
        return result

    def _interrupt(self, end: re.Pattern, start: int) -> None:
        """Ctrl-C the running command and resynchronise on its end marker."""
        if self.running() and self._console is not None:
            self._write(b"\x03")
            self._console.wait_for(end, start, time.monotonic() + 5.0)

    def _write(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None, "not started"
        with self._write_lock:
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise TestbedError(self._failure(f"console write failed: {exc}")) from exc

    def _failure(self, what: str) -> str:
        state = "running" if self.running() else f"exit code {self._proc.returncode if self._proc else None}"
        return (f"guest {self.name} {what} ({state})\ncommand: {' '.join(self.argv)}\n"
                f"--- qemu stderr ---\n{_log_tail(self.qemu_stderr, 20)}\n"
                f"--- console tail ---\n{_log_tail(self.console_log)}")


# --------------------------------------------------------------------------- network namespaces


class NetNamespace:
    """A uniquely named network namespace, removed (with its virtual links) on exit.

        with NetNamespace() as ns:
            ns.move_interface("tap0")
            ns.configure("tap0", "192.0.2.1/24")
            ns.run(["ping", "-c", "1", "192.0.2.2"])
    """

    def __init__(self, name: str | None = None):
        self.name = name or unique_name("ns")[:60]
        self.ipr: Any = None  # a pyroute2 NetNS while open

    def __enter__(self) -> "NetNamespace":
        from pyroute2 import NetNS, netns

        netns.create(self.name)
        try:
            self.ipr = NetNS(self.name)
            self.set_up("lo")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        from pyroute2 import netns

        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.name in netns.listnetns():
            netns.remove(self.name)

    def index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise TestbedError(f"no interface {ifname} in namespace {self.name}")
        return found[0]

    def move_interface(self, ifname: str) -> None:
        """Move an interface from the host's namespace into this one."""
        from pyroute2 import IPRoute

        with IPRoute() as host:
            found = host.link_lookup(ifname=ifname)
            if not found:
                raise TestbedError(f"no interface {ifname} in the host namespace")
            host.link("set", index=found[0], net_ns_fd=self.name)

    def set_up(self, ifname: str) -> None:
        self.ipr.link("set", index=self.index(ifname), state="up")

    def add_address(self, ifname: str, cidr: str) -> None:
        address, _, prefix = cidr.partition("/")
        self.ipr.addr("add", index=self.index(ifname), address=address, prefixlen=int(prefix or 32))

    def configure(self, ifname: str, cidr: str) -> None:
        """Address the interface and bring it up."""
        self.add_address(ifname, cidr)
        self.set_up(ifname)

    def link_names(self) -> list[str]:
        return [link.get("ifname") for link in self.ipr.get_links()]

    def run(self, argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (ip netns exec) and capture its output."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a background command inside the namespace; the caller must reap it."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)


def create_veth_pair(ifname: str, peer_ifname: str) -> None:
    """A veth pair in the host namespace, to be moved into test namespaces at once."""
    from pyroute2 import IPRoute

    with IPRoute() as host:
        host.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname})
