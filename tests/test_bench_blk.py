"""`pyvhost bench blk --quick` end to end: the compiled vhost-user-blk front-end against real
back-ends (pyvhost blk and qemu-storage-daemon) and host fio; the JSON, the Markdown table and
the PNG must exist and have the right shape, and every cell must have figures. No figure is
checked against a speed (the machine is shared)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest

from pyvhost.bench import blk as B
from pyvhost.bench.options import (BLK_BACKINGS, BLK_WORKLOADS, FIO, PYVHOST, PYVHOST_THREADS,
                                   QSD)

QDS = (1, 8, 32, 128)


def _cells(null_available: bool = True) -> set[tuple[str, str, str, int]]:
    return {(b, c, w, q) for b in BLK_BACKINGS for c in (PYVHOST, QSD, FIO)
            for w in BLK_WORKLOADS for q in QDS
            if not (c == FIO and b == "null") and (null_available or (b, c) != ("null", PYVHOST))}


# -- bookkeeping without back-ends ----------------------------------------------------------


def _settings(**kw) -> B.Settings:
    base = dict(repeat=3, warmup=1.0, window=3.0, qds=list(QDS), workloads=list(BLK_WORKLOADS),
                backings=list(BLK_BACKINGS), contenders=[PYVHOST, QSD, FIO], size_mib=64,
                cache_dir="/dev/shm", disk_dir="/var/tmp", backend_cpu=1, frontend_cpu=0,
                queue_size=256, indirect=True, pyvhost_args=["--poll"], null_available=True)
    base.update(kw)
    return B.Settings(**base)


def test_plan_alternates_contenders_and_rotates_their_order():
    groups = B.plan(_settings())
    samples = [s for g in groups for s in g]
    assert {(s.backing, s.contender, s.workload, s.qd) for s in samples} == _cells()
    assert len(samples) == 3 * len(_cells())
    # A back-end process serves every workload of its group; fio runs one per sample.
    for g in groups:
        assert len({(s.backing, s.contender, s.repetition) for s in g}) == 1
        assert len(g) == (1 if g[0].contender == FIO else len(QDS) * len(BLK_WORKLOADS))
    firsts = [next(g[0].contender for g in groups if g[0].repetition == rep
                   and g[0].backing == "pagecache") for rep in range(3)]
    assert firsts == [PYVHOST, QSD, FIO]


def test_null_cells_without_pyvhost_null_are_marked_not_available():
    settings = _settings(null_available=False)
    assert B.available(settings, "null", PYVHOST).startswith("not available")
    assert B.available(settings, "null", QSD) is None
    assert B.available(_settings(), "null", PYVHOST) is None
    # The threads data path as a contender of its own only where pyvhost blk has --io.
    assert B.available(_settings(io_option=False), "pagecache", PYVHOST_THREADS).startswith(
        "not available")
    assert B.available(_settings(io_option=True), "pagecache", PYVHOST_THREADS) is None
    argv = B.backend_argv(_settings(io_option=True), PYVHOST_THREADS, "pagecache",
                          B.Path("/c.img"), 1 << 26, B.Path("/s.sock"))
    assert argv[-3:] == ["--io", "threads", "--poll"]  # --pyvhost-args come last


def test_back_end_command_lines():
    settings = _settings()
    files = B.Backings(B.Path("/c.img"), B.Path("/d.img"), 1 << 26)
    sock = B.Path("/s.sock")
    assert B.pyvhost_argv(settings, "null", None, 1 << 26, sock)[-3:] == [
        "--null", str(1 << 26), "--poll"]  # --pyvhost-args come last
    direct = B.pyvhost_argv(settings, "direct", files.direct, files.size, sock)
    assert "--direct" in direct and "/d.img" in direct
    qsd = " ".join(B.qsd_argv(settings, "direct", files.direct, files.size, sock))
    assert "cache.direct=on" in qsd and "aio=io_uring" in qsd and "writable=on" in qsd
    assert "null-co" in " ".join(B.qsd_argv(settings, "null", None, files.size, sock))


# -- the real thing -------------------------------------------------------------------------

pytestmark_interop = pytest.mark.interop


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    for tool in ("qemu-storage-daemon", "fio", "taskset"):
        assert shutil.which(tool), f"{tool} missing: run scripts/setup.sh"
    out = tmp_path_factory.mktemp("bench-blk")
    proc = subprocess.run(
        [sys.executable, "-m", "pyvhost", "bench", "blk", "--quick", "--size-mib", "32",
         "--out-dir", str(out)], capture_output=True, text=True, timeout=900)
    return proc, out


@pytestmark_interop
def test_quick_blk_bench_exits_cleanly(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr


@pytestmark_interop
def test_every_cell_has_figures(quick_run):
    proc, out = quick_run
    result = json.loads((out / "blk.json").read_text())
    for key in ("cpu_model", "kernel", "qsd", "fio", "pyvhost_commit", "date"):
        assert result["machine"][key], key
    settings = result["settings"]
    assert settings["repeat"] == 1 and settings["qds"] == list(QDS)
    assert settings["null_available"]  # pyvhost blk has --null
    samples = result["samples"]
    assert {(s["backing"], s["contender"], s["workload"], s["qd"]) for s in samples} == _cells()
    assert len(samples) == len(_cells())
    for s in samples:
        assert s["error"] is None, s
        assert s["errors"] == 0, s
        assert s["iops"] > 0 and s["completed"] > 0 and s["window_s"] > 0, s
        assert s["iops"] == pytest.approx(s["completed"] / s["window_s"], rel=0.02), s
        assert 0 < s["lat_p50_us"] <= s["lat_p99_us"], s
        assert s["cpu_s_per_mio"] is not None and s["cpu_s_per_mio"] >= 0, s
    summary, ratios = result["summary"], result["ratios"]
    for backing, contender, workload, qd in _cells():
        cell = summary[backing][workload][contender][str(qd)]
        assert cell["n"] == 1 and cell["min"] <= cell["median"] <= cell["max"]
    for backing in BLK_BACKINGS:
        for workload in BLK_WORKLOADS:
            row = ratios[backing][workload]["pyvhost/qsd"]
            assert all(row[str(q)] > 0 for q in QDS), (backing, workload, row)


@pytestmark_interop
def test_markdown_table_has_every_row(quick_run):
    proc, out = quick_run
    text = (out / "blk.md").read_text()
    assert text in proc.stdout  # the table is also printed
    assert "n/a" not in text and "failed" not in text
    for backing in BLK_BACKINGS:
        assert f"**{B.BACKING_TITLES[backing]}**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows]
    for workload in BLK_WORKLOADS:
        assert labels.count(f"pyvhost blk {workload}") == 3
        assert labels.count(f"qemu-storage-daemon {workload}") == 3
        assert labels.count(f"host fio (no vhost-user) {workload}") == 2  # not on null
        assert labels.count(f"pyvhost / qsd {workload}") == 3
    for row in rows:
        if row.startswith(("| pyvhost blk", "| qemu-storage", "| host fio")):
            cells = [c.strip() for c in row.strip("|").split("|")[1:]]
            assert len(cells) == len(QDS) + 2
            for cell in cells[:len(QDS)]:
                median, _, rest = cell.partition(" [")
                lo, _, hi = rest.rstrip("]").partition("–")
                assert 0 < float(lo) <= float(median) <= float(hi), row
    assert "qemu-storage-daemon --blockdev" in text and "pyvhost blk --socket-path" in text


@pytestmark_interop
def test_png_is_a_chart(quick_run):
    proc, out = quick_run
    data = (out / "blk.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > height > 0  # a panel per backing (columns) and workload (rows)
