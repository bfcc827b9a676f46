"""MLA paged decode: FlashMLA's benchmark grid and byte/flop formulas, ours vs a PyTorch reference
(per-sequence gather through the block table + SDPA) in the same run, and FlashInfer's MLA decode when
installed. Metric per row: GB/s (memory-bound: h_q <= 64) or TFLOPS (h_q = 128); both in `extra`.

FlashMLA's formulas (tests/test_flash_mla.py): flops = 2 * s_q * sum(L) * h_q * (576 + 512);
bytes = sum(L) * h_kv * 576 * kv_bytes (+ scales for e4m3) + b * s_q * h_q * (576 + 512) * 2.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import deepkernels
from deepkernels import mla

from deepkernels.testing import calc_diff

from .common import Context, Row, copy_gbps, env_var, kernel_variants, time_ms

FAMILY = "mla"

BATCH = 128
S_Q = [1, 2]
H_Q = [16, 32, 64, 128]
MEAN_SK = [4096, 8192, 16384, 32768]
PAGE = 64
SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2


def _varlen(b: int, mean: int, s_q: int, gen: torch.Generator) -> torch.Tensor:
    # FlashMLA's varlen: normal(mean, mean / 2), at least s_q.
    lens = torch.normal(float(mean), mean / 2, (b,), generator=gen).clamp(min=s_q, max=2 * mean)
    return lens.to(torch.int32)


def _make(b, s_q, h_q, mean_sk, device, cache_dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(b * 7 + s_q * 13 + h_q + mean_sk)
    lens = _varlen(b, mean_sk, s_q, gen)
    blocks = (lens + PAGE - 1) // PAGE
    max_blocks = int(blocks.max())
    block_table = torch.zeros(b, max_blocks, dtype=torch.int32)
    perm = torch.randperm(int(blocks.sum()), generator=gen).to(torch.int32)
    used = 0
    for i, n in enumerate(blocks.tolist()):
        block_table[i, :n] = perm[used:used + n]
        used += n
    num_blocks = int(blocks.sum())
    dtype16 = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16  # fp16: q and cache (FlashMLA's mode)
    kv = torch.randn(num_blocks, PAGE, 1, 576, device=device, dtype=dtype16) / 4
    kv_scale = None
    if cache_dtype == torch.float8_e4m3fn:
        kv_scale = (kv.float().abs().amax(-1).clamp(min=1e-4) / 448)
        kv = (kv.float() / kv_scale[..., None]).to(cache_dtype)
    q = torch.randn(b, s_q, h_q, 576, device=device, dtype=dtype16) / 4
    return q, kv, kv_scale, block_table.to(device), lens.to(device), lens


def torch_reference(q, kv, block_table, lens_host, s_q, causal=True):
    """Gather each sequence's pages, then SDPA (the peer a PyTorch user would write). With h_kv = 1 the
    s_q * h_q query rows attend to one key head, so they are passed as one head of s_q * h_q queries
    (no K expansion to h_q heads)."""
    page = kv.size(1)
    h_q = q.size(2)
    outs = []
    for i, n in enumerate(lens_host.tolist()):
        pages = block_table[i, : (n + page - 1) // page].long()
        k = kv[pages].reshape(-1, 576)[:n]                                   # [n, 576]
        qi = q[i].reshape(1, 1, s_q * h_q, 576)                            # rows (token, head)
        mask = None
        if causal and s_q > 1:
            token = torch.arange(s_q * h_q, device=q.device) // h_q
            mask = torch.arange(n, device=q.device)[None, :] <= (n - s_q + token)[:, None]
        outs.append(F.scaled_dot_product_attention(qi, k[None, None], k[None, None, :, :512], attn_mask=mask,
                                                   scale=SCALE).view(s_q, h_q, 512))
    return outs


def _flashinfer_runner(q, kv, block_table, lens, h_q, causal):
    try:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper  # noqa: F401
    except Exception:
        return None
    try:
        b = q.size(0)
        dev = q.device
        blocks = (lens + PAGE - 1) // PAGE
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        kv_indptr[1:] = torch.cumsum(blocks, 0)
        kv_indices = torch.cat([block_table[i, : int(n)] for i, n in enumerate(blocks.tolist())])
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * q.size(1)
        wrapper = BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev))
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, h_q, 512, 64, PAGE, causal, SCALE,
                     torch.bfloat16, torch.bfloat16)
        q_flat = q.reshape(-1, h_q, 576)
        ckv, kpe = kv[:, :, 0, :512], kv[:, :, 0, 512:]
        return lambda: wrapper.run(q_flat[..., :512], q_flat[..., 512:], ckv, kpe)
    except Exception:
        return None


def _variants(ctx: Context, cache_dtype: torch.dtype) -> list[tuple[str, contextlib.AbstractContextManager]]:
    """(label, context) per split-KV kernel to time: the default and the legacy sm90 switch (bench.common), plus
    every further DEEPKERNELS_MLA_VARIANT that runs here for this cache dtype (sm_90: sm90_pipelined). Each context
    also pins DEEPKERNELS_MLA_VARIANT, so a value set outside the bench does not leak into the default row."""
    @contextlib.contextmanager
    def pinned(inner, variant):
        with env_var(mla.VARIANT_ENV, variant), inner:
            yield

    variants = [(label, pinned(cm, None)) for label, cm in kernel_variants(ctx, mla.SM90_ENV)]
    if ctx.is_cuda and torch.cuda.get_device_capability(ctx.device) == (9, 0):
        for name in ("sm90_pipelined",):
            if cache_dtype in mla.MLA_VARIANTS[name]:
                variants.append((name, pinned(env_var(mla.SM90_ENV, None), name)))
    return variants


def run(ctx: Context) -> list[Row]:
    rows = []
    # the memory-bound target is a fraction of this device's measured copy bandwidth (2 GiB moved)
    copy = round(copy_gbps(2 << 30, ctx), 1) if ctx.is_cuda else None
    if ctx.quick or not ctx.is_cuda:
        grid = [(2, 1, 16, 128, torch.bfloat16), (2, 2, 16, 128, torch.bfloat16), (2, 1, 16, 128, torch.float8_e4m3fn),
                (2, 1, 16, 128, torch.float16)]
    else:
        grid = [(BATCH, s_q, h_q, sk, torch.bfloat16) for sk in MEAN_SK for s_q in S_Q for h_q in H_Q]
        grid += [(BATCH, s_q, h_q, 8192, torch.float8_e4m3fn) for s_q in S_Q for h_q in (16, 128)]
        grid += [(BATCH, s_q, h_q, 8192, torch.float16) for s_q in S_Q for h_q in (16, 128)]
    for b, s_q, h_q, mean_sk, cache_dtype in grid:
        q, kv, kv_scale, block_table, lens, lens_host = _make(b, s_q, h_q, mean_sk, ctx.device, cache_dtype)
        total = int(lens_host.sum())
        kv_bytes = total * 576 * kv.element_size() + (total * 4 if kv_scale is not None else 0)
        gbytes = (kv_bytes + b * s_q * h_q * (576 + 512) * 2) / 1e9
        tflop = 2 * s_q * total * h_q * (576 + 512) / 1e12

        def ours():
            meta, splits = deepkernels.get_mla_decode_metadata(lens, s_q * h_q, 1)
            return deepkernels.mla_decode_with_kvcache(q, kv, block_table, lens, 512, meta, splits, SCALE, True,
                                                       kv_scale)

        compute_bound = h_q >= 128
        metric = "TFLOPS" if compute_bound else "GB/s"
        value = (lambda t: tflop / (t / 1e3)) if compute_bound else (lambda t: gbytes / (t / 1e3))
        case = {"b": b, "s_q": s_q, "h_q": h_q, "mean_sk": mean_sk, "page": PAGE,
                "cache": {torch.float8_e4m3fn: "e4m3", torch.float16: "fp16"}.get(cache_dtype, "bf16"), "causal": True}
        default_out = None
        for label, variant in _variants(ctx, cache_dtype):
            with variant:
                extra = {"kernel": label, **({"copy_GB/s": copy} if copy else {})}
                got = ours()[0]
                if default_out is None:
                    default_out = got
                else:  # the opt-in kernel must agree with the tested default one before it gets a speed
                    diff = calc_diff(got.float(), default_out.float())
                    extra["calc_diff_vs_default"] = diff
                    if not diff < 1e-5:
                        rows.append(Row(FAMILY, {**case, "kernel": label}, metric, 0.0, None, None, None,
                                        {**extra, "error": f"wrong result: calc_diff {diff:.2e} vs the default kernel"}))
                        continue
                t_ours = time_ms(ours, ctx)
            peer, t_peer = None, None
            if cache_dtype != torch.float8_e4m3fn and label == "default":
                runner = (_flashinfer_runner(q, kv, block_table, lens, h_q, True)
                          if ctx.is_cuda and cache_dtype == torch.bfloat16 else None)
                if runner is not None:
                    peer, t_peer = "flashinfer", time_ms(runner, ctx)
                else:
                    peer, t_peer = "torch gather+SDPA", time_ms(
                        lambda: torch_reference(q, kv, block_table, lens_host, s_q), ctx)
            rows.append(Row(FAMILY, case if label == "default" else {**case, "kernel": label}, metric, value(t_ours),
                            peer, None if t_peer is None else value(t_peer), t_ours,
                            extra={"GB/s": gbytes / (t_ours / 1e3), "TFLOPS": tflop / (t_ours / 1e3), **extra}))
        del q, kv, kv_scale
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return rows
