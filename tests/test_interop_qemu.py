"""pyvhost's net backend against QEMU (TCG) and a Linux guest's virtio-net driver.

QEMU negotiates over the socket at start-up, maps the guest's shared memfd RAM into pyvhost
(ADD_MEM_REG, as CONFIGURE_MEM_SLOTS is offered; SET_MEM_TABLE otherwise) and starts the
rings when the guest driver sets DRIVER_OK. Bringing the guest's interface up makes Linux
send IPv6 neighbour/router discovery: what the guest counts as transmitted, pyvhost must
count too. When QEMU stops the device it writes status 0 before GET_VRING_BASE; the ring
must still report where it stopped.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyvhost.testing.testbed import (
    GuestVM,
    find_qemu,
    guest_image_paths,
    vhost_user_net_args,
    wait_for_socket,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


def guest_tx(dev_table: str, iface: str = "eth0") -> tuple[int, int]:
    """(bytes, packets) transmitted, from /proc/net/dev."""
    for line in dev_table.splitlines():
        name, _, rest = line.strip().partition(":")
        if name == iface:
            fields = rest.split()
            return int(fields[8]), int(fields[9])
    raise AssertionError(f"{iface} not in:\n{dev_table}")


def test_qemu_guest_negotiates_maps_memory_and_transmits(tmp_path: Path):
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(sock), "--stats-json",
         str(stats_path), "--stats-interval", "0", "--log-level", "DEBUG"],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_socket(sock, timeout=120)
        with GuestVM(vhost_user_net_args(sock)) as vm:
            vm.run("ip link set eth0 up", check=True)
            # Wait (in the guest) until Linux has sent its first IPv6 discovery frames.
            out = vm.run("for i in $(seq 100); do "
                         "[ \"$(awk '/eth0:/ {print $11}' /proc/net/dev)\" != 0 ] && break; "
                         "sleep 0.2; done; sleep 1; ip link set eth0 down; cat /proc/net/dev",
                         timeout=60)
            tx_bytes, tx_packets = guest_tx(out.output)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        _, log = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, log[-4000:]
    stats = json.loads(stats_path.read_text())
    assert re.search(r"memory (table|region added)", log), log[-4000:]
    assert "queue 1 started" in log and not re.search(r"\brefused:", log), log[-4000:]
    assert stats["requests_refused"] == 0
    assert tx_packets > 0
    assert stats["tx_packets"] == tx_packets
    assert stats["tx_bytes"] == tx_bytes
    assert stats["queues_broken"] == 0
    # The TX ring reports where it stopped, even though status 0 came first.
    bases = [int(n) for n in re.findall(r"GET_VRING_BASE queue 1: next avail (\d+)", log)]
    assert bases and bases[-1] == tx_packets, log[-4000:]
