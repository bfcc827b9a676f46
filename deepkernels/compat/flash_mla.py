"""FlashMLA-compatible entry points: ``from deepkernels.compat.flash_mla import get_mla_metadata,
flash_mla_with_kvcache`` runs code written for ``flash_mla`` unchanged (dense decode; q and cache bf16, or
fp16 as in FlashMLA's ``--dtype fp16`` mode, out in q's dtype).

Differences: the tile-scheduler metadata is deepkernels' own layout (opaque to callers, as in FlashMLA);
FlashMLA's sparse (``indices``) attention is not provided; an fp8 cache is deepkernels' layout
(e4m3 [num_blocks, page, h_kv, 576] + per-token fp32 scale passed as ``kv_scale``).
"""
from __future__ import annotations

import torch

from .. import _ops
from .. import mla as _mla


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: cache_seqlens [b] int32; num_q_tokens_per_head_k = s_q * h_q // h_k; num_heads_k = h_k.
    Returns: (tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32)."""
    if topk is not None:
        raise NotImplementedError(f"topk: expected None (sparse attention is not provided by deepkernels), got "
                                  f"{type(topk).__name__} {topk!r}"[:200])
    _ops.check_bool("is_fp8_kvcache", is_fp8_kvcache)
    if num_heads_q is not None:
        _ops.check_int("num_heads_q", num_heads_q, min_value=1)
    return _mla.get_mla_decode_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                           num_splits: torch.Tensor, softmax_scale: float | None = None, causal: bool = False,
                           descale_q: torch.Tensor | None = None, descale_k: torch.Tensor | None = None,
                           is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None,
                           kv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: q [b, s_q, h_q, 576]; k_cache [num_blocks, page_size, h_k, 576]; block_table [b, max_blocks] int32;
    cache_seqlens [b] int32; head_dim_v 512; metadata from get_mla_metadata; softmax_scale default 576^-0.5.
    q and k_cache: both bf16 or both fp16 (or an e4m3 k_cache with kv_scale and a bf16 q).
    Returns: (out [b, s_q, h_q, 512] in q's dtype, softmax_lse [b, h_q, s_q] fp32)."""
    if indices is not None:
        raise NotImplementedError(f"indices: expected None (sparse attention is not provided by deepkernels), got "
                                  f"{type(indices).__name__}")
    is_fp8_kvcache = _ops.check_bool("is_fp8_kvcache", is_fp8_kvcache)
    for name, value in (("descale_q", descale_q), ("descale_k", descale_k)):
        if value is not None:
            raise NotImplementedError(f"{name}: expected None (descale_q / descale_k are not supported: pass an e4m3 "
                                      f"k_cache with a per-token kv_scale instead), got {type(value).__name__}")
    if is_fp8_kvcache and kv_scale is None:
        raise NotImplementedError("kv_scale: expected a tensor with is_fp8_kvcache=True (FlashMLA's packed fp8 "
                                  "cache, 656 B per token, is not supported: pass an e4m3 k_cache [num_blocks, page, "
                                  "h_k, 576] with kv_scale [num_blocks, page, h_k], see "
                                  "deepkernels.write_mla_kv_cache), got None")
    return _mla.mla_decode_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                        num_splits, softmax_scale, causal, kv_scale)


__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]
