"""vhost-user protocol numbers (QEMU docs/interop/vhost-user.rst).

Names are the spec's with the ``VHOST_USER_`` prefix dropped. The spec renamed SLAVE to BACKEND
(SET_SLAVE_REQ_FD is now SET_BACKEND_REQ_FD); only the new names are defined here.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class FrontendRequest(IntEnum):
    """Requests the front-end sends on the main socket ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Requests the back-end sends on the back-end channel ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntEnum):
    """Bit numbers of the protocol feature mask ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4  # the spec's #define says F_MTU, its prose, QEMU and DPDK say F_NET_MTU
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19

    @property
    def mask(self) -> int:
        return 1 << self.value


# Header flags ("Header"): bits 0-1 version, bit 2 reply, bit 3 need_reply.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8

HEADER_SIZE = 12

# The virtio feature bit (reserved bit 30) that announces protocol features ("Communication").
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Virtio feature bit that switches dirty logging on ("Migration").
VHOST_F_LOG_ALL = 26
# Bit of SET_VRING_ADDR flags: log writes to the used ring ("Migration").
VHOST_VRING_F_LOG = 0
VHOST_LOG_PAGE = 0x1000

# At most 8 fds ride with one message ("Back-end communication"; QEMU and DPDK use 8 too).
MAX_FDS = 8

# u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 index, bit 8 "no fd, poll instead".
# The same layout is used by the u64 of a vring area and the SET_DEVICE_STATE_FD reply.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# SET_MEM_TABLE carries at most 8 regions; with CONFIGURE_MEM_SLOTS the back-end announces more
# via GET_MAX_MEM_SLOTS (509 as in rust-vmm: KVM's 512 slots less 3 private ones).
VHOST_MEMORY_BASELINE_NREGIONS = 8
MAX_MEM_SLOTS = 509

# Virtio device config space ("Virtio device config space"); QEMU's VHOST_USER_MAX_CONFIG_SIZE.
MAX_CONFIG_SIZE = 256


class ConfigFlags(IntEnum):
    """flags of a config space message (QEMU: VHOST_SET_CONFIG_TYPE_*)."""

    FRONTEND = 0  # the guest wrote a writable field
    MIGRATION = 1  # restoring config space on a migration destination


class IotlbType(IntEnum):
    """type of struct vhost_iotlb_msg ("An IOTLB message")."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbAccess(IntFlag):
    """perm of struct vhost_iotlb_msg (Linux: VHOST_ACCESS_RO/WO/RW)."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class DeviceStateDirection(IntEnum):
    """Device state transfer parameters: transfer direction."""

    SAVE = 0
    LOAD = 1


class DeviceStatePhase(IntEnum):
    """Device state transfer parameters: migration phase."""

    STOPPED = 0
