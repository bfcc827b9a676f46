"""Helpers for tests and benchmarks: the anchors' error metric, poisoning, and device gates."""
from __future__ import annotations

import contextlib

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error, 1 - 2*sum(x*y) / sum(x*x + y*y), computed in float64.

    0 for identical tensors, 1 for orthogonal ones; scale-sensitive (x vs 2x gives 0.2). Both empty: 0.
    """
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or 0xff bytes for integer/fp8 dtypes) before a kernel writes it."""
    if t.dtype.is_floating_point and t.element_size() > 1:
        return t.fill_(float("nan"))
    return t.view(torch.uint8).fill_(0xFF).view(t.dtype) if t.element_size() == 1 else t.fill_(-1)


def cuda_kernels_available() -> bool:
    """A GPU is present and the compiled extension loaded (so CUDA tests exercise real kernels)."""
    from ._ops import extension_loaded

    return torch.cuda.is_available() and extension_loaded()


@contextlib.contextmanager
def reference():
    """``with reference(): ...`` runs ops on CPU tensors on the pure-torch references even while the
    emulator is on (a test's oracle inside an emulated test); the modules' CPU fast paths
    (``deepkernels.nn.cpu_fast_path``) are off too, so the oracle is the references' maths."""
    from ._ops import emulate
    from .nn.cpu_fast_path import cpu_fast_path

    with emulate(False), cpu_fast_path(False):
        yield


def synchronize(device) -> None:
    """torch.cuda.synchronize() for CUDA devices; nothing for the CPU (emulated kernels are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}


def opcheck(op, args: tuple, kwargs: dict | None = None) -> None:
    """torch.library.opcheck, made usable for ops that take fp8 tensors on the CPU.

    torch's schema check compares inputs before/after with arithmetic the CPU lacks for fp8
    ("mul_cpu_reduced_float"); for those ops it is replaced by a byte-exact check that no input
    the schema does not mark as mutated changed, and the other opcheck utilities run as usual.
    """
    kwargs = kwargs or {}
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not any(t.dtype in _FP8_DTYPES and t.device.type == "cpu" for t in tensors):
        torch.library.opcheck(op, args, kwargs)
        return
    schema = (op.default if hasattr(op, "default") else op)._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    names = [a.name for a in schema.arguments]
    named = {**dict(zip(names, args)), **kwargs}
    before = {n: t.clone() for n, t in named.items() if isinstance(t, torch.Tensor) and n not in mutable}
    torch.library.opcheck(op, args, kwargs,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args, **kwargs)
    for n, t in before.items():
        assert torch.equal(t.view(torch.uint8) if t.dtype in _FP8_DTYPES else t,
                           named[n].view(torch.uint8) if t.dtype in _FP8_DTYPES else named[n]), \
            f"{op}: input {n} was modified but the schema does not mark it mutable"


class _Bf16GemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x16, w16 = x.bfloat16().float(), weight.bfloat16().float()
        ctx.save_for_backward(x16, w16)
        return (x16 @ w16.T).bfloat16().to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x16, w16 = ctx.saved_tensors
        g16 = grad_y.bfloat16().float()
        return (g16 @ w16).bfloat16().to(grad_y.dtype), g16.T @ x16


class Bf16GemmLinear(torch.nn.Linear):
    """The bf16-training baseline that FP8 training is compared with: a bias-free linear whose three GEMMs have
    bf16 tensor-core numerics (operands and results rounded to bf16, fp32 accumulation; CPU bf16 matmuls are far
    slower on 2 cores) and an fp32 master weight gradient."""

    def forward(self, x):
        return _Bf16GemmFunction.apply(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors, in float64."""
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside, restored after (the CPU references run many small
    ops: on a shared 2-core machine one thread is far faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
