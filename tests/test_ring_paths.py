"""Both metadata paths give identical used rings, consumer output and interrupt decisions."""

from __future__ import annotations

import ctypes
import hashlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.devices.net import tx_drop as NK
from pyvhost.memory import access
from pyvhost.ring import kernels as K
from pyvhost.ring.poll import one_pass_window
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory, device_queue

MiB = 1 << 20

chain_shape = st.tuples(
    st.lists(st.integers(1, 300), min_size=0, max_size=4),  # readable segment sizes
    st.lists(st.integers(1, 300), min_size=0, max_size=3),  # writable segment sizes
    st.booleans(),                                          # through an indirect table
).filter(lambda c: c[0] or c[1])

workload = st.fixed_dictionaries({
    "size": st.sampled_from([8, 16, 64]),
    "event_idx": st.booleans(),
    "start": st.one_of(st.just(0), st.integers(65500, 65535), st.integers(0, 65535)),
    "rounds": st.lists(st.tuples(st.lists(chain_shape, min_size=0, max_size=12),
                                 st.integers(1, 8)),  # chains offered, device burst size
                       min_size=1, max_size=12),
    "no_interrupt": st.booleans(),
})


def run_workload(w: dict, mode: str) -> dict:
    """Drive one queue through the workload; return everything observable."""
    with GuestRam([(0, 4 * MiB)]) as ram:
        driver = MockSplitQueue(ram, w["size"], event_idx=w["event_idx"],
                                initial_avail_idx=w["start"])
        driver.set_no_interrupt(w["no_interrupt"])
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, metadata_access=mode)
        seq = 0
        used, written, consumed, interrupts, expected = [], [], [], [], []
        pending: list = []
        for chains, burst in w["rounds"]:
            pending.extend(chains)
            while pending and driver.num_free >= len(pending[0][0]) + len(pending[0][1]):
                readable, writable, indirect = pending.pop(0)
                data = [bytes([(seq + i) & 0xFF]) * n for i, n in enumerate(readable)]
                seq += 1
                expected.append(b"".join(data))
                add = driver.add_indirect_chain if indirect else driver.add_chain
                add(data, writable)
            driver.publish()
            table = memory.table
            for chain in queue.pop_burst(table, burst):
                consumed.append(chain.read(table))
                reply = hashlib.sha256(consumed[-1]).digest() * 40
                n = chain.write(table, reply)
                interrupts.append(queue.push_used(table, [(chain.head, n)]))
            for head, length in driver.used():
                used.append((head, length))
                written.append(driver.written_data(head, length))
        while True:  # drain the rest
            chains = queue.pop_burst(memory.table, 64)
            if not chains:
                break
            for chain in chains:
                consumed.append(chain.read(memory.table))
            interrupts.append(queue.push_used(memory.table, [(c.head, 0) for c in chains]))
            used.extend(driver.used())
        stats = queue.stats
        memory.close()
        return {"used": used, "written": written, "consumed": consumed, "expected": expected,
                "interrupts": interrupts, "direct": stats.direct_rounds, "copy": stats.copy_rounds,
                "next_avail": queue.next_avail}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload)
def test_direct_and_copy_paths_agree(w):
    direct = run_workload(w, "direct")
    copy = run_workload(w, "copy")
    assert direct["copy"] == 0 and copy["direct"] == 0  # each ran on the path it was asked for
    for key in ("used", "written", "consumed", "interrupts", "next_avail"):
        assert direct[key] == copy[key], key
    # And both are right, not just equal: the device saw exactly what the driver offered.
    assert direct["consumed"] == direct["expected"]


def _drop_counters(mode: str, frames: list[bytes]) -> tuple[np.ndarray, list]:
    with GuestRam([(0, 4 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 256)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, metadata_access=mode)
        for i, frame in enumerate(frames):
            hdr = bytes(12)
            # Split some frames between header and payload descriptors, as Linux guests do.
            (driver.add_chain([hdr, frame], []) if i % 3 else driver.add_chain([hdr + frame], []))
        driver.publish()
        counters = np.zeros(NK.COUNTERS_LEN, np.int64)
        scratch = np.zeros(NK.HEADER_BYTES, np.uint8)
        table = memory.table
        views = queue.round_views(table)
        window = one_pass_window()
        done, _ = NK.tx_drop_poll(table.kernel(), queue.q, views, 32, window.cycles,
                                  window.idle_cycles, window.leave, queue.heads, queue.chain_end,
                                  queue.seg_addr, queue.seg_len, queue.seg_flags, queue.hosts,
                                  scratch, counters)
        assert done == len(frames)
        used = driver.used()
        memory.close()
        return counters, used


def _eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + payload


def test_drop_kernel_counts_by_protocol_identically_on_both_paths():
    ipv4 = lambda proto: _eth(0x0800, bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, proto]) + bytes(30))
    ipv6 = _eth(0x86DD, bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + bytes(40))
    frames = [ipv4(17)] * 5 + [ipv4(6)] * 4 + [ipv4(1)] * 3 + [ipv6] * 2 + \
        [_eth(0x0806, bytes(28))] + [b"\x01" * 10]
    direct, used_d = _drop_counters("direct", frames)
    copy, used_c = _drop_counters("copy", frames)
    assert (direct == copy).all() and used_d == used_c
    assert direct[NK.C_PACKETS] == 16
    assert direct[NK.C_BYTES] == sum(len(f) for f in frames)
    assert (direct[NK.C_UDP], direct[NK.C_TCP], direct[NK.C_ICMP]) == (7, 4, 3)
    assert (direct[NK.C_IPV4], direct[NK.C_IPV6], direct[NK.C_ARP], direct[NK.C_SHORT]) == (
        12, 2, 1, 1)
    assert all(length == 0 for _, length in used_d)


def test_event_idx_interrupts_follow_used_event_across_wraparound():
    with GuestRam([(0, MiB)]) as ram:
        driver = MockSplitQueue(ram, 8, event_idx=True, initial_avail_idx=65533)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, metadata_access="direct")
        decisions = []
        for i in range(6):  # crosses 65535 -> 0
            driver.set_used_event((65533 + 3) & 0xFFFF)  # "interrupt me after the 4th buffer"
            driver.add_chain([b"x"], [])
            driver.publish()
            chain = queue.pop_descriptor_chain(memory.table)
            decisions.append(queue.push_used(memory.table, [(chain.head, 0)]))
            driver.used()
        # The first decision is always true (nothing signalled yet). used_event 0 asks for an
        # interrupt once the element at used index 0 is written, i.e. when used idx goes 0 -> 1,
        # three pushes after 65534 -> 65535 -> 0: 16-bit wrap-around in vring_need_event.
        assert decisions == [True, False, False, True, False, False]
        memory.close()


def test_notification_suppression_without_event_idx():
    with GuestRam([(0, MiB)]) as ram:
        driver = MockSplitQueue(ram, 8)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory)
        table = memory.table
        queue.disable_notification(table)
        assert driver.used_flags() & 1  # VRING_USED_F_NO_NOTIFY
        driver.add_chain([b"x"], [])
        driver.publish()
        assert not driver.needs_kick()
        # Enabling while a buffer waits tells the device to keep polling (no lost wake-up).
        assert queue.enable_notification(table)
        assert driver.used_flags() == 0
        queue.pop_descriptor_chain(table)
        assert not queue.enable_notification(table)
        driver.set_no_interrupt(True)
        assert not queue.push_used(table, [(0, 0)])
        driver.set_no_interrupt(False)
        driver.add_chain([b"y"], [])
        driver.publish()
        chain = queue.pop_descriptor_chain(table)
        assert queue.push_used(table, [(chain.head, 0)])
        memory.close()


def test_queue_state_survives_kernel_paths_switching_mid_stream():
    """A queue that alternates between paths (table churn) keeps exact indices."""
    with GuestRam([(0, 2 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 16)
        memory = backend_memory(ram)
        queue = device_queue(driver, memory)
        got = []
        for i in range(100):
            driver.add_chain([i.to_bytes(2, "little")], [])
            driver.publish()
            queue.metadata_access = "copy" if i % 2 else "auto"
            queue.invalidate("test flips the path")
            chain = queue.pop_descriptor_chain(memory.table)
            got.append(int.from_bytes(chain.read(memory.table), "little"))
            queue.push_used(memory.table, [(chain.head, 0)])
            driver.used()
        assert got == list(range(100))
        assert queue.stats.direct_rounds > 0 and queue.stats.copy_rounds > 0
        assert queue.next_avail == 100 and queue.q[K.Q_NEXT_USED] == 100
        memory.close()


simple_or_not = st.sampled_from(["simple", "short", "split", "indirect", "writable"])


def _pop_with_hosts(kinds: list[str], mode: str, burst: int, pop_hosts: bool):
    """Offer chains of the given kinds; pop one burst with pop_burst_hosts or pop_burst."""
    with GuestRam([(0, 2 * MiB), (4 * MiB, 2 * MiB)]) as ram:
        driver = MockSplitQueue(ram, 64)
        for i, kind in enumerate(kinds):
            frame = bytes([i]) * 60
            if kind == "simple":
                driver.add_chain([frame], [])
            elif kind == "short":
                driver.add_chain([frame[:20]], [])
            elif kind == "split":
                driver.add_chain([frame[:12], frame[12:]], [])
            elif kind == "indirect":
                driver.add_indirect_chain([frame], [])
            else:
                driver.add_chain([], [64])
        driver.publish()
        memory = backend_memory(ram)
        queue = device_queue(driver, memory, metadata_access=mode)
        table = memory.table
        views = queue.round_views(table)
        q = queue
        q.hosts[:] = -1
        if pop_hosts:
            n = K.pop_burst_hosts(table.kernel(), q.q, views, burst, 40, 12, q.heads, q.chain_end,
                                  q.seg_addr, q.seg_len, q.seg_flags, q.hosts)
        else:
            n = K.pop_burst(table.kernel(), q.q, views, burst, q.heads, q.chain_end, q.seg_addr,
                            q.seg_len, q.seg_flags)
        segs = int(q.chain_end[n - 1]) if n > 0 else 0
        popped = (n, q.heads[:n].tolist(), q.chain_end[:n].tolist(), q.seg_addr[:segs].tolist(),
                  q.seg_len[:segs].tolist(), q.seg_flags[:segs].tolist(), q.next_avail)
        hosts = q.hosts[:max(n, 0)].tolist() if pop_hosts else []
        data = [ctypes.string_at(h, int(q.seg_len[k])) if h else None
                for k, h in enumerate(hosts)]
        expected = [access.read_gpa(table, int(q.seg_addr[k]), int(q.seg_len[k])) if h else None
                    for k, h in enumerate(hosts)]
        del views
        queue.drop_views()
        memory.close()
        return popped, hosts, data, expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(simple_or_not, min_size=1, max_size=20), st.integers(1, 32))
def test_fast_path_pops_what_the_general_path_pops(kinds, burst):
    """pop_burst_hosts takes single readable buffers of 40+ bytes on the direct map without
    pop_chain and gives their host addresses; the chains and segments are pop_burst's, on
    both paths, and the host address points at the buffer's bytes."""
    reference = _pop_with_hosts(kinds, "copy", burst, pop_hosts=False)[0]
    for mode in ("direct", "copy"):
        popped, hosts, data, expected = _pop_with_hosts(kinds, mode, burst, pop_hosts=True)
        assert popped == reference, mode
        n = popped[0]
        simple_prefix = 0
        while simple_prefix < n and kinds[simple_prefix] == "simple":
            simple_prefix += 1
        if mode == "copy":
            assert hosts == [0] * n
        else:
            assert all(hosts[:simple_prefix]) and hosts[simple_prefix:] == [0] * (n - simple_prefix)
            assert data == expected
