"""Serve frontends one after another on one socket path; stop cleanly on request.

Server mode listens (and accepts the next frontend when one leaves); client mode connects to
a listening frontend and reconnects with back-off when it goes away. Each connection gets a
fresh device and `Backend`; when the frontend closes, breaks the protocol, or the socket
fails, the backend is torn down (workers stopped, memory unmapped, fds closed) before the
next connection is served. `stop()` may be called from a signal handler or another thread.
"""

from __future__ import annotations

import logging
import threading
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
from pyvhost.protocol import RemoteProtocolError

log = logging.getLogger(__name__)

# Statistics that combine across connections by maximum rather than by sum.
_MAX_KEYS = {"grace_max_s"}


class Server:
    def __init__(self, device_factory: Callable[[], Device], socket_path: str, *,
                 client: bool = False, options: BackendOptions = BackendOptions(),
                 max_connections: int | None = None) -> None:
        self.device_factory = device_factory
        self.socket_path = socket_path
        self.client = client
        self.options = options
        self.max_connections = max_connections
        self.connections = 0
        self._stop = EventFd.create("server-stop")
        self._stopping = False
        self._lock = threading.Lock()  # guards _totals and current
        self._totals: dict[str, Any] = {}
        self.current: Backend | None = None
        self.listening = threading.Event()  # set once the socket accepts connections

    def stop(self) -> None:
        """Ask serve_forever() to return (safe from a signal handler)."""
        self._stopping = True
        self._stop.signal()

    def serve_forever(self) -> None:
        listener = None if self.client else Listener(self.socket_path)
        self.listening.set()
        try:
            while not self._stopping:
                if listener is not None:
                    conn = listener.accept(self._stop.fileno())
                else:
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
        else:
            totals[key] = totals.get(key, 0) + value


def _summary(stats: dict[str, Any]) -> str:
    keys = ("tx_packets", "tx_bytes", "direct_rounds", "copy_rounds", "invalidations",
            "queues_broken")
    return ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)
