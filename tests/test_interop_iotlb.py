"""A Linux guest behind a vIOMMU on the network through pyvhost: the device IOTLB with QEMU.

    q35 + intel-iommu (device-iotlb) ── pcie-root-port ── virtio-net-pci iommu_platform=on,ats=on
        guest eth0 192.0.2.2 ── pyvhost net --tap NAME ── TAP NAME (a namespace, 192.0.2.1)

QEMU acks VIRTIO_F_IOMMU_PLATFORM, so every ring and buffer address pyvhost sees is an IOVA of
the guest's DMA API, translated through the UPDATEs QEMU sends for pyvhost's misses (one 4 KiB
page each) and taken back by INVALIDATEs: one per unmapped buffer in strict mode
(`iommu.strict=1`), domain-wide flushes in lazy mode (the second of which runs to 2**64). The
guest pings the TAP's end and back (no loss), sends a file over UDP (busybox tftp) and fetches
it back; both MD5s must match. On the direct map (rings viewed through joined IOTLB entries)
and on the copy path. Command line and pitfalls: /work/shared/research notes, docs/iotlb.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pyvhost.testing.testbed import GuestVM, find_qemu, guest_image_paths
from test_interop_guest import guest_up, net_on_a_tap, ping_both_ways, rtt_ms, tftp_round_trip

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FILE_MIB = 2


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()


def iommu_net_args(sock: Path) -> list[str]:
    """q35 with an intel-iommu (before every PCI device), and virtio-net behind a PCIe root
    port (ATS needs one), modern only (iommu_platform refuses a transitional device)."""
    return ["-machine", "q35",
            "-device", "intel-iommu,intremap=on,device-iotlb=on",
            "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
            "-chardev", f"socket,id=vhu0,path={sock}",
            "-netdev", "vhost-user,id=net0,chardev=vhu0",
            "-device", "virtio-net-pci,bus=rp0,netdev=net0,iommu_platform=on,ats=on,"
                       "disable-legacy=on,vectors=0,romfile="]


@pytest.mark.parametrize("metadata_access", ["direct", "copy"])
@pytest.mark.parametrize("mode", ["strict", "lazy"])
def test_guest_behind_viommu_pings_and_transfers(tmp_path: Path, mode, metadata_access):
    cmdline = "intel_iommu=on no_timer_check" + (" iommu.strict=1" if mode == "strict" else "")
    with net_on_a_tap(tmp_path, "pvi", "--metadata-access", metadata_access) as bed:
        with GuestVM(iommu_net_args(bed.sock), kernel_cmdline=cmdline, boot_timeout=300) as vm:
            group = vm.run("cat /sys/bus/pci/devices/*/iommu_group/type | sort -u").output
            assert ("DMA-FQ" if mode == "lazy" else "DMA") in group.split(), group
            guest_up(vm)
            t0 = time.monotonic()
            guest_ping, host_ping = ping_both_ways(vm, bed.ns, timeout=90)
            got, fetched = tftp_round_trip(vm, bed.ns, FILE_MIB, timeout=300)
            elapsed = time.monotonic() - t0
            qemu_err = vm.qemu_stderr
    log = bed.daemon.log
    assert bed.daemon.returncode == 0, log[-4000:]
    assert "not supported" not in qemu_err, qemu_err[-2000:]
    stats = json.loads(bed.stats_path.read_text())
    assert stats["queues_broken"] == 0, stats
    assert stats["requests_refused"] == 0, log[-4000:]
    assert stats["iotlb_misses"] > 0 and stats["iotlb_updates"] > 0, stats
    assert stats["iotlb_invalidations"] > 0 and stats["iotlb_hits"] > 0, stats
    if metadata_access == "copy":
        assert stats["direct_rounds"] == 0 and stats["copy_rounds"] > 0
    else:
        assert stats["direct_rounds"] > 0
    assert "Traceback" not in log, log[-4000:]
    g_min, g_avg, g_max = rtt_ms(guest_ping)
    h_min, h_avg, h_max = rtt_ms(host_ping)
    print(f"\n[{mode} {metadata_access}] ping rtt guest->host {g_avg} ms, host->guest {h_avg} "
          f"ms; tftp put {got['bytes'] / got['seconds'] / 1e6:.2f} MB/s ({got['dups']} dups), "
          f"get {fetched['bytes'] / fetched['seconds'] / 1e6:.2f} MB/s ({fetched['resent']} "
          f"resent); IOTLB misses {stats['iotlb_misses']} updates {stats['iotlb_updates']} "
          f"invalidations {stats['iotlb_invalidations']} hits {stats['iotlb_hits']} ring "
          f"invalidations {stats['iotlb_ring_invalidations']}; direct {stats['direct_rounds']} "
          f"copy {stats['copy_rounds']} rounds; test body {elapsed:.0f} s")
