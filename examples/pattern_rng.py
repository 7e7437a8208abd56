"""A user-written pyvhost device: an "entropy source" that serves a fixed pattern.

Not random at all, on purpose: a guest reading it sees exactly what the device wrote, which
makes it a test of the device API end to end (tests/test_interop_rng.py). Serve it with

    .venv/bin/pyvhost run pattern_rng:Pattern --socket-path /tmp/rng.sock

from this folder (or with PYTHONPATH=examples), then give QEMU
`-chardev socket,id=rng0,path=/tmp/rng.sock -device vhost-user-rng-pci,chardev=rng0`;
in the guest, `head -c 64 /dev/hwrng` prints PYVHOST!PYVHOST!...
"""

import pyvhost


class Pattern(pyvhost.Device):
    device_id = 4          # virtio device ID (4 = entropy source)
    num_queues = 1

    def handle(self, queue: int, request: pyvhost.Request) -> int:
        n = request.writable_size            # bytes the driver's writable buffers hold
        request.write(b"PYVHOST!" * (n // 8) + b"PYVHOST!"[: n % 8])   # fills them in order
        return n                             # the used length
