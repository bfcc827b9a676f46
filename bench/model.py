"""DeepSeek-V3 model: prefill and decode tokens/s, ours (deepkernels.model, paged MLA decode) beside
transformers' DeepseekV3ForCausalLM on the same config and weights, in the same run.

CPU (smoke): the built-in tiny config in fp32. GPU: a larger random config in bf16 that fits one device
(real MLA geometry: latent 512 + rope 64, 128-dim heads; 64 experts, top-6).
"""
from __future__ import annotations

import statistics
import time

import torch

from deepkernels.model import DeepseekV3Config, DeepseekV3ForCausalLM
from deepkernels.model.generation import make_cache

from .common import Context, Row

FAMILY = "model"

GPU_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024,
                  num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                  num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, setup, ctx: Context) -> float:
    samples = []
    for i in range(ctx.warmup + ctx.repeats):
        state = setup()
        _sync(ctx.device)
        t0 = time.perf_counter()
        fn(state)
        _sync(ctx.device)
        if i >= ctx.warmup:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _ours(model, ids, steps, ctx):
    b, t = ids.shape

    def prefill():
        cache = make_cache(model, b, t + steps + 1)
        logits = model(ids, cache=cache, prefill=True)
        return cache, logits[:, -1].argmax(-1)

    def decode(state):
        cache, tok = state
        for _ in range(steps):
            tok = model(tok[:, None], cache=cache)[:, -1].argmax(-1)

    return _median_s(lambda s: prefill(), lambda: None, ctx), _median_s(decode, prefill, ctx)


def _transformers(hf, ids, steps, ctx):
    from transformers import DynamicCache

    def prefill():
        cache = DynamicCache(config=hf.config)
        out = hf(ids, past_key_values=cache, use_cache=True)
        return cache, out.logits[:, -1].argmax(-1)

    def decode(state):
        cache, tok = state
        for _ in range(steps):
            tok = hf(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

    return _median_s(lambda s: prefill(), lambda: None, ctx), _median_s(decode, prefill, ctx)


@torch.no_grad()
def run(ctx: Context) -> list[Row]:
    if ctx.is_cuda:
        config = DeepseekV3Config.from_dict({**DeepseekV3Config.from_pretrained("tiny").to_dict(), **GPU_CONFIG})
        dtype, cases, steps = torch.bfloat16, [(1, 512), (8, 512), (32, 128)], 32
        name = f"random-h{config.hidden_size}-l{config.num_hidden_layers}-e{config.n_routed_experts}"
    else:
        config, dtype, cases, steps, name = DeepseekV3Config.from_pretrained("tiny"), torch.float32, [(4, 32)], 8, "tiny"
    model = DeepseekV3ForCausalLM(config, device=ctx.device, dtype=dtype).init_random_weights(0).eval()
    try:
        from deepkernels.model.hf import to_transformers

        hf = to_transformers(model, "sdpa" if ctx.is_cuda else "eager")
    except ImportError:
        hf = None
    variants = [("", model)]
    if ctx.is_cuda:  # the same weights in FP8 (Fp8Linear -> fp8_gemm_nt), beside bf16 transformers
        fp8_config = DeepseekV3Config.from_dict({**config.to_dict(), "quantization_config": {
            "quant_method": "fp8", "weight_block_size": [128, 128]}})
        variants.append(("fp8", DeepseekV3ForCausalLM(fp8_config, device=ctx.device, dtype=dtype)
                         .init_random_weights(0).eval()))
    rows = []
    for b, t in cases:
        ids = torch.randint(0, config.vocab_size, (b, t), device=ctx.device)
        peer_prefill, peer_decode = _transformers(hf, ids, steps, ctx) if hf is not None else (None, None)
        for variant, m in variants:
            ours_prefill, ours_decode = _ours(m, ids, steps, ctx)
            case = {"config": name, "dtype": "fp8" if variant else str(dtype).replace("torch.", ""), "batch": b,
                    "prompt": t}
            for phase, ours_s, peer_s, tokens in (("prefill", ours_prefill, peer_prefill, b * t),
                                                  ("decode", ours_decode, peer_decode, b * steps)):
                rows.append(Row(FAMILY, {**case, "phase": phase}, "tokens/s", tokens / ours_s,
                                "transformers" if peer_s else None, tokens / peer_s if peer_s else None,
                                ours_s * 1e3))
    return rows
