"""Memory barriers for compiled code (virtio 1.x 2.7.7.1, 2.7.13.3.1 and the vring_need_event race).

numba has no barrier primitive, so these intrinsics emit LLVM `fence` instructions. On x86 the
acquire and release fences compile to no instruction but still stop the compiler from moving
loads/stores across them; the sequentially consistent one is an `mfence`, needed only between
publishing used->idx and reading avail->flags / used_event (a store followed by a load).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.ring.jit import intrinsic


def _fence(ordering: str):
    @intrinsic
    def fence(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence(ordering)
            return context.get_dummy_value()
        return types.void(), codegen
    return fence


fence_acquire = _fence("acquire")
fence_release = _fence("release")
fence_seq_cst = _fence("seq_cst")


@intrinsic
def fence_streaming_stores(typingctx):
    """x86 SFENCE: every earlier non-temporal store (`hostmem.store_line_streaming`) is
    visible before any later store. x86 orders ordinary stores by itself, so the release
    fence above is no instruction; non-temporal stores it does not order, so a used index
    published after them needs this first."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.sfence"),
                     [])
        return context.get_dummy_value()
    return types.void(), codegen
