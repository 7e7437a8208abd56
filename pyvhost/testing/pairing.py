"""Wire a driver-side test double to the device side in one process, without a socket.

What a vhost-user connection would do — hand the guest's region fds to the backend and tell a
queue its size, ring addresses and starting index — done directly, for tests, the demo and the
ring benchmark.
"""

from __future__ import annotations

from pyvhost.fd import OwnedFd
from pyvhost.memory.address import UserAddress
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.memory.region import RegionSpec
from pyvhost.ring.split_queue import SplitQueue
from pyvhost.ring.virtqueue import Virtqueue
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.packed_driver import MockPackedQueue


def region_specs(ram: GuestRam) -> list[tuple[RegionSpec, OwnedFd]]:
    """The ram's regions as the backend receives them: new fds it owns, like SCM_RIGHTS gives."""
    return [(RegionSpec(gpa, size, uaddr, offset), OwnedFd(fd))
            for fd, gpa, size, uaddr, offset in ram.region_specs(owned=True)]


def backend_memory(ram: GuestRam, memory: GuestMemory | None = None) -> GuestMemory:
    memory = memory or GuestMemory()
    memory.set_regions(region_specs(ram))
    return memory


def device_queue(driver: MockSplitQueue | MockPackedQueue, memory: GuestMemory, *,
                 index: int = 0, metadata_access: str = "auto", indirect: bool = True,
                 max_burst: int = 256) -> SplitQueue:
    """A device-side queue configured as SET_VRING_NUM/ADDR/BASE would, listening to memory
    (a packed one, a `Virtqueue` with VIRTIO_F_RING_PACKED, for a MockPackedQueue)."""
    if isinstance(driver, MockPackedQueue):
        return _packed_device_queue(driver, memory, index, metadata_access, indirect, max_burst)
    queue = SplitQueue(index, metadata_access, max_burst=max_burst)
    queue.set_size(driver.size)
    user = driver.ring_addresses().user
    queue.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                        UserAddress(user.used_ring))
    queue.set_features(event_idx=driver.event_idx, indirect=indirect)
    queue.set_next_avail(driver.initial_avail_idx)
    queue.sync_used_from_ring(memory.table)
    memory.add_listener(queue.on_memory_change)
    return queue


def _packed_device_queue(driver: MockPackedQueue, memory: GuestMemory, index: int,
                         metadata_access: str, indirect: bool, max_burst: int) -> Virtqueue:
    queue = Virtqueue(index, metadata_access, max_burst=max_burst)
    queue.set_features(event_idx=driver.event_idx, indirect=indirect, packed=True)
    queue.set_size(driver.size)
    user = driver.ring_addresses().user
    queue.set_addresses(UserAddress(user.desc_table), UserAddress(user.avail_ring),
                        UserAddress(user.used_ring))
    queue.set_base(driver.vring_base)
    queue.sync_used_from_ring(memory.table)
    memory.add_listener(queue.on_memory_change)
    return queue
