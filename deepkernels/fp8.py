"""FP8 (e4m3) quantisation in DeepSeek-V3's two layouts, and the inverses.

Layouts (as DeepGEMM and the DeepSeek-V3 checkpoints use them):
  * per-token: x[M, K] -> e4m3 [M, K] and fp32 scale [M, ceil(K/128)], one scale per 1x128 group
    of a row (activations, the GEMM's ``a``);
  * per-block: w[N, K] -> e4m3 [N, K] and fp32 scale [ceil(N/128), ceil(K/128)], one scale per
    128x128 block (weights, the GEMM's ``b``; checkpoints store it as ``weight_scale_inv``).
In both, scale = max(amax, 1e-4) / 448 and the stored value is round_to_nearest_even(x / scale)
(computed as x * (448 / amax) in fp32), so x ~= fp8 * scale. A partial last group/block (K or N not
a multiple of 128) is quantised as if padded with zeros.

Non-finite input (as DeepGEMM's casts, stated exactly; reference and CUDA kernels agree bit for bit, except
the sign bit of a NaN byte, which is not part of the contract):
  * a group (1x128 row group, or 128x128 block) that contains a NaN gets scale NaN and ALL its values NaN
    (e4m3 0x7F / 0xFF), whatever else it holds (also an inf);
  * a group that contains +-inf (and no NaN) gets scale +inf; the inf elements become NaN (inf * 448/inf)
    and every finite element becomes +-0 (x * 448/inf); dequantising gives NaN for all of them (NaN * inf
    and 0 * inf): the whole group dequantises to NaN;
  * every other group is unaffected (its own amax, its own scale).
So a non-finite input is never hidden: its group's scale is NaN or inf and dequantises to NaN.
"""
from __future__ import annotations

import math

import torch

from ._ops import ceil_div, check_dtype_arg, check_tensor, define_op

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_CLAMP = 1e-4
GROUP = 128
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUTPUT_DTYPES = _INPUT_DTYPES


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels)

def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x.shape == (rows, cols):
        return x
    padded = x.new_zeros(rows, cols)
    padded[: x.size(0), : x.size(1)] = x
    return padded


def _check_cast_input(name: str, x, ndim: int | None) -> None:
    check_tensor(name, x, dtypes=_INPUT_DTYPES, ndim=ndim)


def per_token_cast_to_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cast_input("x", x, 2)
    m, k = x.shape
    groups = ceil_div(k, GROUP)
    x_view = _pad_to(x, m, groups * GROUP).view(m, groups, GROUP).float()
    amax = x_view.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_CLAMP)
    q = (x_view * (FP8_MAX / amax)).to(FP8_DTYPE).view(m, groups * GROUP)[:, :k].contiguous()
    return q, (amax / FP8_MAX).view(m, groups)


def per_block_cast_to_fp8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cast_input("w", w, 2)
    n, k = w.shape
    bn, bk = ceil_div(n, GROUP), ceil_div(k, GROUP)
    w_view = _pad_to(w, bn * GROUP, bk * GROUP).view(bn, GROUP, bk, GROUP).float()
    amax = w_view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_CLAMP)
    q = (w_view * (FP8_MAX / amax)).to(FP8_DTYPE).view(bn * GROUP, bk * GROUP)[:n, :k].contiguous()
    return q, (amax / FP8_MAX).view(bn, bk)


def _expand_scale(scale: torch.Tensor, rows_per_scale: int, rows: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(rows_per_scale, dim=0)[:rows].repeat_interleave(GROUP, dim=1)[:, :k]


def per_token_cast_from_fp8_ref(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_dequant_args(x, scale, out_dtype, 1)
    return (x.float() * _expand_scale(scale, 1, x.size(0), x.size(1))).to(out_dtype)


def per_block_cast_from_fp8_ref(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_dequant_args(x, scale, out_dtype, GROUP)
    return (x.float() * _expand_scale(scale, GROUP, x.size(0), x.size(1))).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes only)

def _cast_fake(rows_per_scale: int):
    def fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = x.shape
        return (x.new_empty((rows, k), dtype=FP8_DTYPE),
                x.new_empty((ceil_div(rows, rows_per_scale), ceil_div(k, GROUP)), dtype=torch.float32))
    return fake


def _dequant_fake(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype)


define_op("per_token_cast_to_fp8", "(Tensor x) -> (Tensor, Tensor)", per_token_cast_to_fp8_ref, _cast_fake(1))
define_op("per_block_cast_to_fp8", "(Tensor w) -> (Tensor, Tensor)", per_block_cast_to_fp8_ref, _cast_fake(GROUP))
define_op("per_token_cast_from_fp8", "(Tensor x, Tensor scale, ScalarType out_dtype) -> Tensor",
          per_token_cast_from_fp8_ref, _dequant_fake)
define_op("per_block_cast_from_fp8", "(Tensor x, Tensor scale, ScalarType out_dtype) -> Tensor",
          per_block_cast_from_fp8_ref, _dequant_fake)


# ----------------------------------------------------------------------------------------------
# public API

def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations per 1x128 group of each row.

    Args:
        x: [..., K] float32, bfloat16 or float16, any K >= 0; a 2-D [M, K] is the usual case, more
           leading dims are flattened to M (e.g. the masked MoE layout [G, Mmax, K]) and restored on
           the outputs. A last dim with non-unit stride is copied to be contiguous.
    Returns:
        (x_fp8 [..., K] float8_e4m3fn contiguous, scale [..., ceil(K/128)] float32 contiguous, row-major);
        scale = max(amax, 1e-4) / 448 per group, x_fp8 = rne(x * 448 / amax).
    Non-finite input: a 128-group holding a NaN -> scale NaN, all 128 values NaN; a group holding +-inf
    (no NaN) -> scale +inf, NaN where the inf was, 0 elsewhere; other groups unaffected (module docstring).
    Raises:
        TypeError naming ``x`` for a non-tensor; ValueError for another dtype or a 0-dim tensor.
    """
    _check_cast_input("x", x, None)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim [..., K], got a 0-dim tensor")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)  # (-1 is ambiguous for K = 0)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    q, scale = torch.ops.deepkernels.per_token_cast_to_fp8(x2)
    return q.view(*lead, k), scale.view(*lead, scale.size(-1))


def per_block_cast_to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight per 128x128 block.

    Args:
        w: [N, K] float32, bfloat16 or float16, any N, K >= 0 (a last dim with non-unit stride is copied).
    Returns:
        (w_fp8 [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] float32) -- the
        ``weight`` / ``weight_scale_inv`` pair of a DeepSeek-V3 FP8 checkpoint.
    Non-finite input: a 128x128 block holding a NaN -> scale NaN, all its values NaN; a block holding +-inf
    (no NaN) -> scale +inf, NaN where the inf was, 0 elsewhere; other blocks unaffected.
    Raises:
        TypeError naming ``w`` for a non-tensor; ValueError for another dtype or not 2 dims.
    """
    _check_cast_input("w", w, 2)
    if w.size(1) > 1 and w.stride(1) != 1:
        w = w.contiguous()
    return torch.ops.deepkernels.per_block_cast_to_fp8(w)


def _check_dequant_args(x, scale, out_dtype, rows_per_scale: int) -> None:
    check_tensor("x", x, dtypes=(FP8_DTYPE,), ndim=2, contiguous=True)
    want = (ceil_div(x.size(0), rows_per_scale), ceil_div(x.size(1), GROUP))
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=want, device=x.device, contiguous=True)
    check_dtype_arg("out_dtype", out_dtype, _OUTPUT_DTYPES)


def per_token_cast_from_fp8(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`per_token_cast_to_fp8`: x [M, K] e4m3, scale [M, ceil(K/128)] fp32 -> [M, K] out_dtype
    (float32, bfloat16 or float16): x * scale of its group. A NaN or inf scale (a non-finite group) gives NaN.
    Raises TypeError / ValueError naming ``x``, ``scale`` or ``out_dtype``: 2-D contiguous e4m3 x, contiguous
    fp32 scale of exactly that shape on x's device, out_dtype a torch.dtype among the three."""
    _check_dequant_args(x, scale, out_dtype, 1)
    return torch.ops.deepkernels.per_token_cast_from_fp8(x, scale, out_dtype)


def per_block_cast_from_fp8(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`per_block_cast_to_fp8`: x [N, K] e4m3, scale [ceil(N/128), ceil(K/128)] -> [N, K] out_dtype
    (same rules and errors as :func:`per_token_cast_from_fp8`)."""
    _check_dequant_args(x, scale, out_dtype, GROUP)
    return torch.ops.deepkernels.per_block_cast_from_fp8(x, scale, out_dtype)
