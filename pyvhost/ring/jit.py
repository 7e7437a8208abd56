"""How every compiled kernel is built.

nogil: bursts run in parallel with the protocol thread. cache: compiled once per machine.
_nrt=False: kernels never allocate, and without the numba runtime no reference counts are
touched; with it, every non-inlined call passing our tuples of arrays paid ~50 ns of atomic
increments and decrements — more than the work of a whole descriptor.
"""

import hashlib
import os
from pathlib import Path

import numba
from numba import njit


def _source_keyed_cache_dir() -> str:
    """A cache folder keyed by the source of every module that holds kernels.

    numba's cache checks only the timestamp of the file a function is defined in: a kernel
    that inlines a changed function from another file would keep running the old code. Keying
    the folder on all kernel sources makes any change start a fresh cache.
    """
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] in ("ring", "devices", "memory") or rel.name == "device.py":
            digest.update(str(rel).encode())
            digest.update(path.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvhost" / "numba"
    return str(base / digest.hexdigest()[:16])


if not os.environ.get("NUMBA_CACHE_DIR"):  # a user's explicit choice wins
    numba.config.CACHE_DIR = _source_keyed_cache_dir()


def kernel(fn):
    return njit(nogil=True, cache=True, _nrt=False)(fn)


def inlined_kernel(fn):
    """A small kernel inlined into its compiled callers (numba IR inlining): LLVM would not
    inline it across numba's per-function modules, and each call would copy the exploded
    array tuples (dozens of words) and lose the optimisations around it."""
    return njit(nogil=True, cache=True, _nrt=False, inline="always")(fn)


def overload_entry(dispatcher, args: tuple):
    """The compiled entry point that `dispatcher(*args)` runs, or None if it is not compiled.

    Calling it skips numba's typing of every argument on every call (1.3 of the 2.3 us a TX
    burst call costs, at ~100,000 calls/s on a busy ring). It checks no argument type itself,
    so a caller may reuse it only with arguments of exactly these types (dtype, dimensions,
    layout, alignment, writability) and must key its cache on whatever can change them.
    """
    sig = tuple(numba.typeof(a) for a in args)
    compiled = dispatcher.overloads.get(sig)
    return None if compiled is None else compiled.entry_point
