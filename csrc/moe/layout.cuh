#pragma once
#include <cstdint>
#include "config.h"
#include "params.h"

namespace deepkernels::moe {

// An expert id the layout cannot place: -1 is "unused", anything else outside [0, E) is an error.
__device__ __forceinline__ bool bad_expert_id(int64_t e, int num_experts) { return e < -1 || e >= num_experts; }

// One thread per token. Each CTA histograms its tokens' experts and ranks in shared memory
// (E + R int counters, then one error flag), then adds its histogram to the zeroed global counts with
// one atomic per non-zero bin. A token's rank membership is built 64 ranks at a time in a bit mask, so
// each is_token_in_rank byte is written exactly once.
// topk_idx is trusted: a CTA that sees an id outside [-1, E) sets the sign bit of EVERY global count
// (atomicOr commutes with the other CTAs' adds while a count stays < 2^31), so the whole layout comes out
// as INT_MIN + the count of the valid ids: negative, never a plausible answer, and no host sync.
__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutParams p) {
  extern __shared__ int smem_counts[];
  int* s_expert = smem_counts;
  int* s_rank = smem_counts + p.num_experts;
  int* s_bad = s_rank + p.num_ranks;
  for (int i = threadIdx.x; i < p.num_experts + p.num_ranks + 1; i += blockDim.x) smem_counts[i] = 0;
  __syncthreads();

  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < p.num_tokens) {
    const int64_t* row = p.topk_idx + t * p.topk;
    const int experts_per_rank = p.num_experts / p.num_ranks;
    int bad = 0;
    for (int j = 0; j < p.topk; ++j) {
      const int64_t e = row[j];
      if (e >= 0 && e < p.num_experts) atomicAdd(&s_expert[e], 1);
      bad |= bad_expert_id(e, p.num_experts);
    }
    if (bad) atomicAdd(s_bad, 1);
    uint8_t* in_rank = p.is_token_in_rank + t * p.num_ranks;
    for (int r0 = 0; r0 < p.num_ranks; r0 += 64) {
      uint64_t mask = 0;
      for (int j = 0; j < p.topk; ++j) {
        const int64_t e = row[j];
        if (e >= 0 && e < p.num_experts) {
          const int r = static_cast<int>(e / experts_per_rank) - r0;
          if (r >= 0 && r < 64) mask |= uint64_t{1} << r;
        }
      }
      const int n = p.num_ranks - r0 < 64 ? p.num_ranks - r0 : 64;
      for (int r = 0; r < n; ++r) {
        const bool hit = (mask >> r) & 1u;
        in_rank[r0 + r] = hit ? 1 : 0;
        if (hit) atomicAdd(&s_rank[r0 + r], 1);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (s_expert[i] != 0) atomicAdd(p.num_tokens_per_expert + i, s_expert[i]);
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
    if (s_rank[i] != 0) atomicAdd(p.num_tokens_per_rank + i, s_rank[i]);
  if (*s_bad != 0) {  // block-uniform: read after the barrier above
    constexpr int kPoison = static_cast<int>(0x80000000u);
    for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x) atomicOr(p.num_tokens_per_expert + i, kPoison);
    for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x) atomicOr(p.num_tokens_per_rank + i, kPoison);
  }
}

}  // namespace deepkernels::moe
