"""A DeepEP-style ``Buffer`` (intranode normal mode conventions) on top of :class:`deepkernels.moe.EPDispatcher`.

Mirrors the argument and return conventions of ``deep_ep.Buffer``::

    buf = Buffer(group)                      # num_nvl_bytes / num_rdma_bytes accepted and ignored
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \\
        buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \\
        buf.dispatch(x, topk_idx=..., topk_weights=..., num_tokens_per_rank=..., is_token_in_rank=...,
                     num_tokens_per_expert=..., expert_alignment=1)
    combined_x, combined_topk_weights, event = buf.combine(x, handle, topk_weights=recv_topk_weights)

* ``x`` is a bf16 tensor or an ``(e4m3 [T, H], scale [T, H/128] fp32)`` pair; ``recv_x`` has the same form.
* ``recv_topk_idx`` [N, k] int64 holds LOCAL expert ids (-1 where the expert is on another rank),
  ``recv_topk_weights`` [N, k] fp32 are 0 there. Received rows are ordered by source rank, then token.
* ``num_recv_tokens_per_expert_list`` is a Python list, each count rounded up to ``expert_alignment``.
* ``combine`` sums the rows it is given over the ranks each token went to (weights are NOT applied:
  apply them expert-side, as with DeepEP's normal mode); ``combined_topk_weights`` is the same sum of the
  given ``topk_weights``, so it reproduces the source's weights (0 on -1 slots).
* ``dispatch(x, handle=handle)`` is the cached mode: it reuses a previous layout and returns
  ``(recv_x, None, None, None, handle, event)``.
* ``num_tokens_per_rdma_rank`` is always None (one node); events are :class:`EventOverlap` stand-ins
  (the work is already ordered on the current stream); ``async_finish`` / ``previous_event`` /
  ``allocate_on_comm_stream`` / ``config`` are accepted and ignored.
Low-latency mode: ``low_latency_dispatch`` / ``low_latency_combine`` on the fixed-capacity dispatcher
(expert-major [L, R * max_tokens, H] buffers + per-expert counts; weights applied in the combine).
"""
from __future__ import annotations

import torch

from .. import moe as _moe


class EventOverlap:
    """Stand-in for deep_ep.EventOverlap: the collectives run in stream order already."""

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Buffer:
    """DeepEP ``Buffer`` look-alike over torch.distributed (``group=None``: a single process)."""

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, **_ignored):
        self.group = group
        self.rank, self.group_size = _moe._world(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self._dispatchers: dict[int, _moe.EPDispatcher] = {}

    def _dispatcher(self, num_experts: int) -> _moe.EPDispatcher:
        if num_experts not in self._dispatchers:
            self._dispatchers[num_experts] = _moe.EPDispatcher(self.group, num_experts)
        return self._dispatchers[num_experts]

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        per_rank, per_expert, in_rank = _moe.get_dispatch_layout(topk_idx, num_experts, self.group_size)
        return per_rank, None, per_expert, in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        if handle is not None:
            d, hd = handle
            return d.dispatch_cached(x, hd), None, None, None, handle, EventOverlap()
        if topk_idx is None or topk_weights is None or num_tokens_per_expert is None:
            raise ValueError("dispatch: without a handle, topk_idx, topk_weights and num_tokens_per_expert are required")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment: expected a positive int, got {expert_alignment!r}")
        d = self._dispatcher(num_tokens_per_expert.numel())
        recv_x, hd = d.dispatch(tuple(x) if isinstance(x, (tuple, list)) else x, topk_idx, topk_weights.float())
        counts = [-(-c // expert_alignment) * expert_alignment for c in hd.num_recv_tokens_per_expert_list]
        return (recv_x, hd.recv_local_idx.long(), hd.recv_weights, counts, (d, hd), EventOverlap())

    def combine(self, x: torch.Tensor, handle, topk_weights: torch.Tensor | None = None, bias=None, config=None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        d, hd = handle
        combined = d.combine(x, hd)
        if bias is not None:
            for b in (bias if isinstance(bias, (tuple, list)) else (bias,)):
                if b is not None:
                    combined = combined + b
        combined_w = None
        if topk_weights is not None:
            back = d._a2a(topk_weights.float().contiguous(), sum(hd.send_counts), hd.recv_counts, hd.send_counts)
            k = back.size(1)
            pos = hd.pos
            combined_w = torch.zeros(hd.num_tokens, k, dtype=torch.float32, device=back.device)
            for r in range(pos.size(1)):
                p = pos[:, r].long()
                valid = (p >= 0).unsqueeze(1)
                if back.size(0):
                    combined_w += torch.where(valid, back.index_select(0, p.clamp(min=0)), 0.0)
        return combined, combined_w, EventOverlap()

    # -- low-latency mode (fixed capacity: no host sync, CUDA-graph capturable) -----------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, use_fp8: bool = True, async_finish: bool = False,
                             return_recv_hook: bool = False, **_ignored):
        """-> (recv_x [L, R * max_tokens, H] bf16 or (e4m3, scale [L, R * max_tokens, H/128] fp32; row-major,
        not DeepEP's TMA-transposed scale layout), recv_count [L] int32, handle, event, hook)."""
        key = ("ll", num_experts, num_max_dispatch_tokens_per_rank)
        if key not in self._dispatchers:
            self._dispatchers[key] = _moe.EPDispatcher(self.group, num_experts,
                                                       capacity=num_max_dispatch_tokens_per_rank)
        d = self._dispatchers[key]
        ones = torch.ones(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
        recv, hd = d.dispatch(x, topk_idx, ones, use_fp8=use_fp8)
        packed, count = hd.to_masked(recv)
        hook = (lambda: None) if return_recv_hook else None
        return packed, count, (d, hd), EventOverlap(), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            async_finish: bool = False, return_recv_hook: bool = False, out=None, **_ignored):
        """x [L, R * max_tokens, H] expert outputs -> (combined [T, H] = sum_j w_j * expert_j(x), event, hook).
        As in DeepEP's low-latency mode the weights are applied here."""
        d, hd = handle
        w = d.exchange_weights(topk_weights.float().contiguous(), hd)
        pos = hd.masked_layout()[0]
        combined = d.combine(_moe.unpermute_reduce(x.reshape(-1, x.size(-1)), pos, w), hd)
        if out is not None:
            out.copy_(combined)
            combined = out
        return combined, EventOverlap(), (lambda: None) if return_recv_hook else None


__all__ = ["Buffer", "EventOverlap"]
