"""deepkernels.model on configs the main model tests do not cover, against transformers' DeepseekV3ForCausalLM /
DeepseekV2ForCausalLM (the oracle) on the same weights: q LoRA or not, MLA head dims other than DeepSeek's
(rows other than 512 + 64 run the pure-torch paged attention), head counts, expert counts and top-k, groups,
routing rules, shared experts, dense/MoE layer mixes, RoPE/YaRN variants and the softmax-scale mscale, norms'
eps, tied embeddings, attention biases, odd vocabularies; checkpoints saved by transformers; FP8 checkpoints
with dimensions that are not multiples of 128; MTP; the configs we refuse. Small sizes: the file runs in well
under a minute on two CPU cores."""
from __future__ import annotations

import json

import pytest
import torch

from deepkernels.model import CheckpointError, DeepseekV3Config, DeepseekV3ForCausalLM, generate, load_model
from deepkernels.model import save_pretrained
from deepkernels.model.config import PRESETS
from deepkernels.model.generation import make_cache
from deepkernels.model.hf import to_transformers
from deepkernels.nn.cpu_fast_path import cpu_fast_path
from deepkernels.testing import calc_diff, num_threads

transformers = pytest.importorskip("transformers")
# transformers builds its shared-expert MLP even with n_shared_experts=0 (zero-sized weights) and says so
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster (and far faster on a loaded 2-core machine)."""
    with num_threads(1):
        yield

# every size small and none a multiple of 128 (kv rows 32 + 8: the pure-torch paged attention)
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=256, num_nextn_predict_layers=0,
             rope_scaling=None)


def _yarn(factor, original, **kw):
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, **kw}


# name -> (preset, overrides on SMALL)
CONFIGS = {
    "v3": ("tiny", {}),
    "rms_norm_eps_1e-2": ("tiny", {"rms_norm_eps": 1e-2}),  # the latent norms keep eps 1e-6
    "no_q_lora": ("tiny", {"q_lora_rank": None}),
    "topk1": ("tiny", {"num_experts_per_tok": 1}),
    "topk6_one_group": ("tiny", {"num_experts_per_tok": 6, "n_group": 1, "topk_group": 1}),
    "topk_all_experts": ("tiny", {"num_experts_per_tok": 8, "n_group": 1, "topk_group": 1}),
    "topk10_of_16": ("tiny", {"n_routed_experts": 16, "num_experts_per_tok": 10, "n_group": 4, "topk_group": 3}),
    "32_experts_8_groups": ("tiny", {"n_routed_experts": 32, "n_group": 8, "topk_group": 3,
                                     "num_experts_per_tok": 6}),
    "unnormalised_scaled": ("tiny", {"norm_topk_prob": False, "routed_scaling_factor": 1.7}),
    "no_shared_expert": ("tiny", {"n_shared_experts": 0}),
    "two_shared_experts": ("tiny", {"n_shared_experts": 2}),
    "all_dense": ("tiny", {"first_k_dense_replace": 2}),
    "all_moe": ("tiny", {"first_k_dense_replace": 0}),
    "moe_every_2nd_layer": ("tiny", {"num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 2}),
    "moe_every_3rd_layer": ("tiny", {"num_hidden_layers": 4, "first_k_dense_replace": 0, "moe_layer_freq": 3}),
    "no_routed_experts": ("tiny", {"n_routed_experts": 0}),
    "one_layer": ("tiny", {"num_hidden_layers": 1, "first_k_dense_replace": 0}),
    "three_layers": ("tiny", {"num_hidden_layers": 3}),
    "yarn": ("tiny", {"rope_scaling": _yarn(4.0, 64, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)}),
    "yarn_mscale_differs": ("tiny", {"rope_scaling": _yarn(40, 8, mscale=1.0, mscale_all_dim=0.5)}),
    "yarn_no_mscale": ("tiny", {"rope_scaling": _yarn(4.0, 64)}),
    "yarn_no_factor": ("tiny", {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 64,
                                                 "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "rope_theta": ("tiny", {"rope_theta": 50000.0}),
    "half_rotated_rope": ("tiny", {"rope_interleave": False}),
    "tied_embeddings": ("tiny", {"tie_word_embeddings": True}),
    "attention_bias": ("tiny", {"attention_bias": True}),
    "attention_bias_no_q_lora": ("tiny", {"attention_bias": True, "q_lora_rank": None}),
    "odd_vocab": ("tiny", {"vocab_size": 1001}),
    "kv_512_rope_64": ("tiny", {"kv_lora_rank": 512, "qk_rope_head_dim": 64}),  # the decode kernel's rows
    "kv_448_rope_128": ("tiny", {"kv_lora_rank": 448, "qk_rope_head_dim": 128}),  # 576-dim rows, not the kernel's
    "rope_dim_2": ("tiny", {"qk_rope_head_dim": 2}),
    "wide_heads": ("tiny", {"qk_nope_head_dim": 40, "v_head_dim": 56}),
    "one_head": ("tiny", {"num_attention_heads": 1, "num_key_value_heads": 1}),
    "seven_heads": ("tiny", {"num_attention_heads": 7, "num_key_value_heads": 7}),
    "v2": ("tiny-v2", {}),
    "v2_greedy": ("tiny-v2", {"topk_method": "greedy", "n_group": 1, "topk_group": 1}),
    "v2_group_limited": ("tiny-v2", {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}),
    "v2_lite": ("tiny-v2-lite", {}),
    "v2_topk1": ("tiny-v2", {"num_experts_per_tok": 1}),
    "v2_no_shared_expert": ("tiny-v2", {"n_shared_experts": 0}),
    "v2_rms_norm_eps_1e-2": ("tiny-v2", {"rms_norm_eps": 1e-2}),
    "v2_yarn": ("tiny-v2", {"rope_scaling": _yarn(4.0, 64, beta_fast=32, beta_slow=1, mscale=0.707,
                                                  mscale_all_dim=0.707)}),
    "v2_scale16": ("tiny-v2", {"routed_scaling_factor": 16.0}),
    "v2_one_expert_per_group": ("tiny-v2", {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 2}),
    "v2_greedy_ignores_groups": ("tiny-v2", {"topk_method": "greedy", "n_group": 3, "topk_group": 2,
                                             "num_experts_per_tok": 5}),
    "v3_all_groups_kept": ("tiny", {"n_group": 4, "topk_group": 4, "num_experts_per_tok": 3}),
    "v3_two_experts": ("tiny", {"n_routed_experts": 2, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2}),
    "v2_moe_every_2nd_layer": ("tiny-v2", {"num_hidden_layers": 3, "first_k_dense_replace": 0, "moe_layer_freq": 2}),
}

_MODELS: dict = {}


def config(name: str, **extra) -> DeepseekV3Config:
    preset, overrides = CONFIGS[name]
    return DeepseekV3Config.from_dict({**PRESETS[preset]().to_dict(), **SMALL, **overrides, **extra})


def get_model(name: str, dtype=torch.float32) -> DeepseekV3ForCausalLM:
    if (name, dtype) not in _MODELS:
        _MODELS[name, dtype] = DeepseekV3ForCausalLM(config(name), dtype=dtype).init_random_weights(0).eval()
    return _MODELS[name, dtype]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _paged_logits(model, ids, prefill: int):
    cache = make_cache(model, ids.size(0), 32, page_size=16)  # 16-token pages: sequences straddle a page
    steps = [model(ids[:, :prefill], cache=cache, prefill=True)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, ids.size(1))]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_paged_decode_match_transformers(name):
    """Full forward (CPU fast path and op references) and paged decode (prefill 5, then 1 token per step) vs
    transformers on the same weights, fp32: max relative error < 1e-5."""
    model = get_model(name)
    hf = to_transformers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        results = {"forward": model(ids), "paged decode": _paged_logits(model, ids, 5)}
        with cpu_fast_path(False):
            results["forward (references)"] = model(ids)
            results["paged decode (references)"] = _paged_logits(model, ids, 5)
    for what, ours in results.items():
        err = rel_err(ours, ref)
        assert err < 1e-5, f"{name}: {what} vs transformers, max rel err {err:.2e}"


@pytest.mark.parametrize("name", ["v3", "no_q_lora", "kv_512_rope_64", "kv_448_rope_128"])
def test_fast_path_paged_decode_low_precision_cache_equals_references(name):
    """bf16 caches: the fast path's attention equals the reference of the rows' geometry (the decode kernel's
    bf16 query/output roundings for 512 + 64 rows, mla_attention_fp32's fp32 maths for others); fp8 caches run
    the references; both stay close to the fp32 forward."""
    model = get_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))

    def paged(cache_dtype):
        cache = make_cache(model, 2, 32, page_size=16, dtype=cache_dtype)
        steps = [model(ids[:, :5], cache=cache, prefill=True)]
        return torch.cat(steps + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 19)], 1)

    with torch.no_grad():
        exact = model(ids)
        for cache_dtype, tol in ((torch.bfloat16, 1e-5), (torch.float8_e4m3fn, 1e-3)):
            fast = paged(cache_dtype)
            with cpu_fast_path(False):
                ref = paged(cache_dtype)
            assert calc_diff(fast, ref) < 1e-7, f"{name} {cache_dtype}: fast vs references {calc_diff(fast, ref):.2e}"
            assert calc_diff(ref, exact) < tol, f"{name} {cache_dtype}: vs fp32 forward {calc_diff(ref, exact):.2e}"


def test_latent_norms_keep_eps_1e6():
    """q_a_layernorm / kv_a_layernorm use eps 1e-6 whatever rms_norm_eps (DeepSeek's reference code and
    transformers); the layer norms use rms_norm_eps."""
    model = get_model("rms_norm_eps_1e-2")
    attn = model.model.layers[0].self_attn
    assert attn.q_a_layernorm.eps == 1e-6 and attn.kv_a_layernorm.eps == 1e-6
    assert model.model.layers[0].input_layernorm.eps == 1e-2 and model.model.norm.eps == 1e-2


@pytest.mark.parametrize("name", ["v3", "no_q_lora", "kv_512_rope_64", "v2", "v2_lite", "yarn_mscale_differs",
                                  "tied_embeddings", "one_head"])
def test_greedy_generate_varied_prompt_lengths_matches_transformers(name):
    """A batch of prompts of lengths 3, 9, 1, 6 (right-padded prefill, per-sequence lengths): token for token
    transformers' greedy generate on each prompt alone, and our references and no-cache recomputation."""
    model = get_model(name)
    hf = to_transformers(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    ours = generate(model, prompts, max_new_tokens=6)
    with cpu_fast_path(False):
        refs = generate(model, prompts, max_new_tokens=6)
    recomputed = generate(model, prompts, max_new_tokens=6, use_cache=False)
    for i, p in enumerate(prompts):
        peer = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0]
        for other, what in ((peer, "transformers"), (refs[i], "references"), (recomputed[i], "no cache")):
            assert torch.equal(ours[i], other), f"{name} prompt {i}: {ours[i].tolist()} vs {what} {other.tolist()}"


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_generate_attention_mask_left_padding_equals_transformers(name):
    """A left-padded [B, T] batch with an attention_mask: exactly transformers' batched generate (its output
    tensor: the padded prompts, then the new tokens); right padding gives each prompt's own tokens too."""
    model = get_model(name)
    hf = to_transformers(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g) for n in (3, 9, 1, 6)]
    t = 9
    left, right = torch.zeros(4, t, dtype=torch.long), torch.full((4, t), 7, dtype=torch.long)
    left_mask, right_mask = torch.zeros(4, t, dtype=torch.long), torch.zeros(4, t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        left[i, t - len(p):], left_mask[i, t - len(p):] = p, 1
        right[i, :len(p)], right_mask[i, :len(p)] = p, True
    peer = hf.generate(left, attention_mask=left_mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    ours = generate(model, left, max_new_tokens=6, attention_mask=left_mask)
    assert torch.equal(ours, peer), f"{name}: ours {ours.tolist()} vs transformers {peer.tolist()}"
    ours_right = generate(model, right, max_new_tokens=6, attention_mask=right_mask)
    assert torch.equal(ours_right[:, :t], right) and torch.equal(ours_right[:, t:], peer[:, t:])


def test_generate_attention_mask_errors():
    model = get_model("v3")
    ids = torch.ones(2, 4, dtype=torch.long)
    cases = [
        (dict(attention_mask=torch.ones(2, 3)), TypeError, "attention_mask: expected a bool or integer tensor"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), ValueError, r"shape of input_ids \(2, 4\)"),
        (dict(attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])), ValueError, "row 0 has padding between"),
        (dict(attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])), ValueError, "row 0 has no token"),
        (dict(attention_mask=torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]])), ValueError, r"values 0 \(padding\)"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            generate(model, ids, max_new_tokens=1, **kwargs)
    with pytest.raises(TypeError, match="only with input_ids given as a"):
        generate(model, [[1, 2]], max_new_tokens=1, attention_mask=torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize("name", ["all_dense", "no_q_lora", "kv_512_rope_64", "v2"])
def test_bf16_model_close_to_transformers_bf16(name):
    """bf16 weights and activations, a bf16 paged cache: ours (fast path, references, paged decode) and
    transformers' bf16 model are each as close to the fp32 model as the other. All layers dense: bf16 noise
    (anyone's) flips a random router's near-tie choices, which says nothing about either implementation."""
    cfg = config(name, first_k_dense_replace=SMALL["num_hidden_layers"])
    m32 = DeepseekV3ForCausalLM(cfg).init_random_weights(0).eval()
    m16 = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).init_random_weights(0).eval()
    hf = to_transformers(m16)
    ids = torch.randint(0, m32.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, peer = m32(ids), hf(ids).logits
        with cpu_fast_path(False):
            ours = {"references": m16(ids)}
        ours.update({"forward": m16(ids), "paged decode": _paged_logits(m16, ids, 5)})
    peer_diff = calc_diff(peer, exact)
    for what, logits in ours.items():
        assert logits.dtype == torch.bfloat16
        diff = calc_diff(logits, exact)
        assert diff < max(4 * peer_diff, 2e-4), f"{name} bf16 {what}: calc_diff vs fp32 {diff:.2e}, " \
                                                f"transformers bf16's {peer_diff:.2e}"


# ------------------------------------------------------------------------------------------------
# checkpoints saved by transformers (random init), FP8 checkpoints with odd dimensions

_HF_BASE = {k: v for k, v in SMALL.items() if k not in ("num_nextn_predict_layers", "rope_scaling")}
_HF_V2 = {"topk_method": "group_limited_greedy"}
_HF_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
HF_CHECKPOINTS = {
    "v3": ("v3", {}),
    "v3_no_q_lora": ("v3", {"q_lora_rank": None}),
    "v3_no_shared_expert": ("v3", {"n_shared_experts": 0}),  # transformers saves [0, H] shared experts
    "v3_rms_norm_eps": ("v3", {"rms_norm_eps": 1e-3}),
    "v3_tied_bias": ("v3", {"tie_word_embeddings": True, "attention_bias": True}),
    "v3_yarn": ("v3", {"rope_parameters": {**_HF_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "v3_yarn_no_factor": ("v3", {"rope_parameters": {**_HF_YARN, "factor": None, "mscale": 1.0}}),
    "v3_half_rotated_all_moe": ("v3", {"rope_interleave": False, "first_k_dense_replace": 0}),
    "v3_odd_sizes": ("v3", {"vocab_size": 1001, "hidden_size": 72, "moe_intermediate_size": 40}),
    "v2": ("v2", _HF_V2),
    "v2_greedy_no_q_lora": ("v2", {"topk_method": "greedy", "n_group": None, "topk_group": None,
                                   "q_lora_rank": None}),
    "v2_no_shared_expert": ("v2", {**_HF_V2, "n_shared_experts": 0}),
    "v2_yarn": ("v2", {**_HF_V2, "rope_parameters": {**_HF_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}),
}


@pytest.mark.parametrize("name", list(HF_CHECKPOINTS))
def test_checkpoint_saved_by_transformers_random_init(tmp_path, name):
    """transformers' save_pretrained of a randomly initialised DeepseekV3/V2ForCausalLM (weights rescaled so
    routing and attention matter, a random correction bias) loads with our loader: same logits."""
    kind, overrides = HF_CHECKPOINTS[name]
    cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    cfg_cls = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
    torch.manual_seed(0)
    cfg = cfg_cls(**{**_HF_BASE, **overrides})
    cfg._attn_implementation = "eager"
    hf = cls(cfg).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if p.numel() and p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif key.endswith("norm.weight"):
                p.normal_(1, 0.1)
        for key, b in hf.named_buffers():
            if key.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    hf.save_pretrained(str(tmp_path))
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(ours(ids), hf(ids).logits)
    assert err < 1e-5, f"{name}: our load of transformers' checkpoint, logits max rel err {err:.2e}"


def test_router_stays_fp32_in_a_bf16_model(tmp_path):
    """As transformers' from_pretrained keeps gate.weight (and the correction bias) in fp32 in a bf16 model, so
    do we: the router's weights load exactly from an fp32 checkpoint, and to_transformers' oracle does the same."""
    model = get_model("v3")
    save_pretrained(model, str(tmp_path))
    m16 = load_model(str(tmp_path), dtype=torch.bfloat16)
    gate, gate32 = m16.model.layers[1].mlp.gate, model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, gate32.weight)
    assert m16.model.layers[1].mlp.experts["0"].gate_proj.weight.dtype == torch.bfloat16
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert peer.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert to_transformers(m16).model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_tied_config_with_its_own_lm_head_in_the_checkpoint(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the checkpoint anyway: transformers' from_pretrained unties
    and uses it, so do we (and save_pretrained then writes it, so the checkpoint round-trips)."""
    from safetensors.torch import load_file, save_file

    model = get_model("tied_embeddings")
    save_pretrained(model, str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape,
                                            generator=torch.Generator().manual_seed(4)) / 8
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(str(tmp_path / "a"))
    assert not ours.lm_head_tied and torch.equal(ours.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(ours.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "a"), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ref = ours(ids), peer(ids).logits
        oracle = to_transformers(ours)(ids).logits
    assert rel_err(logits, ref) < 1e-5 and rel_err(logits, oracle) < 1e-5, \
        f"untied head: vs transformers {rel_err(logits, ref):.2e}, vs to_transformers {rel_err(logits, oracle):.2e}"
    save_pretrained(ours, str(tmp_path / "b"))
    again = load_model(str(tmp_path / "b"))
    with torch.no_grad():
        assert torch.equal(again(ids), logits)
    assert get_model("tied_embeddings").lm_head_tied  # a checkpoint without the key stays tied


_ODD = {"hidden_size": 200, "intermediate_size": 300, "moe_intermediate_size": 72, "q_lora_rank": 100,
        "kv_lora_rank": 136, "vocab_size": 999}


@pytest.mark.parametrize("name,extra", [("v3", _ODD), ("no_q_lora", {**_ODD, "q_lora_rank": None}),
                                        ("attention_bias", _ODD), ("v2", _ODD)], ids=["v3", "no_q_lora",
                                                                                     "bias", "v2"])
def test_fp8_checkpoint_with_dims_not_multiple_of_128(tmp_path, name, extra):
    """An FP8 checkpoint (e4m3 weights + 128x128 weight_scale_inv, partial edge blocks): the FP8 model is close
    to its dequantised twin, which equals transformers on the dequantised weights; decode runs."""
    model = DeepseekV3ForCausalLM(config(name, **extra)).init_random_weights(0).eval()
    save_pretrained(model, str(tmp_path), fp8=True)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == \
        [128, 128]
    fp8, dequant = load_model(str(tmp_path)), load_model(str(tmp_path), dequantize_fp8=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, ref = fp8(ids), dequant(ids), to_transformers(dequant)(ids).logits
    assert rel_err(b, ref) < 1e-5, f"{name}: dequantised FP8 checkpoint vs transformers {rel_err(b, ref):.2e}"
    assert calc_diff(a, b) < 1e-2, f"{name}: FP8 model vs dequantised, calc_diff {calc_diff(a, b):.2e}"
    assert generate(fp8, ids[:, :4], max_new_tokens=3).shape == (2, 7)


@pytest.mark.parametrize("name", ["rms_norm_eps_1e-2", "no_q_lora", "yarn_mscale_differs", "all_moe"])
def test_mtp_matches_transformers_mtp_model(tmp_path, name):
    """The MTP layer (MLA latent norms at eps 1e-6, enorm/hnorm at rms_norm_eps) vs transformers' MtpModel
    reading our checkpoint; speculative greedy decoding gives plain greedy's tokens."""
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    cfg = config(name, num_nextn_predict_layers=1)
    model = DeepseekV3ForCausalLM(cfg, mtp=True).init_random_weights(0).eval()
    save_pretrained(model, str(tmp_path))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
    mtp = modeling_layers.MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = hf(ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(11)[None].expand(2, 11)
        ref = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:]))
        ours = model.mtp_logits(ids)
    assert rel_err(ours, ref) < 1e-5, f"{name}: MTP logits vs transformers' MtpModel {rel_err(ours, ref):.2e}"
    spec = generate(model, ids[:, :5], max_new_tokens=6, use_mtp=True)
    assert torch.equal(spec, generate(model, ids[:, :5], max_new_tokens=6))
    prompts = [ids[0, :7].tolist(), ids[1, :2].tolist()]  # varied lengths
    spec = generate(model, prompts, max_new_tokens=5, use_mtp=True)
    for a, b in zip(spec, generate(model, prompts, max_new_tokens=5)):
        assert torch.equal(a, b), f"{name}: speculative {a.tolist()} vs greedy {b.tolist()}"


# ------------------------------------------------------------------------------------------------
# refused configs and inputs: a clear error naming the field, never a silent wrong answer

REFUSED = {
    "groups_not_dividing_experts": ({"n_routed_experts": 8, "n_group": 3, "topk_group": 1},
                                    ["n_routed_experts", "multiple of n_group=3", "8"]),
    "one_expert_per_group_noaux_tc": ({"n_routed_experts": 8, "n_group": 8, "topk_group": 2},
                                      ["n_group", "two best experts", "8 / 8 = 1"]),
    "topk_group_above_n_group": ({"topk_group": 3}, ["topk_group", "1..n_group=2", "3"]),
    "topk_above_allowed_groups": ({"num_experts_per_tok": 5}, ["num_experts_per_tok", "<= topk_group", "5"]),
    "topk_above_experts": ({"num_experts_per_tok": 9, "n_group": 1}, ["num_experts_per_tok", "1..n_routed", "9"]),
    "kv_heads_differ": ({"num_key_value_heads": 2}, ["num_key_value_heads", "num_attention_heads=4", "2"]),
    "gelu": ({"hidden_act": "gelu"}, ["hidden_act", "'silu'", "'gelu'"]),
    "linear_rope": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling.type", "'yarn'", "linear"]),
    "odd_rope_dim": ({"qk_rope_head_dim": 7}, ["qk_rope_head_dim", "even", "7"]),
    "fp8_block_64": ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
                     ["quantization_config", "[128, 128]", "64"]),
    "softmax_v3_router_unknown": ({"scoring_func": "tanh"}, ["scoring_func", "'sigmoid'", "'tanh'"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_config_refused_at_load(tmp_path, name):
    overrides, words = REFUSED[name]
    d = {**PRESETS["tiny"]().to_dict(), **SMALL, **overrides}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as info:
        load_model(str(tmp_path), random_init=True)
    for word in words:
        assert word in str(info.value), f"{name}: {word!r} not in {info.value}"
    assert "config.json" in str(info.value)


def test_sequence_longer_than_max_position_embeddings_refused():
    model = DeepseekV3ForCausalLM(config("v3", max_position_embeddings=16)).init_random_weights(0).eval()
    ids = torch.randint(0, 1000, (1, 17))
    with pytest.raises(ValueError, match=r"input_ids: 17 tokens exceed max_position_embeddings=16"):
        model(ids)
    cache = make_cache(model, 1, 32)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(ids, cache=cache, prefill=True)
    with pytest.raises(ValueError, match=r"\(17 tokens\) \+ max_new_tokens \(1\) = 18 exceeds "
                                         r"max_position_embeddings=16"):
        generate(model, ids, max_new_tokens=1)
    assert model(ids[:, :16]).shape == (1, 16, 1000)
    assert generate(model, ids[:, :10], max_new_tokens=6).shape == (1, 16)
