"""MoE dispatch/combine kernels on one device: GB/s of the layout, the send-buffer pack (bf16 gather and
fused fp8 quant), and the un-permute + reduce (combine, and the expert-side weighted reduce), each vs a
plain PyTorch index_select / index_add implementation in the same run, plus a same-size copy as the
bandwidth ceiling (extra["copy_GB/s"], extra["frac_of_copy"]).

Shapes follow DeepEP's benchmarks: 4096 tokens, hidden 7168, top-8 of 256 experts over 8 ranks
(normal mode: fp8 dispatch, bf16 combine) and 128 tokens (low-latency). Bytes counted: every byte read
from the source rows plus every byte written (fp8 values + fp32 scales for the quantised pack).
"""
from __future__ import annotations

import torch

from deepkernels import moe
from deepkernels.fp8 import per_token_cast_to_fp8_ref

from .common import Context, Row, time_ms

FAMILY = "moe"

# (tokens, hidden, top-k, experts, ranks)
GPU_CASES = [(4096, 7168, 8, 256, 8), (128, 7168, 8, 256, 8)]
CPU_CASES = [(64, 256, 4, 16, 4)]


def _routing(t: int, k: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    return ids.to(device), torch.rand(t, k, generator=g).to(device)


def _copy_gbps(nbytes: int, ctx: Context) -> float:
    a = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=ctx.device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), ctx)
    return 2 * a.numel() / 1e9 / (ms / 1e3)


def _row(case: dict, ctx: Context, nbytes: int, ours, peer, peer_name: str, copy: float | None) -> Row:
    t_ours, t_peer = time_ms(ours, ctx), time_ms(peer, ctx)
    gb = nbytes / 1e9
    extra = {}
    if copy is not None:
        extra = {"copy_GB/s": round(copy, 1), "frac_of_copy": round(gb / (t_ours / 1e3) / copy, 3)}
    return Row(FAMILY, case, "GB/s", gb / (t_ours / 1e3), peer_name, gb / (t_peer / 1e3), t_ours, extra)


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    dev = ctx.device
    for t, h, k, e, r in (GPU_CASES if ctx.is_cuda and not ctx.quick else
                          GPU_CASES[1:] if ctx.is_cuda else CPU_CASES):
        base = {"tokens": t, "hidden": h, "topk": k, "experts": e, "ranks": r}
        ids, w = _routing(t, k, e, dev)
        x = torch.randn(t, h, dtype=torch.bfloat16, device=dev)

        # layout
        lay_bytes = ids.numel() * 8 + t * r + (e + r) * 4
        rows.append(_row({**base, "op": "layout"}, ctx, lay_bytes,
                         lambda: torch.ops.deepkernels.moe_get_dispatch_layout(ids, e, r),
                         lambda: moe.moe_get_dispatch_layout_ref(ids, e, r), "torch reference", None))

        _, _, in_rank = moe.get_dispatch_layout(ids, e, r)
        pos = moe.dispatch_positions(in_rank)
        n = int(in_rank.sum())
        src = moe.positions_to_src_idx(pos, n)
        src_l = src.long()
        copy = _copy_gbps(n * h * 2 * 2, ctx) if ctx.is_cuda else None

        # dispatch pack, bf16: gather N rows
        rows.append(_row({**base, "op": "permute", "rows": n, "dtype": "bf16"}, ctx, 2 * n * h * 2,
                         lambda: torch.ops.deepkernels.moe_permute(x, src),
                         lambda: x.index_select(0, src_l), "torch index_select", copy))
        # dispatch pack with fused fp8 quantisation
        q_bytes = n * h * 2 + n * h + n * (h // 128) * 4
        rows.append(_row({**base, "op": "permute_fp8", "rows": n}, ctx, q_bytes,
                         lambda: torch.ops.deepkernels.moe_permute_fp8(x, src),
                         lambda: per_token_cast_to_fp8_ref(x.index_select(0, src_l)),
                         "torch index_select + quant", copy))

        # combine: N rows back, summed per token over its ranks (bf16 in/out, fp32 accumulation)
        y = torch.randn(n, h, dtype=torch.bfloat16, device=dev)
        tok = src_l.clamp(min=0)

        def index_add_combine(y=y, tok=tok):
            acc = torch.zeros(t, h, dtype=torch.float32, device=dev)
            acc.index_add_(0, tok, y.float())
            return acc.to(torch.bfloat16)

        c_bytes = n * h * 2 + t * h * 2
        rows.append(_row({**base, "op": "unpermute_reduce", "rows": n}, ctx, c_bytes,
                         lambda: torch.ops.deepkernels.moe_unpermute_reduce(y, pos, None),
                         index_add_combine, "torch index_add", copy))

        # expert-side weighted reduce: T*k expert outputs -> T rows with the top-k weights
        ye = torch.randn(t * k, h, dtype=torch.bfloat16, device=dev)
        epos = torch.randperm(t * k, device=dev).to(torch.int32).view(t, k)
        etok = torch.empty(t * k, dtype=torch.long, device=dev)
        etok[epos.view(-1).long()] = torch.arange(t, device=dev).repeat_interleave(k)
        wflat = torch.empty(t * k, device=dev)
        wflat[epos.view(-1).long()] = w.reshape(-1)

        def index_add_weighted():
            acc = torch.zeros(t, h, dtype=torch.float32, device=dev)
            acc.index_add_(0, etok, ye.float() * wflat[:, None])
            return acc.to(torch.bfloat16)

        rows.append(_row({**base, "op": "unpermute_reduce_weighted", "rows": t * k}, ctx,
                         t * k * h * 2 + t * h * 2,
                         lambda: torch.ops.deepkernels.moe_unpermute_reduce(ye, epos, w),
                         index_add_weighted, "torch index_add", copy))
    return rows
