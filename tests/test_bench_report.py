"""The vhost benchmark's bookkeeping without a frontend: reading pyvhost's statistics lines,
choosing the intervals inside a window, run order, and the table and chart made of samples."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pyvhost.bench import vhost as V
from pyvhost.cli import format_rates_json


def test_rate_line_matches_what_pyvhost_prints():
    prev = {"tx_packets": 0, "tx_bytes": 0, "direct_rounds": 0, "copy_rounds": 0}
    cur = {"tx_packets": 12_345_000, "tx_bytes": 790_080_000, "direct_rounds": 30_000,
           "copy_rounds": 5}
    values = V.parse_stats_line(format_rates_json(prev, cur, 1.0, 1.0))
    assert values is not None
    assert values["mpps"] == 12.345 and values["gbps"] == 790_080_000 * 8 / 1e9
    assert (values["direct"], values["copy"]) == (30000, 5)
    assert V.parse_stats_line("2026-12-01 12:00:00,000 INFO pyvhost: a log line") is None


def test_rate_line_with_rx_rate():
    values = V.parse_stats_line(format_rates_json(
        {}, {"tx_packets": 10**6, "rx_packets": 2 * 10**6}, 1.0, 1.0))
    assert values is not None and values["mpps"] == 1.0 and values["rx"] == 2.0


def _process_with_lines(lines):
    proc = V.PyvhostProcess(Path("/nonexistent.sock"), Path("/nonexistent.json"), "direct", 0, 1.0)
    proc.rates = [(t, {"mpps": mpps, "gbps": 0.0, "direct": 100.0, "copy": 0.0})
                  for t, mpps in lines]
    return proc


def test_window_takes_only_intervals_inside_it_weighted_by_length():
    # Lines arrive at 10, 11, 12, 13, 13.5; window [10.5, 13.6]: the interval ending at 11
    # began at 10 (outside), the next three lie inside.
    proc = _process_with_lines([(10.0, 1.0), (11.0, 2.0), (12.0, 4.0), (13.0, 4.0), (13.5, 10.0)])
    pps, covered, intervals, rounds = proc.window_rate(10.5, 13.6, 1.0)
    assert covered == 2.5
    assert pps == (4.0 * 1 + 4.0 * 1 + 10.0 * 0.5) / 2.5 * 1e6
    assert [i["t"] for i in intervals] == [1.5, 2.5, 3.0]
    assert rounds == 100.0


def test_window_without_lines_gives_no_figure():
    proc = _process_with_lines([(10.0, 1.0)])
    assert proc.window_rate(20.0, 25.0, 1.0)[0] is None


def _settings(**kw) -> V.Settings:
    base = dict(sizes=[64, 1518], repeat=3, warmup=1.0, window=5.0, interval=1.0,
                hugepages=False, backend_cpu=1, generator_cpu=0, memory_mib=256, rx=True,
                contenders=list(V.TX_CONTENDERS))
    base.update(kw)
    return V.Settings(**base)


def test_plan_alternates_contenders_and_rotates_their_order():
    samples = V.plan(_settings())
    assert len(samples) == 3 * 2 * (3 + 3)
    firsts = [s.contender for s in samples if s.direction == "tx" and s.packet_size == 64][::3]
    assert firsts == list(V.TX_CONTENDERS)  # each leads one repetition
    for rep in range(3):
        for size in (64, 1518):
            group = [s.contender for s in samples if s.repetition == rep
                     and s.packet_size == size and s.direction == "tx"]
            assert sorted(group) == sorted(V.TX_CONTENDERS)


def test_limited_by():
    tx = V.Sample("tx", V.DPDK_VHOST, 64, 0, generator_sent=1000, refused=10)
    assert V._limited_by(tx) == "generator"
    assert V._limited_by(dataclasses.replace(tx, refused=5000)) == "backend"
    rx = V.Sample("rx", V.DPDK_VHOST, 64, 0, generator_sent=1000, refused=5000)
    assert V._limited_by(rx) == "sink"
    assert V._limited_by(dataclasses.replace(rx, refused=0)) == "backend"


def _fake_result(tmp_path) -> dict:
    settings = _settings(repeat=2)
    samples = V.plan(settings)
    base = {V.PYVHOST_COPY: 5e6, V.PYVHOST_DIRECT: 10e6, V.DPDK_VHOST: 20e6}
    for s in samples:
        s.pps = base[s.contender] * (1 + 0.1 * s.repetition)
        s.window_s, s.generator_sent, s.refused = 5.0, 10**9, 10**9
        s.backend_cpu_share, s.counts_match = 1.0, True
        s.limited_by = V._limited_by(s)
    samples[0].error, samples[0].pps = "TestbedError: boom", None
    summary = V.summarize(samples)
    return {"settings": dataclasses.asdict(settings),
            "machine": V.machine_description(False),
            "summary": summary, "ratios": V.ratios(summary, settings.sizes),
            "rx_ratios": V.ratios(summary, settings.sizes, "rx"),
            "samples": [dict(dataclasses.asdict(s), mpps=s.mpps) for s in samples]}


def test_summary_ratios_and_table(tmp_path):
    result = _fake_result(tmp_path)
    tx = result["summary"]["tx"]
    assert tx[V.PYVHOST_DIRECT]["64"] == {"median": 10.5, "min": 10.0, "max": 11.0, "n": 2,
                                          "limited_by": {"backend": 2},
                                          "per_cpu_median": 10.5}  # the whole core each
    assert result["ratios"]["direct/copy"]["1518"] == 2.0
    assert result["ratios"]["direct/dpdk"]["1518"] == 0.5
    assert result["ratios"]["direct/dpdk best"]["1518"] == 11.0 / 22.0  # the best runs
    text = V.markdown(result)
    assert "| pyvhost direct / DPDK vhost PMD, best runs | 0.50× | 0.50× |" in text
    assert "| after: pyvhost `--metadata-access direct` | 10.50 [10.00–11.00] |" in text
    assert "| after / before (direct / copy) | " in text and "2.00×" in text
    assert "| after: pyvhost `--metadata-access direct --source gen:SIZE` | 10.50" in text
    assert "1 sample(s) failed" in text
    assert "§" in text  # RX samples with a full ring are marked sink-bound


def test_chart(tmp_path):
    path = tmp_path / "chart.png"
    V.plot(_fake_result(tmp_path), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_quick_settings():
    from pyvhost.bench.options import add_arguments

    args = add_arguments(argparse.ArgumentParser()).parse_args(["--quick", "--no-huge"])
    s = V.settings_from(args)
    assert (s.repeat, s.hugepages) == (1, False)
    assert s.warmup + s.window <= 2.0


def test_dirty_log_option_adds_each_pyvhost_contender_with_logging():
    from pyvhost.bench.options import add_arguments

    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--quick", "--no-huge", "--dirty-log", "--contenders", "pyvhost-direct,dpdk-vhost"])
    s = V.settings_from(args)
    assert s.contenders == [V.PYVHOST_DIRECT, V.DPDK_VHOST, V.PYVHOST_DIRECT_LOG]
    samples = V.plan(s)
    for direction in ("tx", "rx"):  # on and off alternate within each repetition and size
        group = [x.contender for x in samples if x.direction == direction
                 and x.packet_size == 64 and x.repetition == 0]
        assert sorted(group) == sorted(s.contenders)
    assert V._log_args(V.Sample("tx", V.PYVHOST_DIRECT_LOG, 64, 0)) == ["--bench-log-all"]
    assert V._log_args(V.Sample("tx", V.PYVHOST_DIRECT, 64, 0)) == []


def test_table_with_dirty_logging_on_and_off():
    settings = _settings(repeat=2, contenders=[V.PYVHOST_DIRECT, V.PYVHOST_DIRECT_LOG,
                                               V.DPDK_VHOST])
    samples = V.plan(settings)
    base = {V.PYVHOST_DIRECT: 10e6, V.PYVHOST_DIRECT_LOG: 9e6, V.DPDK_VHOST: 20e6}
    for s in samples:
        s.pps = base[s.contender]
        s.window_s, s.generator_sent, s.refused, s.counts_match = 5.0, 10**9, 10**9, True
        # logging's backends got less of the core: per CPU-second they lose less
        s.backend_cpu_share = 0.95 if s.contender == V.PYVHOST_DIRECT_LOG else 1.0
    summary = V.summarize(samples)
    result = {"settings": dataclasses.asdict(settings),
              "machine": V.machine_description(False), "summary": summary,
              "ratios": V.ratios(summary, settings.sizes),
              "rx_ratios": V.ratios(summary, settings.sizes, "rx"),
              "samples": [dict(dataclasses.asdict(s), mpps=s.mpps) for s in samples]}
    assert result["ratios"]["direct log on/off"]["64"] == 0.9
    assert abs(result["rx_ratios"]["direct log on/off per cpu"]["1518"] - 0.9 / 0.95) < 1e-9
    assert result["ratios"]["copy log on/off"]["64"] is None  # copy did not run
    text = V.markdown(result)
    for table in (text[:text.index("**RX**")], text[text.index("**RX**"):]):
        assert "— dirty logging on † | 9.00 [9.00–9.00] | 9.00 [9.00–9.00] |" in table
        assert "| dirty logging on / off (direct) | 0.90× | 0.90× |" in table
        assert "| dirty logging on / off (direct), per backend CPU-second | 0.95× | 0.95× |" \
            in table
        assert "(copy)" not in table
    assert "`--bench-log-all --metadata-access direct --source gen:SIZE`" in text
    assert "† dirty logging on: `pyvhost net --bench-log-all`" in text
    V.plot(result, Path("/dev/null"))  # the chart takes the new contenders too
