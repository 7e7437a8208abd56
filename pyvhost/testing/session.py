"""A device served by the real daemon in this process, and a front-end driving it: for tests of
devices written with `pyvhost.Device` (yours included) and for the documentation's examples.

    with DeviceSession(Pattern, tmp_path / "dev.sock") as s:
        s.start_queue(0)
        used_len, data = s.request(0, readable=[], writable=[64])

Everything crosses the whole stack: the Unix socket and SCM_RIGHTS, the codec, the backend's
state machine, guest memory in memfds, a worker thread and the device's own code.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pyvhost.daemon.backend import Backend, BackendOptions
from pyvhost.daemon.server import Server
from pyvhost.device import Device
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from pyvhost.ring.packed_layout import VIRTIO_F_RING_PACKED
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.packed_driver import MockPackedQueue
from pyvhost.testing.guest_ram import GuestRam

MiB = 1 << 20
DEADLINE = 10.0  # a bound against hangs, never a performance assertion
PROTOCOL = (P.REPLY_ACK.mask | P.MQ.mask | P.CONFIG.mask | P.CONFIGURE_MEM_SLOTS.mask
            | P.STATUS.mask)


class DeviceSession:
    """Serves `factory()` on `path` in a thread and connects a front-end with `ram_mib` of RAM."""

    def __init__(self, factory: Callable[[], Device], path: str | Path, *,
                 features: int = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                 options: BackendOptions = BackendOptions(), ram_mib: int = 4,
                 protocol: int = PROTOCOL) -> None:
        self.server = Server(factory, str(path), options=options, max_connections=1)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.ram = GuestRam([(0, ram_mib * MiB)])
        try:
            # The server warms the device up (compiles its kernels) before it listens.
            if not self.server.listening.wait(600):  # a cold numba cache compiles for minutes
                raise TimeoutError(f"the daemon did not listen on {path}")
            self.fe = VhostUserFrontend(str(path))
            self.negotiated = self.fe.negotiate(features, protocol)
            self.fe.set_mem_table(self.ram)
        except BaseException:
            if self.thread.is_alive():
                self.server.stop()
            self.ram.close()
            raise

    def __enter__(self) -> "DeviceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self) -> Backend:
        backend = self.server.current
        assert backend is not None, "no connection is being served"
        return backend

    @property
    def device(self) -> Any:
        return self.backend.device

    def start_queue(self, index: int, size: int = 64, *, enable: bool = True
                    ) -> MockSplitQueue | MockPackedQueue:
        """A ring of the layout negotiated (packed if `features` had VIRTIO_F_RING_PACKED)."""
        event_idx = bool(self.negotiated.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        driver: MockSplitQueue | MockPackedQueue
        if self.negotiated.features >> VIRTIO_F_RING_PACKED & 1:
            driver = MockPackedQueue(self.ram, size, event_idx=event_idx)
        else:
            driver = MockSplitQueue(self.ram, size, event_idx=event_idx)
        self.fe.setup_queue(index, driver)
        if enable:
            self.fe.enable_queue(index)
        return driver

    def submit(self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = (),
               *, kick: bool = True) -> int:
        """Make one chain available; its head."""
        d = self.fe.driver(index)
        head = d.add_chain(list(readable), list(writable))
        d.publish()
        if kick and d.needs_kick():
            self.fe.kick(index)
        return head

    def wait_used(self, index: int, count: int = 1, timeout: float = DEADLINE
                  ) -> list[tuple[int, int]]:
        """Wait until `count` chains are used; [(head, used length)] in used-ring order."""
        d = self.fe.driver(index)
        deadline = time.monotonic() + timeout
        got: list[tuple[int, int]] = []
        while len(got) < count:
            if d.has_used():
                got.extend(d.used())
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {index}: {len(got)} of {count} chains used")
            time.sleep(0.0005)
        return got

    def request(self, index: int, readable: Sequence[bytes] = (),
                writable: Sequence[int] = ()) -> tuple[int, bytes]:
        """One chain through the device: (used length, the bytes it wrote)."""
        head = self.submit(index, readable, writable)
        ((got, length),) = self.wait_used(index)
        assert got == head
        return length, self.fe.driver(index).written_data(head, length)

    def close(self) -> None:
        try:
            self.fe.close()
            self.thread.join(DEADLINE)
        finally:
            if self.thread.is_alive():
                self.server.stop()
                self.thread.join(DEADLINE)
            self.ram.close()
        assert not self.thread.is_alive(), "the daemon did not stop"
