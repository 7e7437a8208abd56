"""pyvhost's RX sources and pcap sink against DPDK testpmd's virtio-user (a real driver).

- loopback: testpmd transmits (txonly) while it does not poll its RX queue, so pyvhost fills
  the RX ring, then its bounded backlog, then counts drops; testpmd stops, switches to rxonly
  and starts again (--no-flush-rx: testpmd would otherwise read and discard its RX queues at
  start): its refills kick pyvhost, which delivers the waiting frames. Exact
  accounting: what testpmd sent = what pyvhost counted as transmitted = received by testpmd +
  dropped by pyvhost; testpmd's RX packets and bytes = pyvhost's.
- TAP source: pyvhost runs with --tap in a namespace; a Python writer there sends N frames into
  the TAP; testpmd in rxonly receives exactly those N frames and bytes, and pyvhost agrees.
- pcap sink: a txonly run recorded by --sink pcap:FILE opens in scapy (and tcpdump) with as
  many 64-byte frames as testpmd sent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvhost.testing.testbed import (
    NetNamespace,
    Testpmd,
    find_testpmd,
    unique_name,
    virtio_user_vdev,
    wait_for_socket,
)

pytestmark = pytest.mark.interop

TIMEOUT = 60.0


@pytest.fixture(scope="module", autouse=True)
def _testpmd_present():
    find_testpmd()


def pyvhost_argv(sock: Path, stats: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(sock),
            "--stats-json", str(stats), "--stats-interval", "0", *args]


def collect(proc: subprocess.Popen) -> tuple[str, bool]:
    """SIGTERM, wait, and the daemon's log; False if it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=TIMEOUT)[1], True
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1], False


def stop_daemon(proc: subprocess.Popen) -> str:
    err, exited = collect(proc)
    assert exited, f"pyvhost did not exit on SIGTERM:\n{err[-4000:]}"
    assert proc.returncode == 0 and "Traceback" not in err, err[-4000:]
    return err


def wait_rx_settled(pmd: Testpmd, quiet: float = 0.5, timeout: float = TIMEOUT) -> None:
    """Until testpmd's RX count stops moving for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = pmd.port_stats()[0].rx_packets
        if now == last:
            return
        last = now
        time.sleep(quiet)
    pytest.fail("testpmd's RX count kept moving")


@pytest.mark.parametrize("metadata_access", ["auto", "copy"])
def test_loopback_backlog_then_rxonly_receives_everything_not_dropped(tmp_path, metadata_access):
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    daemon = subprocess.Popen(
        pyvhost_argv(sock, stats_path, "--source", "loopback", "--rx-backlog", "1024",
                     "--metadata-access", metadata_access),
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_socket(sock, timeout=120)
        with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly", interactive=True,
                     app_args=["--txpkts=64", "--no-flush-rx"], name="loopback") as pmd:
            time.sleep(1.0)
            sent = pmd.stop_forwarding()[0].tx_packets
            time.sleep(0.5)  # pyvhost drains the TX ring into the RX ring and backlog
            pmd.command("set fwd rxonly", "Set rxonly packet forwarding mode")
            pmd.command("start", "packet forwarding - ports=1")
            wait_rx_settled(pmd)
            received = pmd.stop_forwarding()[0].rx_packets
            nic = pmd.port_stats()[0]
            pmd.stop()
    finally:
        log = stop_daemon(daemon)
    stats = json.loads(stats_path.read_text())
    print(f"\n[{metadata_access}] loopback: testpmd sent {sent}, received {received}, "
          f"pyvhost dropped {stats['rx_dropped']}")
    assert sent > 2000, log[-2000:]
    assert stats["tx_packets"] == sent
    assert nic.rx_packets == received == stats["rx_packets"]
    assert received + stats["rx_dropped"] == sent
    assert received >= 1024  # at least the backlog came in after the refill
    assert nic.rx_bytes == stats["rx_bytes"] == 64 * received
    assert stats["queues_broken"] == 0


SENDER = r"""
import socket, struct, sys, time
ifname, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for i in range(n):
    head = b"\xff\xff\xff\xff\xff\xff\x02\x00\x00\x00\x00\x01\x08\x00" + struct.pack("!I", i)
    s.send(head + bytes(size - len(head)))
    if i % 64 == 63:
        time.sleep(0.002)  # paced: the TAP's own queue (500 frames) is not under test
print("sent", n, flush=True)
"""


def test_tap_source_frames_reach_testpmd_rxonly(tmp_path):
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    tap = "pvp" + unique_name("p")[-8:].replace("-", "")
    n, size = 20000, 128
    with NetNamespace() as ns:
        # No IPv6 on new links there: the kernel must send nothing of its own into the TAP.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        # A backlog that absorbs testpmd being descheduled for a while on a busy machine.
        daemon = ns.popen(pyvhost_argv(sock, stats_path, "--tap", tap, "--rx-backlog", "8192"),
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
        log = ""
        try:
            wait_for_socket(sock, timeout=120)
            # --no-flush-rx: testpmd flushes its RX queues after it reports "packet
            # forwarding" (when the sender starts), which counts frames in the NIC statistics
            # but not in the forward statistics.
            with Testpmd([virtio_user_vdev(sock)], forward_mode="rxonly", interactive=True,
                         app_args=["--no-flush-rx"], name="tap-rx") as pmd:
                sender = ns.run([sys.executable, "-c", SENDER, tap, str(n), str(size)],
                                timeout=TIMEOUT)
                assert sender.stdout.strip() == f"sent {n}", sender.stderr
                wait_rx_settled(pmd)
                nic = pmd.port_stats()[0]
                received = pmd.stop_forwarding()[0].rx_packets
                pmd.stop()
        except BaseException:
            log = collect(daemon)[0]
            print(f"--- pyvhost log ---\n{log[-8000:]}")
            raise
        finally:
            if not log:
                log = stop_daemon(daemon)
    stats = json.loads(stats_path.read_text())
    assert (nic.rx_packets, received, stats["rx_packets"]) == (n, n, n), (stats, log[-2000:])
    assert nic.rx_bytes == stats["rx_bytes"] == n * size
    assert stats["rx_dropped"] == 0 and stats["queues_broken"] == 0


def test_pcap_of_a_txonly_run_opens_in_scapy(tmp_path):
    from scapy.layers.inet import UDP
    from scapy.utils import RawPcapReader, rdpcap

    sock, stats_path, pcap = tmp_path / "net.sock", tmp_path / "stats.json", tmp_path / "tx.pcap"
    daemon = subprocess.Popen(pyvhost_argv(sock, stats_path, "--sink", f"pcap:{pcap}"),
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_socket(sock, timeout=120)
        with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly", interactive=True,
                     app_args=["--txpkts=64"], name="pcap") as pmd:
            time.sleep(0.3)
            pmd.stop_forwarding()
            sent = pmd.port_stats()[0]
            time.sleep(0.5)  # the port stays up: pyvhost drains the ring into the file
            pmd.stop()
    finally:
        stop_daemon(daemon)
    stats = json.loads(stats_path.read_text())
    frames = total = 0
    with RawPcapReader(str(pcap)) as reader:
        assert reader.linktype == 1  # Ethernet
        for data, meta in reader:
            frames += 1
            total += len(data)
            assert meta.wirelen == len(data)
    print(f"\npcap: {frames} frames, {pcap.stat().st_size >> 20} MiB")
    assert frames == sent.tx_packets == stats["tx_packets"] > 0
    assert total == sent.tx_bytes == 64 * frames
    sample = rdpcap(str(pcap), count=200)
    assert len(sample) == min(200, frames) and all(p.haslayer(UDP) for p in sample)
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "-c", "5"], capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 5, out.stderr
