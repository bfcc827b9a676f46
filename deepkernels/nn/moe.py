"""DeepSeek-V2/V3's MoE layer (routed + shared experts), optionally expert-parallel over an EPDispatcher.

Routing (:func:`route`, the pure-torch reference) follows the models' reference code and HF transformers'
DeepseekV3MoE / DeepseekV2Moe: router logits in fp32; sigmoid (V3) or softmax (V2) scores; top-k
selection ``noaux_tc`` (V3: the correction bias used for expert SELECTION only, group score = sum of the
group's top-2, keep topk_group groups), ``group_limited_greedy`` (V2: group score = the group's max) or
``greedy`` (V2-Lite); weights = the selected unbiased scores, normalised (norm_topk_prob) and/or scaled by
routed_scaling_factor as each model does. Each token's output = sum_j w_j * expert_j(x) (fp32 accumulation)
+ shared_experts(x).

State dict keys (HF DeepSeek ``mlp.*``): ``gate.weight`` [E, H], ``gate.e_score_correction_bias`` [E]
(fp32, ``noaux_tc`` only), ``experts.{e}.{gate,up,down}_proj.weight`` (+ ``weight_scale_inv`` when fp8) for
the LOCAL experts e only (global ids; rank r of R holds r*E/R .. (r+1)*E/R-1),
``shared_experts.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8 as _fp8
from .._ops import ceil_div
from ..moe import EPDispatcher
from ..moe.autograd import moe_forward_autograd
from .cpu_fast_path import cpu_fast_path_active
from .mlp import MLP

# CPU fast path: when the tokens' k slots at least cover the experts (T * k >= E) and there are at most this
# many tokens, the routed experts run densely (every expert on every token: one matmul and two batched ones,
# no per-expert loop; the weights are read once either way); otherwise the (token, slot) pairs are sorted by
# expert and each used expert runs once on its rows (few slots: only the used experts' weights are read;
# many tokens: no wasted flops).
DENSE_EXPERTS_MAX_TOKENS = 16
# ... and the dense path's stacked copy of the routed experts' weights is kept only below this size.
DENSE_EXPERTS_MAX_BYTES = 1 << 30
# ... and the sorted path runs all experts' segments in one torch._grouped_mm above this many pairs (below it a
# short loop over the used experts costs less than the grouped call's per-group overhead)
GROUPED_MIN_PAIRS = 64


def _grouped_mm_works() -> bool:
    """Whether torch._grouped_mm (one call for a matmul per expert segment, no Python loop) runs float CPU
    tensors here with transposed weights and gives the per-segment matmuls' results (checked once)."""
    global _GROUPED_MM_OK
    if _GROUPED_MM_OK is None:
        try:
            a, w = torch.randn(5, 16), torch.randn(3, 8, 16)
            offs = torch.tensor([2, 2, 5], dtype=torch.int32)
            out = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
            ref = torch.cat([F.linear(a[:2], w[0]), F.linear(a[2:], w[2])])
            _GROUPED_MM_OK = bool(torch.allclose(out, ref, rtol=1e-5, atol=1e-5))
        except Exception:  # older torch, or no CPU kernel: the per-expert loop
            _GROUPED_MM_OK = False
    return _GROUPED_MM_OK


_GROUPED_MM_OK: bool | None = None


def grouped_gemm_ops():
    """deepkernels.gemm when it provides the grouped FP8 GEMMs (FP8 GEMM family), else None."""
    try:
        from .. import gemm
    except ImportError:
        return None
    names = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
             "get_m_alignment_for_contiguous_layout")
    return gemm if all(hasattr(gemm, n) for n in names) else None


SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def check_routing(n_routed_experts: int, num_experts_per_tok: int, n_group: int, topk_group: int,
                  scoring_func: str = "sigmoid", topk_method: str = "noaux_tc") -> None:
    """ValueError naming the argument when a routing configuration is not one DeepSeek-V2/V3 define."""
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func: expected one of {SCORING_FUNCS} ('sigmoid' DeepSeek-V3, 'softmax' "
                         f"DeepSeek-V2), got {scoring_func!r}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method: expected one of {TOPK_METHODS} ('noaux_tc' DeepSeek-V3, "
                         f"'group_limited_greedy' DeepSeek-V2, 'greedy' DeepSeek-V2-Lite), got {topk_method!r}")
    if not 1 <= num_experts_per_tok <= n_routed_experts:
        raise ValueError(f"num_experts_per_tok: expected 1..n_routed_experts={n_routed_experts}, "
                         f"got {num_experts_per_tok}")
    if topk_method == "greedy":
        return
    if n_group < 1 or n_routed_experts % n_group != 0:
        raise ValueError(f"n_routed_experts: expected a multiple of n_group={n_group}, got {n_routed_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: expected 1..n_group={n_group}, got {topk_group}")
    if topk_method == "noaux_tc" and n_group > 1 and n_routed_experts // n_group < 2:
        # DeepSeek-V3's reference code and transformers both take each group's top-2 (and fail on one expert)
        raise ValueError(f"n_group: topk_method 'noaux_tc' scores a group by the sum of its two best experts, "
                         f"expected n_routed_experts / n_group >= 2, got {n_routed_experts} / {n_group} = "
                         f"{n_routed_experts // n_group}")
    if num_experts_per_tok > topk_group * (n_routed_experts // n_group):
        raise ValueError(f"num_experts_per_tok: expected <= topk_group * experts per group = "
                         f"{topk_group * (n_routed_experts // n_group)}, got {num_experts_per_tok}")


def route(router_logits: torch.Tensor, top_k: int, *, scoring_func: str = "sigmoid", topk_method: str = "noaux_tc",
          n_group: int = 1, topk_group: int = 1, correction_bias: torch.Tensor | None = None,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2/V3 expert selection, the pure-torch reference: router_logits [T, E] (fp32) ->
    (topk_idx [T, k] int64, topk_weights [T, k] fp32).

    scores = sigmoid(logits) (V3) or softmax(logits) (V2). Selection:
      * ``greedy``: the k best scores;
      * ``group_limited_greedy`` (V2): a group's score is the max of its experts' scores; the k best experts
        among the ``topk_group`` best groups;
      * ``noaux_tc`` (V3): as above on ``scores + correction_bias`` with a group's score the sum of its two best
        biased scores (the bias steers selection only).
    Weights are the selected experts' unbiased scores. ``noaux_tc`` (V3): normalised to sum 1 when
    ``norm_topk_prob``, then always times ``routed_scaling_factor``. ``greedy``/``group_limited_greedy``
    (DeepSeek-V2's reference code): normalised when ``norm_topk_prob`` and k > 1, otherwise times
    ``routed_scaling_factor`` -- one or the other (transformers' DeepseekV2 always scales and never
    normalises: the same for every released V2 config, all of which have norm_topk_prob false).
    """
    check_routing(router_logits.size(-1), top_k, n_group, topk_group, scoring_func, topk_method)
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    t, e = scores.shape
    choice = scores
    if topk_method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("correction_bias: topk_method 'noaux_tc' needs e_score_correction_bias [E], got None")
        choice = scores + correction_bias.float()
    if topk_method != "greedy" and topk_group < n_group:
        grouped = choice.view(t, n_group, e // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, False)
        choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(t, e)
    topk_idx = choice.topk(top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, topk_idx)
    if topk_method == "noaux_tc":
        if norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * routed_scaling_factor
    elif norm_topk_prob and top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        w = w * routed_scaling_factor
    return topk_idx, w


class MoEGate(nn.Module):
    """DeepSeek-V2/V3 router: ``weight`` [E, H]; with ``topk_method="noaux_tc"`` (V3) also
    ``e_score_correction_bias`` [E] fp32 (a buffer), absent otherwise (V2 checkpoints have none).
    forward(x [T, H]) -> (topk_idx [T, k] int64, topk_weights [T, k] fp32), see :func:`route`."""

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, n_group: int,
                 topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True, device=None, dtype=None,
                 scoring_func: str = "sigmoid", topk_method: str = "noaux_tc"):
        super().__init__()
        check_routing(n_routed_experts, num_experts_per_tok, n_group, topk_group, scoring_func, topk_method)
        self.n_routed_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.scoring_func, self.topk_method = scoring_func, topk_method
        # NOTE: kept in fp32 whatever the model dtype (transformers keeps ``gate.weight`` and the correction bias
        # in fp32: _keep_in_fp32_modules_strict): the router logits are fp32 either way, and a bf16 copy of the
        # weight would move near-tie expert choices away from transformers' bf16 model.
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, device=device, dtype=torch.float32))
        bias = torch.zeros(n_routed_experts, device=device, dtype=torch.float32) if topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx [T, k] int64, topk_weights [T, k] float32)."""
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.top_k, scoring_func=self.scoring_func, topk_method=self.topk_method,
                     n_group=self.n_group, topk_group=self.topk_group, correction_bias=self.e_score_correction_bias,
                     norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor)


class MoE(nn.Module):
    """DeepSeek-V2/V3 MoE: forward(x [..., H]) -> [..., H] in x's dtype.

    ``scoring_func`` ("sigmoid" V3, "softmax" V2) and ``topk_method`` ("noaux_tc" V3, "group_limited_greedy"
    V2, "greedy" V2-Lite) pick the routing (:class:`MoEGate`, :func:`route`); the defaults are DeepSeek-V3's.

    With ``group`` (a torch.distributed ProcessGroup of R ranks), this rank holds experts
    r*E/R..(r+1)*E/R-1; tokens travel through :class:`deepkernels.moe.EPDispatcher` (every rank must
    call forward, with its own tokens; the gate and shared experts are replicated). ``group=None``:
    all experts local, same code path with one rank. ``fp8_dispatch`` quantises tokens to e4m3 while
    packing (DeepEP's fp8 dispatch); the experts then see the dequantised tokens.
    Experts: with ``fp8=True`` and ``use_grouped_gemm=True`` (or None = whenever ``deepkernels.gemm``
    provides the grouped GEMMs; default False until that family has landed and been checked with this
    path on a GPU), the local experts run as two grouped FP8 GEMMs
    (``m_grouped_fp8_gemm_nt_contiguous`` in normal mode, ``..._masked`` in fixed-capacity mode) on
    weights stacked [L, 2I, H] / [L, H, I] (DeepGEMM's layout); the per-expert Fp8Linear parameters are
    then views into that storage, so the checkpoint keys and memory stay as they are. Otherwise one
    ``deepkernels.nn.MLP`` per local expert over the contiguous expert layout.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, num_experts_per_tok: int,
                 n_shared_experts: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                 norm_topk_prob: bool = True, fp8: bool = False, group=None, device=None, dtype=None,
                 fp8_dispatch: bool = False, capacity: int | None = None, use_grouped_gemm: bool | None = False,
                 scoring_func: str = "sigmoid", topk_method: str = "noaux_tc"):
        super().__init__()
        self.fp8, self.intermediate_size, self.use_grouped_gemm = fp8, moe_intermediate_size, use_grouped_gemm
        self._stacked = None
        self.hidden_size = hidden_size
        self.dispatcher = EPDispatcher(group, n_routed_experts, capacity=capacity)
        self.fp8_dispatch = fp8_dispatch
        self.gate = MoEGate(hidden_size, n_routed_experts, num_experts_per_tok, n_group, topk_group,
                            routed_scaling_factor, norm_topk_prob, device=device, dtype=dtype,
                            scoring_func=scoring_func, topk_method=topk_method)
        r, nl = self.dispatcher.rank, self.dispatcher.num_local_experts
        self.expert_offset = r * nl
        self.experts = nn.ModuleDict({str(e): MLP(hidden_size, moe_intermediate_size, fp8, device, dtype)
                                      for e in range(r * nl, (r + 1) * nl)})
        self.shared_experts = MLP(hidden_size, moe_intermediate_size * n_shared_experts, fp8, device, dtype) \
            if n_shared_experts > 0 else None

    def local_experts(self) -> list[nn.Module]:
        return [self.experts[str(e)] for e in range(self.expert_offset,
                                                    self.expert_offset + self.dispatcher.num_local_experts)]

    # -- grouped FP8 GEMM path -----------------------------------------------------------------
    def _grouped_ops(self):
        if not self.fp8 or self.use_grouped_gemm is False or self.intermediate_size % 128 != 0:
            if self.use_grouped_gemm:
                raise RuntimeError("use_grouped_gemm=True needs fp8=True and moe_intermediate_size % 128 == 0")
            return None
        ops = grouped_gemm_ops()
        if ops is None and self.use_grouped_gemm:
            raise RuntimeError("use_grouped_gemm=True but deepkernels.gemm has no grouped FP8 GEMMs")
        return ops

    def _expert_params(self):
        return [p for e in self.local_experts() for lin in (e.gate_proj, e.up_proj, e.down_proj)
                for p in (lin.weight, lin.weight_scale_inv)]

    def stacked_expert_weights(self):
        """(w13 [L, 2I, H] e4m3, s13 [L, 2I/128, H/128], w2 [L, H, I] e4m3, s2 [L, H/128, I/128]).

        Built once; the experts' parameters are re-pointed at views of it (no second copy), so
        load_state_dict (an in-place copy) updates both. Rebuilt if a parameter was replaced (.to())."""
        ptrs = tuple(p.data_ptr() for p in self._expert_params())
        if self._stacked is not None and self._stacked[0] == ptrs:
            return self._stacked[1]
        experts, i = self.local_experts(), self.intermediate_size
        u8 = lambda t: t.view(torch.uint8)  # noqa: E731  (cat/stack of fp8 as bytes)
        w13 = torch.stack([torch.cat([u8(e.gate_proj.weight), u8(e.up_proj.weight)]) for e in experts])
        s13 = torch.stack([torch.cat([e.gate_proj.weight_scale_inv, e.up_proj.weight_scale_inv]) for e in experts])
        w2 = torch.stack([u8(e.down_proj.weight) for e in experts])
        s2 = torch.stack([e.down_proj.weight_scale_inv for e in experts])
        w13, w2 = w13.view(_fp8.FP8_DTYPE), w2.view(_fp8.FP8_DTYPE)
        gi = i // 128
        for l, e in enumerate(experts):
            e.gate_proj.weight.data, e.up_proj.weight.data = w13[l, :i], w13[l, i:]
            e.gate_proj.weight_scale_inv.data, e.up_proj.weight_scale_inv.data = s13[l, :gi], s13[l, gi:]
            e.down_proj.weight.data, e.down_proj.weight_scale_inv.data = w2[l], s2[l]
        self._stacked = (tuple(p.data_ptr() for p in self._expert_params()), (w13, s13, w2, s2))
        return self._stacked[1]

    def _run_experts_grouped(self, ops, recv_x, handle, dtype) -> torch.Tensor:
        w13, s13, w2, s2 = self.stacked_expert_weights()
        i, h = self.intermediate_size, self.hidden_size
        if not isinstance(recv_x, tuple):
            recv_x = _fp8.per_token_cast_to_fp8(recv_x)
        out_dtype = torch.bfloat16
        if handle.num_recv_tokens_per_expert_list is not None:  # normal mode: contiguous layout
            align = ops.get_m_alignment_for_contiguous_layout()
            (xq, xs), m_idx = handle.to_contiguous(recv_x, align)
            m = xq.size(0)
            y = torch.empty(m, h, dtype=out_dtype, device=xq.device)
            if m:
                gu = torch.empty(m, 2 * i, dtype=out_dtype, device=xq.device)
                ops.m_grouped_fp8_gemm_nt_contiguous(xq, xs, w13, s13, gu, m_idx)
                aq, as_ = _fp8.per_token_cast_to_fp8(F.silu(gu[:, :i]) * gu[:, i:])
                ops.m_grouped_fp8_gemm_nt_contiguous(aq, as_, w2, s2, y, m_idx)
            return handle.expert_reduce(y, "contiguous", align)
        (xq, xs), masked_m = handle.to_masked(recv_x)  # fixed capacity: masked layout, no host sync
        nl, max_m = xq.shape[0], xq.shape[1]
        expected_m = max(1, min(max_m, ceil_div(handle.num_recv * handle.recv_local_idx.size(1), max(nl, 1))))
        gu = torch.empty(nl, max_m, 2 * i, dtype=out_dtype, device=xq.device)
        ops.m_grouped_fp8_gemm_nt_masked(xq, xs, w13, s13, gu, masked_m, expected_m)
        aq, as_ = _fp8.per_token_cast_to_fp8(F.silu(gu[..., :i]) * gu[..., i:])
        y = torch.empty(nl, max_m, h, dtype=out_dtype, device=xq.device)
        ops.m_grouped_fp8_gemm_nt_masked(aq, as_, w2, s2, y, masked_m, expected_m)
        return handle.expert_reduce(y, "masked")

    def _run_experts(self, recv_x, handle, dtype) -> torch.Tensor:
        ops = self._grouped_ops()
        if ops is not None:
            return self._run_experts_grouped(ops, recv_x, handle, dtype)
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

    # -- CPU fast path (one rank, float experts) ---------------------------------------------------
    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        d = self.dispatcher
        return (not self.fp8 and not self.fp8_dispatch and d.num_ranks == 1 and d.capacity is None
                and cpu_fast_path_active(x))

    def _expert_weights(self):
        """Stacked copies of the experts' weights for the CPU fast path, rebuilt when a parameter changes
        (pointer or in-place version): (w13 [E, 2I, H] (gate; up), w2 [E, H, I] (down), their per-expert
        views, and the shared experts' (gate; up) [2Is, H] and down [H, Is] or None); None when the routed
        experts are too large to hold twice."""
        cached = self.__dict__.get("_fast_weights")
        if cached is not None:  # cheap validity check: the same parameter objects, storage and versions
            slots, key, weights = cached
            if all(d[n] is p and p.data_ptr() == ptr and p._version == v for (d, n), (p, ptr, v) in zip(slots, key)):
                return weights
        experts = self.local_experts()
        mlps = experts + ([self.shared_experts] if self.shared_experts is not None else [])
        slots = [(lin._parameters, "weight") for e in mlps for lin in (e.gate_proj, e.up_proj, e.down_proj)]
        params = [d[n] for d, n in slots]
        key = [(p, p.data_ptr(), p._version) for p in params]
        if sum(p.numel() * p.element_size() for p in params) > DENSE_EXPERTS_MAX_BYTES:
            return None
        w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
        # NOTE: kept [out, in] and used through transposed views: a bf16 CPU matmul with a row-major [in, out]
        # right operand is ~5x slower than with the transposed view of an [out, in] one.
        w2 = torch.stack([e.down_proj.weight for e in experts])
        sh = self.shared_experts
        shared = None if sh is None else (torch.cat([sh.gate_proj.weight, sh.up_proj.weight]), sh.down_proj.weight)
        weights = (w13, w2, list(w13.unbind(0)), list(w2.unbind(0)), shared)
        self.__dict__["_fast_weights"] = (slots, key, weights)
        return weights

    def _routed_dense(self, x2, topk_idx, topk_w, weights):
        """sum_j w_j * expert_j(x) with every expert run on every token (few tokens: decode): one matmul for all
        gate/up projections, one batched matmul for the down projections, the weighted sum over experts (zero
        weight for unselected ones) in fp32 as a third."""
        w13, w2 = weights[:2]
        t, i = x2.size(0), self.intermediate_size
        e = w13.size(0)
        gu = torch.matmul(x2, w13.view(e * 2 * i, -1).t()).view(t, e, 2 * i)
        act = F.silu(gu[..., :i]) * gu[..., i:]                                  # [t, e, i]
        y = torch.bmm(act.transpose(0, 1), w2.transpose(1, 2))                   # [e, t, h] in x's dtype
        dense_w = torch.zeros(t, 1, e, dtype=torch.float32, device=x2.device).scatter_(2, topk_idx[:, None],
                                                                                      topk_w[:, None])
        return torch.bmm(dense_w, y.transpose(0, 1).float()).squeeze(1)          # [t, h] fp32

    def _routed_sorted(self, x2, topk_idx, topk_w, weights):
        """sum_j w_j * expert_j(x) with the (token, slot) pairs sorted by expert: a matmul pair per used
        expert on its contiguous rows (few pairs: only the used experts' weights are read; many tokens: no
        wasted flops), all segments in one grouped matmul each where torch has it for the CPU."""
        t, k = topk_idx.shape
        num_experts, i = self.dispatcher.num_local_experts, self.intermediate_size
        if t * k <= GROUPED_MIN_PAIRS:  # a few pairs: order them on the host (a CPU tensor, no device sync)
            ids = topk_idx.view(-1).tolist()
            pairs = sorted(range(t * k), key=ids.__getitem__)
            counts = [0] * num_experts
            for e in ids:
                counts[e] += 1
            order = torch.tensor(pairs, device=x2.device)
        else:
            flat = topk_idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=num_experts)
        token = order // k
        xs = x2.index_select(0, token)
        w = topk_w.view(-1)[order].unsqueeze(1)
        out = torch.zeros(t, x2.size(1), dtype=torch.float32, device=x2.device)
        if weights is not None and t * k > GROUPED_MIN_PAIRS and _grouped_mm_works():  # one call, no loop
            offs = torch.as_tensor(counts, device=x2.device).cumsum(0).to(torch.int32)
            gu = torch._grouped_mm(xs, weights[0].transpose(1, 2), offs=offs)
            ys = torch._grouped_mm(F.silu(gu[:, :i]) * gu[:, i:], weights[1].transpose(1, 2), offs=offs)
            return out.index_add_(0, token, ys.float() * w)
        if not isinstance(counts, list):
            counts = counts.tolist()
        ys = torch.empty_like(xs)
        start = 0
        experts = self.local_experts() if weights is None else None
        for e, c in enumerate(counts):
            if c:
                if weights is None:
                    ys[start:start + c] = experts[e](xs[start:start + c])
                else:  # gate and up in one matmul
                    gu = F.linear(xs[start:start + c], weights[2][e])
                    ys[start:start + c] = F.linear(F.silu(gu[:, :i]) * gu[:, i:], weights[3][e])
            start += c
        return out.index_add_(0, token, ys.float() * w)

    def _forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum in fp32 (as expert_reduce), cast, plus the shared experts."""
        topk_idx, topk_w = self.gate(x2)
        weights = self._expert_weights()
        t, k = topk_idx.shape
        if weights is not None and t <= DENSE_EXPERTS_MAX_TOKENS and t * k >= self.dispatcher.num_local_experts \
                and x2.dtype == torch.float32:  # (bf16 CPU matmuls are slow: no wasted flops there)
            out = self._routed_dense(x2, topk_idx, topk_w, weights)
        else:
            out = self._routed_sorted(x2, topk_idx, topk_w, weights)
        out = out.to(x2.dtype)
        if self.shared_experts is None:
            return out
        if weights is None:
            return out + self.shared_experts(x2)
        w13, w2 = weights[4]
        gu = F.linear(x2, w13)
        i = w2.size(1)
        return out + F.linear(F.silu(gu[:, :i]) * gu[:, i:], w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if self._fast_path_ok(x2):
            return self._forward_fast(x2).view(shape)
        if torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters())):
            return moe_forward_autograd(self, x2).view(shape)  # training: the differentiable path
        return self._forward_dispatch(x2).view(shape)

    def _forward_dispatch(self, x2: torch.Tensor) -> torch.Tensor:
        """Router -> EPDispatcher dispatch -> local experts -> expert_reduce -> combine (+ shared experts)."""
        topk_idx, topk_w = self.gate(x2)
        recv_x, handle = self.dispatcher.dispatch(x2, topk_idx, topk_w, use_fp8=self.fp8_dispatch)
        y = self._run_experts(recv_x, handle, x2.dtype)
        out = self.dispatcher.combine(y.to(x2.dtype), handle)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x2)
        return out
