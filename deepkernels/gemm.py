"""FP8 blockwise-scaled GEMMs (the contract of DeepGEMM), dense and grouped.

Operands (all "NT": ``a`` row-major [M, K], ``b`` given as [N, K], i.e. out = a @ b^T):
  * a        float8_e4m3fn [M, K], unit stride along K
  * a_scale  float32 [M, ceil(K/128)]: one scale per 1x128 group of a row (per_token_cast_to_fp8).
             Row-major, or DeepGEMM's column-major TMA-aligned layout (a view with stride(0) == 1,
             see deepkernels.compat.deep_gemm.get_col_major_tma_aligned_tensor): both are read by strides.
  * b        float8_e4m3fn [N, K] contiguous (grouped: [G, N, K])
  * b_scale  float32 [ceil(N/128), ceil(K/128)]: one scale per 128x128 block (per_block_cast_to_fp8;
             ``weight_scale_inv`` in DeepSeek-V3 checkpoints). Grouped: [G, ceil(N/128), ceil(K/128)].
  * out      bfloat16 [M, N] contiguous (grouped masked: [G, Mmax, N]).
out[m, n] = sum_k (a[m, k] * a_scale[m, k // 128]) * (b[n, k] * b_scale[n // 128, k // 128]),
accumulated in fp32 with the scales applied per 128-wide K block, rounded once to bf16.

Shapes: any M >= 0; N and K multiples of 16 (partial 128-tiles are handled, no padding needed).
Errors: TypeError/ValueError naming the argument, the expectation and what was given, raised on the
host before any launch (dtype, shape, scale shape, alignment, contiguity, device mismatch; an ``out``
that is an expanded view or overlaps an input). The same checks run in the references (the CPU kernels),
so ``torch.ops.deepkernels.*`` called directly on CPU tensors raises them too. Index/count tensors
(m_indices, masked_m): see the grouped functions. A valid fp8 operand the kernels cannot read in place
(odd offset, rows of 16 + 8 bytes) is copied once, and an ``out`` at an odd element offset is written
through an aligned copy, so every path accepts the same inputs.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from ._ops import (ceil_div, check_index_values, check_int, check_out_buffer, check_same_device, check_tensor,
                   define_op, emulation_enabled, run_device_checks)
from .fp8 import FP8_DTYPE, GROUP

# Row segments of the contiguous grouped layout must start at multiples of this (the kernels' BLOCK_M).
M_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT = 128
_NK_MULTIPLE = 16


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows of each group in m_grouped_fp8_gemm_nt_contiguous must be padded to a multiple of this."""
    return M_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT


# ----------------------------------------------------------------------------------------------
# references (the CPU kernels)

def _dequant_a(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    k = a.size(-1)
    return a.float() * a_scale.float().repeat_interleave(GROUP, dim=-1)[..., :k]


def _dequant_b(b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    n, k = b.shape[-2:]
    expanded = b_scale.float().repeat_interleave(GROUP, dim=-2)[..., :n, :].repeat_interleave(GROUP, dim=-1)
    return b.float() * expanded[..., :k]


def fp8_gemm_nt_ref(a, a_scale, b, b_scale, out) -> None:
    _check_dense_args(a, a_scale, b, b_scale, out)
    out.copy_(_dequant_a(a, a_scale) @ _dequant_b(b, b_scale).T)


def m_grouped_fp8_gemm_nt_contiguous_ref(a, a_scale, b, b_scale, out, m_indices) -> None:
    _check_contiguous_args(a, a_scale, b, b_scale, out, m_indices)
    check_m_indices_values(m_indices, b.size(0))  # the reference path: bad ids raise before any write
    a_deq = _dequant_a(a, a_scale)
    result = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for g in range(b.size(0)):
        rows = (m_indices == g).nonzero().squeeze(1)
        if rows.numel():
            result[rows] = a_deq[rows] @ _dequant_b(b[g], b_scale[g]).T
    out.copy_(result)  # padding rows (m_indices == -1) are zero


def m_grouped_fp8_gemm_nt_masked_ref(a, a_scale, b, b_scale, out, masked_m, expected_m) -> None:
    _check_masked_args(a, a_scale, b, b_scale, out, masked_m, expected_m)
    check_masked_m_values(masked_m, a.size(1))  # the reference path: bad counts raise before any write
    result = torch.bmm(_dequant_a(a, a_scale), _dequant_b(b, b_scale).transpose(1, 2))
    valid = torch.arange(out.size(1), device=out.device)[None, :] < masked_m.to(out.device)[:, None]
    out.copy_(torch.where(valid[..., None], result.to(out.dtype), out))  # rows >= masked_m[g] untouched


def _no_output(*args) -> None:
    return None


define_op("fp8_gemm_nt", "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out) -> ()",
          fp8_gemm_nt_ref, _no_output)
define_op("m_grouped_fp8_gemm_nt_contiguous",
          "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out, Tensor m_indices) -> ()",
          m_grouped_fp8_gemm_nt_contiguous_ref, _no_output)
define_op("m_grouped_fp8_gemm_nt_masked",
          "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out, Tensor masked_m, int expected_m) -> ()",
          m_grouped_fp8_gemm_nt_masked_ref, _no_output)


# ----------------------------------------------------------------------------------------------
# argument checks

def _check_nk(n: int, k: int) -> None:
    if n % _NK_MULTIPLE != 0:
        raise ValueError(f"b: expected N (b.size(-2)) a multiple of {_NK_MULTIPLE}, got N = {n}")
    if k % _NK_MULTIPLE != 0:
        raise ValueError(f"a: expected K (a.size(-1)) a multiple of {_NK_MULTIPLE}, got K = {k}")


def _check_a(a, a_scale, lead: tuple) -> tuple[int, int]:
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=len(lead) + 2, inner_contiguous=True)
    m, k = a.shape[-2:]
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(*lead, m, ceil_div(k, GROUP)))
    if m > 1 and a_scale.size(-1) > 1 and 1 not in a_scale.stride()[-2:]:
        raise ValueError(f"a_scale: expected a row-major or column-major layout, got strides {a_scale.stride()}")
    return m, k


def _check_b(b, b_scale, lead: tuple, k: int) -> int:
    check_tensor("b", b, dtypes=(FP8_DTYPE,), ndim=len(lead) + 2, contiguous=True)
    if tuple(b.shape[:-2]) != lead:
        raise ValueError(f"b: expected {lead[0]} groups (a's leading dim), got shape {list(b.shape)}")
    n, kb = b.shape[-2:]
    if kb != k:
        raise ValueError(f"b: expected K = {k} (a's last dim), got shape {list(b.shape)}")
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), shape=(*lead, ceil_div(n, GROUP), ceil_div(k, GROUP)),
                 contiguous=True)
    return n


def _check_out(out, shape: tuple) -> None:
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=shape, contiguous=True)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _kernel_operand(x: torch.Tensor) -> torch.Tensor:
    """An fp8 operand as the kernels read it (TMA / cp.async: 16-byte aligned base and row/group strides).
    A valid view that is not (an odd offset into a buffer, rows of K = 16 + 8 bytes) is copied once, so
    every path accepts the same inputs; an aligned one (the normal case, incl. stride-0 broadcasts) is used
    as is."""
    if _tracing() or x.device.type == "meta" or x.numel() == 0:
        return x
    if x.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in x.stride()[:-1]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _run_into(out: torch.Tensor, launch) -> None:
    """launch(o) writes o; the kernels store bf16 pairs (4-byte aligned). An out at an odd element offset
    gets the result through an aligned copy of itself (rows the op leaves untouched stay as they were)."""
    if _tracing() or out.device.type == "meta" or out.numel() == 0 or out.data_ptr() % 4 == 0:
        launch(out)
        return
    tmp = out.clone(memory_format=torch.contiguous_format)
    launch(tmp)
    out.copy_(tmp)


def _check_dense_args(a, a_scale, b, b_scale, out) -> tuple[int, int, int]:
    m, k = _check_a(a, a_scale, ())
    n = _check_b(b, b_scale, (), k)
    _check_nk(n, k)
    if out is not None:
        _check_out(out, (m, n))
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out)
    if out is not None:
        check_out_buffer("out", out, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    return m, n, k


def _check_contiguous_args(a, a_scale, b, b_scale, out, m_indices) -> None:
    m, k = _check_a(a, a_scale, ())
    check_tensor("b", b, dtypes=(FP8_DTYPE,), ndim=3)
    n = _check_b(b, b_scale, (b.size(0),), k)
    _check_nk(n, k)
    _check_out(out, (m, n))
    check_tensor("m_indices", m_indices, dtypes=(torch.int32,), shape=(m,), contiguous=True)
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out, m_indices=m_indices)
    check_out_buffer("out", out, a=a, a_scale=a_scale, b=b, b_scale=b_scale, m_indices=m_indices)


def _check_masked_args(a, a_scale, b, b_scale, out, masked_m, expected_m) -> int:
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=3)
    groups = a.size(0)
    m, k = _check_a(a, a_scale, (groups,))
    n = _check_b(b, b_scale, (groups,), k)
    _check_nk(n, k)
    _check_out(out, (groups, m, n))
    check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=(groups,), contiguous=True)
    expected_m = check_int("expected_m", expected_m, min_value=0)
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out, masked_m=masked_m)
    check_out_buffer("out", out, a=a, a_scale=a_scale, b=b, b_scale=b_scale, masked_m=masked_m)
    return expected_m


def check_m_indices_values(m_indices: torch.Tensor, num_groups: int) -> None:
    """The values the contiguous grouped GEMM accepts (one host read; raises ValueError naming m_indices):
    every id in [-1, G), and every row of group g >= 0 in a BLOCK_M (= 128) tile whose first row is also
    of group g, i.e. group segments start at multiples of get_m_alignment_for_contiguous_layout() and
    only padding rows (-1) follow a segment's end inside its last tile. These are exactly the inputs on
    which the reference and the CUDA kernel (which gives a tile the group of its first row) agree."""
    m = m_indices.numel()
    if m == 0 or m_indices.device.type == "meta":
        return
    align = M_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT
    ids = m_indices.reshape(-1)
    out_of_range = (ids < -1) | (ids >= num_groups)
    tile_group = ids[::align].repeat_interleave(align)[:m]
    misaligned = (ids >= 0) & (ids != tile_group)
    if not bool((out_of_range | misaligned).any()):  # the one host read
        return
    check_index_values("m_indices", ids, -1, num_groups, "group ids (-1 = padding row)")
    row = int(misaligned.nonzero()[0])
    start = row // align * align
    raise ValueError(f"m_indices: expected each group's rows in segments starting at multiples of {align} "
                     f"(get_m_alignment_for_contiguous_layout(); pad with -1 rows), got row {row} in group "
                     f"{int(ids[row])} inside the {align}-row tile starting at row {start}, whose first row has "
                     f"group {int(ids[start])}")


def check_masked_m_values(masked_m: torch.Tensor, max_m: int) -> None:
    """Every masked_m[g] in [0, Mmax] (one host read; ValueError naming masked_m)."""
    check_index_values("masked_m", masked_m, 0, max_m + 1, "row counts (0 <= masked_m[g] <= Mmax = a.size(1))")


# ----------------------------------------------------------------------------------------------
# public API

def fp8_gemm_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] (bf16) = (a * a_scale) @ (b * b_scale)^T; see the module docstring for layouts.

    ``out`` is allocated when None; returned either way.
    Raises TypeError (a non-tensor argument) or ValueError naming the argument (dtype, shape, scale shape,
    layout, N/K not multiples of 16, contiguity, device mismatch, an ``out`` that shares memory with itself
    or an input) before any launch.
    """
    m, n, k = _check_dense_args(a, a_scale, b, b_scale, out)
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if k == 0:  # an empty sum (the kernels need K >= 16)
        return out.zero_()
    _ensure_table(a)
    a, b = _kernel_operand(a), _kernel_operand(b)
    _run_into(out, lambda o: torch.ops.deepkernels.fp8_gemm_nt(a, a_scale, b, b_scale, o))
    return out


def m_grouped_fp8_gemm_nt_contiguous(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                                     b_scale: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over rows of ``a`` sorted by group (MoE experts), in one launch.

    a [M, K] with rows of group g in contiguous segments; ``m_indices`` int32 [M]: the group of each
    row, -1 for padding rows (their output rows are written as zero). b [G, N, K], b_scale
    [G, ceil(N/128), ceil(K/128)], out bf16 [M, N].

    m_indices values (see :func:`check_m_indices_values`): ids in [-1, G), and each group's segment starts
    at a multiple of get_m_alignment_for_contiguous_layout() (128; the kernels give a 128-row tile the
    group of its first row), with only -1 rows after a segment's end in its last tile. On CPU tensors (the
    reference) any other m_indices raises ValueError naming ``m_indices`` before ``out`` is written. On CUDA
    (and emulated) m_indices is read on the device only and trusted, as in DeepGEMM: no host sync, so the
    call can be graph-captured; a row whose id breaks the rules is never computed and is written as NaN
    (never an out-of-bounds read). ``DEEPKERNELS_CHECK=1`` (read on each call) validates it first, with
    one host sync, and raises the same ValueError.
    """
    _check_contiguous_args(a, a_scale, b, b_scale, out, m_indices)
    if run_device_checks(m_indices):
        check_m_indices_values(m_indices, b.size(0))
    if a.size(1) == 0:  # an empty sum: every row is 0 (the kernels need K >= 16); CPU values still checked
        if m_indices.device.type == "cpu":
            check_m_indices_values(m_indices, b.size(0))
        return out.zero_()
    _ensure_table(a)
    a, b = _kernel_operand(a), _kernel_operand(b)
    _run_into(out, lambda o: torch.ops.deepkernels.m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, o,
                                                                                      m_indices))
    return out


def m_grouped_fp8_gemm_nt_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                 out: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> torch.Tensor:
    """Batched grouped GEMM where group g uses only its first ``masked_m[g]`` rows (MoE decode).

    a [G, Mmax, K], a_scale [G, Mmax, ceil(K/128)], b [G, N, K], b_scale [G, ceil(N/128), ceil(K/128)],
    out bf16 [G, Mmax, N]; ``masked_m`` int32 [G] on the device (read there: no host synchronisation,
    so the call can be captured in a CUDA graph); ``expected_m`` (an int >= 0, not a bool or float) is a
    hint for the tile heuristic. Rows >= masked_m[g] of ``out`` are left untouched.

    masked_m values: 0 <= masked_m[g] <= Mmax. On CPU tensors (the reference) anything else raises
    ValueError naming ``masked_m`` before ``out`` is written. On CUDA (and emulated) masked_m is trusted
    (read on the device only): the kernels clamp it to [0, Mmax], so nothing outside ``out`` is touched.
    ``DEEPKERNELS_CHECK=1`` (read on each call) validates it first with one host sync.
    """
    expected_m = _check_masked_args(a, a_scale, b, b_scale, out, masked_m, expected_m)
    if run_device_checks(masked_m):
        check_masked_m_values(masked_m, a.size(1))
    if a.size(2) == 0:  # an empty sum: rows < masked_m[g] are 0 (no host sync; the kernels need K >= 16)
        if masked_m.device.type == "cpu":
            check_masked_m_values(masked_m, a.size(1))
        rows = torch.arange(a.size(1), device=out.device)[None, :] < masked_m[:, None]
        return out.masked_fill_(rows[..., None], 0.0)
    _ensure_table(a)
    a, b = _kernel_operand(a), _kernel_operand(b)
    _run_into(out, lambda o: torch.ops.deepkernels.m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, o, masked_m,
                                                                                  expected_m))
    return out


# ----------------------------------------------------------------------------------------------
# Launch plans: explain(), DEEPKERNELS_GEMM_CONFIG and the tuning table.
#
# The C++ launcher decides (csrc/fp8_gemm/heuristic.h); the functions below mirror that decision exactly
# (tests/test_gemm.py checks the mirror against the C++ function over a grid of problems, and against what
# the emulated launches record). Precedence for the opt-in sm_90a kernel: DEEPKERNELS_GEMM_CONFIG (read per
# call) > the tuning table (deepkernels/tuning/gemm_sm90.json, entries of this device) > the heuristic.

_KINDS = {"dense": 0, "contiguous": 1, "masked": 2}
_SM90_SHAPES = ((64, 16), (64, 32), (64, 64), (64, 128), (128, 64), (128, 128))
_SM90_SMEM_BUDGET, _SM90_MAX_STAGES, _SM90_ALIGN_SLACK = 232448, 8, 1024
_MIN_K_BLOCKS_PER_SPLIT, _MAX_SPLIT_K, _REDUCE_LAUNCH_COST = 4, 8, 256
_MAX_SPLIT_WORKSPACE_BYTES = 128 << 20  # the heuristic's cap on the split-K workspace (heuristic.h)
TUNING_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning", "gemm_sm90.json")
_table: list[dict] = []           # the entries pushed to the extension (this device's)
_table_key: object = None         # which device they were chosen for
_TABLE_FIELDS = ("kind", "m", "n", "k", "num_groups", "expected_m", "num_sms", "block_m", "block_n", "split_k",
                 "stages")


def sm90_max_stages(block_m: int, block_n: int, tma_store: int = 0) -> int:
    """The deepest shared-memory ring the sm_90a kernel fits for a (block_m, block_n) tile (with the TMA-store
    epilogue, beside its block_m x block_n bf16 output tile)."""
    out_tile = block_m * block_n * 2 if tma_store else 0
    fit = (_SM90_SMEM_BUDGET - _SM90_ALIGN_SLACK - 16 * _SM90_MAX_STAGES - out_tile) // ((block_m + block_n) * 128)
    return min(fit, _SM90_MAX_STAGES)


def _validate_sm90(kind: str, k: int, block_m: int, block_n: int, split_k: int, stages: int, overlap: int,
                   where: str, tma_store: int = 0) -> None:
    """The C++ validate_sm90 (heuristic.h), same messages, as ValueError."""
    k_blocks = ceil_div(k, 128)
    if (block_m, block_n) not in _SM90_SHAPES:
        raise ValueError(f"{where}: expected block_m,block_n one of 64,16 64,32 64,64 64,128 128,64 128,128, "
                         f"got {block_m},{block_n}")
    if not 1 <= split_k <= k_blocks:
        raise ValueError(f"{where}: expected split_k in [1, ceil(K/128) = {k_blocks}], got {split_k}")
    if tma_store not in (0, 1):
        raise ValueError(f"{where}: expected tma_store 0 or 1, got {tma_store}")
    if tma_store == 1 and split_k > 1:
        raise ValueError(f"{where}: expected tma_store 0 with split_k > 1 (split-K stores fp32 slices to its "
                         f"workspace), got 1")
    if stages != 0 and not 2 <= stages <= sm90_max_stages(block_m, block_n, tma_store):
        with_store = " with the TMA-store epilogue" if tma_store else ""
        raise ValueError(f"{where}: expected stages in [2, {sm90_max_stages(block_m, block_n, tma_store)}] for "
                         f"{block_m}x{block_n} tiles{with_store} (or 0 = the most that fit), got {stages}")
    if overlap not in (0, 1):
        raise ValueError(f"{where}: expected overlap 0 or 1, got {overlap}")
    if overlap == 1 and (block_m, block_n) == (128, 128):
        raise ValueError(f"{where}: expected overlap 0 for {block_m}x{block_n} tiles (two accumulator sets do not "
                         f"fit its registers), got 1")


def _env_config(kind: str, k: int):
    """(block_m, block_n, split_k, stages, overlap, tma_store) from DEEPKERNELS_GEMM_CONFIG (or the legacy
    DEEPKERNELS_GEMM_SM90_BLOCKS="BMxBN"), None when unset; ValueError when set but invalid."""
    text = os.environ.get("DEEPKERNELS_GEMM_CONFIG", "")
    if text:
        name = "DEEPKERNELS_GEMM_CONFIG"
        parts = text.split(",")
        try:
            values = [int(x) for x in parts]
        except ValueError:
            values = []
        if len(values) not in (3, 4, 5, 6):
            raise ValueError(f'{name}: expected "block_m,block_n,split_k[,stages[,overlap[,tma_store]]]" '
                             f'(integers), got "{text}"')
        values += [0] * (6 - len(values))
    else:
        text = os.environ.get("DEEPKERNELS_GEMM_SM90_BLOCKS", "")
        if not text:
            return None
        name = "DEEPKERNELS_GEMM_SM90_BLOCKS"
        try:
            bm, bn = (int(x) for x in text.split("x"))
        except ValueError:
            raise ValueError(f'{name}: expected "BMxBN" (e.g. 64x128), got "{text}"') from None
        values = [bm, bn, 1, 0, 0, 0]
    _validate_sm90(kind, k, *values[:5], name, values[5])
    return tuple(values)


def split_workspace_bytes(kind: str, m: int, n: int, num_groups: int, split_k: int) -> int:
    """fp32 bytes of the split-K workspace the launch allocates (heuristic.h's workspace_bytes): 0 for split_k 1,
    else split_k x M x N x 4, or split_k x G x Mmax x N x 4 for masked (masked_m is only known on the device)."""
    return 0 if split_k <= 1 else split_k * (num_groups if kind == "masked" else 1) * m * n * 4


def _sm90_heuristic(kind: str, m: int, n: int, k: int, num_groups: int, expected_m: int, num_sms: int):
    """heuristic.h's sm90_heuristic: (block_m, block_n, split_k)."""
    m_pp = min(expected_m, m) if kind == "masked" and expected_m > 0 else m
    problems = num_groups if kind == "masked" else 1
    block_m = 64 if m_pp <= 64 else 128
    k_blocks = ceil_div(k, 128)
    best, best_key = None, None
    for block_n in (128, 64, 32, 16):
        if (block_m, block_n) not in _SM90_SHAPES:
            continue
        tiles = problems * ceil_div(m_pp, block_m) * ceil_div(n, block_n)
        max_split = 1
        if tiles < num_sms:
            max_split = max(1, min(_MAX_SPLIT_K, k_blocks // _MIN_K_BLOCKS_PER_SPLIT))
            while max_split > 1 and split_workspace_bytes(kind, m, n, num_groups, max_split) > \
                    _MAX_SPLIT_WORKSPACE_BYTES:
                max_split -= 1
        for split in range(1, max_split + 1):
            units = tiles * split
            waves = ceil_div(units, num_sms)
            cost = waves * ceil_div(k_blocks, split) * (block_m + block_n)
            if split > 1:
                cost += _REDUCE_LAUNCH_COST + ceil_div(8 * split * problems * m_pp * n, 128 * num_sms)
            low = units * 5 < waves * num_sms * 4
            if best_key is None:
                better = True
            elif low != best_key[0]:
                better = not low
            elif cost != best_key[1]:
                better = cost < best_key[1]
            else:
                better = units * best_key[3] > best_key[2] * waves
            if better:
                best, best_key = (block_m, block_n, split), (low, cost, units, waves)
    return best


def explain(m: int, n: int, k: int, num_groups: int = 1, num_sms: int = 132, kind: str = "dense",
            expected_m: int | None = None, kernel: str | None = None) -> dict:
    """What the GEMM launcher runs for a problem: ``{"kernel", "block_m", "block_n", "split_k", "stages",
    "overlap", "tma_store", "units", "ctas", "sm_utilisation", "source", "workspace_bytes"}``.

    m, n, k: the op's M (dense: rows of a; contiguous: all rows of a; masked: Mmax, a.size(1)), N, K.
    kind: "dense" | "contiguous" | "masked"; num_groups: G of the grouped kinds; expected_m: the masked
    op's hint (default m). kernel: "sm90" (the opt-in TMA/wgmma kernel) or "portable"; None = the one this
    process selects (``sm90`` when DEEPKERNELS_GEMM_SM90=1, else ``portable``; a layout TMA cannot describe
    also falls back to portable at run time). units = output tiles x split_k (work items), ctas = CTAs
    launched (sm90: persistent, min(units, num_sms)), overlap = 1 when the promotion of a K block overlaps the
    next K block's wgmmas (two accumulator sets; the heuristic leaves it 0), tma_store = 1 when the bf16 tiles go
    through shared memory and a TMA store that overlaps the next tile (the heuristic leaves it 0; at run time an
    ``out`` layout a tensor map cannot describe keeps the register epilogue: see last_launch_plan()),
    sm_utilisation = units / (waves x num_sms), the share of SM slots busy over the waves. source: "heuristic",
    "table" (deepkernels/tuning/gemm_sm90.json) or
    "env" (DEEPKERNELS_GEMM_CONFIG). workspace_bytes: the fp32 split-K scratch the launch allocates
    (:func:`split_workspace_bytes`; split-K runs in every kind: masked splits from the expected rows but
    its workspace covers Mmax rows of every group). The same decision as csrc/fp8_gemm/heuristic.h (tested
    equal).
    Raises ValueError for bad arguments or an invalid DEEPKERNELS_GEMM_CONFIG."""
    m = check_int("m", m, min_value=1)
    n = check_int("n", n, min_value=_NK_MULTIPLE)
    k = check_int("k", k, min_value=_NK_MULTIPLE)
    num_groups = check_int("num_groups", num_groups, min_value=1)
    num_sms = check_int("num_sms", num_sms, min_value=1)
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {list(_KINDS)}, got {kind!r}")
    expected_m = m if expected_m is None else check_int("expected_m", expected_m, min_value=0)
    if kind != "masked":
        expected_m = 0
    if kernel is None:
        kernel = "sm90" if os.environ.get("DEEPKERNELS_GEMM_SM90") == "1" else "portable"
    if kernel not in ("sm90", "portable"):
        raise ValueError(f"kernel: expected 'sm90' or 'portable', got {kernel!r}")
    problems = num_groups if kind == "masked" else 1
    if kernel == "portable":
        units = ceil_div(m, 64) * ceil_div(n, 64) * problems
        plan = dict(kernel="portable", block_m=64, block_n=64, split_k=1, stages=2, overlap=0, tma_store=0,
                    units=units,
                    ctas=units, source="heuristic")
    else:
        source, stages, overlap, tma_store = "heuristic", 0, 0, 0
        forced = _env_config(kind, k)
        if forced is not None:
            (block_m, block_n, split_k, stages, overlap, tma_store), source = forced, "env"
        else:
            entry = _table_entry(kind, m, n, k, num_groups, expected_m, num_sms)
            if entry is not None:
                block_m, block_n, split_k, stages = (entry[f] for f in ("block_m", "block_n", "split_k", "stages"))
                overlap, tma_store, source = entry.get("overlap", 0), entry.get("tma_store", 0), "table"
            else:
                block_m, block_n, split_k = _sm90_heuristic(kind, m, n, k, num_groups, expected_m, num_sms)
        units = problems * ceil_div(m, block_m) * ceil_div(n, block_n) * split_k
        plan = dict(kernel="sm90", block_m=block_m, block_n=block_n, split_k=split_k,
                    stages=stages or sm90_max_stages(block_m, block_n, tma_store), overlap=overlap,
                    tma_store=tma_store, units=units,
                    ctas=min(units, num_sms),
                    source=source)
    waves = ceil_div(plan["units"], num_sms)
    plan["sm_utilisation"] = plan["units"] / (waves * num_sms)
    plan["workspace_bytes"] = split_workspace_bytes(kind, m, n, num_groups, plan["split_k"])
    return plan


def _table_entry(kind, m, n, k, num_groups, expected_m, num_sms):
    for e in _table:
        if (e["kind"], e["m"], e["n"], e["k"], e["num_groups"], e["expected_m"], e["num_sms"]) == (
                kind, m, n, k, num_groups, expected_m, num_sms):
            try:
                _validate_sm90(kind, k, e["block_m"], e["block_n"], e["split_k"], e["stages"], e.get("overlap", 0),
                               "table", e.get("tma_store", 0))
            except ValueError:
                return None  # the C++ lookup skips an entry that cannot run, too
            return e
    return None


def load_tuning_table(path: str | None = None) -> dict:
    """The tuning table JSON (``python -m bench sweep`` writes it): ``{"version": 1, "entries": [...]}``,
    each entry {device, kind, m, n, k, num_groups, expected_m, num_sms, block_m, block_n, split_k, stages,
    optionally overlap and tma_store (0 when absent), us, ...}. A missing file is an empty table."""
    path = path or TUNING_TABLE_PATH
    if not os.path.exists(path):
        return {"version": 1, "entries": []}
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'entries' list")
    return table


def set_tuning_table(entries: list[dict] | None) -> None:
    """Replace the table the launcher (and explain()) consult, on every device, until called with None (back
    to the committed deepkernels/tuning/gemm_sm90.json, this device's entries). Each entry a dict with kind,
    m, n, k, num_groups, expected_m, num_sms, block_m, block_n, split_k, stages, optionally overlap and tma_store
    (default 0; extra keys ignored); entries that cannot run (invalid shape / split / stages for their problem)
    are kept but never used."""
    global _table_key
    _push_table([] if entries is None else entries)
    _table_key = None if entries is None else "set_tuning_table"


def _push_table(entries: list[dict]) -> None:
    global _table
    rows = []
    for i, e in enumerate(entries):
        missing = [f for f in _TABLE_FIELDS if f not in e]
        if missing:
            raise ValueError(f"entries[{i}]: expected the keys {list(_TABLE_FIELDS)}, missing {missing}")
        if e["kind"] not in _KINDS:
            raise ValueError(f"entries[{i}]: expected kind one of {list(_KINDS)}, got {e['kind']!r}")
        rows.append(e)
    tuples = [(_KINDS[e["kind"]], *(int(e[f]) for f in _TABLE_FIELDS[1:]), int(e.get("overlap", 0)),
               int(e.get("tma_store", 0))) for e in rows]
    for name in ("_C", "_emu"):
        module = sys.modules.get(f"{__package__}.{name}")
        if module is not None and hasattr(module, "gemm_set_table"):
            module.gemm_set_table(tuples)
    _table = [dict(e) for e in rows]


def _device_name(t: torch.Tensor) -> str | None:
    if t.is_cuda:
        return torch.cuda.get_device_name(t.device)
    if t.device.type == "cpu" and emulation_enabled():
        return "SIMT emulator"
    return None


def _ensure_table(t: torch.Tensor) -> None:
    """Push the committed table's entries for t's device to the extension (once per device change)."""
    global _table_key
    if t.device.type == "cpu" and not emulation_enabled():
        return
    key = (t.device.type, t.device.index)
    if key == _table_key or _table_key == "set_tuning_table":
        return
    name = _device_name(t)
    _push_table([e for e in load_tuning_table().get("entries", []) if e.get("device") == name])
    _table_key = key


def last_launch_plan() -> dict:
    """The plan of the last GEMM launched on this thread by the kernels (emulated when emulation is on),
    same keys as :func:`explain` less sm_utilisation; {} when no extension is loaded."""
    module = sys.modules.get(f"{__package__}._emu" if emulation_enabled() else f"{__package__}._C")
    return module.gemm_last_plan() if module is not None and hasattr(module, "gemm_last_plan") else {}


def native_plan(m: int, n: int, k: int, num_groups: int = 1, num_sms: int = 132, kind: str = "dense",
                expected_m: int | None = None) -> dict:
    """The C++ heuristic.h decision itself (the sm_90a plan) through the loaded extension (the emulator's
    when present): what :func:`explain` with kernel="sm90" mirrors. RuntimeError when no extension is loaded."""
    for name in ("_emu", "_C"):
        module = sys.modules.get(f"{__package__}.{name}")
        if module is not None and hasattr(module, "gemm_plan"):
            em = m if expected_m is None else expected_m
            return module.gemm_plan(_KINDS[kind], m, n, k, num_groups, em if kind == "masked" else 0, num_sms)
    raise RuntimeError("native_plan: no compiled extension (deepkernels._C / _emu) is loaded")


__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "get_m_alignment_for_contiguous_layout", "M_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT"]
__all__ += ["explain", "load_tuning_table", "set_tuning_table", "last_launch_plan", "native_plan",
            "sm90_max_stages", "split_workspace_bytes", "TUNING_TABLE_PATH"]


# ----------------------------------------------------------------------------------------------
# Weight-gradient GEMMs (DeepGEMM's wgrad_gemm_fp8_fp8_fp32_nt / k_grouped_wgrad_gemm_fp8_fp8_fp32_nt).
# In wgrad, K is the token dimension: dW[M, N] = grad_out^T[M, T] @ x^T[N, T]^T. Both operands are
# quantised 1x128 per row along K (per_token_cast_to_fp8 of the transposed tensors), so unlike the
# forward GEMM b's scales are per row ([N, ceil(K/128)]), not per 128x128 block. The fp32 result is
# ACCUMULATED into ``out`` (out += a @ b^T): gradient accumulation is free.

def _dequant_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() * scale.float().repeat_interleave(GROUP, dim=-1)[..., :x.size(-1)]


def wgrad_gemm_fp8_fp8_fp32_nt_ref(a, a_scale, b, b_scale, out) -> None:
    out.add_(_dequant_rows(a, a_scale) @ _dequant_rows(b, b_scale).T)


def _k_group_offsets(ks) -> list[tuple[int, int, int]]:
    """(k, first K element, first scale row) of each group of the flat k-grouped layout."""
    offsets, k0, s0 = [], 0, 0
    for k in ks:
        offsets.append((k, k0, s0))
        k0, s0 = k0 + k, s0 + ceil_div(k, GROUP)
    return offsets


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt_ref(a, a_scale, b, b_scale, out, ks) -> None:
    m, n = out.shape[1:]
    for g, (k, k0, s0) in enumerate(_k_group_offsets(ks)):
        if k == 0:
            continue
        a_g = a[m * k0:m * (k0 + k)].view(m, k)
        b_g = b[n * k0:n * (k0 + k)].view(n, k)
        scales = slice(s0, s0 + ceil_div(k, GROUP))
        wgrad_gemm_fp8_fp8_fp32_nt_ref(a_g, a_scale[scales].T, b_g, b_scale[scales].T, out[g])


define_op("wgrad_gemm_fp8_fp8_fp32_nt",
          "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out) -> ()",
          wgrad_gemm_fp8_fp8_fp32_nt_ref, _no_output)
define_op("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
          "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out, int[] ks) -> ()",
          k_grouped_wgrad_gemm_fp8_fp8_fp32_nt_ref, _no_output)


def _check_wgrad_operand(name: str, x, scale_name: str, scale, k: int | None) -> tuple[int, int]:
    check_tensor(name, x, dtypes=(FP8_DTYPE,), ndim=2, inner_contiguous=True)
    rows, kx = x.shape
    if k is not None and kx != k:
        raise ValueError(f"{name}: expected K = {k} (a's last dim), got shape {list(x.shape)}")
    if rows > 1 and kx > 0 and x.stride(0) % _NK_MULTIPLE != 0:
        raise ValueError(f"{name}: expected a row stride that is a multiple of {_NK_MULTIPLE} (16-byte aligned rows), "
                         f"got strides {x.stride()}")
    check_tensor(scale_name, scale, dtypes=(torch.float32,), shape=(rows, ceil_div(kx, GROUP)))
    return rows, kx


def _check_accumulator(out, shape: tuple) -> None:
    check_tensor("out", out, dtypes=(torch.float32,), shape=shape, inner_contiguous=True)


def wgrad_gemm_fp8_fp8_fp32_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                               out: torch.Tensor) -> torch.Tensor:
    """Weight-gradient GEMM: ``out[M, N] += (a * a_scale) @ (b * b_scale)^T`` in fp32 (accumulated).

    a        float8_e4m3fn [M, K], unit stride along K, row stride a multiple of 16 (16-byte rows)
    a_scale  float32 [M, ceil(K/128)]: 1x128 per-row scales along K, any strides (row-major or
             DeepGEMM's column-major TMA-aligned layout)
    b        float8_e4m3fn [N, K], same layout rules as a
    b_scale  float32 [N, ceil(K/128)]: 1x128 per-row scales along K (not 128x128 blocks), any strides
    out      float32 [M, N], unit stride along N; read and written (accumulated), returned
    K (the token dimension in wgrad) must be a multiple of 16; K = 0 leaves ``out`` unchanged. Any M, N
    >= 0 (edge tiles are masked). Errors: TypeError/ValueError naming the argument, raised before launch.
    """
    m, k = _check_wgrad_operand("a", a, "a_scale", a_scale, None)
    n, _ = _check_wgrad_operand("b", b, "b_scale", b_scale, k)
    if k % _NK_MULTIPLE != 0:
        raise ValueError(f"K: expected a multiple of {_NK_MULTIPLE}, got {k}")
    _check_accumulator(out, (m, n))
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out)
    check_out_buffer("out", out, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    torch.ops.deepkernels.wgrad_gemm_fp8_fp8_fp32_nt(_kernel_operand(a), a_scale, _kernel_operand(b), b_scale, out)
    return out


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                                         b_scale: torch.Tensor, out: torch.Tensor, ks) -> torch.Tensor:
    """Per-expert weight gradients with per-expert K (token) segments: for each group g,
    ``out[g] += (a_g * sa_g) @ (b_g * sb_g)^T`` in fp32 (accumulated), in DeepGEMM's flat layout.

    ks       the K of each group (list/tuple of ints, or a 1-D integer tensor read on the host), each a
             multiple of 16 and >= 0 (a group with K = 0 leaves out[g] unchanged)
    a        float8_e4m3fn, contiguous, M * sum(ks) elements (any shape; read flat): group g is an [M, ks[g]]
             row-major block starting at element M * sum(ks[:g])
    a_scale  float32 [sum(ceil(ks[g]/128)), M] contiguous: group g's ceil(ks[g]/128) rows, each the 1x128
             scales of all M rows for one K block (the transposed per-token scales, as DeepGEMM's test builds)
    b        float8_e4m3fn, contiguous, N * sum(ks) elements; group g is [N, ks[g]] at element N * sum(ks[:g])
    b_scale  float32 [sum(ceil(ks[g]/128)), N] contiguous
    out      float32 [G, M, N] contiguous, G = len(ks); accumulated, returned
    """
    if isinstance(ks, torch.Tensor):
        if ks.dim() != 1 or ks.dtype.is_floating_point or ks.dtype == torch.bool:
            raise ValueError(f"ks: expected a 1-D integer tensor, got {ks.dtype} of shape {list(ks.shape)}")
        ks = ks.tolist()
    if not isinstance(ks, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise TypeError(f"ks: expected a list of ints, got {ks!r}")
    for g, k in enumerate(ks):
        if k < 0 or k % _NK_MULTIPLE != 0:
            raise ValueError(f"ks[{g}]: expected a non-negative multiple of {_NK_MULTIPLE}, got {k}")
    ks = list(ks)
    check_tensor("out", out, dtypes=(torch.float32,), ndim=3, contiguous=True)
    groups, m, n = out.shape
    if len(ks) != groups:
        raise ValueError(f"ks: expected {groups} entries (out's leading dim), got {len(ks)}")
    total_k, scale_rows = sum(ks), sum(ceil_div(k, GROUP) for k in ks)
    for name, x, rows in (("a", a, m), ("b", b, n)):
        check_tensor(name, x, dtypes=(FP8_DTYPE,), contiguous=True)
        if x.numel() != rows * total_k:
            raise ValueError(f"{name}: expected {rows} * sum(ks) = {rows * total_k} elements, got {x.numel()} "
                             f"(shape {list(x.shape)})")
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(scale_rows, m), contiguous=True)
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), shape=(scale_rows, n), contiguous=True)
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out=out)
    check_out_buffer("out", out, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    torch.ops.deepkernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(_kernel_operand(a.view(-1)), a_scale,
                                                               _kernel_operand(b.view(-1)), b_scale, out, ks)
    return out


__all__ += ["wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt"]
