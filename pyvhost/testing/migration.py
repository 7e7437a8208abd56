"""Live-migration test bed: two QEMUs, two vhost-user net backends, one bridge, QMP.

    guest 192.0.2.2 (migrates A -> B)
      QEMU A ── vhost-user ── backend A (pyvhost net --tap | DPDK vhost PMD + tap PMD) ── TAP a ─┐
      QEMU B ── vhost-user ── backend B (identical options)                           ── TAP b ─┤
                                                       bridge br0 192.0.2.1/24 (in a namespace) ┘

    with MigrationBed("pyvhost") as bed:          # namespace, bridge, both backends, QEMU A
        bed.boot()                                # QEMU A boots the test guest; eth0 addressed
        bed.source.console.run("ping -c 1 192.0.2.1")
        dst = bed.start_destination()             # QEMU B on backend B, `-incoming defer`
        result = bed.migrate(dst)                 # migrate-incoming + migrate, poll query-migrate
        result.status, result.total_time_ms, result.downtime_ms
        bed.finish_switchover(dst)                # quit A (its backend's session ends); B is
                                                  # the source of the next migration (ping-pong)
        bed.source.console.run("...")             # now B's serial: the same shell, migrated

What lives here (the interop test `tests/test_interop_migration.py` and the figures
`pyvhost/bench/migration.py` use it):

- `Qmp`: a QMP client on a Unix socket (greeting, `qmp_capabilities`, `execute`, events).
- `SerialConsole`: the guest's shell through a QEMU `-serial` Unix socket, with the same
  command protocol as `testbed.GuestVM.run` (base64 commands, begin/end markers with a random
  token, exit status). Each QEMU has its own serial socket; the harness connects to it when
  QEMU starts (before the guest writes anything) and keeps the connection: after a migration
  the destination's console is the guest's console, in the middle of the same shell session.
- `MigratableVM`: one QEMU (TCG) of a pair: guest RAM in its own memfd (`share=on`, NUMA node:
  the backend maps it), QMP and serial on Unix sockets, optional `-incoming`, stderr kept.
- `PyvhostNetBackend`, `DpdkVhostTapBackend`: a backend with a TAP as its wire, run inside the
  bed's network namespace (`ip netns exec`, so the TAP is created there); pyvhost's live JSON
  statistics lines (`--stats-format json`) are parsed so a test can see `log_enabled` and
  `log_pages` move during a migration.
- `Pinger`, `TcpSink`, `TcpSource`: traffic run in the namespace (Python programs, started with
  `ip netns exec`). The pinger sends ICMP echo requests whose payload is unique per sequence
  number and checks each reply byte for byte: a receive buffer whose page the source backend
  wrote but did not log would reach the guest on the destination with stale bytes (an old
  request: a duplicate or a wrong payload, or a checksum drop).
- `start_migration` / `wait_migration` / `MigrationResult`: `query-migrate` as QEMU reports it
  (total-time, downtime, setup-time, RAM counters).

Network traffic stays inside the namespace the bed creates (the bridge, the TAPs) and the
guest. Everything is a context manager that kills and reaps its processes and removes its
sockets, namespace and work directory, also on failure.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Self, Sequence

from pyvhost.testing.testbed import (
    CommandResult,
    GuestTimeout,
    NetNamespace,
    PyvhostDaemon,
    Testpmd,
    TestbedError,
    _kill_and_reap,
    _log_tail,
    _OutputCollector,
    find_qemu,
    guest_image_paths,
    hugepages_available,
    testpmd_lcores,
    vhost_pmd_vdev,
    wait_for_socket,
)

HOST_CIDR = "192.0.2.1/24"
HOST_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
GUEST_MAC = "52:54:00:12:34:56"
BRIDGE = "br0"

# QEMU's migration states (qapi/migration.json MigrationStatus) that end a migration.
FINAL_STATES = ("completed", "failed", "cancelled")

# Guest RAM: 256 MiB + 8 KiB, deliberately NOT a multiple of 256 KiB (64 pages). QEMU 7.2 under
# TCG loses guest-CPU writes during migration when a RAM block is a multiple of 64 pages: the
# fast path of cpu_physical_memory_sync_dirty_bitmap() (include/exec/ram_addr.h) clears 64
# dirty bits at a time without resetting the TCG TLB's dirty state, so later stores through
# the TLB set no dirty bit and the destination keeps an old copy of the page. Fixed upstream by
# 03bfc2188f "physmem: Fix migration dirty bitmap coherency with TCG memory access" (QEMU 9.0;
# Fixes: aa8dc044772); the installed 7.2.22 still has it. Seen here
# with no vhost-user device at all (no NIC): 3 of 13 migrations of a 256 MiB guest left 1-6
# pages of kernel data different between source and destination (counters, list pointers),
# and the destination guest then oopsed (slab freelist corruption, a timer callback pointing
# into data). With a size that is not a multiple of 64 pages QEMU takes the page-by-page path,
# which resets the TLB: 0 differing pages in 10 of 10. docs/migration.md has the details.
GUEST_RAM_KIB = 256 * 1024 + 8


# --------------------------------------------------------------------------------------- QMP


class QmpError(TestbedError):
    """QEMU answered a QMP command with an error (`error.class`, `error.desc`)."""

    def __init__(self, command: str, error: dict[str, Any]):
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.command = command
        self.error = error


class Qmp:
    """A QMP client on a Unix socket (QEMU `-qmp unix:PATH,server=on,wait=off`).

    `execute()` sends one command and returns its `return` value (raises `QmpError` on
    `error`); asynchronous events met on the way are kept in `events`, each with the
    `time.monotonic()` it was read at under `"_received"`.
    """

    def __init__(self, path: Path | str, name: str = "qmp"):
        self.path = Path(path)
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def connect(self, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        """Connect (retrying until QEMU listens), read the greeting, enter command mode."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if alive is not None and not alive():
                    raise TestbedError(f"{self.name}: QEMU exited before its QMP socket listened")
                if time.monotonic() > deadline:
                    raise TestbedError(f"{self.name}: no QMP socket {self.path} in {timeout}s")
                time.sleep(0.05)
        self._sock = sock
        self.greeting = self._read(time.monotonic() + timeout)
        if "QMP" not in self.greeting:
            raise TestbedError(f"{self.name}: not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities", timeout=timeout)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 60.0) -> Any:
        """Run one command; its `return` value. Raises QmpError if QEMU answers `error`."""
        if self._sock is None:
            raise TestbedError(f"{self.name}: not connected")
        with self._lock:
            ident = next(self._ids)
            request: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                request["arguments"] = arguments
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
            except OSError as exc:
                raise TestbedError(f"{self.name}: {command}: {exc}") from exc
            deadline = time.monotonic() + timeout
            while True:
                message = self._read(deadline)
                if "event" in message:
                    self.events.append(message)
                    continue
                if message.get("id") != ident:
                    continue
                if "error" in message:
                    raise QmpError(command, message["error"])
                return message.get("return")

    def wait_event(self, name: str, timeout: float = 30.0, start: int = 0) -> dict[str, Any]:
        """The first event `name` at or after index `start` of `events` (reading more)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for event in self.events[start:]:
                    if event["event"] == name:
                        return event
                start = len(self.events)
                message = self._read(deadline)
                if "event" in message:
                    self.events.append(message)

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestbedError(f"{self.name}: no QMP answer in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise TestbedError(f"{self.name}: QMP connection: {exc}") from exc
            if not data:
                raise TestbedError(f"{self.name}: QMP connection closed by QEMU")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        if "event" in message:
            message["_received"] = time.monotonic()
        return message


# ---------------------------------------------------------------------------- serial console


class SerialConsole:
    """The guest's shell through a QEMU serial Unix socket (`-serial unix:PATH,server=on,...`).

    `run()` speaks the protocol of `testbed.GuestVM.run`: the command travels base64-encoded
    and runs in a subshell with stdin from /dev/null; its output lies between a begin and an
    end marker carrying a random token, and the end marker carries its exit status. Markers
    resynchronise the console whatever it printed before, so the console of a destination
    QEMU (which never prints the guest's ready line again) works like the source's did.
    """

    READY = re.compile(r"pyvhost-guest: ready")
    INLINE_LIMIT = 600  # chars of base64 per line (busybox line editing caps lines at ~1 KiB)

    def __init__(self, path: Path | str, name: str = "serial", log_path: Path | None = None):
        self.path = Path(path)
        self.name = name
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._reader: _OutputCollector | None = None
        self._write_lock = threading.Lock()

    def connect(self, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if alive is not None and not alive():
                    raise TestbedError(f"{self.name}: QEMU exited before its serial listened")
                if time.monotonic() > deadline:
                    raise TestbedError(f"{self.name}: no serial socket {self.path} in {timeout}s")
                time.sleep(0.02)
        self._sock = sock
        self._reader = _OutputCollector(sock.makefile("rb", buffering=0), self.name,
                                        tee_path=self.log_path)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.close()

    @property
    def text(self) -> str:
        return self._reader.text if self._reader else ""

    def wait_for(self, pattern: re.Pattern, start: int = 0, timeout: float = 30.0) -> re.Match | None:
        assert self._reader is not None, "not connected"
        return self._reader.wait_for(pattern, start, time.monotonic() + timeout)

    def run(self, command: str, timeout: float = 30.0, check: bool = False) -> CommandResult:
        """Run a shell command in the guest; its output (stdout+stderr, `\\n` lines) and status."""
        encoded = base64.b64encode(command.encode()).decode()
        if len(encoded) > self.INLINE_LIMIT:
            path = f"/tmp/.pyvhost-cmd-{secrets.token_hex(4)}"
            for i in range(0, len(encoded), self.INLINE_LIMIT):
                self._run_script(f"printf %s {encoded[i:i + self.INLINE_LIMIT]} >>{path}.b64",
                                 30.0, "(upload)", check=True)
            script = (f"base64 -d {path}.b64 >{path}; rm -f {path}.b64; . {path}; _s=$?; "
                      f"rm -f {path}; exit $_s")
            return self._run_script(script, timeout, command, check)
        return self._run_script(f'eval "$(echo {encoded} | base64 -d)"', timeout, command, check)

    def _run_script(self, script: str, timeout: float, shown: str, check: bool) -> CommandResult:
        token = secrets.token_hex(6)
        begin = re.compile(rf"pyvhost:{token}:begin\r?\n")
        end = re.compile(rf"\r?\npyvhost:{token}:end:(\d+)\r?\n")
        line = (f"printf '\\npyvhost:%s:begin\\n' {token}; ({script}) </dev/null 2>&1; "
                f"printf '\\npyvhost:%s:end:%d\\n' {token} $?\n")
        start = len(self.text)
        self._write(line.encode())
        deadline = time.monotonic() + timeout
        opened = self.wait_for(begin, start, max(0.0, deadline - time.monotonic()))
        closed = (self.wait_for(end, opened.end(), max(0.0, deadline - time.monotonic()))
                  if opened else None)
        if not opened or not closed:
            partial = self.text[opened.end():] if opened else ""
            self._write(b"\x03")  # Ctrl-C the command, resynchronise on its end marker
            self.wait_for(end, start, 5.0)
            raise GuestTimeout(f"{self.name}: command {shown!r} did not finish in {timeout}s\n"
                               f"--- console tail ---\n{_log_tail(self.text, 30)}",
                               partial.replace("\r\n", "\n"))
        output = self.text[opened.end():closed.start()].replace("\r\n", "\n")
        result = CommandResult(output, int(closed[1]))
        if check and result.status != 0:
            raise TestbedError(f"{self.name}: guest command {shown!r} exited {result.status}:\n"
                               f"{output}")
        return result

    def _write(self, data: bytes) -> None:
        if self._sock is None:
            raise TestbedError(f"{self.name}: not connected")
        with self._write_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise TestbedError(f"{self.name}: console write failed: {exc}") from exc


# ------------------------------------------------------------------------------------- QEMU


def vhost_user_nic_args(socket_path: Path | str, mac: str = GUEST_MAC) -> list[str]:
    """A vhost-user virtio-net-pci NIC (vectors=0: QEMU 7.2 TCG, docs/testbed.md trap 8)."""
    return ["-chardev", f"socket,id=chr0,path={socket_path}",
            "-netdev", "vhost-user,id=net0,chardev=chr0",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0,romfile="]


class MigratableVM:
    """One QEMU (TCG) of a migration pair, with QMP and the serial console on Unix sockets.

    Source and destination get identical arguments (same device, same RAM size, same MAC)
    except their socket paths and, on a destination, `-incoming` (`defer` by default: the
    migration stream's address is given later with QMP `migrate-incoming`). Guest RAM is
    each QEMU's own memfd (`share=on` for the backend).
    """

    def __init__(self, workdir: Path, name: str, nic_args: Sequence[str], *,
                 memory_kib: int = GUEST_RAM_KIB, cpus: int = 1, incoming: str | None = None,
                 kernel_cmdline: str = "", extra_args: Sequence[str] = ()):
        kernel, initrd = guest_image_paths()
        self.name = name
        self.workdir = workdir
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial_path = workdir / f"{name}.serial"
        self.stderr_path = workdir / f"{name}.stderr"
        self.console_path = workdir / f"{name}.console"
        self.incoming = incoming
        self.memory_kib = memory_kib
        self.argv = [
            find_qemu(), "-accel", "tcg", "-nodefaults", "-no-reboot",
            "-name", name, "-smp", str(cpus), "-m", f"{memory_kib}K",
            "-object", f"memory-backend-memfd,id=mem,size={memory_kib}K,share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 {kernel_cmdline}".strip(),
            "-display", "none", "-monitor", "none",
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *nic_args, *extra_args,
        ]
        if incoming is not None:
            self.argv += ["-incoming", incoming]
        self.qmp = Qmp(self.qmp_path, f"{name}-qmp")
        self.console = SerialConsole(self.serial_path, f"{name}-serial", self.console_path)
        self.boot_seconds: float | None = None
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None

    def __enter__(self) -> "MigratableVM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> None:
        """Start QEMU; connect the serial (first: nothing the guest prints is missed) and QMP."""
        self._stderr = open(self.stderr_path, "w")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=self._stderr, stderr=self._stderr,
                                      start_new_session=True)
        try:
            self.console.connect(timeout, alive=self.running)
            self.qmp.connect(timeout, alive=self.running)
        except TestbedError as exc:
            raise TestbedError(self.failure(str(exc))) from exc

    def wait_booted(self, timeout: float = 180.0) -> float:
        """Wait for the guest's ready line and a first command; the boot time in seconds."""
        if not self.console.wait_for(SerialConsole.READY, 0, timeout):
            raise TestbedError(self.failure("did not boot"))
        self.console.run("true", timeout=60.0, check=True)
        self.boot_seconds = time.monotonic() - self._started
        return self.boot_seconds

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def status(self) -> str:
        """QMP `query-status`: running, paused, postmigrate, inmigrate, finish-migrate, ..."""
        return str(self.qmp.execute("query-status")["status"])

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def quit(self, timeout: float = 20.0) -> int | None:
        """QMP `quit` (QEMU closes its vhost-user connection cleanly), then reap."""
        if self.running() and self.qmp.connected:
            with contextlib.suppress(TestbedError, OSError):
                self.qmp.execute("quit", timeout=timeout)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.close()

    def close(self) -> int | None:
        """Kill (SIGTERM, then SIGKILL) and reap QEMU; close the sockets. Idempotent."""
        self.qmp.close()
        self.console.close()
        _kill_and_reap(self._proc, signal.SIGTERM, 10.0)
        if self._proc is not None:
            self.returncode = self._proc.returncode
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        for path in (self.qmp_path, self.serial_path):
            path.unlink(missing_ok=True)
        return self.returncode

    def failure(self, what: str) -> str:
        state = "running" if self.running() else (
            f"exit code {self._proc.returncode if self._proc else None}")
        return (f"QEMU {self.name} {what} ({state})\ncommand: {' '.join(self.argv)}\n"
                f"--- qemu stderr ---\n{_log_tail(self.stderr, 30)}\n"
                f"--- console tail ---\n{_log_tail(self.console.text, 30)}")


# ----------------------------------------------------------------------------------- backends


def in_namespace(ns: NetNamespace, argv: Sequence[str]) -> list[str]:
    """argv run inside `ns` (`ip netns exec` execs it: the pid is the program's own)."""
    return ["ip", "netns", "exec", ns.name, *argv]


_DEBUG_WITHOUT_NUMBA = ("import logging, sys; logging.getLogger('numba').setLevel(logging.INFO); "
                        "from pyvhost.cli import main; sys.exit(main(sys.argv[1:]))")


class PyvhostNetBackend:
    """`pyvhost net --socket-path S --tap NAME` inside the bed's namespace.

    Live statistics come as JSON lines (`--stats-format json`, every `stats_interval` s) and
    the final ones in `--stats-json`; `samples(since=mark)` parses the lines logged after a
    `mark()`, so a test can tell what the counters were while something happened.
    """

    kind = "pyvhost"

    def __init__(self, ns: NetNamespace, socket_path: Path, tap: str, *,
                 extra_args: Sequence[str] = (), stats_interval: float = 0.25,
                 log_level: str = "INFO", log_path: Path | None = None):
        self.ns = ns
        self.socket_path = socket_path
        self.tap = tap
        self.stats_path = socket_path.with_suffix(".stats.json")
        args = ["net", "--socket-path", str(socket_path), "--tap", tap,
                "--stats-json", str(self.stats_path), "--stats-interval", str(stats_interval),
                "--stats-format", "json", "--log-level", log_level, *extra_args]
        self.daemon = PyvhostDaemon(args, name=f"pyvhost-{tap}", log_path=log_path)
        argv = self.daemon.argv
        if log_level == "DEBUG":
            # --log-level DEBUG sets the root logger's level, and numba logs every compiler
            # pass at DEBUG (hundreds of MB while the kernels compile): pyvhost's own DEBUG
            # lines (every vhost-user message) without numba's.
            argv = [sys.executable, "-c", _DEBUG_WITHOUT_NUMBA, *self.args_after_program(argv)]
        self.daemon.argv = in_namespace(ns, argv)
        self.final_stats: dict[str, Any] | None = None

    @staticmethod
    def args_after_program(argv: Sequence[str]) -> list[str]:
        """The CLI arguments of a `pyvhost ...` or `python -m pyvhost ...` command line."""
        return list(argv[3:] if len(argv) > 2 and argv[1] == "-m" else argv[1:])

    def __enter__(self) -> "PyvhostNetBackend":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 300.0) -> None:
        # Generous: a fresh process compiles the kernels numba has no cache for (minutes on a
        # busy 2-CPU machine after the ring code changed) before it listens.
        self.daemon.start()
        self.daemon.wait_listening(timeout)
        _wait_for_link(self.ns, self.tap, timeout, self.daemon.running)

    @property
    def log(self) -> str:
        return self.daemon.log

    def running(self) -> bool:
        return self.daemon.running()

    def mark(self) -> int:
        """A position in the log, for `samples(since=...)`."""
        return len(self.log)

    def samples(self, since: int = 0) -> list[dict[str, Any]]:
        """The statistics objects ({t, dt, rates, stats}) of the JSON lines after `since`."""
        found = []
        for line in self.log[since:].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def wait_sample(self, predicate: Callable[[dict[str, Any]], bool], since: int = 0,
                    timeout: float = 30.0) -> dict[str, Any]:
        """The first statistics line after `since` whose `stats` satisfy `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            for sample in self.samples(since):
                if predicate(sample["stats"]):
                    return sample
            if time.monotonic() > deadline or not self.running():
                raise TestbedError(f"no statistics line matched in {timeout}s; last: "
                                   f"{(self.samples(since) or [{}])[-1].get('stats')}\n"
                                   f"--- log tail ---\n{_log_tail(self.log, 30)}")
            time.sleep(0.1)

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM; the final statistics (--stats-json), or None if it wrote none."""
        self.daemon.stop()
        if self.stats_path.exists():
            self.final_stats = json.loads(self.stats_path.read_text())
        return self.final_stats

    def close(self) -> None:
        if self.daemon.returncode is None:
            self.stop()


class DpdkVhostTapBackend:
    """DPDK's C backend as the NIC's: testpmd with the vhost PMD (`net_vhost0,iface=S`, a
    server) and a tap PMD (`net_tap0,iface=NAME`), forwarding `io` between them, run inside
    the bed's namespace so the TAP is created there."""

    kind = "dpdk"

    def __init__(self, ns: NetNamespace, socket_path: Path, tap: str, *, cpu: int | None = None,
                 memory_mib: int = 256, log_path: Path | None = None):
        self.ns = ns
        self.socket_path = socket_path
        self.tap = tap
        last_cpu = (os.cpu_count() or 1) - 1
        cpu = last_cpu if cpu is None else cpu
        self.testpmd = Testpmd(
            [vhost_pmd_vdev(socket_path), f"net_tap0,iface={tap}"], forward_mode="io",
            lcores=testpmd_lcores(cpu, [cpu]), memory_mib=memory_mib,
            hugepages=hugepages_available(memory_mib), total_mbufs=8192, stats_period=1,
            name=f"testpmd-{tap}", log_path=log_path)
        self.testpmd.argv = in_namespace(ns, self.testpmd.argv)
        self.final_stats: dict[str, Any] | None = None

    def __enter__(self) -> "DpdkVhostTapBackend":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> None:
        self.testpmd.start()
        wait_for_socket(self.socket_path, timeout)
        _wait_for_link(self.ns, self.tap, timeout, self.testpmd.running)

    @property
    def log(self) -> str:
        return self.testpmd.log

    def running(self) -> bool:
        return self.testpmd.running()

    def mark(self) -> int:
        return len(self.log)

    def stop(self) -> dict[str, Any] | None:
        if self.testpmd.running():
            with contextlib.suppress(TestbedError):
                result = self.testpmd.stop()
                self.final_stats = {str(p): dataclasses.asdict(s)
                                    for p, s in result.ports.items()}
        return self.final_stats

    def close(self) -> None:
        self.stop()
        self.testpmd.close()


Backend = PyvhostNetBackend | DpdkVhostTapBackend


def _wait_for_link(ns: NetNamespace, ifname: str, timeout: float,
                   alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not ns.ipr.link_lookup(ifname=ifname):
        if not alive():
            raise TestbedError(f"backend exited before creating {ifname}")
        if time.monotonic() > deadline:
            raise TestbedError(f"no interface {ifname} in {ns.name} within {timeout}s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ bridge


def add_bridge(ns: NetNamespace, name: str = BRIDGE, cidr: str | None = HOST_CIDR) -> None:
    """A Linux bridge in `ns` (no STP: ports forward at once), addressed and up."""
    ns.ipr.link("add", ifname=name, kind="bridge")
    if cidr:
        ns.add_address(name, cidr)
    ns.set_up(name)


def enslave(ns: NetNamespace, ifname: str, bridge: str = BRIDGE) -> None:
    ns.ipr.link("set", index=ns.index(ifname), master=ns.index(bridge))
    ns.set_up(ifname)


def fdb_port(ns: NetNamespace, mac: str, bridge: str = BRIDGE) -> str | None:
    """The bridge port whose forwarding database holds `mac` (learned, not permanent)."""
    out = ns.run(["bridge", "-j", "fdb", "show", "br", bridge]).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("mac", "").lower() == mac.lower() and "permanent" not in entry.get(
                "flags", []) and entry.get("state") != "permanent":
            return entry.get("ifname")
    return None


# ---------------------------------------------------------------------------------- migration


@dataclasses.dataclass
class MigrationResult:
    """The end of one migration as QEMU reports it (`query-migrate` on the source)."""

    status: str
    info: dict[str, Any]                 # the final query-migrate answer
    started: float                       # time.monotonic() at `migrate`
    ended: float                         # when the final status was seen
    statuses: list[tuple[float, str]]    # (monotonic time, status) at each change
    error: str | None = None

    @property
    def total_time_ms(self) -> int | None:
        return self.info.get("total-time")

    @property
    def downtime_ms(self) -> int | None:
        return self.info.get("downtime")

    @property
    def setup_time_ms(self) -> int | None:
        return self.info.get("setup-time")

    @property
    def ram(self) -> dict[str, Any]:
        return self.info.get("ram", {})

    def summary(self) -> str:
        ram = self.ram
        return (f"{self.status}: total {self.total_time_ms} ms, downtime {self.downtime_ms} ms, "
                f"setup {self.setup_time_ms} ms, RAM transferred "
                f"{ram.get('transferred', 0) / 2**20:.1f} MiB, "
                f"{ram.get('dirty-sync-count')} dirty syncs, "
                f"{ram.get('normal')} normal / {ram.get('duplicate')} zero pages")


def start_migration(src: MigratableVM, dst: MigratableVM, uri: str, *,
                    max_bandwidth: int | None = None, downtime_limit_ms: int | None = None,
                    capabilities: dict[str, bool] | None = None) -> float:
    """`migrate-incoming` on the destination, parameters and `migrate` on the source; returns
    the time.monotonic() of `migrate`."""
    if dst.incoming == "defer":
        dst.qmp.execute("migrate-incoming", {"uri": uri})
    if capabilities:
        caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
        src.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        dst.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    params: dict[str, Any] = {}
    if max_bandwidth is not None:
        params["max-bandwidth"] = max_bandwidth
    if downtime_limit_ms is not None:
        params["downtime-limit"] = downtime_limit_ms
    if params:
        src.qmp.execute("migrate-set-parameters", params)
    started = time.monotonic()
    src.qmp.execute("migrate", {"uri": uri})
    return started


def wait_migration(src: MigratableVM, started: float, timeout: float = 120.0,
                   until: Sequence[str] = FINAL_STATES, poll: float = 0.05) -> MigrationResult:
    """Poll `query-migrate` until its status is one of `until`; raises on timeout."""
    deadline = time.monotonic() + timeout
    statuses: list[tuple[float, str]] = []
    while True:
        info = src.qmp.execute("query-migrate", timeout=max(5.0, deadline - time.monotonic()))
        status = info.get("status", "none")
        now = time.monotonic()
        if not statuses or statuses[-1][1] != status:
            statuses.append((now, status))
        if status in until:
            return MigrationResult(status, info, started, now, statuses, info.get("error-desc"))
        if now > deadline:
            raise TestbedError(f"migration still {status!r} after {timeout}s: {info}\n"
                               + src.failure("(source)"))
        time.sleep(poll)


def dump_guest_ram(vm: MigratableVM, path: Path, timeout: float = 120.0) -> None:
    """All guest RAM (guest-physical 0 to its size) into a file (QMP `pmemsave`)."""
    vm.qmp.execute("pmemsave", {"val": 0, "size": vm.memory_kib * 1024,
                                "filename": str(path)}, timeout=timeout)


def differing_pages(a: Path, b: Path, page: int = 4096, chunk: int = 1 << 20) -> list[int]:
    """Guest-physical addresses of the pages whose bytes differ between two RAM dumps."""
    found: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if not ca and not cb:
                return found
            if ca != cb:
                found += [offset + i for i in range(0, max(len(ca), len(cb)), page)
                          if ca[i:i + page] != cb[i:i + page]]
            offset += chunk


def describe_page_difference(a: Path, b: Path, address: int, page: int = 4096) -> str:
    """Where two dumps differ inside one page, and the first differing bytes of each."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(address)
        fb.seek(address)
        pa, pb = fa.read(page), fb.read(page)
    diff = [i for i in range(min(len(pa), len(pb))) if pa[i] != pb[i]]
    if not diff:
        return f"page {address:#x}: equal"
    i = diff[0]
    return (f"page {address:#x}: {len(diff)} bytes differ, first at +{i:#x}: "
            f"source {pa[i:i + 16].hex()} destination {pb[i:i + 16].hex()}")


# ------------------------------------------------------------------------------------- the bed


class MigrationBed:
    """A namespace with a bridge (192.0.2.1/24), two backends of one kind with identical
    options (sides "a" and "b", TAPs enslaved to the bridge), and QEMUs on them.

    `boot()` starts the source QEMU on side a and boots the guest (eth0 192.0.2.2/24).
    `start_destination()` starts a QEMU with `-incoming defer` on the other side; `migrate()`
    migrates to it over a Unix socket; `finish_switchover()` quits the old source, so the
    destination becomes the source of the next migration (back to the other side: backend
    sessions end when their QEMU quits, and the next QEMU connects anew).
    """

    def __init__(self, backend: str = "pyvhost", *, memory_kib: int = GUEST_RAM_KIB,
                 backend_args: Sequence[str] = (), log_level: str = "INFO",
                 stats_interval: float = 0.25, keep_dir: Path | None = None,
                 mac: str = GUEST_MAC):
        if backend not in ("pyvhost", "dpdk"):
            raise ValueError(f"backend {backend!r}: pyvhost or dpdk")
        self.kind = backend
        self.memory_kib = memory_kib
        self.backend_args = list(backend_args)
        self.log_level = log_level
        self.stats_interval = stats_interval
        self.keep_dir = keep_dir
        self.mac = mac
        self.workdir = Path(tempfile.mkdtemp(prefix="pvmig-"))  # short: sun_path is 108 bytes
        self.ns = NetNamespace()
        token = secrets.token_hex(3)
        self.taps = {"a": f"pvm{token}a", "b": f"pvm{token}b"}
        self.backends: dict[str, Backend] = {}
        self.vms: list[MigratableVM] = []
        self.source: MigratableVM | None = None
        self.side_of: dict[str, str] = {}
        self._vm_counter = itertools.count()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "MigrationBed":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._stack.enter_context(self.ns)
        add_bridge(self.ns)
        for side in ("a", "b"):
            sock = self.workdir / f"{side}.sock"
            log_path = self.workdir / f"backend-{side}.log"
            backend: Backend
            if self.kind == "pyvhost":
                backend = PyvhostNetBackend(self.ns, sock, self.taps[side],
                                            extra_args=self.backend_args,
                                            stats_interval=self.stats_interval,
                                            log_level=self.log_level, log_path=log_path)
            else:
                backend = DpdkVhostTapBackend(self.ns, sock, self.taps[side], log_path=log_path)
            self._stack.enter_context(backend)
            self.backends[side] = backend
            enslave(self.ns, self.taps[side])

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self._stack.close()
        if self.keep_dir is not None:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            for path in self.workdir.iterdir():
                if path.is_file() and not path.is_socket():
                    shutil.copy(path, self.keep_dir / path.name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def new_vm(self, side: str, incoming: str | None = None,
               extra_args: Sequence[str] = ()) -> MigratableVM:
        name = f"vm{next(self._vm_counter)}{side}"
        vm = MigratableVM(self.workdir, name, vhost_user_nic_args(self.backends[side].socket_path,
                                                                  self.mac),
                          memory_kib=self.memory_kib, incoming=incoming,
                          extra_args=extra_args)
        self.vms.append(vm)
        self.side_of[name] = side
        vm.start()
        return vm

    def boot(self, timeout: float = 180.0) -> MigratableVM:
        """The source QEMU on side a; boots the guest, addresses and raises its eth0."""
        vm = self.new_vm("a")
        vm.wait_booted(timeout)
        vm.console.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up", check=True)
        self.source = vm
        return vm

    def side(self, vm: MigratableVM) -> str:
        return self.side_of[vm.name]

    def other_side(self, vm: MigratableVM) -> str:
        return "b" if self.side(vm) == "a" else "a"

    def backend_of(self, vm: MigratableVM) -> Backend:
        return self.backends[self.side(vm)]

    def tap_of(self, vm: MigratableVM) -> str:
        return self.taps[self.side(vm)]

    def start_destination(self, paused: bool = False) -> MigratableVM:
        """A QEMU on the other side, `-incoming defer`; with `paused` (`-S`) it stays paused
        after the migration (status `paused`) until QMP `cont`, so its RAM can be compared
        with the source's before the guest runs there."""
        assert self.source is not None, "boot() first"
        return self.new_vm(self.other_side(self.source), incoming="defer",
                           extra_args=["-S"] if paused else [])

    def migration_uri(self, dst: MigratableVM) -> str:
        return f"unix:{self.workdir / (dst.name + '.migration')}"

    def migrate(self, dst: MigratableVM, *, timeout: float = 120.0,
                max_bandwidth: int | None = None, downtime_limit_ms: int | None = None,
                wait: bool = True) -> MigrationResult | float:
        """Migrate the source to `dst`; the result (wait=True) or the start time."""
        assert self.source is not None
        started = start_migration(self.source, dst, self.migration_uri(dst),
                                  max_bandwidth=max_bandwidth,
                                  downtime_limit_ms=downtime_limit_ms)
        if not wait:
            return started
        return wait_migration(self.source, started, timeout)

    def finish_switchover(self, dst: MigratableVM) -> None:
        """After `completed`: quit the old source; `dst` is the source from now on."""
        assert self.source is not None
        old = self.source
        old.quit()
        self.source = dst

    def guest_mac_port(self) -> str | None:
        return fdb_port(self.ns, self.mac)

    def wait_guest_mac_on(self, tap: str, timeout: float = 20.0) -> float:
        """Wait until the bridge learned the guest MAC on `tap`; the seconds it took."""
        start = time.monotonic()
        while (port := self.guest_mac_port()) != tap:
            if time.monotonic() - start > timeout:
                raise TestbedError(f"guest MAC {self.mac} on bridge port {port!r}, not {tap!r}, "
                                   f"after {timeout}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(in_namespace(self.ns, argv), **kwargs)


# ------------------------------------------------------------------------------------- traffic

# ICMP echo requests whose payload is unique per sequence number; every reply is checked byte
# for byte against what was sent with its sequence number. Runs in the namespace. Sends one
# request every INTERVAL s until a line arrives on stdin (or stdin closes), waits DRAIN s for
# late replies, prints one JSON object: per request [seq, sent_at, replied_at or null]
# (time.monotonic(), comparable with the test's), duplicates, corrupt replies.
PINGER = r"""
import hashlib, json, os, select, socket, struct, sys, threading, time
dst, interval, size, drain = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "little")) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)

def payload(seq):
    seed = hashlib.sha256(b"%d:%d" % (ident, seq)).digest()
    return (seed * (size // 32 + 1))[:size]

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

sent, replied, corrupt = {}, {}, []
dups = 0
done = threading.Event()

def receive():
    global dups
    while not done.is_set():
        if not select.select([sock], [], [], 0.1)[0]:
            continue
        data = sock.recv(65535)
        now = time.monotonic()
        icmp = data[(data[0] & 0xF) * 4:]
        kind, code, _, rid, seq = struct.unpack("!BBHHH", icmp[:8])
        if kind != 0 or rid != ident:
            continue
        if seq in replied:
            dups += 1
        elif seq not in sent or icmp[8:] != payload(seq):
            corrupt.append(seq)
        else:
            replied[seq] = now

receiver = threading.Thread(target=receive)
receiver.start()
print("ready", flush=True)
seq, next_at = 0, time.monotonic()
while True:
    wait = max(0.0, next_at - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        break
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF) + payload(seq & 0xFFFF)
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    sent[seq & 0xFFFF] = time.monotonic()
    try:
        sock.sendto(body, (dst, 0))
    except OSError:
        pass  # no route/neighbour yet: counted as unanswered
    seq += 1
    next_at += interval
    if next_at < time.monotonic() - 1.0:
        next_at = time.monotonic()
time.sleep(drain)
done.set()
receiver.join()
print(json.dumps({"ident": ident, "size": size, "interval": interval, "dups": dups,
                  "corrupt": corrupt,
                  "requests": [[s, t, replied.get(s)] for s, t in sorted(sent.items())]}),
      flush=True)
"""

# A TCP server that accepts one connection and reads it to the end: byte count, MD5, the
# time.monotonic() of its first and last byte and a coarse (t, bytes) timeline.
TCP_SINK = r"""
import hashlib, json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(300)
print("ready", flush=True)
conn, peer = srv.accept()
conn.settimeout(300)
md5, total, first, last, timeline, mark = hashlib.md5(), 0, None, None, [], 0.0
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    now = time.monotonic()
    first = first or now
    last = now
    md5.update(data)
    total += len(data)
    if now - mark >= 0.1:
        timeline.append([now, total])
        mark = now
print(json.dumps({"bytes": total, "md5": md5.hexdigest(), "first": first, "last": last,
                  "timeline": timeline}), flush=True)
"""

# A TCP server that sends N random bytes to the first client and closes: their MD5.
TCP_SOURCE = r"""
import hashlib, json, os, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(300)
print("ready", flush=True)
conn, peer = srv.accept()
start = time.monotonic()
conn.sendall(data)
conn.close()
print(json.dumps({"bytes": size, "md5": hashlib.md5(data).hexdigest(),
                  "seconds": time.monotonic() - start}), flush=True)
"""


class _NsProgram:
    """A Python program (source text) run in the namespace; prints "ready", then one JSON
    result line at its end."""

    def __init__(self, bed: MigrationBed, source: str, args: Sequence[object], name: str):
        self.name = name
        self.proc = bed.popen([sys.executable, "-c", source, *map(str, args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise TestbedError(f"{name} did not start: {line!r} {self._stderr()}")
        self.result: dict[str, Any] | None = None

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def finish(self, timeout: float = 60.0, signal_stop: bool = False) -> dict[str, Any]:
        """Wait for the result line (after telling it to stop, if `signal_stop`)."""
        if self.result is not None:
            return self.result
        if signal_stop and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise TestbedError(f"{self.name} gave no result in {timeout}s")
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise TestbedError(f"{self.name} exited {self.proc.returncode}: {err[-2000:]}")
        self.result = json.loads(lines[-1])
        return self.result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pinger(_NsProgram):
    """ICMP echo requests from the namespace to the guest, unique payload per sequence."""

    def __init__(self, bed: MigrationBed, interval: float = 0.005, size: int = 1000,
                 drain: float = 2.0, dst: str = GUEST_IP):
        super().__init__(bed, PINGER, [dst, interval, size, drain], "pinger")

    def stop(self, timeout: float = 60.0) -> "PingReport":
        return PingReport(self.finish(timeout, signal_stop=True))


class TcpSink(_NsProgram):
    def __init__(self, bed: MigrationBed, port: int, host: str = HOST_IP):
        super().__init__(bed, TCP_SINK, [host, port], "tcp-sink")


class TcpSource(_NsProgram):
    def __init__(self, bed: MigrationBed, port: int, size: int, host: str = HOST_IP):
        super().__init__(bed, TCP_SOURCE, [host, port, size], "tcp-source")


class Capture:
    """tcpdump on an interface of the bed's namespace, into a pcap file; `stop()` returns the
    captured frames as tcpdump prints them (`-nn -e -t`: source MAC first, no name lookups,
    no timestamps)."""

    def __init__(self, bed: MigrationBed, ifname: str, expression: str = "",
                 timeout: float = 30.0):
        self.path = bed.workdir / f"{ifname}.pcap"
        argv = ["tcpdump", "-i", ifname, "-U", "-n", "-w", str(self.path)]
        self.proc = bed.popen(argv + expression.split(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "tcpdump: listening on IF, ..."
        if "listening on" not in line:
            self.close()
            raise TestbedError(f"tcpdump on {ifname} did not start: {line!r}")

    def stop(self) -> list[str]:
        self.close()
        out = subprocess.run(["tcpdump", "-r", str(self.path), "-nn", "-e", "-t"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gratuitous_arps(frames: Sequence[str], mac: str = GUEST_MAC, ip: str = GUEST_IP) -> list[str]:
    """The ARP announcements (`who-has IP tell IP`, or a reply for IP) `mac` sent, in tcpdump
    `-e -t` lines: what a Linux guest sends when virtio-net's announce (GUEST_ANNOUNCE) asks it to."""
    own = re.compile(rf"Request who-has {re.escape(ip)} tell {re.escape(ip)}\b"
                     rf"|Reply {re.escape(ip)} is-at {re.escape(mac)}", re.I)
    return [f for f in frames if f.lower().startswith(mac.lower()) and own.search(f)]


@dataclasses.dataclass
class PingReport:
    raw: dict[str, Any]

    @property
    def requests(self) -> list[tuple[int, float, float | None]]:
        return [(s, t, r) for s, t, r in self.raw["requests"]]

    @property
    def dups(self) -> int:
        return int(self.raw["dups"])

    @property
    def corrupt(self) -> list[int]:
        return list(self.raw["corrupt"])

    def answered(self, start: float = 0.0, end: float = float("inf")) -> tuple[int, int]:
        """(answered, sent) for the requests sent in [start, end)."""
        window = [r for _, t, r in self.requests if start <= t < end]
        return sum(r is not None for r in window), len(window)

    def replies_between(self, start: float, end: float) -> int:
        return sum(1 for _, _, r in self.requests if r is not None and start <= r < end)

    def longest_gap(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The longest time between consecutive replies received in [start, end)."""
        times = sorted(r for _, _, r in self.requests if r is not None and start <= r < end)
        return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))

    def rtt_ms(self) -> tuple[float, float, float]:
        rtts = sorted((r - t) * 1e3 for _, t, r in self.requests if r is not None)
        if not rtts:
            return (float("nan"),) * 3
        return rtts[0], rtts[len(rtts) // 2], rtts[-1]


@contextlib.contextmanager
def guest_tcp_sender(console: SerialConsole, bed: MigrationBed, port: int, *,
                     chunk: int = 16384, pause_us: int = 20000, max_chunks: int = 1024
                     ) -> Iterator[TcpSink]:
    """The guest streams /tmp/f (random, made here) to a TcpSink in the namespace, `chunk`
    bytes then a `pause_us` pause, in the background, until /tmp/stop exists; the number of
    chunks sent is in /tmp/sent, nc's status in /tmp/nc.rc (see `stop_guest_tcp_sender`)."""
    console.run(f"rm -f /tmp/stop /tmp/sent /tmp/nc.rc; dd if=/dev/urandom of=/tmp/f "
                f"bs={chunk} count={max_chunks} 2>/dev/null", timeout=120, check=True)
    with TcpSink(bed, port) as sink:
        loop = (f"i=0; while [ ! -e /tmp/stop ] && [ $i -lt {max_chunks} ]; do "
                f"dd if=/tmp/f bs={chunk} skip=$i count=1 2>/dev/null; i=$((i+1)); "
                f"echo $i >/tmp/sent; usleep {pause_us}; done")
        console.run(f"( ({loop}) | nc {HOST_IP} {port}; echo $? >/tmp/nc.rc ) "
                    ">/dev/null 2>&1 &", check=True)
        yield sink


def stop_guest_tcp_sender(console: SerialConsole, chunk: int = 16384,
                          timeout: float = 60.0) -> tuple[int, str, int]:
    """Stop the sender; (chunks sent, MD5 of those bytes in the guest, nc's exit status)."""
    out = console.run(
        "touch /tmp/stop; n=0; while [ ! -e /tmp/nc.rc ] && [ $n -lt 600 ]; do usleep 100000; "
        "n=$((n+1)); done; c=$(cat /tmp/sent); echo chunks=$c rc=$(cat /tmp/nc.rc); "
        f"dd if=/tmp/f bs={chunk} count=$c 2>/dev/null | md5sum", timeout=timeout,
        check=True).output
    m = re.search(r"chunks=(\d+) rc=(\d+)\s+([0-9a-f]{32})", out)
    if not m:
        raise TestbedError(f"guest sender: unexpected output {out!r}")
    return int(m[1]), m[3], int(m[2])


def guest_snmp(console: SerialConsole) -> dict[str, dict[str, int]]:
    """The guest's /proc/net/snmp as {protocol: {counter: value}}."""
    lines = console.run("cat /proc/net/snmp", check=True).output.splitlines()
    table: dict[str, dict[str, int]] = {}
    for names, values in zip(lines[::2], lines[1::2]):
        proto, _, keys = names.partition(":")
        table[proto] = dict(zip(keys.split(), map(int, values.partition(":")[2].split())))
    return table
