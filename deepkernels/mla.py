"""MLA paged decode attention (DeepSeek-V3 Multi-head Latent Attention, absorbed form; anchor: FlashMLA).

Shapes (b = batch, s_q = query tokens per sequence, h_q = query heads, h_kv = cache heads, d = 576):
  * q           [b, s_q, h_q, 576]  bf16 or fp16, unit stride in the last dim
  * kv_cache    [num_blocks, page_size, h_kv, 576]  q's dtype (bf16 or fp16, as FlashMLA), or float8_e4m3fn
                 with ``kv_scale`` (bf16 q only)
                 (row = 512 latent dims, which are also V, then 64 rope dims). page_size % 16 == 0.
  * kv_scale    [num_blocks, page_size, h_kv] fp32 (fp8 cache only): one scale per cached token and
                 head, covering all 576 dims of the row; the value is ``kv_cache.float() * kv_scale``.
  * block_table [b, max_blocks] int32: token ``t`` of sequence ``i`` lives in page
                 ``block_table[i, t // page_size]`` at slot ``t % page_size``. Only the first
                 ``ceil(cache_seqlens[i] / page_size)`` entries of a row are read; the others may hold
                 anything (garbage, -1, huge values), and cache slots at or past the length are never read.
  * cache_seqlens [b] int32 >= 0.
  * out [b, s_q, h_q, 512] in q's dtype and lse [b, h_q, s_q] fp32, natural log:
    lse = log(sum_j exp(scale * q.k_j)), out = sum_j softmax_j * v_j with v_j = k_j[:512].
    A query row that sees no key (an empty sequence, or a causal row above the diagonal) gets out 0
    and lse +inf (the combine step gives such a row weight 0).
  * causal (s_q > 1, speculative decoding / MTP): query token i of a sequence of length L sees keys
    0 .. L - s_q + i (the bottom-right aligned mask). With s_q == 1 causal changes nothing.
  * query head h reads cache head h // (h_q // h_kv); h_q must be a multiple of h_kv.

Split plan (``get_mla_decode_metadata``), computed with device tensor ops (no host sync, so the whole
decode step can be captured in a CUDA graph). The key axis of every sequence is cut into work blocks of
``BLOCK_TOKENS`` (64) tokens. Laying the sequences' blocks end to end (sequence 0 first) gives
``T = sum_i ceil(L_i / 64)`` blocks; part p of ``num_sm_parts`` takes the global blocks
``[p*P, min((p+1)*P, T))`` with ``P = max(1, ceil(T / num_sm_parts))``. A part that crosses a sequence
boundary yields one split per sequence it touches. Outputs:
  * tile_scheduler_metadata int32 [num_sm_parts, 8], row p:
      [0] begin_batch   first sequence of part p (== b when the part is empty)
      [1] begin_block   first work block (64 tokens) inside begin_batch
      [2] end_batch     last sequence of part p (inclusive)
      [3] end_block     one past the last work block inside end_batch
      [4] begin_split   global index of the split that part p writes for begin_batch; every later
                        sequence i of the part writes its first split, num_splits[i]
      [5..7] 0 (reserved)
  * num_splits int32 [b + 1]: exclusive prefix sum; sequence i owns splits
    ``num_splits[i] .. num_splits[i+1]-1`` (none when L_i == 0). total splits <= b + num_sm_parts.

CUDA (csrc/mla_decode/, sm_80+): grid (num_sm_parts, h_kv, ceil(s_q*h_q/h_kv / 32)); each CTA takes 32 query
rows and walks its part's key ranges in 32-key tiles (bf16 or f16 mma.sync for Q K^T and P V, fp32 online softmax,
1-3 stage cp.async pipeline through the block table, e4m3 rows converted to bf16 exactly with the token
scale folded into the scores and P). A split's partial (output normalised by its own sum, fp32, and its lse)
goes to a scratch buffer of b + num_sm_parts splits and a combine kernel merges them by lse; a sequence with
a single split is written directly. Metadata, decode and combine launch without host synchronisation.

Hopper (opt-in, not yet validated on a GPU): ``DEEPKERNELS_MLA_VARIANT`` (read on every call; see
MLA_VARIANTS) picks the split-KV kernel: ``portable``, ``sm90`` (csrc/mla_decode/splitkv_sm90.cuh: 64 query
rows per CTA, two warpgroups, 64-key tiles in a 2-stage cp.async ring, wgmma for Q K^T and for P V with the K
tile reused as V) or ``sm90_pipelined`` (splitkv_sm90_pipelined.cuh: FlashMLA's structure, a producer
warpgroup filling an mbarrier ring, whole tiles alternating between the math warpgroups, P in registers; also
an e4m3 cache, dequantised into shared memory). Both need an sm_90 device; ``sm90`` takes a bf16 or fp16 cache.
Naming a variant that cannot run raises a ValueError.
The legacy ``DEEPKERNELS_MLA_SM90=1`` means "sm90 where it runs" (an e4m3 cache keeps the portable kernel).
Same plan, partials and combine for all.

Untrusted values: on the CPU (reference and emulator) the lengths, the used block-table entries, the plan and
the cache-write slots are validated before any read or write (ValueError naming the argument). On CUDA they
are trusted, as in FlashMLA, unless ``DEEPKERNELS_CHECK=1`` (one device sync per call); unchecked, the kernels
still never touch memory out of range: a bad page or a negative length gives NaN rows, a bad slot is skipped.
NaN: a NaN in q, in a cached row that a query reads, or in that row's kv_scale reaches its out and lse.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from . import _ops
from ._ops import check_same_device, check_tensor, define_op

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
BLOCK_TOKENS = 64          # work-block granularity of the split plan (the CUDA kernel's multiple)
METADATA_SIZE = 8          # int32 words per part in tile_scheduler_metadata
PAGE_MULTIPLE = 16
BLOCK_M = 32               # query rows (s_q * h_q / h_kv flattened) per CTA of the CUDA kernel
BLOCK_M_SM90 = 64          # ... of the opt-in sm_90a kernel (DEEPKERNELS_MLA_SM90=1)
SM90_ENV = "DEEPKERNELS_MLA_SM90"       # legacy switch: "1" prefers the sm90 variant where it runs
VARIANT_ENV = "DEEPKERNELS_MLA_VARIANT"  # the split-KV kernel variant, read on every call
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_CLAMP = 1e-4
_Q_DTYPES = (torch.bfloat16, torch.float16)
_CACHE_DTYPES = (torch.bfloat16, torch.float16, FP8_DTYPE)

# The split-KV kernel variants (DEEPKERNELS_MLA_VARIANT) and the kv_cache dtypes each supports. All share the
# plan, the partial/lse format and the combine kernel, so a sweep can time each on the same inputs.
#   portable        csrc/mla_decode/splitkv_portable.cuh: sm_80+, mma.sync, 32 query rows x 32-key tiles
#   sm90            csrc/mla_decode/splitkv_sm90.cuh: sm_90a wgmma, 64 rows, the math threads copy
#   sm90_pipelined  csrc/mla_decode/splitkv_sm90_pipelined.cuh: sm_90a, FlashMLA's structure (producer
#                   warpgroup, mbarrier ring, 64-key tiles alternating between the math warpgroups,
#                   register-resident P; an e4m3 cache is dequantised into shared memory by the producer)
# The sm90 variants need an sm_90 device and the sm_90a build (the emulator models one). Unset: "portable"
# (or "sm90" where it runs, when DEEPKERNELS_MLA_SM90=1). Not yet validated on a GPU: sm90, sm90_pipelined.
MLA_VARIANTS: dict[str, tuple[torch.dtype, ...]] = {
    "portable": (torch.bfloat16, torch.float16, FP8_DTYPE),
    "sm90": (torch.bfloat16, torch.float16),
    "sm90_pipelined": (torch.bfloat16, torch.float16, FP8_DTYPE),
}
SM90_VARIANTS = ("sm90", "sm90_pipelined")   # 64 query rows per CTA (BLOCK_M_SM90)


def mla_variant() -> str | None:
    """The variant named by DEEPKERNELS_MLA_VARIANT (None when unset or empty: the default choice).

    Raises ValueError for a name that is not in MLA_VARIANTS."""
    name = os.environ.get(VARIANT_ENV, "")
    if name == "":
        return None
    if name not in MLA_VARIANTS:
        raise ValueError(f"{VARIANT_ENV}: expected one of {', '.join(MLA_VARIANTS)} (or unset), got {name!r}")
    return name


def _check_variant(kv_cache: torch.Tensor) -> None:
    """A named variant must support kv_cache's dtype (checked wherever a kernel runs; the kernel's own check
    also refuses a device or build the variant cannot run on)."""
    name = mla_variant()
    if name is None:
        return
    if kv_cache.dtype not in MLA_VARIANTS[name]:
        supported = ", ".join(_dtype_name(d) for d in MLA_VARIANTS[name])
        raise ValueError(f"kv_cache: {VARIANT_ENV}={name!r} supports cache dtypes {supported}, got "
                         f"{_dtype_name(kv_cache.dtype)} (use 'portable')")


def default_num_sm_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """How many parts the key axis is split into: enough CTAs to fill the GPU once.

    The CUDA grid is (num_sm_parts, h_kv, ceil(num_q_tokens_per_head_k / BLOCK_M)); we aim at one CTA
    per SM. BLOCK_M is 64 when an sm_90a kernel may run (DEEPKERNELS_MLA_VARIANT=sm90 or sm90_pipelined, or
    DEEPKERNELS_MLA_SM90=1, on an sm_90 device; the plan does not know the cache dtype, and with the legacy
    switch an e4m3 cache then runs the portable kernel on twice as many CTAs, which is correct, only less
    balanced). On the CPU (reference), 4 parts so the
    plan still exercises multi-split sequences.
    """
    if device.type != "cuda":
        return 4
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    variant = os.environ.get(VARIANT_ENV, "")
    sm90 = (variant in SM90_VARIANTS or (variant == "" and os.environ.get(SM90_ENV) == "1")) and \
        (props.major, props.minor) == (9, 0)
    m_blocks = math.ceil(num_q_tokens_per_head_k / (BLOCK_M_SM90 if sm90 else BLOCK_M))
    return max(1, sms // max(1, num_heads_k * m_blocks))


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels; also registered for CUDA where the extension lacks a kernel)

def get_mla_decode_metadata_ref(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                                num_sm_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = cache_seqlens.device
    b = cache_seqlens.numel()
    lens = cache_seqlens.to(torch.int64).clamp(min=0)  # a negative length (invalid) has no work, as in the kernel
    blocks = (lens + BLOCK_TOKENS - 1) // BLOCK_TOKENS                      # [b]
    ends = torch.cumsum(blocks, 0)                                           # inclusive end per sequence
    starts = ends - blocks
    total = ends[-1:] if b > 0 else torch.zeros(1, dtype=torch.int64, device=device)
    per_part = torch.clamp((total + num_sm_parts - 1) // num_sm_parts, min=1)  # [1], stays on device

    # splits per sequence: parts touching [start, start + blocks)
    first_part = starts // per_part
    last_part = (ends - 1).clamp(min=0) // per_part
    count = torch.where(blocks > 0, last_part - first_part + 1, torch.zeros_like(blocks))
    num_splits = torch.zeros(b + 1, dtype=torch.int64, device=device)
    num_splits[1:] = torch.cumsum(count, 0)

    parts = torch.arange(num_sm_parts, device=device, dtype=torch.int64)
    begin = parts * per_part
    end = torch.minimum(begin + per_part, total)
    empty = begin >= total
    begin_batch = torch.searchsorted(ends, begin, right=True)
    end_batch = torch.searchsorted(ends, (end - 1).clamp(min=0), right=True)
    begin_batch_c = begin_batch.clamp(max=max(b - 1, 0))
    end_batch_c = end_batch.clamp(max=max(b - 1, 0))
    if b > 0:
        begin_block = begin - starts[begin_batch_c]
        end_block = end - starts[end_batch_c]
        begin_split = num_splits[begin_batch_c] + parts - first_part[begin_batch_c]
    else:
        begin_block = end_block = begin_split = torch.zeros_like(parts)
    zero = torch.zeros_like(parts)
    meta = torch.stack([
        torch.where(empty, torch.full_like(parts, b), begin_batch_c),
        torch.where(empty, zero, begin_block),
        torch.where(empty, torch.full_like(parts, b), end_batch_c),
        torch.where(empty, zero, end_block),
        torch.where(empty, zero, begin_split),
        zero, zero, zero,
    ], dim=1)
    return meta.to(torch.int32), num_splits.to(torch.int32)


def _first_bad(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero()[0].tolist()]


def check_cache_indices(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                        plan: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Value checks of the paged-cache indices, with one host synchronisation; ValueError naming the argument.

    cache_seqlens[i] >= 0 and ceil(cache_seqlens[i] / page_size) <= max_blocks; the block-table entries of the
    pages each sequence uses lie in [0, num_blocks); and, when ``plan`` = (tile_scheduler_metadata, num_splits)
    is given, it is the plan of these cache_seqlens (the kernels trust it). The reference path runs these
    always; on CUDA the kernels trust the values (as FlashMLA does) unless DEEPKERNELS_CHECK=1.
    """
    page, num_blocks, max_blocks = kv_cache.size(1), kv_cache.size(0), block_table.size(1)
    lens = cache_seqlens.long()
    needed = (lens.clamp(min=0) + page - 1) // page
    used = torch.arange(max_blocks, device=lens.device)[None, :] < needed[:, None]
    bad_entry = used & ((block_table < 0) | (block_table >= num_blocks))
    flags = [(lens < 0).any(), (needed > max_blocks).any(), bad_entry.any()]
    if plan is not None:
        meta, splits = plan
        ref_meta, ref_splits = get_mla_decode_metadata_ref(cache_seqlens, 1, 1, meta.size(0))
        flags.append((meta != ref_meta).any() | (splits != ref_splits).any())  # shapes checked by the caller
    negative, too_long, bad, *stale = torch.stack(flags).tolist()
    if negative:
        i = _first_bad(lens < 0)[0]
        raise ValueError(f"cache_seqlens: expected lengths >= 0, got cache_seqlens[{i}] = {int(lens[i])}")
    if too_long:
        i = _first_bad(needed > max_blocks)[0]
        raise ValueError(f"cache_seqlens: expected lengths within the block table (max_blocks = {max_blocks} "
                         f"pages of {page} tokens), got cache_seqlens[{i}] = {int(lens[i])}, which needs "
                         f"{int(needed[i])} pages")
    if bad:
        i, j = _first_bad(bad_entry)
        raise ValueError(f"block_table: expected entries in [0, num_blocks={num_blocks}) for the pages a sequence "
                         f"uses, got block_table[{i}, {j}] = {int(block_table[i, j])} (page {j} of sequence {i}, "
                         f"cache_seqlens[{i}] = {int(lens[i])})")
    if stale and stale[0]:
        raise ValueError("tile_scheduler_metadata / num_splits: expected the plan of these cache_seqlens with "
                         f"num_sm_parts = {plan[0].size(0)}, got a different one (call get_mla_decode_metadata "
                         "again after cache_seqlens change)")


def _checks_on(device: torch.device) -> bool:
    """Value checks run on the CPU always, on CUDA only with DEEPKERNELS_CHECK=1 (one sync each); never while
    tracing (torch.compile) or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _ops.device_checks_enabled()


def _gather_sequence(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, block_table_row: torch.Tensor,
                     length: int) -> torch.Tensor:
    """The first ``length`` cached rows of one sequence, fp32 [length, h_kv, 576]; reads only those slots."""
    page = kv_cache.size(1)
    pos = torch.arange(length, device=kv_cache.device)
    pages = block_table_row[: (length + page - 1) // page].long()[pos // page]
    slots = pos % page
    rows = kv_cache[pages, slots].float()
    if kv_scale is not None:
        rows = rows * kv_scale[pages, slots].unsqueeze(-1)
    return rows


def mla_decode_with_kvcache_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                                cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                                num_splits: torch.Tensor, softmax_scale: float, causal: bool,
                                kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # The split plan only schedules work; the maths is plain attention per sequence in fp32.
    out, lse = mla_attention_fp32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                  kv_scale)
    return out.to(q.dtype), lse


def mla_attention_fp32(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool,
                       kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference maths with an fp32 output (any float q / cache dtype): out [b,s_q,h_q,dv], lse [b,h_q,s_q].

    Raises ValueError (before reading the cache) for a negative length, a length beyond the block table or an
    out-of-range block-table entry in a used page. A query row that sees no key gets out 0 and lse +inf;
    every other row gets the plain maths, so a NaN in q, in a key row it reads or in that row's kv_scale
    reaches its out and lse (as in torch SDPA)."""
    b, s_q, h_q, _ = q.shape
    h_kv = kv_cache.size(2)
    check_cache_indices(kv_cache, block_table, cache_seqlens)
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float32, device=q.device)
    for i, length in enumerate(cache_seqlens.tolist()):
        if length == 0:
            continue
        kv = _gather_sequence(kv_cache, kv_scale, block_table[i], length)      # [L, h_kv, 576]
        kv = kv.repeat_interleave(h_q // h_kv, dim=1).transpose(0, 1)          # [h_q, L, 576]
        scores = torch.matmul(q[i].float().transpose(0, 1), kv.transpose(1, 2)) * softmax_scale  # [h_q, s_q, L]
        if causal:
            last_visible = length - s_q + torch.arange(s_q, device=q.device)  # per query token
            hidden = torch.arange(length, device=q.device)[None, :] > last_visible[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
            seen = (last_visible >= 0)[None, :].expand(h_q, s_q)              # rows that see at least one key
        else:
            seen = torch.ones(h_q, s_q, dtype=torch.bool, device=q.device)
        row_lse = torch.logsumexp(scores, dim=-1)                             # [h_q, s_q]; NaN stays NaN
        probs = torch.exp(scores - torch.where(seen, row_lse, 0.0).unsqueeze(-1))
        o = torch.matmul(probs, kv[..., :head_dim_v])                         # [h_q, s_q, dv]
        out[i] = torch.where(seen.unsqueeze(-1), o, 0.0).transpose(0, 1)
        lse[i] = torch.where(seen, row_lse, float("inf"))
    return out, lse


def write_mla_kv_cache_ref(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, kv: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
    page = kv_cache.size(1)
    check_slot_mapping(slot_mapping, kv_cache.size(0) * page)  # before any write
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows = kv[keep]
    blocks, offsets = slots // page, slots % page
    if kv_cache.dtype == FP8_DTYPE:
        amax = rows.float().abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_CLAMP)
        kv_cache[blocks, offsets] = (rows.float() * (FP8_MAX / amax)).to(FP8_DTYPE)
        kv_scale[blocks, offsets] = (amax / FP8_MAX).squeeze(-1)
    else:
        kv_cache[blocks, offsets] = rows.to(kv_cache.dtype)


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes only)

def _metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts):
    return (cache_seqlens.new_empty((num_sm_parts, METADATA_SIZE), dtype=torch.int32),
            cache_seqlens.new_empty((cache_seqlens.numel() + 1,), dtype=torch.int32))


def _decode_fake(q, kv_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                 softmax_scale, causal, kv_scale=None):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty((b, s_q, h_q, head_dim_v), dtype=q.dtype),
            q.new_empty((b, h_q, s_q), dtype=torch.float32))


def _write_fake(kv_cache, kv_scale, kv, slot_mapping):
    return None


define_op("get_mla_decode_metadata",
          "(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, int num_sm_parts) -> (Tensor, Tensor)",
          get_mla_decode_metadata_ref, _metadata_fake)
define_op("mla_decode_with_kvcache",
          "(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
          "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, "
          "Tensor? kv_scale=None) -> (Tensor, Tensor)",
          mla_decode_with_kvcache_ref, _decode_fake)
define_op("write_mla_kv_cache",
          "(Tensor(a!) kv_cache, Tensor(b!)? kv_scale, Tensor kv, Tensor slot_mapping) -> ()",
          write_mla_kv_cache_ref, _write_fake)


# ----------------------------------------------------------------------------------------------
# public API

def get_mla_decode_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                            num_sm_parts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The split plan for :func:`mla_decode_with_kvcache` (layout in the module docstring).

    Args:
        cache_seqlens: [b] int32 key lengths >= 0 (on the device that will run the decode).
        num_q_tokens_per_head_k: s_q * h_q // h_kv (query rows that share one cache head), an int >= 1.
        num_heads_k: h_kv, an int >= 1.
        num_sm_parts: parts of the key axis, an int >= 1; default fills the device once (see default_num_sm_parts).
    Returns:
        (tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1]), on cache_seqlens' device.
        Computed with device ops only (no host sync): safe inside CUDA-graph capture.
    Raises:
        TypeError for a non-tensor or a non-int count; ValueError for a wrong dtype/shape, a count < 1, or (CPU
        tensors always, CUDA with DEEPKERNELS_CHECK=1) a negative length.
    """
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    num_q_tokens_per_head_k = _ops.check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, min_value=1)
    num_heads_k = _ops.check_int("num_heads_k", num_heads_k, min_value=1)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
    num_sm_parts = _ops.check_int("num_sm_parts", num_sm_parts, min_value=1)
    if _checks_on(cache_seqlens.device) and cache_seqlens.numel() and bool((cache_seqlens < 0).any()):
        i = _first_bad(cache_seqlens < 0)[0]
        raise ValueError(f"cache_seqlens: expected lengths >= 0, got cache_seqlens[{i}] = {int(cache_seqlens[i])}")
    return torch.ops.deepkernels.get_mla_decode_metadata(cache_seqlens.contiguous(), num_q_tokens_per_head_k,
                                                         num_heads_k, num_sm_parts)


def _check_cache(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    check_tensor("kv_cache", kv_cache, dtypes=_CACHE_DTYPES, ndim=4, inner_contiguous=True)
    if kv_cache.size(3) != HEAD_DIM_QK:
        raise ValueError(f"kv_cache: expected last dim {HEAD_DIM_QK} (512 latent + 64 rope), got {kv_cache.size(3)}")
    if kv_cache.size(1) % PAGE_MULTIPLE != 0 or kv_cache.size(1) == 0:
        raise ValueError(f"kv_cache: expected a page size (dim 1) that is a positive multiple of {PAGE_MULTIPLE}, "
                         f"got {kv_cache.size(1)}")
    if kv_cache.size(2) == 0:
        raise ValueError(f"kv_cache: expected at least one head (dim 2), got shape {list(kv_cache.shape)}")
    align = 16 // kv_cache.element_size()  # rows are read in 16-byte vectors
    if any(kv_cache.stride(d) % align for d in range(3)):  # (the binding also checks the base address)
        raise ValueError(f"kv_cache: expected rows on 16-byte boundaries (strides multiples of {align} elements), "
                         f"got strides {kv_cache.stride()}")
    if (kv_cache.device.type != "meta" and kv_cache.numel() and not torch.compiler.is_compiling()
            and kv_cache.data_ptr() % 16):  # a view at an odd offset (no address while tracing)
        raise ValueError(f"kv_cache: expected a 16-byte aligned data pointer (rows are read in 16-byte vectors), "
                         f"got an address {kv_cache.data_ptr() % 16} bytes past a 16-byte boundary")
    if kv_cache.dtype == FP8_DTYPE:
        if kv_scale is None:
            raise ValueError("kv_scale: required for a float8_e4m3fn kv_cache: expected fp32 [num_blocks, page_size, "
                             f"h_kv] = {list(kv_cache.shape[:3])}, got None")
        check_tensor("kv_scale", kv_scale, dtypes=(torch.float32,), shape=tuple(kv_cache.shape[:3]),
                     device=kv_cache.device, contiguous=True)
    elif kv_scale is not None:
        check_tensor("kv_scale", kv_scale)
        raise ValueError(f"kv_scale: only valid with a float8_e4m3fn kv_cache: expected None with a "
                         f"{str(kv_cache.dtype).removeprefix('torch.')} kv_cache, got a tensor")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_softmax_scale(softmax_scale) -> float:
    if softmax_scale is None:
        return HEAD_DIM_QK ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a positive finite float (or None for 576 ** -0.5), got "
                        f"{type(softmax_scale).__name__} {softmax_scale!r}")
    value = float(softmax_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"softmax_scale: expected a positive finite float, got {value}")
    return value


def mla_decode_with_kvcache(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                            num_splits: torch.Tensor, softmax_scale: float | None = None, causal: bool = False,
                            kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention (layouts, masks and edge cases in the module docstring).

    Args:
        q: [b, s_q, h_q, 576] bf16 or fp16.  kv_cache: [num_blocks, page_size, h_kv, 576] in q's dtype, or e4m3
            (with a bf16 q).
        block_table: [b, max_blocks] int32.  cache_seqlens: [b] int32.
        head_dim_v: the int 512 (V = first 512 dims of each cached row).
        tile_scheduler_metadata, num_splits: from :func:`get_mla_decode_metadata` for these cache_seqlens
            and num_q_tokens_per_head_k = s_q * h_q // h_kv.
        softmax_scale: a positive finite float; default 576 ** -0.5.  causal: a bool; bottom-right mask when s_q > 1.
        kv_scale: [num_blocks, page_size, h_kv] fp32, required iff kv_cache is e4m3.
    Returns:
        (out [b, s_q, h_q, 512] in q's dtype, lse [b, h_q, s_q] fp32 natural log; +inf for rows that see no key).
        NaN in q, in a cached row a query reads, or in that row's kv_scale makes its out and lse NaN.
    Raises:
        TypeError for a non-tensor argument, a non-bool causal, a non-int head_dim_v or a non-real softmax_scale;
        ValueError naming the argument for wrong dtypes, shapes, strides, devices, head ratios and values.
        Index values (cache_seqlens >= 0 and within the block table, used block-table entries in
        [0, num_blocks), the plan matching cache_seqlens) are checked for CPU tensors; on CUDA they are trusted,
        as in FlashMLA (an out-of-range page is never read: the rows that see it come out NaN), unless
        DEEPKERNELS_CHECK=1, which validates them with one device sync (not inside CUDA-graph capture).
    """
    check_tensor("q", q, dtypes=_Q_DTYPES, ndim=4, inner_contiguous=True)
    if q.size(3) != HEAD_DIM_QK:
        raise ValueError(f"q: expected last dim {HEAD_DIM_QK} (512 latent + 64 rope), got {q.size(3)}")
    _check_cache(kv_cache, kv_scale)
    if kv_cache.dtype != q.dtype and not (kv_cache.dtype == FP8_DTYPE and q.dtype == torch.bfloat16):
        raise ValueError(f"kv_cache: expected q's dtype ({_dtype_name(q.dtype)})"
                         f"{' or float8_e4m3fn' if q.dtype == torch.bfloat16 else ''}"
                         f", got {_dtype_name(kv_cache.dtype)}"
                         f"{' (an e4m3 cache is read with a bfloat16 q)' if kv_cache.dtype == FP8_DTYPE else ''}")
    b, s_q, h_q, _ = q.shape
    h_kv = kv_cache.size(2)
    if h_q % h_kv != 0:
        raise ValueError(f"q: expected a number of heads that is a multiple of kv_cache heads ({h_kv}), got {h_q}")
    head_dim_v = _ops.check_int("head_dim_v", head_dim_v)
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {HEAD_DIM_V} (the latent part of the 576-dim row), got {head_dim_v}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, inner_contiguous=True)
    if block_table.size(0) != b:
        raise ValueError(f"block_table: expected {b} rows (batch of q), got {block_table.size(0)}")
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(b,), contiguous=True)
    check_tensor("tile_scheduler_metadata", tile_scheduler_metadata, dtypes=(torch.int32,),
                 shape=(None, METADATA_SIZE), contiguous=True)
    if tile_scheduler_metadata.size(0) == 0:
        raise ValueError("tile_scheduler_metadata: expected at least one part (shape [num_sm_parts >= 1, 8]), "
                         "got shape [0, 8]")
    check_tensor("num_splits", num_splits, dtypes=(torch.int32,), shape=(b + 1,), contiguous=True)
    check_same_device(q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                      tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, kv_scale=kv_scale)
    softmax_scale = _check_softmax_scale(softmax_scale)
    causal = _ops.check_bool("causal", causal)
    variant = mla_variant()  # an unknown name is an error on every device
    if variant is not None and (q.device.type == "cuda" or _ops.emulation_enabled()):  # a kernel runs
        _check_variant(kv_cache)
    if _checks_on(q.device):
        check_cache_indices(kv_cache, block_table, cache_seqlens, (tile_scheduler_metadata, num_splits))
    return torch.ops.deepkernels.mla_decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                                         tile_scheduler_metadata, num_splits, softmax_scale,
                                                         causal, kv_scale)


def check_slot_mapping(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot is -1 (skip) or in [0, num_slots = num_blocks * page_size); one host sync. ValueError otherwise."""
    if slot_mapping.numel() == 0:
        return
    bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
    if bool(bad.any()):
        i = _first_bad(bad)[0]
        raise ValueError(f"slot_mapping: expected -1 (skip) or a slot in [0, num_blocks * page_size = {num_slots}), "
                         f"got slot_mapping[{i}] = {int(slot_mapping[i])} (nothing was written)")


def write_mla_kv_cache(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, kv: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write (and for an e4m3 cache, quantise) new rows into the paged cache, in place.

    Args:
        kv_cache: [num_blocks, page_size, h_kv, 576] bf16, fp16 or e4m3 (mutated), contiguous.
        kv_scale: [num_blocks, page_size, h_kv] fp32 for an e4m3 cache (mutated), else None.
        kv: [t, h_kv, 576] bf16/fp32/fp16: 512 latent dims then 64 rope dims of each new token.
        slot_mapping: [t] int64 or int32: token j goes to page slot_mapping[j] // page_size, slot
            slot_mapping[j] % page_size; -1 skips the token (padding).
    e4m3 rows: scale = max(amax over the 576 dims, 1e-4) / 448, stored value = rne(x * 448 / amax),
    so the row reads back as kv_cache.float() * kv_scale (one scale per token and head).
    Raises:
        TypeError / ValueError naming the argument, before anything is written; slot values other than -1
        and [0, num_blocks * page_size) are checked for CPU tensors, on CUDA with DEEPKERNELS_CHECK=1 (else
        trusted; the kernel skips them rather than write out of bounds).
    """
    _check_cache(kv_cache, kv_scale)
    h_kv = kv_cache.size(2)
    check_tensor("kv", kv, dtypes=(torch.bfloat16, torch.float32, torch.float16), shape=(None, h_kv, HEAD_DIM_QK),
                 device=kv_cache.device, contiguous=True)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64, torch.int32), shape=(kv.size(0),),
                 device=kv_cache.device, contiguous=True)
    if not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache: expected a contiguous tensor for writes, got strides {kv_cache.stride()}")
    _ops.check_out_buffer("kv_cache", kv_cache, kv=kv, slot_mapping=slot_mapping)
    if kv_scale is not None:
        _ops.check_out_buffer("kv_scale", kv_scale, kv=kv, slot_mapping=slot_mapping, kv_cache=kv_cache)
    if _checks_on(kv_cache.device):
        check_slot_mapping(slot_mapping, kv_cache.size(0) * kv_cache.size(1))
    torch.ops.deepkernels.write_mla_kv_cache(kv_cache, kv_scale, kv, slot_mapping)


__all__ = ["get_mla_decode_metadata", "mla_decode_with_kvcache", "write_mla_kv_cache",
           "get_mla_decode_metadata_ref", "mla_decode_with_kvcache_ref", "write_mla_kv_cache_ref"]
