"""per_token / per_block fp8 casts and their inverses: reference vs independent maths, layouts,
edges, errors, opcheck, torch.compile; CUDA kernels vs the reference (bit-exact)."""
import math

import pytest
import torch

import deepkernels
from deepkernels import fp8
from deepkernels.testing import calc_diff, opcheck

E4M3 = torch.float8_e4m3fn
SHAPES = [(1, 1), (1, 128), (3, 7), (5, 127), (4, 129), (2, 300), (64, 256), (17, 7168), (130, 200)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _group_amax_loop(x: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Independent maths: explicit loops over groups, no padding trick."""
    rows, k = x.shape
    out = torch.empty(math.ceil(rows / rows_per_group), math.ceil(k / 128))
    for i in range(out.size(0)):
        for j in range(out.size(1)):
            block = x[i * rows_per_group:(i + 1) * rows_per_group, j * 128:(j + 1) * 128].float()
            out[i, j] = max(block.abs().max().item(), 1e-4)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_layout_and_roundtrip(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    assert q.dtype == E4M3 and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (shape[0], math.ceil(shape[1] / 128))
    torch.testing.assert_close(scale, _group_amax_loop(x, 1) / 448.0, rtol=0, atol=0)
    back = deepkernels.per_token_cast_from_fp8(q, scale)
    expanded = scale.repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormal step 2^-9 (half: 2^-10).
    bound = x.float().abs() / 16 + expanded * 2**-10 + 1e-12
    err = (back - x.float()).abs()
    assert (err <= bound).all(), f"{shape} {dtype}: max err {err.max():.3g} over bound"
    # each group's amax maps exactly onto +-448
    assert q.float().abs().amax(dim=1).max() <= 448


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (129, 300), (200, 7), (256, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_block_layout_and_roundtrip(shape, dtype):
    w = torch.randn(shape).to(dtype)
    q, scale = deepkernels.per_block_cast_to_fp8(w)
    assert q.dtype == E4M3 and q.shape == w.shape
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    torch.testing.assert_close(scale, _group_amax_loop(w, 128) / 448.0, rtol=0, atol=0)
    back = deepkernels.per_block_cast_from_fp8(q, scale, torch.float32)
    expanded = scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    bound = w.float().abs() / 16 + expanded * 2**-10 + 1e-12
    assert ((back - w.float()).abs() <= bound).all(), f"{shape} {dtype}"
    assert calc_diff(back, w.float()) < 1e-3


def test_values_are_round_to_nearest_of_scaled_input():
    x = torch.randn(8, 256)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    scaled = x * (448.0 / (scale * 448.0)).repeat_interleave(128, 1)
    candidates = torch.tensor(sorted({float(torch.tensor(b, dtype=torch.uint8).view(E4M3).float())
                                      for b in range(256) if b not in (0x7F, 0xFF)}))
    nearest = candidates[(scaled.unsqueeze(-1) - candidates).abs().argmin(-1)]
    torch.testing.assert_close(q.float().abs(), nearest.abs(), rtol=0, atol=0)


def test_leading_dims_and_noncontiguous():
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    assert q.shape == (2, 3, 256) and scale.shape == (2, 3, 2)
    q2, s2 = deepkernels.per_token_cast_to_fp8(x.reshape(6, 256))
    assert torch.equal(q.view(6, 256).view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s2, scale.view(6, 2))
    xt = torch.randn(256, 6, dtype=torch.bfloat16).t()  # inner stride != 1
    qt, st = deepkernels.per_token_cast_to_fp8(xt)
    qc, sc = deepkernels.per_token_cast_to_fp8(xt.contiguous())
    assert torch.equal(qt.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(st, sc)


def test_zeros_get_clamped_scale():
    q, scale = deepkernels.per_token_cast_to_fp8(torch.zeros(2, 200))
    assert torch.all(scale == 1e-4 / 448.0) and torch.all(q.float() == 0)
    qb, sb = deepkernels.per_block_cast_to_fp8(torch.zeros(130, 10))
    assert torch.all(sb == 1e-4 / 448.0) and torch.all(qb.float() == 0)


def test_empty_inputs():
    q, scale = deepkernels.per_token_cast_to_fp8(torch.zeros(0, 256))
    assert q.shape == (0, 256) and scale.shape == (0, 2)
    qb, sb = deepkernels.per_block_cast_to_fp8(torch.zeros(0, 256))
    assert qb.shape == (0, 256) and sb.shape == (0, 2)


def test_nonfinite_groups_are_isolated():
    x = torch.randn(3, 256)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    q, scale = deepkernels.per_token_cast_to_fp8(x)
    assert math.isnan(scale[0, 0]) and torch.isnan(q[0, :128].float()).all()
    assert math.isinf(scale[1, 1]) and torch.isnan(q[1, 200].float())
    assert (q[1, 128:200].float() == 0).all() and (q[1, 201:].float() == 0).all()
    finite = [(0, 1), (1, 0), (2, 0), (2, 1)]
    assert all(math.isfinite(scale[i, j]) for i, j in finite), scale
    torch.testing.assert_close(scale[2], _group_amax_loop(x[2:3], 1)[0] / 448.0, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 128, dtype=torch.int32), "x: expected dtype float32 or bfloat16 or float16, got int32"),
    (torch.zeros(4, 128, dtype=E4M3), "x: expected dtype"),
    (torch.tensor(1.0), "x: expected at least 1 dim"),
])
def test_per_token_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        deepkernels.per_token_cast_to_fp8(bad)


def test_bad_input_messages():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        deepkernels.per_token_cast_to_fp8([1.0, 2.0])
    with pytest.raises(ValueError, match=r"w: expected 2 dims, got 3"):
        deepkernels.per_block_cast_to_fp8(torch.zeros(2, 2, 2))
    q, scale = deepkernels.per_token_cast_to_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"scale: expected shape \[4, 2\], got \[4, 3\]"):
        deepkernels.per_token_cast_from_fp8(q, torch.ones(4, 3))
    with pytest.raises(ValueError, match="scale: expected dtype float32, got bfloat16"):
        deepkernels.per_token_cast_from_fp8(q, scale.bfloat16())
    with pytest.raises(ValueError, match="scale: expected a tensor on cpu, got meta"):
        deepkernels.per_token_cast_from_fp8(q, scale.to("meta"))
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        deepkernels.per_token_cast_from_fp8(q.t(), scale)
    with pytest.raises(ValueError, match="out_dtype: expected"):
        deepkernels.per_token_cast_from_fp8(q, scale, torch.int8)
    qb, sb = deepkernels.per_block_cast_to_fp8(torch.randn(200, 256))
    with pytest.raises(ValueError, match=r"scale: expected shape \[2, 2\]"):
        deepkernels.per_block_cast_from_fp8(qb, sb[:1])


def _op_cases(device):
    x = torch.randn(5, 300, dtype=torch.bfloat16, device=device)
    q, s = fp8.per_token_cast_to_fp8_ref(x)
    w = torch.randn(130, 200, device=device)
    qb, sb = fp8.per_block_cast_to_fp8_ref(w)
    return [
        (torch.ops.deepkernels.per_token_cast_to_fp8, (x,)),
        (torch.ops.deepkernels.per_block_cast_to_fp8, (w,)),
        (torch.ops.deepkernels.per_token_cast_from_fp8, (q, s, torch.bfloat16)),
        (torch.ops.deepkernels.per_block_cast_from_fp8, (qb, sb, torch.float32)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = _op_cases("cpu")[index]
    opcheck(op, args)


def test_torch_compile_fullgraph():
    def quant_dequant(x):
        q, s = deepkernels.per_token_cast_to_fp8(x)
        return deepkernels.per_token_cast_from_fp8(q, s, torch.float32)

    x = torch.randn(8, 384)
    compiled = torch.compile(quant_dequant, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), quant_dequant(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# CUDA kernels vs the reference, bit-exact: on the GPU (`pytest -m cuda`) and on CPU tensors through the
# SIMT emulator (`-m emu`, the unchanged kernels on the CPU). The oracle is always the *_ref function.

def _device_cases(argname: str, cases: list, cuda_only: list = ()) -> pytest.MarkDecorator:
    """Parametrize ``kernel_device`` (indirectly) together with ``argname``: every case on "cuda" and
    "emu", the ``cuda_only`` ones (too large to emulate in the time the suite allows) on "cuda" only."""
    params = [pytest.param("cuda", c, marks=pytest.mark.cuda) for c in [*cases, *cuda_only]]
    params += [pytest.param("emu", c, marks=pytest.mark.emu) for c in cases]
    return pytest.mark.parametrize(f"kernel_device,{argname}", params, indirect=["kernel_device"],
                                   ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)


def _assert_same_cast(got, want, case):
    (gq, gs), (wq, ws) = got, want
    assert torch.equal(gs.cpu(), ws.cpu()) or torch.allclose(gs.cpu(), ws.cpu(), rtol=0, atol=0, equal_nan=True), \
        f"{case}: scales differ, max {(gs.cpu() - ws.cpu()).abs().max()}"
    # e4m3fn has two NaN encodings (0x7f, 0xff); the NaN's sign is not part of the contract (an inf group gives
    # inf * 0 = NaN: x86 makes it negative, the GPU's cvt positive).
    gb, wb = gq.cpu().view(torch.uint8), wq.cpu().view(torch.uint8)
    both_nan = ((gb & 0x7F) == 0x7F) & ((wb & 0x7F) == 0x7F)
    mismatch = ((gb != wb) & ~both_nan).sum().item()
    assert mismatch == 0, f"{case}: {mismatch} fp8 bytes differ from the reference"


@_device_cases("shape", SHAPES + [(3, 16384)], cuda_only=[(4096, 7168)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_per_token_matches_reference(kernel_device, shape, dtype):
    x = (torch.randn(shape) * 5).to(dtype)
    _assert_same_cast(deepkernels.per_token_cast_to_fp8(x.to(kernel_device)), fp8.per_token_cast_to_fp8_ref(x),
                      (shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_per_token_unaligned_and_strided_rows(kernel_device, dtype):
    base = torch.randn(64, 1030, device=kernel_device).to(dtype)
    # scalar path (unaligned start, row stride 1030 not a multiple of 4) and the vectorised path on
    # strided aligned views (row stride 2060 != K, with and without an offset)
    for view in (base[:, 1:1025], base[:, 2:130], base[::2, :256], base[::2, 4:260]):
        _assert_same_cast(deepkernels.per_token_cast_to_fp8(view), fp8.per_token_cast_to_fp8_ref(view.cpu()),
                          (tuple(view.shape), view.stride(), dtype))


@_device_cases("shape", [(1, 1), (128, 128), (129, 300), (200, 7), (300, 520)], cuda_only=[(7168, 2048)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_per_block_matches_reference(kernel_device, shape, dtype):
    w = torch.randn(shape).to(dtype)
    _assert_same_cast(deepkernels.per_block_cast_to_fp8(w.to(kernel_device)), fp8.per_block_cast_to_fp8_ref(w),
                      (shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nonfinite_and_zero_groups(kernel_device, dtype):
    x = torch.randn(3, 300)
    x[0, 5], x[1, 200], x[2] = float("nan"), float("inf"), 0.0
    x = x.to(dtype)
    _assert_same_cast(deepkernels.per_token_cast_to_fp8(x.to(kernel_device)), fp8.per_token_cast_to_fp8_ref(x),
                      ("nonfinite", dtype))
    w = torch.randn(260, 300)
    w[3, 5], w[200, 290], w[130:260, 0:128] = float("nan"), float("-inf"), 0.0
    w = w.to(dtype)
    _assert_same_cast(deepkernels.per_block_cast_to_fp8(w.to(kernel_device)), fp8.per_block_cast_to_fp8_ref(w),
                      ("nonfinite per-block", dtype))


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cuda_dequant_matches_reference(kernel_device, out_dtype):
    x = torch.randn(33, 300)
    q, s = fp8.per_token_cast_to_fp8_ref(x)
    got = deepkernels.per_token_cast_from_fp8(q.to(kernel_device), s.to(kernel_device), out_dtype)
    assert torch.equal(got.cpu(), fp8.per_token_cast_from_fp8_ref(q, s, out_dtype))
    qb, sb = fp8.per_block_cast_to_fp8_ref(x)
    got = deepkernels.per_block_cast_from_fp8(qb.to(kernel_device), sb.to(kernel_device), out_dtype)
    assert torch.equal(got.cpu(), fp8.per_block_cast_from_fp8_ref(qb, sb, out_dtype))
    # NaN / inf groups: the NaN scale and NaN bytes come back as NaN, like the reference
    x[1, 7], x[2, 200], x[20, 0] = float("nan"), float("inf"), float("-inf")
    for to_fp8, from_fp8, from_ref in ((fp8.per_token_cast_to_fp8_ref, deepkernels.per_token_cast_from_fp8,
                                        fp8.per_token_cast_from_fp8_ref),
                                       (fp8.per_block_cast_to_fp8_ref, deepkernels.per_block_cast_from_fp8,
                                        fp8.per_block_cast_from_fp8_ref)):
        q, s = to_fp8(x)
        got, want = from_fp8(q.to(kernel_device), s.to(kernel_device), out_dtype).cpu(), from_ref(q, s, out_dtype)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("index", range(4))
def test_cuda_opcheck(kernel_device, index):
    op, args = _op_cases(kernel_device)[index]
    opcheck(op, args)
