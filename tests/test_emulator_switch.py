"""The user switch of the emulator: DEEPKERNELS_EMULATE=1 / deepkernels.emulate() route ops on CPU tensors
through the emulated CUDA kernels, with the binding's own host checks, and emulator_stats() counts them."""
import os
import subprocess
import sys

import pytest
import torch

import deepkernels
from deepkernels.testing import calc_diff, reference

pytestmark = pytest.mark.skipif(not deepkernels.build_info()["emulator"] and os.environ.get(
    "DEEPKERNELS_REQUIRE_CUDA") != "1", reason="emulator not built")


def test_build_info_reports_the_emulator():
    info = deepkernels.build_info()
    assert info["emulator"] is True, info["emulator_error"]
    assert info["emulator_error"] is None


def test_emulate_context_runs_the_cuda_kernel_and_counts_it():
    x = torch.randn(8, 384)
    before = deepkernels.emulator_stats()
    with deepkernels.emulate():
        assert deepkernels.emulation_enabled()
        q, s = deepkernels.per_token_cast_to_fp8(x)
    after = deepkernels.emulator_stats()
    assert not deepkernels.emulation_enabled()
    assert set(after) >= {"launches", "ctas", "kernels"}
    assert after["launches"] == before["launches"] + 1, (before, after)
    assert after["ctas"] > before["ctas"]
    name = "per_token_cast_to_fp8_kernel"
    assert after["kernels"].get(name, 0) == before["kernels"].get(name, 0) + 1, after["kernels"]
    rq, rs = deepkernels.per_token_cast_to_fp8(x)   # emulation off: the reference
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_reference_context_inside_emulation_runs_no_kernel():
    x = torch.randn(4, 128)
    with deepkernels.emulate():
        before = deepkernels.emulator_stats()["launches"]
        with reference():
            deepkernels.per_token_cast_to_fp8(x)
        assert deepkernels.emulator_stats()["launches"] == before
        deepkernels.per_token_cast_to_fp8(x)
        assert deepkernels.emulator_stats()["launches"] == before + 1


def test_set_emulation_rejects_non_bool():
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        deepkernels.set_emulation(1)


def test_env_switch_and_hopper_flags_in_a_fresh_process():
    code = (
        "import torch, deepkernels\n"
        "from deepkernels.testing import reference, calc_diff\n"
        "assert deepkernels.emulation_enabled()\n"
        "a, sa = deepkernels.per_token_cast_to_fp8(torch.randn(96, 256))\n"
        "b, sb = deepkernels.per_block_cast_to_fp8(torch.randn(144, 256))\n"
        "out = deepkernels.fp8_gemm_nt(a, sa, b, sb)\n"
        "with reference():\n"
        "    ref = deepkernels.fp8_gemm_nt(a, sa, b, sb)\n"
        "k = deepkernels.emulator_stats()['kernels']\n"
        "assert k.get('fp8_gemm_sm90_kernel') == 1 and 'fp8_gemm_nt_portable_kernel' not in k, k\n"
        "assert calc_diff(out, ref) < 1e-5, calc_diff(out, ref)\n"
        "print('ok')\n")
    env = {**os.environ, "DEEPKERNELS_EMULATE": "1", "DEEPKERNELS_GEMM_SM90": "1", "DEEPKERNELS_QUIET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_emulated_op_runs_the_bindings_host_checks():
    # Past the Python wrapper, straight into the binding: its TORCH_CHECK answers, not a kernel fault.
    a = torch.zeros(32, 120, dtype=torch.float8_e4m3fn)   # K not a multiple of 16
    b = torch.zeros(32, 120, dtype=torch.float8_e4m3fn)
    out = torch.empty(32, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="a: K must be a multiple of 16"):
        torch.ops.deepkernels_emu.fp8_gemm_nt(a, torch.ones(32, 1), b, torch.ones(1, 1), out)
    with deepkernels.emulate(), pytest.raises(ValueError, match="multiple of 16"):
        deepkernels.fp8_gemm_nt(a, torch.ones(32, 1), b, torch.ones(1, 1), out)


def test_emulated_gemm_matches_reference():
    a, b = torch.randn(70, 384), torch.randn(96, 384)
    aq, sa = deepkernels.per_token_cast_to_fp8(a)
    bq, sb = deepkernels.per_block_cast_to_fp8(b)
    ref = deepkernels.fp8_gemm_nt(aq, sa, bq, sb)
    with deepkernels.emulate():
        out = deepkernels.fp8_gemm_nt(aq, sa, bq, sb)
    assert calc_diff(out, ref) < 1e-5 and calc_diff(out, a @ b.T) < 1e-3
