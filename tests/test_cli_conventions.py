"""The device subcommands and the vhost-user "Backend program conventions" (QEMU
docs/interop/vhost-user.rst): --print-capabilities (vhost-user.json), --fd with a listening
socket the launcher made, --socket-path; `pyvhost run MODULE:CLASS` with its errors; the
generic statistics lines; and the server's warm-up before it listens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pyvhost import cli
from pyvhost.device import Device
from pyvhost.protocol import ProtocolFeature as P
from pyvhost.ring.layout import VIRTIO_F_VERSION_1
from pyvhost.testing.driver import MockSplitQueue
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.testbed import wait_for_socket

TIMEOUT = 30.0
# Until the socket listens (or answers, with --fd): the warm-up compiles when another change
# has invalidated numba's cache (minutes on this machine); a second or so when it is warm.
STARTUP = 240.0
SCRIPT = Path(sys.executable).parent / "pyvhost"  # the console script (cwd not on sys.path)

DEVICES = textwrap.dedent('''
    import time

    from pyvhost.device import Device


    class Counter(Device):
        """Completes every request without writing; counts them."""
        name = "counter"
        device_id = 4
        num_queues = 1

        def __init__(self):
            super().__init__()
            self.served = 0

        def handle(self, queue, request):
            self.served += 1
            return 0

        def stats(self):
            return {"counter_requests": self.served,
                    "counter_ms": int(time.monotonic() * 1000)}


    class Gpu(Device):
        device_id = 16


    class Widget(Device):
        name = "widget"


    class NeedsArgs(Device):
        device_id = 4

        def __init__(self, size):
            super().__init__()


    class NotADevice:
        pass
''')


@pytest.fixture(scope="module")
def devdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("devices")
    (d / "mydevs.py").write_text(DEVICES)
    (d / "broken.py").write_text("import pyvhost_no_such_dependency\n")
    return d


def pyvhost(*args: str, cwd: Path | None = None, script: bool = False,
            **kw) -> subprocess.CompletedProcess:
    argv = [str(SCRIPT)] if script else [sys.executable, "-m", "pyvhost"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=cwd, **kw)


def start(*args: str, cwd: Path | None = None, script: bool = False, **kw) -> subprocess.Popen:
    argv = [str(SCRIPT)] if script else [sys.executable, "-m", "pyvhost"]
    return subprocess.Popen([*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, **kw)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"pyvhost did not end on SIGTERM:\n{err[-3000:]}")
    return err


def request_bytes(fe: VhostUserFrontend, ram: GuestRam, sizes: list[int]) -> list[bytes]:
    """Post one device-writable chain per size on queue 0 and return what the device wrote."""
    fe.set_mem_table(ram)
    fe.setup_queue(0, MockSplitQueue(ram, 16))
    fe.enable_queue(0)
    driver = fe.driver(0)
    heads = [driver.add_chain([], [n]) for n in sizes]
    driver.publish()
    fe.kick(0)
    written: dict[int, bytes] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(written) < len(heads):
        assert time.monotonic() < deadline, "the device did not complete the requests"
        fe.wait_call(0, timeout=TIMEOUT)
        for head, _ in driver.used():
            written[head] = driver.written_data(head)
    return [written[h] for h in heads]


# -- --print-capabilities --------------------------------------------------------------------


@pytest.mark.parametrize("device,caps", [("net", {"type": "net"}), ("rng", {"type": "rng"})])
def test_print_capabilities_prints_the_type_and_serves_nothing(tmp_path, device, caps):
    sock = tmp_path / "s.sock"
    out = pyvhost(device, "--print-capabilities", "--socket-path", str(sock))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == caps and out.stdout.count("\n") == 1
    assert out.stderr == "" and not sock.exists()


def test_print_capabilities_ignores_the_other_options(tmp_path):
    # Bad values, a missing --socket-path, an unknown option: ignored, as the conventions say.
    out = pyvhost("net", "--mtu", "x", "--sink", "disk", "--unknown", "--print-capabilities",
                  "--fd", "nope")
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "net"}, out.stderr


@pytest.mark.parametrize("target,caps", [
    ("mydevs:Counter", {"type": "rng"}),             # from device_id 4
    ("mydevs:Gpu", {"type": "gpu", "features": []}),  # the schema gives gpu features
])
def test_print_capabilities_of_a_run_class(devdir, target, caps):
    out = pyvhost("run", target, "--print-capabilities", cwd=devdir)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == caps


def test_print_capabilities_of_a_class_with_no_backend_type_is_an_error(devdir):
    out = pyvhost("run", "mydevs:Widget", "--print-capabilities", cwd=devdir)
    assert out.returncode == 2 and "no vhost-user backend type" in out.stderr, out.stderr
    assert out.stdout == ""


def test_capabilities_follow_vhost_user_json():
    class Blk(Device):
        name = "blk"

    class Input(Device):
        device_id = 18

    assert cli.capabilities(Blk) == {"type": "block", "features": []}
    assert cli.capabilities(Blk, ("read-only", "blk-file")) == {
        "type": "block", "features": ["read-only", "blk-file"]}
    assert cli.capabilities(Input, ("evdev-path",)) == {"type": "input",
                                                         "features": ["evdev-path"]}
    with pytest.raises(ValueError, match="no features"):
        cli.capabilities(Blk, ("virgl",))
    with pytest.raises(ValueError, match="defines no features"):
        cli.capabilities(type("Net", (Device,), {"device_id": 1}), ("read-only",))


def test_every_registered_command_has_capabilities_and_the_common_options():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
               and "net" in a.choices)
    common = {"--socket-path", "--client", "--fd", "--print-capabilities", "--stats-json",
              "--stats-interval", "--log-level", "--poll", "--workers", "--metadata-access",
              "--max-connections"}
    assert {"net", "rng", "run", "bench"} <= set(sub.choices)
    for name, command in cli.DEVICE_COMMANDS.items():
        options = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert common <= options, name
        if name != "run":
            cls = cli.load_device_class(command.target(None))
            assert cli.capabilities(cls, command.capability_features)["type"]


# -- run MODULE:CLASS: errors ------------------------------------------------------------------


@pytest.mark.parametrize("target,message", [
    ("mydevs", "expected MODULE:CLASS"),
    ("mydevs:", "expected MODULE:CLASS"),
    ("pyvhost_no_such_module:Dev", "no module named 'pyvhost_no_such_module'"),
    ("mydevs:Missing", "has no 'Missing'"),
    ("mydevs:NotADevice", "is not a subclass of pyvhost.Device"),
    ("pyvhost.device:Device", "base class"),
    ("mydevs:NeedsArgs", "constructor arguments"),
])
def test_bad_run_targets_exit_2_with_a_message(devdir, tmp_path, target, message):
    out = pyvhost("run", target, "--socket-path", str(tmp_path / "s.sock"), cwd=devdir)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "s.sock").exists()


def test_a_module_that_fails_to_import_exits_1_with_its_traceback(devdir, tmp_path):
    out = pyvhost("run", "broken:Dev", "--socket-path", str(tmp_path / "s.sock"), cwd=devdir)
    assert out.returncode == 1, out.stderr
    assert "pyvhost_no_such_dependency" in out.stderr and "Traceback" in out.stderr


@pytest.mark.parametrize("args,message", [
    ([], "give one of --socket-path PATH and --fd FD"),
    (["--socket-path", "x.sock", "--fd", "3"], "incompatible"),
    (["--client", "--fd", "3"], "--client connects to --socket-path"),
    (["--fd", "three"], "not a file descriptor number"),
    (["--fd", "-1"], "not a file descriptor number"),
    (["--socket-path", "x.sock", "--workers", "0"], "--workers"),
])
def test_common_option_errors_exit_2(args, message):
    out = pyvhost("rng", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


# -- --fd ------------------------------------------------------------------------------------


def test_fd_serves_the_inherited_listening_socket_and_leaves_its_path(tmp_path):
    path = tmp_path / "launcher.sock"
    stats = tmp_path / "stats.json"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    fd = lsock.fileno()
    proc = start("rng", f"--fd={fd}", "--stats-json", str(stats), "--stats-interval", "0",
                 pass_fds=[fd])
    lsock.close()  # the launcher's copy: from now on only the backend holds the socket
    try:
        with GuestRam([(0, 1 << 20)]) as ram, \
                VhostUserFrontend(str(path), connect_timeout=TIMEOUT, timeout=STARTUP) as fe:
            # Connected at once (the socket listens already): the first reply waits for the
            # backend's warm-up.
            got = fe.negotiate(1 << VIRTIO_F_VERSION_1, P.REPLY_ACK.mask)
            assert got.features & (1 << VIRTIO_F_VERSION_1)
            assert got.protocol_features & P.REPLY_ACK.mask
            data, = request_bytes(fe, ram, [64])
            assert len(data) == 64 and len(set(data)) > 8  # random bytes, not a pattern
    finally:
        err = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert path.exists()  # the launcher's path: not ours to unlink
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(path))  # the backend closed the listening socket
    assert json.loads(stats.read_text())["connections"] == 1


@pytest.mark.parametrize("kind,message", [
    ("pipe", "is not a socket"),
    ("unbound", "does not listen"),
    ("udp", "is not a Unix socket"),
    ("dgram", "is not a stream socket"),
    ("closed", "is not open"),
])
def test_fd_that_is_not_a_listening_unix_stream_socket_exits_1(kind, message):
    keep: list = []
    if kind == "pipe":
        r, w = os.pipe()
        keep = [r, w]
        fd = r
    elif kind == "closed":
        fd = 1000
    else:
        family, type_ = {"unbound": (socket.AF_UNIX, socket.SOCK_STREAM),
                         "udp": (socket.AF_INET, socket.SOCK_DGRAM),
                         "dgram": (socket.AF_UNIX, socket.SOCK_DGRAM)}[kind]
        s = socket.socket(family, type_)
        keep = [s]
        fd = s.fileno()
    try:
        out = pyvhost("rng", "--fd", str(fd), pass_fds=[] if kind == "closed" else [fd])
    finally:
        for k in keep:
            k.close() if isinstance(k, socket.socket) else os.close(k)
    assert out.returncode == 1 and message in out.stderr, out.stderr


# -- run: serving a class, generic statistics ------------------------------------------------


def test_run_serves_a_class_from_the_current_directory_with_its_own_counters(devdir, tmp_path):
    sock, stats = tmp_path / "run.sock", tmp_path / "stats.json"
    # The console script, whose sys.path does not hold the current directory by itself.
    proc = start("run", "mydevs:Counter", "--socket-path", str(sock), "--stats-json",
                 str(stats), "--stats-interval", "0.2", cwd=devdir, script=True)
    try:
        wait_for_socket(sock, STARTUP)
        with GuestRam([(0, 1 << 20)]) as ram, VhostUserFrontend(str(sock)) as fe:
            fe.negotiate(1 << VIRTIO_F_VERSION_1)
            assert request_bytes(fe, ram, [16] * 5) == [b""] * 5
            time.sleep(0.5)  # statistics lines with the connection live
    finally:
        err = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert json.loads(stats.read_text())["counter_requests"] == 5
    live = [line for line in err.splitlines() if "| rounds direct" in line]
    assert any("counter_ms " in line and "/s" in line for line in live), err
    assert all("Mpps" not in line and "tx" not in line.split("|")[0] for line in live)
    totals = [line for line in err.splitlines() if line.startswith("pyvhost totals: ")]
    assert len(totals) == 1 and "counter_requests=5" in totals[0]
    assert "connections=1" in totals[0] and "queues_broken=0" in totals[0]


def test_run_from_pythonpath_with_json_statistics_lines(devdir, tmp_path):
    sock = tmp_path / "run.sock"
    env = {**os.environ, "PYTHONPATH": str(devdir)}
    proc = start("run", "mydevs:Counter", "--socket-path", str(sock), "--stats-interval",
                 "0.2", "--stats-format", "json", cwd=tmp_path, env=env)
    try:
        wait_for_socket(sock, STARTUP)
        with GuestRam([(0, 1 << 20)]) as ram, VhostUserFrontend(str(sock)) as fe:
            fe.negotiate(1 << VIRTIO_F_VERSION_1)
            request_bytes(fe, ram, [16] * 3)
            time.sleep(0.5)
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines, err
    live = [x for x in lines if x["stats"].get("connections") == 1 and
            "counter_requests" in x["stats"]]
    assert live, lines
    x = live[-1]
    assert x["dt"] > 0 and x["t"] >= x["dt"] * 0.5
    assert x["stats"]["counter_requests"] == 3
    assert x["rates"]["counter_ms"] > 0 and "direct_rounds" in x["rates"]


def test_format_lines_name_no_device_keys():
    prev = {"frobs": 10, "bytes_out": 0, "direct_rounds": 0, "copy_rounds": 0,
            "invalidations": 0, "connections": 1}
    cur = {"frobs": 2_010, "bytes_out": 0, "direct_rounds": 100, "copy_rounds": 1,
           "invalidations": 2, "grace_max_s": 25e-6, "connections": 1, "queues_broken": 0}
    line = cli.format_rates(prev, cur, 2.0)
    assert line.startswith("frobs 1.00k/s |") and "bytes_out" not in line  # only what moved
    assert "rounds direct 50/s copy 0/s" in line and "invalidations 2" in line
    assert "grace max 25 us" in line and "connections 1 broken 0" in line
    assert cli.format_rates(cur, cur, 1.0).startswith("idle |")
    assert cli.format_totals(cur) == (
        "pyvhost totals: frobs=2010, bytes_out=0, direct_rounds=100, copy_rounds=1, "
        "invalidations=2, grace_max_s=2.5e-05, connections=1, queues_broken=0")
    assert cli._si(12_345_000) == "12.35M"


# -- Server: warm-up, listener -------------------------------------------------------------


def test_server_warms_one_device_up_before_it_listens(tmp_path):
    from pyvhost.daemon.server import Server

    events: list[str] = []

    class Warm(Device):
        device_id = 4

        def __init__(self) -> None:
            super().__init__()
            events.append("made")

        def warm_up(self) -> None:
            assert not (tmp_path / "s.sock").exists()  # not listening yet
            events.append("warm")

    server = Server(Warm, str(tmp_path / "s.sock"), max_connections=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.listening.wait(TIMEOUT)
        assert events == ["made", "warm"]
        with VhostUserFrontend(str(tmp_path / "s.sock")) as fe:
            fe.negotiate(1 << VIRTIO_F_VERSION_1)
    finally:
        thread.join(TIMEOUT)
        if thread.is_alive():
            server.stop()
            thread.join(TIMEOUT)
    assert events == ["made", "warm", "made"]  # then one device for the connection


def test_server_takes_a_path_or_a_listener(tmp_path):
    from pyvhost.daemon.server import Server
    from pyvhost.daemon.unix_socket import Listener

    with pytest.raises(ValueError):
        Server(Device, None)
    listener = Listener(str(tmp_path / "a.sock"))
    try:
        with pytest.raises(ValueError):
            Server(Device, str(tmp_path / "b.sock"), listener=listener)
        with pytest.raises(ValueError):
            Server(Device, listener=listener, client=True)
    finally:
        listener.close()


def test_listener_from_fd_closes_the_socket_and_unlinks_nothing(tmp_path):
    from pyvhost.daemon.unix_socket import Listener, NotAListeningSocket

    path = tmp_path / "l.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    with pytest.raises(NotAListeningSocket, match="does not listen"):
        Listener.from_fd(s.fileno())
    assert s.fileno() >= 0  # a refused fd is left alone
    s.listen(1)
    listener = Listener.from_fd(s.detach())
    assert str(path) in listener.name
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        client.connect(str(path))
        conn = listener.accept()
        conn.close()
    listener.close()
    assert path.exists()
