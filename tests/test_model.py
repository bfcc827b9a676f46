"""deepkernels.model: config parsing, logits vs transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM,
paged decode, generate, checkpoint loading (sharded, FP8, errors, V2 checkpoints saved by transformers),
expert parallelism, CLI, MTP layers and speculative decoding. Tiny configs, CPU, fp32."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepkernels.model import (CheckpointError, DeepseekV3Config, DeepseekV3ForCausalLM, generate, load_model,
                               save_pretrained)
from deepkernels.model.config import PRESETS
from deepkernels.model.generation import make_cache
from deepkernels.model.hf import to_transformers
from deepkernels.testing import calc_diff, reference

transformers = pytest.importorskip("transformers")

# DeepSeek-V3's released config.json (the fields that matter), as the loader must read it.
V3_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


# DeepSeek-V2's and V2-Lite's released config.json (the fields that matter).
_V2_COMMON = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "initializer_range": 0.02, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_layer_freq": 1, "n_shared_experts": 2, "norm_topk_prob": False, "num_experts_per_tok": 6,
    "pretraining_tp": 1, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
V2_CONFIG_JSON = {**_V2_COMMON, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                  "n_group": 8, "n_routed_experts": 160, "num_attention_heads": 128, "num_hidden_layers": 60,
                  "num_key_value_heads": 128, "q_lora_rank": 1536, "routed_scaling_factor": 16.0, "topk_group": 3,
                  "topk_method": "group_limited_greedy"}
V2_LITE_CONFIG_JSON = {**_V2_COMMON, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                       "n_group": 1, "n_routed_experts": 64, "num_attention_heads": 16, "num_hidden_layers": 27,
                       "num_key_value_heads": 16, "q_lora_rank": None, "routed_scaling_factor": 1.0, "topk_group": 1,
                       "topk_method": "greedy"}


def tiny(preset: str = "tiny", **overrides) -> DeepseekV3Config:
    return DeepseekV3Config.from_dict({**PRESETS[preset]().to_dict(), **overrides})


# variants: the built-in tiny; no q LoRA (V2-Lite style), plain RoPE, half-rotated rope layout, tied embeddings,
# more shared experts, attention biases; DeepSeek-V2 (softmax, group-limited greedy, q LoRA) and V2-Lite
# (softmax, greedy, no q LoRA), compared with transformers' DeepseekV2ForCausalLM
CONFIGS = {
    "tiny": ("tiny", {}),
    "no_q_lora_no_yarn": ("tiny", {"q_lora_rank": None, "rope_scaling": None, "rope_interleave": False,
                                   "tie_word_embeddings": True, "num_hidden_layers": 3,
                                   "first_k_dense_replace": 0, "n_shared_experts": 2, "norm_topk_prob": False,
                                   "attention_bias": True}),
    "v2": ("tiny-v2", {}),
    "v2_lite": ("tiny-v2-lite", {}),
}
# all layers dense: no top-k routing whose choice a low-precision perturbation could flip
OTHER_CONFIGS = {"dense": ("tiny", {"first_k_dense_replace": 3})}

_MODELS: dict = {}


def get_model(name: str, mtp: bool = False) -> DeepseekV3ForCausalLM:
    if (name, mtp) not in _MODELS:
        preset, overrides = {**CONFIGS, **OTHER_CONFIGS}[name]
        _MODELS[name, mtp] = DeepseekV3ForCausalLM(tiny(preset, **overrides), dtype=torch.float32,
                                                   mtp=mtp).init_random_weights(0).eval()
    return _MODELS[name, mtp]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------------------------------------
# config

def test_config_reads_deepseek_v3_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_CONFIG_JSON))
    c = DeepseekV3Config.from_json_file(str(tmp_path))
    assert (c.hidden_size, c.num_hidden_layers, c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim) == (7168, 61, 1536, 512, 192)
    assert c.is_fp8 and c.yarn["factor"] == 40 and c.yarn["rope_type"] == "yarn"
    assert not c.is_moe_layer(2) and c.is_moe_layer(3) and c.is_moe_layer(60)
    every_other = DeepseekV3Config.from_dict({**V3_CONFIG_JSON, "moe_layer_freq": 2})
    assert [every_other.is_moe_layer(i) for i in range(2, 7)] == [False, False, True, False, True]
    # DeepSeek-V3's softmax scale with the YaRN mscale correction: 192^-0.5 * (0.1 ln 40 + 1)^2
    import math
    assert math.isclose(c.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel_tol=1e-12)
    assert DeepseekV3Config.from_dict(c.to_dict()) == c
    v2_lite = DeepseekV3Config.from_dict({**V3_CONFIG_JSON, "q_lora_rank": None, "quantization_config": None})
    assert v2_lite.q_lora_rank is None and not v2_lite.is_fp8


def test_full_deepseek_v3_builds_with_671b_parameters():
    """The released config on the meta device: 671B parameters, FP8 linears with 128x128 block scales."""
    c = DeepseekV3Config.from_dict(V3_CONFIG_JSON)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(c, dtype=torch.bfloat16)
    state = model.state_dict()
    n = sum(t.numel() for k, t in state.items() if not k.endswith("weight_scale_inv"))
    assert 670.9e9 < n < 671.1e9, f"{n / 1e9:.3f}B parameters"
    assert state["model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"].shape == (56, 16)
    assert state["model.layers.0.self_attn.kv_b_proj.weight"].shape == (128 * 256, 512)
    assert state["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.2.mlp.gate_proj.weight" in state and "model.layers.3.mlp.gate.e_score_correction_bias" in state


@pytest.mark.parametrize("name,cfg,billions", [("V2", V2_CONFIG_JSON, 235.74), ("V2-Lite", V2_LITE_CONFIG_JSON, 15.71)])
def test_deepseek_v2_config_json_builds_with_published_size(tmp_path, name, cfg, billions):
    """DeepSeek-V2 (236B) and V2-Lite (15.7B) as released: V2 routing, no correction bias, no MTP layer."""
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = DeepseekV3Config.from_json_file(str(tmp_path))
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == ("softmax", cfg["topk_method"], False)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (cfg["n_group"], cfg["topk_group"],
                                                                 cfg["routed_scaling_factor"])
    assert c.q_lora_rank == cfg["q_lora_rank"] and c.num_nextn_predict_layers == 0 and c.is_v2_routing
    assert c.model_type == "deepseek_v2" and c.to_dict()["architectures"] == ["DeepseekV2ForCausalLM"]
    assert not c.is_moe_layer(0) and c.is_moe_layer(1)
    assert DeepseekV3Config.from_dict(c.to_dict()) == c
    # a dense and an MoE layer on the meta device; the other MoE layers are the same size
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict({**cfg, "num_hidden_layers": 2}), dtype=torch.bfloat16)
    state = model.state_dict()
    moe_layer = sum(t.numel() for k, t in state.items() if k.startswith("model.layers.1."))
    n = sum(t.numel() for t in state.values()) + (c.num_hidden_layers - 2) * moe_layer
    assert abs(n / 1e9 - billions) < 0.01, f"{name}: {n / 1e9:.3f}B parameters"
    assert not any("e_score_correction_bias" in k for k in state)
    assert ("model.layers.0.self_attn.q_proj.weight" in state) == (cfg["q_lora_rank"] is None)
    with pytest.raises(ValueError, match="no MTP layers"):
        DeepseekV3ForCausalLM(c, device="meta", mtp=True)


def test_deepseek_v2_config_defaults_are_transformers_deepseek_v2s():
    """A model_type deepseek_v2 config.json that leaves fields out means transformers' DeepseekV2Config defaults
    (and softmax scoring, no MTP, which that class does not spell); other model types default to V3's values."""
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 128}
    c = DeepseekV3Config.from_dict({"model_type": "deepseek_v2", **small, "num_experts_per_tok": 2})
    ref = transformers.DeepseekV2Config(**small, num_experts_per_tok=2)
    for field in ("topk_method", "norm_topk_prob", "routed_scaling_factor", "n_routed_experts", "n_shared_experts",
                  "first_k_dense_replace", "q_lora_rank", "moe_intermediate_size", "intermediate_size",
                  "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert getattr(c, field) == getattr(ref, field), field
    assert (c.scoring_func, c.num_nextn_predict_layers, c.n_group, c.topk_group) == ("softmax", 0, 1, 1)
    v3 = DeepseekV3Config.from_dict({"model_type": "deepseek_v3", **small})
    assert (v3.scoring_func, v3.topk_method, v3.num_nextn_predict_layers) == ("sigmoid", "noaux_tc", 1)


def test_full_deepseek_v3_mtp_layer():
    """The released config's MTP layer (there model.layers.61; here after 4 main layers, to stay quick): 11.6B
    parameters besides its copies of the embedding and head; decoder part FP8, eh_proj and head bf16."""
    c = DeepseekV3Config.from_dict({**V3_CONFIG_JSON, "num_hidden_layers": 4})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(c, dtype=torch.bfloat16, mtp=True)
    state = model.state_dict()
    mtp = {k: t for k, t in state.items() if k.startswith("model.layers.4.") and not k.endswith("scale_inv")}
    copies = ("embed_tokens.weight", "shared_head.head.weight")
    unique = sum(t.numel() for k, t in mtp.items() if not k.endswith(copies))
    assert 11.5e9 < unique < 11.7e9, f"{unique / 1e9:.3f}B"
    assert state["model.layers.4.eh_proj.weight"].shape == (7168, 2 * 7168)
    assert state["model.layers.4.eh_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.4.shared_head.head.weight"].shape == (129280, 7168)
    assert state["model.layers.4.mlp.experts.255.up_proj.weight"].dtype == torch.float8_e4m3fn
    for k in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
              "mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight_scale_inv"):
        assert f"model.layers.4.{k}" in state, k
    assert model.num_mtp_layers == 1 and not any(k.startswith("model.layers.5.") for k in state)


def test_config_rejects_unsupported():
    with pytest.raises(ValueError, match="scoring_func: expected one of .*'sigmoid', 'softmax'.* got 'relu'"):
        tiny(scoring_func="relu")
    with pytest.raises(ValueError, match="topk_method: expected one of .*'greedy'.* got 'top2'"):
        tiny(topk_method="top2")
    with pytest.raises(ValueError, match="topk_group"):
        tiny("tiny-v2", topk_group=5)
    with pytest.raises(ValueError, match="mlp_bias"):
        tiny("tiny-v2", mlp_bias=True)
    with pytest.raises(ValueError, match="weight_block_size"):
        tiny(quantization_config={"quant_method": "fp8", "weight_block_size": [1, 128]})


# ------------------------------------------------------------------------------------------------
# logits vs transformers

@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    model = get_model(name)
    hf = to_transformers(model)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        ours, ref = model(input_ids), hf(input_ids).logits
    err = rel_err(ours, ref)
    assert ours.shape == (2, 19, model.config.vocab_size)
    assert err < 1e-5, f"{name}: logits vs transformers, max rel err {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_decode_matches_full_sequence_and_transformers(name):
    """Prefill 7 tokens into the paged cache, then decode one token at a time (absorbed attention)."""
    model = get_model(name)
    hf = to_transformers(model)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(input_ids)
        ref = hf(input_ids).logits
        cache = make_cache(model, 3, 32, page_size=16)  # pages straddled: 20 tokens over 16-token pages
        steps = [model(input_ids[:, :7], cache=cache, prefill=True)]
        steps += [model(input_ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    paged = torch.cat(steps, dim=1)
    assert cache.cache_seqlens.tolist() == [20, 20, 20]
    for other, what in ((full, "full-sequence forward"), (ref, "transformers")):
        err = rel_err(paged, other)
        assert err < 1e-5, f"{name}: paged decode vs {what}, max rel err {err:.2e}"


def test_decode_two_tokens_per_step():
    """s_q = 2 per decode step (the MTP/speculative shape): bottom-right causal mask within the step."""
    model = get_model("tiny")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(input_ids)
        cache = make_cache(model, 2, 16, page_size=16)
        steps = [model(input_ids[:, :5], cache=cache, prefill=True)]
        steps += [model(input_ids[:, t:t + 2], cache=cache) for t in range(5, 11, 2)]
    err = rel_err(torch.cat(steps, 1), full)
    assert err < 1e-5, f"2-token decode steps vs full forward: {err:.2e}"


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_paged_decode_low_precision_cache(cache_dtype):
    """bf16 / fp8 latent caches take the decode-kernel path (mla_decode_with_kvcache, bf16 query). The model
    is all-dense: with MoE layers a perturbation this size can flip a near-tied expert choice, which moves
    the logits by far more than the cache precision does."""
    model = get_model("dense")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids)
        cache = make_cache(model, 2, 16, page_size=16, dtype=cache_dtype)
        steps = [model(input_ids[:, :6], cache=cache, prefill=True)]
        steps += [model(input_ids[:, t:t + 1], cache=cache) for t in range(6, 12)]
    paged = torch.cat(steps, 1)[:, 6:]
    tol = 2e-5 if cache_dtype == torch.bfloat16 else 2e-3
    diff = calc_diff(paged, full[:, 6:])
    assert diff < tol, f"{cache_dtype} cache: decode logits vs full forward calc_diff {diff:.2e} (tol {tol})"


def test_cuda_bf16_model_decode_and_generation(kernel_device):
    """The tiny model in bf16 on the GPU (or emulated): logits near the fp32 CPU model; paged decode (the MLA
    decode kernel, bf16 cache) near the full forward; generate runs with batch prompts of different lengths.
    Oracles run on the pure-torch references (``reference()``; a no-op for CUDA tensors)."""
    # emulated: fewer tokens (bf16 matmuls are slow on the CPU) over 16-token pages, so sequences straddle pages
    seq, prefill, page, prompt, new = (40, 24, 64, 50, 8) if kernel_device == "cuda" else (20, 10, 16, 20, 4)
    cpu = get_model("tiny")
    model = DeepseekV3ForCausalLM(cpu.config, device=kernel_device, dtype=torch.bfloat16)
    model.load_state_dict(cpu.state_dict())
    model.model.rotary_emb.reset_parameters()
    model.eval()
    input_ids = torch.randint(0, cpu.config.vocab_size, (3, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with reference():
            ref = cpu(input_ids)
        full = model(input_ids.to(kernel_device)).float()
        cache = make_cache(model, 3, 64, page_size=page)
        steps = [model(input_ids[:, :prefill].to(kernel_device), cache=cache, prefill=True)]
        steps += [model(input_ids[:, t:t + 1].to(kernel_device), cache=cache) for t in range(prefill, seq)]
    paged = torch.cat(steps, 1).float()
    assert calc_diff(full.cpu(), ref) < 2e-2, f"{kernel_device} bf16 vs cpu fp32: {calc_diff(full.cpu(), ref):.2e}"
    assert calc_diff(paged, full) < 5e-3, f"{kernel_device} paged decode vs full forward: {calc_diff(paged, full):.2e}"
    if kernel_device != "cuda":  # the emulated decode also against the same bf16 model on the references
        with torch.no_grad(), reference():
            full_ref = model(input_ids).float()
        diff = calc_diff(paged, full_ref)
        assert diff < 5e-3, f"emulated paged decode vs reference: {diff:.2e}"
    outs = generate(model, [[1, 2, 3], list(range(10, 10 + prompt)), [7]], max_new_tokens=new)
    assert [o.numel() for o in outs] == [3 + new, prompt + new, 1 + new]


# ------------------------------------------------------------------------------------------------
# generate

def test_greedy_generation_paged_equals_recomputation_varied_lengths():
    model = get_model("tiny")
    prompts = [[5, 6, 7, 8, 9], [11, 12], list(range(100, 117))]
    paged = generate(model, prompts, max_new_tokens=10)
    recomputed = generate(model, prompts, max_new_tokens=10, use_cache=False)
    for i, (a, b) in enumerate(zip(paged, recomputed)):
        assert torch.equal(a, b), f"prompt {i}: paged {a.tolist()} != recomputed {b.tolist()}"
        assert a.numel() == len(prompts[i]) + 10 and a[: len(prompts[i])].tolist() == prompts[i]
        alone = generate(model, torch.tensor([prompts[i]]), max_new_tokens=10)[0]
        assert torch.equal(alone, a), f"prompt {i}: batched {a.tolist()} != alone {alone.tolist()}"


def test_greedy_generation_matches_transformers():
    model = get_model("tiny")
    hf = to_transformers(model)
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35]])
    ours = generate(model, prompt, max_new_tokens=8)
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref), f"ours {ours.tolist()} vs transformers {ref.tolist()}"


def test_sampling_and_eos():
    model = get_model("tiny")
    prompt = torch.tensor([[7, 8, 9], [1, 2, 3]])
    greedy = generate(model, prompt, max_new_tokens=6)
    # top_p -> 0 keeps only the most likely token: sampling collapses to greedy
    assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                                generator=torch.Generator().manual_seed(0)), greedy)
    a = generate(model, prompt, max_new_tokens=6, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, max_new_tokens=6, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    eos = int(greedy[0, 5])
    out, stats = generate(model, prompt, max_new_tokens=6, eos_token_id=eos, return_stats=True)
    assert out[0, 5] == eos and (out[0, 6:] == eos).all(), out.tolist()
    assert stats.prompt_tokens == 6 and stats.prefill_tokens_per_s > 0


# ------------------------------------------------------------------------------------------------
# loading

def test_save_load_roundtrip_sharded(tmp_path):
    model = get_model("tiny")
    save_pretrained(model, str(tmp_path), max_shard_bytes=2 * 2 ** 20)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded = load_model(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_load_random_is_seeded():
    a, b = load_model("tiny", seed=1), load_model("tiny", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_checkpoint_lists_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_model("tiny")
    save_pretrained(model, str(tmp_path))
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    sd["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(8, 8)
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(2)  # an MTP layer: skipped, not an error
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(str(tmp_path))
    msg = str(info.value)
    for expected in ("missing keys (1)", "model.layers.1.mlp.experts.3.up_proj.weight", "unexpected keys (1)",
                     "model.layers.0.self_attn.bogus.weight", "mis-shaped keys (1)",
                     "model.layers.2.self_attn.kv_b_proj.weight: checkpoint (8, 8), model (1024, 512)"):
        assert expected in msg, msg
    assert "eh_proj" not in msg


def test_fp8_checkpoint_close_to_dequantized_model(tmp_path):
    model = get_model("tiny")
    save_pretrained(model, str(tmp_path), fp8=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    fp8_model = load_model(str(tmp_path))
    from deepkernels.nn import Fp8Linear
    assert isinstance(fp8_model.model.layers[1].self_attn.kv_b_proj, Fp8Linear)
    assert fp8_model.model.layers[1].mlp.experts["0"].gate_proj.weight.dtype == torch.float8_e4m3fn
    dequant = load_model(str(tmp_path), dequantize_fp8=True)
    assert not dequant.config.is_fp8
    ids = torch.randint(0, 1024, (2, 12))
    first_layer = {}
    for name, m in (("fp8", fp8_model), ("dequant", dequant)):
        m.model.layers[0].register_forward_hook(lambda mod, args, out, name=name: first_layer.__setitem__(name, out))
    with torch.no_grad():
        a, b, orig = fp8_model(ids), dequant(ids), model(ids)
    # one layer: FP8 weights + per-1x128 activation quantisation vs the dequantised weights in fp32
    diff = calc_diff(first_layer["fp8"], first_layer["dequant"])
    assert diff < 2e-3, f"layer 0 output, fp8 vs dequantised model: calc_diff {diff:.2e}"
    # the whole (random, hence chaotic) model: routing decisions flip under quantisation noise, so looser
    for x, y, what in ((a, b, "fp8 vs dequantised"), (b, orig, "dequantised vs original")):
        assert calc_diff(x, y) < 0.06, f"logits {what}: calc_diff {calc_diff(x, y):.2e}"
    out = generate(fp8_model, ids[:, :4], max_new_tokens=3)  # the paged decode runs on the FP8 model too
    assert out.shape == (2, 7)


# ------------------------------------------------------------------------------------------------
# CLI

def test_cli_generate_tiny():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "deepkernels.model", "generate", "--model", "tiny",
                           "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "4"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout + proc.stderr
    expected = generate(get_model("tiny"), [[1, 2, 3], [4, 5]], max_new_tokens=4)
    for seq in expected:
        assert " ".join(map(str, seq.tolist())) in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------------
# expert parallelism: 2 gloo ranks, each loading only its experts, equal 1 process

def _ep_worker(rank: int, world: int, init_file: str, ckpt: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = load_model(ckpt, group=dist.group.WORLD)
        experts = sorted({int(k.split(".")[5]) for k in model.state_dict() if ".mlp.experts." in k})
        ids = torch.load(os.path.join(result_dir, "ids.pt"))
        with torch.no_grad():
            logits = model(ids)
        out = generate(model, ids[:, :5], max_new_tokens=6)
        torch.save({"experts": experts, "logits": logits, "generated": out},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_expert_parallel_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    model = get_model("tiny")
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, str(ckpt))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        ref_logits = model(ids)
    ref_generated = generate(model, ids[:, :5], max_new_tokens=6)
    ctx = mp.start_processes(_ep_worker, args=(2, str(tmp_path / "init"), str(ckpt), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    import time
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("expert-parallel workers did not finish within 90 s")
    e = model.config.n_routed_experts
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["experts"] == list(range(rank * e // 2, (rank + 1) * e // 2)), f"rank {rank}: {res['experts']}"
        err = rel_err(res["logits"], ref_logits)
        assert err < 1e-5, f"rank {rank}: EP logits vs 1 process, max rel err {err:.2e}"
        assert torch.equal(res["generated"], ref_generated), f"rank {rank}: EP generation differs"


def test_tokenizer_from_checkpoint_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deepkernels.model import load_tokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "three", "kernel", "families", "compose"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_pretrained(get_model("tiny"), str(tmp_path),
                    tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"))
    assert load_tokenizer("tiny") is None
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer("the three kernel families")["input_ids"] == [2, 3, 4, 5]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "deepkernels.model", "generate", "--model", str(tmp_path),
                           "--prompt", "the three kernel families", "--max-new-tokens", "3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[0] prompt ids: 2 3 4 5" in proc.stdout and "[0] text: 'the three kernel families' ->" in proc.stdout, \
        proc.stdout


def test_checkpoint_interoperates_with_transformers(tmp_path):
    """transformers' from_pretrained reads our checkpoint, and we read a checkpoint transformers saved
    (its 5.x config.json spells RoPE as rope_parameters): same logits both ways."""
    model = get_model("tiny")
    save_pretrained(model, str(tmp_path / "ours"))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    hf.save_pretrained(str(tmp_path / "theirs"))
    reloaded = load_model(str(tmp_path / "theirs"))
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        ours, ref, back = model(ids), hf(ids).logits, reloaded(ids)
    assert rel_err(ours, ref) < 1e-5, f"transformers.from_pretrained(our checkpoint): {rel_err(ours, ref):.2e}"
    assert torch.equal(back, ours), "our load of the checkpoint transformers saved differs"
    assert reloaded.config.yarn["factor"] == model.config.yarn["factor"]


@pytest.mark.parametrize("name", ["v2", "v2_lite"])
def test_deepseek_v2_checkpoint_saved_by_transformers(tmp_path, name):
    """transformers' DeepseekV2ForCausalLM.save_pretrained (its config.json has no scoring_func; no correction
    bias keys) loads through our loader to the same model; transformers reads our V2 checkpoint as a V2."""
    model = get_model(name)
    hf = to_transformers(model)
    hf.save_pretrained(str(tmp_path / "theirs"))
    cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and "scoring_func" not in cfg
    loaded = load_model(str(tmp_path / "theirs"))
    for field in ("scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                  "q_lora_rank", "num_nextn_predict_layers", "rope_scaling", "first_k_dense_replace"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    save_pretrained(model, str(tmp_path / "ours"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    with torch.no_grad():
        ours, theirs, ref, ref_back = model(ids), loaded(ids), hf(ids).logits, back(ids).logits
    assert torch.equal(theirs, ours), "our load of the V2 checkpoint transformers saved differs"
    assert rel_err(ours, ref) < 1e-5 and rel_err(ref_back, ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# MTP (multi-token prediction) layers and speculative decoding

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_forward_matches_straightforward_formulation():
    """h' = Block(eh_proj(cat(enorm(emb(t_{i+1})), hnorm(h_i)))), logits = head(norm(h')) with h_i the main
    model's final normed hidden state, written out here with transformers' own decoder layer as the Block."""
    model = get_model("tiny", mtp=True)
    c, layer = model.config, model.model.layers[3]
    hf_main = to_transformers(model)
    # the MTP block as a one-layer transformers model: input embeddings in, shared_head.norm as its final norm
    block_cfg = DeepseekV3Config.from_dict({**c.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0})
    block_cfg = block_cfg.to_hf()
    block_cfg._attn_implementation = "eager"
    block = transformers.DeepseekV3Model(block_cfg).float().eval()
    sd = {k.replace("model.layers.3.", "layers.0."): v for k, v in model.state_dict().items()
          if k.startswith("model.layers.3.") and not any(p in k for p in ("enorm", "hnorm", "eh_proj", "shared_head",
                                                                          "embed_tokens"))}
    sd["norm.weight"] = layer.shared_head.norm.weight
    sd["embed_tokens.weight"] = layer.embed_tokens.weight
    from deepkernels.model.hf import to_transformers_state_dict
    missing, unexpected = block.load_state_dict(to_transformers_state_dict(sd), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.randint(0, c.vocab_size, (2, 13))
    with torch.no_grad():
        h = hf_main.model(ids).last_hidden_state                                  # final normed hidden, [2, 13, H]
        x = torch.cat([_rms(layer.embed_tokens.weight[ids[:, 1:]], layer.enorm.weight),
                       _rms(h[:, :-1], layer.hnorm.weight)], dim=-1) @ layer.eh_proj.weight.T
        ref = block(inputs_embeds=x).last_hidden_state @ layer.shared_head.head.weight.T
        ours = model.mtp_logits(ids)
        logits, hidden = model(ids, return_hidden=True)
    assert ours.shape == (2, 12, c.vocab_size)
    assert rel_err(ours, ref) < 1e-5, f"MTP logits vs the straightforward formulation: {rel_err(ours, ref):.2e}"
    with torch.no_grad():  # (the same mode as above: under autograd the CPU fast path is off)
        assert rel_err(hidden, h) < 1e-5 and torch.equal(logits, model(ids))
        # the MTP layer neither changes the main model nor runs in its forward
        assert torch.equal(logits, get_model("tiny")(ids))


def test_mtp_matches_transformers_mtp_model(tmp_path):
    """transformers' own MTP module (MtpModel, built from a DeepseekV3ForCausalLM checkpoint that has the MTP
    layer's keys) gives the same draft logits from its final hidden states."""
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    model = get_model("tiny", mtp=True)
    save_pretrained(model, str(tmp_path))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    hf._keys_to_ignore_on_load_unexpected = [r"model\.layers\.3\..*"]  # transformers assumes layer 61
    mtp = modeling_layers.MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        h = hf(ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(11)[None].expand(2, 11)
        ref = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:]))
        ours = model.mtp_logits(ids)
    assert rel_err(ours, ref) < 1e-5, f"MTP logits vs transformers' MtpModel: {rel_err(ours, ref):.2e}"


def test_mtp_paged_decode_matches_full_sequence():
    """forward_mtp through the MTP layer's own paged-cache layer (prefill, then 1 and 2 entries per step)
    equals the full-sequence MTP forward."""
    model = get_model("tiny", mtp=True)
    ids = torch.randint(0, model.config.vocab_size, (3, 15))
    with torch.no_grad():
        full = model.mtp_logits(ids)
        _, hidden = model(ids, return_hidden=True)
        nxt, h = ids[:, 1:], hidden[:, :-1]
        cache = make_cache(model, 3, 32, page_size=16, mtp=True)
        assert cache.num_layers == 4
        steps = [model.forward_mtp(nxt[:, :6], h[:, :6], cache=cache, prefill=True)]
        steps += [model.forward_mtp(nxt[:, t:t + 1], h[:, t:t + 1], cache=cache) for t in range(6, 10)]
        steps += [model.forward_mtp(nxt[:, t:t + 2], h[:, t:t + 2], cache=cache) for t in range(10, 14, 2)]
    assert cache.layer_seqlens(3).tolist() == [14] * 3 and cache.cache_seqlens.tolist() == [0] * 3
    err = rel_err(torch.cat(steps, 1), full)
    assert err < 1e-5, f"paged MTP vs full sequence: {err:.2e}"
    with pytest.raises(ValueError, match="mtp=True"):
        model.forward_mtp(nxt, h, cache=make_cache(model, 3, 32, page_size=16))


def _scripted_drafter(model, monkeypatch, reference: list[torch.Tensor], right):
    """Make the MTP layer's draft (the argmax of forward_mtp's logits) the reference's next-next token when
    right(row, position), a wrong token otherwise; the real forward_mtp still runs and fills its cache."""
    real, n = model.forward_mtp, model.config.num_hidden_layers

    def scripted(next_ids, hidden, cache=None, prefill=False, depth=0, return_hidden=False):
        b, t = next_ids.shape
        start = [0] * b if prefill or cache is None else cache.layer_seqlens(n).tolist()
        logits = real(next_ids, hidden, cache=cache, prefill=prefill, depth=depth)
        out = torch.zeros_like(logits)
        for i in range(b):
            for j in range(t):
                pos = start[i] + j  # this entry drafts token pos + 2
                tok = int(reference[i][pos + 2]) if pos + 2 < len(reference[i]) else 0
                out[i, j, tok if right(i, pos) else (tok + 1) % logits.size(-1)] = 1.0
        return out

    monkeypatch.setattr(model, "forward_mtp", scripted)


PROMPTS = [[5, 6, 7, 8, 9], [11, 12], list(range(100, 117)), [3]]
_GREEDY: dict = {}


def greedy_reference(max_new_tokens: int) -> list[torch.Tensor]:
    """Plain greedy generation of PROMPTS by the tiny model (the MTP layer plays no part in it)."""
    if max_new_tokens not in _GREEDY:
        _GREEDY[max_new_tokens] = generate(get_model("tiny"), PROMPTS, max_new_tokens=max_new_tokens)
    return _GREEDY[max_new_tokens]


@pytest.mark.parametrize("drafts", ["mtp", "right", "wrong", "mixed"])
def test_speculative_greedy_equals_greedy(monkeypatch, drafts):
    """generate(use_mtp=True) gives plain greedy's tokens, for a batch of varied lengths (sequences then
    accept different numbers of tokens per step) and each prompt alone: with the MTP layer's own drafts
    (random weights: nearly all rejected) and with scripted drafts (all / none / some right)."""
    model = get_model("tiny", mtp=True)
    n_new = 11
    greedy = greedy_reference(n_new)
    pattern = {"right": lambda i, p: True, "wrong": lambda i, p: False,
               "mixed": lambda i, p: (3 * i + p) % 4 != 0}.get(drafts)
    if pattern is not None:
        _scripted_drafter(model, monkeypatch, greedy, pattern)
    spec, stats = generate(model, PROMPTS, max_new_tokens=n_new, use_mtp=True, return_stats=True)
    for i, (a, b) in enumerate(zip(spec, greedy)):
        assert torch.equal(a, b), f"{drafts} drafts, prompt {i}: speculative {a.tolist()} != greedy {b.tolist()}"
    assert stats.new_tokens == len(PROMPTS) * n_new and stats.mtp_drafted > 0
    assert 0 <= stats.mtp_accepted <= stats.mtp_drafted
    if drafts == "right":  # two tokens per verify step
        assert stats.mtp_acceptance_rate == 1.0 and stats.decode_steps == (n_new - 1 + 1) // 2
    elif drafts == "wrong":  # one token per verify step, every draft rolled back
        assert stats.mtp_accepted == 0 and stats.decode_steps == n_new - 1
    elif drafts == "mixed":
        assert 0 < stats.mtp_acceptance_rate < 1 and stats.decode_steps < n_new - 1
    assert "MTP acceptance" in stats.summary()
    for i, p in enumerate(PROMPTS[:2] if drafts == "mixed" else []):
        alone = generate(model, torch.tensor([p]), max_new_tokens=n_new, use_mtp=True)[0]
        assert torch.equal(alone, greedy[i]), f"{drafts} drafts, prompt {i} alone"


def test_speculative_greedy_eos_and_token_budget(monkeypatch):
    """eos mid-way (and inside an accepted pair) and an odd budget: the same tokens as plain greedy."""
    model = get_model("tiny", mtp=True)
    greedy = greedy_reference(9)
    _scripted_drafter(model, monkeypatch, greedy, lambda i, p: p % 3 != 1)
    eos = int(greedy[0][len(PROMPTS[0]) + 4])
    ref = generate(model, PROMPTS, max_new_tokens=9, eos_token_id=eos)
    for n_new in (9, 4, 1):
        out = generate(model, PROMPTS, max_new_tokens=n_new, eos_token_id=eos, use_mtp=True)
        for i, (a, b) in enumerate(zip(out, ref)):
            assert torch.equal(a, b[: len(PROMPTS[i]) + n_new]), f"max_new_tokens={n_new}, prompt {i}"
    assert (ref[0][len(PROMPTS[0]) + 4:] == eos).all()


def test_cuda_speculative_greedy(monkeypatch, kernel_device):
    """On the GPU (or emulated): fp32 (exact attention path) speculative == plain greedy; bf16 (the MLA decode
    kernel verifies 2-token steps, rejected rows rolled back) emits at each step a token within rounding of the
    full-forward argmax of its own prefix. Plain greedy and the full forward run on the pure-torch references
    (``reference()``; a no-op for CUDA tensors). bf16 runs the all-dense model: with MoE layers a bf16-level
    difference between the paged step and the full forward can flip a near-tied expert choice."""
    for dtype in (torch.float32, torch.bfloat16):
        cpu = get_model("tiny" if dtype == torch.float32 else "dense", mtp=True)
        model = DeepseekV3ForCausalLM(cpu.config, device=kernel_device, dtype=dtype, mtp=True)
        model.load_state_dict(cpu.state_dict())
        model.model.rotary_emb.reset_parameters()
        model.eval()
        with reference():
            greedy = generate(model, PROMPTS, max_new_tokens=10)
        _scripted_drafter(model, monkeypatch, greedy, lambda i, p: (i + p) % 3 != 0)
        spec, stats = generate(model, PROMPTS, max_new_tokens=10, use_mtp=True, return_stats=True)
        monkeypatch.undo()
        assert 0 < stats.mtp_acceptance_rate < 1
        for i, (a, b) in enumerate(zip(spec, greedy)):
            if dtype == torch.float32:
                assert torch.equal(a, b), f"fp32 prompt {i}: {a.tolist()} != {b.tolist()}"
                continue
            n = len(PROMPTS[i])
            with torch.no_grad(), reference():
                logits = model(a[None, :-1]).float()[0, n - 1:]
            picked = logits.gather(1, a[n:, None])[:, 0]
            gap = (logits.max(-1).values - picked).max()
            assert gap < 0.05 * logits.abs().max(), f"bf16 prompt {i}: a token {gap:.3f} below the argmax"


def test_mtp_usage_errors():
    with pytest.raises(ValueError, match="no MTP layers"):
        generate(get_model("tiny"), [[1, 2]], max_new_tokens=2, use_mtp=True)
    with pytest.raises(ValueError, match="greedy only"):
        generate(get_model("tiny", mtp=True), [[1, 2]], max_new_tokens=2, use_mtp=True, temperature=0.7)
    with pytest.raises(RuntimeError, match="no MTP layers"):
        get_model("tiny").mtp_logits(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        load_model("tiny-v2", load_mtp=True)


def test_mtp_checkpoint_roundtrip(tmp_path):
    """MTP keys (model.layers.3.*) saved and loaded with load_mtp=True; skipped with load_mtp=False; a
    checkpoint without the MTP layer's embedding/head copies gets the main model's; FP8 leaves eh_proj bf16."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = get_model("tiny", mtp=True)
    save_pretrained(model, str(tmp_path / "ckpt"), max_shard_bytes=2 * 2 ** 20)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    loaded = load_model(str(tmp_path / "ckpt"), load_mtp=True)
    assert loaded.state_dict().keys() == model.state_dict().keys() and loaded.num_mtp_layers == 1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    main_only = load_model(str(tmp_path / "ckpt"))
    assert main_only.num_mtp_layers == 0 and not any(k.startswith("model.layers.3.") for k in main_only.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.mtp_logits(ids), model.mtp_logits(ids))
        assert torch.equal(main_only(ids), model(ids))
    # the release's MTP layer holds copies of the embedding and head; a checkpoint may leave them out
    single = tmp_path / "single"
    save_pretrained(model, str(single))
    sd = load_file(str(single / "model.safetensors"))
    del sd["model.layers.3.embed_tokens.weight"], sd["model.layers.3.shared_head.head.weight"]
    save_file(sd, str(single / "model.safetensors"))
    filled = load_model(str(single), load_mtp=True)
    assert torch.equal(filled.model.layers[3].embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(filled.model.layers[3].shared_head.head.weight, model.lm_head.weight)
    del sd["model.layers.3.eh_proj.weight"]
    save_file(sd, str(single / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+model.layers.3.eh_proj.weight"):
        load_model(str(single), load_mtp=True)
    save_pretrained(model, str(tmp_path / "fp8"), fp8=True)
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.3.eh_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.3.self_attn.q_b_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.3.eh_proj.weight_scale_inv" not in f.keys()
    fp8 = load_model(str(tmp_path / "fp8"), load_mtp=True)
    from deepkernels.fp8 import per_block_cast_from_fp8, per_block_cast_to_fp8
    from deepkernels.nn import Fp8Linear
    mtp_layer = fp8.model.layers[3]
    assert isinstance(mtp_layer.self_attn.q_b_proj, Fp8Linear) and not isinstance(mtp_layer.eh_proj, Fp8Linear)
    # a checkpoint whose eh_proj is FP8 (+ weight_scale_inv): dequantised into the high-precision eh_proj
    sd = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    q, scale = per_block_cast_to_fp8(sd["model.layers.3.eh_proj.weight"])
    sd["model.layers.3.eh_proj.weight"], sd["model.layers.3.eh_proj.weight_scale_inv"] = q, scale
    save_file(sd, str(tmp_path / "fp8" / "model.safetensors"))
    eh = load_model(str(tmp_path / "fp8"), load_mtp=True).model.layers[3].eh_proj.weight
    assert torch.equal(eh, per_block_cast_from_fp8(q, scale, torch.float32))
    del sd["model.layers.3.eh_proj.weight_scale_inv"]
    save_file(sd, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="eh_proj.weight: FP8 in the checkpoint without"):
        load_model(str(tmp_path / "fp8"), load_mtp=True)


def test_cli_generate_mtp():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "deepkernels.model", "generate", "--model", "tiny", "--mtp",
                           "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "5"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "MTP acceptance" in proc.stdout and "1 MTP" in proc.stderr
    for seq in generate(get_model("tiny"), [[1, 2, 3], [4, 5]], max_new_tokens=5):
        assert " ".join(map(str, seq.tolist())) in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------------
# the CPU fast path (deepkernels.nn.cpu_fast_path): batched MoE experts, masked attention over a contiguous
# cache view, plain cache stores, fused projections / norms / RoPE -- equal to the references

def _decode_logits(model, input_ids, prefill_len, cache_dtype=None, page_size=16, shuffle=False, steps=(1,)):
    """Prefill then decode the rest of input_ids in steps of the given sizes (cycled): logits [B, T - prefill]."""
    b, t = input_ids.shape
    cache = make_cache(model, b, t + 8, page_size=page_size, dtype=cache_dtype)
    if shuffle:  # a non-identity page assignment: the fast path gathers through the block table
        cache.block_table.copy_(cache.block_table.view(-1).flip(0).view(b, -1))
    out = [model(input_ids[:, :prefill_len], cache=cache, prefill=True)[:, -1:]]
    pos, i = prefill_len, 0
    while pos < t:
        n = min(steps[i % len(steps)], t - pos)
        out.append(model(input_ids[:, pos:pos + n], cache=cache))
        pos, i = pos + n, i + 1
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_fast_path_equals_references(name, batch):
    """Full forward and paged decode (1- and 2-token steps, pages straddled) with the fast path vs the op
    references (cpu_fast_path(False)): the logits' max relative error within the model tests' 1e-5."""
    from deepkernels.nn.cpu_fast_path import cpu_fast_path

    model = get_model(name)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 21), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        fast_full = model(input_ids)
        fast, fast_cache = _decode_logits(model, input_ids, 7, steps=(1, 2))
        with cpu_fast_path(False):
            ref_full = model(input_ids)
            ref, ref_cache = _decode_logits(model, input_ids, 7, steps=(1, 2))
    for what, a, b in (("full forward", fast_full, ref_full), ("paged decode", fast, ref)):
        err = rel_err(a, b)
        assert err < 1e-5, f"{name} batch {batch}: fast path {what} vs references, max rel err {err:.2e}"
    assert torch.equal(fast_cache.seqlens, ref_cache.seqlens)
    torch.testing.assert_close(fast_cache.kv, ref_cache.kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_fast_path_cache_layouts(cache_dtype):
    """A shuffled block table (gathered, not viewed), varied sequence lengths (masked keys) and a bf16 cache
    (the decode kernel's bf16 query/output roundings): fast path vs references."""
    from deepkernels.nn.cpu_fast_path import cpu_fast_path

    model = get_model("dense")
    input_ids = torch.randint(0, model.config.vocab_size, (3, 18), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for shuffle in (False, True):
            fast, _ = _decode_logits(model, input_ids, 5, cache_dtype, shuffle=shuffle, steps=(1, 3))
            with cpu_fast_path(False):
                ref, _ = _decode_logits(model, input_ids, 5, cache_dtype, shuffle=shuffle, steps=(1, 3))
            diff = calc_diff(fast, ref)
            assert diff < 1e-9 if cache_dtype == torch.float32 else diff < 1e-6, \
                f"{cache_dtype} cache, shuffled={shuffle}: fast vs reference calc_diff {diff:.2e}"
    prompts = [[5, 6, 7, 8, 9], [11, 12], list(range(100, 117))]
    fast = generate(model, prompts, max_new_tokens=6, cache_dtype=cache_dtype)
    with cpu_fast_path(False):
        ref = generate(model, prompts, max_new_tokens=6, cache_dtype=cache_dtype)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert torch.equal(a, b), f"prompt {i}: fast path {a.tolist()} != references {b.tolist()}"


def test_cpu_fast_path_greedy_batch8_matches_transformers_and_references():
    """Greedy generate at batch 8 (the dense MoE expert path in decode, grouped experts in prefill): token for
    token transformers' generate and the reference path."""
    from deepkernels.nn.cpu_fast_path import cpu_fast_path

    model = get_model("tiny")
    hf = to_transformers(model)
    prompt = torch.randint(2, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(8))
    ours = generate(model, prompt, max_new_tokens=8)
    with cpu_fast_path(False):
        ref = generate(model, prompt, max_new_tokens=8)
    peer = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref), f"fast path {ours.tolist()} vs references {ref.tolist()}"
    assert torch.equal(ours, peer), f"ours {ours.tolist()} vs transformers {peer.tolist()}"


@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_fast_path_moe_expert_paths(monkeypatch, tokens, dtype):
    """Every expert path of the fast MoE (dense all-experts, sorted per-expert loop, grouped matmul) vs the
    dispatch -> per-expert MLP -> combine reference."""
    import deepkernels.nn.moe as nn_moe
    from deepkernels.nn.cpu_fast_path import cpu_fast_path

    moe = nn_moe.MoE(256, 128, 16, 4, 1, 4, 2, 2.5, dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        with cpu_fast_path(False):
            ref = moe(x).float()
        paths = {"default": {}, "dense": {"DENSE_EXPERTS_MAX_TOKENS": 10 ** 6},
                 "loop": {"DENSE_EXPERTS_MAX_TOKENS": 0, "_GROUPED_MM_OK": False},
                 "grouped": {"DENSE_EXPERTS_MAX_TOKENS": 0, "GROUPED_MIN_PAIRS": 0}}
        for path, patch in paths.items():
            with monkeypatch.context() as mp:
                for k, v in patch.items():
                    mp.setattr(nn_moe, k, v)
                out = moe(x).float()
            if dtype == torch.float32:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{path}: {m}")
            else:
                assert calc_diff(out, ref) < 1e-5, f"{path} bf16: calc_diff {calc_diff(out, ref):.2e}"


def test_cpu_fast_path_switches_and_cache_overflow():
    """Off under autograd and inside testing.reference(); the cache refuses writes past its capacity."""
    from deepkernels.nn.cpu_fast_path import cpu_fast_path, cpu_fast_path_active

    x = torch.zeros(2)
    assert not cpu_fast_path_active(x)  # grad mode on: the references (autograd through the real parameters)
    with torch.no_grad():
        assert cpu_fast_path_active(x)
        with reference():
            assert not cpu_fast_path_active(x)
        with cpu_fast_path(False):
            assert not cpu_fast_path_active(x)
        assert cpu_fast_path_active(x)
        model = get_model("tiny")
        cache = make_cache(model, 2, 16)
        model(torch.ones(2, 16, dtype=torch.long), cache=cache, prefill=True)
        with pytest.raises(ValueError, match="overflow the cache capacity 64"):
            model(torch.ones(2, 50, dtype=torch.long), cache=cache)
