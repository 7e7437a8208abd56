"""The virtio-net control queue and the features around it, through the real daemon.

A Python vhost-user front-end (pyvhost.testing.frontend) negotiates the control-queue features,
sets up queue 2N (the last queue) and sends commands the way Linux's virtio_net does (class and
command in one descriptor, data in the next, the ack byte in a writable third), then reads the
ack the device wrote. Each test also checks the device state the command changed.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

from pyvhost.daemon.server import Server
from pyvhost.devices.net import ctrl as C
from pyvhost.devices.net.device import (VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
                                 VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
                                 NetDevice)
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam

MiB = 1 << 20
DEADLINE = 10.0
CTRL_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_CTRL_VQ)
                 | (1 << C.VIRTIO_NET_F_CTRL_RX) | (1 << C.VIRTIO_NET_F_CTRL_MAC_ADDR)
                 | (1 << C.VIRTIO_NET_F_GUEST_ANNOUNCE) | (1 << VIRTIO_NET_F_MQ)
                 | (1 << VIRTIO_RING_F_EVENT_IDX))
PROTOCOL = P.REPLY_ACK.mask | P.MQ.mask | P.CONFIG.mask | P.CONFIGURE_MEM_SLOTS.mask
OK, ERR = bytes([C.VIRTIO_NET_OK]), bytes([C.VIRTIO_NET_ERR])


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile the kernels before any daemon runs (a first burst would take seconds)."""
    from pyvhost.devices.net.endpoints import warm_up
    warm_up()


class Session:
    """A daemon serving NetDevice(pairs) on a thread, and a front-end with RAM set up."""

    def __init__(self, path: str, pairs: int, features: int = CTRL_FEATURES, **device) -> None:
        self.server = Server(lambda: NetDevice(pairs, **device), path, max_connections=1)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.ram = GuestRam([(0, 4 * MiB)])
        self.fe = VhostUserFrontend(path)
        self.negotiated = self.fe.negotiate(features, PROTOCOL)
        self.fe.set_mem_table(self.ram)
        self.ctrl_index = 2 * pairs

    @property
    def device(self) -> NetDevice:
        backend = self.server.current
        assert backend is not None
        return backend.device  # type: ignore[return-value]

    def start_ctrl(self, size: int = 64) -> None:
        event_idx = bool(self.negotiated.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.fe.setup_queue(self.ctrl_index, MockSplitQueue(self.ram, size, event_idx=event_idx))
        self.fe.enable_queue(self.ctrl_index)

    def command(self, readable: list[bytes], writable: tuple[int, ...] = (1,)) -> tuple[int, bytes]:
        """One command chain; (used length, bytes the device wrote)."""
        d = self.fe.driver(self.ctrl_index)
        head = d.add_chain(readable, list(writable))
        d.publish()
        if d.needs_kick():
            self.fe.kick(self.ctrl_index)
        deadline = time.monotonic() + DEADLINE
        while d.used_idx() == d.last_used:
            assert time.monotonic() < deadline, "no answer on the control queue"
            time.sleep(0.001)
        ((got_head, length),) = d.used()
        assert got_head == head
        return length, d.written_data(head)

    def close(self) -> None:
        self.fe.close()
        self.thread.join(DEADLINE)
        self.ram.close()
        assert not self.thread.is_alive()


@pytest.fixture
def session(tmp_path) -> Iterator[Session]:
    s = Session(str(tmp_path / "net.sock"), pairs=2)
    try:
        yield s
    finally:
        s.close()


def cmd(cls: int, command: int, data: bytes = b"") -> list[bytes]:
    """As Linux's virtnet_send_command lays it out: header, then data in its own buffer."""
    return [bytes([cls, command])] + ([data] if data else [])


def mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    return (struct.pack("<I", len(unicast)) + b"".join(unicast)
            + struct.pack("<I", len(multicast)) + b"".join(multicast))


def test_features_queues_and_config(session):
    got = session.negotiated
    assert got.features & CTRL_FEATURES == CTRL_FEATURES  # every control feature offered
    assert got.queue_num == 5  # two pairs and the control queue
    config = session.fe.get_config(0, 12)
    mac, status, pairs, mtu = struct.unpack("<6sHHH", config)
    assert (mac, status, pairs, mtu) == (NetDevice().mac, 1, 2, 1500)


def test_linux_boot_commands_are_acknowledged(session):
    session.start_ctrl()
    # What virtio_net sends when eth0 comes up and its filters are programmed.
    assert session.command(cmd(C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2))) == (1, OK)
    assert session.command(cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x00")) == (1, OK)
    assert session.command(cmd(C.CTRL_RX, C.CTRL_RX_ALLMULTI, b"\x01")) == (1, OK)
    multicast = [b"\x33\x33\x00\x00\x00\x01", b"\x01\x00\x5e\x00\x00\x01"]
    assert session.command(cmd(C.CTRL_MAC, C.CTRL_MAC_TABLE_SET,
                               mac_table([], multicast))) == (1, OK)
    assert session.command(cmd(C.CTRL_ANNOUNCE, C.CTRL_ANNOUNCE_ACK)) == (1, OK)
    state = session.device.ctrl.state
    assert (state.promisc, state.allmulti, state.queue_pairs) == (False, True, 2)
    assert state.multicast_macs == multicast and state.unicast_macs == []
    assert state.announce_acks == 1 and state.errors == 0


def test_mac_addr_set_changes_the_config_mac(session):
    session.start_ctrl()
    new = b"\x02\x00\x00\xaa\xbb\xcc"
    assert session.command(cmd(C.CTRL_MAC, C.CTRL_MAC_ADDR_SET, new)) == (1, OK)
    assert session.fe.get_config(0, 6) == new


def test_whole_command_in_one_descriptor(session):
    session.start_ctrl()
    assert session.command([bytes([C.CTRL_RX, C.CTRL_RX_PROMISC, 1])]) == (1, OK)
    assert session.device.ctrl.state.promisc


@pytest.mark.parametrize("readable", [
    cmd(C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 3)),   # more pairs than exist
    cmd(C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)),
    cmd(C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET, b"\x01"),                 # short
    cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01\x01"),                  # long
    cmd(C.CTRL_RX, 2, b"\x01"),                                      # ALLUNI: not offered
    cmd(C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, struct.pack("<I", 5) + bytes(6)),  # lies about n
    cmd(C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, mac_table([], []) + b"x"),          # trailing byte
    cmd(C.CTRL_MAC, C.CTRL_MAC_ADDR_SET, bytes(5)),
    cmd(C.CTRL_VLAN, 0, b"\x01\x00"),                                # CTRL_VLAN not offered
    cmd(99, 0),
    [b"\x00"],                                                       # no command byte
])
def test_bad_commands_get_err_and_change_nothing(session, readable):
    session.start_ctrl()
    before = session.device.ctrl.state
    assert session.command(readable) == (1, ERR)
    after = session.device.ctrl.state
    assert after.errors == 1
    assert (after.promisc, after.queue_pairs, after.multicast_macs) == (
        before.promisc, before.queue_pairs, before.multicast_macs)
    assert session.fe.get_config(0, 6) == NetDevice().mac
    # The queue goes on serving.
    assert session.command(cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01")) == (1, OK)


def test_chain_without_ack_byte_is_returned_empty(session):
    session.start_ctrl()
    assert session.command(cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01"), writable=()) == (0, b"")
    assert session.device.ctrl.state.errors == 1
    assert session.command(cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01")) == (1, OK)


def test_commands_need_their_features(tmp_path):
    """Without CTRL_RX negotiated, RX-mode commands are refused (5.1.6.5.1)."""
    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_CTRL_VQ)
    s = Session(str(tmp_path / "net.sock"), pairs=1, features=features)
    try:
        assert s.negotiated.queue_num == 3
        s.start_ctrl()
        assert s.command(cmd(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01")) == (1, ERR)
        assert s.command(cmd(C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET, b"\x01\x00")) == (1, ERR)
        assert s.command(cmd(C.CTRL_ANNOUNCE, C.CTRL_ANNOUNCE_ACK)) == (1, ERR)
    finally:
        s.close()


def test_one_pair_offers_no_mq_and_mtu_only_when_given(tmp_path):
    assert not NetDevice(1).device_features >> VIRTIO_NET_F_MQ & 1
    assert not NetDevice(1).device_features >> VIRTIO_NET_F_MTU & 1
    dev = NetDevice(1, mtu=9000)
    assert dev.device_features >> VIRTIO_NET_F_MTU & 1
    assert struct.unpack("<H", dev.get_config(10, 2)) == (9000,)
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF):
        assert dev.device_features >> bit & 1
    with pytest.raises(ValueError):
        NetDevice(1, mtu=20)


@pytest.mark.parametrize("hostile", ["loop", "unmapped", "avail_jump"])
def test_hostile_control_chain_breaks_only_the_control_queue(tmp_path, hostile):
    """A hostile chain on the control queue stops that queue (NEEDS_RESET, reported); the TX
    queue served by the same worker goes on forwarding frames."""
    s = Session(str(tmp_path / "net.sock"), pairs=1, features=CTRL_FEATURES)
    try:
        s.start_ctrl()
        tx = MockSplitQueue(s.ram, 64, event_idx=True)
        s.fe.setup_queue(1, tx)
        s.fe.enable_queue(1)
        assert len(s.server.current.workers) == 1  # both rings on one worker
        d = s.fe.driver(s.ctrl_index)
        if hostile == "loop":
            d.write_raw_desc(0, s.ram.alloc(16), 16, 1, 1)
            d.write_raw_desc(1, s.ram.alloc(16), 16, 1, 0)
            d.add_raw_head(0)
            d.publish()
        elif hostile == "unmapped":
            d.write_raw_desc(0, 1 << 45, 2, 0, 0)
            d.add_raw_head(0)
            d.publish()
        else:
            d.write_raw_avail_idx(d.size + 7)
        s.fe.kick(s.ctrl_index)
        deadline = time.monotonic() + 60
        while s.server.current.queues_broken == 0:
            assert time.monotonic() < deadline, "the control queue did not break"
            time.sleep(0.005)
        assert s.fe.get_status() & 0x40  # DEVICE_NEEDS_RESET
        assert not s.server.current.vrings[s.ctrl_index].running
        frames = [bytes(range(60))] * 100
        s.fe.send_frames(1, frames)
        s.fe.wait_tx_done(1)
        assert s.device.stats()["tx_packets"] == 100
        assert all(w.alive for w in s.server.current.workers)
    finally:
        s.close()
