"""How every compiled kernel is built.

nogil: bursts run in parallel with the protocol thread. cache: compiled once per machine.
_nrt=False: kernels never allocate, and without the numba runtime no reference counts are
touched; with it, every non-inlined call passing our tuples of arrays paid ~50 ns of atomic
increments and decrements — more than the work of a whole descriptor.
"""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numba
from numba import njit
from numba.extending import intrinsic as _numba_intrinsic

if TYPE_CHECKING:
    from numba.core.dispatcher import Dispatcher

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")


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
    # numba.config sets its options as module attributes at import; its stubs declare none.
    numba.config.CACHE_DIR = _source_keyed_cache_dir()  # type: ignore[attr-defined]


# `_nrt` is a private numba option, absent from numba's typed options (hence the ignores).
# Typed as Dispatcher[F], a kernel's callers are checked against its Python signature.
def kernel(fn: F) -> "Dispatcher[F]":
    return njit(nogil=True, cache=True, _nrt=False)(fn)  # type: ignore[call-overload]


def inlined_kernel(fn: F) -> "Dispatcher[F]":
    """A small kernel inlined into its compiled callers by LLVM (`alwaysinline`): a call that
    is not inlined copies the exploded array tuples (dozens of words) and loses the
    optimisations around it.

    Not numba's IR inlining (`inline="always"`): it deep-copies the callee's IR and re-runs
    type inference at every call site, nested, and made a cold compile of the net kernels take
    over 20 minutes on 2 cores (ring/chains.py's pop_requests alone: 40 s, 62% of it in
    copy.deepcopy). With forceinline numba compiles each function once and LLVM inlines it
    when the caller's module is linked: pop_requests compiles in 18 s and runs as fast."""
    return njit(  # type: ignore[call-overload]
        nogil=True, cache=True, _nrt=False, forceinline=True)(fn)


def intrinsic(defn: Callable[Concatenate[Any, P], Any]) -> Callable[P, Any]:
    """numba's @intrinsic, typed as compiled code calls it: without the typing context, and
    returning a value of the type the definition's signature gives (unknown to Python).

    numba's own stubs type the call with the definition's parameters and as never returning,
    which would make mypy reject every call and skip the code after it."""
    return _numba_intrinsic(defn)  # type: ignore[return-value]


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
