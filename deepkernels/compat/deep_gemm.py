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
from .._ops import check_int, check_pair, check_tensor

_TMA_ALIGNMENT_BYTES = 16


def ceil_div(x: int, y: int) -> int:
    x, y = check_int("x", x), check_int("y", y, min_value=1)
    return (x + y - 1) // y


def get_m_alignment_for_contiguous_layout() -> int:
    return _gemm.get_m_alignment_for_contiguous_layout()


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x elements of element_size bytes span a multiple of 16 bytes."""
    x, element_size = check_int("x", x, min_value=0), check_int("element_size", element_size, min_value=1)
    if _TMA_ALIGNMENT_BYTES % element_size != 0:
        raise ValueError(f"element_size: expected a divisor of {_TMA_ALIGNMENT_BYTES} bytes, got {element_size}")
    alignment = _TMA_ALIGNMENT_BYTES // element_size
    return ceil_div(x, alignment) * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """[..., M, K/128] fp32 scales -> the same values in a column-major layout with the M stride padded
    to 16 bytes (stride(-2) == 1, stride(-1) == aligned M), as DeepGEMM's TMA loads want. x: float32 (or int32:
    packed UE8M0 scales), 2 or 3 dims."""
    return _mn_major("x", x)


def _mn_major(name: str, x) -> torch.Tensor:
    check_tensor(name, x, dtypes=(torch.float32, torch.int32))
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected 2 or 3 dims [G?, M, K/128], got shape {list(x.shape)}")
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
    lhs, rhs = check_pair("lhs", lhs), check_pair("rhs", rhs)
    check_tensor("out", out)  # DeepGEMM writes into a given out (no allocation)
    _gemm.fp8_gemm_nt(lhs[0], lhs[1], rhs[0], rhs[1], out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: tuple, rhs: tuple, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """Grouped over rows: rhs = (fp8 [G, N, K], fp32 [G, N/128, K/128]); m_indices int32 [M], -1 = padding row."""
    lhs, rhs = check_pair("lhs", lhs), check_pair("rhs", rhs)
    _gemm.m_grouped_fp8_gemm_nt_contiguous(lhs[0], lhs[1], rhs[0], rhs[1], out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: tuple, rhs: tuple, out: torch.Tensor, masked_m: torch.Tensor,
                                          expected_m: int) -> None:
    """Batched over groups: lhs = (fp8 [G, Mmax, K], fp32 [G, Mmax, K/128]); only masked_m[g] rows are valid."""
    lhs, rhs = check_pair("lhs", lhs), check_pair("rhs", rhs)
    _gemm.m_grouped_fp8_gemm_nt_masked(lhs[0], lhs[1], rhs[0], rhs[1], out, masked_m, expected_m)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs: tuple, rhs: tuple, out: torch.Tensor) -> None:
    """out[M, N] (fp32) += lhs @ rhs^T, both 1x128 per-row scaled along K (the token dim in wgrad):
    lhs = (fp8 [M, K], fp32 [M, K/128]), rhs = (fp8 [N, K], fp32 [N, K/128]). Scales may also be given
    transposed, [K/128, M] (the k-grouped layout), as DeepGEMM accepts; [M, K/128] is tried first."""
    k = lhs[0].size(-1) if isinstance(lhs[0], torch.Tensor) else 0
    _gemm.wgrad_gemm_fp8_fp8_fp32_nt(lhs[0], _scales_as_rows(lhs[1], lhs[0], k), rhs[0],
                                     _scales_as_rows(rhs[1], rhs[0], k), out)


def _scales_as_rows(scales, x, k: int):
    """DeepGEMM's wgrad takes [MN, K/128] scales or their transpose [K/128, MN]; deepkernels wants the first."""
    if not isinstance(scales, torch.Tensor) or not isinstance(x, torch.Tensor) or scales.dim() != 2 or x.dim() != 2:
        return scales  # the op's checks name the problem
    rows, k_blocks = x.size(0), ceil_div(k, 128)
    if tuple(scales.shape) != (rows, k_blocks) and tuple(scales.shape) == (k_blocks, rows):
        return scales.T
    return scales


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs: tuple, rhs: tuple, out: torch.Tensor, batch_sizes) -> None:
    """out[g] (fp32 [G, M, N]) += lhs_g @ rhs_g^T over K segments batch_sizes[g]: lhs = (flat fp8 with
    M * sum(k) elements, fp32 [sum(ceil(k/128)), M]), rhs likewise with N; see deepkernels.gemm."""
    _gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs[0], lhs[1], rhs[0], rhs[1], out, batch_sizes)


def get_mk_alignment_for_contiguous_layout() -> int:
    """DeepGEMM's newer name: the M (m-grouped) / K (k-grouped) segment alignment, 128 here."""
    return _gemm.get_m_alignment_for_contiguous_layout()


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """DeepGEMM returns 128 on SM90 (its tile alignment); so do we, on every device."""
    return _gemm.get_m_alignment_for_contiguous_layout()


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's newer name of get_col_major_tma_aligned_tensor (the argument is ``sf``)."""
    return _mn_major("sf", sf)


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe: tuple, num_groups: int | None = None,
                                      is_sfa: bool | None = None, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """DeepGEMM's scale-factor layout step, as on SM90 (fp32 scales; UE8M0 packing is SM100-only):
    recipe (gran_m, gran_n, gran_k) with is_sfa choosing gran_m/gran_n, or (gran_mn, gran_k).
    (1, 128) per-token scales [G?, mn, ceil(k/128)] -> MN-major TMA-aligned (get_mn_major_tma_aligned_tensor);
    (128, 128) block scales [G?, ceil(mn/128), ceil(k/128)] -> returned as they are (checked).
    Anything else raises ValueError (naming the recipe)."""
    if not isinstance(sf, torch.Tensor):
        raise TypeError(f"sf: expected a torch.Tensor, got {type(sf).__name__}")
    if not isinstance(recipe, (tuple, list)) or len(recipe) not in (2, 3):
        raise ValueError(f"recipe: expected (gran_m, gran_n, gran_k) or (gran_mn, gran_k), got {recipe!r}")
    if len(recipe) == 3:
        if is_sfa is None:
            raise ValueError("is_sfa: expected True/False with a 3-element recipe, got None")
        gran_mn, gran_k = (recipe[0] if is_sfa else recipe[1]), recipe[2]
    else:
        if is_sfa is not None:
            raise ValueError(f"is_sfa: expected None with a 2-element recipe, got {is_sfa!r}")
        gran_mn, gran_k = recipe
    if sf.dtype != torch.float32:
        raise ValueError(f"sf: expected dtype float32 (UE8M0-packed int scales are SM100-only), got {sf.dtype}")
    if (gran_mn, gran_k) not in ((1, 128), (128, 128)):
        raise ValueError(f"recipe: expected granularity (1, 128) or (128, 128), got ({gran_mn}, {gran_k})")
    want = (*(() if num_groups is None else (num_groups,)), ceil_div(mn, gran_mn), ceil_div(k, gran_k))
    if tuple(sf.shape) != want:
        raise ValueError(f"sf: expected shape {list(want)} for mn={mn}, k={k}, recipe {tuple(recipe)}, "
                         f"got {list(sf.shape)}")
    if gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    return sf


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None,
                 compiled_dims: str = "nk") -> None:
    """d[M, N] = a @ b^T (+ c), a bf16 [M, K], b bf16 [N, K], d bf16 or fp32 (c: fp32 [M, N], DeepGEMM's
    accumulator input); fp32 accumulation through torch.matmul (no deepkernels kernel: cuBLAS is the peer)."""
    from .._ops import check_out_buffer, check_same_device, check_tensor

    check_tensor("a", a, dtypes=(torch.bfloat16,), ndim=2)
    m, k = a.shape
    check_tensor("b", b, dtypes=(torch.bfloat16,), ndim=2)
    if b.size(1) != k:
        raise ValueError(f"b: expected K = {k} (a's last dim), got shape {list(b.shape)}")
    n = b.size(0)
    check_tensor("d", d, dtypes=(torch.bfloat16, torch.float32), shape=(m, n))
    if c is not None:
        check_tensor("c", c, dtypes=(torch.float32,), shape=(m, n))
    check_same_device(a=a, b=b, d=d, c=c)
    check_out_buffer("d", d)  # (the product is formed before d is written: d may alias a, b or c)
    result = torch.matmul(a.float(), b.float().T)
    if c is not None:
        result += c
    d.copy_(result)


# DeepGEMM v2 names.
fp8_gemm_nt = gemm_fp8_fp8_bf16_nt
m_grouped_fp8_gemm_nt_contiguous = m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
m_grouped_fp8_gemm_nt_masked = m_grouped_gemm_fp8_fp8_bf16_nt_masked

__all__ = ["ceil_div", "get_m_alignment_for_contiguous_layout", "get_tma_aligned_size",
           "get_col_major_tma_aligned_tensor", "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
           "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
           "m_grouped_fp8_gemm_nt_masked", "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
           "get_mk_alignment_for_contiguous_layout", "get_theoretical_mk_alignment_for_contiguous_layout",
           "get_mn_major_tma_aligned_tensor", "transform_sf_into_required_layout", "bf16_gemm_nt"]
