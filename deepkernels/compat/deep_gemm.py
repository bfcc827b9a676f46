"""DeepGEMM-compatible entry points (``import deepkernels.compat.deep_gemm as deep_gemm``).

Same names and argument conventions as DeepGEMM's Python API: operands are passed as ``(tensor,
scales)`` tuples, outputs are preallocated bf16 tensors written in place, ``lhs_scales`` may be the
column-major TMA-aligned layout from :func:`get_col_major_tma_aligned_tensor` (or plain row-major).
Unlike DeepGEMM, N and K only need to be multiples of 16 and the calls also run on the CPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import gemm as _gemm


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def get_m_alignment_for_contiguous_layout() -> int:
    return _gemm.get_m_alignment_for_contiguous_layout()


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """Rows padded so that a column of ``element_size``-byte values is a multiple of 16 bytes."""
    alignment = 16 // element_size
    return ceil_div(x, alignment) * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """[M, S] or [G, M, S] -> same values as a column-major view (stride(-2) == 1) whose column stride
    is M rounded up to 16 bytes. Returns ``x`` itself when it already has that layout."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected 2 or 3 dims, got shape {list(x.shape)}")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    g, m, s = x3.shape
    aligned_m = get_tma_aligned_size(m, x.element_size())
    if x3.stride(1) == 1 and x3.stride(2) == aligned_m and (g == 1 or x3.stride(0) == aligned_m * s):
        return x
    storage = torch.empty(g, s, aligned_m, dtype=x.dtype, device=x.device)
    view = storage.transpose(1, 2)[:, :m, :]
    view.copy_(x3)
    return view.squeeze(0) if squeeze else view


def gemm_fp8_fp8_bf16_nt(lhs: Tuple[torch.Tensor, torch.Tensor], rhs: Tuple[torch.Tensor, torch.Tensor],
                         out: torch.Tensor) -> None:
    """out[M, N] (bf16) = lhs[M, K] @ rhs[N, K]^T with 1x128 lhs and 128x128 rhs scales."""
    _gemm.fp8_gemm_nt(lhs[0], lhs[1], rhs[0], rhs[1], out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: Tuple[torch.Tensor, torch.Tensor],
                                              rhs: Tuple[torch.Tensor, torch.Tensor],
                                              out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """lhs [M_sum, K], rhs [G, N, K], out [M_sum, N], m_indices int32 [M_sum] (-1: padding row, zero out)."""
    _gemm.m_grouped_fp8_gemm_nt_contiguous(lhs[0], lhs[1], rhs[0], rhs[1], out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: Tuple[torch.Tensor, torch.Tensor],
                                          rhs: Tuple[torch.Tensor, torch.Tensor],
                                          out: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
    """lhs [G, Mmax, K], rhs [G, N, K], out [G, Mmax, N]; only rows < masked_m[g] are written."""
    _gemm.m_grouped_fp8_gemm_nt_masked(lhs[0], lhs[1], rhs[0], rhs[1], out, masked_m, expected_m)


__all__ = ["ceil_div", "get_m_alignment_for_contiguous_layout", "get_tma_aligned_size",
           "get_col_major_tma_aligned_tensor", "gemm_fp8_fp8_bf16_nt",
           "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_masked"]
