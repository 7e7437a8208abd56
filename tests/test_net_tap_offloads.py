"""Offloads through a TAP (devices/net/offloads.py), with the real daemon and the Python
front-end, the TAP in a namespace of the test's own (the rig of test_net_tap).

- TX: a driver that negotiated CSUM and HOST_TSO4 hands over one 20 KB TCP segment with a
  GSO header; it must leave the TAP whole (one frame, the bytes as sent: the kernel segments
  it later, if at all).
- RX: a GSO TCP segment sent into the TAP from its namespace (a packet socket with
  PACKET_VNET_HDR) reaches a driver that negotiated GUEST_CSUM and GUEST_TSO4 as one frame with
  the GSO header filled in, over many mergeable buffers, and one without MRG_RXBUF in one big
  buffer; a driver that negotiated none gets it segmented by the kernel into MTU frames with
  zero headers, the payload whole.
"""

from __future__ import annotations

import struct

import pytest

from pyvhost.devices.net import offloads as OFF
from test_net_rx import BASE, EVENT_IDX, MRG
from test_net_tap import _compiled, recv_frames, rig  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

SOL_PACKET = 263
PACKET_VNET_HDR = 15
NEEDS_CSUM = 1
GSO_TCPV4 = 1
MSS = 1448
PAYLOAD = 20000

CSUM_TSO4 = (1 << OFF.VIRTIO_NET_F_CSUM) | (1 << OFF.VIRTIO_NET_F_HOST_TSO4)
GUEST_TSO4 = (1 << OFF.VIRTIO_NET_F_GUEST_CSUM) | (1 << OFF.VIRTIO_NET_F_GUEST_TSO4)


def tcp_segment(payload_len: int) -> bytes:
    """Ethernet + IPv4 + TCP (no options) + payload: one large segment a GSO header splits."""
    payload = bytes((k * 7) & 0xFF for k in range(payload_len))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload_len, 1, 0x4000, 64, 6, 0,
                     b"\xc0\x00\x02\x01", b"\xc0\x00\x02\x02")
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    # Checksum field: the pseudo-header sum, as a NEEDS_CSUM sender leaves it (5.1.6.2).
    pseudo = _sum16(b"\xc0\x00\x02\x01\xc0\x00\x02\x02" + struct.pack("!HH", 6, 20 + payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    eth = b"\x52\x54\x00\x00\x00\x02" + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00"
    return eth + ip + tcp + payload


def gso_header(num_buffers: bool = True) -> bytes:
    """virtio_net_hdr for tcp_segment: checksum from byte 34 (+16), TCPv4 segments of MSS."""
    hdr = struct.pack("<BBHHHH", NEEDS_CSUM, GSO_TCPV4, 54, MSS, 34, 16)
    return hdr + (b"\x00\x00" if num_buffers else b"")


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _csum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def test_a_tap_lets_the_device_offer_offloads(rig):  # noqa: F811
    r = rig(BASE | MRG | CSUM_TSO4 | GUEST_TSO4)
    assert r.daemon.features & (CSUM_TSO4 | GUEST_TSO4) == CSUM_TSO4 | GUEST_TSO4
    assert r.endpoints.taps[r.name].offloads & OFF.GUEST_TO_TUN[OFF.VIRTIO_NET_F_GUEST_TSO4]
    r.close()


def test_tx_gso_segment_leaves_the_tap_whole(rig):  # noqa: F811
    r = rig(BASE | MRG | EVENT_IDX | CSUM_TSO4)
    big = tcp_segment(PAYLOAD)
    r.daemon.fe.send_frames(1, [big], header=gso_header())
    r.daemon.fe.wait_tx_done(1)
    got = recv_frames(r.sock, 1)
    assert got == [big]
    stats = r.close()
    assert stats["tx_packets"] == 1 and stats["tx_dropped"] == 0
    assert stats["tx_bytes"] == len(big)


def _inject(r, frame: bytes) -> None:
    """Send `frame` into the TAP from its namespace with a GSO header (PACKET_VNET_HDR)."""
    s = r.sock
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        s.send(gso_header(num_buffers=False) + frame)
    finally:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 0)


def _receive(r, n: int) -> list[tuple[bytes, bytes]]:
    from test_net_rx import wait_until
    got: list[tuple[bytes, bytes]] = []

    def arrived() -> bool:
        got.extend(r.daemon.fe.received_frames_with_headers(0))
        return len(got) >= n
    wait_until(arrived, f"{n} frames (have {len(got)})")
    return got


@pytest.mark.parametrize("features,buffer", [(BASE | MRG | EVENT_IDX, 2048), (BASE, 65600)],
                         ids=["mergeable", "big-buffers"])
def test_rx_gso_segment_reaches_the_guest_whole_with_its_header(rig, features, buffer):  # noqa: F811
    r = rig(features | GUEST_TSO4)
    r.daemon.fe.post_rx_buffers(0, 32 if buffer > 4096 else 128, buffer)
    big = tcp_segment(PAYLOAD)
    _inject(r, big)
    [(header, frame)] = _receive(r, 1)
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "<BBHHHH", header)
    assert (gso_type & 0x7F, gso_size) == (GSO_TCPV4, MSS)
    assert flags & NEEDS_CSUM and (csum_start, csum_offset) == (34, 16)
    assert frame[:24] == big[:24] and frame[26:] == big[26:]  # the IP ID/checksum may change
    stats = r.close()
    assert stats["rx_packets"] == 1 and stats["rx_dropped"] == 0


def test_rx_without_offloads_gets_mtu_frames_and_zero_headers(rig):  # noqa: F811
    r = rig(BASE | MRG | EVENT_IDX)
    assert not r.daemon.features & GUEST_TSO4
    r.daemon.fe.post_rx_buffers(0, 128, 2048)
    big = tcp_segment(PAYLOAD)
    _inject(r, big)
    n = -(-PAYLOAD // MSS)
    got = _receive(r, n)
    assert all(header[:10] == bytes(10) for header, _ in got)
    assert all(len(frame) <= 1514 for _, frame in got)
    assert b"".join(frame[54:] for _, frame in got) == big[54:]
    r.close()


def test_offloads_are_not_offered_without_a_tap_to_take_them():
    from pyvhost.devices.net.device import NetDevice
    d = NetDevice(1, source="loopback")
    assert not d.device_features & (CSUM_TSO4 | GUEST_TSO4)
    d.io.close()

