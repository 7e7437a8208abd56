"""`pyvhost bench --quick` end to end: real testpmd generators, pyvhost and DPDK's vhost PMD as
backends; the JSON, the Markdown table and the PNG must exist and have the right shape. No
figure is checked against a speed (the machine is shared): only that every sample measured
something and every run's final counts agree.

--no-huge: other tests running at the same time take hugepages too, and a testpmd that finds
none fails to start; the benchmark's own default (hugepages when free) is the same code path
apart from the EAL flags."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from pyvhost.testing.testbed import find_testpmd

pytestmark = pytest.mark.interop

SIZES = (64, 1518)
TX = ("pyvhost-copy", "pyvhost-direct", "dpdk-vhost")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    find_testpmd()  # raises with a hint when DPDK is missing (scripts/setup.sh installs it)
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "pyvhost", "bench", "--quick", "--no-huge", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=1500)  # TX, RX, loopback, TAP rows
    return proc, out


def test_quick_bench_exits_cleanly(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr


def test_json_holds_every_sample_and_the_machine(quick_run):
    proc, out = quick_run
    result = json.loads((out / "vhost.json").read_text())
    machine = result["machine"]
    for key in ("cpu_model", "kernel", "hugepages", "date", "loadavg_start", "dpdk"):
        assert key in machine, key
    assert machine["hugepages"] is False  # --no-huge
    assert result["settings"]["repeat"] == 1 and result["settings"]["sizes"] == list(SIZES)
    samples = result["samples"]
    expected = {(d, c, n) for d in ("tx", "rx") for c in TX for n in SIZES}
    if result["settings"]["loopback"]:  # pyvhost has --source loopback: one size in --quick
        assert result["settings"]["loop_sizes"] == [SIZES[0]]
        expected |= {("loop", c, SIZES[0]) for c in TX}
    if result["settings"]["tap"]:  # the TAP rows: one size in --quick
        assert result["settings"]["tap_sizes"] == [SIZES[0]]
        expected |= {(d, c, SIZES[0]) for d in ("tap-tx", "tap-rx") for c in TX}
    assert {(s["direction"], s["contender"], s["packet_size"]) for s in samples} == expected
    assert len(samples) == len(expected)
    for s in samples:
        assert s["error"] is None, s["error"]
        assert s["pps"] > 0 and s["mpps"] == pytest.approx(s["pps"] / 1e6)
        assert s["intervals"] and all(i["pps"] >= 0 and i["dt"] > 0 for i in s["intervals"])
        assert s["counts_match"] is True, s
        if s["direction"] in ("tx", "tap-tx", "tap-rx") or (
                (s["direction"], s["contender"]) == ("rx", "dpdk-vhost")):
            assert s["limited_by"] in ("backend", "generator", "sink")
        else:  # loopback, pyvhost's generator: nothing counts what could not be sent
            assert s["limited_by"] is None
        # The figure is the backend's count over the window, so it cannot exceed what the
        # generating side sent over the whole run.
        assert s["pps"] * s["window_s"] <= s["generator_sent"]
    for s in samples:
        if s["contender"].startswith("pyvhost"):
            assert s["rounds_per_s"] > 0
            if s["direction"] in ("tx", "tap-tx"):  # exact: drained before closing
                assert s["backend_total"] == s["generator_sent"]
    for direction, key in (("tx", "ratios"), ("rx", "rx_ratios")):
        assert set(result["summary"][direction]) == set(TX)
        for contender in TX:
            assert set(result["summary"][direction][contender]) == {str(n) for n in SIZES}
        for ratio in ("direct/copy", "direct/dpdk"):
            assert all(result[key][ratio][str(n)] > 0 for n in SIZES)


def test_markdown_table_has_the_seed_shape(quick_run):
    proc, out = quick_run
    text = (out / "vhost.md").read_text()
    assert text in proc.stdout  # the table is also printed
    assert "| backend | 64 B | 1518 B |" in text
    end = text.index("**Loopback**") if "**Loopback**" in text else len(text)
    for table in (text[:text.index("**RX**")], text[text.index("**RX**"):end]):
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        labels = [row.split("|")[1].strip() for row in rows]
        for prefix in ("before: pyvhost", "after: pyvhost", "C peer: DPDK vhost PMD",
                       "after / before", "pyvhost direct / DPDK"):
            assert any(label.startswith(prefix) for label in labels), (prefix, labels)
        for row in rows:
            if row.startswith(("| before", "| after:", "| C peer")):
                cells = [c.strip() for c in row.strip("|").split("|")[1:]]
                assert len(cells) == len(SIZES)
                for cell in cells:
                    median, lo, hi = _cell_numbers(cell)
                    assert lo <= median <= hi
    assert "--source gen:SIZE" in text[text.index("**RX**"):end]
    result = json.loads((out / "vhost.json").read_text())
    if result["settings"]["loopback"]:
        loop = text[text.index("**Loopback**"):]
        assert "| backend | 64 B |" in loop
        for prefix in ("| before: pyvhost", "| after: pyvhost", "| C peer: DPDK vhost PMD (`io`)"):
            assert prefix in loop
    if result["settings"]["tap"]:
        for title, option in (("**TAP TX**", "--sink tap:NAME"), ("**TAP RX**", "--source tap:NAME")):
            table = text[text.index(title):]
            assert "| backend | 64 B |" in table
            for prefix in (f"| after: pyvhost `--metadata-access direct {option}`",
                           "| C peer: DPDK vhost PMD + TAP PMD (`io`)", "| pyvhost direct / DPDK"):
                assert prefix in table


def _cell_numbers(cell: str) -> tuple[float, float, float]:
    median, _, rest = cell.partition(" [")
    lo, _, hi = rest.partition("]")[0].partition("–")
    return float(median), float(lo), float(hi)


def test_png_is_a_chart(quick_run):
    proc, out = quick_run
    data = (out / "vhost.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 2 * height > 0  # one panel per direction and size, side by side
