"""FP8 blockwise GEMM on DeepSeek-V3 shapes: TFLOPS of ours vs torch._scaled_mm with the same
blockwise scales (1x128 activations, 128x128 weights; cuBLASLt) measured in the same run.
Training GEMMs (wgrad, k-grouped wgrad; 1x128 scales on both operands, fp32 out accumulated) on
DeepGEMM's test shapes vs torch._scaled_mm with 1x128 scales on both where it runs and agrees, else a
matmul of the pre-dequantised operands (bf16 on CUDA, fp32 on the CPU)."""
from __future__ import annotations

import contextlib

import torch

import deepkernels
from deepkernels import gemm

from .common import Context, Row, kernel_variants, time_ms

FAMILY = "gemm"

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048)]  # (groups, m per group, n, k), DeepGEMM's table
MASKED = [(1, 1024, 4096, 7168), (2, 512, 7168, 2048), (4, 256, 4096, 7168)]  # (groups, m per group, n, k)
# DeepGEMM's test_wgrad_gemm / test_k_grouped_wgrad_gemm: (m, n, k = tokens) and (groups, base k, m, n)
WGRAD = [(7168, 2112, 4096), (1536, 24576, 4096), (512, 32768, 4096), (7168, 4096, 8192), (2048, 7168, 8192)]
K_GROUPED_WGRAD = [(4, 4096, 7168, 4096), (8, 4096, 2048, 7168)]


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


def _timed(ctx: Context, case: dict, flops: int, call, reference, peer=None, prepare=None,
           flag: str | None = "DEEPKERNELS_GEMM_SM90") -> list[Row]:
    """One row per kernel variant (the default, and the opt-in sm_90a kernel on Hopper): the result is
    first checked against the reference (calc_diff < 1e-4 on the same quantised inputs) so a wrong kernel
    never gets a speed; peer = (name, fn) timed once beside the default kernel. ``prepare`` runs before
    each check (resets an accumulated output); flag None: the family has one kernel (no opt-in variant)."""
    from deepkernels.testing import calc_diff

    rows = []
    want = reference()
    variants = kernel_variants(ctx, flag) if flag else [("default", contextlib.nullcontext())]
    for label, variant in variants:
        with variant:
            if prepare is not None:
                prepare()
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
    rows += _wgrad_rows(ctx)
    return rows


def _per_token_operands(rows: int, k: int, device):
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    return deepkernels.per_token_cast_to_fp8(x)


def _wgrad_peer(aq, sa, bq, sb, out):
    """(name, fn) for the wgrad product out + a @ b^T: torch._scaled_mm with 1x128 scales on both operands when
    it runs here and agrees with the reference (calc_diff < 1e-3), else a matmul of the pre-dequantised operands
    (the dequantisation not timed): bf16 on CUDA (cuBLAS), fp32 on the CPU."""
    from deepkernels.testing import calc_diff

    want = out.clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq, sa, bq, sb, want)
    if aq.device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        scale_a, scale_b = sa.t().contiguous().t(), sb.t().contiguous().t()  # outer-dim-major 1x128 scales
        for fn in (lambda: out + torch._scaled_mm(aq, bq.t(), scale_a, scale_b.t(), out_dtype=torch.float32),
                   lambda: out + torch._scaled_mm(aq, bq.t(), scale_a, scale_b, out_dtype=torch.float32)):
            try:
                got = fn()
                torch.cuda.synchronize()
            except (RuntimeError, TypeError, ValueError):
                continue
            if calc_diff(got, want) < 1e-3:
                return "torch._scaled_mm 1x128 x 1x128 (fp32 out + residual)", fn
    dtype = torch.bfloat16 if aq.device.type == "cuda" else torch.float32
    a_deq = deepkernels.per_token_cast_from_fp8(aq, sa, dtype)
    b_deq = deepkernels.per_token_cast_from_fp8(bq, sb, dtype)
    name = f"torch.matmul {str(dtype).replace('torch.', '')} (pre-dequantised)"
    return name, lambda: torch.addmm(out, a_deq, b_deq.t()) if dtype == torch.float32 else \
        out + torch.matmul(a_deq, b_deq.t())


def _wgrad_rows(ctx: Context) -> list[Row]:
    rows = []
    if ctx.device.type == "cpu":  # smoke run of the reference: tiny shapes
        wgrad, k_grouped = [(256, 256, 512)], [(2, 256, 128, 256)]
    else:
        wgrad, k_grouped = WGRAD, K_GROUPED_WGRAD
    for m, n, k in wgrad:
        aq, sa = _per_token_operands(m, k, ctx.device)
        bq, sb = _per_token_operands(n, k, ctx.device)
        residual = torch.randn(m, n, device=ctx.device)
        out = residual.clone()
        rows += _timed(ctx, {"kind": "wgrad", "m": m, "n": n, "k": k}, 2 * m * n * k,
                       lambda: gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, out),
                       lambda: _into(gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref, residual.clone(), aq, sa, bq, sb),
                       _wgrad_peer(aq, sa, bq, sb, residual), prepare=lambda: out.copy_(residual))
    for groups, base_k, m, n in k_grouped:
        ks = [base_k + 128 * (-1) ** g for g in range(groups - 1)]  # K varies around base_k, as DeepGEMM's test
        ks.append(base_k * groups - sum(ks))
        pairs_a = [_per_token_operands(m, k, ctx.device) for k in ks]
        pairs_b = [_per_token_operands(n, k, ctx.device) for k in ks]
        a = torch.cat([q.flatten() for q, _ in pairs_a])
        b = torch.cat([q.flatten() for q, _ in pairs_b])
        sa = torch.cat([s.t() for _, s in pairs_a]).contiguous()
        sb = torch.cat([s.t() for _, s in pairs_b]).contiguous()
        residual = torch.randn(groups, m, n, device=ctx.device)
        out = residual.clone()
        peer = _wgrad_peer(pairs_a[0][0], pairs_a[0][1], pairs_b[0][0], pairs_b[0][1], residual[0])
        peer_fns = [_wgrad_peer(*pairs_a[g], *pairs_b[g], residual[g])[1] for g in range(groups)]
        rows += _timed(ctx, {"kind": "k_grouped_wgrad", "groups": groups, "m": m, "n": n, "k": sum(ks) // groups},
                       2 * m * n * sum(ks),
                       lambda: gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, out, ks),
                       lambda: _into(gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt_ref, residual.clone(), a, sa, b, sb,
                                     ks=ks),
                       (peer[0] + f", {groups} calls", lambda: [fn() for fn in peer_fns]),
                       prepare=lambda: out.copy_(residual))
    return rows


def gemm_kernel_compiled() -> bool:
    from deepkernels._ops import has_cuda_kernel

    return has_cuda_kernel("fp8_gemm_nt")
