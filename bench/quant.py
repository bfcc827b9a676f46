"""FP8 activation/weight quantisation: GB/s moved (read input + write fp8 + scales) vs the torch reference."""
from __future__ import annotations

import torch

import deepkernels
from deepkernels import fp8

from .common import Context, Row, time_ms

FAMILY = "quant"

PER_TOKEN_SHAPES = [(128, 7168), (4096, 7168), (4096, 2048), (16384, 7168)]
PER_BLOCK_SHAPES = [(7168, 2048), (24576, 1536)]


def _bytes(rows: int, k: int, in_bytes: int, rows_per_scale: int) -> int:
    scales = -(-rows // rows_per_scale) * -(-k // 128) * 4
    return rows * k * in_bytes + rows * k + scales


def run(ctx: Context) -> list[Row]:
    out = []
    per_token = PER_TOKEN_SHAPES[:2] if ctx.quick else PER_TOKEN_SHAPES
    per_block = PER_BLOCK_SHAPES[:1] if ctx.quick else PER_BLOCK_SHAPES
    cases = [("per_token_cast_to_fp8", m, k, 1) for m, k in per_token] + \
            [("per_block_cast_to_fp8", n, k, 128) for n, k in per_block]
    for op, rows, k, rows_per_scale in cases:
        x = torch.randn(rows, k, dtype=torch.bfloat16, device=ctx.device)
        ours = getattr(deepkernels, op)
        ref = getattr(fp8, op + "_ref")
        t_ours = time_ms(lambda: ours(x), ctx)
        t_ref = time_ms(lambda: ref(x), ctx)
        gbytes = _bytes(rows, k, 2, rows_per_scale) / 1e9
        out.append(Row(FAMILY, {"op": op, "rows": rows, "k": k, "dtype": "bf16"}, "GB/s",
                       gbytes / (t_ours / 1e3), "torch reference", gbytes / (t_ref / 1e3), t_ours))
    return out
