"""Interim stand-ins for modules other families are building (deepkernels.nn.MoE, PagedMLAKVCache,
mla_decode_absorbed). Used only while those are missing from deepkernels.nn; same parameter names and
maths, pure torch. Delete once they have landed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mlp import MLP


class _ReferenceMoEGate(nn.Module):
    def __init__(self, hidden_size, n_routed_experts, num_experts_per_tok, n_group, topk_group,
                 routed_scaling_factor, norm_topk_prob, device=None, dtype=None):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = num_experts_per_tok, n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, device=device))

    def forward(self, x):
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        t = x.size(0)
        grouped = choice.view(t, self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        choice = choice.masked_fill(mask.unsqueeze(-1).expand_as(grouped).reshape(t, -1) == 0, float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor


class _ReferenceMoE(nn.Module):
    def __init__(self, hidden_size, moe_intermediate_size, n_routed_experts, num_experts_per_tok, n_shared_experts,
                 n_group, topk_group, routed_scaling_factor, norm_topk_prob=True, fp8=False, group=None,
                 device=None, dtype=None):
        super().__init__()
        if group is not None and group.size() > 1:
            raise NotImplementedError("expert parallelism needs deepkernels.nn.MoE (not landed yet)")
        self.hidden_size = hidden_size
        self.gate = _ReferenceMoEGate(hidden_size, n_routed_experts, num_experts_per_tok, n_group, topk_group,
                                      routed_scaling_factor, norm_topk_prob, device, dtype)
        self.experts = nn.ModuleDict({str(e): MLP(hidden_size, moe_intermediate_size, fp8, device, dtype)
                                      for e in range(n_routed_experts)})
        self.shared_experts = MLP(hidden_size, moe_intermediate_size * n_shared_experts, fp8, device, dtype)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        idx, w = self.gate(x2)
        out = torch.zeros_like(x2)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            y = self.experts[str(e)](x2[tok]) * w[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return (out + self.shared_experts(x2)).view(shape)


class _ReferencePagedMLAKVCache:
    """Paged latent cache, per layer [num_blocks, page_size, 1, 576]; lengths per layer, append advances."""

    def __init__(self, num_layers, batch_size, max_seq_len, page_size=64, dtype=torch.bfloat16, device=None):
        blocks_per_seq = -(-max_seq_len // page_size)
        num_blocks = batch_size * blocks_per_seq
        self.page_size = page_size
        self.kv = torch.zeros(num_layers, num_blocks, page_size, 1, 576, dtype=dtype, device=device)
        self.block_table = torch.arange(num_blocks, dtype=torch.int32, device=device).view(batch_size, -1)
        self.seqlens = torch.zeros(num_layers, batch_size, dtype=torch.int32, device=device)

    @property
    def cache_seqlens(self):
        return self.seqlens[0]

    def layer_seqlens(self, layer):
        return self.seqlens[layer]

    def kv_cache(self, layer):
        return self.kv[layer]

    def kv_scale(self, layer):
        return None

    def append(self, layer, latent, k_pe):
        b, t, _ = latent.shape
        pos = self.seqlens[layer].long()[:, None] + torch.arange(t, device=latent.device)
        blocks = self.block_table.long().gather(1, pos // self.page_size)
        self.kv[layer][blocks, pos % self.page_size, 0] = torch.cat([latent, k_pe], dim=-1).to(self.kv.dtype)
        self.seqlens[layer] += t


def _mla_decode_absorbed_ref(q_nope, q_pe, w_uk, w_uv, kv_cache, block_table, cache_seqlens, softmax_scale,
                             causal=True, kv_scale=None, metadata=None):
    b, s, h, _ = q_nope.shape
    latent = w_uk.size(-1)
    q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope.float(), w_uk.float()), q_pe.float()], dim=-1)
    page = kv_cache.size(1)
    out = q.new_zeros(b, s, h, latent)
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        kv = kv_cache[block_table[i, : -(-n // page)].long()].reshape(-1, kv_cache.size(-1))[:n].float()
        scores = torch.einsum("shc,nc->shn", q[i], kv) * softmax_scale
        if causal:
            allowed = torch.arange(n, device=q.device)[None, :] <= (n - s + torch.arange(s, device=q.device))[:, None]
            scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
        out[i] = torch.einsum("shn,nc->shc", scores.softmax(-1), kv[:, :latent])
    return torch.einsum("bshc,hcv->bshv", out, w_uv.float()).to(q_nope.dtype)
