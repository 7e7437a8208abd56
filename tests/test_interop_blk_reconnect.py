"""A Linux guest's disk survives SIGKILLs of its backend: QEMU (TCG) + vhost-user-blk-pci with
`-chardev socket,...,reconnect=1`, inflight I/O tracking (INFLIGHT_SHMFD), on a split ring and
on a packed one (`packed=on`: the area has the packed layout, ring/packed_inflight.py, and
after a kill it, not QEMU's base, says where the ring stands).

    guest /dev/vdX ── virtio_blk ── vhost-user-blk-pci (QEMU, reconnect=1) ── pyvhost blk

The host writes a random pattern into the image's first 4 MiB. In the guest, four writers
copy it (O_DIRECT reads and writes, 4 KiB each, then fsync) into four other 4 MiB ranges,
several passes each. Meanwhile pyvhost is SIGKILLed and started again; QEMU
reconnects, sends back the inflight area it kept, and the new process resubmits what the
dead one had in flight. Each kill lands at a moment the backend has requests in flight: the
test stops it (SIGSTOP) until its inflight area, read through /proc, shows some; it is killed
again, up to 8 times, until two kills have caught requests in flight. Then:

- every writer exited 0 and the guest logged no I/O error (the guest never noticed);
- restarts resubmitted exactly the requests the dead process had in flight;
- the guest reads every copy back (caches dropped) with the pattern's MD5, and the host finds
  the pattern in each range of the image file.

Timings are printed (run with -s).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from pyvhost.ring import inflight as I
from pyvhost.ring import packed_inflight as PI
from pyvhost.testing.blk import (
    guest_disk_by_serial,
    guest_md5,
    make_pattern_image,
    md5_hex,
    vhost_user_blk_args,
)
from pyvhost.testing.testbed import GuestVM, PyvhostDaemon, find_qemu, guest_image_paths

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
SIZE = 24 * MiB
PATTERN = 4 * MiB
WRITERS = 4
PASSES = 6
MAX_KILLS = 8
SERIAL = "pyvhost-reconnect"


@pytest.fixture(scope="module", autouse=True)
def _qemu_and_guest_present():
    find_qemu()
    guest_image_paths()  # raises with a hint: scripts/build-guest.sh


def _writers_script(disk: str) -> str:
    """Start the writers in the background; each leaves /tmp/wN.rc (its exit status)."""
    blocks = PATTERN // 4096
    lines = ["rm -f /tmp/w*.rc /tmp/w*.err"]
    for k in range(1, WRITERS + 1):
        copy = (f"dd if=/dev/{disk} of=/dev/{disk} bs=4k count={blocks} seek={k * blocks} "
                "iflag=direct oflag=direct conv=fsync")
        lines.append(f"(rc=0; for p in $(seq {PASSES}); do {copy} 2>>/tmp/w{k}.err || rc=$?; "
                     f"done; echo $rc > /tmp/w{k}.rc) >/dev/null 2>&1 &")
    return "\n".join(lines)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_writes_survive_backend_sigkills_with_reconnect(tmp_path: Path, ring: str):
    t0 = time.monotonic()
    props = {"packed": "on"} if ring == "packed" else {}
    image = tmp_path / "disk.raw"
    data = make_pattern_image(image, SIZE, seed=56)
    pattern = data[:PATTERN]
    sock = tmp_path / "blk.sock"
    argv = ["blk", "--socket-path", sock, "--file", image, "--serial", SERIAL, "--queues", "1",
            "--stats-interval", "0", "--log-level", "INFO"]
    timings: dict[str, float] = {}
    backends: list[PyvhostDaemon] = []

    def start_backend() -> PyvhostDaemon:
        d = PyvhostDaemon(argv, name=f"blk-life{len(backends)}")
        backends.append(d)
        d.start()
        return d

    def wait_log(d: PyvhostDaemon, pattern: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, d.log):
            assert d.running(), f"{d.name} exited:\n{d.log[-4000:]}"
            assert time.monotonic() < deadline, f"{d.name}: no {pattern!r}:\n{d.log[-4000:]}"
            time.sleep(0.1)

    resubmitted: list[int] = []
    try:
        first = start_backend()
        first.wait_listening(timeout=600)  # a cold numba cache compiles for minutes
        with GuestVM(vhost_user_blk_args(sock, 0, num_queues=1, reconnect=1, **props),
                     cpus=1) as vm:
            try:
                timings["boot"] = vm.boot_seconds or 0.0
                wait_log(first, r"queue 0 started")
                features = vm.run("cat /sys/block/vd*/device/features").output.strip()
                assert (features[34] == "1") == (ring == "packed"), features
                disk = guest_disk_by_serial(vm, SERIAL)
                assert guest_md5(vm, f"/dev/{disk}", count=PATTERN // 4096) == md5_hex(pattern)
                vm.run(_writers_script(disk), check=True)
                t = time.monotonic()
                current = first
                # Kill until two kills caught requests in flight, at most MAX_KILLS times. A
                # kill at a random moment rarely does (the guest's TCG CPU, not the device, is
                # the slow side): each kill waits for a moment the backend's own inflight area
                # shows requests in flight.
                while len(resubmitted) < MAX_KILLS and sum(map(bool, resubmitted)) < 2:
                    wait_log(current, r"queue 0 started")
                    time.sleep(0.2 + random.random() / 2)  # the writers are at it
                    assert _writers_done(vm) < WRITERS, "the writers finished before the kills"
                    caught = _sigkill_with_requests_in_flight(current, timeout=20)
                    current = start_backend()
                    wait_log(current, r"frontend connected")
                    wait_log(current, r"queue 0 started")
                    m = re.search(r"queue 0: (\d+) requests in flight resubmitted", current.log)
                    resubmitted.append(int(m[1]) if m else 0)
                    # Every head the dead process had marked is served again, but for those
                    # of a batch it had published (used) and not yet cleared.
                    c = re.search(r"(\d+) heads of the last published batch cleared", current.log)
                    assert resubmitted[-1] + (int(c[1]) if c else 0) == caught, \
                        (caught, current.log[-4000:])
                timings["kills and restarts"] = time.monotonic() - t
                t = time.monotonic()
                rcs = _wait_writers(vm, timeout=600)
                timings["writers after the last restart"] = time.monotonic() - t
                errors = vm.run("cat /tmp/w*.err; dmesg | grep -i -E 'I/O error|blk_update|"
                                "critical|virtio_blk' || true").output
                assert rcs == ["0"] * WRITERS, f"writers' exit codes {rcs}:\n{errors}"
                assert "error" not in errors.lower(), errors
                vm.run("sync; echo 3 > /proc/sys/vm/drop_caches", check=True)
                n = PATTERN // 4096
                for k in range(1, WRITERS + 1):
                    assert guest_md5(vm, f"/dev/{disk}", skip_blocks=k * n, count=n,
                                     timeout=120) == md5_hex(pattern), f"copy {k} in the guest"
            except BaseException:
                print(f"--- guest console ---\n{vm.console_log[-4000:]}\n--- QEMU stderr ---\n"
                      f"{vm.qemu_stderr[-4000:]}")
                raise
    except BaseException:
        for d in backends:
            print(f"--- {d.name} log ---\n{d.log[-4000:]}")
        raise
    finally:
        for d in backends:
            d.stop()
    assert "Traceback" not in "".join(d.log for d in backends)

    after = image.read_bytes()
    for k in range(1, WRITERS + 1):
        assert after[k * PATTERN:(k + 1) * PATTERN] == pattern, f"copy {k} in the image file"
    assert after[(WRITERS + 1) * PATTERN:] == data[(WRITERS + 1) * PATTERN:]
    print(f"\n[blk reconnect, {ring}] {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}, "
          f"whole test {time.monotonic() - t0:.1f} s; resubmitted per restart {resubmitted}")
    assert sum(map(bool, resubmitted)) >= 2, f"kills that caught requests: {resubmitted}"


def _inflight_heads(pid: int) -> int:
    """Requests marked in flight in the inflight area the (stopped) backend holds, read through
    its memfd in /proc: queue region 0 (one queue), laid out as ring/inflight.py (split) or
    ring/packed_inflight.py (packed: head entries in flight or completing) says."""
    heads = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pyvhost-inflight"):
                continue
            region = np.frombuffer(Path(f"/proc/{pid}/fd/{fd}").read_bytes(), dtype=np.uint8)
        except OSError:  # closed meanwhile
            continue
        desc_num = int(region[:I.HEADER_SIZE].view(np.uint16)[I.W_DESC_NUM])
        if region.shape[0] == PI.queue_region_size(desc_num):
            states = region[PI.B_ENTRY0::PI.ENTRY_SIZE][:desc_num]
            caught = np.count_nonzero((states == PI.IN_FLIGHT) | (states == PI.COMPLETING))
        else:
            caught = np.count_nonzero(region[I.B_INFLIGHT0::I.DESC_STATE_SIZE][:desc_num] == 1)
        heads = max(heads, int(caught))
    return heads


def _stopped(pid: int) -> bool:
    """Every thread of the process is in group stop."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            return False
    return True


def _sigkill_with_requests_in_flight(d: PyvhostDaemon, timeout: float) -> int:
    """SIGSTOP the backend until a stop finds requests in flight, then SIGKILL it there (after
    `timeout`, wherever it is). Returns the heads it had in flight (0: none caught)."""
    deadline = time.monotonic() + timeout
    while True:
        os.kill(d.pid, signal.SIGSTOP)
        while not _stopped(d.pid):
            time.sleep(0.001)
        heads = _inflight_heads(d.pid)
        if heads or time.monotonic() > deadline:
            _sigkill(d)
            return heads
        os.kill(d.pid, signal.SIGCONT)
        time.sleep(random.random() / 50)


def _sigkill(d: PyvhostDaemon) -> None:
    os.kill(d.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while d.running():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.stop()


def _writers_done(vm: GuestVM) -> int:
    return int(vm.run("cat /tmp/w*.rc 2>/dev/null | wc -l").output.strip())


def _wait_writers(vm: GuestVM, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (done := _writers_done(vm)) < WRITERS:
        assert time.monotonic() < deadline, f"writers not done: {done} of {WRITERS}"
        time.sleep(2)
    return vm.run("cat /tmp/w*.rc").output.split()
