"""Kick, call and error eventfds (vhost-user "Ring notifications").

The frontend sends each one over SCM_RIGHTS; from then on the daemon owns it (`OwnedFd`).
Writers never block: an eventfd counter that is about to overflow means the reader is far
behind, and one more notification adds nothing (EAGAIN is ignored). Reads are nonblocking
and collapse every pending notification into one.
"""

from __future__ import annotations

import fcntl
import os

from pyvhost.fd import OwnedFd

_ONE = (1).to_bytes(8, "little")


class NotAnEventFd(ValueError):
    """A frontend sent some other kind of fd where an eventfd belongs."""


def is_eventfd(fd: int) -> bool:
    """Whether fd is an eventfd (its /proc fdinfo has an eventfd-count line)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            return b"eventfd-count:" in f.read()
    except OSError:
        return False


class EventFd:
    """One eventfd, owned. `signal()` and `drain()` never block.

    Anything else is refused (NotAnEventFd; the caller still owns `fd` then): a directory,
    a pipe's other end or a socket would make a worker's read or write fail or misbehave.
    """

    __slots__ = ("_fd", "name")

    def __init__(self, fd: OwnedFd, name: str = "eventfd") -> None:
        if not is_eventfd(fd.fileno()):
            raise NotAnEventFd(f"{name}: fd {fd.fileno()} is not an eventfd")
        self._fd = fd
        self.name = name
        _set_nonblocking(fd.fileno())

    @classmethod
    def create(cls, name: str = "eventfd") -> "EventFd":
        """A fresh eventfd of our own (e.g. the worker's wake-up fd, a test's kick)."""
        return cls(OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)), name)

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def signal(self) -> None:
        """Add one to the counter: wakes whoever polls the other end."""
        try:
            os.write(self._fd.fileno(), _ONE)
        except BlockingIOError:
            pass  # counter saturated: a notification is already pending

    def drain(self) -> int:
        """Consume pending notifications; returns how many were pending (0 if none)."""
        try:
            return int.from_bytes(os.read(self._fd.fileno(), 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self._fd.close()

    def __repr__(self) -> str:
        return f"EventFd({self.name}, {self._fd!r})"


def _set_nonblocking(fd: int) -> None:
    # An fd from the frontend may be blocking; a blocking read would hang a worker forever.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    # (The flag lives on the shared file description; eventfd writers only ever block at a
    # saturated counter, so the frontend is not affected.)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
