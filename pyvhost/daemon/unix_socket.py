"""The vhost-user socket: a Unix stream socket whose messages may carry fds (SCM_RIGHTS).

Server mode (the default) listens on a path and accepts one frontend at a time, or serves a
listening socket a launcher passed as an fd (`Listener.from_fd`); client mode connects to a
frontend that listens (QEMU's `server=on`), retrying with back-off until it is there. Every fd that arrives is wrapped in an `OwnedFd` before anything else can happen, so an
error later in the message path cannot leak it.

Whose fault, as in trio: `PeerClosed` — the frontend closed its end (a normal end of session);
`SocketBroken` — the socket failed under us, with the `OSError` as `__cause__`;
`FdsTruncated` — the kernel dropped fds (more than MAX_FDS, or RLIMIT_NOFILE): the stream is
now out of step with its fds and must not be used.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import stat
import time
from typing import Callable, Sequence

from pyvhost.fd import OwnedFd
from pyvhost.protocol.constants import MAX_FDS

log = logging.getLogger(__name__)

# Largest vhost-user message: 12-byte header + a memory table of 8 regions (8 + 8 * 32 bytes),
# or config space (12 + 256). One recvmsg of this size never splits fds from their header.
RECV_SIZE = 64 * 1024
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class SocketError(Exception):
    """Base of socket-level errors."""


class PeerClosed(SocketError):
    """The frontend closed the connection."""


class SocketBroken(SocketError):
    """The socket failed underneath us; the `OSError` is the `__cause__`."""


class FdsTruncated(SocketBroken):
    """The kernel truncated the SCM_RIGHTS data (MSG_CTRUNC): some fds were lost."""


class Stopped(SocketError):
    """A wait was ended by the stop fd (daemon shutdown)."""


class Connection:
    """One accepted or connected vhost-user stream. Owns the socket."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self.name = name

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def recv_message_bytes(self) -> tuple[bytes, list[OwnedFd]]:
        """Whatever bytes are ready (at least one), with the fds that rode on them.

        Linux never joins stream data that carries fds to data read before it in one
        recvmsg, so fds always arrive with the bytes of the header they were sent with.
        """
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
        except OSError as exc:
            if exc.errno == errno.ECONNRESET:
                raise PeerClosed(f"{self.name}: connection reset by peer") from exc
            raise SocketBroken(f"{self.name}: recvmsg failed: {exc}") from exc
        fds = _owned_fds(ancdata)  # wrap at once: nothing below may leak them
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                fd.close()
            raise FdsTruncated(f"{self.name}: more than {MAX_FDS} fds, or fd limit reached: "
                               "ancillary data truncated")
        if not data:
            for fd in fds:
                fd.close()
            raise PeerClosed(f"{self.name}: peer closed the connection")
        return data, fds

    def send(self, data: bytes, fds: Sequence[OwnedFd | int] = ()) -> None:
        """Send all of `data`; the fds ride with its first byte."""
        raw = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", raw))] if raw else []
        view = memoryview(data)
        try:
            while view:
                sent = self._sock.sendmsg([view], anc)
                view, anc = view[sent:], []
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed(f"{self.name}: peer closed the connection") from exc
        except OSError as exc:
            raise SocketBroken(f"{self.name}: sendmsg failed: {exc}") from exc

    def wait_readable(self, stop_fd: int | None, timeout: float | None = None) -> bool:
        """Block until the socket is readable (True) or `timeout` passes (False).

        Raises `Stopped` when `stop_fd` becomes readable first.
        """
        return _wait_readable(self._sock.fileno(), stop_fd, timeout)

    def close(self) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"Connection({self.name})"


def _owned_fds(ancdata) -> list[OwnedFd]:
    fds: list[OwnedFd] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
            fds.extend(OwnedFd(fd) for fd in arr)
    return fds


def _wait_readable(fd: int, stop_fd: int | None, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if stop_fd is not None:
        poller.register(stop_fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    events = poller.poll(ms)
    if stop_fd is not None and any(ready == stop_fd for ready, _ in events):
        raise Stopped("stop requested")
    return bool(events)


class Listener:
    """Server mode: listens on `path`. A stale socket file (nobody listening) is replaced.

    `Listener.from_fd(fd)` instead serves a socket somebody else created, bound and made
    listen (vhost-user "Backend program conventions", `--fd FDNUM`); it has no path to remove.
    """

    def __init__(self, path: str, backlog: int = 1) -> None:
        self.path: str | None = path
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepted = 0
        self._inode: int | None = os.stat(path).st_ino  # to remove only our own file at close
        self.name = path

    @classmethod
    def from_fd(cls, fd: int) -> Listener:
        """Adopt `fd`, an inherited listening Unix stream socket; the Listener owns it from
        now on (`close()` closes it and unlinks nothing). Raises `NotAListeningSocket` (the
        fd is left alone) when `fd` is not open, not a socket, or not a listening AF_UNIX
        stream socket."""
        check_listening_unix_socket(fd)
        self = cls.__new__(cls)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
        self._sock.set_inheritable(False)  # ours now; a child process must not hold it open
        self._accepted = 0
        self.path = None
        self._inode = None
        bound = self._sock.getsockname()
        self.name = f"fd {fd} ({bound})" if isinstance(bound, str) and bound else f"fd {fd}"
        return self

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, stop_fd: int | None = None) -> Connection:
        """Wait for the next frontend. Raises `Stopped` if `stop_fd` fires first."""
        while True:
            _wait_readable(self._sock.fileno(), stop_fd, None)
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            self._accepted += 1
            return Connection(sock, f"{self.name}#{self._accepted}")

    def close(self) -> None:
        """Stop listening; remove the socket file if we made it and it is still ours."""
        ours = False
        if self.path is not None:
            try:
                ours = os.stat(self.path).st_ino == self._inode
            except OSError:
                pass
        self._sock.close()
        if ours:
            try:
                os.unlink(self.path)  # type: ignore[arg-type]
            except FileNotFoundError:
                pass


class NotAListeningSocket(ValueError):
    """An fd given to serve on is not a listening Unix stream socket."""


def check_listening_unix_socket(fd: int) -> None:
    """Raise `NotAListeningSocket` saying what is wrong unless `fd` is an open, listening
    AF_UNIX SOCK_STREAM socket. Inspects a duplicate: `fd` itself is never closed here."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise NotAListeningSocket(f"fd {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotAListeningSocket(f"fd {fd} is not a socket ({_file_kind(st.st_mode)})")
    with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # a dup of fd
        domain = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if domain != socket.AF_UNIX:
        family = _enum_name(socket.AddressFamily, domain)
        raise NotAListeningSocket(f"fd {fd} is not a Unix socket ({family})")
    if kind != socket.SOCK_STREAM:
        raise NotAListeningSocket(f"fd {fd} is not a stream socket "
                                  f"({_enum_name(socket.SocketKind, kind)})")
    if not listening:
        raise NotAListeningSocket(f"fd {fd} is a Unix stream socket that does not listen "
                                  "(bind and listen() it before passing it)")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a pipe")):
        if test(mode):
            return kind
    return "not a socket"


def _enum_name(enum: type, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        raise OSError(f"cannot check existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise FileExistsError(f"another process is listening on {path}")


def connect(path: str, *, stop_fd: int | None = None, timeout: float | None = None,
            backoff: tuple[float, float] = (0.05, 1.0),
            sleep: Callable[[float], None] | None = None) -> Connection:
    """Client mode: connect to a listening frontend, retrying with exponential back-off.

    Retries while the path is missing or nobody listens; gives up after `timeout` seconds
    (None: never) and raises `Stopped` if `stop_fd` fires during a back-off.
    """
    delay, max_delay = backoff
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return Connection(sock, f"{path}@{attempt}")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise SocketBroken(f"cannot connect to {path} after {attempt} tries") from exc
            if attempt == 1:
                log.info("waiting for a frontend on %s (%s)", path, exc.strerror)
        except OSError:
            sock.close()
            raise
        if sleep is not None:
            sleep(delay)
        elif stop_fd is not None:
            r, _, _ = select.select([stop_fd], [], [], delay)
            if r:
                raise Stopped("stop requested")
        else:
            time.sleep(delay)
        delay = min(delay * 2, max_delay)
