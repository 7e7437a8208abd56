"""The virtqueue, device side: split-ring state and its per-round choice of metadata path,
the compiled ring primitives (both paths: direct map and checked copy), chains as host pieces
for Python devices, barriers and host-memory intrinsics, the poll window.

Public for compiled-tier devices (`Device.process_burst`, docs/devices.md section 8):
`kernels` (pop_burst, pop_chain, rewind, add_used, publish_used, push_used_burst,
needs_interrupt, rearm_past_avail, log_write), `split_queue` (SplitQueue), `direct_map`
(RingViews, NO_VIEWS), `poll` (PollWindow), `errors` (RingError, RingErrorCode), `layout`,
`jit` (kernel, inlined_kernel), `inflight` (inflight I/O tracking: pop_burst_inflight,
push_used_burst_inflight, inflight_mark, inflight_begin_batch/end_batch). Internal:
`chains`, `hostmem`, `barriers`.
"""

__all__ = ["direct_map", "errors", "inflight", "jit", "kernels", "layout", "poll",
           "split_queue"]
