"""Short runs of the fuzzers (docs/robustness.md has the long ones): hostile rings on both
metadata paths, and arbitrary bytes and fds into the vhost-user codec."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import codec_fuzz, ring_corpus, ring_fuzz  # noqa: E402
from pyvhost.fd import OwnedFd  # noqa: E402
from pyvhost.protocol import MessageReader, RemoteProtocolError  # noqa: E402
from pyvhost.protocol.codec import HEADER  # noqa: E402
from pyvhost.protocol.constants import VERSION  # noqa: E402


@pytest.fixture(scope="module")
def fuzzer():
    with ring_fuzz.RingFuzzer() as fz:
        yield fz


def test_seed_corpus_files_are_the_documented_cases():
    on_disk = {p.stem: p.read_bytes() for p in ring_fuzz.CORPUS.glob("*.bin")}
    cases = ring_corpus.cases()
    assert set(on_disk) == set(cases)
    for name, (data, _) in cases.items():
        assert on_disk[name] == data.rstrip(b"\0"), f"{name}.bin is stale: --write-corpus"


@pytest.mark.parametrize("name", sorted(ring_corpus.cases()))
def test_seed_corpus_case_has_its_outcome_on_both_paths(fuzzer, name):
    data, expected = ring_corpus.cases()[name]
    fuzzer.run_one(data)  # raises FuzzFailure if any oracle says no
    for path in fuzzer.PATHS:
        code = int(fuzzer.outs[path][ring_fuzz.O_ERROR])
        got = ring_fuzz._code_name(code) if code else None
        assert got == expected, f"{path} path"
    if expected is None:
        assert fuzzer.outs["direct"][ring_fuzz.O_N1] > 0


def test_ring_fuzz_short_run():
    """20,000 generated inputs, each on both paths: no oracle says no."""
    res = ring_fuzz.run(20_000, seed=int.from_bytes(b"CI", "little"), watchdog=120.0)
    print(f"\nring fuzz: {res.inputs} inputs in {res.seconds:.1f}s; {res.summary}")
    assert res.failures == []
    paths = res.summary["paths"]
    assert paths["direct"]["execs"] == paths["copy"]["execs"] == res.inputs >= 20_000
    assert paths["direct"]["direct_share"] > 0.5 and paths["copy"]["direct_share"] == 0
    assert len(paths["direct"]["error_codes"]) >= 10  # the generator reaches most codes
    assert paths["direct"]["chains_popped"] > 0


def test_codec_fuzz_short_run():
    res = codec_fuzz.run(20_000, seed=2)
    print(f"\ncodec fuzz: {res.cases} cases in {res.seconds:.1f}s; {res.summary}")
    assert res.failures == []
    assert res.summary["reader"]["messages"] > 1000


_CHUNKS = st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 10)), min_size=1,
                   max_size=6)
_HEADERS = st.builds(lambda req, flags, size, body: HEADER.pack(req, flags, size) + body,
                     st.integers(0, 45), st.sampled_from((VERSION, VERSION | 8, 0, 3)),
                     st.sampled_from((0, 8, 12, 16, 24, 40, 264, 268, 300, 1 << 20)),
                     st.binary(max_size=300))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=_CHUNKS, headers=st.lists(_HEADERS, max_size=4), fds_with_headers=st.integers(0, 9))
def test_message_reader_raises_only_remote_protocol_errors(chunks, headers, fds_with_headers):
    base = os.eventfd(0, os.EFD_CLOEXEC)
    created: list[OwnedFd] = []
    reader = MessageReader.for_frontend_requests()
    try:
        feed = [(b"".join(headers), fds_with_headers)] + list(chunks)
        for data, n in feed:
            fds = [OwnedFd(os.dup(base)) for _ in range(n)]
            created += fds
            reader.feed(data, fds)
            for msg in reader.messages():
                msg.close_fds()
    except RemoteProtocolError:
        pass
    finally:
        reader.close()
        os.close(base)
    assert all(fd.closed for fd in created)
