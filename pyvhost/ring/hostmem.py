"""Byte loads and stores at a host address, for the copy path in compiled code.

The copy path translates a guest address to a host address inside our mapping of the region
and then copies, byte by byte, as copy_from_user would. numba has no pointer-from-integer
operation, so these intrinsics emit the LLVM `inttoptr` + load/store themselves. The callers
bound every address by the region it was translated in.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils

from pyvhost.ring.jit import intrinsic


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


def _load(bits: int, nbtype, *, atomic: bool):
    """A `bits`-bit load at a host address: atomic (relaxed; the address naturally aligned),
    or a plain one at any alignment."""
    @intrinsic
    def load(typingctx, addr):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            if atomic:
                return builder.load_atomic(ptr, "monotonic", bits // 8)
            return builder.load(ptr, align=1)
        return nbtype(types.int64), codegen
    return load


def _store(bits: int, nbtype, *, atomic: bool):
    """A `bits`-bit store at a host address: atomic (relaxed; the address naturally aligned),
    or a plain one at any alignment."""
    @intrinsic
    def store(typingctx, addr, value):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            val = context.cast(builder, args[1], signature.args[1], nbtype)
            if atomic:
                builder.store_atomic(val, ptr, "monotonic", bits // 8)
            else:
                builder.store(val, ptr, align=1)
            return context.get_dummy_value()
        return types.void(types.int64, value), codegen
    return store


# Single-access (untearable) loads and stores of naturally aligned ring fields: the driver
# updates avail->idx and reads used->idx concurrently, so a 16-bit index copied byte by byte
# can be seen half old, half new (observed against DPDK virtio-user: "avail index moved too
# far"). Relaxed atomics compile to plain movs on x86; the ring's fences still order them.
load_u16 = _load(16, types.uint16, atomic=True)
load_u32 = _load(32, types.uint32, atomic=True)
load_u64 = _load(64, types.uint64, atomic=True)
store_u16 = _store(16, types.uint16, atomic=True)
store_u32 = _store(32, types.uint32, atomic=True)
# Plain little-endian stores at any alignment, for guest buffers nobody reads concurrently
# (e.g. a virtio-net header written into an RX buffer before the used element publishes it).
store_u16_unaligned = _store(16, types.uint16, atomic=False)
store_u64_unaligned = _store(64, types.uint64, atomic=False)


# Their loads: to see whether a buffer already holds what would be stored (a store that
# changes nothing still takes the line from the other core's cache).
load_u16_unaligned = _load(16, types.uint16, atomic=False)
load_u64_unaligned = _load(64, types.uint64, atomic=False)


@intrinsic
def atomic_or_u8(typingctx, addr, value):
    """`*addr |= value` as one atomic read-modify-write (LLVM `atomicrmw or`; x86 `lock or`,
    which also orders every earlier store before it). The dirty log is shared with the
    frontend, which clears it with xchg while we set bits, and with our other workers: a plain
    OR would lose bits (DPDK 897f13a1f7)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        val = context.cast(builder, args[1], signature.args[1], types.uint8)
        builder.atomic_rmw("or", ptr, val, "monotonic")
        return context.get_dummy_value()
    return types.void(types.int64, value), codegen


@intrinsic
def atomic_or_u64(typingctx, addr, value):
    """`*addr |= value` on a naturally aligned 64-bit word, atomically (as atomic_or_u8): 64
    dirty-log pages in one `lock or`. QEMU clears the log in 64-bit chunks (xchg), so a word
    is never torn between it and us; DPDK ORs bytes, which is the same to QEMU."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        val = context.cast(builder, args[1], signature.args[1], types.uint64)
        builder.atomic_rmw("or", ptr, val, "monotonic")
        return context.get_dummy_value()
    return types.void(types.int64, value), codegen


@intrinsic
def atomic_xchg_u64(typingctx, addr, value):
    """`old = *addr; *addr = value` as one atomic exchange (x86 `xchg`): how QEMU takes and
    clears a 64-bit chunk of the dirty log while the device sets bits in it."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        val = context.cast(builder, args[1], signature.args[1], types.uint64)
        return builder.atomic_rmw("xchg", ptr, val, "seq_cst")
    return types.uint64(types.int64, value), codegen


@intrinsic
def popcount(typingctx, value):
    """Bits set in a 64-bit integer (LLVM `ctpop`; x86 `popcnt` where the CPU has it)."""
    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[0], signature.args[0], types.int64)
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")
        return builder.call(fn, [val])
    return types.int64(value), codegen


@intrinsic
def store_line_streaming(typingctx, dst, src):
    """The 64 bytes at host address src (any alignment) to the cache line at host address dst
    (64-aligned) with a non-temporal store (x86 MOVNTDQ): the line goes to memory without
    being taken into this core's cache, and any other core's copy is dropped. Weakly ordered:
    `barriers.fence_streaming_stores` must come before the store that publishes it."""
    def codegen(context, builder, signature, args):
        line = ir.VectorType(ir.IntType(64), 8)
        value = builder.load(builder.inttoptr(args[1], line.as_pointer()), align=1)
        store = builder.store(value, builder.inttoptr(args[0], line.as_pointer()), align=64)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(types.int64, types.int64), codegen


def _prefetch(rw: int):
    """An intrinsic calling LLVM `prefetch` (rw 0: read, 1: write; high locality, data)."""
    @intrinsic
    def hint(typingctx, addr):
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(rw), i32(3), i32(1)])
            return context.get_dummy_value()
        return types.void(types.int64), codegen
    return hint


#: Hint the CPU to start loading the cache line at a host address. Never faults, so it may run
#: before the address is known to be used; the bursts use it to overlap the cache misses of a
#: whole burst of frames the driver's core has just written, instead of taking them one after
#: another.
prefetch = _prefetch(0)
#: `prefetch` with intent to write (x86 PREFETCHW): start taking the cache line into this
#: core's cache exclusively, for a buffer about to be written whose line another core (the
#: driver's, which read it last) holds. Never faults.
prefetch_write = _prefetch(1)
