"""Codec fuzzer: arbitrary bytes and fd counts into the sans-I/O `MessageReader` (and the
`BackendProtocol` built on it). Whatever comes in, the only exceptions allowed out are
`RemoteProtocolError` subclasses, and every fd fed in ends up either in a returned `Message`
(which the harness closes) or closed by the reader: none is left open.

A case is a list of chunks, each (bytes, number of fds riding with it), fed in order as a
socket would deliver them. Cases are generated structure-aware: streams of messages with real
request ids, allowed and disallowed payload sizes, version/flag bits, payloads of plausible
and random bytes, split at arbitrary points, with 0..10 fds per chunk (more than a socket can
carry, too); and plain random bytes.

    python -m fuzz.codec_fuzz --cases 1000000
    python -m fuzz.codec_fuzz --engine atheris -- -runs=1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvhost.fd import OwnedFd
from pyvhost.protocol import (
    BackendProtocol,
    FrontendRequest,
    MessageReader,
    RemoteProtocolError,
)
from pyvhost.protocol.codec import FRONTEND_REQUESTS, HEADER
from pyvhost.protocol.constants import NEED_REPLY, REPLY, VERSION

Chunk = tuple[bytes, int]
TARGETS = ("reader", "backend")

_SIZES = sorted({n for spec in FRONTEND_REQUESTS.values() for n in range(spec.max_size() + 1)
                 if spec.payload_type(n) is not None} | {0, 8, 40, 264, 268})
_IDS = [int(r) for r in FrontendRequest]


def gen_message(rng: random.Random) -> bytes:
    r = rng.random()
    req = rng.choice(_IDS) if r < 0.9 else rng.randrange(0, 1 << 32)
    spec = FRONTEND_REQUESTS.get(FrontendRequest(req)) if req in _IDS else None
    if spec is not None and rng.random() < 0.9:
        size = rng.choice([n for n in (0, 8, 12, 16, 20, 24, 28, 36, 40, 48, 64, 264, 268, 276)
                           if spec.payload_type(n) is not None] or [0])
    else:
        size = rng.choice(_SIZES) if rng.random() < 0.7 else rng.randrange(0, 1 << 16)
    flags = VERSION
    if rng.random() < 0.3:
        flags |= NEED_REPLY
    if rng.random() < 0.05:
        flags |= REPLY
    if rng.random() < 0.02:
        flags = rng.randrange(0, 1 << 32)
    payload = gen_payload(rng, size)
    if rng.random() < 0.03:  # header announces more or less than follows
        payload = payload[:rng.randrange(0, len(payload) + 1)] if payload else bytes(4)
    return HEADER.pack(req, flags, size) + payload


def gen_payload(rng: random.Random, size: int) -> bytes:
    if size > 4096:
        size = rng.randrange(0, 4096)
    kind = rng.random()
    if kind < 0.4:  # small numbers: counts, indices and flags that make sense
        out = bytearray()
        while len(out) < size:
            v = rng.choice((0, 1, 2, 8, 9, 255, 256, 0x100, 0x1FF, 1 << 30, 0xFFFFFFFF))
            out += struct.pack("<I", v)
        return bytes(out[:size])
    if kind < 0.6:
        return bytes(size)
    return rng.randbytes(size)


def gen_case(rng: random.Random) -> list[Chunk]:
    if rng.random() < 0.1:
        stream = rng.randbytes(rng.randrange(0, 600))
    else:
        stream = b"".join(gen_message(rng) for _ in range(rng.randrange(1, 8)))
    chunks: list[Chunk] = []
    pos = 0
    while pos < len(stream) or not chunks:
        n = len(stream) - pos if rng.random() < 0.5 else rng.randrange(0, len(stream) - pos + 1)
        fds = 0 if rng.random() < 0.75 else rng.choice((1, 1, 1, 2, 3, 8, 9, 10))
        chunks.append((stream[pos:pos + n], fds))
        pos += n
        if n == 0 and rng.random() < 0.5:
            break
    return chunks


def case_from_bytes(data: bytes) -> list[Chunk]:
    """Decode atheris bytes: chunks as (u8 fd count, u16 length, bytes)."""
    chunks, pos = [], 0
    while pos + 3 <= len(data):
        fds, n = data[pos] % 11, int.from_bytes(data[pos + 1:pos + 3], "little")
        pos += 3
        chunks.append((data[pos:pos + n], fds))
        pos += n
    return chunks or [(data, 0)]


class CodecFailure(AssertionError):
    pass


@dataclass
class Stats:
    cases: int = 0
    messages: int = 0
    fds_fed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class CodecFuzzer:
    def __init__(self) -> None:
        self._base = os.eventfd(0, os.EFD_CLOEXEC)
        self.stats = {t: Stats() for t in TARGETS}

    def close(self) -> None:
        os.close(self._base)

    def __enter__(self) -> "CodecFuzzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_case(self, chunks: list[Chunk]) -> None:
        for target in TARGETS:
            self._run(target, chunks)

    def _run(self, target: str, chunks: list[Chunk]) -> None:
        st = self.stats[target]
        st.cases += 1
        created: list[OwnedFd] = []
        endpoint = (MessageReader.for_frontend_requests() if target == "reader"
                    else BackendProtocol())
        try:
            for data, nfds in chunks:
                fds = [OwnedFd(os.dup(self._base)) for _ in range(nfds)]
                created += fds
                st.fds_fed += nfds
                if target == "reader":
                    endpoint.feed(data, fds)
                    msgs = endpoint.messages()
                else:
                    msgs = endpoint.receive(data, fds)
                for msg in msgs:
                    st.messages += 1
                    if not all(isinstance(fd, OwnedFd) for fd in msg.fds):
                        raise CodecFailure(f"{target}: message fds not owned: {msg.fds}")
                    msg.close_fds()
        except RemoteProtocolError as exc:
            name = type(exc).__name__
            st.errors[name] = st.errors.get(name, 0) + 1
        except CodecFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of the fuzzer
            raise CodecFailure(f"{target}: {type(exc).__name__}: {exc} on {chunks!r}") from exc
        finally:
            endpoint.close()
        leaked = [fd for fd in created if not fd.closed]
        if leaked:
            for fd in leaked:
                fd.close()
            raise CodecFailure(f"{target}: {len(leaked)} of {len(created)} fds left open by "
                               f"{chunks!r}")

    def summary(self) -> dict:
        return {t: {"cases": s.cases, "messages": s.messages, "fds_fed": s.fds_fed,
                    "remote_protocol_errors": dict(sorted(s.errors.items()))}
                for t, s in self.stats.items()}


@dataclass
class RunResult:
    cases: int
    seconds: float
    failures: list[str]
    summary: dict


def run(cases: int, seed: int = 1, max_failures: int = 20,
        seconds: float | None = None) -> RunResult:
    rng = random.Random(seed)
    failures: list[str] = []
    start = time.monotonic()
    fds_before = len(os.listdir("/proc/self/fd"))
    with CodecFuzzer() as fz:
        n = 0
        while n < cases and len(failures) < max_failures:
            if seconds is not None and n % 1000 == 0 and time.monotonic() - start > seconds:
                break
            case = gen_case(rng)
            try:
                fz.run_case(case)
            except CodecFailure as exc:
                failures.append(str(exc)[:2000])
            n += 1
        summary = fz.summary()
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after != fds_before:
        failures.append(f"process fd count {fds_before} -> {fds_after}")
    return RunResult(n, time.monotonic() - start, failures, summary)


def run_atheris(argv: list[str]) -> None:
    import atheris  # optional: pip install atheris

    atheris.instrument_all()  # the protocol modules are imported already: instrument them now
    fz = CodecFuzzer()

    def test_one_input(data: bytes) -> None:
        fz.run_case(case_from_bytes(data))

    atheris.Setup([sys.argv[0]] + argv, test_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--engine", choices=("random", "atheris"), default="random")
    ap.add_argument("rest", nargs="*", help="after --: libFuzzer flags (atheris engine)")
    args = ap.parse_args(argv)
    if args.engine == "atheris":
        run_atheris(args.rest)
        return 0
    res = run(args.cases, args.seed, seconds=args.seconds)
    report = {"engine": "random", "seed": args.seed, "cases": res.cases,
              "seconds": round(res.seconds, 1), "cases_per_s": round(res.cases / res.seconds),
              "failures": res.failures, "targets": res.summary}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
