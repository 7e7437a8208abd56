"""Message payloads ("Message Specification" > "Payload") and the `Message` that carries them.

Every payload is a small frozen dataclass that knows its wire layout: `encode()`, `decode()`
and `size_ok(size)` for the payload sizes the wire allows. Layouts are native-endian in the
spec; pyvhost runs on little-endian hosts (x86, arm64) only, so formats say `<` explicitly.
Struct sizes are the C `sizeof`, trailing padding included (QEMU sends `sizeof(payload.x)`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, fields
from typing import ClassVar, Self

from pyvhost.fd import OwnedFd, close_all

from .constants import (
    MAX_CONFIG_SIZE,
    NEED_REPLY,
    REPLY,
    VERSION_MASK,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
)
from .errors import BadPayload, LocalProtocolError

# Opaque payloads (crypto sessions) are capped well above QEMU's largest union member (~1.1 KiB).
MAX_RAW_SIZE = 4096


class Payload:
    """Base: a fixed-size payload packed field by field with `_STRUCT`."""

    __slots__ = ()
    _STRUCT: ClassVar[struct.Struct]

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._STRUCT.size

    @classmethod
    def max_size(cls) -> int:
        return cls._STRUCT.size

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*cls._STRUCT.unpack(data))

    def encode(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        return _pack(self._STRUCT, *values)


def _pack(layout: struct.Struct, *values: object) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:  # a field out of range is our caller's mistake
        raise LocalProtocolError(f"cannot encode payload: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload ("N/A" in the spec)."""

    _STRUCT: ClassVar = struct.Struct("")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls()


EMPTY = Empty()


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single 64-bit integer."""

    value: int
    _STRUCT: ClassVar = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """A vring state description: `struct vhost_vring_state {u32 index; u32 num}`."""

    index: int
    num: int
    _STRUCT: ClassVar = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """A vring address description: `struct vhost_vring_addr`.

    The spec's table shows a "size" column that the C struct does not have: the wire is
    index, flags, desc, used, avail, log (40 bytes). Ring addresses are front-end user
    addresses (IOVAs with VIRTIO_F_IOMMU_PLATFORM); `log` is a guest-physical address.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    _STRUCT: ClassVar = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc(Payload):
    """Memory region description (without the XEN_MMAP extension)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _STRUCT: ClassVar = struct.Struct("<QQQQ")


_REGION_SIZE = MemoryRegionDesc._STRUCT.size


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """Multiple memory regions description: `{u32 nregions, u32 padding, region[8]}`.

    QEMU and DPDK send only the regions in use (8 + 32 * nregions bytes); older senders send
    the whole C struct (8 + 32 * 8). Both are accepted; we send the short form.
    """

    regions: tuple[MemoryRegionDesc, ...]
    _STRUCT: ClassVar = struct.Struct("<II")
    FULL_SIZE: ClassVar = 8 + _REGION_SIZE * VHOST_MEMORY_BASELINE_NREGIONS

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return 8 <= size <= cls.FULL_SIZE and (size - 8) % _REGION_SIZE == 0

    @classmethod
    def max_size(cls) -> int:
        return cls.FULL_SIZE

    @classmethod
    def decode(cls, data: bytes) -> Self:
        nregions, _padding = cls._STRUCT.unpack_from(data)
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise BadPayload(f"memory table has {nregions} regions, at most 8 allowed")
        if len(data) not in (8 + _REGION_SIZE * nregions, cls.FULL_SIZE):
            raise BadPayload(f"memory table of {len(data)} bytes for {nregions} regions")
        return cls(tuple(_decode_regions(data[8:], nregions)))

    def encode(self) -> bytes:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise LocalProtocolError(f"{len(self.regions)} regions; SET_MEM_TABLE carries 8")
        head = _pack(self._STRUCT, len(self.regions), 0)
        return head + b"".join(r.encode() for r in self.regions)


def _decode_regions(data: bytes, count: int) -> list[MemoryRegionDesc]:
    return [
        MemoryRegionDesc.decode(data[i * _REGION_SIZE : (i + 1) * _REGION_SIZE])
        for i in range(count)
    ]


@dataclass(frozen=True, slots=True)
class SingleMemRegion(Payload):
    """Single memory region description (ADD/REM_MEM_REG): `{u64 padding, region}`."""

    region: MemoryRegionDesc
    _STRUCT: ClassVar = struct.Struct("<Q")
    SIZE: ClassVar = 8 + _REGION_SIZE

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls.SIZE

    @classmethod
    def max_size(cls) -> int:
        return cls.SIZE

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(MemoryRegionDesc.decode(data[8:]))

    def encode(self) -> bytes:
        return _pack(self._STRUCT, 0) + self.region.encode()


@dataclass(frozen=True, slots=True)
class LogDesc(Payload):
    """Log description `{u64 mmap_size, u64 mmap_offset}` (SET_LOG_BASE).

    The spec's SET_LOG_BASE entry says "u64", but QEMU, DPDK and rust-vmm all use this
    16-byte VhostUserLog.
    """

    mmap_size: int
    mmap_offset: int
    _STRUCT: ClassVar = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class IotlbMsg(Payload):
    """`struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type}`.

    The C struct is 8-byte aligned, so sizeof is 32 (26 bytes of fields + 6 of padding);
    QEMU sends sizeof(msg.payload.iotlb).
    """

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    _STRUCT: ClassVar = struct.Struct("<QQQBB6x")


@dataclass(frozen=True, slots=True)
class ConfigSpace(Payload):
    """Virtio device config space `{u32 offset, u32 size, u32 flags, u8 payload[size]}`.

    The header's payload size must be 12 + size (QEMU sends exactly that); size <= 256.
    """

    offset: int
    size: int
    flags: int
    payload: bytes
    _STRUCT: ClassVar = struct.Struct("<III")

    def __post_init__(self) -> None:
        if self.size != len(self.payload):
            raise ValueError(f"config size {self.size} != len(payload) {len(self.payload)}")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return cls._STRUCT.size <= size <= cls.max_size()

    @classmethod
    def max_size(cls) -> int:
        return cls._STRUCT.size + MAX_CONFIG_SIZE

    @classmethod
    def decode(cls, data: bytes) -> Self:
        offset, size, flags = cls._STRUCT.unpack_from(data)
        body = bytes(data[cls._STRUCT.size :])
        if size != len(body):
            raise BadPayload(f"config size field {size} but {len(body)} payload bytes")
        return cls(offset, size, flags, body)

    def encode(self) -> bytes:
        return _pack(self._STRUCT, self.offset, self.size, self.flags) + self.payload


def _split_vring_u64(value: int, what: str) -> tuple[int, bool]:
    """Bits 0-7 index, bit 8 no-fd; the spec defines no other bit, so others are rejected."""
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise BadPayload(f"{what} u64 {value:#x} sets bits other than index and no-fd")
    return value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK)


def _join_vring_u64(index: int, nofd: bool) -> int:
    if not 0 <= index <= VRING_IDX_MASK:
        raise LocalProtocolError(f"vring index {index} does not fit in 8 bits")
    return index | (VRING_NOFD_MASK if nofd else 0)


@dataclass(frozen=True, slots=True)
class VringFd(Payload):
    """u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 vring index, bit 8 "no fd: poll instead"."""

    index: int
    nofd: bool = False
    _STRUCT: ClassVar = struct.Struct("<Q")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_split_vring_u64(cls._STRUCT.unpack(data)[0], "vring fd"))

    def encode(self) -> bytes:
        return _pack(self._STRUCT, _join_vring_u64(self.index, self.nofd))


@dataclass(frozen=True, slots=True)
class VringArea(Payload):
    """Vring area description `{u64 index|nofd, u64 size, u64 offset}` (host notifier)."""

    index: int
    nofd: bool
    size: int
    offset: int
    _STRUCT: ClassVar = struct.Struct("<QQQ")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        u64, size, offset = cls._STRUCT.unpack(data)
        index, nofd = _split_vring_u64(u64, "vring area")
        return cls(index, nofd, size, offset)

    def encode(self) -> bytes:
        u64 = _join_vring_u64(self.index, self.nofd)
        return _pack(self._STRUCT, u64, self.size, self.offset)


@dataclass(frozen=True, slots=True)
class InflightDesc(Payload):
    """Inflight description `{u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size}`.

    sizeof(VhostUserInflight) is 24: the two u16 are followed by 4 bytes of padding.
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _STRUCT: ClassVar = struct.Struct("<QQHH4x")


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """VhostUserShared: a 16-byte UUID (first three fields big-endian, i.e. RFC 4122 bytes)."""

    uuid: uuid.UUID
    _STRUCT: ClassVar = struct.Struct("16s")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(uuid.UUID(bytes=bytes(data)))

    def encode(self) -> bytes:
        return self.uuid.bytes


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """Device state transfer parameters `{u32 direction, u32 phase}` (SET_DEVICE_STATE_FD)."""

    direction: int
    phase: int
    _STRUCT: ClassVar = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class Raw(Payload):
    """An opaque payload (crypto sessions, whose C layout changed across QEMU versions)."""

    data: bytes

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return 0 <= size <= MAX_RAW_SIZE

    @classmethod
    def max_size(cls) -> int:
        return MAX_RAW_SIZE

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(bytes(data))

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message. It owns `fds` from the moment it is returned.

    A handler keeps an fd with `take_fd()`/`take_fds()` (a new owner holding the same number);
    whatever is not taken is closed by `close_fds()` or by leaving a `with message:` block.
    """

    request: FrontendRequest | BackendRequest
    flags: int
    payload: Payload
    fds: tuple[OwnedFd, ...] = ()

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def take_fd(self, i: int = 0) -> OwnedFd:
        """Move fd `i` out of the message; the message's own wrapper becomes closed."""
        return OwnedFd(self.fds[i].detach())

    def take_fds(self) -> list[OwnedFd]:
        return [self.take_fd(i) for i in range(len(self.fds)) if not self.fds[i].closed]

    def close_fds(self) -> None:
        close_all(self.fds)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_fds()
