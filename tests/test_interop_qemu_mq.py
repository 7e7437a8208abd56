"""QEMU multiqueue: a 2-pair virtio-net guest starts all four rings and what it sends is counted.

QEMU's vhost device for each queue pair sends ADD_MEM_REG for the same regions again; the
backend must count them, not refuse them as overlaps (it did, and the extra pairs never ran).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from pyvhost.testing.testbed import GuestVM, wait_for_socket


@pytest.mark.interop
def test_qemu_two_queue_pairs_all_start_and_tx_counts_match(tmp_path):
    sock, stats, log = tmp_path / "net.sock", tmp_path / "stats.json", tmp_path / "pyvhost.log"
    with open(log, "w") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(sock), "--queues", "2",
             "--stats-json", str(stats), "--stats-interval", "0"], stderr=log_file)
    try:
        wait_for_socket(sock, timeout=120)
        qemu_args = ["-chardev", f"socket,id=c0,path={sock}",
                     "-netdev", "vhost-user,id=n0,chardev=c0,queues=2",
                     "-device", "virtio-net-pci,netdev=n0,vectors=0,romfile=,mq=on"]
        with GuestVM(qemu_args, cpus=2, name="mq-guest") as vm:
            queues = vm.run("ip link set eth0 up && ls /sys/class/net/eth0/queues")
            assert queues.output.split() == ["rx-0", "rx-1", "tx-0", "tx-1"]
            # Let IPv6 address discovery send its frames, then read the guest's own count.
            sent = vm.run("sleep 3; cat /sys/class/net/eth0/statistics/tx_packets")
            guest_tx = int(sent.output.strip())
    finally:
        daemon.send_signal(signal.SIGINT)
        daemon.wait(30)
    text = log.read_text()
    for q in range(4):
        assert f"queue {q} started" in text, text[-3000:]
    assert "overlap" not in text
    assert guest_tx > 0 and json.loads(stats.read_text())["tx_packets"] == guest_tx
