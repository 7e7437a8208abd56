"""The driver-side test double reads the ring indices the device moves concurrently with one
load (found by the churn run, fuzz/churn.py: the frontend once read used->idx 256 ahead)."""

from __future__ import annotations

import struct

from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.guest_ram import GuestRam


def test_ring_indices_are_not_read_through_memcpy(monkeypatch):
    """GuestRam.read copies through memcpy, and glibc copies 2 bytes as a byte load then a
    word load: a device store in between is seen torn (old low byte, new high byte), e.g.
    used->idx 0xC0F8 -> 0xC1B7 read as 0xC1F8, 256 ahead, which MockSplitQueue.used() then
    reported as a device that returned more buffers than it was given."""
    with GuestRam([(0, 1 << 20)]) as ram:
        d = MockSplitQueue(ram, 8, event_idx=True)
        size = d.size
        indices = {d.used_ring: "used flags", d.used_ring + 2: "used idx",
                   d.used_ring + 4 + 8 * size: "avail_event", d.avail_ring + 2: "avail idx"}
        reads = []
        real = GuestRam.read

        def spy(self, gpa, n):
            reads.append(gpa)
            return real(self, gpa, n)

        monkeypatch.setattr(GuestRam, "read", spy)
        d.add_chain([b"x" * 16], [])
        d.publish()
        d.needs_kick()
        d.used()
        d.used_flags()
        assert [indices[g] for g in reads if g in indices] == []


def test_read_u16_reads_what_was_written():
    with GuestRam([(0, 1 << 20), (1 << 20, 1 << 20)]) as ram:
        for gpa, value in ((0, 0xC1B7), (2, 1), ((1 << 20) - 2, 0xFFFF), (1 << 20, 0x8000)):
            ram.write(gpa, struct.pack("<H", value))
            assert ram.read_u16(gpa) == value
