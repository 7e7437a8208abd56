"""virtio-blk (virtio 1.x 5.2): a block device backed by a raw image file or a block device.

    device.py   BlkDevice: requests (checked, then deferred), features, config space
    io.py       BlkImage (preadv/pwritev2/fdatasync/fallocate straight on guest memory,
                O_DIRECT with bounce buffers) and IoThreads, the device's I/O thread pool
    command.py  `pyvhost blk`: opens the image once, makes each connection's device

    pyvhost blk --socket-path /tmp/blk.sock --file disk.raw [--readonly] [--queues N] ...
    qemu-system-x86_64 ... -chardev socket,id=blk0,path=/tmp/blk.sock \\
        -device vhost-user-blk-pci,chardev=blk0,num-queues=1
"""

from pyvhost.devices.blk.device import BlkDevice
from pyvhost.devices.blk.io import BlkImage

__all__ = ["BlkDevice", "BlkImage"]
