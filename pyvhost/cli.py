"""Command line: `pyvhost DEVICE --socket-path PATH ...` serves a vhost-user device backend.

Every device subcommand (`net`, `rng`, `run MODULE:CLASS`, ...) follows the vhost-user
"Backend program conventions" (QEMU docs/interop/vhost-user.rst): `--socket-path PATH` or
`--fd FDNUM` (a listening socket the launcher made), `--print-capabilities` (a JSON object
as in vhost-user.json, then exit 0), ends cleanly on SIGTERM. A statistics line goes to
stderr every --stats-interval seconds; on SIGINT/SIGTERM the daemon stops serving, tears the
connection down, and writes the final statistics to --stats-json.

A device subcommand is one `DeviceCommand` in `DEVICE_COMMANDS`: the device class it serves
("module:Class"), a function adding its own options, and a builder making the per-connection
device factory from the parsed arguments. A block device would be

    register(DeviceCommand("blk", "virtio-blk backend", _fixed("pyvhost.devices.blk:BlkDevice"),
                           add_blk_options, build_blk,
                           capability_features=("read-only", "blk-file")))

with `add_blk_options(parser)` adding --blk-file/--read-only and `build_blk(args, cls)`
returning `DeviceSetup(factory=lambda: cls(args.blk_file, read_only=args.read_only))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pyvhost import __version__

if TYPE_CHECKING:
    from pyvhost.device import Device

log = logging.getLogger("pyvhost")


class UsageError(ValueError):
    """A bad command line: reported like argparse's errors, exit status 2."""


class SetupError(Exception):
    """The backend cannot start (a TAP or file that cannot be opened...): exit status 1."""


# -- devices ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceSetup:
    """What a device command builds from its arguments before serving."""

    #: Makes the device of one connection (called once more for the warm-up).
    factory: Callable[[], Device]
    #: Releases what the builder opened (TAPs, files), after the last connection.
    close: Callable[[], None] = lambda: None


def _no_options(parser: argparse.ArgumentParser) -> None:
    pass


def build_plain(args: argparse.Namespace, cls: type[Device]) -> DeviceSetup:
    """A device class constructed without arguments, one instance a connection."""
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise UsageError(f"{cls.__module__}:{cls.__qualname__}{inspect.signature(cls)} needs "
                         "constructor arguments; it must be constructible without any") from None
    except ValueError:  # no signature to inspect: construction will tell
        pass
    return DeviceSetup(factory=cls)


@dataclasses.dataclass(frozen=True)
class DeviceCommand:
    """One device subcommand of `pyvhost`."""

    name: str
    help: str
    #: The device class served, "module:Class", from the parsed arguments (`run` takes it
    #: from its MODULE:CLASS argument).
    target: Callable[[argparse.Namespace], str]
    #: Adds the subcommand's own options (the common ones are added for every device).
    add_options: Callable[[argparse.ArgumentParser], None] = _no_options
    #: Checks the options (UsageError) and makes the device factory (SetupError, OSError).
    build: Callable[[argparse.Namespace, type[Device]], DeviceSetup] = build_plain
    #: Features for --print-capabilities: the vhost-user.json features of the device type
    #: (command-line options of the conventions) this subcommand implements.
    capability_features: tuple[str, ...] = ()


DEVICE_COMMANDS: dict[str, DeviceCommand] = {}


def register(command: DeviceCommand) -> DeviceCommand:
    if command.name in DEVICE_COMMANDS or command.name == "bench":
        raise ValueError(f"device command {command.name!r} already exists")
    DEVICE_COMMANDS[command.name] = command
    return command


def _fixed(target: str) -> Callable[[argparse.Namespace], str]:
    return lambda args: target


# -- net --


def add_net_options(net: argparse.ArgumentParser) -> None:
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
    net.add_argument("--tap-io", choices=("auto", "uring", "writev"), default="auto",
                     help="how TX frames are written to a TAP sink: a burst's writes in one "
                          "io_uring_enter, or one writev(2) a frame (default auto: io_uring "
                          "where the host allows it)")
    net.add_argument("--queue-pairs", "--queues", type=int, default=1,
                     help="RX/TX queue pairs (MQ when more than one; control queue at 2N)")


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


def build_net(args: argparse.Namespace, cls: type[Device]) -> DeviceSetup:
    try:
        net_endpoints(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from pyvhost.devices.net.device import DEFAULT_MAC, NetDevice
    from pyvhost.devices.net.endpoints import SINK_KINDS, SOURCE_KINDS, Endpoints, parse_endpoint

    if not issubclass(cls, NetDevice):
        raise UsageError(f"{cls.__qualname__} is not a NetDevice")
    net_cls = cls

    # TAPs and pcap files are opened once, here, and shared by every connection's device.
    endpoints = Endpoints()
    try:
        endpoints.open(parse_endpoint(args.sink, SINK_KINDS),
                       parse_endpoint(args.source, SOURCE_KINDS) if args.source else None,
                       args.queue_pairs, args.mtu)
    except (OSError, ValueError) as exc:
        endpoints.close()
        raise SetupError(f"cannot open {args.sink} / {args.source}: {exc}") from None
    if args.sink.startswith("tap:"):
        from pyvhost.devices.net.endpoints import resolve_tap_io
        try:
            resolve_tap_io(args.tap_io)
        except ValueError as exc:
            endpoints.close()
            raise SetupError(f"--tap-io {args.tap_io}: {exc}") from None

    def device() -> Device:
        return net_cls(args.queue_pairs, args.sink, mac=args.mac or DEFAULT_MAC,
                       mtu=args.mtu, source=args.source, endpoints=endpoints,
                       rx_backlog=args.rx_backlog, tap_io=args.tap_io)

    return DeviceSetup(factory=device, close=endpoints.close)


register(DeviceCommand(
    "net", "virtio-net backend (TX sink, RX source)", _fixed("pyvhost.devices.net:NetDevice"),
    add_net_options, build_net))

# -- rng --

register(DeviceCommand(
    "rng", "virtio-rng backend (entropy from the host's getrandom)",
    _fixed("pyvhost.devices.rng:RngDevice")))

# -- blk --


def add_blk_options(blk: argparse.ArgumentParser) -> None:
    backing = blk.add_mutually_exclusive_group()  # one is needed (checked in build)
    backing.add_argument("--file", "--blk-file", dest="file", metavar="IMAGE",
                         help="raw image file or block device (capacity: its size / 512)")
    backing.add_argument("--null", metavar="SIZE",
                         help="no storage: a disk of SIZE bytes (K/M/G suffixes) whose reads "
                              "and writes complete without I/O (benchmarks; as null-co)")
    blk.add_argument("--readonly", "--read-only", dest="readonly", action="store_true",
                     help="offer VIRTIO_BLK_F_RO; writes, discards and zeroing fail (IOERR)")
    blk.add_argument("--queues", type=int, default=4,
                     help="request queues offered (default 4; QEMU may use fewer)")
    blk.add_argument("--queue-size", type=int, default=1024,
                     help="largest ring accepted (power of two, default 1024)")
    blk.add_argument("--serial", default="", metavar="ID",
                     help="GET_ID answer: up to 20 ASCII characters (default empty)")
    blk.add_argument("--direct", action="store_true",
                     help="open the image O_DIRECT (unaligned guest buffers are bounced)")
    blk.add_argument("--io", choices=("auto", "uring", "threads"), default="auto",
                     help="data path: compiled with io_uring, or handle() with I/O threads "
                          "(default auto: io_uring where the host allows it)")
    blk.add_argument("--io-threads", type=int, default=4, metavar="N",
                     help="threads doing the image's I/O on the threads path (default 4)")


def build_blk(args: argparse.Namespace, cls: type[Device]) -> DeviceSetup:
    from pyvhost.devices.blk.command import build
    return build(args, cls)


register(DeviceCommand(
    "blk", "virtio-blk backend (a raw image file or block device)",
    _fixed("pyvhost.devices.blk:BlkDevice"), add_blk_options, build_blk,
    capability_features=("read-only", "blk-file")))

# -- run MODULE:CLASS --


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("target", metavar="MODULE:CLASS",
                     help="the pyvhost.Device subclass to serve, constructed without arguments "
                          "for each connection; MODULE is imported from PYTHONPATH or the "
                          "current directory")


register(DeviceCommand(
    "run", "serve your own device: a pyvhost.Device subclass named MODULE:CLASS",
    lambda args: args.target, add_run_options))


def load_device_class(target: str) -> type[Device]:
    """Import "module:Class" (Class may be dotted) and check it is a `pyvhost.Device`
    subclass. The current directory is searched after PYTHONPATH's entries. UsageError for
    a malformed target, a missing module or attribute, or something not a Device subclass;
    an exception raised while importing the module goes up as it is (its own bug)."""
    module_name, colon, qualname = target.partition(":")
    if not colon or not module_name or not qualname:
        raise UsageError(f"{target!r}: expected MODULE:CLASS, e.g. mydevices:Pattern")
    _put_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"{target}: no module named {exc.name!r} (searched PYTHONPATH "
                             f"and the current directory {os.getcwd()})") from None
        raise  # the module itself imports something missing
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module_name
            raise UsageError(f"{target}: module {module_name!r} ({where}) has no "
                             f"{qualname!r}") from None
    from pyvhost.device import Device
    if not (isinstance(obj, type) and issubclass(obj, Device)):
        raise UsageError(f"{target}: {obj!r} is not a subclass of pyvhost.Device")
    if obj is Device:
        raise UsageError(f"{target}: pyvhost.Device is the base class; serve a subclass")
    return obj


def _put_cwd_on_path() -> None:
    """`python -m pyvhost` has the current directory on sys.path already, the `pyvhost`
    script does not: add it (first, as `python -m` does)."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)


# -- capabilities (vhost-user.json) ---------------------------------------------------------

#: VHostUserBackendType by virtio device ID (virtio 1.x 5).
BACKEND_TYPES = {1: "net", 2: "block", 3: "console", 4: "rng", 5: "balloon", 7: "rpmsg",
                 8: "scsi", 9: "9p", 11: "rproc-serial", 12: "caif", 16: "gpu", 18: "input",
                 19: "vsock", 20: "crypto", 26: "fs"}
#: The types whose capabilities carry "features", and the features each may list (each a
#: command-line option of the backend program conventions).
TYPE_FEATURES = {"block": ("read-only", "blk-file"), "gpu": ("render-node", "virgl"),
                 "input": ("evdev-path", "no-grab")}


def backend_type(cls: type[Device]) -> str:
    """The vhost-user.json backend type of a device class: from its virtio `device_id`, else
    its `name` when that is a type of the schema ("blk" too, for block)."""
    by_id = BACKEND_TYPES.get(getattr(cls, "device_id", 0))
    if by_id is not None:
        return by_id
    name = {"blk": "block"}.get(cls.name, cls.name)
    if name in BACKEND_TYPES.values():
        return name
    raise UsageError(f"{cls.__module__}:{cls.__qualname__} has no vhost-user backend type: "
                     f"device_id {getattr(cls, 'device_id', None)!r} and name {cls.name!r} "
                     f"are not one of vhost-user.json's ({', '.join(BACKEND_TYPES.values())})")


def capabilities(cls: type[Device], features: Sequence[str] = ()) -> dict[str, Any]:
    """The `--print-capabilities` object (VHostUserBackendCapabilities in vhost-user.json)."""
    kind = backend_type(cls)
    caps: dict[str, Any] = {"type": kind}
    allowed = TYPE_FEATURES.get(kind)
    if allowed is not None:
        unknown = [f for f in features if f not in allowed]
        if unknown:
            raise ValueError(f"{kind} backends have no features {unknown}: only {allowed}")
        caps["features"] = list(features)
    elif features:
        raise ValueError(f"vhost-user.json defines no features for {kind} backends")
    return caps


# -- the command line ---------------------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options every device subcommand has (vhost-user backend program conventions
    first)."""
    parser.add_argument("--socket-path", metavar="PATH",
                        help="vhost-user Unix socket path (listened on, or connected to with "
                             "--client); incompatible with --fd")
    parser.add_argument("--fd", type=_fd_number, metavar="FD",
                        help="serve the listening Unix socket inherited as file descriptor FD "
                             "(created and bound by the launcher); incompatible with "
                             "--socket-path")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the backend capabilities (JSON, vhost-user.json) on stdout "
                             "and exit; other options are ignored")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile (or load from numba's cache) the device's kernels, then "
                             "exit without serving: for an image build or a test run that "
                             "should not compile in its first connection")
    parser.add_argument("--client", action="store_true",
                        help="connect to a listening frontend at --socket-path (reconnect with "
                             "back-off) instead of listening")
    parser.add_argument("--metadata-access", choices=("auto", "direct", "copy"), default="auto",
                        help="ring metadata through direct views of guest memory, the checked "
                             "copy path, or direct when possible (default)")
    parser.add_argument("--poll", action="store_true",
                        help="busy-poll the rings (no kicks, no sleeping)")
    parser.add_argument("--workers", type=int, default=1, help="worker threads")
    parser.add_argument("--stats-json", metavar="FILE",
                        help="write final statistics (JSON) here on exit")
    parser.add_argument("--stats-interval", type=float, default=1.0, metavar="S",
                        help="seconds between statistics lines on stderr (0: none)")
    parser.add_argument("--stats-format", choices=("text", "json"), default="text",
                        help="statistics lines for people (default) or one JSON object a line "
                             "(rates and counters, for programs)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="exit after serving this many connections")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--bench-log-all", action="store_true",
                        help="benchmarking only: dirty-log every page written as during a live "
                             "migration (LOG_ALL), into a private log a thread clears every "
                             "10 ms, whatever the frontend negotiates (DPDK virtio-user cannot "
                             "turn LOG_ALL on); statistics show log_simulated 1")


def _fd_number(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        fd = -1
    if fd < 0:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}")
    return fd


def _device_parser(sub: Any, command: DeviceCommand) -> argparse.ArgumentParser:
    parser = sub.add_parser(command.name, help=command.help, description=command.help)
    command.add_options(parser)
    add_common_options(parser)
    parser.set_defaults(command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyvhost {__version__}")
    sub = parser.add_subparsers(dest="device", metavar="DEVICE")
    for command in DEVICE_COMMANDS.values():
        _device_parser(sub, command)
    from pyvhost.bench.options import add_arguments as add_bench_arguments
    from pyvhost.bench.options import add_blk_arguments
    bench = add_bench_arguments(sub.add_parser(
        "bench", help="benchmark pyvhost net against DPDK's vhost PMD (pyvhost.bench.vhost); "
                      "`bench blk`: pyvhost blk against qemu-storage-daemon"))
    kinds = bench.add_subparsers(dest="bench_kind", metavar="{blk}")
    add_blk_arguments(kinds.add_parser(
        "blk", help="benchmark pyvhost blk against qemu-storage-daemon (pyvhost.bench.blk)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in DEVICE_COMMANDS and "--print-capabilities" in argv[1:]:
        return print_capabilities(DEVICE_COMMANDS[argv[0]], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        parser.print_help(sys.stderr)
        return 2
    if args.device == "bench":
        if getattr(args, "bench_kind", None) == "blk":
            from pyvhost.bench.blk import run as run_blk_bench
            return run_blk_bench(args)
        from pyvhost.bench.vhost import run as run_bench
        return run_bench(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # At DEBUG numba would log every compiler pass (165 MB a minute while a cold cache compiles).
    logging.getLogger("numba").setLevel(max(logging.INFO, logging.getLogger().level))
    command = DEVICE_COMMANDS[args.device]
    if args.print_capabilities:  # spelt short (argparse allows prefixes)
        return print_capabilities(command, argv[1:])
    try:
        check_common_options(args)
    except UsageError as exc:
        args.command_parser.error(str(exc))
    cls = _device_class(command, args, args.command_parser)
    if cls is None:
        return 1
    return serve(command, cls, args)


def _device_class(command: DeviceCommand, args: argparse.Namespace,
                  parser: argparse.ArgumentParser) -> type[Device] | None:
    """The command's device class; exits 2 on a usage error, None (logged) if its module
    raised while it was imported."""
    try:
        return load_device_class(command.target(args))
    except UsageError as exc:
        parser.error(str(exc))
    except Exception:  # the device's own module is broken: its traceback says where
        logging.getLogger("pyvhost").exception("cannot import %s", command.target(args))
        return None


def check_common_options(args: argparse.Namespace) -> None:
    if args.compile_only:
        return  # no socket: it serves nothing
    if (args.socket_path is None) == (args.fd is None):
        raise UsageError("give one of --socket-path PATH and --fd FD" if args.fd is None else
                         "--socket-path and --fd are incompatible: give one of them")
    if args.client and args.fd is not None:
        raise UsageError("--client connects to --socket-path; --fd is a listening socket")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.max_connections is not None and args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    if args.stats_interval < 0:
        raise UsageError("--stats-interval must not be negative")


def print_capabilities(command: DeviceCommand, argv: Sequence[str]) -> int:
    """`--print-capabilities`: the JSON object on stdout, exit 0; other options are ignored
    (as the conventions ask), so they are parsed leniently, only for what names the device
    (`run`'s MODULE:CLASS)."""
    parser = argparse.ArgumentParser(prog=f"pyvhost {command.name}")
    command.add_options(parser)
    add_common_options(parser)
    for action in parser._actions:  # accept any value: these options are not used
        action.type = None
        action.choices = None
        action.required = action.required and not action.option_strings
    args, _ = parser.parse_known_args(argv)
    cls = _device_class(command, args, parser)
    if cls is None:
        return 1
    try:
        caps = capabilities(cls, command.capability_features)
    except UsageError as exc:
        parser.error(str(exc))
    print(json.dumps(caps), flush=True)
    return 0


def serve(command: DeviceCommand, cls: type[Device], args: argparse.Namespace) -> int:
    """Serve `cls` devices until SIGINT/SIGTERM (or --max-connections); the exit status."""
    # Imported here so that `--version` and `--help` stay fast (numba loads with these).
    from pyvhost.daemon.backend import BackendOptions
    from pyvhost.daemon.server import Server
    from pyvhost.daemon.unix_socket import Listener, NotAListeningSocket

    listener = None
    if args.fd is not None:
        try:
            listener = Listener.from_fd(args.fd)
        except NotAListeningSocket as exc:
            log.error("cannot serve on --fd %d: %s", args.fd, exc)
            return 1
    try:
        setup = command.build(args, cls)
    except UsageError as exc:
        if listener is not None:
            listener.close()
        args.command_parser.error(str(exc))
    except (SetupError, OSError) as exc:
        if listener is not None:
            listener.close()
        log.error("%s", exc)
        return 1
    if args.compile_only:
        from pyvhost.daemon.server import warm_up_device

        try:
            seconds = warm_up_device(setup.factory)
        finally:
            setup.close()
        log.info("%s: kernels compiled or loaded in %.1f s", command.name, seconds)
        return 0
    options = BackendOptions(metadata_access=args.metadata_access, poll=args.poll,
                             workers=args.workers, bench_log_all=args.bench_log_all)
    if args.bench_log_all:
        log.warning("--bench-log-all: dirty logging is simulated (LOG_ALL on for every "
                    "connection, a private log); for measuring, never for migrating")
    server = Server(setup.factory, None if listener else args.socket_path, listener=listener,
                    client=args.client, options=options, max_connections=args.max_connections)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    printer = StatsPrinter(server, args.stats_interval, args.stats_format)
    printer.start()
    log.info("pyvhost %s: %s backend (%s) on %s (%s mode, metadata %s, %s)", __version__,
             command.name, f"{cls.__module__}:{cls.__qualname__}", server.where,
             "client" if args.client else "server", args.metadata_access,
             "busy-poll" if args.poll else "interrupt-driven")
    code = 0
    try:
        server.serve_forever()
    except OSError as exc:
        log.error("cannot serve on %s: %s", server.where, exc)
        code = 1
    except Exception:  # the device's warm-up or constructor failed
        log.exception("cannot serve %s", cls.__qualname__)
        code = 1
    finally:
        printer.stop()
        setup.close()  # the server has torn down every connection by now
        final = server.stats()
        if args.stats_json:
            write_stats_json(args.stats_json, final)
        print(format_totals(final), file=sys.stderr, flush=True)
    return code


# -- statistics ---------------------------------------------------------------------------------

#: The daemon's counters the live line shows in its own fields (not as rates of change).
_DAEMON_FIELDS = frozenset({"direct_rounds", "copy_rounds", "invalidations", "grace_periods",
                            "grace_total_s", "grace_max_s", "grace_timeouts", "queues_broken",
                            "connections"})


def write_stats_json(path: str, stats: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _si(value: float) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}"
    return f"{value:.0f}"


def format_totals(s: dict[str, Any]) -> str:
    """Every counter, the device's and the daemon's, `key=value`, in the order they come."""
    counters = ", ".join(f"{k}={_number(v)}" for k, v in s.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"pyvhost totals: {counters}"


def rates(prev: dict[str, Any], cur: dict[str, Any], dt: float) -> dict[str, float]:
    """Per-second change of every integer counter over `dt` seconds."""
    return {k: (v - prev.get(k, 0)) / dt if dt > 0 else 0.0
            for k, v in cur.items() if _is_count(v)}


def format_rates(prev: dict[str, Any], cur: dict[str, Any], dt: float) -> str:
    """The live line: a rate for each of the device's counters that moved, then the daemon's
    rounds (direct map / copy path), invalidations, longest grace period, connections and
    broken queues."""
    r = rates(prev, cur, dt)
    moved = " ".join(f"{k} {_si(v)}/s" for k, v in r.items()
                     if k not in _DAEMON_FIELDS and cur[k] != prev.get(k, 0))
    return (f"{moved or 'idle'}"
            f" | rounds direct {r.get('direct_rounds', 0.0):.0f}/s"
            f" copy {r.get('copy_rounds', 0.0):.0f}/s"
            f" | invalidations {cur.get('invalidations', 0)}"
            f" | grace max {cur.get('grace_max_s', 0.0) * 1e6:.0f} us"
            f" | connections {cur.get('connections', 0)} broken {cur.get('queues_broken', 0)}")


def format_rates_json(prev: dict[str, Any], cur: dict[str, Any], dt: float,
                      t: float) -> str:
    """The live line for programs: {"t": seconds since start, "dt": the interval's length,
    "rates": per-second change of each integer counter, "stats": the counters}."""
    return json.dumps({"t": round(t, 6), "dt": round(dt, 6), "rates": rates(prev, cur, dt),
                       "stats": cur}, sort_keys=True)


class StatsPrinter:
    """Prints rates once per interval on stderr (a daemon thread; reads counters only)."""

    def __init__(self, server: Any, interval: float, fmt: str = "text") -> None:
        self.server = server
        self.interval = interval
        self.fmt = fmt
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
        prev, start = self.server.stats(), time.monotonic()
        t0 = start
        while not self._done.wait(self.interval):
            cur, t1 = self.server.stats(), time.monotonic()
            line = (format_rates_json(prev, cur, t1 - t0, t1 - start) if self.fmt == "json"
                    else format_rates(prev, cur, t1 - t0))
            print(line, file=sys.stderr, flush=True)
            prev, t0 = cur, t1
