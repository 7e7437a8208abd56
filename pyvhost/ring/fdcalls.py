"""read(2), readv(2), writev(2), pread(2), pwrite(2), preadv2(2), pwritev2(2), fdatasync(2) and
errno, called from compiled kernels.

Why: a data path that moves frames between guest memory and a file descriptor (a TAP) must
not come back to Python for each frame: a CPython `os.write` costs a microsecond or more on
top of the system call. These intrinsics emit direct calls to the C library's functions by
name; the JIT linker resolves them in the running process (libc is always loaded), also when
a kernel comes from numba's cache, since the object code names the symbol, not its address.
The calls release nothing and take nothing: kernels run without the GIL already.

Every call returns the C function's result as int64 (-1 on error, then `errno_value()` says
why). The caller passes host addresses it bounds itself (guest buffers translated and checked
through the region table, or numpy arrays it owns).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.ring.jit import intrinsic

EAGAIN = 11
EINTR = 4

_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _libc(builder: ir.IRBuilder, name: str, ret: ir.Type, params: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)


def _vectored(name: str):
    """`name`(fd, iov, count) (readv or writev): iov is the host address of `count` struct
    iovec (two int64 each: base address, length). Returns bytes moved or -1."""
    @intrinsic
    def call(typingctx, fd, iov, count):
        def codegen(context, builder, sig, args):
            fn = _libc(builder, name, _I64, [_I32, _I8P, _I32])
            return builder.call(fn, [builder.trunc(args[0], _I32),
                                     builder.inttoptr(args[1], _I8P),
                                     builder.trunc(args[2], _I32)])
        return types.int64(types.int64, types.int64, types.int64), codegen
    return call


def _vectored_at(name: str):
    """`name`(fd, iov, count, offset, flags) (preadv2 or pwritev2), iov as for `_vectored`.
    Returns bytes moved or -1."""
    @intrinsic
    def call(typingctx, fd, iov, count, offset, flags):
        def codegen(context, builder, sig, args):
            fn = _libc(builder, name, _I64, [_I32, _I8P, _I32, _I64, _I32])
            return builder.call(fn, [builder.trunc(args[0], _I32),
                                     builder.inttoptr(args[1], _I8P),
                                     builder.trunc(args[2], _I32), args[3],
                                     builder.trunc(args[4], _I32)])
        return (types.int64(types.int64, types.int64, types.int64, types.int64, types.int64),
                codegen)
    return call


sys_writev = _vectored("writev")
sys_readv = _vectored("readv")
sys_preadv2 = _vectored_at("preadv2")
sys_pwritev2 = _vectored_at("pwritev2")


@intrinsic
def sys_read(typingctx, fd, buf, count):
    """read(fd, buf, count) into host address `buf`. Returns bytes read or -1."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "read", _I64, [_I32, _I8P, _I64])
        return builder.call(fn, [builder.trunc(args[0], _I32), builder.inttoptr(args[1], _I8P),
                                 args[2]])
    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def sys_write(typingctx, fd, buf, count):
    """write(fd, buf, count) from host address `buf`. Returns bytes written or -1."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "write", _I64, [_I32, _I8P, _I64])
        return builder.call(fn, [builder.trunc(args[0], _I32), builder.inttoptr(args[1], _I8P),
                                 args[2]])
    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def errno_value(typingctx):
    """This thread's errno (glibc's __errno_location), as int64."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "__errno_location", _I32.as_pointer(), [])
        return builder.sext(builder.load(builder.call(fn, [])), _I64)
    return types.int64(), codegen


@intrinsic
def sys_pread(typingctx, fd, buf, count, offset):
    """pread(fd, buf, count, offset) into host address `buf`. Returns bytes read or -1."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "pread64", _I64, [_I32, _I8P, _I64, _I64])
        return builder.call(fn, [builder.trunc(args[0], _I32), builder.inttoptr(args[1], _I8P),
                                 args[2], args[3]])
    return types.int64(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def sys_pwrite(typingctx, fd, buf, count, offset):
    """pwrite(fd, buf, count, offset) from host address `buf`. Returns bytes written or -1."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "pwrite64", _I64, [_I32, _I8P, _I64, _I64])
        return builder.call(fn, [builder.trunc(args[0], _I32), builder.inttoptr(args[1], _I8P),
                                 args[2], args[3]])
    return types.int64(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def sys_fdatasync(typingctx, fd):
    """fdatasync(fd). Returns 0 or -1."""
    def codegen(context, builder, sig, args):
        fn = _libc(builder, "fdatasync", _I32, [_I32])
        return builder.sext(builder.call(fn, [builder.trunc(args[0], _I32)]), _I64)
    return types.int64(types.int64), codegen
