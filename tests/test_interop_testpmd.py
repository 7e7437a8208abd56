"""pyvhost's net backend against a real frontend: DPDK testpmd's virtio-user in txonly mode.

For each metadata path and packet size, one `pyvhost net` process serves two testpmd runs,
one after the other (the second connects after the first disconnected). testpmd stops
forwarding first (its ports stay up, so everything it queued is consumed), reports exactly
what it sent, and only then closes; pyvhost's final --stats-json must count the same packets
and bytes (bytes = frame bytes: chain length less the 12-byte virtio_net_hdr).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvhost.testing.testbed import Testpmd, find_testpmd, virtio_user_vdev, wait_for_socket

pytestmark = pytest.mark.interop

RUNS = 2
FORWARD_SECONDS = 1.5


@pytest.fixture(scope="module", autouse=True)
def _testpmd_present():
    find_testpmd()  # raises with a hint when DPDK is missing (scripts/setup.sh installs it)


def start_daemon(sock: Path, stats: Path, metadata_access: str, poll: bool
                 ) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(sock),
            "--metadata-access", metadata_access, "--stats-json", str(stats),
            "--stats-interval", "0", "--log-level", "INFO"]
    if poll:
        argv.append("--poll")
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_daemon(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"pyvhost did not exit on SIGTERM:\n{err[-4000:]}")
    return err


def one_run(sock: Path, packet_size: int) -> tuple[int, int]:
    """Forward for a while; (packets, bytes) testpmd sent."""
    with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly",
                 app_args=[f"--txpkts={packet_size}"], interactive=True,
                 name="interop-gen") as gen:
        time.sleep(FORWARD_SECONDS)
        gen.stop_forwarding()
        sent = gen.port_stats()[0]
        time.sleep(0.5)  # the port stays up meanwhile: the backend drains the ring
        gen.stop()
    assert sent.tx_packets > 0
    return sent.tx_packets, sent.tx_bytes


@pytest.mark.parametrize("packet_size", [64, 1518])
@pytest.mark.parametrize("metadata_access,poll", [("auto", True), ("copy", False)])
def test_txonly_counts_match_over_two_connections(tmp_path, metadata_access, poll, packet_size):
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    daemon = start_daemon(sock, stats_path, metadata_access, poll)
    try:
        wait_for_socket(sock, timeout=120)
        sent = [one_run(sock, packet_size) for _ in range(RUNS)]
    finally:
        log = stop_daemon(daemon)
    assert daemon.returncode == 0, log[-4000:]
    stats = json.loads(stats_path.read_text())
    assert stats["connections"] == RUNS, log[-4000:]
    assert stats["tx_packets"] == sum(p for p, _ in sent), log[-4000:]
    assert stats["tx_bytes"] == sum(b for _, b in sent)
    assert stats["tx_bytes"] == stats["tx_packets"] * packet_size
    assert stats["queues_broken"] == 0
    if metadata_access == "copy":
        assert stats["direct_rounds"] == 0 and stats["copy_rounds"] > 0
    else:
        assert stats["direct_rounds"] > 0
    assert "Traceback" not in log, log[-4000:]
