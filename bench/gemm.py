"""FP8 blockwise GEMM on DeepSeek-V3 shapes: TFLOPS of ours vs torch._scaled_mm in the same run.

Peer, best available: torch._scaled_mm with blockwise scales (1x128 for a, 128x128 for b; cuBLASLt,
needs torch >= 2.9 and Hopper); else per-tensor-scaled _scaled_mm (a cheaper problem: noted in the
peer name); on the CPU the pure-torch reference (the only thing our ops run there).
"""
from __future__ import annotations

import torch

import deepkernels
from deepkernels import gemm

from .common import Context, Row, time_ms

FAMILY = "gemm"

DSV3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048)]   # groups, rows per group, N, K
MASKED = [(1, 1024, 4096, 7168), (2, 512, 7168, 2048), (4, 256, 4096, 7168), (4, 256, 7168, 2048)]  # G, Mmax, N, K


def _operands(m, n, k, device, groups=None):
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    a_q, a_s = deepkernels.per_token_cast_to_fp8(a)
    shape = (n, k) if groups is None else (groups, n, k)
    b_q = torch.randn(shape, device=device).to(torch.float8_e4m3fn)
    b_s = torch.rand(*shape[:-2], -(-n // 128), -(-k // 128), device=device) + 0.5
    return a_q, a_s, b_q, b_s


def _scaled_mm_peer(a_q, a_s, b_q, b_s, ours):
    """(name, fn) for the best torch._scaled_mm variant that runs here and agrees with ``ours``, or None."""
    if a_q.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    from deepkernels.testing import calc_diff

    a_s_outer = a_s.t().contiguous().t()   # cuBLASLt wants the 1x128 scales M-major
    one = torch.ones((), device=a_q.device)
    candidates = [
        ("torch._scaled_mm blockwise", lambda: torch._scaled_mm(a_q, b_q.t(), a_s_outer, b_s,
                                                               out_dtype=torch.bfloat16), True),
        ("torch._scaled_mm blockwise", lambda: torch._scaled_mm(a_q, b_q.t(), a_s_outer, b_s.t(),
                                                               out_dtype=torch.bfloat16), True),
        ("torch._scaled_mm per-tensor (easier problem)", lambda: torch._scaled_mm(
            a_q, b_q.t(), one, one, out_dtype=torch.bfloat16), False),
    ]
    for name, fn, same_maths in candidates:
        try:
            got = fn()
            torch.cuda.synchronize()
        except (RuntimeError, TypeError, ValueError):
            continue
        if not same_maths or calc_diff(got.float(), ours.float()) < 1e-3:
            return name, fn
    return None


def _row(case, flops, ours_ms, peer, peer_ms) -> Row:
    tflops = lambda ms: flops / (ms / 1e3) / 1e12  # noqa: E731
    return Row(FAMILY, case, "TFLOPS", tflops(ours_ms), peer[0] if peer else None,
               tflops(peer_ms) if peer_ms else None, ours_ms)


def run(ctx: Context) -> list[Row]:
    rows = []
    dev = ctx.device
    if ctx.quick or not ctx.is_cuda:   # CPU: tiny cases of the references
        dense = [(m, n // 16, k // 16) for m in (16, 64) for n, k in [(2048, 7168), (24576, 1536)]]
        contiguous, masked = [(2, 128, 256, 512)], [(2, 32, 256, 512)]
    else:
        dense = [(m, n, k) for m in DENSE_M for n, k in DSV3_NK]
        contiguous, masked = CONTIGUOUS, MASKED
    for m, n, k in dense:
        a_q, a_s, b_q, b_s = _operands(m, n, k, dev)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        t = time_ms(lambda: deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out), ctx)
        peer = _scaled_mm_peer(a_q, a_s, b_q, b_s, out)
        if peer is None and not ctx.is_cuda:
            peer = ("reference (fp32 dequant + matmul)", lambda: gemm.fp8_gemm_nt_ref(a_q, a_s, b_q, b_s, out))
        t_peer = time_ms(peer[1], ctx) if peer else None
        rows.append(_row({"op": "fp8_gemm_nt", "m": m, "n": n, "k": k}, 2 * m * n * k, t, peer, t_peer))
    for g, m_per, n, k in contiguous:
        a_q, a_s, b_q, b_s = _operands(g * m_per, n, k, dev, groups=g)
        out = torch.empty(g * m_per, n, dtype=torch.bfloat16, device=dev)
        m_indices = torch.arange(g, device=dev, dtype=torch.int32).repeat_interleave(m_per)
        t = time_ms(lambda: deepkernels.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, out, m_indices), ctx)
        rows.append(_row({"op": "m_grouped_contiguous", "groups": g, "m_per_group": m_per, "n": n, "k": k},
                         2 * g * m_per * n * k, t, None, None))
    for g, m_max, n, k in masked:
        a_q, a_s, b_q, b_s = _operands(g * m_max, n, k, dev, groups=g)
        a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
        out = torch.empty(g, m_max, n, dtype=torch.bfloat16, device=dev)
        masked_m = torch.full((g,), m_max, dtype=torch.int32, device=dev)
        t = time_ms(lambda: deepkernels.m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, out, masked_m, m_max), ctx)
        rows.append(_row({"op": "m_grouped_masked", "groups": g, "m_max": m_max, "n": n, "k": k},
                         2 * g * m_max * n * k, t, None, None))
    return rows
