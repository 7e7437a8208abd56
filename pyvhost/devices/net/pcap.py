"""A pcap file as a TX sink: what the guest transmits, readable by tcpdump, Wireshark, scapy.

Classic libpcap format (not pcapng): a 24-byte global header (magic 0xa1b2c3d4, microsecond
timestamps, version 2.4, link type 1 = Ethernet), then per frame a 16-byte record header
(seconds, microseconds, captured length, original length) and the frame without its
virtio-net header. Records are built by a compiled kernel for a whole burst and written with
one write(2) on an unbuffered fd, under a lock (TX queues of several workers share the file),
so the file holds whole records at every burst boundary, also if the process is killed.
Every frame of a burst carries the burst's timestamp.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np

from pyvhost.devices.net import frame_kernels as RK
from pyvhost.fd import OwnedFd

PCAP_MAGIC_USEC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535
GLOBAL_HEADER = struct.pack("<IHHiIII", PCAP_MAGIC_USEC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


class PcapWriter:
    """One pcap file, truncated and given its global header on open."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        # An OwnedFd: closed by close(), or when the writer is dropped.
        self._fd = OwnedFd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                   0o644))
        self.frames = 0
        self.bytes_written = 0
        try:
            self._write_all(memoryview(GLOBAL_HEADER))
        except BaseException:
            self.close()
            raise

    def write_ring(self, data: np.ndarray, lens: np.ndarray, ctl: np.ndarray,
                   out: np.ndarray) -> int:
        """Append records for the frames of a frame ring (they leave the ring); `out` is the
        caller's scratch, big enough for a full ring of records. Returns frames written."""
        now = time.time_ns() // 1000
        head = int(ctl[RK.R_HEAD])
        n = int(RK.ring_to_pcap(data, lens, ctl, out, now // 1_000_000, now % 1_000_000,
                                SNAPLEN))
        frames = int(ctl[RK.R_HEAD]) - head
        if n:
            with self._lock:
                self._write_all(out.data[:n])  # ndarray.data: memoryview(out), typed so
                self.frames += frames
        return frames

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            written = os.write(self._fd.fileno(), view)
            self.bytes_written += written
            view = view[written:]

    def close(self) -> None:
        with self._lock:
            self._fd.close()

    @property
    def closed(self) -> bool:
        return self._fd.closed
