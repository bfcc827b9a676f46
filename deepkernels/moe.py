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
Weights at combine (DeepEP low-latency convention): :meth:`EPDispatcher.combine_experts` takes the
experts' outputs unreduced and applies the SOURCE rank's weights there; dispatch then needs no weights.

Wire format: each send row carries payload, source token index, local expert ids and weights in one byte
buffer (:class:`RowFormat`), so a dispatch is ONE all_to_all_single (plus the counts exchange in normal
mode) and a combine is ONE. Fixed-capacity (low-latency) mode adds a 16-byte count header per
destination slot and has static shapes and no host sync (see :class:`EPDispatcher`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._ops import (ceil_div, check_bool, check_index_values, check_int, check_same_device, check_tensor, define_op,
                   run_device_checks)
from .fp8 import FP8_DTYPE, per_token_cast_to_fp8_ref

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PERMUTE_DTYPES = _FLOAT_DTYPES + (FP8_DTYPE, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels)

def moe_get_dispatch_layout_ref(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    _check_topk_idx(topk_idx, num_experts, num_ranks, check_values=True)  # the reference path: ids checked
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
    _check_permute_args(x, src_idx, _PERMUTE_DTYPES, check_values=True)
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
    _check_permute_args(x, src_idx, _FLOAT_DTYPES, check_values=True)
    return per_token_cast_to_fp8_ref(moe_permute_ref(x, src_idx))


def moe_unpermute_reduce_ref(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    _check_unpermute_args(y, pos, weights, check_values=True)
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
    num_experts = check_int("num_experts", num_experts, min_value=1)
    if num_ranks is not None:
        num_ranks = check_int("num_ranks", num_ranks, min_value=1)
        if num_experts % num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of num_ranks={num_ranks} (expert e lives on rank "
                             f"e // (num_experts / num_ranks)), got {num_experts}")
    if check_values:  # a host read (one sync on GPU)
        _check_expert_ids(topk_idx, num_experts)


def _check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    if topk_idx.numel() > 0 and topk_idx.device.type != "meta" and bool(((topk_idx < -1) | (topk_idx >= num_experts)).any()):
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        raise ValueError(f"topk_idx: expected expert ids in [0, {num_experts}) or -1 (unused), "
                         f"got values in [{lo}, {hi}]")


def _check_permute_args(x, src_idx, dtypes, check_values: bool) -> None:
    check_tensor("x", x, dtypes=dtypes, ndim=2)
    check_tensor("src_idx", src_idx, dtypes=(torch.int32,), ndim=1, contiguous=True)
    check_same_device(x=x, src_idx=src_idx)
    if check_values:
        check_index_values("src_idx", src_idx, -1, x.size(0), "row indices of x (-1 = zero row)")


def _check_unpermute_args(y, pos, weights, check_values: bool) -> None:
    check_tensor("y", y, dtypes=_FLOAT_DTYPES, ndim=2)
    check_tensor("pos", pos, dtypes=(torch.int32,), ndim=2, contiguous=True)
    if weights is not None:
        check_tensor("weights", weights, dtypes=(torch.float32,), shape=tuple(pos.shape), contiguous=True)
    check_same_device(y=y, pos=pos, weights=weights)
    if check_values:
        check_index_values("pos", pos, -1, y.size(0), "row indices of y (-1 = skip)")


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, check_values: bool = True):
    """Per-rank / per-expert token counts and the token->rank membership of a top-k routing.

    Args:
        topk_idx: [T, k] int64 expert ids, -1 = unused slot.
        num_experts: E (an int >= 1); num_ranks: R (an int >= 1) with E % R == 0 (expert e on rank e // (E/R)).
        check_values: verify ids are in [-1, E) (a host sync on GPU). With False, CUDA tensors are trusted:
            the kernel ignores an id outside [0, E) (counts it nowhere); DEEPKERNELS_CHECK=1 still checks.
            CPU tensors (the reference) are always checked.
    Returns:
        (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool).
    Raises:
        TypeError for a non-tensor, a non-int num_experts/num_ranks or a non-bool check_values; ValueError
        naming the argument for a wrong dtype/ndim, num_experts % num_ranks != 0, or an id outside [-1, E).
    """
    check_values = check_bool("check_values", check_values)
    num_ranks = check_int("num_ranks", num_ranks, min_value=1)
    _check_topk_idx(topk_idx, num_experts, num_ranks, check_values or run_device_checks(topk_idx))
    return torch.ops.deepkernels.moe_get_dispatch_layout(topk_idx.contiguous(), num_experts, num_ranks)


_TRUSTED_NOTE = """
    Index values: on CPU tensors (the reference) an entry outside [-1, rows) raises ValueError naming the
    argument before anything is written. On CUDA (and emulated) they are trusted (no host sync): an entry
    outside the range is never read and poisons its output row (NaN; 0xFF bytes for integer dtypes).
    ``DEEPKERNELS_CHECK=1`` (read on each call) validates them first with one host sync."""


def permute(x: torch.Tensor, src_idx: torch.Tensor) -> torch.Tensor:
    """Row gather ``out[i] = x[src_idx[i]]`` (zero row where src_idx[i] == -1).

    x: [T, H] float32/bfloat16/float16/float8_e4m3fn/int32/int64/uint8; src_idx: [N] int32 contiguous,
    values in [-1, T). Returns [N, H] in x's dtype."""
    _check_permute_args(x, src_idx, _PERMUTE_DTYPES, check_values=run_device_checks(src_idx))
    return torch.ops.deepkernels.moe_permute(x.contiguous(), src_idx)


def permute_fp8(x: torch.Tensor, src_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row gather fused with per-token fp8 quantisation: (e4m3 [N, H], scale [N, ceil(H/128)] fp32).

    x: [T, H] float32/bfloat16/float16; src_idx: [N] int32 contiguous, values in [-1, T)."""
    _check_permute_args(x, src_idx, _FLOAT_DTYPES, check_values=run_device_checks(src_idx))
    return torch.ops.deepkernels.moe_permute_fp8(x.contiguous(), src_idx)


def unpermute_reduce(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * y[pos[t,k]]`` over pos >= 0, fp32 accumulation, out in y's dtype.

    Args: y [N, H] float32/bfloat16/float16; pos [T, K] int32 contiguous (-1 = skip; values in [-1, N));
    weights [T, K] float32 contiguous or None (= all ones)."""
    _check_unpermute_args(y, pos, weights, check_values=run_device_checks(pos))
    return torch.ops.deepkernels.moe_unpermute_reduce(y.contiguous(), pos, weights)


for _f in (permute, permute_fp8, unpermute_reduce):
    _f.__doc__ += _TRUSTED_NOTE


# ----------------------------------------------------------------------------------------------
# index helpers (plain torch, no host sync)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_optional_int(name: str, value, min_value: int = 0):
    return None if value is None else check_int(name, value, min_value=min_value)


def dispatch_positions(is_token_in_rank: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """pos [T, R] int32: the send-buffer row of token t for rank r, -1 if not sent.

    Rows are ordered by (rank, token). Without ``capacity`` rank r's rows start at the exclusive prefix
    sum of the per-rank counts (a packed buffer); with it, at r * capacity (fixed-capacity layout, which
    needs T <= capacity so a rank's rows never spill into the next slot).
    Raises TypeError / ValueError naming ``is_token_in_rank`` (a bool [T, R] tensor) or ``capacity``."""
    check_tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), ndim=2)
    capacity = _check_optional_int("capacity", capacity)
    if capacity is not None and is_token_in_rank.size(0) > capacity:
        raise ValueError(f"capacity: expected >= T = {is_token_in_rank.size(0)} (rows of is_token_in_rank), "
                         f"got {capacity}")
    return _dispatch_positions(is_token_in_rank, capacity)


def _dispatch_positions(is_token_in_rank: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    inr = is_token_in_rank.to(torch.int32)
    rank_of = torch.cumsum(inr, 0, dtype=torch.int32) - 1
    if capacity is None:
        counts = inr.sum(0, dtype=torch.int32)
        start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    else:
        start = torch.arange(is_token_in_rank.size(1), dtype=torch.int32, device=inr.device) * capacity
    return torch.where(is_token_in_rank, rank_of + start, -1).to(torch.int32)


def positions_to_src_idx(pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Invert ``pos [T, K]`` into ``src_idx [num_rows]`` int32: the t with pos[t, k] == i, or -1.

    pos: int32/int64 [T, K], values in [-1, num_rows) (-1 = none); num_rows: an int >= 0. On CPU tensors an
    entry outside that range raises ValueError naming ``pos``; on CUDA it is trusted (DEEPKERNELS_CHECK=1
    checks it, one sync) and an out-of-range entry is ignored (never written out of bounds)."""
    check_tensor("pos", pos, dtypes=_INDEX_DTYPES, ndim=2)
    num_rows = check_int("num_rows", num_rows, min_value=0)
    if pos.device.type == "cpu" or run_device_checks(pos):
        check_index_values("pos", pos, -1, num_rows, "rows (-1 = none)")
        used = pos[pos >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError(f"pos: expected each row at most once, got {used.numel() - used.unique().numel()} "
                             f"repeated rows")
    return _positions_to_src_idx(pos, num_rows)


def _positions_to_src_idx(pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    t = pos.size(0)
    src = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=pos.device)
    flat = pos.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < num_rows), flat, num_rows)  # anything else: the spare slot
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
                     counts: torch.Tensor | None = None, limit: int | None = None) -> torch.Tensor:
    """pos [N, k] int32 of each (row, slot) with a local expert in an expert-grouped buffer.

    Entries of expert l are placed at segment_start[l] + (their order by row, then slot); -1 stays -1.
    With ``limit``, entries of an expert beyond its first ``limit`` get -1 (dropped): a segment never
    spills into the next one or past the buffer, whatever the routing.
    Args: local_ids int32/int64 [N, k], values in [-1, L) (checked on CPU tensors; on CUDA an id outside is
    treated as -1); num_local_experts L (int >= 0); segment_start int [L]; counts int [L] (the histogram of
    local_ids, or None to compute it); limit an int >= 0 or None."""
    check_tensor("local_ids", local_ids, dtypes=_INDEX_DTYPES, ndim=2)
    num_local_experts = check_int("num_local_experts", num_local_experts, min_value=0)
    check_tensor("segment_start", segment_start, dtypes=_INDEX_DTYPES, shape=(num_local_experts,))
    if counts is not None:
        check_tensor("counts", counts, dtypes=_INDEX_DTYPES, shape=(num_local_experts,))
    limit = _check_optional_int("limit", limit)
    check_same_device(local_ids=local_ids, segment_start=segment_start, counts=counts)
    if local_ids.device.type == "cpu" or run_device_checks(local_ids):
        check_index_values("local_ids", local_ids, -1, num_local_experts, "local expert ids (-1 = none)")
    return _expert_positions(local_ids, num_local_experts, segment_start, counts, limit)


def _expert_positions(local_ids: torch.Tensor, num_local_experts: int, segment_start: torch.Tensor,
                      counts: torch.Tensor | None = None, limit: int | None = None) -> torch.Tensor:
    n, k = local_ids.shape
    flat = local_ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_local_experts), flat, num_local_experts)
    order = torch.argsort(key, stable=True)
    if counts is None:
        counts = _count_ids(key, num_local_experts)
    counts = counts.to(torch.int64)
    cstart = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    rank_in = torch.arange(n * k, device=local_ids.device) - torch.cat(
        [cstart, cstart.new_zeros(1)])[sorted_key]
    seg = torch.cat([segment_start.to(torch.int64), segment_start.new_zeros(1, dtype=torch.int64)])
    keep = sorted_key < num_local_experts
    if limit is not None:
        keep = keep & (rank_in < limit)
    val = torch.where(keep, seg[sorted_key] + rank_in, -1)
    pos = torch.empty(n * k, dtype=torch.int64, device=local_ids.device)
    pos.scatter_(0, order, val)
    return pos.view(n, k).to(torch.int32)


def local_slot_rows(local_idx: torch.Tensor, expert_pos: torch.Tensor, slots: int) -> torch.Tensor:
    """[N, slots] int32: for each received row, the expert-buffer row (``expert_pos``) of its c-th local
    slot (slots with ``local_idx >= 0``, in slot order), -1 where the row has fewer local slots (or the
    entry was dropped). Local slots beyond ``slots`` are left out (only possible with repeated ids).
    local_idx / expert_pos: int [N, k] of one shape; slots: an int >= 0."""
    check_tensor("local_idx", local_idx, dtypes=_INDEX_DTYPES, ndim=2)
    check_tensor("expert_pos", expert_pos, dtypes=_INDEX_DTYPES, shape=tuple(local_idx.shape))
    slots = check_int("slots", slots, min_value=0)
    check_same_device(local_idx=local_idx, expert_pos=expert_pos)
    n = local_idx.size(0)
    local = local_idx >= 0
    c = torch.cumsum(local.to(torch.int32), 1) - 1
    col = torch.where(local & (c < slots), c, slots).long()  # column `slots` collects what is left out
    out = torch.full((n, slots + 1), -1, dtype=torch.int32, device=local_idx.device)
    out.scatter_(1, col, torch.where(local, expert_pos, -1).to(torch.int32))
    return out[:, :slots].contiguous()


def source_slot_positions(topk_idx: torch.Tensor, pos: torch.Tensor, num_experts: int, num_local_experts: int,
                          slots: int) -> torch.Tensor:
    """[T, k] int32 row of (token t, slot j) in the buffer :meth:`EPDispatcher.combine_experts` returns:
    ``pos[t, r] * slots + c`` with r the rank of expert ``topk_idx[t, j]`` and c the number of earlier
    slots of t on that rank (the order :func:`local_slot_rows` packs them in); -1 for unused slots.
    topk_idx int64 [T, k]; pos int [T, R] with R * num_local_experts == num_experts; slots an int >= 0."""
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
    num_experts = check_int("num_experts", num_experts, min_value=1)
    num_local_experts = check_int("num_local_experts", num_local_experts, min_value=1)
    check_tensor("pos", pos, dtypes=_INDEX_DTYPES, ndim=2)
    if pos.size(0) != topk_idx.size(0) or pos.size(1) * num_local_experts != num_experts:
        raise ValueError(f"pos: expected shape [{topk_idx.size(0)}, {num_experts // num_local_experts}] "
                         f"(T of topk_idx, num_experts / num_local_experts ranks), got {list(pos.shape)}")
    slots = check_int("slots", slots, min_value=0)
    check_same_device(topk_idx=topk_idx, pos=pos)
    k = topk_idx.size(1)
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    rank = torch.where(valid, topk_idx // num_local_experts, 0)
    same = (rank.unsqueeze(2) == rank.unsqueeze(1)) & valid.unsqueeze(1)  # [T, j, j'] slot j' on j's rank
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_idx.device).tril(-1)  # j' < j
    c = (same & earlier).sum(-1)
    row = pos.long().gather(1, rank)
    ok = valid & (c < slots) & (row >= 0)
    return torch.where(ok, row * slots + c, -1).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# packed rows: every per-row field in one byte buffer, so one collective moves them all

SLOT_HEADER_BYTES = 16  # fixed-capacity slot header: int32 [rows for this rank, source tokens, 0, 0]


class RowFormat:
    """Byte layout of one packed row: named fields, each ``width`` elements of ``dtype`` at a 4-byte
    aligned offset (so each can be viewed in its dtype), the row padded to a multiple of 16 bytes.
    Alignment gaps are zeroed when packing, so no stale memory travels."""

    def __init__(self, fields):
        self.fields: dict[str, tuple[int, int, torch.dtype, int]] = {}
        off = 0
        for name, dtype, width in fields:
            nbytes = width * dtype.itemsize
            self.fields[name] = (off, nbytes, dtype, width)
            off += ceil_div(nbytes, 4) * 4
        self.row_bytes = ceil_div(max(off, 1), 16) * 16
        self.gaps, cur = [], 0
        for o, n, _, _ in self.fields.values():
            if o > cur:
                self.gaps.append((cur, o))
            cur = o + n
        if cur < self.row_bytes:
            self.gaps.append((cur, self.row_bytes))

    def pack(self, rows: torch.Tensor, **tensors: torch.Tensor) -> None:
        """rows [..., row_bytes] uint8 (any leading shape, last dim contiguous) <- fields [rows, width]."""
        lead = rows.shape[:-1]
        for name, t in tensors.items():
            off, nbytes, dtype, _ = self.fields[name]
            if t.dtype != dtype:
                raise RuntimeError(f"RowFormat.pack: field {name} expects {dtype}, got {t.dtype}")
            rows[..., off:off + nbytes].copy_(t.contiguous().view(torch.uint8).reshape(*lead, nbytes))
        for a, b in self.gaps:
            rows[..., a:b].zero_()

    def unpack(self, rows: torch.Tensor, name: str, num_rows: int) -> torch.Tensor:
        """Field ``name`` of every row of ``rows`` [..., row_bytes], as a contiguous [num_rows, width]."""
        off, nbytes, dtype, width = self.fields[name]
        return rows[..., off:off + nbytes].view(dtype).reshape(num_rows, width).contiguous()


# ----------------------------------------------------------------------------------------------
# the dispatcher

def _check_handle(handle) -> None:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the DispatchHandle that dispatch returned, got {type(handle).__name__}")


def _world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or None (one process), "
                        f"got {type(group).__name__}")

    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class DispatchHandle:
    """What combine needs, plus the local expert layouts of the received tokens.

    Attributes:
        pos: [T, R] int32 send-buffer row of each source token per destination rank (-1 = not sent).
        send_counts / recv_counts: per-rank row counts (host lists; None in fixed-capacity mode).
        num_send / num_recv: rows sent / received (both R * capacity in fixed-capacity mode).
        recv_local_idx: [num_recv, k] int32 local expert id of each slot (-1 = not local / padding row).
        recv_weights: [num_recv, k] float32 top-k weights (0 where not local); None when dispatch got none.
        recv_src_token: [num_recv] int32 token index of each received row on its source rank (-1 = padding).
        num_recv_tokens_per_rank: [R] int32 device tensor, rows received from each rank.
        num_recv_tokens_per_expert: [L] int32 device tensor; also ``..._list`` on host (normal mode).
        topk_idx / topk_weights: the source side's routing as given to dispatch (for combine_experts).
    """
    rank: int
    num_ranks: int
    num_local_experts: int
    pos: torch.Tensor
    num_tokens: int
    num_recv: int
    recv_local_idx: torch.Tensor
    recv_weights: torch.Tensor | None
    num_recv_tokens_per_expert: torch.Tensor
    num_recv_tokens_per_expert_list: list[int] | None
    send_counts: list[int] | None
    recv_counts: list[int] | None
    capacity: int | None
    hidden: int
    src_idx: torch.Tensor | None = None
    send_local: torch.Tensor | None = None  # [num_send, k] bool: slot's expert lives on the row's destination
    num_send: int = 0
    recv_src_token: torch.Tensor | None = None
    num_recv_tokens_per_rank: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    _layout_cache: dict = field(default_factory=dict, repr=False)

    # -- expert-side layouts ------------------------------------------------------------------
    def contiguous_layout(self, alignment: int = 1):
        """(expert_pos [N,k] int32, m_indices [M] int32, segment_start [L] int64, M) for the contiguous
        grouped-GEMM layout: each local expert's rows, in (received row, slot) order, padded to a multiple
        of ``alignment``; m_indices = expert id per row, -1 on padding. Needs the host counts (normal mode)."""
        if self.num_recv_tokens_per_expert_list is None:
            raise RuntimeError("contiguous_layout needs host-side counts; in fixed-capacity mode use masked_layout")
        alignment = check_int("alignment", alignment, min_value=1)
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
            pos = _expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                    self.num_recv_tokens_per_expert)
            self._layout_cache[key] = (pos, m_idx, seg, s)
        return self._layout_cache[key]

    def masked_layout(self, max_m: int | None = None):
        """(expert_pos [N,k] int32 into a [L*max_m] row space, masked_m [L] int32, max_m) for the masked
        grouped-GEMM layout [L, max_m, H]. Sync-free; default max_m = num_recv (always enough unless a
        token repeats an expert id). Overflow: an expert's entries beyond its first max_m (by received
        row, then slot) are DROPPED — expert_pos -1, never written, contributing 0 to the combine — and
        counted in :meth:`num_dropped`; masked_m = min(count, max_m)."""
        max_m = self.num_recv if max_m is None else check_int("max_m", max_m, min_value=0)
        key = ("masked", max_m)
        if key not in self._layout_cache:
            dev = self.recv_local_idx.device
            seg = torch.arange(self.num_local_experts, dtype=torch.int64, device=dev) * max_m
            pos = _expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                    self.num_recv_tokens_per_expert, limit=max_m)
            masked_m = self.num_recv_tokens_per_expert.clamp(max=max_m).to(torch.int32)
            self._layout_cache[key] = (pos, masked_m, max_m)
        return self._layout_cache[key]

    def num_dropped(self, max_m: int | None = None) -> torch.Tensor:
        """[L] int32 device tensor: entries per local expert dropped by ``masked_layout(max_m)`` (no sync)."""
        return (self.num_recv_tokens_per_expert - self.masked_layout(max_m)[1]).to(torch.int32)

    def check_overflow(self, max_m: int | None = None) -> None:
        """Raise RuntimeError if ``masked_layout(max_m)`` dropped anything. A host sync: call it only
        where one is allowed (not inside a CUDA graph)."""
        dropped = self.num_dropped(max_m).tolist()
        if any(dropped):
            raise RuntimeError(f"max_m: expected room for every entry, got {sum(dropped)} dropped entries "
                               f"(per local expert: {dropped}); raise max_m")

    def to_contiguous(self, recv_x, alignment: int = 1):
        """recv_x [N, H] (or an (fp8, scale) pair) -> the rows in contiguous layout (+ m_indices)."""
        self._check_recv_x(recv_x)
        pos, m_idx, _, m = self.contiguous_layout(alignment)
        src = _positions_to_src_idx(pos, m)
        if isinstance(recv_x, tuple):
            return (permute(recv_x[0], src), permute(recv_x[1], src)), m_idx
        return permute(recv_x, src), m_idx

    def to_masked(self, recv_x, max_m: int | None = None):
        """recv_x [N, H] (or (fp8, scale)) -> [L, max_m, H] (or a pair) and masked_m [L]. Rows of an
        expert from masked_m on are zero (fp8: zero with scale 1e-4/448)."""
        self._check_recv_x(recv_x)
        pos, masked_m, max_m = self.masked_layout(max_m)
        src = _positions_to_src_idx(pos, self.num_local_experts * max_m)
        view = lambda t: t.view(self.num_local_experts, max_m, t.size(1))  # noqa: E731
        if isinstance(recv_x, tuple):
            return (view(permute(recv_x[0], src)), view(permute(recv_x[1], src))), masked_m
        return view(permute(recv_x, src)), masked_m

    def _check_recv_x(self, recv_x) -> None:
        """recv_x as dispatch returned it: [num_recv, H] (or an (e4m3, scale) pair of num_recv rows)."""
        if isinstance(recv_x, tuple):
            if len(recv_x) != 2:
                raise TypeError(f"recv_x: expected a tensor or an (x_fp8, scale) pair, got a tuple of length "
                                f"{len(recv_x)}")
            check_tensor("recv_x[0]", recv_x[0], ndim=2, shape=(self.num_recv, None))
            check_tensor("recv_x[1]", recv_x[1], ndim=2, shape=(self.num_recv, None))
        else:
            check_tensor("recv_x", recv_x, ndim=2, shape=(self.num_recv, None))

    def _expert_pos(self, expert_out: torch.Tensor, layout: str, alignment_or_max_m):
        """(expert_pos [N, k], expert_out as [rows, H]) for an expert-output tensor in ``layout``."""
        if layout == "contiguous":
            check_tensor("expert_out", expert_out, ndim=2)
            pos, _, _, m = self.contiguous_layout(1 if alignment_or_max_m is None else alignment_or_max_m)
            if expert_out.size(0) != m:
                raise ValueError(f"expert_out: expected {m} rows (the contiguous layout with alignment "
                                 f"{alignment_or_max_m or 1}), got shape {list(expert_out.shape)}")
            return pos, expert_out
        if layout == "masked":
            check_tensor("expert_out", expert_out, shape=(self.num_local_experts, None, None))
            if alignment_or_max_m is not None and alignment_or_max_m != expert_out.size(1):
                raise ValueError(f"alignment_or_max_m: expected None or expert_out.size(1)={expert_out.size(1)}, "
                                 f"got {alignment_or_max_m!r}")
            return self.masked_layout(expert_out.size(1))[0], expert_out.reshape(-1, expert_out.size(-1))
        raise ValueError(f"layout: expected 'contiguous' or 'masked', got {layout!r}")

    def expert_reduce(self, expert_out: torch.Tensor, layout: str = "contiguous", alignment_or_max_m=None):
        """Weighted sum over each received row's local experts: [M, H] (contiguous) or [L, max_m, H]
        (masked) expert outputs -> [num_recv, H] in expert_out's dtype (fp32 accumulation). This is
        where the top-k weights given to dispatch are applied (none given: a plain sum)."""
        pos, rows = self._expert_pos(expert_out, layout, alignment_or_max_m)
        return unpermute_reduce(rows, pos, self.recv_weights)


class EPDispatcher:
    """Expert-parallel dispatch / combine over a torch.distributed group (or a single process).

    Args:
        group: a ProcessGroup (NCCL on GPUs, gloo on CPU) or None for one process (no torch.distributed).
        num_experts: E (global); rank r holds experts r*E/R .. (r+1)*E/R - 1.
        capacity: None = normal mode (exact sizes; host syncs, see below). An int = fixed-capacity mode
            (DeepEP's low-latency mode, ``capacity`` = num_max_dispatch_tokens_per_rank): every rank sends
            ``capacity`` rows to every rank, so all shapes are static, there is no host sync, and the
            step is CUDA-graph capturable; needs T <= capacity (checked on the host from the shape).

    Wire format: every row a rank sends carries, in ONE byte buffer (see :class:`RowFormat`), the token
    payload (x's dtype, or e4m3 + fp32 per-128 scales), its source token index, its k local expert ids
    (int32, -1 where the expert is not on the destination) and, when dispatch got weights, its k fp32
    weights. Fixed-capacity mode: the buffer is [R, SLOT_HEADER_BYTES + capacity * row_bytes], one slot
    per destination, each led by a 16-byte header (int32 rows for that rank, source token count, 0, 0),
    then the rows for that rank in token order, zero rows after them.

    Collectives per step (all ``all_to_all_single`` on uint8 views, so any dtype works with gloo and NCCL):
    fixed-capacity mode: dispatch 1, combine 1, combine_experts 1; normal mode: dispatch 2 (counts, rows),
    combine 1, combine_experts 1.

    Host syncs per step. Normal mode: ONE in dispatch (the counts all_to_all result, per-rank and
    per-local-expert counts and the id check, fetched in one D2H copy: the split sizes of the data
    all_to_all must be host ints); combine has none (it reuses the split sizes); the contiguous layout
    sizes itself from the same host counts and builds its indices from the device copy (no H2D copy).
    Fixed-capacity mode: none (no id check either; ids outside [0, E) are treated as unused).
    (The gloo backend itself works on host memory; the sync count is about CUDA tensors with NCCL.)

    Overflow (fixed capacity): T > capacity raises ValueError on the host (a shape, no sync). A token
    takes one row per destination rank, so a slot never overflows. The expert-side masked layout
    [L, max_m, H] drops entries beyond max_m (only possible with max_m < num_recv or repeated expert ids
    in a row) and counts them: see :meth:`DispatchHandle.masked_layout`.
    """

    def __init__(self, group=None, num_experts: int = 0, capacity: int | None = None):
        self.group = group
        self.rank, self.num_ranks = _world(group)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        if num_experts % self.num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.num_ranks}, got {num_experts}")
        capacity = _check_optional_int("capacity", capacity)
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

    @staticmethod
    def row_format(payload_dtype: torch.dtype, hidden: int, topk: int, fp8_scales: bool, weights: bool) -> RowFormat:
        """The packed row of a dispatch: x [hidden] (+ scale [ceil(hidden/128)] fp32), src int32,
        local ids int32 [topk] (+ weights fp32 [topk]); topk = 0: payload only (cached dispatch)."""
        fields = [("x", payload_dtype, hidden)]
        if fp8_scales:
            fields.append(("scale", torch.float32, ceil_div(hidden, 128)))
        if topk:
            fields += [("src", torch.int32, 1), ("lid", torch.int32, topk)]
            if weights:
                fields.append(("w", torch.float32, topk))
        return RowFormat(fields)

    def _exchange(self, fmt: RowFormat, fields: dict, num_send: int, num_recv: int, send_counts, recv_counts,
                  header: torch.Tensor | None = None):
        """Pack the row fields (each [num_send, width]) into one byte buffer, move it with ONE
        all_to_all_single and unpack: ({name: [num_recv, width]}, received slot headers [R, 4] int32 in
        fixed-capacity mode, else None)."""
        dev = next(iter(fields.values())).device
        rb, r = fmt.row_bytes, self.num_ranks
        if self.capacity is None:
            send = torch.empty((num_send, rb), dtype=torch.uint8, device=dev)
            fmt.pack(send, **fields)
            rows, hdr = self._a2a(send, num_recv, send_counts, recv_counts), None
        else:
            c, hb = self.capacity, SLOT_HEADER_BYTES
            send = torch.empty((r, hb + c * rb), dtype=torch.uint8, device=dev)
            if header is None:
                header = torch.zeros((r, hb // 4), dtype=torch.int32, device=dev)
            send[:, :hb].copy_(header.to(torch.int32).contiguous().view(torch.uint8))
            fmt.pack(send[:, hb:].view(r, c, rb), **fields)
            recv = self._a2a(send, r)
            hdr = recv[:, :hb].view(torch.int32)
            rows = recv[:, hb:].view(r, c, rb)
        return {name: fmt.unpack(rows, name, num_recv) for name in fields}, hdr

    # -- dispatch -------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None = None, use_fp8: bool = False):
        """Send each token to the ranks that hold its experts (one row per token and destination rank).

        Args:
            x: [T, H] bf16/fp16/fp32, or a pair (x_fp8 [T, H] e4m3, scale [T, ceil(H/128)] fp32).
            topk_idx: [T, k] int64 global expert ids (-1 = unused).
            topk_weights: [T, k] float32, sent along for :meth:`DispatchHandle.expert_reduce`; None = no
                weights on the wire (apply them at :meth:`combine_experts` instead, DeepEP low-latency style).
            use_fp8: quantise a float x to e4m3 + per-token scales while packing (fused).
        Returns:
            (recv_x, handle): recv_x [N, H] (or an (e4m3, scale) pair) with the received rows ordered by
            source rank then source token index (fixed capacity: N = R * capacity, source rank s's rows at
            s*capacity.., zero rows after them); ``handle.recv_local_idx`` / ``recv_weights`` /
            ``num_recv_tokens_per_expert`` describe them (see :class:`DispatchHandle`).
        """
        use_fp8 = check_bool("use_fp8", use_fp8)
        is_pair = isinstance(x, (tuple, list))
        if is_pair:
            if len(x) != 2:
                raise TypeError(f"x: expected a tensor or a pair (x_fp8, scale), got a {type(x).__name__} of "
                                f"length {len(x)}")
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
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(t, k))
        check_same_device(x=ref, topk_idx=topk_idx, topk_weights=topk_weights)
        fixed = self.capacity is not None
        if fixed and t > self.capacity:
            raise ValueError(f"x: expected at most capacity={self.capacity} tokens (fixed-capacity mode), got {t}")
        # ids are checked in normal mode folded into the counts sync below; in fixed-capacity mode by the
        # reference on CPU tensors, on CUDA only with DEEPKERNELS_CHECK=1 (else ids outside [0, E) are unused)
        _check_topk_idx(topk_idx, self.num_experts, self.num_ranks, check_values=fixed and run_device_checks(topk_idx))
        topk_idx = topk_idx.contiguous()
        dev, R, L = ref.device, self.num_ranks, self.num_local_experts

        per_rank, per_expert, in_rank = torch.ops.deepkernels.moe_get_dispatch_layout(topk_idx, self.num_experts, R)
        pos = _dispatch_positions(in_rank, self.capacity)
        if fixed:
            num_send = num_recv = R * self.capacity
            send_counts = recv_counts = recv_expert = rcnt = None
        else:
            # counts exchange: [R, 1 + L] (rows per destination, then per-local-expert counts) + id check
            bad = ((topk_idx < -1) | (topk_idx >= self.num_experts)).any().to(torch.int64).view(1) \
                if t > 0 else torch.zeros(1, dtype=torch.int64, device=dev)
            cnt = torch.cat([per_rank.view(R, 1), per_expert.view(R, L)], 1).to(torch.int64)
            rcnt = self._a2a(cnt, R).view(R, 1 + L)
            host = torch.cat([cnt[:, 0], rcnt.view(-1), bad]).cpu()  # the one host sync
            if int(host[-1]) != 0:
                lo, hi = int(topk_idx.min()), int(topk_idx.max())
                raise ValueError(f"topk_idx: expected expert ids in [0, {self.num_experts}) or -1 (unused), "
                                 f"got values in [{lo}, {hi}]")
            send_counts = host[:R].tolist()
            rc = host[R:R + R * (1 + L)].view(R, 1 + L)
            recv_counts = rc[:, 0].tolist()
            recv_expert = rc[:, 1:].sum(0).tolist()
            num_send, num_recv = sum(send_counts), sum(recv_counts)
        src = _positions_to_src_idx(pos, num_send)

        # payload of each send row
        if is_pair:
            fields = {"x": permute(x_q, src), "scale": permute(x_s, src)}
        elif use_fp8:
            q, s = permute_fp8(x, src)
            fields = {"x": q, "scale": s}
        else:
            fields = {"x": permute(x, src)}
        # metadata of each send row: source token, local ids (-1 not on the destination), weights
        dest = torch.arange(R, device=dev, dtype=torch.int64)
        if fixed:
            row_rank = dest.repeat_interleave(self.capacity)
        else:
            row_rank = torch.repeat_interleave(dest, per_rank.long(), output_size=num_send)  # device counts: no sync
        srcl = src.long().clamp(min=0)
        gid = topk_idx.index_select(0, srcl) if t > 0 else torch.full((num_send, k), -1, dtype=torch.int64, device=dev)
        lid = gid - (row_rank * L).unsqueeze(1)
        local = (gid >= 0) & (lid >= 0) & (lid < L) & (src >= 0).unsqueeze(1)
        fields["src"] = src.view(-1, 1)
        fields["lid"] = torch.where(local, lid, -1).to(torch.int32)
        if topk_weights is not None:
            w = topk_weights.index_select(0, srcl) if t > 0 else torch.zeros(num_send, k, device=dev)
            fields["w"] = torch.where(local, w, 0.0)
        fmt = self.row_format(fields["x"].dtype, h, k, "scale" in fields, topk_weights is not None)
        header = None
        if fixed:
            zero = torch.zeros_like(per_rank)
            header = torch.stack([per_rank, torch.full_like(per_rank, t), zero, zero], 1)
        got, hdr = self._exchange(fmt, fields, num_send, num_recv, send_counts, recv_counts, header)

        recv_x = (got["x"], got["scale"]) if "scale" in got else got["x"]
        recv_lid = got["lid"]
        if fixed:
            cnt_dev = _count_ids(torch.where(recv_lid >= 0, recv_lid, L).view(-1).long(), L).to(torch.int32)
            per_src = hdr[:, 0].contiguous()
        else:
            cnt_dev = rcnt[:, 1:].sum(0).to(torch.int32)  # device copy of the counts: no H2D
            per_src = rcnt[:, 0].to(torch.int32)
        handle = DispatchHandle(rank=self.rank, num_ranks=R, num_local_experts=L, pos=pos, num_tokens=t,
                                num_recv=num_recv, recv_local_idx=recv_lid, recv_weights=got.get("w"),
                                num_recv_tokens_per_expert=cnt_dev, num_recv_tokens_per_expert_list=recv_expert,
                                send_counts=send_counts, recv_counts=recv_counts, capacity=self.capacity, hidden=h,
                                src_idx=src, send_local=local, num_send=num_send,
                                recv_src_token=got["src"].view(-1), num_recv_tokens_per_rank=per_src,
                                topk_idx=topk_idx, topk_weights=topk_weights)
        return recv_x, handle

    def exchange_weights(self, topk_weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send new top-k weights [T, k] fp32 along a previous dispatch (one all_to_all_single): returns
        the receiver-side [num_recv, k] weights (0 where the slot's expert is not local), like
        ``handle.recv_weights``. No host sync. (:meth:`combine_experts` applies weights on the source
        instead, without this extra collective.)"""
        _check_handle(handle)
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_tokens, None))
        src = handle.src_idx.long().clamp(min=0)
        k = handle.send_local.size(1)
        w = topk_weights.index_select(0, src) if handle.num_tokens else \
            torch.zeros(src.size(0), k, device=topk_weights.device)
        w = torch.where(handle.send_local, w, 0.0).contiguous()
        return self._a2a(w, handle.num_recv, handle.send_counts, handle.recv_counts)

    def dispatch_cached(self, x, handle: DispatchHandle, use_fp8: bool = False):
        """Dispatch new data along a previous dispatch's routing (no counts exchange, no host sync, one
        all_to_all_single): x [T, H] float (optionally quantised while packing) or an (e4m3, scale)
        pair -> recv_x."""
        _check_handle(handle)
        use_fp8 = check_bool("use_fp8", use_fp8)
        if isinstance(x, (tuple, list)) and len(x) != 2:
            raise TypeError(f"x: expected a tensor or a pair (x_fp8, scale), got a {type(x).__name__} of length {len(x)}")
        ref = x[0] if isinstance(x, (tuple, list)) else x
        check_tensor("x[0]" if ref is not x else "x", ref, ndim=2, shape=(handle.num_tokens, None))
        src = handle.src_idx
        if isinstance(x, (tuple, list)):
            fields = {"x": permute(x[0], src), "scale": permute(x[1], src)}
        elif use_fp8:
            q, s = permute_fp8(x, src)
            fields = {"x": q, "scale": s}
        else:
            fields = {"x": permute(x, src)}
        fmt = self.row_format(fields["x"].dtype, ref.size(1), 0, "scale" in fields, False)
        got, _ = self._exchange(fmt, fields, handle.num_send, handle.num_recv, handle.send_counts, handle.recv_counts)
        return (got["x"], got["scale"]) if "scale" in got else got["x"]

    # -- combine --------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send each received row's result back and sum per source token over ranks (one all_to_all_single).

        Args: y [handle.num_recv, H] float32/bfloat16/float16, one row per received row (already the
        weighted sum over that row's local experts, see :meth:`DispatchHandle.expert_reduce`).
        Returns: [T, H] in y's dtype, fp32 accumulation over ranks; zero for tokens with no expert.
        """
        _check_handle(handle)
        check_tensor("y", y, dtypes=_FLOAT_DTYPES, shape=(handle.num_recv, None))
        check_same_device(y=y, handle_pos=handle.pos)
        back = self._a2a(y.contiguous(), handle.num_send, handle.recv_counts, handle.send_counts)
        return unpermute_reduce(back, handle.pos)

    def combine_experts(self, expert_out: torch.Tensor, handle: DispatchHandle,
                        topk_weights: torch.Tensor | None = None, layout: str = "masked", alignment_or_max_m=None):
        """Combine with the top-k weights applied on the SOURCE rank (DeepEP's low-latency convention).

        Args:
            expert_out: the local experts' outputs, [L, max_m, H] for layout="masked" (rows as
                ``handle.to_masked(recv_x, max_m)`` placed them; max_m = expert_out.size(1)) or [M, H]
                for layout="contiguous" (``handle.to_contiguous(recv_x, alignment)``, normal mode only).
            topk_weights: [T, k] float32 on the source rank; None = the weights given to dispatch (a plain
                sum if none were given).
        Returns:
            [T, H] in expert_out's dtype: ``out[t] = sum_j w[t, j] * expert_{e_j}(x_t)`` over t's used slots,
            accumulated in fp32 in slot order. Entries the masked layout dropped contribute 0.

        Each received row sends back its local slots' expert outputs unreduced, min(k, L) rows per row
        (in slot order, zero rows where fewer), in ONE all_to_all_single; so this moves min(k, L) times
        the bytes of :meth:`combine`, which instead needs the weights on the expert side at dispatch.
        """
        _check_handle(handle)
        check_tensor("expert_out", expert_out, dtypes=_FLOAT_DTYPES)
        if layout not in ("masked", "contiguous"):
            raise ValueError(f"layout: expected 'contiguous' or 'masked', got {layout!r}")
        if layout == "masked":
            check_tensor("expert_out", expert_out, shape=(handle.num_local_experts, None, None))
            if alignment_or_max_m not in (None, expert_out.size(1)):
                raise ValueError(f"alignment_or_max_m: expected None or expert_out.size(1)={expert_out.size(1)}, "
                                 f"got {alignment_or_max_m!r}")
            alignment_or_max_m = expert_out.size(1)
        k = handle.topk_idx.size(1)
        if topk_weights is None:
            topk_weights = handle.topk_weights
        else:
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_tokens, k))
            check_same_device(expert_out=expert_out, topk_weights=topk_weights)
        epos, rows = handle._expert_pos(expert_out, layout, alignment_or_max_m)
        if layout == "contiguous":
            m = handle.contiguous_layout(alignment_or_max_m or 1)[3]
            if rows.size(0) != m:
                raise ValueError(f"expert_out: expected {m} rows (the contiguous layout), got {rows.size(0)}")
        slots = min(k, handle.num_local_experts)
        gather = local_slot_rows(handle.recv_local_idx, epos, slots)
        send = permute(rows.contiguous(), gather.view(-1))
        scale = lambda counts: None if counts is None else [c * slots for c in counts]  # noqa: E731
        back = self._a2a(send, handle.num_send * slots, scale(handle.recv_counts), scale(handle.send_counts))
        pos = source_slot_positions(handle.topk_idx, handle.pos, self.num_experts, self.num_local_experts, slots)
        return unpermute_reduce(back, pos, topk_weights)


__all__ = ["get_dispatch_layout", "permute", "permute_fp8", "unpermute_reduce", "dispatch_positions",
           "positions_to_src_idx", "expert_positions", "local_slot_rows", "source_slot_positions", "RowFormat",
           "SLOT_HEADER_BYTES", "EPDispatcher", "DispatchHandle"]
