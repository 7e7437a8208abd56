"""The generator RX source (`--source gen:SIZE`): the guest receives the same well-formed UDP
frame in every buffer it posts, and nothing when it posts none.

Through the real daemon and the Python front-end: every frame arrives whole (scapy parses it,
the IPv4 checksum holds), exactly as many as the guest had buffers for (mergeable and not,
EVENT_IDX or not, direct map and copy path, interrupt-driven and busy-poll), a refill after
the ring ran dry is served (the kick wakes the worker), and sizes that cannot be sent are
refused up front.
"""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyvhost.daemon.backend import BackendOptions
from pyvhost.devices.net.device import NetDevice
from pyvhost.devices.net.endpoints import GEN_MIN_SIZE, generated_frame, parse_endpoint, SOURCE_KINDS
from test_net_rx import BASE, EVENT_IDX, MRG, _compiled, make  # noqa: F401 (fixtures)


def test_generated_frame_is_a_valid_udp_datagram_of_the_asked_size():
    for size in (GEN_MIN_SIZE, 60, 64, 1514):
        raw = generated_frame(size)
        assert len(raw) == size
        pkt = Ether(raw)
        assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.type == 0x0800
        ip = pkt[IP]
        assert (ip.src, ip.dst, ip.len, ip.ttl) == ("198.18.0.1", "198.18.0.2", size - 14, 64)
        rebuilt = IP(bytes(ip))
        del rebuilt.chksum
        assert IP(bytes(rebuilt)).chksum == ip.chksum  # the checksum we wrote is the right one
        assert (pkt[UDP].dport, pkt[UDP].len) == (9, size - 34)


@pytest.mark.parametrize("spec", ["gen", "gen:", "gen:41", "gen:abc", "gen:-64"])
def test_bad_generator_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_endpoint(spec, SOURCE_KINDS)


def test_a_frame_larger_than_the_mtu_allows_is_refused():
    NetDevice(1, source="gen:1518")  # default MTU 1500: 1500 + 18 fits
    with pytest.raises(ValueError, match="larger than the MTU"):
        NetDevice(1, source="gen:1519")
    NetDevice(1, source="gen:9018", mtu=9000)


@pytest.mark.parametrize("features,options", [
    (BASE | MRG | EVENT_IDX, BackendOptions()),
    (BASE | MRG, BackendOptions(metadata_access="copy")),
    (BASE, BackendOptions(poll=True)),
    (BASE | EVENT_IDX, BackendOptions(poll=True, metadata_access="copy")),
], ids=["mergeable+event_idx", "mergeable-copy", "plain-poll", "event_idx-poll-copy"])
def test_every_posted_buffer_gets_one_frame_and_no_more(make, features, options):
    d = make(features, source="gen:64", options=options)
    expected = generated_frame(64)
    total = 0
    for posted in (100, 256, 7, 256):  # the ring runs dry after each refill
        d.fe.post_rx_buffers(0, posted, 2048)
        total += posted
        got = d.receive(total, "generated frames")
        time.sleep(0.05)  # nothing beyond the buffers posted
        got += d.fe.received_frames(0)
        assert len(got) == total
    assert set(got) == {expected}
    s = d.close()
    assert (s["rx_packets"], s["rx_bytes"]) == (total, 64 * total)
    assert (s["rx_dropped"], s["queues_broken"]) == (0, 0)
    if options.metadata_access == "copy":
        assert s["direct_rounds"] == 0


def test_frames_larger_than_one_buffer_span_mergeable_buffers(make):
    d = make(BASE | MRG | EVENT_IDX, source="gen:1514")
    d.fe.post_rx_buffers(0, 240, 256)  # 1526 bytes with the header: 6 buffers a frame
    assert d.receive(40) == [generated_frame(1514)] * 40
    s = d.close()
    assert (s["rx_packets"], s["rx_dropped"], s["queues_broken"]) == (40, 0, 0)
