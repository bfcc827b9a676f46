"""MoE wire format: every per-row field of a dispatch in one byte buffer, so one collective moves them all.

A send row carries the token payload (x's dtype, or e4m3 + fp32 per-128 scales), its source token index
(int32), its k local expert ids (int32, -1 where the expert is not on the destination rank) and, when
dispatch got weights, its k fp32 weights: see :class:`RowFormat` / :func:`row_format`.

Normal mode: the send buffer is [num_send, row_bytes], rows ordered by (destination rank, token).
Fixed-capacity (low-latency) mode: [R, SLOT_HEADER_BYTES + capacity * row_bytes], one slot per
destination rank, each led by a 16-byte header (int32 rows for that rank, source token count, 0, 0), then
the rows for that rank in token order, empty rows after them (src -1, lid -1, w 0, zero payload; fp8
quantised: scale 1e-4/448).

:func:`pack_rows` builds a send buffer and :func:`unpack_rows` splits a received one into its fields,
each in one of two variants (``DEEPKERNELS_MOE_PACK``, read on each call):

* ``fused``: ONE kernel per buffer, ``moe_pack_rows`` (gather + optional fp8 quant + metadata + headers,
  every byte written once) and ``moe_unpack_rows`` (every field copied out in one pass). The default
  wherever a kernel backs the op (CUDA with the extension, CPU tensors under the emulator).
* ``torch``: the torch-copies path (permute / permute_fp8 into temporaries, then one strided copy per
  field into the buffer, one per field out). It is the ops' CPU kernel (the reference), and the default
  on plain CPU tensors.

Ops (``torch.ops.deepkernels.*``; CUDA kernels in csrc/moe/wire.cuh):

* ``moe_pack_rows(x, x_scale, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity,
  use_fp8) -> uint8 buffer`` (capacity < 0: normal mode [N, row_bytes]; else [R, 16 + capacity * row_bytes]).
* ``moe_unpack_rows(buf, num_rows, hidden, topk, payload_dtype, fp8_scales, weights, capacity)`` ->
  ``(x [N, H], scale [N, G], src [N, 1], lid [N, k], w [N, k])``, an absent field as a [N, 0] tensor.
"""
from __future__ import annotations

import torch

import os

from .. import _ops
from .._ops import (ceil_div, check_bool, check_index_values, check_int, check_same_device, check_tensor, define_op,
                    run_device_checks)
from ..fp8 import FP8_DTYPE
from .ops import _FLOAT_DTYPES, permute, permute_fp8

SLOT_HEADER_BYTES = 16  # fixed-capacity slot header: int32 [rows for this rank, source tokens, 0, 0]


class RowFormat:
    """Byte layout of one packed row: named fields, each ``width`` elements of ``dtype`` at a 4-byte
    aligned offset (so each can be viewed in its dtype), the row padded to a multiple of 16 bytes.
    Alignment gaps are zeroed when packing, so no stale memory travels."""

    def __init__(self, fields):
        self.fields: dict[str, tuple[int, int, torch.dtype, int]] = {}
        off = 0
        for name, dtype, width in fields:
            nbytes = width * dtype.itemsize
            self.fields[name] = (off, nbytes, dtype, width)
            off += ceil_div(nbytes, 4) * 4
        self.row_bytes = ceil_div(max(off, 1), 16) * 16
        self.gaps, cur = [], 0
        for o, n, _, _ in self.fields.values():
            if o > cur:
                self.gaps.append((cur, o))
            cur = o + n
        if cur < self.row_bytes:
            self.gaps.append((cur, self.row_bytes))

    def pack(self, rows: torch.Tensor, **tensors: torch.Tensor) -> None:
        """rows [..., row_bytes] uint8 (any leading shape, last dim contiguous) <- fields [rows, width]."""
        lead = rows.shape[:-1]
        if rows.numel() == 0:
            return
        for name, t in tensors.items():
            off, nbytes, dtype, _ = self.fields[name]
            if t.dtype != dtype:
                raise RuntimeError(f"RowFormat.pack: field {name} expects {dtype}, got {t.dtype}")
            rows[..., off:off + nbytes].copy_(t.contiguous().view(torch.uint8).reshape(*lead, nbytes))
        for a, b in self.gaps:
            rows[..., a:b].zero_()

    def unpack(self, rows: torch.Tensor, name: str, num_rows: int) -> torch.Tensor:
        """Field ``name`` of every row of ``rows`` [..., row_bytes], as a contiguous [num_rows, width]."""
        off, nbytes, dtype, width = self.fields[name]
        if num_rows == 0 or rows.numel() == 0:
            return torch.empty((num_rows, width), dtype=dtype, device=rows.device)
        return rows[..., off:off + nbytes].view(dtype).reshape(num_rows, width).contiguous()

def row_format(payload_dtype: torch.dtype, hidden: int, topk: int, fp8_scales: bool, weights: bool) -> RowFormat:
    """The packed row of a dispatch: x [hidden] (+ scale [ceil(hidden/128)] fp32), src int32,
    local ids int32 [topk] (+ weights fp32 [topk]); topk = 0: payload only (cached dispatch)."""
    fields = [("x", payload_dtype, hidden)]
    if fp8_scales:
        fields.append(("scale", torch.float32, ceil_div(hidden, 128)))
    if topk:
        fields += [("src", torch.int32, 1), ("lid", torch.int32, topk)]
        if weights:
            fields.append(("w", torch.float32, topk))
    return RowFormat(fields)


def _payload_fields(x, src_idx: torch.Tensor, use_fp8: bool) -> dict:
    """The payload of each send row: x [T, H] float (quantised while gathering with use_fp8) or an
    (e4m3, scale) pair, gathered by src_idx (-1 = zero row)."""
    if isinstance(x, (tuple, list)):
        return {"x": permute(x[0], src_idx), "scale": permute(x[1], src_idx)}
    if use_fp8:
        q, s = permute_fp8(x, src_idx)
        return {"x": q, "scale": s}
    return {"x": permute(x, src_idx)}


def _local_ids(src_idx: torch.Tensor, topk_idx: torch.Tensor, row_rank: torch.Tensor, num_local_experts: int):
    """(lid [N, k] int64, local [N, k] bool) of each send row: slot j's expert id relative to the row's
    destination rank, and whether it lives there (never for an empty row, src -1)."""
    n, k = src_idx.size(0), topk_idx.size(1)
    if topk_idx.size(0) > 0:
        gid = topk_idx.index_select(0, src_idx.long().clamp(min=0))
    else:
        gid = torch.full((n, k), -1, dtype=torch.int64, device=src_idx.device)
    lid = gid - (row_rank.long() * num_local_experts).unsqueeze(1)
    local = (gid >= 0) & (lid >= 0) & (lid < num_local_experts) & (src_idx >= 0).unsqueeze(1)
    return lid, local


def send_local_mask(src_idx: torch.Tensor, topk_idx: torch.Tensor, row_rank: torch.Tensor,
                    num_local_experts: int) -> torch.Tensor:
    """[N, k] bool: slot j of send row i names an expert on the row's destination rank ``row_rank[i]``."""
    return _local_ids(src_idx, topk_idx, row_rank, num_local_experts)[1]


def _pack_rows_torch(x, src_idx: torch.Tensor, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
                     per_rank: torch.Tensor, num_local_experts: int, capacity: int | None, use_fp8: bool = False):
    """Build the send buffer of a dispatch with torch copies (the reference; see :func:`pack_rows`).

    Args:
        x: [T, H] float, or an (e4m3 [T, H], scale [T, ceil(H/128)] fp32) pair.
        src_idx: [N] int32 source token of each send row (-1 = empty row); N = R * capacity in
            fixed-capacity mode, else the number of send rows.
        topk_idx: [T, k] int64 global expert ids, or None for a payload-only row (cached dispatch).
        topk_weights: [T, k] fp32 or None (no weights on the wire).
        per_rank: [R] int32 rows per destination rank (device tensor: normal mode derives each row's
            destination from it without a host sync; fixed mode writes it into the slot headers).
        num_local_experts: L, experts per rank; capacity: None (normal) or rows per destination slot.
    Returns:
        (buffer uint8 [N, row_bytes] or [R, SLOT_HEADER_BYTES + capacity * row_bytes], its RowFormat,
        send_local [N, k] bool (slot j's expert lives on the row's destination) or None without topk_idx).
    """
    fields = _payload_fields(x, src_idx, use_fp8)
    ref = x[0] if isinstance(x, (tuple, list)) else x
    t, h = ref.shape
    n, dev, r = src_idx.size(0), src_idx.device, per_rank.size(0)
    local = None
    if topk_idx is not None and topk_idx.size(1) > 0:
        k = topk_idx.size(1)
        dest = torch.arange(r, device=dev, dtype=torch.int64)
        if capacity is None:
            row_rank = torch.repeat_interleave(dest, per_rank.long(), output_size=n)  # device counts: no sync
        else:
            row_rank = dest.repeat_interleave(capacity)
        lid, local = _local_ids(src_idx, topk_idx, row_rank, num_local_experts)
        fields["src"] = src_idx.view(-1, 1)
        fields["lid"] = torch.where(local, lid, -1).to(torch.int32)
        if topk_weights is not None:
            srcl = src_idx.long().clamp(min=0)
            w = topk_weights.index_select(0, srcl) if t > 0 else torch.zeros(n, k, device=dev)
            fields["w"] = torch.where(local, w, 0.0)
    fmt = row_format(fields["x"].dtype, h, 0 if topk_idx is None else topk_idx.size(1), "scale" in fields,
                     topk_weights is not None)
    rb = fmt.row_bytes
    if capacity is None:
        buf = torch.empty((n, rb), dtype=torch.uint8, device=dev)
        fmt.pack(buf, **fields)
    else:
        hb = SLOT_HEADER_BYTES
        buf = torch.empty((r, hb + capacity * rb), dtype=torch.uint8, device=dev)
        zero = torch.zeros_like(per_rank)
        header = torch.stack([per_rank, torch.full_like(per_rank, t), zero, zero], 1).to(torch.int32)
        buf[:, :hb].copy_(header.contiguous().view(torch.uint8))
        fmt.pack(buf[:, hb:].view(r, capacity, rb), **fields)
    return buf, fmt, local


def _unpack_rows_torch(buf: torch.Tensor, fmt: RowFormat, num_rows: int, capacity: int | None = None):
    """Split a received buffer into its fields with one torch copy per field (the reference)."""
    if capacity is None:
        rows, hdr = buf, None
    else:
        hb = SLOT_HEADER_BYTES
        hdr = buf[:, :hb].view(torch.int32)
        rows = buf[:, hb:].view(buf.size(0), capacity, fmt.row_bytes)
    return {name: fmt.unpack(rows, name, num_rows) for name in fmt.fields}, hdr


# ----------------------------------------------------------------------------------------------
# the ops: reference (= the torch path), fake, checks, wrappers and the variant switch

_PACK_VARIANTS = ("fused", "torch")


def pack_variant(device: torch.device) -> str:
    """The pack / unpack variant for tensors on ``device``: ``DEEPKERNELS_MOE_PACK`` (read on each call:
    'fused' or 'torch'), else 'fused' where a kernel backs the op (CUDA with the extension, CPU under
    the emulator) and 'torch' otherwise. Raises ValueError for another value."""
    env = os.environ.get("DEEPKERNELS_MOE_PACK", "")
    if env:
        if env not in _PACK_VARIANTS:
            raise ValueError(f"DEEPKERNELS_MOE_PACK: expected 'fused' or 'torch' (or unset), got {env!r}")
        return env
    if device.type == "cuda":
        return "fused" if _ops.has_cuda_kernel("moe_pack_rows") else "torch"
    if device.type == "cpu" and _ops.emulation_enabled() and _ops.has_emulated_kernel("moe_pack_rows"):
        return "fused"
    return "torch"


def _check_pack_args(x, x_scale, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8,
                     check_values: bool):
    use_fp8 = check_bool("use_fp8", use_fp8)
    check_tensor("x", x, dtypes=_FLOAT_DTYPES + (FP8_DTYPE,), ndim=2)
    t, h = x.shape
    if x_scale is not None:
        if x.dtype != FP8_DTYPE:
            raise ValueError(f"x_scale: expected None with a {x.dtype} x (scales come with a float8_e4m3fn x), "
                             f"got a tensor")
        check_tensor("x_scale", x_scale, dtypes=(torch.float32,), shape=(t, ceil_div(h, 128)))
    if use_fp8 and x.dtype == FP8_DTYPE:
        raise ValueError("use_fp8: expected False with a float8_e4m3fn x (already quantised), got True")
    check_tensor("src_idx", src_idx, dtypes=(torch.int32,), ndim=1, contiguous=True)
    if topk_idx is not None:
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), shape=(t, None))
    if topk_weights is not None:
        if topk_idx is None:
            raise ValueError("topk_weights: expected None without topk_idx (payload-only rows), got a tensor")
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_idx.shape))
    check_tensor("per_rank", per_rank, dtypes=(torch.int32,), ndim=1)
    r, n = per_rank.size(0), src_idx.size(0)
    if r < 1:
        raise ValueError("per_rank: expected at least one rank, got shape [0]")
    num_local_experts = check_int("num_local_experts", num_local_experts, min_value=1)
    capacity = check_int("capacity", capacity, min_value=-1)
    if capacity >= 0 and n != r * capacity:
        raise ValueError(f"src_idx: expected R * capacity = {r * capacity} rows (fixed-capacity mode), got {n}")
    check_same_device(x=x, x_scale=x_scale, src_idx=src_idx, topk_idx=topk_idx, topk_weights=topk_weights,
                      per_rank=per_rank)
    if check_values and src_idx.device.type != "meta":
        check_index_values("src_idx", src_idx, -1, t, "token indices of x (-1 = empty row)")
        check_index_values("per_rank", per_rank, 0, (n if capacity < 0 else capacity) + 1,
                           "rows per destination rank")
        if topk_idx is not None:
            check_index_values("topk_idx", topk_idx, -1, r * num_local_experts,
                               f"expert ids of R * num_local_experts = {r} * {num_local_experts} experts (-1 = unused)")
        if capacity < 0 and int(per_rank.sum()) != n:
            raise ValueError(f"per_rank: expected counts summing to the {n} rows of src_idx (normal mode), "
                             f"got {int(per_rank.sum())}")
    return num_local_experts, capacity, use_fp8


def moe_pack_rows_ref(x, x_scale, src_idx, topk_idx, topk_weights, per_rank, num_local_experts: int, capacity: int,
                      use_fp8: bool) -> torch.Tensor:
    _check_pack_args(x, x_scale, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8,
                     check_values=True)
    xx = x if x_scale is None else (x, x_scale)
    return _pack_rows_torch(xx, src_idx, topk_idx, topk_weights, per_rank, num_local_experts,
                            None if capacity < 0 else capacity, use_fp8)[0]


def _pack_format(x, x_scale, topk_idx, topk_weights, use_fp8) -> RowFormat:
    return row_format(FP8_DTYPE if use_fp8 else x.dtype, x.size(1), 0 if topk_idx is None else topk_idx.size(1),
                      use_fp8 or x_scale is not None, topk_weights is not None)


def _pack_rows_fake(x, x_scale, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8):
    rb = _pack_format(x, x_scale, topk_idx, topk_weights, use_fp8).row_bytes
    if capacity < 0:
        return x.new_empty((src_idx.size(0), rb), dtype=torch.uint8)
    return x.new_empty((per_rank.size(0), SLOT_HEADER_BYTES + capacity * rb), dtype=torch.uint8)


def _unpack_format(hidden, topk, payload_dtype, fp8_scales, weights) -> RowFormat:
    return row_format(payload_dtype, hidden, topk, fp8_scales, weights and topk > 0)


def _check_unpack_args(buf, num_rows, hidden, topk, payload_dtype, fp8_scales, weights, capacity):
    check_tensor("buf", buf, dtypes=(torch.uint8,), ndim=2)
    num_rows = check_int("num_rows", num_rows, min_value=0)
    hidden = check_int("hidden", hidden, min_value=0)
    topk = check_int("topk", topk, min_value=0)
    if not isinstance(payload_dtype, torch.dtype):
        raise TypeError(f"payload_dtype: expected a torch.dtype, got {type(payload_dtype).__name__}")
    fp8_scales, weights = check_bool("fp8_scales", fp8_scales), check_bool("weights", weights)
    capacity = check_int("capacity", capacity, min_value=-1)
    fmt = _unpack_format(hidden, topk, payload_dtype, fp8_scales, weights)
    if capacity < 0:
        want = (num_rows, fmt.row_bytes)
    else:
        if num_rows != buf.size(0) * capacity:
            raise ValueError(f"num_rows: expected slots * capacity = {buf.size(0) * capacity}, got {num_rows}")
        want = (buf.size(0), SLOT_HEADER_BYTES + capacity * fmt.row_bytes)
    if tuple(buf.shape) != want:
        raise ValueError(f"buf: expected shape {list(want)} (the wire rows), got {list(buf.shape)}")
    return fmt, num_rows, capacity


def _unpack_outputs(fields: dict, fmt: RowFormat, buf, num_rows: int, hidden: int, topk: int, payload_dtype):
    """The op's 5 outputs from a {name: [N, width]} dict; an absent field is an empty [N, 0] tensor."""
    def get(name, dtype):
        if name in fields:
            return fields[name]
        return torch.empty((num_rows, 0), dtype=dtype, device=buf.device)
    return (get("x", payload_dtype), get("scale", torch.float32), get("src", torch.int32),
            get("lid", torch.int32), get("w", torch.float32))


def moe_unpack_rows_ref(buf, num_rows: int, hidden: int, topk: int, payload_dtype: torch.dtype, fp8_scales: bool,
                        weights: bool, capacity: int):
    fmt, num_rows, capacity = _check_unpack_args(buf, num_rows, hidden, topk, payload_dtype, fp8_scales, weights,
                                                 capacity)
    fields, _ = _unpack_rows_torch(buf, fmt, num_rows, None if capacity < 0 else capacity)
    return _unpack_outputs(fields, fmt, buf, num_rows, hidden, topk, payload_dtype)


def _unpack_rows_fake(buf, num_rows, hidden, topk, payload_dtype, fp8_scales, weights, capacity):
    g = ceil_div(hidden, 128) if fp8_scales else 0
    w = topk if weights and topk > 0 else 0
    return (buf.new_empty((num_rows, hidden), dtype=payload_dtype), buf.new_empty((num_rows, g), dtype=torch.float32),
            buf.new_empty((num_rows, 1 if topk else 0), dtype=torch.int32),
            buf.new_empty((num_rows, topk), dtype=torch.int32), buf.new_empty((num_rows, w), dtype=torch.float32))


define_op("moe_pack_rows", "(Tensor x, Tensor? x_scale, Tensor src_idx, Tensor? topk_idx, Tensor? topk_weights, "
          "Tensor per_rank, int num_local_experts, int capacity, bool use_fp8) -> Tensor",
          moe_pack_rows_ref, _pack_rows_fake)
define_op("moe_unpack_rows", "(Tensor buf, int num_rows, int hidden, int topk, ScalarType payload_dtype, "
          "bool fp8_scales, bool weights, int capacity) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          moe_unpack_rows_ref, _unpack_rows_fake)


def pack_rows(x, src_idx: torch.Tensor, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
              per_rank: torch.Tensor, num_local_experts: int, capacity: int | None, use_fp8: bool = False):
    """Build the send buffer of a dispatch (see the module docstring for the layout).

    Args:
        x: [T, H] float32/bfloat16/float16, or an (e4m3 [T, H], scale [T, ceil(H/128)] fp32) pair.
        src_idx: [N] int32 contiguous, source token of each send row (-1 = empty row); N = R * capacity in
            fixed-capacity mode, else sum(per_rank).
        topk_idx: [T, k] int64 global expert ids, or None for payload-only rows (cached dispatch).
        topk_weights: [T, k] fp32 or None (no weights on the wire).
        per_rank: [R] int32 rows per destination rank (device tensor: normal mode derives each row's
            destination from it without a host sync; fixed mode writes it into the slot headers).
        num_local_experts: L, experts per rank; capacity: None (normal) or rows per destination slot.
        use_fp8: quantise a float x to e4m3 + 1x128 scales while packing.
    Returns:
        (buffer uint8 [N, row_bytes] or [R, SLOT_HEADER_BYTES + capacity * row_bytes], its RowFormat,
        send_local [N, k] bool (slot j's expert lives on the row's destination) from the torch path, None
        from the fused one).
    Raises TypeError / ValueError naming the argument. Values (src_idx in [-1, T), per_rank in [0, N] (fixed:
    [0, capacity]) with sum(per_rank) == N in normal mode, topk_idx in [-1, R * L)) are checked on CPU tensors
    (the op's CPU kernel, and the torch variant) and with DEEPKERNELS_CHECK=1; otherwise trusted (no host
    sync): the kernel never reads an src_idx entry outside [-1, T) and gives its row 0xFF bytes; an expert id
    outside [-1, R * L) is local nowhere (lid -1: :class:`EPDispatcher` turns such a token's combine into NaN).
    """
    check_tensor("src_idx", src_idx, dtypes=(torch.int32,), ndim=1, contiguous=True)
    # values: the torch variant on CPU tensors is the reference (checked, free); the kernels trust them
    check = run_device_checks(src_idx) or (pack_variant(src_idx.device) == "torch" and src_idx.device.type == "cpu"
                                           and not torch.compiler.is_compiling())
    return _pack_rows(x, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8, check)


def _pack_rows(x, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8, check_values):
    """pack_rows with the value checks as given (the dispatcher builds src_idx / per_rank itself: no host
    read there, its only sync is the counts exchange; DEEPKERNELS_CHECK=1 still checks)."""
    pair = isinstance(x, (tuple, list))
    if pair and len(x) != 2:
        raise TypeError(f"x: expected a tensor or a pair (x_fp8, scale), got a {type(x).__name__} of length {len(x)}")
    xq, xs = (x[0], x[1]) if pair else (x, None)
    cap = -1 if capacity is None else capacity
    _check_pack_args(xq, xs, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, cap, use_fp8,
                     check_values=check_values)
    if pack_variant(src_idx.device) == "torch":
        return _pack_rows_torch(x, src_idx, topk_idx, topk_weights, per_rank, num_local_experts, capacity, use_fp8)
    buf = torch.ops.deepkernels.moe_pack_rows(xq.contiguous(), None if xs is None else xs.contiguous(), src_idx,
                                              None if topk_idx is None else topk_idx.contiguous(),
                                              None if topk_weights is None else topk_weights.contiguous(),
                                              per_rank.contiguous(), num_local_experts, cap, bool(use_fp8))
    return buf, _pack_format(xq, xs, topk_idx, topk_weights, use_fp8), None


def unpack_rows(buf: torch.Tensor, fmt: RowFormat, num_rows: int, capacity: int | None = None):
    """Split a received buffer (the layout :func:`pack_rows` writes with ``fmt``) into its fields:
    ({name: contiguous [num_rows, width]}, slot headers [R, 4] int32 (a view) in fixed-capacity mode, else None)."""
    if pack_variant(buf.device) == "torch":
        return _unpack_rows_torch(buf, fmt, num_rows, capacity)
    f = fmt.fields
    topk = f["lid"][3] if "lid" in f else 0
    out = torch.ops.deepkernels.moe_unpack_rows(buf, num_rows, f["x"][3], topk, f["x"][2], "scale" in f, "w" in f,
                                                -1 if capacity is None else capacity)
    got = {name: t for name, t in zip(("x", "scale", "src", "lid", "w"), out) if name in f}
    hdr = None if capacity is None else buf[:, :SLOT_HEADER_BYTES].view(torch.int32)
    return got, hdr


__all__ = ["SLOT_HEADER_BYTES", "RowFormat", "row_format", "pack_rows", "unpack_rows", "send_local_mask", "pack_variant",
           "moe_pack_rows_ref", "moe_unpack_rows_ref"]
