"""Hugging Face checkpoints: load (sharded, memory-mapped safetensors, official key names) and save.

A checkpoint directory holds ``config.json``, one or more ``*.safetensors`` files (with
``model.safetensors.index.json`` when sharded) and optionally a tokenizer. Key names are the official ones:
``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q_a_proj,q_a_layernorm,q_b_proj,kv_a_proj_with_mqa,
kv_a_layernorm,kv_b_proj,o_proj}.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` (dense layers),
``model.layers.{i}.mlp.gate.weight``, ``...mlp.gate.e_score_correction_bias``,
``...mlp.experts.{e}.{gate,up,down}_proj.weight``, ``...mlp.shared_experts.*``, ``model.norm.weight``,
``lm_head.weight``; FP8 checkpoints add ``<linear>.weight_scale_inv`` [ceil(N/128), ceil(K/128)] fp32 beside
each e4m3 ``<linear>.weight``. DeepSeek-V2 checkpoints have no ``e_score_correction_bias`` (their routing is
``greedy``/``group_limited_greedy``). The multi-token-prediction layers ``model.layers.{num_hidden_layers + i}.*``
(a decoder layer's keys plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}``)
are skipped unless ``load_mtp``; a checkpoint whose MTP layer leaves out its copies of the embedding / LM head
gets the main model's.
"""
from __future__ import annotations

import glob
import json
import os
import re

import torch
from torch import nn

from ..nn.linear import Fp8Linear
from .config import PRESETS, DeepseekV3Config
from .modeling import DeepseekV3ForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
_MTP_SHARED = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model built from its config.json (the message lists every problem)."""


def _checkpoint_files(directory: str) -> dict[str, str]:
    """key -> safetensors file, from the index json when present, else from every *.safetensors file."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    keys = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys.update({k: path for k in f.keys()})
    return keys


def _list(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def _expected_skip(key: str, config: DeepseekV3Config, model_keys, load_mtp: bool) -> bool:
    """Keys a checkpoint may hold that this model does not load: MTP layers, other EP ranks' experts."""
    m = _LAYER.match(key)
    if m and int(m.group(1)) >= config.num_hidden_layers and not load_mtp:
        return True
    e = _EXPERT.match(key)
    if e and int(e.group(1)) < config.n_routed_experts and key not in model_keys:
        # an expert this rank does not hold (expert parallelism): its layer exists, the expert is remote
        return True
    return key.endswith("rotary_emb.inv_freq")


def load_state_dict_from_checkpoint(model: DeepseekV3ForCausalLM, directory: str, load_mtp: bool = False,
                                    dequantize_fp8: bool = False) -> None:
    """Copy the checkpoint's tensors into ``model`` (memory-mapped: only the keys the model holds are read).

    ``dequantize_fp8``: the checkpoint is FP8 but the model is not (a bf16/fp32 model of an FP8 checkpoint):
    each ``weight`` is dequantised with its ``weight_scale_inv`` (so is any FP8 weight the model keeps in high
    precision, e.g. an MTP ``eh_proj`` stored in FP8).
    Raises CheckpointError listing every missing, unexpected and mis-shaped key at once.
    """
    from safetensors import safe_open

    from ..fp8 import per_block_cast_from_fp8

    config = model.config
    files = _checkpoint_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ckpt_keys = set(files)
    # the scale of an FP8 weight the model holds in high precision (every linear with ``dequantize_fp8``; an
    # MTP eh_proj some checkpoints quantise) is read to dequantise that weight, not loaded on its own
    fp8 = torch.float8_e4m3fn
    scale_keys = {k for k in ckpt_keys if k.endswith(".weight_scale_inv") and k not in state
                  and (w := state.get(k[: -len("_scale_inv")])) is not None and w.dtype != fp8}
    # an MTP layer's embedding / head left out of the checkpoint: the main model's (the release stores copies)
    main_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    shared = {k: ("model.embed_tokens.weight" if m.group(1) == "embed_tokens" else main_head)
              for k in state if k not in ckpt_keys and (m := _MTP_SHARED.match(k))
              and int(k.split(".")[2]) >= config.num_hidden_layers}
    missing = sorted(k for k in state if k not in ckpt_keys and k not in shared)
    unexpected = sorted(k for k in ckpt_keys - set(state) - scale_keys
                        if not _expected_skip(k, config, state, load_mtp))
    by_file: dict[str, list[str]] = {}
    for k in state:
        if k in ckpt_keys:
            by_file.setdefault(files[k], []).append(k)
    mis_shaped = []
    loaded: dict[str, torch.Tensor] = {}
    for path, keys in sorted(by_file.items()):
        with safe_open(path, framework="pt") as f:
            for k in keys:
                shape = tuple(f.get_slice(k).get_shape())
                want = tuple(state[k].shape)
                if shape != want:
                    mis_shaped.append(f"{k}: checkpoint {shape}, model {want}")
                    continue
                loaded[k] = f.get_tensor(k)
                if loaded[k].dtype == fp8 and state[k].dtype != fp8 and k + "_scale_inv" not in ckpt_keys:
                    mis_shaped.append(f"{k}: FP8 in the checkpoint without {k}_scale_inv, {state[k].dtype} in "
                                      "the model")
    if missing or unexpected or mis_shaped:
        parts = [f"checkpoint {directory} does not match the model built from its config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", mis_shaped)):
            if items:
                parts.append(_list(title, items))
        raise CheckpointError("\n".join(parts))
    for k, tensor in loaded.items():
        if tensor.dtype == fp8 and state[k].dtype != fp8:
            scale_key = k + "_scale_inv"
            with safe_open(files[scale_key], framework="pt") as f:
                scale = f.get_tensor(scale_key)
            tensor = per_block_cast_from_fp8(tensor, scale, torch.float32)
        state[k].copy_(tensor.to(state[k].device))
    for k, src in shared.items():
        state[k].copy_(state[src])


def load_model(name_or_path: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               group=None, seed: int = 0, load_mtp: bool = False, dequantize_fp8: bool = False,
               config: DeepseekV3Config | None = None) -> DeepseekV3ForCausalLM:
    """A ready-to-run (eval mode) DeepSeek-V3.

    Args:
        name_or_path: ``"tiny"`` (built-in config, seeded random weights) or a directory with ``config.json``
            and safetensors weights (seeded random weights when it has none).
        device, dtype: where the model lives and the dtype of its non-FP8 parameters. FP8 checkpoints keep
            their linear weights in e4m3 (Fp8Linear) unless ``dequantize_fp8``.
        group: a torch.distributed process group for expert parallelism; only this rank's experts are loaded.
        load_mtp: also build and load the ``config.num_nextn_predict_layers`` multi-token-prediction layers
            (for ``forward_mtp`` and ``generate(..., use_mtp=True)``); False skips their checkpoint keys.
    """
    directory = None
    if config is None:
        if name_or_path in PRESETS:
            config = PRESETS[name_or_path]()
        elif os.path.isdir(name_or_path):
            directory = name_or_path
            config = DeepseekV3Config.from_json_file(name_or_path)
        else:
            raise FileNotFoundError(f"name_or_path: expected {sorted(PRESETS)} or a checkpoint directory, "
                                    f"got {name_or_path!r}")
    elif os.path.isdir(name_or_path):
        directory = name_or_path
    if dequantize_fp8 and config.is_fp8:
        config = DeepseekV3Config.from_dict({**config.to_dict(), "quantization_config": None})
    if load_mtp and config.num_nextn_predict_layers < 1:
        raise ValueError(f"load_mtp=True: {name_or_path} has no MTP layers (num_nextn_predict_layers=0)")
    has_weights = directory is not None and (glob.glob(os.path.join(directory, "*.safetensors")))
    if has_weights:
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config, group=group, dtype=dtype, mtp=load_mtp)
        model.to_empty(device=device)
        model.model.rotary_emb.reset_parameters()
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        load_state_dict_from_checkpoint(model, directory, load_mtp, dequantize_fp8)
    else:
        model = DeepseekV3ForCausalLM(config, group=group, device=device, dtype=dtype,
                                      mtp=load_mtp).init_random_weights(seed)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# saving (tiny checkpoints for tests and demos)

def _quantizable(name: str, module: nn.Module) -> bool:
    """The linears DeepSeek-V3 ships in FP8: attention projections and every MLP/expert projection (not the
    LM heads, the router, nor the MTP layer's eh_proj)."""
    return (isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith(("mlp.gate", "eh_proj",
                                                                                       "shared_head.head")))


def save_pretrained(model: DeepseekV3ForCausalLM, directory: str, fp8: bool = False,
                    max_shard_bytes: int = 2 ** 30, tokenizer=None) -> None:
    """Write config.json + safetensors shards (+ index json when sharded) with the official key names.

    ``fp8``: quantise the attention/MLP/expert linear weights with ``per_block_cast_to_fp8`` and store them as
    e4m3 ``weight`` + fp32 ``weight_scale_inv`` (and set the config's quantization_config), like the official
    FP8 release; embeddings, norms, the router and the LM head stay in the model dtype.
    """
    from safetensors.torch import save_file

    from ..fp8 import per_block_cast_to_fp8

    os.makedirs(directory, exist_ok=True)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    quantize = fp8 and not config.is_fp8
    if quantize:
        for name, module in model.named_modules():
            if _quantizable(name, module):
                w, s = per_block_cast_to_fp8(module.weight.detach().float())
                tensors[name + ".weight"], tensors[name + ".weight_scale_inv"] = w, s
    for k, v in model.state_dict().items():
        if k not in tensors and not (k == "lm_head.weight" and config.tie_word_embeddings):
            tensors[k] = v.detach().contiguous().cpu()
    if quantize:
        config = DeepseekV3Config.from_dict({**config.to_dict(), "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})
    config.save(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                       "weight_map": weight_map}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_tokenizer(name_or_path: str):
    """transformers.AutoTokenizer for a directory that has tokenizer files, else None (token ids only)."""
    if not os.path.isdir(name_or_path) or not any(
            os.path.exists(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
