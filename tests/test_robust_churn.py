"""Memory-map churn under full traffic and frontends killed mid-traffic, against a live
daemon (short runs of fuzz/churn.py and fuzz/disconnect.py; long runs and timings in
docs/robustness.md). Timings are printed, never asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import churn, disconnect  # noqa: E402


def _summary(report: dict) -> str:
    fe, dev, d = report.get("frontend", {}), report.get("device", {}), report.get("daemon", {})
    return (f"{report['ops']} ops, {fe.get('frames_sent')} frames: ok {dev.get('frames_ok')}, "
            f"lost {dev.get('frames_lost')}, dup {dev.get('frames_dup')}, stale "
            f"{dev.get('frames_stale')}; rtt {fe.get('rtt_all')}; grace {d.get('grace')}; "
            f"direct share {d.get('direct_share')}; device stall "
            f"{dev.get('max_stall_s')}s, driver stall {fe.get('max_driver_stall_us')}us")


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_churn_under_traffic_loses_nothing(poll):
    res = churn.run(210 if not poll else 105, poll=poll, seed=3)
    print("\n" + _summary(res.report))
    assert res.failures == []
    dev, fe, d = res.report["device"], res.report["frontend"], res.report["daemon"]
    assert dev["frames_ok"] == fe["frames_sent"] > 0
    assert dev["frames_lost"] == dev["frames_dup"] == dev["frames_stale"] == 0
    # Every round ran on the direct map: it was rebuilt after every change (a change that
    # found no map to drop, because no round ran since the last one, is not counted).
    assert d["copy_rounds"] == 0 and d["direct_rounds"] > 0 and d["invalidations"] > 0


def test_frontends_killed_mid_traffic():
    res = disconnect.run(24, seed=5, check_every=8)
    print(f"\n{res.report}")
    assert res.failures == []
    assert res.report["killed_while_sending"] > 0 and res.report["leak_checks"] == 3
