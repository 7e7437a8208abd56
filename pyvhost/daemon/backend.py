"""One frontend connection's vhost-user back-end: the request handlers and the ring life cycle.

Theory of operation. The protocol thread feeds received bytes and fds to `receive()`, which
decodes them (`BackendProtocol`, sans-I/O), runs one handler per request, and returns the
bytes (and fds) to send back, in order. A handler returns the payload of the request's own
reply, or None; when the frontend asked for an ack (REPLY_ACK + NEED_REPLY) it gets 0 after a
successful handler and 1 after a refused one. A handler refuses with `RequestRefused`: the
refusal is logged with the connection and request names, and the connection goes on. A
request this back-end cannot refuse in-band (a GET_* whose reply has no "no") ends the
connection with `ConnectionFatal`; so does any `RemoteProtocolError` of the codec.

Memory changes (SET_MEM_TABLE, ADD/REM_MEM_REG) go through `GuestMemory`, which returns only
after the grace period, so every reply goes out when no worker can still use what changed.

Ring life cycle ("Ring states"): a ring starts when it gets its kick fd (or NOFD, or
VRING_KICK) and stops on GET_VRING_BASE, RESET_DEVICE, SET_STATUS 0 or disconnect. It is
enabled by SET_VRING_ENABLE, or at start when VHOST_USER_F_PROTOCOL_FEATURES was not
negotiated. Workers only look at `Vring.running`; this thread clears it and waits a grace
period (`_stop_worker_use`) before it touches a ring the workers may be running. A ring served
through `Device.handle()` that stops also waits (bounded by `drain_timeout`) for its deferred
requests and publishes them before the reply: GET_VRING_BASE then reports an index every
request before it has been answered for. A ring whose device consumes all it is given (net TX)
first lets the worker consume what the driver made available before GET_VRING_BASE or
SET_VRING_ENABLE 0 (`_finish_available`), so that a last burst is counted as the ring was
running it. At start, a base that disagrees with the ring the frontend kept (a frontend that
outlived a killed backend) resumes from the ring's used index (`SplitQueue.sync_used_from_ring`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pyvhost.daemon.eventfd import EventFd, NotAnEventFd
from pyvhost.daemon.events import DeviceEvents
from pyvhost.daemon.self_log import SelfLog
from pyvhost.daemon.vring import Vring
from pyvhost.daemon.worker import Worker, group_rings
from pyvhost.device import ConfigError, Device, RequestRunner
from pyvhost.fd import OwnedFd
from pyvhost.memory.dirty_log import BadLogError, DirtyLog
from pyvhost.memory.epoch import GraceTimeout
from pyvhost.memory.errors import AddressNotMappedError, BadRegionError
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.inflight_area import BadInflightArea, InflightArea
from pyvhost.memory.inflight_area import allocate as allocate_inflight
from pyvhost.memory.iotlb import BadIotlbEntry, IotlbEntry
from pyvhost.memory.region import RegionSpec
from pyvhost.protocol import (
    EMPTY,
    U64,
    BackendProtocol,
    ConfigSpace,
    BackendChannel,
    BackendRequest,
    FrontendRequest,
    InflightDesc,
    IotlbMsg,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    RemoteProtocolError,
    SingleMemRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.protocol.constants import (
    MAX_MEM_SLOTS,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    ConfigFlags,
    IotlbType,
)
from pyvhost.protocol.messages import LogDesc
from pyvhost.ring import kernels as K
from pyvhost.ring.layout import (
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_IOMMU_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    is_valid_queue_size,
)
from pyvhost.ring.inflight import InflightError, queue_region_size
from pyvhost.ring.packed_layout import VIRTIO_F_RING_PACKED
from pyvhost.ring.virtqueue import Virtqueue

log = logging.getLogger(__name__)

R = FrontendRequest
P = ProtocolFeature

# Device status bits (virtio 1.x 2.1).
STATUS_DEVICE_NEEDS_RESET = 0x40

# Protocol features every device gets. LOG_SHMFD (with VHOST_F_LOG_ALL): live migration.
BASE_PROTOCOL_FEATURES = (P.MQ.mask | P.REPLY_ACK.mask | P.BACKEND_REQ.mask | P.CONFIG.mask
                          | P.CONFIGURE_MEM_SLOTS.mask | P.RESET_DEVICE.mask | P.STATUS.mask
                          | P.LOG_SHMFD.mask)


# Virtio transport features the ring layer implements for every device (virtio 1.x 6): offered
# whatever the device's own bits. QEMU's vhost-user-rng-pci hands the guest's INDIRECT_DESC and
# EVENT_IDX to SET_FEATURES without looking at GET_FEATURES; refusing them left the guest
# waiting for used buffers it never kicked for.
# VIRTIO_F_IOMMU_PLATFORM: a device IOTLB (memory/iotlb.py), used only when acked (QEMU acks it
# only for a device behind a vIOMMU with iommu_platform=on; it requires BACKEND_REQ and
# REPLY_ACK, both offered).
TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_RING_PACKED)
                      | (1 << VIRTIO_F_IOMMU_PLATFORM))
# An unanswered IOTLB miss for the same page is sent again after this long (the frontend sends
# nothing for an IOVA the vIOMMU does not map; the ring then waits, retrying at this pace).
MISS_RESEND_S = 0.2
# Reserved transport feature bits (24..40): a frontend that passes one we did not offer gets it
# ignored with a warning instead of a refusal (a device-type bit not offered is refused).
TRANSPORT_BIT_RANGE = ((1 << 41) - 1) & ~((1 << 24) - 1)


class RequestRefused(Exception):
    """The request is refused; the connection goes on (an error ack if one was asked for)."""


class ConnectionFatal(Exception):
    """The request cannot be answered or refused in-band: the connection must close."""


@dataclass(frozen=True)
class ReplyWithFds:
    """What a handler returns for a reply that carries fds (kept open until sent)."""

    payload: Payload
    fds: Sequence[OwnedFd]


@dataclass(frozen=True)
class BackendOptions:
    metadata_access: str = "auto"  # auto | direct | copy (SplitQueue)
    poll: bool = False             # busy-poll workers
    workers: int = 1
    max_burst: int = 256
    grace_timeout: float = 1.0
    drain_timeout: float = 30.0    # a stopping ring waits this long for deferred requests
    bench_log_all: bool = False    # log as if LOG_ALL were on, into a log of our own (self_log)


Outgoing = tuple[bytes, Sequence[OwnedFd | int]]


class Backend:
    def __init__(self, device: Device, name: str, options: BackendOptions = BackendOptions()
                 ) -> None:
        self.device = device
        self.name = name
        self.options = options
        self.protocol = BackendProtocol()
        self.memory = GuestMemory(grace_timeout=options.grace_timeout)
        self.vrings = [Vring(i, Virtqueue(i, options.metadata_access, options.max_burst))
                       for i in range(device.num_queues)]
        for vr in self.vrings:
            self.memory.add_listener(vr.queue.on_memory_change)
            self.memory.add_iotlb_listener(vr.queue.on_iotlb_invalidate)
        self.workers: list[Worker] = []
        self._worker_of: dict[int, Worker] = {}
        for n, group in enumerate(group_rings(self.vrings, options.workers)):
            worker = Worker(f"{name}-w{n}", self.memory, device, group, poll_mode=options.poll,
                            on_broken=self._on_broken, on_miss=self._send_miss)
            self.workers.append(worker)
            self._worker_of.update((vr.index, worker) for vr in group)
        for vr in self.vrings:
            if not device.uses_burst_kernel(vr.index):
                vr.runner = RequestRunner(device, vr.queue, self.memory.pin,
                                          self._worker_of[vr.index].wake)
        device._pin_table = self.memory.pin  # Device.pin_table: burst kernels' I/O in flight
        self.events = DeviceEvents(name, device)
        self.self_log = SelfLog(self.memory) if options.bench_log_all else None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.backend_req: OwnedFd | None = None
        # The back-end channel as workers use it (IOTLB misses): a socket over a dup of
        # backend_req, its protocol, and a lock (several workers may send).
        self._backend_sock: socket.socket | None = None
        self._backend_channel: BackendChannel | None = None
        self._backend_lock = threading.Lock()
        # Device IOTLB misses: per queue, (page, access, IOTLB version, time) last sent.
        self._last_miss: dict[int, tuple[int, int, int, float]] = {}
        self.iotlb_misses_sent = 0
        self.iotlb_misses_unsent = 0
        self.iotlb_refused = 0
        self.log_fd: EventFd | None = None
        self.inflight: InflightArea | None = None     # SET_INFLIGHT_FD's, mapped
        self._inflight_offer: OwnedFd | None = None   # GET_INFLIGHT_FD's memfd, until sent
        self.inflight_resubmitted = 0
        self.queues_broken = 0
        self.requests = 0
        self.refused = 0
        self.closed = False
        self._handlers: dict[FrontendRequest,
                             Callable[[Message], Payload | ReplyWithFds | None]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.GET_QUEUE_NUM: lambda msg: U64(self.device.num_queues),
            R.SET_MEM_TABLE: self._set_mem_table,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.GET_MAX_MEM_SLOTS: lambda msg: U64(MAX_MEM_SLOTS),
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.VRING_KICK: self._vring_kick,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_INFLIGHT_FD: self._get_inflight_fd,
            R.SET_INFLIGHT_FD: self._set_inflight_fd,
            R.IOTLB_MSG: self._iotlb_msg,
            R.RESET_DEVICE: self._reset_device,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
            R.SEND_RARP: self._device_message,
            R.NET_SET_MTU: self._device_message,
        }

    # -- the connection's entry points (protocol thread) ---------------------------------------

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.events.start()

    def receive(self, data: bytes, fds: Sequence[OwnedFd]) -> list[Outgoing]:
        """Handle whatever complete requests `data` finishes; the bytes to send back.

        Raises RemoteProtocolError (bad framing or payload) or ConnectionFatal: the caller
        logs it and closes the connection.
        """
        out: list[Outgoing] = []
        msgs = self.protocol.receive(data, fds)
        for n, msg in enumerate(msgs):
            try:
                with msg:  # fds a handler did not take are closed on leaving
                    out.extend(self._dispatch(msg))
            except BaseException:
                for rest in msgs[n + 1:]:  # never handled: close their fds now, not at gc
                    rest.close_fds()
                raise
        return out

    @property
    def offered_protocol_features(self) -> int:
        inflight = P.INFLIGHT_SHMFD.mask if self.device.tracks_inflight else 0
        return BASE_PROTOCOL_FEATURES | self.device.protocol_features | inflight

    @property
    def offered_features(self) -> int:
        return (self.device.device_features | TRANSPORT_FEATURES
                | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL))

    def _dispatch(self, msg: Message) -> list[Outgoing]:
        self.requests += 1
        handler: Callable[[Message], Payload | ReplyWithFds | None] | None
        handler = self._handlers.get(msg.request)  # type: ignore[arg-type]
        if handler is None:
            self.refused += 1
            log.error("%s: %s not supported", self.name, msg.request.name)
            try:
                refusal = self.protocol.not_supported(msg)
            except RemoteProtocolError as exc:
                raise ConnectionFatal(f"{msg.request.name} is not supported and its reply "
                                      "cannot say no") from exc
            return [(refusal, ())] if refusal is not None else []
        log.debug("%s: %s %s", self.name, msg.request.name, msg.payload)
        try:
            payload = handler(msg)
        except RequestRefused as exc:
            self.refused += 1
            log.error("%s: %s refused: %s", self.name, msg.request.name, exc)
            return self._refusal(msg)
        if isinstance(payload, ReplyWithFds):
            return [(self.protocol.reply(msg, payload.payload, payload.fds), payload.fds)]
        if payload is not None:
            return [(self.protocol.reply(msg, payload), ())]
        ack = self.protocol.ack(msg, 0)
        return [(ack, ())] if ack is not None else []

    def _refusal(self, msg: Message) -> list[Outgoing]:
        if self.protocol.expects_reply(msg):
            if msg.request == R.GET_CONFIG:  # "zero length of payload to indicate an error"
                return [(self.protocol.reply(msg, EMPTY), ())]
            raise ConnectionFatal(f"{msg.request.name} failed and its reply cannot say so")
        ack = self.protocol.ack(msg, 1)
        return [(ack, ())] if ack is not None else []

    # -- features and ownership ----------------------------------------------------------------

    def _get_features(self, msg: Message) -> Payload:
        return U64(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        value = _u64(msg)
        extra = value & ~self.offered_features
        if extra & ~TRANSPORT_BIT_RANGE:
            raise RequestRefused(f"features 0x{extra:x} were not offered")
        if extra:
            log.warning("%s: SET_FEATURES passes transport features 0x%x that were not "
                        "offered; ignored", self.name, extra)
            value &= ~extra
        log_all = bool(value >> VHOST_F_LOG_ALL & 1) or self.self_log is not None
        if log_all != self.memory.log_all:
            # Never refused (QEMU aborts if it is): a LOG_ALL without a log yet (migration
            # failed after the VM stopped: QEMU restarts the rings first) logs nothing until
            # SET_LOG_BASE. Turning it off is migration cancelled or done.
            self.memory.set_log_all(log_all)
            log.info("%s: dirty logging %s%s", self.name, "on" if log_all else "off",
                     "" if self.memory.log is not None or not log_all else " (no log yet)")
        iotlb = bool(value >> VIRTIO_F_IOMMU_PLATFORM & 1)
        if iotlb != (self.memory.iotlb is not None):
            # Ring and buffer addresses are IOVAs from here on (an IOTLB, empty at first).
            self.memory.set_iotlb(iotlb)
            log.info("%s: device IOTLB %s", self.name, "on" if iotlb else "off")
        with self._paused(self.vrings):
            self.features = value
            self.device.set_features(value)
            for vr in self.vrings:
                vr.queue.set_features(event_idx=bool(value >> VIRTIO_RING_F_EVENT_IDX & 1),
                                      indirect=bool(value >> VIRTIO_RING_F_INDIRECT_DESC & 1),
                                      in_order=bool(value >> VIRTIO_F_IN_ORDER & 1),
                                      packed=bool(value >> VIRTIO_F_RING_PACKED & 1))

    @property
    def _protocol_features_negotiated(self) -> bool:
        return bool(self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        value = _u64(msg)
        extra = value & ~self.offered_protocol_features
        self.protocol_features = value
        if extra:
            names = [f.name for f in P if extra & f.mask] or [hex(extra)]
            raise RequestRefused(f"protocol features not offered: {', '.join(names)}")

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; "back-ends either ignore this message, or use it to disable all rings".
        for vr in self.vrings:
            vr.enabled = False
            self._update(vr)

    def _set_log_base(self, msg: Message) -> Payload | None:
        """Map the new log, switch every burst to it (a grace period), unmap the old one."""
        d = msg.payload
        assert isinstance(d, LogDesc)
        try:
            new = DirtyLog(msg.take_fd(), d.mmap_size, d.mmap_offset)
        except BadLogError as exc:
            raise ConnectionFatal(f"SET_LOG_BASE: {exc}") from exc
        if not new.covers(self.memory.table.gpa_end):
            # QEMU sends a smaller log after the memory shrank, a bigger one before it grows:
            # pages past its end are counted (log_dropped), never refused.
            log.warning("%s: dirty log of %d bytes covers less than the guest memory (%d MiB)",
                        self.name, d.mmap_size, self.memory.table.gpa_end >> 20)
        self.memory.set_log(new)
        log.info("%s: dirty log: %d bytes (%d MiB of guest memory)%s", self.name, d.mmap_size,
                 d.mmap_size * 8 * 4096 >> 20, "" if self.memory.log_all else ", not yet on")
        # Answered only with LOG_SHMFD; QEMU 7.2 checks nothing but the flags of the reply.
        return U64(0) if self.protocol.expects_reply(msg) else None

    def _set_log_fd(self, msg: Message) -> None:
        """Signalled when logging bits were flushed for good (rings stopped); QEMU never
        sends it, libvhost-user-style frontends may."""
        new = _eventfd(msg, "log")
        if self.log_fd is not None:
            self.log_fd.close()
        self.log_fd = new

    def _device_message(self, msg: Message) -> None:
        """A device-type-specific request: the device says whether it takes it."""
        if not self.device.frontend_message(msg.request, msg.payload):  # type: ignore[arg-type]
            raise RequestRefused(f"not taken by the {self.device.name} device")
        log.info("%s: %s accepted by the device", self.name, msg.request.name)

    # -- memory ----------------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        specs = [_region_spec(r) for r in msg.payload.regions]
        fds = msg.take_fds()
        try:
            self.memory.set_regions(zip(specs, fds))  # closes every fd itself on error
        except BadRegionError as exc:
            raise RequestRefused(f"memory table not changed: {exc}") from exc
        log.info("%s: memory table: %d regions, %d MiB", self.name, len(specs),
                 sum(s.memory_size for s in specs) >> 20)
        self._update_self_log()

    def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemRegion)
        spec = _region_spec(msg.payload.region)
        try:
            self.memory.add_region(spec, msg.take_fd())
        except BadRegionError as exc:
            raise RequestRefused(f"region not added: {exc}") from exc
        log.info("%s: memory region added: GPA 0x%x, %d MiB (%d regions)", self.name,
                 spec.guest_phys_addr, spec.memory_size >> 20, len(self.memory.table))
        self._update_self_log()

    def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemRegion)
        spec = _region_spec(msg.payload.region)
        try:
            self.memory.remove_region(spec)
        except BadRegionError as exc:
            raise RequestRefused(str(exc)) from exc
        log.info("%s: memory region removed: GPA 0x%x (%d regions)", self.name,
                 spec.guest_phys_addr, len(self.memory.table))
        self._update_self_log()

    # -- rings -----------------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestRefused(f"queue index {index} out of range (device has "
                                 f"{len(self.vrings)} queues)")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.payload.index)
        size = msg.payload.num
        if not vr.queue.valid_size(size) or size > self.device.max_queue_size:
            kind = "in 1.." if vr.queue.packed else "a power of two <= "
            raise RequestRefused(f"queue {vr.index}: size {size} is not {kind}"
                                 f"{self.device.max_queue_size}")
        with self._paused([vr]):
            vr.queue.set_size(size)

    def _set_vring_addr(self, msg: Message) -> None:
        a = msg.payload
        assert isinstance(a, VringAddr)
        vr = self._vring(a.index)
        # With a device IOTLB the addresses are IOVAs, translated when the ring runs.
        if len(self.memory.table) and self.memory.iotlb is None:
            self._check_mapped(vr, vr.queue.size, a.desc, a.avail, a.used)
        log_used = a.flags & (1 << VHOST_VRING_F_LOG)
        with self._paused([vr]):
            try:
                vr.queue.set_addresses(a.desc, a.avail, a.used)  # type: ignore[arg-type]
                vr.queue.set_used_log(a.log if log_used else None)
            except ValueError as exc:
                raise RequestRefused(str(exc)) from exc
        self._update_self_log([vr])

    def _update_self_log(self, vrings: Sequence[Vring] | None = None) -> None:
        """--bench-log-all: a log covering the memory, and each used ring logged at its GPA
        (as if SET_LOG_BASE and SET_VRING_ADDR with VHOST_VRING_F_LOG had come)."""
        if self.self_log is None:
            return
        table = self.memory.table
        if vrings is None:
            self.self_log.update(table)
        for vr in self.vrings if vrings is None else vrings:
            gpa = self.self_log.used_ring_gpa(table, int(vr.queue.q[K.Q_USED]))
            if vr.queue.addresses_set and gpa is not None and not (
                    vr.queue.q[K.Q_FLAGS] & K.F_LOG_USED and vr.queue.q[K.Q_LOG_USED] == gpa):
                with self._paused([vr]):
                    vr.queue.set_used_log(gpa)

    def _check_mapped(self, vr: Vring, size: int, desc: int, avail: int, used: int) -> None:
        size = max(size, 1)  # before SET_VRING_NUM: at least the ring's first entry
        for name, addr, length, _align in vr.queue.ring_parts(size, desc, avail, used):
            try:
                self.memory.table.translate_user(addr, length)  # type: ignore[arg-type]
            except AddressNotMappedError as exc:
                raise RequestRefused(f"queue {vr.index}: {name} at 0x{addr:x} (+{length}) is "
                                     "outside every memory region") from exc

    def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.payload.index)
        with self._paused([vr]):
            try:
                vr.queue.set_base(msg.payload.num)  # split: 16 bits; packed: 32 (both wraps)
            except ValueError as exc:
                raise RequestRefused(str(exc)) from exc

    def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        index = msg.payload.index
        if not 0 <= index < len(self.vrings):
            raise ConnectionFatal(f"GET_VRING_BASE for queue {index}: out of range and the "
                                  "reply cannot say so")
        vr = self.vrings[index]
        self._finish_available(vr, "GET_VRING_BASE")
        self._stop_ring(vr)
        q = vr.queue
        where = f"{q.packed_base.describe()}: {q.base:#x}" if q.packed else f"next avail {q.base}"
        log.info("%s: GET_VRING_BASE queue %d: %s", self.name, index, where)
        if self.log_fd is not None and self.memory.log_all:
            self.log_fd.signal()  # every bit of this ring is set (its bursts flushed them)
        return VringState(index, vr.queue.base)

    def _set_vring_kick(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringFd)
        vr = self._vring(msg.payload.index)
        new = None if msg.payload.nofd else _eventfd(msg, f"kick{vr.index}")
        old, vr.kick, vr.kick_polling = vr.kick, new, new is None
        self._retire(vr, old)
        if vr.started:
            self._worker_of[vr.index].wake()
            return
        self._start_ring(vr)

    def _vring_kick(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.payload.index)
        if not vr.started:
            vr.kick_polling = vr.kick is None
            self._start_ring(vr)
        self._worker_of[vr.index].wake()

    def _set_vring_call(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringFd)
        vr = self._vring(msg.payload.index)
        new = None if msg.payload.nofd else _eventfd(msg, f"call{vr.index}")
        old, vr.call = vr.call, new
        self._retire(vr, old)

    def _set_vring_err(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringFd)
        vr = self._vring(msg.payload.index)
        new = None if msg.payload.nofd else _eventfd(msg, f"err{vr.index}")
        old, vr.err = vr.err, new
        self._retire(vr, old)

    def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise RequestRefused(f"queue {vr.index}: enable value {msg.payload.num} is not 0/1")
        if not msg.payload.num:
            # What came while it was enabled is processed as such.
            self._finish_available(vr, "SET_VRING_ENABLE 0")
        vr.enabled = bool(msg.payload.num)
        self._update(vr)

    def _start_ring(self, vr: Vring) -> None:
        q = vr.queue
        if q.size == 0 or not q.addresses_set:
            raise RequestRefused(f"queue {vr.index}: cannot start before SET_VRING_NUM and "
                                 "SET_VRING_ADDR")
        if q.broken:
            raise RequestRefused(f"queue {vr.index}: broken ({q.error_text()}); reset it first")
        if self.memory.iotlb is not None:
            # IOVAs: the rings may not be in the IOTLB yet (QEMU sends entries on demand, and
            # the protocol thread must never wait for one): the worker reads the used index
            # at the first round whose rings translate, asking for them meanwhile.
            q.start_lazily()
        else:
            self._check_mapped(vr, q.size, int(q.q[K.Q_DESC]), int(q.q[K.Q_AVAIL]),
                               int(q.q[K.Q_USED]))
            # Continue from the used index the guest's memory holds (a ring restarted after
            # GET_VRING_BASE, or a reconnect, must not rewind it); a base that disagrees with
            # a ring the frontend kept across our restart resumes from used->idx (DPDK too).
            try:
                resync = q.sync_used_from_ring(self.memory.table)
            except ValueError as exc:
                raise RequestRefused(str(exc)) from exc
            if resync is not None:
                (log.warning if resync.resumed else log.error)(
                    "%s: queue %d: %s", self.name, vr.index, resync.describe())
        if q.inflight.enabled and q.inflight.packed != q.packed:
            # Features changed after SET_INFLIGHT_FD: the region has the other ring's layout.
            log.error("%s: queue %d: the inflight area was set up for a %s ring, the ring is "
                      "%s: requests in flight are not tracked", self.name, vr.index,
                      "packed" if q.inflight.packed else "split",
                      "packed" if q.packed else "split")
            q.inflight.detach()
        if q.inflight.enabled:
            self._recover_inflight(vr)
        if vr.runner is not None:
            vr.runner.resize(q.size)
        self.device.on_queue_started(q)
        self._worker_of[vr.index].ring_starting(vr)
        vr.started = True
        vr.broken_reported = False
        if not self._protocol_features_negotiated:
            vr.enabled = True  # "the ring starts directly in the enabled state"
        log.info("%s: queue %d started (size %d, next avail %d, used %d, %s)", self.name,
                 vr.index, q.size, q.next_avail, q.next_used,
                 "kick fd" if vr.kick is not None else "polling")
        self._update(vr)

    def _finish_available(self, vr: Vring, why: str) -> None:
        """Before a ring whose device consumes all it is given (`Device.runs_when_disabled`: a
        net TX ring) is disabled or stopped: wait, bounded, until the worker has consumed the
        chains the driver made available before the request that asks for it, as the ring was
        running them (processed while enabled, discarded while disabled).

        Why: the driver publishes avail->idx before it sends the request, but the worker may
        not have got to those chains yet (a wake-up takes 100s of us). Disabling at once made
        the worker discard a last burst the driver had sent while the ring was enabled: DPDK
        virtio-user sends SET_VRING_ENABLE 0 as it closes its port, just after its last TX
        burst, and one run in five to eight (issue #15) ended with that burst counted in
        tx_discarded, not tx_packets. Stopping at once (GET_VRING_BASE) could likewise leave
        it unconsumed. Chains the driver adds after the request are left to the new state.
        """
        q = vr.queue
        if not (vr.running and self.device.runs_when_disabled(vr.index)):
            return
        try:
            target = q.avail_target(self.memory.table)
        except AddressNotMappedError:
            return  # the worker breaks the ring and says why
        if target is None:
            return
        pending = q.pending(target)
        if pending == 0 or pending > q.size:
            return  # nothing to do, or an index the worker will refuse
        self._worker_of[vr.index].wake()
        start = time.monotonic()
        delay = 0.0
        while vr.running and not q.broken and 0 < q.pending(target) <= q.size:
            if time.monotonic() - start > self.options.grace_timeout:
                log.warning("%s: queue %d: %d chains made available before %s not consumed "
                            "within %.1fs", self.name, vr.index,
                            q.pending(target), why, self.options.grace_timeout)
                return
            time.sleep(delay)  # releases the GIL to the worker
            delay = min(delay * 2 or 10e-6, 1e-3)
        log.info("%s: queue %d: %d chains made available before %s consumed first (%.0f us)",
                 self.name, vr.index, pending, why, (time.monotonic() - start) * 1e6)

    def _stop_ring(self, vr: Vring) -> None:
        """Stop: no worker runs the ring after this returns, its deferred requests are
        answered, its kick fd is closed."""
        self._stop_worker_use(vr)
        self._drain(vr)
        # Bits a burst cached but never set (it broke off before publishing): its writes are
        # in guest memory all the same, and GET_VRING_BASE may only be answered with them set.
        K.flush_log(self.memory.table.kernel(), vr.queue.q)
        if vr.started:
            vr.started = False
            self.device.on_queue_stopped(vr.queue)
            log.info("%s: queue %d stopped at avail %d", self.name, vr.index,
                     vr.queue.next_avail)
        old, vr.kick = vr.kick, None
        self._retire(vr, old)
        vr.queue.drop_views()
        if vr.queue.broken:
            vr.queue.reset()  # the frontend re-sends size, addresses and base to restart it

    def _drain(self, vr: Vring) -> None:
        """Publish the deferred requests of a ring no worker runs any more (waiting, bounded,
        for those still in flight), and interrupt the driver if it asks."""
        runner = vr.runner
        if not vr.started:
            return
        table = self.memory.table
        views = vr.queue.round_views(table)
        if runner is None:  # a burst kernel's I/O in flight (Device.drain_burst)
            done, notify = self.device.drain_burst(vr.queue, table, table.kernel(), views,
                                                   self.options.drain_timeout)
        else:
            done, notify = runner.drain(table, table.kernel(), views,
                                        self.options.drain_timeout)
        if done:
            log.info("%s: queue %d: %d deferred requests answered before stopping", self.name,
                     vr.index, done)
        if notify and vr.call is not None:
            vr.call.signal()

    def _update(self, vr: Vring) -> None:
        """Make `running`/`process` follow started/enabled/broken (race-free for workers)."""
        run = vr.started and not vr.queue.broken and (
            vr.enabled or self.device.runs_when_disabled(vr.index))
        if vr.running and (not run or vr.process != vr.enabled):
            self._stop_worker_use(vr)
        vr.process = vr.enabled
        if run and not vr.running:
            vr.running = True
            self._worker_of[vr.index].wake()

    def _stop_worker_use(self, vr: Vring) -> None:
        if vr.running:
            vr.running = False
        # Even if it looked stopped: a worker that saw it running may be inside a burst.
        self._grace()

    def _grace(self) -> None:
        try:
            self.memory.grace.record(self.memory.epochs.synchronize(self.options.grace_timeout))
        except GraceTimeout as exc:
            self.memory.grace.timeouts += 1
            log.error("%s: %s", self.name, exc)

    @contextmanager
    def _paused(self, vrings: Sequence[Vring]) -> Iterator[None]:
        """Change ring state with no worker running these rings; they resume afterwards."""
        paused = [vr for vr in vrings if vr.running]
        for vr in paused:
            vr.running = False
        if paused:
            self._grace()
        try:
            yield
        finally:
            for vr in paused:
                self._update(vr)

    def _retire(self, vr: Vring, old: EventFd | None) -> None:
        """Close an fd the worker may be polling, once it has come round and let go of it."""
        if old is None:
            return
        self._worker_of[vr.index].sync()
        old.close()

    def _on_broken(self, vr: Vring) -> None:
        """Worker thread: the guest broke this ring. Report it; the ring stays stopped."""
        if vr.broken_reported:
            return
        vr.broken_reported = True
        self.queues_broken += 1
        self.status |= STATUS_DEVICE_NEEDS_RESET
        culprit = "device" if vr.queue.device_error else "driver"
        log.error("%s: queue %d broken by the %s: %s; queue stopped, device needs reset",
                  self.name, vr.index, culprit, vr.queue.error_text())
        err = vr.err
        if err is not None and not err.closed:
            err.signal()

    # -- config, status, reset -------------------------------------------------------------------

    def _get_config(self, msg: Message) -> Payload:
        c = msg.payload
        assert isinstance(c, ConfigSpace)
        try:
            data = self.device.get_config(c.offset, c.size)
        except ConfigError as exc:
            raise RequestRefused(str(exc)) from exc
        return ConfigSpace(c.offset, len(data), c.flags, data)

    def _set_config(self, msg: Message) -> None:
        c = msg.payload
        assert isinstance(c, ConfigSpace)
        try:
            self.device.set_config(c.offset, c.payload, c.flags == ConfigFlags.MIGRATION)
        except ConfigError as exc:
            raise RequestRefused(str(exc)) from exc

    def _set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        dup = os.dup(fd.fileno())
        try:
            sock = socket.socket(fileno=dup)
        except OSError as exc:
            # socket() leaves an fd it cannot use open: a memfd sent here once leaked its dup.
            os.close(dup)
            fd.close()
            raise RequestRefused(f"back-end channel fd is not a socket: {exc}") from exc
        if sock.family != socket.AF_UNIX:
            sock.close()
            fd.close()
            raise RequestRefused("back-end channel fd is not a Unix socket")
        with self._backend_lock:
            self._close_backend_channel()
            self.backend_req = fd
            self._backend_sock = sock
            self._backend_channel = self.protocol.backend_channel()

    def _close_backend_channel(self) -> None:
        if self._backend_sock is not None:
            self._backend_sock.close()
            self._backend_sock = None
        self._backend_channel = None
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None

    # -- device IOTLB --------------------------------------------------------------------------

    def _iotlb_msg(self, msg: Message) -> Payload:
        """UPDATE and INVALIDATE, answered 0 when done, 1 when refused (the payload's own
        reply: QEMU waits for it on every IOTLB_MSG). An INVALIDATE's perm and uaddr are not
        looked at (QEMU 7.2 leaves them uninitialised); an UPDATE wakes the workers, whose
        rings may wait for it; an INVALIDATE returns after the grace period."""
        m = msg.payload
        assert isinstance(m, IotlbMsg)
        try:
            if self.memory.iotlb is None:
                raise BadIotlbEntry("VIRTIO_F_IOMMU_PLATFORM is not acked")
            if m.type == IotlbType.UPDATE:
                if self.memory.iotlb_update(IotlbEntry(m.iova, m.size, m.uaddr, m.perm)):
                    for worker in self.workers:
                        worker.wake()
            elif m.type == IotlbType.INVALIDATE:
                self.memory.iotlb_invalidate(m.iova, m.size)
            else:
                raise BadIotlbEntry(f"message type {m.type} is not one a front-end sends")
        except BadIotlbEntry as exc:
            self.refused += 1
            self.iotlb_refused += 1
            log.error("%s: IOTLB_MSG refused: %s", self.name, exc)
            return U64(1)
        return U64(0)

    def _send_miss(self, vr: Vring) -> None:
        """Worker thread: ask the front-end for the IOTLB entry a round of `vr` missed, once
        (again when the IOTLB changed since, or after MISS_RESEND_S), without NEED_REPLY and
        without blocking: the protocol thread may be waiting for this worker's grace period
        while the front-end waits for our reply."""
        iotlb = self.memory.iotlb
        if iotlb is None:
            return
        q = vr.queue.q
        page, perm = int(q[K.Q_MISS_ADDR]) & ~0xFFF, int(q[K.Q_MISS_PERM])
        version = iotlb.stats.updates + iotlb.stats.invalidations
        now = time.monotonic()
        last = self._last_miss.get(vr.index)
        if last is not None and last[:3] == (page, perm, version) and now - last[3] < MISS_RESEND_S:
            return
        self._last_miss[vr.index] = (page, perm, version, now)
        with self._backend_lock:
            sock, channel = self._backend_sock, self._backend_channel
            if sock is None or channel is None:
                self.iotlb_misses_unsent += 1
                if self.iotlb_misses_unsent == 1:
                    log.error("%s: queue %d: IOTLB miss at IOVA 0x%x but no back-end channel "
                              "(SET_BACKEND_REQ_FD) to ask on", self.name, vr.index, page)
                return
            data, _ = channel.send_request(
                BackendRequest.IOTLB_MSG,
                IotlbMsg(int(q[K.Q_MISS_ADDR]), 0, 0, perm, IotlbType.MISS))
            try:
                sent = sock.send(data, socket.MSG_DONTWAIT)
            except OSError as exc:  # full or gone: the next round asks again
                sent = 0
                log.debug("%s: IOTLB miss not sent: %s", self.name, exc)
            if sent != len(data):
                self.iotlb_misses_unsent += 1
                self._last_miss.pop(vr.index, None)
                if sent:  # a partial message would desynchronise the channel: give it up
                    log.error("%s: back-end channel: partial IOTLB miss; channel closed",
                              self.name)
                    self._close_backend_channel()
                return
        self.iotlb_misses_sent += 1
        log.debug("%s: queue %d: IOTLB miss at IOVA 0x%x (%s)", self.name, vr.index,
                  int(q[K.Q_MISS_ADDR]), "write" if perm == 2 else "read")

    # -- inflight I/O tracking (ring/inflight.py) -----------------------------------------------

    @property
    def _packed(self) -> bool:
        """The negotiated ring layout is packed (the frontend sets features before it asks
        for an inflight area: the region's layout follows the ring's)."""
        return bool(self.features >> VIRTIO_F_RING_PACKED & 1)

    def _inflight_region_size(self, d: InflightDesc) -> int:
        """The queue region size of a GET/SET_INFLIGHT_FD's geometry, which must fit the
        device (InflightError otherwise)."""
        if not 1 <= d.num_queues <= len(self.vrings):
            raise InflightError(f"{d.num_queues} queues; the device has {len(self.vrings)}")
        valid = 1 <= d.queue_size if self._packed else is_valid_queue_size(d.queue_size)
        if not valid or d.queue_size > self.device.max_queue_size:
            raise InflightError(f"queue size {d.queue_size} is not "
                                + ("in 1.." if self._packed else "a power of two <= ")
                                + str(self.device.max_queue_size))
        return queue_region_size(d.queue_size, self._packed)

    def _get_inflight_fd(self, msg: Message) -> Payload | ReplyWithFds:
        """Allocate a zeroed area for the frontend to keep; mmap_size 0 says "none"."""
        d = msg.payload
        assert isinstance(d, InflightDesc)
        try:
            if not (self.device.tracks_inflight
                    and self.protocol.negotiation.has(P.INFLIGHT_SHMFD)):
                raise InflightError("INFLIGHT_SHMFD was not negotiated")
            fd, size = allocate_inflight(d.num_queues, self._inflight_region_size(d))
        except (InflightError, OSError) as exc:
            self.refused += 1
            log.error("%s: GET_INFLIGHT_FD: no inflight area: %s", self.name, exc)
            return InflightDesc(0, 0, 0, 0)
        if self._inflight_offer is not None:
            self._inflight_offer.close()
        self._inflight_offer = fd  # open until sent; closed at SET_INFLIGHT_FD or disconnect
        log.info("%s: inflight area allocated: %d queues of %d entries, %d bytes (%s layout)",
                 self.name, d.num_queues, d.queue_size, size,
                 "packed" if self._packed else "split")
        return ReplyWithFds(InflightDesc(size, 0, d.num_queues, d.queue_size), [fd])

    def _set_inflight_fd(self, msg: Message) -> None:
        """Map the frontend's area (sent before every start) and track the rings into it."""
        d = msg.payload
        assert isinstance(d, InflightDesc)
        fd = msg.take_fd()
        if self._inflight_offer is not None:
            self._inflight_offer.close()
            self._inflight_offer = None
        started = [vr.index for vr in self.vrings if vr.started]
        try:
            if not self.device.tracks_inflight:
                raise InflightError(f"the {self.device.name} device does not track requests "
                                    "in flight")
            if started:
                raise InflightError(f"queues {started} are running (it must come before a "
                                    "start)")
            region_size = self._inflight_region_size(d)
        except InflightError as exc:
            fd.close()
            raise RequestRefused(f"inflight area not used: {exc}") from exc
        try:
            area = InflightArea(fd, d.mmap_size, d.mmap_offset, d.num_queues, region_size)
        except BadInflightArea as exc:  # the fd is closed
            self._close_inflight()
            raise RequestRefused(f"inflight area not used: {exc}; requests in flight will not "
                                 "survive a restart of this device") from exc
        self._close_inflight()
        for i in range(d.num_queues):
            self.vrings[i].queue.inflight.attach(area.region(i), d.queue_size, self._packed)
        self.inflight = area
        log.info("%s: inflight area: %d queues of %d entries (%d bytes, %s layout)", self.name,
                 d.num_queues, d.queue_size, d.mmap_size, "packed" if self._packed else "split")

    def _close_inflight(self) -> None:
        """Stop tracking (no ring running) and unmap the area."""
        for vr in self.vrings:
            vr.queue.inflight.detach()
        area, self.inflight = self.inflight, None
        if area is not None and not area.close():
            log.error("%s: inflight area still referenced; not unmapped", self.name)

    def _recover_inflight(self, vr: Vring) -> None:
        """At start: bring the ring's inflight region up to date with used->idx, queue what
        a killed predecessor left in flight for resubmission, and resume after it."""
        q = vr.queue
        if q.packed:
            self._recover_packed_inflight(vr)
            return
        try:
            rec = q.inflight.recover(q.next_used, q.size)
            avail = q.avail_idx(self.memory.table)
            if (avail - rec.next_avail) & 0xFFFF > q.size:  # more in flight than was offered
                raise InflightError(f"{len(rec.resubmit)} requests in flight, but the driver "
                                    f"has {(avail - q.next_used) & 0xFFFF} past the used index")
        except InflightError as exc:
            q.inflight.forget_resubmissions()
            raise RequestRefused(f"queue {vr.index}: inflight region unusable: {exc}") from exc
        if rec.next_avail != q.next_avail:
            log.info("%s: queue %d: base %d -> next avail %d from the inflight region",
                     self.name, vr.index, q.next_avail, rec.next_avail)
        q.set_next_avail(rec.next_avail)
        self.inflight_resubmitted += len(rec.resubmit)
        (log.warning if rec.resubmit or rec.cleared else log.info)(
            "%s: queue %d: %s", self.name, vr.index, rec.describe())

    def _recover_packed_inflight(self, vr: Vring) -> None:
        """`_recover_inflight` for a packed ring: the region, not the frontend's base, says
        where the ring stands after our restart (QEMU restores nothing for packed)."""
        q = vr.queue
        before = q.packed_base
        try:
            rec = q.inflight.recover_packed(before, q.size, q.descriptor_flags(self.memory.table))
        except (InflightError, AddressNotMappedError) as exc:
            q.inflight.forget_resubmissions()
            raise RequestRefused(f"queue {vr.index}: inflight region unusable: {exc}") from exc
        assert rec.base is not None
        if rec.base != before:
            log.info("%s: queue %d: base %s -> %s from the inflight region", self.name,
                     vr.index, before.describe(), rec.base.describe())
        q.set_packed_base(rec.base)
        self.inflight_resubmitted += len(rec.resubmit)
        (log.warning if rec.resubmit or rec.cleared or rec.rolled_back else log.info)(
            "%s: queue %d: %s", self.name, vr.index, rec.describe())

    def _reset_device(self, msg: Message) -> None:
        self._reset("RESET_DEVICE")

    def _set_status(self, msg: Message) -> None:
        value = _u64(msg)
        if value > 0xFF:
            raise RequestRefused(f"status {value:#x} does not fit the 8-bit status field")
        if value == 0:
            # QEMU writes status 0 when it stops the device, *before* GET_VRING_BASE: the
            # rings stop here but keep their positions, or GET_VRING_BASE would report 0
            # and the driver's buffers would be processed twice after a restart.
            self._reset("status 0", keep_ring_positions=True)
        self.status = value

    def _get_status(self, msg: Message) -> Payload:
        return U64(self.status)

    def _reset(self, why: str, keep_ring_positions: bool = False) -> None:
        """Stop and disable every ring, forget ring state; memory and features stay."""
        for vr in self.vrings:
            if keep_ring_positions:  # a stop, as GET_VRING_BASE's
                self._finish_available(vr, why)
            vr.enabled = False
            self._stop_ring(vr)
            if not keep_ring_positions:
                vr.queue.reset()
        if self.memory.iotlb is not None:
            # A stopped device gets no invalidations (QEMU unregisters its IOMMU notifier): the
            # guest may remap IOVAs before the next start, so forget every entry now.
            self.memory.iotlb_flush()
        self.device.reset()
        self.device.set_features(self.features)
        self.status = 0
        log.info("%s: device reset (%s)", self.name, why)

    # -- statistics and teardown -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.device.stats())
        qs = [vr.queue.stats for vr in self.vrings]
        s["direct_rounds"] = sum(q.direct_rounds for q in qs)
        s["copy_rounds"] = sum(q.copy_rounds for q in qs)
        s["invalidations"] = sum(q.invalidations for q in qs)
        g = self.memory.grace
        s["grace_periods"] = g.count
        s["grace_total_s"] = g.total
        s["grace_max_s"] = g.max
        s["grace_timeouts"] = g.timeouts
        s["leaked_mappings"] = self.memory.leaked_mappings
        s["queues_broken"] = self.queues_broken
        if self.device.tracks_inflight:
            s["inflight_resubmitted"] = self.inflight_resubmitted
        runners = [vr.runner.stats() for vr in self.vrings if vr.runner is not None]
        for key in ("requests", "deferred", "in_flight"):
            if runners:
                s[f"device_{key}"] = sum(r[key] for r in runners)
        iotlb = self.memory.iotlb
        if iotlb is not None:
            s["iotlb_entries"] = len(iotlb)
            s["iotlb_updates"] = iotlb.stats.updates
            s["iotlb_invalidations"] = iotlb.stats.invalidations
            s["iotlb_evictions"] = iotlb.stats.evictions
            s["iotlb_refused"] = self.iotlb_refused
            s["iotlb_hits"] = sum(int(vr.queue.q[K.Q_IOTLB_HITS]) for vr in self.vrings)
            s["iotlb_misses"] = self.iotlb_misses_sent
            s["iotlb_misses_unsent"] = self.iotlb_misses_unsent
            s["iotlb_ring_misses"] = sum(q.ring_misses for q in qs)
            s["iotlb_ring_invalidations"] = sum(q.iotlb_ring_invalidations for q in qs)
        s["log_enabled"] = int(self.memory.table.logging)
        s["log_pages"] = sum(vr.queue.log_pages for vr in self.vrings)
        s["log_dropped"] = sum(int(vr.queue.q[K.Q_LOG_DROPPED]) for vr in self.vrings)
        if self.self_log is not None:
            s["log_simulated"] = 1
            s["log_sync_passes"] = self.self_log.passes
        s["requests"] = self.requests
        s["requests_refused"] = self.refused
        s["features"] = self.features  # negotiated: split or packed, event idx, in order...
        return s

    def close(self) -> None:
        """Disconnect: stop workers' use of every ring, wait a grace period, drop views, unmap
        guest memory, close every fd. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for vr in self.vrings:
            vr.running = False
        self._grace()
        for vr in self.vrings:
            self._drain(vr)
        for worker in self.workers:
            worker.stop()
        self.events.stop()
        for vr in self.vrings:
            if vr.started:
                vr.started = False
                self.device.on_queue_stopped(vr.queue)
            vr.queue.drop_views()
            for fd in (vr.kick, vr.call, vr.err):
                if fd is not None:
                    fd.close()
            vr.kick = vr.call = vr.err = None
            self.memory.remove_listener(vr.queue.on_memory_change)
            self.memory.remove_iotlb_listener(vr.queue.on_iotlb_invalidate)
        self.memory.close()
        if self.self_log is not None:
            self.self_log.close()
        with self._backend_lock:
            self._close_backend_channel()
        if self.log_fd is not None:
            self.log_fd.close()
            self.log_fd = None
        self._close_inflight()
        if self._inflight_offer is not None:
            self._inflight_offer.close()
            self._inflight_offer = None
        self.protocol.close()


def _eventfd(msg: Message, name: str) -> EventFd:
    """The message's fd as an EventFd; anything but an eventfd is closed and refused."""
    fd = msg.take_fd()
    try:
        return EventFd(fd, name)
    except NotAnEventFd as exc:
        fd.close()
        raise RequestRefused(f"{exc} (a kick, call or error fd must be one)") from None


def _u64(msg: Message) -> int:
    assert isinstance(msg.payload, U64)
    return msg.payload.value


def _region_spec(r: MemoryRegionDesc) -> RegionSpec:
    return RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
