"""DeepSeek-V3's MoE layer (routed + shared experts), optionally expert-parallel over an EPDispatcher.

Numerics follow HF transformers' DeepseekV3MoE: router logits in fp32, sigmoid scores, the correction
bias used for expert SELECTION only, group-limited top-k (top-2 sum per group, keep topk_group groups),
weights = the selected sigmoid scores, normalised (norm_topk_prob) and scaled by routed_scaling_factor.
Each token's output = sum_j w_j * expert_j(x) (fp32 accumulation) + shared_experts(x).

State dict keys (HF DeepSeek-V3 ``mlp.*``): ``gate.weight`` [E, H], ``gate.e_score_correction_bias`` [E]
(fp32), ``experts.{e}.{gate,up,down}_proj.weight`` (+ ``weight_scale_inv`` when fp8) for the LOCAL
experts e only (global ids; rank r of R holds r*E/R .. (r+1)*E/R-1), ``shared_experts.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import EPDispatcher
from .mlp import MLP


class MoEGate(nn.Module):
    """DeepSeek-V3 router: ``weight`` [E, H] and ``e_score_correction_bias`` [E] fp32 (a buffer)."""

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, n_group: int,
                 topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True, device=None, dtype=None):
        super().__init__()
        if n_routed_experts % n_group != 0:
            raise ValueError(f"n_routed_experts: expected a multiple of n_group={n_group}, got {n_routed_experts}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group: expected 1..n_group={n_group}, got {topk_group}")
        if num_experts_per_tok > topk_group * (n_routed_experts // n_group):
            raise ValueError(f"num_experts_per_tok: expected <= topk_group * experts per group = "
                             f"{topk_group * (n_routed_experts // n_group)}, got {num_experts_per_tok}")
        self.n_routed_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, device=device,
                                                                    dtype=torch.float32))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx [T, k] int64, topk_weights [T, k] float32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        t = x.size(0)
        grouped = choice.view(t, self.n_group, self.n_routed_experts // self.n_group)
        group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, self.n_routed_experts)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, w * self.routed_scaling_factor


class MoE(nn.Module):
    """DeepSeek-V3 MoE: forward(x [..., H]) -> [..., H] in x's dtype.

    With ``group`` (a torch.distributed ProcessGroup of R ranks), this rank holds experts
    r*E/R..(r+1)*E/R-1; tokens travel through :class:`deepkernels.moe.EPDispatcher` (every rank must
    call forward, with its own tokens; the gate and shared experts are replicated). ``group=None``:
    all experts local, same code path with one rank. ``fp8_dispatch`` quantises tokens to e4m3 while
    packing (DeepEP's fp8 dispatch); the experts then see the dequantised tokens.
    Experts run one ``deepkernels.nn.MLP`` per local expert over the contiguous expert layout.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, num_experts_per_tok: int,
                 n_shared_experts: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                 norm_topk_prob: bool = True, fp8: bool = False, group=None, device=None, dtype=None,
                 fp8_dispatch: bool = False, capacity: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.dispatcher = EPDispatcher(group, n_routed_experts, capacity=capacity)
        self.fp8_dispatch = fp8_dispatch
        self.gate = MoEGate(hidden_size, n_routed_experts, num_experts_per_tok, n_group, topk_group,
                            routed_scaling_factor, norm_topk_prob, device=device, dtype=dtype)
        r, nl = self.dispatcher.rank, self.dispatcher.num_local_experts
        self.expert_offset = r * nl
        self.experts = nn.ModuleDict({str(e): MLP(hidden_size, moe_intermediate_size, fp8, device, dtype)
                                      for e in range(r * nl, (r + 1) * nl)})
        self.shared_experts = MLP(hidden_size, moe_intermediate_size * n_shared_experts, fp8, device, dtype) \
            if n_shared_experts > 0 else None

    def local_experts(self) -> list[nn.Module]:
        return [self.experts[str(e)] for e in range(self.expert_offset,
                                                    self.expert_offset + self.dispatcher.num_local_experts)]

    def _run_experts(self, recv_x, handle, dtype) -> torch.Tensor:
        if isinstance(recv_x, tuple):
            from ..fp8 import per_token_cast_from_fp8

            recv_x = per_token_cast_from_fp8(recv_x[0], recv_x[1], torch.float32 if dtype == torch.float32 else dtype)
        experts = self.local_experts()
        if handle.num_recv_tokens_per_expert_list is not None:
            xc, _ = handle.to_contiguous(recv_x)
            out = torch.empty(xc.shape, dtype=recv_x.dtype, device=xc.device)
            start = 0
            for expert, c in zip(experts, handle.num_recv_tokens_per_expert_list):
                if c:
                    out[start:start + c] = expert(xc[start:start + c])
                start += c
            return handle.expert_reduce(out, "contiguous", 1)
        # fixed-capacity mode: masked layout, every expert runs on its whole (zero-padded) slab
        xm, _ = handle.to_masked(recv_x)
        out = torch.stack([expert(xm[i]) for i, expert in enumerate(experts)]) if experts else xm
        return handle.expert_reduce(out, "masked")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        topk_idx, topk_w = self.gate(x2)
        recv_x, handle = self.dispatcher.dispatch(x2, topk_idx, topk_w, use_fp8=self.fp8_dispatch)
        y = self._run_experts(recv_x, handle, x.dtype)
        out = self.dispatcher.combine(y.to(x.dtype), handle)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x2)
        return out.view(shape)
