"""The same model in Hugging Face transformers (5.x), for comparisons in tests and benchmarks."""
from __future__ import annotations

import re

import torch

from .modeling import DeepseekV3ForCausalLM

_EXPERT_WEIGHT = re.compile(r"(.*mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official per-expert keys -> transformers 5.x's fused ``experts.gate_up_proj`` [E, 2I, H] and
    ``experts.down_proj`` [E, H, I]; every other key is shared."""
    out, experts = {}, {}
    for k, v in state_dict.items():
        m = _EXPERT_WEIGHT.match(k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for prefix, by_id in experts.items():
        ids = sorted(by_id)
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([by_id[e]["gate"], by_id[e]["up"]]) for e in ids])
        out[prefix + ".down_proj"] = torch.stack([by_id[e]["down"] for e in ids])
    return out


def to_transformers(model: DeepseekV3ForCausalLM, attn_implementation: str = "eager"):
    """A ``transformers.DeepseekV3ForCausalLM`` (V3 routing) or ``transformers.DeepseekV2ForCausalLM`` (V2
    routing) with ``model``'s config and weights (non-FP8 models only; MTP layers are left out). Layers that
    ``moe_layer_freq`` (or ``n_routed_experts=0``) makes dense, which transformers' classes cannot express, get
    transformers' dense MLP module in place of its MoE."""
    import transformers

    config = model.config
    if config.is_fp8:
        raise ValueError("to_transformers: FP8 models are not supported; load with dequantize_fp8=True")
    # transformers makes every layer from first_k_dense_replace on a MoE layer; DeepSeek's moe_layer_freq
    # (and a model without routed experts) make some of them dense: those layers get transformers' dense MLP
    dense_from_k = config.num_hidden_layers if config.n_routed_experts == 0 else config.first_k_dense_replace
    hf_config = type(config).from_dict({**config.to_dict(), "moe_layer_freq": 1,
                                        "first_k_dense_replace": dense_from_k}).to_hf()
    hf_config._attn_implementation = attn_implementation
    cls = transformers.DeepseekV2ForCausalLM if config.is_v2_routing else transformers.DeepseekV3ForCausalLM
    with torch.device(model.device):
        hf = cls(hf_config).to(model.dtype)
        for i, layer in enumerate(hf.model.layers):
            if i >= dense_from_k and not config.is_moe_layer(i):
                mlp_cls = type(hf.model.layers[0].mlp) if dense_from_k > 0 else None
                if mlp_cls is None:
                    module = transformers.models.deepseek_v2.modeling_deepseek_v2 if config.is_v2_routing else \
                        transformers.models.deepseek_v3.modeling_deepseek_v3
                    mlp_cls = module.DeepseekV2MLP if config.is_v2_routing else module.DeepseekV3MLP
                layer.mlp = mlp_cls(hf_config).to(model.dtype)
    if config.tie_word_embeddings and not model.lm_head_tied:  # a checkpoint's own head (see untie_lm_head)
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    for name, module in hf.named_modules():  # the router in fp32, as transformers' from_pretrained keeps it
        if name.endswith("mlp.gate"):
            module.float()
    n = model.config.num_hidden_layers
    main = {k: v for k, v in model.state_dict().items()
            if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    state = to_transformers_state_dict(main)
    for k, v in hf.state_dict().items():  # n_shared_experts=0: transformers' shared MLP is [0, H] / [H, 0]
        if k not in state and ".mlp.shared_experts." in k and v.numel() == 0:
            state[k] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return hf.eval()
