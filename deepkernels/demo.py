"""`make demo`: the main job -- DeepSeek-V3 generation on deepkernels, then the benchmark table.

1. the tiny DeepSeek-V3 (seeded random weights) generates for a batch of prompts of different lengths
   through the CLI path (`python -m deepkernels.model generate`): prefill, then paged MLA decode;
2. a quick FP8 quantisation round-trip through the ops;
3. `python -m bench all` (every kernel family beside its peer, and the model's tokens/s).
"""
from __future__ import annotations

import sys

import torch

import deepkernels
from deepkernels.testing import calc_diff


def main() -> int:
    device = "cuda" if deepkernels.is_cuda_available() else "cpu"
    print(f"deepkernels {deepkernels.__version__} on {device}; build: {deepkernels.build_info()}")
    from deepkernels.model.__main__ import main as model_main

    print("\n== DeepSeek-V3 (tiny config, random weights): python -m deepkernels.model generate --model tiny ...")
    rc = model_main(["generate", "--model", "tiny", "--device", device, "--prompt", "The three kernel families",
                     "--prompt", "compose", "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12", "--max-new-tokens", "24"])
    if rc:
        return rc

    x = torch.randn(256, 7168, dtype=torch.bfloat16, device=device)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    back = deepkernels.per_token_cast_from_fp8(q, scale, torch.float32)
    print(f"\n== per_token_cast_to_fp8 {tuple(x.shape)} -> {tuple(q.shape)} {q.dtype}, scale {tuple(scale.shape)}; "
          f"round-trip calc_diff {calc_diff(back, x.float()):.2e}\n")
    from bench.__main__ import main as bench_main

    return bench_main(["all", "--device", device])


if __name__ == "__main__":
    sys.exit(main())
