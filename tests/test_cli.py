"""The command line, run as a real process: version, serving, live statistics, clean exit on
SIGINT/SIGTERM with the final statistics written, client mode with reconnect."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pyvhost import __version__
from pyvhost.testing.frontend import VhostUserFrontend
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.testbed import wait_for_socket
from test_daemon_bad_input import negotiate, transmit

TIMEOUT = 60.0

STATS_KEYS = {"tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "direct_rounds", "copy_rounds",
              "invalidations", "grace_periods", "grace_max_s", "connections", "queues_broken"}


def pyvhost(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyvhost", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_version():
    out = subprocess.run([sys.executable, "-m", "pyvhost", "--version"], capture_output=True,
                         text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.strip() == f"pyvhost {__version__}"


def test_bad_arguments_exit_nonzero():
    out = subprocess.run([sys.executable, "-m", "pyvhost", "net", "--metadata-access", "x"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2 and "--metadata-access" in out.stderr


def test_compile_only_warms_up_and_exits_without_serving(tmp_path):
    """`--compile-only` (scripts/test.sh runs it before the suite): kernels compiled or loaded,
    exit 0, no socket made and nothing served."""
    out = subprocess.run([sys.executable, "-m", "pyvhost", "rng", "--compile-only",
                          "--log-level", "INFO"], capture_output=True, text=True,
                         timeout=1200, cwd=tmp_path)  # a cold numba cache compiles for minutes
    assert out.returncode == 0, out.stderr
    assert "kernels compiled or loaded" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serves_prints_stats_and_exits_cleanly_on_signal(tmp_path, signum):
    sock, stats = tmp_path / "net.sock", tmp_path / "stats.json"
    proc = pyvhost("net", "--socket-path", str(sock), "--stats-json", str(stats),
                   "--stats-interval", "0.2")
    try:
        wait_for_socket(sock, TIMEOUT)
        with GuestRam([(0, 1 << 20)]) as ram, VhostUserFrontend(str(sock), timeout=TIMEOUT) as fe:
            negotiate(fe)
            fe.set_mem_table(ram)
            transmit(fe, ram, n=50)
            time.sleep(0.5)  # at least one statistics line with the connection live
    finally:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    final = json.loads(stats.read_text())
    assert STATS_KEYS <= final.keys()
    assert final["tx_packets"] == 50 and final["tx_bytes"] == 50 * 60
    assert final["connections"] == 1
    live = [line for line in err.splitlines() if "| rounds direct" in line]
    assert any("tx_packets " in line.split("|")[0] for line in live), err  # it moved
    assert "invalidations" in live[-1] and "connections" in live[-1]
    assert "tx_packets=50, tx_bytes=3000" in err  # the totals line
    assert not sock.exists()  # the listener removed its socket file
    assert "Traceback" not in err


def test_client_mode_waits_for_frontend_and_reconnects(tmp_path):
    sock, stats = tmp_path / "fe.sock", tmp_path / "stats.json"
    proc = pyvhost("net", "--client", "--socket-path", str(sock), "--stats-json", str(stats),
                   "--stats-interval", "0")
    try:
        time.sleep(0.3)  # the daemon starts first and must wait (back-off) for the frontend
        with GuestRam([(0, 1 << 20)]) as ram:
            for _ in range(2):
                with VhostUserFrontend.listen(str(sock), accept_timeout=TIMEOUT,
                                              timeout=TIMEOUT) as fe:
                    negotiate(fe)
                    fe.set_mem_table(ram)
                    transmit(fe, ram, n=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    final = json.loads(stats.read_text())
    assert final["tx_packets"] == 20 and final["connections"] == 2


def test_stale_socket_file_is_replaced_but_a_live_one_is_not(tmp_path):
    import socket
    sock = tmp_path / "net.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    proc = pyvhost("net", "--socket-path", str(sock), "--stats-interval", "0")
    try:
        with VhostUserFrontend(str(sock), connect_timeout=TIMEOUT) as fe:
            negotiate(fe)
        second = subprocess.run([sys.executable, "-m", "pyvhost", "net", "--socket-path",
                                 str(sock), "--stats-interval", "0"], capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert second.returncode == 1 and "another process is listening" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
