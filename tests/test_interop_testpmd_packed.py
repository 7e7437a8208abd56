"""pyvhost net over packed virtqueues against DPDK testpmd's virtio-user (`packed_vq=1`), with and
without `in_order=1`, and with `mrg_rxbuf=0`, on both metadata paths: exact counts both ways.

- TX: testpmd txonly; every frame it sent is counted once by pyvhost (tx_packets, tx_bytes).
- RX: pyvhost's loopback source fills testpmd's RX ring and a backlog while testpmd only
  transmits, then testpmd switches to rxonly: what it sent = what it received + what pyvhost
  dropped, and its RX counts are pyvhost's (the accounting of test_net_testpmd.py's loopback).
- The negotiated features (--stats-json "features") have VIRTIO_F_RING_PACKED, and IN_ORDER
  exactly when testpmd asked for it.
"""

from __future__ import annotations

import json
import time

import pytest

from pyvhost.ring.layout import VIRTIO_F_IN_ORDER
from pyvhost.ring.packed_layout import VIRTIO_F_RING_PACKED
from pyvhost.testing.testbed import Testpmd, find_testpmd, virtio_user_vdev, wait_for_socket
from test_net_testpmd import pyvhost_argv, stop_daemon, wait_rx_settled  # (tests/ is on the path)

pytestmark = pytest.mark.interop

VIRTIO_NET_F_MRG_RXBUF = 15
VARIANTS = {
    "in_order": {"packed_vq": 1, "in_order": 1},
    "no_in_order": {"packed_vq": 1, "in_order": 0},
    "mrg_rxbuf_0": {"packed_vq": 1, "mrg_rxbuf": 0},
}


@pytest.fixture(scope="module", autouse=True)
def _testpmd_present():
    find_testpmd()


def _check_features(stats: dict, params: dict) -> None:
    features = stats["features"]
    assert features >> VIRTIO_F_RING_PACKED & 1
    assert bool(features >> VIRTIO_F_IN_ORDER & 1) == bool(params.get("in_order", 1))
    if params.get("mrg_rxbuf") == 0:
        assert not features >> VIRTIO_NET_F_MRG_RXBUF & 1


@pytest.mark.parametrize("metadata_access", ["auto", "copy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_tx_counts_exact(tmp_path, variant, metadata_access):
    import subprocess
    params = VARIANTS[variant]
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    daemon = subprocess.Popen(
        pyvhost_argv(sock, stats_path, "--metadata-access", metadata_access, "--log-level",
                     "INFO"), stderr=subprocess.PIPE, text=True, start_new_session=True)
    sent = []
    try:
        wait_for_socket(sock, timeout=600)
        for size in (64, 1518):
            with Testpmd([virtio_user_vdev(sock, **params)], forward_mode="txonly",
                         app_args=[f"--txpkts={size}"], interactive=True,
                         name="packed-tx") as gen:
                time.sleep(1.5)
                gen.stop_forwarding()
                s = gen.port_stats()[0]
                sent.append((s.tx_packets, s.tx_bytes))
                time.sleep(0.5)
                gen.stop()
    finally:
        log = stop_daemon(daemon)
    stats = json.loads(stats_path.read_text())
    print(f"\n[{variant}/{metadata_access}] sent {sent}, pyvhost {stats['tx_packets']}")
    assert all(p > 1000 for p, _ in sent), log[-3000:]
    assert stats["tx_packets"] == sum(p for p, _ in sent), log[-3000:]
    assert stats["tx_bytes"] == sum(b for _, b in sent)
    assert stats["queues_broken"] == 0, log[-3000:]
    _check_features(stats, params)
    if metadata_access == "copy":
        assert stats["direct_rounds"] == 0 and stats["copy_rounds"] > 0
    else:
        assert stats["direct_rounds"] > 0


@pytest.mark.parametrize("metadata_access", ["auto", "copy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_rx_loopback_counts_exact(tmp_path, variant, metadata_access):
    import subprocess
    params = VARIANTS[variant]
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    daemon = subprocess.Popen(
        pyvhost_argv(sock, stats_path, "--source", "loopback", "--rx-backlog", "1024",
                     "--metadata-access", metadata_access),
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_socket(sock, timeout=600)
        with Testpmd([virtio_user_vdev(sock, **params)], forward_mode="txonly",
                     interactive=True, app_args=["--txpkts=64", "--no-flush-rx"],
                     name="packed-rx") as pmd:
            time.sleep(1.0)
            sent = pmd.stop_forwarding()[0].tx_packets
            time.sleep(0.5)
            pmd.command("set fwd rxonly", "Set rxonly packet forwarding mode")
            pmd.command("start", "packet forwarding - ports=1")
            wait_rx_settled(pmd)
            received = pmd.stop_forwarding()[0].rx_packets
            nic = pmd.port_stats()[0]
            pmd.stop()
    finally:
        log = stop_daemon(daemon)
    stats = json.loads(stats_path.read_text())
    print(f"\n[{variant}/{metadata_access}] loopback: sent {sent}, received {received}, "
          f"dropped {stats['rx_dropped']}")
    assert sent > 2000, log[-2000:]
    assert stats["tx_packets"] == sent
    assert nic.rx_packets == received == stats["rx_packets"]
    assert received + stats["rx_dropped"] == sent
    assert received >= 1024
    assert nic.rx_bytes == stats["rx_bytes"] == 64 * received
    assert stats["queues_broken"] == 0
    _check_features(stats, params)
