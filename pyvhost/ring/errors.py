"""Why a queue was marked broken. Codes are shared with the compiled kernels."""

from __future__ import annotations

from enum import IntEnum


class RingErrorCode(IntEnum):
    NONE = 0
    AVAIL_IDX_JUMP = 1        # avail->idx moved more than the queue size past next_avail
    HEAD_OUT_OF_RANGE = 2     # avail ring entry >= queue size
    NEXT_OUT_OF_RANGE = 3     # descriptor next >= table length
    CHAIN_TOO_LONG = 4        # more descriptors than the table holds: a loop
    NESTED_INDIRECT = 5       # an indirect table inside an indirect table
    INDIRECT_BAD_LEN = 6      # indirect table length 0 or not a multiple of 16
    INDIRECT_WITH_NEXT = 7    # INDIRECT and NEXT both set (2.7.5.3.1: driver MUST NOT)
    LEN_OVERFLOW = 8          # chain length does not fit in 32 bits
    ADDR_UNMAPPED = 9         # a buffer or indirect table outside every region
    RING_UNMAPPED = 10        # a ring access outside every region
    READ_AFTER_WRITE = 11     # device-readable descriptor after a device-writable one
    USED_ID_OUT_OF_RANGE = 12 # the device itself pushed an id >= queue size (our bug)
    INDIRECT_NOT_NEGOTIATED = 13
    RX_NOT_WRITABLE = 14      # IN_ORDER: an RX buffer with no writable byte amid a frame's buffers
    DEVICE_FAILED = 15        # the device's own code raised while serving the queue (our side)
    PACKED_NOT_AVAIL = 16     # packed ring: NEXT into a descriptor that is not available
    HEAD_IN_FLIGHT = 17       # a head made available again while the device still holds it
    IOVA_NOT_WRITABLE = 18    # device IOTLB: a device-writable buffer at a read-only IOVA
    IOVA_NOT_READABLE = 19    # device IOTLB: a device-readable buffer at a write-only IOVA


_MESSAGES = {
    RingErrorCode.AVAIL_IDX_JUMP: "avail index moved too far (to {info})",
    RingErrorCode.HEAD_OUT_OF_RANGE: "head descriptor index {info} out of range",
    RingErrorCode.NEXT_OUT_OF_RANGE: "next descriptor index {info} out of range",
    RingErrorCode.CHAIN_TOO_LONG: "descriptor chain longer than its table (loop?) at head {info}",
    RingErrorCode.NESTED_INDIRECT: "indirect descriptor inside an indirect table (index {info})",
    RingErrorCode.INDIRECT_BAD_LEN: "indirect table length {info} not a non-zero multiple of 16",
    RingErrorCode.INDIRECT_WITH_NEXT: "descriptor {info} sets both INDIRECT and NEXT",
    RingErrorCode.LEN_OVERFLOW: "descriptor chain length overflows 32 bits at head {info}",
    RingErrorCode.ADDR_UNMAPPED: "buffer address 0x{info:x} outside every memory region",
    RingErrorCode.RING_UNMAPPED: "ring address 0x{info:x} outside every memory region",
    RingErrorCode.READ_AFTER_WRITE: "device-readable descriptor after a writable one at head {info}",
    RingErrorCode.USED_ID_OUT_OF_RANGE: "used id {info} out of range",
    RingErrorCode.INDIRECT_NOT_NEGOTIATED: "indirect descriptor {info} without INDIRECT_DESC",
    RingErrorCode.RX_NOT_WRITABLE: "receive buffer at head {info} has no device-writable byte, "
                                   "amid a frame's buffers (IN_ORDER: cannot be returned apart)",
    RingErrorCode.DEVICE_FAILED: "the device failed while serving the queue",
    RingErrorCode.PACKED_NOT_AVAIL: "descriptor {info} continues a chain but is not available "
                                    "(packed ring)",
    RingErrorCode.HEAD_IN_FLIGHT: "head {info} made available again while still in flight",
    RingErrorCode.IOVA_NOT_WRITABLE: "device write to IOVA 0x{info:x}, which the IOMMU maps "
                                     "read-only",
    RingErrorCode.IOVA_NOT_READABLE: "device read of IOVA 0x{info:x}, which the IOMMU maps "
                                     "write-only",
}


def describe(code: int, info: int) -> str:
    c = RingErrorCode(code)
    return _MESSAGES.get(c, c.name).format(info=info)


class RingError(Exception):
    """A queue was given bad input by the guest and is now broken (needs reset)."""

    def __init__(self, queue: int, code: int, info: int) -> None:
        self.queue = queue
        self.code = RingErrorCode(code)
        self.info = info
        super().__init__(f"queue {queue}: {describe(code, info)}")
