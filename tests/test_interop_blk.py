"""A real Linux guest uses two pyvhost blk disks: QEMU (TCG) + vhost-user-blk-pci.

    guest /dev/vdX ── virtio_blk ── vhost-user-blk-pci (QEMU) ── pyvhost blk --file rw.raw
    guest /dev/vdY ── virtio_blk ── vhost-user-blk-pci (QEMU) ── pyvhost blk --readonly --direct

One boot, two backends (each its own `pyvhost blk` process, default --queues 4: QEMU asks
for 1 and 2):

- the disks are found by their serial (GET_ID), have the images' capacity, the read-only one
  is read-only to the kernel (VIRTIO_BLK_F_RO), the read-write one runs a write-back cache
  (CONFIG_WCE, writeback 1) and the second disk has two request queues (MQ);
- the guest reads both images whole and gets the host's MD5s;
- the guest copies the read-only disk into the read-write one at an offset, through the page
  cache then with O_DIRECT, with conv=fsync (FLUSH); the host finds those bytes in the file;
- writing to the read-only disk fails in the guest and changes nothing;
- blkdiscard on a range of the read-write disk: the file reads zeroes there and lost blocks;
- the guest turns the write cache off (cache_type): the backend hears it (SET_CONFIG);
- the backends exit 0 with no traceback, counted the flushes and discards and broke no queue.

Timings are printed (run with -s).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pyvhost.testing.blk import (
    guest_disk_by_serial,
    guest_md5,
    make_pattern_image,
    md5_hex,
    vhost_user_blk_args,
)
from pyvhost.testing.testbed import GuestVM, PyvhostDaemon, find_qemu, guest_image_paths

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
RW_SIZE = 8 * MiB
RO_SIZE = 2 * MiB
COPY_AT = 1 * MiB           # the buffered copy of the read-only disk lands here in rw
DIRECT_AT = 4 * MiB         # and the O_DIRECT copy here
DISCARD_AT, DISCARD_LEN = 7 * MiB, 512 * 1024


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


def test_guest_reads_writes_flushes_and_discards_on_pyvhost_blk(tmp_path: Path):
    t0 = time.monotonic()
    rw_img, ro_img = tmp_path / "rw.raw", tmp_path / "ro.raw"
    rw_data = make_pattern_image(rw_img, RW_SIZE, seed=12)
    ro_data = make_pattern_image(ro_img, RO_SIZE, seed=34)
    rw_sock, ro_sock = tmp_path / "rw.sock", tmp_path / "ro.sock"
    rw_stats, ro_stats = tmp_path / "rw.json", tmp_path / "ro.json"
    common = ["--stats-interval", "0", "--log-level", "INFO"]
    timings: dict[str, float] = {}

    # Both disks run the compiled io_uring path, the read-only one with O_DIRECT (the I/O
    # threads' path is tests/test_blk.py's, every test on both).
    with PyvhostDaemon(["blk", "--socket-path", rw_sock, "--file", rw_img, "--io", "uring",
                        "--serial", "pyvhost-rw", "--stats-json", rw_stats, *common],
                       name="blk-rw") as rw, \
            PyvhostDaemon(["blk", "--socket-path", ro_sock, "--file", ro_img, "--readonly",
                           "--direct", "--serial", "pyvhost-ro", "--stats-json", ro_stats,
                           *common], name="blk-ro") as ro:
        rw.wait_listening()
        ro.wait_listening()
        timings["backends listening"] = time.monotonic() - t0
        qemu_args = (vhost_user_blk_args(rw_sock, 0, num_queues=1)
                     + vhost_user_blk_args(ro_sock, 1, num_queues=2))
        try:
            with GuestVM(qemu_args, cpus=2) as vm:
                timings["boot"] = vm.boot_seconds or 0.0
                guest_checks(vm, rw_data, ro_data, timings)
                t = time.monotonic()
            timings["guest shutdown"] = time.monotonic() - t
        except BaseException:
            for d in (rw, ro):
                print(f"--- pyvhost log ({' '.join(d.argv)}) ---\n{d.log[-6000:]}")
            raise
        finally:
            rw.stop()
            ro.stop()
        for d in (rw, ro):
            assert d.returncode == 0, d.log[-6000:]
            assert "Traceback" not in d.log, d.log[-6000:]
        assert "write cache off by the driver" in rw.log, rw.log[-6000:]

    # The host sees what the guest wrote, exactly where it wrote it, and nothing else moved.
    after = rw_img.read_bytes()
    assert len(after) == RW_SIZE
    expected = bytearray(rw_data)
    expected[COPY_AT:COPY_AT + RO_SIZE] = ro_data
    expected[DIRECT_AT:DIRECT_AT + RO_SIZE] = ro_data
    expected[DISCARD_AT:DISCARD_AT + DISCARD_LEN] = bytes(DISCARD_LEN)
    for name, a, n in [("buffered copy", COPY_AT, RO_SIZE), ("O_DIRECT copy", DIRECT_AT, RO_SIZE),
                       ("discarded range", DISCARD_AT, DISCARD_LEN)]:
        assert after[a:a + n] == expected[a:a + n], f"{name} differs in the image file"
    assert after == bytes(expected)
    assert ro_img.read_bytes() == ro_data
    # Discard punched a hole: the file holds fewer blocks than its size.
    assert os.stat(rw_img).st_blocks * 512 <= RW_SIZE - DISCARD_LEN, os.stat(rw_img)

    s_rw = json.loads(rw_stats.read_text())
    s_ro = json.loads(ro_stats.read_text())
    print(f"\n[blk interop] {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}, "
          f"whole test {time.monotonic() - t0:.1f} s\n  rw stats {s_rw}\n  ro stats {s_ro}")
    for s in (s_rw, s_ro):
        assert s["queues_broken"] == 0, s
        assert s["blk_bad_requests"] == 0 and s["blk_io_errors"] == 0, s
        assert s["blk_get_id"] >= 1, s  # the driver read the serial for sysfs
    assert s_rw["blk_read_bytes"] >= RW_SIZE, s_rw
    assert s_rw["blk_write_bytes"] >= 2 * RO_SIZE, s_rw
    assert s_rw["blk_flushes"] >= 2, s_rw  # conv=fsync, twice
    assert s_rw["blk_discards"] >= 1, s_rw
    assert s_ro["blk_read_bytes"] >= RO_SIZE and s_ro["blk_writes"] == 0, s_ro
    assert s_rw["blk_io_mode_uring"] == 1 and s_rw["blk_uring_requests"] > 0, s_rw
    # Linux's buffers are page-aligned: O_DIRECT took them as they are, none was bounced.
    assert s_ro["blk_io_mode_uring"] == 1 and s_ro["blk_uring_requests"] > 0, s_ro
    assert s_ro["blk_bounced"] == 0, s_ro


def guest_checks(vm: GuestVM, rw_data: bytes, ro_data: bytes, timings: dict[str, float]) -> None:
    rw = guest_disk_by_serial(vm, "pyvhost-rw")
    ro = guest_disk_by_serial(vm, "pyvhost-ro")
    assert rw != ro

    def sysfs(disk: str, attr: str) -> str:
        return vm.run(f"cat /sys/block/{disk}/{attr}", check=True).output.strip()

    assert int(sysfs(rw, "size")) == RW_SIZE // 512
    assert int(sysfs(ro, "size")) == RO_SIZE // 512
    assert sysfs(ro, "ro") == "1" and sysfs(rw, "ro") == "0"
    assert sysfs(rw, "queue/write_cache") == "write back"
    assert int(sysfs(rw, "queue/discard_max_bytes")) > 0
    assert int(sysfs(ro, "queue/discard_max_bytes")) == 0
    assert sysfs(rw, "queue/logical_block_size") == "512"
    queues = vm.run(f"ls /sys/block/{ro}/mq", check=True).output.split()
    assert sorted(queues) == ["0", "1"], queues
    assert vm.run(f"ls /sys/block/{rw}/mq", check=True).output.split() == ["0"]

    # Whole images, read by the guest.
    t = time.monotonic()
    assert guest_md5(vm, f"/dev/{rw}", timeout=120) == md5_hex(rw_data)
    assert guest_md5(vm, f"/dev/{ro}", timeout=120) == md5_hex(ro_data)
    timings["md5 of both disks"] = time.monotonic() - t

    # Writes: the read-only disk copied into the read-write one, buffered then O_DIRECT,
    # each followed by fsync (a FLUSH, the cache being write-back).
    t = time.monotonic()
    vm.run(f"dd if=/dev/{ro} of=/dev/{rw} bs=64k seek={COPY_AT // 65536} conv=fsync",
           timeout=120, check=True)
    vm.run(f"dd if=/dev/{ro} of=/dev/{rw} bs=64k seek={DIRECT_AT // 65536} iflag=direct "
           "oflag=direct conv=fsync", timeout=120, check=True)
    vm.run("sync; echo 3 > /proc/sys/vm/drop_caches", check=True)
    n = RO_SIZE // 4096
    assert guest_md5(vm, f"/dev/{rw}", skip_blocks=COPY_AT // 4096, count=n) == md5_hex(ro_data)
    assert guest_md5(vm, f"/dev/{rw}", skip_blocks=DIRECT_AT // 4096, count=n) == md5_hex(
        ro_data)
    timings["writes"] = time.monotonic() - t

    # The read-only disk refuses writes.
    result = vm.run(f"dd if=/dev/zero of=/dev/{ro} bs=4096 count=1 conv=fsync")
    assert result.status != 0, result.output

    # Discard.
    t = time.monotonic()
    vm.run(f"blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/{rw}", timeout=60, check=True)
    vm.run("echo 3 > /proc/sys/vm/drop_caches", check=True)
    assert guest_md5(vm, f"/dev/{rw}", skip_blocks=DISCARD_AT // 4096,
                     count=DISCARD_LEN // 4096) == md5_hex(bytes(DISCARD_LEN))
    timings["discard"] = time.monotonic() - t

    # The driver turns the write cache off (SET_CONFIG of writeback through QEMU): writes are
    # then stable when they complete, with no FLUSH.
    vm.run(f"echo 'write through' > /sys/block/{rw}/cache_type", check=True)
    assert sysfs(rw, "cache_type") == "write through"
    assert sysfs(rw, "queue/write_cache") == "write through"
