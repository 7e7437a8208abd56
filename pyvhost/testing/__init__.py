"""Test doubles and harnesses, public so that device authors test their devices as pyvhost
tests its own: guest RAM in memfds (`guest_ram`), the driver side of a split ring
(`driver.MockSplitQueue`), a Python vhost-user frontend (`frontend.VhostUserFrontend`), a
device served in-process (`session.DeviceSession`), the frontend's side of the dirty log
(`dirty_log`), and the DPDK/QEMU test bed (`testbed`). No production module imports these.
"""

__all__ = ["dirty_log", "driver", "frontend", "guest_ram", "pairing", "session", "testbed"]
