"""NetDevice's drop sink calls the compiled burst through its resolved overload (skipping
numba's per-call typing): one cache entry for the copy path's NO_VIEWS, one for a direct map.
A queue switching between the two paths, and two devices, must count every frame exactly."""

from __future__ import annotations

import numba

from pyvhost.devices.net import tx_drop as NK
from pyvhost.devices.net.device import NetDevice
from pyvhost.ring.direct_map import NO_VIEWS
from pyvhost.ring.jit import overload_entry
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

MiB = 1 << 20


def _frames(driver: MockSplitQueue, n: int) -> None:
    ipv4_udp = (b"\0" * 12 + b"\x52\x54\x00\x00\x00\x02" + b"\x52\x54\x00\x00\x00\x01"
                + b"\x08\x00" + bytes([0x45] + [0] * 8 + [17]) + b"\0" * 30)
    driver.add_chains_and_publish([([ipv4_udp], [])] * n)


def test_copy_and_direct_rounds_alternate_and_every_frame_counts():
    with GuestRam([(0, 16 * MiB)]) as ram:
        memory = backend_memory(ram)
        devices = [NetDevice(), NetDevice()]
        for dev in devices:
            for mode in ("direct", "copy", "direct", "copy"):
                driver = MockSplitQueue(ram, 256)
                queue = device_queue(driver, memory, index=1, metadata_access=mode)
                dev.on_queue_started(queue)
                table = memory.table
                views = queue.round_views(table)
                assert (views is NO_VIEWS) == (mode == "copy")
                _frames(driver, 100)
                done, _ = dev.process_burst(queue, table, table.kernel(), views)
                assert done == 100 and not queue.broken
                assert [h for h, _ in driver.used()] == list(range(100))
                queue.drop_views()
            assert set(dev._drop_entry) == {True, False}
            assert dev.stats()["tx_packets"] == 400 and dev.stats()["tx_udp"] == 400
        memory.close()


def test_overload_entry_is_none_for_types_never_compiled():
    assert overload_entry(NK.count_l4, (1.5, 2.5)) is None
    assert isinstance(NK.count_l4, numba.core.registry.CPUDispatcher)
