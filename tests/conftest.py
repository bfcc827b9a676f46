import os

import pytest
import torch

import deepkernels
from deepkernels.testing import cuda_kernels_available


def pytest_collection_modifyitems(config, items):
    if cuda_kernels_available():
        return
    reason = "needs a CUDA GPU and the compiled extension (run `pytest -m cuda` on the GPU machine)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Every CUDA kernel test takes `kernel_device`: "cuda" runs it on the GPU (marked cuda, skipped without one),
# "emu" runs the same case on CPU tensors through the SIMT emulator (the unchanged CUDA kernels on CPU fibers).
KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
                  pytest.param("emu", marks=pytest.mark.emu, id="emu")]


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """The device a kernel test runs on: "cuda", or "cpu" with emulation on for the test's duration.

    An emulated test must launch at least one emulated kernel (else it would only have checked the
    reference against itself). Inside it, ``deepkernels.testing.reference()`` turns emulation off.
    """
    if request.param == "cuda":
        yield "cuda"
        return
    if not deepkernels.build_info()["emulator"]:
        message = f"the emulator is not built ({deepkernels.build_info()['emulator_error']})"
        if os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1":
            pytest.fail(message + " but DEEPKERNELS_REQUIRE_CUDA=1")
        pytest.skip(message)
    before = deepkernels.emulator_stats()["launches"]
    with deepkernels.emulate():
        yield "cpu"
    assert deepkernels.emulator_stats()["launches"] > before, "the emulated test launched no emulated kernel"
