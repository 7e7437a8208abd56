"""virtio-rng, the entropy device (virtio 1.x 5.4): random bytes from the OS for the guest.

One queue (requestq). Each request is a chain of device-writable buffers; the device fills it
from the kernel's random source (getrandom(2), as /dev/urandom) and returns how many bytes it
wrote. The spec lets the device use less than the whole buffer ("MAY use less than the entire
buffer length", 5.4.6.1): a request gets at most MAX_BYTES_PER_REQUEST, so a guest posting a
huge buffer cannot make the backend allocate without bound. No features, no config space.

Served to QEMU with `-device vhost-user-rng-pci,chardev=...`; the Linux driver (virtio_rng)
feeds /dev/hwrng.
"""

from __future__ import annotations

import os
from typing import Any

from pyvhost.device import Device, Request

VIRTIO_ID_ENTROPY = 4
MAX_BYTES_PER_REQUEST = 64 * 1024

__all__ = ["RngDevice"]


class RngDevice(Device):
    name = "rng"
    device_id = VIRTIO_ID_ENTROPY
    num_queues = 1

    def __init__(self) -> None:
        super().__init__()
        self.bytes_served = 0
        self.empty_requests = 0

    def handle(self, queue: int, request: Request) -> int:
        n = min(request.writable_size, MAX_BYTES_PER_REQUEST)
        if n == 0:  # nothing to fill (a driver bug, harmless): complete it empty
            self.empty_requests += 1
            return 0
        request.write(os.urandom(n))
        self.bytes_served += n
        return n

    def stats(self) -> dict[str, Any]:
        return {"rng_bytes": self.bytes_served, "rng_empty_requests": self.empty_requests}
