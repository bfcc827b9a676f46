"""Training: autograd through the MoE ops and nn.MoE (deepkernels.moe.autograd), ops that refuse a backward,
and FP8 training of the tiny DeepSeek-V3 model (Fp8Linear, fp32 master weights) against bf16 training."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepkernels
from deepkernels.fp8 import per_token_cast_to_fp8
from deepkernels.model import DeepseekV3ForCausalLM
from deepkernels.model.config import DeepseekV3Config
from deepkernels.nn import MoE, MoEGate
from deepkernels.nn.cpu_fast_path import cpu_fast_path
from deepkernels.nn.linear import Fp8Linear, convert_linears_for_fp8_training_
from deepkernels.testing import Bf16GemmLinear, cosine, num_threads, opcheck

ops = torch.ops.deepkernels


# ---------------------------------------------------------------------------------------------
# the ops' gradients: torch.autograd.gradcheck (fp32: the ops take no float64; they are linear in x / y and
# bilinear in (y, weights), so central differences are exact up to fp32 rounding) and a float64 pure-torch
# formulation of the same maths

def _with_zero_row(x):  # index -1 -> the appended zero row
    return torch.cat([x, x.new_zeros(1, x.size(1))])


def _permute_torch(x, src_idx):
    return _with_zero_row(x)[src_idx.long()]


def _unpermute_torch(y, pos, weights):
    rows = _with_zero_row(y)[pos.long()]                                   # [T, K, H]
    w = torch.ones(pos.shape, dtype=y.dtype) if weights is None else weights.to(y.dtype)
    return (torch.where(pos >= 0, w, torch.zeros((), dtype=y.dtype)).unsqueeze(2) * rows).sum(1)


PERMUTE_CASES = {
    "gather_with_empty_rows": ([2, -1, 8, 0, 2, 5], 9),   # row 2 twice (its gradient sums), -1 = zero row
    "all_empty": ([-1, -1], 3),
    "no_rows": ([], 4),
    "empty_x": ([-1, -1, -1], 0),
}


@pytest.mark.filterwarnings("ignore:Input #.* requires gradient and is not a double")
@pytest.mark.parametrize("op_name", ["moe_permute", "moe_permute_no_fill"])
@pytest.mark.parametrize("case", list(PERMUTE_CASES))
def test_permute_gradient(op_name, case):
    idx, rows = PERMUTE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    src = torch.tensor(idx, dtype=torch.int32)
    x = torch.randn(rows, 8, generator=gen, requires_grad=True)
    op = getattr(ops, op_name)
    assert torch.autograd.gradcheck(lambda t: op(t, src), (x,), eps=1e-2, atol=1e-3, rtol=1e-3), case
    grad_out = torch.randn(len(idx), 8, generator=gen)
    (got,) = torch.autograd.grad(op(x, src), x, grad_out)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_permute_torch(x64, src), x64, grad_out.double())
    assert got.dtype == x.dtype and torch.allclose(got.double(), want, atol=1e-6), f"{case}: {got} vs {want}"


UNPERMUTE_CASES = {
    "weighted": ([[0, 3], [-1, -1], [1, 2], [4, -1]], 5, True),
    "unweighted": ([[0, 3], [-1, 2], [1, 4]], 5, False),
    "row_used_twice": ([[1, 1], [0, 1], [-1, 0]], 2, True),   # y row 1 feeds three slots: its gradient sums
    "no_tokens": (torch.zeros(0, 2, dtype=torch.int32).tolist(), 3, True),
    "empty_y": ([[-1, -1], [-1, -1]], 0, True),
}


@pytest.mark.filterwarnings("ignore:Input #.* requires gradient and is not a double")
@pytest.mark.parametrize("case", list(UNPERMUTE_CASES))
def test_unpermute_reduce_gradient(case):
    pos_list, rows, weighted = UNPERMUTE_CASES[case]
    gen = torch.Generator().manual_seed(1)
    pos = torch.tensor(pos_list, dtype=torch.int32).view(-1, 2)
    y = torch.randn(rows, 8, generator=gen, requires_grad=True)
    w = torch.rand(pos.shape, generator=gen).requires_grad_() if weighted else None
    inputs = (y, w) if weighted else (y,)
    fn = (lambda a, b: ops.moe_unpermute_reduce(a, pos, b)) if weighted else \
        (lambda a: ops.moe_unpermute_reduce(a, pos, None))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=1e-3, rtol=1e-3), case
    grad_out = torch.randn(pos.size(0), 8, generator=gen)
    got = torch.autograd.grad(fn(*inputs), inputs, grad_out)
    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    want = torch.autograd.grad(_unpermute_torch(ref_inputs[0], pos, ref_inputs[1] if weighted else None),
                               ref_inputs, grad_out.double(), allow_unused=True)
    for name, g, r in zip(("y", "weights"), got, want):
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        assert g.dtype == torch.float32 and torch.allclose(g.double(), r, atol=1e-5), f"{case} d{name}: {g} vs {r}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_low_precision_accumulate_in_fp32(dtype):
    """bf16 / fp16 y: dy comes back in y's dtype, dw in fp32; both the fp32 formulation rounded once."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(6, 130, generator=gen).to(dtype).requires_grad_()
    pos = torch.tensor([[0, 5, 2], [3, -1, 0], [1, 4, -1]], dtype=torch.int32)
    w = torch.rand(3, 3, generator=gen).requires_grad_()
    grad_out = torch.randn(3, 130, generator=gen).to(dtype)
    dy, dw = torch.autograd.grad(ops.moe_unpermute_reduce(y, pos, w), (y, w), grad_out)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ry, rw = torch.autograd.grad(_unpermute_torch(y64, pos, w64), (y64, w64), grad_out.double())
    assert dy.dtype == dtype and dw.dtype == torch.float32
    assert torch.equal(dy, ry.to(dtype)), (dy - ry).abs().max()
    assert torch.allclose(dw.double(), rw, rtol=1e-5, atol=1e-5), (dw - rw).abs().max()
    src = torch.tensor([5, -1, 0, 5], dtype=torch.int32)
    (dx,) = torch.autograd.grad(ops.moe_permute(y, src), y, grad_out[:1].expand(4, -1))
    assert dx.dtype == dtype and torch.equal(dx[5], (2 * grad_out[0].float()).to(dtype)) and not dx[[1, 2, 3, 4]].any()


def test_opcheck_with_autograd():
    """torch.library.opcheck with inputs that require grad: checks the autograd registration (and fake /
    aot dispatch, which trace the backward formulas)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 130, generator=gen, dtype=torch.bfloat16).requires_grad_()
    src = torch.tensor([2, -1, 8, 0, 2], dtype=torch.int32)
    opcheck(ops.moe_permute, (x, src))
    opcheck(ops.moe_permute_no_fill, (torch.randn(9, 64, generator=gen).requires_grad_(), src))
    pos = torch.tensor([[0, 3], [-1, -1], [1, 1]], dtype=torch.int32)
    y = torch.randn(4, 130, generator=gen).requires_grad_()
    opcheck(ops.moe_unpermute_reduce, (y, pos, torch.rand(3, 2, generator=gen).requires_grad_()))
    opcheck(ops.moe_unpermute_reduce, (y, pos, None))
    opcheck(ops.moe_unpermute_reduce, (y.detach(), pos, torch.rand(3, 2, generator=gen).requires_grad_()))


def test_moe_ops_backward_under_torch_compile():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(5, 32, generator=gen, requires_grad=True)
    w = torch.rand(3, 2, generator=gen, requires_grad=True)
    pos = torch.tensor([[0, 3], [-1, 4], [1, 2]], dtype=torch.int32)
    src = torch.tensor([2, 0, -1, 2], dtype=torch.int32)

    def f(y, w):
        return ops.moe_permute(ops.moe_unpermute_reduce(y, pos, w), src).square().sum()

    want = torch.autograd.grad(f(y, w), (y, w))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(y, w), (y, w))
    for g, r in zip(got, want):
        assert torch.equal(g, r), (g - r).abs().max()


# ---------------------------------------------------------------------------------------------
# ops that are not differentiable: the forward runs under grad mode, a backward through them raises

def test_fp8_ops_refuse_a_backward():
    x = torch.randn(4, 256, requires_grad=True)
    src = torch.tensor([1, -1, 3], dtype=torch.int32)
    q, s = ops.moe_permute_fp8(x, src)  # the forward still runs (inference under grad mode)
    with pytest.raises(RuntimeError, match="moe_permute_fp8 is not differentiable"):
        s.sum().backward()
    q, s = per_token_cast_to_fp8(x)
    with pytest.raises(RuntimeError, match="per_token_cast_to_fp8 is not differentiable"):
        (q.float() * s.repeat_interleave(128, 1)).sum().backward()
    with pytest.raises(RuntimeError, match="per_block_cast_to_fp8 is not differentiable"):
        ops.per_block_cast_to_fp8(x)[1].sum().backward()


def test_inference_fp8_linear_refuses_a_backward():
    """An inference Fp8Linear (e4m3 weight) under grad mode: the forward runs; a backward raises (train with
    master_weight=True)."""
    layer = Fp8Linear.from_linear(nn.Linear(128, 64))
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y.detach(), layer(x))
    with pytest.raises(RuntimeError, match="master_weight=True"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------
# nn.MoE under autograd

def _moe(**kw):
    torch.manual_seed(5)
    args = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    return MoE(**{**args, **kw})


def _moe_dense_reference(layer, x):
    """sum_j w_j * expert_j(x) + shared(x), token by token in plain torch (the same parameters)."""
    idx, w = layer.gate(x)
    out = []
    for t in range(x.size(0)):
        acc = sum(w[t, j] * layer.experts[str(int(idx[t, j]))](x[t:t + 1])[0].float() for j in range(idx.size(1)))
        out.append(acc.to(x.dtype))
    return torch.stack(out) + layer.shared_experts(x)


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_moe_layer_gradients(tokens):
    """Under autograd nn.MoE runs permute -> experts -> unpermute_reduce: the same output as the inference
    path (bit for bit), and the gradients of x, the router and every expert equal a token-by-token
    formulation's."""
    layer = _moe()
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
    out = layer(x)
    with torch.no_grad(), cpu_fast_path(False):
        assert torch.equal(out.detach(), layer(x)), "training path output differs from the inference path"
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    want = torch.autograd.grad(_moe_dense_reference(layer, x), params, grad_out, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, got, want):
        if r is None:  # an expert no token chose: no gradient either way
            assert g is None or not g.any(), name
            continue
        assert g is not None, f"{name}: no gradient"
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5), f"{name}: max err {(g - r).abs().max():.3g}"
    assert got[names.index("gate.weight")].abs().sum() > 0, "the router got no gradient"


@pytest.mark.parametrize("kw", [{"capacity": 64}, {"fp8_dispatch": True}])
def test_moe_layer_refuses_backward_through_the_dispatch_wire(kw):
    layer = _moe(**kw)
    x = torch.randn(5, 32 if "fp8_dispatch" not in kw else 32, requires_grad=True)
    if "fp8_dispatch" in kw:  # fp8 dispatch needs H a multiple of 128? use what the layer takes
        layer = _moe(hidden_size=128, **kw)
        x = torch.randn(5, 128, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        assert torch.equal(out.detach(), layer(x))
    with pytest.raises(RuntimeError, match="expert-parallel dispatch moves bytes"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# FP8 training of the tiny DeepSeek-V3 model vs bf16 training

def training_config() -> DeepseekV3Config:
    """A DeepSeek-V3 small enough to train a few hundred steps on 2 busy CPU cores: MLA with q LoRA, one dense
    layer then one MoE layer (8 routed experts, top-2 in group-limited routing, one shared expert); every
    GEMM dimension a multiple of 16 (the FP8 kernels' shapes)."""
    return DeepseekV3Config(
        vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_nextn_predict_layers=0, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.0, kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16,
        v_head_dim=32, qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, max_position_embeddings=256, rope_scaling=None, bos_token_id=0, eos_token_id=1)


def _swap_linears(model: nn.Module, make) -> int:
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                new = make(child)
                new.weight = child.weight
                setattr(module, name, new)
                n += 1
    return n


def _plain(linear):
    return nn.Linear(linear.in_features, linear.out_features, bias=False)


def _bf16(linear):
    return Bf16GemmLinear(linear.in_features, linear.out_features, bias=False)


def toy_batch(gen: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Next-token toy task: each sequence is an arithmetic progression mod ``vocab`` with a random start and a
    random stride from a small set (the stride must be inferred from the context: attention is needed)."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.tensor([1, 3, 5, 7])[torch.randint(0, 4, (batch, 1), generator=gen)]
    return (start + stride * torch.arange(length)) % vocab


STEPS, WINDOW, LOSS_TOLERANCE = 200, 20, 0.05
GRAD_COSINE, WEIGHT_GRAD_COSINE_MEDIAN, WEIGHT_GRAD_COSINE_MIN = 0.99, 0.99, 0.95


def test_fp8_training_of_the_tiny_model_tracks_bf16():
    """Train the tiny DeepSeek-V3 (deepkernels.model, MLA + MoE) with every linear layer but the LM head as an
    FP8 training Fp8Linear (fp32 master weights; FP8 forward, dgrad and wgrad GEMMs), and the same model with
    bf16 GEMMs (bf16 operands, fp32 accumulation), from the same init on the same batches, AdamW.
    Stated tolerances: every WINDOW-step mean loss within LOSS_TOLERANCE nats of bf16's; the loss falls; at
    every step the whole gradient (all parameters) has cosine >= GRAD_COSINE with the bf16-GEMM gradient at the
    same weights, batch and routing; and each 2-D weight's gradient (attention, dense MLP, router, each expert
    that got tokens, shared expert) has a median cosine over the steps >= WEIGHT_GRAD_COSINE_MEDIAN and a
    minimum >= WEIGHT_GRAD_COSINE_MIN. (Per weight and per step, the MLA query projections' gradients dip to
    ~0.97 once attention is sharp, late in training: the softmax backward amplifies the e4m3 rounding of the
    upstream dgrads; bf16 GEMMs vs fp32 stay at ~0.9997 there.)"""
    with num_threads(1):
        cfg = training_config()
        torch.manual_seed(0)
        base = DeepseekV3ForCausalLM(cfg)  # the modules' default initialisation (nn.Linear's, N(0, 1) embeddings)
        assert _swap_linears(base, _bf16) == 41  # attention 2x5, dense MLP 3, routed 8x3, shared 3, LM head
        fp8_model = copy.deepcopy(base)
        for module in list(fp8_model.modules()):  # back to nn.Linear, then to FP8 training linears
            for name, child in list(module.named_children()):
                if isinstance(child, Bf16GemmLinear) and child is not fp8_model.lm_head:
                    plain = _plain(child)
                    plain.weight = child.weight
                    setattr(module, name, plain)
        convert_linears_for_fp8_training_(fp8_model)
        assert sum(isinstance(m, Fp8Linear) and m.master_weight for m in fp8_model.modules()) == 40
        bf16_model, twin = copy.deepcopy(base), copy.deepcopy(base)
        opt_fp8 = torch.optim.AdamW(fp8_model.parameters(), lr=1e-3)
        opt_bf16 = torch.optim.AdamW(bf16_model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        vocab = cfg.vocab_size

        def loss_of(model, ids):
            logits = model(ids[:, :-1])
            return F.cross_entropy(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))

        # routing replay: the twin takes the FP8 run's top-k choices (a discrete choice has no gradient; a token
        # whose k-th and (k+1)-th scores nearly tie may pick another expert under other rounding)
        routing, flips = {}, [0, 0]

        def record(gate, inputs, output):
            routing[gate] = output[0]

        def replay(gate, inputs, output):
            idx = routing[fp8_gates[twin_gates.index(gate)]]
            flips[0] += int((output[0].sort(-1)[0] != idx.sort(-1)[0]).any(-1).sum())
            flips[1] += idx.size(0)
            w = F.linear(inputs[0].float(), gate.weight.float()).sigmoid().gather(1, idx)
            return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * gate.routed_scaling_factor

        fp8_gates = [m for m in fp8_model.modules() if isinstance(m, MoEGate)]
        twin_gates = [m for m in twin.modules() if isinstance(m, MoEGate)]
        assert len(fp8_gates) == 1 and fp8_gates[0].topk_method == "noaux_tc" and fp8_gates[0].norm_topk_prob
        for g in fp8_gates:
            g.register_forward_hook(record)
        for g in twin_gates:
            g.register_forward_hook(replay)

        losses_fp8, losses_bf16, total_cos, weight_cos = [], [], [], {}
        for step in range(STEPS):
            ids = toy_batch(gen, 8, 17, vocab)
            opt_fp8.zero_grad()
            loss = loss_of(fp8_model, ids)
            loss.backward()
            twin.load_state_dict(fp8_model.state_dict())  # the bf16-GEMM gradient at the FP8 run's weights
            twin.zero_grad()
            loss_of(twin, ids).backward()
            grads = []
            for (name, p), q in zip(fp8_model.named_parameters(), twin.parameters()):
                assert (p.grad is None) == (q.grad is None), f"step {step}: {name} got a gradient in one run only"
                if p.grad is not None:
                    grads.append((p.grad.flatten(), q.grad.flatten()))
                    if p.dim() == 2:
                        weight_cos.setdefault(name, []).append(cosine(p.grad, q.grad))
            total_cos.append(cosine(torch.cat([g for g, _ in grads]), torch.cat([g for _, g in grads])))
            opt_fp8.step()
            opt_bf16.zero_grad()
            loss_bf16 = loss_of(bf16_model, ids)
            loss_bf16.backward()
            opt_bf16.step()
            losses_fp8.append(loss.item())
            losses_bf16.append(loss_bf16.item())
    windows = [(sum(losses_fp8[i:i + WINDOW]) / WINDOW, sum(losses_bf16[i:i + WINDOW]) / WINDOW)
               for i in range(0, STEPS, WINDOW)]
    medians = {n: sorted(c)[len(c) // 2] for n, c in weight_cos.items()}
    minima = {n: min(c) for n, c in weight_cos.items()}
    print(f"windows {[(round(a, 4), round(b, 4)) for a, b in windows]}; whole-gradient cosine min "
          f"{min(total_cos):.4f} (step {total_cos.index(min(total_cos))}); per weight: lowest median "
          f"{min(medians.values()):.4f} ({min(medians, key=medians.get)}), lowest min {min(minima.values()):.4f} "
          f"({min(minima, key=minima.get)}); routing differs for {flips[0]} of {flips[1]} tokens")
    assert min(total_cos) >= GRAD_COSINE, \
        f"step {total_cos.index(min(total_cos))}: whole-gradient cosine {min(total_cos):.4f}"
    assert all(m >= WEIGHT_GRAD_COSINE_MEDIAN for m in medians.values()), \
        {n: round(m, 4) for n, m in medians.items() if m < WEIGHT_GRAD_COSINE_MEDIAN}
    assert all(m >= WEIGHT_GRAD_COSINE_MIN for m in minima.values()), \
        {n: round(m, 4) for n, m in minima.items() if m < WEIGHT_GRAD_COSINE_MIN}
    assert any(".mlp.experts." in n for n in weight_cos) and any(".mlp.gate.weight" in n for n in weight_cos) and \
        any("self_attn.kv_b_proj" in n for n in weight_cos), sorted(weight_cos)
    for i, (fp8_loss, bf16_loss) in enumerate(windows):
        assert abs(fp8_loss - bf16_loss) <= LOSS_TOLERANCE, \
            f"steps {WINDOW * i}-{WINDOW * (i + 1) - 1}: FP8 loss {fp8_loss:.4f} vs bf16 {bf16_loss:.4f}; {windows}"
    assert windows[-1][0] < 0.5 * windows[0][0], f"FP8 training did not learn: {windows}"


def test_training_names_exported_from_the_top_level():
    from deepkernels import gemm
    from deepkernels.nn import linear

    for name, owner in (("wgrad_gemm_fp8_fp8_fp32_nt", gemm), ("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", gemm),
                        ("Fp8Linear", linear), ("fp8_linear", linear), ("convert_linears_for_fp8_training_", linear)):
        assert getattr(deepkernels, name) is getattr(owner, name) and name in deepkernels.__all__, name


def test_moe_layer_gradients_kernels(kernel_device):
    """nn.MoE's training path with the permute / unpermute-reduce kernels (CUDA, or emulated on the CPU):
    output and gradients equal the references'."""
    from deepkernels.testing import reference

    layer = _moe().to(kernel_device)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(8)).to(kernel_device).requires_grad_()
    grad_out = torch.randn(24, 32, generator=torch.Generator().manual_seed(9)).to(kernel_device)
    params = [x] + list(layer.parameters())
    out = layer(x)
    got = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    with reference():
        ref_out = layer(x)
        want = torch.autograd.grad(ref_out, params, grad_out, allow_unused=True)
    assert torch.equal(out, ref_out)
    for (name, _), g, r in zip([("x", None)] + list(layer.named_parameters()), got, want):
        assert (g is None) == (r is None), name
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), f"{name}: max err {(g - r).abs().max():.3g}"
