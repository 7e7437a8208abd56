"""A real Linux guest on the network through pyvhost: QEMU (TCG) + virtio-net-pci + a TAP.

    guest eth0 192.0.2.2 ── virtio-net (vhost-user) ── pyvhost net --tap NAME ── TAP NAME
                                                        (in a network namespace, 192.0.2.1)

The daemon runs inside a namespace the test makes (`ip netns exec`), so the TAP it creates is
there and nothing touches the host's own networking. The guest pings the TAP's end and the
TAP's end pings the guest (no loss either way), then the guest sends a 10 MiB file of random
bytes over UDP with busybox's tftp client (the guest's busybox nc has no UDP) to a small TFTP
server in the namespace; the server's MD5 of what arrived must equal the guest's. Once with
the ring metadata on the direct map, once on the copy path, each with split and with packed
virtqueues (`virtio-net-pci,packed=on`: the guest negotiates VIRTIO_F_RING_PACKED, which
pyvhost's --stats-json "features" and the guest's own feature bits show). Then the guest
fetches the file back (10 MiB through the RX path, IP fragments in mergeable buffers) and its
MD5 must match too. Measured figures (RTT, MB/s) are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvhost.ring.packed_layout import VIRTIO_F_RING_PACKED
from pyvhost.testing.testbed import (
    GuestVM,
    NetNamespace,
    PyvhostDaemon,
    find_qemu,
    guest_image_paths,
    unique_name,
    vhost_user_net_args,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

HOST_IP, GUEST_IP = "192.0.2.1", "192.0.2.2"
TFTP_PORT = 6969
FILE_MIB = 10
TFTP_BLOCK = 8192

# A TFTP server (RFC 1350 + the blksize option of RFC 2348) run in the namespace, for one write
# request and then one read request of the same bytes. Each transfer gets a new port; the write
# side acknowledges each block (again for a retransmitted one) and prints byte count, MD5 and
# the time from first to last block as JSON; the read side sends the bytes back, resending a
# block whose ACK does not come within 0.5 s, and prints its time.
TFTP_SERVER = r"""
import hashlib, json, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])
listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listen.bind((host, port))
listen.settimeout(120)
print("ready", flush=True)

def request(opcode):
    req, peer = listen.recvfrom(65536)
    assert struct.unpack("!H", req[:2])[0] == opcode, req[:40]
    fields = req[2:].split(b"\0")
    opts = {fields[i].lower(): fields[i + 1] for i in range(2, len(fields) - 1, 2)}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new TID (port) per transfer
    sock.bind((host, 0))
    return sock, peer, int(opts.get(b"blksize", 512)), b"blksize" in opts

def oack(sock, peer, block_size):
    sock.sendto(struct.pack("!H", 6) + b"blksize\0" + str(block_size).encode() + b"\0", peer)

# 1. WRQ: the guest sends the file.
sock, peer, block_size, negotiated = request(2)
sock.settimeout(30)
if negotiated:
    oack(sock, peer, block_size)
else:
    sock.sendto(struct.pack("!HH", 4, 0), peer)
data, expect, first, dups = bytearray(), 1, None, 0
while True:
    pkt, addr = sock.recvfrom(65536)
    op, block = struct.unpack("!HH", pkt[:4])
    if op != 3 or addr != peer:
        continue
    if block == expect & 0xFFFF:
        first = first or time.monotonic()
        data += pkt[4:]
        expect += 1
    else:
        dups += 1
    sock.sendto(struct.pack("!HH", 4, block), peer)
    if block == (expect - 1) & 0xFFFF and len(pkt) - 4 < block_size:
        break
put = {"bytes": len(data), "md5": hashlib.md5(data).hexdigest(), "dups": dups,
       "seconds": time.monotonic() - (first or time.monotonic()), "block_size": block_size}
print(json.dumps(put), flush=True)

# 2. RRQ: the guest fetches it back.
sock, peer, block_size, negotiated = request(1)
sock.settimeout(0.5)
def exchange(packet, block):
    global resent
    for _ in range(60):
        sock.sendto(packet, peer)
        try:
            while True:
                pkt, addr = sock.recvfrom(65536)
                if addr == peer and pkt[:4] == struct.pack("!HH", 4, block & 0xFFFF):
                    return
        except TimeoutError:
            resent += 1
    raise SystemExit(f"no ACK for block {block}")
resent = 0
if negotiated:
    exchange(struct.pack("!H", 6) + b"blksize\0" + str(block_size).encode() + b"\0", 0)
start = time.monotonic()
blocks = [data[i:i + block_size] for i in range(0, len(data), block_size)]
if len(data) % block_size == 0:
    blocks.append(b"")
for n, chunk in enumerate(blocks, 1):
    exchange(struct.pack("!HH", 3, n & 0xFFFF) + chunk, n)
print(json.dumps({"bytes": len(data), "seconds": time.monotonic() - start, "resent": resent}),
      flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


@dataclass
class TapBed:
    ns: NetNamespace
    daemon: PyvhostDaemon
    sock: Path
    stats_path: Path


@contextmanager
def net_on_a_tap(tmp_path: Path, prefix: str, *options: str) -> Iterator[TapBed]:
    """A namespace of its own with `pyvhost net --tap NAME` in it (so the TAP is created
    there), listening, and the TAP's end at HOST_IP. The daemon is stopped (SIGTERM: it writes
    its --stats-json) and the namespace removed on leaving."""
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    tap = prefix + unique_name("g")[-8:].replace("-", "")
    with NetNamespace() as ns, PyvhostDaemon(
            ["net", "--socket-path", sock, "--tap", tap, "--stats-json", stats_path,
             "--stats-interval", "0", *options], netns=ns.name, name="net-tap") as daemon:
        daemon.wait_listening(timeout=300)
        ns.add_address(tap, f"{HOST_IP}/24")
        yield TapBed(ns, daemon, sock, stats_path)


def guest_up(vm: GuestVM) -> str:
    """eth0 at GUEST_IP and up; returns the driver's negotiated features (one character per
    bit, bit 0 first)."""
    vm.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up", check=True)
    return vm.run("cat /sys/class/net/eth0/device/features", check=True).output.strip()


def ping_both_ways(vm: GuestVM, ns: NetNamespace, timeout: float) -> tuple[str, str]:
    """Ten pings from the guest to the TAP's end and ten back, none lost; both outputs."""
    guest_ping = vm.run(f"ping -c 10 -i 0.2 -W 5 {HOST_IP}", timeout=timeout).output
    host_ping = ns.run(["ping", "-c", "10", "-i", "0.2", "-W", "5", GUEST_IP],
                       timeout=timeout, check=False).stdout
    assert no_loss(guest_ping, 10), guest_ping
    assert no_loss(host_ping, 10), host_ping
    return guest_ping, host_ping


def random_guest_file(vm: GuestVM, mib: int) -> str:
    """/tmp/f in the guest: `mib` MiB of random bytes; returns their MD5."""
    return vm.run(f"dd if=/dev/urandom of=/tmp/f bs=1M count={mib} 2>/dev/null && md5sum /tmp/f",
                  timeout=120, check=True).output.split()[0]


def tftp_round_trip(vm: GuestVM, ns: NetNamespace, mib: int, timeout: float) -> tuple[dict, dict]:
    """The guest sends `mib` MiB of random bytes to TFTP_SERVER in the namespace and fetches
    them back; the server's MD5 and the guest's of what came back must be the file's. Returns
    the server's reports of the put and the get."""
    with server_in(ns, TFTP_SERVER, HOST_IP, str(TFTP_PORT)) as server:
        guest_md5 = random_guest_file(vm, mib)
        sent = vm.run(f"tftp -p -l /tmp/f -r f -b {TFTP_BLOCK} {HOST_IP} {TFTP_PORT}",
                      timeout=timeout)
        assert sent.status == 0, sent.output
        got = json.loads(server.stdout.readline())
        back = vm.run(f"tftp -g -l /tmp/g -r f -b {TFTP_BLOCK} {HOST_IP} {TFTP_PORT}"
                      " && md5sum /tmp/g", timeout=timeout)
        assert back.status == 0, back.output
        out, err = server.communicate(timeout=30)
    assert got["bytes"] == mib << 20 and got["md5"] == guest_md5, (got, guest_md5)
    assert back.output.split()[0] == guest_md5, back.output
    return got, json.loads(out.strip().splitlines()[-1])


@contextmanager
def server_in(ns: NetNamespace, script: str, *args: str) -> Iterator[subprocess.Popen]:
    """A Python script in the namespace, once it printed "ready"; killed if still running at
    the end (a test reads what it prints with communicate())."""
    server = ns.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        yield server
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
        server.stdout.close()
        server.stderr.close()


def rtt_ms(ping_output: str) -> tuple[float, float, float]:
    """(min, avg, max) from iputils' 'rtt min/avg/max/mdev' or busybox's 'round-trip' line."""
    m = re.search(r"(?:rtt|round-trip) min/avg/max(?:/mdev)? = ([\d.]+)/([\d.]+)/([\d.]+)",
                  ping_output)
    assert m, ping_output
    return float(m[1]), float(m[2]), float(m[3])


def no_loss(ping_output: str, count: int) -> bool:
    return re.search(rf"{count} packets transmitted, {count} (?:packets )?received",
                     ping_output) is not None


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("metadata_access", ["direct", "copy"])
def test_guest_pings_and_sends_10_mib_over_udp_through_a_tap(tmp_path: Path, metadata_access,
                                                             ring):
    with net_on_a_tap(tmp_path, "pvg", "--metadata-access", metadata_access) as bed:
        props = {"packed": "on"} if ring == "packed" else {}
        with GuestVM(vhost_user_net_args(bed.sock, **props)) as vm:
            guest_features = guest_up(vm)
            t0 = time.monotonic()
            guest_ping, host_ping = ping_both_ways(vm, bed.ns, timeout=60)
            # 10 MiB out, and back through the RX path into the guest.
            got, fetched = tftp_round_trip(vm, bed.ns, FILE_MIB, timeout=150)
            guest_stats = vm.run("cat /proc/net/dev").output
            elapsed = time.monotonic() - t0
    log = bed.daemon.log
    assert bed.daemon.returncode == 0, log[-4000:]
    stats = json.loads(bed.stats_path.read_text())
    packed = ring == "packed"
    assert bool(stats["features"] >> VIRTIO_F_RING_PACKED & 1) == packed, stats["features"]
    assert guest_features[VIRTIO_F_RING_PACKED] == ("1" if packed else "0"), guest_features
    assert stats["queues_broken"] == 0 and stats["rx_dropped"] == 0, stats
    assert stats["tx_bytes"] > FILE_MIB << 20 and stats["rx_packets"] > 0, stats
    if metadata_access == "copy":
        assert stats["direct_rounds"] == 0 and stats["copy_rounds"] > 0
    else:
        assert stats["direct_rounds"] > 0
    assert "Traceback" not in log, log[-4000:]
    g_min, g_avg, g_max = rtt_ms(guest_ping)
    h_min, h_avg, h_max = rtt_ms(host_ping)
    mb_s = got["bytes"] / got["seconds"] / 1e6
    print(f"\n[{metadata_access}, {ring}] guest->host ping rtt min/avg/max {g_min}/{g_avg}/{g_max} ms; "
          f"host->guest {h_min}/{h_avg}/{h_max} ms; tftp put {got['bytes'] >> 20} MiB in "
          f"{got['seconds']:.1f} s = {mb_s:.2f} MB/s ({got['block_size']}-byte blocks, "
          f"{got['dups']} retransmitted); tftp get {fetched['bytes'] / fetched['seconds'] / 1e6:.2f}"
          f" MB/s ({fetched['resent']} resent); rx {stats['rx_packets']} tx {stats['tx_packets']} "
          f"frames; test body {elapsed:.0f} s")
    assert guest_stats  # /proc/net/dev was readable: the guest stayed up to the end
