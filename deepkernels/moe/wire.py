"""MoE wire format: every per-row field of a dispatch in one byte buffer, so one collective moves them all.

A send row carries the token payload (x's dtype, or e4m3 + fp32 per-128 scales), its source token index
(int32), its k local expert ids (int32, -1 where the expert is not on the destination rank) and, when
dispatch got weights, its k fp32 weights: see :class:`RowFormat` / :func:`row_format`.

Normal mode: the send buffer is [num_send, row_bytes], rows ordered by (destination rank, token).
Fixed-capacity (low-latency) mode: [R, SLOT_HEADER_BYTES + capacity * row_bytes], one slot per
destination rank, each led by a 16-byte header (int32 rows for that rank, source token count, 0, 0), then
the rows for that rank in token order, empty rows after them (src -1, lid -1, w 0, zero payload; fp8
quantised: scale 1e-4/448).

:func:`pack_rows` builds a send buffer and :func:`unpack_rows` splits a received one into its fields.
"""
from __future__ import annotations

import torch

from .._ops import ceil_div
from .ops import permute, permute_fp8

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


def pack_rows(x, src_idx: torch.Tensor, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
              per_rank: torch.Tensor, num_local_experts: int, capacity: int | None, use_fp8: bool = False):
    """Build the send buffer of a dispatch (the torch-copies path; see the module docstring).

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
    if topk_idx is not None:
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


def unpack_rows(buf: torch.Tensor, fmt: RowFormat, num_rows: int, capacity: int | None = None):
    """Split a received buffer (the layout :func:`pack_rows` writes) into its fields:
    ({name: contiguous [num_rows, width]}, slot headers [R, 4] int32 (a view) in fixed-capacity mode, else None)."""
    if capacity is None:
        rows, hdr = buf, None
    else:
        hb = SLOT_HEADER_BYTES
        hdr = buf[:, :hb].view(torch.int32)
        rows = buf[:, hb:].view(buf.size(0), capacity, fmt.row_bytes)
    return {name: fmt.unpack(rows, name, num_rows) for name in fmt.fields}, hdr


__all__ = ["SLOT_HEADER_BYTES", "RowFormat", "row_format", "pack_rows", "unpack_rows", "send_local_mask"]
