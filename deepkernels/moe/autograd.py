"""Autograd for the ops on the model's forward path, and the differentiable (training) path of ``nn.MoE``.

Differentiable ops (``torch.library.register_autograd``; the backward formulas are pure torch, so they run on
every device, under torch.compile / fake tensors, and are themselves differentiable):

* ``moe_permute`` / ``moe_permute_no_fill`` (``out[i] = x[src_idx[i]]``): ``dx[t] = sum_{i: src_idx[i] == t} dout[i]``
  (a scatter-add of the gradient rows back to their source rows, fp32 accumulation, in x's dtype); rows with
  ``src_idx == -1`` have no source and pass nothing back. No gradient for ``src_idx``. Integer / fp8 ``x``
  are not differentiable (autograd never asks).
* ``moe_unpermute_reduce`` (``out[t] = sum_k w[t,k] * y[pos[t,k]]`` over ``pos >= 0``):
  ``dy[pos[t,k]] += w[t,k] * dout[t]`` (fp32 accumulation, a scatter-add: a row of y used by several
  (t, k) gets the sum) and ``dw[t,k] = <dout[t], y[pos[t,k]]>`` in fp32 (0 where ``pos == -1``); none for pos.
  The forward rounds the fp32 sum to y's dtype once; the gradient treats that rounding as the identity.

Not differentiable, and saying so: ``moe_permute_fp8``, ``per_token_cast_to_fp8``, ``per_block_cast_to_fp8``
(quantisation: FP8 training goes through ``deepkernels.nn.fp8_linear`` / ``Fp8Linear(master_weight=True)``,
whose own backward quantises the gradients) and ``mla_decode_with_kvcache`` (decode only; training computes
attention densely, without a cache). Their forward runs unchanged (inference under grad mode still works);
a backward that reaches them raises RuntimeError naming the op instead of silently dropping the gradient.

The expert-parallel wire (``moe_pack_rows`` / ``moe_unpack_rows``) moves bytes, so no gradient can cross it:
:func:`moe_forward_autograd` (what ``nn.MoE.forward`` runs while autograd records) therefore computes a
single-process MoE as permute -> experts -> unpermute_reduce with the router's weights (the same rows, order
and fp32 accumulation as dispatch -> experts -> expert_reduce -> combine, so the same numbers), and for an
expert-parallel / fixed-capacity / fp8-dispatch / grouped-FP8-GEMM layer runs the usual path with an output
whose backward raises RuntimeError (see :func:`raise_on_backward`).
"""
from __future__ import annotations

import torch

from .ops import _count_ids, _expert_positions, _positions_to_src_idx, permute, unpermute_reduce


# ----------------------------------------------------------------------------------------------
# moe_permute / moe_permute_no_fill

def _permute_setup_context(ctx, inputs, output):
    x, src_idx = inputs
    ctx.save_for_backward(src_idx)
    ctx.x_rows, ctx.x_dtype = x.size(0), x.dtype


def _permute_backward(ctx, grad_out):
    (src_idx,) = ctx.saved_tensors
    grad_x = torch.zeros((ctx.x_rows, grad_out.size(1)), dtype=torch.float32, device=grad_out.device)
    if ctx.x_rows and src_idx.numel():
        valid = (src_idx >= 0).unsqueeze(1)
        rows = torch.where(valid, grad_out.float(), torch.zeros((), device=grad_out.device))
        grad_x.index_add_(0, src_idx.long().clamp(min=0), rows)
    return grad_x.to(ctx.x_dtype), None


# ----------------------------------------------------------------------------------------------
# moe_unpermute_reduce

def _unpermute_setup_context(ctx, inputs, output):
    y, pos, weights = inputs
    ctx.has_weights = weights is not None
    ctx.y_rows, ctx.y_dtype = y.size(0), y.dtype
    ctx.save_for_backward(y, pos, weights)


def _unpermute_backward(ctx, grad_out):
    y, pos, weights = ctx.saved_tensors
    t, k = pos.shape
    h = grad_out.size(1)
    dev = grad_out.device
    valid = pos >= 0                                               # [T, K]
    idx = pos.long().clamp(min=0)
    g = grad_out.float()
    grad_y = grad_w = None
    if ctx.needs_input_grad[0]:
        acc = torch.zeros((ctx.y_rows, h), dtype=torch.float32, device=dev)
        if ctx.y_rows and t * k:
            w = weights if ctx.has_weights else torch.ones((t, k), dtype=torch.float32, device=dev)
            w = torch.where(valid, w, torch.zeros((), device=dev))
            rows = (w.unsqueeze(2) * g.unsqueeze(1)).reshape(t * k, h)   # [(t,k), H] = w[t,k] * dout[t]
            acc.index_add_(0, idx.reshape(-1), rows)
        grad_y = acc.to(ctx.y_dtype)
    if ctx.has_weights and ctx.needs_input_grad[2]:
        if ctx.y_rows and t * k:
            gathered = y.index_select(0, idx.reshape(-1)).float().view(t, k, h)
            grad_w = torch.where(valid, (gathered * g.unsqueeze(1)).sum(-1), torch.zeros((), device=dev))
        else:
            grad_w = torch.zeros((t, k), dtype=torch.float32, device=dev)
    return grad_y, None, grad_w


# ----------------------------------------------------------------------------------------------
# ops that are not differentiable: forward unchanged, backward raises

_NOT_DIFFERENTIABLE = {
    "moe_permute_fp8": "the fp8 quantisation has no useful gradient; permute the float tensor (moe_permute) "
                       "and quantise after it, or train through deepkernels.nn.fp8_linear",
    "per_token_cast_to_fp8": "quantisation; FP8 training goes through deepkernels.nn.fp8_linear / "
                             "Fp8Linear(master_weight=True), which quantise inside their own backward",
    "per_block_cast_to_fp8": "quantisation; FP8 training goes through deepkernels.nn.fp8_linear / "
                             "Fp8Linear(master_weight=True), which quantise inside their own backward",
    "mla_decode_with_kvcache": "paged decode is inference only; train without a cache (the model then computes "
                               "attention densely, which is differentiable)",
}


def _raising_backward(name: str, why: str):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"deepkernels::{name} is not differentiable ({why}); a backward pass reached it")

    return setup_context, backward


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on ``value`` (detached) whose backward raises: the output requires grad whenever one of
    ``inputs`` does, so a backward through it fails loudly instead of dropping those gradients."""

    @staticmethod
    def forward(ctx, message: str, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.message = message
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def raise_on_backward(value: torch.Tensor, inputs, message: str) -> torch.Tensor:
    """``value`` (detached from its graph) as an output whose backward raises ``RuntimeError(message)``; it
    requires grad when grad mode is on and one of ``inputs`` (tensors) requires grad. Returns ``value``
    itself when nothing would need a gradient."""
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not torch.is_grad_enabled() or not inputs:
        return value
    return _RaiseOnBackward.apply(message, value.detach(), *inputs)


# ----------------------------------------------------------------------------------------------
# nn.MoE under autograd

def moe_differentiable(moe) -> bool:
    """Whether ``moe`` (a ``deepkernels.nn.MoE``) has a differentiable forward: one process, normal mode
    (no fixed capacity), no fp8 dispatch and no grouped FP8 GEMM experts."""
    d = moe.dispatcher
    return d.num_ranks == 1 and d.capacity is None and not moe.fp8_dispatch and moe._grouped_ops() is None


def moe_forward_autograd(moe, x2: torch.Tensor) -> torch.Tensor:
    """``nn.MoE``'s forward while autograd records: x2 [T, H] -> [T, H] in x2's dtype.

    One process: router -> the (token, slot) rows permuted into per-expert segments (``moe_permute``) -> each
    local expert on its rows -> ``moe_unpermute_reduce`` with the router's top-k weights (fp32, in slot order)
    -> + shared experts. Gradients reach x, the router (through the top-k weights) and every expert.
    Otherwise (expert parallel, fixed capacity, fp8 dispatch, grouped FP8 GEMMs) the usual dispatch path runs
    and its output's backward raises RuntimeError: the byte wire carries no gradient."""
    if not moe_differentiable(moe):
        out = moe._forward_dispatch(x2)
        d = moe.dispatcher
        return raise_on_backward(out, [x2, *moe.parameters()],
                                 f"nn.MoE: backward through this layer is not supported (num_ranks={d.num_ranks}, "
                                 f"capacity={d.capacity}, fp8_dispatch={moe.fp8_dispatch}, grouped FP8 GEMMs="
                                 f"{moe._grouped_ops() is not None}): its expert-parallel dispatch moves bytes and "
                                 f"carries no gradient; train with one process, capacity=None, fp8_dispatch=False")
    topk_idx, topk_w = moe.gate(x2)
    t, k = topk_idx.shape
    num_local = moe.dispatcher.num_local_experts
    local = topk_idx - moe.expert_offset
    local = torch.where((topk_idx >= 0) & (local >= 0) & (local < num_local), local, -1).to(torch.int32)
    key = torch.where(local >= 0, local, num_local).view(-1)
    counts = _count_ids(key, num_local)
    seg = torch.cumsum(counts, 0) - counts
    pos = _expert_positions(local, num_local, seg, counts)           # [T, k] rows in the per-expert buffer
    num_rows = t * k
    rows = permute(x2, _positions_to_src_idx(pos, num_rows))         # [T*k, H], expert segments in order
    outs, start = [], 0
    for expert, c in zip(moe.local_experts(), counts.tolist()):     # one host read of the counts
        if c:
            outs.append(expert(rows[start:start + c]))
        start += c
    if start < num_rows:  # slots without a local expert: rows nobody reads (pos == -1)
        outs.append(rows.new_zeros((num_rows - start, rows.size(1))))
    y = torch.cat(outs) if outs else rows
    out = unpermute_reduce(y.to(x2.dtype), pos, topk_w.float().contiguous())
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x2)
    return out


def _register() -> None:
    torch.library.register_autograd("deepkernels::moe_permute", _permute_backward,
                                    setup_context=_permute_setup_context)
    torch.library.register_autograd("deepkernels::moe_permute_no_fill", _permute_backward,
                                    setup_context=_permute_setup_context)
    torch.library.register_autograd("deepkernels::moe_unpermute_reduce", _unpermute_backward,
                                    setup_context=_unpermute_setup_context)
    from .. import fp8 as _fp8, mla as _mla  # noqa: F401  (their ops must be defined first)

    for name, why in _NOT_DIFFERENTIABLE.items():
        setup_context, backward = _raising_backward(name, why)
        torch.library.register_autograd(f"deepkernels::{name}", backward, setup_context=setup_context)


_register()

__all__ = ["moe_forward_autograd", "moe_differentiable", "raise_on_backward"]
