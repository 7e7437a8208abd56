"""A real Linux guest reads /dev/hwrng served by pyvhost: QEMU (TCG) + vhost-user-rng-pci.

    guest /dev/hwrng ── virtio_rng ── vhost-user-rng-pci (QEMU) ── pyvhost rng
                                                                  pyvhost run pattern_rng:Pattern

1. `pyvhost rng` (the OS's random bytes): the guest's hw_random core picks virtio_rng, two
   1 KiB reads of /dev/hwrng return all their bytes, look random (no repeated 64-byte
   block, many distinct byte values) and differ; the backend's --stats-json counts at least
   the requests (device_requests) and bytes (rng_bytes) the guest read.
2. `pyvhost run pattern_rng:Pattern` (examples/pattern_rng.py, a device written against the
   public API): the guest reads exactly "PYVHOST!" repeated. Once found through PYTHONPATH with
   pyvhost listening, once found in the current directory (no PYTHONPATH) with pyvhost as the
   client of a listening QEMU.

The guest's hw_random core reads the device at probe time and in 64-byte requests (the
virtio_rng driver's buffer), so the backend serves more requests than the test reads.
Timings are printed (run with -s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pyvhost.testing.testbed import (
    REPO_ROOT,
    GuestVM,
    PyvhostDaemon,
    find_qemu,
    guest_image_paths,
    vhost_user_rng_args,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

EXAMPLES = REPO_ROOT / "examples"
PATTERN = b"PYVHOST!"
READ_BYTES = 1024
BLOCK = 64  # one virtio_rng request's worth


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


def check_guest_uses_virtio_rng(vm: GuestVM) -> None:
    hw_random = "/sys/class/misc/hw_random"
    current = vm.run(f"cat {hw_random}/rng_current", check=True).output.strip()
    available = vm.run(f"cat {hw_random}/rng_available", check=True).output.split()
    assert current.startswith("virtio_rng"), (current, available)
    assert current in available, (current, available)
    assert vm.run("test -c /dev/hwrng").status == 0, vm.run("ls -l /dev").output


def serve_guest(daemon: PyvhostDaemon, qemu_args: list[str], body) -> tuple[object, float]:
    """Boot the guest on the running daemon, run body(vm), stop the guest then the daemon.

    Returns body's result and the boot time. The daemon log is printed if anything fails
    (pytest shows it with the failure), the guest's console is in GuestVM's own errors.
    """
    try:
        with GuestVM(qemu_args) as vm:
            result = body(vm)
            boot = vm.boot_seconds
    except BaseException:
        print(f"--- pyvhost log ({' '.join(daemon.argv)}) ---\n{daemon.log[-6000:]}")
        raise
    finally:
        daemon.stop()
    assert daemon.returncode == 0, daemon.log[-6000:]
    assert "Traceback" not in daemon.log, daemon.log[-6000:]
    return result, boot


def test_guest_reads_random_bytes_from_pyvhost_rng(tmp_path: Path):
    sock, stats_path = tmp_path / "rng.sock", tmp_path / "stats.json"
    t0 = time.monotonic()
    with PyvhostDaemon(["rng", "--socket-path", sock, "--stats-json", stats_path,
                        "--stats-interval", "0", "--log-level", "INFO"]) as daemon:
        daemon.wait_listening()

        def body(vm: GuestVM):
            check_guest_uses_virtio_rng(vm)
            t = time.monotonic()
            first = vm.read_bytes("/dev/hwrng", READ_BYTES, BLOCK)
            second = vm.read_bytes("/dev/hwrng", READ_BYTES, BLOCK)
            return first, second, time.monotonic() - t

        (first, second, read_s), boot = serve_guest(daemon, vhost_user_rng_args(sock), body)

    for data in (first, second):
        assert len(data) == READ_BYTES
        assert data.count(0) < READ_BYTES // 16, data.hex()
        assert len(set(data)) > 128, data.hex()  # 1 KiB of random bytes has ~250 values
    assert first != second
    blocks = [data[i:i + BLOCK] for data in (first, second) for i in range(0, READ_BYTES, BLOCK)]
    assert len(set(blocks)) == len(blocks), "a 64-byte block came twice"

    stats = json.loads(stats_path.read_text())
    print(f"\n[rng] boot {boot:.1f} s, 2 x {READ_BYTES} B read in {read_s:.2f} s, "
          f"whole test {time.monotonic() - t0:.1f} s; stats {stats}")
    check_stats_count_reads(stats, 2 * READ_BYTES)
    assert stats["rng_bytes"] >= 2 * READ_BYTES, stats
    assert stats["rng_empty_requests"] == 0, stats


def check_stats_count_reads(stats: dict, read_bytes: int) -> None:
    """The backend counted at least the requests the guest's reads took (64 bytes each) and
    broke no queue; it also served the probe's and the hwrng thread's requests."""
    assert stats["queues_broken"] == 0, stats
    assert stats["device_requests"] >= read_bytes // BLOCK, stats


@pytest.mark.parametrize("found_in", ["pythonpath", "cwd"])
def test_guest_reads_the_pattern_of_a_user_device(tmp_path: Path, found_in: str):
    """`pyvhost run pattern_rng:Pattern`: the module comes from PYTHONPATH (pyvhost listens)
    or from the current directory (no PYTHONPATH; QEMU listens, pyvhost --client)."""
    sock, stats_path = tmp_path / "rng.sock", tmp_path / "stats.json"
    args = ["run", "pattern_rng:Pattern", "--socket-path", sock, "--stats-json", stats_path,
            "--stats-interval", "0", "--log-level", "INFO"]
    # No __pycache__ left in examples/.
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    if found_in == "pythonpath":
        cwd, env["PYTHONPATH"], qemu_server = tmp_path, str(EXAMPLES), False
    else:
        cwd, env["PYTHONPATH"], qemu_server = EXAMPLES, None, True
        args.append("--client")
    t0 = time.monotonic()
    with PyvhostDaemon(args, cwd=cwd, env=env) as daemon:
        if not qemu_server:
            daemon.wait_listening()
        # With server=True QEMU waits for the client before the guest starts; the daemon,
        # already started, retries until QEMU listens.

        def body(vm: GuestVM):
            check_guest_uses_virtio_rng(vm)
            return vm.read_bytes("/dev/hwrng", READ_BYTES, BLOCK), vm.read_bytes(
                "/dev/hwrng", 3 * BLOCK, BLOCK)

        (data, more), boot = serve_guest(
            daemon, vhost_user_rng_args(sock, server=qemu_server), body)
        sock.unlink(missing_ok=True)  # QEMU's socket in the server case

    assert data == PATTERN * (READ_BYTES // len(PATTERN)), data
    assert more == PATTERN * (3 * BLOCK // len(PATTERN)), more
    stats = json.loads(stats_path.read_text())
    print(f"\n[pattern, {found_in}] boot {boot:.1f} s, whole test {time.monotonic() - t0:.1f} s;"
          f" stats {stats}")
    check_stats_count_reads(stats, READ_BYTES + 3 * BLOCK)
