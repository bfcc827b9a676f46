"""deepkernels.model: config parsing, logits vs transformers' DeepseekV3ForCausalLM, paged decode, generate,
checkpoint loading (sharded, FP8, errors), expert parallelism, CLI. Tiny configs, CPU, fp32."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepkernels.model import (CheckpointError, DeepseekV3Config, DeepseekV3ForCausalLM, generate, load_model,
                               save_pretrained)
from deepkernels.model.generation import make_cache
from deepkernels.testing import calc_diff

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


def tiny(**overrides) -> DeepseekV3Config:
    return DeepseekV3Config.from_dict({**DeepseekV3Config.from_pretrained("tiny").to_dict(), **overrides})


# variants: the built-in tiny; no q LoRA (V2-Lite style), plain RoPE, half-rotated rope layout, tied embeddings,
# more shared experts, attention biases
CONFIGS = {
    "tiny": {},
    "no_q_lora_no_yarn": {"q_lora_rank": None, "rope_scaling": None, "rope_interleave": False,
                          "tie_word_embeddings": True, "num_hidden_layers": 3,
                          "first_k_dense_replace": 0, "n_shared_experts": 2, "norm_topk_prob": False,
                          "attention_bias": True},
    # all layers dense: no top-k routing whose choice a low-precision perturbation could flip
    "dense": {"first_k_dense_replace": 3},
}

_MODELS: dict = {}


def get_model(name: str) -> DeepseekV3ForCausalLM:
    if name not in _MODELS:
        _MODELS[name] = DeepseekV3ForCausalLM(tiny(**CONFIGS[name]), dtype=torch.float32).init_random_weights(0).eval()
    return _MODELS[name]


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


def test_config_rejects_unsupported():
    with pytest.raises(ValueError, match="scoring_func"):
        tiny(scoring_func="softmax")
    with pytest.raises(ValueError, match="weight_block_size"):
        tiny(quantization_config={"quant_method": "fp8", "weight_block_size": [1, 128]})


# ------------------------------------------------------------------------------------------------
# logits vs transformers

@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    model = get_model(name)
    hf = __import__("deepkernels.model.hf", fromlist=["x"]).to_transformers(model)
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
    hf = __import__("deepkernels.model.hf", fromlist=["x"]).to_transformers(model)
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


@pytest.mark.cuda
def test_cuda_bf16_model_decode_and_generation():
    """The tiny model in bf16 on the GPU: logits near the fp32 CPU model; paged decode (CUDA MLA kernel,
    bf16 cache) near the full forward; generate runs with batch prompts of different lengths."""
    cpu = get_model("tiny")
    model = DeepseekV3ForCausalLM(cpu.config, device="cuda", dtype=torch.bfloat16)
    model.load_state_dict(cpu.state_dict())
    model.model.rotary_emb.reset_parameters()
    model.eval()
    input_ids = torch.randint(0, cpu.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(input_ids)
        full = model(input_ids.cuda()).float()
        cache = make_cache(model, 3, 64, page_size=64)
        steps = [model(input_ids[:, :24].cuda(), cache=cache, prefill=True)]
        steps += [model(input_ids[:, t:t + 1].cuda(), cache=cache) for t in range(24, 40)]
    paged = torch.cat(steps, 1).float()
    assert calc_diff(full.cpu(), ref) < 2e-2, f"cuda bf16 vs cpu fp32: {calc_diff(full.cpu(), ref):.2e}"
    assert calc_diff(paged, full) < 5e-3, f"cuda paged decode vs full forward: {calc_diff(paged, full):.2e}"
    outs = generate(model, [[1, 2, 3], list(range(10, 60)), [7]], max_new_tokens=8)
    assert [o.numel() for o in outs] == [11, 58, 9]


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
    hf = __import__("deepkernels.model.hf", fromlist=["x"]).to_transformers(model)
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
