"""FP8 blockwise GEMM on DeepSeek-V3 shapes: TFLOPS of ours vs torch._scaled_mm with the same
blockwise scales (1x128 activations, 128x128 weights; cuBLASLt) measured in the same run."""
from __future__ import annotations

import torch

import deepkernels
from deepkernels import gemm

from .common import Context, Row, time_ms

FAMILY = "gemm"

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048)]  # (groups, m per group, n, k), DeepGEMM's table
MASKED = [(1, 1024, 4096, 7168), (2, 512, 7168, 2048), (4, 256, 4096, 7168)]  # (groups, m per group, n, k)


def _operands(m, n, k, device, groups=None):
    lead = () if groups is None else (groups,)
    a = torch.randn(*lead, m, k, device=device, dtype=torch.bfloat16)
    aq, sa = deepkernels.per_token_cast_to_fp8(a)
    b = torch.randn(*lead, n, k, device=device, dtype=torch.bfloat16)
    if groups is None:
        bq, sb = deepkernels.per_block_cast_to_fp8(b)
    else:
        pairs = [deepkernels.per_block_cast_to_fp8(b[g]) for g in range(groups)]
        bq, sb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return aq, sa, bq, sb


def _scaled_mm_peer(aq, sa, bq, sb):
    """(name, fn) for a torch._scaled_mm call that runs here and whose result agrees with the reference
    (calc_diff < 1e-3), so a mis-laid-out scale never yields a bogus ratio; else None."""
    if aq.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    from deepkernels.testing import calc_diff

    want = torch.empty(aq.size(0), bq.size(0), dtype=torch.bfloat16, device=aq.device)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    scale_a = sa.t().contiguous().t()  # cuBLASLt wants the 1x128 scales outer-dim-major
    one = torch.ones((), device=aq.device)
    candidates = [
        ("torch._scaled_mm blockwise", lambda: torch._scaled_mm(aq, bq.t(), scale_a, sb, out_dtype=torch.bfloat16), True),
        ("torch._scaled_mm blockwise", lambda: torch._scaled_mm(aq, bq.t(), scale_a, sb.t(), out_dtype=torch.bfloat16), True),
        ("torch._scaled_mm per-tensor (easier problem)",
         lambda: torch._scaled_mm(aq, bq.t(), one, one, out_dtype=torch.bfloat16), False),
    ]
    for name, fn, same_maths in candidates:
        try:
            got = fn()
            torch.cuda.synchronize()
        except (RuntimeError, TypeError, ValueError):
            continue
        if not same_maths or calc_diff(got.float(), want.float()) < 1e-3:
            return name, fn
    return None


def _tflops(m, n, k, ms):
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def run(ctx: Context) -> list[Row]:
    rows = []
    if ctx.device.type == "cpu":  # smoke run of the reference: tiny shapes
        nk, dense_m, grouped, masked = [(512, 256), (256, 512)], [16], [(2, 128, 256, 256)], [(2, 64, 256, 256)]
    else:
        nk, dense_m, grouped, masked = NK, DENSE_M, GROUPED, MASKED
    for m in dense_m:
        for n, k in nk:
            aq, sa, bq, sb = _operands(m, n, k, ctx.device)
            out = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
            ms = time_ms(lambda: deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out), ctx)
            peer = _scaled_mm_peer(aq, sa, bq, sb)
            peer_ms = time_ms(peer[1], ctx) if peer else None
            rows.append(Row(FAMILY, {"kind": "dense", "m": m, "n": n, "k": k}, "TFLOPS", _tflops(m, n, k, ms),
                            peer[0] if peer else None,
                            _tflops(m, n, k, peer_ms) if peer_ms else None, ms,
                            extra={"compiled_kernel": gemm_kernel_compiled()}))
    for groups, m_per, n, k in grouped:
        align = deepkernels.get_m_alignment_for_contiguous_layout()
        m = groups * ((m_per + align - 1) // align) * align
        aq, sa, _, _ = _operands(m, n, k, ctx.device)
        _, _, bq, sb = _operands(1, n, k, ctx.device, groups=groups)
        m_indices = torch.arange(groups, device=ctx.device, dtype=torch.int32).repeat_interleave(m // groups)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
        ms = time_ms(lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_indices), ctx)
        rows.append(Row(FAMILY, {"kind": "contiguous", "groups": groups, "m": m_per, "n": n, "k": k}, "TFLOPS",
                        _tflops(m, n, k, ms), None, None, ms))
    for groups, m_per, n, k in masked:
        aq, sa, bq, sb = _operands(m_per, n, k, ctx.device, groups=groups)
        out = torch.empty(groups, m_per, n, dtype=torch.bfloat16, device=ctx.device)
        masked_m = torch.full((groups,), m_per, dtype=torch.int32, device=ctx.device)
        ms = time_ms(lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, m_per), ctx)
        rows.append(Row(FAMILY, {"kind": "masked", "groups": groups, "m": m_per, "n": n, "k": k}, "TFLOPS",
                        _tflops(groups * m_per, n, k, ms), None, None, ms))
    return rows


def gemm_kernel_compiled() -> bool:
    from deepkernels._ops import has_cuda_kernel

    return has_cuda_kernel("fp8_gemm_nt")
