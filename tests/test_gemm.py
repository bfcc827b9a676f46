"""FP8 blockwise GEMMs: reference vs the unquantised product (calc_diff, DeepGEMM's metric) and vs an
independent per-K-block formulation; grouped layouts; errors; opcheck; compile; CUDA vs reference."""
import pytest
import torch

import deepkernels
import deepkernels.compat.deep_gemm as deep_gemm
from deepkernels import gemm
from deepkernels.nn import Fp8Linear
from deepkernels.testing import calc_diff, opcheck, poison_, reference

DSV3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
ODD_MNK = [(1, 16, 16), (5, 48, 80), (37, 272, 400), (130, 144, 1040), (0, 64, 128)]


def _operands(m, n, k, device="cpu", groups=None):
    lead = () if groups is None else (groups,)
    a = torch.randn(*lead, m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(*lead, n, k, device=device, dtype=torch.bfloat16)
    with reference():  # CPU operands come from the pure-torch casts in emulated tests too: only the GEMM is under test
        a_fp8, a_scale = deepkernels.per_token_cast_to_fp8(a)
        if groups is None:
            b_fp8, b_scale = deepkernels.per_block_cast_to_fp8(b)
        else:
            pairs = [deepkernels.per_block_cast_to_fp8(b[g]) for g in range(groups)]
            b_fp8, b_scale = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return a, b, (a_fp8, a_scale), (b_fp8, b_scale)


def _per_k_block_product(a_fp8, a_scale, b_fp8, b_scale):
    """Independent formulation: fp32 partial products per 128-wide K block, scaled and summed (DeepGEMM's promotion)."""
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(0, k, 128):
        partial = a_fp8[:, kb:kb + 128].double() @ b_fp8[:, kb:kb + 128].double().T
        sb = b_scale[:, kb // 128].double().repeat_interleave(128)[:n]
        acc += partial * a_scale[:, kb // 128].double()[:, None] * sb[None, :]
    return acc


@pytest.mark.parametrize("n, k", DSV3_NK)
def test_dense_deepseek_shapes_close_to_unquantised(n, k):
    m = 8
    a, b, (aq, sa), (bq, sb) = _operands(m, n, k)
    out = deepkernels.fp8_gemm_nt(aq, sa, bq, sb)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    diff = calc_diff(out, a.float() @ b.float().T)
    assert diff < 1e-3, f"m={m} n={n} k={k}: calc_diff {diff:.2e}"


@pytest.mark.parametrize("m, n, k", ODD_MNK)
def test_dense_odd_shapes_match_per_k_block_formulation(m, n, k):
    a, b, (aq, sa), (bq, sb) = _operands(m, n, k)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16))
    returned = deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    assert returned is out
    want = _per_k_block_product(aq, sa, bq, sb).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=8e-3, atol=1e-2, msg=f"{(m, n, k)}")
    if m:
        assert calc_diff(out, a.float() @ b.float().T) < 1e-3


def test_column_major_a_scale_gives_same_result():
    _, _, (aq, sa), (bq, sb) = _operands(40, 256, 384)
    col = deep_gemm.get_col_major_tma_aligned_tensor(sa)
    assert col.stride(0) == 1 and col.stride(1) == 40 and torch.equal(col, sa)
    torch.testing.assert_close(deepkernels.fp8_gemm_nt(aq, col, bq, sb), deepkernels.fp8_gemm_nt(aq, sa, bq, sb),
                               rtol=0, atol=0)


def _contiguous_case(group_rows, n=256, k=384, device="cpu"):
    align = deepkernels.get_m_alignment_for_contiguous_layout()
    segments = [((r + align - 1) // align) * align for r in group_rows]
    m = sum(segments)
    m_indices = torch.full((m,), -1, dtype=torch.int32)
    start = 0
    for g, (rows, seg) in enumerate(zip(group_rows, segments)):
        m_indices[start:start + rows] = g
        start += seg
    a, b, (aq, sa), (bq, sb) = _operands(m, n, k, groups=None)
    _, b, _, (bq, sb) = _operands(1, n, k, groups=len(group_rows))
    return a, b, aq.to(device), sa.to(device), bq.to(device), sb.to(device), m_indices.to(device)


@pytest.mark.parametrize("group_rows", [[128, 128, 128, 128], [5, 0, 130, 1], [0, 0, 3]])
def test_contiguous_grouped_matches_dense_per_group(group_rows):
    a, b, aq, sa, bq, sb, m_indices = _contiguous_case(group_rows)
    out = poison_(torch.empty(aq.size(0), bq.size(1), dtype=torch.bfloat16))
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_indices)
    for g in range(len(group_rows)):
        rows = (m_indices == g).nonzero().squeeze(1)
        if rows.numel():
            dense = deepkernels.fp8_gemm_nt(aq[rows], sa[rows], bq[g], sb[g])
            torch.testing.assert_close(out[rows], dense, rtol=8e-3, atol=1e-2)  # 1 bf16 ulp
            assert calc_diff(out[rows], a[rows].float() @ b[g].float().T) < 1e-3
    padding = m_indices == -1
    assert torch.all(out[padding] == 0), "padding rows (m_indices == -1) must be zero"


@pytest.mark.parametrize("masked", [[0, 64, 3, 17], [64, 64, 64, 64], [0, 0, 0, 0]])
def test_masked_grouped_valid_rows_and_untouched_rest(masked):
    groups, mmax, n, k = 4, 64, 160, 256
    a, b, (aq, sa), (bq, sb) = _operands(mmax, n, k, groups=groups)
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
    masked_m = torch.tensor(masked, dtype=torch.int32)
    deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, expected_m=32)
    for g, rows in enumerate(masked):
        if rows:
            dense = deepkernels.fp8_gemm_nt(aq[g, :rows], sa[g, :rows], bq[g], sb[g])
            torch.testing.assert_close(out[g, :rows], dense, rtol=8e-3, atol=1e-2)  # 1 bf16 ulp
        assert torch.isnan(out[g, rows:]).all(), f"group {g}: rows >= masked_m must stay untouched"


def test_bad_inputs_raise_clear_errors():
    _, _, (aq, sa), (bq, sb) = _operands(8, 256, 384)
    with pytest.raises(ValueError, match="a: expected dtype float8_e4m3fn, got bfloat16"):
        deepkernels.fp8_gemm_nt(aq.bfloat16(), sa, bq, sb)
    with pytest.raises(ValueError, match=r"a_scale: expected shape \[8, 3\], got \[8, 2\]"):
        deepkernels.fp8_gemm_nt(aq, sa[:, :2], bq, sb)
    with pytest.raises(ValueError, match=r"b: expected K = 384"):
        deepkernels.fp8_gemm_nt(aq, sa, bq[:, :256].contiguous(), sb)
    with pytest.raises(ValueError, match=r"b_scale: expected shape \[2, 3\]"):
        deepkernels.fp8_gemm_nt(aq, sa, bq, sb[:1])
    with pytest.raises(ValueError, match=r"b: expected N \(b.size\(-2\)\) a multiple of 16, got N = 200"):
        b200, s200 = deepkernels.per_block_cast_to_fp8(torch.randn(200, 384))
        deepkernels.fp8_gemm_nt(aq, sa, b200, s200)
    with pytest.raises(ValueError, match="out: expected dtype bfloat16, got float32"):
        deepkernels.fp8_gemm_nt(aq, sa, bq, sb, torch.empty(8, 256))
    with pytest.raises(ValueError, match=r"out: expected shape \[8, 256\]"):
        deepkernels.fp8_gemm_nt(aq, sa, bq, sb, torch.empty(8, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="b: expected a contiguous tensor"):
        deepkernels.fp8_gemm_nt(aq, sa, bq.t().contiguous().t(), sb)
    with pytest.raises(ValueError, match="expected a tensor on .* all tensors on one device"):
        deepkernels.fp8_gemm_nt(aq, sa.to("meta"), bq, sb)
    _, _, aq3, sa3, bq3, sb3, m_idx = _contiguous_case([5, 7])
    out = torch.empty(aq3.size(0), 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="m_indices: expected dtype int32, got int64"):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq3, sa3, bq3, sb3, out, m_idx.long())
    _, _, (ag, sag), (bg, sbg) = _operands(16, 64, 128, groups=2)
    outg = torch.empty(2, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"masked_m: expected shape \[2\]"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(ag, sag, bg, sbg, outg, torch.zeros(3, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="expected_m: expected an int >= 0, got -1"):
        deepkernels.m_grouped_fp8_gemm_nt_masked(ag, sag, bg, sbg, outg, torch.zeros(2, dtype=torch.int32), -1)


def _op_cases(device):
    _, _, (aq, sa), (bq, sb) = _operands(24, 128, 256, device)
    _, _, ac, sac, bc, sbc, m_idx = _contiguous_case([3, 130], n=64, k=128, device=device)
    _, _, (ag, sag), (bg, sbg) = _operands(16, 64, 128, device, groups=2)
    masked_m = torch.tensor([5, 16], dtype=torch.int32, device=device)
    return [
        (torch.ops.deepkernels.fp8_gemm_nt, (aq, sa, bq, sb, torch.zeros(24, 128, dtype=torch.bfloat16, device=device))),
        (torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous,
         (ac, sac, bc, sbc, torch.zeros(ac.size(0), 64, dtype=torch.bfloat16, device=device), m_idx)),
        (torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked,
         (ag, sag, bg, sbg, torch.zeros(2, 16, 64, dtype=torch.bfloat16, device=device), masked_m, 8)),
    ]


@pytest.mark.parametrize("index", range(3))
def test_opcheck(index):
    op, args = _op_cases("cpu")[index]
    opcheck(op, args)


def test_torch_compile_fullgraph_gemm_and_fp8_linear():
    _, _, (aq, sa), (bq, sb) = _operands(16, 128, 256)
    compiled = torch.compile(deepkernels.fp8_gemm_nt, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(aq, sa, bq, sb), deepkernels.fp8_gemm_nt(aq, sa, bq, sb), rtol=0, atol=0)
    layer = Fp8Linear.from_linear(torch.nn.Linear(256, 128, bias=True))
    x = torch.randn(3, 5, 256)
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_layer(x), layer(x), rtol=0, atol=0)


def test_deep_gemm_compat_entry_points():
    _, _, (aq, sa), (bq, sb) = _operands(32, 128, 256)
    out = torch.empty(32, 128, dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt((aq, deep_gemm.get_col_major_tma_aligned_tensor(sa)), (bq, sb), out)
    torch.testing.assert_close(out, deepkernels.fp8_gemm_nt(aq, sa, bq, sb), rtol=0, atol=0)
    assert deep_gemm.fp8_gemm_nt is deep_gemm.gemm_fp8_fp8_bf16_nt
    assert deep_gemm.ceil_div(129, 128) == 2 and deep_gemm.get_tma_aligned_size(5, 4) == 8
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == gemm.M_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT
    _, _, aq3, sa3, bq3, sb3, m_idx = _contiguous_case([5, 7], n=64, k=128)
    out3 = torch.empty(aq3.size(0), 64, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((aq3, sa3), (bq3, sb3), out3, m_idx)
    ref3 = torch.empty_like(out3)
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq3, sa3, bq3, sb3, ref3, m_idx)
    torch.testing.assert_close(out3, ref3, rtol=0, atol=0)
    _, _, (ag, sag), (bg, sbg) = _operands(16, 64, 128, groups=2)
    sag_col = deep_gemm.get_col_major_tma_aligned_tensor(sag)
    assert sag_col.stride(-2) == 1 and torch.equal(sag_col, sag)
    outg = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((ag, sag_col), (bg, sbg), outg, torch.tensor([4, 16], dtype=torch.int32), 8)
    assert calc_diff(outg[1], deepkernels.fp8_gemm_nt(ag[1], sag[1], bg[1], sbg[1])) < 1e-5


# ---------------------------------------------------------------------------------------------
# CUDA kernels vs the reference: each test takes `kernel_device` (tests/conftest.py): "cuda" on the GPU
# (skipped without one; `pytest -m cuda` on the GPU machine), or "cpu" with the same CUDA kernels run by the
# SIMT emulator (`pytest -m emu`). References are always the pure-torch `*_ref` functions, called directly.
# Shapes too large to emulate in reasonable time stay CUDA-only; smaller emulated stand-ins cover their kind.

def _case_id(value) -> str:
    return "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _device_cases(both, cuda_only=(), emu_only=()):
    """Parameters (kernel_device, *case) for ``parametrize(..., indirect=["kernel_device"])``: the ``both``
    cases on CUDA and emulated, ``cuda_only`` on CUDA alone, ``emu_only`` (stand-ins) emulated alone.
    A case is a tuple of the test's arguments, or a single value."""
    def param(device, case, mark):
        case = case if isinstance(case, tuple) else (case,)
        return pytest.param(device, *case, marks=mark, id="-".join([device, *map(_case_id, case)]))

    return ([param("cuda", c, pytest.mark.cuda) for c in (*both, *cuda_only)]
            + [param("emu", c, pytest.mark.emu) for c in (*both, *emu_only)])


def _emulated_kernels() -> dict:
    stats = deepkernels.emulator_stats()
    return {"ctas": stats["ctas"], **stats["kernels"]}


def _check_emulated(kernel_device, before: dict, **expected) -> None:
    """Under emulation: the emulated launches since ``before`` (_emulated_kernels()) are exactly ``expected``
    (``sm90`` / ``portable`` launches of the two GEMM kernels; ``ctas`` when given). Nothing on CUDA."""
    if kernel_device != "cpu":
        return
    now = _emulated_kernels()
    names = {"sm90": "fp8_gemm_sm90_kernel", "portable": "fp8_gemm_nt_portable_kernel", "ctas": "ctas",
             "reduce": "fp8_gemm_splitk_reduce_kernel"}
    for key, want in expected.items():
        got = now.get(names[key], 0) - before.get(names[key], 0)
        assert got == want, f"emulated {names[key]}: {got} since the call, expected {want}"


def _check_masked_m_0_half(kernel_device, a, b, want, label, **emulated) -> None:
    """The masked GEMM on three copies of a dense problem (a = (aq, sa), b = (bq, sb), want its reference) with
    masked_m = m, 0, m // 2: the valid rows match, rows >= masked_m[g] keep their poison, and the emulated
    launches are ``emulated`` (see _check_emulated)."""
    (aq, sa), (bq, sb) = a, b
    m, n = want.shape
    out3 = poison_(torch.empty(3, m, n, dtype=torch.bfloat16, device=kernel_device))
    masked_m = torch.tensor([m, 0, m // 2], dtype=torch.int32, device=kernel_device)
    before = _emulated_kernels()
    deepkernels.m_grouped_fp8_gemm_nt_masked(torch.stack([aq] * 3), torch.stack([sa] * 3), torch.stack([bq] * 3),
                                             torch.stack([sb] * 3), out3, masked_m, m)
    _check_emulated(kernel_device, before, **emulated)
    _check_against_reference(out3[0], want, (label, "masked group 0"))
    _check_against_reference(out3[2, :m // 2], want[:m // 2], (label, "masked group 2"))
    assert out3[1].isnan().all() and out3[2, m // 2:].isnan().all(), f"{label}: rows >= masked_m written"


DENSE_LARGE = [(4096, 7168, 2048), (64, 2112, 7168), (128, 24576, 1536), (1, 32768, 512)]


# M = 0 launches no kernel (nothing to emulate: an emulated test must launch one), so it stays CUDA-only.
@pytest.mark.parametrize("kernel_device, m, n, k", _device_cases(
    [c for c in ODD_MNK if c[0]], cuda_only=[c for c in ODD_MNK if not c[0]] + DENSE_LARGE,
    emu_only=[(64, 576, 2048), (200, 320, 1536)]), indirect=["kernel_device"])
def test_cuda_dense_matches_reference(kernel_device, m, n, k):
    a, b, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    want = torch.empty(m, n, dtype=torch.bfloat16)
    gemm.fp8_gemm_nt_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want)
    assert not torch.isnan(out).any(), f"{(m, n, k)}: NaN left in the output"
    if m:
        assert calc_diff(out.cpu(), want) < 1e-5, f"{(m, n, k)}: vs reference {calc_diff(out.cpu(), want):.2e}"
        assert calc_diff(out.float(), a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("kernel_device, group_rows", _device_cases(
    [[128, 128, 128, 128], [5, 0, 130, 1]], cuda_only=[[4000, 3000, 100, 0]], emu_only=[[300, 200, 10, 0]]),
    indirect=["kernel_device"])
def test_cuda_contiguous_matches_reference(kernel_device, group_rows):
    _, _, aq, sa, bq, sb, m_idx = _contiguous_case(group_rows, n=512, k=1024, device=kernel_device)
    out = poison_(torch.empty(aq.size(0), 512, dtype=torch.bfloat16, device=kernel_device))
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_idx)
    want = torch.empty(aq.size(0), 512, dtype=torch.bfloat16)
    gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want, m_idx.cpu())
    assert calc_diff(out.cpu(), want) < 1e-5 and torch.all(out[m_idx == -1] == 0)


@pytest.mark.cuda
def test_cuda_masked_graph_capture_no_host_sync():
    groups, mmax, n, k = 4, 256, 512, 1024
    _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, "cuda", groups=groups)
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device="cuda"))
    masked_m = torch.tensor([0, 256, 3, 100], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, 64)
    masked_m.copy_(torch.tensor([7, 0, 256, 1], dtype=torch.int32))
    graph.replay()
    want = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want, masked_m.cpu(), 64)
    for g, rows in enumerate([7, 0, 256, 1]):
        assert calc_diff(out[g, :rows].cpu(), want[g, :rows]) < 1e-5 if rows else True


def test_cuda_masked_m_on_device_matches_reference(kernel_device):
    """The graph-capture test's case without the capture (the emulator has no CUDA graphs): masked_m is a
    device tensor read by the kernel, rewritten in place between two calls as a graph replay would see it;
    valid rows match the reference, rows >= masked_m[g] stay untouched."""
    groups, mmax, n, k = 4, 256, 512, 1024
    _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, kernel_device, groups=groups)
    masked_m = torch.tensor([0, 256, 3, 100], dtype=torch.int32, device=kernel_device)
    for masked in ([0, 256, 3, 100], [7, 0, 256, 1]):
        masked_m.copy_(torch.tensor(masked, dtype=torch.int32))
        out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=kernel_device))
        deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, 64)
        want = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
        gemm.m_grouped_fp8_gemm_nt_masked_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want, masked_m.cpu(), 64)
        for g, rows in enumerate(masked):
            if rows:
                assert calc_diff(out[g, :rows].cpu(), want[g, :rows]) < 1e-5, f"{masked}: group {g}"
            assert out[g, rows:].isnan().all(), f"{masked}: group {g}: rows >= masked_m written"


@pytest.mark.parametrize("index", range(3))
def test_cuda_opcheck(kernel_device, index):
    op, args = _op_cases(kernel_device)[index]
    opcheck(op, args)


def test_cuda_ops_refuse_scales_without_a_slice_per_group(kernel_device):
    """The CUDA ops index scales (and masked_m) by group: called directly (torch.ops, no Python checks), too few
    scale slices or a strided masked_m are refused on the host, naming the argument, instead of read past;
    the same call with a slice per group runs."""
    _, _, (aq, sa), _ = _operands(128, 32, 256, kernel_device)
    _, _, _, (bq, sb) = _operands(1, 32, 256, kernel_device, groups=2)
    out = torch.empty(128, 32, dtype=torch.bfloat16, device=kernel_device)
    m_indices = torch.zeros(128, dtype=torch.int32, device=kernel_device)
    with pytest.raises(RuntimeError, match=r"b_scale: expected 2 groups"):
        torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb[:1].contiguous(), out, m_indices)
    a3, sa3 = torch.stack([aq, aq]), torch.stack([sa, sa])
    out3 = torch.empty(2, 128, 32, dtype=torch.bfloat16, device=kernel_device)
    masked_m = torch.full((2,), 128, dtype=torch.int32, device=kernel_device)
    with pytest.raises(RuntimeError, match=r"a_scale: expected 2 groups"):
        torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(a3, sa3[:1].contiguous(), bq, sb, out3, masked_m, 128)
    with pytest.raises(RuntimeError, match="masked_m: expected a contiguous int32"):
        torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(a3, sa3, bq, sb, out3, masked_m.repeat(2)[::2], 128)
    poison_(out)
    torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_indices)
    want = torch.empty(128, 32, dtype=torch.bfloat16)
    gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want, m_indices.cpu())
    assert not out.isnan().any() and calc_diff(out.cpu(), want) < 1e-5


def _check_all_padding_and_no_groups_write_zeros(device):
    _, _, (aq, sa), _ = _operands(128, 32, 256, device=device)
    _, _, _, (bq, sb) = _operands(1, 32, 256, device=device, groups=1)
    for b, s in ((bq, sb), (bq[:0], sb[:0])):
        out = poison_(torch.empty(128, 32, dtype=torch.bfloat16, device=device))
        m_indices = torch.full((128,), -1, dtype=torch.int32, device=device)
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, b.contiguous(), s.contiguous(), out, m_indices)
        assert (out == 0).all()


def test_contiguous_all_padding_and_no_groups_write_zeros(kernel_device):
    _check_all_padding_and_no_groups_write_zeros(kernel_device)


def test_contiguous_all_padding_and_no_groups_write_zeros_reference():
    _check_all_padding_and_no_groups_write_zeros("cpu")


# ---------------------------------------------------------------------------------------------
# The opt-in sm_90a kernel (DEEPKERNELS_GEMM_SM90=1; csrc/fp8_gemm/sm90.cuh, not yet run on a GPU):
# TMA ring + warp-specialised wgmma + persistent scheduler. Cases aimed at its edges: partial BLOCK_M /
# BLOCK_N / K tiles (TMA zero-fill, bounded stores), more tiles than SMs with K blocks enough to wrap the
# ring's mbarrier phases, both BLOCK_M choices of the heuristic, grouped modes resolved on the device,
# and layouts TMA cannot describe (portable fallback). References are computed on the device (pure torch).
# Emulated (the emulated device is an sm_90 one), each test also checks which kernel ran
# (emulator_stats), and stand-ins that must have more tiles than SMs shrink the device (EMU_SMS).
# If these fail while the portable CUDA tests pass, suspect in order: the 128B-swizzle descriptor /
# tensor-map pairing, the mbarrier parities, the accumulator row/column mapping of the epilogue.

# DEEPKERNELS_EMULATE_SMS for emulated stand-ins of the many-tiles cases: tiles > SMs at a size the
# emulator runs quickly, so the persistent loop takes several tiles per CTA and the ring phases wrap.
EMU_SMS = {(512, 512, 1024): 4, (300, 320, 1024): 4}
DEFAULT_EMU_SMS = 132


def _use_sm90_kernel(monkeypatch, kernel_device, case=None) -> int:
    """Route the GEMMs to the sm_90a kernel; returns the SM count of the device (emulated: as set here)."""
    if kernel_device == "cpu":
        sms = EMU_SMS.get(case, DEFAULT_EMU_SMS)
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(sms))
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the TMA/wgmma kernel is built for sm_90a only")
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    return sms


def _check_against_reference(out, want, case, valid=None):
    """out/want [.., M, N] on the device; every valid element written (no NaN left) and calc_diff tiny."""
    got = out if valid is None else out[valid]
    ref = want if valid is None else want[valid]
    assert not got.isnan().any(), f"{case}: NaN left in the output (tile not written)"
    if got.numel():
        diff = calc_diff(got.float(), ref.float())
        assert diff < 1e-5, f"{case}: calc_diff vs reference {diff:.2e}"


SM90_DENSE = [
    (1, 16, 16),         # one row, one 16-wide N tile, K = 16 inside a 128-wide TMA box
    (65, 48, 144),       # M just over BLOCK_M = 64, partial last K block
    (129, 272, 400),     # M just over BLOCK_M = 128, N not a multiple of 64
    (64, 2112, 7168),    # decode shape: BLOCK_N = 64 by the heuristic, 56 K blocks through the ring
    (300, 7168, 512),
]
SM90_DENSE_CUDA_ONLY = [
    (2048, 2048, 1024),  # 256 tiles > #SMs: persistent loop, ring phases wrap several times
]
SM90_DENSE_EMU_ONLY = [
    (512, 512, 1024),    # 16 tiles on 4 emulated SMs: persistent loop, ring phases wrap several times
]


@pytest.mark.parametrize("kernel_device, m, n, k", _device_cases(SM90_DENSE, SM90_DENSE_CUDA_ONLY, SM90_DENSE_EMU_ONLY),
                         indirect=["kernel_device"])
@pytest.mark.parametrize("col_major_scale", [False, True])
def test_cuda_sm90_dense_edges(kernel_device, m, n, k, col_major_scale, monkeypatch):
    _use_sm90_kernel(monkeypatch, kernel_device, (m, n, k))
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    if col_major_scale:
        sa = deep_gemm.get_col_major_tma_aligned_tensor(sa)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    _check_emulated(kernel_device, before, sm90=1, portable=0)
    want = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    _check_against_reference(out, want, (m, n, k, col_major_scale))


SM90_BLOCKS = ["64x64", "64x128", "128x64", "128x128"]  # every instantiation, whatever the heuristic picks


def _sm90_grid(blocks: str, groups: int, m: int, n: int, sms: int) -> int:
    block_m, block_n = map(int, blocks.split("x"))
    return min(groups * -(-m // block_m) * -(-n // block_n), sms)


@pytest.mark.parametrize("blocks", SM90_BLOCKS)
@pytest.mark.parametrize("kernel_device, m, n, k", _device_cases(
    [(1, 16, 16), (129, 272, 400)], cuda_only=[(1000, 1024, 2048)], emu_only=[(300, 320, 1024)]),
    indirect=["kernel_device"])
def test_cuda_sm90_every_block_shape(blocks, kernel_device, m, n, k, monkeypatch):
    sms = _use_sm90_kernel(monkeypatch, kernel_device, (m, n, k))
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90_BLOCKS", blocks)
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    # the CTA count (persistent grid = min(tiles, SMs)) shows the forced block shape was the one launched
    _check_emulated(kernel_device, before, sm90=1, portable=0, ctas=_sm90_grid(blocks, 1, m, n, sms))
    want = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    _check_against_reference(out, want, (blocks, m, n, k))
    # grouped modes on the same shape: masked (groups of m, 0 and m // 2 rows), contiguous (-1 tail rows)
    _check_masked_m_0_half(kernel_device, (aq, sa), (bq, sb), want, blocks, sm90=1, portable=0,
                           ctas=_sm90_grid(blocks, 3, m, n, sms))


# [0, 0] has M = 0: no kernel is launched (nothing to emulate), so it stays CUDA-only.
@pytest.mark.parametrize("kernel_device, group_rows", _device_cases(
    [[5, 0, 130, 1], [128, 128, 128, 128], [300, 3]], cuda_only=[[0, 0]]), indirect=["kernel_device"])
def test_cuda_sm90_contiguous_edges(kernel_device, group_rows, monkeypatch):
    _use_sm90_kernel(monkeypatch, kernel_device)
    _, _, aq, sa, bq, sb, m_idx = _contiguous_case(group_rows, n=144, k=272, device=kernel_device)
    out = poison_(torch.empty(aq.size(0), 144, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_idx)
    _check_emulated(kernel_device, before, sm90=1, portable=0)
    want = torch.empty_like(out)
    gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq, sa, bq, sb, want, m_idx)
    _check_against_reference(out, want, group_rows)
    assert torch.all(out[m_idx == -1] == 0), f"{group_rows}: padding rows must be zero"


@pytest.mark.parametrize("masked, expected_m", [
    ([0, 5, 64, 1], 16),       # BLOCK_M = 64, an empty group first
    ([0, 0, 0, 0], 8),         # nothing to do: no tile, output untouched
    ([300, 0, 257, 128], 256),  # BLOCK_M = 128, a full group, partial tiles
    ([7, 300, 0, 65], 0),      # no hint: the tile shape comes from Mmax
])
def test_cuda_sm90_masked_edges(kernel_device, masked, expected_m, monkeypatch):
    _use_sm90_kernel(monkeypatch, kernel_device)
    groups, mmax, n, k = 4, 300, 272, 400
    _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, kernel_device, groups=groups)
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=kernel_device))
    masked_m = torch.tensor(masked, dtype=torch.int32, device=kernel_device)
    before = _emulated_kernels()
    deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, expected_m)
    _check_emulated(kernel_device, before, sm90=1, portable=0)
    want = poison_(torch.empty_like(out))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, expected_m)
    valid = torch.arange(mmax, device=kernel_device)[None, :] < masked_m[:, None]
    _check_against_reference(out, want, (masked, expected_m), valid)
    assert out[~valid].isnan().all(), f"{masked}: rows >= masked_m[g] must stay untouched"


def test_cuda_sm90_views_and_fallback(kernel_device, monkeypatch):
    """A 16-byte (not 128-byte) aligned view with a padded row stride goes through TMA; a broadcast
    (stride-0) group dim that no tensor map can describe falls back to the portable kernel; an 8-byte
    offset is copied by the wrapper (the reference takes it, so every path does)."""
    _use_sm90_kernel(monkeypatch, kernel_device)
    m, n, k = 100, 144, 272
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    want = torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    wide = torch.zeros(m, k + 64, dtype=aq.dtype, device=kernel_device)
    wide[:, 16:16 + k] = aq
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(wide[:, 16:16 + k], sa, bq, sb, out)
    _check_emulated(kernel_device, before, sm90=1, portable=0)
    _check_against_reference(out, want, "a view at +16 bytes, row stride k + 64")

    groups = 3
    a_bcast, sa_bcast = aq[None].expand(groups, m, k), sa[None].expand(groups, m, sa.size(1))
    b_g, sb_g = torch.stack([bq] * groups), torch.stack([sb] * groups)
    out3 = poison_(torch.empty(groups, m, n, dtype=torch.bfloat16, device=kernel_device))
    masked_m = torch.tensor([m, 0, m // 3], dtype=torch.int32, device=kernel_device)
    before = _emulated_kernels()
    deepkernels.m_grouped_fp8_gemm_nt_masked(a_bcast, sa_bcast, b_g, sb_g, out3, masked_m, m)
    _check_emulated(kernel_device, before, sm90=0, portable=1)
    _check_against_reference(out3[0], want, "broadcast a, group 0")
    _check_against_reference(out3[2, :m // 3], want[:m // 3], "broadcast a, group 2")
    assert out3[1].isnan().all() and out3[2, m // 3:].isnan().all()

    # An 8-byte offset no kernel can read: the wrapper copies the operand once (the same inputs run on every path).
    wide[:, 8:8 + k] = aq
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(wide[:, 8:8 + k], sa, bq, sb, out)
    _check_emulated(kernel_device, before, sm90=1, portable=0)
    _check_against_reference(out, want, "a view at +8 bytes (copied)")


@pytest.mark.parametrize("kernel_device, m, n, k", _device_cases(
    [(1, 2112, 7168), (77, 144, 400)], cuda_only=[(4096, 7168, 2048)], emu_only=[(256, 512, 2048)]),
    indirect=["kernel_device"])
def test_cuda_sm90_wgmma_kernel_opt_in(kernel_device, m, n, k, monkeypatch):
    """DEEPKERNELS_GEMM_SM90=1 routes the dense and masked ops to the sm_90a kernel (not yet run on a GPU)
    on DeepSeek-V3-like shapes, checked against the independent per-K-block formulation."""
    _use_sm90_kernel(monkeypatch, kernel_device)
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, device=kernel_device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    want = _per_k_block_product(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu())
    assert not out.isnan().any(), "some output tiles were not written"
    assert calc_diff(out.cpu(), want) < 1e-5
    out3 = poison_(torch.empty(2, m, n, dtype=torch.bfloat16, device=kernel_device))
    masked_m = torch.tensor([m, m // 2], dtype=torch.int32, device=kernel_device)
    deepkernels.m_grouped_fp8_gemm_nt_masked(torch.stack([aq, aq]), torch.stack([sa, sa]), torch.stack([bq, bq]),
                                             torch.stack([sb, sb]), out3, masked_m, m)
    _check_emulated(kernel_device, before, sm90=2, portable=0)
    assert calc_diff(out3[0].cpu(), want) < 1e-5 and out3[1, m // 2:].isnan().all()
    if m // 2:
        assert calc_diff(out3[1, :m // 2].cpu(), want[:m // 2]) < 1e-5


# ---------------------------------------------------------------------------------------------
# Launch plans (issue 15): explain() mirrors csrc/fp8_gemm/heuristic.h; the heuristic keeps the SMs busy on the
# DeepSeek-V3 shapes at decode sizes; DEEPKERNELS_GEMM_CONFIG selects every variant (narrow BLOCK_N, split-K,
# ring depth), each checked against the reference under the emulator; the tuning table is consulted.

def _native_module():
    import sys
    module = sys.modules.get("deepkernels._emu") or sys.modules.get("deepkernels._C")
    assert module is not None and hasattr(module, "gemm_plan"), "no compiled extension with gemm_plan"
    return module


PLAN_KEYS = ("kernel", "block_m", "block_n", "split_k", "stages", "overlap", "tma_store", "units", "ctas", "source")


@pytest.mark.parametrize("kind", ["dense", "contiguous", "masked"])
def test_explain_mirrors_the_native_heuristic(kind, monkeypatch):
    """explain(kernel="sm90") == heuristic.h's plan_sm90 (through the extension) over a grid of problems."""
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.delenv("DEEPKERNELS_GEMM_SM90_BLOCKS", raising=False)
    _native_module()
    checked = split = 0
    for m in (1, 16, 63, 64, 65, 128, 129, 300, 4096):
        for n, k in [(16, 16), (144, 400), (2112, 7168), (7168, 16384), (32768, 512), (4096, 2048)]:
            for groups in ((1,) if kind == "dense" else (1, 4)):
                for sms in (4, 78, 132):
                    for expected in ((None, 1, 100) if kind == "masked" else (None,)):
                        got = gemm.native_plan(m, n, k, groups, sms, kind, expected)
                        want = gemm.explain(m, n, k, groups, sms, kind, expected, kernel="sm90")
                        assert {key: want[key] for key in PLAN_KEYS} == got, (m, n, k, groups, sms, expected)
                        assert want["workspace_bytes"] <= 128 << 20, want  # the heuristic's split-K cap
                        checked += 1
                        split += want["split_k"] > 1
    assert checked > 100
    assert split > 0, f"no {kind} problem of the grid is split: the mirror of split-K is not exercised"


@pytest.mark.parametrize("n, k", DSV3_NK)
@pytest.mark.parametrize("m", [16, 64, 128])
def test_heuristic_keeps_sms_busy_on_deepseek_shapes(m, n, k, monkeypatch):
    """Issue 15: on every DeepSeek-V3 GEMM shape at M in {16, 64, 128}, >= 80% of the 132 SMs busy."""
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.delenv("DEEPKERNELS_GEMM_SM90_BLOCKS", raising=False)
    plan = gemm.explain(m, n, k, num_sms=132, kernel="sm90")
    assert plan["sm_utilisation"] >= 0.8, plan
    assert plan["ctas"] >= 0.8 * 132, plan
    assert plan["units"] == plan["split_k"] * -(-m // plan["block_m"]) * -(-n // plan["block_n"])


def test_explain_portable_and_argument_errors(monkeypatch):
    monkeypatch.delenv("DEEPKERNELS_GEMM_SM90", raising=False)
    plan = gemm.explain(100, 144, 400)
    assert plan["kernel"] == "portable" and plan["ctas"] == 2 * 3 and plan["split_k"] == 1
    assert gemm.explain(100, 144, 400, num_groups=3, kind="masked")["ctas"] == 3 * 2 * 3
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    assert gemm.explain(100, 144, 400)["kernel"] == "sm90"
    with pytest.raises(ValueError, match="^kind: expected one of"):
        gemm.explain(1, 16, 16, kind="grouped")
    with pytest.raises(ValueError, match="^n: expected"):
        gemm.explain(1, 8, 16)
    with pytest.raises(TypeError, match="^m: expected"):
        gemm.explain(1.5, 16, 16)
    with pytest.raises(ValueError, match="^kernel: expected"):
        gemm.explain(1, 16, 16, kernel="cutlass")


BAD_CONFIGS = [
    ("64,16", 'DEEPKERNELS_GEMM_CONFIG: expected "block_m,block_n,split_k[,stages[,overlap[,tma_store]]]" '
              '(integers), got "64,16"'),
    ("64,x,1", 'DEEPKERNELS_GEMM_CONFIG: expected "block_m,block_n,split_k[,stages[,overlap[,tma_store]]]" '
               '(integers), got "64,x,1"'),
    ("64,16,1,0,1,1,0", 'DEEPKERNELS_GEMM_CONFIG: expected "block_m,block_n,split_k[,stages[,overlap[,tma_store]]]" '
                        '(integers), got "64,16,1,0,1,1,0"'),
    ("64,16,1,0,0,2", "DEEPKERNELS_GEMM_CONFIG: expected tma_store 0 or 1, got 2"),
    ("64,64,2,0,0,1", "DEEPKERNELS_GEMM_CONFIG: expected tma_store 0 with split_k > 1 (split-K stores fp32 slices to "
                      "its workspace), got 1"),
    ("128,128,1,7,0,1", "DEEPKERNELS_GEMM_CONFIG: expected stages in [2, 6] for 128x128 tiles with the TMA-store "
                        "epilogue (or 0 = the most that fit), got 7"),
    ("64,16,1,0,2", "DEEPKERNELS_GEMM_CONFIG: expected overlap 0 or 1, got 2"),
    ("128,128,1,0,1", "DEEPKERNELS_GEMM_CONFIG: expected overlap 0 for 128x128 tiles (two accumulator sets do not "
                      "fit its registers), got 1"),
    ("128,16,1", "DEEPKERNELS_GEMM_CONFIG: expected block_m,block_n one of 64,16 64,32 64,64 64,128 128,64 128,128, "
                 "got 128,16"),
    ("64,64,5", "DEEPKERNELS_GEMM_CONFIG: expected split_k in [1, ceil(K/128) = 4], got 5"),
    ("64,64,0", "DEEPKERNELS_GEMM_CONFIG: expected split_k in [1, ceil(K/128) = 4], got 0"),
    ("128,128,1,8", "DEEPKERNELS_GEMM_CONFIG: expected stages in [2, 7] for 128x128 tiles (or 0 = the most that "
                    "fit), got 8"),
    ("64,64,1,1", "DEEPKERNELS_GEMM_CONFIG: expected stages in [2, 8] for 64x64 tiles (or 0 = the most that fit), "
                  "got 1"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_gemm_config_env_errors(text, message, monkeypatch):
    """A bad DEEPKERNELS_GEMM_CONFIG: explain() raises ValueError, the emulated op RuntimeError, same message,
    nothing launched, out untouched."""
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", text)
    with pytest.raises(ValueError) as info:
        gemm.explain(16, 64, 512, kernel="sm90")
    assert str(info.value) == message
    _, _, (aq, sa), (bq, sb) = _operands(16, 64, 512)
    out = poison_(torch.empty(16, 64, dtype=torch.bfloat16))
    before = _emulated_kernels()
    with deepkernels.emulate(), pytest.raises(RuntimeError) as info:
        deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    assert message in str(info.value)
    _check_emulated("cpu", before, sm90=0, portable=0)
    assert out.isnan().all()


def test_gemm_config_split_k_for_grouped(monkeypatch):
    """Split-K runs in every mode: a forced split is taken for masked and contiguous as for dense (explain == the
    C++ plan), with the workspace the launch allocates ([split, G, Mmax, N] fp32 for masked, [split, M, N]
    otherwise); the limit kept in every mode: split_k <= ceil(K/128)."""
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", "64,64,2")
    for kind, groups, workspace in (("masked", 3, 2 * 3 * 64 * 80 * 4), ("contiguous", 3, 2 * 64 * 80 * 4),
                                    ("dense", 1, 2 * 64 * 80 * 4)):
        plan = gemm.explain(64, 80, 512, num_groups=groups, kind=kind, kernel="sm90")
        assert (plan["split_k"], plan["source"], plan["workspace_bytes"]) == (2, "env", workspace), (kind, plan)
        assert plan["units"] == 2 * (groups if kind == "masked" else 1) * 2, (kind, plan)
        native = gemm.native_plan(64, 80, 512, groups, 132, kind)
        assert _keys(native) == _keys(plan), kind
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", "64,64,5")
    message = "DEEPKERNELS_GEMM_CONFIG: expected split_k in [1, ceil(K/128) = 4], got 5"
    for kind in ("masked", "contiguous"):
        with pytest.raises(ValueError) as info:
            gemm.explain(64, 80, 512, num_groups=2, kind=kind, kernel="sm90")
        assert str(info.value) == message
        with pytest.raises(ValueError) as info:
            gemm.native_plan(64, 80, 512, 2, 132, kind)
        assert str(info.value) == message


def test_heuristic_splits_grouped_gemms_that_leave_sms_idle(monkeypatch):
    """The heuristic splits K in the grouped modes too, with the dense cost model: only while the tiles (masked:
    counted from expected_m, as the tile shape is) do not fill the SMs, and only while the workspace (masked: Mmax
    rows of every group, masked_m being on the device) stays <= 128 MiB."""
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.delenv("DEEPKERNELS_GEMM_SM90_BLOCKS", raising=False)
    cap = 128 << 20
    # 2 experts x ~16 tokens of DeepSeek-V3's (N=2112, K=7168): 2 x 17 tiles of 64x128 on 132 SMs -> K slices
    small = gemm.explain(256, 2112, 7168, num_groups=2, kind="masked", expected_m=16, kernel="sm90")
    assert small["split_k"] > 1 and small["workspace_bytes"] == small["split_k"] * 2 * 256 * 2112 * 4, small
    contiguous = gemm.explain(256, 2112, 7168, num_groups=2, kind="contiguous", kernel="sm90")
    assert contiguous["split_k"] > 1 and contiguous["sm_utilisation"] >= 0.8, contiguous
    # the same experts with Mmax 8192: one slice is 2 x 8192 x 2112 x 4 bytes, two would pass the cap -> no split
    assert gemm.split_workspace_bytes("masked", 8192, 2112, 2, 2) > cap
    big = gemm.explain(8192, 2112, 7168, num_groups=2, kind="masked", expected_m=16, kernel="sm90")
    assert big["split_k"] == 1 and big["workspace_bytes"] == 0, big
    # 32 experts fill the SMs without splitting
    full = gemm.explain(256, 4096, 7168, num_groups=32, kind="masked", expected_m=16, kernel="sm90")
    assert full["split_k"] == 1, full
    for args in ((256, 2112, 7168, 2, 132, "masked", 16), (8192, 2112, 7168, 2, 132, "masked", 16),
                 (256, 2112, 7168, 2, 132, "contiguous", None)):
        plan = gemm.explain(*args, kernel="sm90")
        assert _keys(plan) == _keys(gemm.native_plan(*args)), args
        assert plan["workspace_bytes"] <= cap


# Split-K in the grouped modes, forced (DEEPKERNELS_GEMM_CONFIG): every block shape, split 2..8, K = 1040 = 9 K blocks
# with a partial last one, so the slices are uneven or empty (5+4, 3+3+3, 3+3+3+0, 2+2+2+2+1, ..., 2+2+2+2+1+0+0+0),
# the overlapped promotion and a 2-stage ring too. Each result: the reference on the valid rows, the unquantised
# product, untouched (masked) / zero / NaN (contiguous) rows, two runs bit-identical, and split 1 on the same tiles.
GROUPED_SPLIT_CONFIGS = ["64,16,2", "64,32,3", "64,64,4,2", "64,128,5", "128,64,6", "128,128,7", "64,64,8",
                         "64,32,2,2,1", "64,128,3,0,1", "128,64,4,0,1"]
GROUPED_SPLIT_K = 1040


def _keys(plan: dict) -> dict:
    return {key: plan[key] for key in PLAN_KEYS}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _run_twice(kernel_device, call, out_shape, expect_reduce: bool):
    """Two calls on fresh poisoned outputs; returns both (emulated: each launched the sm_90a kernel + the reduce)."""
    outs = []
    for _ in range(2):
        out = poison_(torch.empty(out_shape, dtype=torch.bfloat16, device=kernel_device))
        before = _emulated_kernels()
        call(out)
        _check_emulated(kernel_device, before, sm90=1, portable=0, reduce=int(expect_reduce))
        outs.append(out)
    return outs


@pytest.mark.parametrize("config", GROUPED_SPLIT_CONFIGS)
@pytest.mark.parametrize("kernel_device, masked", _device_cases(
    [[0, 5, 130, 67], [130, 130, 130, 130], [0, 0, 0, 0], [1, 0, 64, 129]]), indirect=["kernel_device"])
def test_cuda_sm90_masked_split_k(config, kernel_device, masked, monkeypatch):
    sms = _use_sm90_kernel(monkeypatch, kernel_device)
    groups, mmax, n, k = 4, 130, 80, GROUPED_SPLIT_K
    a, b, (aq, sa), (bq, sb) = _operands(mmax, n, k, kernel_device, groups=groups)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=kernel_device)
    expected_m = 64

    def call(out):
        deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, expected_m)

    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", config)
    first, second = _run_twice(kernel_device, call, (groups, mmax, n), True)
    plan = gemm.explain(mmax, n, k, groups, sms, "masked", expected_m, kernel="sm90")
    assert plan["split_k"] == int(config.split(",")[2])
    assert plan["workspace_bytes"] == plan["split_k"] * groups * mmax * n * 4
    assert _keys(plan) == _keys(gemm.last_launch_plan())
    valid = torch.arange(mmax, device=kernel_device)[None, :] < masked_m[:, None]
    assert first[~valid].isnan().all(), f"{config} {masked}: rows >= masked_m[g] must stay untouched"
    assert torch.equal(_bits(first), _bits(second)), f"{config} {masked}: two runs differ (not deterministic)"
    want = poison_(torch.empty_like(first))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, expected_m)
    _check_against_reference(first, want, (config, masked), valid)
    if valid.any():
        exact = torch.einsum("gmk,gnk->gmn", a.float(), b.float())
        diff = calc_diff(first[valid].float(), exact[valid])
        assert diff < 1e-3, f"{config} {masked}: calc_diff vs the unquantised product {diff:.2e}"
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", ",".join(config.split(",")[:2] + ["1"]))
    unsplit = _run_twice(kernel_device, call, (groups, mmax, n), False)[0]
    torch.testing.assert_close(first[valid], unsplit[valid], rtol=8e-3, atol=1e-2, msg=f"{config} vs split 1")


def _contiguous_bad_ids_case(n, k, device):
    """m_indices over 4 x 128 rows, G = 3, the same outcome for BLOCK_M 64 and 128: group 1 (100 rows, then -1);
    group 0 (60 rows, then an id >= G, a foreign id 2, then -1); a block whose first id is out of range (NaN rows,
    -1 rows zero); group 2 in full. Returns operands, m_indices and the expected kind of each row."""
    ids = [1] * 100 + [-1] * 28
    ids += [0] * 60 + [5, 2] + [-1] * 66
    ids += [7] + [2] * 43 + [-1] * 84
    ids += [2] * 128
    m_indices = torch.tensor(ids, dtype=torch.int32)
    nan_rows = torch.zeros(len(ids), dtype=torch.bool)
    nan_rows[[188, 189, *range(256, 300)]] = True
    a, _, (aq, sa), _ = _operands(len(ids), n, k)
    _, b, _, (bq, sb) = _operands(1, n, k, groups=3)
    return a, b, aq.to(device), sa.to(device), bq.to(device), sb.to(device), m_indices.to(device), nan_rows


@pytest.mark.parametrize("config", GROUPED_SPLIT_CONFIGS)
@pytest.mark.parametrize("kernel_device", _device_cases([()]), indirect=["kernel_device"])
def test_cuda_sm90_contiguous_split_k(config, kernel_device, monkeypatch):
    """Contiguous under split-K: each row its group's product, 0 for padding (-1), NaN for an id the tile does not
    compute (out of [0, G), foreign to the tile's group), as the split-1 epilogue writes (trusted m_indices)."""
    sms = _use_sm90_kernel(monkeypatch, kernel_device)
    n, k = 80, GROUPED_SPLIT_K
    a, b, aq, sa, bq, sb, m_idx, nan_rows = _contiguous_bad_ids_case(n, k, kernel_device)
    m = aq.size(0)

    def call(out):
        deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_idx)

    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", config)
    first, second = _run_twice(kernel_device, call, (m, n), True)
    plan = gemm.explain(m, n, k, 3, sms, "contiguous", kernel="sm90")
    assert plan["split_k"] == int(config.split(",")[2]) and plan["workspace_bytes"] == plan["split_k"] * m * n * 4
    assert _keys(plan) == _keys(gemm.last_launch_plan())
    assert torch.equal(_bits(first), _bits(second)), f"{config}: two runs differ (not deterministic)"
    got, ids = first.cpu(), m_idx.cpu()
    assert got[nan_rows].isnan().all(), f"{config}: rows with an id the tile does not compute must be NaN"
    assert (got[ids == -1] == 0).all(), f"{config}: padding rows must be zero"
    for g in range(3):
        rows = ((ids == g) & ~nan_rows).nonzero().squeeze(1)
        want = torch.empty(rows.numel(), n, dtype=torch.bfloat16)
        gemm.fp8_gemm_nt_ref(aq.cpu()[rows], sa.cpu()[rows], bq.cpu()[g], sb.cpu()[g], want)
        _check_against_reference(got[rows], want, (config, "group", g))
        diff = calc_diff(got[rows].float(), a[rows].float() @ b[g].float().T)
        assert diff < 1e-3, f"{config} group {g}: calc_diff vs the unquantised product {diff:.2e}"
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", ",".join(config.split(",")[:2] + ["1"]))
    unsplit = _run_twice(kernel_device, call, (m, n), False)[0].cpu()
    assert torch.equal(unsplit.isnan(), got.isnan()), f"{config}: NaN rows differ from split 1"
    torch.testing.assert_close(got, unsplit, rtol=8e-3, atol=1e-2, equal_nan=True, msg=f"{config} vs split 1")


# The heuristic's own split of grouped problems on a small emulated device (masked: from expected_m; contiguous).
@pytest.mark.parametrize("kernel_device, kind, m, n, k, sms", _device_cases(
    [("masked", 64, 64, 2048, 16), ("contiguous", 256, 64, 2048, 16), ("masked", 200, 48, 1536, 8)]),
    indirect=["kernel_device"])
def test_cuda_sm90_grouped_split_k_heuristic(kernel_device, kind, m, n, k, sms, monkeypatch):
    device_sms = _use_sm90_kernel(monkeypatch, kernel_device)
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    if kernel_device == "cpu":
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(sms))
    else:
        sms = device_sms
    groups, expected_m = 2, 16
    if kind == "masked":
        a, b, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device, groups=groups)
        masked_m = torch.tensor([min(m, 21), min(m, 9)], dtype=torch.int32, device=kernel_device)
        shape = (groups, m, n)

        def call(out):
            deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, expected_m)
        want = poison_(torch.empty(shape, dtype=torch.bfloat16, device=kernel_device))
        gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, expected_m)
        valid = torch.arange(m, device=kernel_device)[None, :] < masked_m[:, None]
    else:
        _, _, aq, sa, bq, sb, m_idx = _contiguous_case([100, 128], n=n, k=k, device=kernel_device)
        shape = (aq.size(0), n)

        def call(out):
            deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_idx)
        want = torch.empty(shape, dtype=torch.bfloat16, device=kernel_device)
        gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq, sa, bq, sb, want, m_idx)
        valid = None
    plan = gemm.explain(m if kind == "masked" else aq.size(0), n, k, groups, sms, kind, expected_m, kernel="sm90")
    assert kernel_device != "cpu" or plan["split_k"] > 1, f"the heuristic should split this case: {plan}"
    before = _emulated_kernels()
    first, second = _run_twice(kernel_device, call, shape, plan["split_k"] > 1)
    assert _keys(plan) == _keys(gemm.last_launch_plan())
    if kernel_device == "cpu":
        rows = min(m, expected_m) if kind == "masked" else aq.size(0)
        g = groups if kind == "masked" else 1
        reduce_ctas = g * min(-(-rows * n // 2 // 256), -(-4 * sms // g))
        assert _emulated_kernels()["ctas"] - before["ctas"] == 2 * (plan["ctas"] + reduce_ctas)
    assert torch.equal(_bits(first), _bits(second)), f"{kind}: two runs differ (not deterministic)"
    _check_against_reference(first, want, (kind, m, n, k, plan), valid)
    if valid is not None:
        assert first[~valid].isnan().all(), "rows >= masked_m[g] must stay untouched"
    else:
        assert (first[m_idx == -1] == 0).all()


@pytest.mark.parametrize("kernel_device, config", _device_cases(["64,32,3", "128,64,2,0,1"]),
                         indirect=["kernel_device"])
def test_cuda_sm90_split_k_strided_out(kernel_device, config, monkeypatch):
    """Split-K into views with padded row and group strides, through the ops (the public wrappers take contiguous
    outs; the binding takes strided ones, and the reduce writes bf16 pairs through out's strides): values match the
    reference, the padding around the views and (masked) rows past masked_m keep their poison."""
    _use_sm90_kernel(monkeypatch, kernel_device)
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", config)
    groups, mmax, n, k = 3, 70, 48, GROUPED_SPLIT_K
    _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, kernel_device, groups=groups)
    masked_m = torch.tensor([70, 0, 33], dtype=torch.int32, device=kernel_device)
    big = poison_(torch.empty(groups + 1, mmax + 5, n + 32, dtype=torch.bfloat16, device=kernel_device))
    out = big[1:, 2:2 + mmax, 16:16 + n]
    before = _emulated_kernels()
    torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, 32)
    _check_emulated(kernel_device, before, sm90=1, portable=0, reduce=1)
    want = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=kernel_device))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, 32)
    valid = torch.arange(mmax, device=kernel_device)[None, :] < masked_m[:, None]
    _check_against_reference(out, want, (config, "masked, strided out"), valid)
    inside = torch.zeros_like(big, dtype=torch.bool)
    inside[1:, 2:2 + mmax, 16:16 + n] = valid[:, :, None]
    assert big[~inside].isnan().all(), f"{config}: masked split-K wrote outside the valid rows of the view"

    _, _, aq, sa, bq, sb, m_idx = _contiguous_case([100, 0, 20], n=n, k=k, device=kernel_device)
    m = aq.size(0)
    big = poison_(torch.empty(m + 3, n + 16, dtype=torch.bfloat16, device=kernel_device))
    out = big[1:1 + m, 8:8 + n]
    before = _emulated_kernels()
    torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, m_idx)
    _check_emulated(kernel_device, before, sm90=1, portable=0, reduce=1)
    want = torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device)
    gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq, sa, bq, sb, want, m_idx)
    _check_against_reference(out, want, (config, "contiguous, strided out"))
    inside = torch.zeros_like(big, dtype=torch.bool)
    inside[1:1 + m, 8:8 + n] = True
    assert big[~inside].isnan().all(), f"{config}: contiguous split-K wrote outside the view"


@pytest.mark.cuda
def test_cuda_sm90_masked_split_k_graph_capture(monkeypatch):
    """Split-K in the masked mode stays host-sync free: captured in a CUDA graph (workspace from the graph's pool),
    replayed after masked_m changed on the device."""
    _use_sm90_kernel(monkeypatch, "cuda")
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", "64,64,4")
    groups, mmax, n, k = 4, 256, 512, 2048
    _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, "cuda", groups=groups)
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device="cuda"))
    masked_m = torch.tensor([0, 256, 3, 100], dtype=torch.int32, device="cuda")
    deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, 64)  # warm-up outside the capture
    poison_(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, 64)
    assert gemm.last_launch_plan()["split_k"] == 4
    masked_m.copy_(torch.tensor([7, 0, 256, 1], dtype=torch.int32))
    poison_(out)
    graph.replay()
    want = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), want, masked_m.cpu(), 64)
    for g, rows in enumerate([7, 0, 256, 1]):
        if rows:
            assert calc_diff(out[g, :rows].cpu(), want[g, :rows]) < 1e-5, f"group {g}"
        assert out[g, rows:].isnan().all(), f"group {g}: rows >= masked_m written"


# Every sm_90a variant through DEEPKERNELS_GEMM_CONFIG: narrow BLOCK_N, split-K (with an uneven last slice),
# shallow rings. Shapes: partial M / N / K tiles; 9 K blocks so the splits are 3 + 3 + 3, 5 + 4, 3 + 3 + 3 + 0.
SM90_CONFIGS = ["64,16,1", "64,32,1", "64,16,3", "64,32,2,2", "64,64,4,3", "64,128,2", "128,64,3", "128,128,1,2",
                "128,64,1,2",
                # the overlapped promotion (double accumulators, wgmma wait<1>): odd / even K-block counts per
                # slice, a 2-stage ring, both warpgroup counts
                "64,16,1,0,1", "64,32,2,2,1", "64,64,1,0,1", "64,128,4,0,1", "128,64,3,2,1", "128,64,1,0,1"]


@pytest.mark.parametrize("config", SM90_CONFIGS)
@pytest.mark.parametrize("kernel_device, m, n, k", _device_cases(
    [(33, 160, 1040), (130, 48, 1104)], cuda_only=[(64, 2112, 7168)]), indirect=["kernel_device"])
def test_cuda_sm90_every_config(config, kernel_device, m, n, k, monkeypatch):
    sms = _use_sm90_kernel(monkeypatch, kernel_device)
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", config)
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    plan = gemm.explain(m, n, k, num_sms=sms, kernel="sm90")
    assert plan["source"] == "env"
    assert [plan[key] for key in ("block_m", "block_n", "split_k")] == [int(x) for x in config.split(",")[:3]]
    assert {key: plan[key] for key in PLAN_KEYS} == gemm.last_launch_plan()
    split = plan["split_k"] > 1
    _check_emulated(kernel_device, before, sm90=1, portable=0, reduce=int(split))
    want = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    _check_against_reference(out, want, (config, m, n, k))
    # the masked mode on the same config (split-K included): rows m, 0, m // 2
    _check_masked_m_0_half(kernel_device, (aq, sa), (bq, sb), want, config, sm90=1, portable=0, reduce=int(split))


# The heuristic's own picks, launched: narrow tiles and split-K chosen on a small emulated device.
@pytest.mark.parametrize("kernel_device, m, n, k, sms", _device_cases(
    [(16, 256, 2048, 4), (64, 48, 1024, 8), (3, 32, 4096, 16), (130, 144, 512, 4)],
    cuda_only=[(16, 2112, 7168, 0)]), indirect=["kernel_device"])
def test_cuda_sm90_launch_matches_explain(kernel_device, m, n, k, sms, monkeypatch):
    device_sms = _use_sm90_kernel(monkeypatch, kernel_device)
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    if kernel_device == "cpu":
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(sms))
    else:
        sms = device_sms
    plan = gemm.explain(m, n, k, num_sms=sms)
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
    before = _emulated_kernels()
    deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
    assert {key: plan[key] for key in PLAN_KEYS} == gemm.last_launch_plan()
    if kernel_device == "cpu":
        now = _emulated_kernels()
        reduce_ctas = 0
        if plan["split_k"] > 1:
            reduce_ctas = min(-(-m * n // 2 // 256), 4 * sms)
        assert now["ctas"] - before["ctas"] == plan["ctas"] + reduce_ctas
    _check_emulated(kernel_device, before, sm90=1, portable=0, reduce=int(plan["split_k"] > 1))
    want = torch.empty_like(out)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    _check_against_reference(out, want, (m, n, k, plan))


def test_emulated_heuristic_picks_cover_narrow_tiles_and_split_k():
    """The cases above exercise the new designs through the heuristic, not only through the env override."""
    picks = {(gemm.explain(m, n, k, num_sms=s, kernel="sm90")["block_n"],
              gemm.explain(m, n, k, num_sms=s, kernel="sm90")["split_k"] > 1)
             for m, n, k, s in [(16, 256, 2048, 4), (64, 48, 1024, 8), (3, 32, 4096, 16), (130, 144, 512, 4)]}
    assert any(split for _, split in picks) and any(bn < 64 for bn, _ in picks), picks


def _run_table_plan(m: int, n: int, k: int, num_sms: int) -> dict:
    """explain()'s plan for a dense problem under the current table: the C++ plan is the same, the emulated
    launch runs it and matches the reference. Returns the plan."""
    plan = gemm.explain(m, n, k, num_sms=num_sms)
    assert gemm.native_plan(m, n, k, num_sms=num_sms) == {key: plan[key] for key in PLAN_KEYS}
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k)
    want = torch.empty(m, n, dtype=torch.bfloat16)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16))
    with deepkernels.emulate():
        deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
        assert gemm.last_launch_plan() == {key: plan[key] for key in PLAN_KEYS}
    _check_against_reference(out, want, f"table plan {plan}")
    return plan


def test_tuning_table_is_used_by_launch_and_explain(monkeypatch):
    """An entry for the problem on this device's SM count overrides the heuristic, in explain() and in the
    emulated launch; an entry that cannot run is ignored by both; set_tuning_table(None) restores the file's."""
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", "4")
    m, n, k = 20, 96, 640
    entry = dict(device="SIMT emulator", kind="dense", m=m, n=n, k=k, num_groups=1, expected_m=0, num_sms=4,
                 block_m=64, block_n=32, split_k=5, stages=3, overlap=1)
    heuristic = gemm.explain(m, n, k, num_sms=4)
    assert heuristic["source"] == "heuristic" and (heuristic["block_n"], heuristic["split_k"]) != (32, 5)
    try:
        gemm.set_tuning_table([entry, dict(entry, m=m + 1, block_m=128, block_n=16)])
        plan = _run_table_plan(m, n, k, num_sms=4)
        assert plan["source"] == "table" and (plan["block_n"], plan["split_k"], plan["stages"]) == (32, 5, 3)
        assert plan["overlap"] == 1
        assert gemm.explain(m + 1, n, k, num_sms=4)["source"] == "heuristic"  # the invalid entry: ignored
        assert gemm.native_plan(m + 1, n, k, num_sms=4)["source"] == "heuristic"
        assert gemm.explain(m, n, k, num_sms=132)["source"] == "heuristic"  # another device size
    finally:
        gemm.set_tuning_table(None)
    assert gemm.explain(m, n, k, num_sms=4)["source"] == "heuristic"


def test_committed_tuning_table_is_valid():
    """deepkernels/tuning/gemm_sm90.json: an object with entries (measured on a GPU by `python -m bench sweep`;
    none until a GPU run), each with the fields the dispatcher matches on and a plan that validates."""
    table = gemm.load_tuning_table()
    assert table["version"] == 1 and isinstance(table["entries"], list)
    for e in table["entries"]:
        assert isinstance(e["device"], str) and e["us"] > 0
        gemm._validate_sm90(e["kind"], e["k"], e["block_m"], e["block_n"], e["split_k"], e["stages"],
                            e.get("overlap", 0), "table", e.get("tma_store", 0))


# ---------------------------------------------------------------------------------------------
# The TMA-store epilogue (tma_store = 1, DEEPKERNELS_GEMM_CONFIG's 6th field): bf16 tiles through shared memory
# and a TMA store that overlaps the next tile. On few emulated SMs every CTA handles several tiles, so each store
# is still in flight (the emulator performs it only at the next tile's wait_group.read) while the next tile runs.
# The result must be bit-identical to the register epilogue's, rows the op must not write keep their poison.

TMA_STORE_CONFIGS = [f"{bm},{bn},1,0,0,1" for bm, bn in gemm._SM90_SHAPES] + [
    "64,64,1,0,1,1", "128,64,1,2,1,1",  # with the overlapped promotion (and a 2-stage ring)
    "128,128,1,2,0,1", "64,32,1,3,0,1",  # other ring depths
]
TMA_STORE_EMU_SMS = 2


def _register_twin(config: str) -> str:
    return config.rsplit(",", 1)[0] + ",0"


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.view(torch.int16), y.view(torch.int16))


def _run_both_epilogues(kernel_device, config, monkeypatch, run):
    """run(out) on the TMA-store config and on its register-epilogue twin; returns both outputs (each poisoned
    first) after checking the launched plans (explain's, tma_store as asked) and what was emulated."""
    outs = []
    for c, store in ((config, 1), (_register_twin(config), 0)):
        monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", c)
        before = _emulated_kernels()
        out, problem = run()
        plan = gemm.last_launch_plan()
        assert plan["tma_store"] == store and plan["source"] == "env", (c, plan)
        want = gemm.explain(*problem["mnk"], num_groups=problem.get("groups", 1), kind=problem["kind"],
                            num_sms=plan["ctas"] if kernel_device == "cuda" else TMA_STORE_EMU_SMS, kernel="sm90")
        assert {k: want[k] for k in ("block_m", "block_n", "split_k", "stages", "overlap", "tma_store")} == \
            {k: plan[k] for k in ("block_m", "block_n", "split_k", "stages", "overlap", "tma_store")}, (c, plan)
        _check_emulated(kernel_device, before, sm90=1, portable=0)
        outs.append(out)
    return outs


@pytest.mark.parametrize("config", TMA_STORE_CONFIGS)
@pytest.mark.parametrize("kernel_device, kind", _device_cases(["dense", "contiguous", "masked"]),
                         indirect=["kernel_device"])
def test_cuda_sm90_tma_store_epilogue(config, kernel_device, kind, monkeypatch):
    _use_sm90_kernel(monkeypatch, kernel_device)
    if kernel_device == "cpu":
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(TMA_STORE_EMU_SMS))
    if kind == "dense":  # partial tiles in M (130), N (144) and K (400)
        m, n, k = 130, 144, 400
        _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)

        def run():
            out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
            deepkernels.fp8_gemm_nt(aq, sa, bq, sb, out)
            return out, dict(kind=kind, mnk=(m, n, k))

        out, twin = _run_both_epilogues(kernel_device, config, monkeypatch, run)
        want = torch.empty_like(out)
        gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
        _check_against_reference(out, want, (config, kind))
    elif kind == "contiguous":  # padding rows (-1: zeros) and one foreign id (NaN: m_indices is trusted there)
        n, k = 144, 272
        _, _, aq, sa, bq, sb, m_idx = _contiguous_case([5, 0, 130, 1], n=n, k=k, device=kernel_device)
        foreign = m_idx.clone()
        foreign[100] = 9  # a padding row inside group 0's first tile
        m = aq.size(0)

        def run():
            out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device))
            deepkernels.m_grouped_fp8_gemm_nt_contiguous(aq, sa, bq, sb, out, foreign)
            return out, dict(kind=kind, mnk=(m, n, k), groups=bq.size(0))

        out, twin = _run_both_epilogues(kernel_device, config, monkeypatch, run)
        want = torch.empty_like(out)
        gemm.m_grouped_fp8_gemm_nt_contiguous_ref(aq, sa, bq, sb, want, m_idx)
        rows = torch.arange(m, device=kernel_device) != 100
        _check_against_reference(out[rows], want[rows], (config, kind))
        assert torch.all(out[(m_idx == -1) & rows] == 0), f"{config}: padding rows must be zero"
        assert out[100].isnan().all(), f"{config}: a row with a foreign group id must be NaN"
    else:  # masked: an empty group, a partial one, a full one (Mmax), one of exactly one 64-row block
        groups, mmax, n, k = 4, 130, 144, 400
        _, _, (aq, sa), (bq, sb) = _operands(mmax, n, k, kernel_device, groups=groups)
        masked_m = torch.tensor([0, 70, mmax, 64], dtype=torch.int32, device=kernel_device)

        def run():
            out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=kernel_device))
            deepkernels.m_grouped_fp8_gemm_nt_masked(aq, sa, bq, sb, out, masked_m, mmax)
            return out, dict(kind=kind, mnk=(mmax, n, k), groups=groups)

        out, twin = _run_both_epilogues(kernel_device, config, monkeypatch, run)
        want = poison_(torch.empty_like(out))
        gemm.m_grouped_fp8_gemm_nt_masked_ref(aq, sa, bq, sb, want, masked_m, mmax)
        valid = torch.arange(mmax, device=kernel_device)[None, :] < masked_m[:, None]
        _check_against_reference(out, want, (config, kind), valid)
        assert out[~valid].isnan().all(), f"{config}: rows >= masked_m[g] must keep their poison"
    assert _same_bits(out, twin), f"{config} {kind}: the TMA-store epilogue differs from the register epilogue"


def test_cuda_sm90_tma_store_out_layouts(kernel_device, monkeypatch):
    """Output views through the op (the wrappers want contiguous outs; the op takes any 4-byte aligned, even
    stride): a row stride padded by 16 bytes (TMA can describe it: stored by TMA), by 4 bytes (not a multiple of
    16: the register epilogue), a 4-byte offset base (not 16-byte aligned: the register epilogue), a masked out
    with padded groups (TMA) and with a group stride TMA cannot describe (the register epilogue). Each right,
    the padding keeps its poison, and last_launch_plan() says which epilogue ran."""
    _use_sm90_kernel(monkeypatch, kernel_device)
    if kernel_device == "cpu":
        monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", str(TMA_STORE_EMU_SMS))
    monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", "64,64,1,0,0,1")
    m, n, k = 100, 144, 272
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    want = torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)
    op = torch.ops.deepkernels.fp8_gemm_nt
    cases = [("row stride n + 8 (16 bytes)", n + 8, 0, 1), ("row stride n + 2 (4 bytes)", n + 2, 0, 0),
             ("base at +4 bytes", n + 16, 2, 0)]
    for what, pitch, offset, store in cases:
        big = poison_(torch.empty(m, pitch, dtype=torch.bfloat16, device=kernel_device))
        out = big[:, offset:offset + n]
        with deepkernels.emulate(kernel_device == "cpu"):
            op(aq, sa, bq, sb, out)
            plan = gemm.last_launch_plan()
        assert plan["kernel"] == "sm90" and plan["tma_store"] == store, (what, plan)
        _check_against_reference(out, want, what)
        outside = torch.ones_like(big, dtype=torch.bool)
        outside[:, offset:offset + n] = False
        assert big[outside].isnan().all(), f"{what}: written outside out"

    groups, mmax = 3, 70
    _, _, (aq3, sa3), (bq3, sb3) = _operands(mmax, n, k, kernel_device, groups=groups)
    masked_m = torch.tensor([mmax, 0, 65], dtype=torch.int32, device=kernel_device)
    want3 = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16, device=kernel_device))
    gemm.m_grouped_fp8_gemm_nt_masked_ref(aq3, sa3, bq3, sb3, want3, masked_m, mmax)
    valid = torch.arange(mmax, device=kernel_device)[None, :] < masked_m[:, None]
    group_strides = [("groups padded by 3 rows", (mmax + 3) * n, 1), ("group stride + 2 elements", mmax * n + 2, 0)]
    for what, group_stride, store in group_strides:
        flat = poison_(torch.empty(groups * group_stride, dtype=torch.bfloat16, device=kernel_device))
        out3 = flat.as_strided((groups, mmax, n), (group_stride, n, 1))
        with deepkernels.emulate(kernel_device == "cpu"):
            torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(aq3, sa3, bq3, sb3, out3, masked_m, mmax)
            plan = gemm.last_launch_plan()
        assert plan["kernel"] == "sm90" and plan["tma_store"] == store, (what, plan)
        _check_against_reference(out3, want3, what, valid)
        assert out3[~valid].isnan().all(), f"{what}: rows >= masked_m written"
        written = torch.zeros_like(flat, dtype=torch.bool)
        written.as_strided((groups, mmax, n), (group_stride, n, 1))[valid] = True
        assert flat[~written].isnan().all(), f"{what}: written outside the valid rows"


def test_explain_mirrors_tma_store_plans(monkeypatch):
    """The tma_store field and its stage bound (the output tile takes ring space: 128x128 keeps 6 stages, not
    7): explain() == heuristic.h through the extension for forced TMA-store plans; the heuristic leaves 0."""
    monkeypatch.delenv("DEEPKERNELS_GEMM_SM90_BLOCKS", raising=False)
    assert gemm.sm90_max_stages(128, 128) == 7 and gemm.sm90_max_stages(128, 128, 1) == 6
    assert all(gemm.sm90_max_stages(bm, bn, 1) == 8 for bm, bn in gemm._SM90_SHAPES if (bm, bn) != (128, 128))
    for config in TMA_STORE_CONFIGS + ["128,128,1,6,0,1"]:
        monkeypatch.setenv("DEEPKERNELS_GEMM_CONFIG", config)
        for kind, groups in (("dense", 1), ("contiguous", 4), ("masked", 4)):
            got = gemm.native_plan(300, 2112, 7168, groups, 132, kind, 64)
            want = gemm.explain(300, 2112, 7168, groups, 132, kind, 64, kernel="sm90")
            assert {key: want[key] for key in PLAN_KEYS} == got, (config, kind)
            assert got["tma_store"] == 1
        bm, bn, _, stages = map(int, config.split(",")[:4])
        assert got["stages"] == (stages or gemm.sm90_max_stages(bm, bn, 1)), config
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG")
    assert gemm.explain(300, 2112, 7168, kernel="sm90")["tma_store"] == 0


def test_tuning_table_tma_store_entry(monkeypatch):
    """A table entry with tma_store = 1 reaches explain(), the C++ plan and the emulated launch (which then runs
    the TMA-store epilogue); entries without the key load as 0."""
    monkeypatch.setenv("DEEPKERNELS_GEMM_SM90", "1")
    monkeypatch.delenv("DEEPKERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.setenv("DEEPKERNELS_EMULATE_SMS", "4")
    m, n, k = 20, 96, 640
    entry = dict(device="SIMT emulator", kind="dense", m=m, n=n, k=k, num_groups=1, expected_m=0, num_sms=4,
                 block_m=64, block_n=32, split_k=1, stages=0, tma_store=1)
    try:
        gemm.set_tuning_table([entry, {key: v for key, v in entry.items() if key != "tma_store"} | {"m": m + 1}])
        plan = _run_table_plan(m, n, k, num_sms=4)
        assert plan["source"] == "table" and plan["tma_store"] == 1 and plan["overlap"] == 0
        assert gemm.explain(m + 1, n, k, num_sms=4)["tma_store"] == 0  # no key: 0
        assert gemm.native_plan(m + 1, n, k, num_sms=4)["tma_store"] == 0
    finally:
        gemm.set_tuning_table(None)


def test_unaligned_views_run_on_every_path(kernel_device):
    _check_unaligned_views(kernel_device)


def test_unaligned_views_reference():
    _check_unaligned_views("cpu")


def _check_unaligned_views(kernel_device):
    """Views the kernels cannot read directly (fp8 operands at an odd offset or with rows of 16 + 8 bytes,
    a bf16 out at an odd element offset) give the reference's answer on every path; rows a masked call
    leaves untouched stay untouched; an out overlapping an input or an expanded fp32 accumulator is refused
    (ValueError naming out) before anything is written."""
    m, n, k = 40, 48, 160
    _, _, (aq, sa), (bq, sb) = _operands(m, n, k, kernel_device)
    want = torch.empty(m, n, dtype=torch.bfloat16, device=kernel_device)
    gemm.fp8_gemm_nt_ref(aq, sa, bq, sb, want)

    def odd(x, offset):  # the same values at `offset` elements into a fresh buffer
        buf = torch.zeros(x.numel() + offset, dtype=x.dtype, device=x.device)
        view = buf[offset:].view(x.shape)
        view.copy_(x)
        return view

    out_buf = poison_(torch.empty(m * n + 1, dtype=torch.bfloat16, device=kernel_device))
    out = out_buf[1:].view(m, n)  # 2-byte aligned
    deepkernels.fp8_gemm_nt(odd(aq, 3), sa, odd(bq, 5), sb, out)
    _check_against_reference(out, want, "odd a, b and out offsets")

    padded = torch.zeros(m, k + 8, dtype=aq.dtype, device=kernel_device)  # rows of k + 8 bytes
    padded[:, :k] = aq
    out2 = deepkernels.fp8_gemm_nt(padded[:, :k], sa, bq, sb)
    _check_against_reference(out2, want, "row stride k + 8")

    groups, mmax = 2, m
    a3, sa3 = torch.stack([aq, aq]), torch.stack([sa, sa])
    b3, sb3 = torch.stack([bq, bq]), torch.stack([sb, sb])
    masked_m = torch.tensor([m, m // 2], dtype=torch.int32, device=kernel_device)
    buf3 = poison_(torch.empty(groups * mmax * n + 1, dtype=torch.bfloat16, device=kernel_device))
    out3 = buf3[1:].view(groups, mmax, n)
    deepkernels.m_grouped_fp8_gemm_nt_masked(odd(a3, 7), sa3, b3, sb3, out3, masked_m, m)
    _check_against_reference(out3[0], want, "masked, odd out, group 0")
    _check_against_reference(out3[1, :m // 2], want[:m // 2], "masked, odd out, group 1")
    assert out3[1, m // 2:].isnan().all(), "rows >= masked_m[g] must stay untouched"

    raw = torch.zeros(m * k + m * n * 2, dtype=torch.uint8, device=kernel_device)
    a_alias = raw[:m * k].view(aq.dtype).view(m, k)
    a_alias.copy_(aq)
    out_alias = raw[:m * n * 2].view(torch.bfloat16).view(m, n)
    with pytest.raises(ValueError, match="out: expected an output tensor that does not overlap the input a"):
        deepkernels.fp8_gemm_nt(a_alias, sa, bq, sb, out_alias)
    assert torch.equal(a_alias, aq), "nothing written before the refusal"

    acc = torch.zeros(1, m, dtype=torch.float32, device=kernel_device).expand(m, m)
    with pytest.raises(ValueError, match="out: expected an output tensor whose elements do not share memory"):
        deepkernels.wgrad_gemm_fp8_fp8_fp32_nt(aq, sa, aq, sa, acc)
    acc = torch.zeros(m, m, dtype=torch.float32, device=kernel_device)
    deepkernels.wgrad_gemm_fp8_fp8_fp32_nt(odd(aq, 9), sa, aq, sa, acc)
    ref = torch.zeros_like(acc)
    gemm.wgrad_gemm_fp8_fp8_fp32_nt_ref(aq, sa, aq, sa, ref)
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-4)
