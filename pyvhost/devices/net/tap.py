"""TAP interfaces for the virtio-net device: one fd per queue pair, virtio-net headers on.

`Tap(name, queues)` opens /dev/net/tun and attaches to the TAP `name` with TUNSETIFF
(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus IFF_MULTI_QUEUE and one fd per queue when there are
several), creating it when absent. TUNSETVNETHDRSZ 12 makes every read and write carry the
12-byte `virtio_net_hdr_mrg_rxbuf`, the header a VERSION_1 driver puts before each frame, so
guest frames go to the TAP as they are, and frames come back with a header slot to fill in.
Offloads: at open, `offloads` records which TUNSETOFFLOAD flags the kernel accepts (checksum,
TSO4/6, ECN, UFO, USO4/6), then none are enabled (TUNSETOFFLOAD 0: the kernel checksums and
segments everything before it reaches us). `set_offload(flags)` enables some on every queue,
as QEMU's vhost-net does from the guest's negotiated GUEST_* features; frames written to the
TAP may carry GSO and checksum requests in their virtio-net header whatever is enabled.

Link state goes through pyroute2 (rtnetlink): a TAP we created is set to the requested MTU and
brought up; one that existed is left as its owner configured it. The fds are non-blocking.
A TAP we created disappears when its last fd closes (it is not made persistent).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from pyvhost.fd import OwnedFd

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
VNET_HDR_SIZE = 12


class TapError(OSError):
    """The TAP could not be opened or configured."""


class Tap:
    """A TAP interface: `fds[k]` serves queue pair k. A context manager; close() is idempotent."""

    def __init__(self, name: str, queues: int = 1, mtu: int | None = None) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise ValueError(f"bad interface name {name!r} (1..15 bytes, no '/')")
        if queues < 1:
            raise ValueError("a TAP needs at least one queue")
        self.name = name
        self.queues = queues
        self._fds: list[OwnedFd] = []  # closed on close(), or when dropped (OwnedFd.__del__)
        self._numbers: list[int] = []
        existed = _link_index(name) is not None
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                self._fds.append(OwnedFd(_open_queue(name, flags)))
            self._numbers = [fd.fileno() for fd in self._fds]
            self.offloads = _probe_offloads(self._numbers[0])
            self.created = not existed
            if self.created:
                _configure(name, mtu)
        except BaseException:
            self.close()
            raise
        log.info("TAP %s: %s, %d queue%s", name, "created" if self.created else "attached",
                 queues, "s" if queues > 1 else "")

    @property
    def fds(self) -> list[int]:
        """fds[k] serves queue pair k (non-blocking); empty once closed."""
        return self._numbers

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD on every queue (flags the kernel may leave to us: TUN_F_*)."""
        for fd in self._numbers:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)

    @property
    def ifindex(self) -> int | None:
        return _link_index(self.name)

    def close(self) -> None:
        fds, self._fds, self._numbers = self._fds, [], []
        for fd in fds:
            fd.close()

    @property
    def closed(self) -> bool:
        return not self._fds

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fds={self.fds})"


def _open_queue(name: str, flags: int) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(exc.errno, f"cannot open {TUN_PATH}: {exc.strerror}") from exc
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            hint = (" (it exists with other flags, e.g. multi-queue or TUN)"
                    if exc.errno == errno.EINVAL else "")
            raise TapError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}{hint}") from exc
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _probe_offloads(fd: int) -> int:
    """The TUN_F_* flags TUNSETOFFLOAD accepts (USO needs Linux 6.2), left disabled."""
    supported = 0
    for flags in (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
                  | TUN_F_USO4 | TUN_F_USO6,
                  TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
                  TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, TUN_F_CSUM):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        supported = flags
        break
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return supported


def _link_index(name: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _configure(name: str, mtu: int | None) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        ipr.link("set", index=index, state="up")
