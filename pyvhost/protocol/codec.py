"""Wire format: what each message may carry, `encode_message`, and the sans-I/O `MessageReader`.

The tables below say, per request, which payload layouts are allowed (chosen by the header's
payload size) and how many fds may ride with it. They follow QEMU docs/interop/vhost-user.rst
("Front-end message types", "Back-end message types"), checked against what QEMU
(hw/virtio/vhost-user.c), DPDK and rust-vmm actually send where the text is loose.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from pyvhost.fd import OwnedFd, close_all

from .constants import (
    HEADER_SIZE,
    MAX_FDS,
    VERSION,
    VERSION_MASK,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
)
from .errors import (
    BadFds,
    BadPayloadSize,
    BadVersion,
    ConnectionBroken,
    LocalProtocolError,
    RemoteProtocolError,
    UnknownRequest,
)
from .messages import (
    EMPTY,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDesc,
    IotlbMsg,
    LogDesc,
    MemoryTable,
    Message,
    Payload,
    Raw,
    SharedObject,
    SingleMemRegion,
    U64,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
)

HEADER = struct.Struct("<III")  # request, flags, size ("Header")

# --- fd rules: payload -> allowed fd counts ------------------------------------------------

FdRule = Callable[[Payload], range]


def no_fds(payload: Payload) -> range:
    return range(0, 1)


def one_fd(payload: Payload) -> range:
    return range(1, 2)


def optional_fd(payload: Payload) -> range:
    return range(0, 2)


def fd_per_region(payload: Payload) -> range:
    """SET_MEM_TABLE: "The size and ordering of the fds matches the number and ordering of
    memory regions"."""
    assert isinstance(payload, MemoryTable)
    return range(len(payload.regions), len(payload.regions) + 1)


def fd_unless_nofd(payload: Payload) -> range:
    """SET_VRING_KICK/CALL/ERR, host notifier: bit 8 is set exactly when no fd is passed."""
    assert isinstance(payload, (VringFd, VringArea))
    return range(0, 1) if payload.nofd else range(1, 2)


def fd_unless_nofd_u64(payload: Payload) -> range:
    """SET_DEVICE_STATE_FD reply: bits 0-7 status, bit 8 no fd; an error carries no fd."""
    assert isinstance(payload, U64)
    if payload.value & VRING_NOFD_MASK or payload.value & VRING_IDX_MASK:
        return range(0, 1)
    return range(1, 2)


def fd_if_mapped(payload: Payload) -> range:
    """GET_INFLIGHT_FD reply: QEMU takes mmap_size 0 as "no inflight area" and no fd."""
    assert isinstance(payload, InflightDesc)
    return range(0, 1) if payload.mmap_size == 0 else range(1, 2)


def fd_on_success(payload: Payload) -> range:
    """SHARED_OBJECT_LOOKUP reply: "if the operation fails, no fd is sent"."""
    assert isinstance(payload, U64)
    return range(0, 2) if payload.value == 0 else range(0, 1)


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """What one message may carry: payload layouts (picked by size, first match) and fds."""

    payloads: tuple[type[Payload], ...]
    fds: FdRule = no_fds

    def payload_type(self, size: int) -> type[Payload] | None:
        return next((p for p in self.payloads if p.size_ok(size)), None)

    def max_size(self) -> int:
        return max(p.max_size() for p in self.payloads)

    def check_fds(self, payload: Payload, count: int) -> None:
        allowed = self.fds(payload)
        if count > MAX_FDS or count not in allowed:
            want = _describe(allowed)
            raise BadFds(f"{count} fds where {want} allowed")


def _describe(allowed: range) -> str:
    if len(allowed) == 1:
        return f"exactly {allowed.start}"
    return f"{allowed.start} to {allowed.stop - 1}"


def _spec(*payloads: type[Payload], fds: FdRule = no_fds) -> MessageSpec:
    return MessageSpec(payloads, fds)


F = FrontendRequest
B = BackendRequest

# Requests the back-end receives on the main socket.
FRONTEND_REQUESTS: Mapping[FrontendRequest, MessageSpec] = {
    F.GET_FEATURES: _spec(Empty),
    F.SET_FEATURES: _spec(U64),
    F.SET_OWNER: _spec(Empty),
    F.RESET_OWNER: _spec(Empty),
    F.SET_MEM_TABLE: _spec(MemoryTable, fds=fd_per_region),
    # The spec says u64; every implementation sends VhostUserLog and the log fd (LOG_SHMFD).
    F.SET_LOG_BASE: _spec(LogDesc, fds=one_fd),
    F.SET_LOG_FD: _spec(Empty, fds=one_fd),
    F.SET_VRING_NUM: _spec(VringState),
    F.SET_VRING_ADDR: _spec(VringAddr),
    F.SET_VRING_BASE: _spec(VringState),
    F.GET_VRING_BASE: _spec(VringState),
    F.SET_VRING_KICK: _spec(VringFd, fds=fd_unless_nofd),
    F.SET_VRING_CALL: _spec(VringFd, fds=fd_unless_nofd),
    F.SET_VRING_ERR: _spec(VringFd, fds=fd_unless_nofd),
    F.GET_PROTOCOL_FEATURES: _spec(Empty),
    F.SET_PROTOCOL_FEATURES: _spec(U64),
    F.GET_QUEUE_NUM: _spec(Empty),
    F.SET_VRING_ENABLE: _spec(VringState),
    F.SEND_RARP: _spec(U64),  # first 6 bytes: the guest's MAC
    F.NET_SET_MTU: _spec(U64),
    F.SET_BACKEND_REQ_FD: _spec(Empty, fds=one_fd),
    F.IOTLB_MSG: _spec(IotlbMsg),
    F.SET_VRING_ENDIAN: _spec(VringState),
    F.GET_CONFIG: _spec(ConfigSpace),
    F.SET_CONFIG: _spec(ConfigSpace),
    F.CREATE_CRYPTO_SESSION: _spec(Raw),
    F.CLOSE_CRYPTO_SESSION: _spec(U64),
    F.POSTCOPY_ADVISE: _spec(Empty),
    F.POSTCOPY_LISTEN: _spec(Empty),
    F.POSTCOPY_END: _spec(Empty),
    F.GET_INFLIGHT_FD: _spec(InflightDesc),
    F.SET_INFLIGHT_FD: _spec(InflightDesc, fds=one_fd),
    F.GPU_SET_SOCKET: _spec(Empty, fds=one_fd),
    F.RESET_DEVICE: _spec(Empty),
    F.VRING_KICK: _spec(VringState),
    F.GET_MAX_MEM_SLOTS: _spec(Empty),
    F.ADD_MEM_REG: _spec(SingleMemRegion, fds=one_fd),
    # "No file descriptors SHOULD be passed ... the back-end MAY accept messages with one file
    # descriptor. If a file descriptor is passed, the back-end MUST close it".
    F.REM_MEM_REG: _spec(SingleMemRegion, fds=optional_fd),
    F.SET_STATUS: _spec(U64),
    F.GET_STATUS: _spec(Empty),
    F.GET_SHARED_OBJECT: _spec(SharedObject),
    F.SET_DEVICE_STATE_FD: _spec(DeviceStateTransfer, fds=one_fd),
    F.CHECK_DEVICE_STATE: _spec(Empty),
}

# Replies of their own (not REPLY_ACK) that the back-end sends on the main socket.
FRONTEND_REPLIES: Mapping[FrontendRequest, MessageSpec] = {
    F.GET_FEATURES: _spec(U64),
    F.GET_PROTOCOL_FEATURES: _spec(U64),
    F.GET_VRING_BASE: _spec(VringState),
    F.GET_QUEUE_NUM: _spec(U64),
    # Only with LOG_SHMFD (see frontend_reply_spec). QEMU ignores the body: DPDK sends none,
    # libvhost-user a u64, rust-vmm echoes the log description.
    F.SET_LOG_BASE: _spec(Empty, U64, LogDesc),
    # "The back-end has to acknowledge the request with sending zero as u64 payload"; QEMU
    # always sets NEED_REPLY here and waits, with or without REPLY_ACK.
    F.IOTLB_MSG: _spec(U64),
    # "vhost-user back-end uses zero length of payload to indicate an error".
    F.GET_CONFIG: _spec(Empty, ConfigSpace),
    F.CREATE_CRYPTO_SESSION: _spec(Raw),
    # The userfaultfd; QEMU requires size 0. No fd means failure.
    F.POSTCOPY_ADVISE: _spec(Empty, fds=optional_fd),
    F.POSTCOPY_END: _spec(U64),
    F.GET_INFLIGHT_FD: _spec(InflightDesc, fds=fd_if_mapped),
    F.GET_MAX_MEM_SLOTS: _spec(U64),
    F.GET_STATUS: _spec(U64),
    # "dmabuf fd"; libvhost-user echoes the request body, QEMU only looks for the fd.
    F.GET_SHARED_OBJECT: _spec(Empty, U64, SharedObject, fds=optional_fd),
    F.SET_DEVICE_STATE_FD: _spec(U64, fds=fd_unless_nofd_u64),
    F.CHECK_DEVICE_STATE: _spec(U64),
}

# Requests the front-end receives on the back-end channel.
BACKEND_REQUESTS: Mapping[BackendRequest, MessageSpec] = {
    B.IOTLB_MSG: _spec(IotlbMsg),
    B.CONFIG_CHANGE_MSG: _spec(Empty),
    B.VRING_HOST_NOTIFIER_MSG: _spec(VringArea, fds=fd_unless_nofd),
    B.VRING_CALL: _spec(VringState),
    B.VRING_ERR: _spec(VringState),
    B.SHARED_OBJECT_ADD: _spec(SharedObject),
    B.SHARED_OBJECT_REMOVE: _spec(SharedObject),
    B.SHARED_OBJECT_LOOKUP: _spec(SharedObject),
}

# Replies of their own that the front-end sends on the back-end channel.
BACKEND_REPLIES: Mapping[BackendRequest, MessageSpec] = {
    B.SHARED_OBJECT_LOOKUP: _spec(U64, fds=fd_on_success),
}

# The REPLY_ACK reply: "a Payload VhostUserMsg indicating success or failure" (u64, 0 = ok).
ACK_SPEC = _spec(U64)


def frontend_reply_spec(request: FrontendRequest, protocol_features: int) -> MessageSpec | None:
    """The reply `request` solicits by itself, or None (then only REPLY_ACK may answer it).

    SET_LOG_BASE is answered only with LOG_SHMFD ("Communication"). The postcopy replies to
    SET_MEM_TABLE and ADD_MEM_REG are not modelled: pyvhost does not offer PAGEFAULT.
    """
    if request == F.SET_LOG_BASE and not protocol_features & ProtocolFeature.LOG_SHMFD.mask:
        return None
    return FRONTEND_REPLIES.get(request)


def backend_reply_spec(request: BackendRequest, protocol_features: int) -> MessageSpec | None:
    return BACKEND_REPLIES.get(request)


# --- encoding ------------------------------------------------------------------------------


def raw_fds(fds: Iterable[OwnedFd | int]) -> list[int]:
    """fd numbers for sendmsg; ownership does not move."""
    return [fd.fileno() if isinstance(fd, OwnedFd) else int(fd) for fd in fds]


def encode_message(
    request: int,
    payload: Payload = EMPTY,
    flags: int = VERSION,
    fds: Sequence[OwnedFd | int] = (),
) -> tuple[bytes, list[int]]:
    """Header + payload bytes, and the fd numbers to send with them in one sendmsg."""
    if len(fds) > MAX_FDS:
        raise LocalProtocolError(f"{len(fds)} fds; at most {MAX_FDS} per message", request)
    body = payload.encode()
    return HEADER.pack(int(request), flags, len(body)) + body, raw_fds(fds)


def check_outgoing(
    request: int, spec: MessageSpec, payload: Payload, fds: Sequence[object]
) -> None:
    """Refuse (LocalProtocolError) to send what our own reader would reject."""
    if not isinstance(payload, spec.payloads):
        names = ", ".join(p.__name__ for p in spec.payloads)
        msg = f"payload {type(payload).__name__}, expected one of {names}"
        raise LocalProtocolError(msg, request)
    if not type(payload).size_ok(len(payload.encode())):
        raise LocalProtocolError("payload does not fit its wire layout", request)
    try:
        spec.check_fds(payload, len(fds))
    except BadFds as exc:
        raise LocalProtocolError(exc.message, request) from None


# --- decoding ------------------------------------------------------------------------------

SpecLookup = Callable[[int, int], tuple[IntEnum, MessageSpec]]


_Request = TypeVar("_Request", bound=IntEnum)


def table_lookup(table: Mapping[_Request, MessageSpec], enum: type[_Request]) -> SpecLookup:
    """A SpecLookup for requests: known ids of `enum` that `table` describes."""

    def lookup(request_id: int, flags: int) -> tuple[IntEnum, MessageSpec]:
        try:
            request = enum(request_id)
            return request, table[request]
        except (ValueError, KeyError):
            raise UnknownRequest(f"unknown {enum.__name__} id", request_id) from None

    return lookup


@dataclass(frozen=True, slots=True)
class _Header:
    request: IntEnum
    flags: int
    size: int
    spec: MessageSpec
    payload_type: type[Payload]


class MessageReader:
    """Bytes and fds in, `Message`s out; no I/O (like h11's connection, reader half).

    Ownership: the reader owns every fd from the moment it is fed. fds fed with a chunk belong
    to the last message whose header starts in that chunk, or else to the message in progress:
    on a stream socket the fds of a sendmsg arrive with the recvmsg that returns its first
    byte, and every known sender (QEMU, DPDK, rust-vmm) sends header and payload in one
    sendmsg. On any error all fds the reader holds are closed and the reader refuses further
    use.
    """

    def __init__(self, lookup: SpecLookup) -> None:
        self._lookup = lookup
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        # (stream offset of the chunk's last byte, fds); for an empty chunk the next byte.
        self._marks: deque[tuple[int, list[OwnedFd]]] = deque()
        self._header: _Header | None = None
        self._error: RemoteProtocolError | None = None
        self._closed = False

    @classmethod
    def for_frontend_requests(cls) -> MessageReader:
        return cls(table_lookup(FRONTEND_REQUESTS, FrontendRequest))

    @classmethod
    def for_backend_requests(cls) -> MessageReader:
        return cls(table_lookup(BACKEND_REQUESTS, BackendRequest))

    @property
    def at_boundary(self) -> bool:
        """No partial message buffered: EOF now is clean."""
        return not self._buf and not self._marks

    def feed(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> None:
        fds = list(fds)
        if self._error is not None or self._closed:
            close_all(fds)
            self._refuse()
        end = self._base + len(self._buf) + len(data)
        self._buf += data
        if fds:
            self._marks.append((end - 1 if data else end, fds))

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._error is not None or self._closed:
            self._refuse()
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def messages(self) -> list[Message]:
        """Every complete message buffered. On error, those already parsed are closed too."""
        out: list[Message] = []
        try:
            while (msg := self.next_message()) is not None:
                out.append(msg)
        except RemoteProtocolError:
            for msg in out:
                msg.close_fds()
            raise
        return out

    def close(self) -> None:
        """Drop buffered bytes and close every fd not yet handed out in a Message."""
        self._closed = True
        self._drop()

    def _parse(self) -> Message | None:
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            self._header = self._parse_header()
        hdr = self._header
        end = HEADER_SIZE + hdr.size
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[HEADER_SIZE:end])
        fds = self._take_fds(self._base + end)
        del self._buf[:end]
        self._base += end
        self._header = None
        return _build(hdr, data, fds)

    def _parse_header(self) -> _Header:
        request_id, flags, size = HEADER.unpack_from(self._buf)
        # "Lower 2 bits are the version (currently 0x01)"; other bits are flags.
        if flags & VERSION_MASK != VERSION:
            raise BadVersion(f"version {flags & VERSION_MASK}, expected {VERSION}", request_id)
        request, spec = self._lookup(request_id, flags)
        payload_type = spec.payload_type(size)
        if payload_type is None:
            raise BadPayloadSize(_size_error(size, spec), request)
        return _Header(request, flags, size, spec, payload_type)

    def _take_fds(self, end: int) -> list[OwnedFd]:
        """fds of every chunk whose mark falls inside the message ending at stream offset end."""
        fds: list[OwnedFd] = []
        while self._marks and self._marks[0][0] < end:
            fds += self._marks.popleft()[1]
        return fds

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._drop()

    def _drop(self) -> None:
        while self._marks:
            close_all(self._marks.popleft()[1])
        self._buf.clear()
        self._header = None

    def _refuse(self) -> None:
        if self._error is not None:
            err = self._error
            msg = f"reader unusable after an earlier error: {err.message}"
            raise ConnectionBroken(msg, err.request) from err
        raise LocalProtocolError("reader used after close()")


def _size_error(size: int, spec: MessageSpec) -> str:
    allowed = [n for n in range(spec.max_size() + 1) if spec.payload_type(n) is not None]
    if len(allowed) <= 4:
        return f"payload size {size}, allowed {allowed}"
    return f"payload size {size}, allowed {allowed[0]}..{allowed[-1]} (layout dependent)"


def _build(hdr: _Header, data: bytes, fds: list[OwnedFd]) -> Message:
    """Decode the payload and check the fds; on failure the fds are closed here."""
    try:
        payload = hdr.payload_type.decode(data)
        hdr.spec.check_fds(payload, len(fds))
    except RemoteProtocolError as exc:
        close_all(fds)
        exc.request = hdr.request
        raise
    return Message(hdr.request, hdr.flags, payload, tuple(fds))  # type: ignore[arg-type]
