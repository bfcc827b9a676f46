"""MLA paged decode: reference vs an independent float64 formulation, the split plan, the fp8 cache write,
edge cases (empty sequences, NaN past the length, poisoned block-table entries), errors, opcheck,
torch.compile, the absorbed module; CUDA kernels vs the reference on the same case list (FlashMLA's
tolerances), NaN-poisoned outputs and CUDA-graph capture. Each kernel test runs on the GPU (kernel_device
"cuda") and, on smaller cases, emulated on the CPU (kernel_device "emu", see tests/conftest.py)."""
import contextlib
import math
import os

import pytest
import torch

import deepkernels
from deepkernels import mla
from deepkernels.compat import flash_mla
from deepkernels.nn import PagedMLAKVCache, mla_decode_absorbed
from deepkernels.testing import calc_diff, opcheck, reference, synchronize

E4M3 = torch.float8_e4m3fn
POISON_BLOCK = 2**30  # an unused block-table entry: indexing with it would fail loudly
# DeepSeek-V3 with YaRN (factor 40, mscale_all_dim 1): 192^-0.5 * (0.1 ln 40 + 1)^2
DSV3_SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2


def make_case(lens, s_q, h_q, h_kv=1, page=64, cache_dtype=torch.bfloat16, device="cpu", extra_blocks=3, std=0.25):
    """q, a paged cache with NaN in every slot past each length, a shuffled block table whose unused
    entries are poisoned, and (for e4m3) the per-token scales written by write_mla_kv_cache. An fp16 cache
    comes with an fp16 q (FlashMLA's --dtype fp16 mode); bf16 and e4m3 caches with a bf16 q."""
    b = len(lens)
    max_blocks = max(1, max(-(-n // page) for n in lens)) + 1
    num_blocks = sum(-(-n // page) for n in lens) + extra_blocks
    perm = torch.randperm(num_blocks)
    block_table = torch.full((b, max_blocks), POISON_BLOCK, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // page)
        block_table[i, :k] = perm[used:used + k].to(torch.int32)
        used += k
    q_dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    q = (torch.randn(b, s_q, h_q, 576) * std).to(q_dtype)
    latent = torch.randn(sum(lens), h_kv, 576) * std
    kv_cache = torch.full((num_blocks, page, h_kv, 576), float("nan"), dtype=q_dtype)
    kv_scale = None
    if cache_dtype == E4M3:
        kv_cache = kv_cache.to(E4M3)  # e4m3fn NaN
        kv_scale = torch.full((num_blocks, page, h_kv), float("nan"))
    slots = torch.cat([block_table[i, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for i, n in enumerate(lens)]) if sum(lens) else torch.zeros(0, dtype=torch.int64)
    with reference():  # the case is built on the CPU by the reference, emulated test or not
        deepkernels.write_mla_kv_cache(kv_cache, kv_scale, latent.to(q_dtype), slots)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)
    return dict(q=to(q), kv_cache=to(kv_cache), block_table=to(block_table), cache_seqlens=to(seqlens),
                kv_scale=to(kv_scale), latent=latent)


def independent_attention(q, kv_cache, block_table, lens, scale, causal, kv_scale=None):
    """float64: concatenate each sequence's pages, cut at the length, explicit softmax."""
    b, s_q, h_q, _ = q.shape
    page, h_kv = kv_cache.size(1), kv_cache.size(2)
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i, n in enumerate(lens):
        pages = [int(block_table[i, j]) for j in range(-(-n // page))]
        if not pages:
            continue
        k = torch.cat([kv_cache[p].double() * (1 if kv_scale is None else kv_scale[p].double()[..., None])
                       for p in pages])[:n]                                     # [n, h_kv, 576]
        for h in range(h_q):
            kh = k[:, h // (h_q // h_kv)]
            for t in range(s_q):
                limit = n - s_q + t if causal else n - 1
                if limit < 0:
                    continue
                s = (kh[: limit + 1] @ q[i, t, h].double()) * scale
                w = torch.exp(s - s.max())
                out[i, t, h] = (w / w.sum()) @ kh[: limit + 1, :512]
                lse[i, h, t] = s.max() + torch.log(w.sum())
    return out, lse


def run_decode(case, s_q, h_q, causal, scale, num_sm_parts=None):
    h_kv = case["kv_cache"].size(2)
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], s_q * h_q // h_kv, h_kv, num_sm_parts)
    return deepkernels.mla_decode_with_kvcache(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                               512, meta, splits, scale, causal, case["kv_scale"])


# (lens, s_q, h_q, h_kv, page, causal): varlen with zero-length sequences, every page size, s_q 1/2.
CASES = [
    ([37, 0, 200, 64], 1, 16, 1, 64, False),
    ([1, 129, 0, 77], 2, 16, 1, 16, True),
    ([300, 5], 2, 32, 1, 128, True),
    ([0, 0], 1, 16, 1, 64, False),
    ([90, 150, 1], 1, 64, 1, 16, False),
    ([65, 3], 2, 128, 1, 64, True),
    ([1, 2], 2, 16, 1, 64, True),      # causal row 0 of the length-1 sequence sees nothing
    ([100, 31], 1, 32, 2, 32, False),  # h_kv = 2, page 32
    ([250], 2, 16, 1, 48, False),      # page 48 (a multiple of 16 that is not a power of two)
]


def case_id(c):
    return f"L{'-'.join(map(str, c[0]))}_sq{c[1]}_h{c[2]}_kv{c[3]}_p{c[4]}{'_causal' if c[5] else ''}"


CASE_IDS = [case_id(c) for c in CASES]


def per_device(argnames, cuda_cases, emu_cases, ids=str):
    """parametrize ``kernel_device`` (indirectly: the conftest fixture still turns emulation on) with its own
    case list per device: the full list on the GPU, a smaller one emulated on the CPU."""
    def params(device, cases, mark):
        return [pytest.param(device, *c, marks=mark, id=f"{device}-{ids(c)}") for c in cases]
    return pytest.mark.parametrize(f"kernel_device,{argnames}", params("cuda", cuda_cases, pytest.mark.cuda) +
                                   params("emu", emu_cases, pytest.mark.emu), indirect=["kernel_device"])


@pytest.mark.parametrize("lens,s_q,h_q,h_kv,page,causal", CASES[:6], ids=CASE_IDS[:6])
def test_reference_vs_independent(lens, s_q, h_q, h_kv, page, causal):
    case = make_case(lens, s_q, h_q, h_kv, page)
    h_q_small = h_q if h_q <= 32 else 16  # the float64 loop is slow; heads are independent
    q = case["q"][:, :, :h_q_small]
    out, lse = mla.mla_attention_fp32(q, case["kv_cache"], case["block_table"], case["cache_seqlens"], 512,
                                      DSV3_SCALE, causal)
    ref_out, ref_lse = independent_attention(q, case["kv_cache"], case["block_table"], lens, DSV3_SCALE, causal)
    err = (out.double() - ref_out).abs().max().item()
    assert err < 1e-5, f"{lens} s_q={s_q} h={h_q}: out max err {err:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{lens}: +inf lse pattern differs"
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() < 1e-5 if fin.any() else True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens,s_q,h_q,h_kv,page,causal", CASES, ids=CASE_IDS)
def test_decode_op_contract(lens, s_q, h_q, h_kv, page, causal, dtype):
    case = make_case(lens, s_q, h_q, h_kv, page, cache_dtype=dtype)
    out, lse = run_decode(case, s_q, h_q, causal, DSV3_SCALE)
    assert out.dtype == dtype and out.shape == (len(lens), s_q, h_q, 512)
    assert lse.dtype == torch.float32 and lse.shape == (len(lens), h_q, s_q)
    assert not out.isnan().any(), "NaN from slots past the length leaked into out"
    for i, n in enumerate(lens):
        for t in range(s_q):
            sees = (n - s_q + t >= 0) if causal else n > 0
            assert torch.isinf(lse[i, :, t]).all() != sees and (sees or (out[i, t] == 0).all()), \
                f"seq {i} (len {n}) token {t}: expected {'finite' if sees else '+inf'} lse"
    assert (lse[torch.isinf(lse)] > 0).all(), "empty rows must give lse = +inf"


def test_default_softmax_scale_is_576():
    case = make_case([40, 7], 1, 16)
    out_default, _ = run_decode(case, 1, 16, False, None)
    out_explicit, _ = run_decode(case, 1, 16, False, 576 ** -0.5)
    assert torch.equal(out_default, out_explicit)


# ---------------------------------------------------------------------------------------------
# the split plan

def emulate_split_plan(case, s_q, h_q, causal, scale, meta, splits):
    """Run attention the way the CUDA kernel schedules it: per part, per sequence range, one partial per
    split, then merge partials by lse. Checks every work block is covered exactly once."""
    lens = case["cache_seqlens"].tolist()
    b = len(lens)
    total = int(splits[-1])
    partial_o = torch.full((total, s_q, h_q, 512), float("nan"))
    partial_lse = torch.full((total, h_q, s_q), float("nan"))
    covered = [torch.zeros(-(-n // mla.BLOCK_TOKENS), dtype=torch.int32) for n in lens]
    for begin_b, begin_blk, end_b, end_blk, begin_split, *_ in meta.tolist():
        for i in range(begin_b, min(end_b, b - 1) + 1) if begin_b < b else []:
            lo = begin_blk if i == begin_b else 0
            hi = end_blk if i == end_b else len(covered[i])
            if hi <= lo:
                continue
            covered[i][lo:hi] += 1
            split = begin_split if i == begin_b else int(splits[i])
            assert int(splits[i]) <= split < int(splits[i + 1]), f"part writes split {split} outside seq {i}"
            assert partial_o[split].isnan().all(), f"split {split} written twice"
            t0, t1 = lo * mla.BLOCK_TOKENS, min(hi * mla.BLOCK_TOKENS, lens[i])
            kv = mla._gather_sequence(case["kv_cache"], case["kv_scale"], case["block_table"][i], lens[i])
            s = torch.einsum("shd,nd->hsn", case["q"][i].float(), kv[:, 0]) * scale
            pos = torch.arange(lens[i])
            visible = (pos >= t0) & (pos < t1)
            visible = visible[None, :] & ((pos[None, :] <= lens[i] - s_q + torch.arange(s_q)[:, None]) if causal
                                          else torch.ones(s_q, 1, dtype=torch.bool))
            s = s.masked_fill(~visible, -math.inf)
            lse = torch.logsumexp(s, -1)
            p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
            partial_o[split] = torch.einsum("hsn,nd->shd", p, kv[:, 0, :512])
            partial_lse[split] = lse
    for i, n in enumerate(lens):
        assert (covered[i] == 1).all(), f"seq {i} (len {n}): blocks covered {covered[i].tolist()}"
    assert not partial_lse.isnan().any(), "some split was never written"
    out = torch.zeros(b, s_q, h_q, 512)
    lse = torch.full((b, h_q, s_q), math.inf)
    for i in range(b):
        lo, hi = int(splits[i]), int(splits[i + 1])
        if hi == lo:
            continue
        l = torch.logsumexp(partial_lse[lo:hi], 0)                      # [h, s]
        ok = torch.isfinite(l)
        w = torch.exp(partial_lse[lo:hi] - torch.where(ok, l, 0))       # [n, h, s]
        out[i] = torch.where(ok.T[..., None], torch.einsum("nhs,nshd->shd", w, partial_o[lo:hi]), 0)
        lse[i] = torch.where(ok, l, math.inf)
    return out, lse


@pytest.mark.parametrize("num_sm_parts", [1, 3, 8, 132])
@pytest.mark.parametrize("lens", [[0], [1], [64, 65, 0, 300, 7], [1000, 1, 1, 1], [0, 0, 500]])
def test_split_plan_covers_each_block_once_and_merges_to_reference(lens, num_sm_parts):
    case = make_case(lens, 2, 16, page=16)
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 32, 1, num_sm_parts)
    assert meta.shape == (num_sm_parts, 8) and meta.dtype == torch.int32
    assert splits.shape == (len(lens) + 1,) and splits[0] == 0 and (splits.diff() >= 0).all()
    assert int(splits[-1]) <= len(lens) + num_sm_parts, "partial buffers are sized b + num_sm_parts"
    assert all((splits[i + 1] == splits[i]) == (n == 0) for i, n in enumerate(lens)), "empty seq <=> no split"
    out, lse = emulate_split_plan(case, 2, 16, True, DSV3_SCALE, meta, splits)
    ref_out, ref_lse = mla.mla_attention_fp32(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                              512, DSV3_SCALE, True)
    assert (out - ref_out).abs().max() < 1e-4, f"{lens}/{num_sm_parts}: merged splits differ from the reference"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def emulate_metadata_kernel(lens, parts, chunk=512):
    """csrc/mla_decode/metadata.cuh step by step (chunked scans with carries, per-sequence part writes)."""
    b = len(lens)
    blocks = [-(-n // mla.BLOCK_TOKENS) for n in lens]
    total = sum(blocks)
    per_part = max(1, -(-total // parts))
    meta = [[b, 0, b, 0, 0, 0, 0, 0] if p * per_part >= total else [None] * 5 + [0, 0, 0] for p in range(parts)]
    splits = [0] * (b + 1)
    carry_blocks = carry_splits = 0
    for base in range(0, b, chunk):
        ids = range(base, min(base + chunk, b))
        ends = [carry_blocks + sum(blocks[base:i + 1]) for i in ids]
        counts = []
        for i, end in zip(ids, ends):
            start = end - blocks[i]
            first, last = start // per_part, (end - 1) // per_part if blocks[i] else start // per_part - 1
            counts.append(last - first + 1)
        for k, (i, end) in enumerate(zip(ids, ends)):
            start = end - blocks[i]
            first, last = start // per_part, (end - 1) // per_part if blocks[i] else start // per_part - 1
            splits_end = carry_splits + sum(counts[:k + 1])
            splits[i + 1] = splits_end
            for part in range(first, last + 1):
                begin, stop = part * per_part, min(part * per_part + per_part, total)
                if begin >= start:
                    meta[part][0], meta[part][1], meta[part][4] = i, begin - start, splits_end - counts[k] + part - first
                if stop <= end:
                    meta[part][2], meta[part][3] = i, stop - start
        carry_blocks, carry_splits = ends[-1], carry_splits + sum(counts)
    return torch.tensor(meta, dtype=torch.int32), torch.tensor(splits, dtype=torch.int32)


@pytest.mark.parametrize("b,parts", [(1, 1), (5, 132), (700, 16), (1100, 7), (64, 64)])
def test_metadata_kernel_algorithm_matches_reference(b, parts):
    lens = torch.randint(0, 3000, (b,), dtype=torch.int32)
    lens[::5] = 0
    meta, splits = emulate_metadata_kernel(lens.tolist(), parts, chunk=256)
    ref_meta, ref_splits = mla.get_mla_decode_metadata_ref(lens, 1, 1, parts)
    assert torch.equal(splits, ref_splits), f"b={b} parts={parts}: num_splits differ"
    assert torch.equal(meta, ref_meta), f"b={b} parts={parts}: metadata differs"


# ---------------------------------------------------------------------------------------------
# fp8 cache

def test_write_mla_kv_cache_fp8_layout_and_roundtrip():
    page, h_kv = 16, 2
    kv_cache = torch.zeros(4, page, h_kv, 576, dtype=E4M3)
    kv_scale = torch.zeros(4, page, h_kv)
    rows = torch.randn(5, h_kv, 576) * torch.tensor([0.01, 3.0])[None, :, None]
    slots = torch.tensor([0, 17, -1, 63, 20])
    deepkernels.write_mla_kv_cache(kv_cache, kv_scale, rows, slots)
    for j, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        blk, off = divmod(s, page)
        amax = rows[j].abs().amax(-1).clamp(min=1e-4)
        torch.testing.assert_close(kv_scale[blk, off], amax / 448, rtol=0, atol=0)
        back = kv_cache[blk, off].float() * kv_scale[blk, off, :, None]
        bound = rows[j].abs() / 16 + kv_scale[blk, off, :, None] * 2**-9
        assert ((back - rows[j]).abs() <= bound).all(), f"row {j}: fp8 roundtrip outside e4m3 rounding"
    written = {divmod(s, page) for s in slots.tolist() if s >= 0}
    for blk in range(4):
        for off in range(page):
            if (blk, off) not in written:
                assert (kv_scale[blk, off] == 0).all(), "slot -1 or an untouched slot was written"


@pytest.mark.parametrize("lens,s_q,h_q,page,causal", [([100, 0, 33], 1, 16, 64, False), ([70, 129], 2, 32, 16, True)])
def test_fp8_cache_within_tolerance(lens, s_q, h_q, page, causal):
    """e4m3 (3 mantissa bits, per-token scale) vs the same rows in bf16: cosine diff < 1e-3, max abs < 2e-2."""
    fp8 = make_case(lens, s_q, h_q, page=page, cache_dtype=E4M3)
    torch.manual_seed(0)
    bf16 = make_case(lens, s_q, h_q, page=page)
    out8, lse8 = run_decode(fp8, s_q, h_q, causal, DSV3_SCALE)
    out16, lse16 = run_decode(bf16, s_q, h_q, causal, DSV3_SCALE)
    diff = calc_diff(out8.float(), out16.float())
    assert diff < 1e-3 and (out8.float() - out16.float()).abs().max() < 2e-2, f"fp8 cache: diff {diff:.3g}"
    assert torch.equal(torch.isinf(lse8), torch.isinf(lse16))


# ---------------------------------------------------------------------------------------------
# errors, opcheck, compile

def _good_args():
    case = make_case([20, 5], 1, 16)
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 16, 1)
    return dict(q=case["q"], kv_cache=case["kv_cache"], block_table=case["block_table"],
                cache_seqlens=case["cache_seqlens"], head_dim_v=512, tile_scheduler_metadata=meta,
                num_splits=splits)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(q=a["q"].float()), "q: expected dtype bfloat16"),
    (lambda a: a.update(q=a["q"][..., :512]), "q: expected last dim 576"),
    (lambda a: a.update(q=a["q"][:, :, :15], kv_cache=a["kv_cache"].expand(-1, -1, 2, -1).contiguous()),
     "multiple of kv_cache heads"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :8]), "page size"),
    (lambda a: a.update(kv_cache=a["kv_cache"].to(E4M3)), "kv_scale: required"),
    (lambda a: a.update(kv_scale=torch.ones(a["kv_cache"].shape[:3])), "kv_scale: only valid"),
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table: expected dtype int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "block_table: expected 2 rows"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), "cache_seqlens: expected shape"),
    (lambda a: a.update(num_splits=a["num_splits"][:2]), "num_splits: expected shape"),
    (lambda a: a.update(tile_scheduler_metadata=a["tile_scheduler_metadata"][:, :4]), "tile_scheduler_metadata"),
    (lambda a: a.update(head_dim_v=576), "head_dim_v: expected 512"),
    (lambda a: a.update(softmax_scale=-1.0), "softmax_scale"),
])
def test_bad_inputs_raise_clear_errors(change, match):
    args = _good_args()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        deepkernels.mla_decode_with_kvcache(**args)


def test_metadata_bad_inputs():
    with pytest.raises(ValueError, match="cache_seqlens: expected dtype int32"):
        deepkernels.get_mla_decode_metadata(torch.tensor([1, 2]), 16, 1)
    with pytest.raises(ValueError, match="num_heads_k"):
        deepkernels.get_mla_decode_metadata(torch.tensor([1], dtype=torch.int32), 16, 0)


def test_opcheck():
    args = _good_args()
    opcheck(torch.ops.deepkernels.get_mla_decode_metadata, (args["cache_seqlens"], 16, 1, 4))
    opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
            (args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"], 512,
             args["tile_scheduler_metadata"], args["num_splits"], 0.1, True, None))
    fp8 = make_case([20, 5], 2, 16, cache_dtype=E4M3)
    fp8["kv_scale"].nan_to_num_(1.0)  # the helper's unchanged-input check compares with torch.equal
    meta, splits = deepkernels.get_mla_decode_metadata(fp8["cache_seqlens"], 32, 1)
    opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
            (fp8["q"], fp8["kv_cache"], fp8["block_table"], fp8["cache_seqlens"], 512, meta, splits, 0.1, True,
             fp8["kv_scale"]))
    fp16 = make_case([20, 5], 2, 16, cache_dtype=torch.float16)
    meta, splits = deepkernels.get_mla_decode_metadata(fp16["cache_seqlens"], 32, 1)
    opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
            (fp16["q"], fp16["kv_cache"], fp16["block_table"], fp16["cache_seqlens"], 512, meta, splits, 0.1, True,
             None))
    for dtype in (torch.bfloat16, torch.float16):
        cache = torch.zeros(2, 16, 1, 576, dtype=dtype)
        opcheck(torch.ops.deepkernels.write_mla_kv_cache,
                (cache, None, torch.randn(3, 1, 576), torch.tensor([0, 5, 31])))
    opcheck(torch.ops.deepkernels.write_mla_kv_cache,
            (torch.zeros(2, 16, 1, 576, dtype=E4M3), torch.ones(2, 16, 1), torch.randn(3, 1, 576).to(torch.bfloat16),
             torch.tensor([0, -1, 31])))


def test_torch_compile():
    args = _good_args()

    def step(q, kv_cache, block_table, cache_seqlens):
        meta, splits = deepkernels.get_mla_decode_metadata(cache_seqlens, 16, 1, 4)
        return deepkernels.mla_decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, 512, meta, splits)

    eager = step(args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"])
    compiled = torch.compile(step, fullgraph=True)(args["q"], args["kv_cache"], args["block_table"],
                                                   args["cache_seqlens"])
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flash_mla_compat(dtype):
    """bf16 and FlashMLA's --dtype fp16 mode (q, cache and out fp16)."""
    case = make_case([50, 3], 2, 16, cache_dtype=dtype)
    meta, splits = flash_mla.get_mla_metadata(case["cache_seqlens"], 2 * 16 // 1, 1)
    out, lse = flash_mla.flash_mla_with_kvcache(case["q"], case["kv_cache"], case["block_table"],
                                                case["cache_seqlens"], 512, meta, splits, causal=True)
    ref, ref_lse = run_decode(case, 2, 16, True, None)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(lse, ref_lse)
    fp32, _ = mla.mla_attention_fp32(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], 512,
                                     576 ** -0.5, True)
    _assert_close_flashmla(out, fp32, f"compat {dtype}")


def test_fp16_q_needs_fp16_cache():
    case = make_case([20, 5], 1, 16, cache_dtype=torch.float16)
    for cache, scale, match in [(case["kv_cache"].to(torch.bfloat16), None, "kv_cache: expected q's dtype"),
                                (case["kv_cache"].to(E4M3), torch.ones(case["kv_cache"].shape[:3]),
                                 "e4m3 cache is read with a bfloat16 q")]:
        with pytest.raises(ValueError, match=match):
            deepkernels.mla_decode_with_kvcache(case["q"], cache, case["block_table"], case["cache_seqlens"], 512,
                                                *deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 16, 1),
                                                kv_scale=scale)
    with pytest.raises(ValueError, match="kv_cache: expected q's dtype"):
        bf16 = make_case([20, 5], 1, 16)
        deepkernels.mla_decode_with_kvcache(bf16["q"], case["kv_cache"], bf16["block_table"], bf16["cache_seqlens"],
                                            512, *deepkernels.get_mla_decode_metadata(bf16["cache_seqlens"], 16, 1))


# ---------------------------------------------------------------------------------------------
# absorbed MLA module

def naive_mla(q_nope, q_pe, latents, k_pes, w_uk, w_uv, scale):
    """Unabsorbed MLA: K = [W_UK c | k_pe] per head, V = W_UV c, causal over the last s tokens."""
    b, s, h, _ = q_nope.shape
    out = torch.zeros(b, s, h, w_uv.size(-1), dtype=torch.float64)
    for i in range(b):
        c, pe = latents[i].double(), k_pes[i].double()           # [n, 512], [n, 64]
        n = c.size(0)
        k_nope = torch.einsum("hdc,nc->hnd", w_uk.double(), c)   # [h, n, d_nope]
        v = torch.einsum("hcv,nc->hnv", w_uv.double(), c)         # [h, n, d_v]
        for t in range(s):
            sc = (torch.einsum("hd,hnd->hn", q_nope[i, t].double(), k_nope) + q_pe[i, t].double() @ pe.T) * scale
            sc[:, n - s + t + 1:] = -math.inf
            out[i, t] = torch.einsum("hn,hnv->hv", torch.softmax(sc, -1), v)
    return out


PAGED_CASES = [(torch.float32, 16, 1e-5), (torch.bfloat16, 64, 2e-2), (E4M3, 32, 6e-2)]


def _check_paged_cache_and_absorbed_decode(dtype, page, tol, device):
    b, h, d_nope, d_v, prompt, s = 2, 4, 128, 128, 37, 2
    w_uk, w_uv = torch.randn(h, d_nope, 512) / 20, torch.randn(h, 512, d_v) / 20
    cache = PagedMLAKVCache(num_layers=2, batch_size=b, max_seq_len=64, page_size=page, dtype=dtype,
                            shuffle_blocks=True, device=device)
    latents, k_pes = torch.randn(b, prompt + s, 512), torch.randn(b, prompt + s, 64)
    for layer in range(2):
        cache.append(layer, latents[:, :prompt].to(device), k_pes[:, :prompt].to(device))
        cache.append(layer, latents[:, prompt:].to(device), k_pes[:, prompt:].to(device))
    assert cache.cache_seqlens.tolist() == [prompt + s] * b
    q_nope, q_pe = torch.randn(b, s, h, d_nope), torch.randn(b, s, h, 64)
    args = [t.to(device) for t in (q_nope, q_pe, w_uk, w_uv)]
    out = mla_decode_absorbed(*args, cache.kv_cache(1), cache.block_table, cache.layer_seqlens(1), DSV3_SCALE,
                              causal=True, kv_scale=cache.kv_scale(1))
    assert torch.equal(cache.attend(1, *args, DSV3_SCALE), out)
    ref = naive_mla(q_nope, q_pe, latents, k_pes, w_uk, w_uv, DSV3_SCALE)
    err = (out.cpu().double() - ref).abs().max().item() / ref.abs().max().item()
    assert out.shape == (b, s, h, d_v) and err < tol, f"{dtype}: relative max err {err:.3g}"


@pytest.mark.parametrize("dtype,page,tol", PAGED_CASES)
def test_paged_cache_and_absorbed_decode_vs_naive_mla(dtype, page, tol):
    _check_paged_cache_and_absorbed_decode(dtype, page, tol, "cpu")


# emulated: the float32 cache is the pure-torch path (no kernel), the CPU test above covers it
@per_device("dtype,page,tol", PAGED_CASES, PAGED_CASES[1:], ids=lambda c: str(c[0]).removeprefix("torch."))
def test_kernel_paged_cache_and_absorbed_decode_vs_naive_mla(kernel_device, dtype, page, tol):
    _check_paged_cache_and_absorbed_decode(dtype, page, tol, kernel_device)


# ---------------------------------------------------------------------------------------------
# CUDA kernels vs the fp32 reference (FlashMLA's tolerances; the margins were checked with a CPU
# emulation of the kernel's numerics: bf16 P, per-token scale folded into P, 32-key tiles, lse merge)

def _assert_close_flashmla(out, ref, what, fp8=False):
    """FlashMLA's bf16 check: |out - ref| <= 8e-4 + 2.01/128 * |ref| (torch.testing.assert_close semantics)
    and cosine diff <= 5e-6. e4m3 cache (stated tolerance): the kernel folds each token's scale into P
    before P's bf16 rounding, so the rounding errors are independent per token instead of nearly uniform;
    atol 4e-3, cosine diff <= 1e-5 (a CPU emulation of the kernel's numerics measured <= 4.9e-6)."""
    out, ref = out.float(), ref.float()
    atol, max_diff = (4e-3, 1e-5) if fp8 else (8e-4, 5e-6)
    ok = (out - ref).abs() <= atol + ref.abs() * 2.01 / 128
    assert ok.all(), f"{what}: {(~ok).sum().item()} elements outside atol {atol} + rtol 2.01/128, " \
                     f"max err {(out - ref).abs().max().item():.3g}"
    diff = calc_diff(out, ref)
    assert diff <= max_diff, f"{what}: cosine diff {diff:.3g} > {max_diff}"


def _poison_allocator(nbytes=256 << 20):
    """Fill freed caching-allocator memory with NaN so outputs the kernel fails to write stay NaN."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


@contextlib.contextmanager
def _poisoned_outputs(device):
    """Buffers the ops allocate inside the block start poisoned, so rows the kernels fail to write show.
    CUDA: NaN in the freed caching-allocator memory. CPU (emulated): torch's deterministic mode fills
    every at::empty (out, lse, the split partials, the plan) with NaN / INT_MAX."""
    if torch.device(device).type == "cuda":
        _poison_allocator()
        yield
        return
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _kernel_launches():
    """{kernel name: emulated launches so far}."""
    return dict(deepkernels.emulator_stats()["kernels"])


def _launched_since(before):
    return {name for name, n in _kernel_launches().items() if n > before.get(name, 0)}


CUDA_CASES = CASES + [
    ([4096, 0, 1, 8000, 333, 64, 65, 2000], 1, 128, 1, 64, False),
    ([4096, 17, 3000, 1], 2, 128, 1, 64, True),
    ([513, 1025], 2, 64, 1, 16, True),
]
# emulated: the small cases (lengths up to 300, zero-length sequences, s_q 1/2, h_q 16..128, h_kv 1/2,
# pages 16/32/48/64/128)
EMU_CASES = CASES


def emulate_kernel_numerics(case, s_q, h_q, causal, scale, num_sm_parts, key_tile=32):
    """The CUDA kernel's arithmetic on the CPU: scores from the exact bf16/e4m3 products in fp32 times the
    token scale, online softmax over key tiles (32 keys portable, 64 sm_90a), P * token scale rounded to
    bf16 before P V, one partial per split normalised by its own sum, merged by lse, out rounded to bf16."""
    lens = case["cache_seqlens"].tolist()
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], s_q * h_q, 1, num_sm_parts)
    partial = {}
    for begin_b, begin_blk, end_b, end_blk, begin_split, *_ in meta.tolist():
        for i in range(begin_b, end_b + 1) if begin_b < len(lens) else []:
            lo = begin_blk if i == begin_b else 0
            hi = end_blk if i == end_b else -(-lens[i] // mla.BLOCK_TOKENS)
            if hi <= lo:
                continue
            kv_end = min(hi * mla.BLOCK_TOKENS, lens[i])
            rows = mla._gather_sequence(case["kv_cache"], None, case["block_table"][i], lens[i])[:, 0]
            tok_scale = (torch.ones(lens[i]) if case["kv_scale"] is None else
                         mla._gather_sequence(torch.ones_like(case["kv_scale"][..., None]), case["kv_scale"],
                                              case["block_table"][i], lens[i])[:, 0, 0])
            q = case["q"][i].float().reshape(s_q * h_q, 576)
            last = lens[i] - s_q + torch.arange(s_q * h_q) // h_q if causal else torch.full((s_q * h_q,), lens[i] - 1)
            m, l, o = torch.full((s_q * h_q,), -math.inf), torch.zeros(s_q * h_q), torch.zeros(s_q * h_q, 512)
            for n0 in range(lo * mla.BLOCK_TOKENS, kv_end, key_tile):
                pos = torch.arange(n0, min(n0 + key_tile, kv_end))
                sc = (q @ rows[pos].T) * (scale * math.log2(math.e)) * tok_scale[pos]
                sc = sc.masked_fill(pos[None, :] > last[:, None], -math.inf)
                new_m = torch.maximum(m, sc.max(1).values)
                ref = torch.where(torch.isinf(new_m), 0.0, new_m)
                alpha, p = torch.exp2(m - ref), torch.exp2(sc - ref[:, None])
                l, m = l * alpha + p.sum(1), new_m
                o = o * alpha[:, None] + (p * tok_scale[pos]).to(torch.bfloat16).float() @ rows[pos, :512]
            split = begin_split if i == begin_b else int(splits[i])
            partial[split] = (o * torch.where(l > 0, 1 / l, 0.0)[:, None],
                              torch.where(l > 0, (m + torch.log2(l)) * math.log(2), -math.inf))
    out = torch.zeros(len(lens), s_q * h_q, 512)
    for i in range(len(lens)):
        ids = range(int(splits[i]), int(splits[i + 1]))
        if len(ids):
            lse = torch.stack([partial[j][1] for j in ids])
            top = lse.max(0).values
            w = torch.exp(lse - torch.where(torch.isinf(top), 0.0, top)).nan_to_num(0.0)
            w = w / w.sum(0).clamp(min=1e-30)
            out[i] = (w[..., None] * torch.stack([partial[j][0] for j in ids])).sum(0)
    return out.view(len(lens), s_q, h_q, 512).to(torch.bfloat16)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3])
@pytest.mark.parametrize("lens,s_q,h_q,h_kv,page,causal", [CASES[1], CASES[4], CASES[5], CASES[8]])
def test_kernel_numerics_emulation_meets_cuda_tolerance(lens, s_q, h_q, h_kv, page, causal, cache_dtype):
    """The tolerances the CUDA tests state are met by the kernel's arithmetic (emulated on the CPU)."""
    case = make_case(lens, s_q, h_q, h_kv, page, cache_dtype=cache_dtype)
    ref, _ = mla.mla_attention_fp32(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], 512,
                                    DSV3_SCALE, causal, case["kv_scale"])
    for parts in (1, 5):
        for key_tile in (32, 64) if cache_dtype == torch.bfloat16 else (32,):  # 64: the sm_90a kernel (bf16)
            out = emulate_kernel_numerics(case, s_q, h_q, causal, DSV3_SCALE, parts, key_tile)
            _assert_close_flashmla(out, ref, f"emulated kernel, {parts} parts, {key_tile}-key tiles",
                                   fp8=cache_dtype == E4M3)


_VARIANT_KERNELS = {"portable": "mla_splitkv_kernel", "sm90": "mla_splitkv_sm90_kernel",
                    "sm90_pipelined": "mla_splitkv_sm90_pipelined_kernel"}


def _expected_splitkv_kernel(cache_dtype):
    """The split-KV kernel the launch code picks (the emulated device is an sm_90 one)."""
    variant = os.environ.get(mla.VARIANT_ENV, "")
    if variant:
        return _VARIANT_KERNELS[variant]
    sm90 = os.environ.get(mla.SM90_ENV) == "1" and cache_dtype in (torch.bfloat16, torch.float16)
    return "mla_splitkv_sm90_kernel" if sm90 else "mla_splitkv_kernel"


def set_variant(monkeypatch, variant):
    """Select a split-KV variant as a sweep would: "portable", "sm90" (through the legacy DEEPKERNELS_MLA_SM90=1,
    so that switch stays covered) or "sm90_pipelined" (DEEPKERNELS_MLA_VARIANT)."""
    monkeypatch.delenv(mla.VARIANT_ENV, raising=False)
    monkeypatch.setenv(mla.SM90_ENV, "1" if variant == "sm90" else "0")
    if variant == "sm90_pipelined":
        monkeypatch.setenv(mla.VARIANT_ENV, variant)


def _check_decode_vs_reference(device, lens, s_q, h_q, h_kv, page, causal, cache_dtype, num_sm_parts=None):
    """Metadata, split-KV and combine kernels on `device` (emulated on the CPU) vs the fp32 reference, with
    poisoned output buffers, NaN in the cache slots past each length and poisoned block-table entries."""
    case = make_case(lens, s_q, h_q, h_kv, page, cache_dtype=cache_dtype, device=device)
    with reference():
        ref_out, ref_lse = mla.mla_attention_fp32(case["q"].cpu(), case["kv_cache"].cpu(), case["block_table"].cpu(),
                                                  case["cache_seqlens"].cpu(), 512, DSV3_SCALE, causal,
                                                  None if case["kv_scale"] is None else case["kv_scale"].cpu())
    emulated = torch.device(device).type == "cpu"
    before = _kernel_launches() if emulated else None
    with _poisoned_outputs(device):
        out, lse = run_decode(case, s_q, h_q, causal, DSV3_SCALE, num_sm_parts)
    synchronize(device)
    if emulated:
        expected = {"mla_metadata_kernel", _expected_splitkv_kernel(cache_dtype), "mla_combine_kernel"}
        assert _launched_since(before) == expected, f"emulated kernels {_launched_since(before)} != {expected}"
    assert not out.isnan().any(), f"{lens}: NaN in out (unwritten rows or NaN slots read)"
    _assert_close_flashmla(out.cpu(), ref_out, f"{lens} s_q={s_q} h={h_q} page={page} {cache_dtype}",
                           fp8=cache_dtype == E4M3)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse)), f"{lens}: +inf lse pattern"
    fin = torch.isfinite(ref_lse)
    assert (lse.cpu()[fin] - ref_lse[fin]).abs().max() < 1e-3 if fin.any() else True


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, E4M3], ids=["bf16", "fp16", "e4m3"])
@per_device("lens,s_q,h_q,h_kv,page,causal", CUDA_CASES, EMU_CASES, ids=case_id)
def test_kernel_decode_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, cache_dtype):
    _check_decode_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, cache_dtype)


@per_device("lens,s_q,h_q,h_kv,page,causal", [CUDA_CASES[1], CUDA_CASES[-2]], [CASES[1], CASES[5]], ids=case_id)
def test_kernel_single_stage_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, monkeypatch):
    """The single-stage (sm_89) bf16 kernel, forced on any GPU."""
    monkeypatch.setenv("DEEPKERNELS_MLA_STAGES", "1")
    _check_decode_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, torch.bfloat16)


@pytest.mark.parametrize("stages", ["1", "2", "3"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=["bf16", "e4m3"])
def test_kernel_sanitizer_small_decode(kernel_device, cache_dtype, stages, monkeypatch):
    """Small enough for compute-sanitizer (bench/gpu_check.sh runs the cuda tests named *sanitizer* under
    memcheck): poisoned block-table entries, NaN past the lengths, an empty sequence, causal s_q = 2, page 16."""
    monkeypatch.setenv("DEEPKERNELS_MLA_STAGES", stages)
    _check_decode_vs_reference(kernel_device, [1, 100, 0, 33], 2, 32, 1, 16, True, cache_dtype)


def _check_split_counts(device, num_sm_parts):
    """1 part: every sequence has one split (written directly, no merge); 3: long sequences split and
    merged; 500: more parts than work blocks (empty parts). Emulated: a smaller case of the same shape."""
    lens, h_q = ([700, 0, 1, 2000, 64], 64) if torch.device(device).type == "cuda" else ([300, 0, 1, 900, 64], 32)
    _check_decode_vs_reference(device, lens, 2, h_q, 1, 64, True, torch.bfloat16, num_sm_parts)


@pytest.mark.parametrize("num_sm_parts", [1, 3, 500])
def test_kernel_split_counts(kernel_device, num_sm_parts):
    _check_split_counts(kernel_device, num_sm_parts)


# ---------------------------------------------------------------------------------------------
# the opt-in sm_90a kernel (csrc/mla_decode/splitkv_sm90.cuh, DEEPKERNELS_MLA_SM90=1; not yet run on a GPU;
# emulated, the SIMT emulator's device is an sm_90 one with the wgmma/mbarrier models).
# If these fail while the portable tests pass, suspect in this order: the MN-major (transposed V)
# descriptor's LBO/SBO, the 128B swizzle of the cp.async writes vs the K-major descriptors, the
# accumulator row/column mapping (softmax masks, P stores, epilogue), then the barriers around the P tile.

def _skip_unless_sm90(device):
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel is built for sm_90a only (other devices fall back to the portable kernel)")


def _kernels_launched(fn):
    """Names of the CUDA kernels `fn` launches (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@per_device("lens,s_q,h_q,h_kv,page,causal", CUDA_CASES, EMU_CASES, ids=case_id)
def test_kernel_sm90_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, monkeypatch):
    """Every case through the sm_90a kernel (bf16 cache)."""
    _skip_unless_sm90(kernel_device)
    monkeypatch.setenv(mla.SM90_ENV, "1")
    _check_decode_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, torch.bfloat16)


@pytest.mark.parametrize("num_sm_parts", [1, 3, 500])
@pytest.mark.parametrize("variant", ["sm90", "sm90_pipelined"])
def test_kernel_sm90_split_counts(kernel_device, num_sm_parts, variant, monkeypatch):
    """Direct single-split writes, merged partials and empty parts through the sm_90a kernels."""
    _skip_unless_sm90(kernel_device)
    set_variant(monkeypatch, variant)
    _check_split_counts(kernel_device, num_sm_parts)


# the sm90_pipelined variant (csrc/mla_decode/splitkv_sm90_pipelined.cuh, DEEPKERNELS_MLA_VARIANT=sm90_pipelined):
# producer warpgroup + mbarrier ring, whole 64-key tiles alternating between the math warpgroups, P in registers.

@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, E4M3], ids=["bf16", "fp16", "e4m3"])
@per_device("lens,s_q,h_q,h_kv,page,causal", CUDA_CASES, EMU_CASES, ids=case_id)
def test_kernel_sm90_pipelined_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, cache_dtype,
                                            monkeypatch):
    """Every case through the pipelined sm_90a kernel (odd and even tile counts, so both warpgroups end a split);
    e4m3: dequantised into shared memory, token scales folded into S and P."""
    _skip_unless_sm90(kernel_device)
    set_variant(monkeypatch, "sm90_pipelined")
    _check_decode_vs_reference(kernel_device, lens, s_q, h_q, h_kv, page, causal, cache_dtype)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=["bf16", "e4m3"])
@pytest.mark.parametrize("num_sm_parts", [1, 2, 7])
def test_kernel_sm90_pipelined_many_tiles_and_splits(kernel_device, num_sm_parts, cache_dtype, monkeypatch):
    """Long sequences: many trips round the 2-stage ring, several splits per CTA (phases carried across splits),
    a split boundary inside a sequence."""
    _skip_unless_sm90(kernel_device)
    set_variant(monkeypatch, "sm90_pipelined")
    lens = [1000, 0, 129, 64, 700] if torch.device(kernel_device).type == "cuda" else [520, 0, 129, 64, 200]
    _check_decode_vs_reference(kernel_device, lens, 2, 32, 1, 48, True, cache_dtype, num_sm_parts)


@pytest.fixture
def emu_only():
    """Emulation on for the test (the emulated device is an sm_90a one)."""
    if not deepkernels.build_info()["emulator"]:
        pytest.skip(f"the emulator is not built ({deepkernels.build_info()['emulator_error']})")
    with deepkernels.emulate():
        yield "cpu"


def test_mla_variants_table():
    assert set(mla.MLA_VARIANTS) == {"portable", "sm90", "sm90_pipelined"}
    assert E4M3 in mla.MLA_VARIANTS["portable"] and E4M3 in mla.MLA_VARIANTS["sm90_pipelined"]
    assert E4M3 not in mla.MLA_VARIANTS["sm90"]
    assert all(torch.bfloat16 in d and torch.float16 in d for d in mla.MLA_VARIANTS.values())
    assert mla.SM90_VARIANTS == ("sm90", "sm90_pipelined")


def test_variant_env_errors(monkeypatch):
    """An unknown name: ValueError on every path (the wrapper, and the binding through torch.ops); a variant that
    does not support the cache dtype: ValueError where a kernel runs."""
    case = make_case([20, 5], 1, 16)
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 16, 1, 2)
    args = (case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], 512, meta, splits)
    monkeypatch.setenv(mla.VARIANT_ENV, "sm91")
    with pytest.raises(ValueError, match="DEEPKERNELS_MLA_VARIANT.*portable, sm90, sm90_pipelined.*'sm91'"):
        deepkernels.mla_decode_with_kvcache(*args)
    with pytest.raises(ValueError, match="DEEPKERNELS_MLA_VARIANT"):
        mla.mla_variant()
    monkeypatch.setenv(mla.VARIANT_ENV, "")
    assert mla.mla_variant() is None
    monkeypatch.setenv(mla.VARIANT_ENV, "sm90_pipelined")
    assert mla.mla_variant() == "sm90_pipelined"
    out, _ = deepkernels.mla_decode_with_kvcache(*args)  # the CPU reference: the variant does not apply
    assert out.shape == (2, 1, 16, 512)


@pytest.mark.emu
@pytest.mark.parametrize("variant", ["sm90"])
def test_variant_env_errors_emulated(emu_only, variant, monkeypatch):
    """Emulated: an e4m3 cache with the sm90 variant is refused by the wrapper and by the binding (before any
    launch); an unknown name is refused by the binding too."""
    case = make_case([20, 5], 1, 16, cache_dtype=E4M3)
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 16, 1, 2)
    args = (case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], 512, meta, splits, DSV3_SCALE,
            False, case["kv_scale"])
    monkeypatch.setenv(mla.VARIANT_ENV, variant)
    before = _kernel_launches()
    with pytest.raises(ValueError, match=f"kv_cache: DEEPKERNELS_MLA_VARIANT='{variant}' supports cache dtypes "
                                         "bfloat16, float16, got float8_e4m3fn"):
        deepkernels.mla_decode_with_kvcache(*args)
    with pytest.raises(ValueError, match=f"DEEPKERNELS_MLA_VARIANT='{variant}' does not support an e4m3 kv_cache"):
        torch.ops.deepkernels.mla_decode_with_kvcache(*args)
    monkeypatch.setenv(mla.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match="DEEPKERNELS_MLA_VARIANT='fast' is not an MLA decode variant"):
        torch.ops.deepkernels.mla_decode_with_kvcache(*args)
    assert _launched_since(before) == set(), "a refused call launched kernels"


@pytest.mark.emu
def test_variant_env_picks_each_kernel(emu_only, monkeypatch):
    """DEEPKERNELS_MLA_VARIANT routes to each kernel (read per call) and wins over the legacy switch."""
    monkeypatch.setenv(mla.SM90_ENV, "1")
    for variant, kernel in _VARIANT_KERNELS.items():
        for dtype in mla.MLA_VARIANTS[variant]:
            monkeypatch.setenv(mla.VARIANT_ENV, variant)
            case = make_case([70, 3], 1, 16, cache_dtype=dtype)
            before = _kernel_launches()
            run_decode(case, 1, 16, False, DSV3_SCALE)
            assert _launched_since(before) == {"mla_metadata_kernel", kernel, "mla_combine_kernel"}, (variant, dtype)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=["bf16", "e4m3"])
def test_kernel_sm90_sanitizer_small_decode(kernel_device, cache_dtype, monkeypatch):
    """Named for bench/gpu_check.sh's memcheck run; e4m3 falls back to the portable kernel."""
    monkeypatch.setenv(mla.SM90_ENV, "1")
    _check_decode_vs_reference(kernel_device, [1, 100, 0, 33], 2, 32, 1, 16, True, cache_dtype)


def test_kernel_sm90_is_picked_for_bf16_only(kernel_device, monkeypatch):
    """The flag routes a bf16 cache to the sm_90a kernel (so the tests above are not the portable kernel
    passing again) and an e4m3 cache to the portable one; without the flag the portable kernel runs.
    CUDA: the kernels the profiler records; emulated: the emulator's per-kernel launch counts."""
    _skip_unless_sm90(kernel_device)
    emulated = torch.device(kernel_device).type == "cpu"
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(mla.SM90_ENV, flag)
        for dtype in (torch.bfloat16, E4M3):
            case = make_case([300, 7], 1, 16, cache_dtype=dtype, device=kernel_device)
            step = lambda case=case: run_decode(case, 1, 16, False, DSV3_SCALE)  # noqa: E731
            if emulated:
                before = _kernel_launches()
                step()
                runs[flag, dtype] = _launched_since(before)
            else:
                runs[flag, dtype] = _kernels_launched(step)
    if not any(runs.values()):
        pytest.skip("the profiler recorded no CUDA kernels here")
    picked = {key: any("mla_splitkv_sm90_kernel" in name for name in names) for key, names in runs.items()}
    assert picked == {("1", torch.bfloat16): True, ("1", E4M3): False, ("0", torch.bfloat16): False,
                      ("0", E4M3): False}, picked
    portable = {key: any("mla_splitkv_kernel" in name for name in names) for key, names in runs.items()}
    assert all(portable[key] != picked[key] for key in runs), f"portable kernel runs: {portable}"


# ---------------------------------------------------------------------------------------------
# opcheck, metadata and cache-write kernels

def test_kernel_opcheck(kernel_device):
    case = make_case([20, 70], 2, 16, device=kernel_device)  # bf16: torch's schema check has no fp8 arithmetic
    opcheck(torch.ops.deepkernels.get_mla_decode_metadata, (case["cache_seqlens"], 32, 1, 8))
    meta, splits = deepkernels.get_mla_decode_metadata(case["cache_seqlens"], 32, 1, 8)
    opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
            (case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], 512, meta, splits, 0.1, True,
             case["kv_scale"]))
    fp16 = make_case([20, 70], 2, 16, cache_dtype=torch.float16, device=kernel_device)
    opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
            (fp16["q"], fp16["kv_cache"], fp16["block_table"], fp16["cache_seqlens"], 512, meta, splits, 0.1, True,
             None))
    cache = torch.zeros(2, 16, 1, 576, dtype=torch.bfloat16, device=kernel_device)
    opcheck(torch.ops.deepkernels.write_mla_kv_cache,
            (cache, None, torch.randn(3, 1, 576, device=kernel_device), torch.tensor([0, 5, 31], device=kernel_device)))
    if torch.device(kernel_device).type == "cpu":  # deepkernels.testing.opcheck handles fp8 on the CPU
        fp8 = make_case([20, 70], 2, 16, cache_dtype=E4M3)
        fp8["kv_scale"].nan_to_num_(1.0)  # the helper's unchanged-input check compares with torch.equal
        opcheck(torch.ops.deepkernels.mla_decode_with_kvcache,
                (fp8["q"], fp8["kv_cache"], fp8["block_table"], fp8["cache_seqlens"], 512, meta, splits, 0.1, True,
                 fp8["kv_scale"]))
        opcheck(torch.ops.deepkernels.write_mla_kv_cache,
                (torch.zeros(2, 16, 1, 576, dtype=E4M3), torch.ones(2, 16, 1),
                 torch.randn(3, 1, 576).to(torch.bfloat16), torch.tensor([0, -1, 31])))


def test_kernel_metadata_matches_reference(kernel_device):
    """b = 128 and b = 1100 (more than one 512-sequence chunk of the kernel's scan), into poisoned buffers."""
    for b in (128, 1100):
        lens = torch.randint(0, 9000, (b,), dtype=torch.int32)
        lens[::7] = 0
        for parts in (1, 7, 132):
            with _poisoned_outputs(kernel_device):
                meta, splits = deepkernels.get_mla_decode_metadata(lens.to(kernel_device), 128, 1, parts)
            ref_meta, ref_splits = mla.get_mla_decode_metadata_ref(lens, 128, 1, parts)
            assert torch.equal(meta.cpu(), ref_meta) and torch.equal(splits.cpu(), ref_splits), f"b={b}, {parts} parts"


@pytest.mark.parametrize("row_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_kernel_write_kv_cache_matches_reference(kernel_device, row_dtype):
    for dtype in (torch.bfloat16, torch.float16, E4M3):
        cache = torch.zeros(8, 64, 1, 576, dtype=dtype, device=kernel_device)
        scale = torch.zeros(8, 64, 1, device=kernel_device) if dtype == E4M3 else None
        rows = torch.randn(100, 1, 576, device=kernel_device).to(row_dtype)
        slots = torch.randperm(512, device=kernel_device)[:100]
        slots[::9] = -1
        deepkernels.write_mla_kv_cache(cache, scale, rows, slots)
        # fresh CPU buffers: on the CPU, .cpu() would alias the kernel's own output
        ref_cache = torch.zeros(8, 64, 1, 576, dtype=dtype)
        ref_scale = None if scale is None else torch.zeros(8, 64, 1)
        mla.write_mla_kv_cache_ref(ref_cache, ref_scale, rows.cpu(), slots.cpu())
        assert torch.equal(cache.cpu().view(torch.uint8), ref_cache.view(torch.uint8)), f"{dtype} from {row_dtype}"
        if scale is not None:
            assert torch.equal(scale.cpu(), ref_scale), f"{dtype} scales from {row_dtype}"


# ---------------------------------------------------------------------------------------------
# FlashMLA's own test shapes (its tests/test_flash_mla.py: b 128, mean s_k 4096, h_q 16/32/64/128, s_q 1/2,
# h_kv 1, page 64, varlen lengths ~ normal(s_k, s_k / 2), causal, bf16 and --dtype fp16), on the GPU at b 32
# and s_k 4096, emulated at b 3 and s_k 160; both split-KV kernels (portable and the opt-in sm_90a one).

def flashmla_lens(b, mean, varlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not varlen:
        return [mean] * b
    return (torch.randn(b, generator=g) * mean / 2 + mean).clamp(min=1).round().int().tolist()


FLASHMLA_SHAPES = [(s_q, h_q, varlen) for s_q in (1, 2) for h_q in (16, 32, 64, 128) for varlen in (False, True)]
FLASHMLA_EMU_SHAPES = [(1, 16, True), (1, 64, False), (2, 32, True), (2, 128, True)]


def _flashmla_id(c):
    return f"sq{c[0]}_h{c[1]}{'_varlen' if c[2] else ''}"


@pytest.mark.parametrize("sm90", ["0", "1", "pipelined"], ids=["portable", "sm90", "sm90_pipelined"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@per_device("s_q,h_q,varlen", FLASHMLA_SHAPES, FLASHMLA_EMU_SHAPES, ids=_flashmla_id)
def test_kernel_flashmla_shapes(kernel_device, s_q, h_q, varlen, dtype, sm90, monkeypatch):
    if sm90 != "0":
        _skip_unless_sm90(kernel_device)
    set_variant(monkeypatch, {"0": "portable", "1": "sm90", "pipelined": "sm90_pipelined"}[sm90])
    b, mean = (32, 4096) if torch.device(kernel_device).type == "cuda" else (3, 160)
    lens = flashmla_lens(b, mean, varlen, seed=s_q * 1000 + h_q)
    case = make_case(lens, s_q, h_q, 1, 64, cache_dtype=dtype, device=kernel_device)
    meta, splits = flash_mla.get_mla_metadata(case["cache_seqlens"], s_q * h_q, 1)
    emulated = torch.device(kernel_device).type == "cpu"
    before = _kernel_launches() if emulated else None
    with _poisoned_outputs(kernel_device):
        out, lse = flash_mla.flash_mla_with_kvcache(case["q"], case["kv_cache"], case["block_table"],
                                                    case["cache_seqlens"], 512, meta, splits, causal=True)
    synchronize(kernel_device)
    if emulated:
        assert _expected_splitkv_kernel(dtype) in _launched_since(before), _launched_since(before)
    with reference():
        ref, ref_lse = mla.mla_attention_fp32(case["q"].cpu(), case["kv_cache"].cpu(), case["block_table"].cpu(),
                                              case["cache_seqlens"].cpu(), 512, 576 ** -0.5, True)
    assert out.dtype == dtype
    _assert_close_flashmla(out.cpu(), ref, f"FlashMLA shape b={b} s_q={s_q} h_q={h_q} {dtype} sm90={sm90}")
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse.cpu()[fin] - ref_lse[fin]).abs().max() < 1e-3


@pytest.mark.cuda
def test_cuda_graph_capture_metadata_and_decode():
    case = make_case([300, 0, 4000, 17], 2, 64, page=64, device="cuda")
    static = {k: case[k] for k in ("q", "kv_cache", "block_table", "cache_seqlens")}

    def step():
        meta, splits = deepkernels.get_mla_decode_metadata(static["cache_seqlens"], 128, 1)
        return deepkernels.mla_decode_with_kvcache(static["q"], static["kv_cache"], static["block_table"],
                                                   static["cache_seqlens"], 512, meta, splits, DSV3_SCALE, True)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    static["cache_seqlens"].copy_(torch.tensor([299, 0, 3999, 17], dtype=torch.int32))
    static["q"].copy_(torch.randn_like(static["q"].float()).to(torch.bfloat16) / 4)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = mla.mla_attention_fp32(static["q"].cpu(), static["kv_cache"].cpu(), static["block_table"].cpu(),
                                        static["cache_seqlens"].cpu(), 512, DSV3_SCALE, True)
    _assert_close_flashmla(out.cpu(), ref_out, "graph replay with new lengths")
