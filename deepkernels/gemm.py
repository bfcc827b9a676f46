"""FP8 blockwise-scaled GEMMs in DeepSeek-V3's layouts (anchor: DeepGEMM): dense, grouped-contiguous and
grouped-masked, all "NT" (both operands K-major: out = a @ b^T).

Operands and scales (fp32, ``x ~= fp8 * scale``):
  * ``a`` e4m3 [M, K], ``a_scale`` [M, ceil(K/128)]: one scale per 1x128 group of a row (per token).
    Two layouts are accepted for ``a_scale``: row-major contiguous (what :func:`per_token_cast_to_fp8`
    returns) and DeepGEMM's column-major "TMA-aligned" layout, i.e. a view with ``stride(-2) == 1``
    (see :func:`deepkernels.compat.deep_gemm.get_col_major_tma_aligned_tensor`).
  * ``b`` e4m3 [N, K] (grouped: [G, N, K]), ``b_scale`` [ceil(N/128), ceil(K/128)] (grouped: with a
    leading G): one scale per 128x128 block, the ``weight_scale_inv`` of a DeepSeek-V3 checkpoint.
  * ``out`` bf16, fp32 accumulation; the scales are applied per 128-wide K block (a_scale * b_scale),
    which is mathematically ``(a * a_scale) @ (b * b_scale)^T`` -- what the references compute.
Any M >= 0; N and K must be multiples of 16 (partial 128-tiles are handled; no N%64 / K%128 demand).

CUDA (csrc/fp8_gemm): a portable sm_80+ kernel serves all three ops on every GPU for now: 64x64x64 tiles,
cp.async double buffering, e4m3 widened to fp16 in registers (exact) for mma.sync m16n8k16 with fp32
accumulation, partial sums promoted with a_scale * b_scale every 128 of K. The Hopper wgmma/TMA path is
not written yet. CPU tensors (and CUDA without the extension) run the references below.
"""
from __future__ import annotations

import torch

from ._ops import ceil_div, check_multiple, check_same_device, check_tensor, define_op

FP8_DTYPE = torch.float8_e4m3fn
GROUP = 128
# Group segments of the contiguous layout must start at multiples of this many rows (the kernels'
# BLOCK_M: a row tile never straddles two groups).
M_ALIGNMENT_CONTIGUOUS = 128


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows per group segment in :func:`m_grouped_fp8_gemm_nt_contiguous` must be a multiple of this
    (pad with rows whose ``m_indices`` is -1)."""
    return M_ALIGNMENT_CONTIGUOUS


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels): dequantise per 1x128 / 128x128 group, multiply in fp32

def _dequant_a(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] e4m3, a_scale [..., M, ceil(K/128)] (any strides) -> fp32 [..., M, K]."""
    k = a.size(-1)
    return a.float() * a_scale.float().repeat_interleave(GROUP, dim=-1)[..., :k]


def _dequant_b(b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """b [..., N, K] e4m3, b_scale [..., ceil(N/128), ceil(K/128)] -> fp32 [..., N, K]."""
    n, k = b.shape[-2:]
    s = b_scale.float().repeat_interleave(GROUP, dim=-2)[..., :n, :].repeat_interleave(GROUP, dim=-1)[..., :k]
    return b.float() * s


def fp8_gemm_nt_ref(a, a_scale, b, b_scale, out) -> None:
    out.copy_(_dequant_a(a, a_scale) @ _dequant_b(b, b_scale).t())


def m_grouped_fp8_gemm_nt_contiguous_ref(a, a_scale, b, b_scale, out, m_indices) -> None:
    a_deq = _dequant_a(a, a_scale)
    result = torch.zeros(out.shape, dtype=torch.float32, device=out.device)  # -1 rows stay zero
    for g in range(b.size(0)):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            result[rows] = a_deq[rows] @ _dequant_b(b[g], b_scale[g]).t()
    out.copy_(result)


def m_grouped_fp8_gemm_nt_masked_ref(a, a_scale, b, b_scale, out, masked_m, expected_m: int) -> None:
    # No host synchronisation: every row is computed, rows >= masked_m[g] keep their old value.
    full = _dequant_a(a, a_scale) @ _dequant_b(b, b_scale).transpose(-1, -2)
    rows = torch.arange(out.size(1), device=out.device)
    valid = (rows[None, :] < masked_m.to(out.device)[:, None])[..., None]
    out.copy_(torch.where(valid, full.to(out.dtype), out))


def _no_output_fake(*args) -> None:
    return None


_ARGS = "Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out"
define_op("fp8_gemm_nt", f"({_ARGS}) -> ()", fp8_gemm_nt_ref, _no_output_fake)
define_op("m_grouped_fp8_gemm_nt_contiguous", f"({_ARGS}, Tensor m_indices) -> ()",
          m_grouped_fp8_gemm_nt_contiguous_ref, _no_output_fake)
define_op("m_grouped_fp8_gemm_nt_masked", f"({_ARGS}, Tensor masked_m, int expected_m) -> ()",
          m_grouped_fp8_gemm_nt_masked_ref, _no_output_fake)


# ----------------------------------------------------------------------------------------------
# host-side checks

def _check_a_scale(a_scale, shape, device) -> None:
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=shape, device=device)
    rows = shape[-2]
    if not (a_scale.is_contiguous() or a_scale.stride(-2) == 1 or rows <= 1):
        raise ValueError("a_scale: expected row-major contiguous or column-major (stride(-2) == 1, as "
                         f"get_col_major_tma_aligned_tensor returns) layout, got strides {a_scale.stride()} "
                         f"for shape {tuple(a_scale.shape)}")


def _check_operands(a, a_scale, b, b_scale, out, *, grouped_b: bool, batched_a: bool) -> None:
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=3 if batched_a else 2)
    check_tensor("b", b, dtypes=(FP8_DTYPE,), ndim=3 if grouped_b else 2)
    m, k = a.shape[-2:]
    n = b.size(-2)
    check_multiple("K (a.shape[-1])", k, 16)
    check_multiple("N (b.shape[-2])", n, 16)
    if b.size(-1) != k:
        raise ValueError(f"b: expected K = {k} (a.shape[-1]) in its last dim, got shape {list(b.shape)}")
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out)
    check_tensor("a", a, contiguous=True)
    check_tensor("b", b, contiguous=True)
    lead_a = [a.size(0)] if batched_a else []
    _check_a_scale(a_scale, [*lead_a, m, ceil_div(k, GROUP)], a.device)
    lead_b = [b.size(0)] if grouped_b else []
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,),
                 shape=[*lead_b, ceil_div(n, GROUP), ceil_div(k, GROUP)], contiguous=True)
    if out is not None:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=[*lead_a, m, n], contiguous=True)


# ----------------------------------------------------------------------------------------------
# public API

def fp8_gemm_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = (a * a_scale) @ (b * b_scale)^T in bf16 with fp32 accumulation.

    Args:
        a: e4m3 [M, K] contiguous, K a multiple of 16; a_scale: fp32 [M, ceil(K/128)] row-major or
           column-major (stride(0) == 1).
        b: e4m3 [N, K] contiguous, N a multiple of 16; b_scale: fp32 [ceil(N/128), ceil(K/128)] contiguous.
        out: optional bf16 [M, N] contiguous, written in place.
    Returns: ``out`` (allocated when None).
    Raises: TypeError / ValueError naming the argument for wrong dtype, shape, scale shape or layout,
        N/K not multiples of 16, non-contiguous operands, tensors on different devices.
    """
    _check_operands(a, a_scale, b, b_scale, out, grouped_b=False, batched_a=False)
    if out is None:
        out = torch.empty(a.size(0), b.size(0), dtype=torch.bfloat16, device=a.device)
    torch.ops.deepkernels.fp8_gemm_nt(a, a_scale, b, b_scale, out)
    return out


def m_grouped_fp8_gemm_nt_contiguous(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                                     b_scale: torch.Tensor, out: torch.Tensor,
                                     m_indices: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over rows of ``a`` laid out contiguously by group (MoE experts):
    ``out[i] = a[i] @ b[m_indices[i]]^T`` (scales as in :func:`fp8_gemm_nt`), ``out[i] = 0`` where
    ``m_indices[i] == -1`` (padding rows).

    Args: a e4m3 [M, K], a_scale fp32 [M, ceil(K/128)], b e4m3 [G, N, K], b_scale fp32
        [G, ceil(N/128), ceil(K/128)], out bf16 [M, N], m_indices int32 [M] with values in [-1, G).
    Each group's segment must start at a multiple of :func:`get_m_alignment_for_contiguous_layout`
    rows (the CUDA kernels take a row tile's group from its first row); this and the value range of
    ``m_indices`` are NOT checked on the host (that would synchronise).
    """
    _check_operands(a, a_scale, b, b_scale, out, grouped_b=True, batched_a=False)
    check_tensor("m_indices", m_indices, dtypes=(torch.int32,), shape=[a.size(0)], device=a.device,
                 contiguous=True)
    torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, out, m_indices)
    return out


def m_grouped_fp8_gemm_nt_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                                 b_scale: torch.Tensor, out: torch.Tensor, masked_m: torch.Tensor,
                                 expected_m: int) -> torch.Tensor:
    """Batched GEMM ``out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T``; rows ``>= masked_m[g]`` of
    ``out`` are left UNTOUCHED (not zeroed). ``masked_m`` is read on the device: no host synchronisation,
    so the call can be captured in a CUDA graph. ``expected_m`` is a performance hint (typical rows per
    group), it never changes the result.

    Args: a e4m3 [G, Mmax, K], a_scale fp32 [G, Mmax, ceil(K/128)] (row-major or column-major per group,
        stride(-2) == 1), b e4m3 [G, N, K], b_scale fp32 [G, ceil(N/128), ceil(K/128)], out bf16
        [G, Mmax, N], masked_m int32 [G] (values in [0, Mmax], not checked), expected_m int >= 0.
    """
    _check_operands(a, a_scale, b, b_scale, out, grouped_b=True, batched_a=True)
    if a.size(0) != b.size(0):
        raise ValueError(f"a/b: expected the same number of groups, got a {list(a.shape)} and b {list(b.shape)}")
    check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=[a.size(0)], device=a.device,
                 contiguous=True)
    if not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected an int >= 0, got {expected_m!r}")
    torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, out, masked_m, expected_m)
    return out


__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "get_m_alignment_for_contiguous_layout"]
