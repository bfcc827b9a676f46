"""MLA decode family: bad inputs (a table: each raises TypeError/ValueError from deepkernels' own checks, naming
the argument, before any write), index values (reference path: errors; CUDA kernels under the emulator: never
an out-of-range read or write, the error shows as NaN), and NaN propagation (a NaN in q, a read cache row or its
kv_scale reaches out/lse; rows that see no key stay out 0 / lse +inf) on the reference and the emulated kernels."""
import math

import pytest
import torch

import deepkernels
from deepkernels import mla
from deepkernels.testing import reference

E4M3 = torch.float8_e4m3fn
PAGE = 16


def make_inputs(lens=(20, 5), s_q=1, h_q=16, cache_dtype=torch.bfloat16, q_dtype=None, num_blocks=None,
                max_blocks=None, seed=0):
    """A valid decode call: q, a NaN-poisoned paged cache (slots past each length), a shuffled block table with
    -1 in its unused entries, the plan. q is fp16 with an fp16 cache, else bf16."""
    q_dtype = q_dtype or (torch.float16 if cache_dtype == torch.float16 else torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE) for n in lens]
    num_blocks = num_blocks or sum(need) + 2
    max_blocks = max_blocks or max(1, max(need, default=0)) + 1
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for i, k in enumerate(need):
        block_table[i, :k] = perm[used:used + k].to(torch.int32)
        used += k
    kv_cache = torch.full((num_blocks, PAGE, 1, 576), float("nan"), dtype=torch.bfloat16)
    kv_scale = None
    rows = (torch.randn(sum(lens), 1, 576, generator=g) / 4)
    if cache_dtype == E4M3:
        kv_cache = kv_cache.to(E4M3)
        kv_scale = torch.full((num_blocks, PAGE, 1), float("nan"))
    elif cache_dtype != torch.bfloat16:
        kv_cache = kv_cache.to(cache_dtype)
    slots = torch.cat([block_table[i, torch.arange(n) // PAGE].long() * PAGE + torch.arange(n) % PAGE
                       for i, n in enumerate(lens)]) if sum(lens) else torch.zeros(0, dtype=torch.int64)
    with reference():
        deepkernels.write_mla_kv_cache(kv_cache, kv_scale, rows.to(torch.bfloat16), slots)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    q = (torch.randn(len(lens), s_q, h_q, 576, generator=g) / 4).to(q_dtype)
    meta, splits = deepkernels.get_mla_decode_metadata(cache_seqlens, s_q * h_q, 1, 3)
    return dict(q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens, head_dim_v=512,
                tile_scheduler_metadata=meta, num_splits=splits, softmax_scale=0.08, causal=False, kv_scale=kv_scale)


def _set(**changes):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})


def _bad_stride_cache(a):
    wide = torch.zeros(a["kv_cache"].size(0), PAGE, 1, 577, dtype=torch.bfloat16)
    return wide[..., :576]


def _fp8(a):
    return a["kv_cache"].to(E4M3)


def _entry(value, row=0, col=0):
    def change(a):
        a["block_table"] = a["block_table"].clone()
        a["block_table"][row, col] = value
    return change


def _seqlen(value, i=0):
    def change(a):
        a["cache_seqlens"] = a["cache_seqlens"].clone()
        a["cache_seqlens"][i] = value
    return change


# (id, change to the valid arguments, exception type, argument the message must name)
DECODE_BAD = [
    # q
    ("q-list", _set(q=lambda a: a["q"].tolist()), TypeError, "q"),
    ("q-none", _set(q=None), TypeError, "q"),
    ("q-fp32", _set(q=lambda a: a["q"].float()), ValueError, "q"),
    ("q-int8", _set(q=lambda a: a["q"].to(torch.int8)), ValueError, "q"),
    ("q-fp8", _set(q=lambda a: a["q"].to(E4M3)), ValueError, "q"),
    ("q-3d", _set(q=lambda a: a["q"][:, 0]), ValueError, "q"),
    ("q-5d", _set(q=lambda a: a["q"][None]), ValueError, "q"),
    ("q-dim512", _set(q=lambda a: a["q"][..., :512]), ValueError, "q"),
    ("q-dim577", _set(q=lambda a: torch.cat([a["q"], a["q"][..., :1]], -1)), ValueError, "q"),
    ("q-stride", _set(q=lambda a: a["q"].repeat_interleave(2, -1)[..., ::2]), ValueError, "q"),
    ("q-heads-not-multiple", _set(q=lambda a: a["q"][:, :, :3],
                                  kv_cache=lambda a: a["kv_cache"].expand(-1, -1, 2, -1).contiguous()), ValueError,
     "heads"),
    ("q-meta-device", _set(q=lambda a: a["q"].to("meta")), ValueError, "q"),
    # kv_cache
    ("cache-list", _set(kv_cache=[[0.0]]), TypeError, "kv_cache"),
    ("cache-fp32", _set(kv_cache=lambda a: a["kv_cache"].float()), ValueError, "kv_cache"),
    ("cache-int8", _set(kv_cache=lambda a: a["kv_cache"].to(torch.int8)), ValueError, "kv_cache"),
    ("cache-e5m2", _set(kv_cache=lambda a: a["kv_cache"].to(torch.float8_e5m2)), ValueError, "kv_cache"),
    ("cache-3d", _set(kv_cache=lambda a: a["kv_cache"][:, :, 0]), ValueError, "kv_cache"),
    ("cache-dim512", _set(kv_cache=lambda a: a["kv_cache"][..., :512]), ValueError, "kv_cache"),
    ("cache-page8", _set(kv_cache=lambda a: a["kv_cache"][:, :8]), ValueError, "kv_cache"),
    ("cache-page0", _set(kv_cache=lambda a: a["kv_cache"][:, :0]), ValueError, "kv_cache"),
    ("cache-no-heads", _set(kv_cache=lambda a: a["kv_cache"][:, :, :0]), ValueError, "kv_cache"),
    ("cache-row-stride", _set(kv_cache=_bad_stride_cache), ValueError, "kv_cache"),
    ("cache-inner-stride", _set(kv_cache=lambda a: a["kv_cache"].repeat_interleave(2, -1)[..., ::2]), ValueError,
     "kv_cache"),
    # kv_scale
    ("scale-missing", _set(kv_cache=_fp8), ValueError, "kv_scale"),
    ("scale-with-bf16", _set(kv_scale=lambda a: torch.ones(a["kv_cache"].shape[:3])), ValueError, "kv_scale"),
    ("scale-list", _set(kv_cache=_fp8, kv_scale=[1.0]), TypeError, "kv_scale"),
    ("scale-bf16", _set(kv_cache=_fp8, kv_scale=lambda a: torch.ones(a["kv_cache"].shape[:3], dtype=torch.bfloat16)),
     ValueError, "kv_scale"),
    ("scale-shape", _set(kv_cache=_fp8, kv_scale=lambda a: torch.ones(a["kv_cache"].shape[:2])), ValueError,
     "kv_scale"),
    ("scale-strided", _set(kv_cache=_fp8, kv_scale=lambda a: torch.ones(a["kv_cache"].shape[:3])[:, ::1].transpose(
        0, 1).contiguous().transpose(0, 1)), ValueError, "kv_scale"),
    # block_table
    ("table-list", _set(block_table=lambda a: a["block_table"].tolist()), TypeError, "block_table"),
    ("table-int64", _set(block_table=lambda a: a["block_table"].long()), ValueError, "block_table"),
    ("table-float", _set(block_table=lambda a: a["block_table"].float()), ValueError, "block_table"),
    ("table-1d", _set(block_table=lambda a: a["block_table"][0]), ValueError, "block_table"),
    ("table-rows", _set(block_table=lambda a: a["block_table"][:1]), ValueError, "block_table"),
    ("table-stride", _set(block_table=lambda a: a["block_table"].repeat_interleave(2, 1)[:, ::2]), ValueError,
     "block_table"),
    ("table-minus1-used", _entry(-1), ValueError, "block_table"),
    ("table-minus1-second-seq", _entry(-1, row=1), ValueError, "block_table"),
    ("table-negative", _entry(-7), ValueError, "block_table"),
    ("table-num-blocks", _entry(lambda: None), ValueError, "block_table"),  # replaced below: == num_blocks
    ("table-huge", _entry(2**30), ValueError, "block_table"),
    ("table-int-min", _entry(-2**31), ValueError, "block_table"),
    # cache_seqlens
    ("seqlens-list", _set(cache_seqlens=[20, 5]), TypeError, "cache_seqlens"),
    ("seqlens-int64", _set(cache_seqlens=lambda a: a["cache_seqlens"].long()), ValueError, "cache_seqlens"),
    ("seqlens-float", _set(cache_seqlens=lambda a: a["cache_seqlens"].float()), ValueError, "cache_seqlens"),
    ("seqlens-2d", _set(cache_seqlens=lambda a: a["cache_seqlens"][None]), ValueError, "cache_seqlens"),
    ("seqlens-short", _set(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError, "cache_seqlens"),
    ("seqlens-strided", _set(cache_seqlens=lambda a: a["cache_seqlens"].repeat_interleave(2)[::2]), ValueError,
     "cache_seqlens"),
    ("seqlens-negative", _seqlen(-1), ValueError, "cache_seqlens"),
    ("seqlens-int-min", _seqlen(-2**31, i=1), ValueError, "cache_seqlens"),
    ("seqlens-beyond-table", _seqlen(3 * PAGE + 1), ValueError, "cache_seqlens"),
    ("seqlens-int-max", _seqlen(2**31 - 1), ValueError, "cache_seqlens"),
    # head_dim_v
    ("head-dim-576", _set(head_dim_v=576), ValueError, "head_dim_v"),
    ("head-dim-0", _set(head_dim_v=0), ValueError, "head_dim_v"),
    ("head-dim-str", _set(head_dim_v="512"), TypeError, "head_dim_v"),
    ("head-dim-float", _set(head_dim_v=512.0), TypeError, "head_dim_v"),
    ("head-dim-bool", _set(head_dim_v=True), TypeError, "head_dim_v"),
    ("head-dim-none", _set(head_dim_v=None), TypeError, "head_dim_v"),
    ("head-dim-tensor", _set(head_dim_v=torch.tensor(512)), TypeError, "head_dim_v"),
    # the plan
    ("meta-list", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"].tolist()), TypeError,
     "tile_scheduler_metadata"),
    ("meta-int64", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"].long()), ValueError,
     "tile_scheduler_metadata"),
    ("meta-width", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"][:, :4]), ValueError,
     "tile_scheduler_metadata"),
    ("meta-empty", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"][:0]), ValueError,
     "tile_scheduler_metadata"),
    ("meta-1d", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"].flatten()), ValueError,
     "tile_scheduler_metadata"),
    ("meta-strided", _set(tile_scheduler_metadata=lambda a: a["tile_scheduler_metadata"].t().contiguous().t()),
     ValueError, "tile_scheduler_metadata"),
    ("meta-stale", _set(tile_scheduler_metadata=lambda a: mla.get_mla_decode_metadata_ref(
        torch.tensor([300, 1], dtype=torch.int32), 16, 1, 3)[0]), ValueError, "tile_scheduler_metadata"),
    ("splits-list", _set(num_splits=[0, 1, 2]), TypeError, "num_splits"),
    ("splits-int64", _set(num_splits=lambda a: a["num_splits"].long()), ValueError, "num_splits"),
    ("splits-length", _set(num_splits=lambda a: a["num_splits"][:2]), ValueError, "num_splits"),
    ("splits-stale", _set(num_splits=lambda a: a["num_splits"] + 1), ValueError, "num_splits"),
    # softmax_scale
    ("scale-negative", _set(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ("scale-zero", _set(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale-nan", _set(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("scale-inf", _set(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    ("scale-str", _set(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("scale-tensor", _set(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale"),
    ("scale-bool", _set(softmax_scale=True), TypeError, "softmax_scale"),
    ("scale-complex", _set(softmax_scale=0.1 + 0j), TypeError, "softmax_scale"),
    ("scale-list", _set(softmax_scale=[0.1]), TypeError, "softmax_scale"),
    # causal
    ("causal-str-no", _set(causal="no"), TypeError, "causal"),
    ("causal-str-true", _set(causal="True"), TypeError, "causal"),
    ("causal-int", _set(causal=1), TypeError, "causal"),
    ("causal-zero", _set(causal=0), TypeError, "causal"),
    ("causal-none", _set(causal=None), TypeError, "causal"),
    ("causal-float", _set(causal=0.0), TypeError, "causal"),
    ("causal-tensor", _set(causal=torch.tensor(True)), TypeError, "causal"),
]


def _num_blocks_entry(a):
    a["block_table"] = a["block_table"].clone()
    a["block_table"][1, 0] = a["kv_cache"].size(0)


DECODE_BAD = [(i, _num_blocks_entry if i == "table-num-blocks" else c, e, n) for i, c, e, n in DECODE_BAD]


def _assert_raises_naming(fn, exc_type, name):
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    assert isinstance(info.value, exc_type), f"expected {exc_type.__name__}, got {type(info.value).__name__}: " \
                                             f"{info.value}"
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


@pytest.mark.parametrize("emulated", [False, pytest.param(True, marks=pytest.mark.emu)], ids=["reference", "emu"])
@pytest.mark.parametrize("case_id,change,exc_type,name", DECODE_BAD, ids=[c[0] for c in DECODE_BAD])
def test_decode_bad_input(case_id, change, exc_type, name, emulated, request):
    if emulated:
        request.getfixturevalue("emu_on")  # skips where the emulator is unavailable; turns emulation on
    args = make_inputs()
    change(args)
    _assert_raises_naming(lambda: deepkernels.mla_decode_with_kvcache(**args), exc_type, name)


@pytest.fixture
def emu_on(request):
    """Emulation on (the CUDA kernels on CPU tensors) for the duration of a test; no launch is required (the
    bad-input tests raise before any)."""
    if not deepkernels._ops.emulator_available():
        pytest.skip(f"emulator unavailable: {deepkernels._ops.emulator_error()}")
    with deepkernels._ops.emulate():
        yield "cpu"


METADATA_BAD = [
    ("seqlens-list", dict(cache_seqlens=[1, 2]), TypeError, "cache_seqlens"),
    ("seqlens-int64", dict(cache_seqlens=torch.tensor([1, 2])), ValueError, "cache_seqlens"),
    ("seqlens-2d", dict(cache_seqlens=torch.tensor([[1, 2]], dtype=torch.int32)), ValueError, "cache_seqlens"),
    ("seqlens-negative", dict(cache_seqlens=torch.tensor([5, -3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    ("tokens-zero", dict(num_q_tokens_per_head_k=0), ValueError, "num_q_tokens_per_head_k"),
    ("tokens-negative", dict(num_q_tokens_per_head_k=-16), ValueError, "num_q_tokens_per_head_k"),
    ("tokens-float", dict(num_q_tokens_per_head_k=16.0), TypeError, "num_q_tokens_per_head_k"),
    ("tokens-str", dict(num_q_tokens_per_head_k="16"), TypeError, "num_q_tokens_per_head_k"),
    ("tokens-bool", dict(num_q_tokens_per_head_k=True), TypeError, "num_q_tokens_per_head_k"),
    ("tokens-none", dict(num_q_tokens_per_head_k=None), TypeError, "num_q_tokens_per_head_k"),
    ("tokens-tensor", dict(num_q_tokens_per_head_k=torch.tensor(16)), TypeError, "num_q_tokens_per_head_k"),
    ("heads-zero", dict(num_heads_k=0), ValueError, "num_heads_k"),
    ("heads-float", dict(num_heads_k=1.5), TypeError, "num_heads_k"),
    ("heads-str", dict(num_heads_k="1"), TypeError, "num_heads_k"),
    ("heads-none", dict(num_heads_k=None), TypeError, "num_heads_k"),
    ("parts-zero", dict(num_sm_parts=0), ValueError, "num_sm_parts"),
    ("parts-float", dict(num_sm_parts=2.5), TypeError, "num_sm_parts"),
    ("parts-str", dict(num_sm_parts="4"), TypeError, "num_sm_parts"),
]


@pytest.mark.parametrize("case_id,changes,exc_type,name", METADATA_BAD, ids=[c[0] for c in METADATA_BAD])
def test_metadata_bad_input(case_id, changes, exc_type, name):
    args = dict(cache_seqlens=torch.tensor([20, 5], dtype=torch.int32), num_q_tokens_per_head_k=16, num_heads_k=1)
    args.update(changes)
    _assert_raises_naming(lambda: deepkernels.get_mla_decode_metadata(**args), exc_type, name)


def _write_args(cache_dtype=torch.bfloat16):
    cache = torch.zeros(4, PAGE, 1, 576, dtype=cache_dtype)
    scale = torch.zeros(4, PAGE, 1) if cache_dtype == E4M3 else None
    return dict(kv_cache=cache, kv_scale=scale, kv=torch.randn(3, 1, 576).to(torch.bfloat16),
                slot_mapping=torch.tensor([0, 17, 5]))


WRITE_BAD = [
    ("cache-list", _set(kv_cache=[0.0]), TypeError, "kv_cache"),
    ("cache-fp32", _set(kv_cache=lambda a: a["kv_cache"].float()), ValueError, "kv_cache"),
    ("cache-noncontiguous", _set(kv_cache=lambda a: torch.zeros(PAGE, 4, 1, 576, dtype=torch.bfloat16).transpose(
        0, 1)), ValueError, "kv_cache"),
    ("cache-dim", _set(kv_cache=lambda a: a["kv_cache"][..., :512]), ValueError, "kv_cache"),
    ("scale-missing", _set(kv_cache=lambda a: a["kv_cache"].to(E4M3), kv_scale=None), ValueError, "kv_scale"),
    ("scale-with-bf16", _set(kv_cache=lambda a: torch.zeros(4, PAGE, 1, 576, dtype=torch.bfloat16),
                             kv_scale=lambda a: torch.zeros(4, PAGE, 1)), ValueError, "kv_scale"),
    ("scale-shape", _set(kv_cache=lambda a: a["kv_cache"].to(E4M3), kv_scale=lambda a: torch.zeros(4, PAGE)),
     ValueError, "kv_scale"),
    ("kv-list", _set(kv=lambda a: a["kv"].tolist()), TypeError, "kv"),
    ("kv-int", _set(kv=lambda a: a["kv"].to(torch.int32)), ValueError, "kv"),
    ("kv-fp8", _set(kv=lambda a: a["kv"].to(E4M3)), ValueError, "kv"),
    ("kv-2d", _set(kv=lambda a: a["kv"][:, 0]), ValueError, "kv"),
    ("kv-heads", _set(kv=lambda a: a["kv"].expand(-1, 2, -1).contiguous()), ValueError, "kv"),
    ("kv-dim", _set(kv=lambda a: a["kv"][..., :512].contiguous()), ValueError, "kv"),
    ("kv-strided", _set(kv=lambda a: a["kv"].repeat_interleave(2, -1)[..., ::2]), ValueError, "kv"),
    ("kv-meta", _set(kv=lambda a: a["kv"].to("meta")), ValueError, "kv"),
    ("slots-list", _set(slot_mapping=[0, 1, 2]), TypeError, "slot_mapping"),
    ("slots-float", _set(slot_mapping=lambda a: a["slot_mapping"].float()), ValueError, "slot_mapping"),
    ("slots-length", _set(slot_mapping=lambda a: a["slot_mapping"][:2]), ValueError, "slot_mapping"),
    ("slots-2d", _set(slot_mapping=lambda a: a["slot_mapping"][None]), ValueError, "slot_mapping"),
    ("slots-strided", _set(slot_mapping=lambda a: a["slot_mapping"].repeat_interleave(2)[::2]), ValueError,
     "slot_mapping"),
    ("slots-past-end", _set(slot_mapping=torch.tensor([0, 17, 4 * PAGE])), ValueError, "slot_mapping"),
    ("slots-huge", _set(slot_mapping=torch.tensor([0, 2**40, 1])), ValueError, "slot_mapping"),
    ("slots-minus2", _set(slot_mapping=torch.tensor([0, 1, -2])), ValueError, "slot_mapping"),
]


@pytest.mark.parametrize("emulated", [False, pytest.param(True, marks=pytest.mark.emu)], ids=["reference", "emu"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=["bf16", "e4m3"])
@pytest.mark.parametrize("case_id,change,exc_type,name", WRITE_BAD, ids=[c[0] for c in WRITE_BAD])
def test_write_cache_bad_input_writes_nothing(case_id, change, exc_type, name, cache_dtype, emulated, request):
    if emulated:
        request.getfixturevalue("emu_on")
    args = _write_args(cache_dtype)
    change(args)
    before = args["kv_cache"].clone() if isinstance(args["kv_cache"], torch.Tensor) else None
    _assert_raises_naming(lambda: deepkernels.write_mla_kv_cache(**args), exc_type, name)
    if before is not None and before.device.type != "meta":
        assert torch.equal(args["kv_cache"].view(torch.uint8), before.view(torch.uint8)), f"{case_id}: cache written"


def test_write_cache_reference_validates_before_any_write():
    """The reference op itself (torch.ops, no wrapper) refuses a bad third slot before writing the first two."""
    args = _write_args()
    with reference():
        with pytest.raises(ValueError, match="slot_mapping"):
            torch.ops.deepkernels.write_mla_kv_cache(args["kv_cache"], None, args["kv"], torch.tensor([0, 17, 64]))
    assert (args["kv_cache"] == 0).all(), "the reference wrote slots before refusing a bad one"


@pytest.mark.parametrize("change", [_entry(-1), _entry(2**30), _seqlen(-5), _seqlen(3 * PAGE + 1)],
                         ids=["minus1", "huge", "negative-len", "beyond-table"])
def test_reference_op_refuses_bad_indices(change):
    """torch.ops.deepkernels.mla_decode_with_kvcache (the reference, no wrapper) raises a clear ValueError."""
    args = make_inputs()
    change(args)
    with reference():
        with pytest.raises(ValueError, match="block_table|cache_seqlens"):
            torch.ops.deepkernels.mla_decode_with_kvcache(*args.values())


def test_checked_mode_switch(monkeypatch):
    """DEEPKERNELS_CHECK=1 turns the device-side value checks on for CUDA tensors; CPU tensors are always checked."""
    monkeypatch.delenv("DEEPKERNELS_CHECK", raising=False)
    assert mla._checks_on(torch.device("cpu"))
    if torch.cuda.is_available():
        assert not mla._checks_on(torch.device("cuda"))
        monkeypatch.setenv("DEEPKERNELS_CHECK", "1")
        assert mla._checks_on(torch.device("cuda"))
    monkeypatch.setenv("DEEPKERNELS_CHECK", "0")
    assert not deepkernels._ops.device_checks_enabled()
    monkeypatch.setenv("DEEPKERNELS_CHECK", "1")
    assert deepkernels._ops.device_checks_enabled()


@pytest.mark.cuda
@pytest.mark.parametrize("change", [_entry(-1), _entry(2**30), _seqlen(-5), _seqlen(3 * PAGE + 1)],
                         ids=["minus1", "huge", "negative-len", "beyond-table"])
def test_cuda_checked_mode_raises_and_unchecked_shows_nan(change, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    args = make_inputs()
    change(args)
    meta, splits = mla.get_mla_decode_metadata_ref(args["cache_seqlens"], 16, 1, 3)
    args.update(tile_scheduler_metadata=meta, num_splits=splits)
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    monkeypatch.setenv("DEEPKERNELS_CHECK", "1")
    with pytest.raises(ValueError, match="block_table|cache_seqlens"):
        deepkernels.mla_decode_with_kvcache(**cuda)
    monkeypatch.setenv("DEEPKERNELS_CHECK", "0")
    out, lse = deepkernels.mla_decode_with_kvcache(**cuda)
    torch.cuda.synchronize()
    assert out[0].float().isnan().any() or out[1].float().isnan().any(), "a bad index gave no visible NaN"


# ---------------------------------------------------------------------------------------------
# the kernels' guards (emulated; the wrapper's checks bypassed through torch.ops): never an out-of-range access,
# the error shows as NaN in the rows that see the bad key

def _set_variant(monkeypatch, sm90):
    """"0": the portable kernel, "1": sm90 (legacy DEEPKERNELS_MLA_SM90=1, which leaves an e4m3 cache to the
    portable kernel), "pipelined": DEEPKERNELS_MLA_VARIANT=sm90_pipelined (every cache dtype)."""
    monkeypatch.delenv(mla.VARIANT_ENV, raising=False)
    monkeypatch.setenv(mla.SM90_ENV, "0" if sm90 == "0" else "1")
    if sm90 == "pipelined":
        monkeypatch.setenv(mla.VARIANT_ENV, "sm90_pipelined")


def _raw_decode(args):
    return torch.ops.deepkernels.mla_decode_with_kvcache(*args.values())


@pytest.mark.parametrize("sm90", ["0", "1", "pipelined"], ids=["portable", "sm90", "sm90_pipelined"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, E4M3], ids=["bf16", "fp16", "e4m3"])
@pytest.mark.parametrize("change,bad_seq", [(_entry(-1), 0), (_entry(2**30, row=1), 1), (_entry(-2**31), 0),
                                            (_seqlen(3 * PAGE + 20), 0), (_seqlen(-5, i=1), 1)],
                         ids=["minus1", "huge", "int-min", "beyond-table", "negative-len"])
@pytest.mark.emu
def test_kernel_guards_bad_indices_show_nan(emu_on, change, bad_seq, cache_dtype, sm90, monkeypatch):
    _set_variant(monkeypatch, sm90)
    args = make_inputs(lens=(40, 20), cache_dtype=cache_dtype)
    change(args)
    meta, splits = mla.get_mla_decode_metadata_ref(args["cache_seqlens"], 16, 1, 3)
    args.update(tile_scheduler_metadata=meta, num_splits=splits)
    out, lse = _raw_decode(args)
    assert out[bad_seq].float().isnan().all() and lse[bad_seq].isnan().all(), "bad index: expected NaN rows"
    good = 1 - bad_seq
    assert not out[good].float().isnan().any() and torch.isfinite(lse[good]).all(), "a valid sequence got NaN"


@pytest.mark.parametrize("sm90", ["0", "1", "pipelined"], ids=["portable", "sm90", "sm90_pipelined"])
@pytest.mark.emu
def test_kernel_guards_stale_plan_stays_in_bounds(emu_on, sm90, monkeypatch):
    """A plan computed for other lengths (trusted on CUDA) never writes outside the split buffers."""
    _set_variant(monkeypatch, sm90)
    args = make_inputs(lens=(40, 20))
    for lens in ([300, 1], [1, 1], [0, 0], [64 * 40, 5]):
        meta, splits = mla.get_mla_decode_metadata_ref(torch.tensor(lens, dtype=torch.int32), 16, 1, 3)
        garbage = [meta, meta * 1000 - 7, torch.full_like(meta, -5)]
        for m in garbage:
            args.update(tile_scheduler_metadata=m.contiguous(), num_splits=splits)
            out, lse = _raw_decode(args)
            assert out.shape == (2, 1, 16, 512)
    args.update(num_splits=torch.tensor([0, 10**6, -10**6], dtype=torch.int32))
    _raw_decode(args)


@pytest.mark.emu
def test_kernel_write_cache_skips_out_of_range_slots(emu_on):
    cache = torch.zeros(2, PAGE, 1, 576, dtype=torch.bfloat16)
    rows = torch.ones(4, 1, 576, dtype=torch.bfloat16)
    torch.ops.deepkernels.write_mla_kv_cache(cache, None, rows, torch.tensor([3, 2 * PAGE, 2**40, -9]))
    assert (cache.view(-1, 576)[3] == 1).all() and cache.view(-1, 576).ne(0).any(-1).sum() == 1


# ---------------------------------------------------------------------------------------------
# NaN propagation: reference vs emulated kernels

def _poison(args, what, seq=0):
    args = dict(args)
    if what == "q":
        args["q"] = args["q"].clone()
        args["q"][seq, -1, 3, 100] = float("nan")
    elif what in ("key-latent", "key-rope", "scale"):
        page = int(args["block_table"][seq, 0])
        if what == "scale":
            args["kv_scale"] = args["kv_scale"].clone()
            args["kv_scale"][page, 0, 0] = float("nan")
        else:
            args["kv_cache"] = args["kv_cache"].clone()
            args["kv_cache"][page, 0, 0, 7 if what == "key-latent" else 540] = float("nan")
    return args


def _expected_nan_rows(args, what, seq):
    """[b, s_q, h_q] bool: rows whose out/lse must be NaN."""
    b, s_q, h_q, _ = args["q"].shape
    lens = args["cache_seqlens"].tolist()
    expect = torch.zeros(b, s_q, h_q, dtype=torch.bool)
    for t in range(s_q):
        sees = lens[seq] - s_q + t >= 0 if args["causal"] else lens[seq] > 0
        if not sees:
            continue
        if what == "q" and t == s_q - 1:
            expect[seq, t, 3] = True
        elif what != "q":
            expect[seq, t, :] = True  # key 0 is seen by every row that sees any key
    return expect


NAN_CASES = [  # (what, lens, s_q, causal, num_sm_parts, cache dtype)
    ("q", (40, 20), 1, False, 3, torch.bfloat16),
    ("q", (300, 20), 2, True, 8, torch.bfloat16),          # a multi-split sequence: the combine kernel
    ("key-latent", (40, 20), 1, False, 1, torch.bfloat16),
    ("key-latent", (300, 20), 2, True, 8, torch.bfloat16),
    ("key-rope", (300, 7), 1, False, 8, torch.bfloat16),
    ("key-latent", (130, 9), 2, True, 4, E4M3),
    ("scale", (300, 20), 1, False, 8, E4M3),
    ("scale", (40, 20), 2, True, 1, E4M3),
    ("q", (1, 20), 2, True, 3, torch.bfloat16),            # the NaN query row sees no key: out 0, lse +inf
    ("q", (300, 20), 2, True, 8, torch.float16),
    ("key-latent", (300, 20), 1, False, 8, torch.float16),
    ("key-rope", (40, 20), 2, True, 1, torch.float16),
]


def _check_nan_case(what, lens, s_q, causal, parts, cache_dtype, emulated):
    args = make_inputs(lens=lens, s_q=s_q, cache_dtype=cache_dtype)
    args["causal"] = causal
    meta, splits = mla.get_mla_decode_metadata_ref(args["cache_seqlens"], s_q * 16, 1, parts)
    args.update(tile_scheduler_metadata=meta, num_splits=splits)
    args = _poison(args, what)
    expect = _expected_nan_rows(args, what, 0)
    with reference():
        ref_out, ref_lse = deepkernels.mla_decode_with_kvcache(**args)
    outs = [("reference", ref_out, ref_lse)]
    if emulated:
        outs.append(("kernel", *deepkernels.mla_decode_with_kvcache(**args)))
    for name, out, lse in outs:
        nan_rows = out.float().isnan().any(-1)
        assert torch.equal(nan_rows, expect), f"{name}: NaN rows {nan_rows.nonzero().tolist()} != " \
                                              f"{expect.nonzero().tolist()}"
        assert torch.equal(out.float().isnan().all(-1), expect), f"{name}: a NaN row is only partly NaN"
        assert torch.equal(lse.isnan(), expect.transpose(1, 2)), f"{name}: lse NaN pattern"
    if emulated:
        (_, ko, kl), ok = outs[1], ~expect
        torch.testing.assert_close(ko.float()[ok], ref_out.float()[ok], atol=8e-4, rtol=2.01 / 128)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(kl), torch.isinf(ref_lse))
        assert (kl[fin] - ref_lse[fin]).abs().max() < 1e-3 if fin.any() else True


@pytest.mark.parametrize("what,lens,s_q,causal,parts,cache_dtype", NAN_CASES,
                         ids=[f"{c[0]}-L{c[1][0]}-sq{c[2]}-p{c[4]}-{str(c[5])[6:]}" for c in NAN_CASES])
def test_nan_reaches_out_and_lse_reference(what, lens, s_q, causal, parts, cache_dtype):
    _check_nan_case(what, lens, s_q, causal, parts, cache_dtype, emulated=False)


@pytest.mark.parametrize("sm90", ["0", "1", "pipelined"], ids=["portable", "sm90", "sm90_pipelined"])
@pytest.mark.parametrize("what,lens,s_q,causal,parts,cache_dtype", NAN_CASES,
                         ids=[f"{c[0]}-L{c[1][0]}-sq{c[2]}-p{c[4]}-{str(c[5])[6:]}" for c in NAN_CASES])
@pytest.mark.emu
def test_nan_reaches_out_and_lse_kernel(emu_on, what, lens, s_q, causal, parts, cache_dtype, sm90, monkeypatch):
    _set_variant(monkeypatch, sm90)
    _check_nan_case(what, lens, s_q, causal, parts, cache_dtype, emulated=True)


@pytest.mark.emu
def test_nan_past_length_never_leaks_and_empty_rows_stay_zero(emu_on):
    """Slots past each length hold NaN (make_inputs); causal rows above the diagonal and empty sequences give
    out 0 / lse +inf on both paths."""
    args = make_inputs(lens=(1, 0, 33), s_q=2)
    args["causal"] = True
    meta, splits = mla.get_mla_decode_metadata_ref(args["cache_seqlens"], 32, 1, 3)
    args.update(tile_scheduler_metadata=meta, num_splits=splits)
    with reference():
        ref = deepkernels.mla_decode_with_kvcache(**args)
    got = deepkernels.mla_decode_with_kvcache(**args)
    for out, lse in (ref, got):
        assert not out.float().isnan().any() and not lse.isnan().any()
        assert (out[0, 0] == 0).all() and torch.isinf(lse[0, :, 0]).all()
        assert (out[1] == 0).all() and (lse[1] == math.inf).all()


# ---------------------------------------------------------------------------------------------
# valid edge cases: accepted by both paths, and the emulated kernels agree with the reference

def _full_table_case():
    """Lengths that use every column of the block table, and the last block of the cache."""
    args = make_inputs(lens=(3 * PAGE, 2 * PAGE + 1), max_blocks=3)
    args["block_table"] = args["block_table"].clone()
    args["block_table"][0, 2] = args["kv_cache"].size(0) - 1
    return args


EDGE_CASES = {
    "empty-batch": lambda: make_inputs(lens=(), h_q=16),
    "all-empty": lambda: make_inputs(lens=(0, 0, 0)),
    "one-token": lambda: make_inputs(lens=(1,)),
    "full-table": _full_table_case,
    "s_q-2-causal-short": lambda: {**make_inputs(lens=(1, 2, 0), s_q=2), "causal": True},
    "fp16": lambda: make_inputs(lens=(37, 5), q_dtype=torch.float16, cache_dtype=torch.float16),
    "e4m3": lambda: make_inputs(lens=(37, 5), cache_dtype=E4M3),
    "numpy-scalars": lambda: {**make_inputs(lens=(20, 5)), "head_dim_v": __import__("numpy").int64(512),
                              "softmax_scale": __import__("numpy").float32(0.05)},
}


@pytest.mark.emu
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_valid_edge_cases_reference_equals_kernel(emu_on, name):
    args = EDGE_CASES[name]()
    if name == "full-table":  # rewrite the rows of the page swapped in, so the last block holds real data
        page = int(args["block_table"][0, 2])
        args["kv_cache"][page] = (torch.randn(PAGE, 1, 576) / 4).to(args["kv_cache"].dtype)
    with reference():
        ref_out, ref_lse = deepkernels.mla_decode_with_kvcache(**args)
    out, lse = deepkernels.mla_decode_with_kvcache(**args)
    assert out.dtype == args["q"].dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not out.float().isnan().any() and not lse.isnan().any(), name
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), name
    torch.testing.assert_close(out.float(), ref_out.float(), atol=8e-4 if args["kv_scale"] is None else 4e-3,
                               rtol=2.01 / 128)
