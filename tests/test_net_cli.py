"""`pyvhost net` with the sink and source flags: argument checks, and a pcap sink plus loopback
source driven by the Python front-end, whose frames must be in the pcap file byte for byte."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from pyvhost.protocol import ProtocolFeature as P
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.testbed import wait_for_socket
from test_net_rx import BASE, EVENT_IDX, MRG, frame, wait_until

TIMEOUT = 60.0


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvhost", "net", *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("args,message", [
    (["--sink", "disk"], "unknown 'disk'"),
    (["--sink", "tap:"], "tap needs a name"),
    (["--source", "pcap:x"], "unknown 'pcap:x'"),
    (["--tap", "t0", "--source", "loopback"], "--tap NAME replaces"),
    (["--mac", "52:54:00:12:34"], "not six bytes"),
    (["--mac", "zz:54:00:12:34:56"], "not six bytes"),
    (["--mtu", "20"], "outside 68..65535"),
    (["--queues", "0"], "at least 1"),
])
def test_bad_flags_exit_2_with_a_message(tmp_path, args, message):
    out = run("--socket-path", str(tmp_path / "s.sock"), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_pcap_that_cannot_be_created_exits_1(tmp_path):
    out = run("--socket-path", str(tmp_path / "s.sock"), "--sink",
              f"pcap:{tmp_path}/no/such/dir/x.pcap")
    assert out.returncode == 1 and "cannot open" in out.stderr, out.stderr


def test_pcap_sink_and_loopback_source_hold_exactly_the_guest_frames(tmp_path):
    from scapy.utils import RawPcapReader

    sock, stats_path, pcap = tmp_path / "s.sock", tmp_path / "stats.json", tmp_path / "tx.pcap"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "net", "--socket-path", str(sock), "--sink",
         f"pcap:{pcap}", "--source", "loopback", "--mac", "02:00:00:00:00:07", "--mtu", "9000",
         "--stats-json", str(stats_path), "--stats-interval", "0"],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    frames = [frame(i, size) for i, size in enumerate([60, 1514, 9018, 200] * 25)]
    try:
        wait_for_socket(sock, timeout=120)
        with GuestRam([(0, 16 << 20)]) as ram, VhostUserFrontend(str(sock)) as fe:
            fe.negotiate(BASE | MRG | EVENT_IDX | (1 << 3),  # + VIRTIO_NET_F_MTU
                         P.REPLY_ACK.mask | P.MQ.mask | P.CONFIG.mask)
            assert fe.get_config(0, 6) == bytes.fromhex("020000000007")
            assert fe.get_config(10, 2) == (9000).to_bytes(2, "little")
            fe.set_mem_table(ram)
            for index in (0, 1):
                fe.setup_queue(index, MockSplitQueue(ram, 256, event_idx=True))
                fe.enable_queue(index)
            fe.post_rx_buffers(0, 250, 4096)
            fe.send_frames(1, frames)
            fe.wait_tx_done(1)
            received: list[bytes] = []

            def all_back() -> bool:
                received.extend(fe.received_frames(0))
                return len(received) >= len(frames)
            wait_until(all_back, "the looped-back frames")
            assert received == frames
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        _, log = daemon.communicate(timeout=TIMEOUT)
    assert daemon.returncode == 0 and "Traceback" not in log, log[-3000:]
    with RawPcapReader(str(pcap)) as reader:
        recorded = [bytes(data) for data, _ in reader]
    assert recorded == frames
    stats = json.loads(stats_path.read_text())
    assert stats["tx_packets"] == stats["rx_packets"] == len(frames)
    assert stats["rx_bytes"] == stats["tx_bytes"] == sum(map(len, frames))
    assert stats["rx_dropped"] == stats["tx_dropped"] == 0
    assert "rx_packets=100," in log  # the totals line
