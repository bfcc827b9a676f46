"""DeepGEMM's Python entry points on deepkernels, so code written for DeepGEMM runs unchanged:
``import deepkernels.compat.deep_gemm as deep_gemm``.

Both generations of DeepGEMM's names are provided: the original
``gemm_fp8_fp8_bf16_nt((lhs, lhs_scales), (rhs, rhs_scales), out)`` family and the later
``fp8_gemm_nt((a, sfa), (b, sfb), d)`` family. Operands are (fp8 tensor, fp32 scales) pairs with the
layouts of deepkernels.gemm; the lhs scales may be row-major or the column-major TMA-aligned layout
that :func:`get_col_major_tma_aligned_tensor` produces (DeepGEMM requires the latter; we accept both).
Differences from DeepGEMM: also runs on the CPU (references), N and K need only be multiples of 16,
and there is no JIT: no ``DG_*`` environment variables.
"""
from __future__ import annotations

import torch

from .. import gemm as _gemm

_TMA_ALIGNMENT_BYTES = 16


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def get_m_alignment_for_contiguous_layout() -> int:
    return _gemm.get_m_alignment_for_contiguous_layout()


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x elements of element_size bytes span a multiple of 16 bytes."""
    alignment = _TMA_ALIGNMENT_BYTES // element_size
    return ceil_div(x, alignment) * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """[..., M, K/128] fp32 scales -> the same values in a column-major layout with the M stride padded
    to 16 bytes (stride(-2) == 1, stride(-1) == aligned M), as DeepGEMM's TMA loads want."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected 2 or 3 dims [G?, M, K/128], got shape {list(x.shape)}")
    m, k_groups = x.shape[-2:]
    aligned_m = get_tma_aligned_size(m, x.element_size())
    if x.stride(-2) == 1 and (k_groups == 1 or x.stride(-1) == aligned_m) and (x.dim() == 2 or x.stride(0) == aligned_m * k_groups):
        return x
    buffer = torch.empty((*x.shape[:-2], k_groups, aligned_m), dtype=x.dtype, device=x.device).transpose(-1, -2)
    out = buffer[..., :m, :]
    out.copy_(x)
    return out


def gemm_fp8_fp8_bf16_nt(lhs: tuple, rhs: tuple, out: torch.Tensor) -> None:
    """out[M, N] = lhs @ rhs^T with lhs = (fp8 [M, K], fp32 [M, K/128]), rhs = (fp8 [N, K], fp32 [N/128, K/128])."""
    _gemm.fp8_gemm_nt(lhs[0], lhs[1], rhs[0], rhs[1], out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: tuple, rhs: tuple, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """Grouped over rows: rhs = (fp8 [G, N, K], fp32 [G, N/128, K/128]); m_indices int32 [M], -1 = padding row."""
    _gemm.m_grouped_fp8_gemm_nt_contiguous(lhs[0], lhs[1], rhs[0], rhs[1], out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: tuple, rhs: tuple, out: torch.Tensor, masked_m: torch.Tensor,
                                          expected_m: int) -> None:
    """Batched over groups: lhs = (fp8 [G, Mmax, K], fp32 [G, Mmax, K/128]); only masked_m[g] rows are valid."""
    _gemm.m_grouped_fp8_gemm_nt_masked(lhs[0], lhs[1], rhs[0], rhs[1], out, masked_m, expected_m)


# DeepGEMM v2 names.
fp8_gemm_nt = gemm_fp8_fp8_bf16_nt
m_grouped_fp8_gemm_nt_contiguous = m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
m_grouped_fp8_gemm_nt_masked = m_grouped_gemm_fp8_fp8_bf16_nt_masked

__all__ = ["ceil_div", "get_m_alignment_for_contiguous_layout", "get_tma_aligned_size",
           "get_col_major_tma_aligned_tensor", "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
           "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
           "m_grouped_fp8_gemm_nt_masked"]
