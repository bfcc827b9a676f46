#pragma once
// Merge of the split partials by lse: for query row (batch, token, head) with splits i,
//   lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * o_i   (o_i already normalised).
// A row with no split (empty sequence) or whose splits all have lse_i = -inf gets out 0, lse +inf; a NaN
// lse_i (NaN in q, a key row or its scale) makes the row's lse and out NaN. A negative cache_seqlens entry
// (invalid; trusted unless DEEPKERNELS_CHECK=1) gives NaN, so the error shows.
// Sequences with exactly one split were finished by the split-KV kernel and are skipped here.
#include <cuda_bf16.h>

#include "../common/fp8.cuh"
#include "config.h"
#include "params.h"
#include "split_output.cuh"

namespace deepkernels::mla {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_propagating_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per output row; lane owns dims [4 * lane + 128 * j, +4) for j = 0..3.
__global__ void __launch_bounds__(kCombineWarps * 32) mla_combine_kernel(const MlaDecodeParams p) {
  const int lane = threadIdx.x % 32;
  const int rows_q = p.s_q * p.h_q;
  const int64_t global_row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (global_row >= static_cast<int64_t>(p.batch) * rows_q) return;
  const int batch = static_cast<int>(global_row / rows_q);
  const int row = static_cast<int>(global_row % rows_q);  // token * h_q + head
  const int token = row / p.h_q, head = row % p.h_q;
  const int raw_first = p.num_splits[batch], raw_last = p.num_splits[batch + 1];
  if (raw_last - raw_first == 1) return;  // written directly by the split-KV kernel
  // clamped to the partial buffers (b + num_sm_parts splits) in case the plan does not match
  const int total_splits = p.batch + p.num_sm_parts;
  const int first = max(0, min(raw_first, total_splits)), last = max(first, min(raw_last, total_splits));

  float max_lse = p.cache_seqlens[batch] < 0 ? __int_as_float(0x7fffffff) : -INFINITY;
  for (int i = first + lane; i < last; i += 32) {
    max_lse = nan_propagating_max(max_lse, p.lse_accum[int64_t(i) * rows_q + row]);
  }
  max_lse = warp_max(max_lse);
  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int i = first + lane; i < last; i += 32) sum += expf(p.lse_accum[int64_t(i) * rows_q + row] - max_lse);
  }
  sum = warp_sum(sum);
  const bool seen = max_lse != -INFINITY;
  const float lse = seen ? max_lse + logf(sum) : INFINITY;

  float acc[4][4] = {};
  if (isnan(lse)) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[j][k] = lse;
  } else if (seen) {
    for (int i = first; i < last; ++i) {
      const float weight = expf(p.lse_accum[int64_t(i) * rows_q + row] - lse);
      if (weight == 0.f) continue;  // a split with no visible key: its o_i is 0 anyway
      const float* o = p.o_accum + (int64_t(i) * rows_q + row) * kHeadDimV;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 v = *reinterpret_cast<const float4*>(o + 4 * lane + 128 * j);
        acc[j][0] += weight * v.x;
        acc[j][1] += weight * v.y;
        acc[j][2] += weight * v.z;
        acc[j][3] += weight * v.w;
      }
    }
  }
  // out: 16-bit (bf16, or fp16 when p.fp16), 2 bytes per element either way
  auto* out = static_cast<uint16_t*>(p.out) + (int64_t(batch) * rows_q + row) * kHeadDimV;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint2 packed = p.fp16 ? make_uint2(pack_16x2<__half>(acc[j][0], acc[j][1]),
                                             pack_16x2<__half>(acc[j][2], acc[j][3]))
                                : make_uint2(pack_bf16x2(acc[j][0], acc[j][1]), pack_bf16x2(acc[j][2], acc[j][3]));
    *reinterpret_cast<uint2*>(out + 4 * lane + 128 * j) = packed;
  }
  if (lane == 0) p.lse[(int64_t(batch) * p.h_q + head) * p.s_q + token] = lse;
}

}  // namespace deepkernels::mla
