"""The expert-parallel dispatcher over ``torch.distributed`` (anchor: DeepEP; engine: all_to_all_single).

Send buffer order: each token is packed once per destination rank, rows ordered by (destination rank,
token index); :func:`dispatch_positions` gives ``pos [T,R]`` (row of token t in the send buffer for
rank r, -1 if not sent), and the same ``pos`` drives the combine's un-permute + reduce.

Two modes, two paths (as DeepEP's ``dispatch`` / ``low_latency_dispatch``): :meth:`EPDispatcher.dispatch`
checks the arguments and hands over to ``_dispatch_normal`` (exact sizes: a counts exchange and one host
sync) or ``_dispatch_fixed`` (fixed capacity: static shapes, no host sync); each reads top to bottom.

Weights convention (DeepEP normal mode): ``EPDispatcher.combine`` only SUMS what it is given, one row
per received token, over the ranks the token went to. The top-k weights are applied on the expert
side: :meth:`DispatchHandle.expert_reduce` (or your own code) forms, for each received token, the
weighted sum of its LOCAL experts' outputs ``sum_j w[j] * expert_j(x)``; combine then adds those
partial sums across ranks. So ``combine(handle.expert_reduce(f(handle.contiguous_x)))`` =
``sum_j w_j * expert_j(x)`` over all k experts of each token.
Weights at combine (DeepEP low-latency convention): :meth:`EPDispatcher.combine_experts` takes the
experts' outputs unreduced and applies the SOURCE rank's weights there; dispatch then needs no weights.

Wire format (:mod:`deepkernels.moe.wire`): each send row carries payload, source token index, local
expert ids and weights in one byte buffer (:class:`RowFormat`), so a dispatch is ONE all_to_all_single
(plus the counts exchange in normal mode) and a combine is ONE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._ops import (ceil_div, check_bool, check_int, check_same_device, check_tensor, define_op, run_device_checks,
                    runs_reference)
from ..fp8 import FP8_DTYPE
from .ops import (_FLOAT_DTYPES, POISON_POS, _check_optional_int, _check_topk_idx, _count_ids, _dispatch_positions,
                  _expert_positions, _positions_to_src_idx, _source_slot_positions, local_slot_rows, permute,
                  unpermute_reduce)
from .wire import RowFormat, _pack_rows, row_format, send_local_mask, unpack_rows


def _check_handle(handle) -> None:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the DispatchHandle that dispatch returned, got {type(handle).__name__}")


def _bad_ids(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] bool: the ids outside [-1, E) (no sync)."""
    return (topk_idx < -1) | (topk_idx >= num_experts)


def _layout_and_flag(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """The dispatch layout and a [1] int64 device flag, 1 when an id is outside [-1, E); no host sync.
    On the kernels the flag is the sign of the counts (the layout kernel poisons every count for such
    ids: a free check); the reference refuses them, so it gets them masked to -1 and the flag from the ids
    -- every rank then reaches the counts exchange and raises together, none is left waiting."""
    op = torch.ops.deepkernels.moe_get_dispatch_layout
    if runs_reference("moe_get_dispatch_layout", topk_idx):
        bad = _bad_ids(topk_idx, num_experts)
        per_rank, per_expert, in_rank = op(torch.where(bad, -1, topk_idx), num_experts, num_ranks)
        return per_rank, per_expert, in_rank, bad.any().to(torch.int64).view(1)
    per_rank, per_expert, in_rank = op(topk_idx, num_experts, num_ranks)
    return per_rank, per_expert, in_rank, (per_rank < 0).any().to(torch.int64).view(1)


def _raise_if_bad_ids(topk_idx: torch.Tensor, num_experts: int, rank: int, rank_has_bad: torch.Tensor) -> None:
    """Raise ValueError on EVERY rank when any rank's ids were outside [-1, E): ``rank_has_bad`` [R] bool
    (host) is each rank's flag as it travelled through a collective, so all ranks raise together."""
    if not bool(rank_has_bad.any()):
        return
    bad_ids = _bad_ids(topk_idx, num_experts).reshape(-1) if bool(rank_has_bad[rank]) else None
    if bad_ids is not None and bool(bad_ids.any()):  # (a flag without a bad id here: the generic message)
        first = int(bad_ids.nonzero()[0])
        raise ValueError(f"topk_idx: expected expert ids in [0, {num_experts}) or -1 (unused), got "
                         f"{int(topk_idx.reshape(-1)[first])} at index {list(divmod(first, topk_idx.size(1)))} "
                         f"(values span [{int(topk_idx.min())}, {int(topk_idx.max())}])")
    ranks = rank_has_bad.nonzero().view(-1).tolist()
    raise ValueError(f"topk_idx: expected expert ids in [0, {num_experts}) or -1 (unused) on every "
                     f"rank, got out-of-range ids on rank(s) {ranks} (this rank's ids are valid)")


def moe_check_slot_headers_ref(slot_headers: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                               rank: int) -> None:
    """The fixed-capacity dispatch's id check, AFTER its collective: ``slot_headers`` [R, 4] int32 as received
    (a negative row count = the source rank's layout was poisoned by an id outside [-1, E)); raises the same
    ValueError on every rank. The reference's value check (like every reference check, a CPU kernel); on CUDA
    it runs only with DEEPKERNELS_CHECK=1 (one sync)."""
    check_tensor("slot_headers", slot_headers, dtypes=(torch.int32,), shape=(None, 4))
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
    rank = check_int("rank", rank, min_value=0, max_value=slot_headers.size(0) - 1)
    _raise_if_bad_ids(topk_idx, num_experts, rank, slot_headers[:, 0].cpu() < 0)


define_op("moe_check_slot_headers", "(Tensor slot_headers, Tensor topk_idx, int num_experts, int rank) -> ()",
          moe_check_slot_headers_ref, lambda slot_headers, topk_idx, num_experts, rank: None)


def moe_check_combine_ids_ref(topk_idx: torch.Tensor, dispatch_topk_idx: torch.Tensor) -> None:
    """low_latency_combine's topk_idx: per slot the id given to low_latency_dispatch, or -1; else ValueError.
    The reference's value check (a CPU kernel, like every reference check); on CUDA only with
    DEEPKERNELS_CHECK=1 (one sync). The kernels' path instead gives such a token a NaN row (no sync)."""
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
    check_tensor("dispatch_topk_idx", dispatch_topk_idx, dtypes=(torch.int64,), shape=tuple(topk_idx.shape))
    wrong = (topk_idx != -1) & (topk_idx != dispatch_topk_idx)
    if topk_idx.numel() and bool(wrong.any()):
        first = int(wrong.reshape(-1).nonzero()[0])
        t, j = divmod(first, topk_idx.size(1))
        raise ValueError(f"topk_idx: expected the expert ids given to low_latency_dispatch (or -1 to skip a slot), "
                         f"got {int(topk_idx[t, j])} at index [{t}, {j}] where dispatch had "
                         f"{int(dispatch_topk_idx[t, j])}")


define_op("moe_check_combine_ids", "(Tensor topk_idx, Tensor dispatch_topk_idx) -> ()",
          moe_check_combine_ids_ref, lambda topk_idx, dispatch_topk_idx: None)


def _world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or None (one process), "
                        f"got {type(group).__name__}")

    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class DispatchHandle:
    """What combine needs, plus the local expert layouts of the received tokens.

    Attributes:
        pos: [T, R] int32 send-buffer row of each source token per destination rank (-1 = not sent).
        send_counts / recv_counts: per-rank row counts (host lists; None in fixed-capacity mode).
        num_send / num_recv: rows sent / received (both R * capacity in fixed-capacity mode).
        recv_local_idx: [num_recv, k] int32 local expert id of each slot (-1 = not local / padding row).
        recv_weights: [num_recv, k] float32 top-k weights (0 where not local); None when dispatch got none.
        recv_src_token: [num_recv] int32 token index of each received row on its source rank (-1 = padding).
        num_recv_tokens_per_rank: [R] int32 device tensor, rows received from each rank.
        num_recv_tokens_per_expert: [L] int32 device tensor; also ``..._list`` on host (normal mode).
        topk_idx / topk_weights: the source side's routing as given to dispatch (for combine_experts).
    """
    rank: int
    num_ranks: int
    num_local_experts: int
    pos: torch.Tensor
    num_tokens: int
    num_recv: int
    recv_local_idx: torch.Tensor
    recv_weights: torch.Tensor | None
    num_recv_tokens_per_expert: torch.Tensor
    num_recv_tokens_per_expert_list: list[int] | None
    send_counts: list[int] | None
    recv_counts: list[int] | None
    capacity: int | None
    hidden: int
    src_idx: torch.Tensor | None = None
    send_local: torch.Tensor | None = None  # [num_send, k] bool: slot's expert lives on the row's destination
    num_send: int = 0
    recv_src_token: torch.Tensor | None = None
    num_recv_tokens_per_rank: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    bad_tokens: torch.Tensor | None = None  # [T, 1] bool, fixed capacity: a trusted id outside [-1, E)
    _layout_cache: dict = field(default_factory=dict, repr=False)

    def _send_local(self) -> torch.Tensor:
        """[num_send, k] bool: slot j of send row i names an expert on that row's destination rank."""
        if self.send_local is None:
            dest = torch.arange(self.num_ranks, device=self.src_idx.device)
            if self.capacity is None:
                row_rank = torch.repeat_interleave(dest, torch.tensor(self.send_counts, device=dest.device),
                                                   output_size=self.num_send)
            else:
                row_rank = dest.repeat_interleave(self.capacity)
            self.send_local = send_local_mask(self.src_idx, self.topk_idx, row_rank, self.num_local_experts)
        return self.send_local

    # -- expert-side layouts ------------------------------------------------------------------
    def contiguous_layout(self, alignment: int = 1):
        """(expert_pos [N,k] int32, m_indices [M] int32, segment_start [L] int64, M) for the contiguous
        grouped-GEMM layout: each local expert's rows, in (received row, slot) order, padded to a multiple
        of ``alignment``; m_indices = expert id per row, -1 on padding. Needs the host counts (normal mode)."""
        if self.num_recv_tokens_per_expert_list is None:
            raise RuntimeError("contiguous_layout needs host-side counts; in fixed-capacity mode use masked_layout")
        alignment = check_int("alignment", alignment, min_value=1)
        key = ("contig", alignment)
        if key not in self._layout_cache:
            # total size from the host counts; everything else from the device counts (no H2D copy)
            s = sum(ceil_div(c, alignment) * alignment for c in self.num_recv_tokens_per_expert_list)
            if s > 2**31 - 1:
                raise ValueError(f"alignment: expected a padded layout of at most {2**31 - 1} rows (int32 "
                                 f"positions), got {s} rows with alignment {alignment}")
            dev = self.recv_local_idx.device
            cnt = self.num_recv_tokens_per_expert.to(torch.int64)
            padded = (cnt + alignment - 1) // alignment * alignment
            seg_end = torch.cumsum(padded, 0)
            seg = seg_end - padded
            rows = torch.arange(s, dtype=torch.int64, device=dev)
            e_of = torch.searchsorted(seg_end, rows, right=True).clamp(max=max(self.num_local_experts - 1, 0))
            if self.num_local_experts:
                m_idx = torch.where(rows - seg[e_of] < cnt[e_of], e_of, -1).to(torch.int32)
            else:
                m_idx = torch.full((s,), -1, dtype=torch.int32, device=dev)
            pos = _expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                    self.num_recv_tokens_per_expert)
            self._layout_cache[key] = (pos, m_idx, seg, s)
        return self._layout_cache[key]

    def masked_layout(self, max_m: int | None = None):
        """(expert_pos [N,k] int32 into a [L*max_m] row space, masked_m [L] int32, max_m) for the masked
        grouped-GEMM layout [L, max_m, H]. Sync-free; default max_m = num_recv (always enough unless a
        token repeats an expert id). Overflow: an expert's entries beyond its first max_m (by received
        row, then slot) are DROPPED — expert_pos -1, never written, contributing 0 to the combine — and
        counted in :meth:`num_dropped`; masked_m = min(count, max_m)."""
        max_m = self.num_recv if max_m is None else check_int("max_m", max_m, min_value=0)
        key = ("masked", max_m)
        if key not in self._layout_cache:
            dev = self.recv_local_idx.device
            seg = torch.arange(self.num_local_experts, dtype=torch.int64, device=dev) * max_m
            pos = _expert_positions(self.recv_local_idx, self.num_local_experts, seg,
                                    self.num_recv_tokens_per_expert, limit=max_m)
            masked_m = self.num_recv_tokens_per_expert.clamp(max=max_m).to(torch.int32)
            self._layout_cache[key] = (pos, masked_m, max_m)
        return self._layout_cache[key]

    def num_dropped(self, max_m: int | None = None) -> torch.Tensor:
        """[L] int32 device tensor: entries per local expert dropped by ``masked_layout(max_m)`` (no sync)."""
        return (self.num_recv_tokens_per_expert - self.masked_layout(max_m)[1]).to(torch.int32)

    def check_overflow(self, max_m: int | None = None) -> None:
        """Raise RuntimeError if ``masked_layout(max_m)`` dropped anything. A host sync: call it only
        where one is allowed (not inside a CUDA graph)."""
        dropped = self.num_dropped(max_m).tolist()
        if any(dropped):
            raise RuntimeError(f"max_m: expected room for every entry, got {sum(dropped)} dropped entries "
                               f"(per local expert: {dropped}); raise max_m")

    def to_contiguous(self, recv_x, alignment: int = 1):
        """recv_x [N, H] (or an (fp8, scale) pair) -> the rows in contiguous layout (+ m_indices)."""
        self._check_recv_x(recv_x)
        pos, m_idx, _, m = self.contiguous_layout(alignment)
        src = _positions_to_src_idx(pos, m)
        if isinstance(recv_x, tuple):
            return (permute(recv_x[0], src), permute(recv_x[1], src)), m_idx
        return permute(recv_x, src), m_idx

    def to_masked(self, recv_x, max_m: int | None = None):
        """recv_x [N, H] (or (fp8, scale)) -> [L, max_m, H] (or a pair) and masked_m [L].

        Only the real rows are written: expert l's first masked_m[l] rows. The padding rows (from
        masked_m[l] on) are unspecified, as in DeepEP's low-latency receive buffer: the kernels leave the
        fresh buffer's memory as it was (the CPU reference happens to write zeros). Rows are independent
        through the experts, and expert_reduce / combine_experts read only the real rows' positions
        (``masked_layout``), so whatever the padding holds never reaches a result."""
        self._check_recv_x(recv_x)
        pos, masked_m, max_m = self.masked_layout(max_m)
        src = _positions_to_src_idx(pos, self.num_local_experts * max_m)
        view = lambda t: t.view(self.num_local_experts, max_m, t.size(1))  # noqa: E731
        if isinstance(recv_x, tuple):
            return (view(permute(recv_x[0], src, False)), view(permute(recv_x[1], src, False))), masked_m
        return view(permute(recv_x, src, False)), masked_m

    def _check_recv_x(self, recv_x) -> None:
        """recv_x as dispatch returned it: [num_recv, H] (or an (e4m3, scale) pair of num_recv rows)."""
        if isinstance(recv_x, tuple):
            if len(recv_x) != 2:
                raise TypeError(f"recv_x: expected a tensor or an (x_fp8, scale) pair, got a tuple of length "
                                f"{len(recv_x)}")
            check_tensor("recv_x[0]", recv_x[0], ndim=2, shape=(self.num_recv, None))
            check_tensor("recv_x[1]", recv_x[1], ndim=2, shape=(self.num_recv, None))
        else:
            check_tensor("recv_x", recv_x, ndim=2, shape=(self.num_recv, None))

    def _expert_pos(self, expert_out: torch.Tensor, layout: str, alignment_or_max_m):
        """(expert_pos [N, k], expert_out as [rows, H]) for an expert-output tensor in ``layout``."""
        if layout == "contiguous":
            check_tensor("expert_out", expert_out, ndim=2)
            pos, _, _, m = self.contiguous_layout(1 if alignment_or_max_m is None else alignment_or_max_m)
            if expert_out.size(0) != m:
                raise ValueError(f"expert_out: expected {m} rows (the contiguous layout with alignment "
                                 f"{alignment_or_max_m or 1}), got shape {list(expert_out.shape)}")
            return pos, expert_out
        if layout == "masked":
            check_tensor("expert_out", expert_out, shape=(self.num_local_experts, None, None))
            if alignment_or_max_m is not None and alignment_or_max_m != expert_out.size(1):
                raise ValueError(f"alignment_or_max_m: expected None or expert_out.size(1)={expert_out.size(1)}, "
                                 f"got {alignment_or_max_m!r}")
            rows = expert_out.reshape(expert_out.size(0) * expert_out.size(1), expert_out.size(2))  # (H may be 0)
            return self.masked_layout(expert_out.size(1))[0], rows
        raise ValueError(f"layout: expected 'contiguous' or 'masked', got {layout!r}")

    def expert_reduce(self, expert_out: torch.Tensor, layout: str = "contiguous", alignment_or_max_m=None):
        """Weighted sum over each received row's local experts: [M, H] (contiguous) or [L, max_m, H]
        (masked) expert outputs -> [num_recv, H] in expert_out's dtype (fp32 accumulation). This is
        where the top-k weights given to dispatch are applied (none given: a plain sum)."""
        pos, rows = self._expert_pos(expert_out, layout, alignment_or_max_m)
        return unpermute_reduce(rows, pos, self.recv_weights)



class EPDispatcher:
    """Expert-parallel dispatch / combine over a torch.distributed group (or a single process).

    Args:
        group: a ProcessGroup (NCCL on GPUs, gloo on CPU) or None for one process (no torch.distributed).
        num_experts: E (global); rank r holds experts r*E/R .. (r+1)*E/R - 1.
        capacity: None = normal mode (exact sizes; host syncs, see below). An int = fixed-capacity mode
            (DeepEP's low-latency mode, ``capacity`` = num_max_dispatch_tokens_per_rank): every rank sends
            ``capacity`` rows to every rank, so all shapes are static, there is no host sync, and the
            step is CUDA-graph capturable; needs T <= capacity (checked on the host from the shape).

    Wire format: every row a rank sends carries, in ONE byte buffer (see :class:`RowFormat`), the token
    payload (x's dtype, or e4m3 + fp32 per-128 scales), its source token index, its k local expert ids
    (int32, -1 where the expert is not on the destination) and, when dispatch got weights, its k fp32
    weights. Fixed-capacity mode: the buffer is [R, SLOT_HEADER_BYTES + capacity * row_bytes], one slot
    per destination, each led by a 16-byte header (int32 rows for that rank, source token count, 0, 0),
    then the rows for that rank in token order, zero rows after them.

    Collectives per step (all ``all_to_all_single`` on uint8 views, so any dtype works with gloo and NCCL):
    fixed-capacity mode: dispatch 1, combine 1, combine_experts 1; normal mode: dispatch 2 (counts, rows),
    combine 1, combine_experts 1.

    Host syncs per step. Normal mode: ONE in dispatch (the counts all_to_all result, per-rank and
    per-local-expert counts and every rank's id-check flag, fetched in one D2H copy: the split sizes of the
    data all_to_all must be host ints); combine has none (it reuses the split sizes); the contiguous layout
    sizes itself from the same host counts and builds its indices from the device copy (no H2D copy).
    An id outside [-1, E) on ANY rank makes every rank's dispatch raise ValueError there (no rank is left
    waiting in a collective). Fixed-capacity mode: none; ids are trusted on CUDA: a token with an id outside
    [-1, E) comes back from :meth:`combine` / :meth:`combine_experts` as a NaN row (its other experts'
    outputs are not summed into a plausible value), and the layout counts (the slot headers,
    ``handle.num_recv_tokens_per_rank`` on the receivers) are negative. On CPU tensors (the reference) and
    with DEEPKERNELS_CHECK=1 the ids are checked AFTER the dispatch's collective, from the received slot
    headers, so an out-of-range id on any rank makes every rank's dispatch raise ValueError (none is left
    waiting in the collective).
    (The gloo backend itself works on host memory; the sync count is about CUDA tensors with NCCL.)

    Overflow (fixed capacity): T > capacity raises ValueError on the host (a shape, no sync). A token
    takes one row per destination rank, so a slot never overflows. The expert-side masked layout
    [L, max_m, H] drops entries beyond max_m (only possible with max_m < num_recv or repeated expert ids
    in a row) and counts them: see :meth:`DispatchHandle.masked_layout`.
    """

    def __init__(self, group=None, num_experts: int = 0, capacity: int | None = None):
        self.group = group
        self.rank, self.num_ranks = _world(group)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        if num_experts % self.num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.num_ranks}, got {num_experts}")
        capacity = _check_optional_int("capacity", capacity)
        if capacity is not None and capacity * self.num_ranks > 2**31 - 1:
            raise ValueError(f"capacity: expected num_ranks * capacity <= {2**31 - 1} (int32 rows), got {capacity} "
                             f"with {self.num_ranks} ranks")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.capacity = capacity

    # -- collectives ---------------------------------------------------------------------------
    def _a2a(self, send: torch.Tensor, recv_rows: int, send_splits=None, recv_splits=None) -> torch.Tensor:
        """all_to_all_single on the rows of a 2D tensor, moved as bytes."""
        row_shape = send.shape[1:]
        out = torch.empty((recv_rows, *row_shape), dtype=send.dtype, device=send.device)
        if self.group is None:
            out.copy_(send)
            return out
        import torch.distributed as dist

        row_bytes = int(torch.Size(row_shape).numel()) * send.element_size()
        sb = send.contiguous().view(torch.uint8).reshape(send.size(0), row_bytes)
        ob = out.view(torch.uint8).reshape(recv_rows, row_bytes)
        dist.all_to_all_single(ob, sb, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=self.group)
        return out

    row_format = staticmethod(row_format)

    def _raise_if_bad_ids(self, topk_idx: torch.Tensor, rank_has_bad: torch.Tensor) -> None:
        _raise_if_bad_ids(topk_idx, self.num_experts, self.rank, rank_has_bad)

    # -- dispatch -------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None = None, use_fp8: bool = False):
        """Send each token to the ranks that hold its experts (one row per token and destination rank).

        Args:
            x: [T, H] bf16/fp16/fp32, or a pair (x_fp8 [T, H] e4m3, scale [T, ceil(H/128)] fp32).
            topk_idx: [T, k] int64 global expert ids (-1 = unused).
            topk_weights: [T, k] float32, sent along for :meth:`DispatchHandle.expert_reduce`; None = no
                weights on the wire (apply them at :meth:`combine_experts` instead, DeepEP low-latency style).
            use_fp8: quantise a float x to e4m3 + per-token scales while packing (fused).
        Returns:
            (recv_x, handle): recv_x [N, H] (or an (e4m3, scale) pair) with the received rows ordered by
            source rank then source token index (fixed capacity: N = R * capacity, source rank s's rows at
            s*capacity.., empty rows after them); ``handle.recv_local_idx`` / ``recv_weights`` /
            ``num_recv_tokens_per_expert`` describe them (see :class:`DispatchHandle`).
        """
        use_fp8 = check_bool("use_fp8", use_fp8)
        ref = self._check_dispatch_x(x)
        t = ref.size(0)
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
        if topk_idx.size(0) != t or topk_idx.size(1) == 0:
            raise ValueError(f"topk_idx: expected {t} rows (one per token of x) of k >= 1 expert ids, got shape "
                             f"{list(topk_idx.shape)}")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(t, topk_idx.size(1)))
        check_same_device(x=ref, topk_idx=topk_idx, topk_weights=topk_weights)
        if self.capacity is None:
            return self._dispatch_normal(x, topk_idx.contiguous(), topk_weights, use_fp8)
        return self._dispatch_fixed(x, topk_idx.contiguous(), topk_weights, use_fp8)

    @staticmethod
    def _check_dispatch_x(x) -> torch.Tensor:
        """x [T, H] float or an (e4m3 [T, H], scale [T, ceil(H/128)] fp32) pair; returns the [T, H] tensor."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise TypeError(f"x: expected a tensor or a pair (x_fp8, scale), got a {type(x).__name__} of "
                                f"length {len(x)}")
            check_tensor("x[0]", x[0], dtypes=(FP8_DTYPE,), ndim=2)
            check_tensor("x[1]", x[1], dtypes=(torch.float32,), shape=(x[0].size(0), ceil_div(x[0].size(1), 128)))
            return x[0]
        check_tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
        return x

    def _dispatch_normal(self, x, topk_idx, topk_weights, use_fp8: bool):
        """Normal mode: exact sizes. Layout -> counts exchange (+ the id check) with ONE host sync ->
        pack -> one all_to_all_single of the rows -> unpack."""
        t, h = topk_idx.size(0), (x[0] if isinstance(x, (tuple, list)) else x).size(1)
        R, L = self.num_ranks, self.num_local_experts
        _check_topk_idx(topk_idx, self.num_experts, R, check_values=False)  # ids: checked with the counts sync
        per_rank, per_expert, in_rank, bad = _layout_and_flag(topk_idx, self.num_experts, R)
        pos = _dispatch_positions(in_rank)

        # counts exchange: [R, 2 + L] (rows per destination, this rank's id-check flag, then the
        # per-local-expert counts), so every rank learns every rank's flag with the one sync
        cnt = torch.cat([per_rank.view(R, 1).to(torch.int64), bad.view(1, 1).expand(R, 1),
                         per_expert.view(R, L).to(torch.int64)], 1)
        rcnt = self._a2a(cnt, R).view(R, 2 + L)
        host = torch.cat([cnt[:, 0], rcnt.view(-1)]).cpu()  # the one host sync
        rc = host[R:].view(R, 2 + L)
        self._raise_if_bad_ids(topk_idx, rc[:, 1] != 0)
        send_counts = host[:R].tolist()
        recv_counts = rc[:, 0].tolist()
        recv_expert = rc[:, 2:].sum(0).tolist()
        num_send, num_recv = sum(send_counts), sum(recv_counts)

        src = _positions_to_src_idx(pos, num_send)
        buf, fmt, local = _pack_rows(x, src, topk_idx, topk_weights, per_rank, L, None, use_fp8, run_device_checks(src))
        got, _ = unpack_rows(self._a2a(buf, num_recv, send_counts, recv_counts), fmt, num_recv)

        recv_x = (got["x"], got["scale"]) if "scale" in got else got["x"]
        handle = DispatchHandle(rank=self.rank, num_ranks=R, num_local_experts=L, pos=pos, num_tokens=t,
                                num_recv=num_recv, recv_local_idx=got["lid"], recv_weights=got.get("w"),
                                num_recv_tokens_per_expert=rcnt[:, 2:].sum(0).to(torch.int32),  # device copy
                                num_recv_tokens_per_expert_list=recv_expert, send_counts=send_counts,
                                recv_counts=recv_counts, capacity=None, hidden=h, src_idx=src, send_local=local,
                                num_send=num_send, recv_src_token=got["src"].view(-1),
                                num_recv_tokens_per_rank=rcnt[:, 0].to(torch.int32), topk_idx=topk_idx,
                                topk_weights=topk_weights)
        return recv_x, handle

    def _dispatch_fixed(self, x, topk_idx, topk_weights, use_fp8: bool):
        """Fixed-capacity (low-latency) mode: static shapes, no host sync. Layout -> pack into R slots of
        ``capacity`` rows (each led by its header) -> one all_to_all_single -> unpack; the per-expert
        counts are recounted from the received local ids."""
        t, h = topk_idx.size(0), (x[0] if isinstance(x, (tuple, list)) else x).size(1)
        R, L, c = self.num_ranks, self.num_local_experts, self.capacity
        if t > c:
            raise ValueError(f"x: expected at most capacity={c} tokens (fixed-capacity mode), got {t}")
        # ids outside [-1, E): never refused BEFORE the collective (a rank raising alone would leave its peers
        # waiting in it). The layout counts are poisoned (the kernel's sign bit; the reference path gets the ids
        # masked and the bit set here), so every slot header a bad rank sends is negative. Where a host read is
        # free or allowed (the reference on CPU tensors, DEEPKERNELS_CHECK=1) every rank reads the received
        # headers and raises together; otherwise (trusted, no sync) such a token combines to a NaN row.
        _check_topk_idx(topk_idx, self.num_experts, R, check_values=False)
        per_rank, _, in_rank, bad = _layout_and_flag(topk_idx, self.num_experts, R)
        per_rank = torch.where(bad.bool(), per_rank | POISON_POS, per_rank)  # (the kernels' counts already are)
        tracing = torch.compiler.is_compiling()  # no host read in a traced graph: there a bad token combines to NaN
        pos = _dispatch_positions(in_rank, c)
        n = R * c
        src = _positions_to_src_idx(pos, n)
        # src / per_rank are built here (per_rank may carry the poison bit): no value check on them
        buf, fmt, local = _pack_rows(x, src, topk_idx, topk_weights, per_rank, L, c, use_fp8, False)
        got, hdr = unpack_rows(self._a2a(buf, R), fmt, n, c)
        if not tracing and (runs_reference("moe_get_dispatch_layout", topk_idx) or run_device_checks(topk_idx)):
            torch.ops.deepkernels.moe_check_slot_headers(hdr.contiguous(), topk_idx, self.num_experts, self.rank)

        recv_x = (got["x"], got["scale"]) if "scale" in got else got["x"]
        recv_lid = got["lid"]
        cnt_dev = _count_ids(torch.where(recv_lid >= 0, recv_lid, L).view(-1).long(), L).to(torch.int32)
        handle = DispatchHandle(rank=self.rank, num_ranks=R, num_local_experts=L, pos=pos, num_tokens=t,
                                num_recv=n, recv_local_idx=recv_lid, recv_weights=got.get("w"),
                                num_recv_tokens_per_expert=cnt_dev, num_recv_tokens_per_expert_list=None,
                                send_counts=None, recv_counts=None, capacity=c, hidden=h, src_idx=src,
                                send_local=local, num_send=n, recv_src_token=got["src"].view(-1),
                                num_recv_tokens_per_rank=hdr[:, 0].contiguous(), topk_idx=topk_idx,
                                topk_weights=topk_weights,
                                bad_tokens=_bad_ids(topk_idx, self.num_experts).any(1, keepdim=True))
        return recv_x, handle

    def exchange_weights(self, topk_weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send new top-k weights [T, k] fp32 along a previous dispatch (one all_to_all_single): returns
        the receiver-side [num_recv, k] weights (0 where the slot's expert is not local), like
        ``handle.recv_weights``. No host sync. (:meth:`combine_experts` applies weights on the source
        instead, without this extra collective.)"""
        _check_handle(handle)
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_tokens, None))
        src = handle.src_idx.long().clamp(min=0)
        k = handle.topk_idx.size(1)
        w = topk_weights.index_select(0, src) if handle.num_tokens else \
            torch.zeros(src.size(0), k, device=topk_weights.device)
        w = torch.where(handle._send_local(), w, 0.0).contiguous()
        return self._a2a(w, handle.num_recv, handle.send_counts, handle.recv_counts)

    def dispatch_cached(self, x, handle: DispatchHandle, use_fp8: bool = False):
        """Dispatch new data along a previous dispatch's routing (no counts exchange, no host sync, one
        all_to_all_single): x [T, H] float (optionally quantised while packing) or an (e4m3, scale)
        pair -> recv_x."""
        _check_handle(handle)
        use_fp8 = check_bool("use_fp8", use_fp8)
        if isinstance(x, (tuple, list)) and len(x) != 2:
            raise TypeError(f"x: expected a tensor or a pair (x_fp8, scale), got a {type(x).__name__} of length {len(x)}")
        ref = x[0] if isinstance(x, (tuple, list)) else x
        check_tensor("x[0]" if ref is not x else "x", ref, ndim=2, shape=(handle.num_tokens, None))
        per_rank = (handle.pos >= 0).sum(0, dtype=torch.int32)  # the slot headers (fixed capacity)
        buf, fmt, _ = _pack_rows(x, handle.src_idx, None, None, per_rank, self.num_local_experts, handle.capacity,
                                 use_fp8, run_device_checks(handle.src_idx))
        recv = self._a2a(buf, handle.num_recv if handle.capacity is None else self.num_ranks, handle.send_counts,
                         handle.recv_counts)
        got, _ = unpack_rows(recv, fmt, handle.num_recv, handle.capacity)
        return (got["x"], got["scale"]) if "scale" in got else got["x"]

    # -- combine --------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send each received row's result back and sum per source token over ranks (one all_to_all_single).

        Args: y [handle.num_recv, H] float32/bfloat16/float16, one row per received row (already the
        weighted sum over that row's local experts, see :meth:`DispatchHandle.expert_reduce`).
        Returns: [T, H] in y's dtype, fp32 accumulation over ranks; zero for tokens with no expert.
        """
        _check_handle(handle)
        check_tensor("y", y, dtypes=_FLOAT_DTYPES, shape=(handle.num_recv, None))
        check_same_device(y=y, handle_pos=handle.pos)
        back = self._a2a(y.contiguous(), handle.num_send, handle.recv_counts, handle.send_counts)
        pos = handle.pos if handle.bad_tokens is None else torch.where(handle.bad_tokens, POISON_POS, handle.pos)
        return unpermute_reduce(back, pos)

    def combine_experts(self, expert_out: torch.Tensor, handle: DispatchHandle,
                        topk_weights: torch.Tensor | None = None, layout: str = "masked", alignment_or_max_m=None):
        """Combine with the top-k weights applied on the SOURCE rank (DeepEP's low-latency convention).

        Args:
            expert_out: the local experts' outputs, [L, max_m, H] for layout="masked" (rows as
                ``handle.to_masked(recv_x, max_m)`` placed them; max_m = expert_out.size(1)) or [M, H]
                for layout="contiguous" (``handle.to_contiguous(recv_x, alignment)``, normal mode only).
            topk_weights: [T, k] float32 on the source rank; None = the weights given to dispatch (a plain
                sum if none were given).
        Returns:
            [T, H] in expert_out's dtype: ``out[t] = sum_j w[t, j] * expert_{e_j}(x_t)`` over t's used slots,
            accumulated in fp32 in slot order. Entries the masked layout dropped contribute 0.

        Each received row sends back its local slots' expert outputs unreduced, min(k, L) rows per row
        (in slot order, zero rows where fewer), in ONE all_to_all_single; so this moves min(k, L) times
        the bytes of :meth:`combine`, which instead needs the weights on the expert side at dispatch.
        """
        return self._combine_experts(expert_out, handle, topk_weights, layout, alignment_or_max_m)

    def _combine_experts(self, expert_out, handle, topk_weights, layout, alignment_or_max_m,
                         poison_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """combine_experts; ``poison_tokens`` [T, 1] bool (device, no sync): those tokens' rows come out NaN."""
        _check_handle(handle)
        check_tensor("expert_out", expert_out, dtypes=_FLOAT_DTYPES)
        if layout not in ("masked", "contiguous"):
            raise ValueError(f"layout: expected 'contiguous' or 'masked', got {layout!r}")
        if layout == "masked":
            check_tensor("expert_out", expert_out, shape=(handle.num_local_experts, None, None))
            if alignment_or_max_m not in (None, expert_out.size(1)):
                raise ValueError(f"alignment_or_max_m: expected None or expert_out.size(1)={expert_out.size(1)}, "
                                 f"got {alignment_or_max_m!r}")
            alignment_or_max_m = expert_out.size(1)
        k = handle.topk_idx.size(1)
        if topk_weights is None:
            topk_weights = handle.topk_weights
        else:
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_tokens, k))
            check_same_device(expert_out=expert_out, topk_weights=topk_weights)
        epos, rows = handle._expert_pos(expert_out, layout, alignment_or_max_m)
        if layout == "contiguous":
            m = handle.contiguous_layout(alignment_or_max_m or 1)[3]
            if rows.size(0) != m:
                raise ValueError(f"expert_out: expected {m} rows (the contiguous layout), got {rows.size(0)}")
        slots = min(k, handle.num_local_experts)
        gather = local_slot_rows(handle.recv_local_idx, epos, slots)
        send = permute(rows.contiguous(), gather.view(-1))
        scale = lambda counts: None if counts is None else [c * slots for c in counts]  # noqa: E731
        back = self._a2a(send, handle.num_send * slots, scale(handle.recv_counts), scale(handle.send_counts))
        pos = _source_slot_positions(handle.topk_idx, handle.pos, self.num_experts, self.num_local_experts, slots)
        if poison_tokens is not None:
            pos = torch.where(poison_tokens, POISON_POS, pos).to(torch.int32)
        return unpermute_reduce(back, pos, topk_weights)


__all__ = ["EPDispatcher", "DispatchHandle"]
