"""Byte loads and stores at a host address, for the copy path in compiled code.

The copy path translates a guest address to a host address inside our mapping of the region
and then copies, byte by byte, as copy_from_user would. numba has no pointer-from-integer
operation, so these intrinsics emit the LLVM `inttoptr` + load/store themselves. The callers
bound every address by the region it was translated in.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def load_u8(typingctx, addr):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        return builder.load(ptr)
    return types.uint8(types.int64), codegen


@intrinsic
def store_u8(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        byte = context.cast(builder, args[1], signature.args[1], types.uint8)
        builder.store(byte, ptr)
        return context.get_dummy_value()
    return types.void(types.int64, value), codegen
