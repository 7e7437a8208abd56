"""The TAP sink and source, through the real daemon and the Python front-end.

The daemon creates the TAP (in the test's own network namespace), the test moves it into a
namespace it made (the daemon's fds keep working: they are tied to the device, not to a
namespace), switches IPv6 off there so the kernel sends nothing of its own, and talks to it
with a raw AF_PACKET socket opened inside the namespace. What the front-end transmits must come
out of the TAP whole and in order; what is sent into the TAP must reach the front-end's RX
buffers whole and in order; with no RX buffers, the bounded backlog keeps the first frames and
counts the rest.
"""

from __future__ import annotations

import ctypes
import socket
import subprocess
import threading
import time

import pytest

from pyvhost.devices.net.endpoints import Endpoints
from pyvhost.devices.net.tap import Tap
from pyvhost.testing.testbed import NetNamespace, unique_name
from test_net_rx import BASE, EVENT_IDX, MRG, Daemon, frame, wait_until

pytestmark = pytest.mark.slow

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    from pyvhost.devices.net.endpoints import warm_up
    warm_up()


def tap_name() -> str:
    return "pvt" + unique_name("t")[-8:].replace("-", "")


def packet_socket_in(ns: str, ifname: str) -> socket.socket:
    """A raw AF_PACKET socket bound to `ifname` inside namespace `ns` (setns on a short-lived
    thread, so this process's own threads stay where they are)."""
    out: dict = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            with open(f"/var/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            # Room for every frame a test sends at once (the default drops beyond ~200 KB).
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            sock.bind((ifname, 0))
            out["sock"] = sock
        except BaseException as exc:  # reported in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


def recv_frames(sock: socket.socket, n: int, timeout: float = 10.0) -> list[bytes]:
    """n frames that arrived on the interface (our own transmissions skipped)."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, addr = sock.recvfrom(65536)
        except TimeoutError:
            break
        if addr[2] != PACKET_OUTGOING:
            got.append(data)
    return got


class TapRig:
    """Daemon with sink and source tap:NAME, the TAP moved into a fresh namespace, a packet
    socket on it there."""

    def __init__(self, path: str, features: int, **device) -> None:
        self.name = tap_name()
        self.endpoints = Endpoints()
        self.ns = NetNamespace()
        self.ns.__enter__()
        try:
            self.endpoints.tap(self.name, 1, None)  # the daemon's TAP, as the CLI opens it
            self.ns.move_interface(self.name)
            self.ns.run(["sysctl", "-qw", f"net.ipv6.conf.{self.name}.disable_ipv6=1"])
            self.ns.set_up(self.name)
            self.sock = packet_socket_in(self.ns.name, self.name)
            spec = f"tap:{self.name}"
            self.daemon = Daemon(path, features, sink=spec, source=spec,
                                 endpoints=self.endpoints, **device)
        except BaseException:
            self.close()
            raise

    def close(self) -> dict | None:
        stats = None
        if hasattr(self, "daemon") and not self.daemon.fe.closed:
            stats = self.daemon.close()
        if hasattr(self, "sock"):
            self.sock.close()
        self.endpoints.close()
        self.ns.close()
        return stats


@pytest.fixture
def rig(tmp_path):
    rigs: list[TapRig] = []

    def make(features: int = BASE | MRG | EVENT_IDX, **device) -> TapRig:
        r = TapRig(str(tmp_path / f"net{len(rigs)}.sock"), features, **device)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


@pytest.mark.parametrize("tap_io", ["uring", "writev"])
def test_guest_frames_come_out_of_the_tap_in_order(rig, tap_io):
    r = rig(tap_io=tap_io)
    frames = [frame(i, size) for i, size in enumerate([60, 1514, 200, 999] * 50)]
    r.daemon.send(frames)
    assert recv_frames(r.sock, len(frames)) == frames
    stats = r.close()
    assert stats["tx_packets"] == 200 and stats["tx_dropped"] == 0
    # Every frame went through the TX ring's io_uring, or none did.
    assert stats["tx_tap_uring_writes"] == (200 if tap_io == "uring" else 0)


def test_chains_in_many_pieces_come_out_whole_through_io_uring(rig):
    """Bursts whose chains need more iovecs than the scratch holds (48 pieces x 32 chains >
    1024): the writes prepared so far are submitted, and the rest of the burst goes on."""
    r = rig(tap_io="uring")
    frames = [frame(i, 940) for i in range(96)]
    chains = []
    for f in frames:
        data = bytes(12) + f  # the virtio-net header, then the frame: 952 bytes in 48 pieces
        chains.append(([data[k:k + 20] for k in range(0, len(data), 20)], []))
    driver = r.daemon.fe.driver(1)
    for k in range(0, len(chains), 48):
        driver.add_chains_and_publish(chains[k:k + 48], indirect=True)
        r.daemon.fe.kick(1)
        r.daemon.fe.wait_tx_done(1)
    assert recv_frames(r.sock, len(frames)) == frames
    stats = r.close()
    assert stats["tx_packets"] == 96 and stats["tx_dropped"] == 0
    assert stats["tx_tap_uring_writes"] == 96


@pytest.mark.parametrize("features", [BASE | MRG | EVENT_IDX, BASE | MRG, BASE],
                         ids=["mergeable+event_idx", "mergeable", "non-mergeable"])
def test_frames_sent_into_the_tap_reach_the_guest_in_order(rig, features):
    r = rig(features)
    r.daemon.fe.post_rx_buffers(0, 256, 2048)
    frames = [frame(i, size) for i, size in enumerate([60, 1514, 100, 1400] * 100)]
    received: list[bytes] = []
    for k in range(0, len(frames), 50):  # paced: the TAP's own queue is not under test here
        for f in frames[k:k + 50]:
            r.sock.send(f)
        received = r.daemon.receive(k + 50)
        drv = r.daemon.fe.driver(0)
        r.daemon.fe.post_rx_buffers(0, drv.num_free, 2048)
    assert received == frames
    stats = r.close()
    assert (stats["rx_packets"], stats["rx_dropped"]) == (400, 0)
    assert stats["rx_bytes"] == sum(map(len, frames))


def test_no_rx_buffers_backlog_bound_then_refill(rig):
    r = rig(rx_backlog=16)
    frames = [frame(i, 300) for i in range(60)]
    for f in frames:
        r.sock.send(f)
    wait_until(lambda: r.daemon.stats()["rx_dropped"] == 44, "44 frames dropped")
    r.daemon.fe.post_rx_buffers(0, 64, 2048)
    assert r.daemon.receive(16) == frames[:16]
    time.sleep(0.1)
    assert r.daemon.fe.received_frames(0) == []
    stats = r.close()
    assert (stats["rx_packets"], stats["rx_dropped"]) == (16, 44)


def test_attaches_to_an_existing_tap_and_leaves_it(tmp_path):
    name = tap_name()
    subprocess.run(["ip", "tuntap", "add", "mode", "tap", "name", name], check=True)
    try:
        with Tap(name) as tap:
            assert not tap.created and tap.ifindex is not None
        assert Tap.__name__ and subprocess.run(["ip", "link", "show", name],
                                               capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "tuntap", "del", "mode", "tap", "name", name], check=True)


def test_created_tap_is_up_with_the_mtu_and_gone_after_close():
    name = tap_name()
    with Tap(name, mtu=1400) as tap:
        assert tap.created
        out = subprocess.run(["ip", "-o", "link", "show", name], capture_output=True,
                             text=True, check=True).stdout
        assert "mtu 1400" in out and ",UP" in out
    assert subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0


def test_multi_queue_tap_has_one_fd_per_pair():
    name = tap_name()
    with Tap(name, queues=3) as tap:
        assert len(tap.fds) == 3 and len(set(tap.fds)) == 3
    with pytest.raises(ValueError):
        Tap("x" * 16)
