"""MoE expert parallelism (anchor: DeepEP; engine: torch.distributed all_to_all_single), in three parts:

* :mod:`deepkernels.moe.ops` — the ops (dispatch layout, permute (+ fused fp8 quant), un-permute +
  reduce) with their references, fake kernels and checked wrappers, and the index helpers;
* :mod:`deepkernels.moe.wire` — the wire format (:class:`RowFormat`, slot headers) and the pack /
  unpack of a dispatch's send rows;
* :mod:`deepkernels.moe.dispatcher` — :class:`EPDispatcher` (normal and fixed-capacity paths) and
  :class:`DispatchHandle`.

Every name the former single module ``deepkernels.moe`` had is re-exported here, private ones included.
"""
from __future__ import annotations

from .._ops import (ceil_div, check_bool, check_index_values, check_int, check_same_device,  # noqa: F401
                    check_tensor, define_op, run_device_checks)
from . import dispatcher, ops, wire  # noqa: F401
from .dispatcher import DispatchHandle, EPDispatcher, _check_handle, _world  # noqa: F401
from .ops import (_FLOAT_DTYPES, _INDEX_DTYPES, _PERMUTE_DTYPES, _TRUSTED_NOTE, FP8_DTYPE,  # noqa: F401
                  LAYOUT_POISON_BIT, POISON_POS, _source_slot_positions,
                  _check_expert_ids, _check_optional_int, _check_permute_args, _check_topk_idx,
                  _check_unpermute_args, _count_ids, _dispatch_positions, _expert_positions, _layout_fake,
                  _permute_fake, _permute_fp8_fake, _positions_to_src_idx, _unpermute_fake, dispatch_positions,
                  expert_positions, get_dispatch_layout, local_slot_rows, moe_get_dispatch_layout_ref,
                  moe_permute_fp8_ref, moe_permute_ref, moe_unpermute_reduce_ref, per_token_cast_to_fp8_ref,
                  permute, permute_fp8, positions_to_src_idx, source_slot_positions, unpermute_reduce)
from .wire import SLOT_HEADER_BYTES, RowFormat, pack_rows, row_format, unpack_rows  # noqa: F401
from . import autograd  # noqa: F401,E402  (autograd for the MoE ops; nn.MoE's training path)

__all__ = ["get_dispatch_layout", "permute", "permute_fp8", "unpermute_reduce", "dispatch_positions",
           "positions_to_src_idx", "expert_positions", "local_slot_rows", "source_slot_positions", "RowFormat",
           "SLOT_HEADER_BYTES", "EPDispatcher", "DispatchHandle", "row_format", "pack_rows", "unpack_rows",
           "LAYOUT_POISON_BIT", "POISON_POS"]
