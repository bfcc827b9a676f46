"""Fp8Linear: a drop-in nn.Linear whose weight is e4m3 with 128x128 block scales, run by fp8_gemm_nt;
and FP8 training through it (DeepSeek-V3's recipe, ``master_weight=True`` / :func:`fp8_linear`)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8 as _fp8
from .._ops import ceil_div
from ..gemm import fp8_gemm_nt, wgrad_gemm_fp8_fp8_fp32_nt


class Fp8Linear(nn.Module):
    """y = x @ dequant(weight)^T (+ bias), with activations quantised per 1x128 token group on the fly.

    Parameters (named as in DeepSeek-V3 FP8 checkpoints, so state dicts load unchanged):
        weight            float8_e4m3fn [out_features, in_features]
        weight_scale_inv  float32 [ceil(out/128), ceil(in/128)]  (dequantised w = weight * scale)
        bias              [out_features] in ``dtype`` or None
    Input: [..., in_features] float32/bfloat16/float16 -> output [..., out_features] in the input dtype.

    Training (``master_weight=True``, or ``from_linear(linear, master_weight=True)``): ``weight`` is an fp32
    master parameter [out, in] (trainable, ``bias`` too, fp32); every forward quantises it to 128x128 blocks
    and runs :func:`fp8_linear` (FP8 forward, dgrad and wgrad GEMMs; see there). The state dict is then
    nn.Linear's ({"weight", "bias"?}); ``weight_scale_inv`` is None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16, master_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.master_weight = master_weight
        if master_weight:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32, device=device))
            self.register_parameter("weight_scale_inv", None)
            self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device)) if bias else None
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
            if self.bias is not None:
                bound = 1 / math.sqrt(in_features) if in_features else 0.0
                nn.init.uniform_(self.bias, -bound, bound)
            return
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=_fp8.FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(ceil_div(out_features, 128), ceil_div(in_features, 128), dtype=torch.float32, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        module.weight.data.copy_(weight)
        module.weight_scale_inv.data.copy_(weight_scale_inv)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, master_weight: bool = False) -> "Fp8Linear":
        """An FP8 copy of ``linear``: e4m3 weight + block scales, or (``master_weight``) a trainable fp32
        master copy of its weight and bias run through the FP8 training GEMMs."""
        if master_weight:
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, master_weight=True)
            with torch.no_grad():
                module.weight.copy_(linear.weight)
                if linear.bias is not None:
                    module.bias.copy_(linear.bias)
            return module
        weight, scale = _fp8.per_block_cast_to_fp8(linear.weight.detach())
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_fp8(weight, scale, bias, dtype=linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.master_weight:  # what the forward GEMM sees: the master weight's 128x128 block quantisation
            w_fp8, w_scale = _fp8.per_block_cast_to_fp8(self.weight.detach())
            return _fp8.per_block_cast_from_fp8(w_fp8, w_scale, dtype)
        return _fp8.per_block_cast_from_fp8(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.master_weight:
            return fp8_linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x_fp8, x_scale = _fp8.per_token_cast_to_fp8(x.reshape(-1, self.in_features))
        if self.in_features % 16 == 0 and self.out_features % 16 == 0:
            y = fp8_gemm_nt(x_fp8, x_scale, self.weight, self.weight_scale_inv).to(x.dtype)
        else:  # shapes the GEMM kernels do not take: same quantisation, product of the dequantised operands
            x_deq = _fp8.per_token_cast_from_fp8(x_fp8, x_scale, torch.float32)
            y = F.linear(x_deq, self.dequantized_weight(torch.float32)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8{', fp32 master weight' if self.master_weight else ''}")


# ----------------------------------------------------------------------------------------------
# FP8 training (DeepSeek-V3, section 3.3): all three GEMMs of a linear layer in FP8 e4m3 with fine-grained
# scales and fp32 accumulation/promotion every 128 of K:
#   forward  y  = x @ W^T        x 1x128 per token (along in), W 128x128 blocks        (fp8_gemm_nt)
#   dgrad    dx = dy @ W         dy 1x128 per token (along out), W^T = the same blocks  (fp8_gemm_nt)
#                                transposed (a 128x128 block quantisation transposes exactly)
#   wgrad    dW = dy^T @ x       dy^T and x^T 1x128 along the token dim (K = tokens)    (wgrad_gemm_fp8_fp8_fp32_nt)
# The master weight stays fp32 and receives an fp32 gradient (the wgrad GEMM accumulates in fp32); the
# forward output and dx come out of the FP8 GEMM in bf16 (cast to x's dtype).

_TOKEN_MULTIPLE = 16  # the wgrad GEMM's K (tokens) must be a multiple of 16: zero tokens pad it


def _fp8_matmul_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T in bf16 (1x128 a, 128x128 b); shapes the kernels refuse (N or K not a
    multiple of 16) take the product of the dequantised operands (same quantisation, fp32 accumulation)."""
    n, k = b.shape
    if n % 16 == 0 and k % 16 == 0:
        return fp8_gemm_nt(a, a_scale, b, b_scale)
    a_deq = _fp8.per_token_cast_from_fp8(a, a_scale, torch.float32)
    return F.linear(a_deq, _fp8.per_block_cast_from_fp8(b, b_scale, torch.float32)).to(torch.bfloat16)


def _cast_tokens_last(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, C] -> t^T [C, T'] in e4m3 with 1x128 scales along the tokens (T' = T padded with zero tokens to a
    multiple of 16: they add nothing to the product)."""
    tokens = t.size(0)
    padded = -(-tokens // _TOKEN_MULTIPLE) * _TOKEN_MULTIPLE
    t_t = t.t()
    if padded != tokens:
        t_t = F.pad(t_t, (0, padded - tokens))
    return _fp8.per_token_cast_to_fp8(t_t.contiguous())


def _wgrad(grad_y: torch.Tensor, x: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    grad_w = torch.zeros(out_features, in_features, dtype=torch.float32, device=x.device)
    if x.size(0) == 0:
        return grad_w
    gt_fp8, gt_scale = _cast_tokens_last(grad_y)
    xt_fp8, xt_scale = _cast_tokens_last(x)
    return wgrad_gemm_fp8_fp8_fp32_nt(gt_fp8, gt_scale, xt_fp8, xt_scale, grad_w)


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w_fp8, w_scale = _fp8.per_block_cast_to_fp8(weight.detach())
        x_fp8, x_scale = _fp8.per_token_cast_to_fp8(x2d)
        y = _fp8_matmul_nt(x_fp8, x_scale, w_fp8, w_scale).to(x2d.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        # x is kept in its own dtype and re-quantised along the tokens for wgrad (DeepSeek-V3's 128x1 tiles).
        ctx.save_for_backward(x2d, w_fp8, w_scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2d, w_fp8, w_scale = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_fp8, g_scale = _fp8.per_token_cast_to_fp8(grad_y)
            grad_x = _fp8_matmul_nt(g_fp8, g_scale, w_fp8.t().contiguous(), w_scale.t().contiguous()).to(x2d.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _wgrad(grad_y, x2d, w_fp8.size(0), w_fp8.size(1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.float().sum(0)
        return grad_x, grad_w, grad_b


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the forward, dgrad and wgrad GEMMs in FP8 (see the comment above).

    x        [..., in] float32/bfloat16/float16 (any leading dims); y and dx in x's dtype (via bf16)
    weight   [out, in] floating point (the fp32 master weight); its gradient is fp32, from the wgrad GEMM
    bias     [out] or None; gradient = the fp32 sum of dy over tokens
    Differentiable (torch.autograd.Function over the deepkernels ops, so torch.compile traces it).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight: expected tensors, got {type(x).__name__} and {type(weight).__name__}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point or weight.dtype in (_fp8.FP8_DTYPE,):
        raise ValueError(f"weight: expected a 2-D floating-point master weight [out, in], got {weight.dtype} "
                         f"{list(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.size(-1) != in_features:
        raise ValueError(f"x: expected last dim {in_features} (weight's in_features), got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.size(0) != out_features):
        raise ValueError(f"bias: expected shape [{out_features}], got {list(bias.shape)}")
    y = _Fp8LinearFunction.apply(x.reshape(-1, in_features), weight, bias)
    return y.view(*x.shape[:-1], out_features)


def convert_linears_for_fp8_training_(module: nn.Module,
                                      keep: Callable[[str, nn.Linear], bool] | None = None) -> nn.Module:
    """Replace (in place) every nn.Linear of ``module`` by ``Fp8Linear.from_linear(linear, master_weight=True)``
    except those for which ``keep(name, linear)`` is true (e.g. the LM head or a router); returns module."""
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(sub) is nn.Linear and not (keep is not None and keep(full, sub)):
                setattr(child, attr, Fp8Linear.from_linear(sub, master_weight=True))
    return module
