"""python -m bench sweep [--quick] [--device cuda|cpu] [--families gemm,mla,moe] [--budget-s S] [--table PATH]
[--no-table] [--out PATH]

One call that runs every kernel variant (and, for the GEMM, every block shape / split-K / ring depth) on the
DeepSeek-V3 shape lists, each checked against the reference first:

* GPU: times each correct variant and writes the table the GEMM dispatcher reads
  (deepkernels/tuning/gemm_sm90.json: this device's entries are replaced, other devices' kept). An entry is
  written for a problem when the fastest sm_90a plan beats the heuristic's by more than 3%; elsewhere the
  heuristic stays. MLA / MoE timings go to the results JSON (their switches are per-call env vars with no
  table yet). Stops starting new variants after --budget-s seconds (default 270: one GPU call of 5 minutes).
* No GPU: the same variants on small shapes under the SIMT emulator, as a correctness smoke test against
  the references (nothing timed, no table written).

Families are entries of FAMILIES (a name, cases, variants = env settings, a runner): add one there.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Callable

import torch

import deepkernels
from deepkernels import gemm
from deepkernels.testing import calc_diff, reference

from . import common
from .cli import Parser

TABLE_MIN_GAIN = 0.03  # a table entry only where the best plan beats the heuristic's by more than this


@dataclasses.dataclass
class Variant:
    label: str
    env: dict  # environment variables set for the call (None = unset)


@dataclasses.dataclass
class Prepared:
    call: Callable[[], object]     # runs the op once with the current environment
    check: Callable[[object], str | None]  # None when the result is right, else why not
    flops: float | None = None


@dataclasses.dataclass
class Result:
    family: str
    case: dict
    variant: str
    ok: bool
    us: float | None = None
    error: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _env(values: dict):
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(common.env_var(name, value))
        yield


def _on_hopper(ctx: common.Context) -> bool:
    return ctx.is_cuda and torch.cuda.get_device_capability(ctx.device) == (9, 0)


def _emulating(ctx: common.Context) -> bool:
    return not ctx.is_cuda


# ---------------------------------------------------------------------------------------------------------
# GEMM: the portable kernel, the sm_90a heuristic's plan, and every sm_90a plan (DEEPKERNELS_GEMM_CONFIG)

class GemmFamily:
    name = "gemm"
    EMU_SMS = 8  # emulated device size for the smoke: split-K and narrow tiles are real choices there
    # DeepSeek-V3's routed experts (gate/up: N=4096, K=7168; down: N=7168, K=2048) at decode sizes: 32 local experts
    # x expected_m rows (masked: Mmax rows per expert, as a DeepEP low-latency receive buffer; contiguous: each
    # expert's rows in a 128-aligned segment)
    MOE_NK = [(4096, 7168), (7168, 2048)]
    MOE_GROUPS, MOE_MMAX = 32, 256

    def cases(self, ctx):
        from bench.gemm import NK
        if _emulating(ctx):
            shapes = [(16, 256, 1024)] if ctx.quick else [(16, 256, 1024), (130, 144, 640)]
            grouped = [{"kind": "masked", "m": 64, "n": 128, "k": 1024, "num_groups": 2, "expected_m": 16},
                       {"kind": "contiguous", "m": 256, "n": 128, "k": 1024, "num_groups": 2, "group_rows": 20}]
        else:
            ms = [64] if ctx.quick else [16, 64, 128, 4096]
            shapes = [(m, n, k) for m in ms for n, k in (NK[:2] if ctx.quick else NK)]
            rows = [32] if ctx.quick else [8, 64]
            groups, align = self.MOE_GROUPS, gemm.get_m_alignment_for_contiguous_layout()
            moe = [(n, k, r) for n, k in (self.MOE_NK[:1] if ctx.quick else self.MOE_NK) for r in rows]
            grouped = [{"kind": "masked", "m": self.MOE_MMAX, "n": n, "k": k, "num_groups": groups, "expected_m": r}
                       for n, k, r in moe]
            grouped += [{"kind": "contiguous", "m": groups * -(-r // align) * align, "n": n, "k": k,
                         "num_groups": groups, "group_rows": r} for n, k, r in moe]
        dense = [{"kind": "dense", "m": m, "n": n, "k": k} for m, n, k in shapes]
        # decode sizes first (the budget may stop the sweep before the last cases): dense M <= 256, the grouped MoE
        # problems, then prefill
        return [c for c in dense if c["m"] <= 256] + grouped + [c for c in dense if c["m"] > 256]

    @staticmethod
    def _rows(case) -> int:
        """Rows per problem: M (dense), expected_m (masked) or rows per expert (contiguous)."""
        return case.get("expected_m") or case.get("group_rows") or case["m"]

    def variants(self, ctx, case):
        base = {"DEEPKERNELS_GEMM_CONFIG": None, "DEEPKERNELS_GEMM_SM90_BLOCKS": None}
        if _emulating(ctx):
            base["DEEPKERNELS_EMULATE_SMS"] = str(self.EMU_SMS)
        out = [Variant("portable", {**base, "DEEPKERNELS_GEMM_SM90": None})]
        if not (_on_hopper(ctx) or _emulating(ctx)):
            return out
        sm90 = {**base, "DEEPKERNELS_GEMM_SM90": "1"}
        out.append(Variant("sm90 heuristic", sm90))
        k_blocks = -(-case["k"] // 128)
        splits = [s for s in (1, 2, 4, 8) if s <= k_blocks and (s == 1 or self._rows(case) <= 256)]
        for block_m, block_n in gemm._SM90_SHAPES:
            for split in splits:
                out.append(Variant(f"sm90 {block_m},{block_n},{split}",
                                   {**sm90, "DEEPKERNELS_GEMM_CONFIG": f"{block_m},{block_n},{split}"}))
            for split in (splits if not _emulating(ctx) else splits[:2]):  # the overlapped promotion
                if (block_m, block_n) == (128, 128):
                    break  # no overlapped variant (registers)
                out.append(Variant(f"sm90 {block_m},{block_n},{split},0,1",
                                   {**sm90, "DEEPKERNELS_GEMM_CONFIG": f"{block_m},{block_n},{split},0,1"}))
            # the TMA-store epilogue (split 1 only: split-K slices store fp32 to the workspace), alone and with the
            # overlapped promotion
            out.append(Variant(f"sm90 {block_m},{block_n},1,0,0,1",
                               {**sm90, "DEEPKERNELS_GEMM_CONFIG": f"{block_m},{block_n},1,0,0,1"}))
            if (block_m, block_n) != (128, 128):  # no overlapped variant (registers)
                out.append(Variant(f"sm90 {block_m},{block_n},1,0,1,1",
                                   {**sm90, "DEEPKERNELS_GEMM_CONFIG": f"{block_m},{block_n},1,0,1,1"}))
            if _emulating(ctx):  # the shallowest ring too (phases wrap every other K block)
                out.append(Variant(f"sm90 {block_m},{block_n},1,2",
                                   {**sm90, "DEEPKERNELS_GEMM_CONFIG": f"{block_m},{block_n},1,2"}))
        return out

    def prepare(self, ctx, case):
        if case["kind"] != "dense":
            return self._prepare_grouped(ctx, case)
        m, n, k = case["m"], case["n"], case["k"]
        gen = torch.Generator().manual_seed(m * 31 + n * 7 + k)
        a = torch.randn(m, k, generator=gen).to(ctx.device, torch.bfloat16)
        b = torch.randn(n, k, generator=gen).to(ctx.device, torch.bfloat16)
        with reference():
            aq, sa = deepkernels.per_token_cast_to_fp8(a)
            bq, sb = deepkernels.per_block_cast_to_fp8(b)
        want = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
        gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
        out = torch.empty_like(want)

        def call():
            return deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)

        def check(got):
            if got.isnan().any():
                return "NaN in the output"
            diff = calc_diff(got.float(), want.float())
            return None if diff < 1e-5 else f"calc_diff {diff:.2e} vs the reference"

        return Prepared(call, check, 2.0 * m * n * k)

    def _prepare_grouped(self, ctx, case):
        """A masked or contiguous MoE problem (operands made on the device), checked against the reference: every
        valid row, and rows no variant may write (masked: >= masked_m[g], poisoned once) still NaN. The first call
        after each check re-poisons the valid rows, so a variant that writes nothing cannot pass on stale values."""
        kind, m, n, k, groups = case["kind"], case["m"], case["n"], case["k"], case["num_groups"]
        gen = torch.Generator(device=ctx.device).manual_seed(m * 31 + n * 7 + k + groups)
        rows = self._rows(case)
        b = torch.randn(groups, n, k, generator=gen, device=ctx.device).to(torch.bfloat16)
        with reference():
            pairs = [deepkernels.per_block_cast_to_fp8(b[g]) for g in range(groups)]
        bq, sb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        del b, pairs
        if kind == "masked":
            a = torch.randn(groups, m, k, generator=gen, device=ctx.device).to(torch.bfloat16)
            # DeepGEMM's test spread: masked_m[g] ~ expected_m x U(0.7, 1.3)
            spread = 0.7 + 0.6 * torch.rand(groups, generator=gen, device=ctx.device)
            masked_m = (rows * spread).round().clamp(0, m).to(torch.int32)
            valid = torch.arange(m, device=ctx.device)[None, :] < masked_m[:, None]
        else:
            align = gemm.get_m_alignment_for_contiguous_layout()
            segment = -(-rows // align) * align
            a = torch.randn(m, k, generator=gen, device=ctx.device).to(torch.bfloat16)
            m_indices = torch.full((m,), -1, dtype=torch.int32, device=ctx.device)
            for g in range(groups):
                m_indices[g * segment:g * segment + rows] = g
            valid = m_indices >= 0
        with reference():
            aq, sa = deepkernels.per_token_cast_to_fp8(a)
        del a
        out = torch.full((groups, m, n) if kind == "masked" else (m, n), float("nan"), dtype=torch.bfloat16,
                         device=ctx.device)
        want = torch.empty_like(out)
        if kind == "masked":
            gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, rows)
        else:
            gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq, sa, bq, sb, want, m_indices)
        fresh = [True]

        def call():
            if fresh[0]:
                out[valid] = float("nan")
                fresh[0] = False
            if kind == "masked":
                return deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, rows)
            return deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_indices)

        def check(got):
            fresh[0] = True
            if kind == "masked" and not got[~valid].isnan().all():
                return "rows >= masked_m[g] written"
            if kind == "contiguous" and not (got[~valid] == 0).all():
                return "padding rows (m_indices -1) not zero"
            if got[valid].isnan().any():
                return "NaN in the valid rows"
            if not valid.any():
                return None
            diff = calc_diff(got[valid].float(), want[valid].float())
            return None if diff < 1e-5 else f"calc_diff {diff:.2e} vs the reference"

        return Prepared(call, check, 2.0 * int(valid.sum()) * n * k)

    def describe(self, ctx, case, variant):
        """The plan the launcher ran for this variant (read back from the extension)."""
        plan = gemm.last_launch_plan()
        keys = ("kernel", "block_m", "block_n", "split_k", "stages", "overlap", "tma_store", "ctas")
        return {key: plan[key] for key in keys} if plan else {}

    def table_entries(self, ctx, results):
        """This device's table: per problem, the fastest sm_90a plan when it beats the heuristic's."""
        if not _on_hopper(ctx):
            return []
        props = torch.cuda.get_device_properties(ctx.device)
        entries = []
        by_case: dict = {}
        for r in results:
            if r.family == self.name and r.ok and r.us is not None:
                by_case.setdefault(json.dumps(r.case, sort_keys=True), []).append(r)
        for rows in by_case.values():
            heuristic = next((r for r in rows if r.variant == "sm90 heuristic"), None)
            portable = next((r for r in rows if r.variant == "portable"), None)
            configs = [r for r in rows if r.variant.startswith("sm90 ") and r.variant != "sm90 heuristic"]
            if heuristic is None or not configs:
                continue
            best = min(configs, key=lambda r: r.us)
            if best.us >= (1 - TABLE_MIN_GAIN) * heuristic.us:
                continue
            plan = best.extra
            entries.append({
                "device": props.name, "num_sms": props.multi_processor_count,
                **{key: best.case[key] for key in ("kind", "m", "n", "k")},
                "num_groups": best.case.get("num_groups", 1),
                "expected_m": best.case.get("expected_m", 0) if best.case["kind"] == "masked" else 0,
                "block_m": plan["block_m"], "block_n": plan["block_n"], "split_k": plan["split_k"],
                "stages": 0, "overlap": plan["overlap"], "tma_store": plan.get("tma_store", 0),
                "us": round(best.us, 2), "heuristic_us": round(heuristic.us, 2),
                "heuristic": {k: heuristic.extra.get(k) for k in ("block_m", "block_n", "split_k")},
                "portable_us": None if portable is None else round(portable.us, 2),
                "date": datetime.date.today().isoformat(), "commit": common.git_commit(),
            })
        return entries


# ---------------------------------------------------------------------------------------------------------
# MLA decode: every split-KV kernel variant (DEEPKERNELS_MLA_VARIANT, deepkernels.mla.MLA_VARIANTS)

class MlaFamily:
    name = "mla"

    def cases(self, ctx):
        from bench import mla as bench_mla
        if _emulating(ctx) or ctx.quick:
            grid = [(2, 1, 16, 128, "bf16"), (2, 2, 16, 128, "e4m3")] if not ctx.quick else [(2, 1, 16, 128, "bf16")]
        else:
            grid = [(bench_mla.BATCH, s_q, h_q, sk, c) for c in ("bf16", "e4m3") for s_q in bench_mla.S_Q
                    for h_q in (16, 64, 128) for sk in (4096, 16384)]
        return [{"b": b, "s_q": s_q, "h_q": h_q, "mean_sk": sk, "cache": c} for b, s_q, h_q, sk, c in grid]

    def variants(self, ctx, case):
        from deepkernels import mla
        dtype = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "fp16": torch.float16}[case["cache"]]
        out = []
        for name, dtypes in mla.MLA_VARIANTS.items():
            if dtype not in dtypes:
                continue
            if name in mla.SM90_VARIANTS and not (_on_hopper(ctx) or _emulating(ctx)):
                continue
            out.append(Variant(name, {mla.VARIANT_ENV: name, mla.SM90_ENV: None}))
        return out

    def prepare(self, ctx, case):
        from bench import mla as bench_mla
        dtype = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "fp16": torch.float16}[case["cache"]]
        b, s_q, h_q = case["b"], case["s_q"], case["h_q"]
        q, kv, kv_scale, block_table, lens, lens_host = bench_mla._make(b, s_q, h_q, case["mean_sk"], ctx.device,
                                                                         dtype)

        def call():
            meta, splits = deepkernels.get_mla_decode_metadata(lens, s_q * h_q, 1)
            return deepkernels.mla_decode_with_kvcache(q, kv, block_table, lens, 512, meta, splits, bench_mla.SCALE,
                                                       True, kv_scale)

        with reference():
            want = call()[0].float()

        def check(got):
            out = got[0].float()
            if out.isnan().any():
                return "NaN in the output"
            diff = calc_diff(out, want)
            return None if diff < 1e-4 else f"calc_diff {diff:.2e} vs the reference"

        total = int(lens_host.sum())
        return Prepared(call, check, 2.0 * s_q * total * h_q * (576 + 512))


# ---------------------------------------------------------------------------------------------------------
# MoE: the wire-buffer pack, fused kernel vs torch copies (DEEPKERNELS_MOE_PACK)

class MoePackFamily:
    name = "moe"

    def cases(self, ctx):
        if _emulating(ctx) or ctx.quick:
            return [{"tokens": 16, "hidden": 256, "topk": 4, "experts": 16, "ranks": 4, "fp8": fp8}
                    for fp8 in ((False,) if ctx.quick else (False, True))]
        return [{"tokens": t, "hidden": 7168, "topk": 8, "experts": 256, "ranks": 8, "fp8": fp8}
                for t in (128, 4096) for fp8 in (False, True)]

    def variants(self, ctx, case):
        from deepkernels.moe import wire
        return [Variant(name, {"DEEPKERNELS_MOE_PACK": name}) for name in wire._PACK_VARIANTS]

    def prepare(self, ctx, case):
        from deepkernels import moe
        from deepkernels.moe import wire
        t, h, k, e, r = (case[key] for key in ("tokens", "hidden", "topk", "experts", "ranks"))
        gen = torch.Generator().manual_seed(t + h)
        ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices.to(ctx.device)
        w = torch.rand(t, k, generator=gen).to(ctx.device)
        x = torch.randn(t, h, generator=gen).to(ctx.device, torch.bfloat16)
        with reference():
            _, _, in_rank = moe.get_dispatch_layout(ids, e, r)
            pos = moe.dispatch_positions(in_rank)
            src = moe.positions_to_src_idx(pos, int(in_rank.sum()))
        per_rank = in_rank.sum(0, dtype=torch.int32)

        def call():
            return wire.pack_rows(x, src, ids, w, per_rank, e // r, None, case["fp8"])

        with _env({"DEEPKERNELS_MOE_PACK": "torch"}), reference():
            want = call()

        def check(got):
            got_buf = got[0] if isinstance(got, tuple) else got
            want_buf = want[0] if isinstance(want, tuple) else want
            return None if torch.equal(got_buf, want_buf) else "the buffer differs from the torch-copies path"

        return Prepared(call, check, None)


FAMILIES = [GemmFamily(), MlaFamily(), MoePackFamily()]


# ---------------------------------------------------------------------------------------------------------

def sweep(ctx: common.Context, families, budget_s: float, log=print) -> list[Result]:
    start = time.monotonic()
    results: list[Result] = []
    emulation = deepkernels.emulate() if _emulating(ctx) else contextlib.nullcontext()
    with emulation:
        for family in families:
            for case in family.cases(ctx):
                prepared = family.prepare(ctx, case)
                for variant in family.variants(ctx, case):
                    if time.monotonic() - start > budget_s:
                        results.append(Result(family.name, case, variant.label, False, error="skipped: budget"))
                        continue
                    result = Result(family.name, case, variant.label, False)
                    try:
                        with _env(variant.env):
                            got = prepared.call()
                            if ctx.is_cuda:
                                torch.cuda.synchronize()
                            if hasattr(family, "describe"):
                                result.extra = family.describe(ctx, case, variant)
                            why = prepared.check(got)
                            if why is None:
                                result.ok = True
                                if ctx.is_cuda:
                                    result.us = 1e3 * common.time_ms(prepared.call, ctx)
                                    if prepared.flops:
                                        result.extra["TFLOPS"] = round(prepared.flops / (result.us * 1e6), 2)
                            else:
                                result.error = why
                    except (RuntimeError, ValueError) as exc:
                        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    results.append(result)
                    log(_format(result))
    return results


def _format(r: Result) -> str:
    case = " ".join(f"{k}={v}" for k, v in r.case.items())
    status = "ok" if r.ok else f"FAIL ({r.error})"
    speed = "" if r.us is None else f"  {r.us:9.2f} us" + (f"  {r.extra['TFLOPS']} TFLOPS" if "TFLOPS" in r.extra else "")
    plan = ""
    if r.family == "gemm" and r.extra.get("kernel"):
        plan = (f"  [{r.extra['kernel']} {r.extra['block_m']}x{r.extra['block_n']} split {r.extra['split_k']}"
                f"{' overlap' if r.extra.get('overlap') else ''}{' tma-store' if r.extra.get('tma_store') else ''}]")
    return f"{r.family:5s} {case:48s} {r.variant:22s} {status}{speed}{plan}"


def write_table(path: str, device_name: str, entries: list[dict]) -> None:
    """Replace this device's entries of the table at path (other devices' entries kept)."""
    table = gemm.load_tuning_table(path)
    kept = [e for e in table["entries"] if e.get("device") != device_name]
    table["entries"] = kept + entries
    table["note"] = ("Written by `python -m bench sweep` on a GPU: per device and problem, the fastest sm_90a plan "
                     "measured, where it beats the heuristic's by more than 3%. Elsewhere the heuristic "
                     "(csrc/fp8_gemm/heuristic.h) decides.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    parser = Parser(prog="python -m bench sweep", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases (smoke)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES),
                        help=f"comma-separated subset of {[f.name for f in FAMILIES]}")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting variants after this long")
    parser.add_argument("--table", default=gemm.TUNING_TABLE_PATH, help="GEMM tuning table to update (GPU)")
    parser.add_argument("--no-table", action="store_true", help="do not write the GEMM tuning table")
    parser.add_argument("--out", default=None, help="results JSON (default on GPU: bench/results/sweep-...)")
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    known = {f.name: f for f in FAMILIES}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: --families: expected names from {list(known)}, got {unknown}", file=sys.stderr)
        return 2
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        print(f"error: --budget-s: expected a positive number of seconds, got {args.budget_s}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"error: --device: expected cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: --device: expected cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device: {args.device!r} asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cpu" and not deepkernels.build_info()["emulator"]:
        print(f"error: no GPU and the emulator is not built ({deepkernels.build_info()['emulator_error']})",
              file=sys.stderr)
        return 1
    on_cpu = device.type == "cpu"
    ctx = common.Context(device=device, quick=args.quick, warmup=1 if on_cpu else 3,
                         repeats=1 if on_cpu else 10)
    env = common.environment(device)
    print(f"# sweep | {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}")
    if on_cpu:
        print("# no GPU: every variant on small shapes under the SIMT emulator, checked against the references "
              "(correctness smoke test: nothing timed, no table written)")
    results = sweep(ctx, [known[n] for n in names], args.budget_s)
    failed = [r for r in results if not r.ok and not (r.error or "").startswith("skipped")]
    skipped = [r for r in results if (r.error or "").startswith("skipped")]
    print(f"# {len(results) - len(failed) - len(skipped)} variants ok, {len(failed)} failed, {len(skipped)} skipped "
          f"(budget)")
    if not on_cpu and not args.no_table and "gemm" in names:
        entries = known["gemm"].table_entries(ctx, results)
        if _on_hopper(ctx):
            write_table(args.table, torch.cuda.get_device_name(device), entries)
            print(f"# wrote {len(entries)} table entries for {torch.cuda.get_device_name(device)} to {args.table}")
    # a subfolder: bench/report.py and bench/plot.py read bench/results/*.json (the suites' row format)
    out = args.out or (None if on_cpu else os.path.join(common.RESULTS_DIR, "sweep",
                                                        os.path.basename(common.results_path(env, device))))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"environment": env, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
        print(f"# wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
