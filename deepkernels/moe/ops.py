"""MoE ops: dispatch layout, permute (+ fused fp8 quant), un-permute + reduce, and the index helpers
the dispatcher builds its send / expert layouts from (plain torch, no host sync).

Ops (``torch.ops.deepkernels.*``; CUDA kernels in csrc/moe, pure-torch references here):

* ``moe_get_dispatch_layout(topk_idx [T,k] int64, num_experts, num_ranks)`` ->
  ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T,R] bool)``.
  -1 in ``topk_idx`` means "no expert"; expert e lives on rank ``e // (E / R)``. A token counts once
  per rank even when several of its experts live there. An id outside [-1, E): the reference (CPU kernel)
  raises ValueError; the kernels (trusted, no sync) count it nowhere and POISON the layout: every count
  of both outputs gets its sign bit set (``INT_MIN +`` the count of the valid ids; ``count & 0x7fffffff``
  recovers that), so a bad batch never yields a count >= 0 (see :data:`LAYOUT_POISON_BIT`).
* ``moe_permute(x [T,H], src_idx [N] int32) -> out [N,H]``: ``out[i] = x[src_idx[i]]``, a zero row
  where ``src_idx[i] == -1``. Any dtype (bf16/fp16/fp32/fp8/int); a pure row gather. The output size
  is ``src_idx``'s, so the op has static shapes for torch.compile / CUDA graphs: the data-dependent
  part (how many rows) is decided by whoever builds ``src_idx`` (see :func:`positions_to_src_idx`).
* ``moe_permute_fp8(x [T,H] bf16/fp16/fp32, src_idx [N] int32) -> (out [N,H] e4m3, scale [N,ceil(H/128)] fp32)``:
  the gather fused with per-token 1x128 fp8 quantisation, bit-identical to
  ``per_token_cast_to_fp8(moe_permute(x, src_idx))`` (zero rows get scale 1e-4/448).
* ``moe_unpermute_reduce(y [N,H], pos [T,K] int32, weights [T,K] fp32 or None) -> out [T,H]`` in y's dtype:
  ``out[t] = sum_k w[t,k] * y[pos[t,k]]`` over ``pos[t,k] >= 0`` (w = 1 without weights), accumulated
  in fp32 in k order, rounded once. A row with no valid position is zero. Any K (the kernel keeps 32
  slots per chunk in the lanes of a warp).
"""
from __future__ import annotations

import torch

from .._ops import (ceil_div, check_bool, check_index_values, check_int, check_same_device, check_tensor, define_op,
                    run_device_checks)
from ..fp8 import FP8_DTYPE, per_token_cast_to_fp8_ref

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUT_POISON_BIT = -2**31  # the kernels' moe_get_dispatch_layout: set in every count when an id is out of range
POISON_POS = -2**31  # an unpermute_reduce position that no kernel reads: its token's output row is NaN
MAX_LAYOUT_BINS = 8192  # num_experts + num_ranks of get_dispatch_layout (csrc/moe/config.h kMaxExperts: smem bins)
_INT32_MAX = 2**31 - 1  # positions / rows are int32
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
# rows with src_idx == -1 unwritten (unspecified) on the kernels; the reference writes zeros there
define_op("moe_permute_no_fill", "(Tensor x, Tensor src_idx) -> Tensor", moe_permute_ref, _permute_fake)
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
        if num_experts + num_ranks > MAX_LAYOUT_BINS:  # the kernel's shared-memory histogram; the reference agrees
            raise ValueError(f"num_experts: expected num_experts + num_ranks <= {MAX_LAYOUT_BINS}, got {num_experts} "
                             f"+ {num_ranks}")
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
        poisoned = (pos == POISON_POS) if pos.numel() and pos.device.type != "meta" else None
        if poisoned is not None and bool(poisoned.any()):  # the sentinel the trusted paths write: say where from
            t, j = divmod(int(poisoned.reshape(-1).nonzero()[0]), pos.size(1))
            raise ValueError(f"pos: expected row indices of y in [-1, {y.size(0)}), got POISON_POS ({POISON_POS}) at "
                             f"index [{t}, {j}]: token {t} was poisoned upstream (an expert id outside [-1, E) in a "
                             f"dispatch / layout whose ids were trusted); the kernels give its row NaN")
        check_index_values("pos", pos, -1, y.size(0), "row indices of y (-1 = skip)")


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, check_values: bool = True):
    """Per-rank / per-expert token counts and the token->rank membership of a top-k routing.

    Args:
        topk_idx: [T, k] int64 expert ids, -1 = unused slot.
        num_experts: E (an int >= 1); num_ranks: R (an int >= 1) with E % R == 0 (expert e on rank e // (E/R)).
        check_values: verify ids are in [-1, E) (a host sync on GPU). With False, CUDA tensors (and the
            emulated kernel) are trusted, no sync, CUDA-graph capturable: an id outside [-1, E) is counted
            nowhere and poisons the layout -- EVERY entry of num_tokens_per_rank and num_tokens_per_expert is
            negative (``INT_MIN`` + the count of the valid ids), is_token_in_rank holds the valid ids only --
            so check ``(num_tokens_per_rank < 0).any()`` at your next sync point. DEEPKERNELS_CHECK=1 still
            checks on the host. CPU tensors (the reference) are always checked.
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


def permute(x: torch.Tensor, src_idx: torch.Tensor, fill_empty: bool = True) -> torch.Tensor:
    """Row gather ``out[i] = x[src_idx[i]]`` (zero row where src_idx[i] == -1).

    x: [T, H] float32/bfloat16/float16/float8_e4m3fn/int32/int64/uint8; src_idx: [N] int32 contiguous,
    values in [-1, T). Returns [N, H] in x's dtype. ``fill_empty=False`` (op ``moe_permute_no_fill``):
    rows with src_idx == -1 are not written, their contents are unspecified (the kernels leave the fresh
    buffer as it was; the CPU reference writes zeros) -- for layouts whose padding rows nobody reads."""
    fill_empty = check_bool("fill_empty", fill_empty)
    _check_permute_args(x, src_idx, _PERMUTE_DTYPES, check_values=run_device_checks(src_idx))
    op = torch.ops.deepkernels.moe_permute if fill_empty else torch.ops.deepkernels.moe_permute_no_fill
    return op(x.contiguous(), src_idx)


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
    if capacity is not None and capacity * is_token_in_rank.size(1) > _INT32_MAX:
        raise ValueError(f"capacity: expected R * capacity <= {_INT32_MAX} (int32 positions, "
                         f"R = {is_token_in_rank.size(1)}), got {capacity}")
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
    local_ids, or None to compute it); limit an int >= 0 or None. counts / segment_start are checked on CPU
    tensors (and with DEEPKERNELS_CHECK=1); on CUDA a negative one (e.g. the poisoned counts of
    :func:`get_dispatch_layout` with ``check_values=False``) makes every entry :data:`POISON_POS`: the
    gathers skip it and :func:`unpermute_reduce` gives NaN rows (never the plausible positions)."""
    check_tensor("local_ids", local_ids, dtypes=_INDEX_DTYPES, ndim=2)
    num_local_experts = check_int("num_local_experts", num_local_experts, min_value=0)
    check_tensor("segment_start", segment_start, dtypes=_INDEX_DTYPES, shape=(num_local_experts,))
    if counts is not None:
        check_tensor("counts", counts, dtypes=_INDEX_DTYPES, shape=(num_local_experts,))
    limit = _check_optional_int("limit", limit)
    check_same_device(local_ids=local_ids, segment_start=segment_start, counts=counts)
    if local_ids.device.type == "cpu" or run_device_checks(local_ids):
        check_index_values("local_ids", local_ids, -1, num_local_experts, "local expert ids (-1 = none)")
        flat = local_ids.reshape(-1)
        hist = _count_ids(torch.where(flat >= 0, flat, num_local_experts), num_local_experts)
        if counts is not None and not torch.equal(counts.to(torch.int64), hist):
            raise ValueError(f"counts: expected the histogram of local_ids {hist.tolist()}, got {counts.tolist()}")
        used = hist if limit is None else hist.clamp(max=limit)
        if segment_start.numel() and (bool((segment_start < 0).any()) or
                                      int((segment_start.to(torch.int64) + used).max()) > _INT32_MAX):
            raise ValueError(f"segment_start: expected row offsets >= 0 whose segments end at most at {_INT32_MAX} "
                             f"(int32 positions), got {segment_start.tolist()}")
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
    # Counts or segment starts that are negative (the trusted layout kernel's poisoned counts, INT_MIN + count,
    # or offsets summed from them): every real entry gets POISON_POS, so the gathers skip it and the reduce gives
    # NaN -- the int32 wrap would otherwise cancel the poison and yield the exact (plausible) positions.
    poisoned = (counts < 0).any() | (segment_start < 0).any()
    val = torch.where(poisoned & (sorted_key < num_local_experts), POISON_POS, val)
    pos = torch.empty(n * k, dtype=torch.int64, device=local_ids.device)
    pos.scatter_(0, order, val)
    return pos.view(n, k).to(torch.int32)


def local_slot_rows(local_idx: torch.Tensor, expert_pos: torch.Tensor, slots: int) -> torch.Tensor:
    """[N, slots] int32: for each received row, the expert-buffer row (``expert_pos``) of its c-th local
    slot (slots with ``local_idx >= 0``, in slot order), -1 where the row has fewer local slots (or the
    entry was dropped). Local slots beyond ``slots`` are left out (only possible with repeated ids).
    local_idx / expert_pos: int [N, k] of one shape; slots: an int in [0, k]."""
    check_tensor("local_idx", local_idx, dtypes=_INDEX_DTYPES, ndim=2)
    check_tensor("expert_pos", expert_pos, dtypes=_INDEX_DTYPES, shape=tuple(local_idx.shape))
    slots = check_int("slots", slots, min_value=0, max_value=local_idx.size(1))
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
    topk_idx int64 [T, k] (ids in [-1, E): checked on CPU tensors and with DEEPKERNELS_CHECK=1; on CUDA an
    id outside gives its token's slots :data:`POISON_POS`, so :func:`unpermute_reduce` on the kernels makes
    that token's row NaN); pos int [T, R] with R * num_local_experts == num_experts, values in [-1, rows) with
    rows * slots fitting int32 (checked like topk_idx); slots an int in [0, k]."""
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
    num_experts = check_int("num_experts", num_experts, min_value=1)
    num_local_experts = check_int("num_local_experts", num_local_experts, min_value=1)
    check_tensor("pos", pos, dtypes=_INDEX_DTYPES, ndim=2)
    if pos.size(0) != topk_idx.size(0) or pos.size(1) * num_local_experts != num_experts:
        raise ValueError(f"pos: expected shape [{topk_idx.size(0)}, {num_experts // num_local_experts}] "
                         f"(T of topk_idx, num_experts / num_local_experts ranks), got {list(pos.shape)}")
    slots = check_int("slots", slots, min_value=0, max_value=topk_idx.size(1))
    check_same_device(topk_idx=topk_idx, pos=pos)
    if topk_idx.device.type == "cpu" or run_device_checks(topk_idx):
        _check_expert_ids(topk_idx, num_experts)
        check_index_values("pos", pos, -1, _INT32_MAX // max(slots, 1),
                           f"send rows (-1 = not sent; rows * slots={slots} must fit int32)")
    return _source_slot_positions(topk_idx, pos, num_experts, num_local_experts, slots)


def _source_slot_positions(topk_idx: torch.Tensor, pos: torch.Tensor, num_experts: int, num_local_experts: int,
                           slots: int) -> torch.Tensor:
    k = topk_idx.size(1)
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    rank = torch.where(valid, topk_idx // num_local_experts, 0)
    same = (rank.unsqueeze(2) == rank.unsqueeze(1)) & valid.unsqueeze(1)  # [T, j, j'] slot j' on j's rank
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_idx.device).tril(-1)  # j' < j
    c = (same & earlier).sum(-1)
    row = pos.long().gather(1, rank)
    ok = valid & (c < slots) & (row >= 0)
    out = torch.where(ok, row * slots + c, -1)
    bad_token = ((topk_idx < -1) | (topk_idx >= num_experts)).any(1, keepdim=True)  # trusted ids: poison, no sync
    return torch.where(bad_token, POISON_POS, out).to(torch.int32)
