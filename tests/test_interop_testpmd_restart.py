"""A restarted pyvhost resumes the rings DPDK virtio-user kept (issue #15).

testpmd listens (virtio-user `server=1`) and transmits (txonly); `pyvhost net --client`
connects. pyvhost is killed with SIGKILL mid-traffic: virtio-user keeps its rings (its TX ring
fills up: ring-size frames in flight) and waits for a backend. A new pyvhost connects; virtio-
user sets the rings up again with SET_VRING_BASE 0 while its TX ring's indices stand where the
dead backend left them. pyvhost must resynchronise to the ring's used index (and say so), and
frames must flow again: pyvhost's count grows, and testpmd's TX count grows past where it
stalled. Before the fix the new pyvhost stopped the queue at once ("avail index moved too far
(to N); queue stopped, device needs reset") and nothing flowed again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pyvhost.testing.testbed import PyvhostDaemon, Testpmd, find_testpmd, virtio_user_vdev

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
RESYNCED = "resynchronised next avail to the used index"


@pytest.fixture(scope="module", autouse=True)
def _testpmd_present():
    find_testpmd()


def tx_packets(daemon: PyvhostDaemon) -> int:
    """tx_packets of the daemon's last live statistics line (--stats-format json)."""
    for line in reversed(daemon.log.splitlines()):
        if line.startswith("{"):
            try:
                return int(json.loads(line)["stats"].get("tx_packets", 0))
            except (ValueError, KeyError):
                continue
    return 0


def wait_until(what: str, pred, daemon: PyvhostDaemon, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if "device needs reset" in daemon.log:  # the issue: the queue stopped for good
            pytest.fail(f"{what}: a queue broke\n--- pyvhost log ---\n{daemon.log[-4000:]}")
        if time.monotonic() > deadline or not daemon.running():
            pytest.fail(f"{what}: not within {timeout} s\n--- pyvhost log ---\n"
                        f"{daemon.log[-4000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_killed_pyvhost_restarts_and_resumes_the_kept_rings(tmp_path: Path, poll: bool):
    sock = tmp_path / "net.sock"
    args = ["net", "--client", "--socket-path", sock, "--stats-interval", "0.2",
            "--stats-format", "json", "--log-level", "INFO", *(["--poll"] if poll else [])]
    first = PyvhostDaemon(args, name="pyvhost-first", log_path=tmp_path / "first.log")
    with first, Testpmd([virtio_user_vdev(sock, server=1)], forward_mode="txonly",
                        name="restart", log_path=tmp_path / "testpmd.log") as pmd:
        wait_until("the first pyvhost counting frames", lambda: tx_packets(first) > 100_000,
                   first)
        os.kill(first.pid, signal.SIGKILL)
        first.stop()  # reaps it
        assert first.returncode == -signal.SIGKILL
        time.sleep(1.5)  # virtio-user fills its TX ring and stalls; testpmd samples its count
        stalled = pmd.nic_samples()[-1].tx_packets
        with PyvhostDaemon(args, name="pyvhost-second",
                           log_path=tmp_path / "second.log") as second:
            wait_until("the resync log line", lambda: RESYNCED in second.log, second)
            wait_until("frames counted again", lambda: tx_packets(second) > 10_000, second)
            before = tx_packets(second)
            time.sleep(1.0)
            after = tx_packets(second)
            time.sleep(1.2)  # one more periodic sample from testpmd
            resumed = pmd.nic_samples()[-1].tx_packets
            pmd.stop()  # SIGINT while connected: a clean end of the session
            wait_until("the session closing", lambda: "session closed" in second.log, second)
        log = second.log
    line = next(ln for ln in log.splitlines() if RESYNCED in ln)
    print(f"\n{line}\npyvhost counted {before:,} then {after:,} a second later; testpmd sent "
          f"{stalled:,} before the restart, {resumed:,} after")
    assert "queue 1: base 0 disagrees with the ring" in line and "WARNING" in line
    assert after > before > 0
    assert resumed > stalled
    assert "broken by the" not in log and "moved too far" not in log, log[-4000:]
    assert second.returncode == 0 and "Traceback" not in log
