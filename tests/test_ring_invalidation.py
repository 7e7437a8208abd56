"""Direct map lifetime: straddling rings, table changes, and invalidation under a running worker."""

from __future__ import annotations

import gc
import threading

import numpy as np

from pyvhost.devices.net import tx_drop as NK
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue, region_specs

MiB = 1 << 20


def mapped_guest_ram() -> int:
    gc.collect()  # a GuestRam an earlier test dropped unclosed is unmapped by its finaliser
    with open("/proc/self/maps") as f:
        return sum("pyvhost-guest-ram" in line for line in f)


def test_straddling_ring_uses_copy_path_until_table_no_longer_straddles():
    ram = GuestRam([(0, MiB), (MiB, MiB)])  # GPA- and user-adjacent
    size = 256
    # Descriptor table from 1 KiB before the boundary: half in each region.
    desc = ram.alloc(16 * size, 16, region=0, offset=MiB - 2048)
    driver = MockSplitQueue(ram, size, desc=desc)
    memory = backend_memory(ram)
    queue = device_queue(driver, memory, metadata_access="auto")
    for i in range(10):
        driver.add_chain([bytes([i]) * 100], [])
    driver.publish()
    table = memory.table
    chains = queue.pop_burst(table)
    assert [c.read(table)[0] for c in chains] == list(range(10))
    assert queue.stats.direct_rounds == 0 and queue.stats.copy_rounds >= 1
    assert any("not inside one region" in r for r in queue.stats.copy_reasons)
    queue.push_used(table, [(c.head, 0) for c in chains])
    assert len(driver.used()) == 10

    # The frontend replaces the two regions by one covering both (same contents, one fd).
    contents = ram.read(0, 2 * MiB)
    user_base = driver.ring_addresses().user.desc_table - desc
    ram.remove_region(MiB)
    ram.remove_region(0)
    ram.add_region(0, 2 * MiB, userspace_addr=user_base)
    ram.write(0, contents)
    memory.set_regions(region_specs(ram))
    assert queue.stats.invalidations == 0  # there was no direct map to drop
    for i in range(10, 20):
        driver.add_chain([bytes([i]) * 100], [])
    driver.publish()
    table = memory.table
    chains = queue.pop_burst(table)
    assert [c.read(table)[0] for c in chains] == list(range(10, 20))
    assert queue.stats.direct_rounds == 1  # switched to the direct map
    queue.push_used(table, [(c.head, 0) for c in chains])
    assert len(driver.used()) == 10
    memory.close()
    ram.close()


def test_memory_change_drops_views_and_unmaps_old_regions():
    before = mapped_guest_ram()
    with GuestRam([(0, 2 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 64)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory)
        queue.round_views(memory.table)
        assert queue.stats.direct_rounds == 1
        for _ in range(50):  # same memory, new fds: SET_MEM_TABLE as a frontend resends it
            memory.set_regions(region_specs(ram))
            queue.round_views(memory.table)
        assert queue.stats.invalidations == 50
        # One mapping by the driver, one by the backend: nothing kept from older tables.
        assert mapped_guest_ram() == before + 2
        memory.close()
        assert memory.leaked_mappings == 0
    assert mapped_guest_ram() == before


class BurstWorker(threading.Thread):
    """A worker like the daemon's: epoch-bracketed rounds of the compiled drop kernel."""

    def __init__(self, memory: GuestMemory, queue, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.memory, self.queue, self.stop = memory, queue, stop
        self.epoch = memory.epochs.register("burst-worker")
        self.counters = np.zeros(NK.COUNTERS_LEN, np.int64)
        self.scratch = np.zeros(NK.HEADER_BYTES, np.uint8)
        self.closed_seen = 0
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        q = self.queue
        try:
            while not self.stop.is_set():
                self.epoch.enter()
                table = self.memory.table
                # A round must never see a mapping the writer has already unmapped.
                self.closed_seen += sum(r.closed for r in table.regions)
                views = q.round_views(table)
                done = NK.tx_drop_burst(table.kernel(), q.q, views, 32, q.heads, q.chain_end,
                                        q.seg_addr, q.seg_len, q.seg_flags, q.hosts,
                                        self.scratch, self.counters)
                self.closed_seen += sum(r.closed for r in table.regions)
                del table, views
                self.epoch.leave()
                self.rounds += 1
                assert done >= 0, q.error_text()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc
            self.epoch.leave() if self.epoch.inside else None


def test_thousands_of_table_swaps_under_a_running_worker():
    """Invalidation while a worker thread runs bursts: no stale or unmapped read, no loss."""
    before = mapped_guest_ram()
    swaps = 2000
    with GuestRam([(0, 4 * MiB), (4 * MiB, 4 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 256, region=0)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory)
        stop = threading.Event()
        worker = BurstWorker(memory, queue, stop)
        worker.start()
        sent = 0
        frame = bytes(12) + b"\x02" * 12 + b"\x08\x00" + bytes([0x45]) + bytes(8) + b"\x11" + bytes(40)
        for i in range(swaps):
            # Keep traffic flowing while the table changes under the worker.
            for _ in range(min(8, driver.num_free)):
                driver.add_chain([frame], [])
                sent += 1
            driver.publish()
            if i % 2:
                memory.set_regions(region_specs(ram))  # same memory, new fds
            else:  # remove and re-add the region that holds no ring
                memory.remove_region(memory.table.regions[1].spec)
                spec, fd = region_specs(ram)[1]
                memory.add_region(spec, fd)
            driver.used()
        # Let the worker finish what was offered.
        deadline = 0
        while worker.counters[NK.C_PACKETS] < sent and deadline < 2000:
            threading.Event().wait(0.001)
            deadline += 1
        stop.set()
        worker.join(10)
        assert worker.error is None, worker.error
        assert worker.closed_seen == 0
        assert worker.counters[NK.C_PACKETS] == sent  # nothing lost, nothing doubled
        assert worker.counters[NK.C_UDP] == sent
        assert memory.grace.count >= swaps * 1.5 and memory.grace.timeouts == 0
        recent = sorted(memory.grace.recent)
        print(f"\n{swaps} swaps, {worker.rounds} worker rounds; grace period p50 "
              f"{recent[len(recent) // 2] * 1e6:.1f} us, p99 {recent[int(len(recent) * .99)] * 1e6:.1f}"
              f" us, max {memory.grace.max * 1e6:.1f} us; invalidations {queue.stats.invalidations}")
        assert queue.stats.direct_rounds > 0
        memory.epochs.unregister(worker.epoch)
        memory.close()
        assert memory.leaked_mappings == 0
    assert mapped_guest_ram() == before
