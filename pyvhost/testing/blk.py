"""Test-bed helpers for virtio-blk: QEMU arguments for a vhost-user-blk-pci disk, host-made
pattern images, and finding and checking disks inside the test guest (busybox tools only).

    with PyvhostDaemon(["blk", "--socket-path", sock, "--file", image]) as d:
        d.wait_listening()
        with GuestVM(vhost_user_blk_args(sock)) as vm:
            disk = guest_disk_by_serial(vm, "pyvhost-rw")          # "vda"
            assert guest_md5(vm, f"/dev/{disk}") == hashlib.md5(data).hexdigest()
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from pyvhost.testing.testbed import GuestVM, TestbedError

__all__ = ["guest_disk_by_serial", "guest_md5", "make_pattern_image", "md5_hex",
           "vhost_user_blk_args"]


def vhost_user_blk_args(socket_path: Path | str, index: int = 0, num_queues: int = 1,
                        server: bool = False, reconnect: int | None = None,
                        **device_props: object) -> list[str]:
    """QEMU arguments for a virtio-blk disk (virtio ID 2) served over a vhost-user socket.

    `num_queues` is set explicitly: QEMU's default is one queue per vCPU, and realize fails
    if the backend offers fewer. QEMU 7.2 needs the backend (VHOST_USER_PROTOCOL_F_CONFIG)
    while it realizes the device, so start a listening backend first (`wait_listening`), or
    with `server=True` QEMU listens and waits for a `--client` backend. MSI-X works under
    TCG for this device (vectors stay QEMU's default). `reconnect=N`: QEMU reconnects to a
    backend that went away every N seconds (and resumes the rings on the new one; with the
    inflight area it kept, the requests in flight are resubmitted). `device_props` are added
    to -device (e.g. queue_size=256, config_wce="off")."""
    chardev = f"socket,id=blk{index},path={socket_path}" + (",server=on" if server else "")
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    device = f"vhost-user-blk-pci,chardev=blk{index},num-queues={num_queues}"
    device += "".join(f",{k.replace('_', '-')}={v}" for k, v in device_props.items())
    return ["-chardev", chardev, "-device", device]


def make_pattern_image(path: Path | str, size: int, seed: int) -> bytes:
    """Write `size` pseudo-random bytes (reproducible from `seed`) to `path`; return them."""
    data = random.Random(seed).randbytes(size)
    Path(path).write_bytes(data)
    return data


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def guest_disk_by_serial(vm: GuestVM, serial: str, timeout: float = 30.0) -> str:
    """The guest's name (vda, vdb...) of the virtio disk whose GET_ID answer is `serial`."""
    out = vm.run("for d in /sys/block/vd*; do echo \"$d $(cat $d/serial)\"; done",
                 timeout=timeout).output
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1].strip() == serial:
            return parts[0].rsplit("/", 1)[-1]
    raise TestbedError(f"no virtio disk with serial {serial!r} in the guest:\n{out}")


def guest_md5(vm: GuestVM, path: str, *, skip_blocks: int = 0, count: int | None = None,
              block_size: int = 4096, timeout: float = 60.0) -> str:
    """busybox md5sum of a guest file or device, or of `count` blocks of it from block
    `skip_blocks` (through dd)."""
    if count is None and not skip_blocks:
        cmd = f"md5sum {path}"
    else:
        n = f" count={count}" if count is not None else ""
        cmd = (f"set -o pipefail; dd if={path} bs={block_size} skip={skip_blocks}{n} "
               f"2>/dev/null | md5sum")
    result = vm.run(cmd, timeout=timeout)
    m = re.match(r"\s*([0-9a-f]{32})\b", result.output)
    if result.status != 0 or not m:
        raise TestbedError(f"guest: {cmd!r} failed (exit {result.status}):\n{result.output}")
    return m[1]
