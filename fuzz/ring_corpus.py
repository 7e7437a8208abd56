"""The ring fuzzer's seed corpus: hand-made hostile (and a few healthy) inputs, each with the
outcome it must have. `python -m fuzz.ring_fuzz --write-corpus` writes them to
fuzz/corpus/ring/NAME.bin; tests/test_robust_fuzz.py replays them and checks the outcomes.

Inputs are built with the decoder's raw selectors (see ring_fuzz.decode): validity 0 so
nothing is rewritten, descriptor addresses raw (selector 10), lengths as u16 (selector 1) or
in KiB (selector 4), flags and next as given.
"""

from __future__ import annotations

import struct
from pathlib import Path

from fuzz import ring_fuzz as F
from pyvhost.ring.layout import VIRTQ_DESC_F_INDIRECT as IND
from pyvhost.ring.layout import VIRTQ_DESC_F_NEXT as NEXT
from pyvhost.ring.layout import VIRTQ_DESC_F_WRITE as WRITE

FRAMES = F.GPA_R0 + F.BUF_OFF
INDIRECT = F.GPA_R0 + F.IND_OFF


class Input:
    def __init__(self, log2: int = 3, *, event_idx: bool = False, indirect: bool = False,
                 drop: bool = True, second: bool = False, notif: int = 0, next_avail: int = 0,
                 placement: int = 0, shift: int = 0) -> None:
        self.buf = bytearray(F.MAX_INPUT)
        self.size = 1 << log2
        b = self.buf
        b[F.H_SIZE] = log2
        b[F.H_FLAGS] = (event_idx | indirect << 1 | drop << 2 | second << 3 | notif << 4)
        struct.pack_into("<H", b, F.H_NEXT_AVAIL, next_avail)
        struct.pack_into("<H", b, F.H_USED_IDX, next_avail)
        b[F.H_MAX_CHAINS] = 255
        b[F.H_PLACEMENT] = placement
        b[F.H_SHIFT] = shift
        b[F.H_VALIDITY] = 0
        self.next_avail = next_avail
        self.avail(0)

    def avail(self, count: int, *, raw: int | None = None) -> "Input":
        """avail->idx = next_avail + count (or exactly `raw`)."""
        if raw is None:
            self.buf[F.H_AVAIL_MODE] = 0
            struct.pack_into("<H", self.buf, F.H_AVAIL_RAW, count)
        else:
            self.buf[F.H_AVAIL_MODE] = 255
            struct.pack_into("<H", self.buf, F.H_AVAIL_RAW, raw)
        return self

    def head(self, slot: int, value: int) -> "Input":
        """avail->ring[slot] = value; values >= size are written as size + k (k < 4)."""
        v = value if value < self.size else 0x4000 | (value - self.size)
        struct.pack_into("<H", self.buf, F.AV_REC + 2 * slot, v)
        return self

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, *,
             table: int = F.DR_REC) -> "Input":
        o = table + 16 * i
        if length <= 0xFFFF:
            sel_len, lp = 1, length
        else:
            assert length % 1024 == 0 and length >> 10 <= 0xFFFF
            sel_len, lp = 4, length >> 10
        struct.pack_into("<BBHHHII", self.buf, o, 10, sel_len, lp, flags, nxt,
                         addr & 0xFFFFFFFF, addr >> 32)
        return self

    def indirect_entry(self, j: int, addr: int, length: int, flags: int = 0,
                       nxt: int = 0) -> "Input":
        """Entry j of the indirect area (at INDIRECT + 16 * j); next indices are mod 32."""
        return self.desc(j, addr, length, flags, nxt, table=F.IR_REC)

    def chains(self, n: int, length: int = 64) -> "Input":
        """n healthy one-buffer chains, heads 0..n-1."""
        for k in range(n):
            self.desc(k, FRAMES + 64 * k, length)
            self.head((self.next_avail + k) % self.size, k)
        return self.avail(n)

    def bytes(self) -> bytes:
        return bytes(self.buf)


def cases() -> dict[str, tuple[bytes, str | None]]:
    """name -> (input, expected RingErrorCode name of the fuzzed queue, None for healthy)."""
    out: dict[str, tuple[Input, str | None]] = {}
    out["healthy_drop"] = (Input().chains(8), None)
    out["healthy_pop_push"] = (Input(drop=False).chains(8), None)
    out["healthy_event_idx_wrap"] = (Input(event_idx=True, notif=3, second=True,
                                           next_avail=0xFFFC).chains(8), None)
    out["healthy_desc_straddles_regions"] = (Input(5, placement=2).chains(32), None)
    out["healthy_used_in_other_region"] = (Input(4, placement=1).chains(16), None)
    out["healthy_buffer_straddles_regions"] = (
        Input().desc(0, F.GPA_R1 - 100, 200).head(0, 0).avail(1), None)
    out["healthy_indirect"] = (
        Input(indirect=True).indirect_entry(0, FRAMES, 64, NEXT, 1)
        .indirect_entry(1, FRAMES + 64, 64, WRITE).desc(0, INDIRECT, 32, IND)
        .head(0, 0).avail(1), None)
    out["avail_idx_jump"] = (Input().avail(0, raw=9), "AVAIL_IDX_JUMP")
    out["head_out_of_range"] = (Input().head(0, 8).avail(1), "HEAD_OUT_OF_RANGE")
    out["next_out_of_range"] = (Input().desc(0, FRAMES, 64, NEXT, 0x8003).head(0, 0).avail(1),
                                "NEXT_OUT_OF_RANGE")
    out["loop"] = (Input().desc(0, FRAMES, 64, NEXT, 1).desc(1, FRAMES, 64, NEXT, 0)
                   .head(0, 0).avail(1), "CHAIN_TOO_LONG")
    out["self_loop"] = (Input().desc(2, FRAMES, 64, NEXT, 2).head(0, 2).avail(1),
                        "CHAIN_TOO_LONG")
    out["nested_indirect"] = (
        Input(indirect=True).indirect_entry(0, INDIRECT + 64, 16, IND)
        .indirect_entry(4, FRAMES, 64).desc(0, INDIRECT, 16, IND).head(0, 0).avail(1),
        "NESTED_INDIRECT")
    out["indirect_bad_len"] = (Input(indirect=True).desc(0, INDIRECT, 24, IND).head(0, 0)
                               .avail(1), "INDIRECT_BAD_LEN")
    out["indirect_with_next"] = (Input(indirect=True).desc(0, INDIRECT, 16, IND | NEXT, 1)
                                 .head(0, 0).avail(1), "INDIRECT_WITH_NEXT")
    out["indirect_not_negotiated"] = (Input().desc(0, INDIRECT, 16, IND).head(0, 0).avail(1),
                                      "INDIRECT_NOT_NEGOTIATED")
    out["indirect_loop"] = (
        Input(indirect=True).indirect_entry(0, FRAMES, 64, NEXT, 1)
        .indirect_entry(1, FRAMES, 64, NEXT, 0).desc(0, INDIRECT, 32, IND).head(0, 0)
        .avail(1), "CHAIN_TOO_LONG")
    out["read_after_write"] = (Input().desc(0, FRAMES, 64, WRITE | NEXT, 1).desc(1, FRAMES, 64)
                               .head(0, 0).avail(1), "READ_AFTER_WRITE")
    out["address_top_of_u64"] = (Input().desc(0, 2**64 - 16, 8).head(0, 0).avail(1),
                                 "ADDR_UNMAPPED")
    out["address_2_63"] = (Input().desc(0, 2**63, 8).head(0, 0).avail(1), "ADDR_UNMAPPED")
    out["address_past_last_region"] = (
        Input().desc(0, F.GPA_R1 + F.R1_SIZE - 8, 64).head(0, 0).avail(1), "ADDR_UNMAPPED")
    long_chain = Input(7)
    seg = 0xFFFF << 10  # 64 MiB - 1 KiB: 65 of them pass 2**32
    for i in range(66):
        long_chain.desc(i, F.GPA_R1, seg, NEXT, i + 1)
    out["length_overflow"] = (long_chain.head(0, 0).avail(1), "LEN_OVERFLOW")
    out["desc_table_below_first_region"] = (
        Input(placement=3, shift=0 | (1 << 2)).chains(4), "RING_UNMAPPED")
    out["used_ring_below_first_region"] = (
        Input(placement=3, shift=2 | (15 << 2)).chains(4), "RING_UNMAPPED")
    return {name: (inp.bytes(), code) for name, (inp, code) in out.items()}


def write_corpus(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (data, _) in cases().items():
        path = directory / f"{name}.bin"
        path.write_bytes(data.rstrip(b"\0"))  # inputs are zero-filled when decoded
        written.append(path)
    return written
