"""Weight-gradient FP8 GEMMs (DeepGEMM's wgrad_gemm_fp8_fp8_fp32_nt / k_grouped_wgrad_gemm_fp8_fp8_fp32_nt):
reference vs the unquantised product and vs an independent per-K-block formulation, accumulation into out,
DeepGEMM's scale layouts, errors, opcheck, the compat names; the CUDA kernel (GPU or emulated) vs the reference."""
import re

import pytest
import torch

import deepkernels
import deepkernels.compat.deep_gemm as deep_gemm
from deepkernels import gemm
from deepkernels.fp8 import FP8_DTYPE
from deepkernels.testing import calc_diff, opcheck, poison_, reference


def _per_token(x: torch.Tensor):
    """per_token_cast_to_fp8 through the reference (only the GEMM is under test), K = 0 included."""
    if x.size(-1) == 0:
        return x.to(FP8_DTYPE), torch.empty(x.size(0), 0, dtype=torch.float32, device=x.device)
    with reference():
        return deepkernels.per_token_cast_to_fp8(x)


def _wgrad_case(m, n, k, device="cpu"):
    """DeepGEMM's construct_wgrad: bf16 operands, both cast 1x128 per row along K, a non-zero fp32 residual."""
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    residual = torch.randn(m, n, device=device) * 10
    want = residual.cpu() + a.float().cpu() @ b.float().cpu().T
    return (*_per_token(a), *_per_token(b)), residual, want


def _k_grouped_case(m, n, ks, device="cpu"):
    """DeepGEMM's construct_k_grouped_wgrad: flat operands, scales [sum(ceil(k/128)), M|N] (transposed per group)."""
    a_chunks = [torch.randn(m, k, dtype=torch.bfloat16) for k in ks]
    b_chunks = [torch.randn(n, k, dtype=torch.bfloat16) for k in ks]
    qa, qb = [_per_token(x) for x in a_chunks], [_per_token(x) for x in b_chunks]
    a = torch.cat([q.flatten() for q, _ in qa]).to(device)
    b = torch.cat([q.flatten() for q, _ in qb]).to(device)
    a_scale = torch.cat([s.T for _, s in qa]).contiguous().to(device)
    b_scale = torch.cat([s.T for _, s in qb]).contiguous().to(device)
    want = torch.stack([x.float() @ y.float().T for x, y in zip(a_chunks, b_chunks)])
    return (a, a_scale, b, b_scale), want


def _per_k_block_product(a, sa, b, sb):
    """Independent formulation: fp64 partial products per 128-wide K block times both per-row scales."""
    acc = torch.zeros(a.size(0), b.size(0), dtype=torch.float64)
    for kb in range(0, a.size(1), 128):
        partial = a[:, kb:kb + 128].double() @ b[:, kb:kb + 128].double().T
        acc += partial * sa[:, kb // 128].double()[:, None] * sb[:, kb // 128].double()[None, :]
    return acc


# (M, N, K): DeepSeek-V3 wgrad shapes reduced for the CPU, edge tiles, K not a multiple of 128, K = 0.
SHAPES = [(64, 64, 128), (70, 33, 272), (1, 5, 16), (130, 200, 640), (128, 96, 0), (0, 16, 128)]


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_wgrad_reference_accumulates_close_to_unquantised(m, n, k):
    (aq, sa, bq, sb), residual, want = _wgrad_case(m, n, k)
    out = residual.clone()
    returned = gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, out)
    assert returned is out and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), residual.double() + _per_k_block_product(aq, sa, bq, sb),
                               rtol=1e-5, atol=1e-3, msg=f"{(m, n, k)}")
    product = out - residual
    if m and n and k >= 128:  # calc_diff is DeepGEMM's metric for real K; at K = 16 it is noise-level (~1e-3)
        diff = calc_diff(product, want - residual)
        assert diff < 1e-3, f"{(m, n, k)}: calc_diff vs unquantised {diff:.2e}"
    elif not (m and n and k):
        assert torch.equal(out, residual), f"{(m, n, k)}: empty product changed out"


def test_wgrad_deepseek_shape_calc_diff():
    m, n, k = 256, 384, 4096  # DeepGEMM's test_wgrad_gemm K, M/N reduced for the CPU
    (aq, sa, bq, sb), residual, want = _wgrad_case(m, n, k)
    out = residual.clone()
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt((aq, sa), (bq, sb), out)
    assert calc_diff(out, want) < 1e-3, calc_diff(out, want)


def test_wgrad_scale_layouts_give_same_result():
    (aq, sa, bq, sb), residual, _ = _wgrad_case(40, 24, 384)
    want = residual.clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, want)
    for a_scale, b_scale in [(deep_gemm.get_col_major_tma_aligned_tensor(sa), sb),
                             (sa, deep_gemm.get_col_major_tma_aligned_tensor(sb)),
                             (sa.T.contiguous(), sb.T.contiguous())]:  # DeepGEMM also takes [K/128, MN]
        out = residual.clone()
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt((aq, a_scale), (bq, b_scale), out)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("ks", [[256, 384, 128], [0, 144, 0, 512], [16]])
def test_k_grouped_reference_matches_per_group_dense(ks):
    m, n = 48, 80
    (a, sa, b, sb), want = _k_grouped_case(m, n, ks)
    residual = torch.randn(len(ks), m, n)
    out = residual.clone()
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, ks)
    for g, k in enumerate(ks):
        if k == 0:
            assert torch.equal(out[g], residual[g]), f"ks={ks} group {g}: K = 0 changed out"
            continue
        diff = calc_diff(out[g] - residual[g], want[g])
        assert diff < 1e-3, f"ks={ks} group {g}: calc_diff {diff:.2e}"
    # ks as a tensor, and the dense op per group, agree exactly
    out2 = residual.clone()
    gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, out2, torch.tensor(ks))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def _bad_wgrad_calls():
    (aq, sa, bq, sb), residual, _ = _wgrad_case(32, 48, 256)
    out = residual.clone()
    f = gemm.wgrad_gemm_fp8_fp8_fp32_nt
    return [
        (lambda: f(aq.float(), sa, bq, sb, out), ValueError, "a: expected dtype float8_e4m3fn"),
        (lambda: f(aq, sa[:, :1], bq, sb, out), ValueError, "a_scale: expected shape [32, 2]"),
        (lambda: f(aq, sa, bq[:, :128], sb, out), ValueError, "b: expected K = 256"),
        (lambda: f(aq, sa, bq, torch.ones(1, 2), out), ValueError, "b_scale: expected shape [48, 2]"),
        (lambda: f(aq, sa, bq, sb, out.bfloat16()), ValueError, "out: expected dtype float32"),
        (lambda: f(aq, sa, bq, sb, out[:, :40]), ValueError, "out: expected shape [32, 48]"),
        (lambda: f(aq, sa, bq, sb, out.T.contiguous().T), ValueError, "out: expected unit stride"),
        (lambda: f(aq[:, :200], sa, bq[:, :200], sb, out), ValueError, "K: expected a multiple of 16, got 200"),
        (lambda: f(aq[:, 8:], sa, bq[:, 8:], sb, out), ValueError, "K: expected a multiple of 16"),
        (lambda: f(aq, sa, bq, sb, "out"), TypeError, "out: expected a torch.Tensor"),
    ]


def _bad_k_grouped_calls():
    ks = [128, 256]
    (a, sa, b, sb), _ = _k_grouped_case(16, 32, ks)
    out = torch.zeros(2, 16, 32)
    f = gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt
    return [
        (lambda: f(a, sa, b, sb, out, [128, 250]), ValueError, "ks[1]: expected a non-negative multiple of 16"),
        (lambda: f(a, sa, b, sb, out, [128, -16]), ValueError, "ks[1]: expected a non-negative multiple of 16"),
        (lambda: f(a, sa, b, sb, out, [128]), ValueError, "ks: expected 2 entries"),
        (lambda: f(a, sa, b, sb, out, [128, 128]), ValueError, "a: expected 16 * sum(ks) = 4096 elements"),
        (lambda: f(a, sa, b, sb, out, "128"), TypeError, "ks: expected a list of ints"),
        (lambda: f(a, sa, b, sb, out, torch.tensor([128.0, 256.0])), ValueError, "ks: expected a 1-D integer tensor"),
        (lambda: f(a, sa.T, b, sb, out, ks), ValueError, "a_scale: expected shape [3, 16]"),
        (lambda: f(a, sa, b, sb[:, :31], out, ks), ValueError, "b_scale: expected shape [3, 32]"),
        (lambda: f(a, sa, b.float(), sb, out, ks), ValueError, "b: expected dtype float8_e4m3fn"),
        (lambda: f(a, sa, b, sb, out.double(), ks), ValueError, "out: expected dtype float32"),
        (lambda: f(a, sa, b, sb, out[:, :, :16], ks), ValueError, "out: expected a contiguous tensor"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_wgrad_bad_inputs_raise_clear_errors(index):
    call, error, message = _bad_wgrad_calls()[index]
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize("index", range(11))
def test_k_grouped_bad_inputs_raise_clear_errors(index):
    call, error, message = _bad_k_grouped_calls()[index]
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_bad_input_leaves_out_untouched():
    (aq, sa, bq, sb), residual, _ = _wgrad_case(32, 48, 256)
    out = residual.clone()
    with pytest.raises(ValueError):
        gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb[:, :1], out)
    assert torch.equal(out, residual)


def _op_cases(device):
    (aq, sa, bq, sb), residual, _ = _wgrad_case(24, 40, 256, device)
    (a, sa2, b, sb2), _ = _k_grouped_case(16, 32, [128, 0, 144], device)
    return [
        (torch.ops.deepkernels.wgrad_gemm_fp8_fp8_fp32_nt, (aq, sa, bq, sb, residual.clone())),
        (torch.ops.deepkernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
         (a, sa2, b, sb2, torch.randn(3, 16, 32, device=device), [128, 0, 144])),
    ]


@pytest.mark.parametrize("index", range(2))
def test_opcheck(index):
    op, args = _op_cases("cpu")[index]
    opcheck(op, args)


def test_torch_compile_fullgraph_wgrad():
    (aq, sa, bq, sb), residual, _ = _wgrad_case(32, 48, 256)
    compiled = torch.compile(gemm.wgrad_gemm_fp8_fp8_fp32_nt, fullgraph=True, backend="aot_eager")
    got, want = residual.clone(), residual.clone()
    compiled(aq, sa, bq, sb, got)
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compat_helpers():
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == gemm.get_m_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_theoretical_mk_alignment_for_contiguous_layout(100) == 128
    sf = torch.randn(200, 3)
    t = deep_gemm.transform_sf_into_required_layout(sf, 200, 384, (1, 128, 128), is_sfa=True)
    assert t.stride() == (1, 200) and torch.equal(t, sf)
    t = deep_gemm.transform_sf_into_required_layout(sf, 200, 384, (1, 128))
    assert t.stride(0) == 1 and torch.equal(t, sf)
    sfb = torch.randn(2, 3)
    assert deep_gemm.transform_sf_into_required_layout(sfb, 200, 384, (1, 128, 128), is_sfa=False) is sfb
    with pytest.raises(ValueError, match="sf: expected shape"):
        deep_gemm.transform_sf_into_required_layout(sfb, 200, 384, (1, 128, 128), is_sfa=True)
    with pytest.raises(ValueError, match="is_sfa"):
        deep_gemm.transform_sf_into_required_layout(sf, 200, 384, (1, 128, 128))
    with pytest.raises(ValueError, match="recipe: expected granularity"):
        deep_gemm.transform_sf_into_required_layout(sf, 200, 384, (1, 32))
    with pytest.raises(ValueError, match="sf: expected dtype float32"):
        deep_gemm.transform_sf_into_required_layout(sf.int(), 200, 384, (1, 128))
    a, b = torch.randn(7, 64, dtype=torch.bfloat16), torch.randn(24, 64, dtype=torch.bfloat16)
    d = torch.empty(7, 24, dtype=torch.float32)
    c = torch.randn(7, 24)
    deep_gemm.bf16_gemm_nt(a, b, d, c=c)
    torch.testing.assert_close(d, a.float() @ b.float().T + c)
    d16 = torch.empty(7, 24, dtype=torch.bfloat16)
    deep_gemm.bf16_gemm_nt(a, b, d16)
    torch.testing.assert_close(d16, (a.float() @ b.float().T).bfloat16())
    with pytest.raises(ValueError, match="b: expected K = 64"):
        deep_gemm.bf16_gemm_nt(a, b[:, :32], d)


# ---------------------------------------------------------------------------------------------
# The CUDA kernel (wgrad_gemm_portable_kernel: sm_80/89/90) on the GPU or emulated, vs the reference.

def _emulated_launches() -> int:
    return deepkernels.emulator_stats()["kernels"].get("wgrad_gemm_portable_kernel", 0)


# Emulated shapes stay small (the emulator runs one fiber per CUDA thread).
KERNEL_SHAPES = [(64, 64, 128), (70, 33, 272), (1, 5, 16), (130, 72, 400), (65, 129, 256)]


@pytest.mark.parametrize("m, n, k", KERNEL_SHAPES)
def test_kernel_wgrad_matches_reference(kernel_device, m, n, k):
    (aq, sa, bq, sb), residual, want = _wgrad_case(m, n, k, kernel_device)
    out = residual.clone()
    before = _emulated_launches()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, out)
    if kernel_device == "cpu":
        assert _emulated_launches() == before + 1, "the emulated wgrad kernel did not run"
    ref = residual.cpu().clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), ref)
    got = out.cpu()
    assert not torch.isnan(got).any(), f"{(m, n, k)}: NaN in out"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3, msg=f"{(m, n, k)}: kernel vs reference")
    diff = calc_diff(got - residual.cpu(), want - residual.cpu()) if k >= 128 else 0.0
    assert diff < 1e-3, f"{(m, n, k)}: kernel vs unquantised calc_diff {diff:.2e}"


def test_kernel_wgrad_strided_views_and_col_major_scales(kernel_device):
    m, n, k = 48, 40, 256
    big_a = torch.randn(m, k + 64, dtype=torch.bfloat16, device=kernel_device)
    (aq_full, _), (bq, sb) = _per_token(big_a), _per_token(torch.randn(n, k, dtype=torch.bfloat16, device=kernel_device))
    aq = aq_full[:, 64:]  # row stride k + 64 (a multiple of 16), offset 64 bytes
    sa = torch.rand(m, 2, device=kernel_device) + 0.5
    sa_col = deep_gemm.get_col_major_tma_aligned_tensor(sa)
    out_big = torch.randn(m, n + 8, device=kernel_device)
    out = out_big[:, :n]  # row stride n + 8
    ref = out.cpu().clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), ref)
    padding = out_big[:, n:].clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa_col, bq, sb.T.contiguous().T, out)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(out_big[:, n:], padding), "columns past N were written"


def test_kernel_k_grouped_matches_reference(kernel_device):
    ks, m, n = [256, 0, 144, 16], 40, 72
    (a, sa, b, sb), want = _k_grouped_case(m, n, ks, kernel_device)
    residual = torch.randn(len(ks), m, n, device=kernel_device)
    out = residual.clone()
    before = _emulated_launches()
    gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, out, ks)
    if kernel_device == "cpu":
        assert _emulated_launches() == before + 3, "expected one emulated launch per non-empty group"
    ref = residual.cpu().clone()
    gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt_ref(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), ref, ks)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(out[1].cpu(), residual[1].cpu()), "group with K = 0 changed"
    for g in (0, 2, 3):
        diff = calc_diff(out[g].cpu() - residual[g].cpu(), want[g])
        assert diff < 1e-3, f"group {g}: calc_diff {diff:.2e}"


@pytest.mark.parametrize("index", range(2))
def test_kernel_opcheck(kernel_device, index):
    op, args = _op_cases(kernel_device)[index]
    opcheck(op, args)


def test_kernel_binding_refuses_bad_inputs_directly(kernel_device):
    """torch.ops.deepkernels.* bypasses the Python checks: the binding's own checks still refuse (no launch)."""
    (aq, sa, bq, sb), residual, _ = _wgrad_case(32, 48, 256, kernel_device)
    op = torch.ops.deepkernels.wgrad_gemm_fp8_fp8_fp32_nt
    before = _emulated_launches()
    for args, message in [((aq, sa, bq, sb[:, :1], residual), "b_scale"),
                          ((aq, sa, bq, sb, residual.bfloat16()), "out"),
                          ((aq[:, :200], sa, bq[:, :200], sb, residual), "K must be a multiple of 16")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    kop = torch.ops.deepkernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt
    (a, sa2, b, sb2), _ = _k_grouped_case(16, 32, [128], kernel_device)
    with pytest.raises(RuntimeError, match="ks"):
        kop(a, sa2, b, sb2, torch.zeros(1, 16, 32, device=kernel_device), [100])
    if kernel_device == "cpu":
        assert _emulated_launches() == before
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, residual)  # an emulated test must launch the kernel once


# ---------------------------------------------------------------------------------------------
# The Hopper (sm_90a) TMA/wgmma wgrad kernel: opt-in with DEEPKERNELS_GEMM_SM90=1, as the forward kernel; on the
# GPU only on sm_90, emulated everywhere (the emulator models an sm_90a device). Small emulated SM counts make
# CTAs walk several tiles so the ring's mbarrier phases wrap.

def _use_sm90(monkeypatch, kernel_device, sms: int = 4) -> None:
    if kernel_device == "cpu":
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(sms))
    elif not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the TMA/wgmma kernel is built for sm_90a only")
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")


def _launches(name: str) -> int:
    return deepkernels.emulator_stats()["kernels"].get(name, 0)


SM90_SHAPES = [(1, 16, 16), (65, 48, 144), (130, 72, 400), (200, 260, 640)]


@pytest.mark.parametrize("blocks", ["64x64", "64x128", "128x64", "128x128"])
@pytest.mark.parametrize("m, n, k", SM90_SHAPES)
def test_kernel_sm90_wgrad_matches_reference(kernel_device, m, n, k, blocks, monkeypatch):
    _use_sm90(monkeypatch, kernel_device)
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90_BLOCKS", blocks)
    (aq, sa, bq, sb), residual, want = _wgrad_case(m, n, k, kernel_device)
    sa = deep_gemm.get_col_major_tma_aligned_tensor(sa)  # DeepGEMM's layout on one side, row-major on the other
    out = residual.clone()
    before_sm90, before_portable = _launches("wgrad_gemm_sm90_kernel"), _emulated_launches()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, bq, sb, out)
    if kernel_device == "cpu":
        assert _launches("wgrad_gemm_sm90_kernel") == before_sm90 + 1, "the emulated sm90 wgrad kernel did not run"
        assert _emulated_launches() == before_portable, "the portable kernel ran instead"
    ref = residual.cpu().clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), ref)
    got = out.cpu()
    assert not torch.isnan(got).any(), f"{(m, n, k, blocks)}: NaN in out"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3, msg=f"{(m, n, k, blocks)}: sm90 kernel vs reference")
    if k >= 128:
        diff = calc_diff(got - residual.cpu(), want - residual.cpu())
        assert diff < 1e-3, f"{(m, n, k, blocks)}: vs unquantised calc_diff {diff:.2e}"


def test_kernel_sm90_k_grouped_and_views(kernel_device, monkeypatch):
    _use_sm90(monkeypatch, kernel_device, sms=2)
    ks, m, n = [256, 0, 144, 16], 40, 72
    (a, sa, b, sb), want = _k_grouped_case(m, n, ks, kernel_device)
    residual = torch.randn(len(ks), m, n, device=kernel_device)
    out = residual.clone()
    before = _launches("wgrad_gemm_sm90_kernel")
    gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, out, ks)
    if kernel_device == "cpu":
        assert _launches("wgrad_gemm_sm90_kernel") == before + 3
    ref = residual.cpu().clone()
    gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt_ref(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), ref, ks)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(out[1].cpu(), residual[1].cpu())
    # a row-strided operand view (stride k + 64) and an output view with padding columns
    big = torch.randn(48, 320, dtype=torch.bfloat16, device=kernel_device)
    aq_full, _ = _per_token(big)
    aq = aq_full[:, 64:]
    sa2 = torch.rand(48, 2, device=kernel_device) + 0.5
    bq, sb2 = _per_token(torch.randn(40, 256, dtype=torch.bfloat16, device=kernel_device))
    out_big = torch.randn(48, 48, device=kernel_device)
    padding = out_big[:, 40:].clone()
    ref2 = out_big[:, :40].cpu().clone()
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq.cpu(), sa2.cpu(), bq.cpu(), sb2.cpu(), ref2)
    gemm.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa2, bq, sb2, out_big[:, :40])
    torch.testing.assert_close(out_big[:, :40].cpu(), ref2, rtol=1e-5, atol=1e-3)
    assert torch.equal(out_big[:, 40:], padding), "columns past N were written"
