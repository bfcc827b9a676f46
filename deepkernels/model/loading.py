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

Loading is all-or-nothing: the model is built on the meta device, every checkpoint header is read and checked
against it (missing / unexpected / mis-shaped keys, dtypes, shards the index names but that are absent or
unreadable), and only then are the parameters allocated and filled -- every one from the checkpoint, none left
random. Each problem raises :class:`CheckpointError` (a ValueError) naming the file and the key or field; a
non-finite weight is one too (``check_finite=False`` makes it a warning). A directory with only a config.json
is an error (``random_init=True`` builds its config with seeded random weights).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings

import torch
from torch import nn

from ..nn.linear import Fp8Linear
from .config import PRESETS, CheckpointError, CheckpointNotFoundError, DeepseekV3Config
from .modeling import DeepseekV3ForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_MTP_SHARED = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes (the ones a weight may have)
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn}
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["CheckpointError", "CheckpointNotFoundError", "load_model", "save_pretrained", "load_tokenizer",
           "load_state_dict_from_checkpoint"]


class _Header:
    """What the checkpoint holds: key -> (file, shape, dtype name), read from the safetensors headers only."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            weight_map = self._read_index(index)
            paths = sorted(set(weight_map.values()))
            absent = [f for f in paths if not os.path.isfile(os.path.join(directory, f))]
            if absent:
                counts = {f: sum(1 for v in weight_map.values() if v == f) for f in absent}
                raise CheckpointError(_list(f"{index}: names shard files that are not in {directory}",
                                            [f"{f} ({counts[f]} keys, e.g. "
                                             f"{next(k for k, v in weight_map.items() if v == f)})"
                                             for f in absent]))
        else:
            paths = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
            if not paths:
                raise CheckpointError(f"{directory}: no *.safetensors weights and no {INDEX_FILE} (a config.json "
                                      "alone is not a checkpoint; load_model(..., random_init=True) / the CLI's "
                                      "--random-init build its config with random weights)")
            weight_map = None
        in_file: dict[str, set[str]] = {}
        for name in paths:
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
                    for k in keys:
                        sl = f.get_slice(k)
                        if weight_map is None or weight_map.get(k) == name:
                            if weight_map is None and k in self.files:
                                raise CheckpointError(f"{path}: key {k} is also in {self.files[k]} (two files "
                                                      f"hold it; which one is meant?)")
                            self.files[k] = path
                            self.shapes[k] = tuple(sl.get_shape())
                            self.dtypes[k] = sl.get_dtype()
            except CheckpointError:
                raise
            except Exception as e:  # safetensors' SafetensorError (truncated, garbage), OSError
                raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
            in_file[name] = keys
        if weight_map is not None:
            lost = sorted(k for k, v in weight_map.items() if k not in in_file.get(v, ()))
            if lost:
                raise CheckpointError(_list(f"{index}: maps keys to shard files that do not hold them",
                                            [f"{k} -> {weight_map[k]}" for k in lost]))

    @staticmethod
    def _read_index(index: str) -> dict[str, str]:
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: cannot read: {e}") from None
        if not isinstance(data, dict) or "weight_map" not in data:
            raise CheckpointError(f"{index}: missing 'weight_map' (expected {{\"weight_map\": {{key: file}}}})")
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: weight_map: expected an object of key -> shard file name, got "
                                  f"{str(weight_map)[:120]}")
        if not weight_map:
            raise CheckpointError(f"{index}: weight_map is empty")
        bad = sorted({v for v in weight_map.values() if os.path.isabs(v) or ".." in v.replace("\\", "/").split("/")})
        if bad:
            raise CheckpointError(f"{index}: weight_map: shard file names must be inside the directory, got {bad[:4]}")
        return weight_map


def _list(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def _expected_skip(key: str, config: DeepseekV3Config, model_keys, ckpt_keys, load_mtp: bool) -> bool:
    """Keys a checkpoint may hold that this model does not load: MTP layers (a layer at or past
    num_hidden_layers that has the MTP ``eh_proj``), other EP ranks' experts, rotary caches."""
    m = _LAYER.match(key)
    if m and not load_mtp:
        layer = int(m.group(1))
        if layer >= config.num_hidden_layers and f"model.layers.{layer}.eh_proj.weight" in ckpt_keys:
            return True
    e = _EXPERT.match(key)
    if e and int(e.group(2)) < config.n_routed_experts and key not in model_keys:
        layer, expert = e.group(1), e.group(2)
        # an expert this rank does not hold (expert parallelism): its MoE layer exists, the expert is remote
        if (f"model.layers.{layer}.mlp.gate.weight" in model_keys
                and f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight" not in model_keys
                and f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight_scale_inv" not in model_keys):
            return True
    return key.endswith("rotary_emb.inv_freq")


def _empty_shared_expert(key: str, config: DeepseekV3Config, header: "_Header") -> bool:
    """transformers builds a MoE layer's shared_experts MLP even with n_shared_experts=0 (intermediate size 0),
    so its checkpoints then hold empty [0, H] / [H, 0] shared-expert weights: nothing to load."""
    return (config.n_shared_experts == 0 and ".mlp.shared_experts." in key
            and math.prod(header.shapes[key]) == 0)


def _non_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float8_e4m3fn:  # e4m3fn has no inf; NaN is S.1111.111
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def load_state_dict_from_checkpoint(model: DeepseekV3ForCausalLM, directory: str, load_mtp: bool = False,
                                    dequantize_fp8: bool = False, check_finite: bool = True,
                                    device: str | torch.device | None = None) -> None:
    """Fill ``model`` from the checkpoint (memory-mapped: only the keys the model holds are read).

    ``model`` may be on the meta device: the checkpoint is checked against its shapes first, then the model is
    materialised on ``device`` (``to_empty``) and every parameter and persistent buffer is copied in.
    ``dequantize_fp8``: the checkpoint is FP8 but the model is not (a bf16/fp32 model of an FP8 checkpoint):
    each ``weight`` is dequantised with its ``weight_scale_inv`` (so is any FP8 weight the model keeps in high
    precision, e.g. an MTP ``eh_proj`` stored in FP8).
    Raises CheckpointError listing every missing, unexpected, mis-shaped and ill-typed key at once, or naming
    the non-finite tensors (``check_finite=False``: a warning instead).
    """
    from safetensors import safe_open

    from ..fp8 import per_block_cast_from_fp8

    config = model.config
    header = _Header(directory)
    files = header.files
    ckpt_keys = set(files)
    # a tied config whose checkpoint still holds its own lm_head.weight: that head is used (untied), as
    # transformers' from_pretrained does
    tied = config.tie_word_embeddings and "lm_head.weight" not in ckpt_keys
    if config.tie_word_embeddings and not tied:
        model.untie_lm_head()
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    fp8 = torch.float8_e4m3fn
    # the scale of an FP8 weight the model holds in high precision (every linear with ``dequantize_fp8``; an
    # MTP eh_proj some checkpoints quantise) is read to dequantise that weight, not loaded on its own
    scale_keys = {k for k in ckpt_keys if k.endswith(".weight_scale_inv") and k not in state
                  and (w := state.get(k[: -len("_scale_inv")])) is not None and w.dtype != fp8}
    # an MTP layer's embedding / head left out of the checkpoint: the main model's (the release stores copies)
    main_head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    shared = {k: ("model.embed_tokens.weight" if m.group(1) == "embed_tokens" else main_head)
              for k in state if k not in ckpt_keys and (m := _MTP_SHARED.match(k))
              and int(k.split(".")[2]) >= config.num_hidden_layers}
    missing = sorted(k for k in state if k not in ckpt_keys and k not in shared)
    unexpected = sorted(k for k in ckpt_keys - set(state) - scale_keys
                        if not _expected_skip(k, config, state, ckpt_keys, load_mtp)
                        and not _empty_shared_expert(k, config, header))
    mis_shaped, bad_dtype = [], []
    for k in sorted(state):
        if k not in ckpt_keys:
            continue
        shape, want = header.shapes[k], tuple(state[k].shape)
        if shape != want:
            mis_shaped.append(f"{k}: checkpoint {shape}, model {want} ({os.path.basename(files[k])})")
            continue
        dt = header.dtypes[k]
        if dt not in _FLOAT_DTYPES:
            bad_dtype.append(f"{k}: {dt} in {os.path.basename(files[k])}, expected a floating-point dtype")
        elif dt == "F8_E4M3" and state[k].dtype != fp8 and k + "_scale_inv" not in ckpt_keys:
            bad_dtype.append(f"{k}: FP8 in the checkpoint without {k}_scale_inv, {state[k].dtype} in the model")
        elif state[k].dtype == fp8 and dt != "F8_E4M3":
            bad_dtype.append(f"{k}: {dt} in {os.path.basename(files[k])}, expected F8_E4M3 (an FP8 checkpoint's "
                             "quantised weight; or load a high-precision checkpoint with a config.json that has "
                             "no quantization_config)")
    for k in sorted(scale_keys):
        if header.dtypes[k] not in _FLOAT_DTYPES:
            bad_dtype.append(f"{k}: {header.dtypes[k]}, expected a floating-point scale")
    if missing or unexpected or mis_shaped or bad_dtype:
        parts = [f"checkpoint {directory} does not match the model built from its config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", mis_shaped), ("keys of the wrong dtype", bad_dtype)):
            if items:
                parts.append(_list(title, items))
        raise CheckpointError("\n".join(parts))

    # every check passed: allocate, then fill every parameter and persistent buffer from the checkpoint
    if any(t.is_meta for t in state.values()):
        model.to_empty(device=device if device is not None else "cpu")
        for name, module in model.named_modules():  # non-persistent buffers (RoPE's inv_freq) are computed
            if any(module._buffers.get(n) is not None for n in module._non_persistent_buffers_set):
                if not hasattr(module, "reset_parameters"):
                    raise RuntimeError(f"{name or 'model'}: non-persistent buffers and no reset_parameters() to "
                                       "rebuild them after a meta-device build")
                module.reset_parameters()
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        state = model.state_dict()
        if tied:
            state.pop("lm_head.weight", None)
    by_file: dict[str, list[str]] = {}
    for k in state:
        if k in ckpt_keys:
            by_file.setdefault(files[k], []).append(k)
    non_finite = []
    for path, keys in sorted(by_file.items()):
        try:
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    tensor = f.get_tensor(k)
                    if tensor.dtype == fp8 and state[k].dtype != fp8:
                        scale_key = k + "_scale_inv"
                        with safe_open(files[scale_key], framework="pt") as fs:
                            scale = fs.get_tensor(scale_key)
                        if _non_finite(scale):
                            non_finite.append(f"{scale_key} ({os.path.basename(files[scale_key])})")
                        tensor = per_block_cast_from_fp8(tensor, scale, torch.float32)
                    if _non_finite(tensor):
                        non_finite.append(f"{k} ({os.path.basename(path)})")
                    state[k].copy_(tensor.to(state[k].device))
        except CheckpointError:
            raise
        except Exception as e:  # a file changed or broke since its header was read
            raise CheckpointError(f"{path}: cannot read its tensors: {e}") from None
    for k, src in shared.items():
        state[k].copy_(state[src])
    if non_finite:
        msg = _list(f"checkpoint {directory}: tensors with NaN or Inf values", non_finite)
        if check_finite:
            raise CheckpointError(msg + "\n  (load_model(..., check_finite=False) loads them anyway, with a warning)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _check_load_args(name_or_path, device, dtype, seed, config, flags: dict) -> torch.device:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a preset name {sorted(PRESETS)} or a checkpoint directory (str or "
                        f"os.PathLike), got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype) or dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in MODEL_DTYPES]} (FP8 checkpoints keep their "
                        f"FP8 linears whatever the dtype), got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if config is not None and not isinstance(config, DeepseekV3Config):
        raise TypeError(f"config: expected a DeepseekV3Config or None, got {type(config).__name__}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: expected e.g. 'cpu' or 'cuda', got {str(device)!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {str(device)!r}")
    return device


def load_model(name_or_path: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               group=None, seed: int = 0, load_mtp: bool = False, dequantize_fp8: bool = False,
               config: DeepseekV3Config | None = None, random_init: bool = False,
               check_finite: bool = True) -> DeepseekV3ForCausalLM:
    """A ready-to-run (eval mode) DeepSeek-V3.

    Args:
        name_or_path: ``"tiny"`` / ``"tiny-v2"`` / ``"tiny-v2-lite"`` (built-in configs, seeded random weights)
            or a directory with ``config.json`` and safetensors weights. Every parameter then comes from the
            checkpoint, or the load raises :class:`CheckpointError` naming the file and key (see the module doc).
        device, dtype: where the model lives and the dtype of its non-FP8 parameters (float32, bfloat16 or
            float16). FP8 checkpoints keep their linear weights in e4m3 (Fp8Linear) unless ``dequantize_fp8``.
        group: a torch.distributed process group for expert parallelism; only this rank's experts are loaded.
        load_mtp: also build and load the ``config.num_nextn_predict_layers`` multi-token-prediction layers
            (for ``forward_mtp`` and ``generate(..., use_mtp=True)``); False skips their checkpoint keys.
        config: use this config instead of the directory's config.json (or, with a preset name, of the preset).
        random_init: a directory's config with seeded random weights, its safetensors ignored.
        check_finite: a NaN/Inf weight is a CheckpointError (False: a RuntimeWarning naming the tensors).
    """
    device = _check_load_args(name_or_path, device, dtype, seed, config,
                              {"load_mtp": load_mtp, "dequantize_fp8": dequantize_fp8, "random_init": random_init,
                               "check_finite": check_finite})
    directory = None
    if isinstance(name_or_path, str) and name_or_path in PRESETS:  # (a directory of that name: pass "./tiny")
        config = config if config is not None else PRESETS[name_or_path]()
    elif os.path.isdir(name_or_path):
        directory = os.fspath(name_or_path)
        if config is None:
            config = DeepseekV3Config.from_json_file(directory)
    elif os.path.exists(name_or_path):
        raise CheckpointError(f"name_or_path: {os.fspath(name_or_path)!r} is a file; expected a checkpoint "
                              "directory (config.json + *.safetensors) or a preset name")
    else:
        raise CheckpointNotFoundError(f"name_or_path: expected a preset name {sorted(PRESETS)} or a checkpoint "
                                      f"directory, got {os.fspath(name_or_path)!r} (no such directory)")
    if dequantize_fp8 and config.is_fp8:
        config = DeepseekV3Config.from_dict({**config.to_dict(), "quantization_config": None})
    if load_mtp and config.num_nextn_predict_layers < 1:
        raise ValueError(f"load_mtp=True: {name_or_path} has no MTP layers (num_nextn_predict_layers=0)")
    if directory is not None and not random_init:
        # built on the meta device: a wrong config.json (say, the 671B defaults over tiny weights) costs
        # nothing; parameters are allocated only once the checkpoint's headers match them
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config, group=group, dtype=dtype, mtp=load_mtp)
        load_state_dict_from_checkpoint(model, directory, load_mtp, dequantize_fp8, check_finite, device)
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

    if not isinstance(model, DeepseekV3ForCausalLM):
        raise TypeError(f"model: expected a DeepseekV3ForCausalLM, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got {type(directory).__name__}")
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8: expected True or False, got {fp8!r}")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected an int >= 1, got {max_shard_bytes!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory: {os.fspath(directory)!r} exists and is not a directory")
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
        if k not in tensors and not (k == "lm_head.weight" and model.lm_head_tied):
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
