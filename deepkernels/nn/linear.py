"""Fp8Linear: a drop-in nn.Linear whose weight is e4m3 with 128x128 block scales, run by fp8_gemm_nt."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8 as _fp8
from .._ops import ceil_div
from ..gemm import fp8_gemm_nt


class Fp8Linear(nn.Module):
    """y = x @ dequant(weight)^T (+ bias), with activations quantised per 1x128 token group on the fly.

    Parameters (named as in DeepSeek-V3 FP8 checkpoints, so state dicts load unchanged):
        weight            float8_e4m3fn [out_features, in_features]
        weight_scale_inv  float32 [ceil(out/128), ceil(in/128)]  (dequantised w = weight * scale)
        bias              [out_features] in ``dtype`` or None
    Input: [..., in_features] float32/bfloat16/float16 -> output [..., out_features] in the input dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
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
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        weight, scale = _fp8.per_block_cast_to_fp8(linear.weight.detach())
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_fp8(weight, scale, bias, dtype=linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _fp8.per_block_cast_from_fp8(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"
