"""pyvhost.protocol connection endpoints, exercised in pairs through an in-memory link.

FrontendProtocol <-> BackendProtocol on the main socket, BackendChannel <-> FrontendChannel on
the back-end channel. The link copies bytes and "passes" fds the way SCM_RIGHTS does: the
receiver gets new fd numbers (dups) for the same open files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.fd import OwnedFd
from pyvhost.protocol import (
    EMPTY,
    NEED_REPLY,
    REPLY,
    U64,
    VERSION,
    BackendProtocol,
    BackendRequest,
    BadPayloadSize,
    ConfigSpace,
    ConnectionBroken,
    ConnectionState,
    FrontendProtocol,
    FrontendRequest,
    InflightDesc,
    IotlbMsg,
    LocalProtocolError,
    LogDesc,
    Message,
    Negotiation,
    NotSupported,
    Payload,
    Raw,
    SharedObject,
    UnexpectedReply,
    UnknownRequest,
    VringArea,
    VringState,
    encode_message,
)
from pyvhost.protocol.codec import HEADER, raw_fds
from pyvhost.protocol.constants import IotlbAccess, IotlbType, ProtocolFeature

# The per-request samples live with the codec tests (pytest puts tests/ on sys.path).
from test_protocol_codec import BACKEND_SAMPLES, FRONTEND_SAMPLES, OBJECT_UUID, is_open

F = FrontendRequest
B = BackendRequest
P = ProtocolFeature

ALL_FEATURES = sum(f.mask for f in ProtocolFeature)

# A valid answer of its own for every request that solicits one (payload, fd count).
OWN_REPLIES: dict[FrontendRequest, tuple[Payload, int]] = {
    F.GET_FEATURES: (U64(1 << 32 | 1 << 30), 0),
    F.GET_PROTOCOL_FEATURES: (U64(ALL_FEATURES), 0),
    F.GET_VRING_BASE: (VringState(1, 42), 0),
    F.GET_QUEUE_NUM: (U64(2), 0),
    F.SET_LOG_BASE: (U64(0), 0),
    F.IOTLB_MSG: (U64(0), 0),
    F.GET_CONFIG: (ConfigSpace(0, 8, 0, bytes(range(8))), 0),
    F.CREATE_CRYPTO_SESSION: (Raw(bytes(200)), 0),
    F.POSTCOPY_ADVISE: (EMPTY, 1),
    F.POSTCOPY_END: (U64(0), 0),
    F.GET_INFLIGHT_FD: (InflightDesc(0x2000, 0, 2, 256), 1),
    F.GET_MAX_MEM_SLOTS: (U64(509), 0),
    F.GET_STATUS: (U64(0x0F), 0),
    F.GET_SHARED_OBJECT: (SharedObject(OBJECT_UUID), 1),
    F.SET_DEVICE_STATE_FD: (U64(0), 1),
    F.CHECK_DEVICE_STATE: (U64(0), 0),
}


# --- the in-memory link --------------------------------------------------------------------


@dataclass
class Pipe:
    """One direction of a stream socket carrying SCM_RIGHTS.

    Like the kernel: the fds of a sendmsg come with the first recvmsg that returns any of its
    bytes, and that recvmsg stops at the end of the sendmsg.
    """

    chunk: int = 1 << 20  # bytes per recvmsg; 1 = byte at a time
    data: bytearray = field(default_factory=bytearray)
    pending: list[tuple[int, int, list[int]]] = field(default_factory=list)  # start, end, fds
    sent: int = 0
    received: int = 0

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:  # the receiver gets its own numbers for the same files
            self.pending.append((self.sent, self.sent + len(data), [os.dup(fd) for fd in fds]))
        self.data += data
        self.sent += len(data)

    def recv(self) -> Iterator[tuple[bytes, list[OwnedFd]]]:
        while self.data:
            n = min(self.chunk, len(self.data))
            fds: list[OwnedFd] = []
            if self.pending and self.pending[0][0] < self.received + n:
                _, end, numbers = self.pending.pop(0)
                n = min(n, end - self.received)
                fds = [OwnedFd(fd) for fd in numbers]
            chunk, self.data = bytes(self.data[:n]), self.data[n:]
            self.received += n
            yield chunk, fds


class Link:
    """A front-end and a back-end protocol joined by two Pipes."""

    def __init__(self, chunk: int = 1 << 20, negotiation: int = 0) -> None:
        self.frontend = FrontendProtocol(Negotiation(negotiation))
        self.backend = BackendProtocol(Negotiation(negotiation))
        self.to_backend, self.to_frontend = Pipe(chunk), Pipe(chunk)

    def request(self, request, payload=EMPTY, fds=(), need_reply=False) -> list[Message]:
        data, numbers = self.frontend.send_request(request, payload, fds, need_reply)
        self.to_backend.send(data, numbers)
        return [m for data, fds in self.to_backend.recv() for m in self.backend.receive(data, fds)]

    def answer(self, data: bytes | None, fds: Sequence[OwnedFd | int] = ()) -> list[Message]:
        if data is not None:
            self.to_frontend.send(data, raw_fds(fds))
        out = [self.frontend.receive(d, f) for d, f in self.to_frontend.recv()]
        return [m for batch in out for m in batch]


@pytest.fixture
def fds() -> Iterator:
    made: list[OwnedFd] = []

    def factory(n: int) -> list[OwnedFd]:
        new = [OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(n)]
        made.extend(new)
        return new

    yield factory
    for fd in made:
        fd.close()


def negotiate(link: Link, features: int) -> None:
    [msg] = link.request(F.SET_PROTOCOL_FEATURES, U64(features))
    assert link.answer(link.backend.ack(msg, 0)) == []


# --- every request through the pair --------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("request_", list(FrontendRequest), ids=lambda r: r.name)
def test_every_request_through_the_link(request_, chunk, fds) -> None:
    link = Link(chunk, negotiation=P.LOG_SHMFD.mask)
    payload, nfds = FRONTEND_SAMPLES[request_]
    sent = fds(nfds)
    [msg] = link.request(request_, payload, sent)
    assert (msg.request, msg.payload, len(msg.fds)) == (request_, payload, nfds)
    assert all(os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
               for a, b in zip(msg.fds, sent))
    msg.close_fds()
    assert link.backend.expects_reply(msg) == (request_ in OWN_REPLIES)
    if request_ in OWN_REPLIES:
        answer, nreply = OWN_REPLIES[request_]
        reply_fds = fds(nreply)
        [reply] = link.answer(link.backend.reply(msg, answer, reply_fds), reply_fds)
        assert (reply.request, reply.flags, reply.payload) == (request_, VERSION | REPLY, answer)
        assert len(reply.fds) == nreply
        reply.close_fds()
    assert not link.frontend.awaiting_reply


@pytest.mark.parametrize("request_", list(BackendRequest), ids=lambda r: r.name)
def test_every_backend_request_through_the_channel(request_, fds) -> None:
    negotiation = Negotiation(P.BACKEND_SEND_FD.mask | P.REPLY_ACK.mask)
    backend = BackendProtocol(negotiation).backend_channel()
    frontend = FrontendProtocol(negotiation).frontend_channel()
    payload, nfds = BACKEND_SAMPLES[request_]
    data, numbers = backend.send_request(request_, payload, fds(nfds), need_reply=True)
    [msg] = frontend.receive(data, [OwnedFd(os.dup(n)) for n in numbers])
    assert (msg.request, msg.payload, len(msg.fds)) == (request_, payload, nfds)
    msg.close_fds()
    if request_ == B.SHARED_OBJECT_LOOKUP:  # the only back-end request with a reply of its own
        dmabuf = fds(1)
        answer = frontend.reply(msg, U64(0), dmabuf)
        [reply] = backend.receive(answer, [OwnedFd(os.dup(dmabuf[0].fileno()))])
        assert len(reply.fds) == 1
        reply.close_fds()
    else:
        [reply] = backend.receive(frontend.ack(msg, 0))
        assert reply.payload == U64(0)
    assert (reply.request, reply.is_reply) == (request_, True)
    assert not backend.awaiting_reply


# --- REPLY_ACK -----------------------------------------------------------------------------

ACK_CASES = [
    # (REPLY_ACK negotiated, NEED_REPLY set, request, acked?)
    (True, True, F.SET_VRING_NUM, True),
    (True, True, F.SET_MEM_TABLE, True),
    (True, False, F.SET_VRING_NUM, False),
    (False, True, F.SET_VRING_NUM, False),  # frontend broke the rule; we must not invent a reply
    (False, False, F.SET_VRING_NUM, False),
    (True, True, F.GET_FEATURES, False),  # has a reply of its own: no extra ack
    (True, True, F.GET_VRING_BASE, False),
    (True, True, F.IOTLB_MSG, False),
]


@pytest.mark.parametrize(("reply_ack", "need_reply", "request_", "acked"), ACK_CASES)
def test_ack_only_when_negotiated_requested_and_no_own_reply(
    reply_ack, need_reply, request_, acked, fds
) -> None:
    backend = BackendProtocol(Negotiation(P.REPLY_ACK.mask if reply_ack else 0))
    payload, nfds = FRONTEND_SAMPLES[request_]
    flags = VERSION | (NEED_REPLY if need_reply else 0)
    data, numbers = encode_message(request_, payload, flags)
    [msg] = backend.receive(data, [OwnedFd(os.dup(fd.fileno())) for fd in fds(nfds)])
    msg.close_fds()
    assert backend.expects_ack(msg) == acked
    answer = backend.ack(msg, 0)
    if acked:
        assert answer == HEADER.pack(request_, VERSION | REPLY, 8) + bytes(8)
        assert backend.ack(msg, 0) is None  # answered once
    else:
        assert answer is None


def test_ack_carries_the_status(fds) -> None:
    link = Link(negotiation=P.REPLY_ACK.mask)
    [msg] = link.request(F.NET_SET_MTU, U64(65536), need_reply=True)
    [reply] = link.answer(link.backend.ack(msg, 22))
    assert (reply.request, reply.payload) == (F.NET_SET_MTU, U64(22))


def test_reply_ack_switched_on_by_set_protocol_features_itself() -> None:
    link = Link()
    [msg] = link.request(F.SET_PROTOCOL_FEATURES, U64(P.REPLY_ACK.mask), need_reply=False)
    assert link.backend.negotiation.reply_ack and link.frontend.negotiation.reply_ack
    assert link.backend.ack(msg) is None
    [msg] = link.request(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    [reply] = link.answer(link.backend.ack(msg))
    assert reply.payload == U64(0)


def test_need_reply_on_the_enabling_message_is_acked() -> None:
    link = Link()
    [msg] = link.request(F.SET_PROTOCOL_FEATURES, U64(P.REPLY_ACK.mask), need_reply=True)
    [reply] = link.answer(link.backend.ack(msg))
    assert reply.request == F.SET_PROTOCOL_FEATURES


def test_frontend_refuses_need_reply_without_reply_ack() -> None:
    with pytest.raises(LocalProtocolError, match="REPLY_ACK"):
        FrontendProtocol().send_request(F.SET_VRING_NUM, VringState(0, 8), need_reply=True)


def test_set_log_base_reply_depends_on_log_shmfd(fds) -> None:
    payload = LogDesc(4096, 0)
    without = BackendProtocol(Negotiation(P.REPLY_ACK.mask))
    [msg] = without.receive(encode_message(F.SET_LOG_BASE, payload, VERSION | NEED_REPLY)[0],
                            [OwnedFd(os.dup(fds(1)[0].fileno()))])
    msg.close_fds()
    assert not without.expects_reply(msg) and without.expects_ack(msg)
    link = Link(negotiation=P.LOG_SHMFD.mask)
    [msg] = link.request(F.SET_LOG_BASE, payload, fds(1))
    msg.close_fds()
    assert link.backend.expects_reply(msg)
    link.answer(link.backend.reply(msg, U64(0)))
    for answer in (EMPTY, U64(0), payload):  # DPDK, libvhost-user and rust-vmm bodies
        [msg] = link.request(F.SET_LOG_BASE, payload, fds(1))
        msg.close_fds()
        assert [m.payload for m in link.answer(link.backend.reply(msg, answer))] == [answer]


# --- replies: local misuse -----------------------------------------------------------------


def test_reply_refused_for_a_request_without_one() -> None:
    link = Link()
    [msg] = link.request(F.SET_VRING_NUM, VringState(0, 8))
    with pytest.raises(LocalProtocolError, match="not owed a reply"):
        link.backend.reply(msg, U64(0))


def test_reply_refused_twice_and_out_of_order() -> None:
    link = Link()
    [first] = link.request(F.GET_FEATURES)
    [second] = link.request(F.GET_PROTOCOL_FEATURES)
    with pytest.raises(LocalProtocolError, match="answer GET_FEATURES before"):
        link.backend.reply(second, U64(0))
    link.backend.reply(first, U64(0))
    with pytest.raises(LocalProtocolError):
        link.backend.reply(first, U64(0))


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (F.GET_FEATURES, VringState(0, 0), 0),  # wrong payload type
        (F.GET_VRING_BASE, U64(0), 0),
        (F.GET_FEATURES, U64(0), 1),  # fd where none belongs
        (F.GET_INFLIGHT_FD, InflightDesc(4096, 0, 1, 8), 0),  # mapped area without its fd
        (F.SET_DEVICE_STATE_FD, U64(0x101), 1),  # error with an fd
    ],
)
def test_reply_with_wrong_payload_or_fds_refused(request_, payload, nfds, fds) -> None:
    link = Link()
    sample, nsample = FRONTEND_SAMPLES[request_]
    [msg] = link.request(request_, sample, fds(nsample))
    msg.close_fds()
    with pytest.raises(LocalProtocolError):
        link.backend.reply(msg, payload, fds(nfds))


def test_ack_status_must_be_u64() -> None:
    link = Link(negotiation=P.REPLY_ACK.mask)
    [msg] = link.request(F.SET_OWNER, need_reply=True)
    with pytest.raises(LocalProtocolError):
        link.backend.ack(msg, -1)


def test_backend_channel_fds_need_backend_send_fd(fds) -> None:
    channel = BackendProtocol(Negotiation(P.BACKEND_REQ.mask)).backend_channel()
    with pytest.raises(LocalProtocolError, match="BACKEND_SEND_FD"):
        channel.send_request(B.VRING_HOST_NOTIFIER_MSG, VringArea(0, False, 4096, 0), fds(1))
    channel.send_request(B.VRING_HOST_NOTIFIER_MSG, VringArea(0, True, 0, 0))


def test_send_request_checks_payload_and_channel() -> None:
    frontend = FrontendProtocol()
    with pytest.raises(LocalProtocolError, match="expected one of VringState"):
        frontend.send_request(F.SET_VRING_NUM, U64(8))
    with pytest.raises(LocalProtocolError, match="not a request of this channel"):
        frontend.send_request(B.CONFIG_CHANGE_MSG)  # type: ignore[arg-type]


# --- replies: remote misbehaviour ----------------------------------------------------------


def _frontend_awaiting(request_: FrontendRequest) -> FrontendProtocol:
    frontend = FrontendProtocol()
    frontend.send_request(request_, FRONTEND_SAMPLES[request_][0])
    return frontend


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (HEADER.pack(F.GET_FEATURES, VERSION, 8) + bytes(8), "lack REPLY"),
        (HEADER.pack(F.GET_PROTOCOL_FEATURES, VERSION | REPLY, 8) + bytes(8), "awaited for"),
    ],
)
def test_frontend_rejects_bad_replies(raw: bytes, match: str) -> None:
    frontend = _frontend_awaiting(F.GET_FEATURES)
    with pytest.raises(UnexpectedReply, match=match):
        frontend.receive(raw)
    assert frontend.state is ConnectionState.BROKEN
    with pytest.raises(ConnectionBroken):
        frontend.receive(b"")


def test_frontend_rejects_unsolicited_reply() -> None:
    frontend = FrontendProtocol()
    frontend.send_request(F.SET_OWNER)
    fd = OwnedFd(os.eventfd(0))
    number = fd.fileno()
    with pytest.raises(UnexpectedReply, match="none is awaited"):
        frontend.receive(HEADER.pack(F.SET_OWNER, VERSION | REPLY, 8) + bytes(8), [fd])
    assert not is_open(number)


def test_frontend_rejects_reply_of_wrong_size() -> None:
    frontend = _frontend_awaiting(F.GET_VRING_BASE)
    with pytest.raises(BadPayloadSize, match="payload size 4"):
        frontend.receive(HEADER.pack(F.GET_VRING_BASE, VERSION | REPLY, 4) + bytes(4))


# --- not supported -------------------------------------------------------------------------


def test_not_supported_acks_failure_and_closes_fds(fds) -> None:
    link = Link(negotiation=P.REPLY_ACK.mask)
    [msg] = link.request(F.SET_LOG_FD, EMPTY, fds(1), need_reply=True)
    number = msg.fds[0].fileno()
    [reply] = link.answer(link.backend.not_supported(msg))
    assert reply.payload == U64(1) and not is_open(number)


def test_not_supported_without_anything_owed_is_silent(fds) -> None:
    link = Link()
    [msg] = link.request(F.GPU_SET_SOCKET, EMPTY, fds(1))
    number = msg.fds[0].fileno()
    assert link.backend.not_supported(msg) is None
    assert not is_open(number)
    assert link.backend.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    ("request_", "refusal"),
    [
        (F.GET_CONFIG, EMPTY),
        (F.IOTLB_MSG, U64(1)),
        (F.GET_INFLIGHT_FD, InflightDesc(0, 0, 0, 0)),
        (F.SET_DEVICE_STATE_FD, U64(0x101)),
        (F.CHECK_DEVICE_STATE, U64(1)),
        (F.GET_SHARED_OBJECT, SharedObject(OBJECT_UUID)),
        (F.POSTCOPY_ADVISE, EMPTY),
    ],
)
def test_not_supported_uses_the_requests_own_error_reply(request_, refusal, fds) -> None:
    link = Link()
    payload, nfds = FRONTEND_SAMPLES[request_]
    [msg] = link.request(request_, payload, fds(nfds))
    [reply] = link.answer(link.backend.not_supported(msg))
    assert (reply.payload, reply.fds) == (refusal, ())
    assert isinstance(reply.payload, type(refusal))


def test_not_supported_breaks_when_no_refusal_exists() -> None:
    link = Link()
    [msg] = link.request(F.GET_QUEUE_NUM)
    with pytest.raises(NotSupported) as info:
        link.backend.not_supported(msg)
    assert info.value.request == F.GET_QUEUE_NUM
    assert link.backend.state is ConnectionState.BROKEN
    with pytest.raises(ConnectionBroken):
        link.backend.receive(encode_message(F.GET_FEATURES)[0])


# --- state machine -------------------------------------------------------------------------


def test_broken_backend_refuses_and_closes_fds(fds) -> None:
    backend = BackendProtocol()
    with pytest.raises(UnknownRequest):
        backend.receive(HEADER.pack(99, VERSION, 0))
    assert backend.state is ConnectionState.BROKEN
    fd = OwnedFd(os.dup(fds(1)[0].fileno()))
    number = fd.fileno()
    with pytest.raises(ConnectionBroken):
        backend.receive(encode_message(F.SET_LOG_FD)[0], [fd])
    assert not is_open(number)


def test_closed_endpoint_refuses_use_and_releases_partial_fds(fds) -> None:
    backend = BackendProtocol()
    fd = OwnedFd(os.dup(fds(1)[0].fileno()))
    number = fd.fileno()
    assert backend.receive(encode_message(F.SET_LOG_FD)[0][:5], [fd]) == []
    assert not backend.at_boundary
    backend.close()
    assert backend.state is ConnectionState.CLOSED and not is_open(number)
    with pytest.raises(LocalProtocolError, match="closed"):
        backend.receive(b"")
    backend.close()  # idempotent


def test_negotiation_is_shared_with_the_channel() -> None:
    link = Link()
    channel = link.backend.backend_channel()
    negotiate(link, P.REPLY_ACK.mask | P.BACKEND_REQ.mask)
    assert channel.negotiation is link.backend.negotiation and channel.negotiation.reply_ack
    assert "REPLY_ACK" in repr(channel.negotiation)


# --- a whole session -----------------------------------------------------------------------


def test_qemu_like_session(fds) -> None:
    link = Link(chunk=5)
    be = link.backend

    [msg] = link.request(F.GET_FEATURES)
    [reply] = link.answer(be.reply(msg, U64(1 << 32 | 1 << 30)))
    assert reply.payload.value >> 30 & 1
    [msg] = link.request(F.GET_PROTOCOL_FEATURES)
    link.answer(be.reply(msg, U64(P.MQ.mask | P.REPLY_ACK.mask | P.BACKEND_REQ.mask)))
    negotiate(link, P.MQ.mask | P.REPLY_ACK.mask | P.BACKEND_REQ.mask)
    [msg] = link.request(F.GET_QUEUE_NUM)
    assert link.answer(be.reply(msg, U64(2)))[0].payload == U64(2)

    [msg] = link.request(F.SET_BACKEND_REQ_FD, EMPTY, fds(1), need_reply=True)
    channel_fd = msg.take_fd()
    link.answer(be.ack(msg))
    channel_fd.close()

    link.request(F.SET_OWNER)
    table, nregions = FRONTEND_SAMPLES[F.SET_MEM_TABLE]
    [msg] = link.request(F.SET_MEM_TABLE, table, fds(nregions), need_reply=True)
    kept = msg.take_fds()
    assert [r.payload for r in link.answer(be.ack(msg))] == [U64(0)]
    for fd in kept:
        fd.close()

    for request_ in (F.SET_VRING_NUM, F.SET_VRING_ADDR, F.SET_VRING_BASE, F.SET_VRING_KICK,
                     F.SET_VRING_CALL):
        payload, nfds = FRONTEND_SAMPLES[request_]
        [msg] = link.request(request_, payload, fds(nfds))
        msg.close_fds()
        assert be.ack(msg) is None
    [msg] = link.request(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    link.answer(be.ack(msg))
    [msg] = link.request(F.GET_VRING_BASE, VringState(0, 0))
    assert link.answer(be.reply(msg, VringState(0, 17)))[0].payload == VringState(0, 17)
    assert not link.frontend.awaiting_reply and link.backend.at_boundary


def test_iotlb_over_both_channels() -> None:
    negotiation = Negotiation(P.REPLY_ACK.mask | P.BACKEND_REQ.mask)
    link = Link(negotiation=negotiation.protocol_features)
    # Back-end: miss on the back-end channel, acked by the front-end.
    backend_side = link.backend.backend_channel()
    frontend_side = link.frontend.frontend_channel()
    miss = IotlbMsg(0x4000, 0, 0, IotlbAccess.RO, IotlbType.MISS)
    data, _ = backend_side.send_request(B.IOTLB_MSG, miss, need_reply=True)
    [request] = frontend_side.receive(data)
    assert request.payload == miss and frontend_side.expects_ack(request)
    # Front-end: update on the main socket; IOTLB_MSG has a u64 reply of its own.
    update = IotlbMsg(0x4000, 0x1000, 0x7F00_0000_4000, IotlbAccess.RO, IotlbType.UPDATE)
    [msg] = link.request(F.IOTLB_MSG, update, need_reply=True)
    assert link.answer(link.backend.reply(msg, U64(0)))[0].payload == U64(0)
    [ack] = backend_side.receive(frontend_side.ack(request, 0))
    assert (ack.request, ack.payload) == (B.IOTLB_MSG, U64(0))


# Requests whose whole exchange carries no fd (fd passing is covered by the tests above).
FD_FREE = [
    r for r, (_, n) in FRONTEND_SAMPLES.items() if n == 0 and OWN_REPLIES.get(r, (None, 0))[1] == 0
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(FD_FREE), max_size=15), st.integers(1, 64))
def test_random_sessions_through_the_link(requests, chunk) -> None:
    link = Link(chunk, negotiation=P.REPLY_ACK.mask)
    for request_ in requests:
        payload, _ = FRONTEND_SAMPLES[request_]
        if request_ == F.SET_PROTOCOL_FEATURES:
            payload = U64(payload.value | P.REPLY_ACK.mask)  # keep REPLY_ACK on
        [msg] = link.request(request_, payload, need_reply=True)
        assert msg.payload == payload
        if link.backend.expects_reply(msg):
            replies = link.answer(link.backend.reply(msg, OWN_REPLIES[request_][0]))
        else:
            replies = link.answer(link.backend.ack(msg, 0))
        assert [r.request for r in replies] == [request_]
    assert not link.frontend.awaiting_reply and link.backend.at_boundary
