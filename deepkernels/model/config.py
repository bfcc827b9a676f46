"""DeepSeek-V3 configuration, read from a Hugging Face ``config.json`` (V2/V2-Lite/V2.5/V3/R1 share the
architecture; V2 differs in its routing: softmax scores, greedy / group-limited top-k, no correction bias)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any



class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is: its config.json (unreadable, invalid JSON, a missing
    or ill-typed field, an unknown ``model_type``) or its weights (missing shards or keys, unreadable safetensors,
    mis-shaped or non-finite tensors). The message names the file and the key or field."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """``load_model``'s path is neither a preset name nor an existing checkpoint directory."""


# model_type values this model implements (transformers' DeepseekV3Config / DeepseekV2Config; V2.5 and R1
# checkpoints use these too). Others (deepseek_v32's sparse attention, llama, ...) are different models.
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}

# Fields a config.json must spell out (the released configs and transformers' save_pretrained all do): they set
# the shapes and the maths, so a missing one is an error rather than DeepSeek-V3's (671B) value.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                   "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                   "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "rms_norm_eps",
                   "max_position_embeddings")

# The official config.json key -> our field (HF renamed a few; both spellings are accepted).
_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts",
            "num_mtp_layers": "num_nextn_predict_layers"}

# A ``model_type: deepseek_v2`` config.json that leaves a field out means transformers' DeepseekV2Config
# default (HF writes only the fields that differ from it), or DeepSeek-V2's value for the fields HF's class
# does not have (scoring_func, MTP layers). Every other model type falls back to DeepSeek-V3's values.
V2_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "max_position_embeddings": 2048,
    "bos_token_id": 1, "eos_token_id": 2, "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "n_group": None, "topk_group": None, "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 1.0, "topk_method": "greedy",
    "norm_topk_prob": False, "moe_intermediate_size": 1407, "scoring_func": "softmax",
    "num_nextn_predict_layers": 0, "moe_layer_freq": 1,
}


@dataclasses.dataclass
class DeepseekV3Config:
    """Every field DeepSeek-V3's ``config.json`` uses, with DeepSeek-V3's values as defaults.

    ``q_lora_rank=None`` means a plain ``q_proj`` (DeepSeek-V2-Lite). Routing: ``scoring_func`` "sigmoid" (V3)
    or "softmax" (V2); ``topk_method`` "noaux_tc" (V3, with ``e_score_correction_bias``),
    "group_limited_greedy" (V2, V2.5) or "greedy" (V2-Lite); see ``deepkernels.nn.moe.route``.
    ``n_group``/``topk_group`` None mean 1. ``num_nextn_predict_layers``: the checkpoint's MTP layers
    (``model.layers.{num_hidden_layers + i}.*``), built only when asked for
    (``load_model(load_mtp=True)``). ``rope_scaling`` is the YaRN dict
    (``type``/``rope_type`` "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    mscale_all_dim) or None. ``quantization_config`` is ``{"quant_method": "fp8", "weight_block_size":
    [128, 128], ...}`` for FP8 checkpoints (their linear weights come with ``weight_scale_inv``).
    ``rope_interleave``: True (the checkpoints' layout: rope dims in interleaved pairs, as HF's
    ``rope_interleave=True``); False for checkpoints whose rope dims were permuted to the half-rotated layout.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # None: num_attention_heads (MLA: always equal)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    quantization_config: dict | None = None
    torch_dtype: str | None = None
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.rope_scaling, dict):
            rs = dict(self.rope_scaling)
            rs.setdefault("type", rs.get("rope_type", "default"))
            rs.setdefault("rope_type", rs["type"])
            self.rope_scaling = rs
        from ..nn.moe import check_routing

        self.n_group = 1 if self.n_group is None else self.n_group
        self.topk_group = 1 if self.topk_group is None else self.topk_group
        self._validate()
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: expected 'silu', got {self.hidden_act!r}")
        if self.extra.get("mlp_bias"):
            raise ValueError("mlp_bias: expected false (DeepSeek's MLPs and experts have no bias), got true")
        if self.n_routed_experts > 0:
            check_routing(self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group,
                          self.scoring_func, self.topk_method)
        elif self.scoring_func not in ("sigmoid", "softmax") or self.topk_method not in (
                "greedy", "group_limited_greedy", "noaux_tc"):
            check_routing(1, 1, 1, 1, self.scoring_func, self.topk_method)
        if self.num_nextn_predict_layers is None or self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers: expected >= 0, got {self.num_nextn_predict_layers}")
        if self.quantization_config is not None:
            qc = self.quantization_config
            if not isinstance(qc, dict):
                raise TypeError(f"quantization_config: expected a dict or null, got {qc!r}")
            block = qc.get("weight_block_size", [128, 128])
            if qc.get("quant_method", "fp8") != "fp8" or not isinstance(block, (list, tuple)) or list(block) != [128, 128]:
                raise ValueError("quantization_config: only quant_method 'fp8' with weight_block_size [128, 128] "
                                 f"is supported, got {qc}")
            if qc.get("fmt", "e4m3") != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
                raise ValueError("quantization_config: only fmt 'e4m3' with activation_scheme 'dynamic' is "
                                 f"supported, got {qc}")

    def _validate(self) -> None:
        """TypeError / ValueError naming the field, the expected type or range and the value given."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def need_int(name, lo, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not is_int(v):
                raise TypeError(f"{name}: expected an int{' or null' if optional else ''}, got {v!r} "
                                f"({type(v).__name__})")
            if v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v}")

        def need_num(name, positive=True):
            v = getattr(self, name)
            if not is_num(v):
                raise TypeError(f"{name}: expected a number, got {v!r} ({type(v).__name__})")
            if not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {v}")

        def need_bool(name):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected true or false, got {v!r} ({type(v).__name__})")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings",
                     "moe_layer_freq", "num_experts_per_tok"):
            need_int(name, 1)
        for name in ("intermediate_size", "moe_intermediate_size", "n_shared_experts", "n_routed_experts",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            need_int(name, 0)
        need_int("q_lora_rank", 1, optional=True)
        need_int("n_group", 1)
        need_int("topk_group", 1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number (rotated in pairs), got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"num_key_value_heads: expected num_attention_heads={self.num_attention_heads} (MLA "
                             f"expands the latent into every head), got {self.num_key_value_heads}")
        has_dense = self.n_routed_experts == 0 or self.first_k_dense_replace > 0 or self.moe_layer_freq > 1
        if has_dense and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size: expected >= 1 (the model has dense MLP layers), got "
                             f"{self.intermediate_size}")
        if self.n_routed_experts > 0 and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size: expected >= 1 (n_routed_experts={self.n_routed_experts}), "
                             f"got {self.moe_intermediate_size}")
        need_num("rms_norm_eps")
        need_num("rope_theta")
        need_num("routed_scaling_factor")
        need_num("initializer_range", positive=False)
        for name in ("norm_topk_prob", "attention_bias", "tie_word_embeddings", "rope_interleave"):
            need_bool(name)
        for name in ("scoring_func", "topk_method", "hidden_act"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a string, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not is_int(v):
                raise TypeError(f"{name}: expected an int or null, got {v!r} ({type(v).__name__})")
        eos = self.eos_token_id
        eos_ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        for v in eos_ids:
            if not is_int(v):
                raise TypeError(f"eos_token_id: expected an int, a list of ints or null, got {eos!r}")
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"eos_token_id: expected ids in [0, vocab_size={self.vocab_size}), got {eos!r}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise TypeError(f"torch_dtype: expected a string or null, got {self.torch_dtype!r}")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise TypeError(f"rope_scaling: expected a dict or null, got {rs!r} ({type(rs).__name__})")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("yarn", "default"):
            raise ValueError(f"rope_scaling.type: expected 'yarn' (DeepSeek's) or 'default', got {kind!r}")
        if kind != "yarn":
            return

        def num(key, required=False, positive=True):
            v = rs.get(key)
            if v is None:
                if required:
                    raise ValueError(f"rope_scaling.{key}: required for YaRN, missing")
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or \
                    (v <= 0 if positive else v < 0):
                raise ValueError(f"rope_scaling.{key}: expected a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {v!r}")

        num("factor", required="original_max_position_embeddings" not in rs)
        omp = rs.get("original_max_position_embeddings")
        if omp is not None and (not isinstance(omp, int) or isinstance(omp, bool) or omp < 1):
            raise ValueError(f"rope_scaling.original_max_position_embeddings: expected an int >= 1, got {omp!r}")
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            num(key)
        for key in ("mscale", "mscale_all_dim"):
            num(key, positive=False)
        if "truncate" in rs and not isinstance(rs["truncate"], bool):
            raise ValueError(f"rope_scaling.truncate: expected true or false, got {rs['truncate']!r}")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v2_routing(self) -> bool:
        """DeepSeek-V2's router (greedy / group_limited_greedy, no correction bias) rather than V3's noaux_tc."""
        return self.topk_method != "noaux_tc"

    @property
    def model_type(self) -> str:
        """``deepseek_v2`` for V2 routing, ``deepseek_v3`` otherwise."""
        return "deepseek_v2" if self.is_v2_routing else "deepseek_v3"

    @property
    def is_fp8(self) -> bool:
        return self.quantization_config is not None

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from layer first_k_dense_replace on, every moe_layer_freq-th layer."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        return rs if rs is not None and rs.get("rope_type") == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (the mscale correction)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.yarn
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(self.yarn_factor, rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    @property
    def yarn_factor(self) -> float | None:
        """YaRN's context-extension factor: ``rope_scaling.factor``, or when that is absent (or null)
        max_position_embeddings / original_max_position_embeddings (transformers' rule); None without YaRN."""
        rs = self.yarn
        if rs is None:
            return None
        if rs.get("factor") is not None:
            return float(rs["factor"])
        return self.max_position_embeddings / rs["original_max_position_embeddings"]

    # ---- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], require: bool = False) -> "DeepseekV3Config":
        """A config from a ``config.json``-style dict. ``model_type`` must be one of MODEL_TYPES when given.
        ``require``: every field of REQUIRED_FIELDS must be present (what ``from_json_file`` asks of a
        config.json); otherwise missing fields take DeepSeek-V3's values (transformers' DeepseekV2Config's for
        ``model_type: deepseek_v2``)."""
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a JSON object (dict), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is None and require:
            archs = d.get("architectures")
            known = [_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in _ARCHITECTURES] \
                if isinstance(archs, list) else []
            if not known:
                raise ValueError(f"model_type: missing (expected one of {list(MODEL_TYPES)})")
            model_type = known[0]
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {list(MODEL_TYPES)} (DeepSeek-V2/V2.5/V3/R1), got "
                             f"{model_type!r}")
        archs = d.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
                raise TypeError(f"architectures: expected a list of class names, got {archs!r}")
            other = [a for a in archs if not a.startswith("Deepseek")]
            if other:
                raise ValueError(f"architectures: expected DeepseekV3ForCausalLM or DeepseekV2ForCausalLM, got "
                                 f"{other} (another model's config.json?)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if require:
            given = {_ALIASES.get(k, k) for k in d}
            missing = [k for k in REQUIRED_FIELDS if k not in given]
            if missing:
                raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a "
                                 "DeepSeek config.json spells out every size; no default to the 671B model)")
        kwargs, extra = {}, {}
        if model_type == "deepseek_v2":
            given = {_ALIASES.get(k, k) for k in d}
            kwargs.update({k: v for k, v in V2_DEFAULTS.items() if k not in given})
        for key, value in d.items():
            key = _ALIASES.get(key, key)
            if key == "rope_parameters" and isinstance(value, dict):  # transformers 5.x spelling
                value = dict(value)
                kwargs.setdefault("rope_theta", value.pop("rope_theta", cls.rope_theta))
                if value.get("rope_type", value.get("type", "default")) != "default":
                    kwargs.setdefault("rope_scaling", value)
                continue
            if key == "rope_parameters" and value is not None:
                raise TypeError(f"rope_parameters: expected a dict or null, got {value!r}")
            (kwargs if key in fields else extra)[key] = value
        if model_type is not None:
            extra.setdefault("model_type", model_type)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str) -> "DeepseekV3Config":
        """A directory's ``config.json`` (or that file). CheckpointError naming the file (and the field) when it
        is missing, unreadable, not JSON, or not a valid DeepSeek-V2/V3 config."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file (a checkpoint directory needs its config.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return cls.from_dict(d, require=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "DeepseekV3Config":
        """``"tiny"`` (the built-in test/demo config) or a directory / path to a ``config.json``."""
        if isinstance(name_or_path, str) and name_or_path in PRESETS:
            return PRESETS[name_or_path]()
        return cls.from_json_file(os.fspath(name_or_path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d = {**extra, **d}
        d["model_type"] = self.model_type
        if d["model_type"] in ("deepseek_v2", "deepseek_v3"):
            d["architectures"] = ["DeepseekV2ForCausalLM" if self.is_v2_routing else "DeepseekV3ForCausalLM"]
        return {k: v for k, v in d.items() if not (k == "quantization_config" and v is None)}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def to_hf(self):
        """The equivalent ``transformers.DeepseekV3Config`` (sigmoid + noaux_tc routing) or
        ``transformers.DeepseekV2Config`` (softmax + greedy / group_limited_greedy, norm_topk_prob false), for
        comparisons against transformers; ValueError for what neither class can express."""
        import transformers

        if self.moe_layer_freq != 1:
            raise ValueError("to_hf: transformers' DeepseekV2/V3 have no moe_layer_freq (it must be 1)")
        v2 = self.is_v2_routing
        if v2 and (self.scoring_func != "softmax" or self.norm_topk_prob or not self.rope_interleave):
            raise ValueError("to_hf: transformers' DeepseekV2 routes with softmax scores, never normalises the "
                             "top-k weights and rotates interleaved rope pairs; got scoring_func="
                             f"{self.scoring_func!r}, norm_topk_prob={self.norm_topk_prob}, "
                             f"rope_interleave={self.rope_interleave}")
        if not v2 and self.scoring_func != "sigmoid":
            raise ValueError(f"to_hf: transformers' DeepseekV3 scores with sigmoid, got {self.scoring_func!r}")
        d = self.to_dict()
        drop = ["extra", "quantization_config", "torch_dtype", "architectures", "model_type", "scoring_func",
                "moe_layer_freq", "rope_scaling", "rope_theta"]
        drop += ["rope_interleave", "num_nextn_predict_layers"] if v2 else ["topk_method"]
        for k in drop:
            d.pop(k, None)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.yarn is not None:
            rope = {**{k: v for k, v in self.yarn.items() if k != "type"}, "rope_theta": self.rope_theta,
                    "factor": self.yarn_factor}  # transformers' YaRN needs the factor spelt out
        d["rope_parameters"] = rope
        if v2:
            return transformers.DeepseekV2Config(**d)
        d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
        return transformers.DeepseekV3Config(**d)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def tiny_config() -> DeepseekV3Config:
    """A small DeepSeek-V3 that keeps the real MLA cache geometry (latent 512 + rope 64, the decode kernel's
    576) and every feature: q LoRA, YaRN with mscale, one dense then MoE layers, group-limited routing, and
    one MTP layer (built when asked for: ``load_model("tiny", load_mtp=True)``)."""
    return DeepseekV3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=3, num_nextn_predict_layers=1, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=64,
        qk_rope_head_dim=64, v_head_dim=64, qk_nope_head_dim=64, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1)


def tiny_v2_config() -> DeepseekV3Config:
    """A small DeepSeek-V2 / V2.5: softmax scores, group-limited greedy top-k (group score = max), no correction
    bias, unnormalised weights times routed_scaling_factor, YaRN with V2's mscale = mscale_all_dim = 0.707."""
    return DeepseekV3Config.from_dict({
        **tiny_config().to_dict(), "model_type": "deepseek_v2", "scoring_func": "softmax",
        "topk_method": "group_limited_greedy", "norm_topk_prob": False, "routed_scaling_factor": 4.0,
        "n_shared_experts": 2, "num_nextn_predict_layers": 0, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}})


def tiny_v2_lite_config() -> DeepseekV3Config:
    """A small DeepSeek-V2-Lite: no q LoRA (plain q_proj), greedy top-k over all experts (one group)."""
    return DeepseekV3Config.from_dict({
        **tiny_v2_config().to_dict(), "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "num_experts_per_tok": 3})


PRESETS = {"tiny": tiny_config, "tiny-v2": tiny_v2_config, "tiny-v2-lite": tiny_v2_lite_config}
