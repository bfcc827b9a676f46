#pragma once
#include <cstdint>
#include "../common/dtype.h"

namespace deepkernels::moe {

// topk_idx[T, k] int64 (contiguous; -1 or any id outside [0, E) = unused) ->
//   num_tokens_per_rank[R] int32, num_tokens_per_expert[E] int32 (both ZEROED by the caller),
//   is_token_in_rank[T, R] bool (written in full). Expert e lives on rank e / (E / R).
struct LayoutParams {
  const int64_t* topk_idx;
  int32_t* num_tokens_per_rank;
  int32_t* num_tokens_per_expert;
  uint8_t* is_token_in_rank;
  int64_t num_tokens;
  int topk, num_experts, num_ranks;
};

// out[i, :] = x[src_idx[i], :] (raw bytes), a zero row where src_idx[i] == -1. x and out contiguous.
// src_idx is trusted (not checked on the host): an entry outside [-1, num_src) is never read; its row is
// filled with 0xFF bytes (NaN in every float dtype, -1 in the integer ones) so the error stays visible.
struct PermuteParams {
  const void* x;
  const int32_t* src_idx;
  void* out;
  int64_t num_out;
  int64_t row_bytes;
  int64_t num_src;  // rows of x
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
  int topk;  // <= kMaxTopk (config.h)
  int64_t num_rows;  // rows of y
};

}  // namespace deepkernels::moe
