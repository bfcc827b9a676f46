"""FP8 blockwise GEMMs (dense, grouped-contiguous, grouped-masked): reference vs the fp32 product of the
unquantised inputs on DeepSeek-V3 shapes, odd sizes, padding / masking edges, argument errors, opcheck,
torch.compile, the DeepGEMM-compatible API; CUDA kernels vs the same contracts (poisoned outputs)."""
import pytest
import torch

import deepkernels
from deepkernels import gemm
from deepkernels.compat import deep_gemm
from deepkernels.nn import Fp8Linear
from deepkernels.testing import calc_diff, cuda_kernels_available, opcheck, poison_

E4M3 = torch.float8_e4m3fn
DSV3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
ODD_MNK = [(1, 16, 16), (3, 48, 144), (17, 272, 400), (33, 144, 1040)]  # N, K multiples of 16, not of 128
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not cuda_kernels_available(), reason="needs a GPU and the CUDA extension")


def _quantised(m, n, k, device="cpu", groups=None, seed=0):
    """Random a [M,K] / b [(G,) N,K] in fp32, their fp8 forms and scales (a_scale row-major)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(*(() if groups is None else (groups,)), n, k, generator=gen)
    a_q, a_s = deepkernels.per_token_cast_to_fp8(a.to(device))
    if groups is None:
        b_q, b_s = deepkernels.per_block_cast_to_fp8(b.to(device))
    else:
        pairs = [deepkernels.per_block_cast_to_fp8(b[g].to(device)) for g in range(groups)]
        b_q, b_s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return a, b, a_q, a_s, b_q, b_s


def _devices():
    return ["cpu", pytest.param("cuda", marks=[cuda, needs_gpu])]


# ---------------------------------------------------------------------------------------------- dense

@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("nk", DSV3_NK, ids=lambda nk: f"n{nk[0]}k{nk[1]}")
def test_dense_dsv3_shapes_close_to_fp32(nk, m, device):
    n, k = nk
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, device)
    out = deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert calc_diff(out.cpu().float(), a @ b.t()) < 1e-3


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mnk", ODD_MNK + [(4096, 256, 512)], ids=str)
def test_dense_odd_sizes_and_poisoned_out(mnk, device):
    m, n, k = mnk
    if m >= 4096 and device == "cpu":
        m = 200
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    got = deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out=out)
    assert got.data_ptr() == out.data_ptr() and not out.isnan().any()
    assert calc_diff(out.cpu().float(), a @ b.t()) < 1e-3
    # the kernel must equal the reference maths (dequantised operands, fp32 accumulation) up to bf16 rounding
    ref = gemm._dequant_a(a_q.cpu(), a_s.cpu()) @ gemm._dequant_b(b_q.cpu(), b_s.cpu()).t()
    torch.testing.assert_close(out.cpu().float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", _devices())
def test_dense_accepts_column_major_a_scale(device):
    a, b, a_q, a_s, b_q, b_s = _quantised(37, 256, 640, device)
    col = deep_gemm.get_col_major_tma_aligned_tensor(a_s)
    assert col.stride(0) == 1 and col.stride(1) == 40 and torch.equal(col, a_s)
    torch.testing.assert_close(deepkernels.fp8_gemm_nt(a_q, col, b_q, b_s), deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s),
                               rtol=0, atol=0)


def test_dense_empty_m():
    _, _, a_q, a_s, b_q, b_s = _quantised(0, 32, 128)
    assert deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s).shape == (0, 32)


# ---------------------------------------------------------------------------------------------- grouped

def _contiguous_layout(sizes, align):
    """m_indices for groups of ``sizes`` rows, each segment padded with -1 rows to ``align``."""
    idx = []
    for g, s in enumerate(sizes):
        padded = -(-s // align) * align
        idx += [g] * s + [-1] * (padded - s)
    return torch.tensor(idx, dtype=torch.int32)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("sizes,n,k", [([5, 0, 130, 1], 144, 272), ([128, 128], 256, 7168), ([3, 64, 0], 2112, 512)],
                         ids=str)
def test_grouped_contiguous(sizes, n, k, device):
    align = deepkernels.get_m_alignment_for_contiguous_layout()
    assert align in (64, 128)
    m_indices = _contiguous_layout(sizes, align)
    m, groups = m_indices.numel(), len(sizes)
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, device, groups=groups)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=device))
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, out, m_indices.to(device))
    out = out.cpu().float()
    pad = m_indices < 0
    assert (out[pad] == 0).all(), "padding rows (m_indices == -1) must be zero"
    want = torch.zeros(m, n)
    for g in range(groups):
        rows = m_indices == g
        want[rows] = a[rows] @ b[g].t()
    assert calc_diff(out[~pad], want[~pad]) < 1e-3


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("masked,mmax,n,k", [([0, 7, 64], 64, 256, 7168), ([64, 0, 1, 33], 64, 144, 400),
                                             ([0, 0], 16, 32, 128)], ids=str)
def test_grouped_masked_rows_beyond_masked_m_untouched(masked, mmax, n, k, device):
    groups = len(masked)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(groups, mmax, k, generator=gen)
    _, b, _, _, b_q, b_s = _quantised(1, n, k, device, groups=groups)
    a_q, a_s = deepkernels.per_token_cast_to_fp8(a.to(device))
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=device))
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    deepkernels.m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, out, masked_m, expected_m=max(masked))
    out = out.cpu().float()
    for g, mg in enumerate(masked):
        assert out[g, mg:].isnan().all(), f"group {g}: rows >= masked_m={mg} must stay untouched"
        if mg:
            assert calc_diff(out[g, :mg], a[g, :mg] @ b[g].t()) < 1e-3


@cuda
@needs_gpu
def test_masked_capturable_in_cuda_graph():
    groups, mmax, n, k = 4, 128, 512, 1024
    a = torch.randn(groups, mmax, k, device="cuda")
    _, b, _, _, b_q, b_s = _quantised(1, n, k, "cuda", groups=groups)
    a_q, a_s = deepkernels.per_token_cast_to_fp8(a)
    out = torch.zeros(groups, mmax, n, dtype=torch.bfloat16, device="cuda")
    masked_m = torch.zeros(groups, dtype=torch.int32, device="cuda")
    deepkernels.m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, out, masked_m, 64)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deepkernels.m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, out, masked_m, 64)
    masked_m.copy_(torch.tensor([0, 5, 128, 77]))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for g, mg in enumerate([0, 5, 128, 77]):
        assert (out[g, mg:] == 0).all()
        if mg:
            assert calc_diff(out[g, :mg].float(), a[g, :mg] @ b[g].cuda().t()) < 1e-3


# ---------------------------------------------------------------------------------------------- errors

def _good(m=8, n=32, k=256):
    _, _, a_q, a_s, b_q, b_s = _quantised(m, n, k)
    return a_q, a_s, b_q, b_s


@pytest.mark.parametrize("mutate,match", [
    (lambda a, sa, b, sb: (a.float(), sa, b, sb), "a: expected dtype float8_e4m3fn"),
    (lambda a, sa, b, sb: (a, sa, b.to(torch.bfloat16), sb), "b: expected dtype"),
    (lambda a, sa, b, sb: (a, sa.double(), b, sb), "a_scale: expected dtype float32"),
    (lambda a, sa, b, sb: (a, sa[:, :1], b, sb), r"a_scale: expected shape \[8, 2\]"),
    (lambda a, sa, b, sb: (a, sa, b, sb[:, :1]), r"b_scale: expected shape \[1, 2\]"),
    (lambda a, sa, b, sb: (a[:, :200].contiguous(), sa, b, sb), "K .* multiple of 16"),
    (lambda a, sa, b, sb: (a, sa, b[:24], sb), "N .* multiple of 16"),
    (lambda a, sa, b, sb: (a, sa, b[:, :128].contiguous(), sb), "b: expected K = 256"),
    (lambda a, sa, b, sb: (a.t().contiguous().t(), sa, b, sb), "a: expected a contiguous tensor"),
    (lambda a, sa, b, sb: (a, sa.t().contiguous()[:, :8].t() if False else sa.repeat(1, 2)[:, ::2], b, sb),
     "a_scale: expected row-major contiguous or column-major"),
    (lambda a, sa, b, sb: (a, sa, b, sb.to("meta")), "expected all tensors on one device"),
    (lambda a, sa, b, sb: ("a", sa, b, sb), "a: expected a torch.Tensor"),
])
def test_dense_bad_inputs_raise_clear_errors(mutate, match):
    args = mutate(*_good())
    with pytest.raises((ValueError, TypeError), match=match):
        deepkernels.fp8_gemm_nt(*args)


def test_out_and_index_errors():
    a_q, a_s, b_q, b_s = _good()
    with pytest.raises(ValueError, match=r"out: expected dtype bfloat16"):
        deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out=torch.empty(8, 32))
    with pytest.raises(ValueError, match=r"out: expected shape \[8, 32\]"):
        deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out=torch.empty(8, 16, dtype=torch.bfloat16))
    bg, sg = b_q[None].expand(2, -1, -1).contiguous(), b_s[None].expand(2, -1, -1).contiguous()
    out = torch.empty(8, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="m_indices: expected dtype int32"):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, bg, sg, out, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"b_scale: expected shape \[2, 1, 2\]"):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, bg, b_s, out, torch.zeros(8, dtype=torch.int32))
    a3, s3 = a_q[None].expand(2, -1, -1).contiguous(), a_s[None].expand(2, -1, -1).contiguous()
    out3 = torch.empty(2, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="masked_m: expected shape"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(a3, s3, bg, sg, out3, torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="same number of groups"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(a3, s3, bg[:1], sg[:1], out3, torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected_m"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(a3, s3, bg, sg, out3, torch.zeros(2, dtype=torch.int32), -1)


# ---------------------------------------------------------------------------------------------- opcheck / compile

def test_opcheck_all_ops():
    a_q, a_s, b_q, b_s = _good(8, 32, 256)
    out = torch.empty(8, 32, dtype=torch.bfloat16)
    opcheck(torch.ops.deepkernels.fp8_gemm_nt, (a_q, a_s, b_q, b_s, out))
    bg, sg = torch.stack([b_q, b_q]), torch.stack([b_s, b_s * 2])
    opcheck(torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous,
            (a_q, a_s, bg, sg, out, torch.tensor([0] * 4 + [1] * 3 + [-1], dtype=torch.int32)))
    a3, s3 = torch.stack([a_q, a_q]), torch.stack([a_s, a_s])
    opcheck(torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked,
            (a3, s3, bg, sg, torch.zeros(2, 8, 32, dtype=torch.bfloat16), torch.tensor([3, 8], dtype=torch.int32), 8))


def test_torch_compile_fullgraph_gemm_and_fp8_linear():
    a_q, a_s, b_q, b_s = _good(8, 32, 256)
    compiled = torch.compile(deepkernels.fp8_gemm_nt, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a_q, a_s, b_q, b_s), deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s), rtol=0, atol=0)
    linear = Fp8Linear.from_linear(torch.nn.Linear(256, 64, bias=True))
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        got = torch.compile(linear, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, linear(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", _devices())
def test_fp8_linear_uses_gemm(device):
    lin = torch.nn.Linear(512, 2112, bias=True).to(device)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 512, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        got = fp8(x)
        want = lin(x.float())
    assert got.dtype == torch.bfloat16 and got.shape == (4, 2112)
    assert calc_diff(got.float(), want) < 1e-3


# ---------------------------------------------------------------------------------------------- DeepGEMM API

@pytest.mark.parametrize("device", _devices())
def test_deep_gemm_compat_as_deep_gemm_tests_call_it(device):
    m, n, k = 64, 256, 512
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    deep_gemm.gemm_fp8_fp8_bf16_nt((a_q, deep_gemm.get_col_major_tma_aligned_tensor(a_s)), (b_q, b_s), out)
    assert calc_diff(out.cpu().float(), a @ b.t()) < 1e-3

    groups, m_per = 2, 128
    a, b, a_q, a_s, b_q, b_s = _quantised(groups * m_per, n, k, device, groups=groups)
    m_indices = torch.arange(groups, device=device, dtype=torch.int32).repeat_interleave(m_per)
    out = torch.empty(groups * m_per, n, dtype=torch.bfloat16, device=device)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
        (a_q, deep_gemm.get_col_major_tma_aligned_tensor(a_s)), (b_q, b_s), out, m_indices)
    want = torch.cat([a[g * m_per:(g + 1) * m_per] @ b[g].t() for g in range(groups)])
    assert calc_diff(out.cpu().float(), want) < 1e-3
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == deepkernels.get_m_alignment_for_contiguous_layout()

    a3 = a.view(groups, m_per, k)
    a3_q, a3_s = deepkernels.per_token_cast_to_fp8(a3.to(device))
    a3_s = deep_gemm.get_col_major_tma_aligned_tensor(a3_s)
    assert a3_s.stride(1) == 1
    out = torch.zeros(groups, m_per, n, dtype=torch.bfloat16, device=device)
    masked_m = torch.tensor([100, 128], dtype=torch.int32, device=device)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3_q, a3_s), (b_q, b_s), out, masked_m, 128)
    for g, mg in enumerate([100, 128]):
        assert calc_diff(out[g, :mg].cpu().float(), a3[g, :mg] @ b[g].t()) < 1e-3
    assert deep_gemm.ceil_div(129, 128) == 2


@cuda
@needs_gpu
@pytest.mark.parametrize("mnk", [(4096, 7168, 2048), (4097, 2112, 7168), (8192, 4096, 512)], ids=str)
def test_cuda_large_m_matches_reference(mnk):
    """The CUDA kernel vs the reference maths on the same fp8 operands (the only difference allowed is the
    order of fp32 additions and the final bf16 rounding), and vs the unquantised fp32 product."""
    m, n, k = mnk
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, "cuda")
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
    deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out=out)
    ref = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(a_q, a_s, b_q, b_s, ref)
    assert not out.isnan().any(), "some output tiles were not written"
    assert calc_diff(out.float(), ref.float()) < 1e-5
    assert calc_diff(out.float(), a.cuda() @ b.cuda().t()) < 1e-3


@pytest.mark.parametrize("device", _devices())
def test_grouped_contiguous_all_padding_and_no_groups(device):
    _, _, a_q, a_s, b_q, b_s = _quantised(128, 32, 256, device, groups=1)
    for b, s in ((b_q, b_s), (b_q[:0], b_s[:0])):
        out = poison_(torch.empty(128, 32, dtype=torch.bfloat16, device=device))
        m_indices = torch.full((128,), -1, dtype=torch.int32, device=device)
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b.contiguous(), s.contiguous(), out, m_indices)
        assert (out == 0).all()


@cuda
@needs_gpu
@pytest.mark.parametrize("mnk", [(1, 2112, 7168), (77, 144, 400), (4096, 7168, 2048)], ids=str)
def test_cuda_sm90_wgmma_kernel_opt_in(mnk, monkeypatch):
    """DEEPKERNELS_GEMM_SM90=1 routes all three ops to the (not yet validated) wgmma kernel on cc 9.0."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel is built for sm_90a only")
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    m, n, k = mnk
    a, b, a_q, a_s, b_q, b_s = _quantised(m, n, k, "cuda")
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
    deepkernels.fp8_gemm_nt(a_q, a_s, b_q, b_s, out=out)
    ref = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(a_q, a_s, b_q, b_s, ref)
    assert not out.isnan().any(), "some output tiles were not written"
    assert calc_diff(out.float(), ref.float()) < 1e-5
    out3 = poison_(torch.empty(2, m, n, dtype=torch.bfloat16, device="cuda"))
    masked_m = torch.tensor([m, m // 2], dtype=torch.int32, device="cuda")
    deepkernels.m_grouped_fp8_gemm_nt_masked(torch.stack([a_q, a_q]), torch.stack([a_s, a_s]), torch.stack([b_q, b_q]),
                                             torch.stack([b_s, b_s]), out3, masked_m, m)
    assert calc_diff(out3[0].float(), ref.float()) < 1e-5 and out3[1, m // 2:].isnan().all()
    if m // 2:
        assert calc_diff(out3[1, :m // 2].float(), ref[:m // 2].float()) < 1e-5
