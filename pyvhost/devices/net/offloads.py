"""virtio-net offloads a TAP lets the device offer, as Linux vhost-net and QEMU offer them.

A TAP opened with IFF_VNET_HDR reads and writes the virtio-net header in front of every frame
(5.1.6), so checksum and segmentation work can be left to whichever side is cheaper:

- TX (the driver's frames, to a TAP sink written straight from guest memory): VIRTIO_NET_F_CSUM
  (partial checksums), HOST_TSO4/6, HOST_ECN, HOST_UFO, HOST_USO. The driver's header goes to
  the TAP as it is; the kernel finishes checksums and segments (or passes whole 64 KiB
  segments on), whatever TUNSETOFFLOAD says (that flag only concerns frames it gives us).
- RX (frames from a TAP source, for the guest): GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN,
  GUEST_UFO, GUEST_USO4/6. Once negotiated, TUNSETOFFLOAD lets the kernel hand us frames with
  partial checksums and GSO frames up to 64 KiB, header filled in; the RX backlog then keeps
  the TAP's header (frame_kernels.R_KEEP_HDR) and has slots of 64 KiB.

Each bit is offered only if the TAP accepts the matching TUNSETOFFLOAD flag. A driver that
negotiates none gets what it got before: complete frames, headers zero, TUNSETOFFLOAD 0.
"""

from __future__ import annotations

from pyvhost.devices.net import tap as T

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56

# Guest (RX) feature -> the TUN_F_* flag that lets the kernel send such frames.
GUEST_TO_TUN = {
    VIRTIO_NET_F_GUEST_CSUM: T.TUN_F_CSUM,
    VIRTIO_NET_F_GUEST_TSO4: T.TUN_F_TSO4,
    VIRTIO_NET_F_GUEST_TSO6: T.TUN_F_TSO6,
    VIRTIO_NET_F_GUEST_ECN: T.TUN_F_TSO_ECN,
    VIRTIO_NET_F_GUEST_UFO: T.TUN_F_UFO,
    VIRTIO_NET_F_GUEST_USO4: T.TUN_F_USO4,
    VIRTIO_NET_F_GUEST_USO6: T.TUN_F_USO6,
}
# Host (TX) feature -> the TUN_F_* flag whose support shows the kernel knows the GSO type.
HOST_TO_TUN = {
    VIRTIO_NET_F_CSUM: T.TUN_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4: T.TUN_F_TSO4,
    VIRTIO_NET_F_HOST_TSO6: T.TUN_F_TSO6,
    VIRTIO_NET_F_HOST_ECN: T.TUN_F_TSO_ECN,
    VIRTIO_NET_F_HOST_UFO: T.TUN_F_UFO,
    VIRTIO_NET_F_HOST_USO: T.TUN_F_USO4,
}
# Guest features that bring frames larger than the MTU (GSO).
GSO_GUEST_MASK = (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6) | (
    1 << VIRTIO_NET_F_GUEST_UFO) | (1 << VIRTIO_NET_F_GUEST_USO4) | (1 << VIRTIO_NET_F_GUEST_USO6)
# The largest GSO frame a TAP hands over (64 KiB, as gso_max_size) plus an Ethernet header
# with a VLAN tag.
GSO_FRAME_MAX = 65536 + 18


def offered(tx_tap: T.Tap | None, rx_tap: T.Tap | None) -> int:
    """The offload feature bits to offer: TX ones for a TAP the TX side writes straight to,
    RX ones for a TAP source; each only if that TAP supports its flag."""
    bits = 0
    if tx_tap is not None:
        bits |= sum(1 << f for f, flag in HOST_TO_TUN.items() if tx_tap.offloads & flag)
    if rx_tap is not None:
        bits |= sum(1 << f for f, flag in GUEST_TO_TUN.items() if rx_tap.offloads & flag)
    return bits


def tun_flags(features: int) -> int:
    """TUNSETOFFLOAD flags for the negotiated guest features (none without GUEST_CSUM: the
    kernel requires TUN_F_CSUM for every other flag, and so does virtio, 5.1.3.1)."""
    if not features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0
    return sum(flag for f, flag in GUEST_TO_TUN.items() if features >> f & 1)
