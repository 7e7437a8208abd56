"""The main job: a pyvhost net backend serving a real frontend, with live statistics.

Starts `pyvhost net` (busy-polling its rings, statistics on stderr every second) and DPDK's
testpmd with a virtio-user port in txonly mode as the frontend, each pinned to its own core.
Runs until Ctrl-C (or --seconds), then stops the generator first, waits for the backend to
drain, and prints what testpmd sent next to what pyvhost counted.

    python -m pyvhost.demo [--seconds S] [--metadata-access auto|direct|copy] [--packet-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvhost.testing.testbed import Testpmd, virtio_user_vdev, wait_for_socket


def start_backend(socket_path: Path, stats_json: Path, metadata_access: str,
                  cpu: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(socket_path), "--poll",
            "--metadata-access", metadata_access, "--stats-json", str(stats_json),
            "--stats-interval", "1"]
    return subprocess.Popen(["taskset", "-c", str(cpu), *argv], start_new_session=True)


def stop_backend(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    backend_cpu, generator_cpu = cpus[-1], cpus[0]
    with tempfile.TemporaryDirectory(prefix="pyvhost-demo-") as tmp:
        sock, stats_json = Path(tmp) / "net.sock", Path(tmp) / "stats.json"
        backend = start_backend(sock, stats_json, args.metadata_access, backend_cpu)
        try:
            wait_for_socket(sock, timeout=120)
            print(f"pyvhost serving {sock}; starting testpmd virtio-user txonly "
                  f"({args.packet_size}-byte packets). Ctrl-C stops.", file=sys.stderr)
            generator = Testpmd([virtio_user_vdev(sock)], forward_mode="txonly",
                                app_args=[f"--txpkts={args.packet_size}"], interactive=True,
                                lcores=f"0@{generator_cpu},1@{generator_cpu}",
                                name="demo-gen")
            with generator:
                _wait(args.seconds)
                generator.stop_forwarding()
                sent = generator.port_stats()[0]
                time.sleep(1.0)  # let the backend drain what is in flight
                generator.stop()
        finally:
            stop_backend(backend)
        if not stats_json.exists():
            print("pyvhost wrote no statistics", file=sys.stderr)
            return 1
        stats = json.loads(stats_json.read_text())
    print(f"testpmd sent {sent.tx_packets} packets; pyvhost counted {stats['tx_packets']} "
          f"packets, {stats['tx_bytes']} bytes; direct rounds {stats['direct_rounds']}, "
          f"copy rounds {stats['copy_rounds']}")
    return 0 if stats["tx_packets"] == sent.tx_packets else 1


def _wait(seconds: float | None) -> None:
    try:
        if seconds is None:
            while True:
                time.sleep(3600)
        time.sleep(seconds)
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="run this long (default: "
                    "until Ctrl-C)")
    ap.add_argument("--metadata-access", choices=("auto", "direct", "copy"), default="auto")
    ap.add_argument("--packet-size", type=int, default=64)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
