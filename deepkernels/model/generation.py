"""Text generation: one prefill over the (right-padded) prompts, then token-by-token decode through the
paged MLA latent cache in the absorbed form. Greedy (temperature 0) or temperature / top-p sampling.

``use_mtp=True``: greedy speculative decoding with the model's MTP layer. Each step feeds the main model
[last token, MTP draft] (a 2-token causal decode step through the paged cache), keeps the main model's
argmax after the last token, and also the one after the draft when the draft equals it; a rejected
draft's cache row is rolled back (its length decremented; the row is overwritten by the next step).
The tokens are exactly plain greedy decoding's; ``GenerationStats`` reports the acceptance rate.
"""
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
    decode_tokens: int | None = None  # tokens produced by the decode steps (None: batch_size * decode_steps)
    mtp_drafted: int = 0  # MTP drafts verified (speculative decoding)
    mtp_accepted: int = 0  # ... of which the main model accepted

    @property
    def mtp_acceptance_rate(self) -> float:
        return self.mtp_accepted / self.mtp_drafted if self.mtp_drafted else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def num_decode_tokens(self) -> int:
        return self.batch_size * self.decode_steps if self.decode_tokens is None else self.decode_tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decode_tokens / self.decode_s if self.decode_s else float("nan")

    def summary(self) -> str:
        line = (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} "
                f"tokens/s), decode {self.num_decode_tokens} tokens in {self.decode_s:.3f} s "
                f"({self.decode_tokens_per_s:.1f} tokens/s)")
        if self.mtp_drafted:
            line += (f", MTP acceptance {self.mtp_acceptance_rate:.1%} ({self.mtp_accepted}/{self.mtp_drafted} "
                     f"drafts, {self.decode_steps} verify steps)")
        return line


def make_cache(model, batch_size: int, max_seq_len: int, page_size: int = 64, dtype: torch.dtype | None = None,
               mtp: bool = False):
    """A paged latent cache for ``model``: per layer [num_blocks, page_size, 1, 512 + 64].

    ``dtype`` defaults to float32 for a float32 model (exact, pure-torch attention) and bfloat16 otherwise
    (the decode kernel's cache); float8_e4m3fn gives the FP8 cache with per-token scales. ``mtp``: also a
    layer for each of the model's MTP layers (indices num_hidden_layers..)."""
    c = model.config
    if (c.kv_lora_rank, c.qk_rope_head_dim) != (512, 64):
        raise ValueError(f"paged MLA decode needs kv_lora_rank 512 and qk_rope_head_dim 64 (the 576-dim cache row), "
                         f"got {c.kv_lora_rank} and {c.qk_rope_head_dim}; use generate(..., use_cache=False)")
    if dtype is None:
        dtype = torch.float32 if model.dtype == torch.float32 else torch.bfloat16
    num_layers = c.num_hidden_layers + (model.num_mtp_layers if mtp else 0)
    return PagedMLAKVCache(num_layers, batch_size, max_seq_len, page_size=page_size, dtype=dtype,
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
             on_token: Callable[[int, torch.Tensor], None] | None = None, use_mtp: bool = False):
    """Generate up to ``max_new_tokens`` per prompt.

    Args:
        input_ids: [B, T] LongTensor, or a list of B 1-D prompts of any lengths (a batch of varied lengths).
        temperature: 0 -> greedy; > 0 -> sample from softmax(logits / temperature) restricted to top_p mass.
        eos_token_id: a sequence stops after producing it (its later slots hold the eos id).
        use_cache: True -> prefill once, then decode through the paged MLA cache (absorbed attention);
            False -> recompute the full sequence for every new token (the reference the cache is tested on).
        on_token: called as on_token(step, tokens [B]) after each new token (progress bars); with
            ``use_mtp`` as on_token(done, tokens [B, 2]) after each verify step, ``done`` the fewest new
            tokens any unfinished sequence has.
        use_mtp: greedy speculative decoding with the model's first MTP layer (a model built with
            ``mtp=True`` / ``load_model(..., load_mtp=True)``; greedy and ``use_cache`` only): the same tokens
            as plain greedy decoding, fewer main-model steps when drafts are accepted (see the module doc).
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

    if use_mtp:
        if temperature > 0:
            raise ValueError(f"use_mtp: speculative decoding here is greedy only, got temperature={temperature}")
        if not use_cache:
            raise ValueError("use_mtp: needs use_cache=True (the draft is verified through the paged cache)")
        if getattr(model, "num_mtp_layers", 0) < 1:
            raise ValueError("use_mtp: the model has no MTP layers (load_model(..., load_mtp=True) or "
                             "DeepseekV3ForCausalLM(config, mtp=True))")
    if use_mtp and max_new_tokens > 0:
        _speculative_greedy(model, padded, lengths, new, finished, eos, stats, page_size, cache_dtype, sync,
                            on_token)
    elif max_new_tokens > 0:
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


def _speculative_greedy(model, padded, lengths, new, finished, eos, stats, page_size, cache_dtype, sync,
                        on_token) -> None:
    """Greedy decoding with one MTP draft per step, filling ``new`` [B, N] exactly as plain greedy would.

    Invariant per sequence before each step, with m its main cache length: tokens 0..m-1 are in the main
    layers' cache; token m (``pending``, the last one emitted) is not yet; the MTP layer's cache holds m
    entries (entry j from h_j and token j + 1); ``draft`` is its guess for token m + 1. A step runs the main
    model on [pending, draft] (positions m, m + 1) -> y0 (its greedy token m + 1), y1 (token m + 2 if
    draft == y0); then the MTP layer on (h_m, y0), (h_{m+1}, y1) -> the next draft from the last entry
    that is valid. Both caches end at m + 1 + accepted: a rejected draft's rows are dropped.
    """
    device = padded.device
    b, t_max = padded.shape
    max_new = new.size(1)
    n_main = model.config.num_hidden_layers
    rows = torch.arange(b, device=device)
    fill = eos[0] if eos.numel() else None
    new.fill_(fill if fill is not None else 0)
    count = torch.zeros(b, dtype=torch.long, device=device)  # tokens emitted per sequence

    def emit(tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Append tokens[:, j] for j < valid to each unfinished sequence that has room (eos rules as greedy)."""
        for j in range(tokens.size(1)):
            take = (j < valid) & (count < max_new)
            tok = tokens[:, j] if fill is None else torch.where(finished, fill, tokens[:, j])
            pos = count.clamp(max=max_new - 1)  # no boolean indexing: no host sync
            new[rows, pos] = torch.where(take, tok, new[rows, pos])
            if eos.numel():
                finished.logical_or_(take & torch.isin(tok, eos))
            count.add_(take.long())

    def set_lengths(cache, main_len, mtp_len) -> None:
        cache.seqlens[:n_main] = main_len.to(cache.seqlens.dtype)
        cache.seqlens[n_main:] = mtp_len.to(cache.seqlens.dtype)

    t0 = time.perf_counter()
    cache = make_cache(model, b, t_max + max_new + 2, page_size, cache_dtype, mtp=True)
    logits, hidden = model(padded, cache=cache, prefill=True, return_hidden=True)
    set_lengths(cache, lengths, torch.zeros_like(lengths))
    pending = logits[rows, lengths - 1].argmax(-1)
    # MTP prefill: entry j pairs h_j with token j + 1 (the prompt shifted left, then the first new token)
    next_ids = torch.zeros_like(padded)
    next_ids[:, :-1] = padded[:, 1:]
    next_ids[rows, lengths - 1] = pending
    draft = model.forward_mtp(next_ids, hidden, cache=cache, prefill=True)[rows, lengths - 1].argmax(-1)
    main_len = lengths.clone()
    set_lengths(cache, main_len, main_len)
    sync()
    stats.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    emit(pending[:, None], torch.ones(b, dtype=torch.long, device=device))
    if on_token is not None:
        on_token(1, pending[:, None])
    first = int(count.sum())
    drafted = torch.zeros((), dtype=torch.long, device=device)  # on the device: one host sync per step
    accepted = torch.zeros((), dtype=torch.long, device=device)
    while True:
        active = ~finished & (count < max_new)
        if not bool(active.any()):
            break
        logits, hidden = model(torch.stack([pending, draft], dim=1), cache=cache, return_hidden=True)
        y = logits.argmax(-1)  # [b, 2]: greedy tokens m + 1 and (if the draft is right) m + 2
        accept = (draft == y[:, 0]) & active
        emit(y, 1 + accept.long())
        stats.decode_steps += 1
        drafted += active.sum()
        accepted += accept.sum()
        # the MTP layer (length m) continues from (h_m, y0), (h_{m+1}, y1); entry 1 is kept only when accepted
        mtp_logits = model.forward_mtp(y, hidden, cache=cache)
        main_len = main_len + torch.where(active, 1 + accept.long(), 0)
        set_lengths(cache, main_len, main_len)
        pending = torch.where(active, torch.where(accept, y[:, 1], y[:, 0]), pending)
        draft = torch.where(active, mtp_logits[rows, accept.long()].argmax(-1), draft)
        if on_token is not None:
            left = count[~finished]
            on_token(int(left.min()) if left.numel() else max_new, y)
    sync()
    stats.decode_s = time.perf_counter() - t0
    stats.mtp_drafted, stats.mtp_accepted = int(drafted), int(accepted)
    stats.new_tokens = int(count.sum())
    stats.decode_tokens = stats.new_tokens - first
