"""A DeepEP-style ``Buffer`` (intranode normal and low-latency mode conventions) on top of
:class:`deepkernels.moe.EPDispatcher`.

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

Low-latency mode (fixed capacity: static shapes, no host sync, CUDA-graph capturable)::

    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank,
                                                                       num_experts, use_fp8=True)
    combined_x, event, hook = buf.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

* recv_x is expert-major [L, R * max_tokens, H] (the masked layout of the masked grouped GEMM) with
  recv_count [L] int32 valid rows per expert, ordered by source rank then token (DeepEP: arrival order).
* dispatch is ONE all_to_all_single (payload + fp8 scales + source index + local expert ids in one
  byte buffer per destination slot, led by a count header); combine is ONE all_to_all_single; the
  weights are applied in the combine on the source rank, as DeepEP's low-latency mode does.
"""
from __future__ import annotations

import torch

from .. import _ops
from .. import moe as _moe
from .._ops import check_bool, check_int, check_same_device, check_tensor


def _check_flags(**flags) -> None:
    """DeepEP's boolean options that this Buffer accepts and ignores still have to be bools."""
    for name, value in flags.items():
        check_bool(name, value)


def _unpack_handle(handle, low_latency: bool):
    """The (EPDispatcher, DispatchHandle) pair this Buffer's dispatch returned, else a TypeError naming it."""
    if (not isinstance(handle, tuple) or len(handle) != 2 or not isinstance(handle[0], _moe.EPDispatcher)
            or not isinstance(handle[1], _moe.DispatchHandle)):
        which = "low_latency_dispatch" if low_latency else "dispatch"
        raise TypeError(f"handle: expected the handle that Buffer.{which} returned, got {type(handle).__name__}")
    d, hd = handle
    if low_latency != (d.capacity is not None):
        raise ValueError(f"handle: expected a handle from Buffer.{'low_latency_dispatch' if low_latency else 'dispatch'}"
                         f", got one from Buffer.{'dispatch' if low_latency else 'low_latency_dispatch'}")
    return d, hd


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
        self.num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, min_value=0)
        self.num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, min_value=0)
        self._dispatchers: dict[int, _moe.EPDispatcher] = {}

    def _dispatcher(self, num_experts: int) -> _moe.EPDispatcher:
        if num_experts not in self._dispatchers:
            self._dispatchers[num_experts] = _moe.EPDispatcher(self.group, num_experts)
        return self._dispatchers[num_experts]

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        _check_flags(async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        per_rank, per_expert, in_rank = _moe.get_dispatch_layout(topk_idx, num_experts, self.group_size)
        return per_rank, None, per_expert, in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        _check_flags(async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        check_int("num_worst_tokens", num_worst_tokens, min_value=0)
        if handle is not None:
            d, hd = _unpack_handle(handle, low_latency=False)
            return d.dispatch_cached(x, hd), None, None, None, handle, EventOverlap()
        if topk_idx is None or topk_weights is None or num_tokens_per_expert is None:
            missing = [n for n, v in (("topk_idx", topk_idx), ("topk_weights", topk_weights),
                                      ("num_tokens_per_expert", num_tokens_per_expert)) if v is None]
            raise ValueError(f"{', '.join(missing)}: expected a tensor (required without a handle), got None")
        expert_alignment = check_int("expert_alignment", expert_alignment, min_value=1)
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32, torch.int64), ndim=1)
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
        # the layout tensors of get_dispatch_layout: recomputed from topk_idx (their values are not read), so
        # only their form is checked (DeepEP would trust them)
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
        t, r = topk_idx.size(0), self.group_size
        if num_tokens_per_rank is not None:
            check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtypes=(torch.int32, torch.int64), shape=(r,))
        if is_token_in_rank is not None:
            check_tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), shape=(t, r))
        if num_tokens_per_rdma_rank is not None:
            check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank)
        d = self._dispatcher(num_tokens_per_expert.numel())
        recv_x, hd = d.dispatch(tuple(x) if isinstance(x, (tuple, list)) else x, topk_idx, topk_weights.float())
        counts = [-(-c // expert_alignment) * expert_alignment for c in hd.num_recv_tokens_per_expert_list]
        return (recv_x, hd.recv_local_idx.long(), hd.recv_weights, counts, (d, hd), EventOverlap())

    def combine(self, x: torch.Tensor, handle, topk_weights: torch.Tensor | None = None, bias=None, config=None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        _check_flags(async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        d, hd = _unpack_handle(handle, low_latency=False)
        combined = d.combine(x, hd)
        if bias is not None:
            for i, b in enumerate(bias if isinstance(bias, (tuple, list)) else (bias,)):
                if b is not None:
                    check_tensor(f"bias[{i}]" if isinstance(bias, (tuple, list)) else "bias", b,
                                 shape=tuple(combined.shape), device=combined.device)
                    combined = combined + b
        combined_w = None
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32, torch.bfloat16, torch.float16),
                         shape=(hd.num_recv, hd.topk_idx.size(1)))
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
    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of one low-latency dispatch's send + receive buffers (bf16 rows; metadata not counted).
        Informational: this Buffer allocates per call, so the size passed to ``Buffer(...)`` is ignored."""
        num_max_dispatch_tokens_per_rank = check_int("num_max_dispatch_tokens_per_rank",
                                                     num_max_dispatch_tokens_per_rank, min_value=0)
        hidden, num_ranks = check_int("hidden", hidden, min_value=0), check_int("num_ranks", num_ranks, min_value=1)
        check_int("num_experts", num_experts, min_value=1)
        return 2 * num_ranks * (_moe.SLOT_HEADER_BYTES + num_max_dispatch_tokens_per_rank * hidden * 2)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """No-op: every low-latency call packs a fresh buffer (padding rows and gaps are zeroed)."""
        check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, min_value=0)
        check_int("hidden", hidden, min_value=0)
        check_int("num_experts", num_experts, min_value=1)

    def _ll_dispatcher(self, num_experts: int, num_max_dispatch_tokens_per_rank: int) -> _moe.EPDispatcher:
        key = ("ll", num_experts, num_max_dispatch_tokens_per_rank)
        if key not in self._dispatchers:
            self._dispatchers[key] = _moe.EPDispatcher(self.group, num_experts,
                                                       capacity=num_max_dispatch_tokens_per_rank)
        return self._dispatchers[key]

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """DeepEP's low-latency dispatch: ONE all_to_all_single, no host sync, static shapes.

        Args:
            x: [T, H] bf16 (fp16/fp32 work too), T <= num_max_dispatch_tokens_per_rank (same on all ranks).
            topk_idx: [T, k] int64 global expert ids, -1 = unused.
            cumulative_local_expert_recv_stats: optional [L] int32, incremented by the received counts.
            use_fp8: quantise to e4m3 with per-token 1x128 fp32 scales while packing.
        Returns:
            (recv_x, recv_count, handle, event, hook): recv_x [L, R * max_tokens, H] in x's dtype, or with
            use_fp8 a pair (e4m3 [L, R * max_tokens, H], scales fp32 [L, R * max_tokens, ceil(H/128)] whose
            last two dims are column-major, as DeepEP returns them for TMA); expert l's rows are
            ``recv_x[l, :recv_count[l]]``, ordered by source rank then source token (the rest are zero);
            recv_count [L] int32. hook is a no-op callable when return_recv_hook (the data has arrived).
        round_scale / use_ue8m0 (power-of-two / UE8M0 scales) are not supported and raise ValueError;
        dispatch_wait_recv_cost_stats, async_finish are accepted and ignored.
        """
        if check_bool("round_scale", round_scale) or check_bool("use_ue8m0", use_ue8m0):
            raise ValueError(f"round_scale/use_ue8m0: expected False (fp32 per-128 scales only), got "
                             f"round_scale={round_scale}, use_ue8m0={use_ue8m0}")
        use_fp8 = check_bool("use_fp8", use_fp8)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        _check_flags(async_finish=async_finish)
        num_max_dispatch_tokens_per_rank = check_int("num_max_dispatch_tokens_per_rank",
                                                     num_max_dispatch_tokens_per_rank, min_value=0)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.size(0) > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"x: expected at most num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank} tokens, got {x.size(0)}")
        d = self._ll_dispatcher(num_experts, num_max_dispatch_tokens_per_rank)
        recv, hd = d.dispatch(x, topk_idx, None, use_fp8=use_fp8)
        packed, count = hd.to_masked(recv)
        if use_fp8:
            q, s = packed
            packed = (q, s.transpose(1, 2).contiguous().transpose(1, 2))  # column-major scales (DeepEP's layout)
        if cumulative_local_expert_recv_stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                              dtypes=(torch.int32,), shape=(d.num_local_experts,))
            cumulative_local_expert_recv_stats.add_(count)
        hook = (lambda: None) if return_recv_hook else None
        return packed, count, (d, hd), EventOverlap(), hook

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """A bf16 [L, R * max_tokens, H] tensor to write expert outputs into; pass it as ``x`` to
        low_latency_combine (zero_copy makes no difference here)."""
        d, hd = _unpack_handle(handle, low_latency=True)
        return torch.empty((d.num_local_experts, hd.num_recv, hd.hidden), dtype=torch.bfloat16,
                           device=hd.recv_local_idx.device)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """DeepEP's low-latency combine: ONE all_to_all_single, no host sync, weights applied HERE.

        Args:
            x: [L, R * max_tokens, H] expert outputs in the layout low_latency_dispatch returned.
            topk_idx: [T, k] int64, the ids given to low_latency_dispatch (slots set to -1 here are skipped).
                Any other value (out of range, or another expert) raises ValueError naming topk_idx on CPU
                tensors and with DEEPKERNELS_CHECK=1; on CUDA / emulated (no host sync) its token's row is NaN.
            topk_weights: [T, k] float32 (the source rank's weights).
        Returns:
            (combined_x [T, H] in x's dtype = sum_j w_j * expert_j(token) in fp32, event, hook).
        Each received row returns min(k, L) rows (its local slots' outputs, unweighted); the source
        applies the weights. use_logfmt, zero_copy, async_finish, combine_wait_recv_cost_stats are ignored.
        """
        d, hd = _unpack_handle(handle, low_latency=True)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        _check_flags(use_logfmt=use_logfmt, zero_copy=zero_copy, async_finish=async_finish)
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), shape=tuple(hd.topk_idx.shape))
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(hd.topk_idx.shape))
        check_same_device(x=x, topk_idx=topk_idx, topk_weights=topk_weights)
        # each slot: the dispatch's id, or -1 to skip it; anything else (an id outside [-1, E), another expert)
        # is refused where a host read is free or allowed -- AFTER the combine's collective, so a rank raising
        # leaves no peer waiting in it -- else (trusted, no sync) its token's row is NaN
        check = not torch.compiler.is_compiling() and (_ops.runs_reference("moe_unpermute_reduce", topk_idx)
                                                       or _ops.run_device_checks(topk_idx))
        wrong = (topk_idx != -1) & (topk_idx != hd.topk_idx)
        w = torch.where(topk_idx >= 0, topk_weights, 0.0)
        combined = d._combine_experts(x, hd, w, "masked", None,
                                      poison_tokens=None if check else wrong.any(1, keepdim=True))
        if check:
            torch.ops.deepkernels.moe_check_combine_ids(topk_idx.contiguous(), hd.topk_idx)
        if out is not None:
            check_tensor("out", out, dtypes=(combined.dtype,), shape=tuple(combined.shape), device=combined.device)
            out.copy_(combined)
            combined = out
        return combined, EventOverlap(), (lambda: None) if return_recv_hook else None


__all__ = ["Buffer", "EventOverlap"]
