"""Checked, translated access to guest memory from Python (the copy path's Python face).

Every call translates through the table it is given, bounds-checks, and copies. Buffers that
span regions are gathered/scattered piece by piece. Compiled code has its own equivalent in
`pyvhost.ring.kernels`.
"""

from __future__ import annotations

import struct

import numpy as np

from pyvhost.memory.address import GuestAddress, UserAddress
from pyvhost.memory.table import RegionTable, Segment

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _gather(segments: list[Segment]) -> bytes:
    if len(segments) == 1:
        s = segments[0]
        return s.region.mapped_data()[s.offset:s.offset + s.length].tobytes()
    return b"".join(s.region.mapped_data()[s.offset:s.offset + s.length].tobytes()
                    for s in segments)


def _scatter(segments: list[Segment], data: bytes | memoryview | np.ndarray) -> None:
    src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    pos = 0
    for s in segments:
        s.region.mapped_data()[s.offset:s.offset + s.length] = src[pos:pos + s.length]
        pos += s.length


def read_gpa(table: RegionTable, addr: GuestAddress, length: int) -> bytes:
    return _gather(table.translate_gpa(addr, length))


def write_gpa(table: RegionTable, addr: GuestAddress, data: bytes | memoryview) -> None:
    _scatter(table.translate_gpa(addr, len(data)), data)


def read_user(table: RegionTable, addr: UserAddress, length: int) -> bytes:
    return _gather(table.translate_user(addr, length))


def write_user(table: RegionTable, addr: UserAddress, data: bytes | memoryview) -> None:
    _scatter(table.translate_user(addr, len(data)), data)


def read_user_u16(table: RegionTable, addr: UserAddress) -> int:
    return _U16.unpack(read_user(table, addr, 2))[0]


def read_user_u32(table: RegionTable, addr: UserAddress) -> int:
    return _U32.unpack(read_user(table, addr, 4))[0]


def read_user_u64(table: RegionTable, addr: UserAddress) -> int:
    return _U64.unpack(read_user(table, addr, 8))[0]


def write_user_u16(table: RegionTable, addr: UserAddress, value: int) -> None:
    write_user(table, addr, _U16.pack(value))


def write_user_u32(table: RegionTable, addr: UserAddress, value: int) -> None:
    write_user(table, addr, _U32.pack(value))
