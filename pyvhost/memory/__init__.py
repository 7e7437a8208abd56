"""Guest memory: regions mapped from the frontend's fds, the immutable region table that
readers load once per burst, the holder that swaps it after a grace period, the dirty log.

Public modules (a device author rarely needs them: `pyvhost.Request` hides guest memory):
`guest_memory` (GuestMemory, TablePin), `table` (RegionTable), `region` (MappedRegion,
RegionSpec), `dirty_log` (DirtyLog), `epoch` (grace periods), `address` (typed addresses),
`access` (checked reads and writes from Python), `errors`.
"""

__all__ = ["access", "address", "dirty_log", "epoch", "errors", "guest_memory", "region",
           "table"]
