"""Paged MLA cache and absorbed-form MLA decode attention (DeepSeek-V3).

Absorbed form: the cache holds, per token, the compressed kv latent c_kv (512 dims, after kv_a_layernorm)
followed by the rotated rope key k_pe (64 dims): one 576-dim row shared by all heads (h_kv = 1).
With kv_b_proj.weight viewed as [h, d_nope + d_v, 512]:
    w_uk = weight[:, :d_nope, :]                  [h, d_nope, 512]
    w_uv = weight[:, d_nope:, :].transpose(1, 2)  [h, 512, d_v]
a head's score q_nope . (W_UK c) + q_pe . k_pe equals (q_nope W_UK) . c + q_pe . k_pe, so the query
becomes [q_nope @ w_uk | q_pe] (576 dims) and the attention output over the latent is mapped back
through w_uv.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import mla as _mla
from .cpu_fast_path import cpu_fast_path_active

KV_LORA_RANK = _mla.HEAD_DIM_V     # 512
ROPE_DIM = _mla.HEAD_DIM_QK - _mla.HEAD_DIM_V  # 64


class PagedMLAKVCache(nn.Module):
    """Paged latent cache for ``num_layers`` layers and a batch of ``batch_size`` sequences.

    Storage per layer: ``kv_cache(layer)`` [num_blocks, page_size, 1, 576] (bf16, float32, or e4m3 with
    ``kv_scale(layer)`` [num_blocks, page_size, 1] fp32). Sequence i owns pages
    ``block_table[i, :max_blocks_per_seq]`` (a fixed assignment, shuffled when ``shuffle_blocks``), so
    positions never need host-side allocation and every step is CUDA-graph friendly.

    Lengths are tracked per layer (``seqlens[layer]`` [b] int32): ``append(layer, latent, k_pe)`` writes
    the t new tokens of every sequence at that layer's current length and advances it by t. A decoder
    layer appends then attends with ``layer_seqlens(layer)``; ``cache_seqlens`` is layer 0's lengths
    (equal to every layer's once a step has run through all layers). Capacity (``max_seq_len``) is not
    checked on the device: writing past it is undefined.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, page_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device=None, shuffle_blocks: bool = False,
                 num_blocks: int | None = None, kv_lora_rank: int = KV_LORA_RANK, rope_dim: int = ROPE_DIM):
        super().__init__()
        # rows of another geometry than the decode kernel's 512 + 64 (other configs) run the pure-torch attention
        self.kv_lora_rank, self.rope_dim, self.row_dim = kv_lora_rank, rope_dim, kv_lora_rank + rope_dim
        if page_size % _mla.PAGE_MULTIPLE != 0 or page_size <= 0:
            raise ValueError(f"page_size: expected a positive multiple of {_mla.PAGE_MULTIPLE}, got {page_size}")
        if dtype not in (torch.bfloat16, torch.float32, _mla.FP8_DTYPE):
            raise ValueError(f"dtype: expected bfloat16, float32 or float8_e4m3fn, got {dtype}")
        self.num_layers, self.batch_size, self.page_size, self.dtype = num_layers, batch_size, page_size, dtype
        self.max_blocks_per_seq = -(-max_seq_len // page_size)
        needed = batch_size * self.max_blocks_per_seq
        self.num_blocks = num_blocks if num_blocks is not None else needed
        if self.num_blocks < needed:
            raise ValueError(f"num_blocks: need at least {needed} for {batch_size} x {max_seq_len} tokens, "
                             f"got {self.num_blocks}")
        order = torch.randperm(self.num_blocks)[:needed] if shuffle_blocks else torch.arange(needed)
        self.register_buffer("block_table", order.view(batch_size, -1).to(device=device, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("kv", torch.zeros(num_layers, self.num_blocks, page_size, 1, self.row_dim,
                                               dtype=dtype, device=device), persistent=False)
        scale = (torch.ones(num_layers, self.num_blocks, page_size, 1, dtype=torch.float32, device=device)
                 if dtype == _mla.FP8_DTYPE else None)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("seqlens", torch.zeros(num_layers, batch_size, dtype=torch.int32, device=device),
                             persistent=False)

    @property
    def cache_seqlens(self) -> torch.Tensor:
        return self.seqlens[0]

    def layer_seqlens(self, layer: int) -> torch.Tensor:
        return self.seqlens[layer]

    def kv_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer]

    def kv_scale(self, layer: int) -> torch.Tensor | None:
        return None if self.scale is None else self.scale[layer]

    def reset(self) -> None:
        self.seqlens.zero_()

    # -- CPU fast path --------------------------------------------------------------------------------
    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        """fp32 / bf16 caches on the CPU (not emulated, no autograd): plain indexed stores and a batched masked
        attention instead of the write / decode ops (same maths; see deepkernels.nn.cpu_fast_path)."""
        return self.dtype != _mla.FP8_DTYPE and cpu_fast_path_active(x) and self.kv.device.type == "cpu"

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Whether attend/append run the CPU fast path for input ``x`` (then no decode split plan is needed)."""
        return self._fast_path_ok(x)

    def _identity_pages(self) -> bool:
        """True when sequence i owns blocks i*max_blocks .. (i+1)*max_blocks-1 in order (the default table):
        each layer's cache is then a [b, max_blocks * page_size, row] view, no gather needed."""
        table = self.block_table
        key = (table, table.data_ptr(), table._version)
        cached = self.__dict__.get("_identity_key")
        if cached is None or cached[0] is not table or cached[1:] != key[1:]:
            b, mb = self.block_table.shape
            expect = torch.arange(b * mb, dtype=torch.int32, device=self.block_table.device).view(b, mb)
            self.__dict__["_identity"] = (b, mb) == (self.batch_size, self.max_blocks_per_seq) and \
                torch.equal(self.block_table, expect)
            self.__dict__["_identity_key"] = key
        return self.__dict__["_identity"]

    def sequence_rows(self, layer: int, length: int) -> torch.Tensor:
        """The first ``length`` cache rows of every sequence, [b, length, row] in the cache dtype: a view of the
        cache with the default block table, else gathered through it."""
        b, page, row = self.batch_size, self.page_size, self.kv.size(-1)
        if self._identity_pages():
            n = b * self.max_blocks_per_seq
            return self.kv[layer, :n].view(b, self.max_blocks_per_seq * page, row)[:, :length]
        blocks = self.block_table[:, : -(-length // page)].long()
        return self.kv[layer][blocks].view(b, -1, row)[:, :length]

    def _append_fast(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        b, t, rank = latent.shape
        lengths, row = self.seqlens[layer], self.kv.size(-1)
        capacity = self.max_blocks_per_seq * self.page_size
        host = lengths.tolist()  # a CPU tensor: reading it costs no device sync
        if t and max(host) + t > capacity:
            raise ValueError(f"append: {t} new tokens overflow the cache capacity {capacity} (sequence lengths "
                             f"{host}); build the cache with a larger max_seq_len")
        if self._identity_pages() and min(host, default=0) == max(host, default=0):  # one strided store
            n = host[0] if host else 0
            dst = self.sequence_rows(layer, capacity)[:, n:n + t]
            dst[..., :rank] = latent
            dst[..., rank:] = k_pe
        else:
            if self._identity_pages():
                slots = [i * capacity + n + j for i, n in enumerate(host) for j in range(t)]
            else:
                table, page = self.block_table.tolist(), self.page_size
                slots = [table[i][(n + j) // page] * page + (n + j) % page
                         for i, n in enumerate(host) for j in range(t)]
            rows = torch.cat([latent, k_pe.to(latent.dtype)], dim=-1).view(-1, row)
            self.kv[layer].view(-1, row)[torch.tensor(slots, device=rows.device)] = rows.to(self.dtype)
        lengths += t
        # attend() right after reads the new lengths from here instead of the tensor (valid while unchanged)
        self._host_lengths = (layer, self.seqlens._version, [n + t for n in host])

    def _lengths_on_host(self, layer: int) -> list[int]:
        cached = getattr(self, "_host_lengths", None)
        if cached is not None and cached[0] == layer and cached[1] == self.seqlens._version:
            return cached[2]
        return self.seqlens[layer].tolist()

    def _attend_fast(self, layer: int, q_nope, q_pe, w_uk, w_uv, softmax_scale: float, causal: bool):
        """mla_decode_absorbed's maths for all sequences at once: the reference's fp32 attention (a bf16 cache of
        the kernel's 512 + 64 rows: the decode kernel's bf16 query and bf16 output) over a [b, L, row] view of
        the cache, keys past each sequence's length (and the bottom-right causal mask) masked out."""
        b, s, h, d_nope = q_nope.shape
        rank = w_uk.size(-1)
        host = self._lengths_on_host(layer)
        length = max(host, default=0)
        if length == 0:  # no keys anywhere: every output is 0
            return q_nope.new_zeros(b, s, h, w_uv.size(-1))
        kv = self.sequence_rows(layer, length).float()                          # [b, L, row]
        # absorb W_UK per head: [h, b*s, d_nope] @ [h, d_nope, rank]
        q_latent = torch.bmm(q_nope.reshape(b * s, h, d_nope).float().transpose(0, 1), w_uk.float())
        q = torch.cat([q_latent.transpose(0, 1).view(b, s, h, rank), q_pe.float()], dim=-1)
        # the decode kernel's roundings (bf16 query and output) only for the rows it runs (512 + 64): other
        # geometries' reference is mla_attention_fp32, which keeps both in fp32
        kernel_roundings = self.dtype == torch.bfloat16 and _runs_decode_kernel(self.row_dim, rank)
        if kernel_roundings:
            q = q.to(torch.bfloat16).float()
        scores = torch.bmm(q.view(b, s * h, -1), kv.transpose(1, 2)).view(b, s, h, length)
        shortest = min(host)
        if shortest < length or (causal and s > 1):
            limit = torch.tensor(host, device=kv.device)[:, None].expand(b, s)
            if causal:  # bottom-right: query token i sees keys < length - s + 1 + i
                limit = limit - s + 1 + torch.arange(s, device=kv.device)
            hidden = torch.arange(length, device=kv.device) >= limit[:, :, None]  # [b, s, L]
            scores.masked_fill_(hidden[:, :, None], float("-inf"))
        probs = torch.softmax(scores.mul_(softmax_scale), dim=-1)
        if shortest - (s - 1 if causal else 0) <= 0:  # a query that sees no key: output 0 (the reference's)
            probs = probs.nan_to_num_(0.0)
        out = torch.bmm(probs.view(b, s * h, length), kv[..., :rank])             # [b, s*h, rank]
        if kernel_roundings:
            out = out.to(torch.bfloat16).float()
        # map back through W_UV per head: [h, b*s, rank] @ [h, rank, d_v]
        out = torch.bmm(out.view(b * s, h, rank).transpose(0, 1), w_uv.float())
        return out.transpose(0, 1).reshape(b, s, h, -1).to(q_nope.dtype)

    def slot_mapping(self, layer: int, num_tokens: int) -> torch.Tensor:
        """[b * t] int64 cache slots (page * page_size + offset) of the next t tokens of each sequence."""
        pos = self.seqlens[layer].long()[:, None] + torch.arange(num_tokens, device=self.seqlens.device)
        pages = self.block_table.long().gather(1, (pos // self.page_size).clamp(max=self.max_blocks_per_seq - 1))
        return (pages * self.page_size + pos % self.page_size).reshape(-1)

    def attend(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
               softmax_scale: float, causal: bool = True,
               metadata: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """:func:`mla_decode_absorbed` over this layer's cache (call after ``append`` of the same tokens)."""
        if self._fast_path_ok(q_nope):
            return self._attend_fast(layer, q_nope, q_pe, w_uk, w_uv, softmax_scale, causal)
        return mla_decode_absorbed(q_nope, q_pe, w_uk, w_uv, self.kv_cache(layer), self.block_table,
                                   self.layer_seqlens(layer), softmax_scale, causal, self.kv_scale(layer), metadata)

    def append(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Write latent [b, t, 512] and k_pe [b, t, 64] at each sequence's current length; advance it by t."""
        b, t = latent.shape[:2]
        if latent.shape != (self.batch_size, t, self.kv_lora_rank) or k_pe.shape != (self.batch_size, t, self.rope_dim):
            raise ValueError(f"append: expected latent [{self.batch_size}, t, {self.kv_lora_rank}] and k_pe "
                             f"[{self.batch_size}, t, {self.rope_dim}], got {list(latent.shape)} and {list(k_pe.shape)}")
        if self._fast_path_ok(latent):
            return self._append_fast(layer, latent, k_pe)
        rows = torch.cat([latent, k_pe.to(latent.dtype)], dim=-1).reshape(b * t, 1, self.row_dim)
        slots = self.slot_mapping(layer, t)
        if self.dtype == torch.float32:  # fp32 cache (CPU model checks): plain indexing, no rounding
            flat = self.kv[layer].view(-1, 1, self.row_dim)
            flat[slots] = rows.float()
        elif self.row_dim != _mla.HEAD_DIM_QK:  # another geometry: the reference write (any row size)
            _mla.write_mla_kv_cache_ref(self.kv[layer], self.kv_scale(layer), rows.float(), slots)
        else:
            src = rows.contiguous() if rows.dtype in (torch.bfloat16, torch.float32, torch.float16) else rows.float()
            _mla.write_mla_kv_cache(self.kv[layer], self.kv_scale(layer), src.contiguous(), slots)
        self.seqlens[layer] += t


def _runs_decode_kernel(row_dim: int, kv_lora_rank: int) -> bool:
    """mla_decode_with_kvcache's geometry: 576-dim rows whose first 512 dims are the latent (V)."""
    return row_dim == _mla.HEAD_DIM_QK and kv_lora_rank == KV_LORA_RANK


def mla_decode_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                        kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                        softmax_scale: float, causal: bool = True, kv_scale: torch.Tensor | None = None,
                        metadata: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Absorbed MLA attention over a paged latent cache.

    Args:
        q_nope: [b, s, h, d_nope], q_pe: [b, s, h, 64] (rope already applied).
        w_uk: [h, d_nope, 512], w_uv: [h, 512, d_v] (see the module docstring for the kv_b_proj views).
        kv_cache: [num_blocks, page_size, 1, 576] bf16 / e4m3 (+ kv_scale) / float32 (float32: pure-torch path).
        block_table [b, max_blocks] int32, cache_seqlens [b] int32: lengths INCLUDING the s new tokens.
        softmax_scale: the model's (DeepSeek-V3 with YaRN: 192^-0.5 * mscale^2).
        causal: bottom-right mask over the s new tokens (prefill chunks, MTP); no effect when s == 1.
        metadata: optional precomputed (tile_scheduler_metadata, num_splits), shared across layers.
    Returns:
        [b, s, h, d_v] in q_nope's dtype. bf16/fp8 caches run ``mla_decode_with_kvcache`` (bf16 query);
        a float32 cache runs the same maths in fp32 (for exact checks against the reference model).
    """
    b, s, h, _ = q_nope.shape
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope.float(), w_uk.float())
    q = torch.cat([q_latent, q_pe.float()], dim=-1)
    if kv_cache.dtype == torch.float32 or not _runs_decode_kernel(kv_cache.size(-1), w_uk.size(-1)):
        # fp32 caches, and rows of another geometry than the kernel's 512 + 64 (another size, or 576 split
        # otherwise, e.g. 448 + 128): the same maths in pure torch
        out, _ = _mla.mla_attention_fp32(q, kv_cache, block_table, cache_seqlens, w_uk.size(-1), softmax_scale,
                                         causal, kv_scale)
    else:
        if metadata is None:
            metadata = _mla.get_mla_decode_metadata(cache_seqlens, s * h // kv_cache.size(2), kv_cache.size(2))
        out, _ = _mla.mla_decode_with_kvcache(q.to(torch.bfloat16), kv_cache, block_table, cache_seqlens,
                                              KV_LORA_RANK, metadata[0], metadata[1], softmax_scale, causal,
                                              kv_scale)
    return torch.einsum("bshc,hcv->bshv", out.float(), w_uv.float()).to(q_nope.dtype)


__all__ = ["PagedMLAKVCache", "mla_decode_absorbed"]
