"""Both ends of a vhost-user connection and of its back-end channel, without I/O.

Theory of operation
-------------------
A vhost-user link is strictly request/response: one side asks, the other answers the requests
that solicit an answer, in order. Each endpoint is a *requester* or a *responder*:

    main socket        FrontendProtocol (requester)  ->  BackendProtocol (responder)
    back-end channel   BackendChannel   (requester)  ->  FrontendChannel (responder)

A request is answered by its own reply (GET_FEATURES -> u64, ...; codec.FRONTEND_REPLIES), or,
when REPLY_ACK is negotiated and the request has NEED_REPLY but no reply of its own, by a u64
ack (0 = success; "VHOST_USER_PROTOCOL_F_REPLY_ACK"). Otherwise it is not answered at all.
A responder remembers, in arrival order, the messages it still owes an answer; a requester the
answers it still awaits. Both sides derive this from the same `Negotiation` (the protocol
features of SET_PROTOCOL_FEATURES, applied when that message is sent/received, so an ack
requested on that very message is already governed by the new value).

Connection state lives in `_TRANSITIONS`: an endpoint is OPEN until the peer breaks the
protocol (BROKEN, after a RemoteProtocolError) or we close it (CLOSED). Neither is left; a
BROKEN endpoint raises ConnectionBroken, a CLOSED one LocalProtocolError.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum

from pyvhost.fd import OwnedFd, close_all

from .codec import (
    ACK_SPEC,
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    MessageReader,
    MessageSpec,
    backend_reply_spec,
    check_outgoing,
    encode_message,
    frontend_reply_spec,
    table_lookup,
)
from .constants import (
    NEED_REPLY,
    REPLY,
    VERSION,
    VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
)
from .errors import (
    ConnectionBroken,
    LocalProtocolError,
    NotSupported,
    RemoteProtocolError,
    UnexpectedReply,
)
from .messages import EMPTY, U64, InflightDesc, Message, Payload

AnyRequest = FrontendRequest | BackendRequest
Fds = Sequence[OwnedFd | int]


class ConnectionState(enum.Enum):
    OPEN = "open"
    BROKEN = "broken"  # the peer broke the protocol
    CLOSED = "closed"  # we called close()


_TRANSITIONS: Mapping[tuple[ConnectionState, str], ConnectionState] = {
    (ConnectionState.OPEN, "remote_error"): ConnectionState.BROKEN,
    (ConnectionState.OPEN, "close"): ConnectionState.CLOSED,
    (ConnectionState.BROKEN, "close"): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, "close"): ConnectionState.CLOSED,
}


class Negotiation:
    """Protocol features in force, shared by a connection and its back-end channel."""

    __slots__ = ("protocol_features",)

    def __init__(self, protocol_features: int = 0) -> None:
        self.protocol_features = protocol_features

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature.mask)

    @property
    def reply_ack(self) -> bool:
        return self.has(ProtocolFeature.REPLY_ACK)

    def __repr__(self) -> str:
        on = [f.name for f in ProtocolFeature if self.has(f)]
        return f"Negotiation({'|'.join(on) or 'none'})"


class _Endpoint:
    """State machine and reader plumbing shared by all four endpoints."""

    def __init__(self, reader: MessageReader, negotiation: Negotiation | None) -> None:
        self._reader = reader
        self.negotiation = negotiation if negotiation is not None else Negotiation()
        self.state = ConnectionState.OPEN
        self._broken_by: RemoteProtocolError | None = None

    def close(self) -> None:
        """Stop using the endpoint; fds buffered in a partial message are closed."""
        self._transition("close")
        self._reader.close()

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is buffered (EOF now would be clean)."""
        return self._reader.at_boundary

    def _transition(self, event: str) -> None:
        self.state = _TRANSITIONS[(self.state, event)]

    def _check_open(self, fds: Sequence[object] = ()) -> None:
        if self.state is ConnectionState.OPEN:
            return
        close_all([fd for fd in fds if isinstance(fd, OwnedFd)])
        if self.state is ConnectionState.BROKEN:
            assert self._broken_by is not None
            cause = self._broken_by
            raise ConnectionBroken(f"connection broken: {cause.message}", cause.request) from cause
        raise LocalProtocolError("connection is closed")

    def _read(self, data: bytes, fds: Sequence[OwnedFd]) -> list[Message]:
        self._check_open(fds)
        try:
            self._reader.feed(data, fds)
            return self._reader.messages()
        except RemoteProtocolError as exc:
            self._broken_by = exc
            self._transition("remote_error")
            raise


# --- responders ----------------------------------------------------------------------------

_REPLY, _ACK = "reply", "ack"


class _Responder(_Endpoint):
    """Parses requests and answers them: own replies, REPLY_ACK acks, refusals."""

    def __init__(
        self,
        requests: Mapping[IntEnum, MessageSpec],
        enum_type: type[IntEnum],
        reply_spec: Callable[[AnyRequest, int], MessageSpec | None],
        refusals: Mapping[IntEnum, Callable[[Message], Payload]],
        negotiation: Negotiation | None,
    ) -> None:
        super().__init__(MessageReader(table_lookup(requests, enum_type)), negotiation)
        self._reply_spec = reply_spec
        self._refusals = refusals
        # Messages owed an answer, in arrival order: (message, _REPLY or _ACK, spec).
        self._owed: deque[tuple[Message, str, MessageSpec]] = deque()

    def receive(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> list[Message]:
        """Feed what recvmsg returned; get every complete request. The caller owns their fds."""
        messages = self._read(data, fds)
        for msg in messages:
            self._observe(msg)
            self._note_owed(msg)
        return messages

    def expects_reply(self, msg: Message) -> bool:
        """`msg` solicits a reply of its own that has not been sent yet."""
        return self._owed_kind(msg) == _REPLY

    def expects_ack(self, msg: Message) -> bool:
        """`msg` must be answered by a REPLY_ACK u64 that has not been sent yet."""
        return self._owed_kind(msg) == _ACK

    def reply(self, msg: Message, payload: Payload = EMPTY, fds: Fds = ()) -> bytes:
        """Bytes of the reply to `msg`; send `fds` with them. REPLY set, NEED_REPLY clear."""
        self._check_open()
        spec = self._pop_owed(msg, _REPLY)
        check_outgoing(msg.request, spec, payload, fds)
        # QEMU and DPDK require the flags of a reply to be exactly VERSION | REPLY.
        return encode_message(msg.request, payload, VERSION | REPLY, fds)[0]

    def ack(self, msg: Message, status: int = 0) -> bytes | None:
        """The REPLY_ACK u64 for `msg` (0 = success), or None when `msg` is not owed one."""
        self._check_open()
        if not 0 <= status < 1 << 64:
            raise LocalProtocolError(f"ack status {status} is not a u64", msg.request)
        if not self.expects_ack(msg):
            return None
        self._pop_owed(msg, _ACK)
        return encode_message(msg.request, U64(status), VERSION | REPLY)[0]

    def not_supported(self, msg: Message) -> bytes | None:
        """Refuse a recognised request cleanly; closes its fds.

        Returns the bytes to send (a failing ack or the request's own error reply), or None when
        nothing is owed. Raises NotSupported (the connection then breaks) for a request whose
        reply has no way to say "no", e.g. GET_FEATURES.
        """
        msg.close_fds()
        kind = self._owed_kind(msg)
        if kind is None:
            return None
        if kind == _ACK:
            return self.ack(msg, 1)
        refusal = self._refusals.get(msg.request)
        if refusal is None:
            self._broken_by = NotSupported("request not supported", msg.request)
            self._transition("remote_error")
            raise self._broken_by
        return self.reply(msg, refusal(msg))

    def _observe(self, msg: Message) -> None:
        """Hook: update negotiated state from a received request."""

    def _note_owed(self, msg: Message) -> None:
        spec = self._reply_spec(msg.request, self.negotiation.protocol_features)
        if spec is not None:
            self._owed.append((msg, _REPLY, spec))
        elif msg.need_reply and self.negotiation.reply_ack:
            self._owed.append((msg, _ACK, ACK_SPEC))

    def _owed_kind(self, msg: Message) -> str | None:
        return next((kind for m, kind, _ in self._owed if m is msg), None)

    def _pop_owed(self, msg: Message, kind: str) -> MessageSpec:
        if self._owed_kind(msg) != kind:
            raise LocalProtocolError(f"{msg.request.name} is not owed a {kind}", msg.request)
        head, _, spec = self._owed[0]
        if head is not msg:
            raise LocalProtocolError(
                f"answer {head.request.name} before {msg.request.name}", msg.request
            )
        self._owed.popleft()
        return spec


def _refuse_config(msg: Message) -> Payload:
    return EMPTY  # GET_CONFIG: "zero length of payload to indicate an error"


def _refuse_u64(msg: Message) -> Payload:
    return U64(1)


def _refuse_device_state(msg: Message) -> Payload:
    return U64(VRING_NOFD_MASK | 1)  # bits 0-7 non-zero: error; bit 8: no fd


def _refuse_inflight(msg: Message) -> Payload:
    return InflightDesc(0, 0, 0, 0)  # QEMU: mmap_size 0 = no inflight area


def _refuse_echo(msg: Message) -> Payload:
    return msg.payload  # GET_SHARED_OBJECT: the request echoed without a dmabuf fd


# Own replies that can carry "no", used by not_supported(). One table per channel: the two
# request enums share numbers, and IntEnum members with equal values are equal dict keys.
_FRONTEND_REFUSALS: Mapping[FrontendRequest, Callable[[Message], Payload]] = {
    FrontendRequest.GET_CONFIG: _refuse_config,
    FrontendRequest.IOTLB_MSG: _refuse_u64,
    FrontendRequest.POSTCOPY_ADVISE: lambda msg: EMPTY,  # without the userfaultfd
    FrontendRequest.POSTCOPY_END: _refuse_u64,
    FrontendRequest.GET_INFLIGHT_FD: _refuse_inflight,
    FrontendRequest.GET_SHARED_OBJECT: _refuse_echo,
    FrontendRequest.SET_DEVICE_STATE_FD: _refuse_device_state,
    FrontendRequest.CHECK_DEVICE_STATE: _refuse_u64,
}
_BACKEND_REFUSALS: Mapping[BackendRequest, Callable[[Message], Payload]] = {
    BackendRequest.SHARED_OBJECT_LOOKUP: _refuse_u64,
}


class BackendProtocol(_Responder):
    """The back-end's end of the main socket: front-end requests in, replies out."""

    def __init__(self, negotiation: Negotiation | None = None) -> None:
        super().__init__(
            FRONTEND_REQUESTS,  # type: ignore[arg-type]
            FrontendRequest,
            frontend_reply_spec,  # type: ignore[arg-type]
            _FRONTEND_REFUSALS,  # type: ignore[arg-type]
            negotiation,
        )

    def backend_channel(self) -> BackendChannel:
        """Protocol for the socket received with SET_BACKEND_REQ_FD (shares the negotiation)."""
        return BackendChannel(self.negotiation)

    def _observe(self, msg: Message) -> None:
        if msg.request == FrontendRequest.SET_PROTOCOL_FEATURES:
            assert isinstance(msg.payload, U64)
            self.negotiation.protocol_features = msg.payload.value


class FrontendChannel(_Responder):
    """The front-end's end of the back-end channel: back-end requests in, replies out."""

    def __init__(self, negotiation: Negotiation | None = None) -> None:
        super().__init__(
            BACKEND_REQUESTS,  # type: ignore[arg-type]
            BackendRequest,
            backend_reply_spec,  # type: ignore[arg-type]
            _BACKEND_REFUSALS,  # type: ignore[arg-type]
            negotiation,
        )


# --- requesters ----------------------------------------------------------------------------


class _Requester(_Endpoint):
    """Encodes requests and parses the replies they solicit, checking they match."""

    def __init__(
        self,
        requests: Mapping[IntEnum, MessageSpec],
        enum_type: type[IntEnum],
        reply_spec: Callable[[AnyRequest, int], MessageSpec | None],
        negotiation: Negotiation | None,
    ) -> None:
        super().__init__(MessageReader(self._lookup_reply), negotiation)
        self._requests = requests
        self._enum_type = enum_type
        self._reply_spec = reply_spec
        self._awaited: deque[tuple[AnyRequest, MessageSpec]] = deque()

    @property
    def awaiting_reply(self) -> bool:
        return bool(self._awaited)

    def send_request(
        self,
        request: AnyRequest,
        payload: Payload = EMPTY,
        fds: Fds = (),
        need_reply: bool = False,
    ) -> tuple[bytes, list[int]]:
        """Bytes and fd numbers of a request (NEED_REPLY if asked); records the awaited reply."""
        self._check_open()
        # Type check first: FrontendRequest.SET_FEATURES == BackendRequest.CONFIG_CHANGE_MSG.
        spec = self._requests.get(request) if isinstance(request, self._enum_type) else None
        if spec is None:
            raise LocalProtocolError("not a request of this channel", request)
        check_outgoing(request, spec, payload, fds)
        self._check_fds_allowed(request, fds)
        self._observe_sent(request, payload)
        awaited = self._awaited_spec(request, need_reply)
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        out = encode_message(request, payload, flags, fds)
        if awaited is not None:
            self._awaited.append((request, awaited))
        return out

    def receive(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> list[Message]:
        """Feed what recvmsg returned; get every complete reply, in request order."""
        return self._read(data, fds)

    def _awaited_spec(self, request: AnyRequest, need_reply: bool) -> MessageSpec | None:
        own = self._reply_spec(request, self.negotiation.protocol_features)
        if own is not None:
            return own
        if not need_reply:
            return None
        if not self.negotiation.reply_ack:
            raise LocalProtocolError("NEED_REPLY without REPLY_ACK negotiated", request)
        return ACK_SPEC

    def _lookup_reply(self, request_id: int, flags: int) -> tuple[IntEnum, MessageSpec]:
        """Called by the reader at each header; the reply must match the oldest request."""
        if not flags & REPLY:
            raise UnexpectedReply(f"flags {flags:#x} lack REPLY", request_id)
        if not self._awaited:
            raise UnexpectedReply("reply while none is awaited", request_id)
        request, spec = self._awaited[0]
        if request_id != request:
            raise UnexpectedReply(f"reply awaited for {request.name}", request_id)
        self._awaited.popleft()
        return request, spec

    def _check_fds_allowed(self, request: AnyRequest, fds: Fds) -> None:
        """Hook: refuse fds the negotiation does not allow."""

    def _observe_sent(self, request: AnyRequest, payload: Payload) -> None:
        """Hook: update negotiated state from a request being sent."""


class FrontendProtocol(_Requester):
    """The front-end's end of the main socket (pyvhost's test-double front-end uses it)."""

    def __init__(self, negotiation: Negotiation | None = None) -> None:
        super().__init__(
            FRONTEND_REQUESTS,  # type: ignore[arg-type]
            FrontendRequest,
            frontend_reply_spec,  # type: ignore[arg-type]
            negotiation,
        )

    def frontend_channel(self) -> FrontendChannel:
        """Protocol for our end of the socketpair passed with SET_BACKEND_REQ_FD."""
        return FrontendChannel(self.negotiation)

    def _observe_sent(self, request: AnyRequest, payload: Payload) -> None:
        if request == FrontendRequest.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            self.negotiation.protocol_features = payload.value


class BackendChannel(_Requester):
    """The back-end's end of the back-end channel: requests to the front-end, replies in."""

    def __init__(self, negotiation: Negotiation | None = None) -> None:
        super().__init__(
            BACKEND_REQUESTS,  # type: ignore[arg-type]
            BackendRequest,
            backend_reply_spec,  # type: ignore[arg-type]
            negotiation,
        )

    def _check_fds_allowed(self, request: AnyRequest, fds: Fds) -> None:
        # "If BACKEND_SEND_FD is negotiated, back-end can send file descriptors".
        if fds and not self.negotiation.has(ProtocolFeature.BACKEND_SEND_FD):
            raise LocalProtocolError("fds on the back-end channel need BACKEND_SEND_FD", request)

