"""virtio-blk (virtio 1.x 5.2): a block device backed by a raw image file or a block device.

    device.py          BlkDevice: features, config space, the choice of data path, and the
                       threads path's requests (handle(): checked, then deferred)
    uring_kernels.py   the compiled data path: requests parsed, checked and submitted to
                       io_uring, completions published, no Python per request
    uring_io.py        UringQueue: a virtqueue's io_uring, in-flight table and memory pins
    io.py              BlkImage (preadv/pwritev2/fdatasync/fallocate straight on guest memory,
                       O_DIRECT with bounce buffers; a null disk) and IoThreads, the threads
                       path's pool
    command.py         `pyvhost blk`: opens the image once, makes each connection's device

    pyvhost blk --socket-path /tmp/blk.sock --file disk.raw [--readonly] [--queues N] \
        [--io auto|uring|threads] [--null SIZE] ...
    qemu-system-x86_64 ... -chardev socket,id=blk0,path=/tmp/blk.sock \\
        -device vhost-user-blk-pci,chardev=blk0,num-queues=1
"""

from pyvhost.devices.blk.device import BlkDevice
from pyvhost.devices.blk.io import BlkImage

__all__ = ["BlkDevice", "BlkImage"]
