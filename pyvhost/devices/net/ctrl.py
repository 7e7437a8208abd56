"""The virtio-net control virtqueue (virtio 1.x 5.1.6.5), device side.

A command is one chain: device-readable `struct virtio_net_ctrl { u8 class; u8 command;
u8 data[]; }`, then one device-writable byte the device sets to VIRTIO_NET_OK or
VIRTIO_NET_ERR. Commands are rare (a Linux guest sends a handful when its interface comes up
or changes filters), so the queue is served through the device API (`Device.handle`), not a
compiled kernel; a bad chain or a failure here breaks this queue only.

What is accepted (each only when its feature bit was negotiated, as 5.1.6.5 ties them):

| class | command | feature | effect |
|---|---|---|---|
| RX (0) | PROMISC, ALLMULTI (one byte, 0/1) | CTRL_RX | recorded |
| MAC (1) | TABLE_SET (two `u32 n; u8 macs[n][6]` tables) | CTRL_RX | recorded |
| MAC (1) | ADDR_SET (6 bytes) | CTRL_MAC_ADDR | becomes the device MAC |
| ANNOUNCE (3) | ACK | GUEST_ANNOUNCE | counted |
| MQ (4) | VQ_PAIRS_SET (u16 in 1..max pairs) | MQ | recorded |

Everything else, malformed data and out-of-range values are answered VIRTIO_NET_ERR. RX mode
and the MAC tables are kept (and shown in statistics) but not applied as filters: the device
delivers every frame, which 5.1.6.5.1 allows ("the device MAY deliver packets not matching").
A chain with no writable byte cannot be acknowledged: it is completed with length 0, counted
as an error. Nothing a guest sends here can break the queue beyond what the ring layer checks.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvhost.device import Request

log = logging.getLogger(__name__)

# Feature bits these commands depend on (5.1.3).
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

# Ack values.
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

# Classes and commands (5.1.6.5).
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_VLAN = 2
CTRL_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_MQ_VQ_PAIRS_MIN = 1
CTRL_MQ_VQ_PAIRS_MAX = 0x8000

# A command carries at most two MAC tables; bound what is read from the guest.
MAX_COMMAND_BYTES = 64 * 1024


@dataclass
class CtrlState:
    """What the driver asked for through the control queue."""

    promisc: bool = False
    allmulti: bool = False
    unicast_macs: list[bytes] = field(default_factory=list)
    multicast_macs: list[bytes] = field(default_factory=list)
    queue_pairs: int = 1
    announce_acks: int = 0
    commands: int = 0
    errors: int = 0


class ControlQueue:
    """Handles the control queue of one NetDevice. `mac_changed(mac)` is called on ADDR_SET."""

    def __init__(self, max_queue_pairs: int, mac_changed=None) -> None:
        self.max_queue_pairs = max_queue_pairs
        self._mac_changed = mac_changed
        self.features = 0
        self.state = CtrlState()

    def reset(self) -> None:
        self.state = CtrlState()

    def serve(self, request: Request) -> int:
        """Answer one command (a request of the device API); returns the used length."""
        if request.readable_size > MAX_COMMAND_BYTES:
            ack = self._error("command of %d bytes is too long", request.readable_size)
        else:
            ack = self.handle(request.read())
        if request.writable_size == 0:
            self._error("command chain has no writable ack byte")
            return 0
        return request.write(bytes([ack]))

    # -- commands ----------------------------------------------------------------------------

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def handle(self, command: bytes) -> int:
        """One command's readable bytes in; the ack byte out."""
        self.state.commands += 1
        if len(command) < 2:
            return self._error("command of %d bytes has no class and command", len(command))
        cls, cmd, data = command[0], command[1], command[2:]
        if cls == CTRL_RX and self.has(VIRTIO_NET_F_CTRL_RX):
            return self._rx_mode(cmd, data)
        if cls == CTRL_MAC and cmd == CTRL_MAC_TABLE_SET and self.has(VIRTIO_NET_F_CTRL_RX):
            return self._mac_table(data)
        if cls == CTRL_MAC and cmd == CTRL_MAC_ADDR_SET and self.has(VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != 6:
                return self._error("MAC_ADDR_SET with %d bytes", len(data))
            if self._mac_changed is not None:
                self._mac_changed(bytes(data))
            return VIRTIO_NET_OK
        if cls == CTRL_ANNOUNCE and cmd == CTRL_ANNOUNCE_ACK and self.has(
                VIRTIO_NET_F_GUEST_ANNOUNCE):
            self.state.announce_acks += 1
            return VIRTIO_NET_OK
        if cls == CTRL_MQ and cmd == CTRL_MQ_VQ_PAIRS_SET and self.has(VIRTIO_NET_F_MQ):
            if len(data) != 2:
                return self._error("VQ_PAIRS_SET with %d bytes", len(data))
            (pairs,) = struct.unpack("<H", data)
            if not CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.max_queue_pairs:
                return self._error("VQ_PAIRS_SET %d outside 1..%d", pairs, self.max_queue_pairs)
            self.state.queue_pairs = pairs
            return VIRTIO_NET_OK
        return self._error("class %d command %d not supported (features 0x%x)", cls, cmd,
                           self.features)

    def _rx_mode(self, cmd: int, data: bytes) -> int:
        if cmd not in (CTRL_RX_PROMISC, CTRL_RX_ALLMULTI):
            return self._error("RX command %d not supported", cmd)
        if len(data) != 1:
            return self._error("RX command %d with %d bytes", cmd, len(data))
        on = bool(data[0])
        if cmd == CTRL_RX_PROMISC:
            self.state.promisc = on
        else:
            self.state.allmulti = on
        return VIRTIO_NET_OK

    def _mac_table(self, data: bytes) -> int:
        tables: list[list[bytes]] = []
        pos = 0
        for _ in range(2):  # unicast, then multicast (5.1.6.5.2)
            if pos + 4 > len(data):
                return self._error("MAC table truncated at byte %d", pos)
            (n,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if n > (len(data) - pos) // 6:
                return self._error("MAC table claims %d entries", n)
            tables.append([bytes(data[pos + 6 * i:pos + 6 * i + 6]) for i in range(n)])
            pos += 6 * n
        if pos != len(data):
            return self._error("MAC table command has %d trailing bytes", len(data) - pos)
        self.state.unicast_macs, self.state.multicast_macs = tables
        return VIRTIO_NET_OK

    def _error(self, fmt: str, *args: Any) -> int:
        self.state.errors += 1
        log.warning("control queue: " + fmt, *args)
        return VIRTIO_NET_ERR

    def stats(self) -> dict[str, Any]:
        # Counters only: the server sums statistics over connections.
        return {"ctrl_commands": self.state.commands, "ctrl_errors": self.state.errors}
