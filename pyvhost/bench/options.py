"""Command-line options of the vhost benchmark, apart from it so that `pyvhost.cli` can offer
`pyvhost bench` without importing the harness (which uses pyvhost.testing) for `pyvhost net`."""

from __future__ import annotations

import argparse
import os

PYVHOST_COPY = "pyvhost-copy"
PYVHOST_DIRECT = "pyvhost-direct"
DPDK_VHOST = "dpdk-vhost"
TX_CONTENDERS = (PYVHOST_COPY, PYVHOST_DIRECT, DPDK_VHOST)
# The same pyvhost backends dirty-logging every page they write (`--bench-log-all`: LOG_ALL as
# during a live migration, which virtio-user cannot negotiate), for what logging costs.
PYVHOST_COPY_LOG = "pyvhost-copy-log"
PYVHOST_DIRECT_LOG = "pyvhost-direct-log"
LOGGING_OF = {PYVHOST_COPY_LOG: PYVHOST_COPY, PYVHOST_DIRECT_LOG: PYVHOST_DIRECT}
# The same backends over packed virtqueues (virtio-user `packed_vq=1`; `--packed`).
PYVHOST_COPY_PACKED = "pyvhost-copy-packed"
PYVHOST_DIRECT_PACKED = "pyvhost-direct-packed"
DPDK_VHOST_PACKED = "dpdk-vhost-packed"
PACKED_OF = {PYVHOST_COPY_PACKED: PYVHOST_COPY, PYVHOST_DIRECT_PACKED: PYVHOST_DIRECT,
             DPDK_VHOST_PACKED: DPDK_VHOST}
ALL_CONTENDERS = TX_CONTENDERS + tuple(LOGGING_OF) + tuple(PACKED_OF)
DEFAULT_OUT_DIR = "bench/results"  # ignored by git


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench options (also used by `pyvhost bench` in pyvhost.cli)."""
    cpus = sorted(os.sched_getaffinity(0))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 0.5 s warm-up, 1 s windows (under a "
                             "minute on a quiet machine)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--sizes", default="64,1518", help="packet sizes, comma-separated")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds skipped after the generator starts (default 1)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds measured per sample (default 5)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between counter readings (default 1)")
    parser.add_argument("--contenders", default=",".join(TX_CONTENDERS),
                        help=f"subset of {','.join(ALL_CONTENDERS)}")
    parser.add_argument("--dirty-log", action="store_true",
                        help="also each pyvhost contender with dirty logging on, alternated "
                             "with it (`pyvhost net --bench-log-all`: every page written is "
                             "logged as during a live migration, into a private log cleared "
                             "every 10 ms; virtio-user cannot turn LOG_ALL on itself)")
    parser.add_argument("--packed", action="store_true",
                        help="also each of pyvhost copy, pyvhost direct and DPDK's vhost PMD "
                             "over packed virtqueues (virtio-user packed_vq=1), alternated "
                             "with the split ones")
    parser.add_argument("--no-rx", action="store_true", help="skip the RX direction")
    parser.add_argument("--no-loopback", action="store_true",
                        help="skip the loopback runs (pyvhost --source loopback vs the vhost PMD "
                             "in io mode; only when pyvhost has that source)")
    parser.add_argument("--no-tap", action="store_true",
                        help="skip the TAP runs (TAP TX and TAP RX against DPDK's vhost PMD + "
                             "TAP PMD, the TAP in a network namespace)")
    parser.add_argument("--only", default=None,
                        help="run only these directions (comma-separated of tx, rx, loop, "
                             "tap-tx, tap-rx)")
    parser.add_argument("--no-huge", action="store_true",
                        help="testpmd without hugepages (default: hugepages when available)")
    parser.add_argument("--memory-mib", type=int, default=256, help="testpmd -m (per instance)")
    parser.add_argument("--backend-cpu", type=int, default=cpus[-1])
    parser.add_argument("--generator-cpu", type=int, default=cpus[0])
    parser.add_argument("--load-threshold", type=float, default=0.5,
                        help="warn when the 1-minute load average at start exceeds this")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where vhost.json, vhost.md, vhost.png go (default {DEFAULT_OUT_DIR})")
    return parser


# -- pyvhost bench blk --------------------------------------------------------------------------

PYVHOST = "pyvhost"
PYVHOST_THREADS = "pyvhost-threads"  # `pyvhost blk --io threads`, where pyvhost has --io
QSD = "qsd"
FIO = "fio"
BLK_CONTENDERS = (PYVHOST, PYVHOST_THREADS, QSD, FIO)
BLK_DEFAULT_CONTENDERS = (PYVHOST, QSD, FIO)
BLK_BACKINGS = ("null", "pagecache", "direct")
BLK_WORKLOADS = ("randread", "randwrite")


def add_blk_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `pyvhost bench blk` (pyvhost.bench.blk)."""
    cpus = sorted(os.sched_getaffinity(0))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 0.2 s warm-up, 0.5 s windows, 64 MiB "
                             "files")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds skipped before each window (default 1)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds measured per workload (default 3)")
    parser.add_argument("--qd", default="1,8,32,128", help="queue depths, comma-separated")
    parser.add_argument("--workloads", default=",".join(BLK_WORKLOADS),
                        help=f"subset of {','.join(BLK_WORKLOADS)}")
    parser.add_argument("--backings", default=",".join(BLK_BACKINGS),
                        help=f"subset of {','.join(BLK_BACKINGS)}")
    parser.add_argument("--contenders", default=",".join(BLK_DEFAULT_CONTENDERS),
                        help=f"subset of {','.join(BLK_CONTENDERS)} (fio: the host ceiling; "
                             f"{PYVHOST_THREADS}: pyvhost's handle() + I/O threads data path, "
                             f"when it has --io; default {','.join(BLK_DEFAULT_CONTENDERS)})")
    parser.add_argument("--size-mib", type=int, default=None,
                        help="disk size in MiB (default 1024)")
    parser.add_argument("--cache-dir", default="/dev/shm",
                        help="tmpfs directory for the page-cache file (default /dev/shm)")
    parser.add_argument("--disk-dir", default="/var/tmp",
                        help="directory on a disk for the O_DIRECT file (default /var/tmp)")
    parser.add_argument("--queue-size", type=int, default=256, help="ring size (default 256)")
    parser.add_argument("--chains", choices=("indirect", "direct"), default="indirect",
                        help="requests as one indirect descriptor (as Linux) or 3 direct ones")
    parser.add_argument("--interrupts", action="store_true",
                        help="the front-end waits for used-buffer notifications (call eventfd) "
                             "instead of polling the used ring")
    parser.add_argument("--pyvhost-args", default="",
                        help="extra `pyvhost blk` arguments, one string (default: none, its "
                             "defaults; write it with =: --pyvhost-args=\"--poll\")")
    parser.add_argument("--qsd-main-loop", action="store_true",
                        help="qemu-storage-daemon without an iothread")
    parser.add_argument("--backend-cpu", type=int, default=cpus[-1])
    parser.add_argument("--frontend-cpu", type=int, default=cpus[0])
    parser.add_argument("--load-threshold", type=float, default=0.5,
                        help="warn when the 1-minute load average at start exceeds this")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where blk.json, blk.md, blk.png go (default {DEFAULT_OUT_DIR})")
    return parser
