"""virtio-blk's data path in compiled code: requests parsed, checked and submitted to io_uring,
completions published, all without the GIL and without Python per request.

`blk_poll` runs bursts on one ring (as the net kernels do, within a `PollWindow`). A burst:
1. reaps the io_uring completions posted since the last one (no system call: the CQ is mapped)
   and finishes their requests: status byte, dirty log, used element;
2. pops chains (`ring/chains.py pop_requests`: every descriptor checked, buffers translated
   into host pieces), parses and checks each header — as `device.py`'s `handle()` does, with
   the same answers — and either answers it at once (GET_ID, a bad range, an unsupported
   type, a null disk...) or prepares its SQEs: READV/WRITEV straight into and out of the
   guest's buffers (the iovecs are the chain's pieces), FSYNC (datasync) for FLUSH, FALLOCATE
   for DISCARD and WRITE_ZEROES (one a segment, linked);
3. submits them with one io_uring_enter, reaps what completed inline (page-cache hits), adds
   the used elements and publishes them once, and decides on the interrupt.

Requests whose I/O is still running stay in the per-queue in-flight table `inf` (a row per
head) across calls; the caller pins the burst's region table while any is in flight, so their
guest buffers stay mapped whatever the memory map does (`uring_io.py`). A head made available
again while it is in flight breaks the queue (the guest broke the protocol; the row is the
device's own state and is never overwritten).

Every guest-controlled value is checked here: header length, status byte present, data
lengths a multiple of 512 (and of blk_size), sector ranges inside the capacity (no overflow:
int64 and sectors >= 2**63 are out of range), segment lists bounded (count, sectors, flags)
before any of them is read, GET_ID buffer size, iovec counts. Nothing is ever read or written
outside [0, capacity) of the image: the kernel only submits ranges it checked.
"""

from __future__ import annotations

import numpy as np

from pyvhost.ring import kernels as K
from pyvhost.ring import uring as U
from pyvhost.ring.chains import pop_requests
from pyvhost.ring.errors import RingErrorCode as E
from pyvhost.ring.fdcalls import (
    EINTR,
    errno_value,
    sys_fdatasync,
    sys_pread,
    sys_preadv2,
    sys_pwrite,
    sys_pwritev2,
)
from pyvhost.ring.hostmem import load_u8, store_u8
from pyvhost.ring.inflight import inflight_resubmit_pending, publish_used_inflight
from pyvhost.ring.jit import inlined_kernel, kernel
from pyvhost.ring.poll import read_cycles, window_goes_on

SECTOR = 512
HEADER_LEN = 16
SEGMENT_LEN = 16
ID_BYTES = 20
UIO_MAXIOV = 1024

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SEGMENT_FLAG_UNMAP = 1

# fallocate(2) modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RWF_DSYNC = 2
# errno values a discard treats as "this image cannot deallocate" (a hint, not an error).
EINVAL, ENOTTY, ENOSYS, EOPNOTSUPP = 22, 25, 38, 95

# -- st: one queue's settings and counters --
ST_FD = 0            # the image's fd (-1: null disk)
ST_CAPACITY = 1      # sectors
ST_BLK_SIZE = 2      # bytes (512, or O_DIRECT's alignment)
ST_READONLY = 3
ST_DSYNC = 4         # write-through: writes (and zeroing) stable on completion
ST_BLOCKDEV = 5
ST_GEN = 6           # the pin generation bursts stamp in-flight requests with
ST_INFLIGHT = 7      # requests in flight
ST_SQES = 8          # SQEs submitted and not yet completed
ST_MAX_DISCARD_SEG = 9
ST_MAX_DISCARD_SECTORS = 10
ST_MAX_WZ_SEG = 11
ST_MAX_WZ_SECTORS = 12
ST_EVENTFD = 13
ST_NUSED = 14        # used elements added since the last publish (their heads: used_heads)
ST_MAX_REQ_SQES = 15  # SQEs one request may need at most (zeroing segments, split iovecs)
# counters (the device's stats keys, `COUNTER_NAMES`)
C_READS = 16
C_READ_BYTES = 17
C_WRITES = 18
C_WRITE_BYTES = 19
C_FLUSHES = 20
C_DISCARDS = 21
C_WRITE_ZEROES = 22
C_GET_ID = 23
C_UNSUPPORTED = 24
C_IO_ERRORS = 25
C_INVALID = 26
C_BAD_REQUESTS = 27
C_NOTIFY = 28
C_SUBMIT_ERRORS = 29   # io_uring_enter failures (requests then failed with IOERR)
C_URING = 30           # requests submitted to io_uring
ST_DIRECT = 31         # O_DIRECT's alignment (bytes), 0 without O_DIRECT
C_BOUNCED = 32         # O_DIRECT requests whose guest buffers were not aligned (bounced)
ST_SYNC_IO = 33        # reads and writes done synchronously, not through io_uring (io.py's
                       # BlkImage.sync_io: a file in memory that cannot do RWF_NOWAIT)
C_SYNC_IO = 34         # requests done so
ST_LEN = 35
COUNTER_NAMES = {
    "blk_reads": C_READS, "blk_read_bytes": C_READ_BYTES, "blk_writes": C_WRITES,
    "blk_write_bytes": C_WRITE_BYTES, "blk_flushes": C_FLUSHES, "blk_discards": C_DISCARDS,
    "blk_write_zeroes": C_WRITE_ZEROES, "blk_get_id": C_GET_ID,
    "blk_unsupported": C_UNSUPPORTED, "blk_io_errors": C_IO_ERRORS, "blk_invalid": C_INVALID,
    "blk_bad_requests": C_BAD_REQUESTS, "blk_uring_submit_errors": C_SUBMIT_ERRORS,
    "blk_uring_requests": C_URING, "blk_bounced": C_BOUNCED, "blk_sync_io": C_SYNC_IO,
}

# -- inf: a row per head, the requests in flight --
F_STATE = 0          # 1 while in flight
F_LEFT = 1           # SQEs not yet completed
F_STATUS = 2         # the worst status so far
F_USED = 3           # used length to publish
F_TOKEN = 4          # what the pop returned for it: the head (split), id | slots << 16 (packed)
F_STATUS_HOST = 5    # host address and GPA of the status byte
F_STATUS_GPA = 6
F_GEN = 7            # pin generation of the burst that submitted it
F_KIND = 8           # request type (for counters and the discard rule)
F_BYTES = 9
F_NLOG = 10          # written ranges kept for the dirty log (LOG_MAX; -1: span)
F_LOG = 11           # LOG_MAX (gpa, len) pairs
LOG_MAX = 8
INF_COLS = F_LOG + 2 * LOG_MAX

KIND_OTHER = 99


@inlined_kernel
def gather(piece_host, piece_len, a, b, offset, out, n):
    """Copy n bytes at `offset` of the concatenated pieces [a, b) into out[0:n]; returns the
    bytes copied (fewer if the pieces end first)."""
    got = 0
    for p in range(a, b):
        ln = piece_len[p]
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, n - got)
        host = piece_host[p] + offset
        for j in range(take):
            out[got + j] = load_u8(host + j)
        got += take
        offset = 0
        if got >= n:
            break
    return got


@inlined_kernel
def scatter(piece_host, piece_len, a, b, offset, src, n):
    """Copy src[0:n] to `offset` of the concatenated pieces [a, b) (gather's inverse)."""
    put = 0
    for p in range(a, b):
        ln = piece_len[p]
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, n - put)
        host = piece_host[p] + offset
        for j in range(take):
            store_u8(host + j, src[put + j])
        put += take
        offset = 0
        if put >= n:
            break
    return put


@inlined_kernel
def log_pieces(mem, q, piece_gpa, piece_len, a, b, length):
    """Dirty-log the first `length` bytes of the pieces [a, b), written just now."""
    left = length
    for p in range(a, b):
        if left <= 0:
            break
        take = min(piece_len[p], left)
        K.log_write(mem, q, piece_gpa[p], take)
        left -= take


@inlined_kernel
def misaligned(iov, first, count, align):
    """True if one of `count` iovec pairs from `first` is not O_DIRECT-aligned (address or
    length not a multiple of `align`)."""
    mask = align - 1
    for k in range(first, first + count):
        if (iov[2 * k] & mask) or (iov[2 * k + 1] & mask):
            return True
    return False


@inlined_kernel
def sync_rw(st, fd, write, pos, iov, first, count, length):
    """Read or write `length` bytes at byte `pos` through the `count` iovec pairs of iov from
    pair `first`, synchronously (preadv2/pwritev2, RWF_DSYNC when write-through), UIO_MAXIOV
    pairs a call. Returns True when every byte moved (False: an error, or short)."""
    flags = RWF_DSYNC if write and st[ST_DSYNC] else 0
    c = 0
    done = 0
    while c < count:
        m = min(UIO_MAXIOV, count - c)
        want = 0
        for j in range(first + c, first + c + m):
            want += iov[2 * j + 1]
        addr = iov.ctypes.data + 16 * (first + c)
        if write:
            r = sys_pwritev2(fd, addr, m, pos + done, flags)
        else:
            r = sys_preadv2(fd, addr, m, pos + done, flags)
        if r < 0 and errno_value() == EINTR:
            continue
        if r != want:  # an error, or short (the image shrank? the file system is full?)
            return False
        done += r
        c += m
    return done == length


@kernel
def bounced_rw(st, fd, write, pos, piece_host, piece_len, a, b, offset, length, bounce):
    """O_DIRECT with guest buffers that are not aligned: the transfer goes through `bounce`
    (page-aligned, a multiple of the alignment), a chunk at a time, synchronously (pread,
    pwrite; then fdatasync when write-through). Rare: Linux aligns its buffers to pages. The
    offsets and lengths are aligned (range_error checked them). Returns True when every byte
    moved."""
    chunk = bounce.shape[0]
    addr = bounce.ctypes.data
    done = 0
    while done < length:
        n = min(chunk, length - done)
        if write:
            gather(piece_host, piece_len, a, b, offset + done, bounce, n)
            r = sys_pwrite(fd, addr, n, pos + done)
        else:
            r = sys_pread(fd, addr, n, pos + done)
        if r < 0 and errno_value() == EINTR:
            continue
        if r != n:  # an error, or short (the image shrank?)
            return False
        if not write:
            scatter(piece_host, piece_len, a, b, offset + done, bounce, n)
        done += n
    if write and st[ST_DSYNC]:
        while sys_fdatasync(fd) < 0:
            if errno_value() != EINTR:
                return False
    return True


@inlined_kernel
def le(buf, off, n):
    v = np.int64(0)
    for j in range(n):
        v |= np.int64(buf[off + j]) << (8 * j)
    return v


@inlined_kernel
def range_error(st, sector, length):
    """True if [sector*512, +length) is not a valid data range of the disk."""
    if length < 0 or length % SECTOR:
        return True
    cap = st[ST_CAPACITY]
    if sector < 0 or sector > cap or length // SECTOR > cap - sector:
        return True
    bs = st[ST_BLK_SIZE]
    if bs > SECTOR and ((sector * SECTOR) % bs or length % bs):
        return True
    return False


@inlined_kernel
def build_iovecs(piece_host, piece_len, a, b, offset, length, iov, iov_pos):
    """(host, len) pairs of bytes [offset, offset+length) of pieces [a, b) into iov from pair
    iov_pos; returns the pairs written, or -1 if iov is full."""
    cap = iov.shape[0] // 2
    k = iov_pos
    left = length
    for p in range(a, b):
        if left <= 0:
            break
        ln = piece_len[p]
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, left)
        if k >= cap:
            return -1
        iov[2 * k] = piece_host[p] + offset
        iov[2 * k + 1] = take
        k += 1
        left -= take
        offset = 0
    return k - iov_pos


@inlined_kernel
def keep_log_ranges(inf, head, piece_gpa, piece_len, a, b, length):
    """Remember the GPA ranges of the first `length` writable bytes (pieces [a, b)) for the
    dirty log at completion: LOG_MAX exactly, else their whole span (over, never under)."""
    n = 0
    lo = np.int64(-1)
    hi = np.int64(0)
    left = length
    for p in range(a, b):
        if left <= 0:
            break
        take = min(piece_len[p], left)
        g = piece_gpa[p]
        if n < LOG_MAX:
            inf[head, F_LOG + 2 * n] = g
            inf[head, F_LOG + 2 * n + 1] = take
        n += 1
        if lo < 0 or g < lo:
            lo = g
        if g + take > hi:
            hi = g + take
        left -= take
    if n > LOG_MAX:
        inf[head, F_LOG] = lo
        inf[head, F_LOG + 1] = hi - lo
        n = 1
    inf[head, F_NLOG] = n


@inlined_kernel
def log_kept(mem, q, inf, head):
    for j in range(inf[head, F_NLOG]):
        K.log_write(mem, q, inf[head, F_LOG + 2 * j], inf[head, F_LOG + 2 * j + 1])


@inlined_kernel
def answer(mem, q, views, st, used_heads, host, gpa, status, head, used):
    """Write the status byte and add the used element now (its head noted in used_heads for
    the inflight batch); False if the queue broke."""
    store_u8(host, status)
    K.log_write(mem, q, gpa, 1)
    if status == S_IOERR:
        st[C_IO_ERRORS] += 1
    elif status == S_UNSUPP:
        st[C_UNSUPPORTED] += 1
    return add(mem, q, views, st, used_heads, head, used)


@inlined_kernel
def add(mem, q, views, st, used_heads, head, used):
    nu = st[ST_NUSED]
    if nu >= used_heads.shape[0]:  # sized for a burst's worst case: not reached
        K.fail(q, E.DEVICE_FAILED, head)
        return False
    used_heads[nu] = head
    st[ST_NUSED] = nu + 1
    return K.add_used(mem, q, views, head, used)


@inlined_kernel
def publish(mem, q, views, st, iv, used_heads):
    """Publish the used elements added since the last publish, as one inflight batch
    (ring/inflight.py). False if the queue broke."""
    nu = st[ST_NUSED]
    st[ST_NUSED] = 0
    if nu == 0:
        return True
    return publish_used_inflight(mem, q, views, iv, used_heads, nu)


@inlined_kernel
def count_done(st, kind, nbytes):
    if kind == T_IN:
        st[C_READS] += 1
        st[C_READ_BYTES] += nbytes
    elif kind == T_OUT:
        st[C_WRITES] += 1
        st[C_WRITE_BYTES] += nbytes
    elif kind == T_FLUSH:
        st[C_FLUSHES] += 1
    elif kind == T_DISCARD:
        st[C_DISCARDS] += 1
    elif kind == T_WRITE_ZEROES:
        st[C_WRITE_ZEROES] += 1


@inlined_kernel
def finish(mem, q, views, st, used_heads, inf, head):
    """The last SQE of an in-flight request completed: log what was written, status byte,
    used element. False if the queue broke."""
    status = inf[head, F_STATUS]
    log_kept(mem, q, inf, head)
    inf[head, F_STATE] = 0
    st[ST_INFLIGHT] -= 1
    if status == S_OK:
        count_done(st, inf[head, F_KIND], inf[head, F_BYTES])
    return answer(mem, q, views, st, used_heads, inf[head, F_STATUS_HOST],
                  inf[head, F_STATUS_GPA], status, inf[head, F_TOKEN], inf[head, F_USED])


@inlined_kernel
def complete_cqes(mem, q, views, st, used_heads, ur, cqes, inf, cu, cr, publish):
    """Reap every posted completion; finish the requests whose SQEs are all done. Returns the
    requests finished (used elements added), or -1 if the queue broke."""
    done = 0
    size = inf.shape[0]
    while True:
        n = U.reap(ur, cqes, cu, cr, cu.shape[0])
        if n == 0:
            return done
        st[ST_SQES] -= n
        for k in range(n):
            head = cu[k] & 0xFFFF
            expect = (cu[k] >> 16) - 1
            if head >= size or inf[head, F_STATE] != 1:
                continue  # not ours (cannot happen: user_data is what we submitted)
            res = cr[k]
            kind = inf[head, F_KIND]
            if expect >= 0:
                if res != expect:  # an error, or short (the image shrank?)
                    inf[head, F_STATUS] = S_IOERR
            elif res < 0:
                if not (kind == T_DISCARD and (res == -EOPNOTSUPP or res == -EINVAL
                                               or res == -ENOSYS or res == -ENOTTY)):
                    inf[head, F_STATUS] = S_IOERR
            inf[head, F_LEFT] -= 1
            if inf[head, F_LEFT] == 0:
                if publish:
                    if not finish(mem, q, views, st, used_heads, inf, head):
                        return -1
                else:  # the queue is broken: the I/O is over, nothing is answered
                    inf[head, F_STATE] = 0
                    st[ST_INFLIGHT] -= 1
                done += 1


@inlined_kernel  # into blk_poll: a call copies some 200 words of array arguments
def blk_burst(mem, q, views, iv, st, ur, sqes, cqes, inf, used_heads, max_chains, heads,
              piece_end, first_writable, readable, writable, seg_addr, seg_len, seg_flags,
              piece_region, piece_offset, piece_host, piece_gpa, piece_len, iov, cu, cr, hdr,
              serial):
    """One burst (see the module docstring). Returns used elements added and published
    (>= 0), or -1 if the queue broke.

    Chains are popped one at a time, each only when the SQ and the CQ have room for the most
    SQEs a request can take (`ST_MAX_REQ_SQES`) and the iovec scratch for the most pieces a
    chain can have: a popped chain is always served, never given back (a chain popped is
    marked in flight for inflight tracking, and may be a resubmitted one)."""
    done = complete_cqes(mem, q, views, st, used_heads, ur, cqes, inf, cu, cr, True)
    if done < 0:
        return -1
    fd = st[ST_FD]
    null = fd < 0
    iov_pos = 0
    iov_pairs = iov.shape[0] // 2
    chain_pieces = piece_host.shape[0]
    prepared = 0
    popped = 0
    while popped < max_chains:
        if iov_pos + chain_pieces > iov_pairs or U.sq_free(ur) < st[ST_MAX_REQ_SQES]:
            # Submit what is prepared: the kernel has consumed the iovecs and the SQEs once
            # io_uring_enter returns (IORING_FEAT_SUBMIT_STABLE).
            if U.submit(ur, 0) < 0:
                st[C_SUBMIT_ERRORS] += 1
                break
            iov_pos = 0
        # Never more SQEs in flight than the CQ holds (it cannot overflow), nor than the SQ.
        room = min(U.sq_free(ur), ur[U.UR_CQ_ENTRIES] - st[ST_SQES])
        if room < st[ST_MAX_REQ_SQES]:
            break
        n = pop_requests(mem, q, views, iv, 1, heads, piece_end, first_writable, readable,
                         writable, seg_addr, seg_len, seg_flags, piece_region, piece_offset,
                         piece_host, piece_gpa, piece_len)
        if n < 0:
            return -1
        if n == 0:
            break
        popped += 1
        # The row of the in-flight table: the head (split) or the buffer id (packed, whose
        # token also carries the chain's ring slots); add_used gets the token.
        token = heads[0]
        head = token & 0xFFFF
        if head >= inf.shape[0]:
            K.fail(q, E.HEAD_OUT_OF_RANGE, head)
            return -1
        p1 = piece_end[0]
        pw = first_writable[0]
        rbytes = readable[0]
        wbytes = writable[0]
        a = 0
        if inf[head, F_STATE] != 0:
            K.fail(q, E.HEAD_IN_FLIGHT, head)
            return -1
        if wbytes == 0:  # no status byte: nothing can say what happened
            st[C_BAD_REQUESTS] += 1
            if not add(mem, q, views, st, used_heads, token, 0):
                return -1
            done += 1
            continue
        shost = piece_host[p1 - 1] + piece_len[p1 - 1] - 1
        sgpa = piece_gpa[p1 - 1] + piece_len[p1 - 1] - 1
        if rbytes < HEADER_LEN:
            st[C_INVALID] += 1
            if not answer(mem, q, views, st, used_heads, shost, sgpa, S_IOERR, token, 1):
                return -1
            done += 1
            continue
        gather(piece_host, piece_len, a, pw, 0, hdr, HEADER_LEN)
        rtype = le(hdr, 0, 4)
        sector = le(hdr, 8, 8)  # >= 2**63 comes out negative: out of range below
        status = S_OK
        used = 1
        nsub = 0
        nseg = 0
        if rtype == T_IN:
            used = wbytes
            length = wbytes - 1
            if range_error(st, sector, length):
                st[C_INVALID] += 1
                status = S_IOERR
            elif length > 0 and not null:
                nsub = 1
            elif length > 0:
                count_done(st, T_IN, length)
        elif rtype == T_OUT:
            length = rbytes - HEADER_LEN
            if range_error(st, sector, length):
                st[C_INVALID] += 1
                status = S_IOERR
            elif st[ST_READONLY]:
                status = S_IOERR
            elif length > 0 and not null:
                nsub = 1
            elif length > 0:
                count_done(st, T_OUT, length)
        elif rtype == T_FLUSH:
            if st[ST_READONLY] or null:
                st[C_FLUSHES] += 1
            else:
                nsub = 1
        elif rtype == T_GET_ID:
            used = wbytes
            if wbytes - 1 < ID_BYTES:
                st[C_INVALID] += 1
                status = S_IOERR
            else:
                # The serial into the writable buffers, in order across them.
                scatter(piece_host, piece_len, pw, p1, 0, serial, ID_BYTES)
                log_pieces(mem, q, piece_gpa, piece_len, pw, p1, ID_BYTES)
                st[C_GET_ID] += 1
        elif rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            zero = rtype == T_WRITE_ZEROES
            size_b = rbytes - HEADER_LEN
            max_seg = st[ST_MAX_WZ_SEG] if zero else st[ST_MAX_DISCARD_SEG]
            max_sectors = st[ST_MAX_WZ_SECTORS] if zero else st[ST_MAX_DISCARD_SECTORS]
            if st[ST_READONLY]:
                status = S_IOERR
            elif size_b <= 0 or size_b % SEGMENT_LEN or size_b // SEGMENT_LEN > max_seg:
                st[C_INVALID] += 1
                status = S_IOERR
            else:
                nseg = size_b // SEGMENT_LEN
                need = 0
                for s in range(nseg):  # every segment checked before any is done
                    gather(piece_host, piece_len, a, pw, HEADER_LEN + s * SEGMENT_LEN, hdr,
                           SEGMENT_LEN)
                    ssec = le(hdr, 0, 8)
                    snum = le(hdr, 8, 4)
                    sflags = le(hdr, 12, 4)
                    if sflags & ~SEGMENT_FLAG_UNMAP or (sflags != 0 and not zero):
                        status = S_UNSUPP
                        break
                    if snum > max_sectors or range_error(st, ssec, snum * SECTOR):
                        st[C_INVALID] += 1
                        status = S_IOERR
                        break
                    if snum > 0:
                        need += 2 if zero and not st[ST_BLOCKDEV] and not sflags else 1
                if status == S_OK:
                    if zero and st[ST_DSYNC] and need > 0:
                        need += 1
                    if null or need == 0:
                        count_done(st, rtype, 0)
                    else:
                        nsub = need
        else:
            status = S_UNSUPP
        if nsub == 0:
            if not answer(mem, q, views, st, used_heads, shost, sgpa, status, token, used):
                return -1
            done += 1
            continue
        # -- I/O: prepare its SQEs (they fit: checked before the pop) --
        got = 0
        if rtype == T_IN or rtype == T_OUT:
            if rtype == T_IN:
                length = wbytes - 1
                got = build_iovecs(piece_host, piece_len, pw, p1, 0, length, iov, iov_pos)
            else:
                length = rbytes - HEADER_LEN
                got = build_iovecs(piece_host, piece_len, a, pw, HEADER_LEN, length, iov,
                                   iov_pos)
            if got < 0:  # not reached: iov had room for the most pieces a chain has
                K.fail(q, E.DEVICE_FAILED, head)
                return -1
            bounce = st[ST_DIRECT] > 0 and misaligned(iov, iov_pos, got, st[ST_DIRECT])
            if bounce or st[ST_SYNC_IO]:
                # Done now, on this thread, and answered at once: O_DIRECT refuses these
                # buffers (bounced), or the file is in memory and io_uring would hand it to
                # its worker threads, a hop dearer than the copy (BlkImage.sync_io).
                if bounce and rtype == T_IN:
                    ok = bounced_rw(st, fd, False, sector * SECTOR, piece_host, piece_len, pw,
                                    p1, 0, length, hdr)
                elif bounce:
                    ok = bounced_rw(st, fd, True, sector * SECTOR, piece_host, piece_len, a,
                                    pw, HEADER_LEN, length, hdr)
                else:
                    ok = sync_rw(st, fd, rtype == T_OUT, sector * SECTOR, iov, iov_pos, got,
                                 length)
                if rtype == T_IN:
                    log_pieces(mem, q, piece_gpa, piece_len, pw, p1, length)
                if ok:
                    count_done(st, rtype, length)
                st[C_BOUNCED if bounce else C_SYNC_IO] += 1
                if not answer(mem, q, views, st, used_heads, shost, sgpa,
                              S_OK if ok else S_IOERR, token, used):
                    return -1
                done += 1
                continue
            nsub = (got + UIO_MAXIOV - 1) // UIO_MAXIOV  # preadv's limit a READV
        inf[head, F_STATUS] = S_OK
        inf[head, F_TOKEN] = token
        inf[head, F_USED] = used
        inf[head, F_STATUS_HOST] = shost
        inf[head, F_STATUS_GPA] = sgpa
        inf[head, F_GEN] = st[ST_GEN]
        inf[head, F_KIND] = rtype
        inf[head, F_BYTES] = 0
        inf[head, F_NLOG] = 0
        if rtype == T_IN or rtype == T_OUT:
            if rtype == T_IN:
                keep_log_ranges(inf, head, piece_gpa, piece_len, pw, p1, length)
            op = U.OP_READV if rtype == T_IN else U.OP_WRITEV
            rw_flags = RWF_DSYNC if rtype == T_OUT and st[ST_DSYNC] else 0
            pos = sector * SECTOR
            c = 0
            while c < got:
                m = min(UIO_MAXIOV, got - c)
                nbytes = 0
                for j in range(iov_pos + c, iov_pos + c + m):
                    nbytes += iov[2 * j + 1]
                # user_data: the head, and the bytes this SQE must move (+1; 0: not a transfer)
                U.prep(ur, sqes, op, 0, fd, pos, iov.ctypes.data + 16 * (iov_pos + c), m,
                       rw_flags, head | ((nbytes + 1) << 16))
                pos += nbytes
                c += m
            iov_pos += got
            inf[head, F_BYTES] = length
        elif rtype == T_FLUSH:
            U.prep(ur, sqes, U.OP_FSYNC, 0, fd, 0, 0, 0, U.IORING_FSYNC_DATASYNC, head)
        else:
            zero = rtype == T_WRITE_ZEROES
            left = nsub
            for s in range(nseg):
                gather(piece_host, piece_len, a, pw, HEADER_LEN + s * SEGMENT_LEN, hdr,
                       SEGMENT_LEN)
                off = le(hdr, 0, 8) * SECTOR
                ln = le(hdr, 8, 4) * SECTOR
                unmap = le(hdr, 12, 4) & SEGMENT_FLAG_UNMAP
                if ln == 0:
                    continue
                # FALLOCATE: addr is the length, len the mode. Zeroing is linked (in order;
                # a failure cancels the rest: IOERR); discards are independent hints.
                if not zero:
                    mode = FALLOC_FL_PUNCH_HOLE
                elif st[ST_BLOCKDEV]:
                    mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
                else:
                    mode = FALLOC_FL_PUNCH_HOLE  # a hole reads as zeroes
                left -= 1
                U.prep(ur, sqes, U.OP_FALLOCATE, U.IOSQE_IO_LINK if zero and left else 0, fd,
                       off, ln, mode | FALLOC_FL_KEEP_SIZE, 0, head)
                if zero and not st[ST_BLOCKDEV] and not unmap:
                    # Without UNMAP the zeroes stay allocated: the hole is filled again.
                    left -= 1
                    U.prep(ur, sqes, U.OP_FALLOCATE, U.IOSQE_IO_LINK if left else 0, fd,
                           off, ln, FALLOC_FL_KEEP_SIZE, 0, head)
            if zero and st[ST_DSYNC]:
                U.prep(ur, sqes, U.OP_FSYNC, 0, fd, 0, 0, 0, U.IORING_FSYNC_DATASYNC, head)
        inf[head, F_LEFT] = nsub
        inf[head, F_STATE] = 1
        st[ST_INFLIGHT] += 1
        st[ST_SQES] += nsub
        st[C_URING] += 1
        prepared += nsub
    if prepared > 0:
        if U.submit(ur, 0) < 0:
            # The kernel took none of them (EAGAIN, EBUSY, ENOMEM...): they stay prepared and
            # are submitted by the next burst's enter.
            st[C_SUBMIT_ERRORS] += 1
        c = complete_cqes(mem, q, views, st, used_heads, ur, cqes, inf, cu, cr, True)
        if c < 0:
            return -1
        done += c
    if done > 0 and not publish(mem, q, views, st, iv, used_heads):
        return -1
    return done


@kernel
def blk_poll(mem, q, views, iv, st, ur, sqes, cqes, inf, used_heads, max_chains, heads,
             piece_end, first_writable, readable, writable, seg_addr, seg_len, seg_flags,
             piece_region, piece_offset, piece_host, piece_gpa, piece_len, iov, cu, cr, hdr,
             serial, max_cycles, idle_cycles, leave, efd_buf):
    """Bursts for up to max_cycles, until nothing happened for idle_cycles (0: at once), the
    driver wants an interrupt, or `leave` is raised (`ring/poll.py`). Returns (used elements
    published, interrupt?); -1: the queue broke.

    If the worker slept on the ring's eventfd (armed by `UringQueue.arm`, just before it
    sleeps), the eventfd is read and disarmed first: while the kernel runs, completions are
    reaped by looking at the CQ, and signal nothing."""
    if ur[U.UR_EVENTFD_ARMED]:
        U.disarm_eventfd(ur)
        U.drain_eventfd(st[ST_EVENTFD], efd_buf)
    done = 0
    notify = False
    start = read_cycles()
    last_work = start
    while True:
        n = blk_burst(mem, q, views, iv, st, ur, sqes, cqes, inf, used_heads, max_chains,
                      heads, piece_end, first_writable, readable, writable, seg_addr, seg_len,
                      seg_flags, piece_region, piece_offset, piece_host, piece_gpa, piece_len,
                      iov, cu, cr, hdr, serial)
        if n < 0:
            return -1, False
        done += n
        if n > 0 and K.needs_interrupt(mem, q, views):
            st[C_NOTIFY] += 1
            notify = True
            break
        go_on, last_work = window_goes_on(leave, n > 0, start, last_work, max_cycles,
                                          idle_cycles)
        # An empty ring is watched with a few loads, not with bursts: a burst is a call
        # with some 200 words of arguments, and looking with it made every turn of an idle
        # poll cost as much as serving a request (half the back-end's samples at QD 32).
        while go_on and not has_work(mem, q, views, iv, st, ur):
            go_on, last_work = window_goes_on(leave, False, start, last_work, max_cycles,
                                              idle_cycles)
        if not go_on:
            break
    return done, notify


@inlined_kernel
def has_work(mem, q, views, iv, st, ur):
    """Would a burst find anything: chains made available (or a broken ring: the burst
    says so), heads to resubmit, completions posted, or SQEs the kernel has not taken yet?"""
    if U.cq_ready(ur) > 0 or U.sq_unconsumed(ur) > 0 or inflight_resubmit_pending(iv) > 0:
        return True
    return K.avail_count(mem, q, views) != 0


@kernel
def blk_reap(mem, q, views, iv, st, ur, cqes, inf, used_heads, cu, cr, wait):
    """Finish what completed (a stopping ring: the protocol thread, no worker runs it): with
    `wait`, block in io_uring_enter until at least one completion came. Publishes unless the
    queue is broken. Returns (requests finished, interrupt?)."""
    if wait and U.cq_ready(ur) == 0 and st[ST_INFLIGHT] > 0:
        U.enter(ur, 0, 1, U.IORING_ENTER_GETEVENTS)
    answering = q[K.Q_ERROR] == 0
    n = complete_cqes(mem, q, views, st, used_heads, ur, cqes, inf, cu, cr, answering)
    if n <= 0 or not answering:
        return max(n, 0), False
    if not publish(mem, q, views, st, iv, used_heads):
        return 0, False
    return n, K.needs_interrupt(mem, q, views)
