"""Hostile-ring fuzzer: arbitrary descriptor tables, avail rings and indices in guest memory,
run through the ring engine on both metadata paths.

One input (bytes, any length; atheris-compatible) is decoded, structure-aware, into a guest
memory image: a queue of 1..256 entries with its descriptor table, avail ring (flags, idx,
heads, used_event), used ring (idx, flags), an area of indirect tables and an area of frames.
Every field comes from the input through selectors that mix valid values with hostile ones
(heads and next indices out of range, loops, nested or malformed indirect tables, addresses
straddling regions, partially or wholly unmapped, at 2**63 and 2**64-1, lengths summing past
2**32, avail->idx jumps, rings straddling two regions or starting below the first one).

Each input runs twice, on a queue whose metadata goes through the direct map and on one on
the copy path, with the same kernels: `pop_burst` + `push_used_burst`, or the net drop
kernel `tx_drop_burst`, optionally with notification toggling and a second burst. Oracles:

1. every call either succeeds or returns -1 with the queue marked broken by a RingErrorCode
   (never USED_ID_OUT_OF_RANGE: that one would be the device's own bug); a broken queue stays
   broken; popped chains have heads < size, segments that are mapped, lengths < 2**32;
2. the device wrote nothing outside the fuzzed queue's used ring;
3. both paths give identical results (return values, queue state, chains, segments, used
   ring bytes, counters);
4. a second, healthy queue in the same guest memory keeps working after every input;
5. no crash, no hang (a watchdog aborts a run stuck in one input; the input being run is
   always in `<out>/last-input.bin`, so a crash leaves its reproducer behind).

Memory and queues are made once and reused: an input only rewrites the image and resets the
queue's state array, so a run does tens of thousands of inputs per second per core.

    python -m fuzz.ring_fuzz --execs 1000000            # built-in structure-aware engine
    python -m fuzz.ring_fuzz --engine atheris -- -runs=1000000 fuzz/corpus/ring
    python -m fuzz.ring_fuzz --replay fuzz/corpus/ring/loop.bin
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import mmap
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from pyvhost.devices.net import tx_drop as NK
from pyvhost.memory.guest_memory import GuestMemory
from pyvhost.ring import kernels as K
from pyvhost.ring.errors import RingErrorCode
from pyvhost.ring.layout import used_ring_size
from pyvhost.ring.split_queue import SplitQueue
from pyvhost.testing.guest_ram import GuestRam
from pyvhost.testing.pairing import backend_memory

CORPUS = Path(__file__).parent / "corpus" / "ring"

# -- guest memory layout ------------------------------------------------------------------------
# R0 (the fuzz area) and R1 (a big region right after it, GPA- and user-adjacent) hold the fuzzed
# queue; R2 holds the healthy queues. The "image" is R0 plus the first R1_HEAD bytes of R1:
# rewritten before every run, compared after it.
GPA_R0 = 0x10000
R0_SIZE = 0x8000
GPA_R1 = GPA_R0 + R0_SIZE
R1_SIZE = 64 << 20  # sparse: only its head is ever written
R1_HEAD = 0x4000
GPA_R2 = 0x1000_0000
R2_SIZE = 0x10000
IMG_LEN = R0_SIZE + R1_HEAD

# Image offsets (= GPA - GPA_R0) of the fuzzed queue's parts in the standard placement.
DESC_OFF, AVAIL_OFF, USED_OFF = 0x0000, 0x1000, 0x1400
USED_R1_OFF = R0_SIZE + 0x2000       # placement 1: used ring in R1
IND_OFF, IND_LEN = 0x2000, 0x2000     # indirect tables
BUF_OFF, BUF_LEN = 0x4000, 0x4000     # frames

MAX_LOG2 = 8  # queue sizes 1..256
MAX_SIZE = 1 << MAX_LOG2

# -- input layout --------------------------------------------------------------------------------
H_SIZE = 0          # queue size log2 (mod 9)
H_FLAGS = 1         # bit0 EVENT_IDX, bit1 INDIRECT_DESC, bit2 drop kernel, bit3 second burst,
#                     bit4 disable_notification first, bit5 enable_notification first
H_NEXT_AVAIL = 2    # u16
H_AVAIL_MODE = 4    # < 224: avail->idx = next_avail + raw % (size + 1); else raw
H_AVAIL_RAW = 5     # u16
H_USED_IDX = 7      # u16
H_USED_EVENT = 9    # u16
H_AVAIL_FLAGS = 11  # u16
H_MAX_CHAINS = 13
H_PLACEMENT = 14    # % 5: 0 standard, 1 used ring in R1, 2 descriptor table straddling R0 | R1,
H_SHIFT = 15        #   3 one part starting below R0 (H_SHIFT bits 0-1: which, bits 2-5: by
#                     16 * (1 + n) bytes), 4 used ring straddling R0 | R1
H_VALIDITY = 16     # share of descriptors/heads forced valid (0..255)
H_LENS = 17         # used lengths pushed: 0 zero, 1 chain length, 2 raw
H_SIGNALLED = 18    # u16 signalled used; H_SIGNALLED+2: valid flag
H_SALT = 21
HDR_LEN = 32
AV_REC = HDR_LEN                      # 2 bytes per avail slot, MAX_SIZE slots
DR_REC = AV_REC + 2 * MAX_SIZE        # 16 bytes per ring descriptor
IR_REC = DR_REC + 16 * MAX_SIZE       # 16 bytes per indirect-area descriptor
MAX_INPUT = IR_REC + IND_LEN          # longer inputs: the rest is ignored

# -- decoded configuration (int64 array) ---------------------------------------------------------
C_SIZE, C_EVENT, C_INDIRECT, C_KERNEL, C_ROUNDS, C_NOTIF, C_MAXC = 0, 1, 2, 3, 4, 5, 6
C_NEXT_AVAIL, C_USED_IDX, C_LENS, C_SIGNALLED, C_SIG_VALID = 7, 8, 9, 10, 11
C_PLACEMENT, C_DESC, C_AVAIL, C_USED = 12, 13, 14, 15  # image offsets (may be negative)
CFG_LEN = 16

# -- per-run results (int64 array) ---------------------------------------------------------------
O_VIOLATION, O_INFO = 0, 1          # oracle 1 violation code (0: none) and detail
O_N1, O_PUSH1, O_N2, O_PUSH2, O_ENABLE = 2, 3, 4, 5, 6
O_ERROR, O_ERROR_INFO, O_SEGS = 7, 8, 9
OUT_LEN = 10

V_BAD_RETURN = 1       # -1 without an error code, or an error code with a success return
V_BAD_CODE = 2         # error code not a RingErrorCode, or USED_ID_OUT_OF_RANGE
V_TOO_MANY = 3         # more chains than allowed
V_BAD_HEAD = 4
V_BAD_SEGMENT = 5      # unmapped, negative, zero-length chain or flags other than WRITE
V_BAD_INDEX = 6        # next_avail / next_used did not move as the return value says
V_NOT_STICKY = 7       # a broken queue did something
V_BAD_COUNTERS = 8
VIOLATIONS = {1: "bad return", 2: "bad error code", 3: "too many chains", 4: "head out of range",
              5: "bad segment", 6: "ring index moved wrongly", 7: "broken queue not sticky",
              8: "drop counters disagree"}

MAX_CODE = max(int(c) for c in RingErrorCode)


# ---------------------------------------------------------------------------------- decoding --

@njit(cache=True, nogil=True)
def _b(data, i):
    return np.int64(data[i])  # data is padded to PADDED_LEN (see pad())


@njit(cache=True, nogil=True)
def _u16(data, i):
    return _b(data, i) | (_b(data, i + 1) << 8)


@njit(cache=True, nogil=True)
def _u32(data, i):
    return _u16(data, i) | (_u16(data, i + 2) << 16)


@njit(cache=True, nogil=True)
def _put(image, off, nbytes, value):
    """Little-endian store of nbytes (<= 4) of value (0 <= value < 2**32); clipped to the image."""
    for k in range(nbytes):
        o = off + k
        if 0 <= o < image.shape[0]:
            image[o] = (value >> (8 * k)) & 0xFF


@njit(cache=True, nogil=True)
def _put_desc(image, off, addr_hi, addr_lo, length, flags, nxt):
    _put(image, off, 4, addr_lo)
    _put(image, off + 4, 4, addr_hi)
    _put(image, off + 8, 4, length)
    _put(image, off + 12, 2, flags)
    _put(image, off + 14, 2, nxt)


@njit(cache=True, nogil=True)
def _unmapped(k, x):
    """(hi, lo) of an address outside every region, by kind k."""
    k = k % 9
    if k == 0:
        return 0, x % 0x8000                               # below R0 (page 0 included)
    if k == 1:
        return 0, GPA_R0 - 1 - (x % 64)                      # just below R0
    if k == 2:
        return 0, GPA_R1 + R1_SIZE + (x % 4096)              # just past R1
    if k == 3:
        return 0, GPA_R2 - 16                                # in the gap before R2
    if k == 4:
        return 0, GPA_R2 + R2_SIZE + (x % 64)                # just past R2
    if k == 5:
        return 0x40000000, x                                 # 2**62 + x
    if k == 6:
        return 0x7FFFFFFF, 0xFFFFFFFF - (x % 256)            # just below 2**63
    if k == 7:
        return 0x80000000, x % 256                           # 2**63 + x
    return 0xFFFFFFFF, 0xFFFFFFFF - (x % 256)                # just below 2**64


@njit(cache=True, nogil=True)
def _decode_desc(data, o, i, table_len, sanitize, indirect_ok, image, dst):
    """Descriptor i of a table of table_len (a power of two) entries from data[o:o+16]."""
    sel = _b(data, o)
    p16 = _u16(data, o + 8)
    p32 = _u32(data, o + 8)
    mask = table_len - 1
    if sanitize:
        if indirect_ok and (_b(data, o + 5) & 7) == 0:      # a valid indirect table
            k = p16 & 255
            m = 1 + (_b(data, o + 2) & 31)
            _put_desc(image, dst, 0, GPA_R0 + IND_OFF + 16 * k, 16 * m, 4, 0)
            return
        flags = _b(data, o + 4) & 3                         # NEXT and/or WRITE
        length = 14 + (_u16(data, o + 2) & 1023)
        _put_desc(image, dst, 0, GPA_R0 + BUF_OFF + (p16 & 0x1FFF), length, flags,
                  (i + 1) & mask)
        return
    s = sel & 15
    hi = 0
    if s <= 4 or s >= 13:
        lo = GPA_R0 + BUF_OFF + (p16 & (BUF_LEN - 1))
    elif s == 5:
        lo = GPA_R0 + IND_OFF + 16 * (p16 & (IND_LEN // 16 - 1))
    elif s == 6:
        lo = GPA_R1 - (p16 & 4095)                          # straddles R0 | R1
    elif s == 7:
        lo = GPA_R1 + (p32 & (R1_SIZE - 1))
    elif s == 8:
        lo = GPA_R1 + R1_SIZE - (p16 & 4095)                # runs past the end of R1
    elif s == 9:
        hi, lo = _unmapped(_b(data, o + 10), _u32(data, o + 12))
    elif s == 10:
        hi, lo = _u32(data, o + 12), p32                    # anything
    elif s == 11:
        lo = GPA_R2 + (p16 & (R2_SIZE - 1))                 # the healthy queues' memory
    else:
        lo = GPA_R0 + DESC_OFF + (p16 & 0x1FFF)             # the rings themselves
    ls = _b(data, o + 1) & 7
    lp = _u16(data, o + 2)
    if ls == 0:
        length = lp & 0xFF
    elif ls == 1:
        length = lp
    elif ls == 2:
        length = 16 * (1 + (lp & 31))                       # indirect-table sized
    elif ls == 3:
        length = 0
    elif ls == 4:
        length = lp << 10                                   # up to 64 MiB (length overflow)
    elif ls == 5:
        length = 0xFFFFFFFF - (lp & 0xFF)
    elif ls == 6:
        length = 14 + (lp & 127)
    else:
        length = 12
    f = _u16(data, o + 4)
    flags = f if f & 0x8000 else f & 7
    nx = _u16(data, o + 6)
    nxt = nx if nx & 0x8000 else nx & mask
    _put_desc(image, dst, hi, lo, length, flags, nxt)


@njit(cache=True, nogil=True)
def decode(data, image, cfg):
    """Padded input bytes -> guest memory image (which starts as a copy of the static image)
    and run configuration."""
    log2 = _b(data, H_SIZE) % (MAX_LOG2 + 1)
    size = 1 << log2
    fl = _b(data, H_FLAGS)
    cfg[C_SIZE] = size
    cfg[C_EVENT] = fl & 1
    cfg[C_INDIRECT] = (fl >> 1) & 1
    cfg[C_KERNEL] = (fl >> 2) & 1
    cfg[C_ROUNDS] = 1 + ((fl >> 3) & 1)
    cfg[C_NOTIF] = (fl >> 4) & 3
    cfg[C_MAXC] = 1 + _b(data, H_MAX_CHAINS)
    next_avail = _u16(data, H_NEXT_AVAIL)
    cfg[C_NEXT_AVAIL] = next_avail
    used_idx = _u16(data, H_USED_IDX)
    cfg[C_USED_IDX] = used_idx
    cfg[C_LENS] = _b(data, H_LENS) % 3
    cfg[C_SIGNALLED] = _u16(data, H_SIGNALLED)
    cfg[C_SIG_VALID] = _b(data, H_SIGNALLED + 2) & 1
    validity = _b(data, H_VALIDITY)
    salt = _b(data, H_SALT)

    # Placement of the three parts (image offsets; alignments 16, 2, 4 kept).
    placement = _b(data, H_PLACEMENT) % 5
    desc, avail, used = DESC_OFF, AVAIL_OFF, USED_OFF
    used_len = used_ring_size_nb(size)
    if placement == 1:                       # used ring in R1: direct map over two regions
        used = USED_R1_OFF
    elif placement == 2:                     # descriptor table straddles R0 | R1
        desc = R0_SIZE - 16 * max(1, size // 2)
        avail = R0_SIZE + 0x1000
        used = R0_SIZE + 0x1400
    elif placement == 3:                     # one part starts below R0 (partly unmapped)
        sh = _b(data, H_SHIFT)
        shift = 16 * (1 + ((sh >> 2) & 15))
        which = sh & 3
        if which == 0:
            desc = -shift
        elif which == 1:
            avail = -shift
        else:
            used = -shift
    elif placement == 4:                     # used ring straddles R0 | R1
        used = R0_SIZE - 4 * ((used_len // 4) // 2)
    cfg[C_PLACEMENT] = placement
    cfg[C_DESC] = desc
    cfg[C_AVAIL] = avail
    cfg[C_USED] = used

    # A plausible ethertype in every 64-byte frame slot (the rest of the frames is static).
    for k in range(0, BUF_LEN, 64):
        t = _b(data, k + 3) & 7
        et = 0x0800 if t <= 1 else 0x86DD if t == 2 else 0x8100 if t == 3 else \
            0x0806 if t == 4 else _u16(data, k + 5)
        image[BUF_OFF + k + 24] = et >> 8
        image[BUF_OFF + k + 25] = et & 0xFF

    # Indirect tables (only read when negotiated), then the rings, written last.
    if cfg[C_INDIRECT]:
        for j in range(IND_LEN // 16):
            sanitize = ((j * 167 + salt * 31 + 11) & 0xFF) < validity
            _decode_desc(data, IR_REC + 16 * j, j, 32, sanitize, False, image, IND_OFF + 16 * j)
    for i in range(size):
        sanitize = ((i * 167 + salt) & 0xFF) < validity
        _decode_desc(data, DR_REC + 16 * i, i, size, sanitize, cfg[C_INDIRECT] == 1, image,
                     desc + 16 * i)
    mode = _b(data, H_AVAIL_MODE)
    raw = _u16(data, H_AVAIL_RAW)
    avail_idx = ((next_avail + raw % (size + 1)) & 0xFFFF) if mode < 224 else raw
    _put(image, avail, 2, _u16(data, H_AVAIL_FLAGS))
    _put(image, avail + 2, 2, avail_idx)
    for slot in range(size):
        v = _u16(data, AV_REC + 2 * slot)
        if ((slot * 89 + salt * 7 + 3) & 0xFF) < validity:
            head = v & (size - 1)
        elif v & 0x8000:
            head = v
        elif v & 0x4000:
            head = size + (v & 3)
        else:
            head = v & (size - 1)
        _put(image, avail + 4 + 2 * slot, 2, head)
    _put(image, avail + 4 + 2 * size, 2, _u16(data, H_USED_EVENT))
    # The used ring as a driver leaves it: flags 0, idx where the device resumes, no elements.
    for k in range(used_len):
        if 0 <= used + k < IMG_LEN:
            image[used + k] = 0
    _put(image, used + 2, 2, used_idx)
    return size


@njit(cache=True, nogil=True)
def used_ring_size_nb(size):
    return 4 + 8 * size + 2


# ---------------------------------------------------------------------------- the engine run --

@njit(cache=True, nogil=True)
def reset_queue(q, cfg):
    keep = q[K.Q_FLAGS] & K.F_DIRECT
    desc, avail, used = q[K.Q_DESC], q[K.Q_AVAIL], q[K.Q_USED]
    q[:] = 0
    q[K.Q_SIZE] = cfg[C_SIZE]
    q[K.Q_DESC] = desc
    q[K.Q_AVAIL] = avail
    q[K.Q_USED] = used
    q[K.Q_FLAGS] = keep | (K.F_EVENT_IDX if cfg[C_EVENT] else 0) | \
        (K.F_INDIRECT if cfg[C_INDIRECT] else 0)
    q[K.Q_NEXT_AVAIL] = cfg[C_NEXT_AVAIL]
    q[K.Q_NEXT_USED] = cfg[C_USED_IDX]
    q[K.Q_SIGNALLED_USED] = cfg[C_SIGNALLED]
    q[K.Q_SIGNALLED_VALID] = cfg[C_SIG_VALID]


E_RING_UNMAPPED = int(RingErrorCode.RING_UNMAPPED)
E_USED_ID = int(RingErrorCode.USED_ID_OUT_OF_RANGE)


@njit(cache=True, nogil=True)
def _check_burst(mem, q, n, before_avail, expect_used, maxc, heads, chain_end, seg_addr,
                 seg_len, seg_flags, out):
    """Oracle 1 for one burst: returns a violation code (0: fine)."""
    size = q[K.Q_SIZE]
    err = q[K.Q_ERROR]
    if n == -1:
        if err == 0:
            return V_BAD_RETURN
        if err < 1 or err > MAX_CODE or err == E_USED_ID:
            out[O_INFO] = err
            return V_BAD_CODE
        return 0
    if n < 0 or err != 0:
        return V_BAD_RETURN
    if n > maxc or n > size:
        out[O_INFO] = n
        return V_TOO_MANY
    if q[K.Q_NEXT_AVAIL] != (before_avail + n) & 0xFFFF or q[K.Q_NEXT_USED] != expect_used:
        return V_BAD_INDEX
    start = 0
    for k in range(n):
        if heads[k] < 0 or heads[k] >= size:
            out[O_INFO] = heads[k]
            return V_BAD_HEAD
        end = chain_end[k]
        if end <= start:
            return V_BAD_SEGMENT
        total = 0
        for j in range(start, end):
            if seg_len[j] < 0 or seg_addr[j] < 0 or (seg_flags[j] != 0 and seg_flags[j] != 2):
                out[O_INFO] = j
                return V_BAD_SEGMENT
            if not K.is_mapped(mem, K.SPACE_GPA, seg_addr[j], seg_len[j]):
                out[O_INFO] = seg_addr[j]
                return V_BAD_SEGMENT
            total += seg_len[j]
        if total > 0xFFFFFFFF:
            return V_BAD_SEGMENT
        start = end
    out[O_SEGS] = start
    return 0


@njit(cache=True, nogil=True)
def run_case(mem, q, views, cfg, heads, chain_end, seg_addr, seg_len, seg_flags, lens, hosts,
             frame, counters, out):
    """Run the configured kernels on one decoded input; fills out[] (oracle 1 inside)."""
    out[:] = 0
    counters[:] = 0
    maxc = cfg[C_MAXC]
    if cfg[C_NOTIF] & 1:
        K.disable_notification(mem, q, views)
    if cfg[C_NOTIF] & 2:
        out[O_ENABLE] = 1 if K.enable_notification(mem, q, views) else 0
    packets = 0
    for rnd in range(cfg[C_ROUNDS]):
        was_broken = q[K.Q_ERROR] != 0
        before_avail = q[K.Q_NEXT_AVAIL]
        before_used = q[K.Q_NEXT_USED]
        pushed = 0
        if cfg[C_KERNEL] == 0:
            n = K.pop_burst(mem, q, views, maxc, heads, chain_end, seg_addr, seg_len, seg_flags)
            v = _check_burst(mem, q, n, before_avail, before_used, maxc, heads, chain_end,
                             seg_addr, seg_len, seg_flags, out)
            if v == 0 and n > 0:
                start = 0
                for k in range(n):
                    if cfg[C_LENS] == 0:
                        lens[k] = 0
                    elif cfg[C_LENS] == 1:
                        t = 0
                        for j in range(start, chain_end[k]):
                            t += seg_len[j]
                        lens[k] = t & 0xFFFFFFFF
                    else:
                        lens[k] = (heads[k] * 2654435761) & 0xFFFFFFFF
                    start = chain_end[k]
                pushed = K.push_used_burst(mem, q, views, heads, lens, n)
                if pushed == -1:
                    # Completing what was just popped may fail only on an unmapped used ring.
                    if q[K.Q_ERROR] != E_RING_UNMAPPED:
                        out[O_INFO] = q[K.Q_ERROR]
                        v = V_BAD_CODE
                elif q[K.Q_NEXT_USED] != (before_used + n) & 0xFFFF:
                    v = V_BAD_INDEX
        else:
            n = NK.tx_drop_burst(mem, q, views, maxc, heads, chain_end, seg_addr, seg_len,
                                 seg_flags, hosts, frame, counters)
            # The drop kernel completes (and publishes) every chain it pops.
            expect_used = (before_used + max(n, 0)) & 0xFFFF
            v = _check_burst(mem, q, n, before_avail, expect_used, maxc, heads, chain_end,
                             seg_addr, seg_len, seg_flags, out)
            if n > 0:
                packets += n
            if v == 0 and n >= 0 and counters[NK.C_PACKETS] != packets:
                v = V_BAD_COUNTERS
        if was_broken and (n != -1 or q[K.Q_NEXT_AVAIL] != before_avail):
            v = V_NOT_STICKY
        if rnd == 0:
            out[O_N1] = n
            out[O_PUSH1] = pushed
        else:
            out[O_N2] = n
            out[O_PUSH2] = pushed
        if v != 0:
            out[O_VIOLATION] = v
            break
    out[O_ERROR] = q[K.Q_ERROR]
    out[O_ERROR_INFO] = q[K.Q_ERROR_INFO]
    return out[O_VIOLATION]


PADDED_LEN = MAX_INPUT + 16


def pad(arr: np.ndarray, out: np.ndarray) -> None:
    """Zero-fill the input to PADDED_LEN bytes: decoding then needs no bounds checks."""
    n = min(len(arr), PADDED_LEN)
    out[:n] = arr[:n]
    out[n:] = 0


def static_image() -> np.ndarray:
    """What the image holds where no input writes: frames of fixed pseudo-random bytes in the
    frame area, and the same at R1's head (straddling buffers read something frame-like)."""
    rng = np.random.default_rng(20240601)
    img = np.zeros(IMG_LEN, np.uint8)
    img[BUF_OFF:BUF_OFF + BUF_LEN] = rng.integers(0, 256, BUF_LEN, dtype=np.uint8)
    img[R0_SIZE:] = img[BUF_OFF:BUF_OFF + R1_HEAD]
    return img


@njit(cache=True, nogil=True)
def take_used(image, r0, r1, used_off, used_len, used_copy):
    """Copy the used ring's bytes (as far as the image holds them) into used_copy (oracle 3),
    then put the image's bytes back there, so that memory == image exactly when the device
    wrote nothing outside the used ring (oracle 2, then one word-wise comparison)."""
    lo = min(max(used_off, 0), IMG_LEN)
    hi = min(max(used_off + used_len, 0), IMG_LEN)
    for k in range(lo, hi):
        if k < R0_SIZE:
            used_copy[k - used_off] = r0[k]
            r0[k] = image[k]
        else:
            used_copy[k - used_off] = r1[k - R0_SIZE]
            r1[k - R0_SIZE] = image[k]


# ----------------------------------------------------------------------------- healthy queue --

HQ_SIZE = 8
HQ_DESC, HQ_AVAIL, HQ_USED, HQ_BUF = 0x0, 0x100, 0x200, 0x1000  # offsets in its R2 slice
HQ_SLICE = 0x4000  # one per path
HQ_PATTERN = np.frombuffer(bytes(range(64)), dtype=np.uint8).copy()


@njit(cache=True, nogil=True)
def healthy_round(mem, q, views, r2, base, pattern, heads, chain_end, seg_addr, seg_len,
                  seg_flags, lens):
    """Offer one 64-byte chain on the healthy queue (driver side, written straight into R2),
    pop and complete it through the kernels; 0 if everything is as a well-behaved device
    does it, else a code."""
    nxt = q[K.Q_NEXT_AVAIL]
    slot = nxt % HQ_SIZE
    buf_gpa = GPA_R2 + base + HQ_BUF + 64 * slot
    d = base + HQ_DESC + 16 * slot
    for k in range(8):
        r2[d + k] = (buf_gpa >> (8 * k)) & 0xFF
    r2[d + 8] = 64
    for k in range(9, 16):
        r2[d + k] = 0
    a = base + HQ_AVAIL
    r2[a + 4 + 2 * slot] = slot
    r2[a + 4 + 2 * slot + 1] = 0
    idx = (nxt + 1) & 0xFFFF
    r2[a + 2] = idx & 0xFF
    r2[a + 3] = idx >> 8
    b = base + HQ_BUF + 64 * slot
    r2[b:b + 64] = pattern
    n = K.pop_burst(mem, q, views, 4, heads, chain_end, seg_addr, seg_len, seg_flags)
    if n != 1:
        return 100 + n
    if heads[0] != slot or chain_end[0] != 1 or seg_addr[0] != buf_gpa or seg_len[0] != 64:
        return 2
    lens[0] = 0
    if K.push_used_burst(mem, q, views, heads, lens, 1) < 0:
        return 3
    u = base + HQ_USED
    if (np.int64(r2[u + 2]) | (np.int64(r2[u + 3]) << 8)) != q[K.Q_NEXT_USED]:
        return 4
    e = u + 4 + 8 * ((q[K.Q_NEXT_USED] - 1) & (HQ_SIZE - 1))
    if r2[e] != slot or r2[e + 1] != 0:
        return 5
    for k in range(64):
        if r2[b + k] != pattern[k]:
            return 6
    return 0


# ---------------------------------------------------------------------- random input engine --

@njit(cache=True, nogil=True)
def generate(buf, seed, corpus, corpus_ends):
    """A random input in buf (returns its length): fresh bytes, or a mutated corpus entry."""
    np.random.seed(seed)
    n_corpus = corpus_ends.shape[0]
    if n_corpus > 0 and np.random.random() < 0.3:
        c = np.random.randint(0, n_corpus)
        start = corpus_ends[c - 1] if c > 0 else 0
        length = corpus_ends[c] - start
        for k in range(length):
            buf[k] = corpus[start + k]
        if length == 0:
            return 0
        for _ in range(np.random.randint(1, 16)):
            pos = np.random.randint(0, length)
            kind = np.random.randint(0, 3)
            if kind == 0:
                buf[pos] = np.random.randint(0, 256)
            elif kind == 1:
                buf[pos] ^= np.uint8(1 << np.random.randint(0, 8))
            else:
                buf[pos] = buf[np.random.randint(0, length)]
        return length
    length = buf.shape[0] if np.random.random() < 0.8 else np.random.randint(0, buf.shape[0] + 1)
    # xorshift64: 8 bytes a step (np.random per byte would cost more than the run itself).
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
    k = 0
    while k < length:
        x ^= x << np.uint64(13)
        x ^= x >> np.uint64(7)
        x ^= x << np.uint64(17)
        for j in range(8):
            if k + j < length:
                buf[k + j] = np.uint8((x >> np.uint64(8 * j)) & np.uint64(0xFF))
        k += 8
    # Bias the header towards the interesting: small queues, mostly-valid tables, few jumps.
    if length > HDR_LEN:
        if np.random.random() < 0.5:
            buf[H_SIZE] = np.random.randint(0, 5)
        if np.random.random() < 0.5:
            buf[H_VALIDITY] = 255 - np.random.randint(0, 64)
        if np.random.random() < 0.5:
            buf[H_AVAIL_MODE] = np.random.randint(0, 224)
        if np.random.random() < 0.6:
            buf[H_PLACEMENT] = np.random.randint(0, 2)
    return length


# --------------------------------------------------------------------------------- harness --

class FuzzFailure(AssertionError):
    """An oracle said no; the message says which and how."""


@dataclass
class PathStats:
    execs: int = 0
    direct: int = 0          # runs whose metadata went through the direct map
    broken: int = 0          # runs that ended with the fuzzed queue broken
    chains: int = 0          # chains popped (first burst)
    codes: dict[str, int] = field(default_factory=dict)


class RingFuzzer:
    """Guest memory, queues and scratch made once; `run_one(data)` per input."""

    PATHS = ("direct", "copy")

    def __init__(self, out_dir: str | os.PathLike | None = None) -> None:
        self.ram = GuestRam()
        self.ram.add_region(GPA_R0, R0_SIZE).add_region(GPA_R1, R1_SIZE)
        self.ram.add_region(GPA_R2, R2_SIZE)
        self.memory: GuestMemory = backend_memory(self.ram)
        self.table = self.memory.table
        self.mem = self.table.kernel()
        regions = {r.guest_phys_addr: r for r in self.ram.regions}
        self.r0 = np.frombuffer(regions[GPA_R0].mm, dtype=np.uint8)
        self.r1 = np.frombuffer(regions[GPA_R1].mm, dtype=np.uint8)
        self.r2 = np.frombuffer(regions[GPA_R2].mm, dtype=np.uint8)
        self.user_r0 = self.ram.gpa_to_user(GPA_R0)
        self.static = static_image()
        self.image = np.zeros(IMG_LEN, dtype=np.uint8)
        # Word views for the bulk copies and comparisons (numpy's memcpy/memcmp speed).
        self.w_static = self.static.view(np.uint64)
        self.w_image = self.image.view(np.uint64)
        self.w_r0 = self.r0.view(np.uint64)
        self.w_r1 = self.r1[:R1_HEAD].view(np.uint64)
        self.w_img0 = self.w_image[:R0_SIZE // 8]
        self.w_img1 = self.w_image[R0_SIZE // 8:]
        self.padded = np.zeros(PADDED_LEN, dtype=np.uint8)
        self.cfg = np.zeros(CFG_LEN, dtype=np.int64)
        self.queues: dict[tuple[str, int, int], SplitQueue] = {}
        burst = 256
        self.heads = np.zeros(burst, np.int64)
        self.chain_end = np.zeros(burst, np.int64)
        segs = burst * 4 + 1024
        self.seg_addr = np.zeros(segs, np.int64)
        self.seg_len = np.zeros(segs, np.int64)
        self.seg_flags = np.zeros(segs, np.int64)
        self.lens = np.zeros(burst, np.int64)
        self.hosts = np.zeros(burst, np.int64)
        self.frame = np.zeros(NK.HEADER_BYTES, np.uint8)
        self.outs = {p: np.zeros(OUT_LEN, np.int64) for p in self.PATHS}
        self.counters = {p: np.zeros(NK.COUNTERS_LEN, np.int64) for p in self.PATHS}
        self.used = {p: np.zeros(used_ring_size(MAX_SIZE), np.uint8) for p in self.PATHS}
        self.qstate = {p: np.zeros(K.QSTATE_LEN, np.int64) for p in self.PATHS}
        self.segs = {p: np.zeros(0, np.int64) for p in self.PATHS}
        self.healthy = {p: self._healthy_queue(p, n * HQ_SLICE) for n, p in enumerate(self.PATHS)}
        self.stats = {p: PathStats() for p in self.PATHS}
        self.inputs = 0
        self._last = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            f = open(Path(out_dir) / "last-input.bin", "w+b")
            f.truncate(4 + MAX_INPUT)
            self._last = mmap.mmap(f.fileno(), 4 + MAX_INPUT)
            f.close()

    def _healthy_queue(self, path: str, base: int) -> SplitQueue:
        q = SplitQueue(90 + base // HQ_SLICE, path if path == "copy" else "direct")
        q.set_size(HQ_SIZE)
        user = self.ram.gpa_to_user(GPA_R2)
        q.set_addresses(user + base + HQ_DESC, user + base + HQ_AVAIL, user + base + HQ_USED)
        q.set_features(event_idx=True, indirect=True)
        return q

    def close(self) -> None:
        for q in list(self.queues.values()) + list(self.healthy.values()):
            q.drop_views()
        self.queues.clear()
        self.healthy.clear()
        self.r0 = self.r1 = self.r2 = None
        self.w_r0 = self.w_r1 = None
        self.table = self.mem = None
        # A view of guest memory can also be held by a garbage cycle (seen once in a full
        # test run, order-dependent); the mappings can only be closed once it is collected.
        gc.collect()
        self.memory.close()
        self.ram.close()
        if self._last is not None:
            self._last.close()

    def __enter__(self) -> "RingFuzzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one input ------------------------------------------------------------------------

    def _queue(self, path: str) -> SplitQueue:
        cfg = self.cfg
        size, placement = int(cfg[C_SIZE]), int(cfg[C_PLACEMENT])
        key = (path, size, placement if placement != 3 else 3)
        q = self.queues.get(key)
        if q is None:
            q = SplitQueue(0, "copy" if path == "copy" else "direct")
            q.set_size(size)
            self.queues[key] = q
        addrs = tuple(self.user_r0 + int(cfg[c]) for c in (C_DESC, C_AVAIL, C_USED))
        if not q.addresses_set or addrs != (int(q.q[K.Q_DESC]), int(q.q[K.Q_AVAIL]),
                                            int(q.q[K.Q_USED])):
            q.set_addresses(*addrs)
        return q

    def run_one(self, data: bytes | np.ndarray) -> None:
        """Run one input on both paths; raises FuzzFailure if an oracle says no."""
        arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        arr = arr[:MAX_INPUT]
        if self._last is not None:
            self._last[:4] = len(arr).to_bytes(4, "little")
            self._last[4:4 + len(arr)] = arr.tobytes()
        self.inputs += 1
        pad(arr, self.padded)
        self.w_image[:] = self.w_static
        decode(self.padded, self.image, self.cfg)
        cfg = self.cfg
        used_off, used_len = int(cfg[C_USED]), used_ring_size(int(cfg[C_SIZE]))
        for path in self.PATHS:
            self.w_r0[:] = self.w_img0
            self.w_r1[:] = self.w_img1
            queue = self._queue(path)
            reset_queue(queue.q, cfg)
            views = queue.round_views(self.table)
            out, counters = self.outs[path], self.counters[path]
            used = self.used[path]
            used[:] = 0
            violation = run_case(self.mem, queue.q, views, cfg, self.heads, self.chain_end,
                                 self.seg_addr, self.seg_len, self.seg_flags, self.lens,
                                 self.hosts, self.frame, counters, out)
            st = self.stats[path]
            st.execs += 1
            st.direct += bool(queue.q[K.Q_FLAGS] & K.F_DIRECT)
            if violation:
                raise FuzzFailure(f"{path} path: {VIOLATIONS.get(int(violation), violation)} "
                                  f"(info {int(out[O_INFO])}, error "
                                  f"{_code_name(int(out[O_ERROR]))}, out {out.tolist()})")
            if out[O_ERROR]:
                st.broken += 1
                name = _code_name(int(out[O_ERROR]))
                st.codes[name] = st.codes.get(name, 0) + 1
            st.chains += max(int(out[O_N1]), 0)
            self.qstate[path][:] = queue.q
            self.qstate[path][K.Q_FLAGS] &= ~K.F_DIRECT
            self.segs[path] = np.concatenate((self.heads[:max(int(out[O_N1]), 0)],
                                              self.seg_addr[:int(out[O_SEGS])],
                                              self.seg_len[:int(out[O_SEGS])]))
            take_used(self.image, self.r0, self.r1, used_off, used_len, used)
            if not (np.array_equal(self.w_r0, self.w_img0)
                    and np.array_equal(self.w_r1, self.w_img1)):
                bad = int(np.count_nonzero(self.r0 != self.image[:R0_SIZE])) + int(
                    np.count_nonzero(self.r1[:R1_HEAD] != self.image[R0_SIZE:]))
                raise FuzzFailure(f"{path} path: the device wrote {bad} bytes outside the "
                                  "used ring")
            h = self.healthy[path]
            hviews = h.round_views(self.table)
            code = healthy_round(self.mem, h.q, hviews, self.r2, (self.PATHS.index(path)) *
                                 HQ_SLICE, HQ_PATTERN, self.heads, self.chain_end,
                                 self.seg_addr, self.seg_len, self.seg_flags, self.lens)
            if code:
                raise FuzzFailure(f"{path} path: the healthy queue failed (code {code}, "
                                  f"{h.error_text()})")
        self._compare_paths()

    def _compare_paths(self) -> None:
        a, b = self.PATHS
        diffs = []
        if not np.array_equal(self.outs[a], self.outs[b]):
            diffs.append(f"results {self.outs[a].tolist()} != {self.outs[b].tolist()}")
        if not np.array_equal(self.qstate[a], self.qstate[b]):
            diffs.append(f"queue state {self.qstate[a].tolist()} != {self.qstate[b].tolist()}")
        if not np.array_equal(self.counters[a], self.counters[b]):
            diffs.append("drop counters")
        if not np.array_equal(self.segs[a], self.segs[b]):
            diffs.append("popped chains")
        if not np.array_equal(self.used[a], self.used[b]):
            diffs.append("used ring bytes")
        if diffs:
            raise FuzzFailure("direct and copy paths disagree: " + "; ".join(diffs))

    def summary(self) -> dict:
        return {"inputs": self.inputs,
                "paths": {p: {"execs": s.execs, "direct_share": s.direct / max(s.execs, 1),
                              "broken": s.broken, "chains_popped": s.chains,
                              "error_codes": dict(sorted(s.codes.items()))}
                          for p, s in self.stats.items()}}


def _code_name(code: int) -> str:
    try:
        return RingErrorCode(code).name
    except ValueError:
        return f"code {code}"


# ----------------------------------------------------------------------------------- corpus --

def load_corpus(directory: Path = CORPUS) -> list[bytes]:
    if not directory.is_dir():
        return []
    return [p.read_bytes() for p in sorted(directory.glob("*.bin"))]


def _pack_corpus(entries: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    if not entries:
        return np.zeros(1, np.uint8), np.zeros(0, np.int64)
    blob = np.frombuffer(b"".join(e[:MAX_INPUT] for e in entries), dtype=np.uint8).copy()
    ends = np.cumsum([len(e[:MAX_INPUT]) for e in entries]).astype(np.int64)
    return blob, ends


# ------------------------------------------------------------------------------------- runs --

@dataclass
class RunResult:
    inputs: int
    seconds: float
    failures: list[str]
    summary: dict


def run(execs: int, seed: int = 1, out_dir: str | os.PathLike | None = None,
        max_failures: int = 20, watchdog: float = 60.0, progress: float = 0.0,
        corpus: list[bytes] | None = None, seconds: float | None = None) -> RunResult:
    """The built-in engine: corpus replay, then `execs` generated inputs (or until `seconds`)."""
    corpus = load_corpus() if corpus is None else corpus
    blob, ends = _pack_corpus(corpus)
    failures: list[str] = []
    buf = np.zeros(MAX_INPUT, np.uint8)
    start = last_report = time.monotonic()
    with RingFuzzer(out_dir) as fz:
        def one(data: np.ndarray, label: str) -> None:
            try:
                fz.run_one(data)
            except FuzzFailure as exc:
                failures.append(f"{label}: {exc}")
                if out_dir is not None:
                    (Path(out_dir) / f"failure-{len(failures)}.bin").write_bytes(data.tobytes())
        for n, entry in enumerate(corpus):
            one(np.frombuffer(entry, np.uint8), f"corpus[{n}]")
        i = 0
        while i < execs and len(failures) < max_failures:
            if i % 1000 == 0:
                if watchdog:
                    faulthandler.dump_traceback_later(watchdog, exit=True)
                now = time.monotonic()
                if seconds is not None and now - start > seconds:
                    break
                if progress and now - last_report > progress:
                    last_report = now
                    print(f"[ring_fuzz] {i} inputs, {i / (now - start):.0f}/s, "
                          f"{len(failures)} failures", file=sys.stderr, flush=True)
            length = generate(buf, (seed * 0x9E3779B1 + i) & 0xFFFFFFFF, blob, ends)
            one(buf[:length], f"seed {seed} input {i}")
            i += 1
        if watchdog:
            faulthandler.cancel_dump_traceback_later()
        summary = fz.summary()
    return RunResult(summary["inputs"], time.monotonic() - start, failures, summary)


FEATURE_BITS = 11


def outcome_feature(fz: RingFuzzer) -> int:
    """A number for what the last input did (error code, kernel, placement, chains popped,
    event index, second burst): atheris sees Python coverage only, not the compiled engine,
    so `_feedback` turns each distinct outcome into a distinct branch of Python code."""
    out, cfg = fz.outs["direct"], fz.cfg
    n1 = int(out[O_N1])
    bucket = 0 if n1 <= 0 else 1 if n1 == 1 else 2 if n1 < 8 else 3
    f = int(out[O_ERROR])
    for value, radix in ((int(cfg[C_KERNEL]), 2), (int(cfg[C_PLACEMENT]), 5), (bucket, 4),
                         (int(cfg[C_EVENT]), 2), (int(cfg[C_ROUNDS]) - 1, 2)):
        f = f * radix + value
    return f % (1 << FEATURE_BITS)


def _feedback_source(bits: int) -> str:
    """def fb(x): a complete binary tree of ifs over x, one leaf (basic block) per value."""
    lines = ["def fb(x):"]

    def node(lo: int, hi: int, depth: int) -> None:
        pad = "    " * depth
        if hi - lo == 1:
            lines.append(f"{pad}return {lo}")
            return
        mid = (lo + hi) // 2
        lines.append(f"{pad}if x < {mid}:")
        node(lo, mid, depth + 1)
        lines.append(f"{pad}else:")
        node(mid, hi, depth + 1)

    node(0, 1 << bits, 1)
    return "\n".join(lines) + "\n"


def run_atheris(argv: list[str], out_dir: str | None) -> None:
    import atheris  # optional: pip install atheris

    namespace: dict = {}
    exec(compile(_feedback_source(FEATURE_BITS), "<ring-feedback>", "exec"), namespace)
    feedback = atheris.instrument_func(namespace["fb"])
    fz = RingFuzzer(out_dir)

    def test_one_input(data: bytes) -> None:
        fz.run_one(data)
        feedback(outcome_feature(fz))
        if fz.inputs % 100_000 == 0:
            print(json.dumps(fz.summary()), file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], f"-max_len={MAX_INPUT}"] + argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        print(json.dumps(fz.summary()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execs", type=int, default=100_000, help="generated inputs (per path)")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="/tmp/pyvhost-fuzz/ring",
                    help="where the last input and failing inputs are written")
    ap.add_argument("--json", help="write the run's figures here")
    ap.add_argument("--engine", choices=("random", "atheris"), default="random")
    ap.add_argument("--replay", nargs="*", help="run these input files and report")
    ap.add_argument("--write-corpus", action="store_true", help="(re)write fuzz/corpus/ring")
    ap.add_argument("rest", nargs="*", help="after --: libFuzzer flags (atheris engine)")
    args = ap.parse_args(argv)
    if args.write_corpus:
        from fuzz.ring_corpus import write_corpus
        for p in write_corpus(CORPUS):
            print(p)
        return 0
    if args.replay is not None:
        with RingFuzzer() as fz:
            bad = 0
            for name in args.replay:
                try:
                    fz.run_one(Path(name).read_bytes())
                    print(f"{name}: ok")
                except FuzzFailure as exc:
                    bad += 1
                    print(f"{name}: FAIL {exc}")
            print(json.dumps(fz.summary(), indent=1))
        return 1 if bad else 0
    if args.engine == "atheris":
        run_atheris(args.rest, args.out)
        return 0
    res = run(args.execs, args.seed, args.out, progress=10.0, seconds=args.seconds)
    report = {"engine": "random", "seed": args.seed, "inputs": res.inputs,
              "seconds": round(res.seconds, 1), "inputs_per_s": round(res.inputs / res.seconds),
              "failures": res.failures, **res.summary}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
