"""The SwiGLU MLP of DeepSeek-V3 (dense layers, routed and shared experts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Fp8Linear


def make_linear(in_features: int, out_features: int, fp8: bool, device=None, dtype=None) -> nn.Module:
    """nn.Linear without bias, or its Fp8Linear twin (weight + weight_scale_inv) when fp8."""
    if fp8:
        return Fp8Linear(in_features, out_features, bias=False, device=device, dtype=dtype or torch.bfloat16)
    return nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); parameter names match the HF checkpoints."""

    def __init__(self, hidden_size: int, intermediate_size: int, fp8: bool = False, device=None, dtype=None):
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, fp8, device, dtype)
        self.up_proj = make_linear(hidden_size, intermediate_size, fp8, device, dtype)
        self.down_proj = make_linear(intermediate_size, hidden_size, fp8, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
