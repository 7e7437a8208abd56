"""Protocol errors, split by whose fault they are (as in h11).

`RemoteProtocolError`: the peer sent something the protocol forbids; the connection is unusable
afterwards and should be dropped. `LocalProtocolError`: our own code misused the API (wrong
payload type, replying twice...); a bug on this side.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every vhost-user protocol error. `request` is the request id, when known."""

    def __init__(self, message: str, request: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request

    def __str__(self) -> str:
        if self.request is None:
            return self.message
        return f"{self.message} (request {_request_name(self.request)})"


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class BadVersion(RemoteProtocolError):
    """Header flags do not carry version 0x1."""


class UnknownRequest(RemoteProtocolError):
    """The request id is not one the spec defines for this direction."""


class BadPayloadSize(RemoteProtocolError):
    """The header's payload size is not one this request allows."""


class BadPayload(RemoteProtocolError):
    """The payload's fields contradict each other or use reserved bits."""


class BadFds(RemoteProtocolError):
    """Wrong number of fds for this message (or more than MAX_FDS)."""


class UnexpectedReply(RemoteProtocolError):
    """A reply without REPLY flag, for another request, or when none was awaited."""


class NotSupported(RemoteProtocolError):
    """A recognised request this back-end does not implement and cannot refuse in-band."""


class ConnectionBroken(RemoteProtocolError):
    """Used after an earlier RemoteProtocolError; the cause is chained."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol API."""


def _request_name(request: int) -> str:
    name = getattr(request, "name", None)
    return f"{name}={int(request)}" if name else str(int(request))
