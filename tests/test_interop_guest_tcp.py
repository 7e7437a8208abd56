"""A Linux guest's TCP stream through pyvhost and a TAP, offloads on and off (issue #15).

    guest eth0 192.0.2.2 ── virtio-net (vhost-user) ── pyvhost net --tap NAME ── TAP NAME
                                                        (in a network namespace, 192.0.2.1)

With a TAP, pyvhost offers what the TAP takes (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6...,
devices/net/offloads.py); the guest negotiates them ("on") or QEMU is told to offer none
(`csum=off,guest_csum=off,...`: "off"). The guest sends 8 MiB of random bytes over TCP
(busybox nc) to a server in the namespace, then fetches them back; both MD5s must match.

- on: the guest's TCP hands pyvhost 64 KiB segments (HOST_TSO) that cross the TAP whole, and
  the namespace's stack hands the TAP segments larger than the MTU that reach the guest whole
  (GUEST_TSO): the average frame pyvhost moved is larger than an Ethernet frame both ways;
- off: no frame larger than the MTU crosses either way.

Once on the direct map, once on the copy path. Throughput is printed (run with -s); under TCG the
guest's CPU sets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvhost.devices.net import offloads as OFF
from pyvhost.testing.testbed import GuestVM, find_qemu, guest_image_paths, vhost_user_net_args
from test_interop_guest import (HOST_IP, guest_up, net_on_a_tap, random_guest_file,
                                server_in)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FILE_MIB = 8
PORT = 5201
ETH_MAX = 1514  # an MTU-sized frame: 14-byte Ethernet header + 1500

# QEMU offers none of the offloads: the guest then segments and checksums itself.
NO_OFFLOADS = {k: "off" for k in ("csum", "guest_csum", "gso", "host_tso4", "host_tso6",
                                  "host_ecn", "host_ufo", "guest_tso4", "guest_tso6",
                                  "guest_ecn", "guest_ufo")}

# One connection in (the guest sends: byte count, MD5, seconds as JSON), then one out (the same
# bytes back to the guest; timed until the guest closes, having read them all).
TCP_SERVER = r"""
import hashlib, json, socket, sys, time
listen = socket.socket()
listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listen.bind((sys.argv[1], int(sys.argv[2])))
listen.listen(1)
listen.settimeout(120)
print("ready", flush=True)
conn, _ = listen.accept()
conn.settimeout(120)
data, first = bytearray(), None
while chunk := conn.recv(1 << 20):
    first = first or time.monotonic()
    data += chunk
seconds = time.monotonic() - (first or time.monotonic())
conn.close()
print(json.dumps({"bytes": len(data), "md5": hashlib.md5(data).hexdigest(),
                  "seconds": seconds}), flush=True)
conn, _ = listen.accept()
conn.settimeout(120)
start = time.monotonic()
conn.sendall(data)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)  # the guest's nc closes once it has read everything
conn.close()
print(json.dumps({"bytes": len(data), "seconds": time.monotonic() - start}), flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


@pytest.mark.parametrize("offloads", ["on", "off"])
@pytest.mark.parametrize("metadata_access", ["direct", "copy"])
def test_guest_tcp_stream_both_ways_through_a_tap(tmp_path: Path, metadata_access, offloads):
    with net_on_a_tap(tmp_path, "pvt", "--metadata-access", metadata_access) as bed:
        props = NO_OFFLOADS if offloads == "off" else {}
        with GuestVM(vhost_user_net_args(bed.sock, **props)) as vm:
            guest_features = guest_up(vm)
            guest_md5 = random_guest_file(vm, FILE_MIB)
            with server_in(bed.ns, TCP_SERVER, HOST_IP, str(PORT)) as server:
                sent = vm.run(f"nc {HOST_IP} {PORT} < /tmp/f", timeout=300)
                assert sent.status == 0, sent.output
                got = json.loads(server.stdout.readline())
                back = vm.run(f"nc {HOST_IP} {PORT} > /tmp/g && md5sum /tmp/g", timeout=300)
                assert back.status == 0, back.output
                out, err = server.communicate(timeout=60)
            fetched = json.loads(out.strip().splitlines()[-1])
    log = bed.daemon.log
    assert bed.daemon.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert got["bytes"] == FILE_MIB << 20 and got["md5"] == guest_md5, (got, guest_md5)
    assert back.output.split()[0] == guest_md5, back.output
    stats = json.loads(bed.stats_path.read_text())
    assert stats["queues_broken"] == 0 and stats["rx_dropped"] == 0, stats
    if metadata_access == "copy":
        assert stats["direct_rounds"] == 0 and stats["copy_rounds"] > 0
    else:
        assert stats["direct_rounds"] > 0
    negotiated = {name: guest_features[bit] == "1" for name, bit in (
        ("CSUM", OFF.VIRTIO_NET_F_CSUM), ("GUEST_CSUM", OFF.VIRTIO_NET_F_GUEST_CSUM),
        ("HOST_TSO4", OFF.VIRTIO_NET_F_HOST_TSO4), ("GUEST_TSO4", OFF.VIRTIO_NET_F_GUEST_TSO4))}
    tx_avg = stats["tx_bytes"] / stats["tx_packets"]
    rx_avg = stats["rx_bytes"] / stats["rx_packets"]
    if offloads == "on":
        assert all(negotiated.values()), (negotiated, guest_features)
        # Segments, not frames: the TSO'd stream crossed whole both ways.
        assert tx_avg > ETH_MAX and rx_avg > ETH_MAX, (tx_avg, rx_avg, stats)
    else:
        assert not any(negotiated.values()), (negotiated, guest_features)
        # tx/rx bytes count the virtio-net header pyvhost passes with each frame: 12 bytes.
        assert tx_avg <= ETH_MAX + 12 and rx_avg <= ETH_MAX + 12, (tx_avg, rx_avg, stats)
    put = got["bytes"] / got["seconds"] / 1e6
    get = fetched["bytes"] / fetched["seconds"] / 1e6
    print(f"\n[{metadata_access}, offloads {offloads}] TCP guest->host {put:.1f} MB/s, "
          f"host->guest {get:.1f} MB/s; frames: tx {stats['tx_packets']} (avg {tx_avg:.0f} B), "
          f"rx {stats['rx_packets']} (avg {rx_avg:.0f} B)")
