#pragma once
#include <cstdint>
#include "../common/dtype.h"

namespace deepkernels::moe {

// topk_idx[T, k] int64 (contiguous; -1 = unused) ->
//   num_tokens_per_rank[R] int32, num_tokens_per_expert[E] int32 (both ZEROED by the caller),
//   is_token_in_rank[T, R] bool (written in full). Expert e lives on rank e / (E / R).
// topk_idx is trusted: an id outside [-1, E) is counted nowhere and POISONS the layout: every count gets
// its sign bit set (INT_MIN + the count of the valid ids), so no count of a bad batch is >= 0.
struct LayoutParams {
  const int64_t* topk_idx;
  int32_t* num_tokens_per_rank;
  int32_t* num_tokens_per_expert;
  uint8_t* is_token_in_rank;
  int64_t num_tokens;
  int topk, num_experts, num_ranks;
};

// out[i, :] = x[src_idx[i], :] (raw bytes), a zero row where src_idx[i] == -1 (with skip_empty: that row
// is not written at all, e.g. the padding rows of the masked layout). x and out contiguous.
// src_idx is trusted (not checked on the host): an entry outside [-1, num_src) is never read; its row is
// filled with 0xFF bytes (NaN in every float dtype, -1 in the integer ones) so the error stays visible.
struct PermuteParams {
  const void* x;
  const int32_t* src_idx;
  void* out;
  int64_t num_out;
  int64_t row_bytes;
  int64_t num_src;  // rows of x
  bool skip_empty;  // leave rows with src_idx == -1 unwritten
};

// The gather fused with per-token fp8 quantisation: out e4m3 [N, H], scale fp32 [N, ceil(H/128)].
// An src_idx entry outside [-1, num_src) gives a NaN row with NaN scales (nothing is read).
struct PermuteFp8Params {
  const void* x;
  DType x_dtype;  // float32 / bfloat16 / float16
  const int32_t* src_idx;
  uint8_t* out;
  float* scale;
  int64_t num_out;
  int64_t hidden;
  int64_t num_src;  // rows of x
};

// out[t, :] = sum_j w[t, j] * y[pos[t, j], :] over pos >= 0 (w == 1 when weights is null), fp32
// accumulation in j order, one rounding to the output dtype (= y's dtype). All contiguous.
// A pos entry outside [-1, num_rows) is never read; it makes its token's output row NaN.
struct UnpermuteReduceParams {
  const void* y;
  DType dtype;
  const int32_t* pos;
  const float* weights;  // may be null
  void* out;
  int64_t num_tokens;
  int64_t hidden;
  int topk;  // any (config.h kSlotsPerChunk)
  int64_t num_rows;  // rows of y
};

}  // namespace deepkernels::moe

namespace deepkernels::moe {

// Byte layout of one wire row (deepkernels/moe/wire.py RowFormat): payload [hidden] (e4m3 or x's dtype),
// then scale fp32 [ceil(hidden/128)] (fp8 payload), src int32, lid int32 [topk], w fp32 [topk] (each
// optional, -1 = absent); every field at a 4-byte aligned offset, the row padded to 16 bytes.
struct RowLayout {
  int64_t payload_bytes;  // hidden * payload element size
  int64_t scale_off, src_off, lid_off, w_off;  // byte offsets, -1 = absent
  int64_t end;  // end of the last field (everything from here to row_bytes is zero padding)
  int64_t row_bytes;  // a multiple of 16
};

// Fixed-capacity slot header: int32 [rows for this rank, source tokens, 0, 0].
constexpr int64_t kSlotHeaderBytes = 16;

inline RowLayout make_row_layout(int64_t hidden, int payload_elem_bytes, bool fp8_scales, int topk, bool weights) {
  auto up = [](int64_t v, int64_t a) { return (v + a - 1) / a * a; };
  RowLayout l{};
  l.payload_bytes = hidden * payload_elem_bytes;
  int64_t off = up(l.payload_bytes, 4);
  l.scale_off = l.src_off = l.lid_off = l.w_off = -1;
  l.end = l.payload_bytes;
  if (fp8_scales) {
    l.scale_off = off;
    off += up(hidden, 128) / 128 * 4;
    l.end = off;
  }
  if (topk > 0) {
    l.src_off = off;
    l.lid_off = off + 4;
    off += 4 + 4 * static_cast<int64_t>(topk);
    if (weights) {
      l.w_off = off;
      off += 4 * static_cast<int64_t>(topk);
    }
    l.end = off;
  }
  l.row_bytes = up(off > 0 ? off : 1, 16);
  return l;
}

// Pack the wire rows of a dispatch in one pass (one warp per row): row i gets the payload of token
// src_idx[i] (copied bytes of x; or x quantised to e4m3 + 1x128 scales with `quantize`; or an fp8 x with
// its scales x_scale copied), src, the k local expert ids lid = topk_idx[src, j] - rank(i) * L (-1 where
// not on the row's destination rank) and the weights (0 where not local). src_idx == -1: an empty row
// (zero payload, quantised: scale 1e-4/448; src -1, lid -1, w 0). Gaps and padding are zeroed, so every
// byte of the buffer is written. Destination rank of row i: i / capacity (capacity >= 0, buffer
// [R, 16 + capacity * row_bytes], slot headers written too) or, capacity < 0, the r with
// sum(per_rank[:r]) <= i < sum(per_rank[:r+1]) (buffer [N, row_bytes]).
// src_idx is trusted: an entry outside [-1, num_tokens) is never read; its whole row is 0xFF bytes.
struct PackRowsParams {
  const void* x;  // [T, hidden]
  DType x_dtype;  // float32 / bfloat16 / float16 / float8_e4m3
  const float* x_scale;  // [T, ceil(hidden/128)] with an e4m3 x, else null
  bool quantize;  // float x -> e4m3 + scales
  const int32_t* src_idx;  // [N]
  const int64_t* topk_idx;  // [T, topk] or null (payload-only rows)
  const float* topk_weights;  // [T, topk] or null
  const int32_t* per_rank;  // [R]
  uint8_t* out;
  int64_t num_rows;  // N
  int64_t num_tokens;  // T
  int64_t hidden;
  int topk, num_ranks, num_local_experts;
  int64_t capacity;  // < 0: normal mode
  RowLayout layout;
};

// Split received wire rows into contiguous fields: x [N, payload_bytes] bytes, scale [N, G] fp32,
// src [N] int32, lid [N, topk] int32, w [N, topk] fp32 (each null where the row has no such field).
// Row i sits at i * row_bytes (capacity < 0) or in slot i / capacity after its 16-byte header.
struct UnpackRowsParams {
  const uint8_t* buf;
  void* x;
  float* scale;
  int32_t* src;
  int32_t* lid;
  float* w;
  int64_t num_rows;
  int64_t capacity;
  int topk;
  int64_t scale_groups;
  RowLayout layout;
};

}  // namespace deepkernels::moe
