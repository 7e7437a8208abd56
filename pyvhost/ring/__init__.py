"""The virtqueue, device side: split- and packed-ring state and its per-round choice of
metadata path, the compiled ring primitives (both paths: direct map and checked copy), chains
as host pieces for Python devices, barriers and host-memory intrinsics, the poll window.

Public for compiled-tier devices (`Device.process_burst`, docs/devices.md section 8):
`kernels` (pop_burst, pop_chain, rewind, add_used, publish_used, push_used_burst,
needs_interrupt, rearm_past_avail, log_write), `split_queue` (SplitQueue), `direct_map`
(RingViews, NO_VIEWS), `poll` (PollWindow), `errors` (RingError, RingErrorCode), `layout`,
`jit` (kernel, inlined_kernel), `inflight` (inflight I/O tracking: pop_burst_inflight,
push_used_burst_inflight, inflight_mark, inflight_begin_batch/end_batch), `virtqueue`
(Virtqueue: either layout, by the features negotiated), `packed_layout`. Internal: `chains`,
`hostmem`, `barriers`, `packed_kernels` (the primitives branch to it on F_PACKED),
`packed_queue` (the packed direct map).
"""

__all__ = ["direct_map", "errors", "inflight", "jit", "kernels", "layout", "packed_layout",
           "poll", "split_queue", "virtqueue"]
