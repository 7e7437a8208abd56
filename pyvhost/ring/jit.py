"""How every compiled kernel is built.

nogil: bursts run in parallel with the protocol thread. cache: compiled once per machine.
_nrt=False: kernels never allocate, and without the numba runtime no reference counts are
touched; with it, every non-inlined call passing our tuples of arrays paid ~50 ns of atomic
increments and decrements — more than the work of a whole descriptor.
"""

from numba import njit


def kernel(fn):
    return njit(nogil=True, cache=True, _nrt=False)(fn)


def inlined_kernel(fn):
    """A small kernel inlined into its compiled callers (numba IR inlining): LLVM would not
    inline it across numba's per-function modules, and each call would copy the exploded
    array tuples (dozens of words) and lose the optimisations around it."""
    return njit(nogil=True, cache=True, _nrt=False, inline="always")(fn)
