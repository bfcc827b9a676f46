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
import math
import numbers
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
    """A paged latent cache for ``model``: per layer [num_blocks, page_size, 1, kv_lora_rank + qk_rope_head_dim].

    ``dtype`` defaults to float32 for a float32 model (exact, pure-torch attention) and bfloat16 otherwise
    (the decode kernel's cache); float8_e4m3fn gives the FP8 cache with per-token scales. ``mtp``: also a
    layer for each of the model's MTP layers (indices num_hidden_layers..). DeepSeek's geometry (512 + 64, the
    576-dim row) decodes with ``mla_decode_with_kvcache``; any other runs the same paged cache through the
    pure-torch attention (``mla_attention_fp32``)."""
    c = model.config
    if dtype is None:
        dtype = torch.float32 if model.dtype == torch.float32 else torch.bfloat16
    num_layers = c.num_hidden_layers + (model.num_mtp_layers if mtp else 0)
    return PagedMLAKVCache(num_layers, batch_size, max_seq_len, page_size=page_size, dtype=dtype,
                           device=model.device, kv_lora_rank=c.kv_lora_rank, rope_dim=c.qk_rope_head_dim)


def set_cache_lengths(cache, lengths: torch.Tensor) -> None:
    """Set every layer's length of each sequence (drops rows past it, e.g. a right-padded prefill's padding)."""
    cache.seqlens.copy_(lengths.to(cache.seqlens.dtype).expand_as(cache.seqlens))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]: argmax when temperature == 0, else nucleus sampling."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point [B, vocab] tensor, got "
                        f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
                        f"{' ' + str(logits.dtype) if isinstance(logits, torch.Tensor) else ''}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite float, got {value!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature: expected >= 0 and top_p: expected in (0, 1], got {temperature}, {top_p}")
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


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)


def _is_int(v) -> bool:
    """An int, or a numpy integer (not a bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _as_tensor_if_array(x):
    """numpy arrays (anything with ``__array__`` that is not a list) -> tensors."""
    if not isinstance(x, (torch.Tensor, list, tuple, str, bytes, numbers.Number)) and hasattr(x, "__array__"):
        return torch.as_tensor(x)
    return x


def _as_prompts(input_ids, vocab_size: int) -> list[torch.Tensor]:
    """input_ids -> a list of 1-D int64 prompts; TypeError / ValueError naming ``input_ids`` otherwise."""
    input_ids = _as_tensor_if_array(input_ids)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"input_ids: expected an integer tensor (int64 token ids), got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T] or a list of 1-D prompts, got shape {tuple(input_ids.shape)}")
        if input_ids.size(0) == 0 or input_ids.size(1) == 0:
            raise ValueError(f"input_ids: expected B >= 1 prompts of T >= 1 tokens, got shape {tuple(input_ids.shape)}")
        prompts = list(input_ids.long())
    elif isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise ValueError("input_ids: expected a non-empty list of non-empty 1-D token sequences, got []")
        prompts = []
        for i, p in enumerate(input_ids):
            p = _as_tensor_if_array(p)
            if isinstance(p, torch.Tensor):
                if p.dtype not in _INT_DTYPES:
                    raise TypeError(f"input_ids[{i}]: expected integer token ids, got a {p.dtype} tensor")
                t = p.long()
            elif isinstance(p, (list, tuple)):
                if not all(_is_int(x) for x in p):
                    bad = next(x for x in p if not _is_int(x))
                    raise TypeError(f"input_ids[{i}]: expected int token ids, got {bad!r} ({type(bad).__name__})")
                t = torch.tensor([int(x) for x in p], dtype=torch.long)
            else:
                raise TypeError(f"input_ids[{i}]: expected a list of ints or a 1-D tensor, got {type(p).__name__}")
            if t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"input_ids[{i}]: expected a non-empty 1-D token sequence, got shape "
                                 f"{tuple(t.shape)}")
            prompts.append(t)
    else:
        raise TypeError(f"input_ids: expected a [B, T] integer tensor or a list of token-id lists, got "
                        f"{type(input_ids).__name__}")
    for i, p in enumerate(prompts):
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids[{i}]: token ids must be in [0, vocab_size={vocab_size}), got "
                             f"{lo if lo < 0 else hi}")
    return prompts


def _masked_prompts(input_ids, attention_mask, vocab_size: int) -> list[torch.Tensor]:
    """input_ids [B, T] + attention_mask [B, T] (1 = token, 0 = left or right padding) -> B 1-D prompts."""
    attention_mask = _as_tensor_if_array(attention_mask)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise TypeError("attention_mask: only with input_ids given as a [B, T] tensor (a list of prompts needs no "
                        f"mask), got input_ids of type {type(input_ids).__name__}"
                        f"{' and shape ' + str(tuple(input_ids.shape)) if isinstance(input_ids, torch.Tensor) else ''}")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a [B, T] tensor of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool and attention_mask.dtype not in _INT_DTYPES:
        raise TypeError(f"attention_mask: expected a bool or integer tensor of 0/1, got {attention_mask.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to("cpu")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask: expected values 0 (padding) or 1 (token), got "
                         f"{sorted(set(mask.unique().tolist()) - {0, 1})[:4]}")
    mask = mask.bool()
    prompts = []
    for i, row in enumerate(mask):
        pos = row.nonzero().view(-1)
        if pos.numel() == 0:
            raise ValueError(f"attention_mask: row {i} has no token (every prompt needs at least one)")
        if int(pos[-1] - pos[0]) + 1 != pos.numel():
            raise ValueError(f"attention_mask: row {i} has padding between its tokens (expected left or right "
                             f"padding only), got {row.int().tolist()}")
        prompts.append(input_ids[i, int(pos[0]): int(pos[-1]) + 1].to("cpu"))
    return _as_prompts(prompts, vocab_size)


def _check_generate_args(model, max_new_tokens, temperature, top_p, eos_token_id, use_cache, page_size,
                         cache_dtype, generator, return_stats, on_token, use_mtp) -> list[int]:
    """TypeError / ValueError naming the argument, what was expected and what was given; -> the eos ids."""
    vocab = model.config.vocab_size
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise (ValueError if _is_int(max_new_tokens) else TypeError)(
            f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name}: expected a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite float >= 0 (0 = greedy), got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p}")
    eos_token_id = _as_tensor_if_array(eos_token_id)
    if eos_token_id is None:
        eos = []
    elif _is_int(eos_token_id):
        eos = [int(eos_token_id)]
    elif isinstance(eos_token_id, (list, tuple, torch.Tensor)):
        eos = eos_token_id.reshape(-1).tolist() if isinstance(eos_token_id, torch.Tensor) else list(eos_token_id)
        if isinstance(eos_token_id, torch.Tensor) and (eos_token_id.dim() > 1 or eos_token_id.is_floating_point()):
            raise TypeError(f"eos_token_id: expected an int or a list of ints, got a {eos_token_id.dtype} tensor "
                            f"of shape {tuple(eos_token_id.shape)}")
        if not all(_is_int(e) for e in eos):
            raise TypeError(f"eos_token_id: expected an int or a list of ints, got {eos_token_id!r}")
        eos = [int(e) for e in eos]
    else:
        raise TypeError(f"eos_token_id: expected an int, a list of ints or None, got {eos_token_id!r}")
    bad = [e for e in eos if not 0 <= e < vocab]
    if bad:
        raise ValueError(f"eos_token_id: expected ids in [0, vocab_size={vocab}), got {bad[0]}")
    for name, value in (("use_cache", use_cache), ("return_stats", return_stats), ("use_mtp", use_mtp)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if not _is_int(page_size):
        raise TypeError(f"page_size: expected an int, got {page_size!r}")
    if page_size <= 0 or page_size % 16:
        raise ValueError(f"page_size: expected a positive multiple of 16, got {page_size}")
    if cache_dtype is not None and cache_dtype not in _CACHE_DTYPES:
        raise (ValueError if isinstance(cache_dtype, torch.dtype) else TypeError)(
            f"cache_dtype: expected None or one of {[str(d) for d in _CACHE_DTYPES]}, got {cache_dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token: expected a callable or None, got {type(on_token).__name__}")
    return eos


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             use_cache: bool = True, page_size: int = 64, cache_dtype: torch.dtype | None = None,
             generator: torch.Generator | None = None, return_stats: bool = False,
             on_token: Callable[[int, torch.Tensor], None] | None = None, use_mtp: bool = False,
             attention_mask: torch.Tensor | None = None):
    """Generate up to ``max_new_tokens`` per prompt.

    Args:
        input_ids: [B, T] LongTensor, or a list of B 1-D prompts of any lengths (a batch of varied lengths).
        attention_mask: with a [B, T] tensor ``input_ids`` only: 1 (True) for the prompt's tokens, 0 for padding,
            left or right (each row's ones contiguous, at least one), as transformers' generate takes it; each
            sequence is generated from its own tokens alone (positions from 0), and the result is
            ``cat([input_ids, new_tokens], dim=1)`` (padding kept where it was).
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
    if getattr(model, "config", None) is None or not callable(model):
        raise TypeError(f"model: expected a DeepseekV3ForCausalLM, got {type(model).__name__}")
    eos_ids = _check_generate_args(model, max_new_tokens, temperature, top_p, eos_token_id, use_cache, page_size,
                                   cache_dtype, generator, return_stats, on_token, use_mtp)
    max_new_tokens, page_size = int(max_new_tokens), int(page_size)  # numpy ints -> int
    input_ids = _as_tensor_if_array(input_ids)  # a numpy array: returned as a tensor, like a tensor input
    if attention_mask is not None:
        prompts = _masked_prompts(input_ids, attention_mask, model.config.vocab_size)
    else:
        prompts = _as_prompts(input_ids, model.config.vocab_size)
    device = model.device
    b = len(prompts)
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    t_max = int(lengths.max())
    max_pos = model.config.max_position_embeddings
    if t_max + max_new_tokens > max_pos:
        raise ValueError(f"max_new_tokens: the longest prompt ({t_max} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"= {t_max + max_new_tokens} exceeds max_position_embeddings={max_pos}")
    padded = torch.zeros(b, t_max, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : p.numel()] = p.to(device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
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
            # logits only from the shortest prompt's last position on (the LM head over the whole prompt is
            # wasted work; equal lengths: the last position only, as transformers' generate does)
            first_kept = int(lengths.min()) - 1
            logits = model(padded, cache=cache, prefill=True, logits_to_keep=t_max - first_kept)
            set_cache_lengths(cache, lengths)
        else:
            first_kept = 0
            logits = model(padded)
        last = logits[rows, lengths - 1 - first_kept]
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
        out = torch.cat([padded if attention_mask is None else input_ids.long().to(device), new], dim=1)
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
