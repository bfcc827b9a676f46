"""Text generation: one prefill over the (right-padded) prompts, then token-by-token decode through the
paged MLA latent cache in the absorbed form. Greedy (temperature 0) or temperature / top-p sampling."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from ..nn.mla import PagedMLAKVCache


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    batch_size: int = 1

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s else float("nan")

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} "
                f"tokens/s), decode {self.batch_size * self.decode_steps} tokens in {self.decode_s:.3f} s "
                f"({self.decode_tokens_per_s:.1f} tokens/s)")


def make_cache(model, batch_size: int, max_seq_len: int, page_size: int = 64, dtype: torch.dtype | None = None):
    """A paged latent cache for ``model``: per layer [num_blocks, page_size, 1, 512 + 64].

    ``dtype`` defaults to float32 for a float32 model (exact, pure-torch attention) and bfloat16 otherwise
    (the decode kernel's cache); float8_e4m3fn gives the FP8 cache with per-token scales."""
    c = model.config
    if (c.kv_lora_rank, c.qk_rope_head_dim) != (512, 64):
        raise ValueError(f"paged MLA decode needs kv_lora_rank 512 and qk_rope_head_dim 64 (the 576-dim cache row), "
                         f"got {c.kv_lora_rank} and {c.qk_rope_head_dim}; use generate(..., use_cache=False)")
    if dtype is None:
        dtype = torch.float32 if model.dtype == torch.float32 else torch.bfloat16
    return PagedMLAKVCache(c.num_hidden_layers, batch_size, max_seq_len, page_size=page_size, dtype=dtype,
                       device=model.device)


def set_cache_lengths(cache, lengths: torch.Tensor) -> None:
    """Set every layer's length of each sequence (drops rows past it, e.g. a right-padded prefill's padding)."""
    cache.seqlens.copy_(lengths.to(cache.seqlens.dtype).expand_as(cache.seqlens))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).view(-1).to(logits.device)


def _as_prompts(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T] or a list of 1-D prompts, got shape {tuple(input_ids.shape)}")
        return list(input_ids)
    prompts = [torch.as_tensor(p, dtype=torch.long) for p in input_ids]
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("input_ids: expected a non-empty list of non-empty 1-D token sequences")
    return prompts


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             use_cache: bool = True, page_size: int = 64, cache_dtype: torch.dtype | None = None,
             generator: torch.Generator | None = None, return_stats: bool = False,
             on_token: Callable[[int, torch.Tensor], None] | None = None):
    """Generate up to ``max_new_tokens`` per prompt.

    Args:
        input_ids: [B, T] LongTensor, or a list of B 1-D prompts of any lengths (a batch of varied lengths).
        temperature: 0 -> greedy; > 0 -> sample from softmax(logits / temperature) restricted to top_p mass.
        eos_token_id: a sequence stops after producing it (its later slots hold the eos id).
        use_cache: True -> prefill once, then decode through the paged MLA cache (absorbed attention);
            False -> recompute the full sequence for every new token (the reference the cache is tested on).
        on_token: called as on_token(step, tokens [B]) after each new token (progress bars).
    Returns:
        [B, T + max_new_tokens] LongTensor for tensor input, else a list of 1-D tensors (prompt + new tokens);
        with ``return_stats`` also a :class:`GenerationStats` (prefill and decode tokens/s).
    """
    prompts = _as_prompts(input_ids)
    device = model.device
    b = len(prompts)
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    t_max = int(lengths.max())
    padded = torch.zeros(b, t_max, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : p.numel()] = p.to(device)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=device)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()), batch_size=b)
    new = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if max_new_tokens > 0:
        t0 = time.perf_counter()
        if use_cache:
            cache = make_cache(model, b, t_max + max_new_tokens, page_size, cache_dtype)
            # right-padded prefill: causal attention keeps every real token blind to the padding after it;
            # the padding's cache rows are then dropped by resetting each sequence's length.
            logits = model(padded, cache=cache, prefill=True)
            set_cache_lengths(cache, lengths)
        else:
            logits = model(padded)
        last = logits[rows, lengths - 1]
        sync()
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            token = sample_next_token(last, temperature, top_p, generator)
            token = torch.where(finished, eos[0] if eos.numel() else token, token)
            new[:, step] = token
            if eos.numel():
                finished |= torch.isin(token, eos)
            if on_token is not None:
                on_token(step, token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                new[:, step + 1:] = eos[0] if eos.numel() else 0
                break
            if use_cache:
                last = model(token[:, None], cache=cache)[:, -1]
            else:
                seqs = [torch.cat([padded[i, : lengths[i]], new[i, : step + 1]]) for i in range(b)]
                full = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
                last = model(full)[rows, lengths + step]
            stats.decode_steps += 1
        sync()
        stats.decode_s = time.perf_counter() - t0
        stats.new_tokens = b * (stats.decode_steps + 1)
    if isinstance(input_ids, torch.Tensor):
        out = torch.cat([padded, new], dim=1)
    else:
        out = [torch.cat([p.to(device), new[i]]) for i, p in enumerate(prompts)]
    return (out, stats) if return_stats else out
