"""`make demo`: the main job -- DeepSeek-V3 generation on deepkernels, then the benchmark table.

1. the tiny DeepSeek-V3 (seeded random weights) generates for a batch of prompts of different lengths
   through the CLI path (`python -m deepkernels.model generate`): prefill, then paged MLA decode;
2. a quick FP8 quantisation round-trip through the ops;
3. `python -m bench all` (every kernel family beside its peer, and the model's tokens/s).

    python -m deepkernels.demo [--device cpu|cuda] [--max-new-tokens N] [--bench all|FAMILY[,FAMILY]|none]

Works from an installed package too (the wheel ships the ``bench`` package).
"""
from __future__ import annotations

import argparse
import sys

import torch

import deepkernels
from deepkernels.testing import calc_diff


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m deepkernels.demo", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the CUDA kernels run)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--bench", default="all",
                        help="benchmark families to run after the demo: all (default), a comma list, or none")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if deepkernels.is_cuda_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        print(f"error: --device: expected cpu or cuda (with a GPU), got {device!r}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens: expected an int >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        from bench.__main__ import discover
        from bench.__main__ import main as bench_main
    except ImportError as e:
        print(f"error: the bench package is not importable ({e}); reinstall deepkernels", file=sys.stderr)
        return 1
    families = [] if args.bench == "none" else ["all"] if args.bench == "all" else args.bench.split(",")
    known = set(discover())
    unknown = [f for f in families if f != "all" and f not in known]
    if unknown:
        print(f"error: --bench: unknown families {unknown}, expected all, none or some of {sorted(known)}",
              file=sys.stderr)
        return 2
    print(f"deepkernels {deepkernels.__version__} on {device}; build: {deepkernels.build_info()}")
    from deepkernels.model.__main__ import main as model_main

    print("\n== DeepSeek-V3 (tiny config, random weights): python -m deepkernels.model generate --model tiny ...")
    rc = model_main(["generate", "--model", "tiny", "--device", device, "--prompt", "The three kernel families",
                     "--prompt", "compose", "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12", "--max-new-tokens",
                     str(args.max_new_tokens)])
    if rc:
        return rc

    x = torch.randn(256, 7168, dtype=torch.bfloat16, device=device)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    back = deepkernels.per_token_cast_from_fp8(q, scale, torch.float32)
    print(f"\n== per_token_cast_to_fp8 {tuple(x.shape)} -> {tuple(q.shape)} {q.dtype}, scale {tuple(scale.shape)}; "
          f"round-trip calc_diff {calc_diff(back, x.float()):.2e}\n")
    for family in families:
        rc = bench_main([family, "--device", device])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
