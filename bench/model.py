"""DeepSeek-V3 model: prefill and decode tokens/s, ours (deepkernels.model.generate, paged MLA decode) beside
transformers' DeepseekV3ForCausalLM on the same config and weights, in the same run, measured the same way.

Both sides are timed as their users run them: one ``generate`` call, greedy, a fixed number of new tokens (no
early stop), the library's default cache (transformers: ``generate`` with its DynamicCache, which it creates
itself; ours: the paged MLA latent cache). Each run makes steps + 1 new tokens and timestamps each new token as
it reaches the host (transformers: a streamer, ours: ``on_token``; both copy the tokens to the host, which
transformers' loop syncs on anyway):
    prefill_s = first token's time - the call's start      (setup, prompt forward, first token)
    decode_s  = last token's time - first token's time       (steps cached decode steps)
medians over the repeats; prefill tokens/s = batch * prompt / prefill_s, decode tokens/s = batch * steps /
decode_s, for ours and the peer alike (``time_generate``, ``peer_generate``, ``ours_generate``).

CPU (smoke): the built-in tiny config in fp32, batch 1 and 8. GPU: a larger random config in bf16 that fits
one device (real MLA geometry: latent 512 + rope 64, 128-dim heads; 64 experts, top-6), batch 1, 8 and 32.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from deepkernels.model import DeepseekV3Config, DeepseekV3ForCausalLM, generate

from .common import Context, Row

FAMILY = "model"

GPU_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024,
                  num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                  num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=1)
CPU_CASES = [(1, 32), (8, 32)]       # (batch, prompt tokens)
CPU_STEPS = 32                       # decode steps per run on the CPU (the setup: prompt 32, 32 new tokens)
CPU_DTYPES = (torch.float32, torch.bfloat16)  # a single-repeat smoke context: float32 only
GPU_CASES = [(1, 512), (8, 512), (32, 128)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(run: Callable[[int, Callable[[], None]], torch.Tensor], ids: torch.Tensor, steps: int,
                  ctx: Context) -> tuple[float, float]:
    """(prefill_s, decode_s): medians over ctx.warmup + ctx.repeats runs of ``run(steps + 1, stamp) -> [B, T + n]``,
    which must call ``stamp()`` once per new token, when the token is on the host. Checks every run returns
    exactly steps + 1 new tokens with one stamp each (no early stop, no uncounted work)."""
    b, t = ids.shape
    n = steps + 1
    prefill, decode = [], []
    for i in range(ctx.warmup + ctx.repeats):
        stamps: list[float] = []
        _sync(ctx.device)
        t0 = time.perf_counter()
        out = run(n, lambda: stamps.append(time.perf_counter()))
        _sync(ctx.device)
        if tuple(out.shape) != (b, t + n) or len(stamps) != n:
            raise RuntimeError(f"generate returned {tuple(out.shape)} with {len(stamps)} token stamps, expected "
                               f"{(b, t + n)} and {n}: it stopped early or skipped tokens")
        if i >= ctx.warmup:
            prefill.append(stamps[0] - t0)
            decode.append(stamps[-1] - stamps[0])
    return statistics.median(prefill), max(statistics.median(decode), 1e-9)


def transformers_generate_fn(hf, ids: torch.Tensor):
    """``run(n, stamp=None) -> hf.generate(...)`` as a transformers user runs it: greedy, the default cache
    (use_cache=True: a DynamicCache it creates itself), exactly n new tokens (min_new_tokens = n, no eos stop);
    ``stamp()`` is called from a streamer as each new token reaches the host."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    mask = torch.ones_like(ids)

    class Stamps(BaseStreamer):
        def __init__(self, stamp):
            self.stamp, self.prompt_seen = stamp, False

        def put(self, value):
            if self.prompt_seen:  # the first put is the prompt
                self.stamp()
            self.prompt_seen = True

        def end(self):
            pass

    def run(n: int, stamp: Callable[[], None] | None = None) -> torch.Tensor:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=0, eos_token_id=None)
        return hf.generate(ids, attention_mask=mask, generation_config=config,
                           streamer=Stamps(stamp) if stamp is not None else None)

    return run


def ours_generate_fn(model: DeepseekV3ForCausalLM, ids: torch.Tensor):
    """``run(n, stamp=None) -> deepkernels.model.generate(model, ids, max_new_tokens=n)``: greedy, paged MLA
    cache, no eos; ``stamp()`` from ``on_token`` once the token is on the host."""
    def run(n: int, stamp: Callable[[], None] | None = None) -> torch.Tensor:
        on_token = None if stamp is None else (lambda step, token: (token.cpu(), stamp()))
        return generate(model, ids, max_new_tokens=n, on_token=on_token)

    return run


def time_generate_interleaved(runs: list, ids: torch.Tensor, steps: int, ctx: Context) -> list[tuple[float, float]]:
    """``time_generate`` for several runs with their repeats alternating (peer, ours, peer, ours, ...), so a
    noisy shared CPU slows each alike: [(prefill_s, decode_s) medians] in the order of ``runs``."""
    import dataclasses

    one = dataclasses.replace(ctx, warmup=0, repeats=1)
    for run in runs:
        for _ in range(ctx.warmup):
            time_generate(run, ids, steps, one)
    samples: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(ctx.repeats):
        for got, run in zip(samples, runs):
            got.append(time_generate(run, ids, steps, one))
    return [(statistics.median(p for p, _ in got), statistics.median(d for _, d in got)) for got in samples]


def peer_generate(hf, ids: torch.Tensor, steps: int, ctx: Context) -> tuple[float, float]:
    """transformers' (prefill_s, decode_s) for ``steps`` decode steps over ``ids``: see the module doc."""
    return time_generate(transformers_generate_fn(hf, ids), ids, steps, ctx)


def ours_generate(model: DeepseekV3ForCausalLM, ids: torch.Tensor, steps: int, ctx: Context) -> tuple[float, float]:
    """Ours, measured exactly as ``peer_generate`` measures transformers."""
    return time_generate(ours_generate_fn(model, ids), ids, steps, ctx)


def make_peer(model: DeepseekV3ForCausalLM, ctx: Context):
    """transformers' model with ``model``'s config and weights (None when transformers is not installed)."""
    try:
        from deepkernels.model.hf import to_transformers

        return to_transformers(model, "sdpa" if ctx.is_cuda else "eager")
    except ImportError:
        return None


@torch.no_grad()
def run(ctx: Context) -> list[Row]:
    if ctx.is_cuda:
        config = DeepseekV3Config.from_dict({**DeepseekV3Config.from_pretrained("tiny").to_dict(), **GPU_CONFIG})
        dtype, cases, steps = torch.bfloat16, GPU_CASES, 32
        name = f"random-h{config.hidden_size}-l{config.num_hidden_layers}-e{config.n_routed_experts}"
    else:
        config, dtype, cases, steps, name = DeepseekV3Config.from_pretrained("tiny"), torch.float32, CPU_CASES, \
            CPU_STEPS, "tiny"
    model = DeepseekV3ForCausalLM(config, device=ctx.device, dtype=dtype).init_random_weights(0).eval()
    hf = make_peer(model, ctx)
    if not ctx.is_cuda:
        return _run_cpu(model, hf, config, cases, steps, name, ctx)
    variants = [("", model)]
    if ctx.is_cuda:  # the same weights in FP8 (Fp8Linear -> fp8_gemm_nt), beside bf16 transformers
        fp8_config = DeepseekV3Config.from_dict({**config.to_dict(), "quantization_config": {
            "quant_method": "fp8", "weight_block_size": [128, 128]}})
        variants.append(("fp8", DeepseekV3ForCausalLM(fp8_config, device=ctx.device, dtype=dtype)
                         .init_random_weights(0).eval()))
    rows = []
    for b, t in cases:
        ids = torch.randint(0, config.vocab_size, (b, t), device=ctx.device,
                            generator=torch.Generator(device="cpu").manual_seed(b * 1000 + t)) \
            if ctx.device.type == "cpu" else torch.randint(0, config.vocab_size, (b, t), device=ctx.device)
        peer_prefill, peer_decode = peer_generate(hf, ids, steps, ctx) if hf is not None else (None, None)
        for variant, m in variants:
            ours_prefill, ours_decode = ours_generate(m, ids, steps, ctx)
            case = {"config": name, "dtype": "fp8" if variant else str(dtype).replace("torch.", ""), "batch": b,
                    "prompt": t, "new_tokens": steps}
            rows += _phase_rows(case, (ours_prefill, ours_decode), (peer_prefill, peer_decode))
    return rows


def _phase_rows(case: dict, ours: tuple, peer: tuple) -> list[Row]:
    """The prefill and decode tokens/s rows of one case from (prefill, decode) seconds, ours and the peer's
    (None where the peer did not run)."""
    b, t, steps = case["batch"], case["prompt"], case["new_tokens"]
    rows = []
    for phase, ours_s, peer_s, tokens in (("prefill", ours[0], peer[0], b * t),
                                          ("decode", ours[1], peer[1], b * steps)):
        rows.append(Row(FAMILY, {**case, "phase": phase}, "tokens/s", tokens / ours_s,
                        "transformers generate (DynamicCache)" if peer_s else None,
                        tokens / peer_s if peer_s else None, ours_s * 1e3))
    return rows


def _run_cpu(model, hf, config, cases, steps: int, name: str, ctx: Context) -> list[Row]:
    """CPU rows: each dtype of CPU_DTYPES (the same weights cast, ours and the peer alike; float32 only in a
    single-repeat smoke context), ours and the peer timed interleaved (``time_generate_interleaved``)."""
    rows = []
    for dtype in CPU_DTYPES if ctx.repeats > 1 else CPU_DTYPES[:1]:
        m = model if dtype == model.dtype else DeepseekV3ForCausalLM(config, dtype=dtype).eval()
        if m is not model:
            m.load_state_dict(model.state_dict())
        peer = hf if m is model else make_peer(m, ctx)
        for b, t in cases:
            ids = torch.randint(0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(b * 1000 + t))
            runs = [ours_generate_fn(m, ids)] + ([transformers_generate_fn(peer, ids)] if peer is not None else [])
            timed = time_generate_interleaved(runs, ids, steps, ctx)
            (ours_prefill, ours_decode), (peer_prefill, peer_decode) = timed[0], timed[1] if peer is not None else (None, None)
            case = {"config": name, "dtype": str(dtype).replace("torch.", ""), "batch": b, "prompt": t,
                    "new_tokens": steps}
            rows += _phase_rows(case, (ours_prefill, ours_decode), (peer_prefill, peer_decode))
    return rows
