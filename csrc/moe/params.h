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

// out[i, :] = x[src_idx[i], :] (raw bytes), a zero row where src_idx[i] < 0. x and out contiguous.
struct PermuteParams {
  const void* x;
  const int32_t* src_idx;
  void* out;
  int64_t num_out;
  int64_t row_bytes;
};

// The gather fused with per-token fp8 quantisation: out e4m3 [N, H], scale fp32 [N, ceil(H/128)].
struct PermuteFp8Params {
  const void* x;
  DType x_dtype;  // float32 / bfloat16 / float16
  const int32_t* src_idx;
  uint8_t* out;
  float* scale;
  int64_t num_out;
  int64_t hidden;
};

// out[t, :] = sum_j w[t, j] * y[pos[t, j], :] over pos >= 0 (w == 1 when weights is null), fp32
// accumulation in j order, one rounding to the output dtype (= y's dtype). All contiguous.
struct UnpermuteReduceParams {
  const void* y;
  DType dtype;
  const int32_t* pos;
  const float* weights;  // may be null
  void* out;
  int64_t num_tokens;
  int64_t hidden;
  int topk;  // <= kMaxTopk (config.h)
};

}  // namespace deepkernels::moe
