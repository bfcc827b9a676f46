import pytest
import torch

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
