"""The modules' CPU fast paths: fused / batched pure-torch maths that equal the op references to the
test tolerances, for inference on CPU tensors (what ``make demo`` runs without a GPU).

They replace, on the CPU only: the MoE layer's dispatch -> per-expert loop -> combine (by one batched
expert computation), the paged MLA attention's per-sequence gather (by a batched masked attention over a
contiguous view of the cache), and the cache-write op (by one indexed store). They are off while:
  * a tensor is not on the CPU (CUDA runs the kernels),
  * the SIMT emulator is on (``deepkernels.emulate()``: the emulated kernels must run),
  * autograd records (the fast paths read cached, stacked copies of the weights),
  * ``cpu_fast_path(False)`` is active (the references then run everywhere: the tests' oracle).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .._ops import emulation_enabled

_enabled = True


def cpu_fast_path_active(x: torch.Tensor) -> bool:
    """True when a module may take its CPU fast path for input ``x``."""
    return _enabled and x.device.type == "cpu" and not torch.is_grad_enabled() and not emulation_enabled()


def set_cpu_fast_path(enabled: bool) -> bool:
    """Turn the CPU fast paths on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def cpu_fast_path(enabled: bool = True) -> Iterator[None]:
    """``with cpu_fast_path(False): ...`` runs the references (the op CPU kernels) instead of the fast paths."""
    previous = set_cpu_fast_path(enabled)
    try:
        yield
    finally:
        set_cpu_fast_path(previous)


__all__ = ["cpu_fast_path", "cpu_fast_path_active", "set_cpu_fast_path"]
