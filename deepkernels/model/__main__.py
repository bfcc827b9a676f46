"""python -m deepkernels.model generate --model DIR|tiny --prompt TEXT ... --max-new-tokens N

Loads the model (``tiny``/``tiny-v2``/``tiny-v2-lite``: built-in configs with seeded random weights),
prefills the prompts as one batch, decodes through the paged MLA cache with a progress bar on stderr,
prints each sequence and a closing line with prefill and decode tokens/s. ``--mtp`` decodes greedily with
the MTP layer's drafts (speculative; same tokens) and adds the draft acceptance rate to that line.
Without a tokenizer in the model directory, ``--prompt`` text is fed as its UTF-8 bytes (token ids
0..255) and outputs are printed as token ids.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import CheckpointError

_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ProgressBar:
    """A plain-text progress bar on stderr (\\r-updated on a terminal, one final line otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.stream, self.width = total, sys.stderr if stream is None else stream, width
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.closed = False

    def update(self, done: int) -> None:
        done = min(done, self.total)
        if self.closed or (not self.tty and done < self.total):
            return
        filled = self.width * done // max(self.total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\rgenerating [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                          f"tokens ({rate:.1f} steps/s)")
        if done >= self.total:
            self.stream.write("\n")
            self.closed = True
        self.stream.flush()


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids: expected comma-separated integer token ids, got {text!r}") from None
    if not ids:
        raise ValueError(f"--prompt-ids: expected at least one token id, got {text!r}")
    return ids


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ...`` (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _check_args(args) -> None:
    """Flag values the model run would reject later: ValueError naming the flag, before loading anything."""
    import math

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: expected an int >= 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature: expected a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    if args.page_size <= 0 or args.page_size % 16:
        raise ValueError(f"--page-size: expected a positive multiple of 16, got {args.page_size}")
    if args.warmup not in (0, 1):
        raise ValueError(f"--warmup: expected 0 or 1, got {args.warmup}")
    if args.eos_token_id is not None and args.eos_token_id < 0:
        raise ValueError(f"--eos-token-id: expected a token id >= 0, got {args.eos_token_id}")
    for text in args.prompt_ids:
        _parse_ids(text)
    if any(text == "" for text in args.prompt):
        raise ValueError("--prompt: expected a non-empty text, got ''")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r} asked for, but torch sees no CUDA GPU")


def cmd_generate(args) -> int:
    from . import generate, load_model, load_tokenizer

    _check_args(args)
    if not args.prompt and not args.prompt_ids:
        args.prompt_ids = ["0,1,2,3"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if args.dtype is None:  # bf16 on the GPU (the decode kernel's cache), fp32 on the CPU (exact references)
        args.dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if args.mtp and (args.temperature > 0 or args.no_cache):
        print("error: --mtp (speculative decoding with the MTP layer) is greedy and cached only: drop "
              "--temperature / --no-cache", file=sys.stderr)
        return 2
    model = load_model(args.model, device=device, dtype=_DTYPES[args.dtype], seed=args.seed, load_mtp=args.mtp,
                       random_init=args.random_init)
    tokenizer = load_tokenizer(args.model)
    c = model.config
    mtp = f" + {model.num_mtp_layers} MTP" if model.num_mtp_layers else ""
    print(f"model {args.model}: {c.model_type}, {c.num_hidden_layers} layers{mtp}, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, "
          f"{c.n_routed_experts} experts (top-{c.num_experts_per_tok}), vocab {c.vocab_size}, "
          f"{'fp8' if c.is_fp8 else args.dtype} weights on {device}; loaded in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    prompts: list[list[int]] = []
    for text in args.prompt:
        if tokenizer is not None:
            prompts.append(tokenizer(text)["input_ids"])
        else:
            prompts.append([b % c.vocab_size for b in text.encode()])
    prompts += [_parse_ids(p) for p in args.prompt_ids]
    bad = [i for p in prompts for i in p if not 0 <= i < c.vocab_size]
    if bad:
        print(f"error: --prompt/--prompt-ids: token ids {bad[:8]} out of range [0, vocab_size={c.vocab_size})",
              file=sys.stderr)
        return 2
    if args.warmup:  # first calls pay one-time costs (allocator, kernel selection): keep them out of tokens/s
        generate(model, [prompts[0][:4]], max_new_tokens=2, use_cache=not args.no_cache, page_size=args.page_size,
                 use_mtp=args.mtp)
    eos = args.eos_token_id
    if eos is None and tokenizer is not None:  # a real vocabulary: stop at its end-of-sequence token
        eos = tokenizer.eos_token_id
    bar = ProgressBar(args.max_new_tokens)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    outs, stats = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, eos_token_id=eos, use_cache=not args.no_cache,
                           page_size=args.page_size, cache_dtype=_CACHE_DTYPES[args.cache_dtype], generator=gen,
                           return_stats=True, use_mtp=args.mtp,
                           on_token=(lambda done, tok: bar.update(done)) if args.mtp else
                           (lambda step, tok: bar.update(step + 1)))
    if stats.decode_steps + 1 < args.max_new_tokens:
        bar.update(args.max_new_tokens)
    for i, (prompt, seq) in enumerate(zip(prompts, outs)):
        new = seq[len(prompt):].tolist()
        print(f"[{i}] prompt ids: {' '.join(map(str, prompt))}")
        print(f"[{i}] output ids: {' '.join(map(str, seq.tolist()))}")
        if tokenizer is not None:
            print(f"[{i}] text: {tokenizer.decode(prompt)!r} -> {tokenizer.decode(new)!r}")
    print(stats.summary())
    return 0


def main(argv=None) -> int:
    parser = _Parser(prog="python -m deepkernels.model", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text / tokens with paged MLA decode")
    g.add_argument("--model", default="tiny",
                   help="checkpoint directory (config.json + safetensors), or 'tiny', 'tiny-v2', 'tiny-v2-lite'")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-ids", action="append", default=[], help="prompt token ids, e.g. '1,2,3' (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--eos-token-id", type=int, default=None,
                   help="stop token (default: the tokenizer's eos when the model directory has a tokenizer)")
    g.add_argument("--seed", type=int, default=0, help="random weights (no checkpoint) and sampling")
    g.add_argument("--random-init", action="store_true",
                   help="a checkpoint directory's config.json with seeded random weights (its safetensors unread)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="non-FP8 weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--page-size", type=int, default=64, help="paged cache page size (a multiple of 16)")
    g.add_argument("--cache-dtype", default="auto", choices=list(_CACHE_DTYPES),
                   help="latent cache: auto = float32 for a float32 model, else bfloat16; fp8 = e4m3 + per-token scale")
    g.add_argument("--warmup", type=int, default=1, help="1: a short untimed generation first (default)")
    g.add_argument("--no-cache", action="store_true", help="recompute the full sequence every step (reference)")
    g.add_argument("--mtp", action="store_true",
                   help="greedy speculative decoding with the checkpoint's MTP layer (loads it); same tokens as "
                        "greedy, prints the draft acceptance rate")
    g.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad values, bad checkpoints (CheckpointError): the message names them
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, CheckpointError) else 1
    except (OSError, RuntimeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
