"""pyvhost bench, TAP rows: a backend whose wire is a TAP in a network namespace.

- TAP TX ("tap-tx"): testpmd virtio-user `txonly` → backend → TAP. The figure is what the TAP
  itself counted (its rx_packets: frames the backend wrote into it), read from the namespace
  at the window's start and every interval, as for the DPDK rows of `vhost.py`.
  pyvhost: `pyvhost net --poll --sink tap:NAME`; C peer: testpmd with `--vdev net_vhost0`
  and `--vdev net_tap0,iface=NAME`, `io` forwarding (vhost port → TAP port).
- TAP RX ("tap-rx"): frames injected at the TAP's namespace end → backend → testpmd
  virtio-user `rxonly`. The injector is a third testpmd in the namespace with an AF_PACKET
  port on the TAP in `txonly` mode (C, PACKET_MMAP), on the generator's CPU alongside the
  sink. The figure is what the backend delivered into virtio-user's RX ring (pyvhost: its RX
  rate; the vhost PMD: its port's tx_packets). pyvhost: `--source tap:NAME`; C peer: the
  same testpmd as for TX (io forwarding also runs TAP port → vhost port).

The backend process (pyvhost or testpmd) runs inside the namespace (`ip netns exec`), so the
TAP it creates is there from the start; nothing reaches the host's own network. The TAP has no
address: frames the backend writes are counted and then dropped by the namespace's stack.
Whether the backend or the injector set the pace in RX shows in the TAP's tx_dropped (frames
the TAP's queue could not hold because the backend did not read them in time).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pyvhost.bench import vhost as V
from pyvhost.testing import testbed as tb


def tap_name() -> str:
    return "pvb" + uuid.uuid4().hex[:8]


def link_stats(ns: str, name: str) -> dict[str, int]:
    """The interface's 64-bit counters (rx_packets, rx_dropped, tx_packets, tx_dropped) as
    the namespace's kernel keeps them."""
    out = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", name],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise tb.TestbedError(f"ip link show {name} in {ns}: {out.stderr.strip()}")
    st = json.loads(out.stdout)[0]["stats64"]
    return {"rx_packets": st["rx"]["packets"], "rx_dropped": st["rx"]["dropped"],
            "tx_packets": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"]}


def _wait_link(ns: str, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            link_stats(ns, name)
            return
        except tb.TestbedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _dpdk_vdevs(sock: Path, tap: str) -> list[str]:
    return [tb.vhost_pmd_vdev(sock), f"net_tap0,iface={tap}"]


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A fresh network namespace (its name), without IPv6 (no router solicitations or MLD
    from its own stack on the TAP), deleted on exit with the links in it.

    `ip netns` rather than testbed.NetNamespace: pyroute2 forks helper processes that inherit
    the bench's SIGTERM handler, and its own SIGTERM to them then ran the bench on in the
    child."""
    name = tb.unique_name("bench-ns")[:60]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=False, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def measure_tap_tx(settings: V.Settings, size: int, contender: str, tmp: Path,
                   sample: V.Sample) -> None:
    mode = V._PYVHOST_MODES.get(contender)
    sock = tmp / f"taptx-{contender}-{size}.sock"
    tap = tap_name()
    phase = V._Phases(sample)
    with namespace() as ns:
        backend_cm: Any
        if mode is not None:
            backend_cm = V.PyvhostProcess(sock, tmp / f"taptx-{mode}-{size}.json", mode,
                                          settings.backend_cpu, settings.interval,
                                          ["--sink", f"tap:{tap}"], netns=ns)
        else:
            backend_cm = V._testpmd(settings, _dpdk_vdevs(sock, tap), "io",
                                    settings.backend_cpu, "bench-vhost-tap", netns=ns)
        with backend_cm as backend:
            _wait_link(ns, tap)
            phase.mark("backend_start")
            with V._testpmd(settings, tb.virtio_user_vdev(sock), "txonly",
                            settings.generator_cpu, "bench-gen", [f"--txpkts={size}"]) as gen:
                since = phase.mark("generator_start")
                w = V._measure_window(settings, since, [backend.pid, gen.pid],
                                      lambda: link_stats(ns, tap)["rx_packets"])
                phase.mark("warmup_and_window")
                sent = gen.stop_forwarding()[0]
                time.sleep(settings.drain)  # ports stay up: the backend drains the ring
                final = link_stats(ns, tap)
                gen.stop()
                phase.mark("generator_stop")
            if mode is not None:
                stats = backend.stop()
                V._check_pyvhost_run(stats, mode, backend, sample)
            else:
                backend.stop()
            phase.mark("backend_stop")
    V._counter_rate(sample, w)
    if mode is not None:
        sample.rounds_per_s = backend.window_rate(w.t0, w.t1, settings.interval)[3]
    sample.generator_sent, sample.refused = sent.tx_packets, sent.tx_dropped
    # Every frame sent went into the TAP (counted there, or dropped by it and counted so).
    sample.backend_total = final["rx_packets"] + final["rx_dropped"]
    sample.counts_match = sample.backend_total == sent.tx_packets


def measure_tap_rx(settings: V.Settings, size: int, contender: str, tmp: Path,
                   sample: V.Sample) -> None:
    mode = V._PYVHOST_MODES.get(contender)
    sock = tmp / f"taprx-{contender}-{size}.sock"
    tap = tap_name()
    phase = V._Phases(sample)
    with namespace() as ns:
        backend_cm: Any
        if mode is not None:
            backend_cm = V.PyvhostProcess(sock, tmp / f"taprx-{mode}-{size}.json", mode,
                                          settings.backend_cpu, settings.interval,
                                          ["--source", f"tap:{tap}"], netns=ns)
        else:
            backend_cm = V._testpmd(settings, _dpdk_vdevs(sock, tap), "io",
                                    settings.backend_cpu, "bench-vhost-tap", netns=ns)
        with backend_cm as backend:
            _wait_link(ns, tap)
            # An AF_PACKET socket sends no frame longer than the MTU + 14 bytes: 1518-byte
            # frames (testpmd's size, DPDK counts no FCS) need an MTU of 1504.
            subprocess.run(["ip", "-n", ns, "link", "set", "dev", tap, "mtu",
                            str(max(1500, size - 14))], check=True, timeout=30)
            phase.mark("backend_start")
            with V._testpmd(settings, tb.virtio_user_vdev(sock), "rxonly",
                            settings.generator_cpu, "bench-sink") as sink:
                with V._testpmd(settings, f"net_af_packet0,iface={tap},qpairs=1", "txonly",
                                settings.generator_cpu, "bench-inject", [f"--txpkts={size}"],
                                netns=ns) as inject:
                    since = phase.mark("generator_start")
                    before = link_stats(ns, tap)
                    read = None if mode is not None else (
                        lambda: backend.port_stats()[0].tx_packets)
                    w = V._measure_window(settings, since, [backend.pid, inject.pid], read)
                    after = link_stats(ns, tap)
                    phase.mark("warmup_and_window")
                    inject.stop_forwarding()
                    time.sleep(settings.drain)
                    delivered = None if mode is not None else backend.port_stats()[0].tx_packets
                    sink.stop_forwarding()
                    received = sink.port_stats()[0].rx_packets
                    inject.stop()
                    sink.stop()
                    phase.mark("generator_stop")
            if mode is not None:
                final = backend.stop()
            else:
                backend.stop()
            phase.mark("backend_stop")
    # What the TAP could not queue for the backend during the window: refused frames.
    offered = after["tx_packets"] - before["tx_packets"]
    sample.refused = after["tx_dropped"] - before["tx_dropped"]
    if mode is not None:
        V._pyvhost_rx_figures(settings, sample, backend, w, final, received, mode)
    else:
        V._counter_rate(sample, w)
        assert delivered is not None
        sample.generator_sent, sample.backend_total = delivered, received
        sample.counts_match = 0 <= delivered - received <= V.RX_RING_SLACK
    sample.phases["tap_offered_in_window"] = float(offered)
