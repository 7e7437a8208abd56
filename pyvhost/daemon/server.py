"""Serve frontends one after another on one socket; stop cleanly on request.

Before it listens or connects, the server makes one device and lets it compile its kernels
(`Device.warm_up`), so that the first frontend's first burst does not hold a worker for
seconds. Server mode listens on a path, or on a listening socket it was handed (`listener=`,
the `--fd` of the vhost-user backend program conventions), and accepts the next frontend when
one leaves; client mode connects to a listening frontend and reconnects with back-off when it
goes away. Each connection gets a fresh device and `Backend`; when the frontend closes, breaks
the protocol, or the socket fails, the backend is torn down (workers stopped, memory
unmapped, fds closed) before the next connection is served. `stop()` may be called from a
signal handler or another thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from pyvhost.daemon.backend import Backend, BackendOptions, ConnectionFatal
from pyvhost.daemon.eventfd import EventFd
from pyvhost.daemon.unix_socket import (
    Connection,
    Listener,
    PeerClosed,
    SocketBroken,
    Stopped,
    connect,
)
from pyvhost.device import Device
from pyvhost.memory.table import RegionTable
from pyvhost.protocol import RemoteProtocolError
from pyvhost.ring.virtqueue import Virtqueue

log = logging.getLogger(__name__)

# Statistics that combine across connections by maximum rather than by sum.
_MAX_KEYS = {"grace_max_s"}
# ... and by the last connection's value: what it negotiated, not a sum.
_LAST_KEYS = {"features"}


def _warm_up_packed() -> None:
    """The packed ring's kernel the protocol thread calls (`Virtqueue.avail_target`, before a
    net TX ring stops): compiled in the middle of a GET_VRING_BASE it would hold the reply."""
    q = Virtqueue(0)
    q.set_features(event_idx=False, indirect=False, packed=True)
    q.set_size(1)
    q.avail_target(RegionTable())


def warm_up_device(device_factory: Callable[[], Device]) -> float:
    """Make one device, compile (or load) its kernels and the ring's; returns the seconds."""
    device = device_factory()
    t0 = time.monotonic()
    device.warm_up()
    _warm_up_packed()
    return time.monotonic() - t0


class Server:
    def __init__(self, device_factory: Callable[[], Device], socket_path: str | None = None, *,
                 listener: Listener | None = None, client: bool = False,
                 options: BackendOptions = BackendOptions(),
                 max_connections: int | None = None, warm_up: bool = True) -> None:
        """Serve `device_factory()` devices, one per connection, on `socket_path` (listening,
        or connecting with `client=True`) or on `listener`, which the server then owns and
        closes. `warm_up=False` skips the warm-up device (tests that need no compiled code)."""
        if (socket_path is None) == (listener is None):
            raise ValueError("give exactly one of socket_path and listener")
        if client and listener is not None:
            raise ValueError("client mode connects to socket_path; a listener is for server mode")
        self.device_factory = device_factory
        self.socket_path = socket_path
        self.client = client
        self.options = options
        self.max_connections = max_connections
        self.connections = 0
        self._listener = listener
        self._warm_up = warm_up
        self._stop = EventFd.create("server-stop")
        self._stopping = False
        self._lock = threading.Lock()  # guards _totals and current
        self._totals: dict[str, Any] = {}
        self.current: Backend | None = None
        self.listening = threading.Event()  # set once the socket accepts connections

    @property
    def where(self) -> str:
        """The socket, for messages: its path, or the fd it was handed."""
        return self._listener.name if self._listener is not None else str(self.socket_path)

    def stop(self) -> None:
        """Ask serve_forever() to return (safe from a signal handler)."""
        self._stopping = True
        self._stop.signal()

    def warm_up(self) -> None:
        """Make one device and call its `warm_up()`: its kernels compile (or load from numba's
        cache) now rather than in the first frontend's first burst."""
        seconds = warm_up_device(self.device_factory)
        log.debug("device warmed up in %.2f s", seconds)

    def serve_forever(self) -> None:
        """Warm up, listen (or connect), and serve frontends until `stop()`, or until
        `max_connections` have been served. Raises OSError if the socket cannot be made."""
        listener = self._listener
        try:
            if self._warm_up:
                self.warm_up()
            if listener is None and not self.client:
                assert self.socket_path is not None
                listener = Listener(self.socket_path)
            self.listening.set()
            while not self._stopping:
                if listener is not None:
                    conn = listener.accept(self._stop.fileno())
                else:
                    assert self.socket_path is not None
                    conn = connect(self.socket_path, stop_fd=self._stop.fileno())
                self.serve_connection(conn)
                if self.max_connections is not None and self.connections >= self.max_connections:
                    break
        except Stopped:
            pass
        finally:
            if listener is not None:
                listener.close()
            self._stop.close()
            log.info("server stopped after %d connections", self.connections)

    def serve_connection(self, conn: Connection) -> None:
        """Run one frontend's session to its end; raises Stopped if stop() came first."""
        self.connections += 1
        backend = Backend(self.device_factory(), conn.name, self.options)
        log.info("%s: frontend connected", conn.name)
        with self._lock:
            self.current = backend
        backend.start()
        try:
            while True:
                conn.wait_readable(self._stop.fileno())
                data, fds = conn.recv_message_bytes()
                for out, out_fds in backend.receive(data, fds):
                    conn.send(out, out_fds)
        except PeerClosed as exc:
            if backend.protocol.at_boundary:
                log.info("%s: frontend disconnected", conn.name)
            else:
                log.error("%s: frontend disconnected in the middle of a message (%s)",
                          conn.name, exc)
        except SocketBroken as exc:
            log.error("%s: socket broken: %s (%s); closing", conn.name, exc, exc.__cause__)
        except RemoteProtocolError as exc:
            log.error("%s: protocol error: %s; closing the connection", conn.name, exc)
        except ConnectionFatal as exc:
            log.error("%s: %s; closing the connection", conn.name, exc)
        except Stopped:
            raise
        except Exception:  # our bug: drop this connection, keep serving the next ones
            log.exception("%s: internal error; closing the connection", conn.name)
        finally:
            backend.close()
            conn.close()
            final = backend.stats()
            with self._lock:
                self.current = None
                _accumulate(self._totals, final)
            log.info("%s: session closed: %s", conn.name, _summary(final))

    def stats(self) -> dict[str, Any]:
        """Totals over finished connections plus the live one."""
        with self._lock:
            totals = dict(self._totals)
            current = self.current
        if current is not None:
            _accumulate(totals, current.stats())
        totals["connections"] = self.connections
        return totals


def _accumulate(totals: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        if not isinstance(value, (int, float)):
            continue
        if key in _MAX_KEYS:
            totals[key] = max(totals.get(key, 0), value)
        elif key in _LAST_KEYS:
            totals[key] = value
        else:
            totals[key] = totals.get(key, 0) + value


def _summary(stats: dict[str, Any]) -> str:
    """The session's counters that moved (the device's own and the daemon's), `key=value`."""
    moved = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in stats.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v]
    return ", ".join(moved) or "no counter moved"
