"""The emulator against the hardware: every CUDA kernel on the same inputs, run on the GPU and through the
SIMT emulator (deepkernels._emu on CPU tensors), outputs compared. Bitwise for the kernels without
floating-point reductions in another order (casts, MoE, MLA metadata, cache writes); for the GEMMs and MLA
decode, within fp32 accumulation-order tolerance (the emulator sums each MMA in index order).

    python -m bench.emu_vs_gpu [--out emu_vs_gpu.json]

Without a GPU it runs the emulated side only (a smoke test) and says so. gpu_check.sh runs it on the device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable

import torch

import deepkernels
from deepkernels.testing import reference


@contextlib.contextmanager
def env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fp8_operands(m: int, n: int, k: int, groups: int = 0):
    g = torch.Generator().manual_seed(m * 7 + n * 3 + k)
    with reference():
        a = torch.randn(*((groups,) if groups else ()), m, k, generator=g)
        b = torch.randn(*((groups,) if groups else ()), n, k, generator=g)
        if groups:
            aq, sa = zip(*(deepkernels.per_token_cast_to_fp8(x) for x in a))
            bq, sb = zip(*(deepkernels.per_block_cast_to_fp8(x) for x in b))
            return torch.stack(aq), torch.stack(sa), torch.stack(bq), torch.stack(sb)
        return (*deepkernels.per_token_cast_to_fp8(a), *deepkernels.per_block_cast_to_fp8(b))


def _to(args, device):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)


def case_list() -> list[tuple[str, str, dict, Callable]]:
    """(name, comparison, env, run(device) -> tuple of output tensors)."""
    cases = []
    x = torch.randn(96, 640, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        cases.append((f"per_token_cast_to_fp8 {dtype}", "exact", {},
                      lambda d, x=x.to(dtype): deepkernels.per_token_cast_to_fp8(x.to(d))))
        cases.append((f"per_block_cast_to_fp8 {dtype}", "exact", {},
                      lambda d, x=x.to(dtype): deepkernels.per_block_cast_to_fp8(x.to(d))))
    with reference():
        xq, xs = deepkernels.per_token_cast_to_fp8(x)
    cases.append(("per_token_cast_from_fp8", "exact", {},
                  lambda d: (deepkernels.per_token_cast_from_fp8(xq.to(d), xs.to(d)),)))

    def gemm(m, n, k):
        ops = _fp8_operands(m, n, k)
        return lambda d: (deepkernels.fp8_gemm_nt(*_to(ops, d)),)

    def grouped_masked(groups, m, n, k):
        ops = _fp8_operands(m, n, k, groups)
        masked = torch.tensor([m, 0, m // 3][:groups], dtype=torch.int32)

        def run(d):
            out = torch.zeros(groups, m, n, dtype=torch.bfloat16, device=d)
            deepkernels.m_grouped_fp8_gemm_nt_masked(*_to(ops, d), out, masked.to(d), m)
            return (out,)
        return run

    for kernel, flags in (("portable", {}), ("sm90", {"DEEPKERNELS_GEMM_SM90": "1"})):
        cases.append((f"fp8_gemm_nt {kernel} 200x320x1024", "accumulation", flags, gemm(200, 320, 1024)))
        cases.append((f"m_grouped masked {kernel} 3x128x256x512", "accumulation", flags,
                      grouped_masked(3, 128, 256, 512)))
    for blocks in ("64x64", "128x128"):
        cases.append((f"fp8_gemm_nt sm90 {blocks} 129x272x400", "accumulation",
                      {"DEEPKERNELS_GEMM_SM90": "1", "DEEPKERNELS_GEMM_SM90_BLOCKS": blocks}, gemm(129, 272, 400)))

    lens = torch.tensor([300, 0, 37, 129], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    page, blocks_per_seq, h_q, s_q = 64, 6, 64, 2
    kv = torch.randn(len(lens) * blocks_per_seq, page, 1, 576, generator=g)
    block_table = torch.randperm(len(lens) * blocks_per_seq, generator=g).to(torch.int32).view(len(lens), -1)
    query = torch.randn(len(lens), s_q, h_q, 576, generator=g).to(torch.bfloat16)
    cases.append(("get_mla_decode_metadata", "exact", {},
                  lambda d: deepkernels.get_mla_decode_metadata(lens.to(d), s_q * h_q, 1, num_sm_parts=7)))

    def decode(cache_dtype):
        if cache_dtype == torch.bfloat16:
            cache, scale = kv.to(torch.bfloat16), None
        else:   # per-token scale, as write_mla_kv_cache stores it
            amax = kv.abs().amax(-1).clamp(min=1e-4)
            cache, scale = (kv * (448 / amax)[..., None]).to(torch.float8_e4m3fn), amax / 448

        def run(d):
            meta, splits = deepkernels.get_mla_decode_metadata(lens.to(d), s_q * h_q, 1, num_sm_parts=7)
            return deepkernels.mla_decode_with_kvcache(query.to(d), cache.to(d), block_table.to(d), lens.to(d), 512,
                                                       meta, splits, 0.1, True,
                                                       kv_scale=None if scale is None else scale.to(d))
        return run

    for kernel, flags in (("portable 3 stages", {}), ("portable 1 stage", {"DEEPKERNELS_MLA_STAGES": "1"}),
                          ("sm90", {"DEEPKERNELS_MLA_SM90": "1"}),
                          ("sm90_pipelined", {"DEEPKERNELS_MLA_VARIANT": "sm90_pipelined"})):
        cases.append((f"mla_decode bf16 {kernel}", "accumulation", flags, decode(torch.bfloat16)))
    cases.append(("mla_decode e4m3 portable", "accumulation", {}, decode(torch.float8_e4m3fn)))
    cases.append(("mla_decode e4m3 sm90_pipelined", "accumulation", {"DEEPKERNELS_MLA_VARIANT": "sm90_pipelined"},
                  decode(torch.float8_e4m3fn)))

    rows = torch.randn(9, 1, 576, generator=g).to(torch.bfloat16)
    slots = torch.tensor([0, 5, 64, 65, 300, 301, 302, 1000, 7], dtype=torch.int64)

    def write(cache_dtype):
        def run(d):
            cache = torch.zeros(24, page, 1, 576, dtype=cache_dtype, device=d)
            scale = torch.zeros(24, page, 1, device=d) if cache_dtype != torch.bfloat16 else None
            deepkernels.write_mla_kv_cache(cache, scale, rows.to(d), slots.to(d))
            return (cache,) if scale is None else (cache, scale)
        return run

    cases.append(("write_mla_kv_cache bf16", "exact", {}, write(torch.bfloat16)))
    cases.append(("write_mla_kv_cache e4m3", "exact", {}, write(torch.float8_e4m3fn)))

    topk = torch.randint(-1, 32, (200, 8), generator=g)
    cases.append(("moe_get_dispatch_layout", "exact", {},
                  lambda d: torch.ops.deepkernels.moe_get_dispatch_layout(topk.to(d), 32, 4)))
    tokens = torch.randn(200, 1024, generator=g).to(torch.bfloat16)
    src = torch.randint(0, 200, (640,), generator=g).to(torch.int32)
    cases.append(("moe_permute", "exact", {},
                  lambda d: (torch.ops.deepkernels.moe_permute(tokens.to(d), src.to(d)),)))
    cases.append(("moe_permute_fp8", "exact", {},
                  lambda d: torch.ops.deepkernels.moe_permute_fp8(tokens.to(d), src.to(d))))
    pos = torch.randint(-1, 640, (200, 4), generator=g).to(torch.int32)
    w = torch.rand(200, 4, generator=g)
    y = torch.randn(640, 1024, generator=g).to(torch.bfloat16)
    cases.append(("moe_unpermute_reduce", "exact", {},
                  lambda d: (torch.ops.deepkernels.moe_unpermute_reduce(y.to(d), pos.to(d), w.to(d)),)))
    return cases


def compare(emulated, gpu, mode: str) -> dict:
    worst = {"exact": True, "max_abs": 0.0, "max_rel": 0.0, "differing": 0, "elements": 0}
    for e, c in zip(emulated, gpu):
        c = c.cpu()
        if e.dtype == torch.float8_e4m3fn:
            e, c = e.view(torch.uint8), c.view(torch.uint8)
        same = torch.equal(e, c) or (e.is_floating_point() and torch.equal(e.isnan(), c.isnan()) and
                                     torch.equal(e.nan_to_num(), c.nan_to_num()))
        worst["exact"] &= same
        worst["elements"] += e.numel()
        if not same:
            ef, cf = e.double().nan_to_num(), c.double().nan_to_num()
            diff = (ef - cf).abs()
            worst["differing"] += int((diff > 0).sum())
            worst["max_abs"] = max(worst["max_abs"], float(diff.max()))
            worst["max_rel"] = max(worst["max_rel"], float(diff.max() / cf.abs().max().clamp(min=1e-30)))
    # fp32 accumulation in another order: a few bf16 ulps of the largest output (2^-8 relative per ulp)
    worst["ok"] = worst["exact"] if mode == "exact" else worst["max_rel"] <= 4 * 2.0 ** -8
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not deepkernels.build_info()["emulator"]:
        print(f"emulator not built: {deepkernels.build_info()['emulator_error']}", file=sys.stderr)
        return 1
    gpu = deepkernels.is_cuda_available()
    results, failed = [], 0
    for name, mode, flags, run in case_list():
        with env(**flags):
            with deepkernels.emulate():
                emulated = run("cpu")
            row = {"case": name, "comparison": mode, "env": flags}
            if gpu:
                row.update(compare(emulated, run("cuda"), mode))
                failed += not row["ok"]
        print(f"{name:45s} {mode:12s} " + ("emulated only (no GPU)" if not gpu else
              f"{'OK ' if row['ok'] else 'FAIL'} exact={row['exact']} max_rel={row['max_rel']:.2e} "
              f"differing={row['differing']}/{row['elements']}"))
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                       "results": results}, f, indent=1)
    print(f"{len(results)} cases, {failed} disagree" + ("" if gpu else " (no GPU: emulated side only)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
