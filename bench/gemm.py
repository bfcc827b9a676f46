"""FP8 blockwise GEMM on DeepSeek-V3 shapes: TFLOPS of ours vs torch._scaled_mm with the same
blockwise scales (1x128 activations, 128x128 weights; cuBLASLt) measured in the same run."""
from __future__ import annotations

import torch

import deepkernels
from deepkernels import gemm

from .common import Context, Row, kernel_variants, time_ms

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


def _into(reference, out, a, a_scale, b, b_scale, **rest):
    reference(a, a_scale, b, b_scale, out, **rest)
    return out


def _timed(ctx: Context, case: dict, flops: int, call, reference, peer=None) -> list[Row]:
    """One row per kernel variant (the default, and the opt-in sm_90a kernel on Hopper): the result is
    first checked against the reference (calc_diff < 1e-4 on the same quantised inputs) so a wrong kernel
    never gets a speed; peer = (name, fn) timed once beside the default kernel."""
    from deepkernels.testing import calc_diff

    rows = []
    want = reference()
    for label, variant in kernel_variants(ctx, "DEEPKERNELS_GEMM_SM90"):
        with variant:
            got = call()
            extra = {"kernel": label, "compiled_kernel": gemm_kernel_compiled()}
            diff = calc_diff(got.float(), want.float())
            extra["calc_diff_vs_reference"] = diff
            if not diff < 1e-4:
                rows.append(Row(FAMILY, {**case, "kernel": label}, "TFLOPS", 0.0, None, None, None,
                                {**extra, "error": f"wrong result: calc_diff {diff:.2e} vs the reference"}))
                continue
            ms = time_ms(call, ctx)
        peer_name, peer_ms = None, None
        if peer is not None and label == "default":
            peer_name, peer_ms = peer[0], time_ms(peer[1], ctx)
        rows.append(Row(FAMILY, {**case, "kernel": label} if label != "default" else case, "TFLOPS",
                        flops / (ms * 1e-3) / 1e12, peer_name,
                        flops / (peer_ms * 1e-3) / 1e12 if peer_ms else None, ms, extra))
    return rows


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
            rows += _timed(ctx, {"kind": "dense", "m": m, "n": n, "k": k}, 2 * m * n * k,
                           lambda: deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out),
                           lambda: _into(gemm.fp8_gemm_nt_ref, torch.empty_like(out), aq, sa, bq, sb),
                           _scaled_mm_peer(aq, sa, bq, sb))
    for groups, m_per, n, k in grouped:
        align = deepkernels.get_m_alignment_for_contiguous_layout()
        m = groups * ((m_per + align - 1) // align) * align
        aq, sa, _, _ = _operands(m, n, k, ctx.device)
        _, _, bq, sb = _operands(1, n, k, ctx.device, groups=groups)
        m_indices = torch.arange(groups, device=ctx.device, dtype=torch.int32).repeat_interleave(m // groups)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
        rows += _timed(ctx, {"kind": "contiguous", "groups": groups, "m": m_per, "n": n, "k": k}, 2 * m * n * k,
                       lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_indices),
                       lambda: _into(gemm.m_grouped_fp8_gemm_nt_contiguous_ref, torch.empty_like(out),
                                     aq, sa, bq, sb, m_indices=m_indices))
    for groups, m_per, n, k in masked:
        aq, sa, bq, sb = _operands(m_per, n, k, ctx.device, groups=groups)
        out = torch.empty(groups, m_per, n, dtype=torch.bfloat16, device=ctx.device)
        masked_m = torch.full((groups,), m_per, dtype=torch.int32, device=ctx.device)
        rows += _timed(ctx, {"kind": "masked", "groups": groups, "m": m_per, "n": n, "k": k},
                       2 * groups * m_per * n * k,
                       lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, m_per),
                       lambda: _into(gemm.m_grouped_fp8_gemm_nt_masked_ref, torch.empty_like(out),
                                     aq, sa, bq, sb, masked_m=masked_m, expected_m=m_per))
    return rows


def gemm_kernel_compiled() -> bool:
    from deepkernels._ops import has_cuda_kernel

    return has_cuda_kernel("fp8_gemm_nt")
