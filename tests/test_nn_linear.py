import pytest
import torch
from torch import nn

from deepkernels.nn import MLP, Fp8Linear
from deepkernels.testing import calc_diff


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_from_linear_close_to_linear(bias):
    linear = nn.Linear(384, 256, bias=bias)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale_inv.shape == (2, 3)
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        want, got = linear(x), fp8(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert calc_diff(got, want) < 1e-3, calc_diff(got, want)


def test_fp8_linear_state_dict_names_match_checkpoints():
    assert set(Fp8Linear(256, 128).state_dict()) == {"weight", "weight_scale_inv"}
    assert set(MLP(64, 32, fp8=True).state_dict()) == {
        f"{p}.{n}" for p in ("gate_proj", "up_proj", "down_proj") for n in ("weight", "weight_scale_inv")}


def test_mlp_swiglu():
    mlp = MLP(16, 8)
    x = torch.randn(3, 16)
    want = mlp.down_proj.weight @ (torch.nn.functional.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    torch.testing.assert_close(mlp(x), want.T)
