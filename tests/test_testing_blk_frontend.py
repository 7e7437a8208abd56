"""The compiled vhost-user-blk front-end of `pyvhost bench blk` against a real `pyvhost blk`:
both notification modes and both chain layouts complete requests with status OK, writes land
in the image, and set-up refuses what it cannot drive. No speed is checked."""

from __future__ import annotations

import pytest

from pyvhost.testing.blk_frontend import READ, WRITE, BlkBenchFrontend, BlkFrontendError
from pyvhost.testing.testbed import PyvhostDaemon

SIZE = 8 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    return path


def _serve(tmp_path, image, *extra):
    sock = tmp_path / "blk.sock"
    return PyvhostDaemon(["blk", "--socket-path", sock, "--file", image, "--queues", "1",
                          "--queue-size", "256", *extra]), sock


@pytest.mark.parametrize("interrupts,indirect", [(False, True), (True, True), (False, False)])
def test_requests_complete_ok_and_writes_reach_the_image(tmp_path, image, interrupts, indirect):
    daemon, sock = _serve(tmp_path, image)
    with daemon as d:
        d.wait_listening(timeout=600)  # a cold numba cache compiles the device first
        with BlkBenchFrontend(str(sock), queue_size=256, max_qd=32, indirect=indirect,
                              interrupts=interrupts) as fe:
            assert fe.capacity_sectors == SIZE // 512 and fe.nblocks == SIZE // 4096
            assert not fe.read_only
            for op in (WRITE, READ):
                for qd in (1, 32):
                    fe.start(op, qd)
                    r = fe.run(0.3)
                    assert r.completed > 0 and r.errors == 0
                    assert len(r.latencies_ns) == r.completed and min(r.latencies_ns) > 0
                    if interrupts:
                        assert r.sleeps > 0
            assert fe.drain().errors == 0
    # The front-end's data buffers are random bytes: whatever it wrote is not all zeroes.
    assert any(image.read_bytes())


def test_a_read_only_disk_refuses_a_write_workload(tmp_path, image):
    daemon, sock = _serve(tmp_path, image, "--readonly")
    with daemon as d:
        d.wait_listening(timeout=600)  # a cold numba cache compiles the device first
        with BlkBenchFrontend(str(sock), max_qd=8) as fe:
            assert fe.read_only
            with pytest.raises(BlkFrontendError, match="read-only"):
                fe.start(WRITE, 8)
            fe.start(READ, 8)
            assert fe.run(0.1).completed > 0


def test_qd_must_fit_the_ring():
    with pytest.raises(ValueError, match="cannot hold"):
        BlkBenchFrontend("/nonexistent.sock", queue_size=64, max_qd=32, indirect=False)
