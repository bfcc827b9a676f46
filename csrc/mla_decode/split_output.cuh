#pragma once
// Where a split kernel's result goes (both split kernels): a sequence with a single split writes the final
// bf16 out and lse directly (combine.cuh skips it); otherwise the split's output, normalised by its own
// softmax sum, goes to the fp32 o_accum scratch and its lse to lse_accum for combine.cuh to merge.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "../common/fp8.cuh"
#include "../common/ptx.cuh"
#include "config.h"
#include "params.h"

namespace deepkernels::mla {

// fmaxf drops NaN; the softmax and the merge must keep it, so a NaN in q, a key row that is read or its
// scale reaches the row's max, lse and output (as in FlashMLA and torch SDPA).
__device__ __forceinline__ float nan_propagating_max(float a, float b) {
  return (isnan(a) || isnan(b)) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
}

// Work blocks (kBlockTokens keys) of a sequence; a negative length (invalid, DEEPKERNELS_CHECK=1 reports it)
// has none, and no `seqlen + 63` overflow for lengths near INT_MAX.
__device__ __forceinline__ int num_work_blocks(int seqlen) {
  return seqlen <= 0 ? 0 : (seqlen - 1) / kBlockTokens + 1;
}

// Two floats rounded (to nearest even) to the 16-bit type T and packed, element 0 in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_16x2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return float_to_half_bits<__half>(lo) | (float_to_half_bits<__half>(hi) << 16);
  } else {
    return pack_bf16x2(lo, hi);
  }
}

// D (fp32) += A B with 16-bit inputs of type T: mma.sync m16n8k16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    ptx::mma_f16_16816(d, a, b0, b1);
  } else {
    ptx::mma_bf16_16816(d, a, b0, b1);
  }
}

// T: the 16-bit type of out (bf16 or fp16).
template <typename T>
struct SplitOutput {
  bool direct, valid;
  int batch, split, rows_q;
  float* o_split;
  T* out_batch;

  __device__ __forceinline__ SplitOutput(const MlaDecodeParams& p, int batch_, int split_)
      : direct(p.num_splits[batch_ + 1] - p.num_splits[batch_] == 1),
        // a split index outside the b + num_sm_parts partial buffers (a plan that does not match cache_seqlens)
        // writes nothing rather than out of bounds
        valid(direct || (split_ >= 0 && split_ < p.batch + p.num_sm_parts)), batch(batch_), split(split_),
        rows_q(p.s_q * p.h_q),
        o_split(p.o_accum + static_cast<int64_t>(split_) * rows_q * kHeadDimV),
        out_batch(static_cast<T*>(p.out) + static_cast<int64_t>(batch_) * rows_q * kHeadDimV) {}

  // Output columns col, col + 1 of query row (token * h_q + head): offset = that row * kHeadDimV + col.
  __device__ __forceinline__ void store_pair(int64_t offset, float x, float y) const {
    if (!valid) return;
    if (direct) {
      *reinterpret_cast<uint32_t*>(out_batch + offset) = pack_16x2<T>(x, y);
    } else {
      *reinterpret_cast<float2*>(o_split + offset) = make_float2(x, y);
    }
  }

  // seen: the row saw a key in this split (its running max is not -inf; NaN counts as seen, so it propagates);
  // row_max: the running max of the log2-scaled scores; sum: its sum of exp2.
  __device__ __forceinline__ void store_lse(const MlaDecodeParams& p, int token, int head, bool seen, float row_max,
                                            float sum) const {
    if (!valid) return;
    // natural log: (max_log2 + log2(sum)) * ln 2. A row with no visible key: -inf for a partial (weight 0
    // in the merge), +inf in the final output.
    const float lse = seen ? (row_max + log2f(sum)) * 0.6931471805599453f : (direct ? INFINITY : -INFINITY);
    if (direct) {
      p.lse[(static_cast<int64_t>(batch) * p.h_q + head) * p.s_q + token] = lse;
    } else {
      p.lse_accum[static_cast<int64_t>(split) * rows_q + token * p.h_q + head] = lse;
    }
  }
};

}  // namespace deepkernels::mla
