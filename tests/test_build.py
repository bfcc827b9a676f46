"""The package's build and op registration: the CUDA extension is compiled for every default arch
(when the build was required, as `make test` and CI do) and every op has its four faces."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepkernels
from deepkernels import _ops

REQUIRED = os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1"


def test_every_op_has_cpu_fake_and_cuda_kernels():
    assert _ops._REFERENCES, "no ops defined"
    for name in _ops._REFERENCES:
        qualified = f"deepkernels::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta") or \
            torch._library.simple_registry.singleton.find(qualified).fake_impl.kernel is not None, name


def test_import_exposes_ops_and_build_info():
    assert callable(torch.ops.deepkernels.per_token_cast_to_fp8)
    info = deepkernels.build_info()
    assert set(info) >= {"CUDA_ARCHS", "extension_loaded", "extension_error"}
    assert deepkernels.is_cuda_available() == (info["extension_loaded"] and torch.cuda.is_available())


@pytest.mark.skipif(not REQUIRED, reason="pure-Python install requested (DEEPKERNELS_REQUIRE_CUDA unset)")
def test_extension_built_and_loaded():
    info = deepkernels.build_info()
    assert info["extension_loaded"], f"deepkernels._C failed to load: {info['extension_error']}"
    spec = os.environ.get("DEEPKERNELS_CUDA_ARCHS", "80;89+PTX;90a")
    assert info["CUDA_ARCHS"] == [a.strip().removesuffix("+PTX") for a in spec.split(";") if a.strip()]
    for name in ("per_token_cast_to_fp8", "per_block_cast_to_fp8", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
                 "m_grouped_fp8_gemm_nt_masked"):
        assert _ops.has_cuda_kernel(name), f"{name} has no compiled CUDA kernel"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


@pytest.mark.skipif(not REQUIRED, reason="pure-Python install requested (DEEPKERNELS_REQUIRE_CUDA unset)")
def test_extension_carries_cubins_for_every_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.fail("no cuobjdump (PATH or triton's bundled copy) to inspect the extension")
    so = next(Path(deepkernels.__file__).parent.glob("_C*.so"))
    listing = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True, check=True).stdout
    for arch in deepkernels.build_info()["CUDA_ARCHS"]:
        assert f"sm_{arch}" in listing, f"no sm_{arch} cubin in {so.name}:\n{listing}"
    ptx = subprocess.run([tool, "--list-ptx", str(so)], capture_output=True, text=True, check=True).stdout
    for arch in deepkernels.build_info()["CUDA_PTX_ARCHS"]:  # what newer GPUs (sm_100, sm_120) JIT-compile
        assert f"sm_{arch}" in ptx, f"no compute_{arch} PTX in {so.name}:\n{ptx}"


def test_arch_list_parsing():
    setup_py = Path(__file__).parents[1] / "setup.py"
    namespace: dict = {"__file__": str(setup_py)}  # setup.py's helpers, without running setup()
    exec(compile(setup_py.read_text().split("\next_modules = ")[0], str(setup_py), "exec"), namespace)
    assert namespace["parse_archs"]("80;89+PTX;90a") == (["80", "89", "90a"], ["89"])
    assert namespace["parse_archs"](" 90a ;") == (["90a"], [])
    assert namespace["gencode_flags"](["90a"], ["89"]) == ["-gencode=arch=compute_90a,code=sm_90a",
                                                           "-gencode=arch=compute_89,code=compute_89"]


def test_reference_fallback_prints_one_notice_and_ops_work():
    code = ("import torch, deepkernels; x = torch.randn(3, 200); q, s = deepkernels.per_token_cast_to_fp8(x); "
            "assert not deepkernels.build_info()['extension_loaded']; print(s.shape)")
    env = {**os.environ, "DEEPKERNELS_FORCE_REFERENCE": "1"}
    env.pop("DEEPKERNELS_QUIET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if line.startswith("deepkernels:")]
    assert len(notices) == 1 and "pure-torch references" in notices[0], proc.stderr
    assert proc.stdout.strip() == "torch.Size([3, 2])"
