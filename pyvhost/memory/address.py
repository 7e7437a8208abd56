"""Typed addresses.

vhost-user speaks of two address spaces: guest-physical addresses (descriptor buffers, memory
table keys) and the frontend's own virtual addresses ("user" addresses: ring addresses in
SET_VRING_ADDR). Mixing them is the classic backend bug, so they are distinct types for mypy.
"""

from typing import NewType

GuestAddress = NewType("GuestAddress", int)
UserAddress = NewType("UserAddress", int)
