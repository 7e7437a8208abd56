"""pyvhost.protocol codec: payload layouts, encode_message and MessageReader (fd ownership too).

Table-driven: SAMPLES holds one valid message per front-end request (1-43) and per back-end
request (1-8); every property is checked for every entry.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.fd import OwnedFd
from pyvhost.protocol import (
    BACKEND_REQUESTS,
    EMPTY,
    FRONTEND_REQUESTS,
    MAX_FDS,
    NEED_REPLY,
    U64,
    VERSION,
    BackendRequest,
    BadFds,
    BadPayload,
    BadPayloadSize,
    BadVersion,
    ConfigSpace,
    ConnectionBroken,
    DeviceStateTransfer,
    FrontendRequest,
    InflightDesc,
    IotlbMsg,
    LocalProtocolError,
    LogDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageReader,
    Payload,
    Raw,
    SharedObject,
    SingleMemRegion,
    UnknownRequest,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
    encode_message,
)
from pyvhost.protocol.codec import HEADER, MessageSpec
from pyvhost.protocol.constants import (
    ConfigFlags,
    DeviceStateDirection,
    DeviceStatePhase,
    IotlbAccess,
    IotlbType,
    ProtocolFeature,
)

F = FrontendRequest
B = BackendRequest

REGION_LOW = MemoryRegionDesc(0x0, 0xA_0000, 0x7F00_0000_0000, 0)
REGION_HIGH = MemoryRegionDesc(0x1_0000_0000, 0x4000_0000, 0x7F10_0000_0000, 0xC_0000)
OBJECT_UUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
MAC_AS_U64 = int.from_bytes(bytes.fromhex("525400123456"), "little")

# One valid (payload, fd count) per request; (spec section "Front-end message types").
FRONTEND_SAMPLES: dict[FrontendRequest, tuple[Payload, int]] = {
    F.GET_FEATURES: (EMPTY, 0),
    F.SET_FEATURES: (U64(1 << 32 | 1 << 30), 0),
    F.SET_OWNER: (EMPTY, 0),
    F.RESET_OWNER: (EMPTY, 0),
    F.SET_MEM_TABLE: (MemoryTable((REGION_LOW, REGION_HIGH)), 2),
    F.SET_LOG_BASE: (LogDesc(0x2_0000, 0), 1),
    F.SET_LOG_FD: (EMPTY, 1),
    F.SET_VRING_NUM: (VringState(0, 256), 0),
    F.SET_VRING_ADDR: (
        VringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x3000),
        0,
    ),
    F.SET_VRING_BASE: (VringState(1, 0), 0),
    F.GET_VRING_BASE: (VringState(1, 0), 0),
    F.SET_VRING_KICK: (VringFd(0), 1),
    F.SET_VRING_CALL: (VringFd(1), 1),
    F.SET_VRING_ERR: (VringFd(2, nofd=True), 0),
    F.GET_PROTOCOL_FEATURES: (EMPTY, 0),
    F.SET_PROTOCOL_FEATURES: (U64(ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask), 0),
    F.GET_QUEUE_NUM: (EMPTY, 0),
    F.SET_VRING_ENABLE: (VringState(0, 1), 0),
    F.SEND_RARP: (U64(MAC_AS_U64), 0),
    F.NET_SET_MTU: (U64(1500), 0),
    F.SET_BACKEND_REQ_FD: (EMPTY, 1),
    F.IOTLB_MSG: (IotlbMsg(0x1000, 0x1000, 0x7F00_0000_1000, IotlbAccess.RW, IotlbType.UPDATE), 0),
    F.SET_VRING_ENDIAN: (VringState(0, 0), 0),
    F.GET_CONFIG: (ConfigSpace(0, 8, 0, bytes(8)), 0),
    F.SET_CONFIG: (ConfigSpace(4, 2, ConfigFlags.FRONTEND, b"\x01\x02"), 0),
    F.CREATE_CRYPTO_SESSION: (Raw(bytes(range(200))), 0),
    F.CLOSE_CRYPTO_SESSION: (U64(7), 0),
    F.POSTCOPY_ADVISE: (EMPTY, 0),
    F.POSTCOPY_LISTEN: (EMPTY, 0),
    F.POSTCOPY_END: (EMPTY, 0),
    F.GET_INFLIGHT_FD: (InflightDesc(0, 0, 2, 256), 0),
    F.SET_INFLIGHT_FD: (InflightDesc(0x2000, 0, 2, 256), 1),
    F.GPU_SET_SOCKET: (EMPTY, 1),
    F.RESET_DEVICE: (EMPTY, 0),
    F.VRING_KICK: (VringState(0, 0), 0),
    F.GET_MAX_MEM_SLOTS: (EMPTY, 0),
    F.ADD_MEM_REG: (SingleMemRegion(REGION_HIGH), 1),
    F.REM_MEM_REG: (SingleMemRegion(REGION_HIGH), 0),
    F.SET_STATUS: (U64(0x0F), 0),
    F.GET_STATUS: (EMPTY, 0),
    F.GET_SHARED_OBJECT: (SharedObject(OBJECT_UUID), 0),
    F.SET_DEVICE_STATE_FD: (
        DeviceStateTransfer(DeviceStateDirection.SAVE, DeviceStatePhase.STOPPED),
        1,
    ),
    F.CHECK_DEVICE_STATE: (EMPTY, 0),
}

# ("Back-end message types").
BACKEND_SAMPLES: dict[BackendRequest, tuple[Payload, int]] = {
    B.IOTLB_MSG: (IotlbMsg(0x2000, 0, 0, IotlbAccess.RO, IotlbType.MISS), 0),
    B.CONFIG_CHANGE_MSG: (EMPTY, 0),
    B.VRING_HOST_NOTIFIER_MSG: (VringArea(3, False, 4096, 0x3000), 1),
    B.VRING_CALL: (VringState(2, 0), 0),
    B.VRING_ERR: (VringState(2, 0), 0),
    B.SHARED_OBJECT_ADD: (SharedObject(OBJECT_UUID), 0),
    B.SHARED_OBJECT_REMOVE: (SharedObject(OBJECT_UUID), 0),
    B.SHARED_OBJECT_LOOKUP: (SharedObject(OBJECT_UUID), 0),
}

# Both directions, as (request, table, reader factory, payload, fd count).
CASES = [
    (req, FRONTEND_REQUESTS, MessageReader.for_frontend_requests, *sample)
    for req, sample in FRONTEND_SAMPLES.items()
] + [
    (req, BACKEND_REQUESTS, MessageReader.for_backend_requests, *sample)
    for req, sample in BACKEND_SAMPLES.items()
]
CASE_IDS = [f"{type(c[0]).__name__[0]}.{c[0].name}" for c in CASES]


# --- helpers -------------------------------------------------------------------------------


def make_fds(n: int) -> list[OwnedFd]:
    return [OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def assert_all_closed(numbers: list[int]) -> None:
    assert [n for n in numbers if is_open(n)] == []


def raw_message(request: int, flags: int, body: bytes, size: int | None = None) -> bytes:
    return HEADER.pack(request, flags, len(body) if size is None else size) + body


@pytest.fixture
def fd_factory() -> Iterator:
    """make_fds that closes whatever a test leaves open (fds taken by a Message included)."""
    made: list[OwnedFd] = []

    def factory(n: int) -> list[OwnedFd]:
        fds = make_fds(n)
        made.extend(fds)
        return fds

    yield factory
    for fd in made:
        fd.close()


def feed_all(reader: MessageReader, data: bytes, fds: list[OwnedFd]) -> list[Message]:
    reader.feed(data, fds)
    return reader.messages()


# --- tables --------------------------------------------------------------------------------


def test_tables_cover_every_request() -> None:
    assert set(FRONTEND_REQUESTS) == set(FrontendRequest) == set(FRONTEND_SAMPLES)
    assert [int(r) for r in FrontendRequest] == list(range(1, 44))
    assert set(BACKEND_REQUESTS) == set(BackendRequest) == set(BACKEND_SAMPLES)
    assert [int(r) for r in BackendRequest] == list(range(1, 9))
    assert [int(f) for f in ProtocolFeature] == list(range(20))


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        (EMPTY, 0),
        (U64(1), 8),
        (VringState(0, 0), 8),
        (VringAddr(0, 0, 0, 0, 0, 0), 40),
        (MemoryTable((REGION_LOW,)), 8 + 32),
        (SingleMemRegion(REGION_LOW), 40),
        (LogDesc(0, 0), 16),
        (IotlbMsg(0, 0, 0, 0, 0), 32),  # sizeof(struct vhost_iotlb_msg), padded to 8
        (ConfigSpace(0, 3, 0, b"abc"), 12 + 3),
        (VringFd(0), 8),
        (VringArea(0, True, 0, 0), 24),
        (InflightDesc(0, 0, 0, 0), 24),  # sizeof(VhostUserInflight), padded to 8
        (SharedObject(OBJECT_UUID), 16),
        (DeviceStateTransfer(0, 0), 8),
    ],
)
def test_payload_sizes_match_c_structs(payload: Payload, size: int) -> None:
    assert len(payload.encode()) == size


def test_layouts_are_the_c_structs() -> None:
    addr = VringAddr(1, 1, 0x10, 0x20, 0x30, 0x40)
    assert addr.encode() == struct.pack("<IIQQQQ", 1, 1, 0x10, 0x20, 0x30, 0x40)
    iotlb = IotlbMsg(1, 2, 3, IotlbAccess.WO, IotlbType.INVALIDATE)
    assert iotlb.encode() == struct.pack("<QQQBB", 1, 2, 3, 2, 3) + bytes(6)
    table = MemoryTable((REGION_HIGH,))
    assert table.encode() == struct.pack("<IIQQQQ", 1, 0, 0x1_0000_0000, 0x4000_0000,
                                         0x7F10_0000_0000, 0xC_0000)
    assert VringFd(5, nofd=True).encode() == struct.pack("<Q", 0x105)
    assert SharedObject(OBJECT_UUID).encode() == bytes.fromhex("123456789abcdef0123456789abcdef0")


def test_header_layout() -> None:
    data, fds = encode_message(F.SET_VRING_NUM, VringState(2, 512), VERSION | NEED_REPLY)
    assert data == struct.pack("<IIIII", 8, 0x9, 8, 2, 512)
    assert fds == []


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "table", "reader", "payload", "nfds"), CASES, ids=CASE_IDS)
def test_round_trip(request_, table, reader, payload, nfds, fd_factory) -> None:
    fds = fd_factory(nfds)
    data, numbers = encode_message(request_, payload, VERSION, fds)
    assert numbers == [fd.fileno() for fd in fds]
    [msg] = feed_all(reader(), data, fds)
    assert (msg.request, msg.flags, msg.payload) == (request_, VERSION, payload)
    assert [fd.fileno() for fd in msg.fds] == numbers
    assert type(msg.request) is type(request_)


@pytest.mark.parametrize(("request_", "table", "reader", "payload", "nfds"), CASES, ids=CASE_IDS)
def test_byte_at_a_time_parses_identically(request_, table, reader, payload, nfds, fd_factory):
    fds = fd_factory(nfds)
    data, numbers = encode_message(request_, payload, VERSION | NEED_REPLY, fds)
    r = reader()
    got: list[Message] = []
    for i in range(len(data)):
        # The fds arrive with the recvmsg that returns the header's first byte.
        r.feed(data[i : i + 1], fds if i == 0 else ())
        got += r.messages()
        assert (len(got) == 1) == (i == len(data) - 1)
    [msg] = got
    assert (msg.request, msg.payload, msg.need_reply) == (request_, payload, True)
    assert [fd.fileno() for fd in msg.fds] == numbers
    assert r.at_boundary


def test_many_messages_in_one_chunk(fd_factory) -> None:
    chunk = b"".join(
        encode_message(req, payload)[0]
        for req, (payload, nfds) in FRONTEND_SAMPLES.items()
        if nfds == 0
    )
    msgs = feed_all(MessageReader.for_frontend_requests(), chunk, [])
    expected = [(r, p) for r, (p, n) in FRONTEND_SAMPLES.items() if n == 0]
    assert [(m.request, m.payload) for m in msgs] == expected


@given(st.data())
def test_round_trip_with_random_chunking(data) -> None:
    requests = data.draw(st.lists(st.sampled_from(sorted(FRONTEND_SAMPLES)), max_size=12))
    frames = [encode_message(r, FRONTEND_SAMPLES[r][0])[0] for r in requests]
    starts = [sum(map(len, frames[:i])) for i in range(len(frames) + 1)]
    stream = b"".join(frames)
    cuts = set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    # The kernel ends a recvmsg after the skb that carried fds: a chunk holding the start of an
    # fd-carrying message never reaches into the next one.
    cuts |= {starts[i + 1] for i, r in enumerate(requests) if FRONTEND_SAMPLES[r][1]}
    bounds = sorted(cuts | {0, len(stream)})
    sent = {starts[i]: make_fds(FRONTEND_SAMPLES[r][1]) for i, r in enumerate(requests)}
    reader = MessageReader.for_frontend_requests()
    got: list[Message] = []
    for lo, hi in zip(bounds, bounds[1:]):
        fds = [fd for start, fds in sent.items() if lo <= start < hi for fd in fds]
        reader.feed(stream[lo:hi], fds)
        got += reader.messages()
    assert [(m.request, m.payload) for m in got] == [(r, FRONTEND_SAMPLES[r][0]) for r in requests]
    assert [m.fds for m in got] == [tuple(sent[s]) for s in starts[:-1]]
    for msg in got:
        msg.close_fds()


# --- hypothesis: payload round trips --------------------------------------------------------

u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
regions = st.builds(MemoryRegionDesc, u64, u64, u64, u64)
config_bodies = st.binary(max_size=256)

PAYLOADS = st.one_of(
    st.builds(U64, u64),
    st.builds(VringState, u32, u32),
    st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    st.builds(SingleMemRegion, regions),
    st.builds(LogDesc, u64, u64),
    st.builds(IotlbMsg, u64, u64, u64, u8, u8),
    config_bodies.flatmap(lambda b: st.builds(ConfigSpace, u32, st.just(len(b)), u32, st.just(b))),
    st.builds(VringFd, u8, st.booleans()),
    st.builds(VringArea, u8, st.booleans(), u64, u64),
    st.builds(InflightDesc, u64, u64, u16, u16),
    st.builds(SharedObject, st.uuids()),
    st.builds(DeviceStateTransfer, u32, u32),
    st.builds(Raw, st.binary(max_size=4096)),
)


@given(PAYLOADS)
def test_payload_round_trip(payload: Payload) -> None:
    data = payload.encode()
    assert type(payload).size_ok(len(data))
    assert type(payload).decode(data) == payload


@given(st.lists(regions, max_size=8), u32)
def test_memory_table_full_size_form_accepted(regs, padding) -> None:
    # Senders that send the whole C struct: 8 regions' worth of bytes, unused ones zero.
    data = struct.pack("<II", len(regs), padding) + b"".join(r.encode() for r in regs)
    data += bytes(MemoryTable.FULL_SIZE - len(data))
    msgs = feed_all(MessageReader.for_frontend_requests(),
                    raw_message(F.SET_MEM_TABLE, VERSION, data), make_fds(len(regs)))
    assert msgs[0].payload == MemoryTable(tuple(regs))
    msgs[0].close_fds()


# --- rejections ----------------------------------------------------------------------------


def _bad_sizes(spec: MessageSpec, good: int) -> list[int]:
    candidates = [good - 1, good + 1, spec.max_size() + 1, 2**32 - 1]
    return [n for n in candidates if n >= 0 and spec.payload_type(n) is None]


@pytest.mark.parametrize(("request_", "table", "reader", "payload", "nfds"), CASES, ids=CASE_IDS)
def test_wrong_payload_size_rejected(request_, table, reader, payload, nfds) -> None:
    body = payload.encode()
    bad = _bad_sizes(table[request_], len(body))
    assert bad
    for size in bad:
        fds = make_fds(nfds)
        numbers = [fd.fileno() for fd in fds]
        # Only the header is needed: the size is judged before any payload byte arrives.
        r = reader()
        with pytest.raises(BadPayloadSize) as info:
            feed_all(r, raw_message(request_, VERSION, b"", size), fds)
        assert info.value.request == request_
        assert_all_closed(numbers)


@pytest.mark.parametrize(("request_", "table", "reader", "payload", "nfds"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4 | 0x2, 0xFFFF_FFF0])
def test_wrong_version_rejected(request_, table, reader, payload, nfds, flags) -> None:
    fds = make_fds(nfds)
    numbers = [fd.fileno() for fd in fds]
    with pytest.raises(BadVersion) as info:
        feed_all(reader(), raw_message(request_, flags, payload.encode()), fds)
    assert info.value.request == request_
    assert_all_closed(numbers)


@pytest.mark.parametrize(("request_", "table", "reader", "payload", "nfds"), CASES, ids=CASE_IDS)
def test_too_many_fds_rejected_and_closed(request_, table, reader, payload, nfds) -> None:
    allowed = table[request_].fds(payload)
    for count in {allowed.stop, MAX_FDS + 1}:
        fds = make_fds(count)
        numbers = [fd.fileno() for fd in fds]
        with pytest.raises(BadFds) as info:
            feed_all(reader(), encode_message(request_, payload)[0], fds)
        assert info.value.request == request_
        assert_all_closed(numbers)


@pytest.mark.parametrize(
    ("request_", "table", "reader", "payload", "nfds"),
    [c for c in CASES if c[4] > 0],
    ids=[i for i, c in zip(CASE_IDS, CASES) if c[4] > 0],
)
def test_missing_fds_rejected(request_, table, reader, payload, nfds) -> None:
    fds = make_fds(nfds - 1)
    numbers = [fd.fileno() for fd in fds]
    with pytest.raises(BadFds):
        feed_all(reader(), encode_message(request_, payload)[0], fds)
    assert_all_closed(numbers)


@pytest.mark.parametrize("request_id", [0, 44, 99, 0xFFFF_FFFF])
def test_unknown_frontend_request_rejected(request_id: int) -> None:
    fds = make_fds(1)
    number = fds[0].fileno()
    with pytest.raises(UnknownRequest) as info:
        feed_all(MessageReader.for_frontend_requests(), raw_message(request_id, VERSION, b""), fds)
    assert info.value.request == request_id
    assert str(request_id) in str(info.value)
    assert not is_open(number)


@pytest.mark.parametrize("request_id", [0, 9, 43])
def test_unknown_backend_request_rejected(request_id: int) -> None:
    with pytest.raises(UnknownRequest):
        feed_all(MessageReader.for_backend_requests(), raw_message(request_id, VERSION, b""), [])


@pytest.mark.parametrize(
    ("request_", "body", "why"),
    [
        (F.SET_VRING_KICK, struct.pack("<Q", 0x200), "bits other than index"),
        (F.SET_VRING_CALL, struct.pack("<Q", 1 << 63), "bits other than index"),
        (F.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 8), "at most 8"),
        (F.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32 * 3), "for 2 regions"),
        (F.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(5), "size field 4"),
        (F.SET_CONFIG, struct.pack("<III", 0, 300, 0), "size field 300"),
    ],
)
def test_inconsistent_payload_rejected(request_, body, why) -> None:
    with pytest.raises(BadPayload, match=why) as info:
        feed_all(MessageReader.for_frontend_requests(), raw_message(request_, VERSION, body), [])
    assert info.value.request == request_


def test_nofd_bit_must_match_the_fds() -> None:
    reader = MessageReader.for_frontend_requests
    with pytest.raises(BadFds):  # no-fd flag but an fd came
        feed_all(reader(), encode_message(F.SET_VRING_KICK, VringFd(0, nofd=True))[0], make_fds(1))
    with pytest.raises(BadFds):  # fd promised, none came
        feed_all(reader(), encode_message(F.SET_VRING_CALL, VringFd(0))[0], [])


def test_rem_mem_reg_accepts_a_stray_fd(fd_factory) -> None:
    # "the back-end MAY accept messages with one file descriptor ... MUST close it".
    payload, _ = FRONTEND_SAMPLES[F.REM_MEM_REG]
    [msg] = feed_all(MessageReader.for_frontend_requests(),
                     encode_message(F.REM_MEM_REG, payload)[0], fd_factory(1))
    number = msg.fds[0].fileno()
    msg.close_fds()
    assert not is_open(number)


def test_reader_refuses_use_after_error() -> None:
    reader = MessageReader.for_frontend_requests()
    with pytest.raises(BadVersion):
        feed_all(reader, raw_message(F.GET_FEATURES, 0x2, b""), [])
    fds = make_fds(2)
    numbers = [fd.fileno() for fd in fds]
    good = encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_LOW, REGION_HIGH)))[0]
    with pytest.raises(ConnectionBroken) as info:
        reader.feed(good, fds)
    assert isinstance(info.value.__cause__, BadVersion)
    assert_all_closed(numbers)  # fds fed to a broken reader are still the reader's to close
    with pytest.raises(ConnectionBroken):
        reader.next_message()


def test_error_closes_fds_of_other_buffered_messages() -> None:
    first, second = make_fds(1), make_fds(1)
    numbers = [first[0].fileno(), second[0].fileno()]
    reader = MessageReader.for_frontend_requests()
    reader.feed(encode_message(F.SET_LOG_FD)[0], first)
    reader.feed(raw_message(F.SET_LOG_FD, VERSION, b"", 3), second)  # bad size
    with pytest.raises(BadPayloadSize):
        reader.messages()  # the good first message is parsed, then closed with the failure
    assert_all_closed(numbers)


def test_encode_refuses_more_than_max_fds() -> None:
    fds = make_fds(MAX_FDS + 1)
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_MEM_TABLE, EMPTY, VERSION, fds)
    for fd in fds:
        fd.close()


def test_encode_refuses_out_of_range_fields() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_VRING_NUM, VringState(2**32, 0))
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_VRING_KICK, VringFd(256))
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_LOW,) * 9))


# --- fd attachment -------------------------------------------------------------------------


def test_fds_go_to_the_last_header_starting_in_the_chunk(fd_factory) -> None:
    # A recvmsg can return the tail of earlier fd-less messages together with the sendmsg that
    # carried the fds (the kernel stops after an skb with fds, not before it).
    fds = fd_factory(1)
    chunk = encode_message(F.GET_FEATURES)[0] + encode_message(F.SET_LOG_FD)[0]
    first, second = feed_all(MessageReader.for_frontend_requests(), chunk, fds)
    assert first.fds == () and second.fds == tuple(fds)


def test_fds_fed_mid_message_belong_to_it(fd_factory) -> None:
    fds = fd_factory(1)
    data = encode_message(F.SET_LOG_BASE, LogDesc(4096, 0))[0]
    reader = MessageReader.for_frontend_requests()
    reader.feed(data[:5])
    reader.feed(data[5:], fds)
    [msg] = reader.messages()
    assert msg.fds == tuple(fds)


def test_fds_fed_without_data_go_to_the_next_message(fd_factory) -> None:
    fds = fd_factory(1)
    reader = MessageReader.for_frontend_requests()
    reader.feed(b"", fds)
    assert not reader.at_boundary
    [msg] = feed_all(reader, encode_message(F.SET_LOG_FD)[0], [])
    assert msg.fds == tuple(fds)


def test_close_releases_buffered_fds() -> None:
    fds = make_fds(2)
    numbers = [fd.fileno() for fd in fds]
    reader = MessageReader.for_frontend_requests()
    table = MemoryTable((REGION_LOW, REGION_HIGH))
    reader.feed(encode_message(F.SET_MEM_TABLE, table)[0][:20], fds)
    assert reader.messages() == [] and not reader.at_boundary
    reader.close()
    assert_all_closed(numbers)
    with pytest.raises(LocalProtocolError):
        reader.next_message()


# --- Message ownership ---------------------------------------------------------------------


def test_message_take_and_close_fds() -> None:
    fds = make_fds(3)
    numbers = [fd.fileno() for fd in fds]
    msg = Message(F.SET_MEM_TABLE, VERSION, EMPTY, tuple(fds))
    kept = msg.take_fd(1)
    with msg:
        pass  # leaving the block closes what the handler did not take
    assert [is_open(n) for n in numbers] == [False, True, False]
    assert kept.fileno() == numbers[1] and msg.fds[1].closed
    kept.close()
    assert msg.take_fds() == []


def test_message_flag_properties() -> None:
    msg = Message(F.GET_FEATURES, VERSION | NEED_REPLY | 0x4, EMPTY)
    assert (msg.version, msg.need_reply, msg.is_reply) == (1, True, True)
