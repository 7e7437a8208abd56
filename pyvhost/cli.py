"""Command line: `pyvhost net --socket-path PATH ...` runs a vhost-user net backend.

A statistics line goes to stderr every --stats-interval seconds; on SIGINT/SIGTERM the daemon
stops serving, tears the connection down, and writes the final statistics to --stats-json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from pyvhost import __version__

log = logging.getLogger("pyvhost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyvhost {__version__}")
    sub = parser.add_subparsers(dest="device", metavar="DEVICE")
    net = sub.add_parser("net", help="virtio-net backend (TX sink, RX source)")
    net.add_argument("--socket-path", required=True, help="vhost-user Unix socket path")
    net.add_argument("--client", action="store_true",
                     help="connect to a listening frontend (reconnect with back-off) instead "
                          "of listening")
    net.add_argument("--sink", default="drop", metavar="drop|tap:NAME|pcap:FILE",
                     help="where transmitted frames go: counted and dropped (default), written "
                          "to a TAP (created if absent), or recorded in a pcap file")
    net.add_argument("--source", default=None, metavar="tap:NAME|loopback|gen:SIZE",
                     help="where received frames come from: a TAP, what the guest "
                          "transmits, or a generator of SIZE-byte UDP frames that fills every "
                          "buffer the guest posts (default: nothing is received)")
    net.add_argument("--tap", metavar="NAME",
                     help="short for --sink tap:NAME --source tap:NAME")
    net.add_argument("--mac", default=None,
                     help="MAC address in the device config (default 52:54:00:12:34:56)")
    net.add_argument("--mtu", type=int, default=None,
                     help="offer VIRTIO_NET_F_MTU with this MTU (also a created TAP's MTU)")
    net.add_argument("--rx-backlog", type=int, default=1024, metavar="FRAMES",
                     help="frames that may wait per RX queue for guest buffers; more are "
                          "dropped and counted (default 1024)")
    net.add_argument("--metadata-access", choices=("auto", "direct", "copy"), default="auto",
                     help="ring metadata through direct views of guest memory, the checked "
                          "copy path, or direct when possible (default)")
    net.add_argument("--poll", action="store_true",
                     help="busy-poll the rings (no kicks, no sleeping)")
    net.add_argument("--queue-pairs", "--queues", type=int, default=1,
                     help="RX/TX queue pairs (MQ when more than one; control queue at 2N)")
    net.add_argument("--workers", type=int, default=1, help="worker threads")
    net.add_argument("--stats-json", metavar="FILE",
                     help="write final statistics (JSON) here on exit")
    net.add_argument("--stats-interval", type=float, default=1.0, metavar="S",
                     help="seconds between statistics lines on stderr (0: none)")
    net.add_argument("--max-connections", type=int, default=None,
                     help="exit after serving this many connections")
    net.add_argument("--log-level", default="INFO",
                     choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    from pyvhost.bench.options import add_arguments as add_bench_arguments
    add_bench_arguments(sub.add_parser(
        "bench", help="benchmark pyvhost net against DPDK's vhost PMD (pyvhost.bench.vhost)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        parser.print_help(sys.stderr)
        return 2
    if args.device == "bench":
        from pyvhost.bench.vhost import run as run_bench
        return run_bench(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        net_endpoints(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_net(args)


def net_endpoints(args: argparse.Namespace) -> None:
    """Check and normalise --sink/--source/--tap/--mac (ValueError with a message)."""
    if args.tap is not None:
        if args.sink != "drop" or args.source is not None:
            raise ValueError("--tap NAME replaces --sink and --source; give one or the other")
        args.sink = args.source = f"tap:{args.tap}"
    from pyvhost.devices.net.endpoints import SINK_KINDS, SOURCE_KINDS, parse_endpoint
    parse_endpoint(args.sink, SINK_KINDS)
    if args.source is not None:
        parse_endpoint(args.source, SOURCE_KINDS)
    if args.mac is not None:
        try:
            mac = bytes.fromhex(args.mac.replace(":", "").replace("-", ""))
        except ValueError:
            mac = b""
        if len(mac) != 6:
            raise ValueError(f"--mac {args.mac}: not six bytes like 52:54:00:12:34:56")
        args.mac = mac
    if args.mtu is not None and not 68 <= args.mtu <= 65535:
        raise ValueError(f"--mtu {args.mtu}: outside 68..65535")
    if args.queue_pairs < 1 or args.rx_backlog < 1:
        raise ValueError("--queues and --rx-backlog must be at least 1")


def run_net(args: argparse.Namespace) -> int:
    # Imported here so that `--version` and `--help` stay fast (numba loads with these).
    from pyvhost.daemon.backend import BackendOptions
    from pyvhost.daemon.server import Server
    from pyvhost.devices.net.device import DEFAULT_MAC, NetDevice
    from pyvhost.devices.net.endpoints import SINK_KINDS, SOURCE_KINDS, Endpoints, parse_endpoint

    options = BackendOptions(metadata_access=args.metadata_access, poll=args.poll,
                             workers=args.workers)
    # TAPs and pcap files are opened once, here, and shared by every connection's device.
    endpoints = Endpoints()
    try:
        endpoints.open(parse_endpoint(args.sink, SINK_KINDS),
                       parse_endpoint(args.source, SOURCE_KINDS) if args.source else None,
                       args.queue_pairs, args.mtu)
    except (OSError, ValueError) as exc:
        log.error("cannot open %s / %s: %s", args.sink, args.source, exc)
        endpoints.close()
        return 1

    def device() -> NetDevice:
        return NetDevice(args.queue_pairs, args.sink, mac=args.mac or DEFAULT_MAC,
                         mtu=args.mtu, source=args.source, endpoints=endpoints,
                         rx_backlog=args.rx_backlog)

    server = Server(device, args.socket_path, client=args.client, options=options,
                    max_connections=args.max_connections)
    _warm_up_net()
    if args.sink != "drop" or args.source is not None:
        from pyvhost.devices.net.endpoints import warm_up
        warm_up()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    printer = StatsPrinter(server, args.stats_interval)
    printer.start()
    log.info("pyvhost %s: net backend on %s (%s mode, metadata %s, %s)", __version__,
             args.socket_path, "client" if args.client else "server", args.metadata_access,
             "busy-poll" if args.poll else "interrupt-driven")
    code = 0
    try:
        server.serve_forever()
    except OSError as exc:
        log.error("cannot serve on %s: %s", args.socket_path, exc)
        code = 1
    finally:
        printer.stop()
        endpoints.close()  # the server has torn down every connection by now
        final = server.stats()
        if args.stats_json:
            write_stats_json(args.stats_json, final)
        print(format_totals(final), file=sys.stderr, flush=True)
    return code


def _warm_up_net() -> None:
    """Load the compiled TX burst and ring calls before the first frontend arrives."""
    from pyvhost.devices.net.device import NetDevice
    from pyvhost.ring import kernels as K
    from pyvhost.memory.table import RegionTable
    from pyvhost.ring.direct_map import NO_VIEWS
    from pyvhost.ring.split_queue import SplitQueue
    dev = NetDevice()
    q = SplitQueue(1)
    q.set_size(1)
    table = RegionTable()
    dev.process_burst(q, table, table.kernel(), NO_VIEWS)
    K.enable_notification(table.kernel(), q.q, NO_VIEWS)
    K.disable_notification(table.kernel(), q.q, NO_VIEWS)


def write_stats_json(path: str, stats: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def format_totals(s: dict[str, Any]) -> str:
    return (f"pyvhost totals: tx {s.get('tx_packets', 0)} packets {s.get('tx_bytes', 0)} bytes, "
            f"rx {s.get('rx_packets', 0)} packets {s.get('rx_bytes', 0)} bytes "
            f"({s.get('rx_dropped', 0)} dropped), "
            f"direct rounds {s.get('direct_rounds', 0)}, copy rounds {s.get('copy_rounds', 0)}, "
            f"invalidations {s.get('invalidations', 0)}, connections {s.get('connections', 0)}, "
            f"queues broken {s.get('queues_broken', 0)}")


class StatsPrinter:
    """Prints rates once per interval on stderr (a daemon thread; reads counters only)."""

    def __init__(self, server: Any, interval: float) -> None:
        self.server = server
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        prev, t0 = self.server.stats(), time.monotonic()
        while not self._done.wait(self.interval):
            cur, t1 = self.server.stats(), time.monotonic()
            print(format_rates(prev, cur, t1 - t0), file=sys.stderr, flush=True)
            prev, t0 = cur, t1


def format_rates(prev: dict[str, Any], cur: dict[str, Any], dt: float) -> str:
    def rate(key: str) -> float:
        return (cur.get(key, 0) - prev.get(key, 0)) / dt if dt > 0 else 0.0

    return (f"tx {rate('tx_packets') / 1e6:7.3f} Mpps {rate('tx_bytes') * 8 / 1e9:7.3f} Gbit/s"
            f" | rounds direct {rate('direct_rounds'):9.0f}/s copy {rate('copy_rounds'):9.0f}/s"
            f" | invalidations {cur.get('invalidations', 0)}"
            f" | grace max {cur.get('grace_max_s', 0.0) * 1e6:.0f} us"
            f" | connections {cur.get('connections', 0)} broken {cur.get('queues_broken', 0)}"
            f" | rx {rate('rx_packets') / 1e6:7.3f} Mpps dropped {cur.get('rx_dropped', 0)}")
