import pytest
import torch
from torch import nn

from deepkernels.nn import MLP, Fp8Linear
from deepkernels.testing import Bf16GemmLinear, calc_diff, cosine, num_threads


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


# ---------------------------------------------------------------------------------------------
# FP8 training through Fp8Linear (master_weight=True): DeepSeek-V3's recipe, forward / dgrad / wgrad in FP8.

import copy

import torch.nn.functional as F

import deepkernels
from deepkernels.nn.linear import convert_linears_for_fp8_training_, fp8_linear


@pytest.mark.parametrize("tokens, in_features, out_features, bias, dtype", [
    (250, 256, 384, True, torch.bfloat16),   # tokens not a multiple of 16: wgrad pads with zero tokens
    (64, 128, 128, False, torch.float32),
    (7, 96, 40, True, torch.bfloat16),       # N, K < 128: partial scale groups
    (33, 100, 24, False, torch.bfloat16),    # in_features not a multiple of 16: dequantised fallback GEMMs
])
def test_fp8_linear_gradients_close_to_fp32(tokens, in_features, out_features, bias, dtype):
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = Fp8Linear.from_linear(linear, master_weight=True)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad and layer.weight_scale_inv is None
    assert set(layer.state_dict()) == set(linear.state_dict())
    x = torch.randn(2, tokens, in_features, dtype=dtype, requires_grad=True)
    x_ref = x.detach().float().requires_grad_()
    grad_out = torch.randn(2, tokens, out_features)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, tokens, out_features)
    y.backward(grad_out.to(dtype))
    linear(x_ref).backward(grad_out)
    case = (tokens, in_features, out_features, bias, dtype)
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == torch.float32
    for name, got, want in [("y", y, linear(x_ref)), ("dx", x.grad, x_ref.grad),
                            ("dW", layer.weight.grad, linear.weight.grad)] + \
            ([("db", layer.bias.grad, linear.bias.grad)] if bias else []):
        assert cosine(got, want) >= 0.99, f"{case} {name}: cosine {cosine(got, want):.5f}"
        assert calc_diff(got.float(), want.float()) < 2e-3, f"{case} {name}: calc_diff {calc_diff(got, want):.2e}"


def test_fp8_linear_wgrad_runs_through_the_wgrad_op_and_accumulates(monkeypatch):
    from deepkernels.nn import linear as linear_module

    layer = Fp8Linear(256, 128, master_weight=True)
    calls = []
    original = linear_module.wgrad_gemm_fp8_fp8_fp32_nt

    def spy(a, a_scale, b, b_scale, out):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, a_scale, b, b_scale, out)

    monkeypatch.setattr(linear_module, "wgrad_gemm_fp8_fp8_fp32_nt", spy)
    x = torch.randn(100, 256)
    layer(x).sum().backward()
    first = layer.weight.grad.clone()
    layer(x).sum().backward()  # .grad accumulates across backward passes
    assert calls == [((128, 112), (256, 112))] * 2, calls  # dy^T [out, tokens padded to 112], x^T [in, 112]
    torch.testing.assert_close(layer.weight.grad, 2 * first)


def test_fp8_linear_refuses_bad_arguments():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="x: expected last dim 64"):
        fp8_linear(torch.randn(3, 48), w)
    with pytest.raises(ValueError, match="weight: expected a 2-D floating-point master weight"):
        fp8_linear(torch.randn(3, 64), w.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"bias: expected shape \[32\]"):
        fp8_linear(torch.randn(3, 64), w, torch.zeros(31))
    with pytest.raises(ValueError, match="x: expected dtype"):
        fp8_linear(torch.randint(0, 3, (3, 64)), w)


def test_fp8_linear_training_torch_compile_forward_and_backward():
    layer = Fp8Linear(256, 128, bias=True, master_weight=True)
    x = torch.randn(48, 256, dtype=torch.bfloat16)
    eager = copy.deepcopy(layer)
    eager(x).float().square().mean().backward()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).float().square().mean().backward()
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, eager.bias.grad, rtol=0, atol=0)


def test_fp8_linear_training_kernels_emulated(kernel_device):
    """The training step's forward, dgrad and wgrad GEMMs as the CUDA kernels (GPU or emulated) vs references."""
    layer = Fp8Linear(128, 64, master_weight=True).to(kernel_device)
    x = torch.randn(40, 128, dtype=torch.bfloat16, device=kernel_device, requires_grad=True)
    layer(x).float().square().sum().backward()
    with deepkernels.testing.reference():
        ref = Fp8Linear(128, 64, master_weight=True)
        ref.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
        x_ref = x.detach().cpu().requires_grad_()
        ref(x_ref).float().square().sum().backward()
    assert calc_diff(x.grad.cpu().float(), x_ref.grad.float()) < 1e-5
    assert calc_diff(layer.weight.grad.cpu(), ref.weight.grad) < 1e-5


class _Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int, linear=nn.Linear):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(self.mlp, name)
            setattr(self.mlp, name, linear(old.in_features, old.out_features, bias=False))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _toy_model(linear=nn.Linear, d_in=128, hidden=128, intermediate=256, classes=32, layers=2):
    """A small DeepSeek-style residual SwiGLU MLP stack (deepkernels.nn.MLP blocks) with an input and output
    projection: every GEMM has the shapes the FP8 kernels take."""
    return nn.Sequential(linear(d_in, hidden, bias=False), *[_Block(hidden, intermediate, linear) for _ in range(layers)],
                         nn.RMSNorm(hidden), linear(hidden, classes, bias=False))


STEPS, LOSS_TOLERANCE, GRAD_COSINE = 200, 0.05, 0.99


def test_fp8_training_tracks_bf16_training():
    """Train the toy model FP8 (Fp8Linear, fp32 master weights) and bf16 from the same init on the same batches
    (a classification task labelled by a random teacher network). Stated tolerances: every 20-step window's mean
    loss within LOSS_TOLERANCE (absolute, nats) of bf16's, the FP8 loss falls like bf16's, and at every step
    each weight's gradient has cosine >= GRAD_COSINE with the bf16 gradient at the same weights and batch."""
    with num_threads(1):
        torch.manual_seed(0)
        teacher = _toy_model(layers=1)
        base = _toy_model(Bf16GemmLinear)
        fp8_model = copy.deepcopy(base)
        for module in fp8_model.modules():  # the twin bf16 model's linears -> FP8 training linears
            for name, child in list(module.named_children()):
                if isinstance(child, Bf16GemmLinear):
                    plain = nn.Linear(child.in_features, child.out_features, bias=False)
                    plain.weight = child.weight
                    setattr(module, name, plain)
        convert_linears_for_fp8_training_(fp8_model)
        assert sum(isinstance(m, Fp8Linear) for m in fp8_model.modules()) == 8
        bf16_model, twin = copy.deepcopy(base), copy.deepcopy(base)
        opt_fp8 = torch.optim.AdamW(fp8_model.parameters(), lr=2e-3)
        opt_bf16 = torch.optim.AdamW(bf16_model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(1)
        losses_fp8, losses_bf16, worst_cosine = [], [], []
        for step in range(STEPS):
            x = torch.randn(250, 128, generator=gen)
            with torch.no_grad():
                labels = teacher(x).argmax(-1)
            opt_fp8.zero_grad()
            loss = F.cross_entropy(fp8_model(x.bfloat16()).float(), labels)
            loss.backward()
            twin.load_state_dict(fp8_model.state_dict())  # the bf16 gradient at the FP8 run's weights
            twin.zero_grad()
            F.cross_entropy(twin(x.bfloat16()).float(), labels).backward()
            worst_cosine.append(min((cosine(p.grad, q.grad), name) for (name, p), q in
                                    zip(fp8_model.named_parameters(), twin.parameters()) if p.dim() == 2))
            opt_fp8.step()
            opt_bf16.zero_grad()
            loss_bf16 = F.cross_entropy(bf16_model(x.bfloat16()).float(), labels)
            loss_bf16.backward()
            opt_bf16.step()
            losses_fp8.append(loss.item())
            losses_bf16.append(loss_bf16.item())
    lowest = min(worst_cosine)
    assert lowest[0] >= GRAD_COSINE, f"step {worst_cosine.index(lowest)}: {lowest[1]} gradient cosine {lowest[0]:.4f}"
    windows = [(sum(losses_fp8[i:i + 20]) / 20, sum(losses_bf16[i:i + 20]) / 20) for i in range(0, STEPS, 20)]
    for i, (fp8_loss, bf16_loss) in enumerate(windows):
        assert abs(fp8_loss - bf16_loss) <= LOSS_TOLERANCE, \
            f"steps {20 * i}-{20 * i + 19}: FP8 loss {fp8_loss:.4f} vs bf16 {bf16_loss:.4f}; windows {windows}"
    assert windows[-1][0] < 0.7 * windows[0][0], f"FP8 training did not learn: {windows}"
