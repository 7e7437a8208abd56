"""virtio-net (virtio 1.x 5.1): the device, its control queue, and where frames go and come from.

    device.py         NetDevice: queues, features, config space, which path each ring takes
    ctrl.py           the control virtqueue (RX mode, MAC table, announce, MQ pairs)
    tx_drop.py        the compiled TX drop sink (count and classify, complete)
    endpoints.py      TX sinks and RX sources other than drop (TAP, pcap, loopback, generator)
    frame_kernels.py  compiled moves between guest buffers and frame rings
    tap.py, pcap.py   the TAP device and the pcap writer
"""

from pyvhost.devices.net.device import DEFAULT_MAC, NetDevice

__all__ = ["DEFAULT_MAC", "NetDevice"]
