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

from pyvhost.testing.testbed import (GuestVM, NetNamespace, find_qemu, guest_image_paths,
                                     unique_name)
from test_interop_guest import (GUEST_IP, HOST_IP, TFTP_PORT, TFTP_SERVER, no_loss, rtt_ms,
                                server_in, tap_daemon)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FILE_MIB = 2
TFTP_BLOCK = 8192


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
    sock, stats_path = tmp_path / "net.sock", tmp_path / "stats.json"
    tap = "pvi" + unique_name("g")[-8:].replace("-", "")
    cmdline = "intel_iommu=on no_timer_check" + (" iommu.strict=1" if mode == "strict" else "")
    with NetNamespace() as ns, tap_daemon(ns, sock, tap, stats_path,
                                          "--metadata-access", metadata_access) as daemon:
        daemon.wait_listening(timeout=300)
        ns.add_address(tap, f"{HOST_IP}/24")
        with GuestVM(iommu_net_args(sock), kernel_cmdline=cmdline, boot_timeout=300) as vm:
            group = vm.run("cat /sys/bus/pci/devices/*/iommu_group/type | sort -u").output
            assert ("DMA-FQ" if mode == "lazy" else "DMA") in group.split(), group
            vm.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up", check=True)
            t0 = time.monotonic()
            guest_ping = vm.run(f"ping -c 10 -i 0.2 -W 5 {HOST_IP}", timeout=90).output
            host_ping = ns.run(["ping", "-c", "10", "-i", "0.2", "-W", "5", GUEST_IP],
                               timeout=90, check=False).stdout
            assert no_loss(guest_ping, 10), guest_ping
            assert no_loss(host_ping, 10), host_ping

            with server_in(ns, TFTP_SERVER, HOST_IP, str(TFTP_PORT)) as server:
                made = vm.run(f"dd if=/dev/urandom of=/tmp/f bs=1M count={FILE_MIB} 2>/dev/null"
                              " && md5sum /tmp/f", timeout=120, check=True).output
                guest_md5 = made.split()[0]
                sent = vm.run(f"tftp -p -l /tmp/f -r f -b {TFTP_BLOCK} {HOST_IP} {TFTP_PORT}",
                              timeout=300)
                assert sent.status == 0, sent.output
                got = json.loads(server.stdout.readline())
                back = vm.run(f"tftp -g -l /tmp/g -r f -b {TFTP_BLOCK} {HOST_IP} {TFTP_PORT}"
                              " && md5sum /tmp/g", timeout=300)
                assert back.status == 0, back.output
                out, err = server.communicate(timeout=30)
            fetched = json.loads(out.strip().splitlines()[-1])
            elapsed = time.monotonic() - t0
            qemu_err = vm.qemu_stderr
    log = daemon.log
    assert daemon.returncode == 0, log[-4000:]
    assert "not supported" not in qemu_err, qemu_err[-2000:]
    assert got["bytes"] == FILE_MIB << 20 and got["md5"] == guest_md5, (got, guest_md5)
    assert back.output.split()[0] == guest_md5, back.output
    stats = json.loads(stats_path.read_text())
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
