"""MoE expert parallelism: dispatch layout, permute (+ fused fp8 quant), un-permute + reduce, and the
expert-parallel dispatcher over ``torch.distributed`` (anchor: DeepEP; engine: all_to_all_single).

Ops (``torch.ops.deepkernels.*``; CUDA kernels in csrc/moe, pure-torch references here):

* ``moe_get_dispatch_layout(topk_idx [T,k] int64, num_experts, num_ranks)`` ->
  ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T,R] bool)``.
  -1 in ``topk_idx`` means "no expert" (the op ignores any id outside [0, E); the checked wrappers
  reject them); expert e lives on rank ``e // (E / R)``. A token counts once
  per rank even when several of its experts live there.
* ``moe_permute(x [T,H], src_idx [N] int32) -> out [N,H]``: ``out[i] = x[src_idx[i]]``, a zero row
  where ``src_idx[i] == -1``. Any dtype (bf16/fp16/fp32/fp8/int); a pure row gather. The output size
  is ``src_idx``'s, so the op has static shapes for torch.compile / CUDA graphs: the data-dependent
  part (how many rows) is decided by whoever builds ``src_idx`` (see :func:`positions_to_src_idx`).
* ``moe_permute_fp8(x [T,H] bf16/fp16/fp32, src_idx [N] int32) -> (out [N,H] e4m3, scale [N,ceil(H/128)] fp32)``:
  the gather fused with per-token 1x128 fp8 quantisation, bit-identical to
  ``per_token_cast_to_fp8(moe_permute(x, src_idx))`` (zero rows get scale 1e-4/448).
* ``moe_unpermute_reduce(y [N,H], pos [T,K] int32, weights [T,K] fp32 or None) -> out [T,H]`` in y's dtype:
  ``out[t] = sum_k w[t,k] * y[pos[t,k]]`` over ``pos[t,k] >= 0`` (w = 1 without weights), accumulated
  in fp32 in k order, rounded once. A row with no valid position is zero.

Send buffer order: each token is packed once per destination rank, rows ordered by (destination rank,
token index); :func:`dispatch_positions` gives ``pos [T,R]`` (row of token t in the send buffer for
rank r, -1 if not sent), and the same ``pos`` drives the combine's un-permute + reduce.

Weights convention (DeepEP normal mode): ``EPDispatcher.combine`` only SUMS what it is given, one row
per received token, over the ranks the token went to. The top-k weights are applied on the expert
side: :meth:`DispatchHandle.expert_reduce` (or your own code) forms, for each received token, the
weighted sum of its LOCAL experts' outputs ``sum_j w[j] * expert_j(x)``; combine then adds those
partial sums across ranks. So ``combine(handle.expert_reduce(f(handle.contiguous_x)))`` =
``sum_j w_j * expert_j(x)`` over all k experts of each token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._ops import ceil_div, check_same_device, check_tensor, define_op
from .fp8 import FP8_DTYPE, per_token_cast_to_fp8_ref

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PERMUTE_DTYPES = _FLOAT_DTYPES + (FP8_DTYPE, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels)

def moe_get_dispatch_layout_ref(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    t = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)  # ids out of range count as unused (kernels too)
    idx = torch.where(valid, topk_idx, 0)
    per_expert = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    per_expert.scatter_add_(0, idx.reshape(-1), valid.reshape(-1).to(torch.int64))
    in_rank = torch.zeros(t, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    rank = torch.where(valid, idx // experts_per_rank, num_ranks)  # invalid -> spare column
    in_rank.scatter_(1, rank, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    per_rank = in_rank.sum(0, dtype=torch.int64)
    return per_rank.to(torch.int32), per_expert.to(torch.int32), in_rank


def moe_permute_ref(x: torch.Tensor, src_idx: torch.Tensor) -> torch.Tensor:
    n = src_idx.size(0)
    out = torch.zeros((n, x.size(1)), dtype=x.dtype, device=x.device) if x.dtype != FP8_DTYPE else \
        torch.zeros((n, x.size(1)), dtype=torch.uint8, device=x.device).view(FP8_DTYPE)
    valid = src_idx >= 0
    src = src_idx.long().clamp(min=0)
    if x.size(0) == 0 or n == 0:
        return out
    if x.dtype == FP8_DTYPE:
        g = x.view(torch.uint8).index_select(0, src) * valid.unsqueeze(1).to(torch.uint8)
        return g.view(FP8_DTYPE)
    return torch.where(valid.unsqueeze(1), x.index_select(0, src), out)


def moe_permute_fp8_ref(x: torch.Tensor, src_idx: torch.Tensor):
    return per_token_cast_to_fp8_ref(moe_permute_ref(x, src_idx))


def moe_unpermute_reduce_ref(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    t, k = pos.shape
    acc = torch.zeros((t, y.size(1)), dtype=torch.float32, device=y.device)
    for j in range(k):  # fixed k order: the kernel accumulates in the same order
        p = pos[:, j].long()
        valid = p >= 0
        if y.size(0) == 0:
            break
        rows = y.index_select(0, p.clamp(min=0)).float()
        if weights is not None:
            rows = rows * weights[:, j:j + 1]
        acc += torch.where(valid.unsqueeze(1), rows, torch.zeros((), device=y.device))
    return acc.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes only)

def _layout_fake(topk_idx, num_experts, num_ranks):
    t = topk_idx.size(0)
    return (topk_idx.new_empty((num_ranks,), dtype=torch.int32), topk_idx.new_empty((num_experts,), dtype=torch.int32),
            topk_idx.new_empty((t, num_ranks), dtype=torch.bool))


def _permute_fake(x, src_idx):
    return x.new_empty((src_idx.size(0), x.size(1)))


def _permute_fp8_fake(x, src_idx):
    n, h = src_idx.size(0), x.size(1)
    return x.new_empty((n, h), dtype=FP8_DTYPE), x.new_empty((n, ceil_div(h, 128)), dtype=torch.float32)


def _unpermute_fake(y, pos, weights=None):
    return y.new_empty((pos.size(0), y.size(1)))


define_op("moe_get_dispatch_layout", "(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)",
          moe_get_dispatch_layout_ref, _layout_fake)
define_op("moe_permute", "(Tensor x, Tensor src_idx) -> Tensor", moe_permute_ref, _permute_fake)
define_op("moe_permute_fp8", "(Tensor x, Tensor src_idx) -> (Tensor, Tensor)", moe_permute_fp8_ref, _permute_fp8_fake)
define_op("moe_unpermute_reduce", "(Tensor y, Tensor pos, Tensor? weights=None) -> Tensor",
          moe_unpermute_reduce_ref, _unpermute_fake)


# ----------------------------------------------------------------------------------------------
# public ops (checked wrappers)

def _check_topk_idx(topk_idx, num_experts: int, num_ranks: int | None, check_values: bool) -> None:
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if num_ranks is not None:
        if not isinstance(num_ranks, int) or num_ranks <= 0:
            raise ValueError(f"num_ranks: expected a positive int, got {num_ranks!r}")
        if num_experts % num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of num_ranks={num_ranks}, got {num_experts}")
    if check_values and topk_idx.numel() > 0:  # a host sync on GPU; pass check_values=False to skip
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx: expected expert ids in [0, {num_experts}) or -1 (unused), "
                             f"got values in [{lo}, {hi}]")


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, check_values: bool = True):
    """Per-rank / per-expert token counts and the token->rank membership of a top-k routing.

    Args:
        topk_idx: [T, k] int64 expert ids, -1 = unused slot.
        num_experts: E; num_ranks: R with E % R == 0 (expert e on rank e // (E/R)).
        check_values: verify ids are in [-1, E) (a host sync on GPU).
    Returns:
        (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool).
    """
    _check_topk_idx(topk_idx, num_experts, num_ranks, check_values)
    return torch.ops.deepkernels.moe_get_dispatch_layout(topk_idx.contiguous(), num_experts, num_ranks)


def _check_src_idx(src_idx, x) -> None:
    check_tensor("src_idx", src_idx, dtypes=(torch.int32,), ndim=1, contiguous=True)
    check_same_device(x=x, src_idx=src_idx)


def permute(x: torch.Tensor, src_idx: torch.Tensor) -> torch.Tensor:
    """Row gather ``out[i] = x[src_idx[i]]`` (zero row where src_idx[i] == -1). x: [T, H] any dtype."""
    check_tensor("x", x, dtypes=_PERMUTE_DTYPES, ndim=2)
    _check_src_idx(src_idx, x)
    return torch.ops.deepkernels.moe_permute(x.contiguous(), src_idx)


def permute_fp8(x: torch.Tensor, src_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row gather fused with per-token fp8 quantisation: (e4m3 [N, H], scale [N, ceil(H/128)] fp32)."""
    check_tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
    _check_src_idx(src_idx, x)
    return torch.ops.deepkernels.moe_permute_fp8(x.contiguous(), src_idx)


def unpermute_reduce(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * y[pos[t,k]]`` over pos >= 0, fp32 accumulation, out in y's dtype.

    Args: y [N, H] float32/bfloat16/float16; pos [T, K] int32 (-1 = skip; must be < N);
    weights [T, K] float32 or None (= all ones)."""
    check_tensor("y", y, dtypes=_FLOAT_DTYPES, ndim=2)
    check_tensor("pos", pos, dtypes=(torch.int32,), ndim=2, contiguous=True)
    check_same_device(y=y, pos=pos, weights=weights)
    if weights is not None:
        check_tensor("weights", weights, dtypes=(torch.float32,), shape=tuple(pos.shape), contiguous=True)
    return torch.ops.deepkernels.moe_unpermute_reduce(y.contiguous(), pos, weights)


# ----------------------------------------------------------------------------------------------
# index helpers (plain torch, no host sync)

def dispatch_positions(is_token_in_rank: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """pos [T, R] int32: the send-buffer row of token t for rank r, -1 if not sent.

    Rows are ordered by (rank, token). Without ``capacity`` rank r's rows start at the exclusive prefix
    sum of the per-rank counts (a packed buffer); with it, at r * capacity (fixed-capacity layout)."""
    inr = is_token_in_rank.to(torch.int32)
    rank_of = torch.cumsum(inr, 0, dtype=torch.int32) - 1
    if capacity is None:
        counts = inr.sum(0, dtype=torch.int32)
        start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    else:
        start = torch.arange(is_token_in_rank.size(1), dtype=torch.int32, device=inr.device) * capacity
    return torch.where(is_token_in_rank, rank_of + start, -1).to(torch.int32)


def positions_to_src_idx(pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Invert ``pos [T, K]`` into ``src_idx [num_rows]`` int32: the t with pos[t, k] == i, or -1."""
    t = pos.size(0)
    src = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=pos.device)
    flat = pos.reshape(-1).long()
    flat = torch.where(flat >= 0, flat, num_rows)
    tok = torch.arange(t, dtype=torch.int32, device=pos.device).repeat_interleave(pos.size(1))
    src.scatter_(0, flat, tok)
    src[num_rows] = -1
    return src[:num_rows]


def _count_ids(key: torch.Tensor, n: int) -> torch.Tensor:
    """Histogram of ``key`` (values in [0, n], n = "none") over [0, n): scatter_add, unlike bincount no
    host sync on CUDA (bincount reads the max to size its output)."""
    counts = torch.zeros(n + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key, dtype=torch.int64))
    return counts[:n]


def expert_positions(local_ids: torch.Tensor, num_local_experts: int, segment_start: torch.Tensor,
                     counts: torch.Tensor | None = None) -> torch.Tensor:
    """pos [N, k] int32 of each (row, slot) with a local expert in an expert-grouped buffer.

    Entries of expert l are placed at segment_start[l] + (their order by row, then slot); -1 stays -1."""
    n, k = local_ids.shape
    flat = local_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, num_local_experts)
    order = torch.argsort(key, stable=True)
    if counts is None:
        counts = _count_ids(key, num_local_experts)
    counts = counts.to(torch.int64)
    cstart = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    rank_in = torch.arange(n * k, device=local_ids.device) - torch.cat(
        [cstart, cstart.new_zeros(1)])[sorted_key]
    seg = torch.cat([segment_start.to(torch.int64), segment_start.new_zeros(1, dtype=torch.int64)])
    val = torch.where(sorted_key < num_local_experts, seg[sorted_key] + rank_in, -1)
    pos = torch.empty(n * k, dtype=torch.int64, device=local_ids.device)
    pos.scatter_(0, order, val)
    return pos.view(n, k).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# the dispatcher

def _world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class DispatchHandle:
    """What combine needs, plus the local expert layouts of the received tokens.

    Attributes:
        pos: [T, R] int32 send-buffer row of each source token per destination rank (-1 = not sent).
        send_counts / recv_counts: per-rank row counts (host lists; None in fixed-capacity mode).
        num_recv: rows received (R * capacity in fixed-capacity mode).
        recv_local_idx: [num_recv, k] int32 local expert id of each slot (-1 = not local / padding row).
        recv_weights: [num_recv, k] float32 top-k weights (0 where not local).
        num_recv_tokens_per_expert: [L] int32 device tensor; also ``..._list`` on host (normal mode).
    """
    rank: int
    num_ranks: int
    num_local_experts: int
    pos: torch.Tensor
    num_tokens: int
    num_recv: int
    recv_local_idx: torch.Tensor
    recv_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    num_recv_tokens_per_expert_list: list[int] | None
    send_counts: list[int] | None
    recv_counts: list[int] | None
    capacity: int | None
    hidden: int
    src_idx: torch.Tensor | None = None
    send_local: torch.Tensor | None = None  # [num_send, k] bool: slot's expert lives on the row's destination
    _layout_cache: dict = field(default_factory=dict, repr=False)

    # -- expert-side layouts ------------------------------------------------------------------
    def contiguous_layout(self, alignment: int = 1):
        """(expert_pos [N,k] int32, m_indices [M] int32, segment_start [L] int64, M) for the contiguous
        grouped-GEMM layout: each local expert's rows, in (received row, slot) order, padded to a multiple
        of ``alignment``; m_indices = expert id per row, -1 on padding. Needs the host counts (normal mode)."""
        if self.num_recv_tokens_per_expert_list is None:
            raise RuntimeError("contiguous_layout needs host-side counts; in fixed-capacity mode use masked_layout")
        key = ("contig", alignment)
        if key not in self._layout_cache:
            # total size from the host counts; everything else from the device counts (no H2D copy)
            s = sum(ceil_div(c, alignment) * alignment for c in self.num_recv_tokens_per_expert_list)
            dev = self.recv_local_idx.device
            cnt = self.num_recv_tokens_per_expert.to(torch.int64)
            padded = (cnt + alignment - 1) // alignment * alignment
            seg_end = torch.cumsum(padded, 0)
            seg = seg_end - padded
            rows = torch.arange(s, dtype=torch.int64, device=dev)
            e_of = torch.searchsorted(seg_end, rows, right=True).clamp(max=max(self.num_local_experts - 1, 0))
            if self.num_local_experts:
                m_idx = torch.where(rows - seg[e_of] < cnt[e_of], e_of, -1).to(torch.int32)
            else:
                m_idx = torch.full((s,), -1, dtype=torch.int32, device=dev)
            pos = expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                   self.num_recv_tokens_per_expert)
            self._layout_cache[key] = (pos, m_idx, seg, s)
        return self._layout_cache[key]

    def masked_layout(self, max_m: int | None = None):
        """(expert_pos [N,k] int32 into a [L*max_m] row space, masked_m [L] int32, max_m) for the masked
        grouped-GEMM layout [L, max_m, H]. Sync-free; default max_m = num_recv (always enough)."""
        max_m = self.num_recv if max_m is None else max_m
        key = ("masked", max_m)
        if key not in self._layout_cache:
            dev = self.recv_local_idx.device
            seg = torch.arange(self.num_local_experts, dtype=torch.int64, device=dev) * max_m
            pos = expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                   self.num_recv_tokens_per_expert)
            self._layout_cache[key] = (pos, self.num_recv_tokens_per_expert.to(torch.int32), max_m)
        return self._layout_cache[key]

    def to_contiguous(self, recv_x, alignment: int = 1):
        """recv_x [N, H] (or an (fp8, scale) pair) -> the rows in contiguous layout (+ m_indices)."""
        pos, m_idx, _, m = self.contiguous_layout(alignment)
        src = positions_to_src_idx(pos, m)
        if isinstance(recv_x, tuple):
            return (permute(recv_x[0], src), permute(recv_x[1], src)), m_idx
        return permute(recv_x, src), m_idx

    def to_masked(self, recv_x, max_m: int | None = None):
        """recv_x [N, H] (or (fp8, scale)) -> [L, max_m, H] (or a pair) and masked_m [L]."""
        pos, masked_m, max_m = self.masked_layout(max_m)
        src = positions_to_src_idx(pos, self.num_local_experts * max_m)
        view = lambda t: t.view(self.num_local_experts, max_m, t.size(1))  # noqa: E731
        if isinstance(recv_x, tuple):
            return (view(permute(recv_x[0], src)), view(permute(recv_x[1], src))), masked_m
        return view(permute(recv_x, src)), masked_m

    def expert_reduce(self, expert_out: torch.Tensor, layout: str = "contiguous", alignment_or_max_m=None):
        """Weighted sum over each received row's local experts: [M, H] (contiguous) or [L, max_m, H]
        (masked) expert outputs -> [num_recv, H] in expert_out's dtype (fp32 accumulation). This is
        where the top-k weights are applied."""
        if layout == "contiguous":
            pos = self.contiguous_layout(alignment_or_max_m or 1)[0]
        elif layout == "masked":
            pos = self.masked_layout(alignment_or_max_m)[0]
            expert_out = expert_out.reshape(-1, expert_out.size(-1))
        else:
            raise ValueError(f"layout: expected 'contiguous' or 'masked', got {layout!r}")
        return unpermute_reduce(expert_out, pos, self.recv_weights)


class EPDispatcher:
    """Expert-parallel dispatch / combine over a torch.distributed group (or a single process).

    Args:
        group: a ProcessGroup (NCCL on GPUs, gloo on CPU) or None for one process (no torch.distributed).
        num_experts: E (global); rank r holds experts r*E/R .. (r+1)*E/R - 1.
        capacity: None = normal mode (exact sizes; host syncs, see below). An int = fixed-capacity mode
            (like DeepEP low-latency): every rank sends ``capacity`` rows to every rank, so all shapes are
            static, there is no host sync, and the step is CUDA-graph capturable; needs T <= capacity.

    Host syncs per step. Normal mode: ONE in dispatch (the counts all_to_all result, per-rank and
    per-local-expert counts and the id check, fetched in one D2H copy: the split sizes of the data
    all_to_all must be host ints); combine has none (it reuses the split sizes); the contiguous layout
    sizes itself from the same host counts and builds its indices from the device copy (no H2D copy).
    Fixed-capacity mode: none (no id check either; ids outside [0, E) are treated as unused).
    (The gloo backend itself works on host memory; the sync count is about CUDA tensors with NCCL.)

    Collectives per step: dispatch = 1 counts all_to_all (normal mode only) + 1 data all_to_all (+1
    for the fp8 scales) + 1 for the metadata; combine = 1 all_to_all. Tensors go as raw bytes (uint8
    views), so any dtype works with gloo and NCCL.
    """

    def __init__(self, group=None, num_experts: int = 0, capacity: int | None = None):
        self.group = group
        self.rank, self.num_ranks = _world(group)
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
        if num_experts % self.num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.num_ranks}, got {num_experts}")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise ValueError(f"capacity: expected a non-negative int or None, got {capacity!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.capacity = capacity

    # -- collectives ---------------------------------------------------------------------------
    def _a2a(self, send: torch.Tensor, recv_rows: int, send_splits=None, recv_splits=None) -> torch.Tensor:
        """all_to_all_single on the rows of a 2D tensor, moved as bytes."""
        row_shape = send.shape[1:]
        out = torch.empty((recv_rows, *row_shape), dtype=send.dtype, device=send.device)
        if self.group is None:
            out.copy_(send)
            return out
        import torch.distributed as dist

        row_bytes = int(torch.Size(row_shape).numel()) * send.element_size()
        sb = send.contiguous().view(torch.uint8).reshape(send.size(0), row_bytes)
        ob = out.view(torch.uint8).reshape(recv_rows, row_bytes)
        dist.all_to_all_single(ob, sb, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=self.group)
        return out

    # -- dispatch -------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, use_fp8: bool = False):
        """Send each token to the ranks that hold its experts.

        Args:
            x: [T, H] bf16/fp16/fp32, or a pair (x_fp8 [T, H] e4m3, scale [T, ceil(H/128)] fp32).
            topk_idx: [T, k] int64 global expert ids (-1 = unused). topk_weights: [T, k] float32.
            use_fp8: quantise a float x to e4m3 + per-token scales while packing (fused).
        Returns:
            (recv_x, handle): recv_x [N, H] (or an (e4m3, scale) pair) with the received rows ordered by
            source rank then source token index; ``handle.recv_local_idx`` / ``recv_weights`` /
            ``num_recv_tokens_per_expert`` describe them (see :class:`DispatchHandle`).
        """
        is_pair = isinstance(x, (tuple, list))
        if is_pair:
            x_q, x_s = x
            check_tensor("x[0]", x_q, dtypes=(FP8_DTYPE,), ndim=2)
            check_tensor("x[1]", x_s, dtypes=(torch.float32,), shape=(x_q.size(0), ceil_div(x_q.size(1), 128)))
            ref = x_q
        else:
            check_tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
            ref = x
        t, h = ref.shape
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
        if topk_idx.size(0) != t:
            raise ValueError(f"topk_idx: expected {t} rows (one per token of x), got {topk_idx.size(0)}")
        k = topk_idx.size(1)
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(t, k))
        check_same_device(x=ref, topk_idx=topk_idx, topk_weights=topk_weights)
        fixed = self.capacity is not None
        if fixed and t > self.capacity:
            raise ValueError(f"x: fixed-capacity mode holds at most capacity={self.capacity} tokens, got {t}")
        # ids are checked in normal mode only, folded into the counts sync below
        _check_topk_idx(topk_idx, self.num_experts, self.num_ranks, check_values=False)
        topk_idx = topk_idx.contiguous()
        dev, R, L = ref.device, self.num_ranks, self.num_local_experts

        per_rank, per_expert, in_rank = torch.ops.deepkernels.moe_get_dispatch_layout(topk_idx, self.num_experts, R)

        # per-row metadata: local expert ids (-1 not on the destination) and weights, as raw 4-byte words
        pos = dispatch_positions(in_rank, self.capacity)
        num_send = R * self.capacity if fixed else None
        if fixed:
            send_counts = recv_counts = None
            recv_expert = None
        else:
            # counts exchange: [R, 1 + L] (rows per destination, then per-local-expert counts) + id check
            bad = ((topk_idx < -1) | (topk_idx >= self.num_experts)).any().to(torch.int64).view(1) \
                if t > 0 else torch.zeros(1, dtype=torch.int64, device=dev)
            cnt = torch.cat([per_rank.view(R, 1), per_expert.view(R, L)], 1).to(torch.int64)
            rcnt = self._a2a(cnt, R)
            host = torch.cat([cnt[:, 0], rcnt.view(-1), bad]).cpu()  # the one host sync
            if int(host[-1]) != 0:
                lo, hi = int(topk_idx.min()), int(topk_idx.max())
                raise ValueError(f"topk_idx: expected expert ids in [0, {self.num_experts}) or -1 (unused), "
                                 f"got values in [{lo}, {hi}]")
            send_counts = host[:R].tolist()
            rc = host[R:R + R * (1 + L)].view(R, 1 + L)
            recv_counts = rc[:, 0].tolist()
            recv_expert = rc[:, 1:].sum(0).tolist()
            num_send = sum(send_counts)
        src = positions_to_src_idx(pos, num_send)
        num_recv = num_send if fixed else sum(recv_counts)

        # data
        if is_pair:
            send_x = (permute(x_q, src), permute(x_s, src))
        elif use_fp8:
            send_x = permute_fp8(x, src)
        else:
            send_x = permute(x, src)
        # metadata of each send row: destination rank, then local ids / weights
        dest = torch.arange(R, device=dev, dtype=torch.int64)
        if fixed:
            row_rank = dest.repeat_interleave(self.capacity)
        else:
            row_rank = torch.repeat_interleave(dest, per_rank.long(), output_size=num_send)  # device counts: no sync
        srcl = src.long().clamp(min=0)
        gid = topk_idx.index_select(0, srcl) if t > 0 else torch.full((num_send, k), -1, dtype=torch.int64, device=dev)
        lid = gid - (row_rank * L).unsqueeze(1)
        local = (gid >= 0) & (lid >= 0) & (lid < L) & (src >= 0).unsqueeze(1)
        lid = torch.where(local, lid, -1).to(torch.int32)
        w = topk_weights.index_select(0, srcl) if t > 0 else torch.zeros(num_send, k, device=dev)
        w = torch.where(local, w, 0.0)
        meta = torch.cat([lid, w.view(torch.int32)], 1)
        recv_meta = self._a2a(meta, num_recv, send_counts, recv_counts)
        if is_pair or use_fp8:
            recv_x = (self._a2a(send_x[0], num_recv, send_counts, recv_counts),
                      self._a2a(send_x[1], num_recv, send_counts, recv_counts))
        else:
            recv_x = self._a2a(send_x, num_recv, send_counts, recv_counts)
        recv_lid = recv_meta[:, :k].contiguous()
        recv_w = recv_meta[:, k:].contiguous().view(torch.float32)
        if recv_expert is None:
            cnt_dev = _count_ids(torch.where(recv_lid >= 0, recv_lid, L).view(-1).long(), L).to(torch.int32)
        else:
            cnt_dev = rcnt.view(R, 1 + L)[:, 1:].sum(0).to(torch.int32)  # device copy of the counts: no H2D
        handle = DispatchHandle(rank=self.rank, num_ranks=R, num_local_experts=L, pos=pos, num_tokens=t,
                                num_recv=num_recv, recv_local_idx=recv_lid, recv_weights=recv_w,
                                num_recv_tokens_per_expert=cnt_dev, num_recv_tokens_per_expert_list=recv_expert,
                                send_counts=send_counts, recv_counts=recv_counts, capacity=self.capacity, hidden=h,
                                src_idx=src, send_local=local)
        return recv_x, handle

    def exchange_weights(self, topk_weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send new top-k weights [T, k] fp32 along a previous dispatch (e.g. weights known only at
        combine time, as in DeepEP's low-latency combine): returns the receiver-side [num_recv, k]
        weights (0 where the slot's expert is not local), like ``handle.recv_weights``. No host sync."""
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_tokens, None))
        src = handle.src_idx.long().clamp(min=0)
        k = handle.send_local.size(1)
        w = topk_weights.index_select(0, src) if handle.num_tokens else \
            torch.zeros(src.size(0), k, device=topk_weights.device)
        w = torch.where(handle.send_local, w, 0.0).contiguous()
        return self._a2a(w, handle.num_recv, handle.send_counts, handle.recv_counts)

    def dispatch_cached(self, x, handle: DispatchHandle, use_fp8: bool = False):
        """Dispatch new data along a previous dispatch's routing (no counts exchange, no host sync):
        x [T, H] float (optionally quantised while packing) or an (e4m3, scale) pair -> recv_x."""
        ref = x[0] if isinstance(x, (tuple, list)) else x
        check_tensor("x[0]" if ref is not x else "x", ref, ndim=2, shape=(handle.num_tokens, None))
        src, n = handle.src_idx, handle.num_recv
        if isinstance(x, (tuple, list)):
            send = (permute(x[0], src), permute(x[1], src))
        elif use_fp8:
            send = permute_fp8(x, src)
        else:
            send = permute(x, src)
        if isinstance(send, tuple):
            return tuple(self._a2a(s_, n, handle.send_counts, handle.recv_counts) for s_ in send)
        return self._a2a(send, n, handle.send_counts, handle.recv_counts)

    # -- combine --------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send each received row's result back and sum per source token over ranks.

        Args: y [handle.num_recv, H] float32/bfloat16/float16, one row per received row (already the
        weighted sum over that row's local experts, see :meth:`DispatchHandle.expert_reduce`).
        Returns: [T, H] in y's dtype, fp32 accumulation over ranks; zero for tokens with no expert.
        """
        check_tensor("y", y, dtypes=_FLOAT_DTYPES, shape=(handle.num_recv, None))
        back_rows = handle.num_recv if handle.capacity is not None else sum(handle.send_counts)
        back = self._a2a(y.contiguous(), back_rows, handle.recv_counts, handle.send_counts)
        return unpermute_reduce(back, handle.pos)


__all__ = ["get_dispatch_layout", "permute", "permute_fp8", "unpermute_reduce", "dispatch_positions",
           "positions_to_src_idx", "expert_positions", "EPDispatcher", "DispatchHandle"]
