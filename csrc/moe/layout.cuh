#pragma once
#include <cstdint>
#include "config.h"
#include "params.h"

namespace deepkernels::moe {

// One thread per token. Each CTA histograms its tokens' experts and ranks in shared memory
// (E + R int counters), then adds its histogram to the zeroed global counts with one atomic per
// non-zero bin. A token's rank membership is built 64 ranks at a time in a bit mask, so each
// is_token_in_rank byte is written exactly once.
__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutParams p) {
  extern __shared__ int smem_counts[];
  int* s_expert = smem_counts;
  int* s_rank = smem_counts + p.num_experts;
  for (int i = threadIdx.x; i < p.num_experts + p.num_ranks; i += blockDim.x) smem_counts[i] = 0;
  __syncthreads();

  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < p.num_tokens) {
    const int64_t* row = p.topk_idx + t * p.topk;
    const int experts_per_rank = p.num_experts / p.num_ranks;
    for (int j = 0; j < p.topk; ++j) {
      const int64_t e = row[j];
      if (e >= 0 && e < p.num_experts) atomicAdd(&s_expert[e], 1);
    }
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
}

}  // namespace deepkernels::moe
