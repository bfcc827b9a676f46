"""DeepSeek-V3 on deepkernels: MLA (q/kv LoRA, decoupled YaRN RoPE), dense MLP then MoE layers, LM head;
DeepSeek-V2 / V2-Lite / V2.5 are the same model with V2 routing (``config.topk_method``/``scoring_func``,
see ``deepkernels.nn.moe.route``); optional multi-token-prediction (MTP) layers after the main ones.

Parameter names are the official checkpoint's (``model.layers.{i}.self_attn.q_a_proj.weight``, ...), so a
safetensors state dict loads unchanged. Two attention paths:
  * full sequence (``cache=None``, or a prefill into an empty cache): the latent is expanded through
    ``kv_b_proj`` into per-head K/V and attention runs causally over the chunk (as HF transformers does);
  * decode with a paged latent cache: the latent (512, after kv_a_layernorm) and the roped k_pe (64) are
    appended to the cache, and attention runs in the absorbed form -- q_nope absorbs W_UK, the output
    absorbs W_UV -- through ``PagedMLAKVCache.attend`` (``mla_decode_absorbed`` -> ``mla_decode_with_kvcache``,
    one split plan per step shared by all layers).
RoPE layout: with ``rope_interleave`` (the checkpoints' layout, HF's default) the rope dims are rotated in
interleaved pairs (x0, x1), (x2, x3), ... and written out de-interleaved ([evens | odds]) as HF's DeepseekV3
does; q_pe and k_pe share that layout, so the dot products -- and the cache contents -- match HF's. HF's
DeepseekV2 rotates the same interleaved pairs as complex numbers and keeps them interleaved: a permutation
of the same rotated values applied to both q_pe and k_pe, hence the same scores (V2 checkpoints load as
they are, no conversion).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..mla import get_mla_decode_metadata
from ..nn.cpu_fast_path import cpu_fast_path_active
from ..nn.linear import Fp8Linear
from ..nn.mlp import MLP, make_linear
from ..nn.moe import MoE
from .config import DeepseekV3Config, yarn_get_mscale


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, times ``weight`` (HF's DeepseekV3RMSNorm order of operations)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.FAST_MAX_ELEMENTS and cpu_fast_path_active(x):
            return self._forward_fast(x)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    # decode-sized inputs: one fused layer_norm beats the five small ops above; larger ones run them
    FAST_MAX_ELEMENTS = 1 << 13

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm as a layer_norm over [x, -x]: its mean is 0 and its variance mean(x^2), so the first
        half is x * rsqrt(mean(x^2) + eps); one fused kernel instead of five ops (equal to ~1 ulp)."""
        xf = x.float()
        n = xf.size(-1)
        both = torch.cat([xf, xf.neg()], dim=-1)
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            return w * F.layer_norm(both, (2 * n,), None, None, self.eps)[..., :n].to(x.dtype)
        cached = self.__dict__.get("_weight2")
        if cached is None or cached[0] is not w or cached[1] != (w.data_ptr(), w._version):
            cached = self.__dict__["_weight2"] = (w, (w.data_ptr(), w._version), torch.cat([w, w]))
        return F.layer_norm(both, (2 * n,), cached[2], None, self.eps)[..., :n]


# ------------------------------------------------------------------------------------------------
# RoPE with YaRN

def rope_inv_freq(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin scale (YaRN's mscale/mscale_all_dim ratio)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.yarn
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = config.yarn_factor
    original = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations):
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # high-frequency dims keep their original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekV3Config, device=None):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.interleave = config.rope_interleave

    def reset_parameters(self) -> None:
        """Recompute inv_freq in place (after building on the meta device and ``to_empty``)."""
        self.inv_freq.copy_(rope_inv_freq(self.config)[0])

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, sin) [B, T, rope_dim/2] in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, rope_dim]; cos/sin [B, T, rope_dim/2]."""
        if cpu_fast_path_active(x):
            return self._apply_fast(x, cos, sin)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _apply_fast(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` as [x1 | x2] * [cos | cos] + [x2 | x1] * [-sin | sin]: the same products and sums
        (bit-identical) in two copies and three elementwise ops; the tables are built once per forward (the
        layers share ``cos``/``sin``)."""
        tables = getattr(self, "_fast_tables", None)
        if tables is None or tables[0] is not cos or tables[1] is not sin:
            tables = (cos, sin, torch.cat([cos, cos], -1)[:, :, None], torch.cat([-sin, sin], -1)[:, :, None])
            self._fast_tables = tables
        _, _, cos2, sin2 = tables
        if self.interleave:  # (x0, x1), (x2, x3), ... -> [evens | odds]
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return x * cos2 + x.roll(x.size(-1) // 2, -1) * sin2


# ------------------------------------------------------------------------------------------------
# attention

def dense_weight(linear: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (dequantised) weight [out, in] of an nn.Linear or Fp8Linear."""
    if isinstance(linear, Fp8Linear):
        return linear.dequantized_weight(dtype)
    return linear.weight.to(dtype)


# NOTE: the latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps of 1e-6 whatever the config's
# rms_norm_eps, as DeepSeek's reference code (RMSNorm(q_lora_rank), default eps), its HF remote code and
# transformers' DeepseekV2/V3 all do; rms_norm_eps applies to the layer norms, the final norm and MTP's norms.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention with the official parameter names."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, \
            c.v_head_dim
        self.qk_head_dim = c.qk_head_dim
        self.softmax_scale = c.softmax_scale
        fp8, h = c.is_fp8, c.num_attention_heads

        def linear(i, o, bias=False):
            if bias:
                if fp8:
                    return Fp8Linear(i, o, bias=True, device=device, dtype=dtype or torch.bfloat16)
                return nn.Linear(i, o, bias=True, device=device, dtype=dtype)
            return make_linear(i, o, fp8, device, dtype)

        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, h * self.qk_head_dim)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank, c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, device, dtype)
            self.q_b_proj = linear(c.q_lora_rank, h * self.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, device, dtype)
        self.kv_b_proj = linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(h * c.v_head_dim, c.hidden_size, c.attention_bias)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_uk [h, d_nope, kv_lora_rank], w_uv [h, kv_lora_rank, d_v]): views of kv_b_proj's weight; for an
        FP8 kv_b_proj its dequantisation in the model dtype, cached until the parameters change."""
        if isinstance(self.kv_b_proj, Fp8Linear):
            key = tuple((p.data_ptr(), p._version) for p in self.kv_b_proj.parameters())
            if getattr(self, "_dequantized_key", None) != key:
                self._dequantized = dense_weight(self.kv_b_proj, self.kv_a_layernorm.weight.dtype)
                self._dequantized_key = key
            w = self._dequantized
        else:
            w = self.kv_b_proj.weight
        w = w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:].transpose(1, 2)

    def _fused_input_proj(self):
        """(weight, bias) of the projections that read the layer input -- q_a_proj (or q_proj) and
        kv_a_proj_with_mqa -- stacked into one matrix for the CPU fast path: a cached copy, rebuilt when a
        parameter changes; None when one of them is FP8."""
        mods = (self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa)
        if not all(type(m) is nn.Linear for m in mods) or (mods[0].bias is None) != (mods[1].bias is None):
            return None
        params = [p for m in mods for p in (m.weight, m.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = getattr(self, "_fused_input", None)
        if cached is None or cached[0] != key:
            bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
            cached = self._fused_input = (key, (torch.cat([m.weight for m in mods]), bias), mods[0].out_features)
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, prefill: bool = False, decode_metadata=None) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self._fused_input_proj() if cpu_fast_path_active(x) else None
        if fused is not None:  # one matmul for both projections of x
            (weight, bias), n_q = fused
            q, kv_a = F.linear(x, weight, bias).split([n_q, weight.size(0) - n_q], dim=-1)
            if self.q_lora_rank is not None:
                q = self.q_b_proj(self.q_a_layernorm(q))
        else:
            q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            kv_a = self.kv_a_proj_with_mqa(x)
        q = q.reshape(b, t, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = rope.apply(q_pe, cos, sin)
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = rope.apply(k_pe.unsqueeze(2), cos, sin)  # [b, t, 1, rope]

        if cache is not None:  # append advances this layer's lengths by t
            cache.append(self.layer_idx, latent, k_pe.squeeze(2))
        if cache is None or prefill:
            out = self._dense_attention(q_nope, q_pe, latent, k_pe)
        else:
            w_uk, w_uv = self.absorbed_weights()
            out = cache.attend(self.layer_idx, q_nope, q_pe, w_uk, w_uv, self.softmax_scale, causal=True,
                               metadata=decode_metadata)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_head_dim).to(x.dtype))

    def _dense_attention(self, q_nope, q_pe, latent, k_pe):
        """Causal attention within the chunk, latent expanded to per-head K/V (MHA form)."""
        b, t, h, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(b, t, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if cpu_fast_path_active(q_nope):
            # the same attention as three batched ops (CPU SDPA takes its slow math path when v's head dim
            # differs from q's, as in DeepSeek-V3), q and k built head-major in one copy each; scores and
            # softmax in fp32 (for low-precision models too, as transformers' eager attention)
            q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1).view(b * h, t, -1)
            k = torch.cat([k_nope.transpose(1, 2), k_pe.transpose(1, 2).expand(b, h, t, self.qk_rope_head_dim)],
                          dim=-1).view(b * h, t, -1)
            causal = torch.full((t, t), float("-inf"), device=q.device).triu_(1)
            scores = torch.baddbmm(causal.expand(b * h, t, t), q.float(), k.float().transpose(1, 2),
                                   alpha=self.softmax_scale)
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out = torch.bmm(probs, v.transpose(1, 2).reshape(b * h, t, -1))
            return out.view(b, h, t, -1).transpose(1, 2)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.expand(b, t, h, self.qk_rope_head_dim)], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# blocks

class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int, group=None, device=None, dtype=None):
        super().__init__()
        c = config
        self.self_attn = MLAttention(c, layer_idx, device, dtype)
        if c.is_moe_layer(layer_idx):
            self.mlp = MoE(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                           c.n_shared_experts, c.n_group, c.topk_group, c.routed_scaling_factor,
                           norm_topk_prob=c.norm_topk_prob, fp8=c.is_fp8, group=group, device=device, dtype=dtype,
                           scoring_func=c.scoring_func, topk_method=c.topk_method)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.is_fp8, device, dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, device, dtype)

    def forward(self, x, rope, cos, sin, cache=None, prefill=False, decode_metadata=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cos, sin, cache, prefill, decode_metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP layer's output head: ``norm`` (RMSNorm) then ``head`` (the vocabulary projection)."""

    def __init__(self, config: DeepseekV3Config, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class MTPLayer(DecoderLayer):
    """One DeepSeek-V3 multi-token-prediction module, checkpoint layer ``num_hidden_layers + depth``: a full
    decoder layer (its ``self_attn``, ``mlp``, norms) plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``
    (hidden*2 -> hidden, never FP8, as released) and ``shared_head.{norm,head}``. The released checkpoint
    stores copies of the main model's embedding and LM head as ``embed_tokens`` / ``shared_head.head``.

    For position i it reads the main model's final (normed) hidden state h_i and the NEXT token t_{i+1}:
        h'_i = Layer(eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))))     (causal over positions, own cache)
        logits_i = shared_head.head(shared_head.norm(h'_i))               -> a draft of t_{i+2}
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int, group=None, device=None, dtype=None):
        super().__init__(config, layer_idx, group, device, dtype)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h, device=device, dtype=dtype)
        self.enorm = RMSNorm(h, config.rms_norm_eps, device, dtype)
        self.hnorm = RMSNorm(h, config.rms_norm_eps, device, dtype)
        self.eh_proj = nn.Linear(2 * h, h, bias=False, device=device, dtype=dtype)
        self.shared_head = SharedHead(config, device, dtype)

    def forward(self, next_ids, prev_hidden, rope, cos, sin, cache=None, prefill=False, decode_metadata=None):
        """next_ids [B, T] (t_{i+1}), prev_hidden [B, T, H] (h_i) -> h' [B, T, H] (before shared_head.norm)."""
        e = self.enorm(self.embed_tokens(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(prev_hidden.to(e.dtype))], dim=-1))
        return super().forward(x, rope, cos, sin, cache, prefill, decode_metadata)


def _shared_decode_metadata(cache, num_new_tokens: int, num_heads: int):
    """The decode kernel's split plan depends only on the lengths, equal in every layer after its append:
    compute it once per step (on the device, no host sync) and share it across layers."""
    kv = cache.kv_cache(0)
    if kv.dtype == torch.float32 or cache.uses_fast_path(kv):  # pure-torch attention (fp32, CPU fast path): no plan
        return None
    lengths = cache.cache_seqlens + num_new_tokens
    return get_mla_decode_metadata(lengths, num_new_tokens * num_heads // kv.size(2), kv.size(2))


class DeepseekV3Model(nn.Module):
    """Embeddings, ``num_hidden_layers`` decoder layers, final norm. With ``mtp`` the MTP layers follow in
    ``layers`` (indices num_hidden_layers.., the checkpoint's); the main forward never runs them."""

    def __init__(self, config: DeepseekV3Config, group=None, device=None, dtype=None, mtp: bool = False):
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        n_mtp = config.num_nextn_predict_layers if mtp else 0
        self.layers = nn.ModuleList([DecoderLayer(config, i, group, device, dtype)
                                     for i in range(config.num_hidden_layers)]
                                    + [MTPLayer(config, config.num_hidden_layers + i, group, device, dtype)
                                       for i in range(n_mtp)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.rotary_emb = RotaryEmbedding(config, device)

    def forward(self, input_ids, positions, cache=None, prefill=False):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        metadata = _shared_decode_metadata(cache, input_ids.size(1), self.layers[0].self_attn.num_heads) \
            if cache is not None and not prefill else None
        for layer in self.layers[: self.num_hidden_layers]:
            x = layer(x, self.rotary_emb, cos, sin, cache, prefill, metadata)
        return self.norm(x)

    @property
    def mtp_layers(self) -> list["MTPLayer"]:
        return list(self.layers[self.num_hidden_layers:])


def _check_token_ids(name: str, ids, vocab_size: int) -> None:
    """Token ids [B, T], integers in [0, vocab_size): checked on the host for CPU tensors (on a GPU the values
    are trusted, as an embedding lookup is; generate() checks them before the first step)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids [B, T], got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {tuple(ids.shape)}")
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token ids must be in [0, vocab_size={vocab_size}), got {bad}")


def _check_positions(name: str, num_tokens: int, max_positions: int, from_zero: bool) -> None:
    """A chunk that starts at position 0 (no cache, or a prefill) must fit in max_position_embeddings (RoPE /
    YaRN are defined up to it; DeepSeek's reference code precomputes them that far). Decode steps through a
    cache are bounded by generate()'s own check (no host sync per step here)."""
    if from_zero and num_tokens > max_positions:
        raise ValueError(f"{name}: {num_tokens} tokens exceed max_position_embeddings={max_positions} (the "
                         f"config's longest sequence; positions 0..{max_positions - 1})")


class DeepseekV3ForCausalLM(nn.Module):
    """DeepSeek-V3 for next-token logits.

    ``model(input_ids [B, T])`` -> logits [B, T, vocab] (full causal forward, no cache).
    ``model(input_ids, cache=c)`` (a ``deepkernels.nn.PagedMLAKVCache``): the B sequences continue from
    ``c.cache_seqlens`` (their positions); each layer appends its latents (advancing its lengths by T) and
    attends through the paged cache in the absorbed form; ``prefill=True`` (cache empty) computes attention
    within the chunk instead (MHA form, the cheaper one for long prompts). ``group``: a process group for expert
    parallelism (each rank holds its slice of the routed experts; every rank must run every forward).
    Layers' linear weights are Fp8Linear (weight + weight_scale_inv) when ``config.quantization_config``
    is set, ``dtype`` nn.Linear otherwise; embeddings, norms, router and LM head stay in ``dtype``.
    ``mtp=True`` also builds the ``config.num_nextn_predict_layers`` multi-token-prediction layers
    (:class:`MTPLayer`, ``model.layers.{num_hidden_layers + i}``): :meth:`forward_mtp` / :meth:`mtp_logits`
    give their draft logits, ``generate(..., use_mtp=True)`` decodes speculatively with them.
    """

    def __init__(self, config: DeepseekV3Config, group=None, device=None, dtype=None, mtp: bool = False):
        super().__init__()
        self.config = config
        self.group = group
        if mtp and config.num_nextn_predict_layers < 1:
            raise ValueError("mtp=True: the config has num_nextn_predict_layers=0 (no MTP layers)")
        self.model = DeepseekV3Model(config, group, device, dtype, mtp=mtp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def lm_head_tied(self) -> bool:
        """Whether the LM head shares the embedding's weight (``tie_word_embeddings``, unless the checkpoint
        brought its own ``lm_head.weight``: :meth:`untie_lm_head`)."""
        return self.lm_head.weight is self.model.embed_tokens.weight

    def untie_lm_head(self) -> None:
        """Give the LM head its own weight (a copy of the embedding's until loaded): for a
        ``tie_word_embeddings`` config whose checkpoint holds an ``lm_head.weight`` (transformers then uses it)."""
        if self.lm_head_tied:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone(),
                                               requires_grad=self.lm_head.weight.requires_grad)

    @property
    def num_mtp_layers(self) -> int:
        """How many MTP layers this model holds (0 unless built with ``mtp=True``)."""
        return len(self.model.layers) - self.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, cache=None, prefill: bool = False, logits_to_keep: int = 0,
                return_hidden: bool = False):
        """-> logits [B, T, vocab]; with ``return_hidden`` (logits, hidden [B, T, H]), hidden being the final
        normed hidden states (the MTP layers' input)."""
        _check_token_ids("input_ids", input_ids, self.config.vocab_size)
        b, t = input_ids.shape
        if prefill and (cache is None or bool(cache.cache_seqlens.any())):
            raise ValueError("prefill=True: expected an empty cache (attention runs within the chunk); "
                             "continue a filled cache with prefill=False")
        _check_positions("input_ids", t, self.config.max_position_embeddings, cache is None or prefill)
        offset = cache.cache_seqlens.long()[:, None] if cache is not None else 0
        positions = offset + torch.arange(t, device=input_ids.device)[None, :].expand(b, t)
        hidden = self.model(input_ids, positions, cache, prefill)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def forward_mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache=None, prefill: bool = False,
                    depth: int = 0, return_hidden: bool = False):
        """The MTP layer ``depth``'s draft logits.

        Args:
            next_ids [B, T]: entry i's NEXT token t_{i+1}; hidden [B, T, H]: the main model's final hidden
                state h_i at the same entry (``forward(..., return_hidden=True)``). For depth k > 0: tokens one
                further ahead per depth and depth k-1's h' (``return_hidden``).
            cache: a cache from ``make_cache(model, ..., mtp=True)``: the MTP layer's own layer
                (index num_hidden_layers + depth) holds one entry per position, continued from its length
                (``prefill=True``: empty, attention within the chunk); None: the T entries are positions 0..T-1.
        Returns:
            logits [B, T, vocab] (entry i: a draft of t_{i+2}); with ``return_hidden`` also h' [B, T, H].
        """
        _check_token_ids("next_ids", next_ids, self.config.vocab_size)
        mtp = self.model.mtp_layers
        if not mtp:
            raise RuntimeError("forward_mtp: this model has no MTP layers (build it with mtp=True, or "
                               "load_model(..., load_mtp=True))")
        if not 0 <= depth < len(mtp):
            raise ValueError(f"depth: expected 0..{len(mtp) - 1}, got {depth}")
        layer = mtp[depth]
        idx = layer.self_attn.layer_idx
        b, t = next_ids.shape
        if hidden.shape[:2] != (b, t):
            raise ValueError(f"hidden: expected [{b}, {t}, {self.config.hidden_size}] (one per next_ids entry), "
                             f"got {list(hidden.shape)}")
        if cache is not None and cache.num_layers <= idx:
            raise ValueError(f"cache: has {cache.num_layers} layers, the MTP layer {idx} needs "
                             f"make_cache(model, ..., mtp=True)")
        if prefill and (cache is None or bool(cache.layer_seqlens(idx).any())):
            raise ValueError("prefill=True: expected a cache whose MTP layer is empty")
        _check_positions("next_ids", t, self.config.max_position_embeddings, cache is None or prefill)
        offset = cache.layer_seqlens(idx).long()[:, None] if cache is not None else 0
        positions = offset + torch.arange(t, device=next_ids.device)[None, :].expand(b, t)
        cos, sin = self.model.rotary_emb(positions, hidden.dtype)
        h = layer(next_ids, hidden, self.model.rotary_emb, cos, sin, cache, prefill)
        logits = layer.shared_head(h)
        return (logits, h) if return_hidden else logits

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence MTP drafts (no cache): input_ids [B, T] -> [B, T - 1, vocab], entry i drafting token
        i + 2 from the main model's hidden state at i and token i + 1."""
        _, hidden = self(input_ids, return_hidden=True)
        return self.forward_mtp(input_ids[:, 1:], hidden[:, :-1])

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0) -> "DeepseekV3ForCausalLM":
        """Seeded random weights, scaled so activations stay O(1) and logits are well separated: linears
        N(0, 1/in), embeddings N(0, 1), norms ~1, router N(0, 1/H), a small random correction bias. Each
        tensor draws from its own generator seeded by (seed, name), so an expert-parallel rank that holds a
        slice of the experts gets exactly the weights a single process has. FP8 linears get the per-block
        quantisation of such a weight."""
        from ..fp8 import per_block_cast_to_fp8

        def randn(name, shape):
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode())))

        for name, module in self.named_modules():
            if isinstance(module, Fp8Linear):
                w = randn(name + ".weight", (module.out_features, module.in_features)) / math.sqrt(module.in_features)
                q, s = per_block_cast_to_fp8(w.to(module.weight.device))
                module.weight.copy_(q)
                module.weight_scale_inv.copy_(s)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(randn(name + ".weight", module.weight.shape) / math.sqrt(module.in_features))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(randn(name + ".weight", module.weight.shape))
            elif isinstance(module, RMSNorm):
                module.weight.copy_(1 + 0.1 * randn(name + ".weight", module.weight.shape))
            else:
                continue
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.02 * randn(name + ".bias", module.bias.shape))
        for name, p in self.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(randn(name, p.shape) / math.sqrt(p.size(1)))
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * randn(name, buf.shape))
        if self.config.tie_word_embeddings and not self.lm_head_tied:
            self.lm_head.weight.copy_(self.model.embed_tokens.weight)  # untied: an equal copy
        for layer in self.model.mtp_layers:  # the release's MTP layers hold copies of these
            layer.embed_tokens.weight.copy_(self.model.embed_tokens.weight)
            layer.shared_head.head.weight.copy_(self.lm_head.weight)
        return self
