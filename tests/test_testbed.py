"""The test bed itself: real frontends (DPDK testpmd, QEMU + Linux guest) and namespaces work here.

The interop tests need what scripts/setup.sh installs (dpdk-testpmd, QEMU, the
guest in .cache/guest) and root; they run in CI.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyvhost.testing import testbed
from pyvhost.testing.testbed import (
    DPDK_RUNTIME_DIR,
    GUEST_DIR,
    GuestTimeout,
    GuestVM,
    NetNamespace,
    Testpmd,
    create_veth_pair,
    parse_testpmd_output,
    vhost_pmd_vdev,
    vhost_user_net_args,
    virtio_user_vdev,
)

# One forwarding core each, on different CPUs (the machine has 2): the receiver
# must keep up with the generator or the counts are only a rate test.
RECEIVER_LCORES = testbed.testpmd_lcores(1, [1])
GENERATOR_LCORES = testbed.testpmd_lcores(0, [0])

SAMPLE_STOP_LOG = """\
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 50996832       TX-dropped: 622112        TX-total: 51618944
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 7              RX-dropped: 1             RX-total: 8
  Bad-ipcsum: 2              Bad-l4csum: 3             Bad-outer-l4csum: 0
  TX-packets: 5              TX-dropped: 0             TX-total: 5
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 7              RX-dropped: 1             RX-total: 8
  TX-packets: 51001837       TX-dropped: 622112        TX-total: 51623949
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

  ######################## NIC statistics for port 0  ########################
  RX-packets: 12         RX-missed: 0          RX-bytes:  796
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 33821184   TX-errors: 0          TX-bytes:  2164555776

  Throughput (since last show)
  Rx-pps:            3          Rx-bps:            0
  Tx-pps:     16908957          Tx-bps:   8657385936
  ############################################################################
"""


# --------------------------------------------------------------------------- parsing, arguments


def test_parse_forward_and_nic_statistics():
    result = parse_testpmd_output(SAMPLE_STOP_LOG)
    assert result.ports[0].tx_packets == 50996832
    assert result.ports[0].tx_dropped == 622112
    assert result.ports[1].rx_packets == 7
    assert result.ports[1].extra == {"bad_ipcsum": 2, "bad_l4csum": 3, "bad_outer_l4csum": 0}
    assert result.total.tx_total == 51623949
    nic = result.last_nic[0]
    assert (nic.rx_packets, nic.rx_bytes, nic.tx_bytes, nic.tx_pps) == (12, 796, 2164555776, 16908957)


def test_eal_args_hugepages_or_fallback():
    huge = testbed.testpmd_eal_args("p1", hugepages=True, vdevs=["net_null0"])
    assert "--in-memory" in huge and "--no-huge" not in huge
    assert huge[-2:] == ["--vdev", "net_null0"]
    small = testbed.testpmd_eal_args("p2", hugepages=False, lcores="0@1,1@1")
    assert "--no-huge" in small and "--in-memory" not in small
    assert "--file-prefix=p2" in small and "0@1,1@1" in small


def test_instances_get_distinct_file_prefixes():
    a = Testpmd([vhost_pmd_vdev("/nonexistent/a.sock")], name="x")
    b = Testpmd([vhost_pmd_vdev("/nonexistent/b.sock")], name="x")
    assert a.file_prefix != b.file_prefix


# --------------------------------------------------------------------------- DPDK testpmd


@pytest.mark.interop
@pytest.mark.parametrize("memory", ["default", "no_huge"])
def test_virtio_user_txonly_to_dpdk_vhost_rxonly_counts_match(tmp_path, memory):
    """Every packet virtio-user sent is received by DPDK's vhost PMD (64 B, ~3 s)."""
    sock = tmp_path / "vhost.sock"
    hugepages = False if memory == "no_huge" else None
    with Testpmd([vhost_pmd_vdev(sock)], forward_mode="rxonly", lcores=RECEIVER_LCORES,
                 hugepages=hugepages, name="vhost") as receiver:
        assert sock.exists()
        with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly", app_args=["--txpkts=64"],
                     lcores=GENERATOR_LCORES, hugepages=hugepages, interactive=True,
                     name="vuser") as generator:
            started = time.monotonic()
            time.sleep(3)
            # Stop forwarding but keep the port up, so the receiver drains the ring.
            sent = generator.stop_forwarding()[0]
            elapsed = time.monotonic() - started
            drained = receiver.wait_until_idle()
            sent_nic = generator.port_stats()[0]
            generator.stop()
        received = receiver.stop()
    prefixes = (receiver.file_prefix, generator.file_prefix)

    assert sent.tx_packets > 100_000, generator.log[-3000:]
    assert received.ports[0].rx_packets == sent.tx_packets
    assert drained.rx_bytes == sent_nic.tx_bytes == 64 * sent.tx_packets
    print(f"\n{memory}: {sent.tx_packets / elapsed / 1e6:.2f} Mpps 64 B virtio-user -> vhost PMD")
    # Nothing left behind.
    assert not sock.exists()
    assert not any((DPDK_RUNTIME_DIR / p).exists() for p in prefixes)


@pytest.mark.interop
def test_testpmd_start_failure_reports_log(tmp_path):
    """A virtio-user with no backend behind its socket fails with testpmd's own words."""
    with pytest.raises(testbed.TestbedError, match="testpmd") as failure:
        with Testpmd([virtio_user_vdev(tmp_path / "nobody.sock")], forward_mode="txonly",
                     name="orphan", start_timeout=30):
            pass
    assert "log tail" in str(failure.value)


# --------------------------------------------------------------------------- QEMU guest


@pytest.fixture(scope="module")
def guest():
    with GuestVM() as vm:
        yield vm


@pytest.mark.interop
def test_guest_boots_with_virtio_modules(guest):
    kernel_version = (GUEST_DIR / "kernel-version").read_text().strip()
    assert guest.run("uname -r", check=True).output.strip() == kernel_version
    modules = {line.split()[0] for line in guest.run("lsmod", check=True).output.splitlines()[1:]}
    assert {"virtio_ring", "virtio", "virtio_pci", "failover", "net_failover",
            "virtio_net", "virtio_blk"} <= modules
    print(f"\nguest boot (TCG) took {guest.boot_seconds:.1f} s")


@pytest.mark.interop
def test_guest_run_returns_output_and_status(guest):
    assert guest.run("echo out; echo err >&2; exit 3") == ("out\nerr\n", 3)
    assert guest.run("printf 'no newline'") == ("no newline", 0)
    # Quotes, $ and backquotes reach the guest shell unchanged.
    assert guest.run("""printf '%s\\n' "a'b" '$HOME' '`x`' "$((6*7))" """).output == "a'b\n$HOME\n`x`\n42\n"


@pytest.mark.interop
def test_guest_run_long_command_and_timeout(guest):
    long_value = "x" * 5000
    assert guest.run(f"v={long_value}; echo ${{#v}}", check=True).output == "5000\n"
    with pytest.raises(GuestTimeout):
        guest.run("echo started; sleep 30", timeout=2)
    # The console is in step again after the interrupted command.
    assert guest.run("echo again") == ("again\n", 0)


@pytest.mark.interop
def test_guest_vhost_user_net_to_dpdk_vhost_pmd(tmp_path):
    """QEMU as a vhost-user frontend (memfd RAM, vectors=0): guest TX reaches the backend."""
    sock = tmp_path / "vm.sock"
    with Testpmd([vhost_pmd_vdev(sock)], forward_mode="rxonly", lcores=RECEIVER_LCORES,
                 name="vhost") as receiver:
        with GuestVM(vhost_user_net_args(sock)) as vm:
            # 192.0.2.0/24 is a documentation range; nothing answers, the ARP
            # requests end in the vhost PMD.
            vm.run("ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0", check=True)
            vm.run("arping -c 3 -w 5 -I eth0 192.0.2.1", timeout=30)
            vm.run("ip link set eth0 down", check=True)
            counters = vm.run("cat /sys/class/net/eth0/statistics/tx_packets "
                              "/sys/class/net/eth0/statistics/tx_bytes", check=True)
            tx_packets, tx_bytes = map(int, counters.output.split())
            received = receiver.wait_until_idle()
        receiver.stop()
    assert tx_packets >= 3
    assert (received.rx_packets, received.rx_bytes) == (tx_packets, tx_bytes)


# --------------------------------------------------------------------------- namespaces


def test_namespaces_linked_by_veth_can_ping():
    with NetNamespace() as left, NetNamespace() as right:
        suffix = left.name.split("-")[-1]
        create_veth_pair(f"pvl{suffix}", f"pvr{suffix}")
        left.move_interface(f"pvl{suffix}")
        right.move_interface(f"pvr{suffix}")
        left.configure(f"pvl{suffix}", "192.0.2.1/24")
        right.configure(f"pvr{suffix}", "192.0.2.2/24")
        assert f"pvl{suffix}" in left.link_names()
        reply = left.run(["ping", "-c", "1", "-W", "5", "192.0.2.2"])
        assert "1 received" in reply.stdout
        names = (left.name, right.name)
    assert not any((Path("/run/netns") / name).exists() for name in names)
