"""`make demo`: the main job -- quantise through the ops, then the benchmark table.

(The DeepSeek-V3 model demo joins here when deepkernels.model lands.)
"""
from __future__ import annotations

import sys

import torch

import deepkernels
from deepkernels.testing import calc_diff


def main() -> int:
    device = "cuda" if deepkernels.is_cuda_available() else "cpu"
    print(f"deepkernels {deepkernels.__version__} on {device}; build: {deepkernels.build_info()}")
    x = torch.randn(256, 7168, dtype=torch.bfloat16, device=device)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    back = deepkernels.per_token_cast_from_fp8(q, scale, torch.float32)
    print(f"per_token_cast_to_fp8 {tuple(x.shape)} -> {tuple(q.shape)} {q.dtype}, scale {tuple(scale.shape)}; "
          f"round-trip calc_diff {calc_diff(back, x.float()):.2e}")
    from bench.__main__ import main as bench_main

    return bench_main(["all", "--device", device])


if __name__ == "__main__":
    sys.exit(main())
