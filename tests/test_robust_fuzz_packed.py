"""Short runs of the packed-ring fuzzer (fuzz/packed_ring_fuzz.py): hostile packed rings on both
metadata paths agree, break only their queue, and never make the device write outside its ring."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import packed_ring_fuzz  # noqa: E402


@pytest.fixture(scope="module")
def fuzzer():
    with packed_ring_fuzz.PackedRingFuzzer() as fz:
        yield fz


def test_packed_ring_fuzz_short_run(fuzzer):
    """1,500 generated inputs, each on both paths: no oracle says no, and the inputs reach
    both healthy chains and the guest-caused errors."""
    rng = random.Random(14)
    for _ in range(1500):
        fuzzer.run_one(rng.randbytes(rng.choice((8, 64, 600, 2000))))
    outcomes = fuzzer.errors
    assert outcomes.get("ok", 0) > 100, outcomes
    for code in ("ADDR_UNMAPPED", "INDIRECT_BAD_LEN", "READ_AFTER_WRITE", "INDIRECT_WITH_NEXT"):
        assert outcomes.get(code, 0) > 0, outcomes


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=3000))
def test_packed_ring_fuzz_hypothesis(fuzzer, data):
    fuzzer.run_one(data)
