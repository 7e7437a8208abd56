"""pyvhost blk in process: the virtio-blk device through the real daemon (DeviceSession).

Every request type, the config space at any offset and size, read-only disks, the checks on
everything a guest controls (headers, status bytes, ranges, segment lists) and a fuzz of a few
hundred random chains against a model of the image; O_DIRECT with aligned and bounced
buffers, a block device (a loop device), requests in flight while a ring stops or the device
resets, and the `pyvhost blk` command line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvhost.devices.blk import BlkDevice, BlkImage
from pyvhost.devices.blk import device as B
from pyvhost.devices.blk.io import BOUNCE_SIZE, IOV_MAX, slice_iovecs
from pyvhost.protocol import U64, ConfigSpace, FrontendRequest
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from pyvhost.testing.frontend import RequestFailed, VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.session import DeviceSession

SECTOR = 512
ALL = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
       | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << B.F_SEG_MAX) | (1 << B.F_BLK_SIZE)
       | (1 << B.F_TOPOLOGY) | (1 << B.F_FLUSH) | (1 << B.F_CONFIG_WCE) | (1 << B.F_MQ)
       | (1 << B.F_DISCARD) | (1 << B.F_WRITE_ZEROES) | (1 << B.F_RO))
NO_FLUSH = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)


def hdr(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, ioprio, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def make_image(path: Path, sectors: int, tail: bytes = b"", seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(sectors * SECTOR) + tail
    path.write_bytes(data)
    return data


@pytest.fixture(params=["uring", "uring-sync", "threads"], autouse=True)
def io_mode(request) -> str:
    """Every test runs on each data path (the compiled one through io_uring, the compiled one
    doing reads and writes synchronously as for a file in tmpfs, and handle() with I/O
    threads) unless it parametrizes `io_mode` itself."""
    Blk.io = request.param
    return request.param


class Blk:
    """A DeviceSession on a BlkDevice over an image file, and request helpers."""

    io = "uring"  # the data path (the io_mode fixture sets it)

    def __init__(self, tmp_path: Path, image: BlkImage, *, features: int = ALL,
                 ram_mib: int = 4, **kw) -> None:
        kw.setdefault("io", "uring" if self.io == "uring-sync" else self.io)
        if self.io == "uring-sync":
            image.sync_io = True  # as BlkImage.open sets it for a file in tmpfs
        self.image = image
        self.session = DeviceSession(lambda: BlkDevice(image, **kw), tmp_path / "blk.sock",
                                     features=features, ram_mib=ram_mib)

    def __enter__(self) -> "Blk":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            device = self.session.server.current.device if self.session.server.current else None
        finally:
            self.session.close()
        if device is not None:  # the connection ended: its rings stopped, its I/O threads too
            prefix = device.io.name + "-io"
            assert not [t for t in threading.enumerate() if t.name.startswith(prefix)]

    @property
    def device(self) -> BlkDevice:
        return self.session.device

    def call(self, q: int, readable: list[bytes], writable: list[int], *,
             indirect: bool = False) -> tuple[int, bytes]:
        """One chain; (used length, every writable byte)."""
        s = self.session
        d = s.fe.driver(q)
        head = (d.add_indirect_chain if indirect else d.add_chain)(readable, writable)
        d.publish()
        if d.needs_kick():
            s.fe.kick(q)
        ((got, used),) = s.wait_used(q)
        assert got == head
        total = sum(writable)
        return used, d.written_data(head, total) if total else b""

    def read(self, q: int, sector: int, n: int, *, pieces: int = 1,
             indirect: bool = False) -> tuple[int, bytes]:
        """IN of n bytes in `pieces` writable buffers; (status, data)."""
        sizes = _split(n, pieces) + [1]
        used, out = self.call(q, [hdr(B.T_IN, sector)], sizes, indirect=indirect)
        assert used == n + 1
        return out[-1], out[:-1]

    def write(self, q: int, sector: int, data: bytes, *, pieces: int = 1,
              indirect: bool = False) -> int:
        parts, pos = [], 0
        for k in _split(len(data), pieces):
            parts.append(data[pos:pos + k])
            pos += k
        used, out = self.call(q, [hdr(B.T_OUT, sector), *parts], [1], indirect=indirect)
        assert used == 1
        return out[0]

    def simple(self, q: int, readable: list[bytes], writable: int = 1) -> int:
        """A request answered with a status byte at the end of `writable` bytes: the status."""
        used, out = self.call(q, readable, [writable])
        assert used in (1, writable)
        return out[-1]


def features_offered(fe: VhostUserFrontend) -> int:
    reply = fe.request(FrontendRequest.GET_FEATURES)
    assert isinstance(reply, U64)
    return reply.value


def _split(n: int, pieces: int) -> list[int]:
    """n bytes in `pieces` buffers of uneven sizes (none empty unless n is)."""
    if pieces <= 1 or n < pieces:
        return [n] if n else []
    cuts = sorted(random.Random(n * 31 + pieces).sample(range(1, n), pieces - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, n])]


@pytest.fixture
def image_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    return path, make_image(path, 256)  # 128 KiB


# -- features, config space, queues ----------------------------------------------------------


def test_features_protocol_features_and_queue_count(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image, queues=3) as blk:
        s = blk.session
        offered = features_offered(s.fe)
        for bit in (B.F_SEG_MAX, B.F_BLK_SIZE, B.F_TOPOLOGY, B.F_FLUSH, B.F_CONFIG_WCE,
                    B.F_MQ, B.F_DISCARD, B.F_WRITE_ZEROES, VIRTIO_F_VERSION_1):
            assert offered >> bit & 1, bit
        for bit in (B.F_RO, B.F_SIZE_MAX, B.F_GEOMETRY, 15, 16, 17):  # LIFETIME, SECURE_ERASE, ZONED
            assert not offered >> bit & 1, bit
        assert s.negotiated.protocol_features & P.CONFIG.mask
        assert s.negotiated.protocol_features & P.MQ.mask
        assert s.negotiated.queue_num == 3
        # Every queue serves.
        for q in range(3):
            s.start_queue(q)
            assert blk.read(q, q, SECTOR)[0] == B.S_OK


def test_readonly_offers_ro_and_no_discard(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path, readonly=True) as image, Blk(tmp_path, image) as blk:
        offered = features_offered(blk.session.fe)
        assert offered >> B.F_RO & 1
        assert not offered >> B.F_DISCARD & 1 and not offered >> B.F_WRITE_ZEROES & 1


def test_config_space_fields(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image, queues=2, queue_size=256) as blk:
        cfg = blk.session.fe.get_config(0, 96)
        (capacity, size_max, seg_max, cyl, heads, secs, blk_size, phys_exp, align_off,
         min_io, opt_io, wce, _, num_queues, max_dsec, max_dseg, dalign, max_wzsec, max_wzseg,
         wz_unmap, *rest) = B.CONFIG.unpack(cfg)
        assert capacity == 256
        assert (size_max, cyl, heads, secs) == (0, 0, 0, 0)
        assert seg_max == 126
        assert blk_size == 512
        assert (1 << phys_exp) * 512 == image.physical_block  # st_blksize: 4 KiB on ext4
        assert (align_off, min_io, opt_io) == (0, 1 << phys_exp, 0)
        assert wce == 1 and num_queues == 2
        assert (max_dsec, max_dseg, dalign) == (B.MAX_DISCARD_SECTORS, B.MAX_DISCARD_SEG, 1)
        assert (max_wzsec, max_wzseg, wz_unmap) == (B.MAX_WRITE_ZEROES_SECTORS,
                                                    B.MAX_WRITE_ZEROES_SEG, 1)
        assert rest == [0] * len(rest)
        assert cfg[:8] == struct.pack("<Q", 256)
        assert cfg[20:24] == struct.pack("<I", 512)


def test_config_space_answers_exactly_at_any_offset_and_size(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        fe = blk.session.fe
        whole = fe.get_config(0, 96)
        assert whole == blk.device.config
        # QEMU 7.2 asks for the size its features give (36, 48, 57, 60 bytes); drivers read
        # fields one at a time, at odd offsets too.
        for offset, size in [(0, 36), (0, 48), (0, 57), (0, 60), (0, 1), (95, 1), (1, 7),
                             (3, 5), (33, 3), (34, 2), (57, 39), (20, 4), (7, 89)]:
            assert fe.get_config(offset, size) == whole[offset:offset + size], (offset, size)
        for offset, size in [(90, 7), (96, 1), (0, 97), (200, 4)]:
            with pytest.raises(RequestFailed):
                fe.get_config(offset, size)
        assert fe.get_config(0, 8) == whole[:8]  # the connection goes on after a refusal


def test_writeback_is_the_one_writable_field(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        fe = blk.session.fe
        dev = blk.device
        assert dev.writeback == 1 and not dev.write_through
        fe.request(FrontendRequest.SET_CONFIG, ConfigSpace(32, 1, 0, b"\0"), need_reply=True)
        assert fe.get_config(32, 1) == b"\0" and dev.write_through
        fe.request(FrontendRequest.SET_CONFIG, ConfigSpace(32, 1, 0, b"\1"), need_reply=True)
        assert fe.get_config(32, 1) == b"\1" and not dev.write_through
        for offset, data in [(0, b"\0" * 8), (32, b"\2"), (33, b"\0"), (32, b"\0\0")]:
            with pytest.raises(RequestFailed):
                fe.request(FrontendRequest.SET_CONFIG, ConfigSpace(offset, len(data), 0, data),
                           need_reply=True)
        assert fe.get_config(0, 8) == struct.pack("<Q", 256)


def test_write_through_without_flush_negotiated(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image, features=NO_FLUSH) as blk:
        assert blk.device.write_through  # the driver could never ask for a flush
        blk.session.start_queue(0)
        assert blk.write(0, 3, b"d" * SECTOR) == B.S_OK
    assert path.read_bytes()[3 * SECTOR:4 * SECTOR] == b"d" * SECTOR


# -- requests --------------------------------------------------------------------------------


def test_read_and_write_across_buffers(tmp_path, image_file):
    path, data = image_file
    model = bytearray(data)
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        blk.session.start_queue(0)
        for sector, n, pieces, indirect in [(0, 512, 1, False), (5, 4096, 3, False),
                                            (250, 3072, 7, True), (255, 512, 2, True),
                                            (17, 0, 1, False)]:
            status, got = blk.read(0, sector, n, pieces=pieces, indirect=indirect)
            assert status == B.S_OK
            assert got == bytes(model[sector * SECTOR:sector * SECTOR + n])
        rnd = random.Random(7)
        for sector, n, pieces, indirect in [(1, 512, 1, False), (9, 8192, 5, False),
                                            (200, 28 * 512, 9, True), (255, 512, 3, True)]:
            new = rnd.randbytes(n)
            assert blk.write(0, sector, new, pieces=pieces, indirect=indirect) == B.S_OK
            model[sector * SECTOR:sector * SECTOR + n] = new
            assert blk.read(0, sector, n, pieces=2)[1] == new
        st = blk.device.stats()
        assert st["blk_writes"] == 4 and st["blk_write_bytes"] == 512 + 8192 + 28 * 512 + 512
        assert st["blk_reads"] == 8  # the empty read needs no I/O
        assert st["blk_io_errors"] == st["blk_invalid"] == 0
    assert path.read_bytes() == bytes(model)


def test_more_pieces_than_iov_max(tmp_path):
    """A chain of IOV_MAX+76 buffers: preadv/pwritev2 IOV_MAX at a time."""
    path = tmp_path / "disk.raw"
    data = make_image(path, 2048)
    n = IOV_MAX + 76
    with BlkImage.open(path) as image, Blk(tmp_path, image, ram_mib=8,
                                           queue_size=2048) as blk:
        blk.session.start_queue(0, size=2048)
        used, out = blk.call(0, [hdr(B.T_IN, 3)], [SECTOR] * n + [1], indirect=True)
        assert used == n * SECTOR + 1 and out[-1] == B.S_OK
        assert out[:-1] == data[3 * SECTOR:(3 + n) * SECTOR]
        new = random.Random(3).randbytes(n * SECTOR)
        parts = [new[k * SECTOR:(k + 1) * SECTOR] for k in range(n)]
        used, out = blk.call(0, [hdr(B.T_OUT, 900), *parts], [1], indirect=True)
        assert (used, out) == (1, bytes([B.S_OK]))
    assert path.read_bytes()[900 * SECTOR:(900 + n) * SECTOR] == new


def test_flush_get_id_and_unsupported_types(tmp_path, image_file):
    path, _ = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image, serial="pyvhost-disk-0") as blk:
        blk.session.start_queue(0)
        assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_OK
        assert blk.device.stats()["blk_flushes"] == 1
        used, out = blk.call(0, [hdr(B.T_GET_ID)], [20, 1])
        assert (used, out) == (21, b"pyvhost-disk-0".ljust(20, b"\0") + b"\0")
        used, out = blk.call(0, [hdr(B.T_GET_ID)], [7, 13, 1])  # across buffers
        assert out == b"pyvhost-disk-0".ljust(20, b"\0") + b"\0"
        used, out = blk.call(0, [hdr(B.T_GET_ID)], [19, 1])  # too small for the id
        assert out[-1] == B.S_IOERR
        for rtype in (2, 3, 5, 6, 10, 12, 14, 15, 16, 0x80000000, 0x80000001, 0xFFFFFFFF):
            assert blk.simple(0, [hdr(rtype, 7)]) == B.S_UNSUPP, rtype
        assert blk.device.stats()["blk_unsupported"] == 12
    with BlkImage.open(path) as image, Blk(tmp_path, image,
                                           serial="abcdefghijklmnopqrst") as blk:
        blk.session.start_queue(0)
        assert blk.call(0, [hdr(B.T_GET_ID)], [20, 1])[1] == b"abcdefghijklmnopqrst\0"
    with pytest.raises(ValueError):
        BlkDevice(image, serial="abcdefghijklmnopqrstu")  # 21 bytes


def test_null_disk_completes_without_io(tmp_path):
    """`--null SIZE`: the checks of a real disk, no storage (reads leave buffers as they are)."""
    from pyvhost.devices.blk.command import parse_size
    assert parse_size("1G") == 1 << 30 and parse_size("64MiB") == 64 << 20
    assert parse_size("4096") == 4096
    for bad in ("", "x", "0", "-1M", "1Q"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        BlkImage.open_null(100)
    with BlkImage.open_null(1 << 20) as image, Blk(tmp_path, image) as blk:
        assert image.null and image.capacity == 2048
        blk.session.start_queue(0)
        assert blk.read(0, 2040, 4096)[0] == B.S_OK
        assert blk.read(0, 2041, 4096)[0] == B.S_IOERR  # past the capacity
        assert blk.write(0, 0, b"x" * 8192, pieces=3) == B.S_OK
        assert blk.write(0, 0, b"x" * 100) == B.S_IOERR  # not a multiple of 512
        assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_OK
        assert blk.simple(0, [hdr(B.T_DISCARD), seg(8, 8)]) == B.S_OK
        assert blk.simple(0, [hdr(B.T_WRITE_ZEROES), seg(8, 8, 1)]) == B.S_OK
        st = blk.device.stats()
        assert st["blk_reads"] == 1 and st["blk_writes"] == 1 and st["blk_io_errors"] == 2


def test_discard_and_write_zeroes(tmp_path):
    path = tmp_path / "disk.raw"
    data = make_image(path, 2048)  # 1 MiB
    model = bytearray(data)
    blocks_before = os.stat(path).st_blocks
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        blk.session.start_queue(0)
        # Three discard segments in one request (whole 4 KiB blocks: the file gets holes).
        segs = [(64, 256), (512, 8), (1024, 512)]
        st = blk.simple(0, [hdr(B.T_DISCARD), b"".join(seg(a, n) for a, n in segs)])
        assert st == B.S_OK
        for a, n in segs:
            model[a * SECTOR:(a + n) * SECTOR] = bytes(n * SECTOR)
        # Write zeroes: unmap allowed, not allowed, odd sizes; segments across two buffers.
        zsegs = [(3, 1, 1), (1600, 40, 0), (1700, 9, 1), (2047, 1, 0)]
        raw = b"".join(seg(*z) for z in zsegs)
        assert blk.simple(0, [hdr(B.T_WRITE_ZEROES), raw[:20], raw[20:]]) == B.S_OK
        for a, n, _ in zsegs:
            model[a * SECTOR:(a + n) * SECTOR] = bytes(n * SECTOR)
        assert blk.read(0, 0, 2048 * SECTOR, pieces=4)[1] == bytes(model)
        stats = blk.device.stats()
        assert stats["blk_discards"] == 1 and stats["blk_write_zeroes"] == 1
    assert path.read_bytes() == bytes(model)
    assert os.stat(path).st_blocks < blocks_before  # deallocated, not just zeroed


def test_discard_and_write_zeroes_refusals_change_nothing(tmp_path, image_file):
    path, data = image_file
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        blk.session.start_queue(0)
        D, Z = B.T_DISCARD, B.T_WRITE_ZEROES
        cases = [
            (D, seg(0, 8, B.SEGMENT_FLAG_UNMAP), B.S_UNSUPP),   # unmap on a discard
            (D, seg(0, 8, 2), B.S_UNSUPP),                     # unknown flag
            (Z, seg(0, 8, 4), B.S_UNSUPP),
            (Z, seg(0, 8) + seg(8, 8, 0x80000000), B.S_UNSUPP),
            (D, b"", B.S_IOERR),                               # no segment
            (Z, seg(0, 8)[:15], B.S_IOERR),                    # a partial one
            (D, seg(0, 8) + b"\0" * 3, B.S_IOERR),
            (D, seg(250, 7), B.S_IOERR),                       # past the capacity (256)
            (Z, seg(0, 1) + seg(256, 1), B.S_IOERR),           # the second is past it
            (Z, seg(2**64 - 1, 2), B.S_IOERR),
            (D, seg(0, B.MAX_DISCARD_SECTORS + 1), B.S_IOERR),  # longer than advertised
            (D, seg(0, 1) * (B.MAX_DISCARD_SEG + 1), B.S_IOERR),  # more segments
            (Z, seg(0, 1) * (B.MAX_WRITE_ZEROES_SEG + 1), B.S_IOERR),
        ]
        for rtype, payload, want in cases:
            readable = [hdr(rtype)] + ([payload] if payload else [])
            assert blk.simple(0, readable) == want, (rtype, payload.hex())
        assert blk.device.stats()["blk_discards"] == blk.device.stats()["blk_write_zeroes"] == 0
    assert path.read_bytes() == data


def test_guest_errors_are_answered_not_fatal(tmp_path):
    path = tmp_path / "disk.raw"
    tail = b"TAIL-NOT-ON-THE-DISK"  # 20 bytes past the last whole sector
    data = make_image(path, 64, tail)
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        assert image.capacity == 64
        s = blk.session
        s.start_queue(0)
        assert blk.read(0, 63, SECTOR)[0] == B.S_OK
        assert blk.read(0, 64, SECTOR)[0] == B.S_IOERR             # one past the end
        assert blk.read(0, 63, 2 * SECTOR)[0] == B.S_IOERR         # straddles the end
        assert blk.read(0, 2**64 - 1, SECTOR)[0] == B.S_IOERR
        assert blk.read(0, 2**63, SECTOR)[0] == B.S_IOERR
        assert blk.read(0, 0, 100)[0] == B.S_IOERR                 # not whole sectors
        assert blk.write(0, 64, b"x" * SECTOR) == B.S_IOERR
        assert blk.write(0, 60, b"x" * 513) == B.S_IOERR
        assert blk.write(0, 63, b"x" * 2 * SECTOR) == B.S_IOERR
        # A short header (or none): IOERR in the status byte.
        assert blk.simple(0, [hdr(B.T_IN)[:15]]) == B.S_IOERR
        assert blk.simple(0, []) == B.S_IOERR
        # Split header: fine.
        h = hdr(B.T_IN, 2)
        used, out = blk.call(0, [h[:3], h[3:9], h[9:]], [SECTOR, 1])
        assert out[-1] == B.S_OK and out[:-1] == data[2 * SECTOR:3 * SECTOR]
        # No writable byte at all: nothing can be answered; used 0, counted.
        assert blk.call(0, [hdr(B.T_IN)], []) == (0, b"")
        assert blk.call(0, [hdr(B.T_OUT), b"y" * SECTOR], []) == (0, b"")
        # A larger status area than one byte: the status is its last byte.
        used, out = blk.call(0, [hdr(B.T_FLUSH)], [8])
        assert out[-1] == B.S_OK
        stats = blk.device.stats()
        assert stats["blk_bad_requests"] == 2
        assert stats["blk_io_errors"] == 10
        assert s.backend.stats()["queues_broken"] == 0
        assert blk.read(0, 1, SECTOR)[0] == B.S_OK  # and the queue goes on
    assert path.read_bytes() == data


def test_readonly_refuses_every_write(tmp_path, image_file):
    path, data = image_file
    with BlkImage.open(path, readonly=True) as image, Blk(tmp_path, image) as blk:
        blk.session.start_queue(0)
        assert blk.write(0, 0, b"w" * SECTOR) == B.S_IOERR
        assert blk.simple(0, [hdr(B.T_DISCARD), seg(0, 8)]) == B.S_IOERR
        assert blk.simple(0, [hdr(B.T_WRITE_ZEROES), seg(0, 8, 1)]) == B.S_IOERR
        assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_OK
        status, got = blk.read(0, 4, 2 * SECTOR)
        assert status == B.S_OK and got == data[4 * SECTOR:6 * SECTOR]
        assert blk.device.stats()["blk_io_errors"] == 3
    assert path.read_bytes() == data


def test_requests_on_several_queues_in_flight_together(tmp_path):
    path = tmp_path / "disk.raw"
    make_image(path, 1024)
    rnd = random.Random(11)
    with BlkImage.open(path) as image, Blk(tmp_path, image, queues=2, io_threads=3) as blk:
        s = blk.session
        for q in (0, 1):
            s.start_queue(q, size=512)  # 3 descriptors a request
        # 2 x 100 writes of 4 KiB in flight at once, each at its own place.
        writes = {}
        heads = {0: [], 1: []}
        for k in range(200):
            q, sector = k % 2, 8 * (k // 2) + 4 * (k % 2)
            if sector + 4 > 1024:
                break
            new = rnd.randbytes(4 * SECTOR)
            writes[sector] = new
            heads[q].append(s.submit(q, [hdr(B.T_OUT, sector), new], [1], kick=False))
        for q in (0, 1):
            s.fe.kick(q)
        for q in (0, 1):
            used = s.wait_used(q, len(heads[q]))
            assert sorted(h for h, _ in used) == sorted(heads[q])
            assert all(n == 1 for _, n in used)
        for sector, new in writes.items():
            assert blk.read(sector % 2, sector, 4 * SECTOR)[1] == new
    raw = path.read_bytes()
    for sector, new in writes.items():
        assert raw[sector * SECTOR:(sector + 4) * SECTOR] == new


class PartlyCached(BlkImage):
    """The page cache holds only the first `cached` bytes of every read."""

    cached = 0

    def read_cached(self, iovecs, offset):
        return super().read_cached(slice_iovecs(iovecs, 0, self.cached), offset) if self.cached else 0


@pytest.mark.parametrize("io_mode", ["threads"], indirect=True)
@pytest.mark.parametrize("cached", [0, 1, 512, 4096, 5000])
def test_reads_the_page_cache_inline_and_the_rest_in_a_thread(tmp_path, cached):
    path = tmp_path / "disk.raw"
    data = make_image(path, 256)
    image = PartlyCached.open(path)
    image.cached = cached
    try:
        with Blk(tmp_path, image) as blk:
            blk.session.start_queue(0)
            for sector, n, pieces in [(0, 512, 1), (3, 8192, 3), (100, 4096, 4), (7, 512, 2)]:
                status, got = blk.read(0, sector, n, pieces=pieces)
                assert status == B.S_OK
                assert got == data[sector * SECTOR:sector * SECTOR + n], (cached, sector, n)
            inline = blk.device.stats()["blk_reads_inline"]
            deferred = blk.session.backend.stats()["device_deferred"]
            whole = sum(n <= cached for n in (512, 8192, 4096, 512))
            assert (inline, deferred) == (whole, 4 - whole)
    finally:
        image.close()


def test_reads_after_the_page_cache_was_dropped(tmp_path):
    """Cold data: RWF_NOWAIT finds nothing (or part), the I/O threads read it."""
    path = tmp_path / "disk.raw"
    data = make_image(path, 4096)
    with BlkImage.open(path) as image, Blk(tmp_path, image) as blk:
        blk.session.start_queue(0)
        os.fsync(image.fd)
        os.posix_fadvise(image.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for sector in (0, 1000, 3000):
            status, got = blk.read(0, sector, 64 * 1024, pieces=3)
            assert status == B.S_OK and got == data[sector * SECTOR:sector * SECTOR + 65536]
        assert blk.read(0, 1000, 4096)[1] == data[1000 * SECTOR:1000 * SECTOR + 4096]
        assert blk.device.stats()["blk_reads"] == 4


class SlowImage(BlkImage):
    """Writes take 20 ms: requests are still in flight when the ring stops."""

    def write(self, iovecs, offset, *, dsync=False):
        time.sleep(0.02)
        super().write(iovecs, offset, dsync=dsync)


@pytest.mark.parametrize("io_mode", ["threads"], indirect=True)
@pytest.mark.parametrize("stop", ["get_vring_base", "reset_device", "status_0"])
def test_stopping_a_ring_waits_for_its_io(tmp_path, stop):
    path = tmp_path / "disk.raw"
    data = make_image(path, 256)
    image = SlowImage.open(path)
    try:
        with Blk(tmp_path, image, io_threads=2) as blk:
            s = blk.session
            s.start_queue(0, size=128)  # 40 requests of 3 descriptors
            heads = [s.submit(0, [hdr(B.T_OUT, k), bytes([k]) * SECTOR], [1], kick=False)
                     for k in range(40)]
            s.fe.kick(0)
            while s.backend.stats()["device_deferred"] < 40:
                time.sleep(0.001)
            assert s.backend.stats()["device_in_flight"] > 0
            if stop == "get_vring_base":
                assert s.fe.get_vring_base(0) == 40
            elif stop == "reset_device":
                s.fe.reset_device()
            else:
                s.fe.set_status(0)
            # Every request was answered before the reply: the used ring holds all 40.
            d = s.fe.driver(0)
            assert d.used_idx() == 40
            assert sorted(h for h, _ in d.used()) == sorted(heads)
            assert not blk.device.io.running  # no ring runs: the threads ended
            assert blk.device.stats()["blk_writes"] == 40
    finally:
        image.close()
    raw = path.read_bytes()
    assert raw[:40 * SECTOR] == b"".join(bytes([k]) * SECTOR for k in range(40))
    assert raw[40 * SECTOR:] == data[40 * SECTOR:]


@pytest.mark.parametrize("io_mode", ["threads"], indirect=True)
def test_io_errors_of_the_host_become_ioerr(tmp_path, image_file):
    path, data = image_file

    class Failing(BlkImage):
        def read_cached(self, iovecs, offset):
            return 0

        def read(self, iovecs, offset):
            raise OSError(5, "injected EIO")

        def flush(self):
            raise OSError(28, "injected ENOSPC")

    image = Failing.open(path)
    try:
        with Blk(tmp_path, image) as blk:
            blk.session.start_queue(0)
            assert blk.read(0, 0, SECTOR)[0] == B.S_IOERR
            assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_IOERR
            assert blk.write(0, 0, b"k" * SECTOR) == B.S_OK
            assert blk.session.backend.stats()["queues_broken"] == 0
    finally:
        image.close()


# -- hostile chains --------------------------------------------------------------------------


def test_fuzz_random_requests_against_a_model(tmp_path):
    """600 random chains (types, sectors, lengths, layouts, segment lists):
    every one is answered, statuses are 0..2, nothing outside the disk changes, OK reads
    return the model's bytes and the file equals the model at the end."""
    sectors = 96
    path = tmp_path / "disk.raw"
    tail = b"\xee" * 300  # past the last whole sector: never part of the disk
    data = make_image(path, sectors, tail)
    model = bytearray(data[:sectors * SECTOR])
    rnd = random.Random(20261202)
    counts = {0: 0, 1: 0, 2: 0}

    def sector_value() -> int:
        if rnd.random() < 0.6:
            return rnd.randrange(sectors - 8)
        return rnd.choice([0, 1, sectors - 1, sectors, sectors + 1, rnd.randrange(sectors),
                           rnd.randrange(2**64), 2**64 - 1, 2**63, 2**32,
                           (2**64 - 1) // SECTOR])

    def length_value() -> int:
        if rnd.random() < 0.6:
            return SECTOR * rnd.randrange(1, 9)
        return rnd.choice([0, SECTOR, 2 * SECTOR, 8 * SECTOR, rnd.randrange(1, 4 * SECTOR),
                           SECTOR * rnd.randrange(1, 20), 511, 513])

    with BlkImage.open(path) as image, Blk(tmp_path, image, queues=2) as blk:
        s = blk.session
        s.start_queue(0, size=256)
        s.start_queue(1, size=256)
        for i in range(600):
            q = i % 2
            rtype = rnd.choice([B.T_IN, B.T_IN, B.T_OUT, B.T_OUT, B.T_FLUSH, B.T_GET_ID,
                                B.T_DISCARD, B.T_WRITE_ZEROES, rnd.randrange(2**32),
                                rnd.randrange(20)])
            sector = sector_value()
            header = hdr(rtype, sector, rnd.randrange(2**32))
            payload = b""
            if rtype == B.T_OUT:
                payload = rnd.randbytes(length_value())
            elif rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
                n = rnd.choice([0, 1, 1, 2, 3, 5])
                payload = b"".join(
                    seg(sector_value(),
                        rnd.choice([0, 1, 8, 8, rnd.randrange(sectors), 2**32 - 1]),
                        rnd.choice([0, 0, 1, 2])) for _ in range(n))
                if rnd.random() < 0.1:
                    payload = payload[:rnd.randrange(len(payload) + 1)]
            readable_bytes = header + payload
            if rnd.random() < 0.05:
                readable_bytes = readable_bytes[:rnd.randrange(16)]
            readable = [readable_bytes[a:b] for a, b in _cuts(rnd, len(readable_bytes))]
            data_len = length_value() if rtype in (B.T_IN, B.T_GET_ID) else 0
            status_len = 0 if rnd.random() < 0.04 else rnd.choice([1, 1, 1, 2])
            writable = [b - a for a, b in _cuts(rnd, data_len)] + (
                [status_len] if status_len else [])
            used, out = blk.call(q, readable, writable, indirect=rnd.random() < 0.3)
            total = sum(writable)
            if total == 0:
                assert used == 0
                continue
            status = out[-1]
            assert status in (0, 1, 2), (i, status)
            assert 1 <= used <= total
            counts[status] += 1
            if status != B.S_OK:
                continue
            # Apply what the device says it did to the model, check what it read.
            assert len(readable_bytes) >= 16
            if rtype == B.T_IN:
                start = sector * SECTOR
                n = total - 1
                assert start + n <= len(model) and n % SECTOR == 0
                assert out[:n] == bytes(model[start:start + n]), i
            elif rtype == B.T_OUT:
                start = sector * SECTOR
                assert start + len(payload) <= len(model) and len(payload) % SECTOR == 0
                model[start:start + len(payload)] = payload
            elif rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
                for k in range(len(payload) // 16):
                    a, n, _ = struct.unpack_from("<QII", payload, 16 * k)
                    assert (a + n) * SECTOR <= len(model)
                    model[a * SECTOR:(a + n) * SECTOR] = bytes(n * SECTOR)
        assert s.backend.stats()["queues_broken"] == 0
        stats = blk.device.stats()
    after = path.read_bytes()
    assert len(after) == len(data)
    assert after[sectors * SECTOR:] == tail
    assert after[:sectors * SECTOR] == bytes(model)
    print(f"\n[blk fuzz] statuses {counts}; device {stats}")
    assert min(counts.values()) > 20, counts  # the fuzz reached every status
    assert min(stats["blk_reads"], stats["blk_writes"]) > 30, stats
    assert min(stats["blk_discards"], stats["blk_write_zeroes"]) >= 3, stats


def _cuts(rnd: random.Random, n: int) -> list[tuple[int, int]]:
    """[0, n) in 1-3 pieces (an empty list for n == 0)."""
    if n == 0:
        return []
    k = min(n - 1, rnd.choice([0, 0, 1, 2]))
    points = sorted(rnd.sample(range(1, n), k)) if k else []
    return list(zip([0, *points], [*points, n]))


# -- O_DIRECT and block devices ----------------------------------------------------------------


@pytest.mark.parametrize("io_mode", ["uring", "threads"], indirect=True)
def test_direct_io_aligned_and_bounced(tmp_path, io_mode):
    path = tmp_path / "disk.raw"
    data = make_image(path, 8192)  # 4 MiB
    model = bytearray(data)
    with BlkImage.open(path, direct=True) as image, Blk(tmp_path, image, ram_mib=16) as blk:
        assert image.direct and image.align in (512, 4096)
        assert B.CONFIG.unpack(blk.session.fe.get_config(0, 96))[6] == image.align
        s = blk.session
        s.start_queue(0)
        d = s.fe.driver(0)
        ram = s.ram
        n = image.align * 16
        # Aligned guest buffers: straight to the device.
        buf = ram.alloc(n, 4096)
        status_buf = ram.alloc(16, 16)
        hdr_buf = ram.alloc(16, 16)
        ram.write(hdr_buf, hdr(B.T_IN, 64))
        head = d.add_buffers([(hdr_buf, 16, False), (buf, n, True), (status_buf, 1, True)])
        d.publish()
        s.fe.kick(0)
        assert s.wait_used(0) == [(head, n + 1)]
        assert ram.read(status_buf, 1) == b"\0"
        assert ram.read(buf, n) == data[64 * SECTOR:64 * SECTOR + n]
        # The pool's buffers are 16-aligned only: bounced, also over more than one bounce
        # buffer's worth.
        big = BOUNCE_SIZE + 3 * image.align
        new = random.Random(5).randbytes(big)
        assert blk.write(0, 16, new, pieces=3) == B.S_OK
        model[16 * SECTOR:16 * SECTOR + big] = new
        status, got = blk.read(0, 8, big, pieces=5)
        assert status == B.S_OK and got == bytes(model[8 * SECTOR:8 * SECTOR + big])
        if image.align > SECTOR:  # a 4 KiB-only O_DIRECT file: 512-byte requests refused
            assert blk.read(0, 1, SECTOR)[0] == B.S_IOERR
        assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_OK
        if io_mode == "uring":  # the aligned read went to io_uring; the two others bounced
            counters = blk.device.stats()
            assert counters["blk_bounced"] == 2 and counters["blk_uring_requests"] >= 2
    assert path.read_bytes() == bytes(model)


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "loop.raw"
    data = make_image(backing, 4096)  # 2 MiB
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device here: {exc}")
    try:
        yield dev, backing, data
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("io_mode,direct", [("uring", False), ("threads", False),
                                            ("uring", True), ("threads", True)],
                         indirect=["io_mode"])
def test_a_block_device_as_the_image(tmp_path, loop_device, direct):
    dev, backing, data = loop_device
    model = bytearray(data)
    with BlkImage.open(dev, direct=direct) as image, Blk(tmp_path, image) as blk:
        assert image.block_device and image.capacity == 4096  # BLKGETSIZE64
        blk.session.start_queue(0)
        assert blk.read(0, 100, 4096)[1] == data[100 * SECTOR:100 * SECTOR + 4096]
        new = random.Random(9).randbytes(8192)
        assert blk.write(0, 200, new, pieces=2) == B.S_OK
        model[200 * SECTOR:200 * SECTOR + 8192] = new
        assert blk.simple(0, [hdr(B.T_WRITE_ZEROES), seg(400, 16, 0), seg(600, 8, 1)]) == 0
        model[400 * SECTOR:416 * SECTOR] = bytes(16 * SECTOR)
        model[600 * SECTOR:608 * SECTOR] = bytes(8 * SECTOR)
        # BLKDISCARD: a loop device punches its backing file (reads give zeroes).
        assert blk.simple(0, [hdr(B.T_DISCARD), seg(1024, 64)]) == B.S_OK
        model[1024 * SECTOR:1088 * SECTOR] = bytes(64 * SECTOR)
        assert blk.device.stats()["blk_discards"] == 1
        assert blk.simple(0, [hdr(B.T_FLUSH)]) == B.S_OK
        assert blk.read(0, 0, 4096 * SECTOR, pieces=3)[1] == bytes(model)
    assert backing.read_bytes() == bytes(model)


# -- the command line ------------------------------------------------------------------------


def pyvhost(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvhost", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_capabilities_and_usage_errors(tmp_path, image_file):
    path, _ = image_file
    out = pyvhost("blk", "--print-capabilities")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"type": "block", "features": ["read-only", "blk-file"]}
    sock = str(tmp_path / "s.sock")
    for args, message in [([], "--file"),
                          (["--file", str(path), "--serial", "x" * 21], "--serial"),
                          (["--file", str(path), "--queue-size", "100"], "--queue-size"),
                          (["--file", str(path), "--queues", "0"], "--queues"),
                          (["--file", str(path), "--io-threads", "0"], "--io-threads")]:
        out = pyvhost("blk", "--socket-path", sock, *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    out = pyvhost("blk", "--socket-path", sock, "--file", str(tmp_path / "missing.raw"))
    assert out.returncode == 1 and "cannot open --file" in out.stderr, out.stderr
    assert not Path(sock).exists()


def test_cli_serves_the_image(tmp_path, image_file):
    """`pyvhost blk --read-only --blk-file` (the conventions' spellings) with a frontend."""
    path, data = image_file
    sock, stats = tmp_path / "s.sock", tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "pyvhost", "blk", "--socket-path", str(sock),
                             "--blk-file", str(path), "--read-only", "--serial", "cli",
                             "--stats-json", str(stats), "--stats-interval", "0",
                             "--max-connections", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with GuestRam([(0, 1 << 20)]) as ram, \
                VhostUserFrontend(str(sock), connect_timeout=120, timeout=120) as fe:
            got = fe.negotiate(ALL, P.REPLY_ACK.mask | P.CONFIG.mask | P.MQ.mask)
            assert got.features >> B.F_RO & 1 and got.queue_num == 4
            assert fe.get_config(0, 8) == struct.pack("<Q", 256)
            fe.set_mem_table(ram)
            from pyvhost.testing.driver import MockSplitQueue
            d = MockSplitQueue(ram, 16, event_idx=True)
            fe.setup_queue(0, d)
            fe.enable_queue(0)
            heads = [d.add_chain([hdr(B.T_IN, 1)], [SECTOR, 1]),
                     d.add_chain([hdr(B.T_GET_ID)], [20, 1]),
                     d.add_chain([hdr(B.T_OUT, 1), b"z" * SECTOR], [1])]
            d.publish()
            fe.kick(0)
            deadline = time.monotonic() + 30
            used: list = []
            while len(used) < 3 and time.monotonic() < deadline:
                used += d.used()
                time.sleep(0.005)
            lens = dict(used)
            assert d.written_data(heads[0], lens[heads[0]]) == data[SECTOR:2 * SECTOR] + b"\0"
            assert d.written_data(heads[1], 21) == b"cli".ljust(20, b"\0") + b"\0"
            assert d.written_data(heads[2], 1) == bytes([B.S_IOERR])
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log
    totals = json.loads(stats.read_text())
    assert totals["blk_reads"] == 1 and totals["blk_get_id"] == 1, totals
    assert totals["blk_io_errors"] == 1, totals
    assert path.read_bytes() == data
    assert not sock.exists()
