"""A vhost-user front-end in Python (the role QEMU or DPDK virtio-user plays), for tests and
benchmarks.

`VhostUserFrontend` owns one Unix stream socket to a back-end and every fd it creates (kick and
call eventfds); `close()` closes them all. Guest memory is a `GuestRam` and each queue's driver
side a `MockSplitQueue`; the front-end only lends their fds to sendmsg, which copies them.

Requests go through the sans-I/O `FrontendProtocol`, so they are checked and encoded exactly as
the codec's tests say. Replies are read one message at a time (header, then exactly `size`
payload bytes), so the stream never has to be split between readers: a reply to a request sent
with `send_raw()` (which the protocol never saw) is decoded here, leniently, instead.

Every wait has a deadline (`timeout`, default DEFAULT_TIMEOUT) and ends in `FrontendTimeout`;
nothing blocks forever. A timeout or error in the middle of a message leaves the stream out of
step, so the front-end then refuses further use.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvhost.fd import OwnedFd, close_all
from pyvhost.protocol import (
    EMPTY,
    FRONTEND_REPLIES,
    BackendRequest,
    FrontendChannel,
    IotlbMsg,
    MAX_FDS,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    FrontendProtocol,
    FrontendRequest,
    InflightDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    Raw,
    RemoteProtocolError,
    SingleMemRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.protocol.codec import HEADER, frontend_reply_spec
from pyvhost.protocol.constants import IotlbType
from pyvhost.testing.driver import MockSplitQueue, RingAddresses
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.guest_ram import GuestRam, Region

R = FrontendRequest
P = ProtocolFeature

DEFAULT_TIMEOUT = 5.0
VIRTIO_F_IOMMU_PLATFORM = 33
PAGE = 4096

#: What a vIOMMU answers to an IOTLB miss (iova, access 1 read / 2 write): the UPDATEs to send
#: as (iova, size, user address, perm), or none (an IOVA it does not map).
MissHandler = Callable[[int, int], "list[tuple[int, int, int, int]]"]

# struct virtio_net_hdr_mrg_rxbuf (virtio 1.x 5.1.6): the header is 12 bytes whenever
# VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated; num_buffers is its last u16.
NET_HDR_LEN = 12
NUM_BUFFERS_OFFSET = 10
VIRTIO_NET_F_MRG_RXBUF = 15  # 5.1.3; not imported from devices/ to keep numba out of here

# A reply larger than this is garbage (the largest real one is a 268-byte config space).
MAX_REPLY_SIZE = 64 * 1024
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# How often a wait for used buffers looks at the ring when no call eventfd wakes it.
_USED_POLL_S = 0.001


class FrontendError(Exception):
    """Base of everything the front-end raises about the back-end or the connection."""


class FrontendTimeout(FrontendError, TimeoutError):
    """A wait ran past its deadline."""


class BackendClosed(FrontendError):
    """The back-end closed the connection (EOF, EPIPE, ECONNRESET)."""


class RequestFailed(FrontendError):
    """A REPLY_ACK ack carried a non-zero status, or a reply said "no" in its own way."""

    def __init__(self, request: int, status: int, detail: str = "") -> None:
        name = getattr(request, "name", str(request))
        super().__init__(f"back-end refused {name}: {detail or f'ack status {status}'}")
        self.request = request
        self.status = status


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What `negotiate()` agreed on."""

    features: int
    protocol_features: int
    queue_num: int | None  # GET_QUEUE_NUM's answer, when MQ was negotiated

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature.mask)


@dataclass(slots=True)
class InflightShm:
    """An inflight area the back-end allocated (GET_INFLIGHT_FD), kept by the front-end across
    back-end restarts as QEMU keeps it; the caller owns it (`close()`)."""

    fd: OwnedFd
    size: int
    offset: int
    num_queues: int
    queue_size: int

    @property
    def desc(self) -> InflightDesc:
        return InflightDesc(self.size, self.offset, self.num_queues, self.queue_size)

    def read(self) -> bytes:
        """The whole area as it is now."""
        return os.pread(self.fd.fileno(), self.size, self.offset)

    def close(self) -> None:
        self.fd.close()


@dataclass(slots=True)
class _Queue:
    driver: MockSplitQueue | MockPackedQueue
    kick: OwnedFd | None
    call: OwnedFd | None
    rx_partial: list[bytes] = field(default_factory=list)  # a mergeable frame still arriving
    rx_buffers_left: int = 0  # its buffers still to come
    rx_header: bytes = b""  # the virtio-net header of the frame arriving


class VhostUserFrontend:
    """One vhost-user connection, front-end side. A context manager; `close()` is idempotent."""

    def __init__(self, path: str | None = None, *, connect_timeout: float = DEFAULT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT, sock: socket.socket | None = None) -> None:
        """Connect to the back-end listening at `path`, retrying until `connect_timeout` (a
        back-end usually binds its socket a moment after it is started); or adopt `sock`, an
        already connected stream (e.g. one end of a socketpair), which is then ours to close."""
        if (path is None) == (sock is None):
            raise ValueError("give exactly one of path and sock")
        self.timeout = timeout
        self.negotiated: Negotiated | None = None
        self._proto = FrontendProtocol()
        self._pending: deque[int | None] = deque()  # per awaited reply: None, or raw request id
        self._queues: dict[int, _Queue] = {}
        self._broken: str | None = None
        self._closed = False
        # One request and its reply at a time: the IOTLB miss thread sends UPDATEs too.
        self._lock = threading.RLock()
        #: Device IOTLB: the back-end channel (SET_BACKEND_REQ_FD), its reader, the misses it
        #: received (iova, access) and the UPDATEs sent for them.
        self._backend_sock: socket.socket | None = None
        self._miss_thread: threading.Thread | None = None
        self.misses: list[tuple[int, int]] = []
        self.miss_updates = 0
        if sock is None:
            assert path is not None  # checked above: exactly one of them is given
            sock = _connect(path, connect_timeout)
        self._sock = sock

    @classmethod
    def listen(cls, path: str, *, accept_timeout: float = DEFAULT_TIMEOUT,
               timeout: float = DEFAULT_TIMEOUT) -> VhostUserFrontend:
        """Listen at `path` and accept one back-end (its client mode, QEMU's `server=on`).
        The listening socket is closed and `path` unlinked once it has connected."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as lsock:
            lsock.bind(path)
            try:
                lsock.listen(1)
                lsock.settimeout(accept_timeout)
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    raise FrontendTimeout(f"no back-end connected to {path} within "
                                          f"{accept_timeout} s") from None
            finally:
                os.unlink(path)
        return cls(sock=conn, timeout=timeout)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every eventfd this front-end created."""
        if self._closed:
            return
        self._closed = True
        if self._backend_sock is not None:
            self._backend_sock.shutdown(socket.SHUT_RDWR)
            if self._miss_thread is not None:
                self._miss_thread.join(self.timeout)
            self._backend_sock.close()
        for q in self._queues.values():
            close_all([fd for fd in (q.kick, q.call) if fd is not None])
        self._queues.clear()
        self._proto.close()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level: requests and replies -------------------------------------------------------

    def send(self, req: FrontendRequest, payload: Payload = EMPTY,
             fds: Sequence[OwnedFd | int] = (), need_reply: bool = False) -> bool:
        """Send a request without waiting. True when an answer is now awaited (the request's
        own reply, or an ack for NEED_REPLY under REPLY_ACK); collect it with recv_reply()."""
        self._check_usable()
        data, raw = self._proto.send_request(req, payload, fds, need_reply)
        awaited = self._awaits(req, need_reply)
        if awaited:
            self._pending.append(None)
        self._sendmsg(data, raw)
        return awaited

    def request(self, req: FrontendRequest, payload: Payload = EMPTY,
                fds: Sequence[OwnedFd | int] = (), need_reply: bool = False,
                timeout: float | None = None) -> Payload | None:
        """Send a request and wait for its answer: the reply payload, or None when there is
        none (or the ack said 0). A failing ack raises RequestFailed. fds that ride with a
        reply are closed; use send() + recv_reply() to keep them."""
        with self._lock:
            if self._pending:
                raise FrontendError(f"{len(self._pending)} earlier replies not yet collected; "
                                    "call recv_reply() first")
            if not self.send(req, payload, fds, need_reply):
                return None
            with self.recv_reply(timeout) as reply:
                if _own_reply(req, self._proto.negotiation.protocol_features):
                    return reply.payload
                _check_ack(reply)
                return None

    def send_raw(self, data: bytes, fds: Sequence[OwnedFd | int] = (), *,
                 expect_reply: bool = False) -> None:
        """Send bytes as they are (hostile tests: e.g. from `encode_message`), bypassing the
        protocol's checks. With expect_reply, the next answer is read as the reply to this
        message's request id, whatever its layout."""
        self._check_usable()
        if expect_reply:
            if len(data) < HEADER.size:
                raise ValueError("expect_reply needs at least a header to know the request")
            self._pending.append(HEADER.unpack_from(data)[0])
        self._sendmsg(data, [fd.fileno() if isinstance(fd, OwnedFd) else fd for fd in fds])

    def recv_reply(self, timeout: float | None = None) -> Message:
        """The next awaited reply, as a Message that owns its fds (use it in a `with`)."""
        self._check_usable()
        if not self._pending:
            raise FrontendError("no reply is awaited")
        data, fds = self._recv_message(self._deadline(timeout))
        raw_id = self._pending.popleft()
        if raw_id is not None:
            return _decode_raw_reply(raw_id, data, fds)
        return self._decode_reply(data, fds)

    def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for the back-end to close the connection (e.g. after a hostile message);
        raises FrontendError if it sends anything instead."""
        deadline = self._deadline(timeout)
        try:
            data, fds = self._recv_message(deadline)
        except BackendClosed:
            return
        close_all(fds)
        self._broken = "wait_closed() got a message"
        raise FrontendError(f"expected the back-end to close, got {len(data)} bytes")

    # -- negotiation ---------------------------------------------------------------------------

    def negotiate(self, features_wanted: int, protocol_features_wanted: int = 0) -> Negotiated:
        """Agree on features as QEMU does: GET_FEATURES, then (if bit 30 is offered)
        GET/SET_PROTOCOL_FEATURES and GET_QUEUE_NUM (if MQ), SET_OWNER, and SET_FEATURES last
        (QEMU and DPDK send it at device start, after the protocol features). Each side gets
        the intersection of what was offered and wanted; bit 30 is kept whenever offered."""
        offered = self._get_u64(R.GET_FEATURES)
        bit30 = offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        features = (offered & features_wanted) | bit30
        protocol = queue_num = None
        if bit30:
            protocol = self._get_u64(R.GET_PROTOCOL_FEATURES) & protocol_features_wanted
            # The new features govern this very message, so it can already ask for an ack.
            self.request(R.SET_PROTOCOL_FEATURES, U64(protocol),
                         need_reply=bool(protocol & P.REPLY_ACK.mask))
            if protocol & P.MQ.mask:
                queue_num = self._get_u64(R.GET_QUEUE_NUM)
        self._acked(R.SET_OWNER)
        self._acked(R.SET_FEATURES, U64(features))
        self.negotiated = Negotiated(features, protocol or 0, queue_num)
        return self.negotiated

    # -- memory --------------------------------------------------------------------------------

    def set_mem_table(self, ram: GuestRam) -> None:
        """SET_MEM_TABLE with every region of `ram`, one fd per region. More than 8 regions
        is our mistake: the codec raises LocalProtocolError (use add_mem_reg beyond 8)."""
        regions = tuple(_region_desc(r) for r in ram.regions)
        fds = [r.fd for r in ram.regions]
        self._acked(R.SET_MEM_TABLE, MemoryTable(regions), fds)

    def add_mem_reg(self, ram: GuestRam, gpa: int) -> None:
        """ADD_MEM_REG for the region of `ram` starting at `gpa` (needs CONFIGURE_MEM_SLOTS)."""
        self._require(P.CONFIGURE_MEM_SLOTS)
        region = ram.region(gpa)
        self._acked(R.ADD_MEM_REG, SingleMemRegion(_region_desc(region)), [region.fd])

    def rem_mem_reg(self, ram: GuestRam, gpa: int) -> None:
        """REM_MEM_REG for the region starting at `gpa`; call it before ram.remove_region()."""
        self._require(P.CONFIGURE_MEM_SLOTS)
        self._acked(R.REM_MEM_REG, SingleMemRegion(_region_desc(ram.region(gpa))))

    def get_max_mem_slots(self) -> int:
        self._require(P.CONFIGURE_MEM_SLOTS)
        return self._get_u64(R.GET_MAX_MEM_SLOTS)

    # -- inflight I/O tracking ----------------------------------------------------------------

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightShm | None:
        """GET_INFLIGHT_FD: the back-end's area for num_queues queues of queue_size entries,
        or None when it gives none (mmap_size 0). Send it with set_inflight_fd before the
        rings start, on this connection and on those after a back-end restart."""
        self._require(P.INFLIGHT_SHMFD)
        self.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, num_queues, queue_size))
        with self.recv_reply() as reply:
            d = reply.payload
            assert isinstance(d, InflightDesc)
            if d.mmap_size == 0:
                return None
            return InflightShm(reply.take_fd(), d.mmap_size, d.mmap_offset, d.num_queues,
                               d.queue_size)

    def set_inflight_fd(self, shm: InflightShm | InflightDesc, fd: OwnedFd | int | None = None
                        ) -> None:
        """SET_INFLIGHT_FD with an area (or, for hostile tests, any description and fd)."""
        if isinstance(shm, InflightShm):
            desc, fd = shm.desc, shm.fd
        else:
            desc = shm
        assert fd is not None
        self._acked(R.SET_INFLIGHT_FD, desc, [fd])

    # -- device IOTLB (VIRTIO_F_IOMMU_PLATFORM) -------------------------------------------------

    @property
    def iotlb(self) -> bool:
        """VIRTIO_F_IOMMU_PLATFORM negotiated: ring and buffer addresses are IOVAs."""
        return bool(self.negotiated and self.negotiated.features >> VIRTIO_F_IOMMU_PLATFORM & 1)

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int = 3) -> None:
        """IOTLB_MSG UPDATE (QEMU: always NEED_REPLY); a refusal raises RequestFailed."""
        self._iotlb_msg(IotlbMsg(iova, size, uaddr, perm, IotlbType.UPDATE))

    def iotlb_invalidate(self, iova: int, size: int) -> None:
        """IOTLB_MSG INVALIDATE of [iova, iova+size); returns once the back-end acked it."""
        self._iotlb_msg(IotlbMsg(iova, size, 0, 0, IotlbType.INVALIDATE))

    def _iotlb_msg(self, msg: IotlbMsg) -> None:
        reply = self.request(R.IOTLB_MSG, msg, need_reply=True)
        assert isinstance(reply, U64)
        if reply.value != 0:
            raise RequestFailed(R.IOTLB_MSG, reply.value)

    def serve_iotlb_misses(self, handler: MissHandler) -> None:
        """SET_BACKEND_REQ_FD, and a thread that answers each IOTLB miss the back-end sends
        with the UPDATEs `handler` gives (on the main socket, between this front-end's other
        requests, as QEMU does). Needs BACKEND_REQ and REPLY_ACK negotiated."""
        self._require(P.BACKEND_REQ)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._acked(R.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()])
        finally:
            theirs.close()
        self._backend_sock = ours
        channel = FrontendChannel(self._proto.negotiation)
        self._miss_thread = threading.Thread(target=self._serve_misses,
                                             args=(ours, channel, handler),
                                             name="frontend-iotlb", daemon=True)
        self._miss_thread.start()

    def _serve_misses(self, sock: socket.socket, channel: FrontendChannel,
                      handler: MissHandler) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            for msg in channel.receive(data):
                with msg:
                    p = msg.payload
                    if msg.request != BackendRequest.IOTLB_MSG or not isinstance(p, IotlbMsg) \
                            or p.type != IotlbType.MISS:
                        continue
                    self.misses.append((p.iova, p.perm))
                    for iova, size, uaddr, perm in handler(p.iova, p.perm):
                        if self._closed:
                            return
                        try:
                            self.iotlb_update(iova, size, uaddr, perm)
                        except FrontendError:
                            continue
                        self.miss_updates += 1

    def identity_pages(self, ram: GuestRam, iova_offset: int, perm: int = 3) -> MissHandler:
        """A vIOMMU that maps IOVA `gpa + iova_offset` to every page of `ram`, one 4 KiB page
        per UPDATE (what QEMU sends)."""
        def handler(iova: int, _access: int) -> list[tuple[int, int, int, int]]:
            page = iova & ~(PAGE - 1)
            try:
                uaddr = ram.gpa_to_user(page - iova_offset)
            except Exception:
                return []
            return [(page, PAGE, uaddr, perm)]
        return handler

    # -- queues --------------------------------------------------------------------------------

    def setup_queue(self, index: int, driver: MockSplitQueue | MockPackedQueue, *, kick: bool = True,
                    call: bool = True) -> None:
        """SET_VRING_NUM, _ADDR (the driver's user addresses), _BASE, _CALL, then _KICK, which
        starts the ring. kick/call False send NOFD (the back-end polls / does not notify)."""
        old = self._queues.pop(index, None)
        q = _Queue(driver, _eventfd() if kick else None, _eventfd() if call else None)
        self._queues[index] = q  # owned from here, so close() reaches the new eventfds
        self._acked(R.SET_VRING_NUM, VringState(index, driver.size))
        self.set_vring_addr(index)
        self._acked(R.SET_VRING_BASE, VringState(index, driver.vring_base))
        self._acked(R.SET_VRING_CALL, VringFd(index, q.call is None), _fds(q.call))
        self._acked(R.SET_VRING_KICK, VringFd(index, q.kick is None), _fds(q.kick))
        if old is not None:  # the back-end has its own copies of the fds it replaced
            close_all([fd for fd in (old.kick, old.call) if fd is not None])

    def set_vring_addr(self, index: int, addrs: RingAddresses | None = None, *,
                       flags: int = 0, log: int = 0) -> None:
        """SET_VRING_ADDR; by default the queue's driver's current user addresses (after e.g.
        ram.move_region(), to move the rings)."""
        if addrs is None:
            driver = self._queue(index).driver
            if self.iotlb and isinstance(driver, MockSplitQueue):
                addrs = driver.iova_addresses()  # behind a vIOMMU (split driver only)
            else:
                addrs = driver.ring_addresses().user
        payload = VringAddr(index, flags, addrs.desc_table, addrs.used_ring, addrs.avail_ring,
                            log)
        self._acked(R.SET_VRING_ADDR, payload)

    def enable_queue(self, index: int, on: bool = True) -> None:
        self._acked(R.SET_VRING_ENABLE, VringState(index, int(on)))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring; the back-end's next avail index."""
        reply = self.request(R.GET_VRING_BASE, VringState(index, 0))
        assert isinstance(reply, VringState)
        if reply.index != index:
            raise FrontendError(f"GET_VRING_BASE for queue {index} answered for {reply.index}")
        return reply.num

    def kick(self, index: int) -> None:
        """Available-buffer notification: write the queue's kick eventfd."""
        q = self._queue(index)
        if q.kick is None:
            raise FrontendError(f"queue {index} was set up without a kick fd")
        os.eventfd_write(q.kick.fileno(), 1)

    def queue_fds(self, index: int) -> tuple[int, int]:
        """The queue's kick and call eventfd numbers (-1 for NOFD), for a driver loop that
        notifies by itself (pyvhost.testing.blk_frontend); they stay ours to close."""
        q = self._queue(index)
        return (q.kick.fileno() if q.kick is not None else -1,
                q.call.fileno() if q.call is not None else -1)

    def wait_call(self, index: int, timeout: float | None = None) -> int:
        """Wait for a used-buffer notification on the queue's call eventfd; returns the
        eventfd counter (calls since the last wait)."""
        q = self._queue(index)
        if q.call is None:
            raise FrontendError(f"queue {index} was set up without a call fd")
        if not _readable(q.call, self._deadline(timeout)):
            raise FrontendTimeout(f"no call on queue {index} within {self._timeout(timeout)} s")
        return os.eventfd_read(q.call.fileno())

    def driver(self, index: int) -> MockSplitQueue | MockPackedQueue:
        return self._queue(index).driver

    # -- virtio-net ----------------------------------------------------------------------------

    def send_frames(self, index: int, frames: Sequence[bytes],
                    timeout: float | None = None, header: bytes | None = None) -> None:
        """Transmit each frame as one readable chain (12-byte header, zero unless `header`
        is given, + frame), publishing and kicking (when the ring asks for it) as the ring
        fills. Waits for completions to free descriptors when needed (draining the call
        eventfd while it waits); returns once every frame is in the ring."""
        q, deadline = self._queue(index), self._deadline(timeout)
        pending = list(frames)
        while pending:
            q.driver.used()  # reclaim the descriptors of completed chains
            room = min(len(pending), q.driver.num_free)
            if room == 0:
                self._wait_used(q, deadline, f"TX queue {index} stayed full")
                continue
            zero = bytes(NET_HDR_LEN) if header is None else header
            for frame in pending[:room]:
                q.driver.add_chain([zero + frame], [])
            del pending[:room]
            self._publish(index, q)

    def wait_tx_done(self, index: int, timeout: float | None = None) -> None:
        """Wait until the back-end has returned every chain of the queue (draining the call
        eventfd while it waits)."""
        q, deadline = self._queue(index), self._deadline(timeout)
        q.driver.used()
        while q.driver.in_flight:
            self._wait_used(q, deadline, f"queue {index} still has {q.driver.in_flight} chains")
            q.driver.used()

    def post_rx_buffers(self, index: int, n: int, size: int) -> None:
        """Offer `n` device-writable chains of `size` bytes each, publish, kick if asked."""
        q = self._queue(index)
        for _ in range(n):
            q.driver.add_chain([], [size])
        self._publish(index, q)

    def received_frames(self, index: int) -> list[bytes]:
        """Frames the back-end placed in RX buffers since the last call, headers stripped.
        With MRG_RXBUF a frame spans num_buffers used buffers (5.1.6.4); a frame whose buffers
        have not all arrived is kept for the next call."""
        return [frame for _, frame in self.received_frames_with_headers(index)]

    def received_frames_with_headers(self, index: int) -> list[tuple[bytes, bytes]]:
        """received_frames, each with its 12-byte virtio-net header: (header, frame)."""
        q = self._queue(index)
        frames = []
        for head, _ in q.driver.used():
            frame = self._rx_buffer(q, q.driver.written_data(head))
            if frame is not None:
                frames.append((q.rx_header, frame))
        return frames

    # -- config and status ---------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; an empty reply is the back-end's "no" (RequestFailed)."""
        reply = self.request(R.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)))
        if not isinstance(reply, ConfigSpace):
            raise RequestFailed(R.GET_CONFIG, 1, "empty reply")
        if (reply.offset, reply.size) != (offset, size):
            raise FrontendError(f"GET_CONFIG for {size} bytes at {offset} answered with "
                                f"{reply.size} at {reply.offset}")
        return reply.payload

    def set_status(self, status: int) -> None:
        self._acked(R.SET_STATUS, U64(status))

    def get_status(self) -> int:
        return self._get_u64(R.GET_STATUS)

    def reset_device(self) -> None:
        """RESET_DEVICE: the back-end stops every ring and forgets their state."""
        self._acked(R.RESET_DEVICE)

    # -- internals: requests -------------------------------------------------------------------

    def _acked(self, req: FrontendRequest, payload: Payload = EMPTY,
               fds: Sequence[OwnedFd | int] = ()) -> None:
        """Send a request that has no reply of its own, asking for an ack when REPLY_ACK is on,
        as QEMU does, so a refusal surfaces here rather than at some later request."""
        self.request(req, payload, fds, need_reply=self._proto.negotiation.reply_ack)

    def _get_u64(self, req: FrontendRequest) -> int:
        reply = self.request(req)
        assert isinstance(reply, U64)
        return reply.value

    def _awaits(self, req: FrontendRequest, need_reply: bool) -> bool:
        # After send_request, so a SET_PROTOCOL_FEATURES turning REPLY_ACK on counts, as in
        # the protocol's own bookkeeping.
        features = self._proto.negotiation.protocol_features
        return _own_reply(req, features) or (need_reply and self._proto.negotiation.reply_ack)

    def _decode_reply(self, data: bytes, fds: list[OwnedFd]) -> Message:
        try:
            (reply,) = self._proto.receive(data, fds)
        except RemoteProtocolError as exc:
            self._broken = f"back-end broke the protocol: {exc}"
            raise FrontendError(self._broken) from exc
        return reply

    def _require(self, feature: ProtocolFeature) -> None:
        if not self._proto.negotiation.has(feature):
            raise FrontendError(f"protocol feature {feature.name} was not negotiated")

    def _queue(self, index: int) -> _Queue:
        if self._closed:
            raise FrontendError("front-end is closed")
        try:
            return self._queues[index]
        except KeyError:
            raise FrontendError(f"queue {index} was not set up") from None

    # -- internals: rings ----------------------------------------------------------------------

    def _publish(self, index: int, q: _Queue) -> None:
        q.driver.publish()
        if q.driver.needs_kick() and q.kick is not None:
            self.kick(index)

    def _wait_used(self, q: _Queue, deadline: float, what: str) -> None:
        """Return once used->idx moves past what used() consumed. The call eventfd wakes us
        when the back-end notifies; polling covers suppressed notifications and NOFD."""
        while not q.driver.has_used():
            if time.monotonic() >= deadline:
                raise FrontendTimeout(f"{what}: no used buffers before the deadline")
            if q.call is None:
                time.sleep(_USED_POLL_S)
            elif _readable(q.call, min(deadline, time.monotonic() + 0.05)):
                os.eventfd_read(q.call.fileno())

    def _rx_buffer(self, q: _Queue, data: bytes) -> bytes | None:
        """One used RX buffer in; a whole frame out once all its buffers are in."""
        if q.rx_buffers_left == 0:  # the first buffer of a frame: it carries the header
            if len(data) < NET_HDR_LEN:
                raise FrontendError(f"RX buffer of {len(data)} bytes has no virtio-net header")
            q.rx_buffers_left = self._num_buffers(data)
            q.rx_header = data[:NET_HDR_LEN]
            data = data[NET_HDR_LEN:]
        q.rx_partial.append(data)
        q.rx_buffers_left -= 1
        if q.rx_buffers_left:
            return None
        frame, q.rx_partial = b"".join(q.rx_partial), []
        return frame

    def _num_buffers(self, header: bytes) -> int:
        features = self.negotiated.features if self.negotiated is not None else 0
        # Without MRG_RXBUF every buffer holds one whole frame (5.1.6.4: the device sets
        # num_buffers to 1), so the field is not trusted.
        if not features >> VIRTIO_NET_F_MRG_RXBUF & 1:
            return 1
        (n,) = struct.unpack_from("<H", header, NUM_BUFFERS_OFFSET)
        if n == 0:
            raise FrontendError("RX header says num_buffers 0")
        return n

    # -- internals: the socket -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise FrontendError("front-end is closed")
        if self._broken is not None:
            raise FrontendError(f"connection unusable: {self._broken}")

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + self._timeout(timeout)

    def _sendmsg(self, data: bytes, fds: Sequence[int]) -> None:
        """Header, payload and fds in one sendmsg, as QEMU, DPDK and rust-vmm send them."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.settimeout(self.timeout)
        try:
            sent = self._sock.sendmsg([data], anc)
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except TimeoutError:
            self._broken = "send timed out"
            raise FrontendTimeout(f"send of {len(data)} bytes timed out") from None
        except OSError as exc:
            self._broken = f"send failed: {exc}"
            raise _socket_error(exc, "send") from exc

    def _recv_message(self, deadline: float) -> tuple[bytes, list[OwnedFd]]:
        """Exactly one message (header + `size` payload bytes) and the fds that came with it."""
        fds: list[OwnedFd] = []
        try:
            head = self._recv_exact(HEADER.size, fds, deadline, first=True)
            size = HEADER.unpack(head)[2]
            if size > MAX_REPLY_SIZE:
                self._broken = f"reply header announces {size} bytes"
                raise FrontendError(self._broken)
            return head + self._recv_exact(size, fds, deadline, first=False), fds
        except BaseException:
            close_all(fds)
            raise

    def _recv_exact(self, n: int, fds: list[OwnedFd], deadline: float, *, first: bool) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._recv_chunk(n - len(buf), fds, deadline, clean=first and not buf)
            buf += chunk
        return bytes(buf)

    def _recv_chunk(self, n: int, fds: list[OwnedFd], deadline: float, *, clean: bool) -> bytes:
        """One recvmsg. A timeout before any byte of a message leaves the stream in step (the
        reply may still come); a timeout or EOF inside a message does not."""
        self._sock.settimeout(_remaining(deadline))
        try:
            data, anc, flags, _ = self._sock.recvmsg(n, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            if not clean:
                self._broken = "timed out inside a reply"
            raise FrontendTimeout("no reply from the back-end before the deadline") from None
        except OSError as exc:
            self._broken = f"receive failed: {exc}"
            raise _socket_error(exc, "receive") from exc
        fds.extend(_take_fds(anc))
        if flags & socket.MSG_CTRUNC:
            self._broken = "fds truncated (MSG_CTRUNC)"
            raise FrontendError(f"back-end sent more than {MAX_FDS} fds with one reply")
        if not data:
            if not clean:
                self._broken = "EOF inside a reply"
            raise BackendClosed("the back-end closed the connection")
        return data


# -- module helpers --------------------------------------------------------------------------


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect, retrying while the back-end has not bound or is not yet accepting."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(path)
            return sock
        except TimeoutError:
            sock.close()
            raise FrontendTimeout(f"connecting to {path} timed out") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise FrontendTimeout(f"cannot connect to {path} within {timeout} s: "
                                      f"{exc}") from None
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise


def _remaining(deadline: float) -> float:
    # Never 0: settimeout(0) would make the socket non-blocking (EAGAIN, not a timeout).
    return max(deadline - time.monotonic(), 1e-4)


def _eventfd() -> OwnedFd:
    # Non-blocking so wait_call() never blocks in eventfd_read after poll said readable.
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def _fds(fd: OwnedFd | None) -> list[OwnedFd]:
    return [] if fd is None else [fd]


def _readable(fd: OwnedFd, deadline: float) -> bool:
    poller = select.poll()
    poller.register(fd.fileno(), select.POLLIN)
    ms = max(0, int((deadline - time.monotonic()) * 1000))
    return bool(poller.poll(ms))


def _take_fds(anc: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    """Wrap every received fd at once, so nothing later can leak it."""
    out: list[OwnedFd] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            out.extend(OwnedFd(fd) for fd in fds)
    return out


def _socket_error(exc: OSError, what: str) -> FrontendError:
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        return BackendClosed(f"the back-end closed the connection ({what}: {exc.strerror})")
    return FrontendError(f"{what} failed: {exc}")


def _own_reply(req: FrontendRequest, protocol_features: int) -> bool:
    return frontend_reply_spec(req, protocol_features) is not None


def _check_ack(reply: Message) -> None:
    assert isinstance(reply.payload, U64)
    if reply.payload.value != 0:
        raise RequestFailed(reply.request, reply.payload.value)


def _region_desc(r: Region) -> MemoryRegionDesc:
    return MemoryRegionDesc(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)


def _decode_raw_reply(request_id: int, data: bytes, fds: list[OwnedFd]) -> Message:
    """Lenient decoding of the answer to a send_raw() message: the id must match; the payload
    is the request's own reply layout when its size fits one, a u64 (an ack) when 8 bytes,
    else Raw. The caller owns the fds in the returned Message."""
    rid, flags, size = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    if rid != request_id:
        close_all(fds)
        raise FrontendError(f"reply for request {rid} while awaiting one for {request_id}")
    try:
        request: FrontendRequest | int = FrontendRequest(rid)
    except ValueError:
        request = rid
    spec = FRONTEND_REPLIES.get(request) if isinstance(request, FrontendRequest) else None
    layout = spec.payload_type(size) if spec is not None else None
    layout = layout or (U64 if size == 8 else Raw)
    try:
        payload = layout.decode(body)
    except (RemoteProtocolError, struct.error, ValueError):  # fields contradict: keep bytes
        payload = Raw(body)
    return Message(request, flags, payload, tuple(fds))  # type: ignore[arg-type]
