"""The daemon: Unix sockets and SCM_RIGHTS, eventfds, one `Backend` per frontend connection
(vhost-user requests, ring life cycle), worker threads running the rings, the event thread
for devices' own fds, and the `Server` that serves connections one after another.

Public: `server` (Server), `backend` (BackendOptions), `unix_socket` (Listener). The rest is
internal: `worker`, `vring`, `events`, `eventfd`.
"""

__all__ = ["backend", "server", "unix_socket"]
