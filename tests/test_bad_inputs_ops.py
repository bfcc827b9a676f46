"""Bad inputs to the op-level API (fp8 casts, FP8 GEMMs, MoE ops, the deep_gemm / deep_ep compat layers):
every case raises TypeError / ValueError from deepkernels' own checks, naming the argument, before any
write. Index / count tensors: a clear error on the reference path; on the (emulated) CUDA kernels they are
trusted, poison their output instead of reading out of bounds, and DEEPKERNELS_CHECK=1 checks them on the
device with one sync. Valid edge inputs still work, the reference and the emulated kernel agree on them,
and NaN / inf in the fp8 casts does exactly what the docstrings say.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

import deepkernels
import deepkernels.compat.deep_ep as deep_ep
import deepkernels.compat.deep_gemm as deep_gemm
import deepkernels.compat.flash_mla as flash_mla
from deepkernels import fp8, gemm, moe
from deepkernels.testing import calc_diff, poison_, reference

E4M3 = torch.float8_e4m3fn
OPS = torch.ops.deepkernels
ALIGN = deepkernels.get_m_alignment_for_contiguous_layout()


# ----------------------------------------------------------------------------------------------
# operands (built lazily, on the references)

def _q(m, k, lead=()):
    with reference():
        return fp8.per_token_cast_to_fp8(torch.randn(*lead, m, k))


def _w(n, k):
    with reference():
        return fp8.per_block_cast_to_fp8(torch.randn(n, k))


def _wg(g, n, k):
    pairs = [_w(n, k) for _ in range(g)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def dense(**over):
    aq, sa = _q(8, 256)
    bq, sb = _w(32, 256)
    args = dict(a=aq, a_scale=sa, b=bq, b_scale=sb, out=torch.empty(8, 32, dtype=torch.bfloat16))
    args.update(over)
    return args


def contiguous(m_indices=None, **over):
    g = 2
    aq, sa = _q(2 * ALIGN, 128)
    bq, sb = _wg(g, 32, 128)
    if m_indices is None:
        m_indices = torch.arange(g, dtype=torch.int32).repeat_interleave(ALIGN)
    args = dict(a=aq, a_scale=sa, b=bq, b_scale=sb, out=torch.empty(2 * ALIGN, 32, dtype=torch.bfloat16),
                m_indices=m_indices)
    args.update(over)
    return args


def masked(masked_m=None, expected_m=4, **over):
    g, mmax = 2, 8
    aq, sa = _q(mmax, 128, lead=(g,))
    bq, sb = _wg(g, 32, 128)
    args = dict(a=aq, a_scale=sa, b=bq, b_scale=sb, out=torch.empty(g, mmax, 32, dtype=torch.bfloat16),
                masked_m=torch.tensor([3, 8], dtype=torch.int32) if masked_m is None else masked_m,
                expected_m=expected_m)
    args.update(over)
    return args


def _m_idx(values):
    return torch.tensor(values, dtype=torch.int32)


def _misaligned():
    ids = torch.full((2 * ALIGN,), -1, dtype=torch.int32)
    ids[:5] = 0
    ids[5:5 + ALIGN] = 1  # group 1 starts at row 5, inside group 0's tile
    return ids


def _padding_then_group():
    ids = torch.full((2 * ALIGN,), -1, dtype=torch.int32)
    ids[ALIGN + 3:ALIGN + 10] = 1  # a tile whose first row is padding, group rows after it
    return ids


IDS = torch.tensor([[0, 3], [1, -1], [2, 3]])
X = torch.randn(3, 256)
SRC = torch.tensor([2, -1, 0, 1], dtype=torch.int32)
Y = torch.randn(4, 256)
POS = torch.tensor([[0, 1], [2, -1], [3, 3]], dtype=torch.int32)
WTS = torch.rand(3, 2)


def _mla_args(b=2, cache=None):
    q = torch.randn(b, 1, 16, 576).bfloat16()
    cache = torch.randn(6, 64, 1, 576).bfloat16() if cache is None else cache
    block_table = torch.arange(b * 3, dtype=torch.int32).view(b, 3)
    seqlens = torch.tensor([100, 37][:b], dtype=torch.int32)
    with reference():
        md, ns = deepkernels.get_mla_decode_metadata(seqlens, 16, 1)
    return [q, cache, block_table, seqlens, 512, md, ns]


def _mla_odd_offset_cache():
    flat = torch.empty(6 * 64 * 576 + 1, dtype=torch.bfloat16)
    return _mla_args(cache=flat[1:].view(6, 64, 1, 576).normal_())


def _dispatched(capacity=None):
    d = moe.EPDispatcher(None, num_experts=4, capacity=capacity)
    recv, hd = d.dispatch(X.bfloat16(), IDS, WTS)
    return d, recv, hd


def _ep_buffer_handle():
    buf = deep_ep.Buffer(None)
    _, _, per_expert, _, _ = buf.get_dispatch_layout(IDS, 4)
    out = buf.dispatch(X.bfloat16(), topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=per_expert)
    return buf, out[4]


def _ll_handle():
    buf = deep_ep.Buffer(None)
    packed, count, handle, _, _ = buf.low_latency_dispatch(X.bfloat16(), IDS, 4, 4, use_fp8=False)
    return buf, packed, handle


# ----------------------------------------------------------------------------------------------
# the table: (id, call, exception type, argument the message must name first)

BAD = [
    # ---- fp8 casts
    ("ptc-list", lambda: deepkernels.per_token_cast_to_fp8([1.0, 2.0]), TypeError, "x"),
    ("ptc-float", lambda: deepkernels.per_token_cast_to_fp8(1.5), TypeError, "x"),
    ("ptc-numpy", lambda: deepkernels.per_token_cast_to_fp8(np.ones((2, 128), np.float32)), TypeError, "x"),
    ("ptc-none", lambda: deepkernels.per_token_cast_to_fp8(None), TypeError, "x"),
    ("ptc-str", lambda: deepkernels.per_token_cast_to_fp8("x"), TypeError, "x"),
    ("ptc-int32", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=torch.int32)), ValueError, "x"),
    ("ptc-int64", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=torch.int64)), ValueError, "x"),
    ("ptc-bool", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=torch.bool)), ValueError, "x"),
    ("ptc-fp8", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=E4M3)), ValueError, "x"),
    ("ptc-fp64", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=torch.float64)), ValueError, "x"),
    ("ptc-complex", lambda: deepkernels.per_token_cast_to_fp8(torch.zeros(4, 128, dtype=torch.complex64)),
     ValueError, "x"),
    ("ptc-0dim", lambda: deepkernels.per_token_cast_to_fp8(torch.tensor(1.0)), ValueError, "x"),
    ("ptc-op-3d", lambda: OPS.per_token_cast_to_fp8(torch.randn(2, 3, 128)), ValueError, "x"),
    ("ptc-op-int", lambda: OPS.per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.int32)), ValueError, "x"),
    ("pbc-list", lambda: deepkernels.per_block_cast_to_fp8([[1.0]]), TypeError, "w"),
    ("pbc-1d", lambda: deepkernels.per_block_cast_to_fp8(torch.randn(128)), ValueError, "w"),
    ("pbc-3d", lambda: deepkernels.per_block_cast_to_fp8(torch.randn(2, 2, 2)), ValueError, "w"),
    ("pbc-int", lambda: deepkernels.per_block_cast_to_fp8(torch.zeros(4, 4, dtype=torch.int32)), ValueError, "w"),
    ("pbc-fp64", lambda: deepkernels.per_block_cast_to_fp8(torch.zeros(4, 4, dtype=torch.float64)), ValueError, "w"),
    ("pbc-op-1d", lambda: OPS.per_block_cast_to_fp8(torch.randn(128)), ValueError, "w"),
    ("ptd-x-list", lambda: deepkernels.per_token_cast_from_fp8([1], torch.ones(1, 1)), TypeError, "x"),
    ("ptd-x-float", lambda: deepkernels.per_token_cast_from_fp8(torch.randn(4, 128), torch.ones(4, 1)),
     ValueError, "x"),
    ("ptd-x-1d", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 128)[0][0], torch.ones(1)), ValueError, "x"),
    ("ptd-x-3d", lambda: deepkernels.per_token_cast_from_fp8(*_q(4, 128, lead=(2,))), ValueError, "x"),
    ("ptd-x-noncontig", lambda: deepkernels.per_token_cast_from_fp8(_q(256, 256)[0].t(), _q(256, 256)[1]),
     ValueError, "x"),
    ("ptd-scale-list", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 128)[0], [[1.0]] * 4), TypeError, "scale"),
    ("ptd-scale-shape", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 256)[0], torch.ones(4, 3)),
     ValueError, "scale"),
    ("ptd-scale-blockshape", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 256)[0], torch.ones(1, 2)),
     ValueError, "scale"),
    ("ptd-scale-bf16", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 128)[0], torch.ones(4, 1).bfloat16()),
     ValueError, "scale"),
    ("ptd-scale-noncontig", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 256)[0], torch.ones(2, 4).t()),
     ValueError, "scale"),
    ("ptd-scale-meta", lambda: deepkernels.per_token_cast_from_fp8(_q(4, 128)[0], torch.ones(4, 1, device="meta")),
     ValueError, "scale"),
    ("ptd-outdtype-str", lambda: deepkernels.per_token_cast_from_fp8(*_q(4, 128), "bfloat16"), TypeError, "out_dtype"),
    ("ptd-outdtype-none", lambda: deepkernels.per_token_cast_from_fp8(*_q(4, 128), None), TypeError, "out_dtype"),
    ("ptd-outdtype-int8", lambda: deepkernels.per_token_cast_from_fp8(*_q(4, 128), torch.int8), ValueError,
     "out_dtype"),
    ("ptd-outdtype-fp64", lambda: deepkernels.per_token_cast_from_fp8(*_q(4, 128), torch.float64), ValueError,
     "out_dtype"),
    ("ptd-op-scale", lambda: OPS.per_token_cast_from_fp8(_q(4, 256)[0], torch.ones(4, 3), torch.float32),
     ValueError, "scale"),
    ("pbd-scale-tokenshape", lambda: deepkernels.per_block_cast_from_fp8(_w(200, 256)[0], torch.ones(200, 2)),
     ValueError, "scale"),
    ("pbd-x-bf16", lambda: deepkernels.per_block_cast_from_fp8(torch.randn(4, 4).bfloat16(), torch.ones(1, 1)),
     ValueError, "x"),
    ("pbd-op-scale", lambda: OPS.per_block_cast_from_fp8(_w(200, 256)[0], torch.ones(1, 2), torch.float32),
     ValueError, "scale"),

    # ---- dense GEMM
    ("gemm-a-list", lambda: deepkernels.fp8_gemm_nt(**dense(a=[[0]])), TypeError, "a"),
    ("gemm-a-bf16", lambda: deepkernels.fp8_gemm_nt(**dense(a=torch.randn(8, 256).bfloat16())), ValueError, "a"),
    ("gemm-a-1d", lambda: deepkernels.fp8_gemm_nt(**dense(a=_q(1, 256)[0][0])), ValueError, "a"),
    ("gemm-a-3d", lambda: deepkernels.fp8_gemm_nt(**dense(a=_q(8, 256, lead=(1,))[0])), ValueError, "a"),
    ("gemm-a-stride", lambda: deepkernels.fp8_gemm_nt(**dense(a=_q(8, 512)[0][:, ::2])), ValueError, "a"),
    ("gemm-a-k", lambda: deepkernels.fp8_gemm_nt(**dense(a=_q(8, 200)[0], a_scale=_q(8, 200)[1])), ValueError, "b"),
    ("gemm-as-none", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=None)), TypeError, "a_scale"),
    ("gemm-as-shape", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=torch.ones(8, 3))), ValueError, "a_scale"),
    ("gemm-as-transposed", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=torch.ones(2, 8))), ValueError, "a_scale"),
    ("gemm-as-bf16", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=torch.ones(8, 2).bfloat16())), ValueError,
     "a_scale"),
    ("gemm-as-layout", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=torch.ones(8, 4)[:, ::2])), ValueError,
     "a_scale"),
    ("gemm-as-meta", lambda: deepkernels.fp8_gemm_nt(**dense(a_scale=torch.ones(8, 2, device="meta"))), ValueError,
     "a_scale"),
    ("gemm-b-bf16", lambda: deepkernels.fp8_gemm_nt(**dense(b=torch.randn(32, 256).bfloat16())), ValueError, "b"),
    ("gemm-b-k", lambda: deepkernels.fp8_gemm_nt(**dense(b=_w(32, 128)[0])), ValueError, "b"),
    ("gemm-b-noncontig", lambda: deepkernels.fp8_gemm_nt(**dense(b=_w(32, 512)[0][:, :256])), ValueError, "b"),
    ("gemm-b-n16", lambda: deepkernels.fp8_gemm_nt(**dense(b=_w(40, 256)[0][:36].contiguous(),
                                                           b_scale=torch.ones(1, 2), out=None)), ValueError, "b"),
    ("gemm-bs-shape", lambda: deepkernels.fp8_gemm_nt(**dense(b_scale=torch.ones(2, 2))), ValueError, "b_scale"),
    ("gemm-bs-noncontig", lambda: deepkernels.fp8_gemm_nt(**dense(b_scale=torch.ones(1, 4)[:, ::2])), ValueError,
     "b_scale"),
    ("gemm-bs-list", lambda: deepkernels.fp8_gemm_nt(**dense(b_scale=[[1.0, 1.0]])), TypeError, "b_scale"),
    ("gemm-out-fp32", lambda: deepkernels.fp8_gemm_nt(**dense(out=torch.empty(8, 32))), ValueError, "out"),
    ("gemm-out-shape", lambda: deepkernels.fp8_gemm_nt(**dense(out=torch.empty(8, 33, dtype=torch.bfloat16))),
     ValueError, "out"),
    ("gemm-out-noncontig", lambda: deepkernels.fp8_gemm_nt(**dense(out=torch.empty(32, 8, dtype=torch.bfloat16).t())),
     ValueError, "out"),
    ("gemm-out-list", lambda: deepkernels.fp8_gemm_nt(**dense(out=[0])), TypeError, "out"),
    ("gemm-out-meta", lambda: deepkernels.fp8_gemm_nt(**dense(out=torch.empty(8, 32, dtype=torch.bfloat16,
                                                                              device="meta"))),
     ValueError, "out"),
    ("gemm-op-shape", lambda: OPS.fp8_gemm_nt(*dense(a_scale=torch.ones(8, 3)).values()), ValueError, "a_scale"),
    ("gemm-op-out", lambda: OPS.fp8_gemm_nt(*dense(out=torch.empty(8, 32)).values()), ValueError, "out"),

    # ---- contiguous grouped GEMM
    ("cont-mi-int64", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(torch.zeros(2 * ALIGN, dtype=torch.int64))), ValueError, "m_indices"),
    ("cont-mi-list", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous([0] * (2 * ALIGN))),
     TypeError, "m_indices"),
    ("cont-mi-len", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(_m_idx([0] * ALIGN))),
     ValueError, "m_indices"),
    ("cont-mi-2d", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(torch.zeros(2, ALIGN, dtype=torch.int32))), ValueError, "m_indices"),
    ("cont-mi-noncontig", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(torch.zeros(4 * ALIGN, dtype=torch.int32)[::2])), ValueError, "m_indices"),
    ("cont-mi-range-high", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(_m_idx([0] * ALIGN + [2] * ALIGN))), ValueError, "m_indices"),
    ("cont-mi-range-low", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(_m_idx([0] * ALIGN + [-2] * ALIGN))), ValueError, "m_indices"),
    ("cont-mi-misaligned", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(_misaligned())),
     ValueError, "m_indices"),
    ("cont-mi-padding-first", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(_padding_then_group())), ValueError, "m_indices"),
    ("cont-mi-interleaved", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(_m_idx([0, 1] * ALIGN))), ValueError, "m_indices"),
    ("cont-op-misaligned", lambda: OPS.m_grouped_fp8_gemm_nt_contiguous(*contiguous(_misaligned()).values()),
     ValueError, "m_indices"),
    ("cont-op-range", lambda: OPS.m_grouped_fp8_gemm_nt_contiguous(
        *contiguous(_m_idx([0] * ALIGN + [7] * ALIGN)).values()), ValueError, "m_indices"),
    ("cont-b-2d", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(b=_w(32, 128)[0])),
     ValueError, "b"),
    ("cont-bs-groups", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(b_scale=torch.ones(1, 1, 1))),
     ValueError, "b_scale"),
    ("cont-out-shape", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(
        **contiguous(out=torch.empty(ALIGN, 32, dtype=torch.bfloat16))), ValueError, "out"),
    ("cont-out-none", lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(out=None)), TypeError, "out"),

    # ---- masked grouped GEMM
    ("mask-mm-int64", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(
        **masked(torch.tensor([3, 8]))), ValueError, "masked_m"),
    ("mask-mm-list", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked([3, 8])), TypeError, "masked_m"),
    ("mask-mm-len", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(_m_idx([3, 8, 1]))), ValueError,
     "masked_m"),
    ("mask-mm-over", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(_m_idx([3, 9]))), ValueError,
     "masked_m"),
    ("mask-mm-negative", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(_m_idx([-1, 8]))), ValueError,
     "masked_m"),
    ("mask-op-over", lambda: OPS.m_grouped_fp8_gemm_nt_masked(*masked(_m_idx([3, 100])).values()), ValueError,
     "masked_m"),
    ("mask-op-negative", lambda: OPS.m_grouped_fp8_gemm_nt_masked(*masked(_m_idx([-5, 1])).values()), ValueError,
     "masked_m"),
    ("mask-em-float", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=4.0)), TypeError,
     "expected_m"),
    ("mask-em-bool", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=True)), TypeError,
     "expected_m"),
    ("mask-em-str", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m="4")), TypeError,
     "expected_m"),
    ("mask-em-none", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=None)), TypeError,
     "expected_m"),
    ("mask-em-tensor", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=torch.tensor(4))),
     TypeError, "expected_m"),
    ("mask-em-negative", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=-1)), ValueError,
     "expected_m"),
    ("mask-a-2d", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(a=_q(8, 128)[0])), ValueError, "a"),
    ("mask-as-groups", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(a_scale=torch.ones(1, 8, 1))),
     ValueError, "a_scale"),
    ("mask-b-groups", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(b=_wg(3, 32, 128)[0])),
     ValueError, "b"),
    ("mask-out-shape", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(
        **masked(out=torch.empty(2, 8, 16, dtype=torch.bfloat16))), ValueError, "out"),

    # ---- deep_gemm compat
    ("dg-lhs-tensor", lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(_q(8, 256)[0], _w(32, 256),
                                                             torch.empty(8, 32, dtype=torch.bfloat16)),
     TypeError, "lhs"),
    ("dg-lhs-triple", lambda: deep_gemm.gemm_fp8_fp8_bf16_nt((*_q(8, 256), None), _w(32, 256),
                                                             torch.empty(8, 32, dtype=torch.bfloat16)),
     TypeError, "lhs"),
    ("dg-rhs-single", lambda: deep_gemm.fp8_gemm_nt(_q(8, 256), [_w(32, 256)[0]],
                                                   torch.empty(8, 32, dtype=torch.bfloat16)), TypeError, "rhs"),
    ("dg-out-none", lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(_q(8, 256), _w(32, 256), None), TypeError, "out"),
    ("dg-cont-lhs", lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
        None, _wg(2, 32, 128), torch.empty(2 * ALIGN, 32, dtype=torch.bfloat16), _m_idx([0] * 2 * ALIGN)),
     TypeError, "lhs"),
    ("dg-cont-misaligned", lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        (contiguous()["a"], contiguous()["a_scale"]), _wg(2, 32, 128),
        torch.empty(2 * ALIGN, 32, dtype=torch.bfloat16), _misaligned()), ValueError, "m_indices"),
    ("dg-masked-rhs", lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(
        _q(8, 128, lead=(2,)), _wg(2, 32, 128)[0], torch.empty(2, 8, 32, dtype=torch.bfloat16), _m_idx([1, 1]), 1),
     TypeError, "rhs"),
    ("dg-masked-over", lambda: deep_gemm.m_grouped_fp8_gemm_nt_masked(
        _q(8, 128, lead=(2,)), _wg(2, 32, 128), torch.empty(2, 8, 32, dtype=torch.bfloat16), _m_idx([1, 9]), 1),
     ValueError, "masked_m"),
    ("dg-tma-float", lambda: deep_gemm.get_tma_aligned_size(5.0, 4), TypeError, "x"),
    ("dg-tma-elem", lambda: deep_gemm.get_tma_aligned_size(5, 3), ValueError, "element_size"),
    ("dg-tma-elem-bool", lambda: deep_gemm.get_tma_aligned_size(5, True), TypeError, "element_size"),
    ("dg-colmajor-list", lambda: deep_gemm.get_col_major_tma_aligned_tensor([[1.0]]), TypeError, "x"),
    ("dg-colmajor-1d", lambda: deep_gemm.get_col_major_tma_aligned_tensor(torch.ones(4)), ValueError, "x"),
    ("dg-colmajor-bool", lambda: deep_gemm.get_col_major_tma_aligned_tensor(torch.ones(4, 2, dtype=torch.bool)),
     ValueError, "x"),
    ("dg-mnmajor-bf16", lambda: deep_gemm.get_mn_major_tma_aligned_tensor(torch.ones(4, 2, dtype=torch.bfloat16)),
     ValueError, "sf"),
    ("dg-mnmajor-1d", lambda: deep_gemm.get_mn_major_tma_aligned_tensor(torch.ones(4)), ValueError, "sf"),

    # ---- MoE layout
    ("lay-list", lambda: moe.get_dispatch_layout([[0, 1]], 4, 2), TypeError, "topk_idx"),
    ("lay-int32", lambda: moe.get_dispatch_layout(IDS.int(), 4, 2), ValueError, "topk_idx"),
    ("lay-float", lambda: moe.get_dispatch_layout(IDS.float(), 4, 2), ValueError, "topk_idx"),
    ("lay-1d", lambda: moe.get_dispatch_layout(IDS[0], 4, 2), ValueError, "topk_idx"),
    ("lay-high", lambda: moe.get_dispatch_layout(torch.tensor([[0, 4]]), 4, 2), ValueError, "topk_idx"),
    ("lay-low", lambda: moe.get_dispatch_layout(torch.tensor([[-2, 1]]), 4, 2), ValueError, "topk_idx"),
    ("lay-high-unchecked-cpu", lambda: moe.get_dispatch_layout(torch.tensor([[0, 4]]), 4, 2, check_values=False),
     ValueError, "topk_idx"),
    ("lay-ne-float", lambda: moe.get_dispatch_layout(IDS, 4.0, 2), TypeError, "num_experts"),
    ("lay-ne-bool", lambda: moe.get_dispatch_layout(IDS, True, 1), TypeError, "num_experts"),
    ("lay-ne-str", lambda: moe.get_dispatch_layout(IDS, "4", 2), TypeError, "num_experts"),
    ("lay-ne-tensor", lambda: moe.get_dispatch_layout(IDS, torch.tensor(4), 2), TypeError, "num_experts"),
    ("lay-ne-zero", lambda: moe.get_dispatch_layout(torch.zeros(0, 2, dtype=torch.int64), 0, 1), ValueError,
     "num_experts"),
    ("lay-ne-negative", lambda: moe.get_dispatch_layout(IDS, -4, 2), ValueError, "num_experts"),
    ("lay-ne-ndarray", lambda: moe.get_dispatch_layout(IDS, np.array([4, 4]), 2), TypeError, "num_experts"),
    ("lay-ne-np-float", lambda: moe.get_dispatch_layout(IDS, np.float64(4), 2), TypeError, "num_experts"),
    ("mask-em-ndarray", lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=np.ones(2, np.int64))),
     TypeError, "expected_m"),
    ("lay-nr-float", lambda: moe.get_dispatch_layout(IDS, 4, 2.0), TypeError, "num_ranks"),
    ("lay-nr-zero", lambda: moe.get_dispatch_layout(IDS, 4, 0), ValueError, "num_ranks"),
    ("lay-nr-none", lambda: moe.get_dispatch_layout(IDS, 4, None), TypeError, "num_ranks"),
    ("lay-indivisible", lambda: moe.get_dispatch_layout(IDS, 4, 3), ValueError, "num_experts"),
    ("lay-more-ranks", lambda: moe.get_dispatch_layout(IDS, 4, 8), ValueError, "num_experts"),
    ("lay-check-str", lambda: moe.get_dispatch_layout(IDS, 4, 2, check_values="no"), TypeError, "check_values"),
    ("lay-op-indivisible", lambda: OPS.moe_get_dispatch_layout(IDS, 4, 3), ValueError, "num_experts"),
    ("lay-op-high", lambda: OPS.moe_get_dispatch_layout(torch.tensor([[0, 4]]), 4, 2), ValueError, "topk_idx"),
    ("lay-op-zero-ranks", lambda: OPS.moe_get_dispatch_layout(IDS, 4, 0), ValueError, "num_ranks"),
    ("lay-op-int32", lambda: OPS.moe_get_dispatch_layout(IDS.int(), 4, 2), ValueError, "topk_idx"),

    # ---- MoE permute / permute_fp8 / unpermute_reduce
    ("perm-x-list", lambda: moe.permute([[1.0]], SRC), TypeError, "x"),
    ("perm-x-1d", lambda: moe.permute(X[0], SRC), ValueError, "x"),
    ("perm-x-fp64", lambda: moe.permute(X.double(), SRC), ValueError, "x"),
    ("perm-x-bool", lambda: moe.permute(X > 0, SRC), ValueError, "x"),
    ("perm-src-int64", lambda: moe.permute(X, SRC.long()), ValueError, "src_idx"),
    ("perm-src-list", lambda: moe.permute(X, [0, 1]), TypeError, "src_idx"),
    ("perm-src-2d", lambda: moe.permute(X, SRC.view(2, 2)), ValueError, "src_idx"),
    ("perm-src-noncontig", lambda: moe.permute(X, SRC.repeat(2)[::2]), ValueError, "src_idx"),
    ("perm-src-high", lambda: moe.permute(X, _m_idx([0, 3])), ValueError, "src_idx"),
    ("perm-src-low", lambda: moe.permute(X, _m_idx([0, -2])), ValueError, "src_idx"),
    ("perm-src-meta", lambda: moe.permute(X, SRC.to("meta")), ValueError, "src_idx"),
    ("perm-op-high", lambda: OPS.moe_permute(X, _m_idx([0, 99])), ValueError, "src_idx"),
    ("perm-op-int64", lambda: OPS.moe_permute(X, SRC.long()), ValueError, "src_idx"),
    ("pfp8-x-fp8", lambda: moe.permute_fp8(_q(3, 256)[0], SRC), ValueError, "x"),
    ("pfp8-x-int", lambda: moe.permute_fp8(X.int(), SRC), ValueError, "x"),
    ("pfp8-src-high", lambda: moe.permute_fp8(X, _m_idx([3])), ValueError, "src_idx"),
    ("pfp8-op-high", lambda: OPS.moe_permute_fp8(X, _m_idx([0, 5])), ValueError, "src_idx"),
    ("unp-y-int", lambda: moe.unpermute_reduce(Y.int(), POS), ValueError, "y"),
    ("unp-y-1d", lambda: moe.unpermute_reduce(Y[0], POS), ValueError, "y"),
    ("unp-y-list", lambda: moe.unpermute_reduce([[1.0]], POS), TypeError, "y"),
    ("unp-pos-int64", lambda: moe.unpermute_reduce(Y, POS.long()), ValueError, "pos"),
    ("unp-pos-1d", lambda: moe.unpermute_reduce(Y, POS[:, 0].contiguous()), ValueError, "pos"),
    ("unp-pos-noncontig", lambda: moe.unpermute_reduce(Y, POS.t()), ValueError, "pos"),
    ("unp-pos-high", lambda: moe.unpermute_reduce(Y, _m_idx([[0, 4]])), ValueError, "pos"),
    ("unp-pos-low", lambda: moe.unpermute_reduce(Y, _m_idx([[0, -3]])), ValueError, "pos"),
    ("unp-w-bf16", lambda: moe.unpermute_reduce(Y, POS, WTS.bfloat16()), ValueError, "weights"),
    ("unp-w-shape", lambda: moe.unpermute_reduce(Y, POS, WTS[:, :1]), ValueError, "weights"),
    ("unp-w-list", lambda: moe.unpermute_reduce(Y, POS, [[1.0, 1.0]] * 3), TypeError, "weights"),
    ("unp-w-noncontig", lambda: moe.unpermute_reduce(Y, POS, torch.rand(2, 3).t()), ValueError, "weights"),
    ("unp-op-high", lambda: OPS.moe_unpermute_reduce(Y, _m_idx([[0, 9]]), None), ValueError, "pos"),
    ("unp-op-w", lambda: OPS.moe_unpermute_reduce(Y, POS, WTS[:1]), ValueError, "weights"),

    # ---- MoE index helpers
    ("dpos-list", lambda: moe.dispatch_positions([[True]]), TypeError, "is_token_in_rank"),
    ("dpos-int", lambda: moe.dispatch_positions(torch.ones(3, 2, dtype=torch.int32)), ValueError, "is_token_in_rank"),
    ("dpos-1d", lambda: moe.dispatch_positions(torch.ones(3, dtype=torch.bool)), ValueError, "is_token_in_rank"),
    ("dpos-cap-float", lambda: moe.dispatch_positions(torch.ones(3, 2, dtype=torch.bool), 4.0), TypeError, "capacity"),
    ("dpos-cap-bool", lambda: moe.dispatch_positions(torch.ones(3, 2, dtype=torch.bool), True), TypeError, "capacity"),
    ("dpos-cap-small", lambda: moe.dispatch_positions(torch.ones(3, 2, dtype=torch.bool), 2), ValueError, "capacity"),
    ("p2s-float", lambda: moe.positions_to_src_idx(POS.float(), 4), ValueError, "pos"),
    ("p2s-1d", lambda: moe.positions_to_src_idx(POS[:, 0], 4), ValueError, "pos"),
    ("p2s-rows-float", lambda: moe.positions_to_src_idx(POS, 4.0), TypeError, "num_rows"),
    ("p2s-rows-negative", lambda: moe.positions_to_src_idx(POS, -1), ValueError, "num_rows"),
    ("p2s-high", lambda: moe.positions_to_src_idx(POS, 3), ValueError, "pos"),
    ("epos-float", lambda: moe.expert_positions(POS.float(), 4, torch.zeros(4, dtype=torch.int64)), ValueError,
     "local_ids"),
    ("epos-L-str", lambda: moe.expert_positions(POS, "4", torch.zeros(4, dtype=torch.int64)), TypeError,
     "num_local_experts"),
    ("epos-seg-shape", lambda: moe.expert_positions(POS, 4, torch.zeros(3, dtype=torch.int64)), ValueError,
     "segment_start"),
    ("epos-counts-shape", lambda: moe.expert_positions(POS, 4, torch.zeros(4, dtype=torch.int64),
                                                        torch.zeros(2, dtype=torch.int64)), ValueError, "counts"),
    ("epos-limit", lambda: moe.expert_positions(POS, 4, torch.zeros(4, dtype=torch.int64), limit=-1), ValueError,
     "limit"),
    ("epos-high", lambda: moe.expert_positions(POS, 3, torch.zeros(3, dtype=torch.int64)), ValueError, "local_ids"),
    ("lsr-shape", lambda: moe.local_slot_rows(POS, POS[:2], 2), ValueError, "expert_pos"),
    ("lsr-slots", lambda: moe.local_slot_rows(POS, POS, 1.5), TypeError, "slots"),
    ("ssp-pos-shape", lambda: moe.source_slot_positions(IDS, torch.zeros(3, 3, dtype=torch.int32), 4, 2, 2),
     ValueError, "pos"),
    ("ssp-ne-float", lambda: moe.source_slot_positions(IDS, torch.zeros(3, 2, dtype=torch.int32), 4.0, 2, 2),
     TypeError, "num_experts"),
    ("ssp-topk-int32", lambda: moe.source_slot_positions(IDS.int(), torch.zeros(3, 2, dtype=torch.int32), 4, 2, 2),
     ValueError, "topk_idx"),

    # ---- EPDispatcher / DispatchHandle
    ("ep-group-str", lambda: moe.EPDispatcher("world", num_experts=4), TypeError, "group"),
    ("ep-x-meta", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X.to("meta"), IDS), ValueError, "topk_idx"),
    ("dep-group-int", lambda: deep_ep.Buffer(0), TypeError, "group"),
    ("ep-ne-float", lambda: moe.EPDispatcher(None, num_experts=4.0), TypeError, "num_experts"),
    ("ep-ne-bool", lambda: moe.EPDispatcher(None, num_experts=True), TypeError, "num_experts"),
    ("ep-ne-str", lambda: moe.EPDispatcher(None, num_experts="4"), TypeError, "num_experts"),
    ("ep-ne-zero", lambda: moe.EPDispatcher(None, num_experts=0), ValueError, "num_experts"),
    ("ep-cap-negative", lambda: moe.EPDispatcher(None, num_experts=4, capacity=-1), ValueError, "capacity"),
    ("ep-cap-float", lambda: moe.EPDispatcher(None, num_experts=4, capacity=8.0), TypeError, "capacity"),
    ("ep-cap-bool", lambda: moe.EPDispatcher(None, num_experts=4, capacity=True), TypeError, "capacity"),
    ("ep-x-list", lambda: moe.EPDispatcher(None, num_experts=4).dispatch([[1.0]], IDS), TypeError, "x"),
    ("ep-x-int", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X.int(), IDS), ValueError, "x"),
    ("ep-x-triple", lambda: moe.EPDispatcher(None, num_experts=4).dispatch((X, X, X), IDS), TypeError, "x"),
    ("ep-x-pair-scale", lambda: moe.EPDispatcher(None, num_experts=4).dispatch((_q(3, 256)[0], torch.ones(3, 3)),
                                                                               IDS), ValueError, "x[1]"),
    ("ep-ids-int32", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS.int()), ValueError, "topk_idx"),
    ("ep-ids-rows", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS[:2]), ValueError, "topk_idx"),
    ("ep-ids-high", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS + 1), ValueError, "topk_idx"),
    ("ep-ids-high-fixed", lambda: moe.EPDispatcher(None, num_experts=4, capacity=4).dispatch(X, IDS + 1),
     ValueError, "topk_idx"),
    ("ep-w-shape", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS, WTS[:, :1]), ValueError,
     "topk_weights"),
    ("ep-w-bf16", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS, WTS.bfloat16()), ValueError,
     "topk_weights"),
    ("ep-fp8-str", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS, use_fp8="yes"), TypeError,
     "use_fp8"),
    ("ep-fp8-int", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS, use_fp8=1), TypeError, "use_fp8"),
    ("ep-over-capacity", lambda: moe.EPDispatcher(None, num_experts=4, capacity=2).dispatch(X, IDS), ValueError, "x"),
    ("ep-combine-rows", lambda: (lambda d, r, h: d.combine(torch.randn(1, 256), h))(*_dispatched()), ValueError, "y"),
    ("ep-combine-handle", lambda: _dispatched()[0].combine(torch.randn(3, 256), None), TypeError, "handle"),
    ("ep-combine-tuple", lambda: (lambda d, r, h: d.combine(r, (d, h)))(*_dispatched()), TypeError, "handle"),
    ("ep-cexp-layout", lambda: (lambda d, r, h: d.combine_experts(torch.randn(1, 4, 256), h, layout="rows"))(
        *_dispatched(4)), ValueError, "layout"),
    ("ep-cexp-shape", lambda: (lambda d, r, h: d.combine_experts(torch.randn(3, 4, 256), h))(*_dispatched(4)),
     ValueError, "expert_out"),
    ("ep-cached-fp8", lambda: (lambda d, r, h: d.dispatch_cached(X, h, use_fp8="no"))(*_dispatched()), TypeError,
     "use_fp8"),
    ("ep-cached-rows", lambda: (lambda d, r, h: d.dispatch_cached(X[:2], h))(*_dispatched()), ValueError, "x"),
    ("ep-masked-maxm", lambda: _dispatched()[2].masked_layout(2.0), TypeError, "max_m"),
    ("ep-masked-negative", lambda: _dispatched()[2].masked_layout(-1), ValueError, "max_m"),
    ("ep-contig-align", lambda: _dispatched()[2].contiguous_layout(0), ValueError, "alignment"),
    ("ep-contig-align-float", lambda: _dispatched()[2].contiguous_layout(8.0), TypeError, "alignment"),
    ("ep-reduce-layout", lambda: _dispatched()[2].expert_reduce(torch.randn(4, 256), "rows"), ValueError, "layout"),
    ("ep-reduce-masked-experts", lambda: (lambda d, r, h: h.expert_reduce(torch.randn(3, 5, 256), "masked"))(
        *_dispatched()), ValueError, "expert_out"),
    ("ep-reduce-masked-arg", lambda: (lambda d, r, h: h.expert_reduce(torch.randn(4, 5, 256), "masked", 3))(
        *_dispatched()), ValueError, "alignment_or_max_m"),
    ("ep-reduce-contig-rows", lambda: (lambda d, r, h: h.expert_reduce(torch.randn(2, 256), "contiguous"))(
        *_dispatched()), ValueError, "expert_out"),
    ("ep-to-masked-rows", lambda: (lambda d, r, h: h.to_masked(r[:1]))(*_dispatched()), ValueError, "recv_x"),
    ("ep-to-contig-list", lambda: (lambda d, r, h: h.to_contiguous([r]))(*_dispatched()), TypeError, "recv_x"),
    ("ep-to-masked-triple", lambda: (lambda d, r, h: h.to_masked((r, r, r)))(*_dispatched()), TypeError, "recv_x"),
    ("ep-combine-meta", lambda: (lambda d, r, h: d.combine(r.to("meta"), h))(*_dispatched()), ValueError,
     "handle_pos"),
    ("p2s-repeated", lambda: moe.positions_to_src_idx(_m_idx([[0, 1], [1, -1]]), 4), ValueError, "pos"),
    ("ep-xw-shape", lambda: (lambda d, r, h: d.exchange_weights(WTS[:1], h))(*_dispatched()), ValueError,
     "topk_weights"),

    # ---- deep_ep compat Buffer
    ("dep-layout-ne", lambda: deep_ep.Buffer(None).get_dispatch_layout(IDS, 4.0), TypeError, "num_experts"),
    ("dep-layout-ids", lambda: deep_ep.Buffer(None).get_dispatch_layout(IDS + 1, 4), ValueError, "topk_idx"),
    ("dep-dispatch-missing", lambda: deep_ep.Buffer(None).dispatch(X, topk_idx=IDS), ValueError, "topk_weights"),
    ("dep-dispatch-align", lambda: deep_ep.Buffer(None).dispatch(
        X, topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=torch.ones(4, dtype=torch.int32),
        expert_alignment=0), ValueError, "expert_alignment"),
    ("dep-dispatch-align-bool", lambda: deep_ep.Buffer(None).dispatch(
        X, topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=torch.ones(4, dtype=torch.int32),
        expert_alignment=True), TypeError, "expert_alignment"),
    ("dep-dispatch-counts-list", lambda: deep_ep.Buffer(None).dispatch(
        X, topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=[1, 1, 1, 1]), TypeError, "num_tokens_per_expert"),
    ("dep-dispatch-weights-list", lambda: deep_ep.Buffer(None).dispatch(
        X, topk_idx=IDS, topk_weights=[[1.0, 1.0]] * 3, num_tokens_per_expert=torch.ones(4, dtype=torch.int32)),
     TypeError, "topk_weights"),
    ("dep-dispatch-handle", lambda: deep_ep.Buffer(None).dispatch(X, handle=("a", "b")), TypeError, "handle"),
    ("dep-combine-handle", lambda: deep_ep.Buffer(None).combine(X, None), TypeError, "handle"),
    ("dep-combine-ll-handle", lambda: (lambda b, p, h: b.combine(X, h))(*_ll_handle()), ValueError, "handle"),
    ("dep-combine-weights", lambda: (lambda b, h: b.combine(torch.randn(3, 256).bfloat16(), h,
                                                            topk_weights=WTS[:, :1]))(*_ep_buffer_handle()),
     ValueError, "topk_weights"),
    ("dep-combine-bias", lambda: (lambda b, h: b.combine(torch.randn(3, 256).bfloat16(), h,
                                                         bias=torch.randn(2, 256)))(*_ep_buffer_handle()),
     ValueError, "bias"),
    ("dep-ll-max-str", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, "4", 4), TypeError,
     "num_max_dispatch_tokens_per_rank"),
    ("dep-ll-ne-float", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 4, 4.0), TypeError, "num_experts"),
    ("dep-ll-ne-zero", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 4, 0), ValueError, "num_experts"),
    ("dep-ll-fp8-str", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 4, 4, use_fp8="no"), TypeError,
     "use_fp8"),
    ("dep-ll-ue8m0", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 4, 4, use_ue8m0=True), ValueError,
     "round_scale/use_ue8m0"),
    ("dep-ll-round-str", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 4, 4, round_scale="False"),
     TypeError, "round_scale"),
    ("dep-ll-too-many", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS, 2, 4), ValueError, "x"),
    ("dep-ll-ids-high", lambda: deep_ep.Buffer(None).low_latency_dispatch(X, IDS + 1, 4, 4), ValueError, "topk_idx"),
    ("dep-ll-stats", lambda: deep_ep.Buffer(None).low_latency_dispatch(
        X, IDS, 4, 4, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)), ValueError,
     "cumulative_local_expert_recv_stats"),
    ("dep-nvl-str", lambda: deep_ep.Buffer(None, num_nvl_bytes="1e9"), TypeError, "num_nvl_bytes"),
    ("dep-rdma-negative", lambda: deep_ep.Buffer(None, num_rdma_bytes=-1), ValueError, "num_rdma_bytes"),
    ("dep-layout-async-str", lambda: deep_ep.Buffer(None).get_dispatch_layout(IDS, 4, async_finish="yes"), TypeError,
     "async_finish"),
    ("dep-dispatch-worst", lambda: deep_ep.Buffer(None).dispatch(
        X, topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=torch.ones(4, dtype=torch.int32),
        num_worst_tokens=-1), ValueError, "num_worst_tokens"),
    ("dep-hint-float", lambda: deep_ep.Buffer.get_low_latency_rdma_size_hint(4.5, 256, 2, 4), TypeError,
     "num_max_dispatch_tokens_per_rank"),
    ("dep-clean-str", lambda: deep_ep.Buffer(None).clean_low_latency_buffer(4, "256", 4), TypeError, "hidden"),
    ("dep-llc-zero-copy", lambda: (lambda b, p, h: b.low_latency_combine(p, IDS, WTS, h, zero_copy="no"))(
        *_ll_handle()), TypeError, "zero_copy"),
    ("dg-ceil-zero", lambda: deep_gemm.ceil_div(5, 0), ValueError, "y"),
    ("dg-ceil-float", lambda: deep_gemm.ceil_div(5.0, 2), TypeError, "x"),
    ("dep-llc-handle", lambda: deep_ep.Buffer(None).low_latency_combine(X, IDS, WTS, None), TypeError, "handle"),
    ("dep-llc-normal-handle", lambda: (lambda b, h: b.low_latency_combine(X, IDS, WTS, h))(*_ep_buffer_handle()),
     ValueError, "handle"),
    ("dep-llc-weights", lambda: (lambda b, p, h: b.low_latency_combine(p, IDS, WTS[:, :1], h))(*_ll_handle()),
     ValueError, "topk_weights"),
    ("dep-llc-out", lambda: (lambda b, p, h: b.low_latency_combine(p, IDS, WTS, h, out=torch.empty(2, 256)))(
        *_ll_handle()), ValueError, "out"),

    # ---- found by fuzzing (h18): int32 overflows, wrong histograms, sizes that only failed in an allocation,
    # out buffers that share memory, a cache at an odd offset
    ("lay-too-many-experts", lambda: moe.get_dispatch_layout(IDS, 2**40, 2), ValueError, "num_experts"),
    ("lay-experts-plus-ranks", lambda: moe.get_dispatch_layout(IDS, 8192, 2), ValueError, "num_experts"),
    ("lay-op-too-many-experts", lambda: OPS.moe_get_dispatch_layout(IDS, 8192, 1), ValueError, "num_experts"),
    ("dpos-capacity-int32", lambda: moe.dispatch_positions(torch.ones(2, 2, dtype=torch.bool), capacity=2**40),
     ValueError, "capacity"),
    ("epos-counts-not-histogram", lambda: moe.expert_positions(POS, 4, torch.zeros(4, dtype=torch.int64),
                                                               torch.tensor([5, -2, 0, 0])), ValueError, "counts"),
    ("epos-segment-negative", lambda: moe.expert_positions(POS, 4, torch.tensor([0, -4, 8, 12])), ValueError,
     "segment_start"),
    ("epos-segment-int32", lambda: moe.expert_positions(POS, 4, torch.tensor([0, 2**31 - 1, 0, 0])), ValueError,
     "segment_start"),
    ("lsr-slots-huge", lambda: moe.local_slot_rows(POS, POS, 2**40), ValueError, "slots"),
    ("lsr-slots-above-k", lambda: moe.local_slot_rows(POS, POS, 3), ValueError, "slots"),
    ("ssp-slots-huge", lambda: moe.source_slot_positions(IDS, torch.zeros(3, 2, dtype=torch.int32), 4, 2, 2**40),
     ValueError, "slots"),
    ("ssp-pos-below", lambda: moe.source_slot_positions(IDS, _m_idx([[0, 1], [1, -2], [2, 2]]), 4, 2, 2), ValueError,
     "pos"),
    ("ssp-pos-int32", lambda: moe.source_slot_positions(IDS, _m_idx([[0, 1], [1, -1], [2, 2**30]]), 4, 2, 2),
     ValueError, "pos"),
    ("ssp-bad-id", lambda: moe.source_slot_positions(IDS + 1, torch.zeros(3, 2, dtype=torch.int32), 4, 2, 2),
     ValueError, "topk_idx"),
    ("dg-bf16-d-expanded", lambda: deep_gemm.bf16_gemm_nt(torch.randn(4, 64).bfloat16(), torch.randn(8, 64).bfloat16(),
                                                          torch.zeros(1, 8).expand(4, 8)), ValueError, "d"),
    ("dg-bf16-a-meta", lambda: deep_gemm.bf16_gemm_nt(torch.randn(4, 64).bfloat16().to("meta"),
                                                      torch.randn(8, 64).bfloat16(), torch.zeros(4, 8)), ValueError,
     "b"),
    ("mla-cache-odd-offset", lambda: deepkernels.mla_decode_with_kvcache(*_mla_odd_offset_cache()), ValueError,
     "kv_cache"),
    ("ep-topk-k0", lambda: moe.EPDispatcher(None, num_experts=4).dispatch(X, IDS[:, :0]), ValueError, "topk_idx"),
    ("ep-topk-k0-fixed", lambda: moe.EPDispatcher(None, num_experts=4, capacity=4).dispatch(X, IDS[:, :0]),
     ValueError, "topk_idx"),
    ("ep-cap-int32", lambda: moe.EPDispatcher(None, num_experts=4, capacity=2**40), ValueError, "capacity"),
    ("ep-alignment-int32", lambda: (lambda d, r, h: h.to_contiguous(r, 2**40))(*_dispatched()), ValueError,
     "alignment"),
    ("dep-llc-meta-ids", lambda: (lambda b, p, h: b.low_latency_combine(p, IDS.to("meta"), WTS, h))(*_ll_handle()),
     ValueError, "topk_idx"),
    ("wire-per-rank-negative", lambda: moe.pack_rows(X, SRC, IDS, WTS, _m_idx([6, -2]), 2, None), ValueError,
     "per_rank"),
    ("wire-per-rank-sum", lambda: moe.pack_rows(X, SRC, IDS, WTS, _m_idx([1, 2]), 2, None), ValueError, "per_rank"),
    ("wire-bad-expert-id", lambda: moe.pack_rows(X, SRC, IDS + 1, WTS, _m_idx([2, 2]), 2, None), ValueError,
     "topk_idx"),
    ("wire-src-list", lambda: moe.pack_rows(X, [0, 1], IDS, WTS, _m_idx([2, 2]), 2, None), TypeError, "src_idx"),
    ("dep-dispatch-in-rank-list", lambda: deep_ep.Buffer(None).dispatch(
        X.bfloat16(), topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=_m_idx([1, 1, 1, 2]),
        is_token_in_rank=[[True]] * 3), TypeError, "is_token_in_rank"),
    ("dep-dispatch-per-rank-shape", lambda: deep_ep.Buffer(None).dispatch(
        X.bfloat16(), topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=_m_idx([1, 1, 1, 2]),
        num_tokens_per_rank=_m_idx([3, 0])), ValueError, "num_tokens_per_rank"),
    ("dep-dispatch-per-rank-float", lambda: deep_ep.Buffer(None).dispatch(
        X.bfloat16(), topk_idx=IDS, topk_weights=WTS, num_tokens_per_expert=_m_idx([1, 1, 1, 2]),
        num_tokens_per_rank=torch.tensor([3.0])), ValueError, "num_tokens_per_rank"),
    ("fm-indices", lambda: flash_mla.flash_mla_with_kvcache(*_mla_args(), indices=torch.zeros(2, 1, 4)),
     NotImplementedError, "indices"),
    ("fm-descale-k", lambda: flash_mla.flash_mla_with_kvcache(*_mla_args(), descale_k=torch.ones(1)),
     NotImplementedError, "descale_k"),
    ("fm-packed-fp8", lambda: flash_mla.flash_mla_with_kvcache(*_mla_args(), is_fp8_kvcache=True),
     NotImplementedError, "kv_scale"),
    ("fm-topk", lambda: flash_mla.get_mla_metadata(torch.tensor([5], dtype=torch.int32), 16, 1, topk=64),
     NotImplementedError, "topk"),
    ("mla-scale-with-bf16-cache", lambda: deepkernels.mla_decode_with_kvcache(
        *_mla_args(), kv_scale=torch.ones(6, 64, 1)), ValueError, "kv_scale"),
    ("mla-write-kv-aliases-cache", lambda: (lambda c: deepkernels.write_mla_kv_cache(
        c, None, c.view(-1, 1, 576)[:2], torch.tensor([5, 6])))(torch.zeros(2, 16, 1, 576, dtype=torch.bfloat16)),
     ValueError, "kv_cache"),
]


def _raised_in_deepkernels(excinfo) -> bool:
    """The exception comes from deepkernels' own code (a check), not from torch or Python internals."""
    root = os.path.dirname(deepkernels.__file__)
    return any(str(entry.path).startswith(root) for entry in excinfo.traceback[-1:])


@pytest.mark.parametrize("call, exc, arg", [pytest.param(c, e, a, id=i) for i, c, e, a in BAD])
def test_bad_input_raises_clear_error(call, exc, arg):
    with pytest.raises(exc) as excinfo:
        call()
    message = str(excinfo.value)
    assert message.startswith(arg), f"{excinfo.typename}: {message!r} does not name {arg!r} first"
    assert "expected" in message and "got" in message, f"{message!r}: no 'expected ... got ...'"
    assert _raised_in_deepkernels(excinfo), f"raised outside deepkernels: {excinfo.traceback[-1]}"


def test_table_is_broad():
    families = {i.split("-")[0] for i, *_ in BAD}
    assert len(BAD) >= 200 and {"ptc", "gemm", "cont", "mask", "lay", "perm", "unp", "ep", "dep", "dg"} <= families


# ----------------------------------------------------------------------------------------------
# errors come before any write

def test_reference_path_raises_before_writing_out():
    args = contiguous(_misaligned())
    out = poison_(args["out"])
    with pytest.raises(ValueError, match="m_indices"):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(**args)
    assert out.isnan().all(), "out was written before the error"
    args = masked(_m_idx([3, 9]))
    out = poison_(args["out"])
    with pytest.raises(ValueError, match="masked_m"):
        OPS.m_grouped_fp8_gemm_nt_masked(*args.values())
    assert out.isnan().all()


def test_messages_state_expected_and_given():
    with pytest.raises(ValueError) as e:
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(_m_idx([0] * ALIGN + [5] * ALIGN)))
    assert re.search(r"m_indices: expected group ids .* in \[-1, 2\), got 5 at index 128", str(e.value)), e.value
    with pytest.raises(ValueError) as e:
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(**contiguous(_misaligned()))
    assert "multiples of 128" in str(e.value) and "row 5 in group 1" in str(e.value), e.value
    with pytest.raises(ValueError, match=r"masked_m: expected row counts .* got 9 at index 1"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(_m_idx([3, 9])))
    with pytest.raises(ValueError, match=r"num_experts: expected a multiple of num_ranks=3 .* got 4"):
        OPS.moe_get_dispatch_layout(IDS, 4, 3)
    with pytest.raises(ValueError, match=r"src_idx: expected row indices of x .* in \[-1, 3\), got 3 at index 1"):
        moe.permute(X, _m_idx([0, 3]))
    with pytest.raises(ValueError, match=r"pos: expected row indices of y .* in \[-1, 4\), got 4 at index \[0, 1\]"):
        moe.unpermute_reduce(Y, _m_idx([[0, 4]]))
    with pytest.raises(TypeError, match="expected_m: expected an int, got float 4.0"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(expected_m=4.0))
    with pytest.raises(TypeError, match=r"out_dtype: expected a torch.dtype \(float32 or bfloat16 or float16\), "
                                        r"got str 'bfloat16'"):
        deepkernels.per_token_cast_from_fp8(*_q(4, 128), "bfloat16")


# ----------------------------------------------------------------------------------------------
# valid edge inputs still work (and the Python-int-like types they may arrive as)

def test_valid_edges_on_the_reference():
    q, s = deepkernels.per_token_cast_to_fp8(torch.randn(2, 3, 256))  # [..., K]: documented, flattened
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    q, s = deepkernels.per_token_cast_to_fp8(torch.randn(4, 0))
    assert q.shape == (4, 0) and s.shape == (4, 0)
    # numpy ints where ints are expected
    per_rank, per_expert, _ = moe.get_dispatch_layout(IDS, np.int64(4), np.int32(2))
    assert per_expert.tolist() == [1, 1, 1, 2] and per_rank.tolist() == [2, 2]
    args = masked(expected_m=np.int64(4))
    deepkernels.m_grouped_fp8_gemm_nt_masked(**args)
    # masked_m at both ends, a contiguous layout with a partial padded tail and an all-padding tile
    deepkernels.m_grouped_fp8_gemm_nt_masked(**masked(_m_idx([0, 8])))
    ids = torch.full((3 * ALIGN,), -1, dtype=torch.int32)
    ids[:ALIGN] = 1
    ids[2 * ALIGN:2 * ALIGN + 7] = 0
    args = contiguous(ids, a=_q(3 * ALIGN, 128)[0], a_scale=_q(3 * ALIGN, 128)[1],
                      out=poison_(torch.empty(3 * ALIGN, 32, dtype=torch.bfloat16)))
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(**args)
    assert (args["out"][ids == -1] == 0).all() and not args["out"].isnan().any()
    # empty index tensors
    assert moe.permute(X, torch.empty(0, dtype=torch.int32)).shape == (0, 256)
    assert moe.unpermute_reduce(Y, torch.full((2, 3), -1, dtype=torch.int32)).abs().sum() == 0
    assert moe.get_dispatch_layout(torch.empty(0, 2, dtype=torch.int64), 4, 2)[2].shape == (0, 2)
    assert moe.positions_to_src_idx(_m_idx([[0, 3], [2, -1], [-1, -1]]), 5).tolist() == [0, -1, 1, 0, -1]
    # the masked expert layout takes its max_m from expert_out (any size), not from a default
    d, recv, hd = _dispatched()
    w = hd.recv_weights
    y = torch.randn(4, 5, 256)
    got = hd.expert_reduce(y, "masked")
    pos = hd.masked_layout(5)[0]
    assert torch.equal(got, moe.unpermute_reduce(y.reshape(20, 256), pos, w))
    # meta tensors (shape-only tracing): no value checks, shapes out
    assert moe.get_dispatch_layout(IDS.to("meta"), 4, 2)[2].shape == (3, 2)


@pytest.mark.parametrize("kernel_device", ["reference", pytest.param("emu", marks=pytest.mark.emu)])
def test_empty_k_gemms_are_zero(kernel_device):
    """K = 0 is a multiple of 16: an empty sum, 0 in every valid row, on the reference and the kernels alike."""
    ctx = reference() if kernel_device == "reference" else deepkernels.emulate()
    a, sa = _q(8, 0)
    b, sb = _w(32, 0)
    with ctx:
        assert (deepkernels.fp8_gemm_nt(a, sa, b, sb) == 0).all()
        out = poison_(torch.empty(ALIGN, 32, dtype=torch.bfloat16))
        ids = torch.full((ALIGN,), -1, dtype=torch.int32)
        ids[:3] = 1
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(_q(ALIGN, 0)[0], _q(ALIGN, 0)[1], _wg(2, 32, 0)[0],
                                                     _wg(2, 32, 0)[1], out, ids)
        assert (out == 0).all()
        out = poison_(torch.empty(2, 8, 32, dtype=torch.bfloat16))
        deepkernels.m_grouped_fp8_gemm_nt_masked(*_q(8, 0, lead=(2,)), *_wg(2, 32, 0), out, _m_idx([3, 0]), 3)
        assert (out[0, :3] == 0).all() and out[0, 3:].isnan().all() and out[1].isnan().all()


@pytest.fixture
def check_mode(monkeypatch):
    monkeypatch.setenv("DEEPKERNELS_CHECK", "1")


def test_device_checks_switch(monkeypatch):
    from deepkernels._ops import device_checks_enabled

    for value, on in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("DEEPKERNELS_CHECK", value)
        assert device_checks_enabled() is on, value
    monkeypatch.delenv("DEEPKERNELS_CHECK")
    assert device_checks_enabled() is False


# ----------------------------------------------------------------------------------------------
# the CUDA kernels (emulated on CPU tensors; `cuda` on a GPU): trusted indices never read out of bounds and
# poison their output; DEEPKERNELS_CHECK=1 raises the reference's error; valid edges match the reference.

def test_cuda_trusted_src_idx_poisons_rows(kernel_device):
    x = torch.randn(3, 256, device=kernel_device)
    src = torch.tensor([2, 3, -1, 1000, -7, 0], dtype=torch.int32, device=kernel_device)
    out = moe.permute(x, src).cpu()
    assert torch.equal(out[[0, 5]], x.cpu()[[2, 0]]) and (out[2] == 0).all()
    assert out[[1, 3, 4]].isnan().all(), "an out-of-range src_idx must give a NaN row"
    xi = torch.arange(12, dtype=torch.int32, device=kernel_device).view(3, 4)
    assert (moe.permute(xi, src).cpu()[[1, 3, 4]] == -1).all()  # integer rows: 0xFF bytes
    q, s = moe.permute_fp8(x, src)
    q, s = q.cpu(), s.cpu()
    assert s[[1, 3, 4]].isnan().all() and q[[1, 3, 4]].float().isnan().all()
    assert torch.isfinite(s[[0, 2, 5]]).all()


def test_cuda_trusted_pos_poisons_rows(kernel_device):
    y = torch.randn(4, 256, device=kernel_device)
    pos = torch.tensor([[0, 1], [2, 4], [-9, -1], [3, -1]], dtype=torch.int32, device=kernel_device)
    out = moe.unpermute_reduce(y, pos).cpu()
    assert out[[1, 2]].isnan().all(), "an out-of-range pos must give a NaN row"
    torch.testing.assert_close(out[0], (y[0] + y[1]).cpu(), rtol=0, atol=0)
    torch.testing.assert_close(out[3], y[3].cpu(), rtol=0, atol=0)


def _valid_only_layout(ids, num_experts, num_ranks):
    """The reference layout of the ids in [-1, E), the others masked to -1."""
    with reference():
        return moe.get_dispatch_layout(torch.where((ids < -1) | (ids >= num_experts), -1, ids), num_experts,
                                       num_ranks)


@pytest.mark.parametrize("bad", [8, 1000, -2, -(2**40), 2**40])
@pytest.mark.parametrize("where", ["first-cta", "last-cta"])
def test_cuda_trusted_topk_idx_poisons_every_count(kernel_device, bad, where):
    """An id outside [-1, E) on the (trusted) layout kernel: EVERY count of both outputs is negative, exactly
    INT_MIN + the count of the valid ids (so no count of a bad batch looks plausible), whichever CTA saw
    it; is_token_in_rank holds the valid ids. The op itself (raw) does the same; the reference refuses."""
    torch.manual_seed(0)
    t, e, r = 700, 8, 4  # three 256-token CTAs; the bad id in the first or only in the last one
    ids = torch.randint(-1, e, (t, 3))
    ids[3 if where == "first-cta" else 650, 1] = bad
    want = _valid_only_layout(ids, e, r)
    dev_ids = ids.to(kernel_device)
    for got in (moe.get_dispatch_layout(dev_ids, e, r, check_values=False),
                OPS.moe_get_dispatch_layout(dev_ids, e, r)):
        for name, g, w in zip(("num_tokens_per_rank", "num_tokens_per_expert"), got[:2], want[:2]):
            g = g.cpu()
            assert (g < 0).all(), f"{name}: an id {bad} must make every count negative, got {g.tolist()}"
            assert torch.equal(g, w + moe.LAYOUT_POISON_BIT), f"{name}: {g.tolist()} vs valid {w.tolist()}"
            assert torch.equal(g & 0x7FFFFFFF, w), name
        assert torch.equal(got[2].cpu(), want[2])
    with reference(), pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 8\)"):
        OPS.moe_get_dispatch_layout(ids, e, r)
    # a valid batch of the same size is not poisoned
    ok = torch.where((ids < -1) | (ids >= e), -1, ids).to(kernel_device)
    got = moe.get_dispatch_layout(ok, e, r, check_values=False)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


def _fixed_capacity_run(kernel_device, ids, x, w):
    """Both fixed-capacity combines (weights on the expert side / on the source) of expert(x) = 2x + 1."""
    d = moe.EPDispatcher(None, num_experts=4, capacity=8)
    recv, hd = d.dispatch(x.to(kernel_device), ids.to(kernel_device), w.to(kernel_device))
    expert_out = hd.to_masked(recv)[0] * 2 + 1
    out_expert_side = d.combine(hd.expert_reduce(expert_out, "masked"), hd)
    out_source_side = d.combine_experts(expert_out, hd, w.to(kernel_device))
    return out_expert_side.cpu(), out_source_side.cpu(), hd


def test_cuda_trusted_topk_idx_fixed_capacity_combines_to_nan(kernel_device):
    """Fixed capacity (no sync, graph-capturable): a token with an id outside [-1, E) comes back NaN from both
    combines (not the plausible sum of its valid experts); the other tokens are exact; the slot headers
    carry the poisoned (negative) counts. The reference path refuses the ids."""
    torch.manual_seed(2)
    x, w = torch.randn(6, 128), torch.rand(6, 2)
    ids = torch.tensor([[0, 3], [1, -1], [2, 3], [0, 1], [3, 2], [1, 0]])
    bad = ids.clone()
    bad[1, 1], bad[4, 0] = 4, -5
    good = torch.where((bad < -1) | (bad >= 4), -1, bad)
    got_e, got_s, hd = _fixed_capacity_run(kernel_device, bad, x, w)
    want_e, want_s, _ = _fixed_capacity_run(kernel_device, good, x, w)
    for name, got, want in (("combine", got_e, want_e), ("combine_experts", got_s, want_s)):
        assert got[[1, 4]].isnan().all(), f"{name}: a token with a bad id must combine to a NaN row"
        assert torch.equal(got[[0, 2, 3, 5]], want[[0, 2, 3, 5]]), name
    assert (hd.num_recv_tokens_per_rank.cpu() < 0).all()
    with reference(), pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\)"):
        _fixed_capacity_run("cpu", bad, x, w)


def test_cuda_trusted_topk_idx_normal_mode_raises_at_the_counts_sync(kernel_device):
    """Normal mode has a host sync anyway (the counts): the layout kernel's poisoned counts are checked there."""
    bad = IDS.clone()
    bad[2, 0] = 7
    d = moe.EPDispatcher(None, num_experts=4)
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\) or -1 \(unused\), got 7 at "
                                         r"index \[2, 0\]"):
        d.dispatch(X.to(kernel_device), bad.to(kernel_device), WTS.to(kernel_device))
    recv, hd = d.dispatch(X.to(kernel_device), IDS.to(kernel_device), WTS.to(kernel_device))  # still usable
    assert recv.shape == (3, 256) and hd.num_recv_tokens_per_expert_list == [1, 1, 1, 2]


def test_source_slot_positions_checks_or_poisons_ids():
    pos = torch.tensor([[0, -1], [1, 0], [2, 1]], dtype=torch.int32)
    bad = IDS.clone()
    bad[1, 0] = 9
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\)"):
        moe.source_slot_positions(bad, pos, 4, 2, 2)
    got = moe.ops._source_slot_positions(bad, pos, 4, 2, 2)  # the trusted core (CUDA): the token poisoned
    assert (got[1] == moe.POISON_POS).all()
    assert torch.equal(got[[0, 2]], moe.source_slot_positions(IDS, pos, 4, 2, 2)[[0, 2]])


# ----------------------------------------------------------------------------------------------
# consumers of the poisoned layout counts (h18moerev): nothing downstream turns them back into plausible numbers

def test_cuda_trusted_poisoned_counts_poison_expert_positions(kernel_device):
    """get_dispatch_layout(check_values=False) on the kernels with an id outside [-1, E): its counts (INT_MIN +
    count) fed to the trusted expert_positions core (what runs on CUDA) -- directly or as segment starts summed
    from them, contiguous or masked (limit) -- give POISON_POS for every real entry, never positions: the int32
    wrap used to cancel the poison and return exactly the valid batch's positions (or, masked, drop every entry
    to -1: silent zeros). Downstream the gathers skip them and the reduce gives NaN rows. On CPU tensors the
    public expert_positions refuses such counts naming them."""
    e = 8
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, e + 5], [1, 2]])
    _, per_expert, _ = moe.get_dispatch_layout(ids.to(kernel_device), e, 1, check_values=False)
    per_expert = per_expert.cpu()
    assert (per_expert < 0).all()
    local = torch.where((ids >= 0) & (ids < e), ids, -1)
    real = local >= 0
    seg = torch.cumsum(per_expert.long(), 0) - per_expert.long()
    cases = {"contiguous": moe.ops._expert_positions(local, e, seg, per_expert),
             "contiguous, counts None": moe.ops._expert_positions(local, e, seg),
             "masked": moe.ops._expert_positions(local, e, torch.arange(e) * 4, per_expert, limit=4)}
    for name, pos in cases.items():
        assert (pos[real] == moe.POISON_POS).all() and (pos[~real] == -1).all(), f"{name}: {pos.tolist()}"
    y = torch.randn(4 * e, 128, device=kernel_device)
    out = moe.unpermute_reduce(y, cases["contiguous"].to(kernel_device)).cpu()
    assert out.isnan().all(1).tolist() == real.any(1).tolist(), "poisoned positions must reduce to NaN rows"
    assert (moe.ops._positions_to_src_idx(cases["masked"], 4 * e) == -1).all()
    with pytest.raises(ValueError, match=r"counts: expected the histogram of local_ids"):
        moe.expert_positions(local, e, seg.clamp(min=0), per_expert)
    with pytest.raises(ValueError, match=r"segment_start: expected row offsets >= 0"):
        moe.expert_positions(local, e, seg)
    good = moe.ops._expert_positions(local, e, torch.arange(e) * 4, None, limit=4)  # valid counts: unchanged
    assert (good[real] >= 0).all()


@pytest.mark.parametrize("bad", [4, 9, -2, 2**31 - 1, -2**31, 2**40, 3])
def test_low_latency_combine_topk_idx_must_match_dispatch(kernel_device, bad, monkeypatch):
    """low_latency_combine's topk_idx: the dispatch's ids or -1 per slot. Anything else (out of range, -2, or
    another valid expert) was silently ignored (the dispatch's ids were used, -2 skipped like -1): now the
    kernels (no sync) give that token a NaN row, the others exact; the reference and DEEPKERNELS_CHECK=1 raise
    ValueError naming topk_idx."""
    def run(ids_c, device):
        buf = deep_ep.Buffer(None)
        x, ids, w = X.bfloat16().to(device), IDS.to(device), WTS.to(device)
        packed, _, handle, _, _ = buf.low_latency_dispatch(x, ids, 4, 4, use_fp8=False)
        return buf.low_latency_combine(packed, ids_c.to(device), w, handle)[0].cpu()

    ids_c = IDS.clone()
    ids_c[1, 0] = bad  # IDS[1, 0] == 1
    skipped = IDS.clone()
    skipped[2, 1] = -1
    want = run(IDS, kernel_device)
    got = run(ids_c, kernel_device)
    assert got[1].float().isnan().all(), f"topk_idx {bad} at combine must give its token a NaN row"
    assert torch.equal(got[[0, 2]], want[[0, 2]])
    assert not run(skipped, kernel_device).float().isnan().any()  # -1: the slot skipped, as before
    monkeypatch.setenv("DEEPKERNELS_CHECK", "1")
    with pytest.raises(ValueError, match=rf"topk_idx: expected the expert ids given to low_latency_dispatch \(or -1 "
                                         rf"to skip a slot\), got {bad} at index \[1, 0\] where dispatch had 1"):
        run(ids_c, kernel_device)
    monkeypatch.delenv("DEEPKERNELS_CHECK")
    with reference(), pytest.raises(ValueError, match=r"topk_idx: expected the expert ids given to low_latency"):
        run(ids_c, "cpu")


@pytest.mark.parametrize("bad", [4, 13, -2, 2**31 - 1, -2**31, 2**32 + 1, -2**63])
def test_fixed_capacity_bad_ids_checked_after_the_collective(kernel_device, bad, monkeypatch):
    """Fixed capacity: the ids are never refused before the collective (a rank raising alone would leave its
    peers waiting in it); the layout's poisoned counts travel in the slot headers. Reference path and
    DEEPKERNELS_CHECK=1: dispatch raises ValueError naming topk_idx and the first bad id after reading the
    headers; trusted kernels: NaN rows at combine, negative headers (every bad value, incl. int64 ids that
    truncate to a valid int32)."""
    ids = IDS.clone()
    ids[2, 1] = bad
    x, w = X.to(kernel_device), WTS.to(kernel_device)
    d = moe.EPDispatcher(None, num_experts=4, capacity=4)
    recv, hd = d.dispatch(x, ids.to(kernel_device), w)
    assert (hd.num_recv_tokens_per_rank.cpu() < 0).all() and hd.bad_tokens.cpu().view(-1).tolist() == [0, 0, 1]
    out = d.combine(hd.expert_reduce(hd.to_masked(recv)[0], "masked"), hd).cpu()
    assert out[2].isnan().all() and not out[:2].isnan().any()
    msg = rf"topk_idx: expected expert ids in \[0, 4\) or -1 \(unused\), got {bad} at index \[2, 1\]"
    monkeypatch.setenv("DEEPKERNELS_CHECK", "1")
    with pytest.raises(ValueError, match=msg):
        d.dispatch(x, ids.to(kernel_device), w)
    monkeypatch.delenv("DEEPKERNELS_CHECK")
    with reference(), pytest.raises(ValueError, match=msg):
        d.dispatch(X, ids, WTS)


def test_id_check_ops_raise_and_pass_opcheck():
    """The two host-side id checks behind the fixed-capacity dispatch / low_latency_combine (reference checks:
    CPU kernels, like every reference's value check): raise naming topk_idx; valid inputs pass opcheck."""
    from deepkernels.testing import opcheck

    hdr = torch.tensor([[3, 4, 0, 0], [2, 4, 0, 0]], dtype=torch.int32)
    ids = torch.tensor([[0, 1], [2, -1]])
    opcheck(OPS.moe_check_slot_headers, (hdr, ids, 4, 0))
    opcheck(OPS.moe_check_combine_ids, (ids, ids))
    OPS.moe_check_combine_ids(torch.tensor([[-1, 1], [-1, -1]]), ids)  # -1 skips a slot
    poisoned = hdr.clone()
    poisoned[1, 0] |= moe.LAYOUT_POISON_BIT
    with pytest.raises(ValueError, match=r"on every rank, got out-of-range ids on rank\(s\) \[1\]"):
        OPS.moe_check_slot_headers(poisoned, ids, 4, 0)
    # a poisoned header of this rank's own whose ids hold no bad id (corrupted headers): still a ValueError
    with pytest.raises(ValueError, match=r"on every rank, got out-of-range ids on rank\(s\) \[1\]"):
        OPS.moe_check_slot_headers(poisoned, ids, 4, 1)
    bad = ids.clone()
    bad[1, 1] = 9
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\) or -1 \(unused\), got 9 at "
                                         r"index \[1, 1\]"):
        OPS.moe_check_slot_headers(poisoned, bad, 4, 1)
    with pytest.raises(ValueError, match=r"topk_idx: expected the expert ids given to low_latency_dispatch \(or -1 "
                                         r"to skip a slot\), got 9 at index \[1, 1\] where dispatch had -1"):
        OPS.moe_check_combine_ids(bad, ids)
    with pytest.raises(ValueError, match=r"slot_headers: expected"):
        OPS.moe_check_slot_headers(hdr[:, :3], ids, 4, 0)
    with pytest.raises(ValueError, match=r"rank: expected"):
        OPS.moe_check_slot_headers(hdr, ids, 4, 2)
    # the reference reduce names the sentinel the trusted paths write (torch.compile'd fixed capacity reaches it)
    pos = torch.tensor([[0, -1], [1, moe.POISON_POS]], dtype=torch.int32)
    with reference(), pytest.raises(ValueError, match=r"pos: expected row indices of y in \[-1, 2\), got POISON_POS "
                                                      r"\(-2147483648\) at index \[1, 1\]: token 1 was poisoned"):
        moe.unpermute_reduce(torch.randn(2, 16), pos)


@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 65, 100])
@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 136), (torch.bfloat16, 256), (torch.float16, 40)])
def test_unpermute_reduce_any_k_matches_reference(kernel_device, k, dtype, hidden):
    """Any number of columns in pos (the combine's pos has one per rank: > 32 with EP over 33+ ranks): the
    kernel keeps 32 slots per chunk in its warp's lanes; bit-identical to the reference for every K; an
    out-of-range entry in any chunk makes its token's row NaN."""
    torch.manual_seed(k)
    n, t = 90, 5
    y = torch.randn(n, hidden).to(dtype)
    pos = torch.randint(-1, n, (t, k), dtype=torch.int32)
    w = torch.rand(t, k)
    with reference():
        want = moe.unpermute_reduce(y, pos, w)
        want_nw = moe.unpermute_reduce(y, pos)
    got = moe.unpermute_reduce(y.to(kernel_device), pos.to(kernel_device), w.to(kernel_device)).cpu()
    assert torch.equal(got, want), f"k={k}: max diff {(got.float() - want.float()).abs().max()}"
    got = OPS.moe_unpermute_reduce(y.to(kernel_device), pos.to(kernel_device), None).cpu()
    assert torch.equal(got, want_nw), f"k={k} (no weights)"
    pos[3, k - 1] = n  # out of range in the last chunk
    got = moe.unpermute_reduce(y.to(kernel_device), pos.to(kernel_device), w.to(kernel_device)).cpu()
    assert got[3].isnan().all() and torch.equal(got[[0, 1, 2, 4]], want[[0, 1, 2, 4]])


def _at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous view whose data pointer is one element past an aligned address."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def test_cuda_mla_q_at_odd_offset_matches_reference(kernel_device):
    """A contiguous q whose data pointer is not 16-byte aligned (a view at an odd offset): the binding used to
    pass it as is (.contiguous() returns the same view) and the kernel's 16-byte copies faulted (the emulator
    reported a misaligned cp.async: an illegal address on a GPU); now it reads an aligned copy."""
    args = _mla_args()
    with reference():
        want = deepkernels.mla_decode_with_kvcache(*args)
    dev = [a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args]
    dev[0] = _at_odd_offset(dev[0])
    assert dev[0].data_ptr() % 16 != 0
    got = deepkernels.mla_decode_with_kvcache(*dev)
    for g, w, name in zip(got, want, ("out", "lse")):
        diff = calc_diff(g.cpu().float(), w.float())
        assert diff < 1e-4, f"{name}: calc_diff {diff:.2e}"


@pytest.mark.parametrize("capacity", [None, 4])
def test_cuda_dispatch_zero_hidden(kernel_device, capacity):
    """H = 0 (an empty hidden dim) runs through dispatch, both expert layouts and both combines (the masked
    expert_reduce / combine_experts used to fail reshaping [L, max_m, 0] with -1)."""
    d = moe.EPDispatcher(None, num_experts=4, capacity=capacity)
    recv, hd = d.dispatch(torch.zeros(3, 0, device=kernel_device), IDS.to(kernel_device), WTS.to(kernel_device))
    assert recv.shape == (hd.num_recv, 0)
    eo, _ = hd.to_masked(recv) if capacity else (None, None)
    if capacity:
        assert d.combine_experts(eo, hd).shape == (3, 0)
        assert d.combine(hd.expert_reduce(eo, "masked"), hd).shape == (3, 0)
    else:
        rows, _ = hd.to_contiguous(recv)
        assert d.combine(hd.expert_reduce(rows), hd).shape == (3, 0)
    permute_src = torch.tensor([0, -1], dtype=torch.int32, device=kernel_device)
    assert moe.permute(torch.zeros(3, 8, device=kernel_device), permute_src).shape == (2, 8)  # an emulated launch


def test_cuda_layout_bins_limit_agrees(kernel_device):
    """num_experts + num_ranks == 8192 (the layout kernel's shared-memory bins) runs on both paths; one more is
    refused by both (it used to run on the reference and fail on the kernel, or fail allocating for huge E)."""
    ids = torch.tensor([[0, 8189], [4095, -1]])
    got = moe.get_dispatch_layout(ids.to(kernel_device), 8190, 2)
    with reference():
        want = moe.get_dispatch_layout(ids, 8190, 2)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match=r"num_experts: expected num_experts \+ num_ranks <= 8192, got 8192 \+ 2"):
        moe.get_dispatch_layout(ids.to(kernel_device), 8192, 2)


@pytest.mark.parametrize("kernel", ["portable", "sm90"])
def test_cuda_trusted_m_indices_give_nan_rows(kernel_device, kernel, monkeypatch):
    """Trusted m_indices on the kernels: each row is the right product for its own id, 0 for -1, or NaN (a row
    the kernel cannot compute: an id out of [0, G), or not its tile's group) -- never another value. A kernel
    tile is <= 128 rows, so a 128-aligned layout is always computed in full; an id >= G is always NaN."""
    if kernel == "sm90":
        if kernel_device == "cuda" and torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the TMA/wgmma kernel is built for sm_90a only")
        monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", "8")
    before = dict(deepkernels.emulator_stats()["kernels"])
    for ids in (_misaligned(), _padding_then_group(), _m_idx([0] * ALIGN + [2] * 3 + [-1] * (ALIGN - 3))):
        args = contiguous(ids)
        with reference():
            per_row = torch.stack([deepkernels.fp8_gemm_nt(args["a"], args["a_scale"], args["b"][g], args["b_scale"][g])
                                   for g in range(2)])  # [G, M, N]: every row under every group
        dev = {k: v.to(kernel_device) for k, v in args.items()}
        out = poison_(dev["out"])
        out.zero_()
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(**dev)
        out = out.cpu()
        nan_rows = out.isnan().all(1)
        assert (out.isnan().any(1) == nan_rows).all(), "a row is either all NaN or none"
        assert (out[ids == -1] == 0).all()
        assert nan_rows[(ids < -1) | (ids >= 2)].all(), "an id >= G must give a NaN row"
        assert nan_rows.any(), f"{ids.tolist()}: no row was refused"
        for r in ((ids >= 0) & (ids < 2) & ~nan_rows).nonzero().squeeze(1).tolist():
            diff = calc_diff(out[r], per_row[int(ids[r]), r])
            assert diff < 1e-4, f"row {r}: neither NaN nor its group's product (calc_diff {diff:.2e})"
    if kernel_device == "cpu":  # emulated: the kernel asked for is the one that ran
        ran = {k for k, v in deepkernels.emulator_stats()["kernels"].items() if v > before.get(k, 0)}
        assert any(("sm90" in k) == (kernel == "sm90") and "gemm" in k for k in ran), ran


def test_cuda_trusted_masked_m_is_clamped(kernel_device):
    args = {k: (v.to(kernel_device) if isinstance(v, torch.Tensor) else v)
            for k, v in masked(_m_idx([-3, 50])).items()}
    out = poison_(args["out"])
    deepkernels.m_grouped_fp8_gemm_nt_masked(**args)
    assert out[0].isnan().all() and not out[1].isnan().any()  # [0, Mmax]: group 0 none, group 1 all rows


def test_cuda_check_mode_raises(kernel_device, check_mode):
    with pytest.raises(ValueError, match="src_idx: expected row indices"):
        moe.permute(torch.randn(3, 256, device=kernel_device), _m_idx([0, 3]).to(kernel_device))
    with pytest.raises(ValueError, match="src_idx"):
        moe.permute_fp8(torch.randn(3, 256, device=kernel_device), _m_idx([-2]).to(kernel_device))
    with pytest.raises(ValueError, match="pos: expected row indices"):
        moe.unpermute_reduce(torch.randn(4, 256, device=kernel_device), _m_idx([[0, 4]]).to(kernel_device))
    with pytest.raises(ValueError, match="topk_idx: expected expert ids"):
        moe.get_dispatch_layout((IDS + 1).to(kernel_device), 4, 2, check_values=False)
    args = {k: v.to(kernel_device) for k, v in contiguous(_misaligned()).items()}
    out = poison_(args["out"])
    with pytest.raises(ValueError, match="m_indices: expected each group's rows in segments"):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(**args)
    assert out.isnan().all(), "checked mode must raise before the launch"
    args = {k: (v.to(kernel_device) if isinstance(v, torch.Tensor) else v) for k, v in masked(_m_idx([1, 9])).items()}
    with pytest.raises(ValueError, match="masked_m: expected row counts"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(**args)
    with pytest.raises(ValueError, match="topk_idx: expected expert ids"):
        moe.EPDispatcher(None, num_experts=4, capacity=4).dispatch(X.to(kernel_device), (IDS + 1).to(kernel_device))
    # valid inputs still run in checked mode
    assert moe.permute(torch.randn(3, 256, device=kernel_device), SRC.to(kernel_device)).shape == (4, 256)


def test_cuda_valid_edges_match_reference(kernel_device):
    def both(fn, *args):
        got = fn(*[a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args])
        with reference():
            want = fn(*args)
        return got, want

    src = torch.tensor([2, -1, 0, -1, 1], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = (torch.randn(3, 130) * 4).to(dtype)
        got, want = both(moe.permute, x, src)
        assert torch.equal(got.cpu(), want), dtype
    got, want = both(moe.permute_fp8, torch.randn(3, 300), src)
    assert torch.equal(got[0].cpu().view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1].cpu(), want[1])
    pos = torch.tensor([[0, -1], [-1, -1], [4, 2]], dtype=torch.int32)
    got, want = both(moe.unpermute_reduce, torch.randn(5, 136), pos, torch.rand(3, 2))
    assert torch.equal(got.cpu(), want)
    got, want = both(moe.get_dispatch_layout, torch.tensor([[0, -1], [-1, -1], [3, 1]]), 4, 2)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    got, want = both(moe.permute, torch.randn(0, 64), torch.full((3,), -1, dtype=torch.int32))
    assert torch.equal(got.cpu(), want)
    ids = torch.full((2 * ALIGN,), -1, dtype=torch.int32)
    ids[:100] = 1
    ids[ALIGN:ALIGN + 1] = 0
    args = contiguous(ids)

    def run_contiguous(a, a_scale, b, b_scale, out, m_indices):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, poison_(out), m_indices)
        return out

    got, want = both(run_contiguous, *args.values())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
    assert (got.cpu()[ids == -1] == 0).all()


# ----------------------------------------------------------------------------------------------
# NaN / inf in the fp8 casts: exactly what fp8.py's docstrings state, reference and (emulated) kernel alike

def _nonfinite_token_input(dtype):
    x = torch.randn(4, 384)
    x[0, 5] = float("nan")                          # group (0, 0): NaN
    x[1, 130] = float("inf")                        # group (1, 1): +inf
    x[2, 300] = float("-inf")
    x[2, 301] = float("nan")                        # group (2, 2): NaN and inf -> NaN wins
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["reference", "kernel"])
def test_fp8_cast_nonfinite_groups_exactly_as_documented(device, dtype):
    if device == "kernel":
        if not deepkernels.build_info()["emulator"]:
            pytest.skip("the emulator is not built")
        ctx = deepkernels.emulate()
    else:
        ctx = reference()
    x = _nonfinite_token_input(dtype)
    w = torch.randn(260, 300)
    w[3, 5] = float("nan")                          # block (0, 0)
    w[200, 290] = float("-inf")                     # block (1, 2)
    w = w.to(dtype)
    with ctx:
        before = deepkernels.emulator_stats()["launches"]
        q, s = deepkernels.per_token_cast_to_fp8(x)
        qb, sb = deepkernels.per_block_cast_to_fp8(w)
        if device == "kernel":
            assert deepkernels.emulator_stats()["launches"] >= before + 2
    q, qb = q.float(), qb.float()
    # per token: NaN group -> scale NaN, all 128 values NaN
    assert math.isnan(s[0, 0]) and q[0, :128].isnan().all()
    # +inf group -> scale +inf, NaN where the inf was, 0 elsewhere; dequantised: all NaN
    assert s[1, 1] == float("inf") and q[1, 130].isnan() and (q[1, 128:256][torch.arange(128) != 2] == 0).all()
    # NaN and inf in one group -> NaN
    assert math.isnan(s[2, 2]) and q[2, 256:].isnan().all()
    finite = torch.ones_like(s, dtype=torch.bool)
    finite[0, 0] = finite[1, 1] = finite[2, 2] = False
    assert torch.isfinite(s[finite]).all() and not q[3].isnan().any()
    with reference():
        back = deepkernels.per_token_cast_from_fp8(q.to(E4M3), s)
    assert back[0, :128].isnan().all() and back[1, 128:256].isnan().all() and back[2, 256:].isnan().all()
    assert torch.isfinite(back[3]).all() and torch.isfinite(back[0, 128:]).all()
    # per block: the same per 128x128 block
    assert math.isnan(sb[0, 0]) and qb[:128, :128].isnan().all()
    assert sb[1, 2] == float("inf") and qb[200, 290].isnan()
    blk = qb[128:256, 256:300].clone()
    blk[200 - 128, 290 - 256] = 0
    assert (blk == 0).all()
    other = torch.ones_like(sb, dtype=torch.bool)
    other[0, 0] = other[1, 2] = False
    assert torch.isfinite(sb[other]).all()
