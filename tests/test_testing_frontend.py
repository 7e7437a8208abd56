"""Tests of the test-double front-end (pyvhost.testing.frontend).

`_Backend` is a minimal back-end made directly from `BackendProtocol` on a thread: it answers
the GET_* requests and acks, and records every message (with its fds) so the tests can check
what the front-end really put on the wire: region fds that map the guest's memory, the
driver's user ring addresses, eventfds for kick and call. `_Device` plays the device side of
a ring straight from GuestRam, following the ring addresses the front-end sent. The last test
runs the front-end against the real daemon (pyvhost.daemon.server).
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator

import pytest

from pyvhost.fd import OwnedFd
from pyvhost.protocol import (
    NEED_REPLY,
    U64,
    VERSION,
    BackendProtocol,
    ConfigSpace,
    FrontendRequest,
    Message,
    ProtocolFeature,
    RemoteProtocolError,
    VringState,
    encode_message,
)
from pyvhost.protocol.constants import VHOST_USER_F_PROTOCOL_FEATURES
from pyvhost.ring.layout import (
    AVAIL_IDX,
    AVAIL_RING,
    USED_IDX,
    USED_RING,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import (
    NET_HDR_LEN,
    VIRTIO_NET_F_MRG_RXBUF,
    BackendClosed,
    FrontendError,
    FrontendTimeout,
    RequestFailed,
    VhostUserFrontend,
)
from pyvhost.testing.guest_ram import GuestRam

R = FrontendRequest
P = ProtocolFeature
MiB = 1 << 20
PAGE = mmap.PAGESIZE
BIT30 = 1 << VHOST_USER_F_PROTOCOL_FEATURES
ALL_PROTOCOL = sum(f.mask for f in P)
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF) | BIT30
CONFIG = bytes(range(64))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Backend:
    """BackendProtocol over one end of a stream socket, on a thread, until EOF.

    silent: requests it never answers; fail: requests acked with status 1; close_on: requests
    that make it close the connection. A protocol error also closes it (kept in `error`)."""

    def __init__(self, sock: socket.socket, *, features: int = FEATURES,
                 protocol_features: int = ALL_PROTOCOL, silent: frozenset = frozenset(),
                 fail: frozenset = frozenset(), close_on: frozenset = frozenset()) -> None:
        self.sock, self.features, self.protocol_features = sock, features, protocol_features
        self.silent, self.fail, self.close_on = silent, fail, close_on
        self.proto = BackendProtocol()
        self.messages: list[Message] = []
        self.bases: dict[int, int] = {}
        self.status = 0
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def of(self, request: FrontendRequest) -> list[Message]:
        return [m for m in self.messages if m.request == request]

    def stop(self) -> None:
        """Join (the front-end must have closed its end), then close everything received."""
        self.thread.join(10)
        assert not self.thread.is_alive()
        for m in self.messages:
            m.close_fds()
        self.proto.close()
        self.sock.close()

    def _run(self) -> None:
        try:
            while (msgs := self._recv()) is not None:
                for msg in msgs:
                    self.messages.append(msg)
                    if msg.request in self.close_on:
                        return self.sock.shutdown(socket.SHUT_RDWR)
                    self._answer(msg)
        except RemoteProtocolError as exc:
            self.error = exc
            self.sock.shutdown(socket.SHUT_RDWR)

    def _recv(self) -> list[Message] | None:
        data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
        fds = [OwnedFd(fd) for _, _, d in anc for fd in struct.unpack(f"{len(d) // 4}i", d)]
        return self.proto.receive(data, fds) if data else None

    def _answer(self, msg: Message) -> None:
        if msg.request in self.silent:
            return
        reply = self._reply_payload(msg)
        if reply is not None:
            return self.sock.sendall(self.proto.reply(msg, reply))
        ack = self.proto.ack(msg, 1 if msg.request in self.fail else 0)
        if ack is not None:
            self.sock.sendall(ack)

    def _reply_payload(self, msg: Message):
        p = msg.payload
        if msg.request == R.SET_VRING_BASE:
            self.bases[p.index] = p.num
        elif msg.request == R.SET_STATUS:
            self.status = p.value
        elif msg.request == R.GET_CONFIG:
            return ConfigSpace(p.offset, p.size, 0, CONFIG[p.offset:p.offset + p.size])
        return {
            R.GET_FEATURES: lambda: U64(self.features),
            R.GET_PROTOCOL_FEATURES: lambda: U64(self.protocol_features),
            R.GET_QUEUE_NUM: lambda: U64(4),
            R.GET_MAX_MEM_SLOTS: lambda: U64(32),
            R.GET_STATUS: lambda: U64(self.status),
            R.GET_VRING_BASE: lambda: VringState(p.index, self.bases.get(p.index, 0) + 7),
        }.get(msg.request, lambda: None)()


class _Link:
    """A front-end and a _Backend joined by a socketpair."""

    def __init__(self, timeout: float = 5.0, **backend: object) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = _Backend(theirs, **backend)
        self.fe = VhostUserFrontend(sock=ours, timeout=timeout)

    def close(self) -> None:
        self.fe.close()
        self.backend.stop()


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam([(0, 2 * MiB), (4 * MiB, 1 * MiB)], mmap_offset=PAGE) as r:
        yield r


@pytest.fixture
def link() -> Iterator[_Link]:
    lk = _Link()
    yield lk
    lk.close()
    assert lk.backend.error is None


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # short: sun_path holds 108 bytes
        yield os.path.join(d, "vhost.sock")


def _negotiated(lk: _Link, protocol: int = ALL_PROTOCOL) -> _Link:
    lk.fe.negotiate(FEATURES, protocol)
    return lk


# -- negotiation -------------------------------------------------------------------------------


def test_negotiate_sends_intersections_in_qemu_order(link):
    wanted_protocol = P.REPLY_ACK.mask | P.MQ.mask | P.CONFIG.mask
    got = link.fe.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 40, wanted_protocol)
    b = link.backend
    assert [m.request for m in b.messages] == [
        R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
        R.SET_OWNER, R.SET_FEATURES]
    assert b.of(R.SET_FEATURES)[0].payload.value == 1 << VIRTIO_F_VERSION_1 | BIT30
    assert b.of(R.SET_PROTOCOL_FEATURES)[0].payload.value == wanted_protocol
    # REPLY_ACK is on from SET_PROTOCOL_FEATURES itself, so everything after asks for an ack.
    assert all(m.need_reply for m in b.messages[2:] if m.request != R.GET_QUEUE_NUM)
    assert (got.features, got.protocol_features, got.queue_num) == (
        1 << VIRTIO_F_VERSION_1 | BIT30, wanted_protocol, 4)
    assert link.fe.negotiated is got and got.has(P.MQ) and not got.has(P.STATUS)


def test_negotiate_without_protocol_features_offered():
    lk = _Link(features=1 << VIRTIO_F_VERSION_1)
    try:
        got = lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
        # Nothing is acked without REPLY_ACK: a request with a reply shows that the back-end
        # has seen everything sent before it.
        lk.fe.request(R.GET_FEATURES)
        assert [m.request for m in lk.backend.messages] == [
            R.GET_FEATURES, R.SET_OWNER, R.SET_FEATURES, R.GET_FEATURES]
        assert not any(m.need_reply for m in lk.backend.messages)
        assert (got.features, got.protocol_features, got.queue_num) == (
            1 << VIRTIO_F_VERSION_1, 0, None)
    finally:
        lk.close()


def test_no_queue_num_without_mq(link):
    link.fe.negotiate(FEATURES, P.REPLY_ACK.mask)
    assert not link.backend.of(R.GET_QUEUE_NUM)


# -- memory ------------------------------------------------------------------------------------


def _check_region_fd(ram: GuestRam, region_desc, fd: OwnedFd) -> None:
    """The fd the back-end got maps the same memory as ram's region, at mmap_offset."""
    off, size, gpa = region_desc.mmap_offset, region_desc.memory_size, region_desc.guest_phys_addr
    with mmap.mmap(fd.fileno(), off + size) as mm:
        ram.write(gpa, b"frontend" * 4)
        assert mm[off:off + 32] == b"frontend" * 4
        mm[off + size - 8:off + size] = b"backend!"
        assert ram.read(gpa + size - 8, 8) == b"backend!"


def test_set_mem_table_sends_regions_and_fds_of_the_same_memory(link, ram):
    _negotiated(link).fe.set_mem_table(ram)
    (msg,) = link.backend.of(R.SET_MEM_TABLE)
    want = [(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset) for r in ram.regions]
    got = [(d.guest_phys_addr, d.memory_size, d.userspace_addr, d.mmap_offset)
           for d in msg.payload.regions]
    assert got == want and len(msg.fds) == 2
    for desc, fd in zip(msg.payload.regions, msg.fds):
        _check_region_fd(ram, desc, fd)


def test_add_and_remove_region(link, ram):
    _negotiated(link).fe.set_mem_table(ram)
    ram.add_region(8 * MiB, MiB)
    link.fe.add_mem_reg(ram, 8 * MiB)
    (add,) = link.backend.of(R.ADD_MEM_REG)
    assert add.payload.region.guest_phys_addr == 8 * MiB
    assert add.payload.region.userspace_addr == ram.region(8 * MiB).userspace_addr
    _check_region_fd(ram, add.payload.region, add.fds[0])
    link.fe.rem_mem_reg(ram, 8 * MiB)
    (rem,) = link.backend.of(R.REM_MEM_REG)
    assert rem.payload == add.payload and not rem.fds
    assert link.fe.get_max_mem_slots() == 32


def test_mem_slot_requests_need_configure_mem_slots(link, ram):
    _negotiated(link, P.REPLY_ACK.mask)
    with pytest.raises(FrontendError, match="CONFIGURE_MEM_SLOTS"):
        link.fe.add_mem_reg(ram, 0)


# -- queues ------------------------------------------------------------------------------------


def _is_eventfd(fd: OwnedFd) -> bool:
    return os.readlink(f"/proc/self/fd/{fd.fileno()}") == "anon_inode:[eventfd]"


def test_setup_queue_sends_size_user_addresses_base_and_eventfds(link, ram):
    _negotiated(link).fe.set_mem_table(ram)
    driver = MockSplitQueue(ram, 64, initial_avail_idx=65530, region=4 * MiB)
    link.fe.setup_queue(1, driver)
    b = link.backend
    assert [m.request for m in b.messages[-5:]] == [
        R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL, R.SET_VRING_KICK]
    assert b.of(R.SET_VRING_NUM)[0].payload == VringState(1, 64)
    addr = b.of(R.SET_VRING_ADDR)[0].payload
    user = driver.ring_addresses().user
    assert (addr.index, addr.desc, addr.avail, addr.used) == (
        1, user.desc_table, user.avail_ring, user.used_ring)
    assert addr.desc != driver.desc_table  # user addresses, not GPAs
    assert b.of(R.SET_VRING_BASE)[0].payload == VringState(1, 65530)
    (call,), (kick,) = b.of(R.SET_VRING_CALL), b.of(R.SET_VRING_KICK)
    assert not call.payload.nofd and not kick.payload.nofd
    assert _is_eventfd(call.fds[0]) and _is_eventfd(kick.fds[0])
    link.fe.kick(1)
    link.fe.kick(1)
    assert os.eventfd_read(kick.fds[0].fileno()) == 2
    os.eventfd_write(call.fds[0].fileno(), 1)
    assert link.fe.wait_call(1) == 1


def test_setup_queue_without_fds_sends_nofd(link, ram):
    _negotiated(link)
    link.fe.setup_queue(0, MockSplitQueue(ram, 8), kick=False, call=False)
    (call,), (kick,) = link.backend.of(R.SET_VRING_CALL), link.backend.of(R.SET_VRING_KICK)
    assert call.payload.nofd and kick.payload.nofd and not call.fds and not kick.fds
    with pytest.raises(FrontendError, match="without a kick fd"):
        link.fe.kick(0)
    with pytest.raises(FrontendError, match="without a call fd"):
        link.fe.wait_call(0)


def test_enable_get_base_and_moved_rings(link, ram):
    _negotiated(link)
    driver = MockSplitQueue(ram, 8, initial_avail_idx=100, region=0)
    link.fe.setup_queue(0, driver)
    link.fe.enable_queue(0, True)
    link.fe.enable_queue(0, False)
    assert [m.payload for m in link.backend.of(R.SET_VRING_ENABLE)] == [
        VringState(0, 1), VringState(0, 0)]
    assert link.fe.get_vring_base(0) == 107  # what the back-end answered
    ram.move_region(0, new_userspace_addr=0x1234_0000_0000)
    link.fe.set_vring_addr(0)
    moved = link.backend.of(R.SET_VRING_ADDR)[-1].payload
    assert moved.desc == driver.ring_addresses().user.desc_table
    assert 0x1234_0000_0000 <= moved.desc < 0x1234_0000_0000 + 2 * MiB


def test_wait_call_times_out(link, ram):
    _negotiated(link)
    link.fe.setup_queue(0, MockSplitQueue(ram, 8))
    with pytest.raises(FrontendTimeout):
        link.fe.wait_call(0, timeout=0.01)


# -- virtio-net helpers, with a device side played from GuestRam --------------------------------


class _Device:
    """The device side of one split ring, at the user addresses the front-end sent."""

    def __init__(self, ram: GuestRam, backend: _Backend, index: int) -> None:
        addr = [m.payload for m in backend.of(R.SET_VRING_ADDR) if m.payload.index == index][-1]
        self.ram, self.size = ram, [m.payload.num for m in backend.of(R.SET_VRING_NUM)][-1]
        self.desc, self.avail, self.used = (ram.user_to_gpa(a)
                                            for a in (addr.desc, addr.avail, addr.used))
        self.next_avail = self.next_used = backend.bases[index]

    def pop(self) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """Every available chain: (head, [(gpa, len, flags)])."""
        out = []
        avail_idx = self._r16(self.avail + AVAIL_IDX)
        while self.next_avail != avail_idx:
            head = self._r16(self.avail + AVAIL_RING + 2 * (self.next_avail % self.size))
            out.append((head, self._chain(head)))
            self.next_avail = (self.next_avail + 1) & 0xFFFF
        return out

    def push(self, head: int, length: int) -> None:
        slot = self.used + USED_RING + 8 * (self.next_used % self.size)
        self.ram.write(slot, struct.pack("<II", head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.ram.write(self.used + USED_IDX, struct.pack("<H", self.next_used))

    def _chain(self, i: int) -> list[tuple[int, int, int]]:
        descs = []
        while True:
            addr, n, flags, nxt = struct.unpack("<QIHH", self.ram.read(self.desc + 16 * i, 16))
            descs.append((addr, n, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return descs
            i = nxt

    def _r16(self, gpa: int) -> int:
        return struct.unpack("<H", self.ram.read(gpa, 2))[0]


def _frames(n: int) -> list[bytes]:
    return [bytes([i & 0xFF]) * (60 + i % 50) for i in range(n)]


def test_send_frames_puts_header_and_frame_in_one_readable_buffer(link, ram):
    _negotiated(link)
    link.fe.setup_queue(1, MockSplitQueue(ram, 16, initial_avail_idx=65534))
    frames = _frames(5)
    link.fe.send_frames(1, frames)
    chains = _Device(ram, link.backend, 1).pop()
    assert [[ram.read(a, n) for a, n, _ in c] for _, c in chains] == [
        [bytes(NET_HDR_LEN) + f] for f in frames]
    assert all(flags == 0 for _, c in chains for _, _, flags in c)
    (kick,) = link.backend.of(R.SET_VRING_KICK)
    assert os.eventfd_read(kick.fds[0].fileno()) == 1  # one kick for the batch


def test_send_frames_waits_for_completions_when_the_ring_is_full(link, ram):
    _negotiated(link)
    link.fe.setup_queue(1, MockSplitQueue(ram, 8))
    device, stop, seen = _Device(ram, link.backend, 1), threading.Event(), []

    def consume() -> None:
        while not stop.is_set():
            for head, chain in device.pop():
                seen.append(b"".join(ram.read(a, n) for a, n, _ in chain)[NET_HDR_LEN:])
                device.push(head, 0)

    worker = threading.Thread(target=consume)
    worker.start()
    try:
        frames = _frames(100)
        link.fe.send_frames(1, frames)
        link.fe.wait_tx_done(1)
    finally:
        stop.set()
        worker.join()
    assert seen == frames


def _deliver(device: _Device, ram: GuestRam, frame: bytes) -> None:
    """Write header (num_buffers 1) + `frame` into the one available RX buffer."""
    ((head, ((gpa, _, flags),)),) = device.pop()
    assert flags == VIRTQ_DESC_F_WRITE
    data = struct.pack("<5HH", 0, 0, 0, 0, 0, 1) + frame
    ram.write(gpa, data)
    device.push(head, len(data))


def test_post_rx_buffers_and_received_frames_with_mergeable_buffers(link, ram):
    _negotiated(link)
    link.fe.setup_queue(0, MockSplitQueue(ram, 16))
    link.fe.post_rx_buffers(0, 1, 2048)
    device = _Device(ram, link.backend, 0)
    _deliver(device, ram, b"one buffer")
    assert link.fe.received_frames(0) == [b"one buffer"]
    link.fe.post_rx_buffers(0, 2, 64)
    frame = bytes(range(100))
    chains = device.pop()
    assert [n for _, ((_, n, _),) in chains] == [64, 64]
    data = struct.pack("<5HH", 0, 0, 0, 0, 0, 2) + frame
    (h1, ((g1, _, _),)), (h2, ((g2, _, _),)) = chains
    ram.write(g1, data[:64])
    device.push(h1, 64)
    assert link.fe.received_frames(0) == []  # its second buffer has not arrived
    ram.write(g2, data[64:])
    device.push(h2, len(data) - 64)
    assert link.fe.received_frames(0) == [frame]


def test_received_frames_without_mergeable_buffers_ignore_num_buffers():
    lk = _Link(features=1 << VIRTIO_F_VERSION_1 | BIT30)
    try:
        with GuestRam([(0, MiB)]) as ram:
            lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
            lk.fe.setup_queue(0, MockSplitQueue(ram, 4))
            lk.fe.post_rx_buffers(0, 1, 256)
            device = _Device(ram, lk.backend, 0)
            ((head, ((gpa, _, _),)),) = device.pop()
            # num_buffers 7 would swallow six more buffers if it were honoured.
            ram.write(gpa, struct.pack("<5HH", 0, 0, 0, 0, 0, 7) + b"frame")
            device.push(head, NET_HDR_LEN + 5)
            assert lk.fe.received_frames(0) == [b"frame"]
    finally:
        lk.close()


# -- config, status, reset ---------------------------------------------------------------------


def test_config_status_and_reset(link):
    _negotiated(link)
    assert link.fe.get_config(4, 8) == CONFIG[4:12]
    link.fe.set_status(0x0F)
    assert link.fe.get_status() == 0x0F
    link.fe.reset_device()
    assert link.backend.of(R.RESET_DEVICE)[0].need_reply


# -- errors and timeouts -----------------------------------------------------------------------


def test_failing_ack_raises_request_failed():
    lk = _Link(fail=frozenset({R.SET_MEM_TABLE}))
    try:
        with GuestRam([(0, MiB)]) as ram:
            lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
            with pytest.raises(RequestFailed, match="SET_MEM_TABLE") as info:
                lk.fe.set_mem_table(ram)
            assert info.value.status == 1
            assert lk.fe.get_status() == 0  # the connection goes on
    finally:
        lk.close()


def test_silent_backend_times_out_and_the_reply_stays_owed():
    lk = _Link(silent=frozenset({R.GET_STATUS}))
    try:
        lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
        with pytest.raises(FrontendTimeout):
            lk.fe.request(R.GET_STATUS, timeout=0.05)
        with pytest.raises(FrontendError, match="not yet collected"):
            lk.fe.get_status()
    finally:
        lk.close()


def test_backend_closing_raises_backend_closed():
    lk = _Link(close_on=frozenset({R.SET_OWNER}))
    try:
        with pytest.raises(BackendClosed):
            lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
    finally:
        lk.close()


def test_send_raw_and_recv_reply(link):
    _negotiated(link)
    data, _ = encode_message(R.SET_VRING_NUM, VringState(0, 256), VERSION | NEED_REPLY)
    link.fe.send_raw(data, expect_reply=True)
    with link.fe.recv_reply() as reply:
        assert reply.request == R.SET_VRING_NUM and reply.payload == U64(0)
    assert link.fe.get_status() == 0  # still in step with the protocol


def test_hostile_bytes_and_wait_closed():
    lk = _Link()
    try:
        lk.fe.send_raw(struct.pack("<III", R.GET_FEATURES, 0x2, 0))  # version 2
        lk.fe.wait_closed()
        assert isinstance(lk.backend.error, RemoteProtocolError)
    finally:
        lk.close()


def test_pipelined_send_and_recv_reply(link):
    assert link.fe.send(R.GET_FEATURES) and link.fe.send(R.GET_PROTOCOL_FEATURES)
    assert not link.fe.send(R.SET_OWNER)
    with link.fe.recv_reply() as a, link.fe.recv_reply() as b:
        assert (a.payload, b.payload) == (U64(FEATURES), U64(ALL_PROTOCOL))
    with pytest.raises(FrontendError, match="no reply is awaited"):
        link.fe.recv_reply()


# -- sockets and fds ---------------------------------------------------------------------------


def _serve_one(path: str, backends: list[_Backend]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def accept() -> None:
        with listener:
            backends.append(_Backend(listener.accept()[0]))

    thread = threading.Thread(target=accept)
    thread.start()
    return thread


def test_connect_by_path(sock_path):
    backends: list[_Backend] = []
    thread = _serve_one(sock_path, backends)
    with VhostUserFrontend(sock_path) as fe:
        thread.join()
        assert fe.negotiate(FEATURES, 0).features == FEATURES
    backends[0].stop()


def test_connect_gives_up_with_a_timeout(sock_path):
    with pytest.raises(FrontendTimeout, match="cannot connect"):
        VhostUserFrontend(sock_path, connect_timeout=0.05)


def test_listen_accepts_a_backend_in_client_mode(sock_path):
    backends: list[_Backend] = []

    def connect() -> None:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(sock_path)
                return backends.append(_Backend(sock))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                threading.Event().wait(0.005)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    with VhostUserFrontend.listen(sock_path) as fe:
        thread.join()
        assert not os.path.exists(sock_path)
        assert fe.negotiate(FEATURES, 0).features == FEATURES
    backends[0].stop()


def test_close_leaves_no_fds(ram):
    before = _open_fds()
    lk = _Link()
    lk.fe.negotiate(FEATURES, ALL_PROTOCOL)
    lk.fe.set_mem_table(ram)
    for i in range(4):
        lk.fe.setup_queue(i, MockSplitQueue(ram, 8))
    lk.fe.setup_queue(0, MockSplitQueue(ram, 8))  # replaces queue 0's eventfds
    lk.close()
    assert _open_fds() == before
    with pytest.raises(FrontendError, match="closed"):
        lk.fe.get_status()
    with pytest.raises(FrontendError, match="closed"):
        lk.fe.kick(1)


# -- end to end: the real daemon ---------------------------------------------------------------


def _udp_frame(i: int) -> bytes:
    """Ethernet + IPv4 (protocol 17) + 8 bytes of UDP header + a little payload: 64 bytes."""
    eth = b"\x52\x54\x00\x00\x00\x01" + b"\x52\x54\x00\x00\x00\x02" + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, i & 0xFFFF, 0, 64, 17, 0,
                     b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    return eth + ip + struct.pack("!HHHH", 1000, 2000, 30, 0) + bytes(22)


@pytest.mark.parametrize("event_idx", [False, True])
def test_against_the_daemon_1000_frames_on_tx_queue_1(sock_path, event_idx):
    from pyvhost.daemon.server import Server
    from pyvhost.devices.net.device import NetDevice
    from pyvhost.ring.layout import VIRTIO_RING_F_EVENT_IDX

    server = Server(lambda: NetDevice(1), sock_path, max_connections=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    frames = [_udp_frame(i) for i in range(1000)]
    features = 1 << VIRTIO_F_VERSION_1 | int(event_idx) << VIRTIO_RING_F_EVENT_IDX
    with GuestRam([(0, 4 * MiB)]) as ram, VhostUserFrontend(sock_path) as fe:
        got = fe.negotiate(features, P.REPLY_ACK.mask | P.MQ.mask | P.CONFIGURE_MEM_SLOTS.mask)
        assert got.features == features | BIT30 and got.queue_num == 3  # 2 + control queue
        fe.set_mem_table(ram)
        fe.setup_queue(0, MockSplitQueue(ram, 256, event_idx=event_idx))
        fe.setup_queue(1, MockSplitQueue(ram, 256, event_idx=event_idx))
        fe.enable_queue(0)
        fe.enable_queue(1)
        fe.send_frames(1, frames)  # 1000 frames through a 256-entry ring
        fe.wait_tx_done(1)
        assert fe.get_vring_base(1) == 1000
    thread.join(10)
    assert not thread.is_alive()
    stats = server.stats()
    assert (stats["tx_packets"], stats["tx_bytes"]) == (1000, 64 * 1000)
    assert (stats["tx_ipv4"], stats["tx_udp"], stats["queues_broken"]) == (1000, 1000, 0)
    assert stats["requests_refused"] == 0
