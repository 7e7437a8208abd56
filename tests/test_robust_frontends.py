"""Hostile frontends at the socket (a short run of fuzz/frontend_fuzz.py; the long run is in
docs/robustness.md): mutated message sequences with fds of every wrong kind into a live
daemon; afterwards fds, memfd mappings and threads are back at baseline and a well-behaved
frontend is served."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import frontend_fuzz  # noqa: E402


def test_socket_fuzz_short_run():
    res = frontend_fuzz.run(400, seed=11, check_every=100)
    print(f"\nsocket fuzz: {res.cases} cases in {res.seconds:.1f}s; {res.report}")
    assert res.failures == []
    assert res.report["leak_checks"] >= 4
    assert res.report["daemon_stats"]["connections"] >= 400

