"""File descriptors owned by objects.

Every fd pyvhost receives (SCM_RIGHTS) or creates is wrapped at once in an `OwnedFd`. The owner
closes it exactly once; using it after close raises `ClosedFdError` instead of touching whatever
the kernel has since recycled that number for.
"""

from __future__ import annotations

import os


class ClosedFdError(OSError):
    """The fd was closed by its owner; the number may already belong to something else."""


class OwnedFd:
    __slots__ = ("_fd", "__weakref__")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedFdError("file descriptor used after close")
        return self._fd

    def detach(self) -> int:
        """Give up ownership: the caller now owns the raw fd."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def dup(self) -> "OwnedFd":
        return OwnedFd(os.dup(self.fileno()))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> "OwnedFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped owner must not leak the fd; this is the safety net, not the normal path.
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd >= 0 else "OwnedFd(closed)"


def close_all(fds: "list[OwnedFd] | tuple[OwnedFd, ...]") -> None:
    for fd in fds:
        fd.close()
