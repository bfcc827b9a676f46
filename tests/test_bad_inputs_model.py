"""Bad inputs to the model layer: checkpoints and config.json files (written to tmp dirs), load_model and
generate() arguments, and the CLIs (`python -m deepkernels.model`, `python -m bench`, `python -m
deepkernels.demo`). Each case asserts the exception type (or exit code) and that the message names the file,
the key or field, or the argument -- never a random-weight model, a silent wrong answer or a traceback."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

from deepkernels.model import (CheckpointError, CheckpointNotFoundError, DeepseekV3Config, DeepseekV3ForCausalLM,
                               generate, load_model, save_pretrained)
from deepkernels.model.config import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    """A valid single-file tiny checkpoint (config.json + model.safetensors)."""
    d = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, str(d))
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("sharded")
    save_pretrained(model, str(d), max_shard_bytes=2 * 2 ** 20)
    assert (d / "model.safetensors.index.json").exists()
    return d


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("fp8")
    save_pretrained(model, str(d), fp8=True)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _with_config(tmp_path, ckpt, edit):
    """config.json edited by ``edit(dict)`` (which may return a replacement), beside the checkpoint's weights."""
    d = tmp_path / "c"
    d.mkdir()
    os.symlink(ckpt / "model.safetensors", d / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    out = edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg if out is None else out))
    return d


def _raises(exc, fn, *needles):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


# ------------------------------------------------------------------------------------------------
# config.json: every problem is a CheckpointError naming config.json and the field

def _set(**kv):
    return lambda c: c.update(kv)


def _drop(*keys):
    return lambda c: [c.pop(k, None) for k in keys] and None


CONFIG_CASES = {
    # missing fields: an error, not DeepSeek-V3's 671B values
    "missing_hidden_size": (_drop("hidden_size"), ["hidden_size", "missing"]),
    "missing_vocab_size": (_drop("vocab_size"), ["vocab_size"]),
    "missing_num_hidden_layers": (_drop("num_hidden_layers"), ["num_hidden_layers"]),
    "missing_n_group": (_drop("n_group"), ["n_group"]),
    "missing_kv_lora_rank": (_drop("kv_lora_rank"), ["kv_lora_rank"]),
    "missing_rms_norm_eps": (_drop("rms_norm_eps"), ["rms_norm_eps"]),
    "missing_first_k_dense_replace": (_drop("first_k_dense_replace"), ["first_k_dense_replace"]),
    "only_model_type": (lambda c: {"model_type": "deepseek_v3"}, ["hidden_size", "vocab_size", "missing"]),
    "empty_object": (lambda c: {}, ["model_type"]),
    # model_type
    "model_type_llama": (_set(model_type="llama"), ["model_type", "llama"]),
    "model_type_v32": (_set(model_type="deepseek_v32"), ["model_type", "deepseek_v32"]),
    "model_type_int": (_set(model_type=3), ["model_type"]),
    "architectures_llama": (_set(architectures=["LlamaForCausalLM"]), ["architectures", "LlamaForCausalLM"]),
    "architectures_str": (_set(architectures="DeepseekV3ForCausalLM"), ["architectures"]),
    "no_model_type_llama_arch": (lambda c: [c.pop("model_type"), c.update(architectures=["LlamaForCausalLM"])]
                                 and None, ["model_type"]),
    "no_model_type_no_arch": (lambda c: [c.pop("model_type"), c.pop("architectures", None)] and None,
                              ["model_type", "missing"]),
    # ill-typed fields
    "hidden_size_str": (_set(hidden_size="256"), ["hidden_size", "int", "'256'"]),
    "hidden_size_float": (_set(hidden_size=256.0), ["hidden_size", "int"]),
    "hidden_size_bool": (_set(hidden_size=True), ["hidden_size"]),
    "num_layers_null": (_set(num_hidden_layers=None), ["num_hidden_layers"]),
    "vocab_list": (_set(vocab_size=[1024]), ["vocab_size"]),
    "rms_norm_eps_str": (_set(rms_norm_eps="1e-6"), ["rms_norm_eps", "number"]),
    "rope_theta_str": (_set(rope_theta="10000"), ["rope_theta"]),
    "norm_topk_prob_str": (_set(norm_topk_prob="true"), ["norm_topk_prob"]),
    "tie_word_embeddings_int": (_set(tie_word_embeddings=1), ["tie_word_embeddings"]),
    "rope_scaling_str": (_set(rope_scaling="yarn"), ["rope_scaling"]),
    "quantization_config_str": (_set(quantization_config="fp8"), ["quantization_config"]),
    "eos_str": (_set(eos_token_id="1"), ["eos_token_id"]),
    "scoring_func_int": (_set(scoring_func=1), ["scoring_func"]),
    # out of range
    "hidden_size_zero": (_set(hidden_size=0), ["hidden_size", ">= 1", "0"]),
    "hidden_size_negative": (_set(hidden_size=-256), ["hidden_size", "-256"]),
    "vocab_zero": (_set(vocab_size=0), ["vocab_size"]),
    "layers_zero": (_set(num_hidden_layers=0), ["num_hidden_layers"]),
    "heads_zero": (_set(num_attention_heads=0), ["num_attention_heads"]),
    "kv_heads_differ": (_set(num_key_value_heads=4), ["num_key_value_heads", "num_attention_heads"]),
    "q_lora_rank_zero": (_set(q_lora_rank=0), ["q_lora_rank"]),
    "kv_lora_rank_negative": (_set(kv_lora_rank=-1), ["kv_lora_rank"]),
    "rope_dim_odd": (_set(qk_rope_head_dim=63), ["qk_rope_head_dim", "even"]),
    "v_head_dim_zero": (_set(v_head_dim=0), ["v_head_dim"]),
    "experts_not_divisible": (_set(n_routed_experts=15), ["n_routed_experts", "n_group"]),
    "topk_group_gt_n_group": (_set(topk_group=5), ["topk_group"]),
    "topk_group_zero": (_set(topk_group=0), ["topk_group"]),
    "n_group_zero": (_set(n_group=0), ["n_group"]),
    "experts_per_tok_gt_experts": (_set(num_experts_per_tok=17), ["num_experts_per_tok"]),
    "experts_per_tok_zero": (_set(num_experts_per_tok=0), ["num_experts_per_tok"]),
    "experts_per_tok_gt_groups": (_set(num_experts_per_tok=9), ["num_experts_per_tok"]),
    "n_routed_negative": (_set(n_routed_experts=-1), ["n_routed_experts"]),
    "first_k_negative": (_set(first_k_dense_replace=-1), ["first_k_dense_replace"]),
    "moe_layer_freq_zero": (_set(moe_layer_freq=0), ["moe_layer_freq"]),
    "max_pos_zero": (_set(max_position_embeddings=0), ["max_position_embeddings"]),
    "rms_norm_eps_zero": (_set(rms_norm_eps=0), ["rms_norm_eps"]),
    "rms_norm_eps_negative": (_set(rms_norm_eps=-1e-6), ["rms_norm_eps"]),
    "rope_theta_zero": (_set(rope_theta=0), ["rope_theta"]),
    "routed_scaling_zero": (_set(routed_scaling_factor=0), ["routed_scaling_factor"]),
    "routed_scaling_nan": (lambda c: json.loads(json.dumps({**c, "routed_scaling_factor": float("nan")})),
                           ["routed_scaling_factor"]),
    "eos_out_of_vocab": (_set(eos_token_id=5000), ["eos_token_id", "vocab_size"]),
    "eos_list_out_of_vocab": (_set(eos_token_id=[1, 5000]), ["eos_token_id"]),
    "eos_negative": (_set(eos_token_id=-1), ["eos_token_id"]),
    "intermediate_zero_with_dense": (_set(intermediate_size=0), ["intermediate_size"]),
    "moe_intermediate_zero": (_set(moe_intermediate_size=0), ["moe_intermediate_size"]),
    "nextn_negative": (_set(num_nextn_predict_layers=-1), ["num_nextn_predict_layers"]),
    # unsupported choices
    "hidden_act_gelu": (_set(hidden_act="gelu"), ["hidden_act", "gelu"]),
    "scoring_func_relu": (_set(scoring_func="relu"), ["scoring_func", "relu"]),
    "topk_method_top2": (_set(topk_method="top2"), ["topk_method", "top2"]),
    "mlp_bias": (_set(mlp_bias=True), ["mlp_bias"]),
    "rope_scaling_linear": (lambda c: c["rope_scaling"].update(type="linear", rope_type="linear"),
                            ["rope_scaling", "linear"]),
    "rope_scaling_factor_negative": (lambda c: c["rope_scaling"].update(factor=-4), ["rope_scaling.factor"]),
    "rope_scaling_factor_str": (lambda c: c["rope_scaling"].update(factor="4"), ["rope_scaling.factor"]),
    "rope_scaling_no_factor": (lambda c: [c["rope_scaling"].pop("factor"),
                                          c["rope_scaling"].pop("original_max_position_embeddings")] and None,
                               ["rope_scaling.factor"]),
    "rope_scaling_omp_zero": (lambda c: c["rope_scaling"].update(original_max_position_embeddings=0),
                              ["original_max_position_embeddings"]),
    "rope_scaling_beta_negative": (lambda c: c["rope_scaling"].update(beta_fast=-32), ["beta_fast"]),
    "rope_scaling_mscale_str": (lambda c: c["rope_scaling"].update(mscale="1"), ["mscale"]),
    "quant_block_64": (_set(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}),
                       ["weight_block_size"]),
    "quant_method_int4": (_set(quantization_config={"quant_method": "awq"}), ["quant_method"]),
    "quant_static": (_set(quantization_config={"quant_method": "fp8", "activation_scheme": "static"}),
                     ["activation_scheme"]),
    "config_is_list": (lambda c: [c], ["JSON object"]),
    "config_is_null": (None, ["JSON object"]),  # the file holds `null`
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_json(tmp_path, ckpt, case):
    edit, needles = CONFIG_CASES[case]
    if case == "config_is_null":
        d = _with_config(tmp_path, ckpt, lambda c: None)
        (d / "config.json").write_text("null")
    else:
        d = _with_config(tmp_path, ckpt, edit)
    _raises(CheckpointError, lambda: load_model(str(d)), str(d / "config.json"), *needles)
    # the same config read on its own: the same error
    with pytest.raises(CheckpointError):
        DeepseekV3Config.from_json_file(str(d))


def test_checkpoint_error_classes():
    """CheckpointError is a ValueError (existing `except ValueError` keeps working); a path that does not exist
    is also a FileNotFoundError."""
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(CheckpointNotFoundError, CheckpointError) and issubclass(CheckpointNotFoundError,
                                                                              FileNotFoundError)


def test_671b_config_over_tiny_weights_costs_nothing(tmp_path, ckpt):
    """The released 671B config over tiny weights fails on the meta device: quickly, naming the mis-shaped
    keys, without allocating the model."""
    full = {**DeepseekV3Config.from_dict(_V3_RELEASED).to_dict(), "quantization_config": None}
    d = _with_config(tmp_path, ckpt, lambda c: full)
    t0 = time.perf_counter()
    msg = _raises(CheckpointError, lambda: load_model(str(d)), "mis-shaped keys", "model.embed_tokens.weight",
                  "(1024, 256)", "(129280, 7168)")
    assert time.perf_counter() - t0 < 120, "the 671B model was allocated?"
    assert "missing keys" in msg


# DeepSeek-V3's released config.json (sizes only)
_V3_RELEASED = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840}


# ------------------------------------------------------------------------------------------------
# checkpoint files

def test_config_without_model_type_but_deepseek_architecture(tmp_path, ckpt, model):
    d = _with_config(tmp_path, ckpt, lambda c: c.pop("model_type") and None)
    loaded = load_model(str(d))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_config_json_only(tmp_path, ckpt):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    _raises(CheckpointError, lambda: load_model(str(d)), str(d), "safetensors", "random_init=True")
    m = load_model(str(d), random_init=True)  # explicitly asked for: the config with seeded random weights
    assert m.config.hidden_size == 256


def test_no_config_json(tmp_path, ckpt):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(ckpt / "model.safetensors", d / "model.safetensors")
    _raises(CheckpointError, lambda: load_model(str(d)), "config.json", "no such file")


def test_empty_directory(tmp_path):
    _raises(CheckpointError, lambda: load_model(str(tmp_path)), "config.json")


def test_invalid_json_config(tmp_path, ckpt):
    d = _with_config(tmp_path, ckpt, lambda c: None)
    (d / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": 256,')
    _raises(CheckpointError, lambda: load_model(str(d)), str(d / "config.json"), "invalid JSON", "line 1")


def test_binary_config(tmp_path, ckpt):
    d = _with_config(tmp_path, ckpt, lambda c: None)
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    _raises(CheckpointError, lambda: load_model(str(d)), str(d / "config.json"))


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "header_only"])
def test_unreadable_safetensors(tmp_path, ckpt, how):
    d = _copy(ckpt, tmp_path / "c")
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 100,
                      "empty": b"", "header_only": data[:8]}[how])
    _raises(CheckpointError, lambda: load_model(str(d)), str(path), "safetensors")


def test_index_names_absent_shard(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    _raises(CheckpointError, lambda: load_model(str(d)), "model.safetensors.index.json", shard.name,
            "not in")


def test_index_all_shards_absent(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    for shard in d.glob("model-*.safetensors"):
        shard.unlink()
    _raises(CheckpointError, lambda: load_model(str(d)), "model-00001-of-")


@pytest.mark.parametrize("content,needle", [
    ("{not json", "invalid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": []}', "weight_map"),
    ('{"weight_map": {}}', "weight_map is empty"),
    ('{"weight_map": {"model.norm.weight": 3}}', "weight_map"),
    ('[1, 2]', "weight_map"),
    ('{"weight_map": {"model.norm.weight": "../outside.safetensors"}}', "inside the directory"),
])
def test_bad_index_json(tmp_path, sharded, content, needle):
    d = _copy(sharded, tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(content)
    _raises(CheckpointError, lambda: load_model(str(d)), "model.safetensors.index.json", needle)


def test_index_maps_key_to_wrong_shard(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(CheckpointError, lambda: load_model(str(d)), key, shards[1], "do not hold")


def test_index_missing_key(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(CheckpointError, lambda: load_model(str(d)), "missing keys (1)", "model.norm.weight")


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("case,edit,needles", [
    ("missing_key", lambda sd: sd.pop("model.layers.0.self_attn.kv_b_proj.weight"),
     ["missing keys (1)", "model.layers.0.self_attn.kv_b_proj.weight"]),
    ("missing_lm_head", lambda sd: sd.pop("lm_head.weight"), ["missing keys", "lm_head.weight"]),
    ("missing_bias", lambda sd: sd.pop("model.layers.1.mlp.gate.e_score_correction_bias"),
     ["e_score_correction_bias"]),
    ("unexpected_key", lambda sd: sd.__setitem__("model.layers.0.mlp.bogus.weight", torch.zeros(3)),
     ["unexpected keys (1)", "model.layers.0.mlp.bogus.weight"]),
    ("expert_beyond_count", lambda sd: sd.__setitem__("model.layers.1.mlp.experts.16.up_proj.weight",
                                                      torch.zeros(128, 256)),
     ["unexpected keys", "experts.16"]),
    ("expert_in_dense_layer", lambda sd: sd.__setitem__("model.layers.0.mlp.experts.0.up_proj.weight",
                                                        torch.zeros(128, 256)),
     ["unexpected keys", "model.layers.0.mlp.experts.0.up_proj.weight"]),
    ("layer_beyond_config", lambda sd: sd.__setitem__("model.layers.7.input_layernorm.weight", torch.ones(256)),
     ["unexpected keys", "model.layers.7.input_layernorm.weight"]),
    ("mis_shaped", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(255)),
     ["mis-shaped keys (1)", "model.norm.weight", "(255,)", "(256,)"]),
    ("transposed", lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.weight",
                                             sd["model.layers.0.self_attn.o_proj.weight"].t().contiguous()),
     ["mis-shaped", "o_proj.weight"]),
    ("int_dtype", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(256, dtype=torch.int32)),
     ["wrong dtype", "model.norm.weight", "I32"]),
    ("bool_dtype", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(256, dtype=torch.bool)),
     ["wrong dtype", "model.norm.weight"]),
    ("fp8_without_scale", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(256).to(torch.float8_e4m3fn)),
     ["model.norm.weight", "FP8", "scale_inv"]),
])
def test_bad_tensors(tmp_path, ckpt, case, edit, needles):
    d = _copy(ckpt, tmp_path / "c")
    _rewrite(d / "model.safetensors", edit)
    _raises(CheckpointError, lambda: load_model(str(d)), str(d), *needles)


def test_fewer_layers_in_config_than_checkpoint(tmp_path, ckpt):
    """num_hidden_layers 2 over a 3-layer checkpoint: layer 2 is not an MTP layer (no eh_proj), so its keys
    are unexpected -- not silently dropped."""
    d = _with_config(tmp_path, ckpt, _set(num_hidden_layers=2))
    _raises(CheckpointError, lambda: load_model(str(d)), "unexpected keys", "model.layers.2.")


def test_duplicate_key_in_two_files(tmp_path, ckpt):
    from safetensors.torch import save_file

    d = _copy(ckpt, tmp_path / "c")
    save_file({"model.norm.weight": torch.ones(256)}, str(d / "extra.safetensors"))
    _raises(CheckpointError, lambda: load_model(str(d)), "model.norm.weight", "extra.safetensors", "model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(tmp_path, ckpt, value):
    d = _copy(ckpt, tmp_path / "c")
    key = "model.layers.1.self_attn.q_b_proj.weight"

    def poison(sd):
        sd[key][3, 5] = value

    _rewrite(d / "model.safetensors", poison)
    _raises(CheckpointError, lambda: load_model(str(d)), key, "NaN or Inf", "check_finite=False")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_model(str(d), check_finite=False)
    assert any(key in str(w.message) for w in caught), [str(w.message) for w in caught]
    w = m.state_dict()[key]
    assert (math.isnan(value) and w.isnan().any()) or (not math.isnan(value) and w.isinf().any())


def test_non_finite_fp8_weight_and_scale(tmp_path, fp8_ckpt):
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    d = _copy(fp8_ckpt, tmp_path / "w")

    def nan_weight(sd):
        w = sd[key].view(torch.uint8).clone()
        w[0, 0] = 0x7F  # e4m3fn NaN
        sd[key] = w.view(torch.float8_e4m3fn)

    _rewrite(d / "model.safetensors", nan_weight)
    _raises(CheckpointError, lambda: load_model(str(d)), key)
    _raises(CheckpointError, lambda: load_model(str(d), dequantize_fp8=True), key)
    d2 = _copy(fp8_ckpt, tmp_path / "s")
    _rewrite(d2 / "model.safetensors", lambda sd: sd[key + "_scale_inv"].fill_(float("inf")))
    _raises(CheckpointError, lambda: load_model(str(d2)), key + "_scale_inv")


def test_fp8_checkpoint_with_bf16_weight_in_fp8_slot(tmp_path, fp8_ckpt):
    key = "model.layers.0.self_attn.o_proj.weight"
    d = _copy(fp8_ckpt, tmp_path / "c")
    _rewrite(d / "model.safetensors", lambda sd: sd.__setitem__(key, sd[key].float().to(torch.bfloat16)))
    _raises(CheckpointError, lambda: load_model(str(d)), key, "F8_E4M3")


def test_good_checkpoints_still_load(ckpt, sharded, model):
    ids = torch.randint(0, 1024, (1, 5))
    for d in (ckpt, sharded):
        loaded = load_model(str(d))
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ------------------------------------------------------------------------------------------------
# load_model arguments

@pytest.mark.parametrize("kwargs,exc,needles", [
    ({"name_or_path": "/no/such/dir"}, CheckpointNotFoundError, ["/no/such/dir", "no such directory"]),
    ({"name_or_path": "tiny-v9"}, FileNotFoundError, ["tiny-v9", "tiny"]),
    ({"name_or_path": None}, TypeError, ["name_or_path"]),
    ({"name_or_path": 3}, TypeError, ["name_or_path"]),
    ({"dtype": torch.int32}, TypeError, ["dtype", "int32"]),
    ({"dtype": "float32"}, TypeError, ["dtype"]),
    ({"dtype": torch.float8_e4m3fn}, TypeError, ["dtype"]),
    ({"device": "tpu"}, ValueError, ["device", "tpu"]),
    ({"device": 0.5}, TypeError, ["device"]),
    ({"seed": "0"}, TypeError, ["seed"]),
    ({"load_mtp": "yes"}, TypeError, ["load_mtp"]),
    ({"check_finite": None}, TypeError, ["check_finite"]),
    ({"config": {"hidden_size": 8}}, TypeError, ["config"]),
    ({"name_or_path": "tiny-v2", "load_mtp": True}, ValueError, ["num_nextn_predict_layers=0"]),
])
def test_bad_load_model_arguments(kwargs, exc, needles):
    _raises(exc, lambda: load_model(**kwargs), *needles)


def test_load_model_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _raises(ValueError, lambda: load_model("tiny", device="cuda"), "device", "cuda")


def test_load_model_path_is_a_file(ckpt):
    _raises(CheckpointError, lambda: load_model(str(ckpt / "config.json")), "config.json", "directory")


def test_presets_and_random_init_still_work():
    for name in PRESETS:
        m = load_model(name)
        assert isinstance(m, DeepseekV3ForCausalLM) and not m.training


# ------------------------------------------------------------------------------------------------
# generate()

def _ids(*shape):
    return torch.randint(0, 1024, shape, generator=torch.Generator().manual_seed(0))


GENERATE_CASES = {
    "float_ids": ({"input_ids": torch.zeros(1, 4)}, TypeError, ["input_ids", "float32"]),
    "bool_ids": ({"input_ids": torch.ones(1, 4, dtype=torch.bool)}, TypeError, ["input_ids", "bool"]),
    "3d_ids": ({"input_ids": torch.zeros(1, 2, 3, dtype=torch.long)}, ValueError, ["input_ids", "(1, 2, 3)"]),
    "0d_ids": ({"input_ids": torch.tensor(3)}, ValueError, ["input_ids"]),
    "empty_prompt": ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, ["input_ids", "T >= 1"]),
    "empty_batch": ({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, ValueError, ["input_ids", "B >= 1"]),
    "negative_id": ({"input_ids": torch.tensor([[1, -1, 2]])}, ValueError, ["input_ids", "vocab_size=1024", "-1"]),
    "id_eq_vocab": ({"input_ids": torch.tensor([[1, 1024]])}, ValueError, ["input_ids", "1024"]),
    "id_huge": ({"input_ids": torch.tensor([[10 ** 12]])}, ValueError, ["input_ids"]),
    "list_empty": ({"input_ids": []}, ValueError, ["input_ids"]),
    "list_with_empty": ({"input_ids": [[1, 2], []]}, ValueError, ["input_ids[1]", "non-empty"]),
    "list_of_str": ({"input_ids": [["a", "b"]]}, TypeError, ["input_ids[0]", "'a'"]),
    "list_of_float": ({"input_ids": [[1.5, 2.0]]}, TypeError, ["input_ids[0]", "1.5"]),
    "list_out_of_range": ({"input_ids": [[1, 2], [3, 2000]]}, ValueError, ["input_ids[1]", "2000"]),
    "list_nested_too_deep": ({"input_ids": [[[1, 2]]]}, TypeError, ["input_ids[0]"]),
    "string_ids": ({"input_ids": "hello"}, TypeError, ["input_ids", "str"]),
    "none_ids": ({"input_ids": None}, TypeError, ["input_ids"]),
    "numpy_like_int": ({"input_ids": 5}, TypeError, ["input_ids"]),
    "max_new_negative": ({"max_new_tokens": -1}, ValueError, ["max_new_tokens", "-1"]),
    "max_new_float": ({"max_new_tokens": 2.5}, TypeError, ["max_new_tokens", "2.5"]),
    "max_new_str": ({"max_new_tokens": "4"}, TypeError, ["max_new_tokens"]),
    "max_new_bool": ({"max_new_tokens": True}, TypeError, ["max_new_tokens"]),
    "max_new_none": ({"max_new_tokens": None}, TypeError, ["max_new_tokens"]),
    "beyond_max_positions": ({"max_new_tokens": 4096}, ValueError, ["max_position_embeddings=4096", "4096"]),
    "temperature_negative": ({"temperature": -0.5}, ValueError, ["temperature", "-0.5"]),
    "temperature_nan": ({"temperature": float("nan")}, ValueError, ["temperature", "nan"]),
    "temperature_inf": ({"temperature": float("inf")}, ValueError, ["temperature"]),
    "temperature_str": ({"temperature": "0.7"}, TypeError, ["temperature"]),
    "temperature_none": ({"temperature": None}, TypeError, ["temperature"]),
    "top_p_zero": ({"top_p": 0.0}, ValueError, ["top_p", "(0, 1]"]),
    "top_p_above_one": ({"top_p": 1.5}, ValueError, ["top_p", "1.5"]),
    "top_p_negative": ({"top_p": -0.1}, ValueError, ["top_p"]),
    "top_p_nan": ({"top_p": float("nan")}, ValueError, ["top_p"]),
    "top_p_str": ({"top_p": "0.9"}, TypeError, ["top_p"]),
    "eos_out_of_vocab": ({"eos_token_id": 1024}, ValueError, ["eos_token_id", "1024"]),
    "eos_negative": ({"eos_token_id": -1}, ValueError, ["eos_token_id", "-1"]),
    "eos_list_bad": ({"eos_token_id": [1, 5000]}, ValueError, ["eos_token_id", "5000"]),
    "eos_str": ({"eos_token_id": "1"}, TypeError, ["eos_token_id"]),
    "eos_float": ({"eos_token_id": 1.0}, TypeError, ["eos_token_id"]),
    "eos_list_of_float": ({"eos_token_id": [1.0]}, TypeError, ["eos_token_id"]),
    "eos_float_tensor": ({"eos_token_id": torch.tensor([1.0])}, TypeError, ["eos_token_id"]),
    "use_cache_str": ({"use_cache": "no"}, TypeError, ["use_cache"]),
    "use_mtp_int": ({"use_mtp": 1}, TypeError, ["use_mtp"]),
    "return_stats_none": ({"return_stats": None}, TypeError, ["return_stats"]),
    "page_size_10": ({"page_size": 10}, ValueError, ["page_size", "16", "10"]),
    "page_size_zero": ({"page_size": 0}, ValueError, ["page_size"]),
    "page_size_str": ({"page_size": "64"}, TypeError, ["page_size"]),
    "cache_dtype_int8": ({"cache_dtype": torch.int8}, ValueError, ["cache_dtype", "int8"]),
    "cache_dtype_str": ({"cache_dtype": "bf16"}, TypeError, ["cache_dtype"]),
    "generator_str": ({"generator": "seed"}, TypeError, ["generator"]),
    "on_token_int": ({"on_token": 5}, TypeError, ["on_token"]),
    "mtp_without_layers": ({"use_mtp": True}, ValueError, ["use_mtp", "MTP"]),
    "mtp_with_sampling": ({"use_mtp": True, "temperature": 0.5}, ValueError, ["use_mtp", "greedy"]),
    "mtp_without_cache": ({"use_mtp": True, "use_cache": False}, ValueError, ["use_mtp", "use_cache"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_bad_generate_arguments(model, case):
    kwargs, exc, needles = GENERATE_CASES[case]
    kwargs = {"input_ids": _ids(2, 4), "max_new_tokens": 2, **kwargs}
    _raises(exc, lambda: generate(model, **kwargs), *needles)


def test_generate_bad_model():
    _raises(TypeError, lambda: generate("tiny", _ids(1, 3)), "model")
    _raises(TypeError, lambda: generate(torch.nn.Linear(2, 2), _ids(1, 3)), "model")


def test_generate_accepts_the_valid_edges(model):
    """What is valid still runs: int32 ids, a list of tensors, eos as a list, max_new_tokens 0, the last
    position, top_p 1 and temperature 0."""
    out = generate(model, _ids(2, 4).int(), max_new_tokens=2)
    assert out.shape == (2, 6) and out.dtype == torch.long
    outs = generate(model, [torch.tensor([1, 2, 3]), [4, 5]], max_new_tokens=1, eos_token_id=[1, 2])
    assert [o.numel() for o in outs] == [4, 3]
    assert torch.equal(generate(model, _ids(1, 3), max_new_tokens=0), _ids(1, 3))
    full = generate(model, _ids(1, 2), max_new_tokens=1, temperature=0.0, top_p=1.0)
    assert full.shape == (1, 3)


@pytest.mark.parametrize("geometry", [(96, 32), (128, 16), (512, 32)])
def test_generate_any_geometry_with_cache(geometry):
    """Configs whose cache row is not the decode kernel's 512 + 64 generate through the paged cache (the
    pure-torch attention) -- the same tokens as recomputation, in fp32, bf16 and with an FP8 cache."""
    from deepkernels.model.config import tiny_config

    rank, rope = geometry
    config = DeepseekV3Config.from_dict({**tiny_config().to_dict(), "kv_lora_rank": rank, "qk_rope_head_dim": rope})
    m = DeepseekV3ForCausalLM(config, dtype=torch.float32).init_random_weights(0).eval()
    ids = _ids(2, 5)
    cached, stats = generate(m, ids, max_new_tokens=4, return_stats=True)
    assert torch.equal(cached, generate(m, ids, max_new_tokens=4, use_cache=False))
    assert stats.decode_steps == 3
    mixed = generate(m, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=3)
    ref = generate(m, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=3, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(mixed, ref))
    bf16 = DeepseekV3ForCausalLM(config, dtype=torch.bfloat16).init_random_weights(0).eval()
    for cache_dtype in (None, torch.float8_e4m3fn):
        out = generate(bf16, ids, max_new_tokens=3, cache_dtype=cache_dtype)
        assert out.shape == (2, 8) and int(out.max()) < 1024


# ------------------------------------------------------------------------------------------------
# CLIs: one-line `error: ...`, exit 2 (usage / values) or 1 (files, checkpoints), no traceback

def _cli(capsys, main, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


MODEL_CLI_CASES = {
    "no_command": ([], 2, ["required"]),
    "unknown_command": (["train"], 2, ["train"]),
    "unknown_flag": (["generate", "--bogus"], 2, ["--bogus"]),
    "max_new_not_int": (["generate", "--max-new-tokens", "x"], 2, ["--max-new-tokens", "'x'"]),
    "max_new_negative": (["generate", "--max-new-tokens", "-3"], 2, ["--max-new-tokens", "-3"]),
    "temperature_negative": (["generate", "--temperature", "-1"], 2, ["--temperature"]),
    "temperature_nan": (["generate", "--temperature", "nan"], 2, ["--temperature"]),
    "top_p_zero": (["generate", "--top-p", "0"], 2, ["--top-p"]),
    "top_p_two": (["generate", "--top-p", "2"], 2, ["--top-p"]),
    "page_size": (["generate", "--page-size", "24"], 2, ["--page-size", "24"]),
    "warmup": (["generate", "--warmup", "7"], 2, ["--warmup"]),
    "dtype": (["generate", "--dtype", "int8"], 2, ["--dtype", "int8"]),
    "cache_dtype": (["generate", "--cache-dtype", "fp4"], 2, ["--cache-dtype", "fp4"]),
    "device": (["generate", "--device", "tpu"], 2, ["--device", "tpu"]),
    "prompt_ids_text": (["generate", "--prompt-ids", "1,two,3"], 2, ["--prompt-ids", "1,two,3"]),
    "prompt_ids_empty": (["generate", "--prompt-ids", ","], 2, ["--prompt-ids"]),
    "prompt_empty": (["generate", "--prompt", ""], 2, ["--prompt"]),
    "eos_negative": (["generate", "--eos-token-id", "-2"], 2, ["--eos-token-id"]),
    "model_missing": (["generate", "--model", "/no/such/ckpt"], 1, ["/no/such/ckpt"]),
    "mtp_sampling": (["generate", "--mtp", "--temperature", "0.5"], 2, ["--mtp"]),
    "mtp_v2": (["generate", "--model", "tiny-v2", "--mtp", "--max-new-tokens", "1"], 2, ["MTP"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CLI_CASES))
def test_model_cli_bad_invocations(capsys, case):
    from deepkernels.model.__main__ import main

    argv, code, needles = MODEL_CLI_CASES[case]
    rc, err = _cli(capsys, main, argv)
    assert rc == code, (rc, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


@pytest.mark.parametrize("case", ["ids_out_of_vocab", "eos_out_of_vocab", "beyond_max_positions"])
def test_model_cli_bad_values_after_loading(capsys, case):
    from deepkernels.model.__main__ import main

    argv = {"ids_out_of_vocab": ["--prompt-ids", "1,5000"], "eos_out_of_vocab": ["--eos-token-id", "99999"],
            "beyond_max_positions": ["--max-new-tokens", "5000"]}[case]
    rc, err = _cli(capsys, main, ["generate", "--warmup", "0", *argv])
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert any(n in last for n in ("5000", "99999")), last


def test_model_cli_bad_checkpoints(capsys, tmp_path, ckpt):
    from deepkernels.model.__main__ import main

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text('{"model_type": "deepseek_v3"}')
    bad_json = _with_config(tmp_path, ckpt, lambda c: None)
    (bad_json / "config.json").write_text("{")
    for d, needle in ((only_config, "hidden_size"), (bad_json, "invalid JSON")):
        rc, err = _cli(capsys, main, ["generate", "--model", str(d)])
        assert rc == 1 and err.startswith("error: ") and needle in err and "Traceback" not in err, err


BENCH_CLI_CASES = {
    "no_name": ([], 2, ["name"]),
    "unknown_family": (["flashattention"], 2, ["flashattention"]),
    "unknown_flag": (["quant", "--fast"], 2, ["--fast"]),
    "device": (["quant", "--device", "tpu"], 2, ["--device", "tpu"]),
    "out_is_dir": (["quant", "--out", "/"], 2, ["--out"]),
}


@pytest.mark.parametrize("case", sorted(BENCH_CLI_CASES))
def test_bench_cli_bad_invocations(capsys, case):
    from bench.__main__ import main

    argv, code, needles = BENCH_CLI_CASES[case]
    rc, err = _cli(capsys, main, argv)
    assert rc == code, (rc, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_bench_cli_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from bench.__main__ import main

    rc, err = _cli(capsys, main, ["quant", "--device", "cuda"])
    assert rc == 2 and err.startswith("error: ") and "GPU" in err


@pytest.mark.parametrize("argv,needle", [(["--bench", "nope"], "--bench"), (["--max-new-tokens", "0"],
                                                                              "--max-new-tokens"),
                                         (["--device", "tpu"], "--device"), (["--what"], "--what")])
def test_demo_cli_bad_invocations(capsys, argv, needle):
    from deepkernels.demo import main

    rc, err = _cli(capsys, main, argv)
    assert rc == 2 and err.startswith("error: ") and needle in err, err


def test_clis_in_a_subprocess_print_no_traceback(tmp_path):
    """The real entry points (python -m ...): one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv, code in ((["deepkernels.model", "generate", "--model", str(tmp_path / "nope")], 1),
                       (["deepkernels.model", "generate", "--top-p", "7"], 2),
                       (["bench", "quant", "--device", "tpu"], 2)):
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == code, (argv, proc.returncode, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------------------
# save_pretrained and sample_next_token

def test_bad_save_pretrained_arguments(tmp_path, model):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for kwargs, exc, needle in (({"model": "tiny"}, TypeError, "model"), ({"directory": 3}, TypeError, "directory"),
                                ({"fp8": "yes"}, TypeError, "fp8"), ({"max_shard_bytes": 0}, ValueError,
                                                                     "max_shard_bytes"),
                                ({"directory": str(a_file)}, ValueError, "not a directory")):
        kwargs = {"model": model, "directory": str(tmp_path / "out"), **kwargs}
        _raises(exc, lambda: save_pretrained(**kwargs), needle)


def test_bad_sample_next_token_arguments():
    from deepkernels.model import sample_next_token

    logits = torch.randn(2, 8)
    for args, exc, needle in (((torch.randn(8),), TypeError, "logits"), ((logits.long(),), TypeError, "logits"),
                              (("x",), TypeError, "logits"), ((logits, -1.0), ValueError, "temperature"),
                              ((logits, float("nan")), ValueError, "temperature"),
                              ((logits, 1.0, 0.0), ValueError, "top_p"), ((logits, 1.0, 2.0), ValueError, "top_p")):
        _raises(exc, lambda: sample_next_token(*args), needle)
    assert torch.equal(sample_next_token(logits), logits.argmax(-1))


def test_generate_numpy_inputs(model):
    """numpy ids and ints are accepted like tensors and ints (integer dtypes only)."""
    np = pytest.importorskip("numpy")
    ref = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, eos_token_id=1)
    out = generate(model, np.array([[1, 2, 3]]), max_new_tokens=np.int64(2), eos_token_id=np.int64(1))
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
    outs = generate(model, [np.array([1, 2, 3]), [np.int32(4), 5]], max_new_tokens=2, eos_token_id=np.array([1]))
    assert torch.equal(outs[0], ref[0])
    _raises(TypeError, lambda: generate(model, np.array([[1.5, 2.0]]), max_new_tokens=1), "input_ids", "float64")
    _raises(TypeError, lambda: generate(model, [[np.float32(1.0)]], max_new_tokens=1), "input_ids[0]")
    _raises(TypeError, lambda: generate(model, np.array([[True]]), max_new_tokens=1), "input_ids", "bool")


FORWARD_CASES = {
    "id_at_vocab": (lambda v: torch.tensor([[1, v]]), ValueError, ["input_ids", "vocab_size"]),
    "negative_id": (lambda v: torch.tensor([[-1, 2]]), ValueError, ["input_ids", "vocab_size"]),
    "one_dim": (lambda v: torch.tensor([1, 2]), ValueError, ["input_ids", "[B, T]"]),
    "float_ids": (lambda v: torch.tensor([[1.0, 2.0]]), TypeError, ["input_ids", "integer"]),
    "bool_ids": (lambda v: torch.tensor([[True]]), TypeError, ["input_ids", "integer"]),
    "list_ids": (lambda v: [[1, 2]], TypeError, ["input_ids", "Tensor"]),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_bad_forward_token_ids(model, case):
    """Calling the model directly checks its ids too (CPU tensors: on the host, not torch's IndexError)."""
    make, exc, needles = FORWARD_CASES[case]
    _raises(exc, lambda: model(make(model.config.vocab_size)), *needles)
    if model.num_mtp_layers:
        _raises(exc, lambda: model.forward_mtp(make(model.config.vocab_size), torch.zeros(1, 2, 8)), "next_ids")
